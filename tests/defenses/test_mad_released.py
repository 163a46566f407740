"""MAD against a literal transcription of the released code (``defenses/victim/bb_mad.py`` in
tribhuvanesh/prediction-poisoning): the Jacobian of the last layer's weight, the "extreme" oracle
under either objective, MAD-argmax's search over class sets (exhaustive for K <= 10, greedy above),
and the closed-form line search, on fixed seeded tensors."""

# The transcription keeps the released code's shape (unused unpacked names, if/else blocks).
# ruff: noqa: RUF059, SIM108

from __future__ import annotations

import copy
import itertools

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from defenses.base import DefenseContext, image_digests
from defenses.output.mad import MAD

# ------------------------------------------------------------ bb_mad.py (MAD's static methods), transcribed


def compute_jacobian_nll(x: torch.Tensor, model_adv_proxy: nn.Module, K: int | None = None) -> torch.Tensor:
    assert x.shape[0] == 1, "Does not support batching"
    if K is None:
        with torch.no_grad():
            z_a = model_adv_proxy(x)
        _, K = z_a.shape
    G = []
    z_a = model_adv_proxy(x)
    nlls = -F.log_softmax(z_a, dim=1).mean(dim=0)  # NLL over K classes, Mean over rows
    assert len(nlls) == K
    for k in range(K):
        nll_k = nlls[k]
        _params = [p for p in model_adv_proxy.parameters()]
        w_idx = -2  # Default to FC layer
        grads, *_ = torch.autograd.grad(nll_k, _params[w_idx], retain_graph=True)
        G.append(grads.flatten().clone())
    G = torch.stack(G)
    return G


