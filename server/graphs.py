"""Serving graphs: a served model's forward as one frozen TorchScript graph that runs without the GIL.

Why. An eager PyTorch forward is a Python loop over modules: every op takes the GIL back when its
kernel returns. While the event loop runs Python (parsing, Redis, HTTP for other requests), the
inference thread waits for the GIL before each op, up to ``sys.getswitchinterval()`` (5 ms) each
time: measured on 2 cores (two sessions), a 1-image forward of the quick classifier took 3.6-5.4 ms
beside an idle thread and 192-232 ms beside one running Python; a batch of 32, 41-81 ms and 238-342
ms (docs/serving.md, ``benchmarks/serve_latency.py --gil-probe``). A TorchScript graph is run by
the C++ interpreter with the GIL released for the whole forward (PyTorch's
``invokeScriptMethodFromPython``), so the forward goes on while the loop works: 2.5-3.1 ms idle and
8-35 ms busy for 1 image, 41-52 and 52-97 ms for 32.

How. ``torch.jit.trace`` on a batch of 2, then ``torch.jit.freeze`` (weights inlined, conv + batch
norm folded), the graph returning exactly what :meth:`server.registry.ServedModel.forward` returns.
The graph is checked against the eager model on other batch sizes at load; a model that cannot be
traced, or whose graph disagrees (beyond 1e-4 absolute / 1e-4 relative), is served eager, with a
warning. Only the forward uses the graph: defenses that need the model (MAD's gradients) keep the
eager module. ``torch.jit`` is deprecated in favour of ``torch.compile`` / ``torch.export``; those
compile for tens of seconds per model on a CPU (and their Python wrappers still take the GIL), so
until the interpreter is removed this is the GIL-free path, and ``serving_graph = "eager"`` the
fallback (as when tracing fails).
"""

from __future__ import annotations

import logging
import warnings
from collections import OrderedDict

import torch
from torch import nn

from common.checkpoints import ModelCard
from common.models import ImageModel

logger = logging.getLogger("stealrange.server")

TRACE_BATCH = 2
CHECK_BATCHES = (1, 3)
TOLERANCE = 1e-4


class ForwardOutputs(nn.Module):
    """What the server computes of a model: a classifier's (probabilities, logits) or an encoder's
    features, as float32 (the module a serving graph is traced from)."""

    def __init__(self, model: ImageModel, kind: str) -> None:
        super().__init__()
        self.model = model
        self.encoder = kind == "encoder"

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.encoder:
            features = self.model.features(x).float()
            return features, features
        logits = self.model(x).float()
        return torch.softmax(logits, dim=1), logits


_CACHE_SIZE = 32
# (weights' sha256, kind, architecture, device) -> graph: a process that builds several apps on one
# store (tests, benchmarks) traces each model once; a graph is stateless and safe to share.
_graphs: OrderedDict[tuple[str, str, str, str], nn.Module] = OrderedDict()


def serving_graph(model: ImageModel, card: ModelCard, device: torch.device) -> nn.Module | None:
    """``model``'s forward as a frozen TorchScript graph, checked against the eager model; None (with
    a warning) when it cannot be traced or does not match. Graphs of checkpoints whose card names
    their weights' sha256 are reused within the process."""
    key = (card.sha256, card.kind, card.architecture, str(device))
    if card.sha256 and key in _graphs:
        _graphs.move_to_end(key)
        return _graphs[key]
    graph = _trace(model, card, device)
    if graph is not None and card.sha256:
        _graphs[key] = graph
        while len(_graphs) > _CACHE_SIZE:
            _graphs.popitem(last=False)
    return graph


def _trace(model: ImageModel, card: ModelCard, device: torch.device) -> nn.Module | None:
    eager = ForwardOutputs(model, card.kind).eval()
    generator = torch.Generator().manual_seed(0)

    def images(n: int) -> torch.Tensor:
        return torch.rand((n, *card.input.shape), generator=generator).to(device)

    try:
        with torch.inference_mode(False), torch.no_grad(), warnings.catch_warnings():
            warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"torch\.jit")
            # A trace that depends on its inputs' values warns; the check below decides instead.
            warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
            graph = torch.jit.freeze(torch.jit.trace(eager, images(TRACE_BATCH)))
            for n in CHECK_BATCHES:
                x = images(n)
                for got, want in zip(graph(x), eager(x), strict=True):
                    if got.shape != want.shape or not torch.allclose(
                        got, want, rtol=TOLERANCE, atol=TOLERANCE
                    ):
                        raise ValueError(f"the graph's outputs differ from the eager model's at batch {n}")
    except Exception as exc:  # a model TorchScript cannot trace is served eager, not refused
        logger.warning("%s: serving eager, not as a TorchScript graph (%s)", card.name, exc)
        return None
    return graph
