"""A Diffusion Transformer ``eps_theta(x_t, t[, y])`` (Peebles & Xie 2023; book section 11.9).

DiT replaces the U-Net by a plain Vision Transformer: the image (or latent) is cut into ``p x p``
patches, each patch becomes one token, the tokens pass through ``depth`` Transformer blocks, and a
final linear layer turns every token back into a ``p x p`` patch. The timestep (and class label)
condition every block through *adaLN-Zero* (book ``eq-adaln-zero``): an MLP of the conditioning
vector ``c`` gives a shift, a scale and a gate per block and sub-layer,

    h <- h + gate_msa * Attn(LN(h) * (1 + scale_msa) + shift_msa)
    h <- h + gate_mlp * MLP(LN(h) * (1 + scale_mlp) + shift_mlp),

and that MLP, like the final linear layer, starts at zero, so every block starts as the identity and
an untrained network outputs exactly 0.

The layout follows the official code (``facebookresearch/DiT``, ``models.py``) layer for layer, so the
paper's ``DiT-XL/2`` has its 675,129,632 parameters (counting, as the official code does, the
294,912 entries of the fixed sin-cos position table, which here is a buffer, not a parameter).
Departures: the sinusoidal timestep features are ``ddpm_lib``'s :func:`~ddpm_lib.nn.timestep_embedding`
(sin first, the convention of the DDPM code) rather than GLIDE's (cos first); the 2-D position table
encodes the row in its first half and the column in its second (the official table, from MAE, puts the
column first: official weights would need the halves swapped); the label embedding
always has the extra "null" row (index ``num_classes``) for classifier-free guidance; label dropout
is the training loop's business, not the network's.

Shapes: ``x (B, C, H, W)`` with ``H = W = image_size``, ``t (B,)`` (0-based integer timesteps),
optional labels ``y (B,)`` -> ``(B, out_channels, H, W)``. Called like :class:`ddpm_lib.UNet`:
``model(x, t, y=None, guidance_scale=None)``.
"""
from __future__ import annotations

import copy
from typing import Any, Dict, List, Optional

import torch
import torch.nn.functional as F
from torch import nn

from .nn import timestep_embedding

__all__ = ["DiT", "DiTBlock", "FinalLayer", "patchify", "unpatchify", "sincos_pos_embed_2d", "modulate"]

_POS_EMBEDS = ("sincos", "learned")

# ---------------------------------------------------------------------------------------------- presets
_PAPER_SIZES = {"S": (12, 384, 6), "B": (12, 768, 12), "L": (24, 1024, 16), "XL": (28, 1152, 16)}
_PRESETS: Dict[str, Dict[str, Any]] = {}
# The paper's models (Table 1): class-conditional ImageNet 256x256 in the 32x32x4 latent space of the
# Stable Diffusion autoencoder, learned variance. DiT-XL/2: 675,129,632 parameters as the official code counts.
for _size, (_depth, _hidden, _heads) in _PAPER_SIZES.items():
    for _p in (2, 4, 8):
        _PRESETS[f"DiT-{_size}/{_p}"] = dict(in_channels=4, image_size=32, patch_size=_p, hidden_size=_hidden,
                                             depth=_depth, num_heads=_heads, num_classes=1000, learn_sigma=True)
_PRESETS.update({
    # Fashion-MNIST padded to 32x32, 64 tokens of 4x4 patches: about the parameter count of UNet "fashion-small".
    "fashion-small": dict(in_channels=1, image_size=32, patch_size=4, hidden_size=96, depth=4, num_heads=4),
    # ... and a GPU-sized one, about the size of UNet "fashion-base".
    "fashion-base": dict(in_channels=1, image_size=32, patch_size=2, hidden_size=256, depth=8, num_heads=8),
    # The 8x8x4 latents of ddpm_lib.Autoencoder("fashion"): 16 tokens of 2x2 patches.
    "latent-small": dict(in_channels=4, image_size=8, patch_size=2, hidden_size=96, depth=4, num_heads=4),
    # Unit tests.
    "tiny": dict(in_channels=3, image_size=16, patch_size=4, hidden_size=32, depth=2, num_heads=2),
})


