"""The fast path on a GPU: bfloat16, ``channels_last``, ``torch.compile``, a fused optimizer and CUDA graphs.

Nothing here changes the mathematics: the network keeps its float32 master weights (and the EMA its
float32 average); only the arithmetic of the forward and backward passes runs in bfloat16 (or float16
with ``fp16=True``) under ``torch.autocast``. Each speed-up is a named option, and each falls back cleanly
where it cannot run:

==================  ==========  ===================================================================
option              default     meaning
==================  ==========  ===================================================================
``bf16``            ``"auto"``  bfloat16 autocast (on for CUDA GPUs with native bf16, compute
                                capability 8.0 or newer: A100, H100, L4, RTX 30xx; off on a T4 or
                                V100, where bf16 is emulated and slower than float32)
``fp16``            ``False``   float16 autocast instead, for GPUs without native bf16 (a T4, a
                                V100); excludes ``bf16=True`` (the Trainer adds loss scaling)
``channels_last``   ``"auto"``  NHWC memory format for weights and activations (on for CUDA)
``compile``         ``"auto"``  ``torch.compile`` (on for CUDA when Triton is there); any failure
                                of the compiler warns once and the model runs eagerly
``cuda_graph``      ``"auto"``  capture the whole training step (forward, backward, clipping, Adam
                                and EMA) or the sampler's forward in one CUDA graph and replay it
==================  ==========  ===================================================================

Three entry points:

* :func:`prepare_model` -> :class:`FastModel`, the network on its device in the chosen formats, called
  like the network (``fast(x, t, y=...)``) under autocast.
* :func:`make_train_step` -> :class:`TrainStep`, one update of Algorithm 1 (sample ``t`` and noise,
  ``q_sample``, forward, the loss, backward, clip the gradient norm, Adam, EMA) with no host
  synchronisation; returns the loss and the gradient norm as device tensors.
* :func:`make_sampler_forward` -> :class:`SamplerForward`, ``eps_theta(x_t, t)`` for the samplers
  (no gradients, float32 output), optionally replayed from a CUDA graph per input shape.

Shapes follow the library: ``x (B, C, H, W)``, ``t (B,)`` integer timesteps, optional labels
``y (B,)``.
"""
from __future__ import annotations

import contextlib
import math
import warnings
from collections import OrderedDict
from typing import Any, Callable, Dict, List, NamedTuple, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from .unet import AttnBlock, Downsample, ResBlock, UNet, Upsample, _ResAttn

__all__ = [
    "bf16_native",
    "compile_available",
    "prepare_model",
    "FastModel",
    "make_optimizer",
    "make_train_step",
    "TrainStep",
    "make_sampler_forward",
    "SamplerForward",
    "ema_update_",
    "group_norm_from_moments",
    "MomentGroupNorm",
    "TritonGroupNorm",
    "TritonResBlock",
    "set_group_norm",
    "upsample_conv_subpixel",
    "SubpixelUpsample",
    "set_upsample",
    "ChannelPaddedConv2d",
    "set_channel_padding",
    "FoldedUNet",
    "set_residual_fold",
    "upsample_phases",
    "SAMPLER_EXPERIMENTS",
]

Auto = Union[bool, str]
_WARNED: set = set()


def _warn_once(key: str, message: str) -> None:
    if key not in _WARNED:
        _WARNED.add(key)
        warnings.warn(message, RuntimeWarning, stacklevel=3)


def _resolve(value: Auto, name: str, default: bool) -> bool:
    if isinstance(value, bool):
        return value
    if value == "auto":
        return default
    raise ValueError(f"{name} must be True, False or 'auto', got {value!r}")


def _as_device(device) -> torch.device:
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return device


def bf16_native(device) -> bool:
    """Whether ``device`` runs bfloat16 arithmetic natively: a CUDA GPU of compute capability 8.0 or newer.

    Older GPUs (a free Colab T4 is 7.5, a V100 7.0) accept bfloat16 tensors, but cuDNN and cuBLAS run
    them through slow fallbacks, so ``bf16="auto"`` leaves them in float32. Not CUDA: False.
    """
    device = torch.device(device)
    if device.type != "cuda" or not torch.cuda.is_available():
        return False
    try:
        major, _ = torch.cuda.get_device_capability(device)
    except Exception:  # noqa: BLE001 - no usable device: no bf16
        return False
    return major >= 8


def compile_available(device) -> Tuple[bool, str]:
    """Whether ``torch.compile`` with inductor can be expected to work on ``device``, and why not.

    CUDA needs Triton; the CPU needs a C++ compiler (``"auto"`` never compiles on the CPU, where
    compiling costs more than it saves for the book's small runs).
    """
    device = torch.device(device)
    try:
        from torch import _dynamo

        if not _dynamo.is_dynamo_supported():
            return False, "torch.compile (dynamo) is not supported on this Python/platform"
    except Exception as exc:  # noqa: BLE001 - an import failure means no compiler
        return False, f"torch._dynamo is unavailable ({type(exc).__name__}: {exc})"
    if device.type == "cuda":
        try:
            from torch.utils._triton import has_triton

            if not has_triton():
                return False, "Triton is not installed or does not support this GPU"
        except Exception as exc:  # noqa: BLE001
            return False, f"cannot check for Triton ({type(exc).__name__}: {exc})"
        return True, ""
    if device.type == "cpu":
        import shutil

        if not (shutil.which("g++") or shutil.which("c++") or shutil.which("clang++")):
            return False, "no C++ compiler for inductor on the CPU"
        return True, ""
    return False, f"torch.compile is not used on {device.type}"


