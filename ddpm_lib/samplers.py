"""Samplers: DDPM ancestral sampling (Algorithm 2 of the paper) and DDIM (Song et al. 2021).

Both take a model called as ``model(x_t, t, **model_kwargs)``; class labels are passed as ``y`` and a
classifier-free guidance scale as ``guidance_scale`` (only when given, so unconditional models need
not accept them).
"""
from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from .diffusion import GaussianDiffusion

__all__ = ["ddpm_sample", "ddim_sample", "ddim_timesteps", "ddim_step", "ddim_invert"]


def _randn(shape, generator: Optional[torch.Generator], device, dtype=torch.float32) -> torch.Tensor:
    """Standard normal noise drawn from ``generator`` (on its own device), moved to ``device``."""
    if generator is None:
        return torch.randn(shape, device=device, dtype=dtype)
    return torch.randn(shape, generator=generator, device=generator.device, dtype=dtype).to(device)


def _model_device(model, device) -> torch.device:
    if device is not None:
        return torch.device(device)
    try:
        return next(model.parameters()).device
    except (AttributeError, StopIteration):
        return torch.device("cpu")


def _kwargs(model_kwargs, y, guidance_scale) -> Dict[str, Any]:
    kw = dict(model_kwargs or {})
    if y is not None:
        kw["y"] = y
    if guidance_scale is not None:
        kw["guidance_scale"] = guidance_scale
    return kw


def _initial(shape, x_T, generator, device, model=None) -> torch.Tensor:
    """x_T as given, or drawn: float64 for a float64 model, else float32."""
    shape = tuple(shape)
    if x_T is not None:
        if tuple(x_T.shape) != shape:
            raise ValueError(f"x_T must have shape {shape}, got {tuple(x_T.shape)}")
        dtype = x_T.dtype if x_T.dtype in (torch.float32, torch.float64) else torch.float32
        return x_T.to(device=device, dtype=dtype)
    try:
        dtype = torch.float64 if next(model.parameters()).dtype == torch.float64 else torch.float32
    except (AttributeError, StopIteration, TypeError):
        dtype = torch.float32
    return _randn(shape, generator, device, dtype)


