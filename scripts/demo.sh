#!/usr/bin/env bash
# The main job on a fresh machine: install, then run a real 3-silo TLS federation on this machine,
# training on the TFNS subset bundled in demo/data (real financial tweets; nothing is downloaded).
# Extra arguments go to `silotune demo` (e.g. --rounds 5, --hub, --data my.csv --columns input=text,output=label).
# Its workspace (CA, keys, logs, adapter, run report) is $XDG_STATE_HOME/silotune/demo
# (~/.local/state/silotune/demo), outside this checkout; --workspace DIR picks another. Run it again
# and it starts a new run there: the CA and the node keys are kept, the previous run's state is not.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# setup.sh installs into $SILOTUNE_VENV (default .venv); run from there, activated or not.
exec "${SILOTUNE_VENV:-.venv}/bin/silotune" demo "$@"
