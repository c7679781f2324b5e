"""A small denoising network for low-dimensional data (2-D toy distributions)."""
from __future__ import annotations

import torch
from torch import nn

from .nn import timestep_embedding

__all__ = ["ToyMLP"]


class ToyMLP(nn.Module):
    """An MLP ``eps_theta(x_t, t)`` for points in R^d, conditioned on t by a sinusoidal embedding.

    Args:
        dim: data dimension d (2 for the toy distributions).
        hidden: width of the hidden layers.
        depth: number of hidden layers.
        time_dim: size of the timestep embedding.
        out_mult: 2 for ``var_type="learned_range"`` (mean and variance outputs), else 1.
        num_classes: optional class conditioning (an extra "null" class is added for
            classifier-free guidance).

    Shapes: ``x (B, d)``, ``t (B,)`` -> ``(B, out_mult * d)``.
    """

    def __init__(self, dim: int = 2, hidden: int = 128, depth: int = 3, time_dim: int = 64,
                 out_mult: int = 1, num_classes: int | None = None):
        super().__init__()
        self.dim, self.time_dim, self.out_mult, self.num_classes = dim, time_dim, out_mult, num_classes
        self.time_mlp = nn.Sequential(nn.Linear(time_dim, hidden), nn.SiLU(), nn.Linear(hidden, hidden))
        self.label_emb = nn.Embedding(num_classes + 1, hidden) if num_classes else None
        self.inp = nn.Linear(dim, hidden)
        self.blocks = nn.ModuleList(
            [nn.Sequential(nn.SiLU(), nn.Linear(hidden, hidden)) for _ in range(depth)]
        )
        self.out = nn.Sequential(nn.SiLU(), nn.Linear(hidden, out_mult * dim))

    def _forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None) -> torch.Tensor:
        if x.ndim != 2 or x.shape[1] != self.dim:
            raise ValueError(f"x must have shape (batch, {self.dim}), got {tuple(x.shape)}")
        if y is not None and self.label_emb is None:
            raise ValueError("y (class labels) was given to an unconditional model; build it with num_classes")
        emb = self.time_mlp(timestep_embedding(t, self.time_dim).to(x.dtype))
        if self.label_emb is not None:
            if y is None:
                y = torch.full((x.shape[0],), self.num_classes, dtype=torch.long, device=x.device)
            emb = emb + self.label_emb(y)
        h = self.inp(x) + emb
        for block in self.blocks:
            h = h + block(h) + emb
        return self.out(h)

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None,
                guidance_scale: float | None = None) -> torch.Tensor:
        if guidance_scale is None:
            return self._forward(x, t, y)
        if self.label_emb is None or y is None:
            raise ValueError("guidance_scale needs a class-conditional model (num_classes) and labels y")
        null = torch.full_like(y, self.num_classes)
        cond, uncond = self._forward(torch.cat([x, x]), torch.cat([t, t]), torch.cat([y, null])).chunk(2)
        d = self.dim
        eps = (1 + guidance_scale) * cond[:, :d] - guidance_scale * uncond[:, :d]
        return torch.cat([eps, cond[:, d:]], dim=1)
