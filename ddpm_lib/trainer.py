"""Training (Algorithm 1 of the paper), checkpoints, and loading a trained model back.

:class:`Trainer` runs Algorithm 1 with the paper's settings as defaults, each a named option (book
chapter on training, ``eq-l-simple``):

===================  ===========  ===============================================================
option               paper        meaning
===================  ===========  ===============================================================
``lr``               2e-4         Adam learning rate (betas 0.9, 0.999, eps 1e-8)
``warmup``           5000         linear learning-rate warm-up over this many steps
``grad_clip``        1.0          clip the gradient's global norm (None: off)
``ema_decay``        0.9999       decay of the weight average that is sampled from (``eq-ema``)
``ema_warmup``       False        ``min(decay, (1 + step) / (10 + step))``: for short runs
``batch_size``       128          images per step
``hflip``            False        random horizontal flips (the paper's CIFAR-10 augmentation)
``cond_drop_prob``   0            label dropout for classifier-free guidance (conditional models)
===================  ===========  ===============================================================

Dropout is the model's own (0.1 in the paper's CIFAR-10 network). On CUDA the step runs under bfloat16
autocast with float32 master weights (on GPUs with native bf16, compute capability 8.0 or newer; a T4
or V100 trains in float32), in ``channels_last`` memory format, with fused Adam, under ``torch.compile``
(``compile="auto"``: eager again if the compiler fails); the data set is moved to the GPU once and batches
are drawn there by index, so the loop never waits for the host; and each update runs through
:func:`ddpm_lib.accel.make_train_step` (``cuda_graph="auto"``): after three eager steps the whole update
(forward, backward, clipping, Adam, EMA) is captured in one CUDA graph and replayed, with a capturable fused
Adam whose learning rate lives on the device. ``t`` and the noise then come from a generator of their own
(saved in checkpoints like the others), so a run with graphs draws other numbers than one without.
On a GPU without native bf16 (a T4, a V100), ``fp16=True`` trains under float16 autocast instead, with
dynamic loss scaling (``torch.amp.GradScaler``; float32 master weights and EMA as with bf16): an update
whose gradient overflows is skipped and the scale halved. It is off by default and not measured on such a
card here; it turns the CUDA graph off (the scaler decides on the host whether an update is applied).
Measured on one H200 (``benchmarks/RESULTS.md``), compiling and the graph together train the paper's
CIFAR-10 network about 2.5 times as fast as the same trainer with both off; the first step pays for the
compilation (about 80 s there; ``compile=False`` for short runs). None of this is used on a CPU, where
``cuda_graph=True`` runs the same step code without a graph, and a non-finite loss is then caught just
after its update instead of before (no checkpoint ever holds it).

Steps, checkpoints and resuming
    ``trainer.step`` counts the optimizer updates done. ``train(steps=N)`` trains until ``step == N``
    (so after a resume it continues to the same N), ``train(minutes=m)`` for a wall-clock budget.
    Checkpoints (``out_dir/last.pt``) are written every ``save_every`` steps, at the end, and on
    Ctrl-C (the signal is taken between two steps, the checkpoint written, then ``KeyboardInterrupt``
    re-raised), always atomically (a temporary file in the same folder, then ``os.replace``). They
    hold the model, its EMA, the optimizer, the step, the configuration (plain JSON values) and every
    random state (torch's CPU and CUDA generators, which drive dropout, and the trainer's own
    generators for batches, timesteps, noise, flips and label dropout), so that a resumed run ends
    with bit-identical weights to an uninterrupted one (same device and settings; tested on the CPU, and on
    a GPU it also takes deterministic kernels, ``torch.use_deterministic_algorithms``).

Batches
    Each step draws ``batch_size`` indices uniformly at random (with replacement) from the data set.

Non-finite losses
    A loss or gradient norm that is not finite raises :class:`NonFiniteLossError` naming the step.
    Under ``fp16`` a non-finite gradient is the loss scaler's business instead (the update is skipped,
    counted in ``trainer.skipped_steps``); it raises only once the scale has fallen below 1, i.e. when the
    gradient overflows even unscaled.
    The check needs the value on the host: on the CPU it runs every step, before the optimizer
    update; on a GPU a flag is accumulated on the device (with the first bad step) and read every
    ``log_every`` steps and before every checkpoint, sample grid and at the end, so that no
    checkpoint is ever written after a bad update: the last good checkpoint stays on disk. Before a
    checkpoint is written the weights themselves are also checked.

Out of memory
    A GPU out-of-memory error in a training step raises :class:`TrainingOutOfMemoryError` (a
    ``torch.cuda.OutOfMemoryError``) whose message names the GPU, its memory, the batch size and what to
    change. The failed step's tensors are released first, so a notebook can go on in the same session.

Files written to ``out_dir``: ``last.pt`` (the checkpoint), ``config.json``, ``loss_history.json``
(a list of ``[step, mean loss over the last log_every steps]``) and ``loss_history.csv``, and
``samples/step_XXXXXXX.png`` (a DDIM sample grid from the EMA weights every ``sample_every`` steps).
"""
from __future__ import annotations

import contextlib
import copy
import csv
import dataclasses
import hashlib
import io
import json
import math
import os
import pickle
import signal
import tempfile
import threading
import time
import warnings
import zipfile
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional, Tuple, Union

import torch
from torch import nn

from .diffusion import GaussianDiffusion
from .accel import bf16_native, make_optimizer
from .ema import EMA, ema_init_weight

__all__ = [
    "CHECKPOINT_FORMAT",
    "CheckpointError",
    "NonFiniteLossError",
    "TrainConfig",
    "Trainer",
    "train",
    "warmup_lr",
    "young_ema_warning",
    "ema_updates",
    "YOUNG_EMA_WEIGHT",
    "diffusion_config",
    "diffusion_from_config",
    "save_checkpoint",
    "read_checkpoint",
    "load_checkpoint",
    "export_checkpoint",
    "check_config",
]

CHECKPOINT_FORMAT = "ddpm_lib.checkpoint"
CHECKPOINT_VERSION = 1
PathLike = Union[str, os.PathLike]


class CheckpointError(ValueError):
    """A file is not a readable ddpm_lib checkpoint, or its configuration is not the one asked for."""


class NonFiniteLossError(FloatingPointError):
    """Training produced a non-finite loss (or gradient, or weights); the run was stopped.

    Attributes: ``step`` (the 1-based update whose loss was bad), ``checkpoint`` (the last good
    checkpoint on disk, or None).
    """

    def __init__(self, message: str, step: int, checkpoint: Optional[Path] = None):
        super().__init__(message)
        self.step = step
        self.checkpoint = checkpoint


class TrainingOutOfMemoryError(torch.cuda.OutOfMemoryError):
    """The GPU ran out of memory in a training step; the message names the GPU, the batch and what to change.

    Raised in place of PyTorch's ``torch.cuda.OutOfMemoryError`` (so ``except torch.cuda.OutOfMemoryError``
    still catches it), without holding on to the failed step's tensors: the gradients are dropped and the
    allocator's cache is emptied, so a notebook can build a smaller trainer in the same session. The run
    stops with ``trainer.step`` at the last completed update (out-of-memory errors come from the forward
    and backward passes, before the update, where nearly all of a step's memory is allocated).
    """


