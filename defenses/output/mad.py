"""Prediction Poisoning / MAD (Orekondy, Schiele & Fritz, "Prediction Poisoning: Towards Defenses
Against DNN Model Stealing Attacks", ICLR 2020), as the released code runs it
(``defenses/victim/bb_mad.py`` in tribhuvanesh/prediction-poisoning).

MAD perturbs each posterior ``y`` into ``y~`` so that the gradient an attacker would take when
training on ``y~`` points as far as possible from the one ``y`` would give, while ``y~`` stays a
distribution within a utility bound ``||y~ - y||_p <= epsilon``. With ``G = d log F(x; w) / dw``
(rows: one class's log-likelihood gradient, ``[C, P]``) of a proxy of the attacker's model ``F``:

    max_{y~}  || G^T y~ / ||G^T y~||  -  G^T y / ||G^T y|| ||^2
    s.t.       y~ in the simplex,  ||y~ - y||_p <= epsilon

solved as the released code does by default (``oracle='extreme'``, ``optim='linesearch'``): the
oracle evaluates the objective at every vertex ``e_k`` of the simplex and keeps the first best, then
the line search ``y~ = (1 - a) y + a y*`` takes ``a = clamp(epsilon / (||y - y*||_p + 1e-7), 0, 1)``
(its closed form for L1 and L2). The released ``G`` is the gradient of the NLL, ``-G`` here: both
objectives below are unchanged by the sign.

Defaults as released, and the options that differ (paper and code disagree: both offered):

- ``jacobian="last_layer"`` (default): ``G`` over the weight of the proxy's last linear layer only
  (released ``compute_jacobian_nll``: ``_params[-2]``, "Default to FC layer"; the README: "jacobians
  (from the FC-layer) of surrogate models"). ``"all"``: over every parameter (the paper's ``w``;
  about 60 ms per image for the quick classifier's 0.9 M parameters on a 2-core CPU).
- ``objective="normalised"`` (default): the vertex chosen by the objective above (the README's
  commands pass ``objmax:True``). ``"unnormalised"``: by ``||G^T (y~ - y)||^2``, the released
  class's own default (``objmax=False``, ``calc_surrogate_objective``).
- MAD-argmax (``preserve_argmax``, released ``oracle='argmax'``, ``argmax_method="search"``,
  default): ``y*`` is searched among the distributions spread evenly over a set of classes that
  holds the top class (its weight raised by 1e-5 so it stays the top): for ``C <= 10`` every such
  set, in ``itertools.product`` order, under ``objective``; for ``C > 10`` a greedy search that
  starts from the top class and adds, each round, the class that maximises the *normalised*
  objective against ``y + 1e-8`` (renormalised), keeping the best set seen, until
  ``argmax_max_evals`` (released 1,024) objective evaluations are done or no class is left (the
  released loop would fail there). The line search then moves towards ``y*``; both ends share the
  top class, so it is kept. ``argmax_method="shorten"``: this project's earlier MAD-argmax, the
  best single vertex with the step shortened so that the top-1 label does not change.

The proxy is the served architecture re-initialised from a seed (the released experiments use a
randomly initialised model trained with lr 0: "essentially randomly-initialized models exhibiting
chance-level performance"; without one the released code falls back to the victim itself, whose
``G^T y`` is ~0 so the normalised objective is undefined). Default ``epsilon`` = 0.5 in L1 (the
README's example; the paper sweeps 0 to 2).
"""

from __future__ import annotations

import copy
import functools
import itertools
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
    jacobian: Literal["last_layer", "all"] = Field(
        "last_layer", description="parameters G is taken over (released: the last layer's weight)"
    )
    objective: Literal["normalised", "unnormalised"] = Field(
        "normalised", description="what the oracle maximises (released README: objmax True)"
    )
    preserve_argmax: bool = Field(False, description="MAD-argmax: keep the top-1 label")
    argmax_method: Literal["search", "shorten"] = Field(
        "search", description="MAD-argmax: search class sets holding the top class (released) or shorten"
    )
    argmax_max_evals: int = Field(1024, ge=1, description="MAD-argmax greedy search budget for C > 10")
    proxy_seed: int = Field(0, description="seed of the proxy's random initialisation")
    chunk: int | None = Field(
        None,
        ge=1,
        description="images per Jacobian evaluation (memory: chunk x C x P floats); "
        "default 4 for all parameters, 256 for the last layer",
    )


