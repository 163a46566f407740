"""FastAPI dependencies, all in one place, as ``Annotated`` aliases the routers use.

Everything a route needs was built once in ``create_app`` and lives on ``app.state``; only this
module reads it from there. Every dependency is ``async def``, even those that only read
``app.state``: FastAPI runs a plain ``def`` dependency in its thread pool, a thread hop per
dependency per request (~45 us and a context switch each, measured).
"""

from __future__ import annotations

import hmac
from collections.abc import Callable, Coroutine, Mapping
from dataclasses import dataclass
from typing import Annotated, Any

from fastapi import Depends, Request, Response
from fastapi.routing import APIRoute
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer
from redis.asyncio import Redis

from defenses.state import DefenseStore
from server.accounting import Accounting
from server.errors import AuthenticationError, PermissionDeniedError
from server.keys import KeyRecord, KeyStore
from server.registry import ModelRegistry
from server.service import InferenceService, RequestIds
from server.settings import ServerSettings
from server.stats import ModelStats

_bearer = HTTPBearer(auto_error=False, description="Authorization: Bearer <api key>")
_api_key_header = APIKeyHeader(name="X-API-Key", auto_error=False, description="the API key")


async def get_settings(request: Request) -> ServerSettings:
    return request.app.state.settings


async def get_registry(request: Request) -> ModelRegistry:
    return request.app.state.registry


async def get_accounting(request: Request) -> Accounting:
    return request.app.state.accounting


async def get_key_store(request: Request) -> KeyStore:
    return request.app.state.keys


async def get_defense_store(request: Request) -> DefenseStore:
    return request.app.state.defense_store


async def get_service(request: Request) -> InferenceService:
    return request.app.state.service


async def get_stats(request: Request) -> ModelStats:
    return request.app.state.stats


async def get_redis(request: Request) -> Redis:
    return request.app.state.redis


SettingsDep = Annotated[ServerSettings, Depends(get_settings)]
RegistryDep = Annotated[ModelRegistry, Depends(get_registry)]
AccountingDep = Annotated[Accounting, Depends(get_accounting)]
KeyStoreDep = Annotated[KeyStore, Depends(get_key_store)]
DefenseStoreDep = Annotated[DefenseStore, Depends(get_defense_store)]
ServiceDep = Annotated[InferenceService, Depends(get_service)]
StatsDep = Annotated[ModelStats, Depends(get_stats)]
RedisDep = Annotated[Redis, Depends(get_redis)]


async def get_api_key(
    keys: KeyStoreDep,
    bearer: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
    x_api_key: Annotated[str | None, Depends(_api_key_header)],
) -> KeyRecord:
    """The caller's key from ``Authorization: Bearer`` or ``X-API-Key``; never from the URL."""
    presented = bearer.credentials if bearer is not None else x_api_key
    return await keys.authenticate(presented)


ApiKeyDep = Annotated[KeyRecord, Depends(get_api_key)]


def presented_key(headers: Mapping[str, str]) -> str | None:
    """The API key a request presents: ``Authorization: Bearer <key>`` (scheme case-insensitive),
    else ``X-API-Key``; what ``get_api_key``'s two security dependencies read, as one function."""
    scheme, _, credentials = headers.get("authorization", "").partition(" ")
    credentials = credentials.strip()  # as fastapi.security.utils.get_authorization_scheme_param
    if scheme.lower() == "bearer" and credentials:
        return credentials
    return headers.get("x-api-key")


@dataclass(frozen=True)
class InferenceCall:
    """What an inference route needs: the caller's key, the service, the request's ids."""

    key: KeyRecord
    service: InferenceService
    ids: RequestIds


async def get_inference_call(request: Request) -> InferenceCall:
    """The inference routes' one dependency. FastAPI spends tens of microseconds solving each
    dependency of each request (the six of ``key``, ``service`` and ``ids`` were ~0.14 ms of a
    1-image request's ~2 ms of event-loop time on 2 cores; docs/serving.md), so the data plane reads
    ``app.state`` itself; the routes declare their security schemes in their OpenAPI entry.

    The key's record may come from the worker's key cache: the charge script checks revocation and
    the budget again in Redis before any answer (:mod:`server.keys`)."""
    state = request.app.state
    key = await state.keys.authenticate(presented_key(request.headers), cached=True)
    ids = RequestIds(request.state.request_id, request.state.client_request_id)
    return InferenceCall(key, state.service, ids)


InferenceCallDep = Annotated[InferenceCall, Depends(get_inference_call)]


class InferenceRoute(APIRoute):
    """The route class of the KServe inference route (FastAPI's documented way to customise how a
    route handles requests: ``APIRouter(route_class=...)``). FastAPI still builds the route's
    OpenAPI entry from the endpoint's signature, but the handler calls the endpoint itself, with the
    path's parameters and :func:`get_inference_call`: FastAPI 0.165 re-inspected the endpoint's
    dependencies and parameters on every request, a quarter of a 1-image request's event-loop time
    under load (docs/serving.md). The endpoint must take exactly ``request``, ``call`` and the path's
    parameters as strings."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        endpoint = self.endpoint

        async def handler(request: Request) -> Response:
            call = await get_inference_call(request)
            response: Response = await endpoint(request=request, call=call, **request.path_params)
            return response

        return handler


# The security schemes of the two dependencies above, for routes that read the key themselves.
API_KEY_SECURITY: list[dict[str, list[str]]] = [{"HTTPBearer": []}, {"APIKeyHeader": []}]


async def require_admin(
    settings: SettingsDep, bearer: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]
) -> None:
    """Admin endpoints need ``Authorization: Bearer <admin token>``; disabled when no token is set.

    An empty token is no token (the settings read it as unset), so an empty credential can never
    match it.
    """
    token = settings.admin_token.get_secret_value() if settings.admin_token is not None else ""
    if not token:
        raise PermissionDeniedError(
            "admin endpoints are disabled (set STEALRANGE_ADMIN_TOKEN)", code="admin_disabled"
        )
    given = bearer.credentials if bearer is not None else ""
    if not given or not hmac.compare_digest(token.encode(), given.encode()):
        raise AuthenticationError("invalid admin token", code="invalid_admin_token")


AdminDep = Depends(require_admin)
