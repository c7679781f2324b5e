"""The command line: ``python -m ddpm_lib train | sample | bpd | info`` (also installed as ``ddpm``).

Examples::

    python -m ddpm_lib train --preset fashion-small --steps 2000 --warmup 500 --ema-warmup on --out runs/fm
    python -m ddpm_lib train --out runs/fm --resume --steps 4000          # continue runs/fm/last.pt
    python -m ddpm_lib sample --ckpt runs/fm/last.pt --sampler ddim --steps 50 --n 64 --out samples.png
    python -m ddpm_lib sample --ckpt runs/fm/last.pt --n 1000 --out samples.npz --crop --fd
    python -m ddpm_lib bpd --ckpt runs/fm/last.pt --n 256
    python -m ddpm_lib info --ckpt runs/fm/last.pt

Errors are reported as one line ``error: ...`` on stderr with exit status 1 (2 for bad usage).
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import warnings
from pathlib import Path
from typing import Any, Dict, List, Optional

__all__ = ["main", "build_parser"]

# Training options whose CLI default is "the paper's value, or the checkpoint's when resuming".
_TRAIN_FLAGS = {
    "batch_size": "batch_size", "lr": "lr", "warmup": "warmup", "grad_clip": "grad_clip",
    "ema_decay": "ema_decay", "ema_warmup": "ema_warmup", "cond_drop_prob": "cond_drop_prob", "hflip": "hflip",
    "log_every": "log_every", "save_every": "save_every", "sample_every": "sample_every",
    "sample_n": "sample_n", "sample_steps": "sample_steps", "seed": "seed", "bf16": "bf16",
    "fp16": "fp16", "channels_last": "channels_last", "compile": "compile", "cuda_graph": "cuda_graph",
}


def _auto_bool(value: str):
    v = value.strip().lower()
    if v in ("auto",):
        return "auto"
    if v in ("on", "1", "true", "yes"):
        return True
    if v in ("off", "0", "false", "no"):
        return False
    raise argparse.ArgumentTypeError(f"expected on, off or auto, got {value!r}")


def _on_off(value: str) -> bool:
    v = _auto_bool(value)
    if v == "auto":
        raise argparse.ArgumentTypeError(f"expected on or off, got {value!r}")
    return v


def _positive_int(value: str) -> int:
    try:
        v = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {value!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {v}")
    return v


def _nonneg_int(value: str) -> int:
    try:
        v = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {value!r}") from None
    if v < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {v}")
    return v


# What the model, diffusion and data flags of `train` mean when left out on a new run (on a resume the
# checkpoint's values hold, and giving one of these flags draws a warning).
_NEW_RUN_DEFAULTS = {"preset": "fashion-small", "dataset": "fashion_mnist", "schedule": "linear", "T": 1000,
                     "mean_type": "eps", "var_type": "fixed_large", "loss_type": "simple"}
_FROM_CHECKPOINT = ("preset", "dataset", "limit", "size", "pad_to", "dropout", "schedule", "T", "mean_type",
                    "var_type", "loss_type")
# the unpadded side of each data set (what --crop gives back)
_NATIVE_SIZE = {"fashion_mnist": 28, "mnist": 28, "cifar10": 32, "digits": 8}


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Appends "(default: ...)" only where the help does not already say it and there is a value to show."""

    def _get_help_string(self, action):
        text = action.help or ""
        if action.default is None or "[" in text or "default" in text:
            return text
        return super()._get_help_string(action)