LINE_SEARCH_EPS = 1e-7  # released closed_form_alpha_estimate
ARGMAX_UPWEIGHT = 1e-5  # released oracle_argmax_preserving: keeps the top class on top
EXHAUSTIVE_CLASSES = 10  # released: every class set for K <= 10, the greedy search above


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


def vertex_objectives(G: torch.Tensor, y: torch.Tensor, objective: str = "normalised") -> torch.Tensor:
    """``[n, C]``: the objective at every vertex ``e_k`` of the simplex (``G^T e_k`` is row ``k``):
    the normalised one, or ``||G^T e_k - G^T y||^2`` (``objective="unnormalised"``)."""
    v = torch.einsum("ncp,nc->np", G, y)
    if objective == "unnormalised":
        return (G - v.unsqueeze(1)).pow(2).sum(dim=2)
    v = v / v.norm(dim=1, keepdim=True).clamp_min(1e-12)
    u = G / G.norm(dim=2, keepdim=True).clamp_min(1e-12)
    return (u - v.unsqueeze(1)).pow(2).sum(dim=2)


def candidate_objectives(
    gram: torch.Tensor, y: torch.Tensor, candidates: torch.Tensor, objective: str
) -> torch.Tensor:
    """The objective of each candidate ``y~`` (rows of ``candidates [m, C]``) for one image, from the
    Gram matrix ``M = G G^T [C, C]`` alone (``u.v = y~^T M y``, ``|u|^2 = y~^T M y~``)."""
    if objective == "unnormalised":
        d = candidates - y
        return ((d @ gram) * d).sum(dim=1)
    uv = candidates @ (gram @ y)
    uu = ((candidates @ gram) * candidates).sum(dim=1).clamp_min(0.0)
    vv = (y @ gram @ y).clamp_min(0.0)
    cosine = uv / (uu.sqrt() * vv.sqrt()).clamp_min(1e-300)
    return 2.0 - 2.0 * cosine


def _first_best(values: torch.Tensor) -> int:
    """The first index of the largest value (the released loops' strict ``>``)."""
    return int(torch.nonzero(values == values.max())[0, 0])


def _spread(sets: torch.Tensor, top: int) -> torch.Tensor:
    """Indicator rows of class sets -> distributions even over each set, the top class + 1e-5."""
    weights = sets.clone()
    weights[:, top] += ARGMAX_UPWEIGHT
    return weights / weights.sum(dim=1, keepdim=True)


@functools.cache
def _class_sets(classes: int) -> torch.Tensor:
    """Every subset of the classes as an indicator row, in ``itertools.product([0, 1])`` order."""
    return torch.tensor(list(itertools.product([0, 1], repeat=classes)), dtype=torch.float64)


def argmax_preserving_target(
    gram: torch.Tensor, y: torch.Tensor, objective: str = "normalised", max_evals: int = 1024
) -> torch.Tensor:
    """MAD-argmax's ``y*`` for one image (released ``oracle_argmax_preserving``): ``[C]``."""
    classes = y.shape[0]
    top = int(y.argmax())
    if classes <= EXHAUSTIVE_CLASSES:
        sets = _class_sets(classes).to(y.dtype)
        candidates = _spread(sets[sets[:, top] > 0], top)
        return candidates[_first_best(candidate_objectives(gram, y, candidates, objective))]
    # The released greedy search (oracle_argmax_preserving_approx_gpu): normalised objective, y + 1e-8.
    y_eps = (y + 1e-8) / (y + 1e-8).sum()
    fixed, best, best_value, evals = [top], None, -1.0, 0
    while evals < max_evals:
        left = [k for k in range(classes) if k not in fixed]
        if not left:
            break
        sets = torch.zeros(len(left), classes, dtype=y.dtype)
        sets[:, fixed] = 1.0
        sets[torch.arange(len(left)), left] = 1.0
        candidates = _spread(sets, top)
        values = candidate_objectives(gram, y_eps, candidates, "normalised")
        i = _first_best(values)
        if float(values[i]) > best_value:
            best, best_value = candidates[i], float(values[i])
        fixed.append(left[i])
        evals += len(left)
    assert best is not None
    return best


