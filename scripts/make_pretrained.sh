#!/usr/bin/env bash
# How ddpm_lib/pretrained/fashion_mnist_small.pt was made (see ddpm_lib/pretrained/MODEL_CARD.md).
# These are the exact commands of the shipped run, on a 2-core CPU with no GPU. The first run was
# started for 12000 steps with one thread (the machine was shared), stopped with Ctrl-C at step 5504,
# and resumed with two threads to step 8000. `--resume` restores every random state; the change of
# thread count can change floating-point rounding, so the weights may differ from an uninterrupted
# run in the last bits, not in the training it received.
set -euo pipefail
OUT=${1:-runs/fashion_small_cpu}
python -m ddpm_lib train --preset fashion-small --out "$OUT" --steps 12000 --batch-size 64 --lr 5e-4 \
  --warmup 200 --ema-decay 0.999 --ema-warmup on --log-every 100 --save-every 250 --sample-every 1000 \
  --no-progress --threads 1 || true   # stopped with Ctrl-C at step 5504
python -m ddpm_lib train --out "$OUT" --resume --steps 8000 --no-progress --threads 2 \
  --log-every 100 --save-every 250 --sample-every 1000
python -c "import sys, torch, ddpm_lib; ddpm_lib.export_checkpoint(sys.argv[1] + '/last.pt', \
'ddpm_lib/pretrained/fashion_mnist_small.pt', dtype=torch.float16)" "$OUT"
# the grid and the FD quoted in the model card
python -m ddpm_lib sample --ckpt ddpm_lib/pretrained/fashion_mnist_small.pt --sampler ddim --steps 50 --n 64 \
  --seed 0 --crop --out book/figures/fashion_small_cpu_samples.png
python -m ddpm_lib sample --ckpt ddpm_lib/pretrained/fashion_mnist_small.pt --sampler ddim --steps 50 --n 1000 \
  --seed 1 --crop --fd --out /tmp/fashion_small_samples.npz
