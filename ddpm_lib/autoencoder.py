"""A small convolutional autoencoder for latent diffusion (Rombach et al. 2022; book section 11.5).

Latent diffusion trains DDPM on ``z = s * E(x)`` instead of on the pixels ``x``: an autoencoder
``(E, D)`` is trained first and then frozen, and a sample is ``x = D(z_0 / s)`` with ``z_0`` drawn by the
diffusion model. The scale ``s`` (LDM's ``scale_factor``, 0.18215 for Stable Diffusion) makes the
latents of the data have unit standard deviation, the scale the diffusion's schedule assumes (book
``eq-latent-scale``).

:class:`Autoencoder` maps ``(B, C, H, W)`` images in [-1, 1] to ``(B, latent_channels, H/f, W/f)``
latents with ``f = 2 ** (len(ch_mult) - 1)``: the ``"fashion"`` preset takes Fashion-MNIST padded to
32x32x1 to 8x8x4 (a quarter of the numbers). Two kinds of latent:

* ``latent="kl"`` (LDM's "KL-reg" autoencoders): the encoder outputs a mean and a log-variance, the
  latent is drawn from ``N(mean, exp(logvar))`` during training, and a small KL penalty towards
  ``N(0, I)`` keeps the latent space bounded and smooth (book ``eq-ae-loss``);
* ``latent="plain"``: a deterministic latent and the reconstruction loss only.

In both cases :meth:`Autoencoder.encode` returns the deterministic (mean) latent times ``scale``, and
:meth:`Autoencoder.decode` divides by ``scale`` before decoding. :func:`train_autoencoder` trains one,
and then sets ``scale`` with :meth:`Autoencoder.fit_scale`.
"""
from __future__ import annotations

import copy
import math
from typing import Any, Dict, List, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["Autoencoder", "train_autoencoder"]

_LATENTS = ("kl", "plain")

_PRESETS: Dict[str, Dict[str, Any]] = {
    # Fashion-MNIST padded to 32x32x1 -> 8x8x4 (f = 4), about 0.6M parameters.
    "fashion": dict(in_channels=1, latent_channels=4, ch=32, ch_mult=(1, 2, 2), image_size=32),
    # Unit tests: 16x16 RGB -> 8x8x2.
    "tiny": dict(in_channels=3, latent_channels=2, ch=8, ch_mult=(1, 2), image_size=16),
}


def _norm(channels: int, num_groups: int) -> nn.GroupNorm:
    g = min(num_groups, channels)
    while channels % g:
        g -= 1
    return nn.GroupNorm(g, channels, eps=1e-6)


class _ResBlock(nn.Module):
    """``skip(x) + conv(SiLU(GN(conv(SiLU(GN(x))))))`` without a time embedding. ``(B, i, H, W) -> (B, o, H, W)``."""

    def __init__(self, in_ch: int, out_ch: int, num_groups: int):
        super().__init__()
        self.norm1, self.conv1 = _norm(in_ch, num_groups), nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.norm2, self.conv2 = _norm(out_ch, num_groups), nn.Conv2d(out_ch, out_ch, 3, padding=1)
        self.skip = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        return self.skip(x) + self.conv2(F.silu(self.norm2(h)))


