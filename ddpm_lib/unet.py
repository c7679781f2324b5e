"""The paper's time-conditioned U-Net ``eps_theta(x_t, t)`` (Ho et al. 2020, appendix B; book chapter 9).

A PixelCNN++-style U-Net of wide residual blocks, group normalisation and single-head self-attention,
conditioned on the timestep by the sinusoidal embedding of the Transformer (book
``eq-time-embedding``). The layout follows the official TensorFlow code (``diffusion_tf/models/unet.py``)
block for block, so that the paper's CIFAR-10 network has exactly its 35.7M parameters and the
converted weights (``google/ddpm-cifar10-32`` on the Hugging Face hub) load by renaming tensors
(:meth:`UNet.from_diffusers`).

Shapes: ``x (B, C, H, W)``, ``t (B,)`` (integer timesteps, 0-based), optional class labels
``y (B,)`` -> ``(B, out_channels, H, W)``. The network runs in ``channels_last`` memory format, under
``torch.autocast`` (bfloat16) and under ``torch.compile`` without graph breaks.
"""
from __future__ import annotations

import copy
import os
from typing import Any, Dict, List, Mapping, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .nn import timestep_embedding

__all__ = ["UNet", "ResBlock", "AttnBlock", "Downsample", "Upsample"]


# ---------------------------------------------------------------------------------------------- presets
_PRESETS: Dict[str, Dict[str, Any]] = {
    # The paper's CIFAR-10 network: 35,746,307 parameters (appendix B; google/ddpm-cifar10-32).
    "cifar10": dict(in_channels=3, ch=128, ch_mult=(1, 2, 2, 2), num_res_blocks=2, attn_resolutions=(16,),
                    dropout=0.1, image_size=32),
    # The paper's 256x256 networks (CelebA-HQ, LSUN church/cat): about 114M parameters.
    "celebahq256": dict(in_channels=3, ch=128, ch_mult=(1, 1, 2, 2, 4, 4), num_res_blocks=2,
                        attn_resolutions=(16,), dropout=0.0, image_size=256),
    # Fashion-MNIST (1 channel, images padded to 32x32): a network that trains on a CPU (narrow at full
    # resolution, where the convolutions cost the most: ~36 GFLOP per forward+backward at batch 64) ...
    "fashion-small": dict(in_channels=1, ch=16, ch_mult=(1, 2, 4), num_res_blocks=1, attn_resolutions=(8,),
                          dropout=0.1, image_size=32, num_groups=8),
    # ... and one for a few minutes on a GPU (fp16 EMA weights under 20 MB).
    "fashion-base": dict(in_channels=1, ch=64, ch_mult=(1, 2, 2, 2), num_res_blocks=2, attn_resolutions=(16,),
                         dropout=0.1, image_size=32),
    # Unit tests: a few hundred thousand parameters.
    "tiny": dict(in_channels=3, ch=32, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(8,), dropout=0.0,
                 image_size=16, num_groups=8),
}
_PRESETS["lsun256"] = _PRESETS["celebahq256"]

_DOWNSAMPLE_PADDINGS = ("asymmetric", "symmetric")


def _num_groups(channels: int, num_groups: int) -> int:
    """The largest divisor of ``channels`` that is at most ``num_groups`` (``num_groups`` itself when it divides)."""
    g = min(num_groups, channels)
    while channels % g:
        g -= 1
    return g


def _norm(channels: int, num_groups: int, eps: float) -> nn.GroupNorm:
    return nn.GroupNorm(_num_groups(channels, num_groups), channels, eps=eps)