# ---------------------------------------------------------------------------------------------- helpers
def patchify(x: torch.Tensor, patch_size: int) -> torch.Tensor:
    """Cut images into non-overlapping patches, one token per patch (book ``eq-patchify``).

    Token ``n = i * (W/p) + j`` holds the patch at rows ``i p .. i p + p - 1`` and columns
    ``j p .. j p + p - 1``, flattened in ``(row, column, channel)`` order.
    Shapes: ``(B, C, H, W)`` -> ``(B, (H/p)(W/p), p*p*C)``.
    """
    B, C, H, W = x.shape
    p = patch_size
    if H % p or W % p:
        raise ValueError(f"image height and width must be divisible by patch_size={p}, got {H}x{W}")
    x = x.reshape(B, C, H // p, p, W // p, p)
    return x.permute(0, 2, 4, 3, 5, 1).reshape(B, (H // p) * (W // p), p * p * C)


def unpatchify(tokens: torch.Tensor, patch_size: int, channels: int, height: int, width: int) -> torch.Tensor:
    """The inverse of :func:`patchify`: ``(B, (H/p)(W/p), p*p*C)`` -> ``(B, C, H, W)``."""
    B, N, D = tokens.shape
    p = patch_size
    h, w = height // p, width // p
    if N != h * w or D != p * p * channels:
        raise ValueError(f"tokens of shape {tuple(tokens.shape)} do not tile a {channels}x{height}x{width} image "
                         f"with patch_size={p}")
    x = tokens.reshape(B, h, w, p, p, channels)
    return x.permute(0, 5, 1, 3, 2, 4).reshape(B, channels, height, width)


def sincos_pos_embed_2d(dim: int, grid_h: int, grid_w: Optional[int] = None,
                        max_period: float = 10000.0) -> torch.Tensor:
    """The fixed 2-D sin-cos position embedding of MAE and DiT (book ``eq-sincos-2d``), float64.

    The first ``dim/2`` features encode the token's row ``i``, the last ``dim/2`` its column ``j``
    (MAE's and DiT's official tables have the two halves the other way round),
    each as ``[sin(pos * w_k), cos(pos * w_k)]`` with ``w_k = max_period ** (-k / (dim/4))``,
    ``k = 0 .. dim/4 - 1``. Token ``n = i * grid_w + j`` (the order of :func:`patchify`).
    Shape: ``(grid_h * grid_w, dim)``; ``dim`` must be divisible by 4.
    """
    grid_w = grid_h if grid_w is None else grid_w
    if dim % 4:
        raise ValueError(f"the sin-cos position embedding needs dim divisible by 4, got {dim}")
    quarter = dim // 4
    omega = max_period ** (-torch.arange(quarter, dtype=torch.float64) / quarter)

    def one_axis(pos: torch.Tensor) -> torch.Tensor:
        args = pos[:, None] * omega[None, :]
        return torch.cat([torch.sin(args), torch.cos(args)], dim=1)

    rows = torch.arange(grid_h, dtype=torch.float64).repeat_interleave(grid_w)
    cols = torch.arange(grid_w, dtype=torch.float64).repeat(grid_h)
    return torch.cat([one_axis(rows), one_axis(cols)], dim=1)


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """adaLN's affine map ``x * (1 + scale) + shift``; ``x (B, N, D)``, ``shift, scale (B, D)``."""
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


# ---------------------------------------------------------------------------------------------- blocks
class Attention(nn.Module):
    """Multi-head self-attention over the tokens (fused ``qkv`` projection with bias, then ``proj``).

    Shapes: ``(B, N, D)`` -> ``(B, N, D)``.
    """

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, D = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, D // self.num_heads).permute(2, 0, 3, 1, 4)
        h = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2])  # (B, heads, N, D/heads)
        return self.proj(h.transpose(1, 2).reshape(B, N, D))


class DiTBlock(nn.Module):
    """A Transformer block with adaLN-Zero conditioning (book ``eq-adaln-zero``).

    ``adaLN_modulation(c)`` gives six ``(B, D)`` vectors: shift, scale and gate of the attention and of the
    MLP sub-layer. The LayerNorms have no affine parameters of their own (the modulation replaces them);
    the modulation's last layer starts at zero, so every gate is 0 and the block starts as the identity.
    Shapes: ``x (B, N, D)``, ``c (B, D)`` -> ``(B, N, D)``.
    """

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(approximate="tanh"), nn.Linear(hidden, dim))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(6, dim=1)
        x = x + gate_msa.unsqueeze(1) * self.attn(modulate(self.norm1(x), shift_msa, scale_msa))
        x = x + gate_mlp.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))
        return x


