"""Self-Ensemble Protection: the update against a literal computation, perturbations within eps and
[0, 1] for every method, SEP-FA-VR reducing to SEP-FA with one checkpoint, the protecting run's
checkpoints, and the protect / evaluate workflow on a tiny dataset."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from common.datasets import make_synthetic
from common.models import Classifier, build_model
from common.training import TrainConfig
from defenses.data import ProtectionRecipe, evaluate_protection, load_protected, protect_dataset
from defenses.data.protection import protecting_checkpoints
from defenses.data.sep import (
    SEPConfig,
    class_mean_features,
    protect,
    protect_batch,
    quantize,
    random_noise,
    target_classes,
)

TINY_TRAIN = TrainConfig(epochs=2, batch_size=32, lr=0.05, device="cpu")


def model(seed: int) -> Classifier:
    torch.manual_seed(seed)
    net = build_model("classifier", "small_cnn", 1, [0.5], [0.5], feature_dim=16)
    assert isinstance(net, Classifier)
    return net.eval()


def test_target_classes() -> None:
    assert target_classes(torch.arange(10), 10).tolist() == [5, 6, 7, 8, 9, 0, 1, 2, 3, 4]
    assert target_classes(torch.tensor([0, 49, 99]), 100).tolist() == [50, 99, 49]


def test_one_sep_step_against_a_literal_computation() -> None:
    nets = [model(0), model(1)]
    x0 = make_synthetic(6, seed=1).images.float() / 255
    target = torch.tensor([5, 6, 7, 8, 9, 0])
    grads = []
    for net in nets:
        x = x0.clone().requires_grad_(True)
        F.cross_entropy(net(x), target, reduction="sum").backward()
        grads.append(x.grad)
    expected = (x0 - 0.01 * torch.stack(grads).mean(0).sign()).clamp(x0 - 0.02, x0 + 0.02).clamp(0, 1)
    got = protect_batch(x0, target, nets, SEPConfig(eps=0.02, step_size=0.01, steps=1))
    assert torch.allclose(got, expected)


@pytest.mark.parametrize("method", ["sep", "sep-fa", "sep-fa-vr"])
@pytest.mark.parametrize("eps", [2 / 255, 8 / 255])
def test_perturbations_stay_within_eps_and_the_pixel_range(method: str, eps: float) -> None:
    data = make_synthetic(40, seed=2)
    nets = [model(0), model(1)]
    config = SEPConfig(method=method, eps=eps, step_size=eps / 2, steps=4, inner_steps=2)  # type: ignore[arg-type]
    protected = protect(data, nets, config, torch.device("cpu"), progress=False)
    delta = (protected.images.float() - data.images.float()) / 255
    assert delta.abs().max() <= eps + 1e-6 and delta.abs().max() > 0
    assert protected.images.dtype == torch.uint8 and torch.equal(protected.labels, data.labels)


def test_variance_reduction_with_one_checkpoint_is_plain_feature_alignment() -> None:
    net = model(0)
    data = make_synthetic(16, seed=3)
    x0, target = data.images.float() / 255, target_classes(data.labels, 10)
    means = [class_mean_features(net, data, torch.device("cpu"))]
    vr = SEPConfig(method="sep-fa-vr", eps=0.05, step_size=0.01, steps=4, inner_steps=2)
    fa = SEPConfig(method="sep-fa", eps=0.05, step_size=0.01, steps=4)
    assert torch.allclose(
        protect_batch(x0, target, [net], vr, means), protect_batch(x0, target, [net], fa, means)
    )


def test_quantisation_keeps_the_bound_and_noise_is_the_same_radius() -> None:
    x0 = torch.tensor([0.0, 10 / 255, 1.0])
    x = torch.tensor([0.03, 10 / 255 - 0.029, 0.98])
    q = quantize(x, x0, 0.03).float() / 255
    assert torch.all((q - x0).abs() <= 0.03 + 1e-6)
    data = make_synthetic(20, seed=4)
    noisy = random_noise(data, 8 / 255, seed=0)
    assert ((noisy.images.float() - data.images.float()).abs() <= 8).all()
    assert torch.equal(noisy.images, random_noise(data, 8 / 255, seed=0).images)


def test_protecting_run_keeps_evenly_spaced_checkpoints() -> None:
    data = make_synthetic(128, seed=5)
    snapshots = protecting_checkpoints(
        data, "small_cnn", TINY_TRAIN, 4, progress=False
    )  # 8 steps -> 2, 4, 6, 8
    assert len(snapshots) == 4
    first, last = snapshots[0].head.weight, snapshots[-1].head.weight
    assert not torch.equal(first, last)


def test_sep_moves_the_protecting_models_towards_the_target_class() -> None:
    data = make_synthetic(128, seed=6)
    snapshots = protecting_checkpoints(data, "small_cnn", TINY_TRAIN, 2, progress=False)
    config = SEPConfig(eps=32 / 255, step_size=8 / 255, steps=6)
    protected = protect(data, snapshots, config, torch.device("cpu"), progress=False)
    target = target_classes(data.labels, 10)
    final = snapshots[-1]
    with torch.no_grad():
        before = (final(data.images.float() / 255).argmax(1) == target).float().mean()
        after = (final(protected.images.float() / 255).argmax(1) == target).float().mean()
    assert after > before + 0.3


def test_protect_and_evaluate_workflow(tmp_path: Path) -> None:
    recipe = ProtectionRecipe(
        dataset="synthetic",
        size=96,
        n_checkpoints=2,
        train=TrainConfig(epochs=1, batch_size=32, lr=0.05, device="cpu"),
        sep=SEPConfig(eps=8 / 255, step_size=4 / 255, steps=2),
    )
    meta = protect_dataset(recipe, tmp_path / "sep", progress=False)
    assert meta["method"] == "sep" and meta["images"] == 96 and meta["max_perturbation"] <= 8 / 255 + 1e-6
    protected, loaded = load_protected(tmp_path / "sep")
    assert len(protected) == 96 and loaded["checkpoints"] == 2
    result = evaluate_protection(tmp_path / "sep", test_size=50)
    assert set(result) >= {"protected", "clean", "random_noise"}
    assert all(0 <= result[k] <= 1 for k in ("protected", "clean", "random_noise"))
    noise = protect_dataset(recipe, tmp_path / "noise", method="noise", progress=False)
    assert noise["method"] == "noise" and "checkpoints" not in noise


def test_the_cli_protects_and_evaluates(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from stealrange.cli import app

    out = tmp_path / "cli-sep"
    args = ["protect-data", "--out", str(out), "--method", "sep-fa", "--eps", "8", "--steps", "2"]
    args += [
        "--checkpoints",
        "2",
        "--dataset",
        "synthetic",
        "--size",
        "64",
        "--epochs",
        "1",
        "--device",
        "cpu",
    ]
    env = {"STEALRANGE_NO_PROGRESS": "1", "COLUMNS": "200"}
    result = CliRunner().invoke(app, args, env=env)
    assert result.exit_code == 0, result.output
    assert "sep-fa: 64 images of synthetic" in result.output
    result = CliRunner().invoke(app, ["evaluate-protection", str(out), "--test-size", "40"], env=env)
    assert result.exit_code == 0, result.output
    assert "sep-fa-protected data" in result.output and (out / "evaluation.json").is_file()
    bad = CliRunner().invoke(app, ["protect-data", "--out", str(out), "--method", "sepp"], env=env)
    assert bad.exit_code != 0 and "sep, sep-fa, sep-fa-vr, noise" in bad.output
