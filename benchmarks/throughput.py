#!/usr/bin/env python
"""Training and sampling throughput of ddpm_lib's U-Net against diffusers' UNet2DModel, side by side.

Both networks are the paper's CIFAR-10 model (35,746,307 parameters) with the same weights
(``UNet.from_diffusers``), timed in one process on one device:

* training: one update of Algorithm 1 at batch 128 of 32x32x3 (draw a batch from a data set held on the
  device, sample t and noise, q_sample, forward, MSE loss, backward, clip the gradient norm to 1.0,
  Adam 2e-4, EMA 0.9999). ddpm_lib runs its own step (:func:`ddpm_lib.accel.make_train_step`: fused
  Adam, foreach clipping and EMA, optionally one CUDA graph). diffusers' network runs twice: in a plain
  PyTorch step (:class:`PlainStep`: ``torch.optim.Adam`` with PyTorch's default implementation,
  ``clip_grad_norm_`` with its defaults, ``diffusers.training_utils.EMAModel``) -- the baseline of the
  issue, whose list of means counts the fused optimizer and the step around the network as ddpm_lib's --
  and, for information (rows ``<mode>+ddpm_step``), in ddpm_lib's step, which compares the networks
  alone. Both steps draw the data, t and the noise on the device and never synchronise with the host;
* inference: the network's forward at batch 1024 without gradients (what each sampling step costs).

Modes: ``fp32`` (eager; TF32 flags at PyTorch's defaults, printed), ``bf16_cl`` (bf16 autocast and
channels_last, eager), ``bf16_cl_compile`` (the same under ``torch.compile``, default mode) for both
networks; ``fast`` for ddpm_lib (compiled, plus the whole training step / the forward replayed from one
CUDA graph); and, for information only (not part of the diffusers baseline the issue defines),
``<mode>+ddpm_step`` (diffusers' network in ddpm_lib's step) and ``bf16_cl_compile_graph`` for diffusers
(its compiled network in ddpm_lib's step replayed from one CUDA graph).

The run also times each of the network's convolutions alone (the *convolution floor*: the rates these
convolution kernels allow when everything else is free) and profiles each compiled mode (where the time of a
step goes, by kind of kernel).

Times are CUDA-event medians over several repetitions after warm-up (compilation happens in the warm-up and
is reported separately). The most important numbers are measured first; the JSON is rewritten after every
mode, and the run stops starting new modes when ``--budget-s`` is nearly spent.

    python benchmarks/throughput.py --device cuda                 # the full comparison (~400 s)
    python benchmarks/throughput.py --device cpu --size tiny      # CI: a tiny network on the CPU (~30 s)
"""
from __future__ import annotations

import argparse
import copy
import gc
import json
import math
import os
import platform
import re
import statistics
import sys
import threading
import time
import traceback
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Callable, Dict, List, Optional

# Compile workers: one per core (read when inductor's config is imported).
os.environ.setdefault("TORCHINDUCTOR_COMPILE_THREADS", str(max(1, os.cpu_count() or 1)))
os.environ.setdefault("PYTHONUNBUFFERED", "1")

import torch  # noqa: E402
from torch import nn  # noqa: E402

try:
    import ddpm_lib  # noqa: F401
except ImportError:  # run from a checkout without installing the package
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from ddpm_lib import GaussianDiffusion, UNet  # noqa: E402
from ddpm_lib import accel  # noqa: E402
from ddpm_lib.ema import EMA  # noqa: E402

# google/ddpm-cifar10-32's config.json, with the paper's training dropout (the published config says 0.0)
CIFAR10_DIFFUSERS_CONFIG = dict(
    act_fn="silu", attention_head_dim=None, block_out_channels=[128, 256, 256, 256], center_input_sample=False,
    down_block_types=["DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"], downsample_padding=0,
    flip_sin_to_cos=False, freq_shift=1, in_channels=3, layers_per_block=2, mid_block_scale_factor=1,
    norm_eps=1e-06, norm_num_groups=32, out_channels=3, sample_size=32, time_embedding_type="positional",
    up_block_types=["UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"], dropout=0.1,
)
# The same layout, tiny (16x16, 2 levels, attention at 8x8, base width 16): for the CPU in CI
TINY_DIFFUSERS_CONFIG = dict(
    CIFAR10_DIFFUSERS_CONFIG, block_out_channels=[16, 32], down_block_types=["DownBlock2D", "AttnDownBlock2D"],
    up_block_types=["AttnUpBlock2D", "UpBlock2D"], layers_per_block=1, norm_num_groups=8, sample_size=16,
)
SIZES = {
    "full": dict(preset="cifar10", diffusers=CIFAR10_DIFFUSERS_CONFIG, train_batch=128, infer_batch=1024,
                 image=32, data_n=8192, min_rep_s=0.3, reps=5, peak_n=8192, warmup=3),
    "tiny": dict(preset="tiny", diffusers=TINY_DIFFUSERS_CONFIG, train_batch=4, infer_batch=8,
                 image=16, data_n=32, min_rep_s=0.0, reps=3, peak_n=256, warmup=1, overrides=dict(ch=16)),
}
# ddpm_lib's experiments (not among its defaults, so never its best), by suffix: the Triton GroupNorm(+SiLU)
# kernel of ddpm_lib.kernels for inference (_tgn), the upsampling convolutions at the low resolution (_sp),
# the first and last convolutions' 3 channels padded to 8 (_pad), all three (_all), all three with the residual
# sums, skip concatenations, convolution biases and the sub-pixel upsamplings' interleaving folded into the
# GroupNorms (_fold, accel.FoldedUNet), GroupNorm from
# per-channel moments (_gnm); each as a compiled mode and its CUDA graph (fast_), in this order of priority
EXPERIMENTS = {"fold": ("infer",), "all": ("infer",), "tgn": ("infer",), "sp": ("infer", "train"), "pad": ("infer", "train"),
               "gnm": ("infer", "train")}
EXPERIMENT_MODES = tuple(f"{p}_{e}" for e in EXPERIMENTS for p in ("bf16_cl_compile", "fast"))
# the experiment that ddpm_lib's sampling option sets up (accel.make_sampler_forward(experimental=True), the CLI's
# sample --experimental-kernels): a user can run it, so its inference rows count for ddpm_lib's inference best,
# but only a row whose output passed the check against float32 eager (infer_same_function)
SAMPLING_OPTION, SAMPLING_OPTION_NAME = "fold", "make_sampler_forward(experimental=True)"
# each experiment's accel.prepare_model options (the sampling option's: the very ones that option sets)
EXPERIMENT_SETTINGS: Dict[str, Dict[str, Any]] = {
    "gnm": dict(group_norm="moments"), "tgn": dict(group_norm="triton"), "sp": dict(upsample="subpixel"),
    "pad": dict(pad_channels=8), "all": dict(group_norm="triton", upsample="subpixel", pad_channels=8),
    SAMPLING_OPTION: accel.SAMPLER_EXPERIMENTS}
ALL_MODES = ["ours:fast", "ours:bf16_cl_compile", "diffusers:bf16_cl_compile", "diffusers:bf16_cl_compile_graph",
             *(f"ours:{m}" for m in EXPERIMENT_MODES),
             "ours:bf16_cl", "diffusers:bf16_cl", "ours:fp32", "diffusers:fp32",
             "ours:trainer", "ours:trainer_graph", "ours:trainer_eager"]
BASELINE_MODES = ("fp32", "bf16_cl", "bf16_cl_compile")  # diffusers' best is taken over these (the issue)
# diffusers' network in ddpm_lib's step: the +ddpm_step rows, and the graphed step that `fast` uses too (the
# like-for-like row for ddpm_lib's best); the networks-alone comparison is taken over these
NETWORK_ALONE_MODES = tuple(f"{m}+ddpm_step" for m in BASELINE_MODES) + ("bf16_cl_compile_graph",)
# ddpm_lib.Trainer's own loop: its defaults (on CUDA compiled and replayed from a CUDA graph), then the graph
# without compiling, then neither (the defaults before the GPU run of 2026-11-27)
TRAINER_MODES = {"trainer": {}, "trainer_graph": {"compile": False, "cuda_graph": True},
                 "trainer_eager": {"compile": False, "cuda_graph": False}}
NUM_SAMPLES, DDPM_STEPS, DDIM_STEPS = 50_000, 1000, 50
T0 = time.perf_counter()


def log(msg: str) -> None:
    print(f"[{time.perf_counter() - T0:7.1f}s] {msg}", flush=True)


def _slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "device"


