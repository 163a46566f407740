"""The Docker image installs every package of the project (a package added to pyproject.toml but not
copied into the image would install without it: the image's CLI would fail at import)."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_every_package_is_copied_into_the_image() -> None:
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    packages = {
        pattern.rstrip("*") for pattern in config["tool"]["setuptools"]["packages"]["find"]["include"]
    }
    copied = set(re.findall(r"^COPY (\w+) \./\1$", (ROOT / "Dockerfile").read_text(), flags=re.MULTILINE))
    assert packages <= copied, f"not copied into the image: {sorted(packages - copied)}"
    assert all((ROOT / name / "__init__.py").is_file() for name in packages)
