#!/usr/bin/env bash
# GPU checks of the scale-out path on a bare GPU machine, from the repository root:
#   bash benchmarks/gpu_check.sh
# tests/test_gpu.py: FSDP2 fits on NCCL, 4-bit / 8-bit bitsandbytes teachers. tests/test_gpu_scale.py:
# the sharded splice reviser in a `trd fit` of configs/arith/trd_splice.yaml + configs/fsdp.yaml
# (per-layer gathers and gather-once, each rollout checked against a 1-process decode), gather-once
# rollouts against per-layer ones, and HSDP (2+ GPUs). One GPU runs the 1-process paths; more GPUs,
# the multi-process ones. Under 10 minutes on one GPU; prints a table of the sharded rollouts.
# Needs python3 + pip. Missing packages are installed from wheels in .whl/ when that folder exists
# (machines without network: `pip download` them elsewhere), else from the package index.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false

echo "== machine"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo "nvidia-smi: not found"
$PY -V

if ! $PY -c 'import torch' 2>/dev/null; then
  echo "== installing torch"
  $PY -m pip install -q torch || { echo "FAIL: torch is missing and could not be installed"; exit 2; }
fi

source benchmarks/gpu_wheels.sh

# What tests/test_gpu.py imports (datasets / math-verify are not needed there).
missing=$($PY - <<'PYEOF'
import importlib.util
need = {"lightning": "lightning", "transformers": "transformers", "tokenizers": "tokenizers", "safetensors": "safetensors",
        "torchmetrics": "torchmetrics", "peft": "peft", "bitsandbytes": "bitsandbytes", "accelerate": "accelerate",
        "matplotlib": "matplotlib", "pytest": "pytest"}
print(" ".join(pkg for mod, pkg in need.items() if importlib.util.find_spec(mod) is None))
PYEOF
)
if [ -n "$missing" ]; then
  echo "== installing: $missing"
  $PY -m pip install -q $missing || echo "WARN: could not install: $missing (offline? carry wheels in .whl/)"
fi
# The package itself runs from the checkout: no install needed.
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

echo "== versions"
$PY - <<'PYEOF'
import importlib
import torch
print("torch", torch.__version__, "cuda", torch.version.cuda, "gpus", torch.cuda.device_count(),
      [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())])
for name in ("lightning", "transformers", "peft", "bitsandbytes", "accelerate"):
    try:
        print(name, importlib.import_module(name).__version__)
    except Exception as err:  # report, the tests will say what it breaks
        print(name, "MISSING:", type(err).__name__, err)
PYEOF

echo "== pytest tests/test_gpu.py tests/test_gpu_scale.py"
start=$(date +%s)
$PY -m pytest tests/test_gpu.py tests/test_gpu_scale.py -q -s -rA -p no:cacheprovider --durations=0 -W ignore::DeprecationWarning
status=$?
echo "== done: exit $status in $(( $(date +%s) - start )) s"
exit $status
