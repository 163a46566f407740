"""B4B calibration: LSH bucket coverage and the noise it buys, honest user vs thief, on the quick encoder.

    python benchmarks/b4b_coverage.py [--model model_store/fmnist-encoder] [--bits 10 12 14]

An honest user embeds a downstream task's images (MNIST-5k digits); a thief embeds the encoder's own
domain (the Fashion-MNIST attacker pool). Prints coverage (occupied / 2^bits) after n queries and,
for the default bits, the noise sigma of B4B's cost function (RMS units) at that coverage.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from common.checkpoints import load_checkpoint
from common.datasets import get_dataset, make_splits
from common.metrics import extract_features
from defenses.output.b4b import B4BParams, lsh_buckets, noise_scale


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", type=Path, default=Path("model_store/fmnist-encoder"))
    parser.add_argument("--bits", type=int, nargs="+", default=[10, 12, 14])
    args = parser.parse_args()
    model, card = load_checkpoint(args.model)
    features = model.features_module()
    size = (card.input.height, card.input.width)
    streams = {
        "honest (mnist5k)": (
            get_dataset("mnist5k", "train").adapt(card.input.channels, size),
            [500, 1000, 3000],
        ),
        "thief (fmnist pool)": (make_splits(card.dataset).attacker_pool, [1000, 5000, 10000, 20000]),
    }
    embeddings = {
        name: extract_features(features, data.images[: max(ns)]) for name, (data, ns) in streams.items()
    }
    defaults = B4BParams()
    generator = torch.Generator().manual_seed(0)
    print(f"{'bits':>4}  {'stream':<20} {'queries':>8} {'coverage':>9} {'sigma':>8}")
    for bits in args.bits:
        hyperplanes = torch.randn(bits, card.feature_dim, generator=generator)
        for name, (_, ns) in streams.items():
            buckets = lsh_buckets(embeddings[name], hyperplanes)
            for n in ns:
                coverage = len(set(buckets[:n])) / 2**bits
                sigma = noise_scale(
                    torch.tensor(coverage), defaults.alpha, defaults.lam, defaults.beta, defaults.max_sigma
                )
                shown = f"{float(sigma):8.3f}" if bits == defaults.n_bits else f"{'':>8}"
                print(f"{bits:>4}  {name:<20} {n:>8} {coverage:>9.4f} {shown}")


if __name__ == "__main__":
    main()
