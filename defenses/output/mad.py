"""Prediction Poisoning / MAD (Orekondy, Schiele & Fritz, "Prediction Poisoning: Towards Defenses
Against DNN Model Stealing Attacks", ICLR 2020).

MAD perturbs each posterior ``y`` into ``y~`` so that the gradient an attacker would take when
training on ``y~`` points as far as possible from the one ``y`` would give, while ``y~`` stays a
distribution within a utility bound ``||y~ - y||_p <= epsilon``. With ``G = d log F(x; w) / dw``
(rows: one class's log-likelihood gradient, ``[C, P]``) of a proxy of the attacker's model ``F``:

    max_{y~}  || G^T y~ / ||G^T y~||  -  G^T y / ||G^T y|| ||^2
    s.t.       y~ in the simplex,  ||y~ - y||_p <= epsilon

solved as the paper's released code does by default: the "extreme" oracle evaluates the objective
at every vertex ``e_k`` of the simplex and keeps the best, then a line search along ``y -> e_k``
keeps the largest step within the bound; along that segment the L1 and L2 distances grow linearly,
so the step is ``alpha = min(1, epsilon / ||e_k - y||_p)``. MAD-argmax (``preserve_argmax``)
shortens the step so the top-1 label does not change.

The proxy is the served architecture re-initialised from a seed (the defender does not know the
attacker's model; the paper finds a randomly initialised surrogate suffices; the victim itself
cannot serve, since ``G^T y = 0`` when ``F`` is the model that produced ``y``). ``G`` is taken over
every parameter (``jacobian="all"``, the paper's default) or only the last linear layer
(``"last_layer"``, much cheaper: ``G`` over all 0.9 M parameters of the quick classifier costs
about 60 ms per image on a 2-core CPU). Defaults: ``epsilon`` = 0.5 in L1 (the paper sweeps 0 to 2;
at 1.0 a confident answer moves half-way to another class and its top-1 label flips).
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import torch
from pydantic import Field
from torch import nn
from torch.func import functional_call, jacrev, vmap

from defenses.base import DEFENSES, DefenseContext, DefenseParams, OutputDefense

if TYPE_CHECKING:
    from common.checkpoints import ModelCard
    from common.models import ImageModel


class MADParams(DefenseParams):
    epsilon: float = Field(0.5, ge=0, description="utility bound on ||y~ - y||_p")
    norm: Literal["l1", "l2"] = Field("l1", description="distance of the bound (the paper's ydist)")
    jacobian: Literal["all", "last_layer"] = Field("all", description="parameters G is taken over")
    preserve_argmax: bool = Field(False, description="MAD-argmax: keep the top-1 label")
    proxy_seed: int = Field(0, description="seed of the proxy's random initialisation")
    chunk: int | None = Field(
        None,
        ge=1,
        description="images per Jacobian evaluation (memory: chunk x C x P floats); "
        "default 4 for all parameters, 256 for the last layer",
    )


def reinitialised(model: nn.Module, seed: int) -> nn.Module:
    """A copy of ``model`` whose every layer is reset from ``seed`` (in eval mode)."""
    proxy = copy.deepcopy(model).cpu().eval()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for module in proxy.modules():
            if hasattr(module, "reset_parameters"):
                module.reset_parameters()  # type: ignore[operator]
    for parameter in proxy.parameters():
        parameter.requires_grad_(False)
    return proxy


def log_likelihood_jacobian(model: nn.Module, x: torch.Tensor, names: list[str]) -> torch.Tensor:
    """``[n, C, P]``: per image, the gradient of each class's log-probability w.r.t. ``names``."""
    params = dict(model.named_parameters())
    buffers = dict(model.named_buffers())
    chosen = {k: params[k].detach() for k in names}
    fixed = {k: v.detach() for k, v in params.items() if k not in chosen}

    def log_probs(chosen: dict[str, torch.Tensor], image: torch.Tensor) -> torch.Tensor:
        logits = functional_call(model, ({**fixed, **chosen, **buffers},), (image.unsqueeze(0),))
        return torch.log_softmax(logits, dim=1)[0]

    jac = vmap(jacrev(log_probs), in_dims=(None, 0))(chosen, x)
    n, c = x.shape[0], next(iter(jac.values())).shape[1]
    return torch.cat([jac[k].reshape(n, c, -1) for k in names], dim=2)


