#!/usr/bin/env bash
# Issue 23's GPU check on a bare H100/H200 in one command (target: under 8 minutes): the towers table, the Ray step
# at the production and the tiny shape (padded and the chosen path), indexing 100k statements; one table printed,
# one JSON ($OUT/gpu_check.json), each part's log beside it. From the repo root, with .gpu/ from
# ../shared/gpu/pack.sh copied along:
#   bash bench/gpu_check.sh
#   bash bench/gpu_check.sh --parts ray-production --limits 300      # one part again, with more time
# CPU dry run (tiny shapes, 2 steps; what tests/test_gpu_check.py runs):
#   PYTHON=.venv/bin/python bash bench/gpu_check.sh --dry-run --out /tmp/gpu_check
set -uo pipefail
cd "$(dirname "$0")/.."
if [ -f .gpu/env.sh ]; then
  # shellcheck disable=SC1091
  source .gpu/env.sh  # Ray, DeepSpeed and the rest the GPU image lacks; TORCH_CUDA_ARCH_LIST=9.0
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
py="${PYTHON:-python3}"
"$py" -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__,
torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'no CUDA')"
exec "$py" bench/gpu_check.py "$@"
