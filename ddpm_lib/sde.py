"""DDPM in continuous time (Song et al. 2021): the VP-SDE, the reverse SDE, the probability-flow ODE,
an adaptive ODE solver, exact log-likelihoods, and consistency models (Song et al. 2023).

Conventions (book chapters 11.6 and 11.7):

* Continuous time ``t`` runs over [0, 1] (data at 0, noise at 1). The DDPM code index ``i``
  (``0..T-1``, the paper's ``i + 1``) sits at ``t = (i + 1) / T`` (:meth:`VPSDE.time_of_index`), and a
  network trained on integer labels ``i`` is called with the real label whose noise level is the SDE's
  at ``t`` (:func:`score_from_eps`; close to ``t T - 1``).
* A *score function* is a callable ``score_fn(x, t)`` with ``x (B, *)`` and ``t (B,)`` (float, same
  dtype and device as ``x``) returning ``(B, *)``, an estimate of ``grad_x log p_t(x)``.
* ODE solvers integrate ``dy/dt = fn(t, y)`` with ``t`` a Python float and ``y`` a tensor; they
  compute in ``y``'s dtype (use float64 for likelihoods).
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Dict, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch import nn

from .diffusion import GaussianDiffusion

__all__ = [
    "VPSDE",
    "score_from_eps",
    "ODESolution",
    "dopri5",
    "sample_pf_ode",
    "sample_reverse_sde",
    "divergence",
    "ode_log_likelihood",
    "ve_sigma",
    "consistency_scalings",
    "ConsistencyModel",
    "consistency_distillation_loss",
    "consistency_sample",
]

ScoreFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
TimeLike = Union[float, torch.Tensor]


def _bcast(t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``t (B,)`` reshaped to ``(B, 1, ...)`` to broadcast against ``x (B, *)``."""
    if t.ndim != 1 or t.shape[0] != x.shape[0]:
        raise ValueError(f"t must have shape ({x.shape[0]},) to match x, got {tuple(t.shape)}")
    return t.to(device=x.device, dtype=x.dtype).reshape(x.shape[0], *([1] * (x.ndim - 1)))


def _full_t(t: float, x: torch.Tensor) -> torch.Tensor:
    return torch.full((x.shape[0],), float(t), dtype=x.dtype, device=x.device)


