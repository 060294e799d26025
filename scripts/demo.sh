#!/usr/bin/env bash
# The main job on a fresh machine: install, then run a real 3-silo TLS federation on this machine.
# Extra arguments go to `silotune demo` (e.g. --rounds 5, --data my.csv --columns input=text,output=label).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec silotune demo "$@"
