#!/usr/bin/env bash
# The test command: set up (pip + apt), lint, then every test, slow end-to-end ones included.
#   scripts/test.sh                 everything
#   scripts/test.sh -m "not slow"   the fast half (about a minute)
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 FLWR_TELEMETRY_ENABLED=0 FLWR_DISABLE_UPDATE_CHECK=1
if [[ "${SILOTUNE_SKIP_SETUP:-0}" != "1" ]]; then
  bash scripts/setup.sh --test
fi
ruff check .
# pytest exits 5 when it collected no tests: with `set -e` that fails this script, as it should.
python -m pytest -q -p no:cacheprovider "$@"