def calc_objective(ytilde: torch.Tensor, y: torch.Tensor, G: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        u = torch.matmul(G.t(), ytilde)
        u = u / u.norm()
        v = torch.matmul(G.t(), y)
        v = v / v.norm()
        objval = (u - v).norm() ** 2
    return objval


def calc_objective_batched(ytilde: torch.Tensor, y: torch.Tensor, G: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        u = torch.matmul(G.t(), ytilde)
        u = u / u.norm(dim=0)
        v = torch.matmul(G.t(), y)
        v = v / v.norm(dim=0)
        objvals = (u - v).norm(dim=0) ** 2
    return objvals


def calc_objective_numpy(ytilde: np.ndarray, y: np.ndarray, G: np.ndarray) -> float:
    u = G.T @ ytilde
    u /= np.linalg.norm(u)
    v = G.T @ y
    v /= np.linalg.norm(v)
    objval = np.linalg.norm(u - v) ** 2
    return objval


def calc_surrogate_objective(ytilde: torch.Tensor, y: torch.Tensor, G: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        u = torch.matmul(G.t(), ytilde)
        v = torch.matmul(G.t(), y)
        objval = (u - v).norm() ** 2
    return objval


def calc_surrogate_objective_numpy(ytilde: np.ndarray, y: np.ndarray, G: np.ndarray) -> float:
    u = G.T @ ytilde
    v = G.T @ y
    objval = np.linalg.norm(u - v) ** 2
    return objval


def oracle_extreme(G: torch.Tensor, y: torch.Tensor, max_over_obj: bool = False) -> torch.Tensor:
    K, D = G.shape
    argmax_k = -1
    argmax_val = -1.0
    for k in range(K):
        yk = torch.zeros_like(y)
        yk[k] = 1.0
        if max_over_obj:
            kval = calc_objective(yk, y, G)
        else:
            kval = calc_surrogate_objective(yk, y, G)
        if kval > argmax_val:
            argmax_val = kval
            argmax_k = k
    ystar = torch.zeros_like(y)
    ystar[argmax_k] = 1.0
    return ystar


def oracle_argmax_preserving(
    G: torch.Tensor, y: torch.Tensor, max_over_obj: bool = False, max_iters: int = 1024
) -> torch.Tensor:
    K, D = G.shape
    if K > 10:
        # max_iters passed through: the released call uses its default, 1024, which for 10 < K < 46
        # runs out of classes first and fails (torch.stack of an empty list).
        return oracle_argmax_preserving_approx_gpu(G, y, max_over_obj, max_iters)
    max_k = y.argmax()
    G_np = G.detach().cpu().numpy()
    y_np = y.detach().cpu().numpy()
    ystar = None
    max_val = -1.0
    vertices = np.asarray(list(itertools.product([0, 1], repeat=K)), dtype=np.float32)
    vertices = vertices[vertices[:, max_k] > 0]
    for y_extreme in vertices:
        y_extreme[max_k] += 1e-5
        y_extreme = y_extreme / y_extreme.sum()
        if max_over_obj:
            kval = calc_objective_numpy(y_extreme, y_np, G_np)
        else:
            kval = calc_surrogate_objective_numpy(y_extreme, y_np, G_np)
        if kval > max_val:
            max_val = kval
            ystar = y_extreme
    ystar = torch.tensor(ystar).to(G.device)
    assert ystar.argmax() == y.argmax()
    return ystar


def oracle_argmax_preserving_approx_gpu(
    G: torch.Tensor, y: torch.Tensor, max_over_obj: bool = False, max_iters: int = 1024
) -> torch.Tensor:
    K, D = G.shape
    max_k = y.argmax().item()
    G_np = G.detach()
    y_np = y.detach().clone()
    y_np += 1e-8
    y_np /= y_np.sum()
    ystar = None
    max_val = -1.0
    niters = 0.0
    fixed_verts = [max_k]
    while niters < max_iters:
        y_prev_extreme = torch.zeros(K)
        y_prev_extreme[fixed_verts] = 1.0
        k_list = np.array(sorted(set(range(K)) - set(fixed_verts)), dtype=int)
        y_extreme_batch = []
        for _i, k in enumerate(k_list):
            y_extreme = y_prev_extreme.clone().detach()
            y_extreme[k] = 1.0
            y_extreme[max_k] += 1e-5
            y_extreme = y_extreme / y_extreme.sum()
            y_extreme_batch.append(y_extreme)
        y_extreme_batch = torch.stack(y_extreme_batch).transpose(0, 1).to(G_np.device)
        B = y_extreme_batch.size(1)
        y_np_batch = torch.stack([y_np.clone().detach() for i in range(B)]).transpose(0, 1)
        kvals = calc_objective_batched(y_extreme_batch, y_np_batch, G_np)
        max_i = kvals.argmax().item()
        max_k_val = kvals.max().item()
        if max_k_val > max_val:
            max_val = max_k_val
            ystar = y_extreme_batch[:, max_i]
        next_k = k_list[max_i]
        fixed_verts.append(next_k)
        niters += B
    ystar = ystar.clone().detach()
    assert ystar.argmax() == y.argmax()
    return ystar


def closed_form_alpha_estimate(
    y: torch.Tensor, ystar: torch.Tensor, ydist: str, epsilon: float
) -> torch.Tensor:
    if ydist == "l1":
        p = 1.0
    elif ydist == "l2":
        p = 2.0
    else:
        raise ValueError("Only supported for l1/l2")
    alpha = epsilon / ((y - ystar).norm(p=p) + 1e-7)
    alpha = alpha.clamp(min=0.0, max=1.0)
    return alpha


def linesearch(y: torch.Tensor, ystar: torch.Tensor, ydist: str, epsilon: float) -> torch.Tensor:
    """``linesearch`` with ``closed_alpha=True`` (its branch for L1 and L2)."""

    def h(alpha: torch.Tensor) -> torch.Tensor:
        return (1 - alpha) * y + alpha * ystar

    alpha = closed_form_alpha_estimate(y, ystar, ydist, epsilon)
    ytilde = h(alpha)
    delta = ytilde - y
    return delta


def released_mad(
    x: torch.Tensor,
    y_v: torch.Tensor,
    proxy: nn.Module,
    epsilon: float,
    ydist: str,
    oracle: str,
    objmax: bool,
    max_iters: int = 1024,
) -> torch.Tensor:
    """``MAD.__call__`` + ``calc_delta`` (``optim='linesearch'``), one image at a time."""
    y_prime = []
    for i in range(x.shape[0]):
        x_i = x[i].unsqueeze(0)
        y_v_i = y_v[i]
        with torch.enable_grad():
            G = compute_jacobian_nll(x_i, proxy, K=y_v.shape[1])
            if oracle == "extreme":
                ystar = oracle_extreme(G, y_v_i, max_over_obj=objmax)
            else:
                ystar = oracle_argmax_preserving(G, y_v_i, max_over_obj=objmax, max_iters=max_iters)
            delta_i = linesearch(y_v_i, ystar, ydist, epsilon)
        y_prime.append(y_v_i + delta_i)
    return torch.stack(y_prime)


# --------------------------------------------------------------------------------------- the comparison


class Tiny(nn.Module):
    def __init__(self, classes: int) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(16, 6), nn.Tanh())
        self.head = nn.Linear(6, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


def context_for(x: torch.Tensor) -> DefenseContext:
    return DefenseContext("k", "m", image_digests((x * 255).to(torch.uint8).numpy()), b"secret", inputs=x)


CASES = [
    # classes, params of ours, (ydist, oracle, objmax, max_iters) of the released code
    (4, {}, ("l1", "extreme", True, 1024)),
    (4, {"objective": "unnormalised"}, ("l1", "extreme", False, 1024)),
    (4, {"norm": "l2", "epsilon": 0.3}, ("l2", "extreme", True, 1024)),
    (12, {"epsilon": 1.2}, ("l1", "extreme", True, 1024)),
    (12, {"epsilon": 1.2, "objective": "unnormalised"}, ("l1", "extreme", False, 1024)),
    (10, {"objective": "unnormalised"}, ("l1", "extreme", False, 1024)),
    (4, {"preserve_argmax": True}, ("l1", "argmax", True, 1024)),
    (4, {"preserve_argmax": True, "objective": "unnormalised"}, ("l1", "argmax", False, 1024)),
    (10, {"preserve_argmax": True, "epsilon": 1.0}, ("l1", "argmax", True, 1024)),
    (12, {"preserve_argmax": True, "epsilon": 1.0, "argmax_max_evals": 30}, ("l1", "argmax", True, 30)),
    (12, {"preserve_argmax": True, "norm": "l2", "argmax_max_evals": 40}, ("l2", "argmax", True, 40)),
]


@pytest.mark.parametrize(("classes", "params", "released"), CASES)
def test_mad_is_the_released_bb_mad(classes: int, params: dict[str, object], released: tuple) -> None:
    torch.manual_seed(classes)
    victim = Tiny(classes).eval()
    x = torch.rand(6, 1, 4, 4, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        y = F.softmax(victim(x) * 3, dim=1)
    mad = MAD(proxy_seed=5, **params)
    mad.bind(victim, None, None)  # type: ignore[arg-type]
    proxy = copy.deepcopy(mad.proxy)
    assert proxy is not None
    proxy.requires_grad_(True)
    ydist, oracle, objmax, max_iters = released
    expected = released_mad(x, y, proxy, mad.params.epsilon, ydist, oracle, objmax, max_iters)
    ours = mad.perturb(x, y.double())
    torch.testing.assert_close(ours.float(), expected, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(mad.apply(y, context_for(x)), expected, rtol=1e-4, atol=1e-5)
    moved = (ours - y.double()).abs().sum(dim=1) if ydist == "l1" else (ours - y.double()).norm(dim=1)
    assert (moved <= mad.params.epsilon + 1e-6).all() and (moved > 0).all()
    if oracle == "argmax":
        assert torch.equal(ours.argmax(dim=1), y.argmax(dim=1))


def test_mad_defaults_are_the_released_ones() -> None:
    p = MAD().params
    assert (p.epsilon, p.norm, p.jacobian, p.objective) == (0.5, "l1", "last_layer", "normalised")
    assert (p.preserve_argmax, p.argmax_method, p.argmax_max_evals) == (False, "search", 1024)
    mad = MAD()
    mad.bind(Tiny(4), None, None)  # type: ignore[arg-type]
    assert mad.names == ("head.weight",)  # the released _params[-2]: the last layer's weight


def test_mad_argmax_search_ends_when_no_class_is_left() -> None:
    """Above 10 classes and below 46 the released greedy search runs out of classes before its 1,024
    evaluations and fails; here it stops and keeps the best set it saw."""
    torch.manual_seed(0)
    victim = Tiny(12).eval()
    x = torch.rand(3, 1, 4, 4, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        y = F.softmax(victim(x) * 3, dim=1).double()
    mad = MAD(preserve_argmax=True, epsilon=1.0)
    mad.bind(victim, None, None)  # type: ignore[arg-type]
    out = mad.perturb(x, y)
    assert torch.equal(out.argmax(dim=1), y.argmax(dim=1))
    assert ((out - y).abs().sum(dim=1) <= 1.0 + 1e-6).all()
