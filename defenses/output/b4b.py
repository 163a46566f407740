"""Bucks for Buckets, B4B (Dubinski, Pawlak, Boenisch, Trzcinski & Dziedzic, "Bucks for Buckets
(B4B): Active Defenses Against Stealing Encoders", NeurIPS 2023).

An encoder thief must cover much more of the embedding space than an honest user who solves one
downstream task. B4B has three building blocks, all three here:

1. **Coverage estimation** with locality-sensitive hashing: ``n_bits`` random hyperplanes (SimHash)
   map each returned embedding to one of ``2^n_bits`` buckets; a key's coverage is the fraction of
   buckets its queries have occupied. The occupied buckets are a bitmap per (key, model) in Redis,
   updated by one Lua script per request (``SETBIT`` per image, in batch order), so the coverage is
   exact across workers and each image of a batch sees the coverage after itself. The bitmap's
   key carries the API key's hash tag (:meth:`DefenseStore.key`), so the script runs unchanged on a
   Redis Cluster.
2. **Cost function**: the coverage ``c`` sets the noise added to the embedding,
   ``sigma(c) = alpha (exp(lambda c^beta) - 1)`` (exponential in the coverage, as in the paper), in
   units of the embedding's root-mean-square value. Honest users with low coverage get almost clean
   embeddings; a thief's grow noisier with every new region it explores.
3. **Per-user transformations** against sybils: every key's embeddings go through its own secret
   affine map (a random rotation, a scale, a shift, a shuffle of the dimensions), drawn from
   (server secret, key, model). A downstream model trained on one key's outputs works as before (a
   linear probe is invariant to an invertible affine map), but outputs of several sybil keys do not
   live in one space and cannot simply be pooled.

Defaults here: ``n_bits`` = 12 (4096 buckets), ``alpha`` = 0.03, ``lambda`` = 55, ``beta`` = 1,
calibrated on the quick encoder as the paper calibrates its cost function on honest and stealing
query streams (``python benchmarks/b4b_coverage.py``): an honest user embedding 3,000 MNIST digits
occupies 0.7 % of the buckets (sigma 0.014 RMS), a thief asking 1k / 5k / 20k Fashion-MNIST images
3.1 / 5.0 / 7.0 % (sigma 0.14 / 0.43 / 1.4 RMS). Coverage depends on the hyperplanes drawn (another
draw gave 12 % at 20k) and an honest user whose task is the encoder's own domain covers as much as a
thief and pays as much (``stealrange defenses cost``): calibrate with your users' traffic.

Each worker keeps the per-key transformations it computed in a least-recently-used cache bounded by
bytes (``B4B.CACHE_BYTES``, 64 MiB: 64 keys at embedding dimension 512, whose map is 1 MiB); an
evicted map is recomputed, identically, from the secret. The LSH hyperplanes are per model, not per
key (``n_bits x dim`` floats each).
"""

from __future__ import annotations

import hashlib
import hmac
import math
import threading
from collections import OrderedDict
from typing import Any

import torch
from pydantic import Field

from defenses.base import DEFENSES, DefenseContext, DefenseParams, OutputDefense
from defenses.output.probability_noise import draw_noise
from defenses.state import DefenseStore

OCCUPY_BUCKETS = """
local occupied = redis.call('BITCOUNT', KEYS[1])
local out = {}
for i = 1, #ARGV do
  if redis.call('SETBIT', KEYS[1], ARGV[i], 1) == 0 then occupied = occupied + 1 end
  out[i] = occupied
end
return out
"""


class B4BParams(DefenseParams):
    n_bits: int = Field(12, ge=1, le=24, description="LSH hyperplanes: 2^n_bits buckets")
    alpha: float = Field(0.03, ge=0, description="cost function scale")
    lam: float = Field(55.0, ge=0, description="cost function exponent rate (lambda)")
    beta: float = Field(1.0, gt=0, description="cost function power on the coverage")
    max_sigma: float = Field(10.0, gt=0, description="cap on the noise (RMS units)")
    transform: bool = Field(True, description="per-key secret affine transformation (anti-sybil)")
    shift: float = Field(1.0, ge=0, description="standard deviation of the per-key shift")


def noise_scale(coverage: torch.Tensor, alpha: float, lam: float, beta: float, cap: float) -> torch.Tensor:
    """The cost function ``alpha (exp(lambda c^beta) - 1)``, capped at ``cap``."""
    return (alpha * torch.expm1(lam * coverage.clamp(0, 1).pow(beta))).clamp(max=cap)


def _seeded(secret: bytes, *parts: str) -> torch.Generator:
    digest = hmac.new(secret, "|".join(parts).encode(), hashlib.sha256).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "big") >> 1)


def _nbytes(tensor: torch.Tensor) -> int:
    return tensor.element_size() * tensor.nelement()


def lsh_buckets(embeddings: torch.Tensor, hyperplanes: torch.Tensor) -> list[int]:
    """SimHash: bit ``j`` of an embedding's bucket is ``<h_j, e> > 0``."""
    bits = (embeddings.float().cpu() @ hyperplanes.T > 0).long()
    weights = 2 ** torch.arange(hyperplanes.shape[0])
    return (bits * weights).sum(dim=1).tolist()