# ---------------------------------------------------------------------------------------------- the model
class FastModel:
    """A network prepared for fast execution; call it like the network: ``fast(x, t, **kwargs)``.

    Attributes:
        module: the ``nn.Module`` itself (float32 master weights, on ``device``, ``channels_last`` when
            chosen); optimise and checkpoint this.
        forward: what a call runs: the compiled module, or ``module`` after a compiler failure.
        device, bf16, channels_last, fp16: the settings in effect (``fp16``: float16 autocast instead of
            bfloat16, for GPUs without native bf16; it excludes ``bf16``).
        compiled: ``torch.compile`` is in use (False after a fallback); ``compile_error`` says why not.

    A call converts ``x`` to ``channels_last`` (free when it already is) and runs under bfloat16
    autocast when ``bf16`` (float16 when ``fp16``); the output is the network's (in that dtype). The first call of a
    compiled model compiles it; if that fails the failure is reported once as a ``RuntimeWarning`` and
    the model runs eagerly from then on (:meth:`disable_compile`).
    """

    def __init__(self, module: nn.Module, device: torch.device, bf16: bool, channels_last: bool,
                 compile: bool, compile_mode: Optional[str] = None, compile_backend: str = "inductor",
                 fullgraph: bool = False, fp16: bool = False):
        if bf16 and fp16:
            raise ValueError("bf16 and fp16 exclude each other: choose one autocast dtype")
        self.module = module
        self.device = device
        self.bf16 = bf16
        self.fp16 = fp16
        self.channels_last = channels_last
        self.compile_mode = compile_mode
        self.compile_backend = compile_backend
        self.compile_error: Optional[str] = None
        self.forward: Callable = module
        self.compiled = False
        self._first_call_pending = False
        if compile:
            try:
                self.forward = torch.compile(module, mode=compile_mode, backend=compile_backend,
                                             dynamic=False, fullgraph=fullgraph)
                self.compiled = True
                self._first_call_pending = True
            except Exception as exc:  # noqa: BLE001 - any failure of the compiler
                self.disable_compile(exc)

    def parameters(self, recurse: bool = True):
        """The module's parameters (so that samplers find the device)."""
        return self.module.parameters(recurse)

    def autocast(self):
        """The autocast context of this model (``nullcontext`` without bf16 or fp16).

        The weight-cast cache is off: it saves nothing when every weight is used once per forward, and
        it must be off inside CUDA-graph captures."""
        if self.bf16 or self.fp16:
            return torch.autocast(device_type=self.device.type, dtype=torch.float16 if self.fp16 else torch.bfloat16,
                                  cache_enabled=False)
        return contextlib.nullcontext()

    def prepare_input(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` on the model's device and in its memory format."""
        x = x.to(self.device, non_blocking=True)
        if self.channels_last and x.ndim == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        return x

    def disable_compile(self, exc: BaseException) -> None:
        """Give up on ``torch.compile`` (warn once) and run ``module`` eagerly from now on."""
        self.compile_error = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0][:300] if str(exc) else ''}"
        _warn_once(f"compile:{type(self.module).__name__}:{self.compile_error}",
                   f"torch.compile failed for {type(self.module).__name__} ({self.compile_error}); "
                   "running eagerly")
        self.forward = self.module
        self.compiled = False
        self._first_call_pending = False

    def __call__(self, x: torch.Tensor, t: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        x = self.prepare_input(x)
        if self._first_call_pending:
            try:
                with self.autocast():
                    out = self.forward(x, t, **kwargs)
                self._first_call_pending = False
                return out
            except Exception as exc:  # noqa: BLE001 - compiler failures surface on the first call
                with self.autocast():
                    out = self.module(x, t, **kwargs)  # an error here is the input's: it propagates
                self.disable_compile(exc)
                return out
        with self.autocast():
            return self.forward(x, t, **kwargs)


def prepare_model(model: nn.Module, device=None, *, bf16: Auto = "auto", fp16: bool = False,
                  channels_last: Auto = "auto",
                  compile: Auto = "auto", compile_mode: Optional[str] = None, compile_backend: str = "inductor",
                  fullgraph: bool = False, group_norm: Optional[str] = None,
                  upsample: Optional[str] = None, pad_channels: Optional[int] = None,
                  residual_fold: Optional[bool] = None) -> FastModel:
    """Move ``model`` to ``device`` in float32 (its master weights) and set up the fast path.

    Args:
        model: the network, called as ``model(x, t, **kwargs)``. It is moved and converted **in place**
            (``.to(device).float()``, ``channels_last``); the returned :class:`FastModel` wraps it.
        device: default: the device of ``model``'s parameters.
        bf16: True, False or ``"auto"`` (on for CUDA GPUs with native bf16, :func:`bf16_native`).
        fp16: float16 autocast instead (default False), for GPUs without native bf16 (a T4, a V100); ``bf16``
            must then be False or ``"auto"`` (which turns it off). For inference: no loss scaling needed.
        channels_last: True, False or ``"auto"`` (on for CUDA).
        compile: True, False or ``"auto"`` (on for CUDA when :func:`compile_available`). A model that
            cannot be compiled runs eagerly after one ``RuntimeWarning``; it never raises.
        compile_mode: ``torch.compile``'s ``mode`` (None: default; ``"max-autotune-no-cudagraphs"``
            compiles much longer). Leave ``"reduce-overhead"`` to :func:`make_train_step`'s
            ``cuda_graph``, which captures the optimizer too.
        compile_backend: ``"inductor"``; ``"eager"`` traces without generating kernels (for tests).
        group_norm: None (leave the model's GroupNorms as they are), ``"native"``, ``"moments"`` or
            ``"triton"`` (:func:`set_group_norm`; the last two are experiments).
        upsample: None (leave the model's upsampling layers as they are), ``"nearest"`` or ``"subpixel"``
            (:func:`set_upsample`; an experiment).
        pad_channels: None (leave the convolutions as they are) or a multiple such as 8: pad the channels of
            the convolutions that have another count (:func:`set_channel_padding`; an experiment).
        residual_fold: None (leave the model as it is), True or False: fold the U-Net's residual additions, skip
            concatenations and convolution biases into the GroupNorms that follow them (:func:`set_residual_fold`;
            an experiment).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if device is None:
        try:
            device = next(model.parameters()).device
        except StopIteration:
            device = torch.device("cpu")
    device = _as_device(device)
    cuda = device.type == "cuda"
    if not isinstance(fp16, bool):
        raise ValueError(f"fp16 must be True or False, got {fp16!r}")
    if fp16 and bf16 is True:
        raise ValueError("bf16=True and fp16=True exclude each other: choose one autocast dtype")
    use_bf16 = _resolve(bf16, "bf16", cuda and bf16_native(device)) and not fp16
    use_cl = _resolve(channels_last, "channels_last", cuda)
    ok, why = compile_available(device)
    use_compile = _resolve(compile, "compile", cuda and ok)
    if use_compile and not ok and compile_backend == "inductor":
        _warn_once(f"compile-unavailable:{why}", f"torch.compile is unavailable ({why}); running eagerly")
        use_compile = False
    _set_variants(model, group_norm, upsample, pad_channels, residual_fold)
    model = model.to(device).float()
    if use_cl:
        model = model.to(memory_format=torch.channels_last)
    fast = FastModel(model, device, use_bf16, use_cl, use_compile, compile_mode, compile_backend, fullgraph,
                     fp16=fp16)
    if use_compile and not fast.compiled and fast.compile_error is None:
        fast.compile_error = why or "unknown"
    return fast


# ---------------------------------------------------------------------------------------------- GroupNorm
def _set_variants(model: nn.Module, group_norm: Optional[str] = None, upsample: Optional[str] = None,
                  pad_channels: Optional[int] = None, residual_fold: Optional[bool] = None) -> None:
    """:func:`prepare_model`'s ``group_norm``, ``upsample``, ``pad_channels`` and ``residual_fold`` (None: leave
    that part of ``model`` as it is), set in place."""
    if group_norm is not None:
        set_group_norm(model, group_norm)
    if upsample is not None:
        set_upsample(model, upsample)
    if pad_channels is not None:
        set_channel_padding(model, pad_channels)
    if residual_fold is not None:
        set_residual_fold(model, residual_fold)


#: the inference experiments that make_sampler_forward(experimental=True) sets up (:func:`prepare_model`'s options;
#: the benchmark's mode ``fast_fold``)
SAMPLER_EXPERIMENTS: Dict[str, Any] = dict(group_norm="triton", upsample="subpixel", pad_channels=8, residual_fold=True)


def group_norm_from_moments(x: torch.Tensor, num_groups: int, weight: Optional[torch.Tensor] = None,
                            bias: Optional[torch.Tensor] = None, eps: float = 1e-5) -> torch.Tensor:
    """``F.group_norm`` computed from per-channel sums: the same function, in another order of work.

    Each channel's sum and sum of squares over its spatial positions (taken about the channel's first value,
    so that a large mean does not cancel the variance away) are combined into each group's mean and
    variance with the parallel-variance formula; the normalisation is then one multiply-add per element
    with a per-(sample, channel) scale and shift. In ``channels_last`` memory both reductions read the
    activation once, contiguously, and a compiler fuses them into one pass (and the multiply-add into what
    follows: SiLU, a residual add); this is an experiment against the GPU's own GroupNorm kernels, whose
    time the first profile on an H200 put at 14 of the 38 ms of a forward pass at batch 1024.
    The arithmetic is float32; the result is float32 for float32 input and under autocast (as
    ``F.group_norm`` under CUDA's autocast; CPU autocast keeps bfloat16 there), else ``x``'s dtype. An input
    without spatial dimensions, ``(N, C)``, goes to ``F.group_norm``.
    """
    N, C = x.shape[0], x.shape[1]
    if C % num_groups:
        raise ValueError(f"num_groups {num_groups} does not divide {C} channels")
    if x.ndim < 3:
        return nn.functional.group_norm(x, num_groups, weight, bias, eps)
    dims = tuple(range(2, x.ndim))
    cpg = C // num_groups
    per_channel = math.prod(x.shape[2:])
    xf = x.float()
    pivot = xf[(slice(None), slice(None)) + (0,) * len(dims)].detach()  # (N, C): each channel's first value
    pv = pivot.reshape((N, C) + (1,) * len(dims))
    d = xf - pv
    s1, s2 = d.sum(dims), (d * d).sum(dims)  # (N, C)
    mean_c = pivot + s1 / per_channel
    m2_c = (s2 - s1 * s1 / per_channel).clamp_min(0)  # sum of squared deviations from mean_c
    mean_c, m2_c = mean_c.view(N, num_groups, cpg), m2_c.view(N, num_groups, cpg)
    mean_g = mean_c.mean(-1, keepdim=True)
    var_g = (m2_c.sum(-1, keepdim=True) + per_channel * ((mean_c - mean_g) ** 2).sum(-1, keepdim=True)) \
        / (per_channel * cpg)
    rstd = torch.rsqrt(var_g + eps)  # (N, G, 1)
    scale = rstd.expand(N, num_groups, cpg).reshape(N, C)
    shift = (-mean_g * rstd).expand(N, num_groups, cpg).reshape(N, C)
    if weight is not None:
        scale = scale * weight.float()
        shift = shift * weight.float()
    if bias is not None:
        shift = shift + bias.float()
    shape = (N, C) + (1,) * len(dims)
    out = xf * scale.reshape(shape) + shift.reshape(shape)
    return out if (x.dtype == torch.float32 or _autocast_on(x.device.type)) else out.to(x.dtype)


def _autocast_on(device_type: str) -> bool:
    try:
        return torch.is_autocast_enabled(device_type)  # torch >= 2.4
    except TypeError:
        return torch.is_autocast_cpu_enabled() if device_type == "cpu" else torch.is_autocast_enabled()


class MomentGroupNorm(nn.GroupNorm):
    """:class:`torch.nn.GroupNorm` (same parameters, same state dict, same function) computed by
    :func:`group_norm_from_moments`; :func:`set_group_norm` switches a network's GroupNorms to it and back."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return group_norm_from_moments(x, self.num_groups, self.weight, self.bias, self.eps)


_KERNELS = None  # ddpm_lib.kernels, imported by set_group_norm(..., "triton") (it imports Triton)


def _kernels():
    global _KERNELS
    if _KERNELS is None:
        from . import kernels
        _KERNELS = kernels
    return _KERNELS


class TritonGroupNorm(nn.GroupNorm):
    """:class:`torch.nn.GroupNorm` (same parameters, same state dict, same function) that runs the Triton
    kernel :func:`ddpm_lib.kernels.group_norm_act` where it applies (CUDA, no gradient: sampling) and
    PyTorch's GroupNorm elsewhere. :meth:`forward_act` adds a per-(sample, channel) term first and applies
    SiLU after, in the same pass; :class:`TritonResBlock` uses it."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # where the kernel does not apply, group_norm_act is F.group_norm itself
        return _kernels().group_norm_act(x, self.num_groups, self.weight, self.bias, self.eps)

    def forward_act(self, x: torch.Tensor, add: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``SiLU(GroupNorm(x + add[:, :, None, None]))``; ``add (N, C)`` or None."""
        return _kernels().group_norm_act(x, self.num_groups, self.weight, self.bias, self.eps, add, act=True)


class TritonResBlock(ResBlock):
    """:class:`ddpm_lib.unet.ResBlock` (same parameters, same function) whose two GroupNorm+SiLU run as one
    kernel each (:class:`TritonGroupNorm`) where the kernel applies; the first convolution's bias and the
    time-embedding term are added inside the second kernel instead of in a pass of their own (the block of
    :class:`FoldedUNet`, with its output added up at once)."""

    def forward(self, x: torch.Tensor, emb_act: torch.Tensor) -> torch.Tensor:
        if not (isinstance(self.norm1, TritonGroupNorm) and isinstance(self.norm2, TritonGroupNorm)
                and _foldable(self)):
            return super().forward(x, emb_act)
        # the kernel falls back to PyTorch's operators (same function) wherever it does not apply
        return _total(_res_block(self, x, emb_act)[1])


GROUP_NORMS = ("native", "moments", "triton")


def set_group_norm(model: nn.Module, kind: str = "native") -> int:
    """Compute every ``nn.GroupNorm`` of ``model`` in place (the parameters are untouched) with PyTorch's
    kernels (``"native"``), from per-channel moments (``"moments"``, :class:`MomentGroupNorm`), or with the
    Triton kernel of :mod:`ddpm_lib.kernels` where it applies (``"triton"``: :class:`TritonGroupNorm`, and
    each residual block's GroupNorm+SiLU fused, :class:`TritonResBlock`; PyTorch's GroupNorm wherever a
    gradient is needed). ``"moments"`` and ``"triton"`` are experiments. Returns how many GroupNorms it set."""
    if kind not in GROUP_NORMS:
        raise ValueError(f"group_norm must be one of {GROUP_NORMS}, got {kind!r}")
    if kind == "triton":
        _kernels()
    norm_cls = {"native": nn.GroupNorm, "moments": MomentGroupNorm, "triton": TritonGroupNorm}[kind]
    n = 0
    for m in model.modules():
        if type(m) in (nn.GroupNorm, MomentGroupNorm, TritonGroupNorm):
            m.__class__ = norm_cls
            n += 1
        elif type(m) in (ResBlock, TritonResBlock):
            m.__class__ = TritonResBlock if kind == "triton" else ResBlock
    return n


# ---------------------------------------------------------------------------------------------- residual folding
class _Sum(NamedTuple):
    """``a + b + bias[:, None, None]`` (``b`` and ``bias`` optional), not computed yet: the next GroupNorm adds it
    up in its own pass. ``_Sum(a, None, bias)`` is a convolution's output before its bias."""
    a: torch.Tensor
    b: Optional[torch.Tensor]
    bias: Optional[torch.Tensor]


class _Phases(NamedTuple):
    """An upsampling's output as its four phases ``z`` (:func:`upsample_conv_subpixel`'s convolution, without its
    ``bias``), not interleaved yet: the next GroupNorm reads each position from its phase."""
    z: torch.Tensor
    bias: Optional[torch.Tensor]


_Pending = Union[torch.Tensor, _Sum, _Phases]


def _total(v: _Pending) -> torch.Tensor:
    """``v`` computed (PyTorch's operators; the compiler fuses them into one pass)."""
    if isinstance(v, torch.Tensor):
        return v
    if isinstance(v, _Phases):
        s = _kernels().subpixel_interleave(v.z)
    else:
        s = v.a if v.b is None else v.a + v.b
    return s if v.bias is None else s + v.bias.to(s.dtype)[:, None, None]


def _norm_in(norm: nn.GroupNorm, v: _Pending, act: bool, x2: Optional[torch.Tensor] = None,
             need_input: bool = True) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """``(SiLU(GroupNorm(u)), u)`` (SiLU with ``act``) for ``u = cat([v, x2])``, ``v`` added up (or interleaved)
    in the same pass (:func:`ddpm_lib.kernels.group_norm_act`, which falls back to PyTorch's operators); ``u`` is
    None unless ``need_input`` or it exists already."""
    k = _kernels()
    res, sub = None, False
    if isinstance(v, _Phases):
        a, sub = v.z, True
    elif isinstance(v, _Sum):
        a, res = v.a, v.b
    else:
        a = v
    add = None if isinstance(v, torch.Tensor) or v.bias is None else v.bias.to(a.dtype)
    if res is None and add is None and x2 is None and not sub:
        return k.group_norm_act(a, norm.num_groups, norm.weight, norm.bias, norm.eps, act=act), a
    out = k.group_norm_act(a, norm.num_groups, norm.weight, norm.bias, norm.eps, add, act, res=res, x2=x2,
                           return_input=need_input, subpixel=sub)
    return out if need_input else (out, None)


def _plain_conv(conv: nn.Module) -> bool:
    return type(conv) in (nn.Conv2d, ChannelPaddedConv2d) and conv.padding_mode == "zeros" \
        and not isinstance(conv.padding, str)


def _conv_nobias(conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """``conv(x)`` without its bias (a :func:`_plain_conv`)."""
    if type(conv) is ChannelPaddedConv2d:
        return conv.padded_forward(x, None)
    return nn.functional.conv2d(x, conv.weight, None, conv.stride, conv.padding, conv.dilation, conv.groups)


def _unadded(conv: nn.Module, x: torch.Tensor) -> _Pending:
    """``conv(x)``, its bias not added yet where it is a :func:`_plain_conv` (the next GroupNorm adds it)."""
    if not _plain_conv(conv):
        return conv(x)
    return _Sum(_conv_nobias(conv, x), None, conv.bias)


def _resample(block: nn.Module, x: torch.Tensor) -> _Pending:
    """A :class:`ddpm_lib.unet.Downsample` or :class:`ddpm_lib.unet.Upsample` of ``x``, its convolution's bias not
    added yet (and a :class:`SubpixelUpsample`'s output not interleaved) where that applies; else ``block(x)``."""
    conv = getattr(block, "conv", None)
    if type(block) is Downsample and _plain_conv(conv):
        return _unadded(conv, nn.functional.pad(x, (0, 1, 0, 1)) if block.asymmetric else x)
    if type(block) is Upsample and _plain_conv(conv):
        return _unadded(conv, nn.functional.interpolate(x, scale_factor=2.0, mode="nearest"))
    if type(block) is SubpixelUpsample and block.applies():
        return _Phases(upsample_phases(x, conv.weight), conv.bias)
    return block(x)


def _foldable(blk: nn.Module) -> bool:
    """A residual block whose convolutions :func:`_res_block` can run without their biases."""
    return (isinstance(blk, ResBlock) and _plain_conv(blk.conv1) and _plain_conv(blk.conv2)
            and (type(blk.skip) is nn.Identity or _plain_conv(blk.skip)))


def _res_block(blk: ResBlock, v: _Pending, emb_act: torch.Tensor,
               x2: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, _Pending]:
    """``(u, out)``: the block's input ``u = cat([v, x2])``, computed by its first GroupNorm's pass, and its output
    ``skip(u) + conv2(...)`` as a :class:`_Sum` (the convolutions' biases in it), for the next GroupNorm (a block
    of another kind: its own forward, the output computed)."""
    if not _foldable(blk):
        u = _total(v) if x2 is None else torch.cat([_total(v), x2], dim=1)
        return u, blk(u, emb_act)
    y1, u = _norm_in(blk.norm1, v, True, x2)
    h = _conv_nobias(blk.conv1, y1)
    e = blk.emb_proj(emb_act)
    if blk.conv1.bias is not None:
        e = e + blk.conv1.bias
    n2 = blk.norm2
    h = _conv_nobias(blk.conv2, blk.dropout(_kernels().group_norm_act(h, n2.num_groups, n2.weight, n2.bias, n2.eps,
                                                                       e, act=True)))
    bias, skip = blk.conv2.bias, blk.skip
    if type(skip) is nn.Identity:
        r = u
    else:
        r = _conv_nobias(skip, u)
        if skip.bias is not None:
            bias = skip.bias if bias is None else bias + skip.bias
    return u, _Sum(h, r, bias)


def _attn_block(blk: AttnBlock, v: _Pending) -> Tuple[torch.Tensor, _Pending]:
    """``(u, out)``: the block's input, computed by its GroupNorm's pass, and ``u + proj_out(attention)`` as a
    :class:`_Sum`."""
    if type(blk) is not AttnBlock:
        u = _total(v)
        return u, blk(u)
    y, u = _norm_in(blk.norm, v, False)
    B, C, H, W = u.shape
    q, k, vv = blk.qkv(y.permute(0, 2, 3, 1).reshape(B, H * W, C)).unsqueeze(1).chunk(3, dim=-1)
    o = nn.functional.scaled_dot_product_attention(q, k, vv)
    p = nn.functional.linear(o.reshape(B, H * W, C), blk.proj_out.weight)
    return u, _Sum(u, p.reshape(B, H, W, C).permute(0, 3, 1, 2), blk.proj_out.bias)


class FoldedUNet(UNet):
    """:class:`ddpm_lib.unet.UNet` (same parameters, same function) whose residual additions and skip
    concatenations are folded into the GroupNorm that follows them (:func:`ddpm_lib.kernels.group_norm_act`
    with ``res``, ``x2`` and ``return_input``): a residual block's output ``skip(x) + h`` (and an attention
    block's ``x + proj_out(...)``) is not written and read back before the next GroupNorm; that GroupNorm adds
    it up and, where a later layer needs the sum (the skip connections, the 1x1 convolution, the residual), writes
    it in the same pass. The up path's ``cat([h, skip])`` is formed the same way, and so are the first convolution's,
    the downsamplings' and the upsamplings' outputs: their biases are added (and a :class:`SubpixelUpsample`'s
    four phases interleaved, :func:`set_upsample`) by the GroupNorm that reads them. Where the kernel does not apply
    (a CPU, gradients) each step is PyTorch's operators, so the function is the same everywhere. Every GroupNorm
    of the network runs through :func:`ddpm_lib.kernels.group_norm_act`, whatever :func:`set_group_norm` chose,
    and the residual blocks' first convolution bias and time-embedding term are added in the second GroupNorm's
    pass as :class:`TritonResBlock` does. An experiment for inference (:func:`set_residual_fold`)."""

    def _forward(self, x: torch.Tensor, t: torch.Tensor, y: Optional[torch.Tensor]) -> torch.Tensor:
        emb_act = self._embedding(t, y)
        v = _unadded(self.conv_in, x)
        # the skip connections: each output of conv_in and of the down path, appended once the next block has
        # computed it (a residual block's first GroupNorm writes its input)
        hs: List[torch.Tensor] = []
        for block in self.down:
            if isinstance(block, _ResAttn):
                u, v = _res_block(block.res, v, emb_act)
                hs.append(u)
                if not isinstance(block.attn, nn.Identity):
                    _, v = _attn_block(block.attn, v)
            else:
                v = _total(v)
                hs.append(v)
                v = _resample(block, v)
        u, v = _res_block(self.mid.res, v, emb_act)
        hs.append(u)
        if not isinstance(self.mid.attn, nn.Identity):
            _, v = _attn_block(self.mid.attn, v)
        _, v = _res_block(self.mid2, v, emb_act)
        for block in self.up:
            if isinstance(block, Upsample):
                v = _resample(block, _total(v))
            else:
                _, v = _res_block(block.res, v, emb_act, x2=hs.pop())
                if not isinstance(block.attn, nn.Identity):
                    _, v = _attn_block(block.attn, v)
        out, _ = _norm_in(self.norm_out, v, True, need_input=False)
        return self.conv_out(out)


def set_residual_fold(model: nn.Module, on: bool = True) -> int:
    """Fold the residual additions, skip concatenations and convolution biases (and the interleaving of a
    :class:`SubpixelUpsample`'s phases) of every :class:`ddpm_lib.unet.UNet` in ``model`` into the GroupNorms that
    follow them (:class:`FoldedUNet`), in place, or (``on=False``) undo it. The parameters
    are untouched. An experiment for inference. Returns how many networks it set."""
    n = 0
    for m in model.modules():
        if type(m) in (UNet, FoldedUNet):
            m.__class__ = FoldedUNet if on else UNet
            n += 1
    return n


# ---------------------------------------------------------------------------------------------- upsampling
def _phase_taps(w: torch.Tensor, phase: int, dim: int) -> torch.Tensor:
    """The 3 taps of ``w`` along ``dim`` summed into the 2 of an output ``phase`` (row or column parity of the
    upsampled image): the taps that fall on the low-resolution pixel before, and on the one at or after:
    phase 0: ``(w0, w1 + w2)``, phase 1: ``(w0 + w1, w2)``. Slices of ``w``, no host constant, so that an eager
    forward can be captured in a CUDA graph."""
    w0, w1, w2 = w.unbind(dim)
    return torch.stack((w0, w1 + w2) if phase == 0 else (w0 + w1, w2), dim)


def upsample_conv_subpixel(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``conv2d(interpolate(x, scale_factor=2, mode="nearest"), weight, bias, padding=1)`` for a 3x3 ``weight``,
    computed at the low resolution: the same function with 4/9 of the multiply-adds (plus the border).

    Output pixel ``(2i+a, 2j+b)`` of the convolution over the upsampled image sees low-resolution rows
    ``i-1, i`` (``a = 0``: taps 0 | 1+2) or ``i, i+1`` (``a = 1``: taps 0+1 | 2), and the same for columns.
    So the four phases ``(a, b)`` are four 2x2 convolutions of ``x`` whose kernels are sums of the 3x3
    kernel's taps; they run as one 2x2 convolution with ``4 * C_out`` outputs and padding 1 (output
    ``(H+1, W+1)``, phase ``(a, b)`` taken at offset ``(a, b)``, :func:`upsample_phases`), interleaved into the
    ``(2H, 2W)`` result in the convolution's memory format (``x``'s) by
    :func:`ddpm_lib.kernels.subpixel_interleave`, and the bias added. Gradients flow to ``weight`` through the
    sums. Shapes: ``x (B, C, H, W)``, ``weight (O, C, 3, 3)`` -> ``(B, O, 2H, 2W)``.
    """
    if weight.shape[-2:] != (3, 3):
        raise ValueError(f"a 3x3 kernel is needed, got {tuple(weight.shape)}")
    out = _kernels().subpixel_interleave(upsample_phases(x, weight))
    return out if bias is None else out + bias.to(out.dtype)[:, None, None]


def upsample_phases(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """The four phases of :func:`upsample_conv_subpixel` (without bias) before they are interleaved: one 2x2
    convolution with ``4 * O`` outputs and padding 1, ``(B, C, H, W)`` -> ``(B, 4 O, H + 1, W + 1)``
    (:func:`ddpm_lib.kernels.subpixel_interleave`)."""
    O = weight.shape[0]
    # phase p = 2 a + b: rows summed for a, then columns for b -> (a, b, O, C, 2, 2)
    k = torch.stack([torch.stack([_phase_taps(_phase_taps(weight, a, 2), b, 3) for b in (0, 1)]) for a in (0, 1)])
    return nn.functional.conv2d(x, k.reshape(4 * O, weight.shape[1], 2, 2), None, padding=1)


class SubpixelUpsample(Upsample):
    """:class:`ddpm_lib.unet.Upsample` (same parameters, same function) computed by
    :func:`upsample_conv_subpixel`: its convolution at the low resolution, 4/9 of the work."""

    def applies(self) -> bool:
        """Whether the convolution is one that :func:`upsample_conv_subpixel` computes (3x3, padding 1)."""
        conv = self.conv
        return (type(conv) is nn.Conv2d and conv.kernel_size == (3, 3) and conv.padding == (1, 1)
                and conv.stride == (1, 1) and conv.dilation == (1, 1) and conv.groups == 1
                and conv.padding_mode == "zeros")

    def forward(self, x: torch.Tensor, emb_act: Optional[torch.Tensor] = None) -> torch.Tensor:
        if not self.applies():
            return super().forward(x, emb_act)
        return upsample_conv_subpixel(x, self.conv.weight, self.conv.bias)


UPSAMPLES = ("nearest", "subpixel")


def set_upsample(model: nn.Module, kind: str = "nearest") -> int:
    """Compute every :class:`ddpm_lib.unet.Upsample` of ``model`` in place as written (``"nearest"``: upsample,
    then convolve) or at the low resolution (``"subpixel"``: :func:`upsample_conv_subpixel`, the same function
    with fewer multiply-adds; an experiment). The parameters are untouched. Returns how many it set."""
    if kind not in UPSAMPLES:
        raise ValueError(f"upsample must be one of {UPSAMPLES}, got {kind!r}")
    n = 0
    for m in model.modules():
        if type(m) in (Upsample, SubpixelUpsample):
            m.__class__ = SubpixelUpsample if kind == "subpixel" else Upsample
            n += 1
    return n


# ---------------------------------------------------------------------------------------------- channel padding
class ChannelPaddedConv2d(nn.Conv2d):
    """:class:`torch.nn.Conv2d` (same parameters, same state dict, same function) that pads its input and output
    channels with zeros up to a multiple of :attr:`pad_multiple` for the computation. cuDNN's fast bf16
    kernels want channel counts that are multiples of 8 (16 bytes); the network's first convolution reads 3
    channels and its last writes 3, and the first GPU run timed the first, alone, at 11 TFLOP/s where the 3x3
    convolutions of stride 1 ran at 390-650. Zero channels add exact zeros: the output is the same up to the
    order of the sums."""

    pad_multiple = 8

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.padded_forward(x, self.bias)

    def padded_forward(self, x: torch.Tensor, b: Optional[torch.Tensor]) -> torch.Tensor:
        """The convolution of ``x`` with this module's weight and the bias ``b`` (None: none), padded."""
        m = self.pad_multiple
        O, I = self.out_channels, self.in_channels
        pi, po = -I % m, -O % m
        if self.groups != 1 or self.padding_mode != "zeros" or not (pi or po) or x.dim() != 4:
            return self._conv_forward(x, self.weight, b)
        w = self.weight
        if pi:
            w = nn.functional.pad(w, (0, 0, 0, 0, 0, pi))
            x = nn.functional.pad(x, (0, 0, 0, 0, 0, pi))  # keeps x's memory format
        if po:
            w = nn.functional.pad(w, (0, 0, 0, 0, 0, 0, 0, po))
            b = None if b is None else nn.functional.pad(b, (0, po))
        y = nn.functional.conv2d(x, w, b, self.stride, self.padding, self.dilation)
        return y[:, :O] if po else y


def set_channel_padding(model: nn.Module, multiple: Optional[int] = 8) -> int:
    """Pad the channels of every ``nn.Conv2d`` of ``model`` whose input or output channel count is not a multiple
    of ``multiple`` (:class:`ChannelPaddedConv2d`; in the paper's U-Net: the first and the last convolution), in
    place; ``None`` or 0 undoes it. The parameters are untouched. An experiment. Returns how many it set."""
    n = 0
    for mod in model.modules():
        if type(mod) not in (nn.Conv2d, ChannelPaddedConv2d):
            continue
        if multiple and mod.groups == 1 and (mod.in_channels % multiple or mod.out_channels % multiple):
            mod.__class__ = ChannelPaddedConv2d
            mod.pad_multiple = int(multiple)
            n += 1
        elif type(mod) is ChannelPaddedConv2d:
            mod.__class__ = nn.Conv2d
            mod.__dict__.pop("pad_multiple", None)
    return n


# ---------------------------------------------------------------------------------------------- the optimizer
def make_optimizer(params, lr: float = 2e-4, betas: Tuple[float, float] = (0.9, 0.999), eps: float = 1e-8, *,
                   fused: Auto = "auto", capturable: bool = False) -> torch.optim.Adam:
    """The paper's Adam (lr 2e-4, betas 0.9/0.999, eps 1e-8), fused into a few kernels on CUDA.

    ``capturable=True`` (CUDA only) keeps the step counter and the learning rate on the device (the
    learning rate as a 0-d tensor), so that :class:`TrainStep` can capture ``optimizer.step()`` in a
    CUDA graph and still change the learning rate every step (the warm-up) without re-capturing.
    """
    params = list(params)
    if not params:
        raise ValueError("params is empty")
    device = params[0].device if torch.is_tensor(params[0]) else params[0]["params"][0].device
    cuda = device.type == "cuda"
    use_fused = _resolve(fused, "fused", cuda)
    if capturable and not cuda:
        raise ValueError("capturable=True needs parameters on a CUDA device")
    kw: Dict[str, Any] = dict(betas=tuple(betas), eps=eps)
    if capturable:
        kw["capturable"] = True
        lr_value: Union[float, torch.Tensor] = torch.tensor(float(lr), dtype=torch.float32, device=device)
    else:
        lr_value = float(lr)
    if use_fused:
        try:
            return torch.optim.Adam(params, lr=lr_value, fused=True, **kw)
        except (RuntimeError, TypeError, ValueError) as exc:
            _warn_once(f"fused-adam:{exc}", f"fused Adam is unavailable ({exc}); using the foreach Adam")
    if capturable:
        kw["foreach"] = True
    return torch.optim.Adam(params, lr=lr_value, **kw)


def _is_capturable(optimizer: torch.optim.Optimizer) -> bool:
    return all(bool(g.get("capturable", False)) for g in optimizer.param_groups)


# ---------------------------------------------------------------------------------------------- EMA
@torch.no_grad()
def ema_update_(ema_params: Sequence[torch.Tensor], params: Sequence[torch.Tensor],
                weight: Union[float, torch.Tensor]) -> None:
    """``ema <- ema + weight * (param - ema)`` for every tensor, with ``weight = 1 - decay`` (book ``eq-ema``).

    A float weight uses one fused ``lerp``; a 0-d tensor weight (for a CUDA graph whose decay changes,
    e.g. during an EMA warm-up) uses ``sub``, ``mul`` and ``add``. Both are float32 and equal up to
    rounding. No host synchronisation.
    """
    ema_params, params = list(ema_params), [p.detach() for p in params]
    if len(ema_params) != len(params):
        raise ValueError(f"ema_params has {len(ema_params)} tensors but params has {len(params)}")
    if torch.is_tensor(weight):
        diff = torch._foreach_sub(params, ema_params)
        torch._foreach_mul_(diff, weight)
        torch._foreach_add_(ema_params, diff)
    else:
        torch._foreach_lerp_(ema_params, params, float(weight))


# ---------------------------------------------------------------------------------------------- CUDA graphs
def _cuda_graph_capture(fn: Callable[[], Any], generators: Sequence[torch.Generator] = ()):
    """Capture ``fn()`` into a new ``torch.cuda.CUDAGraph`` (on the capture's own stream) -> ``(graph, out)``.

    Capturing records the kernels without running them: replay the graph to run them. ``generators``
    other than the device's default one (which torch registers itself) are registered first, so that
    every replay advances their Philox offsets as the eager calls would."""
    graph = torch.cuda.CUDAGraph()
    for gen in generators:
        graph.register_generator_state(gen)
    # The capture allocates its own buffers in a private pool and cannot reuse the regular pool's cached
    # blocks meanwhile: hand those back first. "thread_local": CUDA calls of other threads (a DataLoader's
    # pin-memory thread, say) do not invalidate this thread's capture.
    torch.cuda.empty_cache()
    with torch.cuda.graph(graph, capture_error_mode="thread_local"):
        out = fn()
    return graph, out


# ---------------------------------------------------------------------------------------------- one training step
def _rng_snapshot(device: torch.device, generator: Optional[torch.Generator]):
    return (generator.get_state() if generator is not None else None, torch.get_rng_state(),
            torch.cuda.get_rng_state(device) if device.type == "cuda" else None)


def _rng_restore(device: torch.device, generator: Optional[torch.Generator], snap) -> None:
    if generator is not None:
        generator.set_state(snap[0])
    torch.set_rng_state(snap[1])
    if snap[2] is not None:
        torch.cuda.set_rng_state(snap[2], device)


class TrainStep:
    """One update of Algorithm 1; see :func:`make_train_step`. Call ``step(x0, y=None, lr=None, step=None)``.

    Returns ``(loss, grad_norm)``: the batch's mean loss (float32, detached) and the gradient's global
    norm before clipping (None without clipping), both 0-d tensors on the device, read without a
    host synchronisation. With a CUDA graph they are the graph's output buffers: use them (e.g.
    ``loss_sum += loss``) before the next call, or clone them.

    Attributes: ``fast`` (the :class:`FastModel`), ``graphed`` (the step replays a CUDA graph),
    ``graph_error`` (why a requested graph is not used), ``calls``.
    """

    def __init__(self, fast: FastModel, diffusion, optimizer: torch.optim.Optimizer, ema=None, *,
                 ema_decay: Optional[float] = None, grad_clip: Optional[float] = 1.0, cuda_graph: bool = False,
                 generator: Optional[torch.Generator] = None, warmup_calls: int = 3):
        if getattr(fast, "fp16", False):
            raise ValueError("TrainStep has no loss scaling, which float16 training needs: train an fp16 model "
                             "with Trainer(fp16=True), or prepare it with bf16")
        self.fast = fast
        self.diffusion = diffusion
        self.optimizer = optimizer
        self.grad_clip = None if grad_clip is None else float(grad_clip)
        self.generator = generator
        self.device = fast.device
        self.params = [p for p in fast.module.parameters() if p.requires_grad]
        if not self.params:
            raise ValueError("the model has no trainable parameters")
        # EMA: a ddpm_lib.ema.EMA (its decay_at(step) gives the decay), or a list of tensors + ema_decay
        self.ema = ema
        self._ema_params: Optional[List[torch.Tensor]] = None
        self._ema_buffers: List[Tuple[torch.Tensor, torch.Tensor]] = []
        if ema is not None:
            if hasattr(ema, "model") and hasattr(ema, "decay_at"):
                ema_all = list(ema.model.parameters())
                if len(ema_all) != len(list(fast.module.parameters())):
                    raise ValueError("ema.model does not have the parameters of the model")
                self._ema_params = [e for e, p in zip(ema_all, fast.module.parameters()) if p.requires_grad]
                self._ema_buffers = list(zip(ema.model.buffers(), fast.module.buffers()))
                self._decay_at = ema.decay_at
            else:
                if ema_decay is None:
                    raise ValueError("ema_decay is required when ema is a list of tensors")
                self._ema_params = list(ema)
                if len(self._ema_params) != len(self.params):
                    raise ValueError(f"ema has {len(self._ema_params)} tensors but the model has "
                                     f"{len(self.params)} trainable parameters")
                d = float(ema_decay)
                self._decay_at = lambda step: d
        self.calls = 0
        self._compile_unproven = fast.compiled  # the first step compiles forward and backward
        self.warmup_calls = max(1, int(warmup_calls))
        self.graph_error: Optional[str] = None
        self._want_graph = bool(cuda_graph)
        self._graph: Optional[torch.cuda.CUDAGraph] = None
        self._static: Dict[str, Any] = {}
        if self._want_graph:
            why = self._graph_blocker()
            if why:
                self.graph_error = why
                self._want_graph = False
                _warn_once(f"graph:{why}", f"the training step will not use a CUDA graph: {why}")

    # -------------------------------------------------------------------------------------- state
    @property
    def graphed(self) -> bool:
        return self._graph is not None

    def _graph_blocker(self) -> str:
        if self.device.type != "cuda":
            return "CUDA graphs need a CUDA device"
        if not _is_capturable(self.optimizer):
            return "the optimizer is not capturable (build it with make_optimizer(..., capturable=True))"
        if self.generator is not None and self.generator.device.type != "cuda":
            return "the generator is not a CUDA generator"
        return ""

    def reset(self) -> None:
        """Drop the captured graph (it is captured again after ``warmup_calls`` eager calls).

        Needed after anything that replaces tensors the graph reads: ``optimizer.load_state_dict``,
        new parameter tensors. (Loading weights with ``load_state_dict`` copies in place and is safe.)
        The step detects a replaced optimizer state itself."""
        self._graph = None
        self._static = {}
        self.calls = 0

    def _optimizer_state_ref(self):
        st = self.optimizer.state.get(self.params[0], {})
        return st.get("exp_avg"), [g["lr"] for g in self.optimizer.param_groups]

    def _set_lr(self, lr: float) -> None:
        """Set the learning rate without a host synchronisation (in place for a device tensor, which a
        captured graph reads; a capturable optimizer whose lr came back from a checkpoint as a float or a
        CPU tensor gets a device tensor again, and the graph is captured anew)."""
        for g in self.optimizer.param_groups:
            cur = g["lr"]
            if torch.is_tensor(cur) and cur.device == self.device:
                cur.fill_(float(lr))
            elif g.get("capturable", False) and self.device.type == "cuda":
                g["lr"] = torch.tensor(float(lr), dtype=torch.float32, device=self.device)
            else:
                g["lr"] = float(lr)

    # -------------------------------------------------------------------------------------- the body
    def _body(self, x0: torch.Tensor, y: Optional[torch.Tensor], ema_weight) -> Tuple[torch.Tensor, Any]:
        """Sample t and noise, the loss (``training_losses``), backward, clip, Adam, EMA."""
        fast, gen = self.fast, self.generator
        B = x0.shape[0]
        t = torch.randint(0, self.diffusion.num_timesteps, (B,), device=self.device, generator=gen)
        noise = torch.randn(x0.shape, device=self.device, dtype=x0.dtype, generator=gen)
        kw = {} if y is None else {"y": y}
        self.optimizer.zero_grad(set_to_none=True)
        with fast.autocast():
            losses = self.diffusion.training_losses(fast.forward, x0, t, noise, model_kwargs=kw)
        loss = losses["loss"].float().mean()
        loss.backward()
        gnorm = None
        if self.grad_clip is not None:
            gnorm = torch.nn.utils.clip_grad_norm_(self.params, self.grad_clip,
                                                   foreach=True if self.device.type == "cuda" else None)
        self.optimizer.step()
        if self._ema_params is not None:
            ema_update_(self._ema_params, self.params, ema_weight)
            for b_ema, b in self._ema_buffers:
                b_ema.copy_(b)
        return loss.detach(), gnorm

    def _eager_call(self, x0, y, ema_weight):
        fast = self.fast
        if self._compile_unproven and fast.compiled:
            snap = _rng_snapshot(self.device, self.generator)
            try:
                out = self._body(x0, y, ema_weight)
                self._compile_unproven = False
                fast._first_call_pending = False
                return out
            except Exception as exc:  # noqa: BLE001 - a compiler failure, unless the eager step fails too
                _rng_restore(self.device, self.generator, snap)
                self.optimizer.zero_grad(set_to_none=True)
                compiled_forward, fast.forward = fast.forward, fast.module
                try:
                    out = self._body(x0, y, ema_weight)
                except Exception:
                    fast.forward = compiled_forward  # the input (or the model) is at fault: keep compiling
                    raise
                fast.disable_compile(exc)
                self._compile_unproven = False
                return out
        return self._body(x0, y, ema_weight)

    # -------------------------------------------------------------------------------------- the call
    def __call__(self, x0: torch.Tensor, y: Optional[torch.Tensor] = None, *, lr: Optional[float] = None,
                 step: Optional[int] = None) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """One update on the batch ``x0 (B, C, H, W)`` (labels ``y (B,)``), at learning rate ``lr``.

        ``step`` (0-based index of this update) sets the EMA decay through ``ema.decay_at(step)``
        (default: the number of calls so far).
        """
        if lr is not None:
            self._set_lr(lr)
        step_index = self.calls if step is None else int(step)
        ema_w = None if self._ema_params is None else 1.0 - float(self._decay_at(step_index))
        x0 = x0.to(self.device, non_blocking=True)
        if y is not None:
            y = y.to(self.device, non_blocking=True)
        self.calls += 1

        if not self._want_graph:
            return self._eager_call(self.fast.prepare_input(x0), y, ema_w)
        with torch.cuda.device(self.device):
            return self._graph_call(x0, y, ema_w)

    def _graph_call(self, x0, y, ema_w):
        """The call of a step that wants a CUDA graph: warm-up, capture, then replay (on ``self.device``)."""
        if self._graph is not None and self._graph_matches(x0, y):
            return self._replay(x0, y, ema_w)  # copy_ into the static buffer converts the memory format
        x0 = self.fast.prepare_input(x0)
        if self.calls <= self.warmup_calls or self._graph is not None:
            # warm-up (compile, autotune, lazy initialisation) on a side stream, as CUDA graphs need;
            # or an input the graph was not captured for (another shape): run it eagerly
            if self._graph is not None:
                _warn_once("graph-shape", "an input of another shape or dtype than the captured one: "
                                          "that step runs without the CUDA graph")
            side = torch.cuda.Stream(self.device)
            side.wait_stream(torch.cuda.current_stream(self.device))
            # the EMA weight as a device tensor: the arithmetic the graph replays (sub, mul, add), so that
            # the warm-up steps of a resumed run round as the replays of an uninterrupted one do
            w = None if ema_w is None else torch.tensor(ema_w, dtype=torch.float32, device=self.device)
            with torch.cuda.stream(side):
                out = self._eager_call(x0, y, w)
            torch.cuda.current_stream(self.device).wait_stream(side)
            return out
        try:
            return self._capture(x0, y, ema_w)
        except torch.cuda.OutOfMemoryError:
            self._graph = None  # out of memory is the caller's to handle (a smaller batch), not a fallback
            self._static = {}
            raise
        except Exception as exc:  # noqa: BLE001 - fall back to the eager step
            self._graph = None
            self._static = {}
            self._want_graph = False
            self.graph_error = f"{type(exc).__name__}: {str(exc).strip()[:300]}"
            _warn_once(f"graph-capture:{self.graph_error}",
                       f"CUDA-graph capture of the training step failed ({self.graph_error}); continuing without")
            torch.cuda.synchronize(self.device)
            return self._eager_call(x0, y, ema_w)

    def _graph_matches(self, x0, y) -> bool:
        s = self._static
        if x0.shape != s["x0"].shape or x0.dtype != s["x0"].dtype:
            return False
        if (y is None) != (s["y"] is None) or (y is not None and y.shape != s["y"].shape):
            return False
        if self._optimizer_state_ref()[0] is not s["state_ref"][0] or any(
                a is not b for a, b in zip(self._optimizer_state_ref()[1], s["state_ref"][1])):
            _warn_once("graph-recapture", "the optimizer's state was replaced: capturing the step again")
            self.reset()
            self.calls = self.warmup_calls + 1  # the step is warm: capture at once (this call counts)
            return False
        return True

    def _replay(self, x0, y, ema_w):
        s = self._static
        s["x0"].copy_(x0)
        if y is not None:
            s["y"].copy_(y)
        if ema_w is not None and ema_w != s["ema_w_value"]:
            s["ema_w"].fill_(ema_w)
            s["ema_w_value"] = ema_w
        self._graph.replay()
        return s["loss"], s["gnorm"]

    def _capture(self, x0, y, ema_w):
        dev = self.device
        s: Dict[str, Any] = {
            "x0": x0.clone(memory_format=torch.preserve_format),
            "y": None if y is None else y.clone(),
            "ema_w": torch.tensor(0.0 if ema_w is None else ema_w, dtype=torch.float32, device=dev),
            "ema_w_value": ema_w,
        }
        torch.cuda.synchronize(dev)
        self.optimizer.zero_grad(set_to_none=True)  # the captured backward allocates the gradients
        gen = self.generator
        gens = [gen] if gen is not None and gen.device.type == "cuda" and not any(
            gen is d for d in torch.cuda.default_generators) else []
        graph, (s["loss"], s["gnorm"]) = _cuda_graph_capture(
            lambda: self._body(s["x0"], s["y"], s["ema_w"] if ema_w is not None else None), gens)
        s["state_ref"] = self._optimizer_state_ref()
        self._graph, self._static = graph, s
        graph.replay()  # capturing records the step without running it: run it now
        return s["loss"], s["gnorm"]


def make_train_step(model: Union[FastModel, nn.Module], diffusion, optimizer: torch.optim.Optimizer, ema=None, *,
                    ema_decay: Optional[float] = None, grad_clip: Optional[float] = 1.0, cuda_graph: Auto = "auto",
                    generator: Optional[torch.Generator] = None, warmup_calls: int = 3) -> TrainStep:
    """One training update of Algorithm 1 as a callable, without host synchronisation.

    ``step(x0, y=None, lr=None, step=None) -> (loss, grad_norm)`` draws ``t ~ U{0..T-1}`` and
    ``noise ~ N(0, I)`` (from ``generator`` when given, on the device, in that order, as
    :meth:`GaussianDiffusion.training_losses` does), computes ``diffusion.training_losses`` (book
    ``eq-l-simple``) under the model's autocast, back-propagates, clips the gradient's global norm to
    ``grad_clip`` (foreach), steps ``optimizer`` and updates the EMA (book ``eq-ema``).

    Args:
        model: a :class:`FastModel` (from :func:`prepare_model`) or an ``nn.Module`` (prepared with the
            defaults: bf16, channels_last and compile on CUDA).
        optimizer: over the model's parameters; :func:`make_optimizer` gives the paper's fused Adam.
        ema: a :class:`ddpm_lib.ema.EMA` of the model (``ema.decay_at(step)`` gives each decay), a list of
            float32 tensors shaped like the trainable parameters (with ``ema_decay``), or None.
        cuda_graph: capture the whole step in one CUDA graph after ``warmup_calls`` eager calls (which
            compile and warm up) and replay it; ``"auto"``: on CUDA when the optimizer is capturable
            (``make_optimizer(..., capturable=True)``). Any capture failure warns once and the step
            runs without the graph. A graph replays the captured shapes; other shapes run eagerly.
        generator: a CUDA ``torch.Generator`` for ``t`` and the noise (default: torch's global one).
    """
    fast = model if isinstance(model, FastModel) else prepare_model(model)
    if cuda_graph == "auto":
        cuda_graph = fast.device.type == "cuda" and _is_capturable(optimizer)
    else:
        cuda_graph = _resolve(cuda_graph, "cuda_graph", False)
    return TrainStep(fast, diffusion, optimizer, ema, ema_decay=ema_decay, grad_clip=grad_clip,
                     cuda_graph=cuda_graph, generator=generator, warmup_calls=warmup_calls)


# ---------------------------------------------------------------------------------------------- sampling
class SamplerForward:
    """``eps_theta(x_t, t, **kwargs)`` for the samplers: no gradients, float32 output; see
    :func:`make_sampler_forward`.

    With ``cuda_graph``, each new input signature (shapes, dtypes, non-tensor keyword values) runs
    ``warmup_calls`` times eagerly (compiling), is then captured, and replays from then on; at most
    ``max_graphs`` signatures are kept (least recently used dropped). The output is a fresh tensor.
    """

    def __init__(self, fast: FastModel, cuda_graph: bool, out_dtype: Optional[torch.dtype] = torch.float32,
                 warmup_calls: int = 2, max_graphs: int = 4):
        self.fast = fast
        self.cuda_graph = bool(cuda_graph) and fast.device.type == "cuda"
        self.out_dtype = out_dtype
        self.warmup_calls = max(1, int(warmup_calls))
        self.max_graphs = max(1, int(max_graphs))
        self.graph_error: Optional[str] = None
        self._graphs: "OrderedDict[Any, Dict[str, Any]]" = OrderedDict()
        self._seen: Dict[Any, int] = {}

    @property
    def module(self) -> nn.Module:
        return self.fast.module

    def parameters(self, recurse: bool = True):
        """The module's parameters (the samplers read the device from them)."""
        return self.fast.module.parameters(recurse)

    def _run(self, x, t, kwargs):
        out = self.fast(x, t, **kwargs)
        return out if self.out_dtype is None else out.to(self.out_dtype)

    @staticmethod
    def _key(x, t, kwargs):
        def sig(v):
            if torch.is_tensor(v):
                return ("T", tuple(v.shape), v.dtype, v.device)
            return ("V", repr(v))
        return (sig(x), sig(t), tuple(sorted((k, sig(v)) for k, v in kwargs.items())))

    @torch.no_grad()
    def __call__(self, x: torch.Tensor, t: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        """``x (B, C, H, W)``, ``t (B,)`` -> ``eps (B, C_out, H, W)`` in ``out_dtype``."""
        x = self.fast.prepare_input(x)
        t = t.to(self.fast.device, non_blocking=True)
        kwargs = {k: (v.to(self.fast.device, non_blocking=True) if torch.is_tensor(v) else v)
                  for k, v in kwargs.items()}
        if not self.cuda_graph:
            return self._run(x, t, kwargs)
        with torch.cuda.device(self.fast.device):
            return self._graph_call(x, t, kwargs)

    def _graph_call(self, x, t, kwargs):
        key = self._key(x, t, kwargs)
        entry = self._graphs.get(key)
        if entry is not None:
            self._graphs.move_to_end(key)
            entry["x"].copy_(x)
            entry["t"].copy_(t)
            for k, buf in entry["kw"].items():
                buf.copy_(kwargs[k])
            entry["graph"].replay()
            return entry["out"].clone()
        n = self._seen.get(key, 0) + 1
        self._seen[key] = n
        if n <= self.warmup_calls:
            return self._run(x, t, kwargs)
        try:
            return self._capture(key, x, t, kwargs)
        except Exception as exc:  # noqa: BLE001
            self.cuda_graph = False
            self._graphs.clear()
            self.graph_error = f"{type(exc).__name__}: {str(exc).strip()[:300]}"
            _warn_once(f"sampler-graph:{self.graph_error}",
                       f"CUDA-graph capture of the sampler's forward failed ({self.graph_error}); "
                       "continuing without")
            torch.cuda.synchronize(self.fast.device)
            return self._run(x, t, kwargs)

    def _capture(self, key, x, t, kwargs):
        dev = self.fast.device
        entry: Dict[str, Any] = {
            "x": x.clone(memory_format=torch.preserve_format), "t": t.clone(),
            "kw": {k: v.clone() for k, v in kwargs.items() if torch.is_tensor(v)},
        }
        static_kwargs = {k: entry["kw"].get(k, v) for k, v in kwargs.items()}
        torch.cuda.synchronize(dev)
        entry["graph"], entry["out"] = _cuda_graph_capture(lambda: self._run(entry["x"], entry["t"], static_kwargs))
        self._graphs[key] = entry
        while len(self._graphs) > self.max_graphs:
            self._graphs.popitem(last=False)
        entry["graph"].replay()  # capturing records the forward without running it: run it now
        return entry["out"].clone()


def make_sampler_forward(model: Union[FastModel, nn.Module], device=None, *, bf16: Auto = "auto",
                         fp16: bool = False, channels_last: Auto = "auto", compile: Auto = "auto",
                         cuda_graph: Auto = "auto", out_dtype: Optional[torch.dtype] = torch.float32,
                         warmup_calls: int = 2, max_graphs: int = 4, compile_backend: str = "inductor",
                         experimental: bool = False) -> SamplerForward:
    """The network's forward for sampling (``ddpm_sample``, ``ddim_sample``): ``f(x_t, t, **kwargs)``.

    Runs without gradients under bfloat16 autocast and ``channels_last`` (each ``"auto"``: on CUDA),
    compiled (``"auto"``: on CUDA when available, with a clean eager fallback), and with ``cuda_graph``
    (``"auto"``: on CUDA) replays a CUDA graph of the forward for each batch shape: the sampling loop
    calls the network with the same shapes a thousand times. Returns float32 (``out_dtype``), so that the
    sampler's arithmetic stays float32. ``fp16=True``: float16 autocast instead of bfloat16 (for a T4 or a V100,
    which have no native bf16; not measured here). ``model`` should be in evaluation mode (e.g. ``ema.model``); it is
    converted in place like :func:`prepare_model` does.

    ``experimental=True`` also sets up this module's inference experiments, which have not been measured on a
    GPU yet (``benchmarks/RESULTS.md``, mode ``fast_fold``): every GroupNorm as the Triton kernel of
    :mod:`ddpm_lib.kernels` with the residual sums, skip concatenations, biases and upsampling phases folded in
    (:func:`set_residual_fold`), sub-pixel upsampling (:func:`set_upsample`) and channel padding
    (:func:`set_channel_padding`); the same parameters and the same function, changed in place (a
    :class:`FastModel` given here must not have been called yet).
    """
    extra: Dict[str, Any] = SAMPLER_EXPERIMENTS if experimental else {}
    if isinstance(model, FastModel):
        fast = model
        if fp16 and not fast.fp16:
            raise ValueError("fp16=True, but the FastModel given was prepared without it: "
                             "prepare_model(..., fp16=True), or pass the nn.Module")
        _set_variants(fast.module, **extra)
    else:
        fast = prepare_model(model, device, bf16=bf16, fp16=fp16, channels_last=channels_last, compile=compile,
                             compile_backend=compile_backend, **extra)
    graph = _resolve(cuda_graph, "cuda_graph", fast.device.type == "cuda")
    return SamplerForward(fast, graph, out_dtype=out_dtype, warmup_calls=warmup_calls, max_graphs=max_graphs)
