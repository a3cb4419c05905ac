#!/usr/bin/env bash
# Every GPU measurement of issues 17 and 18 in one call (the device tool gives a session ~15
# minutes): the cuDNN attention check, every model family's parity with transformers, the `gpu` preset (1B shape vs HF PyTorch) and the
# `gpu-small` preset (configs/hh_small.py's steps, for the game's time estimate). Each part has
# its own time limit and writes its JSON under OUT as it goes, so a part that fails or runs long
# costs only itself.
#
#     OUT=/tmp/gpu bash benchmarks/gpu_session.sh [total seconds, default 540]
#     OUT=/tmp/gpu SHRINK=1 bash benchmarks/gpu_session.sh 400   # the wiring on CPU, tiny shapes
set -u
OUT=${OUT:?set OUT to a directory}
TOTAL=${1:-540}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.92}
start=$(date +%s)
left() { echo $(( TOTAL - ($(date +%s) - start) )); }

{
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
  python3 -c "import jax, jaxlib, torch, transformers, flax, optax; print('jax', jax.__version__, 'jaxlib', jaxlib.__version__, 'torch', torch.__version__, 'transformers', transformers.__version__, 'flax', flax.__version__, 'optax', optax.__version__); print(jax.devices())"
} 2>&1 | tee "$OUT/environment.txt"

echo "== attention check ($(left) s left)"
timeout 90 python3 benchmarks/gpu_attention_check.py ${SHRINK:+--portable} --out "$OUT/attention_check.json" 2>&1 | tail -20

# Every model family against transformers on the device (tiny random models: compile-bound, ~1 min).
echo "== family parity ($(left) s left)"
timeout 120 python3 benchmarks/family_parity.py --out "$OUT/family_parity.json" 2>&1 | grep "^|"

# The 1B preset gets what is left after reserving ~150 s for the small preset.
b=$(( $(left) - 170 ))
echo "== gpu preset, budget ${b} s"
timeout $(( b + 60 )) python3 benchmarks/run_all.py --preset gpu ${SHRINK:+--shrink} --budget-s "$b" --out "$OUT/gpu.json" 2>&1 \
  | grep -v "^\s*$" | tail -60

b=$(( $(left) - 40 ))
echo "== gpu-small preset, budget ${b} s"
if [ "$b" -gt 30 ]; then
  timeout $(( b + 35 )) python3 benchmarks/run_all.py --preset gpu-small ${SHRINK:+--shrink} --budget-s "$b" --out "$OUT/gpu_small.json" 2>&1 \
    | grep -v "^\s*$" | tail -40
fi
echo "== done after $(( $(date +%s) - start )) s"