def line_search(y: torch.Tensor, y_star: torch.Tensor, epsilon: float, norm: str) -> torch.Tensor:
    """``(1 - a) y + a y*`` with ``a = clamp(epsilon / (||y - y*||_p + 1e-7), 0, 1)`` (released
    ``linesearch`` with its closed-form ``a``; L1 and L2 grow linearly along the segment)."""
    gap = y - y_star
    length = gap.abs().sum(dim=1) if norm == "l1" else gap.norm(dim=1)
    alpha = (epsilon / (length + LINE_SEARCH_EPS)).clamp(0.0, 1.0)[:, None]
    return (1 - alpha) * y + alpha * y_star


def step_towards(
    y: torch.Tensor, target: torch.Tensor, epsilon: float, norm: str, preserve_argmax: bool
) -> torch.Tensor:
    """The line search towards the vertex ``e_target``; with ``preserve_argmax`` the step is also
    shortened so the top-1 label does not change (``argmax_method="shorten"``)."""
    vertex = torch.nn.functional.one_hot(target, y.shape[1]).to(y.dtype)
    if not preserve_argmax:
        return line_search(y, vertex, epsilon, norm)
    direction = vertex - y
    length = direction.abs().sum(dim=1) if norm == "l1" else direction.norm(dim=1)
    alpha = (epsilon / (length + LINE_SEARCH_EPS)).clamp(0.0, 1.0)
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
            names = [name for name, p in self.proxy.named_parameters() if p is last.weight]
        self.names = tuple(names)

    def targets(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """``y*`` per image ``[n, C]`` (a vertex, or MAD-argmax's searched distribution), ``G``
        computed ``chunk`` images at a time and then dropped."""
        if self.proxy is None:
            raise RuntimeError("mad needs the served model: call bind() first")
        p = self.params
        search = p.preserve_argmax and p.argmax_method == "search"
        chunk = p.chunk or (256 if p.jacobian == "last_layer" else 4)
        out = []
        for xs, ys in zip(x.split(chunk), y.split(chunk), strict=True):
            G = log_likelihood_jacobian(self.proxy, xs.cpu().float(), list(self.names)).to(ys.dtype)
            if search:
                gram = G @ G.transpose(1, 2)
                out += [
                    argmax_preserving_target(gram[i], ys[i], p.objective, p.argmax_max_evals)
                    for i in range(len(ys))
                ]
            else:
                best = vertex_objectives(G, ys, p.objective).argmax(dim=1)
                out += list(torch.nn.functional.one_hot(best, ys.shape[1]).to(ys.dtype))
        return torch.stack(out)

    def perturb(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """``y~`` for posteriors ``y [n, C]`` (float64 on the CPU) of images ``x``."""
        p = self.params
        y_star = self.targets(x, y)
        if p.preserve_argmax and p.argmax_method == "shorten":
            return step_towards(y, y_star.argmax(dim=1), p.epsilon, p.norm, True)
        return line_search(y, y_star, p.epsilon, p.norm)

    def apply(self, outputs: torch.Tensor, context: DefenseContext) -> torch.Tensor:
        if context.inputs is None:
            raise RuntimeError("mad needs the model inputs in the defense context")
        y = outputs.detach().cpu().double()
        y_tilde = self.perturb(context.inputs, y).clamp_min(0.0)
        return (y_tilde / y_tilde.sum(dim=1, keepdim=True)).to(outputs.device, outputs.dtype)
