#!/usr/bin/env bash
# Everything issue 12 asks of a GPU, in one command (a lent device has minutes, not hours):
#
#   bash benchmarks/gpu_check.sh                 # on the GPU machine, from the repository root
#   DEVICE=cpu PRESET=digits-mlp QUICK=1 bash benchmarks/gpu_check.sh   # a dry run of the script
#
# 1. the CUDA tests (fused = two_pass, bf16 autocast, the CUDA augmentation path);
#    (among them: a CUDA graph of the whole capturable step replays the eager training, no synchronisation);
# 2. step time, kernel launches and synchronisations per step: the 2048-MLP at batch 1024 and 4096 (with the
#    capturable step compiled, and the whole step in one CUDA graph for lrc, dense AdamW and the LoRA floor),
#    torchvision's vgg16 (Tucker, 95 % c.r.) at batch 128;
# 3. training throughput (images/s of the second epoch) of `lrc train --preset $PRESET` on random
#    CIFAR-shaped data (data.name=synthetic), lowrank-adam (every step, basis_every=4,
#    augmentation=sync_free, capacity=256, and mode=parallel with new_block_fraction=1/4) against --method dense;
# 4. the augmentation's and the truncation's kernels alone (benchmarks/gpu_profile.py's first lines).
# Writes $OUT (default gpu-check/) and prints a summary; each part has its own time limit.
set -uo pipefail
DEVICE=${DEVICE:-cuda}
PRESET=${PRESET:-vgg16-cifar10}
OUT=${OUT:-gpu-check}
QUICK=${QUICK:-0}
mkdir -p "$OUT"
export HF_HUB_OFFLINE=1
if [ "$QUICK" = 1 ]; then steps=2; vgg=""; batches="64"; else steps=30; vgg=1; batches="1024 4096"; fi

echo "== 1. CUDA tests"
[ "$DEVICE" = cuda ] && timeout 300 python -m pytest -q -k "cuda or CUDA" tests 2>&1 | tail -5 | tee "$OUT/tests.txt"

echo "== 2. step time"
timeout 420 python benchmarks/step_time.py --device "$DEVICE" --batches $batches --steps $steps 2>&1 | tee "$OUT/step_mlp.md"
[ -n "$vgg" ] && timeout 300 python benchmarks/step_time.py --device "$DEVICE" --model vgg16 --batches 128 --steps 20 \
    2>&1 | tee "$OUT/step_vgg16.md"

echo "== 3. training throughput, $PRESET on synthetic data"
size=32; [ "$PRESET" = digits-mlp ] && size=8
channels=3; [ "$PRESET" = digits-mlp ] && channels=1
for run in dense lowrank-adam lowrank-adam:basis4 lowrank-adam:syncfree lowrank-adam:capacity lowrank-adam:parallel4; do
    method=${run%%:*}; extra=""
    [ "$run" = lowrank-adam:basis4 ] && extra="--set optimizer.basis_every=4"
    [ "$run" = lowrank-adam:syncfree ] && extra="--set optimizer.augmentation=sync_free"
    [ "$run" = lowrank-adam:parallel4 ] && extra="--set optimizer.mode=parallel --set optimizer.new_block_fraction=0.25"
    # the linear layers held at a capacity near their ranks (products run at its width): vgg16-cifar10's rank 150
    # fits 256 (its Tucker convolutions are not held); digits-mlp's 30 fits 32
    cap=256; [ "$PRESET" = digits-mlp ] && cap=32
    [ "$run" = lowrank-adam:capacity ] && extra="--set optimizer.capacity=$cap --set optimizer.svd_batching=padded"
    timeout 300 lrc train --preset "$PRESET" --method "$method" --device "$DEVICE" --epochs 2 -q \
        --set data.name=synthetic --set data.image_size=$size --set data.channels=$channels \
        --set model.checkpoint=null $extra --out "$OUT/train-${run/:/-}" > "$OUT/train-${run/:/-}.log" 2>&1
    python - "$OUT/train-${run/:/-}/metrics.jsonl" "$run" <<'PY'
import json, sys
rows = [json.loads(line) for line in open(sys.argv[1])]
last = rows[-1]
print(f"{sys.argv[2]}: {5000 / last['time_s']:.0f} images/s (epoch {last['epoch']}, {last['time_s']:.1f} s), "
      f"c.r. {last['compression_ratio']:.1f} %")
PY
done 2>&1 | tee "$OUT/throughput.txt"

echo "== 4. the augmentation and SVD kernels alone (Householder QR, CholeskyQR2 checked and sync-free)"
[ "$DEVICE" = cuda ] && timeout 120 python benchmarks/gpu_profile.py 2>&1 | head -12 | tee "$OUT/kernels.txt"
