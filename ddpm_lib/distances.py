"""Distances between two sets of samples: energy distance, MMD and the Frechet distance.

They measure how close generated samples are to data, with no network involved (the 2-D chapters and
tests), or between feature vectors (the Frechet distance that FID is built on).
"""
from __future__ import annotations

import numpy as np
import torch

__all__ = ["energy_distance", "mmd_rbf", "frechet_distance", "gaussian_stats"]


def _as2d(x) -> torch.Tensor:
    x = torch.as_tensor(x, dtype=torch.float64)
    return x.reshape(x.shape[0], -1)


def energy_distance(x, y) -> float:
    """Squared energy distance ``2 E|X-Y| - E|X-X'| - E|Y-Y'|`` (V-statistic), >= 0.

    Shapes: ``x (N, d)``, ``y (M, d)``; zero exactly when the two empirical laws coincide.
    """
    x, y = _as2d(x), _as2d(y)
    xy = torch.cdist(x, y).mean()
    xx = torch.cdist(x, x).mean()
    yy = torch.cdist(y, y).mean()
    return float(2 * xy - xx - yy)


def mmd_rbf(x, y, bandwidths=(0.1, 0.2, 0.5, 1.0, 2.0)) -> float:
    """Squared maximum mean discrepancy with a sum of Gaussian kernels (biased estimate), >= 0."""
    x, y = _as2d(x), _as2d(y)

    def k(a, b):
        d2 = torch.cdist(a, b) ** 2
        return sum(torch.exp(-d2 / (2 * h * h)) for h in bandwidths)

    return float(k(x, x).mean() + k(y, y).mean() - 2 * k(x, y).mean())


def gaussian_stats(features) -> tuple[np.ndarray, np.ndarray]:
    """Mean ``(d,)`` and covariance ``(d, d)`` of feature vectors ``(N, d)``, float64."""
    f = np.asarray(torch.as_tensor(features).detach().cpu().double().reshape(len(features), -1))
    return f.mean(axis=0), np.cov(f, rowvar=False)


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    """Frechet distance between N(mu1, sigma1) and N(mu2, sigma2):
    ``|mu1 - mu2|^2 + tr(sigma1 + sigma2 - 2 (sigma1 sigma2)^{1/2})``.
    """
    mu1, mu2 = np.atleast_1d(mu1), np.atleast_1d(mu2)
    sigma1, sigma2 = np.atleast_2d(sigma1), np.atleast_2d(sigma2)
    if mu1.ndim != 1 or mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape != 2 * mu1.shape:
        raise ValueError(f"means (d,) and covariances (d, d) of the same d expected, got {mu1.shape}, {sigma1.shape}, "
                         f"{mu2.shape}, {sigma2.shape}")
    diff = mu1 - mu2
    # tr((sigma1 sigma2)^{1/2}) = tr((A sigma2 A)^{1/2}) with A = sigma1^{1/2}; the matrix inside is
    # symmetric positive semi-definite, so its square root comes from a symmetric eigensolver.
    w1, v1 = np.linalg.eigh((sigma1 + sigma1.T) / 2)
    a = (v1 * np.sqrt(np.clip(w1, 0, None))) @ v1.T
    m = a @ ((sigma2 + sigma2.T) / 2) @ a
    tr_covmean = np.sqrt(np.clip(np.linalg.eigvalsh((m + m.T) / 2), 0, None)).sum()
    return float(diff.dot(diff) + np.trace(sigma1) + np.trace(sigma2) - 2 * tr_covmean)