@DEFENSES.register
class B4B(OutputDefense):
    """Coverage-priced noise plus a per-key affine map; coverage kept in Redis."""

    name = "b4b"
    paper = "Dubinski et al., Bucks for Buckets (B4B), NeurIPS 2023"
    kinds = frozenset({"encoder"})
    Params = B4BParams
    params: B4BParams
    stateful = True
    CACHE_BYTES = 64 * 2**20  # per-key transformations kept in memory, in all (LRU; recomputed when evicted)

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self._hyperplanes: dict[tuple[bytes, str, int], torch.Tensor] = {}
        self._transforms: OrderedDict[tuple[bytes, str, str, int], tuple[torch.Tensor, torch.Tensor]] = (
            OrderedDict()
        )
        self._transform_bytes = 0
        self._transform_lock = threading.Lock()

    @property
    def buckets(self) -> int:
        return 2**self.params.n_bits

    def hyperplanes(self, context: DefenseContext, dim: int) -> torch.Tensor:
        """``[n_bits, dim]`` Gaussian normals, fixed per (server secret, model): shared by all keys."""
        key = (context.secret, context.model, dim)
        if key not in self._hyperplanes:
            generator = _seeded(context.secret, "b4b-lsh", context.model, str(dim))
            self._hyperplanes[key] = torch.randn(self.params.n_bits, dim, generator=generator)
        return self._hyperplanes[key]

    def transformation(self, context: DefenseContext, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The key's ``(M, b)`` with ``e -> e M + b``: rotation x scale x shuffle, and a shift."""
        key = (context.secret, context.key_id, context.model, dim)
        with self._transform_lock:  # apply() runs in worker threads
            cached = self._transforms.get(key)
            if cached is not None:
                self._transforms.move_to_end(key)
                return cached
        generator = _seeded(context.secret, "b4b-transform", context.key_id, context.model, str(dim))
        q, r = torch.linalg.qr(torch.randn(dim, dim, generator=generator, dtype=torch.float64))
        rotation = q * torch.sign(torch.diagonal(r))  # Haar-distributed orthogonal matrix
        scale = math.exp(float(torch.empty(1, dtype=torch.float64).uniform_(-0.7, 0.7, generator=generator)))
        shuffle = torch.randperm(dim, generator=generator)
        matrix = (rotation * scale)[:, shuffle].float()
        shift = torch.randn(dim, generator=generator) * self.params.shift
        self._cache_transform(key, matrix, shift)
        return matrix, shift

    def _cache_transform(
        self, key: tuple[bytes, str, str, int], matrix: torch.Tensor, shift: torch.Tensor
    ) -> None:
        """Keep ``(matrix, shift)``, evicting the least recently used maps past ``CACHE_BYTES``."""
        size = _nbytes(matrix) + _nbytes(shift)
        if size > self.CACHE_BYTES:
            return  # larger than the whole cache: recomputed on every request
        with self._transform_lock:
            if key in self._transforms:  # another thread computed it meanwhile
                self._transforms.move_to_end(key)
                return
            self._transforms[key] = (matrix, shift)
            self._transform_bytes += size
            while self._transform_bytes > self.CACHE_BYTES:
                _, (old_matrix, old_shift) = self._transforms.popitem(last=False)
                self._transform_bytes -= _nbytes(old_matrix) + _nbytes(old_shift)

    @property
    def cached_bytes(self) -> int:
        """Bytes held by this worker's cache of per-key transformations."""
        return self._transform_bytes

    def state_key(self, store: DefenseStore, key_id: str, model: str) -> str:
        return store.key(key_id, "b4b", model)

    async def coverage(self, store: DefenseStore, key_id: str, model: str) -> dict[str, float]:
        """Occupied buckets and coverage of one key (for usage and the admin API)."""
        occupied = int(await store.redis.bitcount(self.state_key(store, key_id, model)))
        return {"occupied_buckets": occupied, "buckets": self.buckets, "coverage": occupied / self.buckets}

    async def key_state(self, store: DefenseStore, key_id: str, model: str) -> dict[str, Any]:
        """The key's coverage (:meth:`coverage`): what the admin API shows."""
        return await self.coverage(store, key_id, model)

    async def observe(self, outputs: torch.Tensor, context: DefenseContext, store: DefenseStore) -> None:
        buckets = lsh_buckets(outputs, self.hyperplanes(context, outputs.shape[1]))
        occupied = await store.run(
            "b4b_occupy", OCCUPY_BUCKETS, [self.state_key(store, context.key_id, context.model)], buckets
        )
        context.state[self.name] = (
            torch.tensor([int(v) for v in occupied], dtype=torch.float32) / self.buckets
        )

    def apply(self, outputs: torch.Tensor, context: DefenseContext) -> torch.Tensor:
        coverage = context.state.get(self.name)
        if coverage is None:
            raise RuntimeError("b4b is stateful: observe() must run before apply() (it needs Redis)")
        p = self.params
        d = outputs.shape[1]
        sigma = noise_scale(coverage, p.alpha, p.lam, p.beta, p.max_sigma).to(outputs.device)
        rms = outputs.norm(dim=1) / math.sqrt(d)
        noise = draw_noise(context, self.name, (d,), "gaussian", 1.0).to(outputs.device, outputs.dtype)
        noisy = outputs + noise * (sigma * rms)[:, None]
        if not p.transform:
            return noisy
        matrix, shift = self.transformation(context, d)
        return noisy @ matrix.to(outputs.device, outputs.dtype) + shift.to(outputs.device, outputs.dtype)
