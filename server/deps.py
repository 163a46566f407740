"""FastAPI dependencies, all in one place, as ``Annotated`` aliases the routers use."""

from __future__ import annotations

import hmac
from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer

from defenses.state import DefenseStore
from server.accounting import Accounting
from server.errors import AuthenticationError, PermissionDeniedError
from server.keys import KeyRecord, KeyStore
from server.registry import ModelRegistry
from server.settings import ServerSettings

_bearer = HTTPBearer(auto_error=False, description="Authorization: Bearer <api key>")
_api_key_header = APIKeyHeader(name="X-API-Key", auto_error=False, description="the API key")


def get_settings(request: Request) -> ServerSettings:
    return request.app.state.settings


def get_registry(request: Request) -> ModelRegistry:
    return request.app.state.registry


def get_accounting(request: Request) -> Accounting:
    return request.app.state.accounting


def get_key_store(request: Request) -> KeyStore:
    return request.app.state.keys


def get_defense_store(request: Request) -> DefenseStore:
    return request.app.state.defense_store


SettingsDep = Annotated[ServerSettings, Depends(get_settings)]
RegistryDep = Annotated[ModelRegistry, Depends(get_registry)]
AccountingDep = Annotated[Accounting, Depends(get_accounting)]
KeyStoreDep = Annotated[KeyStore, Depends(get_key_store)]
DefenseStoreDep = Annotated[DefenseStore, Depends(get_defense_store)]


async def get_api_key(
    keys: KeyStoreDep,
    bearer: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
    x_api_key: Annotated[str | None, Depends(_api_key_header)],
) -> KeyRecord:
    """The caller's key from ``Authorization: Bearer`` or ``X-API-Key``; never from the URL."""
    presented = bearer.credentials if bearer is not None else x_api_key
    return await keys.authenticate(presented)


ApiKeyDep = Annotated[KeyRecord, Depends(get_api_key)]


async def require_admin(
    settings: SettingsDep, bearer: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]
) -> None:
    """Admin endpoints need ``Authorization: Bearer <admin token>``; disabled when no token is set."""
    if settings.admin_token is None:
        raise PermissionDeniedError(
            "admin endpoints are disabled (set STEALRANGE_ADMIN_TOKEN)", code="admin_disabled"
        )
    expected = settings.admin_token.get_secret_value().encode()
    given = (bearer.credentials if bearer else "").encode()
    if not hmac.compare_digest(expected, given):
        raise AuthenticationError("invalid admin token", code="invalid_admin_token")


AdminDep = Depends(require_admin)


def request_id(request: Request) -> str:
    """The request id set by the middleware (the caller's ``X-Request-ID`` or a fresh one)."""
    return request.state.request_id


RequestIdDep = Annotated[str, Depends(request_id)]