# ---------------------------------------------------------------------------------------------- the VP-SDE
class VPSDE:
    """The variance-preserving SDE ``dx = -1/2 beta(t) x dt + sqrt(beta(t)) dW`` on t in [0, 1]
    (book ``eq-vp-sde``), with the linear ``beta(t) = beta_min + t (beta_max - beta_min)``.

    It is the limit T -> infinity of DDPM's chain: the linear schedule has exactly
    ``beta_i = beta(i / (T - 1)) / T`` for code index ``i``, which sits at ``t_i = (i+1)/T``, so
    ``beta_i = beta(t_i) / T + O(1/T^2)``; the paper's linear schedule (1e-4 .. 0.02 at T = 1000,
    scaled by 1000/T otherwise) gives ``beta_min = 0.1`` and ``beta_max = 20`` (:meth:`from_diffusion`).

    Methods accept ``t`` as a float or a tensor and return the same kind (float64 for floats).
    """

    def __init__(self, beta_min: float = 0.1, beta_max: float = 20.0):
        if not (0 < beta_min <= beta_max):
            raise ValueError(f"need 0 < beta_min <= beta_max, got beta_min={beta_min}, beta_max={beta_max}")
        self.beta_min, self.beta_max = float(beta_min), float(beta_max)

    def __repr__(self) -> str:
        return f"VPSDE(beta_min={self.beta_min:g}, beta_max={self.beta_max:g})"

    @classmethod
    def from_diffusion(cls, diffusion: GaussianDiffusion, rtol: float = 1e-9) -> "VPSDE":
        """The VP-SDE whose discretisation is ``diffusion``'s linear schedule:
        ``beta_min = T beta_0``, ``beta_max = T beta_{T-1}`` (code indices).

        Raises ValueError when the betas are not linear in the index (within ``rtol``).
        """
        b = diffusion.betas.numpy()
        T = len(b)
        lin = np.linspace(b[0], b[-1], T)
        if T < 2 or not np.allclose(b, lin, rtol=rtol, atol=0.0):
            raise ValueError("diffusion: from_diffusion needs a linear beta schedule with T >= 2")
        return cls(T * float(b[0]), T * float(b[-1]))

    # ---- coefficients
    def beta(self, t: TimeLike) -> TimeLike:
        """``beta(t) = beta_min + t (beta_max - beta_min)``."""
        return self.beta_min + t * (self.beta_max - self.beta_min)

    def integral_beta(self, t: TimeLike) -> TimeLike:
        """``int_0^t beta(s) ds = beta_min t + (beta_max - beta_min) t^2 / 2``."""
        return self.beta_min * t + 0.5 * (self.beta_max - self.beta_min) * t * t

    def alpha_bar(self, t: TimeLike) -> TimeLike:
        """``abar(t) = exp(-int_0^t beta(s) ds)`` (book ``eq-vp-alpha-bar``), the continuous
        counterpart of DDPM's cumulative product."""
        ib = self.integral_beta(t)
        return torch.exp(-ib) if torch.is_tensor(ib) else math.exp(-ib)

    def marginal_std(self, t: TimeLike) -> TimeLike:
        """``sigma(t) = sqrt(1 - abar(t))``, the standard deviation of x_t given x_0 (computed with
        ``expm1`` so that it stays accurate for small t)."""
        ib = self.integral_beta(t)
        if torch.is_tensor(ib):
            return torch.sqrt(-torch.expm1(-ib))
        return math.sqrt(-math.expm1(-ib))

    def marginal(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """``x_t = sqrt(abar(t)) x0 + sigma(t) noise``; ``x0, noise (B, *)``, ``t (B,)`` -> ``(B, *)``."""
        if x0.shape != noise.shape:
            raise ValueError(f"x0 and noise must have the same shape, got {tuple(x0.shape)} and {tuple(noise.shape)}")
        tb = _bcast(t, x0)
        return torch.sqrt(self.alpha_bar(tb)) * x0 + self.marginal_std(tb) * noise

    def drift(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """``f(x, t) = -1/2 beta(t) x``; ``x (B, *)``, ``t (B,)``."""
        return -0.5 * self.beta(_bcast(t, x)) * x

    def diffusion(self, t: TimeLike) -> TimeLike:
        """``g(t) = sqrt(beta(t))``."""
        b = self.beta(t)
        return torch.sqrt(b) if torch.is_tensor(b) else math.sqrt(b)

    # ---- the reverse-time processes
    def pf_ode_drift(self, score_fn: ScoreFn, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The probability-flow ODE's velocity ``f - 1/2 g^2 score`` (book ``eq-pf-ode``)."""
        return self.drift(x, t) - 0.5 * self.beta(_bcast(t, x)) * score_fn(x, t)

    def reverse_sde_drift(self, score_fn: ScoreFn, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The reverse SDE's drift ``f - g^2 score`` (book ``eq-reverse-sde``), to be integrated
        backwards in time with noise ``g dW``."""
        return self.drift(x, t) - self.beta(_bcast(t, x)) * score_fn(x, t)

    # ---- the prior and the DDPM grid
    @staticmethod
    def prior_log_prob(z: torch.Tensor) -> torch.Tensor:
        """``log N(z; 0, I)`` summed over all but the batch dimension; ``z (B, *)`` -> ``(B,)``."""
        d = z[0].numel()
        return -0.5 * (z.reshape(z.shape[0], -1) ** 2).sum(1) - 0.5 * d * math.log(2 * math.pi)

    @staticmethod
    def time_of_index(i, num_timesteps: int):
        """Continuous time of DDPM code index ``i`` (0-based): ``t = (i + 1) / T``."""
        return (i + 1) / num_timesteps

    @staticmethod
    def index_of_time(t, num_timesteps: int):
        """The (real) network label of time ``t``: ``t T - 1``, the inverse of :meth:`time_of_index`."""
        return t * num_timesteps - 1


def score_from_eps(model: nn.Module, sde: VPSDE, num_timesteps: int,
                   model_kwargs: Optional[Dict[str, Any]] = None, labels: str = "matched") -> ScoreFn:
    """A score function from a DDPM eps-network: ``score(x, t) = -eps_theta(x, label(t)) / sigma(t)``
    (book ``eq-score-from-eps``), ``sigma(t)`` the VP-SDE's marginal std.

    The network was trained on integer code labels ``0..T-1`` of the linear schedule that ``sde``
    discretises (``beta_i = linspace(beta_min / T, beta_max / T, T)``, :meth:`VPSDE.from_diffusion`); its
    sinusoidal embedding accepts real labels. Which label stands for time ``t``:

    * ``"matched"`` (default): the real label whose noise level is the SDE's at ``t``, i.e. where the
      schedule's ``-log abar`` (linear between integer labels) equals ``int_0^t beta``. The network then
      sees x at the noise level it was trained for, and an ideal network gives the exact score. Near
      the grid times ``t_i = (i + 1) / T`` the label is close to ``i`` (0.08 for i = 0 at T = 1000).
    * ``"time"``: ``t T - 1``, the inverse of :meth:`VPSDE.time_of_index`. The label's own noise level
      differs from ``sigma(t)`` by O(1/T), which is a large relative error at the smallest t: 5 % at
      i = 0 for T = 1000, 22 % for T = 200.
    """
    if labels not in ("matched", "time"):
        raise ValueError(f"labels must be 'matched' or 'time', got {labels!r}")
    if labels == "matched" and num_timesteps < 2:
        raise ValueError("labels='matched' needs num_timesteps >= 2")
    kw = dict(model_kwargs or {})
    T = num_timesteps
    # -log abar_i of the discrete linear schedule, i = 0..T-1 (float64; increasing)
    neg_log_ab = -torch.log1p(-torch.linspace(sde.beta_min / T, sde.beta_max / T, T, dtype=torch.float64)).cumsum(0)
    tables = {neg_log_ab.device: neg_log_ab}  # one copy per device: no host-to-device copy per network call

    def label_of(t: torch.Tensor) -> torch.Tensor:
        if labels == "time":
            return sde.index_of_time(t, T)
        g = sde.integral_beta(t.to(torch.float64))
        table = tables.get(g.device)
        if table is None:
            table = tables[g.device] = neg_log_ab.to(g.device)
        k = torch.searchsorted(table, g).clamp(1, T - 1)  # the segment [k-1, k]; the end ones extrapolate
        lo, hi = table[k - 1], table[k]
        return ((k - 1) + (g - lo) / (hi - lo)).to(t.dtype)

    def score_fn(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if bool((torch.as_tensor(t) <= 0).any()):
            raise ValueError("an eps-network's score -eps / sigma(t) is undefined at t = 0 (sigma(0) = 0): "
                             f"start or end the ODE at t > 0, e.g. the first DDPM step t = 1/T = {1 / T:g}")
        eps = model(x, label_of(t), **kw)
        if eps.shape != x.shape:
            raise ValueError(f"the model must return the shape of x {tuple(x.shape)}, got {tuple(eps.shape)}")
        return -eps / sde.marginal_std(_bcast(t, x))

    return score_fn


# ---------------------------------------------------------------------------------------------- ODE solver
@dataclasses.dataclass
class ODESolution:
    """What :func:`dopri5` returns: the state ``y`` at the end, the number of function evaluations
    ``nfe``, accepted and rejected steps, and the accepted times ``ts`` (including both ends)."""

    y: torch.Tensor
    nfe: int
    steps: int
    rejected: int
    ts: list


# Dormand-Prince 5(4) tableau (Dormand & Prince 1980), the method of scipy's RK45 and MATLAB's ode45.
_DP_C = (0.0, 1 / 5, 3 / 10, 4 / 5, 8 / 9, 1.0)
_DP_A = (
    (),
    (1 / 5,),
    (3 / 40, 9 / 40),
    (44 / 45, -56 / 15, 32 / 9),
    (19372 / 6561, -25360 / 2187, 64448 / 6561, -212 / 729),
    (9017 / 3168, -355 / 33, 46732 / 5247, 49 / 176, -5103 / 18656),
)
_DP_B = (35 / 384, 0.0, 500 / 1113, 125 / 192, -2187 / 6784, 11 / 84)  # 5th order, also the FSAL stage row
_DP_E = (-71 / 57600, 0.0, 71 / 16695, -71 / 1920, 17253 / 339200, -22 / 525, 1 / 40)  # 5th minus 4th order


def _rms(x: torch.Tensor) -> float:
    return float(torch.sqrt(torch.mean(x * x)))


def dopri5(fn: Callable[[float, torch.Tensor], torch.Tensor], y0: torch.Tensor, t0: float, t1: float, *,
           rtol: float = 1e-5, atol: float = 1e-5, first_step: Optional[float] = None,
           max_steps: int = 100_000) -> ODESolution:
    """Solve ``dy/dt = fn(t, y)`` from ``t0`` to ``t1`` (either direction) with the adaptive
    Dormand-Prince 5(4) method, as scipy's ``solve_ivp(method="RK45")`` does.

    The local error estimate ``e`` is accepted when ``rms(e / (atol + rtol max(|y|, |y_new|))) <= 1``
    over all elements of ``y``; the step then grows or shrinks by ``0.9 err^(-1/5)`` (within a factor
    of 0.2..10). The first step follows Hairer, Norsett & Wanner (Solving ODEs I, II.4).

    Args:
        fn: ``fn(t, y)`` with ``t`` a float and ``y`` shaped like ``y0``; returns ``dy/dt``.
        y0: the state at ``t0``, any shape; the solver computes in its dtype.
    Returns:
        :class:`ODESolution` (``y`` shaped like ``y0``).
    """
    if rtol <= 0 or atol <= 0:
        raise ValueError(f"rtol and atol must be positive, got rtol={rtol}, atol={atol}")
    t0, t1 = float(t0), float(t1)
    y = y0.detach().clone()
    nfe = 0

    def f(t, yy):
        nonlocal nfe
        nfe += 1
        out = fn(t, yy)
        if out.shape != yy.shape:
            raise ValueError(f"fn must return the shape of y {tuple(yy.shape)}, got {tuple(out.shape)}")
        return out.detach()

    if t1 == t0:
        return ODESolution(y, 0, 0, 0, [t0])
    direction = 1.0 if t1 > t0 else -1.0
    span = abs(t1 - t0)
    k1 = f(t0, y)
    if first_step is None:  # Hairer's initial step selection (scipy's select_initial_step)
        scale = atol + rtol * y.abs()
        d0, d1 = _rms(y / scale), _rms(k1 / scale)
        h0 = 1e-6 if d0 < 1e-5 or d1 < 1e-5 else 0.01 * d0 / d1
        h0 = min(h0, span)
        y1 = y + direction * h0 * k1
        d2 = _rms((f(t0 + direction * h0, y1) - k1) / scale) / h0
        h1 = max(1e-6, h0 * 1e-3) if max(d1, d2) <= 1e-15 else (0.01 / max(d1, d2)) ** (1 / 5)
        h = min(100 * h0, h1, span)
    else:
        h = min(abs(float(first_step)), span)
    t, ts, steps, rejected = t0, [t0], 0, 0
    while direction * (t1 - t) > 0:
        if steps + rejected >= max_steps:
            raise RuntimeError(f"dopri5: more than max_steps={max_steps} steps between t={t0} and t={t1}")
        h = min(h, abs(t1 - t))
        hs = direction * h
        ks = [k1]
        for i in range(1, 6):
            yi = y + hs * sum(a * k for a, k in zip(_DP_A[i], ks))
            ks.append(f(t + _DP_C[i] * hs, yi))
        y_new = y + hs * sum(b * k for b, k in zip(_DP_B, ks))
        k7 = f(t + hs, y_new)
        ks.append(k7)
        err_vec = hs * sum(e * k for e, k in zip(_DP_E, ks))
        scale = atol + rtol * torch.maximum(y.abs(), y_new.abs())
        err = _rms(err_vec / scale)
        if not math.isfinite(err):
            raise FloatingPointError(f"dopri5: non-finite error estimate at t={t}")
        if err <= 1.0:
            t = t1 if h >= abs(t1 - t) else t + hs
            y, k1 = y_new, k7
            steps += 1
            ts.append(t)
            factor = 10.0 if err == 0 else min(10.0, max(0.2, 0.9 * err ** (-0.2)))
        else:
            rejected += 1
            factor = max(0.2, 0.9 * err ** (-0.2))
        h = h * factor
        if h < 1e-12 * max(1.0, abs(t)):
            raise RuntimeError(f"dopri5: step size underflow at t={t}")
    return ODESolution(y, nfe, steps, rejected, ts)


# ---------------------------------------------------------------------------------------------- samplers
@torch.no_grad()
def sample_pf_ode(score_fn: ScoreFn, sde: VPSDE, x_T: torch.Tensor, t_end: float, *, rtol: float = 1e-5,
                  atol: float = 1e-5, method: str = "dopri5", steps: Optional[int] = None
                  ) -> Tuple[torch.Tensor, int]:
    """Integrate the probability-flow ODE (book ``eq-pf-ode``) from t = 1 down to ``t_end``.

    ``method="dopri5"`` (adaptive, ``rtol``/``atol``) or ``"euler"`` (``steps`` uniform steps).
    Shapes: ``x_T (B, *)`` -> ``(B, *)``. Returns ``(x, nfe)``.
    """
    if not 0.0 <= t_end < 1.0:
        raise ValueError(f"t_end must lie in [0, 1), got {t_end}")

    def fn(t, x):
        return sde.pf_ode_drift(score_fn, x, _full_t(t, x))

    if method == "dopri5":
        sol = dopri5(fn, x_T, 1.0, t_end, rtol=rtol, atol=atol)
        return sol.y, sol.nfe
    if method == "euler":
        if steps is None or steps < 1:
            raise ValueError("method='euler' needs steps >= 1")
        ts = np.linspace(1.0, t_end, steps + 1)
        x = x_T
        for a, b in zip(ts[:-1], ts[1:]):
            x = x + (b - a) * fn(a, x)
        return x, steps
    raise ValueError(f"unknown method {method!r}; choose 'dopri5' or 'euler'")


@torch.no_grad()
def sample_reverse_sde(score_fn: ScoreFn, sde: VPSDE, x_T: torch.Tensor, steps: int, t_end: float, *,
                       generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Euler-Maruyama on the reverse SDE (book ``eq-reverse-sde``) from t = 1 down to ``t_end``.

    With ``dt = (1 - t_end) / steps``: ``x <- x - (f - g^2 score) dt + g sqrt(dt) z``; the last step
    adds no noise. Shapes: ``x_T (B, *)`` -> ``(B, *)``.
    """
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if not 0.0 <= t_end < 1.0:
        raise ValueError(f"t_end must lie in [0, 1), got {t_end}")
    ts = np.linspace(1.0, t_end, steps + 1)
    x = x_T
    for k in range(steps):
        t, dt = float(ts[k]), float(ts[k] - ts[k + 1])
        tt = _full_t(t, x)
        x = x - sde.reverse_sde_drift(score_fn, x, tt) * dt
        if k < steps - 1:
            if generator is None:
                z = torch.randn_like(x)
            else:
                z = torch.randn(x.shape, generator=generator, device=generator.device, dtype=x.dtype).to(x.device)
            x = x + sde.diffusion(t) * math.sqrt(dt) * z
    return x


# ---------------------------------------------------------------------------------------------- likelihood
def divergence(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor,
               probes: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """The divergence ``sum_j d fn_j / d x_j`` of a map applied example by example.

    Exact (``probes=None``): one backward pass per dimension (fine for 2-D data). Hutchinson's
    estimate (``probes`` of shape ``(K, B, *)``, e.g. Rademacher or Gaussian with identity
    covariance): ``mean_k v_k^T J v_k``, unbiased, one backward pass per probe.

    Shapes: ``x (B, *)`` -> ``(fn(x) detached (B, *), divergence (B,))``.
    """
    with torch.enable_grad():
        x = x.detach().requires_grad_(True)
        out = fn(x)
        if out.shape != x.shape:
            raise ValueError(f"fn must return the shape of x {tuple(x.shape)}, got {tuple(out.shape)}")
        B = x.shape[0]
        flat_out = out.reshape(B, -1)
        if probes is None:
            D = flat_out.shape[1]
            div = torch.zeros(B, dtype=x.dtype, device=x.device)
            for j in range(D):
                (g,) = torch.autograd.grad(flat_out[:, j].sum(), x, retain_graph=j < D - 1)
                div = div + g.reshape(B, -1)[:, j]
        else:
            if probes.shape[1:] != x.shape:
                raise ValueError(f"probes must have shape (K, *{tuple(x.shape)}), got {tuple(probes.shape)}")
            K = probes.shape[0]
            div = torch.zeros(B, dtype=x.dtype, device=x.device)
            for k in range(K):
                v = probes[k].to(x.dtype)
                (g,) = torch.autograd.grad((out * v).sum(), x, retain_graph=k < K - 1)
                div = div + (g * v).reshape(B, -1).sum(1)
            div = div / K
    return out.detach(), div.detach()


def ode_log_likelihood(score_fn: ScoreFn, sde: VPSDE, x: torch.Tensor, t_start: float = 0.0, *,
                       rtol: float = 1e-5, atol: float = 1e-5, probes: Optional[torch.Tensor] = None,
                       prior_log_prob: Optional[Callable[[torch.Tensor], torch.Tensor]] = None
                       ) -> Dict[str, Any]:
    """The exact log-density of the probability-flow ODE's model at ``x`` (book ``eq-ode-likelihood``).

    Integrates ``d x/dt = v(x, t)`` (``v = f - 1/2 g^2 score``) together with
    ``d delta / dt = div v(x, t)`` from ``t_start`` to 1 with :func:`dopri5`; then
    ``log p_{t_start}(x) = log p_1(x(1)) + delta(1)``, the instantaneous change of variables.
    The divergence is exact (``probes=None``) or Hutchinson's estimate with ``probes (K, B, *)``.

    Args:
        x: points ``(B, *)``; use float64 (and a float64 score) for tolerances below 1e-6.
        prior_log_prob: ``log p_1``; default the standard normal :meth:`VPSDE.prior_log_prob`.
    Returns:
        dict with ``log_prob (B,)`` in nats, ``prior_log_prob (B,)``, ``delta (B,)``, ``z (B, *)`` (the
        point at t = 1), ``nfe`` and ``bits_per_dim (B,)`` (``-log_prob / (D ln 2)``: the continuous density,
        with no dequantisation; for 8-bit images in [-1, 1] that is not comparable with
        :meth:`GaussianDiffusion.calc_bpd_loop`'s discrete bound, which would need uniform dequantisation noise
        and ``log2(127.5)``, about 7 bits, added per dimension).
    """
    if not 0.0 <= t_start < 1.0:
        raise ValueError(f"t_start must lie in [0, 1), got {t_start}")
    B, shape = x.shape[0], x.shape
    D = x[0].numel()

    def fn(t, y):
        xx = y[:, :D].reshape(shape)
        tt = _full_t(t, xx)
        v, div = divergence(lambda z: sde.pf_ode_drift(score_fn, z, tt), xx, probes)
        return torch.cat([v.reshape(B, D), div[:, None]], dim=1)

    y0 = torch.cat([x.detach().reshape(B, D), torch.zeros(B, 1, dtype=x.dtype, device=x.device)], dim=1)
    sol = dopri5(fn, y0, t_start, 1.0, rtol=rtol, atol=atol)
    z = sol.y[:, :D].reshape(shape)
    delta = sol.y[:, D]
    prior = (prior_log_prob or sde.prior_log_prob)(z)
    log_prob = prior + delta
    return {"log_prob": log_prob, "prior_log_prob": prior, "delta": delta, "z": z, "nfe": sol.nfe,
            "bits_per_dim": -log_prob / (D * math.log(2.0))}


# ---------------------------------------------------------------------------------------------- consistency models
def ve_sigma(alpha_bar: TimeLike) -> TimeLike:
    """``sigma = sqrt((1 - abar) / abar)``: the noise level of ``x_t / sqrt(abar)`` (book ``eq-ve-variable``)."""
    if torch.is_tensor(alpha_bar):
        return torch.sqrt((1.0 - alpha_bar) / alpha_bar)
    return math.sqrt((1.0 - alpha_bar) / alpha_bar)


def consistency_scalings(sigma: torch.Tensor, sigma_min: float, sigma_data: float = 1.0):
    """``(c_skip, c_out, c_in)`` of a consistency model at noise level ``sigma`` (book ``eq-cm-param``):

    ``c_skip = sigma_d^2 / ((sigma - sigma_min)^2 + sigma_d^2)``,
    ``c_out = sigma_d (sigma - sigma_min) / sqrt(sigma_d^2 + sigma^2)``,
    ``c_in = 1 / sqrt(sigma^2 + sigma_d^2)``, so that ``c_skip(sigma_min) = 1`` and
    ``c_out(sigma_min) = 0`` exactly (Song et al. 2023, appendix C).
    """
    sd2 = sigma_data**2
    c_skip = sd2 / ((sigma - sigma_min) ** 2 + sd2)
    c_out = sigma_data * (sigma - sigma_min) / torch.sqrt(sd2 + sigma**2)
    c_in = 1.0 / torch.sqrt(sigma**2 + sd2)
    return c_skip, c_out, c_in


class ConsistencyModel(nn.Module):
    """A consistency function on the DDPM grid:
    ``f(x_t, t) = c_skip(sigma_t) xhat + c_out(sigma_t) F(c_in(sigma_t) xhat, t)`` with
    ``xhat = x_t / sqrt(abar_t)`` and ``sigma_t = sqrt((1 - abar_t) / abar_t)`` (book ``eq-cm-param``).

    ``f(x, 0) = x / sqrt(abar_0)`` exactly (the boundary condition at the smallest noise level
    ``sigma_min = sigma_0``, code index 0). With ``sigma_data = 1``, ``c_in xhat = x_t``, so the network
    ``F`` sees exactly the input of a DDPM network and can start from its weights.

    Args:
        net: ``F(x, t)``, e.g. a :class:`~ddpm_lib.ToyMLP` or :class:`~ddpm_lib.UNet`, called with the
            code timestep ``t``.
        diffusion: gives ``abar`` of each code index.
        sigma_data: the data's standard deviation (1 for the toy data; 0.5 in the paper's images).

    Call ``model(x_t, t)`` with ``x_t (B, *)`` and integer code timesteps ``t (B,)``; returns the
    trajectory's end point ``(B, *)`` in data scale.
    """

    def __init__(self, net: nn.Module, diffusion: GaussianDiffusion, sigma_data: float = 1.0):
        super().__init__()
        self.net = net
        self.sigma_data = float(sigma_data)
        ab = diffusion.alphas_cumprod.float()
        self.register_buffer("sqrt_alphas_cumprod", ab.sqrt(), persistent=False)
        self.register_buffer("sigmas", ve_sigma(diffusion.alphas_cumprod).float(), persistent=False)
        self.sigma_min = float(self.sigmas[0])  # the very value forward() reads at t = 0, in any dtype

    def forward(self, x: torch.Tensor, t: torch.Tensor, **kwargs) -> torch.Tensor:
        if t.dtype.is_floating_point or t.shape != (x.shape[0],):
            raise ValueError(f"t must be an integer tensor of shape ({x.shape[0]},)")
        sigma = _bcast(self.sigmas[t], x)
        xhat = x / _bcast(self.sqrt_alphas_cumprod[t], x)
        c_skip, c_out, c_in = consistency_scalings(sigma, self.sigma_min, self.sigma_data)
        return c_skip * xhat + c_out * self.net(c_in * xhat, t, **kwargs)


def _gather(coef: torch.Tensor, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return _bcast(coef.to(x.device)[t.to(x.device)], x)


def consistency_distillation_loss(student: nn.Module, target: nn.Module, teacher: nn.Module,
                                  diffusion: GaussianDiffusion, x0: torch.Tensor, grid: Sequence[int], *,
                                  generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """The consistency-distillation loss with one DDIM step of the teacher (book ``eq-cd-loss``).

    Draw ``n`` uniformly from ``0..N-2`` and ``x_{n+1} = q_sample(x0, grid[n+1])``; step the teacher's
    probability-flow ODE once with DDIM (eta = 0, no clipping) from ``grid[n+1]`` to ``grid[n]``; the
    loss is ``|student(x_{n+1}, grid[n+1]) - target(x_n, grid[n])|^2`` averaged over dimensions, with
    no gradient through the target.

    Args:
        student, target: :class:`ConsistencyModel` s (the target is the student's EMA).
        teacher: the DDPM eps-network ``eps(x_t, t)``.
        grid: increasing code indices ``(N,)``, ``grid[0]`` the smallest noise level (usually 0).
        x0: data ``(B, *)``; generator: for ``n`` and the noise.
    Returns:
        per-example losses ``(B,)``.
    """
    grid_t = torch.as_tensor(np.asarray(grid), dtype=torch.long)
    if grid_t.ndim != 1 or len(grid_t) < 2 or not bool((grid_t[1:] > grid_t[:-1]).all()):
        raise ValueError("grid must be an increasing sequence of at least two code indices")
    B, dev = x0.shape[0], x0.device
    gdev = generator.device if generator is not None else dev
    n = torch.randint(0, len(grid_t) - 1, (B,), generator=generator, device=gdev).to(dev)
    grid_t = grid_t.to(dev)
    t_hi, t_lo = grid_t[n + 1], grid_t[n]
    noise = torch.randn(x0.shape, generator=generator, device=gdev, dtype=x0.dtype).to(dev)
    x_hi = diffusion.q_sample(x0, t_hi, noise)
    with torch.no_grad():
        eps = teacher(x_hi, t_hi)
        ab = diffusion.alphas_cumprod.to(x0.dtype)
        a_hi, a_lo = _gather(ab, t_hi, x0), _gather(ab, t_lo, x0)
        x0_pred = (x_hi - torch.sqrt(1 - a_hi) * eps) / torch.sqrt(a_hi)
        x_lo = torch.sqrt(a_lo) * x0_pred + torch.sqrt(1 - a_lo) * eps  # the DDIM step (eq-ddim-euler)
        tgt = target(x_lo, t_lo)
    out = student(x_hi, t_hi)
    return ((out - tgt) ** 2).reshape(B, -1).mean(1)


@torch.no_grad()
def consistency_sample(model: nn.Module, diffusion: GaussianDiffusion, x_T: torch.Tensor,
                       timesteps: Sequence[int], *, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Multistep consistency sampling (Song et al. 2023, Algorithm 1), one network call per entry of
    ``timesteps`` (decreasing code indices, the first usually T - 1).

    ``x = f(x_T, timesteps[0])``; then for each next ``tau``: ``xhat = x + sqrt(sigma_tau^2 -
    sigma_min^2) z``, re-scaled to ``x_tau = sqrt(abar_tau) xhat``, and ``x = f(x_tau, tau)``.
    Shapes: ``x_T (B, *)`` -> ``(B, *)``.
    """
    ts = [int(t) for t in timesteps]
    if not ts or any(a <= b for a, b in zip(ts[:-1], ts[1:])):
        raise ValueError(f"timesteps must be a non-empty decreasing sequence, got {ts}")
    ab = diffusion.alphas_cumprod
    sigma_min = float(ve_sigma(ab[0]))
    B = x_T.shape[0]
    x = model(x_T, torch.full((B,), ts[0], dtype=torch.long, device=x_T.device))
    for tau in ts[1:]:
        if generator is None:
            z = torch.randn_like(x)
        else:
            z = torch.randn(x.shape, generator=generator, device=generator.device, dtype=x.dtype).to(x.device)
        sigma = float(ve_sigma(ab[tau]))
        xhat = x + math.sqrt(max(sigma**2 - sigma_min**2, 0.0)) * z
        x = model(math.sqrt(float(ab[tau])) * xhat, torch.full((B,), tau, dtype=torch.long, device=x.device))
    return x
