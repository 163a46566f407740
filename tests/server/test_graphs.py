"""Serving graphs (server.graphs): every backbone, as a classifier and as an encoder, traced into a
frozen TorchScript graph that answers what the eager module answers, at batch sizes it was not
traced at; a model the trace gets wrong is served eager; the API answers the same either way."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from common.checkpoints import InputSpec, card_for
from common.models import BACKBONES, build_model
from common.wire import decode_infer_response, infer_request
from server.graphs import ForwardOutputs, serving_graph
from server.registry import ModelRegistry
from tests.conftest import create_key, make_settings

SPEC = InputSpec(channels=1, height=28, width=28)


@pytest.mark.parametrize("kind", ["classifier", "encoder"])
@pytest.mark.parametrize("architecture", BACKBONES.names())
def test_graph_answers_what_the_eager_model_answers(architecture: str, kind: str) -> None:
    torch.manual_seed(0)
    model = build_model(kind, architecture, 1, [0.5], [0.5], num_classes=10, feature_dim=32).eval()
    card = card_for(model, "m", architecture, input=SPEC, classes=list("0123456789"))
    graph = serving_graph(model, card, torch.device("cpu"))
    assert isinstance(graph, torch.jit.ScriptModule)
    eager = ForwardOutputs(model, kind)
    for n in (1, 5, 17):
        x = torch.rand(n, *SPEC.shape, generator=torch.Generator().manual_seed(n))
        with torch.inference_mode():
            for got, want in zip(graph(x), eager(x), strict=True):
                assert got.shape == want.shape
                torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


class BatchSizeBranch(nn.Module):
    """A model whose forward branches on the batch size: a trace keeps the branch it saw."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(28 * 28, 10)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.flatten(1)
        return flat if x.shape[0] == 2 else -flat

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(self.features(x))


def test_a_model_the_trace_gets_wrong_is_served_eager(caplog: pytest.LogCaptureFixture) -> None:
    model = build_model("classifier", "small_cnn", 1, [0.5], [0.5])
    card = card_for(model, "branchy", "small_cnn", input=SPEC, classes=list("0123456789"))
    with caplog.at_level(logging.WARNING, logger="stealrange.server"):
        assert serving_graph(BatchSizeBranch().eval(), card, torch.device("cpu")) is None  # type: ignore[arg-type]
    assert "branchy: serving eager" in caplog.text and "differ" in caplog.text


def test_registry_serves_graphs_unless_told_eager(model_store: Path) -> None:
    graphs = ModelRegistry.load(model_store, graph_mode="torchscript")
    eager = ModelRegistry.load(model_store, graph_mode="eager")
    assert all(m.graph is not None for m in graphs.models.values())
    assert all(m.graph is None for m in eager.models.values())
    images = np.random.default_rng(0).integers(0, 256, (3, *SPEC.shape), dtype=np.uint8)
    for name, served in graphs.models.items():
        got = served.forward(served.to_model_input(images))
        want = eager.models[name].forward(eager.models[name].to_model_input(images))
        assert (got[1] is None) == (want[1] is None) == (served.card.kind == "encoder")
        torch.testing.assert_close(got[0], want[0], rtol=1e-5, atol=1e-5)


def test_the_api_answers_the_same_through_the_graph(model_store: Path) -> None:
    from fastapi.testclient import TestClient

    from server.app import create_app

    answers = {}
    images = np.random.default_rng(1).integers(0, 256, (4, *SPEC.shape), dtype=np.uint8)
    for mode in ("torchscript", "eager"):
        with TestClient(create_app(make_settings(model_store, None, serving_graph=mode))) as client:
            _, auth = create_key(client)
            for model, output in (("clf", "probabilities"), ("enc", "embedding")):
                body, extra = infer_request(images, [output], binary=True)
                response = client.post(f"/v2/models/{model}/infer", content=body, headers={**auth, **extra})
                assert response.status_code == 200, response.text
                values = decode_infer_response(
                    response.content, response.headers.get("inference-header-content-length")
                )
                answers[mode, model] = values[output]
    for model in ("clf", "enc"):
        np.testing.assert_allclose(
            answers["torchscript", model], answers["eager", model], rtol=1e-5, atol=1e-5
        )