# ---------------------------------------------------------------------------------------------- parser
def build_parser() -> argparse.ArgumentParser:
    from . import __version__
    from .unet import UNet

    fmt = _HelpFormatter
    p = argparse.ArgumentParser(
        prog="python -m ddpm_lib",
        description="Train, sample and evaluate DDPMs (Ho et al. 2020) with ddpm_lib.",
        epilog="Run `python -m ddpm_lib COMMAND --help` for the options of each command.")
    p.add_argument("--version", action="version", version=f"ddpm_lib {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", required=True)

    # ---- train
    t = sub.add_parser("train", formatter_class=fmt, help="train a U-Net (Algorithm 1)",
                       description="Train a U-Net on an image data set with the paper's settings (each a flag). "
                                   "Writes OUT/last.pt, OUT/config.json, OUT/loss_history.{json,csv} and "
                                   "OUT/samples/step_*.png. Options left out take the paper's values, or the "
                                   "checkpoint's when resuming; with --resume the model, diffusion and data "
                                   "flags are ignored (with a warning).")
    t.add_argument("--out", required=True, help="output folder (checkpoints, grids, loss history)")
    new = _NEW_RUN_DEFAULTS  # shown as [value]; the parser's default None tells a flag given from one left out
    t.add_argument("--preset", default=None, choices=UNet.presets(),
                   help=f"U-Net preset [{new['preset']}; cifar10 (the paper's network) for --dataset cifar10]")
    t.add_argument("--dataset", default=None, choices=["fashion_mnist", "mnist", "cifar10", "digits"],
                   help=f"training data (digits: scikit-learn's 8x8 digits, always offline) [{new['dataset']}]")
    t.add_argument("--data-root", default=None, help="torchvision data root (default $DDPM_DATA_DIR or ~/.cache/ddpm_lib)")
    t.add_argument("--limit", type=_positive_int, default=None, help="use only the first LIMIT training images")
    t.add_argument("--size", type=_positive_int, default=None, help="resize the images to SIZE x SIZE first")
    t.add_argument("--pad-to", type=_nonneg_int, default=None,
                   help="pad images to PAD_TO x PAD_TO with black (default: 32 for 28x28 Fashion-MNIST/MNIST "
                        "when no --size; 0: no padding)")
    t.add_argument("--dropout", type=float, default=None, help="override the preset's dropout")
    t.add_argument("--conditional", action="store_true",
                   help="class-conditional model (labels as y; null class for classifier-free guidance)")
    g = t.add_argument_group("length")
    g.add_argument("--steps", type=_nonneg_int, default=None,
                   help="train until this many optimizer steps in total (default 800000 without --minutes, "
                        "the paper's CIFAR-10 length)")
    g.add_argument("--minutes", type=float, default=None, help="wall-clock budget for this run, in minutes")
    g.add_argument("--overwrite", action="store_true",
                   help="start a new run even where OUT/last.pt holds one (without --resume or this, that is an "
                        "error, so that a forgotten --resume does not replace a run; the old run's grids in "
                        "OUT/samples stay until overwritten)")
    g.add_argument("--resume", nargs="?", const=True, default=None, metavar="PATH",
                   help="resume from PATH, or from OUT/last.pt when given without a path (starting fresh if "
                        "there is none); model, diffusion and data come from the checkpoint")
    o = t.add_argument_group("optimisation (paper defaults)")
    o.add_argument("--batch-size", type=_positive_int, default=None, help="batch size [128]")
    o.add_argument("--lr", type=float, default=None, help="Adam learning rate [2e-4]")
    o.add_argument("--warmup", type=_nonneg_int, default=None, help="linear learning-rate warm-up steps [5000]")
    o.add_argument("--grad-clip", type=float, default=None,
                   help="clip the gradient's global norm; 0 (or less): off [1.0]")
    o.add_argument("--ema-decay", type=float, default=None, help="EMA decay [0.9999]; ~0.999 for short runs")
    o.add_argument("--ema-warmup", type=_on_off, default=None, metavar="on|off",
                   help="EMA decay min(decay, (1+step)/(10+step)) [off]")
    o.add_argument("--cond-drop-prob", type=float, default=None,
                   help="label dropout probability for classifier-free guidance [0]")
    o.add_argument("--hflip", type=_on_off, default=None, metavar="on|off",
                   help="random horizontal flips (the paper's CIFAR-10 augmentation) [on for --dataset cifar10, "
                        "else off]")
    o.add_argument("--seed", type=int, default=None,
                   help="random seed of the initial weights and of the training [0]")
    d = t.add_argument_group("diffusion (paper defaults)")
    d.add_argument("--schedule", default=None, choices=["linear", "cosine", "quadratic", "sigmoid"],
                   help=f"beta schedule [{new['schedule']}]")
    d.add_argument("--T", type=_positive_int, default=None, help=f"number of diffusion steps [{new['T']}]")
    d.add_argument("--mean-type", default=None, choices=["eps", "x0", "v"],
                   help=f"what the network predicts [{new['mean_type']}]")
    d.add_argument("--var-type", default=None, choices=["fixed_large", "fixed_small", "learned_range"],
                   help=f"reverse-process variance [{new['var_type']}]")
    d.add_argument("--loss-type", default=None, choices=["simple", "vlb", "hybrid"],
                   help=f"training loss [{new['loss_type']}]")
    e = t.add_argument_group("output")
    e.add_argument("--log-every", type=_positive_int, default=None, help="log the mean loss every N steps [100]")
    e.add_argument("--save-every", type=_nonneg_int, default=None, help="checkpoint every N steps; 0: only at the end [5000]")
    e.add_argument("--sample-every", type=_nonneg_int, default=None,
                   help="DDIM sample grid (EMA weights) every N steps; 0: never [5000]")
    e.add_argument("--sample-n", type=_positive_int, default=None, help="images per sample grid [64]")
    e.add_argument("--sample-steps", type=_positive_int, default=None, help="DDIM steps for the sample grids [50]")
    e.add_argument("--export", default=None, metavar="PATH",
                   help="also write an EMA-only float16 checkpoint to PATH at the end")
    e.add_argument("--no-progress", action="store_true",
                   help="no progress bar: print the mean loss every --log-every steps instead")
    h = t.add_argument_group("hardware")
    h.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, mps or auto")
    h.add_argument("--bf16", type=_auto_bool, default=None, metavar="on|off|auto",
                   help="bfloat16 autocast with float32 master weights "
                        "[auto: on CUDA GPUs with native bf16, compute capability 8.0+]")
    h.add_argument("--fp16", type=_on_off, default=None, metavar="on|off",
                   help="float16 autocast with dynamic loss scaling and float32 master weights, for GPUs "
                        "without native bf16 (T4, V100); turns bf16 and the CUDA graph off [off]")
    h.add_argument("--channels-last", type=_auto_bool, default=None, metavar="on|off|auto",
                   help="channels_last memory format [auto: on with CUDA]")
    h.add_argument("--compile", type=_auto_bool, default=None, metavar="on|off|auto",
                   help="torch.compile the network; auto: try on CUDA, fall back to eager [auto]")
    h.add_argument("--cuda-graph", type=_auto_bool, default=None, metavar="on|off|auto",
                   help="capture the whole update (forward, backward, clip, Adam, EMA) in one CUDA graph after "
                        "three eager steps and replay it; auto: on with CUDA [auto]")
    h.add_argument("--threads", type=_positive_int, default=None, help="CPU threads for torch (default: torch's)")
    t.set_defaults(func=_cmd_train)

    # ---- sample
    s = sub.add_parser("sample", formatter_class=fmt, help="draw samples from a checkpoint",
                       description="Sample from a checkpoint (its EMA weights unless --weights model). --out ending in .png writes a grid; "
                                   "ending in .npz writes the raw samples as uint8 (N, H, W, C) under 'arr_0' "
                                   "(np.savez(path, samples[, labels]) as openai/guided-diffusion; labels under "
                                   "'arr_1' for conditional models).")
    s.add_argument("--ckpt", required=True, help="checkpoint (last.pt or an EMA-only export)")
    s.add_argument("--out", default="samples.png", help="output .png (grid) or .npz (raw uint8 samples)")
    s.add_argument("--sampler", default="ddim", choices=["ddpm", "ddim"], help="DDPM (Algorithm 2, T steps) or DDIM")
    s.add_argument("--weights", default="ema", choices=["ema", "model"],
                   help="the EMA weights (the paper's) or the raw ones (full checkpoints; for short runs, whose "
                        "EMA is still mostly the initial network)")
    s.add_argument("--steps", type=_positive_int, default=None,
                   help="DDIM steps [50] (not with --sampler ddpm, which takes all T steps)")
    s.add_argument("--eta", type=float, default=0.0,
                   help="DDIM eta (0: deterministic; 1: DDPM's noise with the posterior variance; above 1 the "
                        "steps no longer keep the forward process's marginals; not with --sampler ddpm)")
    s.add_argument("--n", type=_positive_int, default=64, help="number of samples")
    s.add_argument("--batch-size", type=_positive_int, default=256, help="samples per batch")
    s.add_argument("--seed", type=int, default=0,
                   help="random seed (the same seed, --n and --batch-size give the same samples)")
    s.add_argument("--guidance-scale", type=float, default=None,
                   help="classifier-free guidance weight w (conditional models)")
    s.add_argument("--class-label", type=int, default=None,
                   help="class to sample (conditional models; default: cycle through all classes)")
    s.add_argument("--crop", action="store_true",
                   help="undo the padding recorded in the checkpoint (e.g. 32x32 -> 28x28 Fashion-MNIST)")
    s.add_argument("--nrow", type=_positive_int, default=None, help="images per grid row (default sqrt(n))")
    s.add_argument("--chain", default=None, metavar="PNG",
                   help="also save the chain of the first (up to) 8 samples of the first batch to this .png: for "
                        "each a row of x_t and below it a row of the network's x_0 prediction, at 11 steps from the "
                        "first timestep the sampler visits (t = T for DDPM) down to the sample (to see where samples "
                        "that stay noise or drift in colour go wrong)")
    s.add_argument("--fd", action="store_true",
                   help="also print the FD (Fashion-MNIST classifier) of the samples with its real-vs-real "
                        "baseline (Fashion-MNIST checkpoints; not FID)")
    s.add_argument("--device", default="auto", help="cpu, cuda, mps or auto")
    s.add_argument("--fast", default="auto", choices=["auto", "on", "off"],
                   help="the network's forward through ddpm_lib.accel.make_sampler_forward: bf16 autocast (GPUs "
                        "with native bf16), channels_last and one CUDA graph per batch shape, replayed every step; "
                        "the sampler's own arithmetic stays float32. auto: on for CUDA; off: float32 eager")
    s.add_argument("--compile", action="store_true",
                   help="with the fast path, also torch.compile the network (pays off for many samples)")
    s.add_argument("--experimental-kernels", action="store_true",
                   help="with the fast path, also the inference experiments of ddpm_lib.accel (a Triton GroupNorm "
                        "kernel with the residual sums folded in, sub-pixel upsampling, channel padding; the same "
                        "function, not yet measured on a GPU)")
    s.add_argument("--fp16", type=_on_off, default=False, metavar="on|off",
                   help="with the fast path, float16 autocast instead of bf16, for GPUs without native bf16 (T4, "
                        "V100) [off]")
    s.add_argument("--no-progress", action="store_true", help="no progress bar")
    s.set_defaults(func=_cmd_sample)

    # ---- bpd
    b = sub.add_parser("bpd", formatter_class=fmt, help="the variational bound in bits/dim",
                       description="The negative log-likelihood bound in bits/dim on the test split (T network "
                                   "calls per batch), with its terms: prior L_T, the sum of the step KLs, and "
                                   "the decoder L_0.")
    b.add_argument("--ckpt", required=True, help="checkpoint")
    b.add_argument("--n", type=_positive_int, default=256, help="number of test images")
    b.add_argument("--weights", default="ema", choices=["ema", "model"],
                   help="the EMA weights (the paper's) or the raw ones (full checkpoints)")
    b.add_argument("--batch-size", type=_positive_int, default=64, help="images per batch")
    b.add_argument("--split", default="test", choices=["train", "test"],
                   help="data split (the digits data set has only 'train')")
    b.add_argument("--seed", type=int, default=0, help="random seed for the noise")
    b.add_argument("--data-root", default=None,
                   help="torchvision data root (default $DDPM_DATA_DIR or ~/.cache/ddpm_lib)")
    b.add_argument("--device", default="auto", help="cpu, cuda, mps or auto")
    b.add_argument("--no-progress", action="store_true", help="no progress bar over the timesteps")
    b.add_argument("--progress", action="store_true", help=argparse.SUPPRESS)  # the bar is on by default now
    b.set_defaults(func=_cmd_bpd)

    # ---- info
    i = sub.add_parser("info", formatter_class=fmt, help="describe a checkpoint",
                       description="Print a checkpoint's configuration, step and parameter count.")
    i.add_argument("--ckpt", required=True, help="checkpoint")
    i.add_argument("--json", action="store_true", help="print the full configuration as JSON")
    i.set_defaults(func=_cmd_info)
    return p