# ---------------------------------------------------------------------------------------------- blocks
class ResBlock(nn.Module):
    """A wide residual block conditioned on the timestep (book chapter 9; appendix B of the paper).

    ``h = conv1(SiLU(GroupNorm(x))) + Linear(SiLU(emb))[:, :, None, None]``, then
    ``h = conv2(dropout(SiLU(GroupNorm(h))))`` and ``skip(x) + h``, where ``skip`` is a 1x1 convolution
    when the channel count changes. ``conv2`` starts at zero, so the block starts as the identity.

    Shapes: ``x (B, in_ch, H, W)``, ``emb_act (B, emb_dim)`` (the *activated* embedding
    ``SiLU(emb)``, computed once per forward) -> ``(B, out_ch, H, W)``.
    """

    def __init__(self, in_ch: int, out_ch: int, emb_dim: int, dropout: float = 0.0, num_groups: int = 32,
                 eps: float = 1e-6):
        super().__init__()
        self.norm1 = _norm(in_ch, num_groups, eps)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.emb_proj = nn.Linear(emb_dim, out_ch)
        self.norm2 = _norm(out_ch, num_groups, eps)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1)
        self.skip = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else nn.Identity()

    def forward(self, x: torch.Tensor, emb_act: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.emb_proj(emb_act)[:, :, None, None]
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return self.skip(x) + h


class AttnBlock(nn.Module):
    """Single-head self-attention over the ``H*W`` positions, with a residual connection (book chapter 9).

    ``x + proj_out(softmax(q k^T / sqrt(C)) v)`` with ``q, k, v = Linear(GroupNorm(x))`` (the paper's
    1x1 "network-in-network" projections, fused into one ``(C, 3C)`` matrix). ``q, k, v`` have shape
    ``(B, 1, H*W, C)`` for :func:`torch.nn.functional.scaled_dot_product_attention`. ``proj_out`` starts
    at zero. Shapes: ``x (B, C, H, W)`` -> ``(B, C, H, W)``.
    """

    def __init__(self, channels: int, num_groups: int = 32, eps: float = 1e-6):
        super().__init__()
        self.norm = _norm(channels, num_groups, eps)
        self.qkv = nn.Linear(channels, 3 * channels)
        self.proj_out = nn.Linear(channels, channels)

    def forward(self, x: torch.Tensor, emb_act: Optional[torch.Tensor] = None) -> torch.Tensor:
        B, C, H, W = x.shape
        # (B, C, H, W) -> (B, H*W, C): a free view for channels_last tensors.
        h = self.norm(x).permute(0, 2, 3, 1).reshape(B, H * W, C)
        q, k, v = self.qkv(h).unsqueeze(1).chunk(3, dim=-1)  # each (B, 1, H*W, C)
        h = F.scaled_dot_product_attention(q, k, v)
        h = self.proj_out(h.reshape(B, H * W, C))
        return x + h.reshape(B, H, W, C).permute(0, 3, 1, 2)


class Downsample(nn.Module):
    """Halve the resolution: a 3x3 convolution with stride 2 (or 2x2 average pooling without ``with_conv``).

    ``padding="asymmetric"`` pads one row/column at the bottom/right only, the TensorFlow ``"SAME"``
    padding of the paper's code (and diffusers' ``downsample_padding=0``); ``"symmetric"`` pads one
    on every side (PyTorch's usual ``padding=1``, diffusers' ``downsample_padding=1``).
    Shapes: ``(B, C, H, W)`` -> ``(B, C, H/2, W/2)``.
    """

    def __init__(self, channels: int, with_conv: bool = True, padding: str = "asymmetric"):
        super().__init__()
        if padding not in _DOWNSAMPLE_PADDINGS:
            raise ValueError(f"downsample_padding must be one of {_DOWNSAMPLE_PADDINGS}, got {padding!r}")
        self.asymmetric = with_conv and padding == "asymmetric"
        if with_conv:
            self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=0 if self.asymmetric else 1)
        else:
            self.conv = nn.AvgPool2d(2)

    def forward(self, x: torch.Tensor, emb_act: Optional[torch.Tensor] = None) -> torch.Tensor:
        if self.asymmetric:
            x = F.pad(x, (0, 1, 0, 1))
        return self.conv(x)


class Upsample(nn.Module):
    """Double the resolution: nearest-neighbour x2, then a 3x3 convolution (unless ``with_conv=False``).

    Shapes: ``(B, C, H, W)`` -> ``(B, C, 2H, 2W)``.
    """

    def __init__(self, channels: int, with_conv: bool = True):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1) if with_conv else nn.Identity()

    def forward(self, x: torch.Tensor, emb_act: Optional[torch.Tensor] = None) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class _ResAttn(nn.Module):
    """A residual block followed by self-attention where the resolution asks for it."""

    def __init__(self, res: ResBlock, attn: Optional[AttnBlock]):
        super().__init__()
        self.res = res
        self.attn = attn if attn is not None else nn.Identity()

    def forward(self, x: torch.Tensor, emb_act: torch.Tensor) -> torch.Tensor:
        return self.attn(self.res(x, emb_act))