# ---------------------------------------------------------------------------------------------- options
@dataclasses.dataclass
class TrainConfig:
    """The training options; the defaults are the paper's (Ho et al. 2020, appendix B).

    See the module docstring for what each means. ``fp16`` (default False) trains under float16 autocast with
    dynamic loss scaling, for GPUs without native bf16 (a T4, a V100); it needs ``bf16`` and ``cuda_graph``
    not True ("auto" turns them off). ``bf16``, ``channels_last``, ``fused`` and
    ``data_on_device`` accept ``"auto"`` (on for CUDA, off elsewhere; ``bf16`` only on GPUs with native
    bfloat16, see :func:`ddpm_lib.accel.bf16_native`); ``compile`` is ``"auto"`` (the default: try
    ``torch.compile`` on CUDA and fall back to eager on any failure), ``True`` or ``False``;
    ``cuda_graph`` is ``"auto"`` (the default: on for CUDA), ``True`` or ``False``: the step through
    :func:`ddpm_lib.accel.make_train_step`, replayed from one CUDA graph (on a CPU, ``True`` runs the same
    step code without a graph).
    ``sample_every``/``save_every``/``log_every`` of ``0`` or None switch the action off (a
    checkpoint is still written at the end when there is an ``out_dir``).
    """

    batch_size: int = 128
    lr: float = 2e-4
    warmup: int = 5000
    grad_clip: Optional[float] = 1.0
    ema_decay: float = 0.9999
    ema_warmup: bool = False
    adam_betas: Tuple[float, float] = (0.9, 0.999)
    adam_eps: float = 1e-8
    cond_drop_prob: float = 0.0
    hflip: bool = False
    bf16: Union[bool, str] = "auto"
    fp16: bool = False
    channels_last: Union[bool, str] = "auto"
    compile: Union[bool, str] = "auto"
    cuda_graph: Union[bool, str] = "auto"
    fused: Union[bool, str] = "auto"
    data_on_device: Union[bool, str] = "auto"
    seed: int = 0
    log_every: int = 100
    save_every: Optional[int] = 5000
    sample_every: Optional[int] = 5000
    sample_n: int = 64
    sample_steps: int = 50
    progress: bool = True

    def __post_init__(self):
        def pos_int(name, allow_zero=False, allow_none=False):
            v = getattr(self, name)
            if v is None and allow_none:
                return
            if isinstance(v, bool) or not isinstance(v, int) or v < (0 if allow_zero else 1):
                raise ValueError(f"{name} must be an int >= {0 if allow_zero else 1}, got {v!r}")

        pos_int("batch_size")
        pos_int("warmup", allow_zero=True)
        pos_int("log_every")
        pos_int("save_every", allow_zero=True, allow_none=True)
        pos_int("sample_every", allow_zero=True, allow_none=True)
        pos_int("sample_n")
        pos_int("sample_steps")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise ValueError(f"seed must be an int, got {self.seed!r}")
        if not (isinstance(self.lr, (int, float)) and self.lr > 0):
            raise ValueError(f"lr must be a number > 0, got {self.lr!r}")
        if self.grad_clip is not None and not self.grad_clip > 0:
            raise ValueError(f"grad_clip must be > 0 or None, got {self.grad_clip!r}")
        if not 0.0 <= self.ema_decay < 1.0:  # 1 would keep the initial weights for ever
            raise ValueError(f"ema_decay must lie in [0, 1), got {self.ema_decay!r}")
        if self.fp16 is True and (self.bf16 is True or self.cuda_graph is True):
            raise ValueError(f"fp16=True (float16 autocast with loss scaling) excludes "
                             f"{'bf16=True' if self.bf16 is True else 'cuda_graph=True'}: choose one")
        if not 0.0 <= self.cond_drop_prob < 1.0:
            raise ValueError(f"cond_drop_prob must lie in [0, 1), got {self.cond_drop_prob!r}")
        self.adam_betas = tuple(float(b) for b in self.adam_betas)
        if len(self.adam_betas) != 2:
            raise ValueError(f"adam_betas must be two numbers, got {self.adam_betas!r}")
        for name in ("bf16", "channels_last", "fused", "data_on_device", "compile", "cuda_graph"):
            v = getattr(self, name)
            if not (isinstance(v, bool) or v == "auto"):
                raise ValueError(f"{name} must be True, False or 'auto', got {v!r}")
        for name in ("hflip", "ema_warmup", "progress", "fp16"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be True or False, got {getattr(self, name)!r}")

    def to_dict(self) -> Dict[str, Any]:
        """Plain JSON values."""
        d = dataclasses.asdict(self)
        d["adam_betas"] = list(d["adam_betas"])
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "TrainConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"unknown training options: {', '.join(unknown)}")
        return cls(**dict(d))


def warmup_lr(step: int, lr: float, warmup: int) -> float:
    """The learning rate of the update at 0-based ``step``: ``lr * min(1, (step + 1) / warmup)``.

    A linear warm-up over the first ``warmup`` updates (the paper: 5000), reaching ``lr`` at update
    ``warmup`` (0-based ``warmup - 1``); ``warmup = 0`` means no warm-up.
    """
    if warmup <= 0:
        return float(lr)
    return float(lr) * min(1.0, (step + 1) / warmup)


# ---------------------------------------------------------------------------------------------- configs
_SCHEDULE_NAMES = ("linear", "cosine", "quadratic", "sigmoid")


#: :func:`load_checkpoint` and :meth:`Trainer.sample_grid` warn when the EMA weights still give the
#: network's initial weights more than this share (:func:`ddpm_lib.ema.ema_init_weight`).
YOUNG_EMA_WEIGHT = 0.1


def ema_updates(state: Dict[str, Any]) -> int:
    """How many times a checkpoint's EMA was updated: its step, less the updates fp16's loss scaler skipped
    (an overflowing gradient skips the EMA's update too)."""
    return int(state["step"]) - int(state.get("skipped_steps", 0))


def young_ema_warning(updates: int, decay: float, warmup: bool, raw_weights: bool = True) -> Optional[str]:
    """A warning's text when an EMA after ``updates`` updates is still mostly the initial network, else None.

    The paper's decay 0.9999 without warm-up keeps 61 % of the initial weights after 5,000 steps and 10 %
    after 23,000: samples from such an average look like noise however well the raw weights sample.
    ``raw_weights``: whether the raw weights are at hand to sample instead (not in an EMA-only export).
    """
    share = ema_init_weight(updates, decay, warmup)
    if share <= YOUNG_EMA_WEIGHT * (1 + 1e-9):  # not for rounding: one warm-up update leaves exactly 0.1
        return None
    fixes = ["train longer or with a smaller ema_decay" if warmup else "train with ema_warmup=True or a smaller ema_decay"]
    if raw_weights:
        fixes.insert(0, "sample from the raw weights (load_checkpoint(..., weights='model'), Trainer.model, "
                        "--weights model on the command line)")
    return (f"the EMA weights still give {100 * share:.0f}% of their weight to the weights training started from "
            f"({updates:,} update{'' if updates == 1 else 's'} at decay {decay:g}, {'with' if warmup else 'without'}"
            f" warm-up): samples from them may look like noise. Fix: {', or '.join(fixes)}")


def diffusion_config(diffusion: GaussianDiffusion) -> Dict[str, Any]:
    """The settings of ``diffusion`` as plain JSON values; :func:`diffusion_from_config` rebuilds it.

    The betas are stored in full (float64 values round-trip exactly through JSON); ``schedule``
    names the schedule they equal at this T, or ``"custom"``.
    """
    from .schedules import make_beta_schedule

    T = diffusion.num_timesteps
    schedule = "custom"
    for name in _SCHEDULE_NAMES:
        try:
            if torch.equal(make_beta_schedule(name, T), diffusion.betas):
                schedule = name
                break
        except ValueError:
            continue
    return {
        "schedule": schedule,
        "num_timesteps": T,
        "mean_type": diffusion.mean_type.value,
        "var_type": diffusion.var_type.value,
        "loss_type": diffusion.loss_type.value,
        "vlb_weight": diffusion.vlb_weight,
        "decoder": diffusion.decoder,
        "betas": [float(b) for b in diffusion.betas.tolist()],
    }


def diffusion_from_config(cfg: Mapping[str, Any]) -> GaussianDiffusion:
    """Rebuild a :class:`GaussianDiffusion` from :func:`diffusion_config`."""
    betas = cfg.get("betas")
    if betas is None:
        betas = cfg.get("schedule", "linear")
    return GaussianDiffusion(
        torch.tensor(betas, dtype=torch.float64) if not isinstance(betas, str) else betas,
        mean_type=cfg.get("mean_type", "eps"),
        var_type=cfg.get("var_type", "fixed_large"),
        loss_type=cfg.get("loss_type", "simple"),
        num_timesteps=cfg.get("num_timesteps") if isinstance(betas, str) else None,
        vlb_weight=cfg.get("vlb_weight", 0.001),
        decoder=cfg.get("decoder", "discretized"),
    )


def _model_config(model: nn.Module, preset: Optional[str]) -> Dict[str, Any]:
    cls = type(model)
    cfg = getattr(model, "config", None)
    if cfg is not None:
        cfg = json.loads(json.dumps(cfg))  # plain JSON values, or a clear error
    return {"class": f"{cls.__module__}:{cls.__qualname__}", "preset": preset, "config": cfg}


def _build_model(model_cfg: Mapping[str, Any], path) -> nn.Module:
    import importlib

    cls_path = model_cfg.get("class", "")
    cfg = model_cfg.get("config")
    module, _, qualname = cls_path.partition(":")
    if cfg is None or not module.startswith("ddpm_lib") or not qualname:
        raise CheckpointError(
            f"{path}: the checkpoint's model ({cls_path or 'unknown class'}) has no stored configuration to "
            "rebuild it from; build the model yourself and pass it as load_checkpoint(..., model=model)"
        )
    try:
        cls = getattr(importlib.import_module(module), qualname)
        return cls(**cfg)
    except (ImportError, AttributeError, TypeError, ValueError) as exc:
        raise CheckpointError(f"{path}: cannot rebuild the model {cls_path} from its configuration: {exc}") from exc


def _infer_data_info(images: Optional[torch.Tensor], name: Optional[str], labels, extra) -> Dict[str, Any]:
    info: Dict[str, Any] = {"name": name}
    if images is not None and images.ndim >= 2:
        info["shape"] = [int(s) for s in images.shape[1:]]
    if labels is not None and torch.is_tensor(labels) and labels.numel():
        info["num_classes"] = int(labels.max()) + 1
    # Fashion-MNIST / MNIST are 28x28: a 32x32 version whose border is black everywhere was padded
    # by load_dataset(pad_to=32) (explicit data_info wins).
    if (name in ("fashion_mnist", "mnist") and images is not None and images.ndim == 4
            and images.shape[-1] == images.shape[-2] and images.shape[-1] > 28):
        size = int(images.shape[-1])
        lo, hi = (size - 28) // 2, (size - 28) // 2 + 28
        border = torch.ones(size, size, dtype=torch.bool)
        border[lo:hi, lo:hi] = False
        if bool((images[..., border] == -1.0).all()):
            info["pad_to"] = size
            info["original_size"] = 28
    if extra:
        info.update(dict(extra))
    return info


# ---------------------------------------------------------------------------------------------- checkpoint files
def _to_cpu(obj):
    if torch.is_tensor(obj):
        return obj.detach().to("cpu")
    if isinstance(obj, dict):
        return {k: _to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_to_cpu(v) for v in obj]
    if isinstance(obj, tuple):
        return tuple(_to_cpu(v) for v in obj)
    return obj


def _atomic_write(path: Path, write) -> Path:
    """Call ``write(file_object)`` on a temporary file in ``path``'s folder, then ``os.replace`` it onto
    ``path``: readers see either the old file or the complete new one, never a partial file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=str(path.parent))
    try:
        umask = os.umask(0)
        os.umask(umask)
        with contextlib.suppress(OSError):
            os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600 files; give the usual permissions
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return path


def save_checkpoint(state: Mapping[str, Any], path: PathLike) -> Path:
    """Write a checkpoint dict with ``torch.save``, atomically (temporary file + ``os.replace``)."""
    return _atomic_write(Path(path), lambda f: torch.save(dict(state), f))


def _write_json(path: Path, obj) -> Path:
    return _atomic_write(Path(path), lambda f: f.write(json.dumps(obj, indent=1).encode()))


def read_checkpoint(path: PathLike, map_location="cpu") -> Dict[str, Any]:
    """Read and validate a ddpm_lib checkpoint file, returning its raw dict.

    Raises:
        FileNotFoundError: no file at ``path``.
        CheckpointError: the file is truncated, corrupt, or not a ddpm_lib checkpoint.
    """
    path = Path(path).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if path.is_dir():
        raise CheckpointError(f"{path} is a directory, not a checkpoint file (did you mean {path / 'last.pt'}?)")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except (RuntimeError, EOFError, OSError, pickle.UnpicklingError, zipfile.BadZipFile, ValueError,
            KeyError, AttributeError, TypeError, IndexError, UnicodeDecodeError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(
            f"{path} is not a readable checkpoint (truncated or corrupt file?): {type(exc).__name__}: {first}"
        ) from None
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{path} is a torch file but not a ddpm_lib checkpoint (no format={CHECKPOINT_FORMAT!r})")
    missing = [k for k in ("kind", "step", "config", "ema") if k not in state]
    if missing:
        raise CheckpointError(f"{path} is an incomplete ddpm_lib checkpoint: missing {', '.join(missing)}")
    if int(state.get("version", 0)) > CHECKPOINT_VERSION:
        raise CheckpointError(f"{path} was written by a newer ddpm_lib (checkpoint version {state['version']}); "
                              "upgrade ddpm_lib")
    return state


# What the short keys of ``expect`` refer to in a checkpoint's configuration.
_EXPECT_KEYS = {
    "preset": ("model", "preset"),
    "model_class": ("model", "class"),
    "image_size": ("model", "config", "image_size"),
    "channels": ("model", "config", "in_channels"),
    "in_channels": ("model", "config", "in_channels"),
    "num_classes": ("model", "config", "num_classes"),
    "dataset": ("data", "name"),
    "num_timesteps": ("diffusion", "num_timesteps"),
    "T": ("diffusion", "num_timesteps"),
    "schedule": ("diffusion", "schedule"),
    "mean_type": ("diffusion", "mean_type"),
    "var_type": ("diffusion", "var_type"),
    "loss_type": ("diffusion", "loss_type"),
}


def _get(cfg: Mapping[str, Any], keys) -> Any:
    cur: Any = cfg
    for k in keys:
        if not isinstance(cur, Mapping) or k not in cur:
            return _MISSING
        cur = cur[k]
    return cur


class _Missing:
    def __repr__(self):
        return "<missing>"


_MISSING = _Missing()


def _jsonable(v):
    return json.loads(json.dumps(v)) if v is not _MISSING else v


def _short(v, other=None, limit: int = 8) -> str:
    """repr of a config value, with long lists (a schedule's betas) cut to their length and ends, and to
    the first entry that differs from ``other`` (a list of the same length)."""
    if isinstance(v, (list, tuple)) and len(v) > limit:
        text = f"[{v[0]!r}, {v[1]!r}, ..., {v[-1]!r}] ({len(v)} values)"
        if isinstance(other, (list, tuple)) and len(other) == len(v):
            i = next((i for i, (a, b) in enumerate(zip(v, other)) if _jsonable(a) != _jsonable(b)), None)
            if i is not None:
                text += f", [{i}] = {v[i]!r}"
        return text
    if isinstance(v, dict):
        o = other if isinstance(other, dict) else {}
        return "{" + ", ".join(f"{k!r}: {_short(x, o.get(k), limit)}" for k, x in v.items()) + "}"
    return repr(v)


def check_config(config: Mapping[str, Any], expect: Mapping[str, Any], path: Any = "checkpoint") -> None:
    """Raise :class:`CheckpointError` naming every key of ``expect`` that ``config`` does not match.

    ``expect`` keys: the short names ``preset``, ``image_size``, ``channels``/``in_channels``,
    ``num_classes``, ``dataset``, ``num_timesteps``/``T``, ``schedule``, ``mean_type``, ``var_type``,
    ``loss_type``, ``model_class``; ``model_config`` (a dict: each of its keys is compared with the
    stored model config, e.g. a whole ``model.config``); ``diffusion`` (a dict, compared likewise; a
    :class:`GaussianDiffusion` is accepted); or dotted paths into the configuration such as
    ``"model.config.ch"`` or ``"data.pad_to"``.
    """
    problems: List[str] = []

    def compare(label: str, have, want) -> None:
        if isinstance(want, (tuple, list)):
            want = list(want)
        if _jsonable(have) != _jsonable(want):
            problems.append(f"{label}: checkpoint has {_short(have, want)}, expected {_short(want, have)}")

    for key, want in expect.items():
        if key == "model_config":
            if hasattr(want, "config") and isinstance(getattr(want, "config"), Mapping):
                want = want.config
            for k, v in dict(want).items():
                compare(f"model.config.{k}", _get(config, ("model", "config", k)), v)
        elif key == "diffusion":
            if isinstance(want, GaussianDiffusion):
                want = diffusion_config(want)
            for k, v in dict(want).items():
                compare(f"diffusion.{k}", _get(config, ("diffusion", k)), v)
        elif key in _EXPECT_KEYS:
            compare(key, _get(config, _EXPECT_KEYS[key]), want)
        elif "." in key:
            compare(key, _get(config, tuple(key.split("."))), want)
        else:
            raise ValueError(f"expect: unknown key {key!r}; use one of {', '.join(sorted(_EXPECT_KEYS))}, "
                             "model_config, diffusion, or a dotted path such as 'model.config.ch'")
    if problems:
        raise CheckpointError(f"{path} does not match what was asked: " + "; ".join(problems))


def load_checkpoint(path: PathLike, map_location="cpu", expect: Optional[Mapping[str, Any]] = None, *,
                    model: Optional[nn.Module] = None, weights: str = "ema"):
    """Load a trained model for sampling: ``(model with the EMA weights, diffusion, config)``.

    Args:
        path: a checkpoint written by :class:`Trainer` (``last.pt``) or by :func:`export_checkpoint`.
        map_location: device for the model (``"cpu"``, ``"cuda"``, ...).
        expect: what the checkpoint must be, e.g. ``{"preset": "fashion-base"}`` or
            ``{"model_config": model.config, "image_size": 32, "channels": 1}`` (see
            :func:`check_config`); a mismatch raises :class:`CheckpointError` naming the keys.
        model: load into this network instead of rebuilding it from the stored configuration.
        weights: ``"ema"`` (default: the averaged weights, the ones the paper samples from) or
            ``"model"`` (the raw weights; full checkpoints only).

    Returns:
        ``(model, diffusion, config)``: the network in float32 and evaluation mode on
        ``map_location``, the :class:`GaussianDiffusion` it was trained with, and the configuration
        dict (``model``, ``diffusion``, ``data``, ``train``), with ``step`` and ``kind`` added.

    Raises:
        FileNotFoundError, CheckpointError (corrupt or non-checkpoint file, or a mismatch with ``expect``).

    Warns:
        RuntimeWarning when the EMA weights are asked for and still hold more than ``YOUNG_EMA_WEIGHT`` of
        the initial network (a short run at the paper's decay; :func:`young_ema_warning`).
    """
    state = read_checkpoint(path, map_location="cpu")
    config = copy.deepcopy(state["config"])
    config["step"] = int(state["step"])
    config["kind"] = state["kind"]
    if expect:
        check_config(config, expect, path)
    if weights not in ("ema", "model"):
        raise ValueError(f"weights must be 'ema' or 'model', got {weights!r}")
    if weights == "model" and "model" not in state:
        raise CheckpointError(f"{path} is an EMA-only export: it holds no raw model weights (use weights='ema')")
    train_cfg = config.get("train") or {}
    if weights == "ema" and "ema_decay" in train_cfg:
        message = young_ema_warning(ema_updates(state), float(train_cfg["ema_decay"]),
                                    bool(train_cfg.get("ema_warmup", False)), raw_weights="model" in state)
        if message:
            warnings.warn(f"{path}: {message}", RuntimeWarning, stacklevel=2)
    sd = state[weights]
    sd = {k: (v.float() if torch.is_tensor(v) and v.is_floating_point() else v) for k, v in sd.items()}
    if model is None:
        model = _build_model(config.get("model", {}), path)
    try:
        model.load_state_dict(sd)
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()
        raise CheckpointError(f"{path}: the weights do not fit the model: {' '.join(first[:3])}") from None
    try:
        diffusion = diffusion_from_config(config.get("diffusion", {}))
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"{path}: bad diffusion settings in the checkpoint: {exc}") from exc
    model = model.to(map_location).float().eval()
    return model, diffusion, config


def export_checkpoint(src: PathLike, dst: PathLike, dtype: Optional[torch.dtype] = torch.float16) -> Path:
    """Write a small EMA-only checkpoint: the averaged weights (cast to ``dtype``; None keeps float32)
    and the configuration, without the raw weights, optimizer and random states.

    The file loads with :func:`load_checkpoint` (which casts the weights back to float32); it cannot be
    resumed. For shipping a pretrained model (``fashion-base`` in float16 is under 20 MB).
    """
    state = read_checkpoint(src)
    if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise ValueError(f"dtype must be a floating torch.dtype or None, got {dtype!r}")
    ema = {k: (v.to(dtype) if dtype is not None and v.is_floating_point() else v).contiguous()
           for k, v in state["ema"].items()}
    out = {
        "format": CHECKPOINT_FORMAT,
        "version": CHECKPOINT_VERSION,
        "kind": "ema",
        "step": int(state["step"]),
        "config": state["config"],
        "ema": ema,
        "history": state.get("history", []),
        **({"skipped_steps": int(state["skipped_steps"])} if "skipped_steps" in state else {}),
    }
    return save_checkpoint(out, dst)


# ---------------------------------------------------------------------------------------------- the trainer
def _set_generator_state(gen: torch.Generator, state: torch.Tensor) -> bool:
    """Restore a generator's state; a state saved on another kind of device (a CPU generator's 5056 bytes
    against a CUDA one's 16) seeds it deterministically from that state instead. Returns False then."""
    if state.numel() == gen.get_state().numel():
        gen.set_state(state)
        return True
    digest = hashlib.sha256(state.to("cpu", torch.uint8).numpy().tobytes()).digest()
    gen.manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))
    return False


def _resolve_auto(value, cuda: bool) -> bool:
    return cuda if value == "auto" else bool(value)


class Trainer:
    """Algorithm 1 of the paper with its settings, checkpoints, sample grids and a loss history.

    Args:
        model: the network ``eps_theta`` (e.g. ``UNet.from_preset("fashion-small")``); a model with
            ``num_classes`` gets the labels as ``y`` (with ``cond_drop_prob`` replaced by the null class
            ``num_classes``).
        diffusion: the :class:`GaussianDiffusion` (its ``training_losses`` is the loss).
        data: :class:`~ddpm_lib.data.ImageData`, an image tensor ``(N, C, H, W)`` in [-1, 1], a pair
            ``(images, labels)``, a :class:`~ddpm_lib.data.TensorLoader` (its tensors are used), or any
            other iterable of batches (then batches come from it, and resuming is not bit-exact).
        device: where to train (default: :func:`~ddpm_lib.default_device`).
        out_dir: folder for checkpoints, grids and the loss history (None: nothing is written).
        preset: the model preset name, stored in the configuration (for ``expect={"preset": ...}``).
        data_info: extra facts about the data stored in the configuration (e.g. ``{"pad_to": 32,
            "original_size": 28}``; for Fashion-MNIST/MNIST the padding is detected).
        config: a :class:`TrainConfig`; or give its fields as keyword arguments (``lr=...``).
        on_log: called every ``log_every`` steps with ``{"step", "loss", "images_per_s", "lr"}``.

    Attributes: ``model`` (trained weights), ``ema`` (:class:`~ddpm_lib.ema.EMA`, ``ema.model`` holds
    the averaged weights), ``optimizer``, ``step``, ``history`` (list of ``(step, loss)``), ``stats``
    (throughput of the last :meth:`train` call).
    """

    def __init__(self, model: nn.Module, diffusion: GaussianDiffusion, data, *, device=None,
                 out_dir: Optional[PathLike] = None, preset: Optional[str] = None,
                 data_info: Optional[Mapping[str, Any]] = None, config: Optional[TrainConfig] = None,
                 on_log: Optional[Callable[[Dict[str, Any]], None]] = None, **options):
        if config is None:
            config = TrainConfig(**options)
        elif options:
            config = TrainConfig(**{**config.to_dict(), **options})
        self.cfg = config
        if device is None:
            from .config import default_device

            device = default_device()
        self.device = torch.device(device)
        if self.device.type == "cuda" and self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        cuda = self.device.type == "cuda"
        self.use_fp16 = config.fp16
        self.use_bf16 = _resolve_auto(config.bf16, cuda and bf16_native(self.device)) and not self.use_fp16
        # float16's narrow range: dynamic loss scaling (the scale as last read on the host, in _scale)
        self.scaler = self._new_scaler() if self.use_fp16 else None
        self._scale = self.scaler.get_scale() if self.scaler is not None else 1.0
        self.skipped_steps = 0
        self.use_channels_last = _resolve_auto(config.channels_last, cuda)
        if (isinstance(diffusion, GaussianDiffusion) and diffusion.var_type.value == "learned_range"
                and diffusion.loss_type.value == "simple"):  # (a flow process has neither)
            raise ValueError("var_type='learned_range' needs loss_type='hybrid' (or 'vlb'): L_simple sends no "
                             "gradient to the variance output, which sampling would then use untrained")
        self.diffusion = diffusion
        self.out_dir = None if out_dir is None else Path(out_dir).expanduser()
        self.preset = preset

        # ---- the model, its EMA and the optimizer
        torch.manual_seed(config.seed)  # dropout draws from torch's global generator (saved in checkpoints)
        self.model = model.to(self.device).float()
        if self.use_channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        self.model.train()
        self.ema = EMA(self.model, config.ema_decay, config.ema_warmup)
        self.num_classes = getattr(model, "num_classes", None) or None
        if config.cond_drop_prob > 0 and not self.num_classes:
            raise ValueError(f"cond_drop_prob={config.cond_drop_prob} drops class labels, but the model is not "
                             "class-conditional (no num_classes): build it with num_classes, or leave "
                             "cond_drop_prob 0")
        params = [p for p in self.model.parameters() if p.requires_grad]
        if not params:
            raise ValueError("model has no trainable parameters")
        self._params = params
        # the step through accel.TrainStep (a CUDA graph on CUDA; the same code without one elsewhere)
        self._use_train_step = _resolve_auto(config.cuda_graph, cuda) and not self.use_fp16
        self.use_cuda_graph = self._use_train_step and cuda
        # fused where asked and available (else foreach); capturable (lr on the device) for the CUDA graph
        self.optimizer = make_optimizer(params, config.lr, config.adam_betas, config.adam_eps,
                                        fused=_resolve_auto(config.fused, cuda), capturable=self.use_cuda_graph)
        self.fused = bool(self.optimizer.param_groups[0].get("fused"))
        # how this optimizer was built: a checkpoint's param groups must not change it (see load_state_dict)
        self._opt_flags = {k: self.optimizer.param_groups[0][k] for k in ("fused", "foreach", "capturable")
                           if k in self.optimizer.param_groups[0]}
        self._forward = self.model  # replaced by the compiled module when compiling
        self._compile_mode = config.compile if not (config.compile == "auto" and not cuda) else False
        self._compile_pending = bool(self._compile_mode)
        self.compiled = False

        # ---- data
        self._setup_data(data, config, data_info)

        # ---- generators (a CPU/CUDA torch.Generator on the compute device; one for indices on the data's)
        self.gen = torch.Generator(device=self.device).manual_seed(config.seed + 1)
        if self._images is not None and self._images.device != self.device:
            self.data_gen = torch.Generator(device=self._images.device).manual_seed(config.seed + 2)
        else:
            self.data_gen = self.gen
        self._step_fn = None
        self.step_gen: Optional[torch.Generator] = None
        if self._use_train_step:
            from .accel import FastModel, TrainStep

            # t and the noise inside the captured step: a generator of their own, used by nothing else
            self.step_gen = torch.Generator(device=self.device).manual_seed(config.seed + 3)
            fast = FastModel(self.model, self.device, self.use_bf16, self.use_channels_last,
                             compile=bool(self._compile_mode))
            self._compile_pending = False  # FastModel compiles (and falls back to eager on a failure)
            self._step_fn = TrainStep(fast, diffusion, self.optimizer, self.ema, grad_clip=config.grad_clip,
                                      cuda_graph=self.use_cuda_graph, generator=self.step_gen, warmup_calls=3)
            self.compiled = fast.compiled

        # ---- bookkeeping
        self.step = 0
        self.history: List[Tuple[int, float]] = []
        self.stats: Dict[str, Any] = {}
        self._loss_sum = torch.zeros((), device=self.device)
        self._loss_count = 0
        self._first_bad = torch.full((), -1, dtype=torch.long, device=self.device)
        self._sync_each_step = self.device.type == "cpu"
        self._interrupted = False
        self.last_checkpoint: Optional[Path] = None
        self.on_log = on_log

    # ------------------------------------------------------------------------------------------ data
    def _setup_data(self, data, config: TrainConfig, data_info) -> None:
        from .data import ImageData, TensorLoader

        images = labels = None
        name = None
        self._iterable = None
        if isinstance(data, ImageData):
            images, labels, name = data.images, data.labels, data.name
        elif isinstance(data, TensorLoader):
            images, labels = data.images, data.labels
            # the trainer draws its own batches from the loader's tensors: its settings must be the trainer's
            if data.batch_size != config.batch_size or data.hflip != config.hflip:
                raise ValueError(
                    f"the Trainer draws its own batches from a TensorLoader's tensors, with its own batch_size "
                    f"({config.batch_size}) and hflip ({config.hflip}); the loader has batch_size {data.batch_size} "
                    f"and hflip {data.hflip}: pass batch_size={data.batch_size}, hflip={data.hflip} to the Trainer "
                    f"(or the tensors themselves)")
        elif torch.is_tensor(data):
            images = data
        elif isinstance(data, (tuple, list)) and len(data) == 2 and all(torch.is_tensor(t) for t in data):
            images, labels = data
        elif isinstance(data, Iterable):
            self._iterable = data
        else:
            raise TypeError(f"data must be ImageData, a tensor, a pair (images, labels) or an iterable of batches, "
                            f"got {type(data).__name__}")
        if images is not None:
            if not images.dtype.is_floating_point or images.ndim < 2 or images.shape[0] == 0:
                raise ValueError(f"data: images must be a non-empty float tensor (N, C, H, W), got "
                                 f"{tuple(images.shape)} {images.dtype}")
            if labels is not None and labels.shape[0] != images.shape[0]:
                raise ValueError(f"data: {images.shape[0]} images but {labels.shape[0]} labels")
            if config.hflip and images.ndim != 4:
                raise ValueError("hflip needs images of shape (N, C, H, W)")
            finite = torch.isfinite(images)
            if not bool(finite.all()):
                raise ValueError(f"data: {int(finite.numel() - finite.sum()):,} image values are NaN or infinite "
                                 f"(the loss would be NaN at once)")
        if self.num_classes and labels is None and self._iterable is None:
            raise ValueError("the model is class-conditional (num_classes) but the data have no labels")
        self.data_info = _infer_data_info(images, name, labels, data_info)
        if images is not None:
            on_device = config.data_on_device
            if on_device == "auto":
                on_device = self.device.type == "cpu" or self._fits_on_device(images)
            if on_device:
                images = images.to(self.device)
                labels = None if labels is None else labels.to(self.device)
            elif self.device.type == "cuda":
                images = images.pin_memory()
                labels = None if labels is None else labels.pin_memory()
        self._images = images
        self._labels = labels if self.num_classes else None
        self._iter = None

    def _fits_on_device(self, images: torch.Tensor) -> bool:
        if self.device.type != "cuda":
            return self.device.type != "cpu" and images.numel() * 4 < 2**31
        try:
            free, _ = torch.cuda.mem_get_info(self.device)
        except RuntimeError:
            return False
        return images.numel() * images.element_size() < 0.25 * free

    def _next_batch(self) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        from .data import random_hflip

        cfg = self.cfg
        if self._iterable is not None:
            if self._iter is None:
                self._iter = iter(self._iterable)
            try:
                batch = next(self._iter)
            except StopIteration:
                self._iter = iter(self._iterable)
                batch = next(self._iter)
            if isinstance(batch, (tuple, list)):
                x, y = batch[0], (batch[1] if len(batch) > 1 else None)
            else:
                x, y = batch, None
            x = x.to(self.device, non_blocking=True)
            y = None if (y is None or not self.num_classes) else y.to(self.device, non_blocking=True)
        else:
            n = self._images.shape[0]
            idx = torch.randint(0, n, (cfg.batch_size,), device=self._images.device, generator=self.data_gen)
            x = self._images[idx]
            y = None if self._labels is None else self._labels[idx]
            if x.device != self.device:
                x = x.to(self.device, non_blocking=True)
                y = None if y is None else y.to(self.device, non_blocking=True)
        if self.num_classes and y is None:
            raise ValueError("the model is class-conditional but the batch has no labels")
        if cfg.hflip:
            x = random_hflip(x, generator=self.gen)
        if y is not None and cfg.cond_drop_prob > 0:
            drop = torch.rand(y.shape[0], device=self.device, generator=self.gen) < cfg.cond_drop_prob
            y = torch.where(drop, torch.full_like(y, self.num_classes), y)
        if self.use_channels_last and x.ndim == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        return x, y

    # ------------------------------------------------------------------------------------------ one step
    def _autocast(self):
        if self.use_bf16 or self.use_fp16:
            return torch.autocast(device_type=self.device.type,
                                  dtype=torch.float16 if self.use_fp16 else torch.bfloat16)
        return contextlib.nullcontext()

    def _new_scaler(self, state: Optional[Mapping[str, Any]] = None) -> "torch.amp.GradScaler":
        """A loss scaler in its initial state, or in ``state`` (a ``state_dict``), between two steps."""
        scaler = torch.amp.GradScaler(self.device.type)
        if state:
            scaler.load_state_dict(dict(state))
        return scaler

    def _backward(self, loss: torch.Tensor) -> None:
        (loss if self.scaler is None else self.scaler.scale(loss)).backward()

    def _loss(self, x, y) -> torch.Tensor:
        kw = {} if y is None else {"y": y}
        with self._autocast():
            losses = self.diffusion.training_losses(self._forward, x, model_kwargs=kw, generator=self.gen)
        return losses["loss"].float().mean()

    def _train_step(self) -> None:
        cfg = self.cfg
        step = self.step  # 0-based index of this update; it produces self.step + 1
        lr = warmup_lr(step, cfg.lr, cfg.warmup)
        x, y = self._next_batch()
        if self._step_fn is not None:
            # TrainStep sets the learning rate itself: in place, in the device tensor its CUDA graph reads
            self._graph_train_step(x, y, step, lr)
            return
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        if self._compile_pending:
            loss = self._first_compiled_step(x, y)
        else:
            loss = self._loss(x, y)
            self.optimizer.zero_grad(set_to_none=True)
            self._backward(loss)
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)  # clipping sees the true gradient
        gnorm = None
        if cfg.grad_clip is not None:
            gnorm = torch.nn.utils.clip_grad_norm_(self._params, cfg.grad_clip)
        # under fp16 an overflowing gradient is the scaler's (the update is skipped), a non-finite loss is not
        self._flag_nonfinite(step, loss.detach(), None if self.scaler is not None else gnorm)
        if self._sync_each_step:
            self._check_finite()  # before the update: a bad update is never applied on the CPU
        if self.scaler is None:
            self.optimizer.step()
            self.ema.update(self.model, step)
        else:
            self._scaled_update(step)
        self._loss_sum += loss.detach()
        self._loss_count += 1

    def _scaled_update(self, step: int) -> None:
        """The optimizer step through the loss scaler: skipped (EMA too) when the gradient overflowed, which
        halves the scale. One host synchronisation (the scale) per update."""
        self.scaler.step(self.optimizer)
        self.scaler.update()
        before, self._scale = self._scale, self.scaler.get_scale()
        if self._scale < before:  # the scaler found an inf/NaN gradient: no update was applied
            self._check_finite()  # a non-finite loss (a forward overflow) is reported as such, at its step
            self.skipped_steps += 1
            if self._scale < 1.0:
                self._write_history()
                raise NonFiniteLossError(
                    f"the gradient stayed non-finite under float16 loss scaling until the scale fell to "
                    f"{self._scale:g} (step {step + 1}; {self.skipped_steps} updates skipped in all): it "
                    f"overflows even unscaled. Try {self._remedies()}.", step=step + 1,
                    checkpoint=self.last_checkpoint)
            return
        self.ema.update(self.model, step)

    def _flag_nonfinite(self, step: int, loss: torch.Tensor, gnorm: Optional[torch.Tensor]) -> None:
        """Remember the first update (1-based) whose loss or gradient norm is not finite, on the device
        (no host synchronisation; :meth:`_check_finite` reads it)."""
        bad = ~torch.isfinite(loss)
        if gnorm is not None:
            bad = bad | ~torch.isfinite(gnorm)
        here = torch.full((), step + 1, dtype=torch.long, device=self.device)
        self._first_bad = torch.where((self._first_bad < 0) & bad, here, self._first_bad)

    def _graph_train_step(self, x, y, step: int, lr: float) -> None:
        """One update through :class:`ddpm_lib.accel.TrainStep` (replayed from a CUDA graph once warm)."""
        loss, gnorm = self._step_fn(x, y, lr=lr, step=step)
        fast = self._step_fn.fast
        self.compiled = fast.compiled
        if self._compile_mode is True and fast.compile_error:  # compile=True: a compiler failure is an error
            raise RuntimeError(f"torch.compile failed: {fast.compile_error} (compile='auto' trains eagerly instead)")
        self._flag_nonfinite(step, loss, gnorm)
        self._loss_sum += loss  # the graph's output buffer: used before the next replay
        self._loss_count += 1
        if self._sync_each_step:
            self._check_finite()  # on the CPU: at once (the update is already applied; no checkpoint has it)

    def _first_compiled_step(self, x, y) -> torch.Tensor:
        """Compile the forward pass on the first step; with ``compile="auto"`` fall back to eager on failure."""
        self._compile_pending = False
        rng = (self.gen.get_state(), torch.get_rng_state(),
               torch.cuda.get_rng_state(self.device) if self.device.type == "cuda" else None)
        try:
            self._forward = torch.compile(self.model)
            loss = self._loss(x, y)
            self.optimizer.zero_grad(set_to_none=True)
            self._backward(loss)
            self.compiled = True
            return loss
        except Exception as exc:  # noqa: BLE001 - any compiler failure
            if self._compile_mode is True:
                raise
            warnings.warn(f"torch.compile failed ({type(exc).__name__}: {str(exc)[:200]}); training eagerly",
                          RuntimeWarning, stacklevel=3)
            self._forward = self.model
            self.compiled = False
            self.gen.set_state(rng[0])
            torch.set_rng_state(rng[1])
            if rng[2] is not None:
                torch.cuda.set_rng_state(rng[2], self.device)
            self.optimizer.zero_grad(set_to_none=True)
            loss = self._loss(x, y)
            self._backward(loss)
            return loss

    def _check_finite(self) -> None:
        """Read the device flag (one host synchronisation); raise :class:`NonFiniteLossError` if set."""
        bad = int(self._first_bad)
        if bad >= 0:
            where = (f"the last good checkpoint {self.last_checkpoint} is left as it was"
                     if self.last_checkpoint is not None else "no checkpoint was written")
            self._write_history()
            raise NonFiniteLossError(
                f"the loss (or gradient) became non-finite at step {bad}; training stopped and {where}. "
                f"Try {self._remedies()}.",
                step=bad, checkpoint=self.last_checkpoint)

    def _remedies(self) -> str:
        """What to try after a non-finite loss or gradient, for this run's settings."""
        tries = [f"a lower learning rate (lr={self.cfg.lr:g})"]
        if self.cfg.grad_clip is None:
            tries.append("gradient clipping (grad_clip=1.0)")
        if self.use_bf16 or self.use_fp16:
            tries.append(f"{'fp16' if self.use_fp16 else 'bf16'}=False")
        if self._iterable is not None:
            tries.append("checking the batches for NaN or inf")
        return " or ".join(tries)

    def _check_weights(self) -> None:
        norms = torch._foreach_norm([p.detach() for p in self._params])
        if not bool(torch.isfinite(torch.stack(norms)).all()):
            self._write_history()
            where = (f"the last good checkpoint {self.last_checkpoint} is left as it was"
                     if self.last_checkpoint is not None else "no checkpoint was written")
            raise NonFiniteLossError(f"the weights became non-finite by step {self.step}; training stopped and "
                                     f"{where}. Try a lower learning rate (lr={self.cfg.lr:g}).",
                                     step=self.step, checkpoint=self.last_checkpoint)

    # ------------------------------------------------------------------------------------------ training loop
    def train(self, steps: Optional[int] = None, minutes: Optional[float] = None) -> List[Tuple[int, float]]:
        """Train until ``self.step == steps`` and/or for ``minutes`` of wall-clock time, whichever comes first.

        Writes a checkpoint at the end (and every ``save_every`` steps, and on Ctrl-C before re-raising
        ``KeyboardInterrupt``) when there is an ``out_dir``. Returns the loss history.

        Raises:
            NonFiniteLossError: the loss became NaN/inf (the last good checkpoint stays on disk).
            TrainingOutOfMemoryError: the GPU ran out of memory; the message says what to change.
        """
        from tqdm.auto import tqdm

        if steps is None and minutes is None:
            raise ValueError("give steps (the total number of updates) and/or minutes (a wall-clock budget)")
        if steps is not None and (isinstance(steps, bool) or not isinstance(steps, int) or steps < 0):
            raise ValueError(f"steps must be an int >= 0, got {steps!r}")
        if minutes is not None and not minutes > 0:
            raise ValueError(f"minutes must be > 0, got {minutes!r}")
        cfg = self.cfg
        target = steps if steps is not None else None
        t_start = time.perf_counter()
        deadline = t_start + 60.0 * minutes if minutes is not None else math.inf
        start_step = self.step
        if self.out_dir is not None:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            _write_json(self.out_dir / "config.json", self.config())
        pbar = tqdm(total=target, initial=self.step, disable=not cfg.progress, desc="train", unit="step",
                    dynamic_ncols=True, mininterval=1.0)
        self._win_t, self._win_step = time.perf_counter(), self.step
        self._interrupted = False
        if self.scaler is not None:  # a step cut short (out of memory, Ctrl-C) after unscale_ left it mid-step
            self.scaler = self._new_scaler(self.scaler.state_dict())
        old_handler = self._install_sigint()
        try:
            while (target is None or self.step < target) and time.perf_counter() < deadline:
                self._consistent = False
                oom = None
                try:
                    self._train_step()
                except torch.cuda.OutOfMemoryError as exc:
                    if isinstance(exc, TrainingOutOfMemoryError):
                        raise
                    oom = self._oom_message(exc)  # ``exc`` (and the step's tensors it holds) ends here
                if oom is not None:
                    pbar.close()
                    self._free_after_oom()
                    raise TrainingOutOfMemoryError(oom)
                self.step += 1
                self._consistent = True
                pbar.update(1)
                # an interrupted step is finished like any other (its log entry, checkpoint and grid), so
                # that a resumed run's history equals an uninterrupted one's; then training stops
                if not self._sync_each_step and self.step % cfg.log_every == 0:
                    self._check_finite()
                if self.step % cfg.log_every == 0:
                    self._log(pbar)
                if cfg.save_every and self.step % cfg.save_every == 0 and self.out_dir is not None:
                    self.save()
                if cfg.sample_every and self.step % cfg.sample_every == 0 and self.out_dir is not None:
                    self._check_finite()
                    self.sample_grid()
                if self._interrupted:
                    break
        except KeyboardInterrupt:
            # Only without our handler (e.g. outside the main thread): save if between two steps.
            pbar.close()
            if getattr(self, "_consistent", False) and self.out_dir is not None:
                self._check_finite()
                self.save()
            raise
        finally:
            self._restore_sigint(old_handler)
        pbar.close()
        self._check_finite()
        # The mean loss of the steps since the last log: reported, but kept out of the history (it
        # continues after a resume, so that a resumed history equals an uninterrupted one).
        final_loss = float(self._loss_sum / self._loss_count) if self._loss_count else (
            self.history[-1][1] if self.history else float("nan"))
        wall = time.perf_counter() - t_start
        done = self.step - start_step
        self.stats = {
            "steps": done,
            "wall_s": wall,
            "images_per_s": done * cfg.batch_size / wall if wall > 0 else float("nan"),
            "last_window_images_per_s": getattr(self, "_last_ips", float("nan")),
            "final_loss": final_loss,
            "compiled": bool(getattr(self, "compiled", False)),
            "bf16": self.use_bf16,
            "fp16": self.use_fp16,
            "skipped_steps": self.skipped_steps,
            "channels_last": self.use_channels_last,
            "fused_adam": self.fused,
            "cuda_graph": bool(self._step_fn is not None and self._step_fn.graphed),
        }
        if self.out_dir is not None:
            self.save()
            if cfg.sample_every and done > 0 and self.step % cfg.sample_every != 0 and not self._interrupted:
                self.sample_grid()
        if self._interrupted:
            raise KeyboardInterrupt(f"training interrupted at step {self.step}; checkpoint saved to "
                                    f"{self.last_checkpoint}")
        return list(self.history)

    def _oom_message(self, exc: BaseException) -> str:
        cfg = self.cfg
        where = f"batch_size {cfg.batch_size}"
        if self.device.type == "cuda":
            with contextlib.suppress(Exception):
                props = torch.cuda.get_device_properties(self.device)
                peak = torch.cuda.max_memory_allocated(self.device)
                where += (f", on {props.name} with {props.total_memory / 2**30:.1f} GiB, of which this process had "
                          f"{peak / 2**30:.1f} GiB allocated at its peak")
        hints = [f"a smaller batch_size (e.g. {max(1, cfg.batch_size // 2)}; --batch-size on the command line)",
                 "a smaller model (a smaller preset, or a smaller ch)"]
        if not (self.use_bf16 or self.use_fp16):
            hints.append("bf16=True on a GPU with native bfloat16 (compute capability 8.0 or newer: A100, L4, "
                         "H100), or fp16=True on an older one (a T4, a V100), which roughly halves the "
                         "activations' memory")
        if self._images is not None and self._images.device.type == "cuda":
            hints.append(f"data_on_device=False (the training set holds "
                         f"{self._images.numel() * self._images.element_size() / 2**30:.2f} GiB of the GPU)")
        hints.append("freeing what other models or notebooks hold on this GPU (in Colab: Runtime > Restart "
                     "session, then run the chapter from the top)")
        ckpt = (f"The last checkpoint is {self.last_checkpoint}." if self.last_checkpoint is not None
                else "No checkpoint was written.")
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        return (f"the GPU ran out of memory in training step {self.step + 1} ({where}). Try {'; '.join(hints)}. "
                f"{ckpt} PyTorch said: {first}")

    def _free_after_oom(self) -> None:
        if self._step_fn is not None:
            self._step_fn.reset()  # drop a captured graph and its memory pool
        self.optimizer.zero_grad(set_to_none=True)
        self._consistent = True  # the weights are those of the last completed update
        if self.device.type == "cuda":
            with contextlib.suppress(Exception):
                torch.cuda.empty_cache()

    def _install_sigint(self):
        if threading.current_thread() is not threading.main_thread():
            return None
        try:
            old = signal.getsignal(signal.SIGINT)
        except (ValueError, AttributeError):
            return None
        if old is signal.SIG_IGN:  # Ctrl-C is ignored in this process (nohup, a background job): keep it so
            return None

        def handler(signum, frame):
            if self._interrupted:  # a second Ctrl-C: stop at once
                raise KeyboardInterrupt
            self._interrupted = True

        try:
            signal.signal(signal.SIGINT, handler)
        except ValueError:
            return None
        return ("installed", old)

    @staticmethod
    def _restore_sigint(old) -> None:
        if old is not None:
            with contextlib.suppress(ValueError, TypeError):
                signal.signal(signal.SIGINT, old[1] if old[1] is not None else signal.default_int_handler)

    def _log(self, pbar) -> None:
        loss = float(self._loss_sum / max(self._loss_count, 1))  # one host synchronisation
        self.history.append((self.step, loss))
        now = time.perf_counter()
        n = self.step - self._win_step
        if n > 0 and now > self._win_t:
            self._last_ips = n * self.cfg.batch_size / (now - self._win_t)
        self._win_t, self._win_step = now, self.step
        self._loss_sum = torch.zeros((), device=self.device)
        self._loss_count = 0
        if pbar is not None:
            pbar.set_postfix(loss=f"{loss:.4f}", img_s=f"{getattr(self, '_last_ips', float('nan')):.0f}",
                             lr=f"{warmup_lr(self.step - 1, self.cfg.lr, self.cfg.warmup):.2e}", refresh=False)
        if self.out_dir is not None:
            self._write_history()
        if self.on_log is not None:
            self.on_log({"step": self.step, "loss": loss, "images_per_s": getattr(self, "_last_ips", float("nan")),
                         "lr": warmup_lr(self.step - 1, self.cfg.lr, self.cfg.warmup)})

    def _write_history(self) -> None:
        if self.out_dir is None:
            return
        _write_json(self.out_dir / "loss_history.json", [[s, l] for s, l in self.history])
        buf = io.StringIO()
        w = csv.writer(buf)
        w.writerow(["step", "loss"])
        w.writerows(self.history)
        _atomic_write(self.out_dir / "loss_history.csv", lambda f: f.write(buf.getvalue().encode()))

    # ------------------------------------------------------------------------------------------ samples
    @torch.no_grad()
    def sample_grid(self, path: Optional[PathLike] = None, n: Optional[int] = None, steps: Optional[int] = None,
                    seed: Optional[int] = None) -> Path:
        """Sample ``n`` images with DDIM (``steps`` steps, eta 0) from the EMA weights and save a grid PNG.

        The same starting noise every time (from ``seed``, default the training seed), so grids at
        different steps are comparable; no random state of the training is touched.
        """
        from .data import save_image_grid
        from .samplers import ddim_sample

        n = n or self.cfg.sample_n
        steps = min(steps or self.cfg.sample_steps, self.diffusion.num_timesteps)
        if path is None:
            if self.out_dir is None:
                raise ValueError("path is required when the trainer has no out_dir")
            path = self.out_dir / "samples" / f"step_{self.step:07d}.png"
        shape = self._sample_shape(n)
        g = torch.Generator().manual_seed(self.cfg.seed if seed is None else seed)
        y = None
        if self.num_classes:
            y = torch.arange(n, device=self.device) % self.num_classes
        message = young_ema_warning(self.step - self.skipped_steps, self.ema.decay, self.ema.warmup)
        if message:
            warnings.warn(f"samples at step {self.step:,}: {message}", RuntimeWarning, stacklevel=3)
        x = ddim_sample(self.ema.model, self.diffusion, shape, steps=steps, eta=0.0, generator=g, y=y,
                        progress=False, device=self.device)
        nrow = max(1, int(math.ceil(math.sqrt(n))))
        return save_image_grid(x, path, nrow=nrow)

    def _sample_shape(self, n: int) -> Tuple[int, ...]:
        shape = self.data_info.get("shape")
        if shape is None:
            raise ValueError("the data's image shape is unknown (an iterable loader): cannot sample a grid")
        return (n, *shape)

    # ------------------------------------------------------------------------------------------ state
    def config(self) -> Dict[str, Any]:
        """The configuration stored in checkpoints: ``model`` (class, preset, config), ``diffusion``,
        ``data`` and ``train`` (the options), all plain JSON values."""
        return {
            "model": _model_config(self.model, self.preset),
            "diffusion": diffusion_config(self.diffusion),
            "data": json.loads(json.dumps(self.data_info)),
            "train": self.cfg.to_dict(),
        }

    def _rng_state(self) -> Dict[str, Any]:
        rng: Dict[str, Any] = {"torch": torch.get_rng_state(), "gen": self.gen.get_state()}
        if self.data_gen is not self.gen:
            rng["data_gen"] = self.data_gen.get_state()
        if self.step_gen is not None:
            rng["step_gen"] = self.step_gen.get_state()
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            rng["cuda"] = torch.cuda.get_rng_state_all()
        return rng

    def state_dict(self) -> Dict[str, Any]:
        """Everything a checkpoint holds (tensors on the CPU)."""
        return {
            "format": CHECKPOINT_FORMAT,
            "version": CHECKPOINT_VERSION,
            "kind": "full",
            "step": self.step,
            "config": self.config(),
            "model": _to_cpu(self.model.state_dict()),
            "ema": _to_cpu(self.ema.state_dict()),
            "optimizer": _to_cpu(self.optimizer.state_dict()),
            "rng": _to_cpu(self._rng_state()),
            "history": [[s, l] for s, l in self.history],
            "loss_window": {"sum": _to_cpu(self._loss_sum), "count": self._loss_count},
            **({"scaler": self.scaler.state_dict()} if self.scaler is not None else {}),
            **({"skipped_steps": self.skipped_steps} if self.scaler is not None or self.skipped_steps else {}),
        }

    def save(self, path: Optional[PathLike] = None) -> Path:
        """Write a checkpoint (default ``out_dir/last.pt``) atomically, after checking that the loss and
        weights are finite (so a bad update is never saved)."""
        if path is None:
            if self.out_dir is None:
                raise ValueError("path is required when the trainer has no out_dir")
            path = self.out_dir / "last.pt"
        self._check_finite()
        self._check_weights()
        path = save_checkpoint(self.state_dict(), path)
        if self.out_dir is not None:
            self._write_history()
        self.last_checkpoint = Path(path)
        return Path(path)

    def load_state_dict(self, state: Mapping[str, Any], path: Any = "checkpoint") -> None:
        """Restore a full checkpoint dict (as :meth:`state_dict`): weights, EMA, optimizer, step,
        history and random states."""
        if state.get("kind") != "full":
            raise CheckpointError(f"{path} is an EMA-only export (for sampling); it cannot be resumed")
        mine = self.config()
        theirs = state["config"]
        check_config(theirs, {"model_config": mine["model"]["config"] or {}}, path)
        check_config(theirs, {"diffusion": {k: v for k, v in mine["diffusion"].items()}}, path)
        # a non-finite step flagged before (the weights it spoilt are being replaced) and a pending interrupt
        self._first_bad.fill_(-1)
        self._interrupted = False
        try:
            self.model.load_state_dict(state["model"])
            self.ema.load_state_dict(state["ema"])
            self.optimizer.load_state_dict(state["optimizer"])
        except (RuntimeError, ValueError, KeyError) as exc:
            raise CheckpointError(f"{path}: cannot restore the training state: {str(exc).splitlines()[0]}") from None
        # This trainer's optimizer, whatever wrote the checkpoint: load_state_dict takes fused/foreach/capturable
        # from the file (a fused CUDA run resumed on a CPU, a float-lr run resumed with a CUDA graph, ...)
        for group in self.optimizer.param_groups:
            group.update(self._opt_flags)
            lr = float(group["lr"])
            group["lr"] = torch.tensor(lr, dtype=torch.float32, device=self.device) if self.use_cuda_graph else lr
            on_device = bool(group.get("capturable") or group.get("fused"))
            for p in group["params"]:
                st = self.optimizer.state.get(p)
                if st and torch.is_tensor(st.get("step")):  # fused/capturable Adam keeps its step count by p
                    st["step"] = (st["step"].to(device=p.device, dtype=torch.float32) if on_device
                                  else st["step"].to("cpu"))
                for k, v in (st or {}).items():  # the moments in the parameter's memory layout: CUDA's fused
                    if torch.is_tensor(v) and v.shape == p.shape and v.stride() != p.stride():  # Adam needs it
                        st[k] = torch.empty_like(p, dtype=v.dtype).copy_(v)  # (a CPU run's checkpoint is
                        # contiguous; channels_last parameters are not)
        if self._step_fn is not None:
            self._step_fn.reset()  # the graph (if any) read the replaced optimizer state
        self.step = int(state["step"])
        self.history = [(int(s), float(l)) for s, l in state.get("history", [])]
        win = state.get("loss_window") or {}
        self._loss_sum = torch.as_tensor(win.get("sum", 0.0), dtype=torch.float32).to(self.device).reshape(())
        self._loss_count = int(win.get("count", 0))
        if self.scaler is not None:  # a checkpoint without one (trained without fp16) starts a fresh scale
            self.scaler = self._new_scaler(state.get("scaler"))
            self._scale = self.scaler.get_scale()
        self.skipped_steps = int(state.get("skipped_steps", 0))  # kept across a resume without fp16 too
        rng = state.get("rng") or {}
        if "torch" in rng:
            torch.set_rng_state(rng["torch"])
        moved = []
        for name, gen in (("gen", self.gen), ("data_gen", None if self.data_gen is self.gen else self.data_gen),
                          ("step_gen", self.step_gen)):
            if name in rng and gen is not None and not _set_generator_state(gen, rng[name]):
                moved.append(name)
        if moved:
            warnings.warn(f"{path} was written by a run whose generators lived on another kind of device "
                          f"({', '.join(moved)}); they are seeded from the checkpoint's states instead, so the "
                          "continuation draws other numbers than the original run would have", RuntimeWarning,
                          stacklevel=2)
        if "cuda" in rng and torch.cuda.is_available():
            states = rng["cuda"]
            if len(states) == torch.cuda.device_count():
                torch.cuda.set_rng_state_all(states)
        self.last_checkpoint = Path(path) if isinstance(path, (str, os.PathLike)) else None

    def resume(self, path: Optional[PathLike] = None) -> "Trainer":
        """Restore the state of a full checkpoint (default ``out_dir/last.pt``); returns ``self``.

        The model and diffusion must be those of the checkpoint (else :class:`CheckpointError` naming
        the keys); the training options are this trainer's (use the checkpoint's for a bit-exact
        continuation; :meth:`from_checkpoint` does that).
        """
        if path is None:
            if self.out_dir is None:
                raise ValueError("path is required when the trainer has no out_dir")
            path = self.out_dir / "last.pt"
        state = read_checkpoint(path, map_location="cpu")
        self.load_state_dict(state, path)
        if self.preset is None:  # the same network (checked above): keep its name in the next checkpoints
            self.preset = ((state.get("config") or {}).get("model") or {}).get("preset")
        return self

    @classmethod
    def from_checkpoint(cls, path: PathLike, data, *, device=None, out_dir: Optional[PathLike] = None,
                        **overrides) -> "Trainer":
        """A trainer rebuilt from a full checkpoint (model, diffusion and training options) and resumed.

        ``overrides`` change training options (e.g. ``save_every``, ``progress``); ``out_dir``
        defaults to the checkpoint's folder.
        """
        state = read_checkpoint(path, map_location="cpu")
        if state.get("kind") != "full":
            raise CheckpointError(f"{path} is an EMA-only export (for sampling); it cannot be resumed")
        config = state["config"]
        model = _build_model(config.get("model", {}), path)
        diffusion = diffusion_from_config(config.get("diffusion", {}))
        train_cfg = TrainConfig.from_dict({**config.get("train", {}), **overrides})
        trainer = cls(model, diffusion, data, device=device,
                      out_dir=Path(path).parent if out_dir is None else out_dir,
                      preset=(config.get("model") or {}).get("preset"), data_info=config.get("data") or None,
                      config=train_cfg)
        trainer.load_state_dict(state, path)
        return trainer


def train(model: nn.Module, diffusion: GaussianDiffusion, data, *, steps: Optional[int] = None,
          minutes: Optional[float] = None, device=None, out_dir: Optional[PathLike] = None,
          resume: Union[bool, PathLike] = False, **options) -> Trainer:
    """Build a :class:`Trainer`, optionally resume it (``resume=True``: from ``out_dir/last.pt`` if it
    exists; or a path), train for ``steps``/``minutes``, and return the trainer."""
    if resume is True and out_dir is None:
        raise ValueError("resume=True resumes from out_dir/last.pt: give out_dir (or resume=<checkpoint path>)")
    trainer = Trainer(model, diffusion, data, device=device, out_dir=out_dir, **options)
    if resume:
        path = trainer.out_dir / "last.pt" if resume is True and trainer.out_dir is not None else resume
        if resume is not True or Path(path).exists():
            trainer.resume(path)
    trainer.train(steps=steps, minutes=minutes)
    return trainer