# ---------------------------------------------------------------------------------------------- helpers
def _device(name: str):
    import torch

    from .config import default_device

    if name == "auto":
        return default_device()
    try:
        dev = torch.device(name)
    except RuntimeError as exc:
        raise ValueError(f"--device: {exc}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA device is available (use --device cpu)")
    if dev.type == "mps" and not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
        raise ValueError("--device mps: no Apple-silicon GPU is available (use --device cpu)")
    return dev


def _load_data(name: str, split: str, data_cfg: Dict[str, Any], root=None):
    from .data import load_dataset

    if name == "digits" and split == "test":
        split = "train"
    return load_dataset(name, split, root=root, size=data_cfg.get("size"), pad_to=data_cfg.get("pad_to") or None,
                        limit=data_cfg.get("limit") if split == "train" else None)


def _say(msg: str) -> None:
    print(msg, flush=True)


# ---------------------------------------------------------------------------------------------- train
def _cmd_train(args) -> int:
    import torch

    from .diffusion import GaussianDiffusion
    from .trainer import Trainer, TrainConfig, read_checkpoint
    from .unet import UNet

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.minutes is not None and not args.minutes > 0:
        raise ValueError(f"--minutes must be > 0, got {args.minutes}")
    device = _device(args.device)
    out = Path(args.out)
    explicit = {k: getattr(args, flag) for flag, k in _TRAIN_FLAGS.items() if getattr(args, flag) is not None}
    if "grad_clip" in explicit and explicit["grad_clip"] <= 0:
        explicit["grad_clip"] = None
    explicit["progress"] = not args.no_progress
    if explicit.get("fp16"):  # --fp16 on turns bf16 and the CUDA graph off unless they are asked for
        explicit.setdefault("bf16", "auto")
        explicit.setdefault("cuda_graph", "auto")

    resume_path: Optional[Path] = None
    if args.resume is not None:
        resume_path = out / "last.pt" if args.resume is True else Path(args.resume)
        if args.resume is True and not resume_path.exists():
            _say(f"--resume: no checkpoint at {resume_path}; starting a new run")
            resume_path = None
        elif not resume_path.exists():
            raise FileNotFoundError(f"--resume: checkpoint not found: {resume_path}")

    if args.overwrite and resume_path is not None:
        raise ValueError("--overwrite starts a new run; --resume continues one: choose one")
    replaced = resume_path is None or resume_path.resolve() != (out / "last.pt").resolve()
    if replaced and not args.overwrite and (out / "last.pt").exists():  # also --resume OTHER/last.pt
        try:
            at = f" at step {read_checkpoint(out / 'last.pt')['step']}"
        except Exception:  # a damaged file is still not to be replaced silently
            at = ""
        raise FileExistsError(f"{out / 'last.pt'} holds a run{at}: pass --resume (without a path) to continue "
                              f"it, --overwrite to replace it, or another --out")
    if resume_path is not None:
        given = [f"--{k.replace('_', '-')}" for k in _FROM_CHECKPOINT if getattr(args, k) is not None]
        given += ["--conditional"] if args.conditional else []
        if given:
            print(f"warning: --resume takes the model, diffusion and data from the checkpoint; ignoring "
                  f"{', '.join(given)}", file=sys.stderr)
        state = read_checkpoint(resume_path)
        data_cfg = dict(state["config"].get("data") or {})
        name = data_cfg.get("name") or args.dataset or _NEW_RUN_DEFAULTS["dataset"]
        data = _load_data(name, "train", data_cfg, args.data_root)
        trainer = Trainer.from_checkpoint(resume_path, data, device=device, out_dir=out, **explicit)
        _say(f"resumed {resume_path} at step {trainer.step}")
    else:
        if args.dataset == "cifar10":  # the paper's CIFAR-10 setting: its network and random flips
            if args.preset is None:
                args.preset = "cifar10"
            explicit.setdefault("hflip", True)
        for k, v in _NEW_RUN_DEFAULTS.items():
            if getattr(args, k) is None:
                setattr(args, k, v)
        pad_to = args.pad_to
        if pad_to is None and args.size is None and args.dataset in ("fashion_mnist", "mnist"):
            pad_to = 32
        data_cfg = {"size": args.size, "pad_to": pad_to or None, "limit": args.limit}
        data = _load_data(args.dataset, "train", data_cfg, args.data_root)
        C, H, W = data.shape
        if H != W:
            raise ValueError(f"the images are {H}x{W}; the U-Net needs square images (use --size)")
        overrides: Dict[str, Any] = {"in_channels": C, "image_size": H}
        if args.dropout is not None:
            overrides["dropout"] = args.dropout
        if args.conditional:
            overrides["num_classes"] = data.num_classes
        if args.var_type == "learned_range":
            overrides["learn_sigma"] = True
        torch.manual_seed(explicit.get("seed", TrainConfig.seed))  # the initial weights, as the Trainer's draws
        try:
            model = UNet.from_preset(args.preset, **overrides)
        except ValueError as exc:
            if "attn_resolutions" not in str(exc):
                raise
            raise ValueError(f"the {args.preset} preset on {H}x{W} images: {exc} (--size resizes the images; or "
                             f"choose another --preset)") from None
        diffusion = GaussianDiffusion(args.schedule, args.mean_type, args.var_type, args.loss_type,
                                      num_timesteps=args.T)
        info = {k: v for k, v in data_cfg.items() if v is not None}
        # recorded, not guessed from the images' border (what sample --crop undoes)
        info["pad_to"] = pad_to or 0
        if pad_to:
            info["original_size"] = args.size or _NATIVE_SIZE[args.dataset]
        cfg = TrainConfig(**explicit)
        trainer = Trainer(model, diffusion, data, device=device, out_dir=out, preset=args.preset, data_info=info,
                          config=cfg)
    steps = args.steps
    if steps is None and args.minutes is None:
        steps = 800_000
    nothing = steps is not None and trainer.step >= steps
    n_params = sum(p.numel() for p in trainer.model.parameters())
    c = trainer.cfg
    _say(f"training {trainer.preset or 'model'} ({n_params:,} parameters) on {trainer.data_info.get('name')} "
         f"{trainer.data_info.get('shape')} on {trainer.device}: batch {c.batch_size}, lr {c.lr:g}, warm-up "
         f"{c.warmup}, grad clip {c.grad_clip}, EMA {c.ema_decay}{' (warm-up)' if c.ema_warmup else ''}, "
         f"bf16 {trainer.use_bf16}, {'fp16 True (loss scaling), ' if trainer.use_fp16 else ''}"
         f"channels_last {trainer.use_channels_last}, compile {c.compile}, "
         f"CUDA graph {trainer.use_cuda_graph}; "
         f"until step {steps if steps is not None else '-'}"
         f"{f' or {args.minutes:g} min' if args.minutes else ''}")
    T = trainer.diffusion.num_timesteps
    if c.sample_every and c.sample_steps > T:  # the grids would take T steps without saying so
        _say(f"note: --sample-steps {c.sample_steps} is above T = {T}: the sample grids use {T} DDIM steps")
    if nothing:
        _say(f"the run is already at step {trainer.step}, at or past --steps {steps} (the total, not a number to "
             f"add): nothing to train")
        if args.export and trainer.last_checkpoint is not None:
            _export(trainer.last_checkpoint, args.export)
        return 0
    if args.no_progress:  # no bar: the logged losses as lines, for logs of batch jobs
        trainer.on_log = lambda r: _say(f"step {r['step']}: loss {r['loss']:.4f}, {r['images_per_s']:.0f} "
                                        f"images/s, lr {r['lr']:.2e}")
    try:
        trainer.train(steps=steps, minutes=args.minutes)
    except KeyboardInterrupt:
        print(f"interrupted at step {trainer.step}; checkpoint: {trainer.last_checkpoint} "
              f"(continue with --resume)", file=sys.stderr)
        return 130
    st = trainer.stats
    _say(f"done: step {trainer.step}, {st['steps']} steps in {st['wall_s']:.1f} s, "
         f"{st['images_per_s']:.1f} images/s, final loss {st['final_loss']:.4f}; checkpoint {trainer.last_checkpoint}")
    if args.export:
        _export(trainer.last_checkpoint, args.export)
    return 0