class FinalLayer(nn.Module):
    """adaLN (shift and scale from ``c``), then a linear map of each token to a ``p x p x C_out`` patch.

    Both the modulation and the linear layer start at zero. Shapes: ``x (B, N, D)``, ``c (B, D)`` ->
    ``(B, N, p*p*C_out)``.
    """

    def __init__(self, dim: int, patch_size: int, out_channels: int):
        super().__init__()
        self.norm_final = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(dim, patch_size * patch_size * out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        return self.linear(modulate(self.norm_final(x), shift, scale))


# ---------------------------------------------------------------------------------------------- the DiT
class DiT(nn.Module):
    """The Diffusion Transformer of Peebles & Xie (2023) (book section 11.9, ``eq-adaln-zero``).

    Args:
        in_channels: channels C of the input (4 for Stable Diffusion latents, 1 for Fashion-MNIST pixels).
        out_channels: output channels; default ``in_channels``, ``2 * in_channels`` with ``learn_sigma``.
        image_size: height and width of the input (square); the position table is built for it.
        patch_size: p; the network sees ``(image_size / p) ** 2`` tokens.
        hidden_size: token width D (divisible by ``num_heads``, and by 4 for the sin-cos table).
        depth: number of DiT blocks.
        num_heads: attention heads.
        mlp_ratio: width of each block's MLP relative to D (the paper: 4).
        num_classes: optional class conditioning: ``nn.Embedding(num_classes + 1, D)`` added to the
            timestep embedding; index ``num_classes`` is the "null" class used when ``y`` is None
            (classifier-free guidance).
        learn_sigma: doubles the default ``out_channels`` (Improved DDPM's ``var_type="learned_range"``;
            the paper's models learn the variance).
        pos_embed: ``"sincos"`` (the paper: the fixed 2-D table of :func:`sincos_pos_embed_2d`, a buffer)
            or ``"learned"`` (a parameter, initialised from the same table).
        freq_dim: size of the sinusoidal timestep features fed to the timestep MLP (the paper: 256).

    Call ``model(x, t, y=None, guidance_scale=None)``; see :meth:`forward`. ``model.config`` is a
    JSON-serialisable dict with which ``DiT(**model.config)`` rebuilds the network.
    """

    def __init__(
        self,
        in_channels: int = 4,
        out_channels: Optional[int] = None,
        image_size: int = 32,
        patch_size: int = 2,
        hidden_size: int = 384,
        depth: int = 12,
        num_heads: int = 6,
        mlp_ratio: float = 4.0,
        num_classes: Optional[int] = None,
        learn_sigma: bool = False,
        pos_embed: str = "sincos",
        freq_dim: int = 256,
    ):
        super().__init__()
        for name, value in (("in_channels", in_channels), ("image_size", image_size), ("patch_size", patch_size),
                            ("hidden_size", hidden_size), ("depth", depth), ("num_heads", num_heads),
                            ("freq_dim", freq_dim)):
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError(f"{name} must be an int, got {type(value).__name__}")
            if value < 1:
                raise ValueError(f"{name} must be at least 1, got {value}")
        if image_size % patch_size:
            raise ValueError(f"image_size={image_size} must be divisible by patch_size={patch_size}")
        if hidden_size % num_heads:
            raise ValueError(f"hidden_size={hidden_size} must be divisible by num_heads={num_heads}")
        if pos_embed not in _POS_EMBEDS:
            raise ValueError(f"pos_embed must be one of {_POS_EMBEDS}, got {pos_embed!r}")
        if hidden_size % 4:
            raise ValueError(f"hidden_size must be divisible by 4 (the 2-D sin-cos table), got {hidden_size}")
        if not mlp_ratio > 0:
            raise ValueError(f"mlp_ratio must be positive, got {mlp_ratio}")
        if out_channels is None:
            out_channels = 2 * in_channels if learn_sigma else in_channels
        elif learn_sigma and out_channels != 2 * in_channels:
            raise ValueError(f"learn_sigma=True needs out_channels = 2 * in_channels = {2 * in_channels}, "
                             f"got {out_channels}")
        if isinstance(out_channels, bool) or not isinstance(out_channels, int) or out_channels < 1:
            raise ValueError(f"out_channels must be a positive int, got {out_channels!r}")
        if num_classes is not None and (isinstance(num_classes, bool) or not isinstance(num_classes, int)
                                        or num_classes < 1):
            raise ValueError(f"num_classes must be a positive int or None, got {num_classes!r}")

        self._config: Dict[str, Any] = dict(
            in_channels=in_channels, out_channels=int(out_channels), image_size=image_size, patch_size=patch_size,
            hidden_size=hidden_size, depth=depth, num_heads=num_heads, mlp_ratio=float(mlp_ratio),
            num_classes=num_classes, learn_sigma=bool(learn_sigma), pos_embed=pos_embed, freq_dim=freq_dim,
        )
        self.in_channels, self.out_channels, self.num_classes = in_channels, int(out_channels), num_classes
        self.image_size, self.patch_size, self.freq_dim = image_size, patch_size, freq_dim
        self.num_patches = (image_size // patch_size) ** 2

        # Patch embedding: a p x p convolution with stride p = one linear map per patch.
        self.x_embedder = nn.Conv2d(in_channels, hidden_size, patch_size, stride=patch_size)
        table = sincos_pos_embed_2d(hidden_size, image_size // patch_size).float().unsqueeze(0)  # (1, N, D)
        if pos_embed == "sincos":
            self.register_buffer("pos_embed", table, persistent=False)
        else:
            self.pos_embed = nn.Parameter(table.clone())
        # Timestep MLP: sinusoid (eq-time-embedding) -> Linear -> SiLU -> Linear; optional label table.
        self.t_embedder = nn.Sequential(nn.Linear(freq_dim, hidden_size), nn.SiLU(), nn.Linear(hidden_size, hidden_size))
        self.y_embedder = nn.Embedding(num_classes + 1, hidden_size) if num_classes else None
        self.blocks = nn.ModuleList([DiTBlock(hidden_size, num_heads, mlp_ratio) for _ in range(depth)])
        self.final_layer = FinalLayer(hidden_size, patch_size, self.out_channels)
        self._init_weights()

    def _init_weights(self) -> None:
        """The official initialisation: Xavier-uniform linear layers (the patch embedding too, as a linear
        map), zero biases, N(0, 0.02) timestep MLP and label table, and zero for every adaLN modulation
        and for the final linear layer (adaLN-Zero)."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        w = self.x_embedder.weight.data
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.x_embedder.bias)
        nn.init.normal_(self.t_embedder[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder[2].weight, std=0.02)
        if self.y_embedder is not None:
            nn.init.normal_(self.y_embedder.weight, std=0.02)
        for m in [b.adaLN_modulation[-1] for b in self.blocks] + [self.final_layer.adaLN_modulation[-1],
                                                                  self.final_layer.linear]:
            nn.init.zeros_(m.weight)
            nn.init.zeros_(m.bias)

    # ------------------------------------------------------------------------------------------ config
    @property
    def config(self) -> Dict[str, Any]:
        """The constructor arguments as a JSON-serialisable dict (a copy): ``DiT(**model.config)``."""
        return copy.deepcopy(self._config)

    @staticmethod
    def presets() -> List[str]:
        """Names accepted by :meth:`from_preset`."""
        return sorted(_PRESETS)

    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> "DiT":
        """A network from a named configuration, with any constructor argument overridden.

        The paper's twelve models ``"DiT-S/2"`` ... ``"DiT-XL/8"`` (sizes S, B, L, XL; patch 2, 4, 8; on the
        32x32x4 latents of 256x256 ImageNet, 1000 classes, learned variance); ``"fashion-small"`` and
        ``"fashion-base"`` (Fashion-MNIST padded to 32x32, about the parameter counts of the U-Net presets
        of the same names); ``"latent-small"`` (8x8x4 latents of :class:`ddpm_lib.Autoencoder`); ``"tiny"``
        (unit tests, 16x16 RGB).
        """
        if name not in _PRESETS:
            raise ValueError(f"unknown preset name {name!r}; choose one of {', '.join(cls.presets())}")
        return cls(**{**_PRESETS[name], **overrides})

    # ------------------------------------------------------------------------------------------ forward
    def _check_inputs(self, x: torch.Tensor, t: torch.Tensor, y: Optional[torch.Tensor]) -> None:
        want = (self.in_channels, self.image_size, self.image_size)
        if not torch.is_tensor(x):
            raise TypeError(f"x must be a tensor of shape (batch, {', '.join(map(str, want))}), got {type(x).__name__}")
        if x.ndim != 4 or tuple(x.shape[1:]) != want:
            raise ValueError(f"x must have shape (batch, {', '.join(map(str, want))}), got {tuple(x.shape)}")
        if not torch.is_tensor(t):
            raise TypeError(f"t must be an integer tensor of shape (batch,), got {type(t).__name__}")
        if t.dtype == torch.bool or t.dtype.is_complex:
            raise TypeError(f"t must be an integer (or real) tensor, got dtype {t.dtype}")
        if t.shape != (x.shape[0],):
            raise ValueError(f"t must have shape ({x.shape[0]},) to match x, got {tuple(t.shape)}")
        if y is not None:
            if self.y_embedder is None:
                raise ValueError("y (class labels) was given to an unconditional model; build it with num_classes")
            if not torch.is_tensor(y) or y.dtype.is_floating_point or y.dtype == torch.bool:
                raise TypeError("y must be an integer tensor of class labels, shape (batch,)")
            if y.shape != (x.shape[0],):
                raise ValueError(f"y must have shape ({x.shape[0]},) to match x, got {tuple(y.shape)}")

    def _forward(self, x: torch.Tensor, t: torch.Tensor, y: Optional[torch.Tensor]) -> torch.Tensor:
        h = self.x_embedder(x).flatten(2).transpose(1, 2) + self.pos_embed.to(x.dtype)  # (B, N, D)
        c = self.t_embedder(timestep_embedding(t, self.freq_dim).to(h.dtype))  # (B, D)
        if self.y_embedder is not None:
            if y is None:
                y = torch.full((x.shape[0],), self.num_classes, dtype=torch.long, device=x.device)
            c = c + self.y_embedder(y)
        for block in self.blocks:
            h = block(h, c)
        h = self.final_layer(h, c)  # (B, N, p*p*C_out)
        return unpatchify(h, self.patch_size, self.out_channels, x.shape[2], x.shape[3])

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: Optional[torch.Tensor] = None,
                guidance_scale: Optional[float | torch.Tensor] = None) -> torch.Tensor:
        """``eps_theta(x_t, t[, y])``, same call as :class:`ddpm_lib.UNet`.

        Args:
            x: ``(B, in_channels, image_size, image_size)``.
            t: timesteps ``(B,)``, 0-based integers (real values are accepted by the embedding).
            y: class labels ``(B,)`` in ``0..num_classes-1`` for a class-conditional model; None means the
                null class ``num_classes``.
            guidance_scale: classifier-free guidance weight w (needs ``num_classes`` and ``y``; a float or a
                ``(B,)`` tensor): returns ``(1 + w) eps(x, y) - w eps(x, null)`` on the first ``in_channels``
                channels and the conditional output on the variance channels, from one batch of 2B.

        Returns:
            ``(B, out_channels, image_size, image_size)``.
        """
        self._check_inputs(x, t, y)
        if guidance_scale is None:
            return self._forward(x, t, y)
        if self.y_embedder is None:
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

    # ------------------------------------------------------------------------------------------ cost
    def flops_per_forward(self) -> int:
        """Multiply-add FLOPs (2 per multiply-accumulate) of one forward pass of one image (book ``eq-dit-flops``).

        Counts the matrix products only (patch embedding, timestep MLP, ``depth`` blocks of
        ``2 (12 N D^2 + 2 N^2 D + 6 D^2)`` with ``N`` tokens of width ``D`` and MLP ratio 4, final layer);
        normalisations, activations and the softmax are left out, as in the paper's Gflop counts.
        """
        cfg = self._config
        N, D, p = self.num_patches, cfg["hidden_size"], cfg["patch_size"]
        hidden = int(D * cfg["mlp_ratio"])
        macs = N * D * p * p * cfg["in_channels"]  # patch embedding
        macs += cfg["freq_dim"] * D + D * D  # timestep MLP
        block = N * D * 3 * D + 2 * N * N * D + N * D * D + 2 * N * D * hidden + D * 6 * D
        macs += cfg["depth"] * block
        macs += D * 2 * D + N * D * p * p * self.out_channels  # final adaLN and linear
        return int(2 * macs)
