"""Admin endpoints (``Authorization: Bearer <admin token>``): create, list, show, revoke keys; a key's
audit stream and defense state."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Query

from server.deps import AccountingDep, AdminDep, DefenseStoreDep, KeyStoreDep, RegistryDep
from server.errors import InvalidInputError, NotFoundError
from server.keys import CreatedKey, KeyRecord, KeySpec
from server.schemas import KeyList

router = APIRouter(prefix="/admin", tags=["Admin"], dependencies=[AdminDep])


@router.post(
    "/keys", response_model=CreatedKey, status_code=201, summary="Create a key (its secret is shown once)"
)
async def create_key(spec: KeySpec, keys: KeyStoreDep, registry: RegistryDep) -> CreatedKey:
    known = registry.profiles()
    if spec.defense_profile is not None and spec.defense_profile not in known:
        raise InvalidInputError(
            f"defense profile {spec.defense_profile!r} is defined by no served model "
            f"(profiles: {', '.join(sorted(known)) or 'none'}; see defenses.json 'profiles')",
            code="unknown_defense_profile",
            param="defense_profile",
        )
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


@router.get(
    "/keys/{key_id}/defenses",
    summary="A key's defense state: each stateful defense's and the detector's, by name, and its flags",
)
async def defense_state(
    key_id: str, keys: KeyStoreDep, registry: RegistryDep, store: DefenseStoreDep
) -> dict[str, Any]:
    if await keys.get(key_id) is None:
        raise NotFoundError(f"key {key_id!r} not found", code="key_not_found")
    models: dict[str, dict[str, Any]] = {}
    for name in registry.names():
        served = registry.models[name]
        state: dict[str, Any] = {}
        for defense in {id(d): d for p in served.defenses.values() for d in p.defenses}.values():
            shown = await defense.key_state(store, key_id, name)
            if shown is not None:
                state[defense.name] = shown
        if served.detector is not None:
            state[served.detector.name] = await served.detector.state(store, key_id, name)
        if state:
            models[name] = state
    return {"key_id": key_id, "models": models, "flags": await store.flags(key_id)}
