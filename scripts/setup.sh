#!/usr/bin/env bash
# Install astrolom into the active Python environment. Idempotent: a second run installs nothing new.
#   bash scripts/setup.sh          # runtime
#   bash scripts/setup.sh --dev    # + test tools and the reference AstroPT (test oracle, benchmark peer)
# On a machine without an NVIDIA GPU torch is pinned to the CPU build (torch==2.13.0 here is a wheel on disk);
# an unpinned torch would pull a multi-GB CUDA build. On a GPU machine the default (CUDA) wheel is used.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
TORCH_VERSION=${ASTROLOM_TORCH_VERSION:-2.13.0}

if ! "$PY" -c "import torch" >/dev/null 2>&1; then
    # Here torch==2.13.0 resolves to a CPU wheel on disk. Elsewhere, point ASTROLOM_TORCH_INDEX at a CPU wheel index
    # (e.g. PyTorch's /whl/cpu) on CPU-only machines; on a GPU machine the default index gives the CUDA build.
    if [[ -n "${ASTROLOM_TORCH_INDEX:-}" ]]; then
        "$PY" -m pip install "torch==${TORCH_VERSION}" --index-url "$ASTROLOM_TORCH_INDEX"
    else
        "$PY" -m pip install "torch==${TORCH_VERSION}"
    fi
fi

if [[ "${1:-}" == "--dev" ]]; then
    "$PY" -m pip install -q -e ".[dev]"
    # The reference implementation is only a test oracle; its declared deps (torchvision, wandb, ...) are not needed
    # to import its model and would pull a CUDA torch, hence --no-deps.
    "$PY" -m pip install -q --no-deps "astropt==2.0.9"
    # astropt 1.0.4 (the code that wrote the paper's released checkpoints) cannot share a site-packages with 2.0.9:
    # it goes into its own directory, which tests/oracle_astropt1.py puts first on sys.path in a subprocess.
    if [[ ! -f .oracles/astropt-1.0.4/astropt/model.py ]]; then
        "$PY" -m pip install -q --no-deps --target .oracles/astropt-1.0.4 "astropt==1.0.4"
    fi
else
    "$PY" -m pip install -q -e .
fi