def mad_objective(G: torch.Tensor, y_tilde: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``|| G^T y~/||G^T y~|| - G^T y/||G^T y|| ||^2`` per image; ``G [n, C, P]``, ``y [n, C]``."""
    u = torch.einsum("ncp,nc->np", G, y_tilde)
    v = torch.einsum("ncp,nc->np", G, y)
    u = u / u.norm(dim=1, keepdim=True).clamp_min(1e-12)
    v = v / v.norm(dim=1, keepdim=True).clamp_min(1e-12)
    return (u - v).pow(2).sum(dim=1)


def vertex_objectives(G: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``[n, C]``: the objective at every vertex ``e_k`` of the simplex (``G^T e_k`` is row ``k``)."""
    v = torch.einsum("ncp,nc->np", G, y)
    v = v / v.norm(dim=1, keepdim=True).clamp_min(1e-12)
    u = G / G.norm(dim=2, keepdim=True).clamp_min(1e-12)
    return (u - v.unsqueeze(1)).pow(2).sum(dim=2)


def step_towards(
    y: torch.Tensor, target: torch.Tensor, epsilon: float, norm: str, preserve_argmax: bool
) -> torch.Tensor:
    """``y + alpha (e_target - y)`` with the largest ``alpha`` in [0, 1] within the bound."""
    vertex = torch.nn.functional.one_hot(target, y.shape[1]).to(y.dtype)
    direction = vertex - y
    length = direction.abs().sum(dim=1) if norm == "l1" else direction.norm(dim=1)
    alpha = (epsilon / length.clamp_min(1e-12)).clamp(max=1.0)
    if preserve_argmax:
        top = y.argmax(dim=1)
        y_top = y.gather(1, top[:, None])[:, 0]
        y_k = y.gather(1, target[:, None])[:, 0]
        gap = (y_top - y_k).clamp_min(0.0)
        # (1 - a) y_top >= (1 - a) y_k + a  <=>  a <= gap / (1 + gap); shrink a hair to keep it strict.
        limit = torch.where(target == top, torch.ones_like(gap), gap / (1 + gap) * (1 - 1e-6))
        alpha = torch.minimum(alpha, limit)
    return y + alpha[:, None] * direction


@DEFENSES.register
class MAD(OutputDefense):
    """Maximise the angular deviation of the attacker's gradient within ``||y~ - y||_p <= epsilon``."""

    name = "mad"
    paper = "Orekondy et al., Prediction Poisoning, ICLR 2020"
    kinds = frozenset({"classifier"})
    Params = MADParams
    params: MADParams
    needs_model = True

    proxy: nn.Module | None = None  # set by bind()
    names: tuple[str, ...] = ()

    def bind(self, model: ImageModel, card: ModelCard, folder: Path | None) -> None:
        self.proxy = reinitialised(model, self.params.proxy_seed)
        names = [name for name, _ in self.proxy.named_parameters()]
        if self.params.jacobian == "last_layer":
            last = [m for m in self.proxy.modules() if isinstance(m, nn.Linear)][-1]
            ids = {id(p) for p in last.parameters()}
            names = [name for name, p in self.proxy.named_parameters() if id(p) in ids]
        self.names = tuple(names)

    def targets(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The best vertex per image, ``G`` computed ``chunk`` images at a time and then dropped."""
        if self.proxy is None:
            raise RuntimeError("mad needs the served model: call bind() first")
        chunk = self.params.chunk or (256 if self.params.jacobian == "last_layer" else 4)
        best = []
        for xs, ys in zip(x.split(chunk), y.split(chunk), strict=True):
            G = log_likelihood_jacobian(self.proxy, xs.cpu().float(), list(self.names))
            best.append(vertex_objectives(G, ys.float()).argmax(dim=1))
        return torch.cat(best)

    def apply(self, outputs: torch.Tensor, context: DefenseContext) -> torch.Tensor:
        if context.inputs is None:
            raise RuntimeError("mad needs the model inputs in the defense context")
        y = outputs.detach().cpu().double()
        target = self.targets(context.inputs, y)
        y_tilde = step_towards(y, target, self.params.epsilon, self.params.norm, self.params.preserve_argmax)
        y_tilde = y_tilde.clamp_min(0.0)
        return (y_tilde / y_tilde.sum(dim=1, keepdim=True)).to(outputs.device, outputs.dtype)