# ---------------------------------------------------------------------------------------------- networks
class DiffusersEps(nn.Module):
    """diffusers' UNet2DModel called like ddpm_lib's networks: ``net(x, t) -> eps``."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.net(x, t, return_dict=False)[0]


class PlainStep:
    """One update of Algorithm 1 for diffusers' network as plain PyTorch trains it: the baseline step.

    The same loss code (``GaussianDiffusion.training_losses``), batch, and t and noise draws on the device
    as ddpm_lib's step, and no host synchronisation either, but the optimizer, clipping and EMA a diffusers
    user has without ddpm_lib: ``torch.optim.Adam`` (lr 2e-4) with PyTorch's default implementation
    (foreach on CUDA, not fused), ``torch.nn.utils.clip_grad_norm_`` (1.0) with its defaults, and
    ``diffusers.training_utils.EMAModel`` (decay 0.9999, with its faster ``foreach`` option where it has
    one). Called like :class:`ddpm_lib.accel.TrainStep`: ``step(x0) -> (loss, None)``.
    """

    def __init__(self, fast: accel.FastModel, diffusion: GaussianDiffusion, generator: torch.Generator):
        self.fast, self.diffusion, self.generator = fast, diffusion, generator
        self.params = [p for p in fast.module.parameters() if p.requires_grad]
        self.optimizer = torch.optim.Adam(self.params, lr=2e-4, betas=(0.9, 0.999), eps=1e-8)
        from diffusers.training_utils import EMAModel  # only diffusers' network is trained in this step

        try:
            self.ema = EMAModel(self.params, decay=0.9999, foreach=True)
            ema_note = "diffusers EMAModel (foreach)"
        except TypeError:  # an older diffusers without the option
            self.ema = EMAModel(self.params, decay=0.9999)
            ema_note = "diffusers EMAModel"
        self.note = ("plain PyTorch step: torch.optim.Adam (default implementation), clip_grad_norm_ (defaults), "
                     + ema_note)

    def __call__(self, x0: torch.Tensor):
        fast = self.fast
        x0 = fast.prepare_input(x0)
        B = x0.shape[0]
        t = torch.randint(0, self.diffusion.num_timesteps, (B,), device=x0.device, generator=self.generator)
        noise = torch.randn(x0.shape, device=x0.device, dtype=x0.dtype, generator=self.generator)
        self.optimizer.zero_grad(set_to_none=True)
        with fast.autocast():
            losses = self.diffusion.training_losses(fast.forward, x0, t, noise)
        loss = losses["loss"].float().mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.params, 1.0)
        self.optimizer.step()
        self.ema.step(self.params)
        return loss.detach(), None


def build_networks(size: str):
    """(ours, diffusers-or-None, note): CPU float32 networks with the same weights (none of them zero)."""
    cfg = SIZES[size]
    try:
        import diffusers
        from diffusers import UNet2DModel
    except Exception as exc:  # noqa: BLE001 - a benchmark-only dependency
        torch.manual_seed(0)
        ours = UNet.from_preset(cfg["preset"], dropout=0.1, **cfg.get("overrides", {}))
        with torch.no_grad():  # the paper zero-initialises some layers: never time on zeros
            for p in ours.parameters():
                if p.ndim > 1 and not p.any():
                    nn.init.xavier_uniform_(p)
        return ours, None, f"diffusers unavailable ({type(exc).__name__}: {exc})"
    torch.manual_seed(0)
    diff = UNet2DModel(**cfg["diffusers"])  # PyTorch's default initialisation: no zero weights
    ours = UNet.from_diffusers(diff, dropout=cfg["diffusers"]["dropout"])
    n_ours = sum(p.numel() for p in ours.parameters())
    n_diff = sum(p.numel() for p in diff.parameters())
    if n_ours != n_diff:
        raise RuntimeError(f"parameter counts differ: ddpm_lib {n_ours:,}, diffusers {n_diff:,}")
    if size == "full":
        ref = sum(p.numel() for p in UNet.from_preset("cifar10").parameters())
        if n_ours != ref:
            raise RuntimeError(f"the mapped network has {n_ours:,} parameters, the cifar10 preset {ref:,}")
    return ours.train(), DiffusersEps(diff).train(), f"diffusers {diffusers.__version__}"


def count_forward_flops(model: nn.Module, image: int) -> float:
    """Forward FLOPs per image (2 per multiply-add; convolutions, matrix products and attention)."""
    from torch.utils.flop_counter import FlopCounterMode

    m = copy.deepcopy(model).float().eval()
    x = torch.randn(1, 3, image, image)
    t = torch.tensor([10])
    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel

        ctx = sdpa_kernel([SDPBackend.MATH])  # attention as plain matrix products, which the counter sees
    except Exception:  # noqa: BLE001
        import contextlib

        ctx = contextlib.nullcontext()
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), ctx, counter:
        m(x, t)
    return float(counter.get_total_flops())


def _layer_shapes(model: nn.Module, image: int, cls: type, key: Callable[[nn.Module, Any, Any], tuple]) -> Dict[tuple, int]:
    """``key(module, input, output)`` of every ``cls`` layer of ``model`` in one forward pass of one image, with how
    many layers share it."""
    m = copy.deepcopy(model).float().eval()
    found: Dict[tuple, int] = {}

    def hook(mod, inp, out):
        k = key(mod, inp, out)
        found[k] = found.get(k, 0) + 1

    handles = [mod.register_forward_hook(hook) for mod in m.modules() if isinstance(mod, cls)]
    try:
        with torch.no_grad():
            m(torch.randn(1, 3, image, image), torch.tensor([10]))
    finally:
        for h in handles:
            h.remove()
    return found


def group_norm_shapes(model: nn.Module, image: int) -> List[Dict[str, Any]]:
    """Every ``nn.GroupNorm`` of ``model`` as ``(channels, groups, H, W)`` in one forward pass of one image; identical
    layers are listed once with their ``count``."""
    found = _layer_shapes(model, image, nn.GroupNorm,
                          lambda mod, inp, out: (mod.num_channels, mod.num_groups, tuple(inp[0].shape[2:])))
    return [dict(channels=c, groups=g, hw=list(hw), count=n) for (c, g, hw), n in found.items()]


def conv_shapes(model: nn.Module, image: int) -> List[Dict[str, Any]]:
    """Every ``nn.Conv2d`` of ``model`` with the size of its input and output in one forward pass of one image;
    identical layers are listed once with their ``count``."""
    def key(mod, inp, out):
        return (mod.in_channels, mod.out_channels, tuple(mod.kernel_size), tuple(mod.stride),
                mod.padding if isinstance(mod.padding, str) else tuple(mod.padding), tuple(mod.dilation), mod.groups,
                mod.bias is not None, tuple(inp[0].shape[-2:]), tuple(out.shape[-2:]))

    found = _layer_shapes(model, image, nn.Conv2d, key)
    names = ("in_ch", "out_ch", "kernel", "stride", "padding", "dilation", "groups", "bias", "in_hw", "out_hw")
    return [dict(zip(names, k), count=n) for k, n in found.items()]


def profile_line(key: str, pr: Dict[str, Any]) -> str:
    """One line for a profile of :meth:`Run.profile` (its error, or its busy time and categories)."""
    if "error" in pr:
        return f"profile {key}: {pr['error'][:150]}"
    parts = ", ".join(f"{c} {v:.2f}" for c, v in sorted(pr["categories_ms_per_call"].items(), key=lambda kv: -kv[1]))
    return (f"profile {key}: {pr['busy_ms_per_call']:.2f} ms busy of {pr['measured_ms_per_call']:.2f} ms per call "
            f"({pr['kernels_per_call']:.0f} {pr['what']}): {parts}")


PROFILE_CATEGORIES = ["convolution", "matmul", "attention", "GroupNorm (fused, Triton)", "GroupNorm (ddpm_lib.kernels)",
                      "other fused (Triton)", "GroupNorm (eager)", "optimizer, clip, EMA", "copy, layout, indexing", "random numbers",
                      "other elementwise, reductions"]


def kernel_category(name: str) -> str:
    """The kind of work a GPU kernel (or, on the CPU, an ``aten::`` operator) does, from its name."""
    n = name.lower()
    if "group_norm_act_kernel" in n:
        return "GroupNorm (ddpm_lib.kernels)"  # the experiment's hand-written Triton kernel
    if n.startswith("triton"):
        if n.startswith("triton_tem") or "_tem_" in n:
            return "matmul"  # inductor's matmul/convolution templates
        return "GroupNorm (fused, Triton)" if ("group_norm" in n or "native_layer_norm" in n) else "other fused (Triton)"
    if re.search(r"flash|fmha|attention|sdpa|attn|softmax", n):
        return "attention"
    if re.search(r"adam|multi_tensor|foreach", n):
        return "optimizer, clip, EMA"
    if re.search(r"nchwtonhwc|nhwctonchw", n):
        return "copy, layout, indexing"  # cuDNN's own layout transforms
    if re.search(r"conv|fprop|dgrad|wgrad|implicit|cudnn|winograd", n):
        return "convolution"
    if re.search(r"gemm|cublas|nvjet|cutlass|xmma|matmul|addmm|\bmm\b|::mm|bmm|linear", n):
        return "matmul"
    # PyTorch's eager GroupNorm kernels (statistics, fused parameters, backward) and the operators on the CPU
    if re.search(r"group_norm|groupnorm|layer_norm|batch_norm|rowwisemoments|fusedparams|gammabeta|"
                 r"internalgradients", n):
        return "GroupNorm (eager)"
    if re.search(r"philox|rand|normal_|bernoulli|dropout|distribution", n):
        return "random numbers"
    if re.search(r"copy|cat|transpose|memcpy|memset|pad|contiguous|clone|index|gather|scatter", n):
        return "copy, layout, indexing"
    return "other elementwise, reductions"


# ---------------------------------------------------------------------------------------------- timing
class Timer:
    def __init__(self, device: torch.device):
        self.device = device
        self.cuda = device.type == "cuda"

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)

    def wall(self, fn: Callable[[], Any]) -> float:
        self.sync()
        t = time.perf_counter()
        fn()
        self.sync()
        return time.perf_counter() - t

    def per_call(self, fn: Callable[[int], Any], n: int, offset: int = 0) -> float:
        """Seconds per call of ``fn(i)`` over ``n`` calls (CUDA events on a GPU)."""
        if self.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for i in range(n):
                fn(offset + i)
            end.record()
            end.synchronize()
            return start.elapsed_time(end) / 1e3 / n
        t = time.perf_counter()
        for i in range(n):
            fn(offset + i)
        return (time.perf_counter() - t) / n

    def measure(self, fn: Callable[[int], Any], *, warmup: int, reps: int, min_rep_s: float,
                time_left: Callable[[], float]) -> Dict[str, Any]:
        for i in range(warmup):
            fn(i)
        self.sync()
        est = self.per_call(fn, 2, offset=warmup)
        n = max(1, int(math.ceil(min_rep_s / max(est, 1e-6))))
        # a short budget takes fewer repetitions (at least 3 when possible)
        reps_here = reps if time_left() > reps * n * est * 1.5 + 15 else max(1, min(reps, 3))
        times = [self.per_call(fn, n, offset=warmup + 2 + r * n) for r in range(reps_here)]
        med = statistics.median(times)
        spread = (max(times) - min(times)) / med if med > 0 else 0.0
        return dict(s_per_call=med, calls_per_rep=n, reps=reps_here, spread=spread,
                    all_s_per_call=[round(x, 7) for x in times])


# ---------------------------------------------------------------------------------------------- the run
class Run:
    def __init__(self, args):
        self.args = args
        self.size = SIZES[args.size]
        self.device = torch.device(args.device)
        if self.device.type == "cuda":
            self.device = torch.device("cuda", torch.cuda.current_device())
        self.cuda = self.device.type == "cuda"
        self.timer = Timer(self.device)
        self.deadline = T0 + args.budget_s
        self.lock = threading.Lock()
        self.results: Dict[str, Any] = {}
        self.rows: Dict[str, Dict[str, Any]] = {}  # "network:mode" -> measurements
        self.compile_s: Dict[str, float] = {}
        self.fp32_refs: Dict[str, torch.Tensor] = {}  # fp32_reference's cache
        self.diffusion = GaussianDiffusion("linear", num_timesteps=1000)

    def time_left(self) -> float:
        return self.deadline - time.perf_counter()

    # ------------------------------------------------------------------ output
    def row(self, key: str) -> Dict[str, Any]:
        net, mode = key.split(":", 1)
        info = net == "diffusers" and mode not in BASELINE_MODES
        if net == "diffusers":
            return self.rows.setdefault(key, dict(network=net, mode=mode, counts_for_diffusers_baseline=not info))
        # an experiment is not (yet) what ddpm_lib does: listed, but not ddpm_lib's best (except the sampling
        # option's inference, where it computes the same function)
        row = self.rows.setdefault(key, dict(network=net, mode=mode, experiment=mode in EXPERIMENT_MODES))
        if mode in EXPERIMENT_MODES and mode.rsplit("_", 1)[-1] == SAMPLING_OPTION:
            row.setdefault("sampling_option", SAMPLING_OPTION_NAME)
        return row

    @staticmethod
    def counts_for_ours(r: Dict[str, Any], what: str) -> bool:
        """Whether row ``r``'s ``what`` can be ddpm_lib's best: not an experiment, or the sampling option's
        inference with its output checked."""
        if not r.get("experiment"):
            return True
        return (what == "infer_images_per_s" and bool(r.get("sampling_option"))
                and r.get("infer_same_function") is True)

    def summary(self) -> Dict[str, Any]:
        def best(net: str, what: str, modes=None):
            vals = [(r[what], r["mode"]) for k, r in self.rows.items()
                    if r["network"] == net and r.get(what) and (modes is None or r["mode"] in modes)
                    and (net != "ours" or self.counts_for_ours(r, what))]
            return max(vals) if vals else (None, None)

        ot, otm = best("ours", "train_images_per_s")
        oi, oim = best("ours", "infer_images_per_s")
        dt, dtm = best("diffusers", "train_images_per_s", BASELINE_MODES)
        dl, dlm = best("diffusers", "train_images_per_s", NETWORK_ALONE_MODES)
        di, dim = best("diffusers", "infer_images_per_s", BASELINE_MODES)

        def ratio(a, b):
            return round(a / b, 3) if a and b else None

        def missing(what):
            if not any(r["network"] == "diffusers" for r in self.rows.values()):
                return list(BASELINE_MODES)
            return [m for m in BASELINE_MODES if not self.rows.get(f"diffusers:{m}", {}).get(what)]

        cf = self.results.get("conv_floor") or {}

        def proj(rate, steps):
            return round(NUM_SAMPLES * steps / rate, 1) if rate else None

        return dict(
            targets=dict(train_ratio=2.0, infer_ratio=1.5),
            diffusers_baseline_missing_train=missing("train_images_per_s"),
            diffusers_baseline_missing_infer=missing("infer_images_per_s"),
            train_target_met=(ot / dt >= 2.0) if ot and dt else None,
            infer_target_met=(oi / di >= 1.5) if oi and di else None,
            train_images_per_s=ot, train_best_mode=otm, infer_images_per_s=oi, infer_best_mode=oim,
            infer_best_option=(SAMPLING_OPTION_NAME if oim in EXPERIMENT_MODES else None),
            diffusers_best_train_images_per_s=dt, diffusers_best_train_mode=dtm,
            diffusers_best_infer_images_per_s=di, diffusers_best_infer_mode=dim,
            train_ratio_vs_diffusers=ratio(ot, dt), infer_ratio_vs_diffusers=ratio(oi, di),
            diffusers_best_train_images_per_s_ddpm_step=dl, diffusers_best_train_mode_ddpm_step=dlm,
            train_ratio_vs_diffusers_ddpm_step=ratio(ot, dl),
            conv_floor_train_images_per_s=cf.get("train_images_per_s"),
            conv_floor_infer_images_per_s=cf.get("infer_images_per_s"),
            conv_floor_train_ratio_vs_diffusers=ratio(cf.get("train_images_per_s"), dt),
            conv_floor_infer_ratio_vs_diffusers=ratio(cf.get("infer_images_per_s"), di),
            projected_50k_samples_ddpm1000_s=proj(oi, DDPM_STEPS), projected_50k_samples_ddim50_s=proj(oi, DDIM_STEPS),
            diffusers_projected_50k_samples_ddpm1000_s=proj(di, DDPM_STEPS),
            diffusers_projected_50k_samples_ddim50_s=proj(di, DDIM_STEPS),
        )

    def write_json(self, final: bool = False) -> Optional[Path]:
        with self.lock:
            out = dict(self.results)
            out.update(self.summary())
            out["modes"] = [dict(v) for v in self.rows.values()]
            kmod = sys.modules.get("ddpm_lib.kernels")
            if kmod is not None and kmod.tuned():  # the GroupNorm kernel's tiles, timed on this card
                out["gn_tuned"] = kmod.tuned()
            out["elapsed_s"] = round(time.perf_counter() - T0, 1)
            out["complete"] = bool(final)
            path = self.json_path()
            try:
                path.parent.mkdir(parents=True, exist_ok=True)
                tmp = path.with_suffix(".json.tmp")
                tmp.write_text(json.dumps(out, indent=1, default=str) + "\n")
                os.replace(tmp, path)
            except OSError as exc:
                log(f"could not write {path}: {exc}")
                return None
            return path

    def json_path(self) -> Path:
        if self.args.json_path:
            return Path(self.args.json_path)
        card = self.results.get("card", "unknown")
        name = card if self.args.size == "full" else f"{card}-{self.args.size}"
        return Path(self.args.out) / f"{name}.json"

    def table(self) -> str:
        s = self.summary()
        fl = self.results.get("forward_gflop_per_image")
        peak = self.results.get("matmul_peak_tflops")
        lines = []

        def f(v, fmt="{:,.0f}"):
            return fmt.format(v) if v else "-"

        def tf(rate, mult):
            if not (rate and fl):
                return "-"
            v = rate * mult * fl / 1e3
            return f"{v:.3g} ({100 * v / peak:.0f}%)" if peak else f"{v:.3g}"

        def x(a, b):
            return f"{a / b:.2f}" if a and b else "-"

        hdr = (f"{'network':<10} {'mode':<27} {'train img/s':>11} {'TFLOP/s':>11} {'x diff':>6} "
               f"{'infer img/s':>11} {'TFLOP/s':>11} {'x diff':>6} {'compile s tr/inf':>16}")
        lines.append(hdr)
        lines.append("-" * len(hdr))
        for k in sorted(self.rows, key=lambda k: (self.rows[k]["network"] != "ours", k)):
            r = self.rows[k]
            tr, inf = r.get("train_images_per_s"), r.get("infer_images_per_s")
            mode = r["mode"] + ("*" if (r["network"] == "diffusers" and r["mode"] not in BASELINE_MODES)
                                or r.get("experiment") else "")
            comp = f"{r.get('train_compile_s', '-')}/{r.get('infer_compile_s', '-')}"
            lines.append(f"{r['network']:<10} {mode:<27} {f(tr):>11} {tf(tr, 3):>11} "
                         f"{x(tr, s['diffusers_best_train_images_per_s']):>6} {f(inf):>11} {tf(inf, 1):>11} "
                         f"{x(inf, s['diffusers_best_infer_images_per_s']):>6} {comp:>16}")
            for what in ("train_error", "infer_error"):
                if r.get(what):
                    lines.append(f"{'':<10} {what}: {r[what][:150]}")
        lines.append("* information only: not among the modes the diffusers baseline is taken over (diffusers), an "
                     "experiment not counted as ddpm_lib's best except *_fold's checked inference, the option "
                     f"{SAMPLING_OPTION_NAME} (ddpm_lib, *_tgn: Triton GroupNorm+SiLU kernel, *_sp: "
                     "sub-pixel upsampling, *_pad: 3 channels padded to 8, *_all: the three, *_fold: the three with the "
                     "residual sums, biases and interleaving folded into the GroupNorms, *_gnm: GroupNorm "
                     "from moments); "
                     "x diff = ratio to diffusers' best of fp32, bf16_cl, bf16_cl_compile (training: in the plain "
                     "PyTorch step; +ddpm_step: diffusers' network in ddpm_lib's step)")
        if fl:
            lines.append(f"FLOPs: forward {fl:.2f} GFLOP/image (2 per multiply-add: convolutions, matrix products, "
                         f"attention), training = 3x forward; matmul peak {peak} TFLOP/s "
                         f"({self.results.get('matmul_peak_note', '')})")
        lines.append(f"ddpm_lib best: train {f(s['train_images_per_s'])} img/s ({s['train_best_mode']}), "
                     f"infer {f(s['infer_images_per_s'])} img/s ({s['infer_best_mode']})")
        lines.append(f"diffusers best: train {f(s['diffusers_best_train_images_per_s'])} img/s "
                     f"({s['diffusers_best_train_mode']}), infer {f(s['diffusers_best_infer_images_per_s'])} img/s "
                     f"({s['diffusers_best_infer_mode']})")
        lines.append(f"ratio vs diffusers: train {s['train_ratio_vs_diffusers']}x (target 2.0), "
                     f"infer {s['infer_ratio_vs_diffusers']}x (target 1.5)")
        if s["diffusers_best_train_images_per_s_ddpm_step"]:
            lines.append(f"networks alone (diffusers' network in ddpm_lib's step, best "
                         f"{f(s['diffusers_best_train_images_per_s_ddpm_step'])} img/s, "
                         f"{s['diffusers_best_train_mode_ddpm_step']}): train {s['train_ratio_vs_diffusers_ddpm_step']}x")
        lines += [profile_line(pk, pr) for pk, pr in (self.results.get("profiles") or {}).items()]
        if s["conv_floor_train_images_per_s"]:
            lines.append(f"convolution floor (every conv alone, summed; all else free): train "
                         f"{f(s['conv_floor_train_images_per_s'])} img/s ({s['conv_floor_train_ratio_vs_diffusers']}x "
                         f"diffusers' best), infer {f(s['conv_floor_infer_images_per_s'])} img/s "
                         f"({s['conv_floor_infer_ratio_vs_diffusers']}x)")
        for what in ("train", "infer"):
            if s[f"diffusers_baseline_missing_{what}"]:
                lines.append(f"WARNING: diffusers' {what} baseline lacks {s[f'diffusers_baseline_missing_{what}']}: "
                             f"the {what} ratio is not yet the one the issue asks for")
        if s["projected_50k_samples_ddpm1000_s"]:
            def hm(sec):
                return f"{sec / 60:.1f} min" if sec < 3600 else f"{sec / 3600:.2f} h"
            lines.append(f"projected {NUM_SAMPLES:,} samples (network forwards at batch "
                         f"{self.size['infer_batch']}, from the best inference rate): "
                         f"DDPM-{DDPM_STEPS} {hm(s['projected_50k_samples_ddpm1000_s'])}, "
                         f"DDIM-{DDIM_STEPS} {hm(s['projected_50k_samples_ddim50_s'])}"
                         + (f"; diffusers: {hm(s['diffusers_projected_50k_samples_ddpm1000_s'])}, "
                            f"{hm(s['diffusers_projected_50k_samples_ddim50_s'])}"
                            if s["diffusers_projected_50k_samples_ddpm1000_s"] else ""))
        return "\n".join(lines)

    # ------------------------------------------------------------------ set-up
    def device_info(self) -> None:
        r = self.results
        r["size"] = self.args.size
        r["date_utc"] = time.strftime("%Y-%m-%d %H:%M", time.gmtime())
        r["torch"] = torch.__version__
        r["python"] = platform.python_version()
        r["cpu_count"] = os.cpu_count()
        r["compile_threads"] = os.environ.get("TORCHINDUCTOR_COMPILE_THREADS")
        try:
            import triton

            r["triton"] = triton.__version__
        except Exception:  # noqa: BLE001
            r["triton"] = None
        if self.cuda:
            props = torch.cuda.get_device_properties(self.device)
            r["device_name"] = props.name
            r["card"] = _slug(props.name)
            r["capability"] = f"{props.major}.{props.minor}"
            r["multiprocessors"] = props.multi_processor_count
            r["memory_gib"] = round(props.total_memory / 2**30, 1)
            r["cuda"] = torch.version.cuda
            r["cudnn"] = torch.backends.cudnn.version()
            try:
                import subprocess

                q = subprocess.run(["nvidia-smi", "--query-gpu=driver_version,clocks.max.sm,power.limit",
                                    "--format=csv,noheader"], capture_output=True, text=True, timeout=10)
                r["nvidia_smi"] = q.stdout.strip() or None
            except Exception:  # noqa: BLE001
                r["nvidia_smi"] = None
        else:
            r["device_name"] = platform.processor() or "cpu"
            r["card"] = "cpu"
        # What "fp32" means here: PyTorch's defaults, set explicitly.
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True
        r["settings"] = dict(
            fp32_matmul_allow_tf32=torch.backends.cuda.matmul.allow_tf32,
            fp32_cudnn_allow_tf32=torch.backends.cudnn.allow_tf32,
            cudnn_benchmark=True,
            train_batch=self.size["train_batch"], infer_batch=self.size["infer_batch"], image=self.size["image"],
            data_on_device=self.size["data_n"], optimizer="Adam lr 2e-4 betas (0.9, 0.999) eps 1e-8: fused on CUDA in ddpm_lib's step, "
                      "PyTorch's default implementation in the plain step (diffusers' baseline)",
            diffusers_baseline_step="PlainStep: torch.optim.Adam (default implementation), clip_grad_norm_ "
                                    "(defaults), diffusers EMAModel; data, t and noise on the device, no host "
                                    "synchronisation; rows <mode>+ddpm_step run diffusers' network in ddpm_lib's step",
            grad_clip=1.0, ema_decay=0.9999, dropout=0.1, loss="L_simple (eps MSE), T=1000 linear schedule",
            compile_backend=self.compile_backend(),
            timing=f"median of {self.size['reps']} repetitions of >= {self.size['min_rep_s']} s after "
                   f"{self.size['warmup']} warm-up calls (CUDA events on a GPU)",
        )
        r["command"] = " ".join(["python", "benchmarks/throughput.py"] + list(self.args.argv))
        log(f"device {r['device_name']} | torch {r['torch']} | CUDA {r.get('cuda')} | cuDNN {r.get('cudnn')} | "
            f"triton {r['triton']} | compile threads {r['compile_threads']}")
        log("fp32 modes: matmul allow_tf32=False, cudnn allow_tf32=True (PyTorch defaults); cudnn.benchmark=True")

    def compile_backend(self) -> str:
        if self.args.compile_backend:
            return self.args.compile_backend
        return "inductor" if self.cuda else "eager"

    def warm_compile_pool(self) -> None:
        if not self.cuda or self.compile_backend() != "inductor":
            return
        try:
            from torch._inductor.async_compile import AsyncCompile

            AsyncCompile.warm_pool()
        except Exception as exc:  # noqa: BLE001
            log(f"(compile pool warm-up skipped: {type(exc).__name__})")

    def matmul_peak(self) -> None:
        n = self.size["peak_n"]
        dtype = torch.bfloat16 if self.cuda else torch.float32
        a = torch.randn(n, n, device=self.device, dtype=dtype)
        b = torch.randn(n, n, device=self.device, dtype=dtype)
        m = self.timer.measure(lambda i: a @ b, warmup=3, reps=5, min_rep_s=0.1 if self.cuda else 0.05,
                               time_left=self.time_left)
        tflops = 2 * n**3 / m["s_per_call"] / 1e12
        self.results["matmul_peak_tflops"] = round(tflops, 1) if tflops > 10 else round(tflops, 4)
        self.results["matmul_peak_note"] = f"{'bf16' if self.cuda else 'fp32'} {n}^3 on random data"
        log(f"matmul peak: {tflops:.3g} TFLOP/s ({self.results['matmul_peak_note']})")
        del a, b

    def try_profile(self, key: str, kind: str, fn: Callable[[int], Any], m: Dict[str, Any]) -> None:
        try:
            self.profile(key, kind, fn, m)
        except Exception as exc:  # noqa: BLE001 - a diagnosis, not a measurement
            self.results.setdefault("profiles", {})[f"{key} {kind}"] = dict(error=f"{type(exc).__name__}: {exc}"[:300])
            log(f"profile {key} {kind} FAILED: {type(exc).__name__}: {str(exc)[:200]}")

    def profile(self, key: str, kind: str, fn: Callable[[int], Any], m: Dict[str, Any]) -> None:
        """Where the time of ``fn`` goes: ``--profile-steps`` calls under ``torch.profiler``, every GPU kernel's
        time summed by :func:`kernel_category` (on the CPU: the ``aten::`` operators' self time), per call.

        The profiled calls run slower on the host than the timed ones; the device time of the kernels does
        not change, so ``device_busy_fraction`` (kernel time over the time measured without the profiler) shows
        how much of a step the GPU spends waiting for the host."""
        steps = self.args.profile_steps
        if steps <= 0 or self.time_left() < 20:
            return
        from torch.profiler import ProfilerActivity, profile

        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if self.cuda else [])
        self.timer.sync()
        with profile(activities=acts) as prof:
            for i in range(steps):
                fn(10_000 + i)
            self.timer.sync()
        total: Dict[str, float] = {}
        count: Dict[str, int] = {}
        for e in prof.events():
            if self.cuda:
                if not str(e.device_type).endswith("CUDA"):
                    continue
                us = float(e.time_range.elapsed_us())
            else:
                if not e.name.startswith("aten::"):
                    continue
                us = float(e.self_cpu_time_total)
            total[e.name] = total.get(e.name, 0.0) + us
            count[e.name] = count.get(e.name, 0) + 1
        if not total:
            raise RuntimeError("the profiler saw no " + ("CUDA kernels (is CUPTI available?)" if self.cuda
                                                         else "aten operators"))
        cats = {c: 0.0 for c in PROFILE_CATEGORIES}
        for name, us in total.items():
            cats[kernel_category(name)] += us / 1e3 / steps
        busy = sum(total.values()) / 1e3 / steps
        measured = m["s_per_call"] * 1e3
        top = sorted(total, key=total.get, reverse=True)[:25]
        res = dict(
            kind=kind, steps=steps, what="CUDA kernels" if self.cuda else "aten operators (self CPU time)",
            measured_ms_per_call=round(measured, 3), busy_ms_per_call=round(busy, 3),
            device_busy_fraction=round(busy / measured, 3) if measured > 0 else None,
            kernels_per_call=round(sum(count.values()) / steps, 1),
            categories_ms_per_call={c: round(v, 3) for c, v in cats.items() if v > 0},
            top=[dict(name=n[:100], category=kernel_category(n), ms_per_call=round(total[n] / 1e3 / steps, 3),
                      calls_per_call=round(count[n] / steps, 2)) for n in top])
        self.results.setdefault("profiles", {})[f"{key} {kind}"] = res
        log(profile_line(f"{key} {kind}", res))
        self.write_json()

    def conv_floor(self, shapes: List[Dict[str, Any]]) -> None:
        """Time every convolution of the network on its own and add them up: a practical floor.

        Each distinct ``nn.Conv2d`` (``shapes``, from :func:`conv_shapes`) runs alone as the fast paths run it
        (bf16 and channels_last on CUDA, cuDNN with ``benchmark=True``; float32 on the CPU): its forward at the
        inference batch, and its forward and backward (weight and, but for the first layer, input gradients)
        at the training batch. Two things keep it a floor (the first GPU run, 2026-11-27, had neither: its sums,
        20.9 ms per training step and 26.3 ms per inference batch, were far above the 7.9 and 16.4 ms of
        convolution kernels in the profiles of the compiled network): on CUDA each timing replays a CUDA graph
        of its own, since timed eagerly the small layers measure the host's launch and autograd time rather
        than the GPU's; and the convolutions run without their bias, which PyTorch adds to a cuDNN convolution
        in a kernel of its own (a whole pass over the output) and a compiled network folds into the next
        element-wise kernel. The sum over the network's layers is the time any implementation
        of this network spends if its convolutions run as fast as cuDNN runs them alone and everything else
        (bias, GroupNorm, SiLU, attention, the optimizer) takes no time: the rates it gives are the most that
        network can reach with these convolutions, and their ratio to diffusers' best is the most ratio there
        is to win without faster convolution kernels."""
        dtype = torch.bfloat16 if self.cuda else torch.float32
        fmt = torch.channels_last if self.cuda else torch.contiguous_format
        Bt, Bi = self.size["train_batch"], self.size["infer_batch"]
        min_rep = 0.02 if self.cuda else 0.0
        layers, train_s, infer_s, graphed = [], 0.0, 0.0, 0
        for s in shapes:
            conv = nn.Conv2d(s["in_ch"], s["out_ch"], s["kernel"], stride=s["stride"], padding=s["padding"],
                             dilation=s["dilation"], groups=s["groups"], bias=False)
            conv = conv.to(self.device, dtype).to(memory_format=fmt)

            def inp(B: int, grad: bool) -> torch.Tensor:
                x = torch.randn(B, s["in_ch"], *s["in_hw"], device=self.device, dtype=dtype)
                return x.contiguous(memory_format=fmt).requires_grad_(grad)

            xi = inp(Bi, False)

            def fwd(i, conv=conv, xi=xi):
                with torch.no_grad():
                    return conv(xi)

            f, ok_i = self._graphed(fwd)
            mi = self.timer.measure(f, warmup=3, reps=3, min_rep_s=min_rep, time_left=self.time_left)
            del xi, f, fwd
            xt = inp(Bt, s["in_ch"] != 3)  # the first layer's input is the data: no gradient
            gy = torch.randn_like(conv(xt))
            wrt = [p for p in conv.parameters()] + ([xt] if xt.requires_grad else [])
            f, ok_t = self._graphed(lambda i: torch.autograd.grad(conv(xt), wrt, gy))
            mt = self.timer.measure(f, warmup=3, reps=3, min_rep_s=min_rep, time_left=self.time_left)
            graphed += int(ok_i) + int(ok_t)
            del xt, gy, wrt, conv, f
            flop = 2.0 * s["out_ch"] * (s["in_ch"] // s["groups"]) * s["kernel"][0] * s["kernel"][1] \
                * s["out_hw"][0] * s["out_hw"][1]  # per image, forward
            ti, tt = mi["s_per_call"], mt["s_per_call"]
            infer_s += s["count"] * ti
            train_s += s["count"] * tt
            layers.append(dict(s, infer_ms=round(ti * 1e3, 4), train_ms=round(tt * 1e3, 4),
                               infer_tflops=round(flop * Bi / ti / 1e12, 3),
                               train_tflops=round(3 * flop * Bt / tt / 1e12, 3)))
        how = ""
        if self.cuda:
            how = (", each replayed from a CUDA graph" if graphed == 2 * len(shapes)
                   else f", {graphed} of {2 * len(shapes)} timings replayed from CUDA graphs")
        self.results["conv_floor"] = dict(
            train_images_per_s=round(Bt / train_s, 1), infer_images_per_s=round(Bi / infer_s, 1),
            train_ms_per_step=round(train_s * 1e3, 3), infer_ms_per_batch=round(infer_s * 1e3, 3),
            convolutions=sum(s["count"] for s in shapes), distinct=len(shapes), layers=layers, bias=False,
            cuda_graphs=f"{graphed} of {2 * len(shapes)} timings",
            note=(f"{'bf16, channels_last, cuDNN' if self.cuda else 'float32'}, without the bias{how}; "
                  f"forward at batch {Bi}, forward + backward at batch {Bt}"))
        log(f"convolution floor ({self.results['conv_floor']['convolutions']} convolutions, {len(shapes)} distinct): "
            f"train {Bt / train_s:,.0f} img/s ({train_s * 1e3:.2f} ms/step), infer {Bi / infer_s:,.0f} img/s "
            f"({infer_s * 1e3:.2f} ms/batch)")
        self.release(reset_dynamo=False)

    def gn_kernels(self, shapes: List[Dict[str, Any]], with_inductor: bool = True) -> None:
        """The Triton GroupNorm+SiLU kernel (``ddpm_lib.kernels``) alone against PyTorch's and (``with_inductor``)
        inductor's, for each GroupNorm shape of the network at the inference batch: bf16, ``channels_last``, with
        the per-(sample, channel) addend and SiLU (the residual block's second GroupNorm), each timing replayed
        from a CUDA graph where one can be captured (``<name>_graphed``). ``GB/s`` counts one read and one write
        of the activation, the least any GroupNorm can move. ``network_ms`` sums, with their counts, the shapes
        that every implementation ran (``shapes_in_sums``). Runs on CUDA, or on a CPU under Triton's
        interpreter (for the tests)."""
        from ddpm_lib import kernels

        ok, why = kernels.available(self.device)
        if not ok:
            self.results["gn_kernels"] = dict(error=f"not run: {why}")
            return
        B = self.size["infer_batch"]
        names = ["triton"] + (["triton_rule"] if self.cuda else []) + ["eager"] + (["inductor"] if with_inductor else [])
        rows: List[Dict[str, Any]] = []
        for s in shapes:
            C, G, (H, W) = s["channels"], s["groups"], s["hw"]
            r = dict(s)
            rows.append(r)
            if self.time_left() < 20:
                r["error"] = f"skipped: {self.time_left():.0f} s left"
                continue
            if not kernels.supported(torch.empty(1, C, H, W, device=self.device, dtype=torch.bfloat16), G):
                r["error"] = "the kernel does not apply"
                continue
            x = torch.randn(B, C, H, W, device=self.device, dtype=torch.bfloat16).contiguous(
                memory_format=torch.channels_last)
            w, b = torch.randn(C, device=self.device), torch.randn(C, device=self.device)
            add = torch.randn(B, C, device=self.device)

            def ref(x, add, G=G, w=w, b=b):
                return torch.nn.functional.silu(torch.nn.functional.group_norm(
                    x + add[:, :, None, None].to(x.dtype), G, w, b, 1e-6))

            rule = kernels.tile_for(H * W, C, G)
            fns = {"triton": lambda i: kernels.group_norm_act(x, G, w, b, 1e-6, add, act=True)}
            if self.cuda:  # the tile of kernels.tile_for's rule, against the one the first call timed fastest
                fns["triton_rule"] = lambda i: kernels._launch(x, w, b, add, G, 1e-6, True, tile=rule)
            fns["eager"] = lambda i: ref(x, add)
            if with_inductor:
                try:
                    comp = torch.compile(ref, dynamic=False)
                    with torch.no_grad():
                        comp(x, add)
                    fns["inductor"] = lambda i: comp(x, add)
                except Exception as exc:  # noqa: BLE001
                    r["inductor_error"] = f"{type(exc).__name__}: {str(exc)[:200]}"
            with torch.no_grad():
                for name, fn in fns.items():
                    f, graphed = self._graphed(fn)
                    m = self.timer.measure(f, warmup=3, reps=3, min_rep_s=0.02 if self.cuda else 0.0,
                                           time_left=self.time_left)
                    t = m["s_per_call"]
                    r[f"{name}_ms"] = round(t * 1e3, 4)
                    r[f"{name}_gb_per_s"] = round(2 * x.numel() * x.element_size() / t / 1e9, 1)
                    r[f"{name}_graphed"] = graphed
                    del f
                err = (kernels.group_norm_act(x, G, w, b, 1e-6, add, act=True).float()
                       - ref(x.float(), add)).abs().max()
            r["triton_max_abs_err_vs_fp32"] = float(err)
            r["triton_tile_rule"] = list(rule)
            chosen = [e for e in kernels.tuned() if e["shape"] == list(x.shape) and e["strides"] == list(x.stride())
                      and e["dtype"] == "bfloat16" and e["options"]["add"] and e["options"]["act"]
                      and not (e["options"]["res"] or e["options"]["x2"] or e["options"]["return_input"])]
            if chosen:  # the tile the autotuner chose, and every candidate's time
                r["triton_tile"], r["triton_tile_candidates"], r["triton_tile_ms"] = \
                    chosen[-1]["tile"], chosen[-1]["candidates"], chosen[-1]["ms"]
            del x, add, fns
            torch._dynamo.reset()
        full = [r for r in rows if all(f"{n}_ms" in r for n in names)]
        tot = {n: round(sum(r["count"] * r[f"{n}_ms"] for r in full), 3) for n in names}
        self.results["gn_kernels"] = dict(
            batch=B, layers=rows, network_ms=tot, shapes_in_sums=len(full), shapes=len(rows),
            note="bf16 channels_last, GroupNorm(x + add) + SiLU; network_ms: the sum over the network's GroupNorms "
                 "with their counts (all timed with the addend and SiLU), over the shapes every implementation ran; "
                 "triton: the tile the autotuner chose (triton_tile, of triton_tile_candidates timed as "
                 "triton_tile_ms), triton_rule: kernels.tile_for's tile (triton_tile_rule)")
        log(f"GroupNorm+SiLU alone over the network's GroupNorms at batch {B} ({len(full)} of {len(rows)} shapes): "
            + ", ".join(f"{k} {v:.2f} ms" for k, v in tot.items()))
        self.release(reset_dynamo=True)

    def _graphed(self, fn: Callable[[int], Any]):
        """``(replay, True)``: ``fn`` captured in a CUDA graph (after three warm-up calls on a side stream, where
        cuDNN's autotuning happens), or ``(fn, False)`` on a CPU or when the capture fails."""
        if not self.cuda:
            return fn, False
        try:
            side = torch.cuda.Stream(self.device)
            side.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(side):
                for i in range(3):
                    fn(i)
            torch.cuda.current_stream(self.device).wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                keep = fn(0)  # the outputs live in the graph's pool
            return (lambda i, graph=graph, keep=keep: graph.replay()), True
        except Exception as exc:  # noqa: BLE001 - time it eagerly instead
            log(f"convolution floor: CUDA graph capture failed ({type(exc).__name__}: {str(exc)[:120]}); eager")
            torch.cuda.synchronize(self.device)
            return fn, False

    # ------------------------------------------------------------------ data
    def make_data(self) -> None:
        g = torch.Generator().manual_seed(0)
        n, s = self.size["data_n"], self.size["image"]
        low = torch.rand(n, 3, max(2, s // 8), max(2, s // 8), generator=g) * 2 - 1  # smooth images in [-1, 1]
        data = torch.nn.functional.interpolate(low, size=(s, s), mode="bilinear", align_corners=False)
        data = (data + 0.05 * torch.randn(data.shape, generator=g)).clamp(-1, 1)
        self.data = data.to(self.device)
        B = self.size["infer_batch"]
        self.infer_inputs = [(torch.randn(B, 3, s, s, generator=g).to(self.device),
                              torch.randint(0, 1000, (B,), generator=g).to(self.device)) for _ in range(3)]

    # ------------------------------------------------------------------ one mode
    def settings_for(self, mode: str) -> Dict[str, Any]:
        comp = mode.startswith("bf16_cl_compile") or mode.startswith("fast")
        exp = mode.rsplit("_", 1)[-1] if mode in EXPERIMENT_MODES else ""
        st = dict(bf16=mode != "fp32", channels_last=mode != "fp32", compile=comp, group_norm=None, upsample=None,
                  pad_channels=None, residual_fold=None)
        st.update(EXPERIMENT_SETTINGS.get(exp, {}))
        return st

    def release(self, reset_dynamo: bool) -> None:
        gc.collect()
        if self.cuda:
            torch.cuda.synchronize(self.device)
            torch.cuda.empty_cache()
        if reset_dynamo:
            try:
                torch._dynamo.reset()
            except Exception:  # noqa: BLE001
                pass

    def prepare(self, master: nn.Module, mode: str, train: bool) -> accel.FastModel:
        st = self.settings_for(mode)
        model = copy.deepcopy(master)
        model.train(train)
        return accel.prepare_model(model, self.device, bf16=st["bf16"], channels_last=st["channels_last"],
                                   compile=st["compile"], compile_backend=self.compile_backend(),
                                   group_norm=st["group_norm"], upsample=st["upsample"],
                                   pad_channels=st["pad_channels"], residual_fold=st["residual_fold"])

    def train_group(self, net: str, master: nn.Module, mode: str, graph_key: Optional[str]) -> None:
        """Time the training step of ``net`` in ``mode``; with ``graph_key``, also the same step in a CUDA graph."""
        key = f"{net}:{mode}"
        row = self.row(key)
        B = self.size["train_batch"]
        fast = self.prepare(master, mode, train=True)
        compiled = fast.compiled
        opt = accel.make_optimizer(fast.module.parameters(), capturable=self.cuda and compiled)
        ema = EMA(fast.module, 0.9999)
        data_gen = torch.Generator(device=self.device).manual_seed(1)
        N = self.data.shape[0]

        def batch():
            return self.data[torch.randint(0, N, (B,), device=self.device, generator=data_gen)]

        gen_c = torch.Generator(device=self.device).manual_seed(123)
        step = accel.make_train_step(fast, self.diffusion, opt, ema, cuda_graph=False, generator=gen_c)
        first = self.timer.wall(lambda: step(batch()))
        if compiled:
            row["train_compile_s"] = round(first, 1)
            self.compile_s[f"{net}:train"] = first
            log(f"{key} train: first step (compile) {first:.1f} s; compiled={fast.compiled}"
                + (f" ({fast.compile_error})" if fast.compile_error else ""))
        m = self.timer.measure(lambda i: step(batch()), warmup=self.size["warmup"], reps=self.size["reps"],
                               min_rep_s=self.size["min_rep_s"], time_left=self.time_left)
        if net == "diffusers":
            # ddpm_lib's step around diffusers' network (information: the networks alone), then the baseline:
            # the same compiled network in a plain PyTorch step
            lrow = self.row(f"{key}+ddpm_step")
            if "train_compile_s" in row:
                lrow["train_compile_s"] = row["train_compile_s"]
            self.record_train(lrow, m, fast, note="diffusers' network in ddpm_lib's training step "
                                                  "(accel.make_train_step: fused Adam, foreach clip and EMA)")
            plain = PlainStep(fast, self.diffusion, torch.Generator(device=self.device).manual_seed(5))
            self.timer.wall(lambda: plain(batch()))  # the optimizer's and the EMA's state
            mp = self.timer.measure(lambda i: plain(batch()), warmup=self.size["warmup"], reps=self.size["reps"],
                                    min_rep_s=self.size["min_rep_s"], time_left=self.time_left)
            self.record_train(row, mp, fast, note=plain.note)
            if mode == "bf16_cl_compile":
                self.try_profile(key, "train", lambda i: plain(batch()), mp)
            del plain
        else:
            self.record_train(row, m, fast)
            if mode.startswith("bf16_cl_compile"):
                self.try_profile(key, "train", lambda i: step(batch()), m)
        if graph_key:
            grow = self.row(graph_key)
            try:
                if not self.cuda:
                    raise RuntimeError("CUDA graphs need a CUDA device (the CPU run times the compiled step)")
                if net != "ours" and self.time_left() < 120:
                    raise RuntimeError(f"skipped (information only): {self.time_left():.0f} s left")
                # t and the noise from a generator of our own (as the trainer's), so that the loss-curve check
                # at the end can replay this very graph from a known seed; without it if that fails
                gen = torch.Generator(device=self.device).manual_seed(123)
                gstep = accel.make_train_step(fast, self.diffusion, opt, ema, cuda_graph=True, generator=gen,
                                              warmup_calls=1)
                t_cap = self.timer.wall(lambda: [gstep(batch()) for _ in range(2)])
                if not gstep.graphed:
                    log(f"{graph_key}: capture with a registered generator failed ({gstep.graph_error}); "
                        "capturing with the default generator")
                    gen = None
                    gstep = accel.make_train_step(fast, self.diffusion, opt, ema, cuda_graph=True, warmup_calls=1)
                    t_cap = self.timer.wall(lambda: [gstep(batch()) for _ in range(2)])
                if not gstep.graphed:
                    raise RuntimeError(f"capture failed: {gstep.graph_error}")
                grow["train_compile_s"] = row.get("train_compile_s")
                grow["train_capture_s"] = round(t_cap, 2)
                mg = self.timer.measure(lambda i: gstep(batch()), warmup=2, reps=self.size["reps"],
                                        min_rep_s=self.size["min_rep_s"], time_left=self.time_left)
                self.record_train(grow, mg, fast, note="whole step (forward, backward, clip, Adam, EMA) "
                                                       "replayed from one CUDA graph")
                if net == "ours" and gen is not None and mode not in EXPERIMENT_MODES:
                    self.maybe_loss_check(master, fast, opt, ema, gstep, gen)
                del gstep
            except Exception as exc:  # noqa: BLE001
                if not self.cuda and net == "ours":
                    # the CPU run: the fast path is the compiled step without a graph
                    grow.update({k: v for k, v in row.items() if k.startswith("train")})
                    grow["train_note"] = "CPU: compiled step without CUDA graph"
                    if mode not in EXPERIMENT_MODES:  # the check is the fast path's, not an experiment's
                        self.maybe_loss_check(master, fast, opt, ema, step, gen_c)
                else:
                    grow["train_error"] = f"{type(exc).__name__}: {exc}"
                    log(f"{graph_key} train FAILED: {grow['train_error'][:300]}")
        del step, fast, opt, ema
        self.release(reset_dynamo=False)

    def trainer_group(self, master: nn.Module, mode: str) -> None:
        """Time :class:`ddpm_lib.Trainer` itself (:data:`TRAINER_MODES`): with its defaults on this device
        (``trainer``; on CUDA compiled and replayed from one CUDA graph), with the graph alone
        (``trainer_graph``) and with neither (``trainer_eager``): the rate a user of the library gets, including
        the trainer's own loop (warm-up schedule, logging every ``log_every`` steps, its non-finite check)."""
        from ddpm_lib.trainer import Trainer

        key = f"ours:{mode}"
        row = self.row(key)
        B = self.size["train_batch"]
        tr = Trainer(copy.deepcopy(master).train(), self.diffusion, self.data, device=self.device, batch_size=B,
                     progress=False, sample_every=0, save_every=0, **TRAINER_MODES[mode])
        # compile, cuDNN autotuning, Adam state; with a CUDA graph: three eager steps, then the capture
        first = self.timer.wall(lambda: tr.train(steps=tr.step + 5))
        if tr.compiled:
            row["train_compile_s"] = round(first, 1)
        est = self.timer.wall(lambda: tr.train(steps=tr.step + 5)) / 5
        k = max(5, int(math.ceil(max(self.size["min_rep_s"], 0.05) / max(est, 1e-6))))
        if self.cuda:  # whole logging periods (k consecutive steps hold k / log_every logs), three of them
            k = int(math.ceil(k / tr.cfg.log_every)) * tr.cfg.log_every
            reps = 3
        else:
            reps = self.size["reps"]
        times = [self.timer.wall(lambda: tr.train(steps=tr.step + k)) / k for _ in range(reps)]
        med = statistics.median(times)
        m = dict(s_per_call=med, calls_per_rep=k, reps=reps, spread=(max(times) - min(times)) / med)
        settings = SimpleNamespace(compiled=tr.compiled, bf16=tr.use_bf16, channels_last=tr.use_channels_last,
                                   compile_error=None)
        graphed = bool(tr._step_fn is not None and tr._step_fn.graphed)
        opts = ", ".join(f"{k}={v}" for k, v in TRAINER_MODES[mode].items()) or "defaults"
        why = f" ({tr._step_fn.graph_error})" if tr._step_fn is not None and tr._step_fn.graph_error else ""
        row.update(trainer_options=opts, train_cuda_graph=graphed, train_cuda_graph_requested=bool(tr.use_cuda_graph))
        self.record_train(row, m, settings,
                          note=(f"ddpm_lib.Trainer ({opts}): "
                                f"bf16 {tr.use_bf16}, channels_last {tr.use_channels_last}, fused Adam {tr.fused}, "
                                f"compiled {tr.compiled}, CUDA graph {graphed}{why}; wall clock of train() over {k} "
                                f"steps, logging every {tr.cfg.log_every}"))
        del tr
        self.release(reset_dynamo=False)

    def record_train(self, row, m, fast, note: Optional[str] = None) -> None:
        B = self.size["train_batch"]
        rate = B / m["s_per_call"]
        row.update(train_images_per_s=round(rate, 1), train_ms_per_step=round(m["s_per_call"] * 1e3, 3),
                   train_spread=round(m["spread"], 4), train_calls_per_rep=m["calls_per_rep"], train_reps=m["reps"],
                   train_compiled=fast.compiled, bf16=fast.bf16, channels_last=fast.channels_last)
        if fast.compile_error:
            row["compile_error"] = fast.compile_error
        if note:
            row["train_note"] = note
        fl = self.results.get("forward_gflop_per_image")
        tf = f", {rate * 3 * fl / 1e3:.3g} TFLOP/s" if fl else ""
        log(f"{row['network']}:{row['mode']} train: {rate:,.0f} img/s ({m['s_per_call'] * 1e3:.2f} ms/step, "
            f"spread {m['spread'] * 100:.1f}%{tf})")
        self.write_json()

    def infer_group(self, net: str, master: nn.Module, mode: str, graph_key: Optional[str],
                    check: Optional[Dict[str, nn.Module]] = None) -> None:
        key = f"{net}:{mode}"
        row = self.row(key)
        fast = self.prepare(master, mode, train=False)
        compiled = fast.compiled
        fwd = accel.make_sampler_forward(fast, cuda_graph=False)
        xs = self.infer_inputs

        first = self.timer.wall(lambda: fwd(*xs[0]))
        if compiled:
            row["infer_compile_s"] = round(first, 1)
            self.compile_s[f"{net}:infer"] = first
            log(f"{key} infer: first call (compile) {first:.1f} s; compiled={fast.compiled}")
        m = self.timer.measure(lambda i: fwd(*xs[i % 3]), warmup=self.size["warmup"], reps=self.size["reps"],
                               min_rep_s=self.size["min_rep_s"], time_left=self.time_left)
        self.record_infer(row, m, fast)
        if mode.startswith("bf16_cl_compile"):
            self.try_profile(key, "infer", lambda i: fwd(*xs[i % 3]), m)
        if self.settings_for(mode)["group_norm"] == "triton":
            self.kernel_traffic(row, key, lambda: fwd(*xs[0]))
        best_fwd = fwd
        if graph_key:
            grow = self.row(graph_key)
            if self.cuda:
                try:
                    gfwd = accel.make_sampler_forward(fast, cuda_graph=True, warmup_calls=1)
                    t_cap = self.timer.wall(lambda: [gfwd(*xs[0]) for _ in range(2)])
                    if gfwd.graph_error or not gfwd._graphs:
                        raise RuntimeError(f"capture failed: {gfwd.graph_error}")
                    grow["infer_compile_s"] = row.get("infer_compile_s")
                    grow["infer_capture_s"] = round(t_cap, 2)
                    mg = self.timer.measure(lambda i: gfwd(*xs[i % 3]), warmup=2, reps=self.size["reps"],
                                            min_rep_s=self.size["min_rep_s"], time_left=self.time_left)
                    self.record_infer(grow, mg, fast, note="forward replayed from a CUDA graph")
                    best_fwd = gfwd
                except Exception as exc:  # noqa: BLE001
                    grow["infer_error"] = f"{type(exc).__name__}: {exc}"
                    log(f"{graph_key} infer FAILED: {grow['infer_error'][:300]}")
            else:
                grow.update({k: v for k, v in row.items() if k.startswith("infer")})
                grow["infer_note"] = "CPU: compiled forward without CUDA graph"
        if check is not None:
            if mode in EXPERIMENT_MODES:
                self.experiment_check(best_fwd, check["ours"], self.row(graph_key) if best_fwd is not fwd else row)
            else:
                self.same_function_check(best_fwd, check)
        del fwd, best_fwd, fast
        self.release(reset_dynamo=False)

    def kernel_traffic(self, row: Dict[str, Any], key: str, fn: Callable[[], Any]) -> None:
        """What the GroupNorm kernel of ``ddpm_lib.kernels`` moves in one call of ``fn`` (a forward pass; counted by
        ``kernels.count_traffic``), in ``row["gn_kernel_traffic"]``; with the time of its launches in the profile of
        ``key`` (``GroupNorm (ddpm_lib.kernels)``), their average bandwidth in TB/s."""
        from ddpm_lib import kernels

        try:
            with torch.no_grad(), kernels.count_traffic() as tr:
                fn()
            self.timer.sync()
        except Exception as exc:  # noqa: BLE001 - a diagnosis, not a measurement
            row["gn_kernel_traffic"] = dict(error=f"{type(exc).__name__}: {str(exc)[:200]}")
            return
        gb = (tr["bytes_read"] + tr["bytes_written"]) / 1e9
        by_call = {k: dict(v) for k, v in tr["by_call"].items()}
        for v in by_call.values():  # each call's bandwidth when the kernel ran alone (the autotuner's timing)
            if v.get("timed_ms") and v.get("timed_calls") == v["calls"]:
                v["timed_ms"] = float(f"{v['timed_ms']:.4g}")
                v["timed_tb_per_s"] = float(f"{(v['bytes_read'] + v['bytes_written']) / 1e9 / v['timed_ms']:.4g}")
        res = dict(calls_per_forward=tr["calls"], bytes_read=tr["bytes_read"], bytes_written=tr["bytes_written"],
                   gb=float(f"{gb:.4g}"), by_call=by_call,
                   note="each value the kernel loads or stores counted once (kernels.count_traffic); timed_ms: the "
                        "autotuner's time of each launch's tile, the kernel alone on the same tensors, back to back "
                        "(tensors smaller than the L2 cache are read from it)")
        if by_call and all("timed_tb_per_s" in v for v in by_call.values()):
            alone = sum(v["timed_ms"] for v in by_call.values())
            res.update(timed_kernel_ms=float(f"{alone:.4g}"), timed_tb_per_s=float(f"{gb / alone:.4g}"))
        prof = (self.results.get("profiles") or {}).get(f"{key} infer") or {}
        ms = (prof.get("categories_ms_per_call") or {}).get("GroupNorm (ddpm_lib.kernels)")
        if ms and tr["calls"]:  # (a CPU profile has no such category: aten operators)
            res.update(kernel_ms=ms, tb_per_s=float(f"{gb / ms:.4g}"))  # GB per ms is TB per s
        row["gn_kernel_traffic"] = res
        log(f"{key}: the GroupNorm kernel moves {gb:.3g} GB per forward in {tr['calls']} launches"
            + (f", {res['tb_per_s']:.3g} TB/s over its {ms:.3g} ms (profile)" if "tb_per_s" in res else "")
            + (f"; alone {res['timed_tb_per_s']:.3g} TB/s over {res['timed_kernel_ms']:.3g} ms (autotuner)"
               if "timed_tb_per_s" in res else ""))
        self.write_json()

    def record_infer(self, row, m, fast, note: Optional[str] = None) -> None:
        B = self.size["infer_batch"]
        rate = B / m["s_per_call"]
        row.update(infer_images_per_s=round(rate, 1), infer_ms_per_batch=round(m["s_per_call"] * 1e3, 3),
                   infer_spread=round(m["spread"], 4), infer_calls_per_rep=m["calls_per_rep"], infer_reps=m["reps"],
                   infer_compiled=fast.compiled, bf16=fast.bf16, channels_last=fast.channels_last)
        if note:
            row["infer_note"] = note
        fl = self.results.get("forward_gflop_per_image")
        tf = f", {rate * fl / 1e3:.3g} TFLOP/s" if fl else ""
        log(f"{row['network']}:{row['mode']} infer: {rate:,.0f} img/s ({m['s_per_call'] * 1e3:.2f} ms/batch, "
            f"spread {m['spread'] * 100:.1f}%{tf})")
        self.write_json()

    # ------------------------------------------------------------------ checks
    @torch.no_grad()
    def same_function_check(self, fast_fwd, nets: Dict[str, nn.Module]) -> None:
        """The fast path against float32 eager (TF32 off) on the same weights and inputs; ours against diffusers."""
        x, t = self.infer_inputs[0]
        res: Dict[str, Any] = {}
        # the fast forward first: switching TF32 (for the references) would make dynamo recompile it
        out_fast = fast_fwd(x, t)[: min(256, x.shape[0])].float()
        refs = {name: self.fp32_reference(name, master) for name, master in nets.items()}

        def rel(a, b):
            return float((a - b).norm() / b.norm())

        res["fast_vs_fp32_rel_err"] = rel(out_fast, refs["ours"])
        res["fast_output_finite"] = bool(torch.isfinite(out_fast).all())
        if "diffusers" in refs:
            res["ours_fp32_vs_diffusers_fp32_rel_err"] = rel(refs["ours"], refs["diffusers"])
        res["tolerance"] = "bf16: rel err < 2e-2; same function (fp32): < 1e-4"
        res["ok"] = (res["fast_output_finite"] and res["fast_vs_fp32_rel_err"] < 2e-2
                     and res.get("ours_fp32_vs_diffusers_fp32_rel_err", 0.0) < 1e-4)
        self.results["correctness"] = res
        log("correctness: fast path vs fp32 eager rel err {:.2e}; ours vs diffusers (fp32) {}; ok={}".format(
            res["fast_vs_fp32_rel_err"],
            f"{res['ours_fp32_vs_diffusers_fp32_rel_err']:.2e}" if "ours_fp32_vs_diffusers_fp32_rel_err" in res
            else "n/a", res["ok"]))
        self.write_json()

    @torch.no_grad()
    def fp32_reference(self, name: str, master: nn.Module) -> torch.Tensor:
        """``master``'s float32 eager output (TF32 off) on the first 256 inference inputs, computed once per network
        (the correctness checks of the fast path and of every experiment compare with it)."""
        cache = self.fp32_refs
        if name not in cache:
            x, t = self.infer_inputs[0]
            n = min(256, x.shape[0])
            old = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
            torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
            try:
                m = copy.deepcopy(master).to(self.device).float().eval()
                cache[name] = m(x[:n], t[:n]).float()
                del m
            finally:
                torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old
        return cache[name]

    @torch.no_grad()
    def experiment_check(self, fwd, master: nn.Module, row: Dict[str, Any]) -> None:
        """An experiment's forward against float32 eager (TF32 off) on the same weights and inputs: recorded in
        its row (``infer_rel_err_vs_fp32``, bf16 tolerance 2e-2)."""
        x, t = self.infer_inputs[0]
        out = fwd(x, t)[: min(256, x.shape[0])].float()  # first: switching TF32 would make dynamo recompile it
        ref = self.fp32_reference("ours", master)
        err = float((out - ref).norm() / ref.norm())
        row["infer_rel_err_vs_fp32"] = err
        row["infer_same_function"] = bool(torch.isfinite(out).all()) and err < 2e-2
        log(f"{row['network']}:{row['mode']}: rel err vs fp32 eager {err:.2e} (ok={row['infer_same_function']})")
        self.write_json()

    def maybe_loss_check(self, master, fast, opt, ema, step, gen) -> None:
        if self.args.loss_check_steps <= 0:
            return
        if self.time_left() < 15:
            self.results["loss_curve_check"] = dict(error=f"skipped: {self.time_left():.0f} s left")
            return
        log(f"loss-curve check: {self.args.loss_check_steps} steps of ours' fast step against float32 eager")
        try:
            self.loss_curve_check(master, fast, opt, ema, step, gen)
        except Exception as exc:  # noqa: BLE001 - a check, not a measurement
            self.results["loss_curve_check"] = dict(error=f"{type(exc).__name__}: {exc}")
            log(f"loss-curve check FAILED: {type(exc).__name__}: {str(exc)[:300]}")

    def loss_curve_check(self, master: nn.Module, fast, opt, ema, step, gen) -> None:
        """A short run of the fast step (the captured CUDA graph, replayed) against the plain float32 eager
        step from the same start.

        Both draw the data, t and the noise from generators seeded alike, so only the dropout masks (drawn by
        different kernels) and the arithmetic (bf16 against fp32) differ. The graph's tensors are reset in
        place (weights, Adam moments and step, EMA), so the same graph replays."""
        steps = self.args.loss_check_steps
        B = self.size["train_batch"]
        N = self.data.shape[0]
        init = {k: v.detach().clone() for k, v in master.state_dict().items()}

        def run(stepper, seed):
            data_gen = torch.Generator(device=self.device).manual_seed(seed)
            losses = []
            for _ in range(steps):
                x = self.data[torch.randint(0, N, (B,), device=self.device, generator=data_gen)]
                loss, _ = stepper(x)
                losses.append(loss.detach().clone())
            return [float(v) for v in torch.stack(losses).cpu()]

        # reset the graphed run in place (the graph keeps its tensors): weights, Adam moments, EMA
        with torch.no_grad():
            fast.module.load_state_dict(init)
            for st in opt.state.values():
                for name in ("exp_avg", "exp_avg_sq", "step"):
                    if name in st:
                        st[name].zero_()
            ema.load_state_dict(init)
        gen.manual_seed(123)
        fast_losses = run(step, 7)
        graphed = step.graphed

        def run_plain(seed, data_seed):
            """The plain path: float32, eager, foreach Adam, a fresh copy from the same start."""
            plain = accel.prepare_model(copy.deepcopy(master), self.device, bf16=False, channels_last=False,
                                        compile=False)
            popt = accel.make_optimizer(plain.module.parameters(), fused=False)
            pgen = torch.Generator(device=self.device).manual_seed(seed)
            return run(accel.make_train_step(plain, self.diffusion, popt, EMA(plain.module, 0.9999), cuda_graph=False,
                                             generator=pgen), data_seed)

        plain_losses = run_plain(123, 7)
        # the run-to-run noise to judge that by: the plain step once more from the same start, with other seeds
        # for the data, t and the noise (what a second run of the same recipe would draw)
        other_losses = run_plain(124, 8)
        k = max(1, steps // 4)
        first = abs(fast_losses[0] - plain_losses[0]) / plain_losses[0]
        last_f, last_p = statistics.mean(fast_losses[-k:]), statistics.mean(plain_losses[-k:])
        last_o = statistics.mean(other_losses[-k:])
        diff, spread = abs(last_f - last_p) / last_p, abs(last_o - last_p) / last_p
        res = dict(steps=steps, fast_losses=[round(v, 5) for v in fast_losses],
                   plain_losses=[round(v, 5) for v in plain_losses],
                   other_seed_plain_losses=[round(v, 5) for v in other_losses], first_step_rel_diff=round(first, 4),
                   last_quarter_mean_fast=round(last_f, 5), last_quarter_mean_plain=round(last_p, 5),
                   last_quarter_mean_other_seed=round(last_o, 5), last_quarter_rel_diff=round(diff, 4),
                   other_seed_rel_diff=round(spread, 4),
                   # tests/test_accel.py's rule: apart by no more than another seed is, or 5 %
                   within_run_to_run_noise=bool(diff <= max(spread, 0.05)),
                   both_decrease=bool(last_f < fast_losses[0] and last_p < plain_losses[0]),
                   fast_step_graphed=graphed,
                   note="fast and plain: same data, t and noise draws, dropout masks differ (different kernels); "
                        "other_seed: the plain step with other seeds for the data, t and the noise")
        self.results["loss_curve_check"] = res
        log(f"loss curve ({steps} steps): fast {fast_losses[0]:.4f} -> {last_f:.4f}, plain {plain_losses[0]:.4f} -> "
            f"{last_p:.4f}, plain with other seeds -> {last_o:.4f} (first-step diff {first * 100:.2f}%, "
            f"last-quarter diff {diff * 100:.2f}%, other seeds {spread * 100:.2f}%)")
        self.write_json()

    # ------------------------------------------------------------------ the plan
    def plan(self, have_diffusers: bool) -> List[Dict[str, Any]]:
        want = set(self.args.mode_list)
        if not have_diffusers:
            want = {m for m in want if not m.startswith("diffusers")}
        if not self.cuda:  # CUDA graphs: on the CPU "fast" is the compiled path alone
            want.discard("diffusers:bf16_cl_compile_graph")
        what = {w.strip() for w in self.args.what.split(",")}
        jobs = []

        def add(net, mode, kind, graph_key=None, est=10.0, check=False):
            jobs.append(dict(net=net, mode=mode, kind=kind, graph_key=graph_key, est=est, check=check))

        # The compiled pairs first, training (the 2x target) complete before inference: ours' compiled step
        # and its CUDA graph, then diffusers' compiled step; then the same for inference; then eager modes.
        for kind in ("train", "infer"):
            if kind not in what:
                continue
            if {"ours:fast", "ours:bf16_cl_compile"} & want:
                add("ours", "bf16_cl_compile", kind, "ours:fast" if "ours:fast" in want else None,
                    est=90.0 if kind == "train" else 45.0, check=kind == "infer")
            if {"diffusers:bf16_cl_compile", "diffusers:bf16_cl_compile_graph"} & want:
                gk = "diffusers:bf16_cl_compile_graph" if ("diffusers:bf16_cl_compile_graph" in want
                                                           and kind == "train") else None
                add("diffusers", "bf16_cl_compile", kind, gk, est=90.0 if kind == "train" else 45.0)
        # what ddpm_lib.Trainer gives with its defaults (on CUDA it compiles; inductor's on-disk cache holds
        # ours' kernels from ours:train, so that is quick)
        if "train" in what and "ours:trainer" in want:
            add("ours", "trainer", "train", est=90.0)
        # diffusers' eager modes (completing its baseline), then the experiments (inference first: the open
        # target), then ours' eager modes
        for net in ("diffusers", "ours"):
            if net == "ours":
                for kind in ("infer", "train"):
                    for exp, kinds in EXPERIMENTS.items():
                        if kind in what and kind in kinds and {f"ours:fast_{exp}", f"ours:bf16_cl_compile_{exp}"} & want:
                            add("ours", f"bf16_cl_compile_{exp}", kind,
                                f"ours:fast_{exp}" if f"ours:fast_{exp}" in want else None,
                                est=90.0 if kind == "train" else 45.0, check=kind == "infer")
                    # after the inference experiments: the GroupNorm kernel alone (a diagnosis)
                    if kind == "infer" and self.cuda and "infer" in what and {
                            f"ours:{p}_{e}" for p in ("fast", "bf16_cl_compile") for e in ("tgn", "all", "fold")} & want:
                        add("ours", "gn_kernels", "kernel", est=90.0)  # with the autotuning of new shapes
            for mode in ("bf16_cl", "fp32"):
                for kind in ("train", "infer"):
                    if kind in what and f"{net}:{mode}" in want:
                        add(net, mode, kind, est=8.0)
        # the Trainer with a CUDA graph but no compiling, then with neither (information: what each one gives)
        for tm, est in (("trainer_graph", 35.0), ("trainer_eager", 30.0)):
            if "train" in what and f"ours:{tm}" in want:
                add("ours", tm, "train", est=est)
        return jobs

    def estimate(self, job) -> float:
        extra = 5.0 if (job["net"] == "diffusers" and job["kind"] == "train" and self.cuda) else 0.0
        if job["mode"] == "trainer" and self.cuda:  # compiles (from the warm cache when ours:train ran)
            measured = self.compile_s.get("ours:train")
            return (measured + 20.0) if measured is not None else job["est"]
        if not job["mode"].startswith("bf16_cl_compile") or self.compile_backend() != "inductor":
            return (job["est"] + extra) if self.cuda else 2.0
        measured = self.compile_s.get(f"ours:{job['kind']}")
        base = measured if measured is not None else job["est"]
        if job["mode"].endswith(("_tgn", "_all", "_fold")) and self.cuda:
            kmod = sys.modules.get("ddpm_lib.kernels")
            if kmod is None or not kmod.tuned():  # the first network with the kernel times its tiles: ~70 candidates
                extra += 60.0 if job["mode"].endswith("_fold") else 40.0  # (_fold: ~130) at 0.2-0.5 s each
        return base * (0.8 if job["net"] == "diffusers" else 1.0) + 12.0 + extra


def main(argv: Optional[List[str]] = None) -> Dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cuda", "cpu"])
    p.add_argument("--size", default=None, choices=sorted(SIZES), help="full (default on CUDA) or tiny (CPU CI)")
    p.add_argument("--budget-s", type=float, default=400.0,
                   help="time budget in seconds; no new mode starts when its estimate would overrun it")
    p.add_argument("--hard-limit-s", type=float, default=None,
                   help="write what was measured and exit at this time (default: budget + 30 s)")
    p.add_argument("--modes", default="all", help=f"comma-separated subset of {','.join(ALL_MODES)}")
    p.add_argument("--what", default="train,infer", help="train, infer or both")
    p.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"),
                   help="folder for <card>.json (<card>-tiny.json at --size tiny)")
    p.add_argument("--json-path", default=None, help="write the JSON here instead")
    p.add_argument("--compile-backend", default=None,
                   help="torch.compile backend (default: inductor on CUDA, eager -- tracing only -- on the CPU)")
    p.add_argument("--cpu-threads", type=int, default=1,
                   help="intra-op threads on the CPU (default 1: immune to oversubscription on shared CI machines)")
    p.add_argument("--loss-check-steps", type=int, default=None,
                   help="steps of the fast-vs-fp32 loss-curve check on CUDA (default 40 at full size; 0: off)")
    p.add_argument("--profile-steps", type=int, default=5,
                   help="calls of each compiled mode under torch.profiler, summed by kind of kernel (0: off)")
    args = p.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    if args.size is None:
        args.size = "full" if args.device == "cuda" else "tiny"
    if args.loss_check_steps is None:
        args.loss_check_steps = 40 if (args.device == "cuda" and args.size == "full") else 0
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is available")
    args.mode_list = ALL_MODES if args.modes == "all" else [m.strip() for m in args.modes.split(",") if m.strip()]
    unknown = sorted(set(args.mode_list) - set(ALL_MODES))
    if unknown:
        raise SystemExit(f"unknown modes {unknown}; choose from {ALL_MODES}")
    bad = {w.strip() for w in args.what.split(",")} - {"train", "infer"}
    if bad:
        raise SystemExit(f"--what takes train and/or infer, got {sorted(bad)}")
    global T0
    T0 = time.perf_counter()

    saved = (torch.get_num_threads(), torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32,
             torch.backends.cudnn.benchmark)
    if args.device == "cpu" and args.cpu_threads > 0:
        torch.set_num_threads(args.cpu_threads)
    try:
        return _main(args)
    finally:
        torch.set_num_threads(saved[0])
        (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32,
         torch.backends.cudnn.benchmark) = saved[1:]


def _main(args) -> Dict[str, Any]:
    run = Run(args)
    run.device_info()
    hard = args.hard_limit_s if args.hard_limit_s is not None else args.budget_s + 30.0
    done = threading.Event()

    def on_hard_limit():
        if done.is_set():
            return
        log(f"HARD LIMIT {hard:.0f} s reached: writing what was measured and exiting")
        run.results["aborted"] = f"hard limit {hard:.0f} s reached"
        path = run.write_json()
        print(run.table(), flush=True)
        print(f"wrote {path}", flush=True)
        os._exit(3)

    watchdog = threading.Timer(hard, on_hard_limit)
    watchdog.daemon = True
    watchdog.start()
    try:
        run.warm_compile_pool()
        run.matmul_peak()
        ours, diff, note = build_networks(args.size)
        run.results["diffusers"] = note
        run.results["parameters"] = sum(q.numel() for q in ours.parameters())
        log(f"networks: ddpm_lib UNet {run.results['parameters']:,} parameters; {note}")
        try:
            run.results["forward_gflop_per_image"] = round(count_forward_flops(ours, run.size["image"]) / 1e9, 4)
            if diff is not None:
                run.results["diffusers_forward_gflop_per_image"] = round(
                    count_forward_flops(diff, run.size["image"]) / 1e9, 4)
            run.results["flop_convention"] = ("torch.utils.flop_counter at batch 1 (2 FLOPs per multiply-add; "
                                              "conv, mm, bmm/attention); training = 3 x forward")
            log(f"forward: {run.results['forward_gflop_per_image']:.3f} GFLOP/image "
                f"(diffusers {run.results.get('diffusers_forward_gflop_per_image')})")
        except Exception as exc:  # noqa: BLE001
            run.results["flop_error"] = f"{type(exc).__name__}: {exc}"
        run.make_data()
        try:  # cheap (seconds on a GPU): the rates the convolutions alone allow
            run.conv_floor(conv_shapes(ours, run.size["image"]))
        except Exception as exc:  # noqa: BLE001 - a reference, not a measurement of either network
            run.results["conv_floor"] = dict(error=f"{type(exc).__name__}: {str(exc)[:300]}")
            log(f"convolution floor FAILED: {run.results['conv_floor']['error']}")
        masters = {"ours": ours}
        if diff is not None:
            masters["diffusers"] = diff
        run.write_json()
        last_net_compiled = None
        for i, job in enumerate(run.plan(diff is not None)):
            key = f"{job['net']}:{job['mode']}"
            est = run.estimate(job)
            if job["kind"] == "kernel":
                if run.time_left() < est:
                    run.results["gn_kernels"] = dict(error=f"skipped: {run.time_left():.0f} s left")
                    continue
                log(f"GroupNorm kernels alone ... (estimate {est:.0f} s, {run.time_left():.0f} s left)")
                try:
                    run.gn_kernels(group_norm_shapes(masters["ours"], run.size["image"]))
                except Exception as exc:  # noqa: BLE001 - a diagnosis, not a measurement of either network
                    run.results["gn_kernels"] = dict(error=f"{type(exc).__name__}: {str(exc)[:300]}")
                    log(f"GroupNorm kernels FAILED: {run.results['gn_kernels']['error']}")
                continue
            if run.time_left() < est and i > 0:
                msg = f"skipped: {run.time_left():.0f} s left, estimate {est:.0f} s"
                run.row(key)[f"{job['kind']}_error"] = msg
                if job["graph_key"]:
                    run.row(job["graph_key"])[f"{job['kind']}_error"] = msg
                log(f"{key} {job['kind']}: {msg}")
                continue
            compiled = job["mode"].startswith("bf16_cl_compile") or (job["mode"] == "trainer" and run.cuda)
            # a fresh dynamo for another network, and for each experiment (its swapped-in classes would
            # otherwise count towards dynamo's recompile limit for the network's forward)
            if compiled and (last_net_compiled not in (None, job["net"]) or job["mode"] in EXPERIMENT_MODES):
                run.release(reset_dynamo=True)
            if compiled:
                last_net_compiled = job["net"]
            log(f"{key} {job['kind']} ... (estimate {est:.0f} s, {run.time_left():.0f} s left)")
            try:
                if job["mode"].startswith("trainer"):
                    run.trainer_group(masters["ours"], job["mode"])
                elif job["kind"] == "train":
                    run.train_group(job["net"], masters[job["net"]], job["mode"], job["graph_key"])
                else:
                    run.infer_group(job["net"], masters[job["net"]], job["mode"], job["graph_key"],
                                    check=masters if job["check"] else None)
            except Exception as exc:  # noqa: BLE001 - record and go on
                err = f"{type(exc).__name__}: {str(exc)[:500]}"
                run.row(key)[f"{job['kind']}_error"] = err
                log(f"{key} {job['kind']} FAILED: {err}")
                traceback.print_exc()
                run.release(reset_dynamo=False)
            run.write_json()
    finally:
        done.set()
        watchdog.cancel()
    path = run.write_json(final=True)
    print()
    print(run.table(), flush=True)
    print(f"wrote {path}", flush=True)
    out = dict(run.results)
    out.update(run.summary())
    out["modes"] = list(run.rows.values())
    out["json_path"] = str(path)
    return out


if __name__ == "__main__":
    main()
