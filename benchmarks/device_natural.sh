#!/usr/bin/env bash
# CQ-F on natural images on one lent GPU, in one call: VAE-F and CQ-F, VAE and CQ, Glow and the DCGAN, seeds 0 and
# 1, all twelve runs at once sharing the card for MINUTES of wall clock each (equal budgets), on the same CIFAR-10
# subset; bits/dim and 2,048 samples per run come back under $OUT, to be scored here with Inception features.
#
# The hybrids are the CPU tables' cheaper-D recipe (docs/results.md): D 64 x 4, L_Q on 16 samples every step,
# DiffAugment translation + colour; VAE-F, VAE and the peers as bundled / as benchmarks/peers.py builds them.
#
# Prepare on this machine (.devdata is git-ignored: pass it as the device call's carry):
#   python benchmarks/device_cifar10.py --pack ../shared/data/cifar10.npz --train 24000 --test 2000 --to .devdata/c10.xz
# Run there:   MINUTES=7 bash benchmarks/device_natural.sh          (about 9 minutes in all; timeout_s 560)
# Score here:  python benchmarks/device_table.py OUT/c10 --peers OUT/peers-* --data npz:../shared/data/cifar10.npz \
#                  --inception-weights W --out runs/natural-gpu
# A CPU rehearsal of the whole call (seconds of training): DEVICE=cpu MINUTES=0.05 OUT=/tmp/rehearsal bash ...
set -u
export PYTHONPATH=src
: "${OUT:?set OUT to the folder the results go to}"
MINUTES=${MINUTES:-7}
DEVICE=${DEVICE:-cuda}
DATA=${DATA:-.devdata/c10.xz}
NPZ=/tmp/cqf-natural-subset.npz
mkdir -p "$OUT"
[ "$DEVICE" = cpu ] || nvidia-smi --query-gpu=name,memory.total --format=csv > "$OUT/gpu.txt" 2>&1
python -c "import sys; from pathlib import Path; sys.path.insert(0, 'benchmarks'); import device_cifar10 as d; \
d.unpack(Path('$DATA'), Path('$NPZ'))" || { echo "device_natural.sh: cannot read $DATA: make it with --pack (header)"; exit 2; }
start=$(date +%s)
D="train.quality_every=1;train.quality_batch_size=16;model.disc_channels=64;train.augment=translation,color"
JOBS=()
for seed in 0 1; do
  JOBS+=(--job "vae-f:vae-f:$seed" --job "cq-f:cq-f:$seed:$D" --job "vae:vae:$seed" --job "cq:cq:$seed:$D")
done
python benchmarks/device_cifar10.py --data "$DATA" --minutes "$MINUTES" --parallel --set train.num_threads=1 \
  "${JOBS[@]}" --out "$OUT/c10" > "$OUT/c10.txt" 2>&1 &
for seed in 0 1; do
  for peer in glow dcgan; do
    python benchmarks/peers.py --data "npz:$NPZ" --val-size 1000 --minutes "$MINUTES" --peers $peer \
      --device "$DEVICE" --threads 1 --seed $seed --num-samples 2048 --out "$OUT/peers-$peer-s$seed" \
      > "$OUT/peers-$peer-s$seed.txt" 2>&1 &
  done
done
failed=0
for job in $(jobs -p); do wait "$job" || failed=$((failed + 1)); done
echo "twelve runs of $MINUTES minutes on $DEVICE: $(( $(date +%s) - start )) s, $failed process(es) failed" \
  | tee "$OUT/phases.txt"
exit $(( failed > 0 ))
