#!/usr/bin/env bash
# CQ-F on natural images on one lent GPU, in one call: VAE-F, CQ-F, VAE and CQ beside Glow and the DCGAN, seeds 0
# and 1, all twelve runs at once sharing the card for MINUTES of wall clock each (equal budgets), on the same CIFAR-10
# subset. Test bits/dim (the ELBO, as the CPU tables; Glow's exact) and 2,048 samples per run come back under
# $OUT as a split .tar.xz (the device call returns at most 8 files of 16 MiB), to be scored here with Inception.
#
# CQ-F uses the CPU tables' cheaper-D recipe (docs/results.md): D 64 x 4, L_Q on 16 samples every step,
# DiffAugment translation + colour; `cifar10-cq` bundles that recipe, so VAE-F, VAE and CQ run as bundled; the
# peers as benchmarks/peers.py builds them (normflows travels as a wheel: the device image has none).
#
# Prepare on this machine (.devdata is git-ignored: name it in the device call's carry; with the working tree it must
# stay under the call's 64 MiB: 22,000 training images pack to 53.8 MiB (59.8 with the tree), 24,000 to 58.2,
# too many beside the tree):
#   python benchmarks/device_cifar10.py --pack ../shared/data/cifar10.npz --train 22000 --test 2000 --to .devdata/c10.xz
#   pip wheel --no-deps -w .devdata/whl normflows==1.7.3
# Run there:   OUT=$OUT MINUTES=6 bash benchmarks/device_natural.sh      (about 8 minutes; timeout_s 600)
# Score here:  mkdir -p runs/natural-gpu/raw && cat FILES_AT/natural.tar.xz.* | xz -d | tar -x -C runs/natural-gpu/raw
#              python benchmarks/device_table.py runs/natural-gpu/raw/c10 --peers runs/natural-gpu/raw/peers-* \
#                  --data npz:../shared/data/cifar10.npz --inception-weights W --out runs/natural-gpu
# A CPU rehearsal of the whole call (a small pack, seconds of training):
#   python benchmarks/device_cifar10.py --pack ../shared/data/cifar10.npz --train 3000 --test 100 --to /tmp/r.xz
#   DEVICE=cpu DATA=/tmp/r.xz MINUTES=0.05 SAMPLES=64 OUT=/tmp/rehearsal bash benchmarks/device_natural.sh
set -u
: "${OUT:?set OUT to the folder the results go to}"
MINUTES=${MINUTES:-6}
DEVICE=${DEVICE:-cuda}
DATA=${DATA:-.devdata/c10.xz}
SAMPLES=${SAMPLES:-2048}
PYTHON=${PYTHON:-python3}
LIMIT=$(${PYTHON} -c "print(int($MINUTES * 60 + 120))")  # seconds per process: training, bits/dim, samples
WORK=$(mktemp -d /tmp/cqf-natural.XXXX)
NPZ=$WORK/subset.npz
mkdir -p "$WORK/logs"
export PYTHONUNBUFFERED=1 PYTHONPATH=src${PYTHONPATH:+:$PYTHONPATH}
mkdir -p "$OUT"
if ! ${PYTHON} -c "import normflows" 2> /dev/null; then
  ${PYTHON} -m pip install -q --no-index --no-deps --target "$WORK/site" .devdata/whl/normflows-*.whl \
    || { echo "device_natural.sh: normflows is missing and .devdata/whl has no wheel of it (see the header)"; exit 2; }
  export PYTHONPATH=$PYTHONPATH:$WORK/site
fi
[ "$DEVICE" = cpu ] || nvidia-smi --query-gpu=name,memory.total --format=csv > "$WORK/gpu.txt" 2>&1
${PYTHON} -c "import sys; from pathlib import Path; sys.path.insert(0, 'benchmarks'); import device_cifar10 as d; \
d.unpack(Path('$DATA'), Path('$NPZ'))" || { echo "device_natural.sh: cannot read $DATA (make it with --pack)"; exit 2; }
start=$(date +%s)
D="train.quality_every=1;train.quality_batch_size=16;model.disc_channels=64;train.augment=translation,color"
pids=()
timeout "$LIMIT" ${PYTHON} benchmarks/device_cifar10.py --data "$DATA" --minutes "$MINUTES" --parallel \
  --iw-samples 0 --num-samples "$SAMPLES" --set train.num_threads=1 --out "$WORK/c10" \
  --job "vae-f:vae-f:0" --job "cq-f-d64:cq-f:0:$D" --job "vae-f:vae-f:1" --job "cq-f-d64:cq-f:1:$D" \
  --job "vae:vae:0" --job "cq:cq:0" --job "vae:vae:1" --job "cq:cq:1" \
  > "$WORK/logs/c10.txt" 2>&1 &
pids+=($!)
for seed in 0 1; do
  for peer in glow dcgan; do
    timeout "$LIMIT" ${PYTHON} benchmarks/peers.py --data "npz:$NPZ" --val-size 1000 --minutes "$MINUTES" \
      --peers $peer --device "$DEVICE" --threads 1 --seed $seed --num-samples "$SAMPLES" \
      --out "$WORK/peers-$peer-s$seed" > "$WORK/logs/peers-$peer-s$seed.txt" 2>&1 &
    pids+=($!)
  done
done
failed=0
for pid in "${pids[@]}"; do wait "$pid" || failed=$((failed + 1)); done
echo "12 runs of $MINUTES minutes on $DEVICE in 5 processes: $(( $(date +%s) - start )) s; $failed process(es) failed" \
  "(logs/; the cqf runs' exit codes in c10/summary.json)" | tee "$WORK/phases.txt"
rm -f "$NPZ"
tar -C "$WORK" --exclude=site -cf - . | xz -T0 -3 | split -b 15m -d - "$OUT/natural.tar.xz."
cp "$WORK/phases.txt" "$OUT/"
parts=$(ls "$OUT"/natural.tar.xz.* | wc -l)
[ "$parts" -le 7 ] || echo "device_natural.sh: $parts parts: more than the 7 files that come back beside phases.txt"
exit $(( failed > 0 ))
