#!/usr/bin/env bash
# The GPU machine check, about ten minutes on one GPU: an environment report (nvidia-smi, Python,
# torch and CUDA, the libraries that compile kernels), the tests marked `gpu`, then
# `python -m benchmarks.gpu_smoke` (the CUDA path end to end, each check timed: load, fp32 vs bf16
# perplexity, depth -> width 2:4 -> LoRA -> GPTQ -> EoRA with evaluation, the GPTQ report against the
# checkpoint, the first chat token of the quantized models, a two-GPU local sweep, Ray's fail-fast). From anywhere:
#
#   bash benchmarks/gpu_smoke.sh [options of benchmarks.gpu_smoke: --windows N, --lora-steps N, --out DIR, --kernels K]
#
# Runs in the set-up's venv (`bash .ci/setup` first; FRANKENLAB_VENV picks another) with the data folder
# FRANKENLAB_DATA_DIR (default: ../shared/data beside the checkout). With --dry-run, and on a machine
# without a CUDA device, it prints the checks it runs (their recipe and sweep built, so one these checks
# could not run fails here) and how many gpu tests there are, and exits 1 only when that failed; otherwise
# it exits 1 when the gpu tests or a smoke check failed.
set -uo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root" || exit 1
venv=${FRANKENLAB_VENV:-$root/.venv}
python=$venv/bin/python
if [[ ! -x $python ]]; then
  echo "gpu smoke: no Python in $venv: run bash .ci/setup first (or set FRANKENLAB_VENV)" >&2
  exit 1
fi
export FRANKENLAB_DATA_DIR=${FRANKENLAB_DATA_DIR:-$root/../shared/data}
started=$SECONDS
dry_run=0
for arg in "$@"; do [[ $arg == --dry-run ]] && dry_run=1; done
section() { printf '\n== %s (at %d s)\n' "$1" "$((SECONDS - started))"; }

section "environment"
echo "$(date -u '+%Y-%m-%d %H:%M UTC') on $(uname -n), $(uname -srm); commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
if command -v nvidia-smi >/dev/null 2>&1; then
  nvidia-smi --query-gpu=index,name,memory.total,driver_version,compute_cap --format=csv 2>/dev/null || nvidia-smi
else
  echo "nvidia-smi: not on the PATH"
fi
"$python" - <<'EOF'
import platform
from importlib import metadata

import torch

print(f"python {platform.python_version()}; torch {torch.__version__}, CUDA {torch.version.cuda or 'none (CPU build)'}, "
      f"cuDNN {torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else 'none'}")
for name in ("gptqmodel", "transformers", "peft", "triton", "ray"):
    try:
        print(f"  {name} {metadata.version(name)}")
    except metadata.PackageNotFoundError:
        print(f"  {name}: not installed")
EOF
cuda=1
"$python" -c "import sys; from frankenlab.evals import devices; sys.exit(0 if devices.cuda_available() else 1)" || cuda=0
if ((dry_run || !cuda)); then
  section "the checks a GPU machine runs: python -m benchmarks.gpu_smoke --dry-run"
  "$python" -m benchmarks.gpu_smoke "$@" $( ((dry_run)) || echo --dry-run)
  plan=$?
  section "the gpu tests: pytest -m gpu --collect-only"
  "$python" -m pytest -q -p no:cacheprovider -m gpu --collect-only 2>&1 | tail -n 1
  collected=${PIPESTATUS[0]}
  ((collected == 5)) && echo "gpu smoke: pytest collected no gpu tests: the set-up is broken" >&2
  ((cuda)) || echo "no CUDA device: nothing to check"
  ((plan == 0 && collected == 0)) || exit 1
  exit 0
fi
"$python" -c "from frankenlab.evals import devices; import torch; n = devices.device_count(); \
print(f'{n} GPU(s) visible:', ', '.join(torch.cuda.get_device_name(i) for i in range(n)))"

section "the gpu tests: pytest -m gpu"
"$python" -m pytest -q -p no:cacheprovider -m gpu
tests=$?
if ((tests == 5)); then
  echo "gpu smoke: pytest collected no gpu tests: the set-up is broken" >&2
fi

section "python -m benchmarks.gpu_smoke $*"
"$python" -m benchmarks.gpu_smoke "$@"
smoke=$?

section "done"
echo "gpu tests: $( ((tests == 0)) && echo passed || echo "FAILED (exit $tests)"); smoke checks: $( ((smoke == 0)) && echo passed || echo "FAILED (exit $smoke)"); $((SECONDS - started)) s in all"
((tests == 0 && smoke == 0)) || exit 1