@torch.no_grad()
def ddpm_sample(
    model,
    diffusion: GaussianDiffusion,
    shape: Sequence[int],
    *,
    x_T: Optional[torch.Tensor] = None,
    generator: Optional[torch.Generator] = None,
    clip_denoised: bool = True,
    y: Optional[torch.Tensor] = None,
    guidance_scale: Optional[float] = None,
    model_kwargs: Optional[Dict[str, Any]] = None,
    progress: bool = True,
    return_intermediates: bool = False,
    record_every: Optional[int] = None,
    device=None,
) -> Union[torch.Tensor, Tuple[torch.Tensor, Dict[str, Any]]]:
    """Algorithm 2: ancestral sampling from x_T ~ N(0, I) down to x_0 (book ``eq-ddpm-step``).

    Each step draws ``x_{t-1} ~ p(x_{t-1} | x_t)`` with the variance of ``diffusion.var_type``
    (the paper's ``fixed_large`` by default); no noise is added at the last step (code t = 0).

    Args:
        shape: ``(B, C, H, W)`` or ``(B, D)``.
        x_T: the starting noise, shape ``shape`` (drawn from ``generator`` when None).
        generator: a ``torch.Generator`` for reproducible noise (on any device).
        clip_denoised: clip each x_0 prediction to [-1, 1] before forming the mean (right for images
            in [-1, 1]; pass False for data that extend beyond, such as the 2-D toy sets).
        y, guidance_scale, model_kwargs: passed through to the model.
        return_intermediates: also return the chain: x_t and the x_0 prediction every
            ``record_every`` steps (default T // 20) and at the first and last step.
    Returns:
        samples ``(B, ...)``, or ``(samples, {"t": [...], "x_t": (K, B, ...), "pred_x0": (K, B, ...)})``.
    """
    from tqdm.auto import tqdm

    device = _model_device(model, device)
    T = diffusion.num_timesteps
    kw = _kwargs(model_kwargs, y, guidance_scale)
    x = _initial(shape, x_T, generator, device, model)
    if record_every is not None and (isinstance(record_every, bool) or not isinstance(record_every, int)
                                     or record_every < 1):
        raise ValueError(f"record_every must be an int >= 1 or None, got {record_every!r}")
    every = max(1, T // 20) if record_every is None else record_every
    record: Dict[str, List] = {"t": [], "x_t": [], "pred_x0": []}
    for step in tqdm(range(T - 1, -1, -1), disable=not progress, desc="DDPM"):
        t = torch.full((x.shape[0],), step, dtype=torch.long, device=device)
        noise = _randn(x.shape, generator, device, x.dtype) if step > 0 else torch.zeros_like(x)
        out = diffusion.p_sample(model, x, t, clip_denoised=clip_denoised, model_kwargs=kw, noise=noise)
        if return_intermediates and (step % every == 0 or step == T - 1):
            record["t"].append(step)
            record["x_t"].append(x.cpu())
            record["pred_x0"].append(out["pred_x0"].cpu())
        x = out["sample"]
    if not return_intermediates:
        return x
    return x, {"t": record["t"], "x_t": torch.stack(record["x_t"]), "pred_x0": torch.stack(record["pred_x0"])}


def ddim_timesteps(num_timesteps: int, steps: int, skip_type: str = "uniform") -> np.ndarray:
    """The DDIM sub-sequence tau, 0-based (book ``eq-ddim-timesteps``): increasing, except that
    ``"quadratic"`` may repeat a timestep.

    ``"uniform"``: ``floor((i - 1) T / S)`` for ``i = 1..S``, the spacing of the DDIM paper's code
    (``range(0, T, T // S)`` where S divides T; e.g. 0, 20, ..., 980 for T = 1000, S = 50). Where S divides
    T this is ``0, c, 2c, ...`` with ``c = T / S``, the ``"leading"`` spacing of common libraries; for other
    S those stop at ``(S - 1) floor(T / S)`` (897 for S = 300), far below T, while this one ends within
    T / S of it. (The paper's text writes the linear choice as ``tau_i = floor(c i)`` with ``tau_S`` close
    to T: where S divides T that is ``"trailing"`` below, 19, 39, ..., 999 in 0-based indices.)
    ``"quadratic"``: ``floor((sqrt(0.8 T) (i - 1) / (S - 1))^2)`` for ``i = 1..S`` (0 to 0.8 T), the DDIM
    paper's choice for CIFAR-10, as its code computes it: a timestep repeated at the start (0, 0, 1, ...
    for T = 1000, S = 50) is kept, and its step (from t to the same t) leaves x as it is.
    ``"linspace"``: ``round(linspace(0, T-1, S))``, which also visits the last timestep. ``"trailing"``:
    ``T-1, T-1-c, ...`` counted down from the last timestep (the "trailing" spacing of Lin et al. 2024),
    so that even one step starts at t = T-1.
    """
    if steps < 1 or steps > num_timesteps:
        raise ValueError(f"steps must be in 1..{num_timesteps}, got {steps}")
    if skip_type == "uniform":
        seq = (np.arange(steps, dtype=np.int64) * num_timesteps) // steps  # exact integer floor
    elif skip_type == "quadratic":
        seq = (np.linspace(0, np.sqrt(num_timesteps * 0.8), steps) ** 2).astype(int)
    elif skip_type == "linspace":
        seq = np.round(np.linspace(0, num_timesteps - 1, steps)).astype(int)
    elif skip_type == "trailing":
        # steps values exactly (np.arange with a float step can give one more, just above 0)
        seq = (np.round(num_timesteps - np.arange(steps) * (num_timesteps / steps)).astype(int) - 1)[::-1]
    else:
        raise ValueError(
            f"unknown skip_type {skip_type!r}; choose 'uniform', 'quadratic', 'linspace' or 'trailing'"
        )
    if skip_type == "quadratic":
        return seq  # non-decreasing; repeats kept, as in the DDIM paper's code
    seq = np.unique(seq)
    if len(seq) != steps:
        raise ValueError(f"skip_type={skip_type!r} gives repeated timesteps for steps={steps}; use fewer steps")
    return seq


def ddim_step(
    diffusion: GaussianDiffusion,
    out: Dict[str, torch.Tensor],
    x_t: torch.Tensor,
    t: int,
    t_prev: int,
    eta: float,
    noise: Optional[torch.Tensor],
) -> torch.Tensor:
    """One DDIM update from code timestep ``t`` to ``t_prev`` (``-1`` means x_0, with abar = 1).

    Book equation ``eq-ddim-step``:
    ``x_prev = sqrt(abar_prev) x0_pred + sqrt(1 - abar_prev - sigma^2) eps_pred + sigma z`` with
    ``sigma = eta sqrt((1 - abar_prev) / (1 - abar_t)) sqrt(1 - abar_t / abar_prev)``.
    """
    ab = diffusion.alphas_cumprod
    a_t = float(ab[t])
    a_prev = float(ab[t_prev]) if t_prev >= 0 else 1.0
    sigma = eta * np.sqrt((1 - a_prev) / (1 - a_t)) * np.sqrt(1 - a_t / a_prev)
    dir_coef = np.sqrt(max(1 - a_prev - sigma**2, 0.0))
    x_prev = np.sqrt(a_prev) * out["pred_x0"] + dir_coef * out["pred_eps"]
    if sigma > 0 and noise is not None:
        x_prev = x_prev + sigma * noise
    return x_prev


@torch.no_grad()
def ddim_sample(
    model,
    diffusion: GaussianDiffusion,
    shape: Sequence[int],
    steps: int = 50,
    eta: float = 0.0,
    *,
    x_T: Optional[torch.Tensor] = None,
    generator: Optional[torch.Generator] = None,
    clip_denoised: bool = True,
    y: Optional[torch.Tensor] = None,
    guidance_scale: Optional[float] = None,
    model_kwargs: Optional[Dict[str, Any]] = None,
    skip_type: str = "uniform",
    progress: bool = True,
    return_intermediates: bool = False,
    record_every: Optional[int] = None,
    device=None,
) -> Union[torch.Tensor, Tuple[torch.Tensor, Dict[str, Any]]]:
    """DDIM sampling (Song et al. 2021) with ``steps`` network calls (book ``eq-ddim-step``).

    Visits the timesteps of :func:`ddim_timesteps` from the last to the first; the step after the
    first visited timestep goes to x_0 with abar taken as 1. ``eta = 0`` is deterministic given
    x_T; ``eta = 1`` with ``steps = T`` is DDPM with the ``fixed_small`` variance. Above 1, where
    ``sigma^2`` would exceed ``1 - abar_prev``, the direction term's coefficient is clipped at 0 (as in
    the DDIM paper's code), so the steps no longer keep q's marginals.

    Returns samples ``(B, ...)``, or ``(samples, {"t", "x_t", "pred_x0"})`` with every step recorded
    (``record_every=k``: every k-th visited step, counted from the first, and the last).
    """
    from tqdm.auto import tqdm

    if not eta >= 0:  # also NaN
        raise ValueError(f"eta must be >= 0, got {eta}")
    device = _model_device(model, device)
    kw = _kwargs(model_kwargs, y, guidance_scale)
    seq = ddim_timesteps(diffusion.num_timesteps, steps, skip_type)
    prev = np.concatenate([[-1], seq[:-1]])
    if record_every is not None and (isinstance(record_every, bool) or not isinstance(record_every, int)
                                     or record_every < 1):
        raise ValueError(f"record_every must be an int >= 1 or None, got {record_every!r}")
    every = record_every or 1
    x = _initial(shape, x_T, generator, device, model)
    record: Dict[str, List] = {"t": [], "x_t": [], "pred_x0": []}
    pairs = list(zip(seq[::-1], prev[::-1]))
    for n, (t_i, t_prev) in enumerate(tqdm(pairs, disable=not progress, desc="DDIM")):
        t = torch.full((x.shape[0],), int(t_i), dtype=torch.long, device=device)
        out = diffusion.p_mean_variance(model, x, t, clip_denoised=clip_denoised, model_kwargs=kw)
        noise = _randn(x.shape, generator, device, x.dtype) if (eta > 0 and t_prev >= 0) else None
        if return_intermediates and (n % every == 0 or n == len(pairs) - 1):
            record["t"].append(int(t_i))
            record["x_t"].append(x.cpu())
            record["pred_x0"].append(out["pred_x0"].cpu())
        x = ddim_step(diffusion, out, x, int(t_i), int(t_prev), eta, noise)
    if not return_intermediates:
        return x
    return x, {"t": record["t"], "x_t": torch.stack(record["x_t"]), "pred_x0": torch.stack(record["pred_x0"])}


@torch.no_grad()
def ddim_invert(
    model,
    diffusion: GaussianDiffusion,
    x0: torch.Tensor,
    steps: int = 50,
    *,
    y: Optional[torch.Tensor] = None,
    model_kwargs: Optional[Dict[str, Any]] = None,
    skip_type: str = "uniform",
    progress: bool = True,
) -> torch.Tensor:
    """Encode data to x_T by running the deterministic DDIM ODE forwards (book ``eq-ddim-inversion``).

    From x_0 it visits the same timesteps as :func:`ddim_sample` in non-decreasing order, using the
    model's eps at the current point (the usual first-order inversion). ``ddim_sample(..., x_T=
    ddim_invert(...), eta=0, clip_denoised=False)`` gives back x0 up to discretisation error.
    """
    from tqdm.auto import tqdm

    kw = _kwargs(model_kwargs, y, None)
    seq = ddim_timesteps(diffusion.num_timesteps, steps, skip_type)
    prev = np.concatenate([[-1], seq[:-1]])
    ab = diffusion.alphas_cumprod
    x = x0 if x0.dtype in (torch.float32, torch.float64) else x0.float()
    for t_prev, t_i in tqdm(list(zip(prev, seq)), disable=not progress, desc="DDIM inversion"):
        # eps is evaluated at the point we hold (x at t_prev); at x_0 itself, where no network
        # timestep exists, the label of the first visited timestep is used.
        label = int(t_prev) if t_prev >= 0 else int(t_i)
        t = torch.full((x.shape[0],), label, dtype=torch.long, device=x.device)
        eps = diffusion.p_mean_variance(model, x, t, clip_denoised=False, model_kwargs=kw)["pred_eps"]
        a_prev = float(ab[t_prev]) if t_prev >= 0 else 1.0
        a_t = float(ab[t_i])
        pred_x0 = (x - np.sqrt(1 - a_prev) * eps) / np.sqrt(a_prev)
        x = np.sqrt(a_t) * pred_x0 + np.sqrt(1 - a_t) * eps
    return x
