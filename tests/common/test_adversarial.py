"""PGD: known properties (stays in the ball and in [0, 1], raises the loss, restarts never do worse,
targeted lowers the target's loss, seeded) and the projection formulas."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from common.adversarial import pgd, project, robust_accuracy
from common.datasets import make_synthetic
from common.models import Classifier, build_model
from common.training import TrainConfig, train_classifier


@pytest.fixture(scope="module")
def trained() -> tuple[Classifier, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    model = build_model("classifier", "small_cnn", 1, [0.5], [0.5], feature_dim=16)
    assert isinstance(model, Classifier)
    train_classifier(
        model, make_synthetic(320, seed=1), TrainConfig(epochs=2, batch_size=32, device="cpu"), progress=False
    )
    data = make_synthetic(48, seed=7)
    return model.eval(), data.images.float() / 255, data.labels


def test_projection_formulas() -> None:
    delta = torch.tensor([[[[3.0, -4.0]]], [[[0.3, 0.4]]]])
    assert torch.equal(project(delta, 1.0, "linf"), torch.tensor([[[[1.0, -1.0]]], [[[0.3, 0.4]]]]))
    l2 = project(delta, 1.0, "l2")
    assert torch.allclose(l2[0], delta[0] / 5) and torch.allclose(l2[1], delta[1])  # inside: untouched


@pytest.mark.parametrize(("norm", "eps", "step"), [("linf", 0.1, 0.02), ("l2", 1.5, 0.3)])
def test_pgd_stays_in_the_ball_and_raises_the_loss(
    trained: tuple[Classifier, torch.Tensor, torch.Tensor], norm: str, eps: float, step: float
) -> None:
    model, x, y = trained
    generator = torch.Generator().manual_seed(0)
    adversarial = pgd(model, x, y, eps=eps, step_size=step, steps=10, norm=norm, generator=generator)  # type: ignore[arg-type]
    delta = (adversarial - x).flatten(1)
    size = delta.abs().amax(dim=1) if norm == "linf" else delta.norm(dim=1)
    assert torch.all(size <= eps + 1e-5)
    assert adversarial.min() >= 0 and adversarial.max() <= 1
    with torch.no_grad():
        clean, attacked = F.cross_entropy(model(x), y), F.cross_entropy(model(adversarial), y)
        assert attacked > clean + 0.5
        assert (model(adversarial).argmax(1) == y).float().mean() < (model(x).argmax(1) == y).float().mean()
    again = pgd(
        model, x, y, eps=eps, step_size=step, steps=10, norm=norm, generator=torch.Generator().manual_seed(0)
    )  # type: ignore[arg-type]
    assert torch.equal(adversarial, again)


def test_restarts_never_do_worse_per_image_and_targeted_descends(
    trained: tuple[Classifier, torch.Tensor, torch.Tensor],
) -> None:
    model, x, y = trained
    kwargs = {"eps": 0.05, "step_size": 0.01, "steps": 3}
    one = pgd(model, x, y, generator=torch.Generator().manual_seed(1), **kwargs)  # type: ignore[arg-type]
    three = pgd(model, x, y, restarts=3, generator=torch.Generator().manual_seed(1), **kwargs)  # type: ignore[arg-type]
    with torch.no_grad():
        loss_one = F.cross_entropy(model(one), y, reduction="none")
        loss_three = F.cross_entropy(model(three), y, reduction="none")
    assert torch.all(loss_three >= loss_one - 1e-6)  # the first restart is the same run
    target = (y + 1) % 10
    towards = pgd(model, x, target, targeted=True, eps=0.1, step_size=0.02, steps=10)
    with torch.no_grad():
        assert F.cross_entropy(model(towards), target) < F.cross_entropy(model(x), target)
    assert torch.equal(pgd(model, x, y, eps=0.0, step_size=0.01, steps=2), x)


def test_robust_accuracy_is_below_clean_accuracy(
    trained: tuple[Classifier, torch.Tensor, torch.Tensor],
) -> None:
    model, x, y = trained
    images = (x * 255).round().to(torch.uint8)
    clean = robust_accuracy(model, images, y, eps=0.0, step_size=0.01, steps=1)
    attacked = robust_accuracy(model, images, y, eps=0.1, step_size=0.02, steps=10)
    assert attacked < clean
    with pytest.raises(ValueError, match="invalid PGD"):
        pgd(model, x, y, steps=-1)
