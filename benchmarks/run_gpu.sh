#!/usr/bin/env bash
# The GPU figures of docs/PERFORMANCE.md, on a machine with one NVIDIA GPU whose Python already has
# jax[cuda], flax, optax, orbax-checkpoint, torch (CUDA) and the rest of the scientific stack.
#
#   bash benchmarks/run_gpu.sh OUT_DIR [WHEEL_DIR]
#
# WHEEL_DIR (optional): wheels of the packages that machine lacks (grain, array-record,
# portpicker, clu, ml_collections, diffusers, importlib_metadata, dm_pix), installed into a
# private --target folder; nothing is fetched from the network. clu's TensorBoard writer imports
# TensorFlow at import time; where TensorFlow is absent it is replaced in that private folder by
# a class that raises when used (the benchmarks write no summaries). Each benchmark gets its own
# time limit so that one slow group cannot take the others with it.
set -uo pipefail
out=${1:?usage: run_gpu.sh OUT_DIR [WHEEL_DIR]}
wheels=${2:-}
cd "$(dirname "$0")/.."
mkdir -p "$out/sampling"
if [[ -n "$wheels" ]]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/cdd_site "$wheels"/*.whl || exit 1
  if ! python3 -c "import tensorflow" 2>/dev/null; then
    printf 'class SummaryWriter:\n    def __init__(self, *a, **k):\n        raise RuntimeError("no tensorflow on this machine")\n' \
      >/tmp/cdd_site/clu/metric_writers/tf/summary_writer.py
  fi
  export PYTHONPATH=/tmp/cdd_site:$PWD${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
step=(python3 benchmarks/train_step.py --threads=all --experiments= --out_dir="$out")
timeout 570 "${step[@]}" --variants=default,large --kinds=codi,pretrain --rounds=6 --per_round=20 \
  --name=train_step_gpu_f32 2>&1 | tee "$out/log_f32.txt"
timeout 150 python3 benchmarks/sampling.py --rounds=5 --out_dir="$out/sampling" 2>&1 | tail -20
timeout 330 "${step[@]}" --variants=default,large --kinds=codi --rounds=6 --per_round=20 \
  --dtype=bfloat16 --name=train_step_gpu_bf16 2>&1 | tee "$out/log_bf16.txt"
timeout 150 "${step[@]}" --variants=default --kinds=codi --rounds=5 --per_round=10 --batch_size=256 \
  --name=train_step_gpu_b256 2>&1 | tee "$out/log_b256.txt"
# Issue 18: the SD-style latent CoDi step at SD 1.5 size (860 M U-Net + 361 M ControlNet, 512 px,
# bf16 compute, no remat on either side). Not yet run on a GPU. Each of the two worker processes
# holds ~30 GB of float32 state (parameters, eval EMA, target, Adam moments, gradients of 1.22 B
# parameters) plus activations, so batch 4 wants a ~140 GB card (H200); below that, batch 1.
mem_mib=$(nvidia-smi --query-gpu=memory.total --format=csv,noheader,nounits | head -1)
sd_batch=$(( ${mem_mib:-0} > 120000 ? 4 : 1 ))
timeout 570 python3 benchmarks/sd_train_step.py --variants=sd15 --dtype=bfloat16 \
  --batch_size="$sd_batch" --rounds=5 --per_round=5 --out_dir="$out" \
  --name=sd_train_step_gpu 2>&1 | tee "$out/log_sd15.txt"
