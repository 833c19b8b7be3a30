#!/usr/bin/env bash
# Issue 11's GPU check in one script: the user-tower comparison of bench/gpu_train.py on both token streams,
# one process per stream (each under its own time limit), results and logs under $OUT (default runs/).
#   bash bench/gpu_train_towers.sh            # on the GPU machine, from the repo root
#   PYTHON=.venv/bin/python OUT=/tmp STEPS=2 WARMUP=1 bash bench/gpu_train_towers.sh --preset tiny-qwen3 --device cpu --chunk-tokens 32 \
#     --pack-tokens 96 --chunks-per-step 6 --lengths table --compile-backend eager    # CPU check of the script
set -uo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-runs}/bench_gpu_train"
mkdir -p "$out"
py="${PYTHON:-python3}"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
"$py" -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__,
torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'no CUDA')" | tee "$out/versions.txt"
status=0
four=hf_padded_sdpa,hf_compiled,packed_eager,packed_compiled
for stream in movielens full; do
  variants=$four  # the checkpointing variants (memory) run on full-length chunks only
  [ "$stream" = full ] && variants=$four,packed_compiled_ckpt_chunks,packed_compiled_ckpt_layers
  timeout "${STREAM_TIMEOUT:-290}" "$py" bench/gpu_train.py --mode towers --streams "$stream" --variants "$variants" \
    --steps "${STEPS:-15}" --warmup-steps "${WARMUP:-5}" --output "$out/towers-$stream" "$@" 2>&1 | tee "$out/towers-$stream.log"
  rc=${PIPESTATUS[0]}
  [ "$rc" -eq 0 ] || { echo "stream $stream: exit $rc (124 = over STREAM_TIMEOUT)"; status=$rc; }
done
exit $status