def _export(checkpoint, dst) -> None:
    from .trainer import export_checkpoint

    path = export_checkpoint(checkpoint, dst)
    _say(f"exported EMA weights (float16) to {path} ({path.stat().st_size / 1e6:.1f} MB)")


# ---------------------------------------------------------------------------------------------- sample
def _crop(x, config: Dict[str, Any]):
    data = config.get("data") or {}
    pad_to, orig = data.get("pad_to"), data.get("original_size")
    if not pad_to or not orig:
        raise ValueError("--crop: the checkpoint records no padding (data.pad_to / data.original_size)")
    H = x.shape[-1]
    top = (pad_to - orig) // 2
    if H != pad_to:
        raise ValueError(f"--crop: samples are {H}x{H} but the checkpoint says the data were padded to {pad_to}")
    return x[..., top:top + orig, top:top + orig]


def _save_chain(chain, x, args, config) -> None:
    """The --chain picture: per sample a row of x_t and a row of the x_0 prediction, left (t = T) to right,
    the last column the sample itself in both rows."""
    import numpy as np
    import torch

    from .data import save_image_grid

    ts, x_t, x0 = chain["t"], chain["x_t"], chain["pred_x0"]
    cols = sorted(set(np.linspace(0, len(ts) - 1, min(11, len(ts))).round().astype(int).tolist()))
    n = min(8, x.shape[0])
    final = x[:n].cpu()
    rows = []
    for i in range(n):
        rows += [x_t[k, i] for k in cols] + [final[i]]
        rows += [x0[k, i] for k in cols] + [final[i]]
    grid = torch.stack(rows)
    if args.crop:
        grid = _crop(grid, config)
    save_image_grid(grid, args.chain, nrow=len(cols) + 1)
    shown = ", ".join(str(ts[k] + 1) for k in cols)
    _say(f"wrote the chain of {n} sample{'s' if n > 1 else ''} to {args.chain}: rows x_t and the predicted x_0 at "
         f"the paper's t = {shown}, then the sample (x_t shown clipped to [-1, 1])")


