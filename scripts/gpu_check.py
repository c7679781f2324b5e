#!/usr/bin/env python
"""One end-to-end check of training on a GPU (or, without one, a CPU): train, sample, measure, export.

    python scripts/gpu_check.py --minutes 3 --out gpu_check

(a) trains ``fashion-base`` on CUDA (``fashion-small`` on a CPU) on Fashion-MNIST padded to 32x32 for
a fixed wall-clock budget, with short-run settings (each a flag, all printed): EMA decay 0.999 with
the EMA warm-up, learning-rate warm-up 500 steps, bf16 autocast, channels_last, data on the GPU, no
host synchronisation except every --log-every steps; (b) samples a grid with DDIM (or DDPM) from the
EMA weights; (c) prints the final loss, the training throughput in images/s and the
"FD (Fashion-MNIST classifier)" of --fd-n samples with its real-vs-real baseline (not FID);
(d) writes into --out: ``run/last.pt`` (full checkpoint), ``ema_fp16.pt`` (EMA-only float16 export,
loadable with ``ddpm_lib.load_checkpoint``), ``samples.png``, ``loss_history.json`` and
``results.json``.

Offline machines need Fashion-MNIST (``/usr/share/datasets/fashion-mnist`` or ``--data-root`` holding
``FashionMNIST/raw``); the FD classifier is trained once (~40 s of one CPU core) and cached in
``--cache-dir`` (default ``$DDPM_CACHE_DIR`` or ``~/.cache/ddpm_lib``); copy that file along to skip it.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import sys
import time
from pathlib import Path


def _auto_bool(value: str):
    v = value.lower()
    if v == "auto":
        return "auto"
    if v in ("on", "1", "true", "yes"):
        return True
    if v in ("off", "0", "false", "no"):
        return False
    raise argparse.ArgumentTypeError(f"expected on, off or auto, got {value!r}")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--out", default="gpu_check", help="output folder")
    p.add_argument("--minutes", type=float, default=3.0, help="training wall-clock budget (includes compilation)")
    p.add_argument("--max-steps", type=int, default=None, help="optional cap on the number of steps")
    p.add_argument("--device", default="auto", help="cuda, cpu or auto")
    p.add_argument("--preset", default="auto", help="U-Net preset (auto: fashion-base on CUDA, fashion-small on a CPU)")
    p.add_argument("--batch-size", type=int, default=128, help="batch size (the paper: 128)")
    p.add_argument("--lr", type=float, default=2e-4, help="Adam learning rate (the paper: 2e-4)")
    p.add_argument("--warmup", type=int, default=500, help="learning-rate warm-up steps (the paper: 5000)")
    p.add_argument("--grad-clip", type=float, default=1.0, help="gradient clipping norm (the paper: 1.0)")
    p.add_argument("--ema-decay", type=float, default=0.999, help="EMA decay (the paper: 0.9999, for 800k steps)")
    p.add_argument("--ema-warmup", type=_auto_bool, default=True, help="EMA warm-up min(decay, (1+s)/(10+s)): on/off")
    p.add_argument("--dropout", type=float, default=None, help="override the preset's dropout (0.1)")
    p.add_argument("--T", type=int, default=1000, help="diffusion steps")
    p.add_argument("--bf16", type=_auto_bool, default="auto", help="bf16 autocast: on/off/auto (auto: on with CUDA)")
    p.add_argument("--channels-last", type=_auto_bool, default="auto", help="channels_last: on/off/auto")
    p.add_argument("--compile", type=_auto_bool, default=False,
                   help="torch.compile: on/off/auto (auto: try on CUDA, fall back to eager); compile time (about a "
                        "minute) counts against --minutes, so it pays only for longer runs")
    p.add_argument("--log-every", type=int, default=200, help="read the loss (one host sync) every N steps")
    p.add_argument("--save-every", type=int, default=2000, help="checkpoint every N steps (and at the end)")
    p.add_argument("--sampler", default="ddim", choices=["ddim", "ddpm"], help="sampler for the grid and the FD")
    p.add_argument("--sample-steps", type=int, default=50, help="DDIM steps")
    p.add_argument("--grid-n", type=int, default=64, help="images in the grid")
    p.add_argument("--fd-n", type=int, default=None, help="samples for the FD (default 1000 on CUDA, 200 on a CPU)")
    p.add_argument("--sample-batch", type=int, default=500, help="samples per sampling batch")
    p.add_argument("--seed", type=int, default=0, help="random seed")
    p.add_argument("--data-root", default=None, help="torchvision data root holding FashionMNIST/raw")
    p.add_argument("--cache-dir", default=None, help="cache folder for the FD classifier (sets DDPM_CACHE_DIR)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads for torch")
    p.add_argument("--progress", action="store_true", help="show a progress bar (else a line every --log-every steps)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.cache_dir:
        os.environ["DDPM_CACHE_DIR"] = str(Path(args.cache_dir).resolve())
    import torch

    import ddpm_lib
    from ddpm_lib import GaussianDiffusion, UNet, load_dataset
    from ddpm_lib.data import save_image_grid
    from ddpm_lib.metrics import fd_fashion, fashion_classifier
    from ddpm_lib.samplers import ddim_sample, ddpm_sample
    from ddpm_lib.trainer import Trainer, export_checkpoint, load_checkpoint

    if args.threads:
        torch.set_num_threads(args.threads)
    t_all = time.perf_counter()
    device = ddpm_lib.default_device() if args.device == "auto" else torch.device(args.device)
    cuda = device.type == "cuda"
    preset = args.preset if args.preset != "auto" else ("fashion-base" if cuda else "fashion-small")
    fd_n = args.fd_n or (1000 if cuda else 200)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    dev_name = torch.cuda.get_device_name(device) if cuda else (platform.processor() or platform.machine())
    print(f"device: {device} ({dev_name}), torch {torch.__version__}, ddpm_lib {ddpm_lib.__version__}", flush=True)

    # the FD classifier first (cached after the first time), so that a missing data set fails early
    t0 = time.perf_counter()
    _, clf_info = fashion_classifier()
    print(f"FD classifier: test accuracy {clf_info['test_accuracy']:.4f} ({time.perf_counter() - t0:.1f} s, "
          f"{clf_info['path']})", flush=True)

    # ---- (a) training
    data = load_dataset("fashion_mnist", "train", pad_to=32, root=args.data_root)
    torch.manual_seed(args.seed)
    overrides = {} if args.dropout is None else {"dropout": args.dropout}
    model = UNet.from_preset(preset, **overrides)
    n_params = sum(p.numel() for p in model.parameters())
    diffusion = GaussianDiffusion("linear", num_timesteps=args.T)
    options = dict(batch_size=args.batch_size, lr=args.lr, warmup=args.warmup,
                   grad_clip=args.grad_clip if args.grad_clip > 0 else None, ema_decay=args.ema_decay,
                   ema_warmup=bool(args.ema_warmup), bf16=args.bf16, channels_last=args.channels_last,
                   compile=args.compile, log_every=args.log_every, save_every=args.save_every, sample_every=0,
                   seed=args.seed, progress=args.progress)

    def on_log(rec):
        if not args.progress:
            print(f"  step {rec['step']:6d}  loss {rec['loss']:.4f}  {rec['images_per_s']:8.0f} img/s  "
                  f"lr {rec['lr']:.2e}  t {time.perf_counter() - t_train:6.1f} s", flush=True)

    trainer = Trainer(model, diffusion, data, device=device, out_dir=out / "run", preset=preset,
                      data_info={"pad_to": 32, "original_size": 28}, on_log=on_log, **options)
    print(f"training {preset} ({n_params:,} parameters) for {args.minutes:g} min: "
          + ", ".join(f"{k}={v}" for k, v in options.items())
          + f"; resolved: bf16={trainer.use_bf16} channels_last={trainer.use_channels_last} "
            f"fused_adam={trainer.fused} data_on_device={trainer._images.device}", flush=True)
    t_train = time.perf_counter()
    trainer.train(steps=args.max_steps, minutes=args.minutes)
    st = trainer.stats
    print(f"trained {trainer.step} steps in {st['wall_s']:.1f} s: {st['images_per_s']:.0f} images/s overall, "
          f"{st['last_window_images_per_s']:.0f} images/s in the last window, final loss {st['final_loss']:.4f}, "
          f"compiled={st['compiled']}", flush=True)

    # ---- (d) the EMA-only float16 export, loaded back exactly as users will
    ema_path = export_checkpoint(trainer.last_checkpoint, out / "ema_fp16.pt", dtype=torch.float16)
    model, diffusion, config = load_checkpoint(ema_path, map_location=device, expect={"preset": preset})
    shutil.copyfile(out / "run" / "loss_history.json", out / "loss_history.json")

    # ---- (b) a grid and (c) the FD
    def sample(n, seed):
        g = torch.Generator().manual_seed(seed)
        xs = []
        for i in range(0, n, args.sample_batch):
            b = min(args.sample_batch, n - i)
            if args.sampler == "ddim":
                x = ddim_sample(model, diffusion, (b, 1, 32, 32), steps=args.sample_steps, generator=g,
                                progress=False)
            else:
                x = ddpm_sample(model, diffusion, (b, 1, 32, 32), generator=g, progress=False)
            xs.append(x.cpu())
        return torch.cat(xs)[:, :, 2:30, 2:30]  # undo the padding: 28x28

    t0 = time.perf_counter()
    grid = sample(args.grid_n, args.seed)
    save_image_grid(grid, out / "samples.png", nrow=int(math.ceil(math.sqrt(args.grid_n))))
    t_grid = time.perf_counter() - t0
    t0 = time.perf_counter()
    samples = sample(fd_n, args.seed + 1)
    t_fd_samples = time.perf_counter() - t0
    fd = fd_fashion(samples, device=device)
    print(str(fd), flush=True)

    results = {
        "device": str(device), "device_name": dev_name, "torch": str(torch.__version__),
        "preset": preset, "parameters": n_params, "options": options,
        "resolved": {"bf16": trainer.use_bf16, "channels_last": trainer.use_channels_last,
                     "fused_adam": trainer.fused, "compiled": st["compiled"]},
        "steps": trainer.step, "train_seconds": st["wall_s"], "images_per_s": st["images_per_s"],
        "last_window_images_per_s": st["last_window_images_per_s"], "final_loss": st["final_loss"],
        "sampler": args.sampler, "sample_steps": args.sample_steps if args.sampler == "ddim" else args.T,
        "grid_seconds": t_grid, "fd_sample_seconds": t_fd_samples,
        "fd": fd.as_dict(), "ema_export_bytes": ema_path.stat().st_size,
        "total_seconds": time.perf_counter() - t_all,
    }
    (out / "results.json").write_text(json.dumps(results, indent=1))
    print(f"final loss {st['final_loss']:.4f} | {st['images_per_s']:.0f} training images/s | "
          f"{fd.name} {fd.fd:.2f} (real-vs-real {fd.baseline:.2f}, n={fd.n}) | "
          f"EMA fp16 export {ema_path.stat().st_size / 1e6:.1f} MB | total {results['total_seconds']:.0f} s",
          flush=True)
    print(f"wrote {out}/: run/last.pt, ema_fp16.pt, samples.png, loss_history.json, results.json", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
