"""Admin endpoints (``Authorization: Bearer <admin token>``): create, list, show, revoke keys."""

from __future__ import annotations

from fastapi import APIRouter, Query

from server.deps import AccountingDep, AdminDep, KeyStoreDep
from server.errors import NotFoundError
from server.keys import CreatedKey, KeyRecord, KeySpec
from server.schemas import KeyList

router = APIRouter(prefix="/admin", tags=["Admin"], dependencies=[AdminDep])


@router.post(
    "/keys", response_model=CreatedKey, status_code=201, summary="Create a key (its secret is shown once)"
)
async def create_key(spec: KeySpec, keys: KeyStoreDep) -> CreatedKey:
    return await keys.create(spec)


@router.get("/keys", response_model=KeyList, summary="List keys")
async def list_keys(keys: KeyStoreDep) -> KeyList:
    return KeyList(keys=await keys.list())


@router.get("/keys/{key_id}", response_model=KeyRecord, summary="Show a key")
async def show_key(key_id: str, keys: KeyStoreDep) -> KeyRecord:
    record = await keys.get(key_id)
    if record is None:
        raise NotFoundError(f"key {key_id!r} not found", code="key_not_found")
    return record


@router.delete("/keys/{key_id}", response_model=KeyRecord, summary="Revoke a key")
async def revoke_key(key_id: str, keys: KeyStoreDep) -> KeyRecord:
    record = await keys.revoke(key_id)
    if record is None:
        raise NotFoundError(f"key {key_id!r} not found", code="key_not_found")
    return record


@router.get("/keys/{key_id}/audit", summary="A key's audit events (charges and refunds), oldest first")
async def audit(
    key_id: str, accounting: AccountingDep, keys: KeyStoreDep, count: int = Query(1000, ge=1, le=100_000)
) -> list[dict[str, str]]:
    if await keys.get(key_id) is None:
        raise NotFoundError(f"key {key_id!r} not found", code="key_not_found")
    return await accounting.audit_events(key_id, count)
