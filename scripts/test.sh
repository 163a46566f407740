#!/usr/bin/env bash
# Install the dev extras (first use) and run the test suite; extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install.sh --dev
export STEALRANGE_NO_PROGRESS=1
exec .venv/bin/python -m pytest "$@"
