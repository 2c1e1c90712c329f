#!/usr/bin/env bash
# One short GPU lease, one call: throughput before/after with the card to itself, then the CIFAR-10 Table-1 runs
# (the five variants and CQ-F with a quality batch of 16, two seeds, sharing the card for MINUTES each).
# Results land in $OUT.
#
# Prepare on this machine (both folders are git-ignored: pass them as the device call's carry, 57 MiB in all):
#   python benchmarks/device_cifar10.py --pack ../shared/data/cifar10.npz --train 24000 --test 2000 --to .devdata/c10.xz
#   mkdir -p devrun/old && git archive 1983ede src | tar -x -C devrun/old     # the step before the speed work
# Run there:   MINUTES=3.5 bash benchmarks/device_session.sh          (about 8.5 minutes in all)
# Score here:  python benchmarks/device_table.py OUT/c10 --data npz:../shared/data/cifar10.npz --inception-weights W \
#                  --out runs/cifar10-gpu-new
set -u
export PYTHONPATH=src
BEFORE=${BEFORE:-devrun/old/src}
T=benchmarks/throughput.py
nvidia-smi --query-gpu=name,memory.total --format=csv > "$OUT/gpu.txt" 2>&1
start=$(date +%s)
if [ -d "$BEFORE" ]; then
  PYTHONPATH=$BEFORE python $T --device cuda --quick --steps 20 --variants vae-f cq-f --label before \
    --json "$OUT/tp-before.json" > "$OUT/tp-before.txt" 2>&1
fi
python $T --device cuda --quick --steps 20 --label after-fp32 --json "$OUT/tp-after.json" > "$OUT/tp-after.txt" 2>&1
python $T --device cuda --quick --steps 20 --variants vae-f cq-f gan --set train.precision=bf16 \
  --set train.channels_last=true --json "$OUT/tp-bf16.json" > "$OUT/tp-bf16.txt" 2>&1
timeout 120 python $T --device cuda --quick --steps 20 --variants cq-f --set train.precision=bf16 \
  --set train.channels_last=true --set train.compile=true --json "$OUT/tp-compile.json" > "$OUT/tp-compile.txt" 2>&1
echo "throughput: $(( $(date +%s) - start )) s" > "$OUT/phases.txt"
start=$(date +%s)
JOBS=()  # the five variants at the bundled configs, and CQ-F with a quality batch of 16 (the MNIST default)
for seed in 0 1; do
  for v in vae vae-f cq cq-f gan; do JOBS+=(--job "$v:$v:$seed"); done
  JOBS+=(--job "cq-f-q16:cq-f:$seed:train.quality_batch_size=16")
done
python benchmarks/device_cifar10.py --data .devdata/c10.xz --minutes "${MINUTES:-3.5}" --parallel \
  --set train.num_threads=1 "${JOBS[@]}" --out "$OUT/c10" > "$OUT/c10.txt" 2>&1
echo "cifar-10 runs: $(( $(date +%s) - start )) s" >> "$OUT/phases.txt"