def _cmd_sample(args) -> int:
    import numpy as np
    import torch

    from .data import save_image_grid, to_uint8
    from .samplers import ddim_sample, ddpm_sample
    from .trainer import load_checkpoint

    out = Path(args.out)
    if out.suffix.lower() not in (".png", ".npz"):
        raise ValueError(f"--out must end in .png or .npz, got {out}")
    if args.sampler == "ddpm" and args.eta != 0:
        raise ValueError("--eta is DDIM's; --sampler ddpm always samples with the checkpoint's variance")
    if args.sampler == "ddpm" and args.steps is not None:
        raise ValueError("--steps is DDIM's; --sampler ddpm (Algorithm 2) takes all T steps")
    if args.steps is None:
        args.steps = 50
    if args.chain is not None and Path(args.chain).suffix.lower() != ".png":
        raise ValueError(f"--chain must end in .png, got {args.chain}")
    device = _device(args.device)
    model, diffusion, config = load_checkpoint(args.ckpt, map_location=device, weights=args.weights)
    shape = (config.get("data") or {}).get("shape")
    mc = (config.get("model") or {}).get("config") or {}
    if shape is None:
        shape = [mc.get("in_channels", 3), mc.get("image_size", 32), mc.get("image_size", 32)]
    num_classes = mc.get("num_classes")
    if (args.guidance_scale is not None or args.class_label is not None) and not num_classes:
        raise ValueError("--guidance-scale/--class-label need a class-conditional checkpoint (trained with --conditional)")
    if args.class_label is not None and not 0 <= args.class_label < num_classes:
        raise ValueError(f"--class-label must lie in 0..{num_classes - 1}, got {args.class_label}")
    if args.fd and (config.get("data") or {}).get("name") != "fashion_mnist":
        raise ValueError("--fd needs a Fashion-MNIST checkpoint")
    if args.sampler == "ddim" and args.steps > diffusion.num_timesteps:
        raise ValueError(f"--steps must be at most T = {diffusion.num_timesteps}, got {args.steps}")
    fast = args.fast == "on" or (args.fast == "auto" and device.type == "cuda")
    for flag, on in (("--compile", args.compile), ("--experimental-kernels", args.experimental_kernels),
                     ("--fp16", args.fp16)):
        if on and not fast:
            raise ValueError(f"{flag} needs the fast path (--fast on, or --fast auto on a CUDA device)")
    net = model
    if fast:
        from .accel import make_sampler_forward

        net = make_sampler_forward(model, device, compile=args.compile, experimental=args.experimental_kernels,
                                   fp16=bool(args.fp16))
        f = net.fast
        _say(f"fast sampling on {device}: bf16 {f.bf16}, {'fp16 True, ' if f.fp16 else ''}"
             f"channels_last {f.channels_last}, compile {f.compiled}, "
             f"CUDA graph {net.cuda_graph}")
    g = torch.Generator().manual_seed(args.seed)
    chunks, labels = [], []
    done = 0
    while done < args.n:
        b = min(args.batch_size, args.n - done)
        y = None
        if num_classes:
            y = (torch.full((b,), args.class_label, dtype=torch.long) if args.class_label is not None
                 else torch.arange(done, done + b) % num_classes).to(device)
            labels.append(y.cpu())
        kw = dict(generator=g, y=y, guidance_scale=args.guidance_scale, progress=not args.no_progress,
                  device=device, return_intermediates=bool(args.chain) and done == 0)
        if args.sampler == "ddpm":
            if kw["return_intermediates"]:
                kw["record_every"] = max(1, diffusion.num_timesteps // 10)
            x = ddpm_sample(net, diffusion, (b, *shape), **kw)
        else:
            if kw["return_intermediates"]:  # about 11 of the steps, not all of them for the whole batch
                kw["record_every"] = max(1, args.steps // 10)
            x = ddim_sample(net, diffusion, (b, *shape), steps=args.steps, eta=args.eta, **kw)
        if kw["return_intermediates"]:
            x, chain = x
            _save_chain(chain, x, args, config)
        chunks.append(x.cpu())
        done += b
    x = torch.cat(chunks)
    if args.crop:
        x = _crop(x, config)
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.suffix.lower() == ".png":
        nrow = args.nrow or max(1, int(math.ceil(math.sqrt(args.n))))
        save_image_grid(x, out, nrow=nrow)
    else:
        arrays = [to_uint8(x)]
        if labels:
            arrays.append(torch.cat(labels).numpy())
        np.savez(out, *arrays)
    _say(f"wrote {args.n} samples ({args.sampler}{'' if args.sampler == 'ddpm' else f', {args.steps} steps'}) "
         f"of shape {tuple(x.shape[1:])} to {out}")
    if args.fd:
        from .metrics import fd_fashion

        _say(str(fd_fashion(x, device=device)))
    return 0


# ---------------------------------------------------------------------------------------------- bpd
def _cmd_bpd(args) -> int:
    from .metrics import bits_per_dim
    from .trainer import load_checkpoint

    device = _device(args.device)
    model, diffusion, config = load_checkpoint(args.ckpt, map_location=device, weights=args.weights)
    data_cfg = dict(config.get("data") or {})
    name = data_cfg.get("name")
    if not name:
        raise ValueError(f"{args.ckpt} does not record its data set; cannot evaluate the bound")
    split = args.split
    if name == "digits" and split == "test":
        _say("the digits data set has no test split: using the training images")
        split = "train"
    data = _load_data(name, split, data_cfg, args.data_root)
    res = bits_per_dim(model, diffusion, data, n=args.n, batch_size=args.batch_size, device=device,
                       seed=args.seed, progress=not args.no_progress)
    _say(f"variational bound on {res.n} {name} {split} images (T = {diffusion.num_timesteps}):")
    _say(f"  total        {res.total:9.4f} ± {res.total_se:.4f} bits/dim")
    _say(f"  prior L_T    {res.prior:9.5f} ± {res.prior_se:.5f}")
    _say(f"  step KLs     {res.kl:9.4f} ± {res.kl_se:.4f}   (sum of L_1 .. L_{{T-1}})")
    _say(f"  decoder L_0  {res.decoder:9.4f} ± {res.decoder_se:.4f}")
    if data_cfg.get("pad_to"):
        side = data_cfg.get("original_size")
        unpadded = f"the {side}x{side} images" if side else "the unpadded images"
        _say(f"  (per dimension of the {data_cfg['pad_to']}x{data_cfg['pad_to']} padded images, the black border "
             f"included: not comparable with bits/dim of {unpadded})")
    return 0


# ---------------------------------------------------------------------------------------------- info
def _cmd_info(args) -> int:
    from .ema import ema_init_weight
    from .trainer import ema_updates, load_checkpoint, read_checkpoint, young_ema_warning

    state = read_checkpoint(args.ckpt)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # the young-EMA warning: the EMA line below says it
        model, diffusion, config = load_checkpoint(args.ckpt)
    n_params = sum(p.numel() for p in model.parameters())
    if args.json:
        print(json.dumps(config, indent=1))
        return 0
    shown = json.loads(json.dumps(config))
    betas = shown.get("diffusion", {}).pop("betas", None)
    size = Path(args.ckpt).stat().st_size
    _say(f"checkpoint: {args.ckpt} ({size / 1e6:.1f} MB, {'full, resumable' if state['kind'] == 'full' else 'EMA-only export'})")
    _say(f"step: {state['step']}")
    _say(f"parameters: {n_params:,}")
    m = shown.get("model", {})
    _say(f"model: {m.get('class')} preset={m.get('preset')} config={json.dumps(m.get('config'))}")
    dcfg = shown.get("diffusion", {})
    _say(f"diffusion: {json.dumps(dcfg)}" + (f" (betas {betas[0]:.3g}..{betas[-1]:.3g})" if betas else ""))
    _say(f"data: {json.dumps(shown.get('data'))}")
    _say(f"train: {json.dumps(shown.get('train'))}")
    train_cfg = shown.get("train") or {}
    if "ema_decay" in train_cfg:
        ema = (ema_updates(state), float(train_cfg["ema_decay"]), bool(train_cfg.get("ema_warmup")))
        _say(f"EMA: {100 * ema_init_weight(*ema):.3g}% of its weight is still on the weights training started from"
             + (" (samples from it may look like noise)" if young_ema_warning(*ema) else ""))
    hist = state.get("history") or []
    if hist:
        _say(f"last logged loss: {hist[-1][1]:.4f} at step {hist[-1][0]}")
    return 0


# ---------------------------------------------------------------------------------------------- main
def _one_line(exc: BaseException) -> str:
    msg = str(exc).strip() or type(exc).__name__
    if isinstance(exc, KeyError):
        msg = f"missing key {msg}"
    return " ".join(msg.split())


def _format_warning(message, category, filename, lineno, line=None) -> str:
    return f"warning: {' '.join(str(message).split())}\n"


def main(argv: Optional[List[str]] = None) -> int:
    """Run the command line; returns the exit status (0 success, 1 error, 2 bad usage, 130 interrupted)."""
    from .data import DatasetUnavailableError
    from .metrics import FIDUnavailableError
    from .trainer import CheckpointError, NonFiniteLossError, TrainingOutOfMemoryError

    parser = build_parser()
    args = parser.parse_args(argv)
    formatwarning = warnings.formatwarning
    warnings.formatwarning = _format_warning  # "warning: ..." on one line, not the source line that raised it
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    except (DatasetUnavailableError, CheckpointError, NonFiniteLossError, TrainingOutOfMemoryError,
            FIDUnavailableError, ValueError, OSError) as exc:
        print(f"error: {_one_line(exc)}", file=sys.stderr)
        return 1
    finally:
        warnings.formatwarning = formatwarning