# ---------------------------------------------------------------------------------------------- the U-Net
class UNet(nn.Module):
    """The paper's U-Net ``eps_theta(x_t, t)`` (appendix B; book chapter 9, ``eq-time-embedding``).

    Args:
        in_channels: image channels C (3 for RGB, 1 for Fashion-MNIST).
        out_channels: output channels; default ``in_channels`` (the paper), ``2 * in_channels`` with
            ``learn_sigma=True`` (mean and variance outputs, Improved DDPM's ``var_type="learned_range"``).
        ch: base channel count; the time embedding has ``4 * ch`` channels.
        ch_mult: channel multiplier per resolution level; there are ``len(ch_mult) - 1`` down-samplings.
        num_res_blocks: residual blocks per level on the way down (``num_res_blocks + 1`` on the way up).
        attn_resolutions: resolutions (height in pixels, for an ``image_size`` input) with self-attention;
            the middle block always has attention.
        dropout: dropout rate inside the residual blocks (0.1 for the paper's CIFAR-10 model).
        image_size: the training resolution, which places the attention layers; inputs of other sizes
            divisible by ``2 ** (len(ch_mult) - 1)`` are accepted (the network is convolutional).
        num_classes: optional class conditioning: ``nn.Embedding(num_classes + 1, 4 ch)`` added to the time
            embedding; index ``num_classes`` is the "null" class used when ``y`` is None (classifier-free
            guidance).
        learn_sigma: doubles the default ``out_channels``.
        resamp_with_conv: convolutions in the down/up-sampling layers (the paper: True); False uses
            average pooling and plain nearest-neighbour up-sampling.
        downsample_padding: ``"asymmetric"`` (the paper's TF ``"SAME"`` padding: pad right/bottom, then a
            stride-2 conv) or ``"symmetric"`` (pad 1 on every side).
        num_groups: GroupNorm groups (the paper: 32); a layer whose channels it does not divide uses the
            largest divisor below it (small presets use 8).
        norm_eps: GroupNorm epsilon (the paper's TF code: 1e-6).

    Call ``model(x, t, y=None, guidance_scale=None)``; see :meth:`forward`. ``model.config`` is a
    JSON-serialisable dict with which ``UNet(**model.config)`` rebuilds the network.
    """

    def __init__(
        self,
        in_channels: int = 3,
        out_channels: Optional[int] = None,
        ch: int = 128,
        ch_mult: Sequence[int] = (1, 2, 2, 2),
        num_res_blocks: int = 2,
        attn_resolutions: Sequence[int] = (16,),
        dropout: float = 0.1,
        image_size: int = 32,
        num_classes: Optional[int] = None,
        learn_sigma: bool = False,
        resamp_with_conv: bool = True,
        downsample_padding: str = "asymmetric",
        num_groups: int = 32,
        norm_eps: float = 1e-6,
    ):
        super().__init__()
        for name, value in (("in_channels", in_channels), ("ch", ch), ("num_res_blocks", num_res_blocks),
                            ("image_size", image_size), ("num_groups", num_groups)):
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError(f"{name} must be an int, got {type(value).__name__}")
            if value < 1:
                raise ValueError(f"{name} must be at least 1, got {value}")
        ch_mult = [int(m) for m in ch_mult]
        attn_resolutions = sorted(int(r) for r in attn_resolutions)
        if not ch_mult or min(ch_mult) < 1:
            raise ValueError(f"ch_mult must be a non-empty sequence of positive ints, got {ch_mult}")
        if out_channels is None:
            out_channels = 2 * in_channels if learn_sigma else in_channels
        elif learn_sigma and out_channels != 2 * in_channels:
            raise ValueError(f"learn_sigma=True needs out_channels = 2 * in_channels = {2 * in_channels}, "
                             f"got {out_channels}")
        if out_channels < 1:
            raise ValueError(f"out_channels must be at least 1, got {out_channels}")
        if num_classes is not None and (isinstance(num_classes, bool) or not isinstance(num_classes, int)
                                        or num_classes < 1):
            raise ValueError(f"num_classes must be a positive int or None, got {num_classes!r}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must lie in [0, 1), got {dropout}")
        if downsample_padding not in _DOWNSAMPLE_PADDINGS:
            raise ValueError(f"downsample_padding must be one of {_DOWNSAMPLE_PADDINGS}, got {downsample_padding!r}")
        self.factor = 2 ** (len(ch_mult) - 1)
        if image_size % self.factor:
            raise ValueError(f"image_size must be divisible by 2 ** (len(ch_mult) - 1) = {self.factor}, "
                             f"got {image_size}")
        resolutions = [image_size // 2 ** i for i in range(len(ch_mult))]
        bad = [r for r in attn_resolutions if r not in resolutions]
        if bad:
            raise ValueError(f"attn_resolutions {bad} are not among the network's resolutions {resolutions} "
                             f"(image_size={image_size}, ch_mult={ch_mult})")

        self._config: Dict[str, Any] = dict(
            in_channels=in_channels, out_channels=int(out_channels), ch=ch, ch_mult=ch_mult,
            num_res_blocks=num_res_blocks, attn_resolutions=attn_resolutions, dropout=float(dropout),
            image_size=image_size, num_classes=num_classes, learn_sigma=bool(learn_sigma),
            resamp_with_conv=bool(resamp_with_conv), downsample_padding=downsample_padding,
            num_groups=num_groups, norm_eps=float(norm_eps),
        )
        self.in_channels, self.out_channels, self.num_classes = in_channels, int(out_channels), num_classes
        emb_dim = 4 * ch
        self.ch = ch

        def res(i: int, o: int) -> ResBlock:
            return ResBlock(i, o, emb_dim, dropout, num_groups, norm_eps)

        def attn(c: int, level: int) -> Optional[AttnBlock]:
            return AttnBlock(c, num_groups, norm_eps) if resolutions[level] in attn_resolutions else None

        # Timestep embedding: sinusoid (eq-time-embedding) -> Linear -> SiLU -> Linear.
        self.time_mlp = nn.Sequential(nn.Linear(ch, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        self.label_emb = nn.Embedding(num_classes + 1, emb_dim) if num_classes else None

        # Down: every block's and every down-sampler's output is kept for a skip connection.
        self.conv_in = nn.Conv2d(in_channels, ch, 3, padding=1)
        skip_ch: List[int] = [ch]
        c = ch
        self.down = nn.ModuleList()
        for level, mult in enumerate(ch_mult):
            for _ in range(num_res_blocks):
                self.down.append(_ResAttn(res(c, ch * mult), attn(ch * mult, level)))
                c = ch * mult
                skip_ch.append(c)
            if level != len(ch_mult) - 1:
                self.down.append(Downsample(c, resamp_with_conv, downsample_padding))
                skip_ch.append(c)

        # Middle: res, attention, res.
        self.mid = _ResAttn(res(c, c), AttnBlock(c, num_groups, norm_eps))
        self.mid2 = res(c, c)

        # Up: num_res_blocks + 1 blocks per level, each on [h, skip] concatenated along channels.
        self.up = nn.ModuleList()
        for level in reversed(range(len(ch_mult))):
            for _ in range(num_res_blocks + 1):
                o = ch * ch_mult[level]
                self.up.append(_ResAttn(res(c + skip_ch.pop(), o), attn(o, level)))
                c = o
            if level != 0:
                self.up.append(Upsample(c, resamp_with_conv))
        assert not skip_ch

        self.norm_out = _norm(c, num_groups, norm_eps)
        self.conv_out = nn.Conv2d(c, self.out_channels, 3, padding=1)
        self._init_weights()

    def _init_weights(self) -> None:
        """The paper's initialisation: Xavier-uniform weights (TF ``variance_scaling(1, "fan_avg", "uniform")``),
        zero biases, and zero for the last layer of every residual branch and of the network."""
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        zero = [self.conv_out] + [m.conv2 for m in self.modules() if isinstance(m, ResBlock)]
        zero += [m.proj_out for m in self.modules() if isinstance(m, AttnBlock)]
        for m in zero:
            nn.init.zeros_(m.weight)
            nn.init.zeros_(m.bias)

    # ------------------------------------------------------------------------------------------ config
    @property
    def config(self) -> Dict[str, Any]:
        """The constructor arguments as a JSON-serialisable dict (a copy): ``UNet(**model.config)``."""
        return copy.deepcopy(self._config)

    @staticmethod
    def presets() -> List[str]:
        """Names accepted by :meth:`from_preset`."""
        return sorted(_PRESETS)

    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> "UNet":
        """A network from a named configuration, with any constructor argument overridden.

        ``"cifar10"`` (the paper's 35,746,307-parameter CIFAR-10 model), ``"celebahq256"`` / ``"lsun256"``
        (the paper's 256x256 models, ~114M), ``"fashion-small"`` (Fashion-MNIST padded to 32x32, trains on a
        CPU), ``"fashion-base"`` (Fashion-MNIST on a GPU), ``"tiny"`` (unit tests, 16x16 RGB).
        """
        if name not in _PRESETS:
            raise ValueError(f"unknown preset name {name!r}; choose one of {', '.join(cls.presets())}")
        return cls(**{**_PRESETS[name], **overrides})

    # ------------------------------------------------------------------------------------------ forward
    def _check_inputs(self, x: torch.Tensor, t: torch.Tensor, y: Optional[torch.Tensor]) -> None:
        if not torch.is_tensor(x):
            raise TypeError(f"x must be a tensor of shape (batch, {self.in_channels}, H, W), got {type(x).__name__}")
        if x.ndim != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"x must have shape (batch, {self.in_channels}, H, W), got {tuple(x.shape)}")
        if x.shape[2] % self.factor or x.shape[3] % self.factor:
            raise ValueError(f"x's height and width must be divisible by 2 ** (len(ch_mult) - 1) = {self.factor}, "
                             f"got {tuple(x.shape[2:])}")
        if not torch.is_tensor(t):
            raise TypeError(f"t must be an integer tensor of shape (batch,), got {type(t).__name__}")
        if t.dtype == torch.bool or t.dtype.is_complex:
            raise TypeError(f"t must be an integer (or real) tensor, got dtype {t.dtype}")
        if t.shape != (x.shape[0],):
            raise ValueError(f"t must have shape ({x.shape[0]},) to match x, got {tuple(t.shape)}")
        if y is not None:
            if self.label_emb is None:
                raise ValueError("y (class labels) was given to an unconditional model; build it with num_classes")
            if not torch.is_tensor(y) or y.dtype.is_floating_point or y.dtype == torch.bool:
                raise TypeError("y must be an integer tensor of class labels, shape (batch,)")
            if y.shape != (x.shape[0],):
                raise ValueError(f"y must have shape ({x.shape[0]},) to match x, got {tuple(y.shape)}")

    def _embedding(self, t: torch.Tensor, y: Optional[torch.Tensor]) -> torch.Tensor:
        """``SiLU(emb)``, what every residual block projects: ``emb = MLP(sinusoid(t)) (+ label_emb(y))``."""
        emb = self.time_mlp(timestep_embedding(t, self.ch))
        if self.label_emb is not None:
            if y is None:
                y = torch.full((t.shape[0],), self.num_classes, dtype=torch.long, device=t.device)
            emb = emb + self.label_emb(y)
        return F.silu(emb)

    def _forward(self, x: torch.Tensor, t: torch.Tensor, y: Optional[torch.Tensor]) -> torch.Tensor:
        emb_act = self._embedding(t, y)
        h = self.conv_in(x)
        hs = [h]
        for block in self.down:
            h = block(h, emb_act)
            hs.append(h)
        h = self.mid2(self.mid(h, emb_act), emb_act)
        for block in self.up:
            if isinstance(block, Upsample):
                h = block(h)
            else:
                h = block(torch.cat([h, hs.pop()], dim=1), emb_act)
        norm_act = getattr(self.norm_out, "forward_act", None)  # GroupNorm and SiLU in one kernel (accel)
        return self.conv_out(norm_act(h) if norm_act is not None else F.silu(self.norm_out(h)))

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: Optional[torch.Tensor] = None,
                guidance_scale: Optional[float | torch.Tensor] = None) -> torch.Tensor:
        """``eps_theta(x_t, t)`` (the paper's eq. 11 / book ``eq-l-simple`` network).

        Args:
            x: noisy images ``(B, in_channels, H, W)``, H and W divisible by ``2 ** (len(ch_mult) - 1)``.
            t: timesteps ``(B,)``, 0-based integers (real values are accepted by the embedding).
            y: class labels ``(B,)`` in ``0..num_classes-1`` for a class-conditional model; None means
                the null class ``num_classes``.
            guidance_scale: classifier-free guidance weight w (Ho & Salimans 2022; needs ``num_classes``
                and ``y``; a float or a ``(B,)`` tensor): returns ``(1 + w) eps(x, y) - w eps(x, null)`` on
                the first ``in_channels`` channels and the conditional output on the variance channels,
                from one batch of 2B.

        Returns:
            ``(B, out_channels, H, W)``.
        """
        self._check_inputs(x, t, y)
        if guidance_scale is None:
            return self._forward(x, t, y)
        if self.label_emb is None:
            raise ValueError("guidance_scale needs a class-conditional model (build it with num_classes)")
        if y is None:
            raise ValueError("guidance_scale needs class labels y")
        null = torch.full_like(y, self.num_classes)
        out = self._forward(torch.cat([x, x]), torch.cat([t, t]), torch.cat([y, null]))
        cond, uncond = out.chunk(2)
        w = guidance_scale
        if torch.is_tensor(w) and w.ndim == 1:
            w = w.to(cond.device, cond.dtype).reshape(-1, 1, 1, 1)
        c = self.in_channels
        eps = (1 + w) * cond[:, :c] - w * uncond[:, :c]
        if self.out_channels == c:
            return eps
        return torch.cat([eps, cond[:, c:]], dim=1)

    # ------------------------------------------------------------------------------------------ diffusers
    @classmethod
    def from_diffusers(cls, model_or_state_dict: Any, config: Optional[Mapping[str, Any]] = None,
                       **overrides: Any) -> "UNet":
        """Load a diffusers ``UNet2DModel`` of the paper's layout (e.g. ``google/ddpm-cifar10-32``).

        Args:
            model_or_state_dict: a ``diffusers.UNet2DModel`` (its ``.config`` is read) or its state dict.
            config: the diffusers config (a dict, e.g. the repository's ``config.json``); required with a
                state dict, optional with a model. Keys it lacks take diffusers' defaults.
            overrides: non-architectural options for the new network, e.g. ``dropout=0.1`` to fine-tune
                (the diffusers config says 0.0).

        The supported layout is the paper's: ``DownBlock2D``/``AttnDownBlock2D`` down blocks mirrored by
        ``UpBlock2D``/``AttnUpBlock2D``, ``UNetMidBlock2D``, single-head attention
        (``attention_head_dim=None``), the time embedding ``flip_sin_to_cos=False, freq_shift=1`` (sin
        first, frequencies ``exp(-log(10000) i / (half - 1))``), ``time_embedding_type="positional"``,
        ``resnet_time_scale_shift="default"``, no class embedding; ``downsample_padding=0`` (the TF
        asymmetric "SAME" padding) or ``1``. Anything else raises a ValueError naming the key.
        Returns a :class:`UNet` in float32 (eval mode) that computes the same function.
        """
        if isinstance(model_or_state_dict, nn.Module):
            if config is None:
                config = getattr(model_or_state_dict, "config", None)
                if config is None:
                    raise TypeError("model_or_state_dict has no .config; pass config= explicitly")
            state = model_or_state_dict.state_dict()
        elif isinstance(model_or_state_dict, Mapping):
            if config is None:
                raise ValueError("config is required when model_or_state_dict is a state dict")
            state = model_or_state_dict
        else:
            raise TypeError("model_or_state_dict must be a diffusers UNet2DModel or its state dict, "
                            f"got {type(model_or_state_dict).__name__}")
        kwargs = _config_from_diffusers(dict(config))
        kwargs.update(overrides)
        model = cls(**kwargs)
        mapped = _map_diffusers_state(model, state)
        model.load_state_dict(mapped, strict=True)
        return model.eval()

    @classmethod
    def from_pretrained_hub(cls, repo_id: str = "google/ddpm-cifar10-32", *, local_files_only: bool = False,
                            cache_dir: Optional[str] = None, timeout: float = 5.0, **overrides: Any) -> "UNet":
        """Download (or read from the cache) a diffusers DDPM checkpoint and convert it with :meth:`from_diffusers`.

        ``repo_id`` is a hub name (``google/ddpm-cifar10-32``, ``google/ddpm-celebahq-256``,
        ``google/ddpm-church-256``, ...) or a local directory holding ``config.json`` and the weights.
        Needs ``diffusers``. The cache is tried first; then, unless ``local_files_only=True`` or
        ``HF_HUB_OFFLINE=1``, the hub, after checking within ``timeout`` seconds that it can be reached (so an
        offline machine fails fast instead of retrying). Raises a RuntimeError naming the offline
        alternatives when the files cannot be had.
        """
        alternatives = (
            "Offline alternatives: copy the repository's config.json and diffusion_pytorch_model.safetensors "
            "to a directory and pass that directory as repo_id; or load them yourself and call "
            "UNet.from_diffusers(state_dict, config); or train UNet.from_preset('cifar10') from scratch."
        )
        try:
            from diffusers import UNet2DModel
        except ImportError as e:  # pragma: no cover - depends on the environment
            raise RuntimeError("UNet.from_pretrained_hub needs diffusers (pip install 'ddpm_lib[hub]'). "
                               + alternatives) from e
        load = dict(cache_dir=cache_dir, low_cpu_mem_usage=False)
        if os.path.isdir(repo_id):
            try:
                hf = UNet2DModel.from_pretrained(repo_id, low_cpu_mem_usage=False)
            except (OSError, ValueError) as e:
                raise RuntimeError(f"could not load a diffusers UNet2DModel from the directory {repo_id!r}: {e}. "
                                   + alternatives) from e
            return cls.from_diffusers(hf, **overrides)
        try:
            hf = UNet2DModel.from_pretrained(repo_id, local_files_only=True, **load)
        except (OSError, ValueError) as e:  # not in the cache
            hf, cached_error = None, e
        if hf is not None:
            return cls.from_diffusers(hf, **overrides)
        offline = local_files_only or os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")
        if offline:
            raise RuntimeError(f"{repo_id!r} is not in the Hugging Face cache and downloads are off "
                               f"(local_files_only=True or HF_HUB_OFFLINE=1): {cached_error}. " + alternatives)
        endpoint = _hub_endpoint()
        if not _reachable(endpoint, timeout):
            raise RuntimeError(f"cannot reach the Hugging Face hub at {endpoint} (offline?) to download "
                               f"{repo_id!r}. " + alternatives)
        try:
            hf = UNet2DModel.from_pretrained(repo_id, **load)
        except Exception as e:
            raise RuntimeError(f"could not download {repo_id!r} from {endpoint}: {type(e).__name__}: {e}. "
                               + alternatives) from e
        return cls.from_diffusers(hf, **overrides)


def _hub_endpoint() -> str:
    try:
        from huggingface_hub import constants

        return str(constants.ENDPOINT)
    except Exception:  # pragma: no cover
        return os.environ.get("HF_ENDPOINT", "https://huggingface.co")


def _reachable(url: str, timeout: float) -> bool:
    """Whether a TCP connection to ``url``'s host opens within ``timeout`` seconds (True behind a proxy)."""
    import socket
    from urllib.parse import urlparse

    if any(os.environ.get(k) for k in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return True  # the proxy decides; let the download try
    u = urlparse(url)
    port = u.port or (443 if u.scheme == "https" else 80)
    try:
        socket.create_connection((u.hostname, port), timeout=timeout).close()
        return True
    except OSError:
        return False


# ---------------------------------------------------------------------------------------------- diffusers mapping
# UNet2DModel's defaults (diffusers 0.2x-0.4x), for configs that leave keys out.
_DIFFUSERS_DEFAULTS: Dict[str, Any] = dict(
    sample_size=None, in_channels=3, out_channels=3, center_input_sample=False, time_embedding_type="positional",
    time_embedding_dim=None, freq_shift=0, flip_sin_to_cos=True,
    down_block_types=("DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D"),
    mid_block_type="UNetMidBlock2D", up_block_types=("AttnUpBlock2D", "AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
    block_out_channels=(224, 448, 672, 896), layers_per_block=2, mid_block_scale_factor=1, downsample_padding=1,
    downsample_type="conv", upsample_type="conv", dropout=0.0, act_fn="silu", attention_head_dim=8,
    norm_num_groups=32, attn_norm_num_groups=None, norm_eps=1e-5, resnet_time_scale_shift="default",
    add_attention=True, class_embed_type=None, num_class_embeds=None,
)


def _config_from_diffusers(cfg: Dict[str, Any]) -> Dict[str, Any]:
    """UNet constructor arguments equivalent to a diffusers ``UNet2DModel`` config; ValueError if unsupported."""
    cfg = {**_DIFFUSERS_DEFAULTS, **{k: v for k, v in cfg.items() if not k.startswith("_")}}

    def need(key: str, ok: bool, want: str) -> None:
        if not ok:
            raise ValueError(f"unsupported diffusers UNet2DModel layout: {key}={cfg[key]!r} (ddpm_lib.UNet needs "
                             f"{want}, the layout of google/ddpm-cifar10-32)")

    need("time_embedding_type", cfg["time_embedding_type"] == "positional", "'positional'")
    need("flip_sin_to_cos", cfg["flip_sin_to_cos"] is False, "False (sin first, as the paper's code)")
    need("freq_shift", cfg["freq_shift"] == 1, "1 (frequencies exp(-log(10000) i / (half - 1)))")
    need("center_input_sample", not cfg["center_input_sample"], "False")
    need("act_fn", cfg["act_fn"] in ("silu", "swish"), "'silu'")
    need("resnet_time_scale_shift", cfg["resnet_time_scale_shift"] == "default", "'default'")
    need("mid_block_type", cfg["mid_block_type"] == "UNetMidBlock2D", "'UNetMidBlock2D'")
    need("mid_block_scale_factor", cfg["mid_block_scale_factor"] == 1, "1")
    need("add_attention", cfg["add_attention"] is True, "True")
    need("downsample_type", cfg["downsample_type"] == "conv", "'conv'")
    need("upsample_type", cfg["upsample_type"] == "conv", "'conv'")
    need("downsample_padding", cfg["downsample_padding"] in (0, 1), "0 (TF 'SAME', asymmetric) or 1")
    need("class_embed_type", cfg["class_embed_type"] is None, "None")
    need("num_class_embeds", cfg["num_class_embeds"] is None, "None (no class conditioning)")
    boc = [int(c) for c in cfg["block_out_channels"]]
    ch = boc[0]
    need("block_out_channels", all(c % ch == 0 for c in boc), "multiples of the first entry")
    need("time_embedding_dim", cfg["time_embedding_dim"] in (None, 4 * ch), f"None or {4 * ch}")
    need("norm_num_groups", cfg["norm_num_groups"] is not None, "an int")
    need("attn_norm_num_groups", cfg["attn_norm_num_groups"] in (None, cfg["norm_num_groups"]),
         "None or norm_num_groups")
    down, up = list(cfg["down_block_types"]), list(cfg["up_block_types"])
    need("down_block_types", len(down) == len(boc) and set(down) <= {"DownBlock2D", "AttnDownBlock2D"},
         "DownBlock2D/AttnDownBlock2D, one per block_out_channels entry")
    mirror = [b.replace("Down", "Up") for b in reversed(down)]
    need("up_block_types", up == mirror, f"the mirror of down_block_types, {mirror}")
    size = cfg["sample_size"]
    if isinstance(size, (list, tuple)):
        need("sample_size", len(size) == 2 and size[0] == size[1], "a square size")
        size = size[0]
    need("sample_size", isinstance(size, int), "an int")
    attn_levels = [i for i, b in enumerate(down) if b == "AttnDownBlock2D"]
    head_dim = cfg["attention_head_dim"]
    attn_channels = [boc[i] for i in attn_levels] + [boc[-1]]
    need("attention_head_dim", head_dim is None or all(c == head_dim for c in attn_channels),
         "None (single-head attention)")
    return dict(
        in_channels=int(cfg["in_channels"]), out_channels=int(cfg["out_channels"]), ch=ch,
        ch_mult=[c // ch for c in boc], num_res_blocks=int(cfg["layers_per_block"]),
        attn_resolutions=[size // 2 ** i for i in attn_levels], dropout=float(cfg["dropout"]), image_size=size,
        downsample_padding="asymmetric" if cfg["downsample_padding"] == 0 else "symmetric",
        num_groups=int(cfg["norm_num_groups"]), norm_eps=float(cfg["norm_eps"]),
    )


def _map_diffusers_state(model: UNet, state: Mapping[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """Rename a diffusers ``UNet2DModel`` state dict to ``model``'s keys (q, k, v fused into ``qkv``)."""
    state = dict(state)
    out: Dict[str, torch.Tensor] = {}

    def take(src: str, dst: str) -> None:
        for p in ("weight", "bias"):
            key = f"{src}.{p}"
            if key not in state:
                raise ValueError(f"the diffusers state dict lacks {key!r}: not the layout its config describes")
            out[f"{dst}.{p}"] = state.pop(key)

    def res(src: str, dst: str, block: ResBlock) -> None:
        for a, b in (("norm1", "norm1"), ("conv1", "conv1"), ("time_emb_proj", "emb_proj"), ("norm2", "norm2"),
                     ("conv2", "conv2")):
            take(f"{src}.{a}", f"{dst}.{b}")
        if isinstance(block.skip, nn.Conv2d):
            take(f"{src}.conv_shortcut", f"{dst}.skip")

    def attn(src: str, dst: str) -> None:
        take(f"{src}.group_norm", f"{dst}.norm")
        for p in ("weight", "bias"):
            keys = [f"{src}.to_{n}.{p}" for n in "qkv"]
            if any(k not in state for k in keys):
                raise ValueError(f"the diffusers state dict lacks {src}.to_q/to_k/to_v: not a supported attention")
            out[f"{dst}.qkv.{p}"] = torch.cat([state.pop(k) for k in keys], dim=0)
        take(f"{src}.to_out.0", f"{dst}.proj_out")

    def res_attn(src_res: str, src_attn: str, dst: str, m: _ResAttn) -> None:
        res(src_res, f"{dst}.res", m.res)
        if isinstance(m.attn, AttnBlock):
            attn(src_attn, f"{dst}.attn")

    take("conv_in", "conv_in")
    take("time_embedding.linear_1", "time_mlp.0")
    take("time_embedding.linear_2", "time_mlp.2")
    levels = len(model.config["ch_mult"])
    nrb = model.config["num_res_blocks"]
    k = 0
    for level in range(levels):
        for j in range(nrb):
            src = f"down_blocks.{level}"
            res_attn(f"{src}.resnets.{j}", f"{src}.attentions.{j}", f"down.{k}", model.down[k])
            k += 1
        if level != levels - 1:
            take(f"down_blocks.{level}.downsamplers.0.conv", f"down.{k}.conv")
            k += 1
    res_attn("mid_block.resnets.0", "mid_block.attentions.0", "mid", model.mid)
    res("mid_block.resnets.1", "mid2", model.mid2)
    k = 0
    for u in range(levels):
        for j in range(nrb + 1):
            src = f"up_blocks.{u}"
            res_attn(f"{src}.resnets.{j}", f"{src}.attentions.{j}", f"up.{k}", model.up[k])
            k += 1
        if u != levels - 1:
            take(f"up_blocks.{u}.upsamplers.0.conv", f"up.{k}.conv")
            k += 1
    take("conv_norm_out", "norm_out")
    take("conv_out", "conv_out")
    if state:
        raise ValueError(f"unexpected tensors in the diffusers state dict (unsupported layout): {sorted(state)[:5]}")
    return out
