"""``GET /v1/usage``: the calling key's budget, what it used, and its rate policy."""

from __future__ import annotations

from fastapi import APIRouter

from server.deps import ApiKeyDep, DefenseStoreDep
from server.errors import ERROR_RESPONSES
from server.schemas import KeyFlag, RatePolicy, Usage

router = APIRouter(tags=["Usage"])


@router.get(
    "/v1/usage",
    response_model=Usage,
    summary="This key's budget, usage and rate policy",
    responses={401: ERROR_RESPONSES[401]},
)
async def usage(key: ApiKeyDep, store: DefenseStoreDep) -> Usage:
    remaining = -1 if key.budget < 0 else max(0, key.budget - key.used)
    flags = {
        # Which detection and since when; the statistics (W, delta) stay on the admin API.
        model: KeyFlag(flag=str(f.get("flag", "flagged")), detector=f.get("detector"), since=f.get("at"))
        for model, f in (await store.flags(key.key_id)).items()
    }
    return Usage(
        key_id=key.key_id,
        name=key.name,
        tier=key.tier,
        models=key.models,
        budget=key.budget,
        used=key.used,
        remaining=remaining,
        rate=RatePolicy(images_per_second=key.rate, burst=key.burst),
        revoked=key.revoked,
        flags=flags,
    )