class Autoencoder(nn.Module):
    """Encoder ``E``/decoder ``D`` of images in [-1, 1] with a spatial latent (book section 11.5).

    Args:
        in_channels: image channels C.
        latent_channels: latent channels c.
        ch: base channel count; level ``i`` has ``ch * ch_mult[i]`` channels.
        ch_mult: one entry per resolution; ``len(ch_mult) - 1`` stride-2 down-samplings, so
            ``f = 2 ** (len(ch_mult) - 1)``.
        image_size: training resolution (divisible by f); other sizes divisible by f also work.
        num_res_blocks: residual blocks per level (0 leaves only the strided convolutions), in the encoder
            and in the decoder.
        latent: ``"kl"`` (mean and log-variance, KL penalty) or ``"plain"`` (deterministic latent).
        kl_weight: weight of the KL term in :meth:`loss` (per latent number, against the per-pixel squared
            error); ignored for ``"plain"``.
        num_groups: GroupNorm groups.

    Shapes: ``encode``: ``(B, C, H, W) -> (B, c, H/f, W/f)``; ``decode`` the reverse. The buffer ``scale``
    (1 until :meth:`fit_scale`) multiplies the latents that ``encode`` returns and divides those ``decode``
    takes. ``model.config`` rebuilds the network: ``Autoencoder(**model.config)``.
    """

    def __init__(
        self,
        in_channels: int = 1,
        latent_channels: int = 4,
        ch: int = 32,
        ch_mult: Sequence[int] = (1, 2, 2),
        image_size: int = 32,
        num_res_blocks: int = 1,
        latent: str = "kl",
        kl_weight: float = 1e-3,
        num_groups: int = 8,
    ):
        super().__init__()
        for name, value in (("in_channels", in_channels), ("latent_channels", latent_channels), ("ch", ch),
                            ("image_size", image_size), ("num_res_blocks", num_res_blocks), ("num_groups", num_groups)):
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError(f"{name} must be an int, got {type(value).__name__}")
            lowest = 0 if name == "num_res_blocks" else 1
            if value < lowest:
                raise ValueError(f"{name} must be at least {lowest}, got {value}")
        ch_mult = [int(m) for m in ch_mult]
        if not ch_mult or min(ch_mult) < 1:
            raise ValueError(f"ch_mult must be a non-empty sequence of positive ints, got {ch_mult}")
        if latent not in _LATENTS:
            raise ValueError(f"latent must be one of {_LATENTS}, got {latent!r}")
        if kl_weight < 0:
            raise ValueError(f"kl_weight must be >= 0, got {kl_weight}")
        self.factor = 2 ** (len(ch_mult) - 1)
        if image_size % self.factor:
            raise ValueError(f"image_size must be divisible by 2 ** (len(ch_mult) - 1) = {self.factor}, got {image_size}")
        self._config: Dict[str, Any] = dict(
            in_channels=in_channels, latent_channels=latent_channels, ch=ch, ch_mult=ch_mult, image_size=image_size,
            num_res_blocks=num_res_blocks, latent=latent, kl_weight=float(kl_weight), num_groups=num_groups,
        )
        self.in_channels, self.latent_channels, self.latent, self.kl_weight = in_channels, latent_channels, latent, kl_weight
        self.register_buffer("scale", torch.ones(()))

        enc: List[nn.Module] = [nn.Conv2d(in_channels, ch, 3, padding=1)]
        c = ch
        for level, mult in enumerate(ch_mult):
            for _ in range(num_res_blocks):
                enc.append(_ResBlock(c, ch * mult, num_groups))
                c = ch * mult
            if level != len(ch_mult) - 1:
                enc.append(nn.Conv2d(c, ch * ch_mult[level + 1], 3, stride=2, padding=1))
                c = ch * ch_mult[level + 1]
        enc += [_ResBlock(c, c, num_groups), _norm(c, num_groups), nn.SiLU(),
                nn.Conv2d(c, (2 if latent == "kl" else 1) * latent_channels, 3, padding=1)]
        self.encoder = nn.Sequential(*enc)

        dec: List[nn.Module] = [nn.Conv2d(latent_channels, c, 3, padding=1), _ResBlock(c, c, num_groups)]
        for level in reversed(range(len(ch_mult))):
            for _ in range(num_res_blocks):
                dec.append(_ResBlock(c, ch * ch_mult[level], num_groups))
                c = ch * ch_mult[level]
            if level != 0:
                o = ch * ch_mult[level - 1]
                dec += [nn.Upsample(scale_factor=2.0, mode="nearest"), nn.Conv2d(c, o, 3, padding=1)]
                c = o
        dec += [_norm(c, num_groups), nn.SiLU(), nn.Conv2d(c, in_channels, 3, padding=1)]
        self.decoder = nn.Sequential(*dec)

    # ------------------------------------------------------------------------------------------ config
    @property
    def config(self) -> Dict[str, Any]:
        """The constructor arguments as a JSON-serialisable dict (a copy)."""
        return copy.deepcopy(self._config)

    @staticmethod
    def presets() -> List[str]:
        return sorted(_PRESETS)

    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> "Autoencoder":
        """``"fashion"`` (32x32x1 -> 8x8x4) or ``"tiny"`` (unit tests), with any argument overridden."""
        if name not in _PRESETS:
            raise ValueError(f"unknown preset name {name!r}; choose one of {', '.join(cls.presets())}")
        return cls(**{**_PRESETS[name], **overrides})

    # ------------------------------------------------------------------------------------------ the maps
    def _check_x(self, x: torch.Tensor) -> None:
        if not torch.is_tensor(x) or x.ndim != 4 or x.shape[1] != self.in_channels:
            shape = tuple(x.shape) if torch.is_tensor(x) else type(x).__name__
            raise ValueError(f"x must have shape (batch, {self.in_channels}, H, W), got {shape}")
        if x.shape[2] % self.factor or x.shape[3] % self.factor:
            raise ValueError(f"x's height and width must be divisible by {self.factor}, got {tuple(x.shape[2:])}")

    def posterior(self, x: torch.Tensor):
        """The unscaled encoder output: ``(mean, logvar)`` each ``(B, c, H/f, W/f)``; logvar is None for "plain"."""
        self._check_x(x)
        h = self.encoder(x)
        if self.latent == "plain":
            return h, None
        mean, logvar = h.chunk(2, dim=1)
        return mean, logvar.clamp(-30.0, 20.0)

    def encode(self, x: torch.Tensor, sample: bool = False, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """``z = scale * E(x)``: the posterior mean (or a draw from it with ``sample=True``, "kl" only).

        Shapes: ``(B, C, H, W)`` -> ``(B, latent_channels, H/f, W/f)``.
        """
        mean, logvar = self.posterior(x)
        z = mean
        if sample and logvar is not None:
            noise = torch.randn(mean.shape, generator=generator, device=mean.device if generator is None
                                else generator.device, dtype=mean.dtype).to(mean.device)
            z = mean + torch.exp(0.5 * logvar) * noise
        return z * self.scale

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """``x = D(z / scale)``, not clipped. Shapes: ``(B, c, h, w)`` -> ``(B, C, f h, f w)``."""
        if not torch.is_tensor(z) or z.ndim != 4 or z.shape[1] != self.latent_channels:
            shape = tuple(z.shape) if torch.is_tensor(z) else type(z).__name__
            raise ValueError(f"z must have shape (batch, {self.latent_channels}, h, w), got {shape}")
        return self.decoder(z / self.scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The reconstruction ``D(E(x))`` through the mean latent."""
        return self.decode(self.encode(x))

    def loss(self, x: torch.Tensor, generator: Optional[torch.Generator] = None) -> Dict[str, torch.Tensor]:
        """The training loss of book ``eq-ae-loss``, per example ``(B,)``.

        ``rec``: mean squared error per pixel of ``D(z)`` with ``z`` drawn from the posterior ("kl") or the
        plain latent; ``kl``: ``KL(N(mean, exp(logvar)) || N(0, I))`` per latent number (0 for "plain");
        ``loss = rec + kl_weight * kl``.
        """
        mean, logvar = self.posterior(x)
        if logvar is None:
            z, kl = mean, torch.zeros(x.shape[0], device=x.device, dtype=x.dtype)
        else:
            noise = torch.randn(mean.shape, generator=generator, device=mean.device if generator is None
                                else generator.device, dtype=mean.dtype).to(mean.device)
            z = mean + torch.exp(0.5 * logvar) * noise
            kl = 0.5 * (mean**2 + torch.exp(logvar) - 1.0 - logvar).flatten(1).mean(1)
        rec = ((self.decoder(z) - x) ** 2).flatten(1).mean(1)
        return {"loss": rec + self.kl_weight * kl, "rec": rec, "kl": kl}

    @torch.no_grad()
    def fit_scale(self, images: torch.Tensor, batch_size: int = 512) -> float:
        """Set ``scale = 1 / std`` of the unscaled mean latents of ``images`` (book ``eq-latent-scale``); return it.

        After this the latents of the data have standard deviation 1 (LDM's ``scale_factor``).
        """
        self.scale.fill_(1.0)
        device = self.scale.device
        zs = torch.cat([self.encode(images[i:i + batch_size].to(device)) for i in range(0, len(images), batch_size)])
        std = zs.double().std().item()
        if not math.isfinite(std) or std <= 0:
            raise ValueError(f"cannot normalise: the latents have standard deviation {std}")
        self.scale.fill_(1.0 / std)
        return 1.0 / std


def train_autoencoder(
    model: Autoencoder,
    images: torch.Tensor,
    steps: int,
    batch_size: int = 64,
    lr: float = 1e-3,
    generator: Optional[torch.Generator] = None,
    fit_scale: bool = True,
) -> List[float]:
    """Train ``model`` with Adam on :meth:`Autoencoder.loss`, then set its latent scale.

    Each step draws ``batch_size`` images uniformly (with replacement) from ``images`` ``(N, C, H, W)``,
    which should be on the model's device. The learning rate decays with a cosine to 0 over ``steps``.
    Returns the loss of every step; the model is left in evaluation mode.
    """
    if steps < 1:
        raise ValueError(f"steps must be at least 1, got {steps}")
    device = next(model.parameters()).device
    gen = generator if generator is not None else torch.Generator(device=images.device).manual_seed(0)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * s / steps)))
    model.train()
    model.scale.fill_(1.0)
    history: List[float] = []
    for _ in range(steps):
        idx = torch.randint(0, len(images), (batch_size,), generator=gen, device=gen.device).to(images.device)
        loss = model.loss(images[idx].to(device), generator=gen)["loss"].mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        history.append(loss.item())
    model.eval()
    if fit_scale:
        model.fit_scale(images)
    return history
