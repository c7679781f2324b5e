"""Densities and divergences of Gaussians, elementwise, used by the variational bound.

All functions work elementwise and return a tensor of their arguments' (broadcast) shape, in nats;
:func:`discretized_gaussian_log_likelihood` needs ``x`` and ``means`` of the same shape (``log_scales``
broadcasts).
"""
from __future__ import annotations

import math

import torch

__all__ = [
    "mean_flat",
    "normal_kl",
    "approx_standard_normal_cdf",
    "discretized_gaussian_log_likelihood",
    "gaussian_log_likelihood",
]


def mean_flat(x: torch.Tensor) -> torch.Tensor:
    """Mean over every dimension but the first: ``(B, ...) -> (B,)``."""
    return x.mean(dim=tuple(range(1, x.ndim))) if x.ndim > 1 else x


def normal_kl(mean1, logvar1, mean2, logvar2) -> torch.Tensor:
    """KL( N(mean1, exp(logvar1)) || N(mean2, exp(logvar2)) ), elementwise, in nats.

    Book equation ``eq-gaussian-kl``:
    ``0.5 * (logvar2 - logvar1 + exp(logvar1 - logvar2) + (mean1 - mean2)^2 exp(-logvar2) - 1)``.
    Takes log-variances (never variances or standard deviations); scalars are accepted. The variance
    part ``exp(d) - 1 - d`` (``d = logvar1 - logvar2``) uses its Taylor series for ``|d| < 0.1``, so
    nearly equal variances (the prior term ``L_T``) keep float32's relative precision.
    """
    tensor = next((a for a in (mean1, logvar1, mean2, logvar2) if torch.is_tensor(a)), None)
    if tensor is None:
        raise TypeError("normal_kl needs at least one tensor argument")
    logvar1, logvar2 = (
        a if torch.is_tensor(a) else torch.tensor(a, dtype=tensor.dtype, device=tensor.device)
        for a in (logvar1, logvar2)
    )
    # -1 + logvar2 - logvar1 + exp(logvar1 - logvar2) = expm1(d) - d with d = logvar1 - logvar2. For
    # small |d| (e.g. the prior term, where d = log(1 - abar_T) ~ -4e-5) both forms cancel in float32,
    # which leaves an error of ~1e-3 relative; the Taylor series d^2 (1/2 + d/6 + d^2/24 + ...) does not.
    d = logvar1 - logvar2
    small = d.abs() < 0.1
    ds = torch.where(small, d, torch.zeros_like(d))  # keeps the unused branch finite (and its gradient)
    series = ds * ds * (0.5 + ds * (1 / 6 + ds * (1 / 24 + ds * (1 / 120 + ds / 720))))
    var_term = torch.where(small, series, torch.expm1(d) - d)
    return 0.5 * (var_term + (mean1 - mean2) ** 2 * torch.exp(-logvar2))


def approx_standard_normal_cdf(x: torch.Tensor) -> torch.Tensor:
    """A fast approximation of the standard normal CDF (the one the official DDPM code uses).

    ``0.5 * (1 + tanh(sqrt(2/pi) * (x + 0.044715 x^3)))``; absolute error at most 1.8e-4 (near |x| = 2.6).
    """
    return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x.pow(3))))


def discretized_gaussian_log_likelihood(
    x: torch.Tensor, means: torch.Tensor, log_scales: torch.Tensor, num_bins: int = 256
) -> torch.Tensor:
    """log p(x) under a Gaussian integrated over the bin of width 2/(num_bins-1) around x.

    Book equation ``eq-discretized-decoder``: the decoder p(x_0 | x_1) of the paper for data that
    were ``num_bins`` integer levels scaled to [-1, 1]. The first and last bins extend to -inf and
    +inf. ``log_scales`` is the log *standard deviation*. ``x`` and ``means`` have the same shape
    (``log_scales`` broadcasts to it); result in nats.
    """
    if isinstance(num_bins, bool) or not isinstance(num_bins, int) or num_bins < 2:
        raise ValueError(f"num_bins must be an int >= 2, got {num_bins!r}")
    if x.shape != means.shape:
        raise ValueError(f"x and means must have the same shape, got {tuple(x.shape)} and {tuple(means.shape)}")
    half_bin = 1.0 / (num_bins - 1)
    centered = x - means
    inv_stdv = torch.exp(-log_scales)
    cdf_plus = approx_standard_normal_cdf(inv_stdv * (centered + half_bin))
    cdf_min = approx_standard_normal_cdf(inv_stdv * (centered - half_bin))
    log_cdf_plus = torch.log(cdf_plus.clamp(min=1e-12))
    log_one_minus_cdf_min = torch.log((1.0 - cdf_min).clamp(min=1e-12))
    cdf_delta = cdf_plus - cdf_min
    # Data lie on the grid -1, -1 + 2/(num_bins-1), ..., 1: the lowest and highest bins are open (the paper's
    # code tests x < -0.999 and x > 0.999, the same for 256 levels; half a bin from the ends holds for any number)
    log_probs = torch.where(
        x < -1.0 + half_bin,
        log_cdf_plus,
        torch.where(x > 1.0 - half_bin, log_one_minus_cdf_min, torch.log(cdf_delta.clamp(min=1e-12))),
    )
    return log_probs


def gaussian_log_likelihood(x: torch.Tensor, means: torch.Tensor, log_var: torch.Tensor) -> torch.Tensor:
    """log N(x; means, exp(log_var)), elementwise, in nats (a density: it can be positive)."""
    return -0.5 * (math.log(2 * math.pi) + log_var + (x - means) ** 2 * torch.exp(-log_var))
