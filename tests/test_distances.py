import math
import numpy as np
import pytest
import torch
from scipy import linalg

from ddpm_lib import energy_distance, frechet_distance, mmd_rbf
from ddpm_lib.distances import gaussian_stats


def test_frechet_distance_of_1d_gaussians_is_closed_form():
    # W2^2 between N(m1, s1^2) and N(m2, s2^2) is (m1 - m2)^2 + (s1 - s2)^2
    assert frechet_distance([0.3], [[4.0]], [-0.2], [[0.25]]) == pytest.approx(0.25 + 1.5**2, rel=1e-12)


@pytest.mark.parametrize("d", [2, 16, 64])
def test_frechet_distance_matches_scipy_sqrtm(d):
    rng = np.random.default_rng(d)
    a, b = rng.normal(size=(d, d)), rng.normal(size=(d, d))
    s1, s2 = a @ a.T, b @ b.T
    m1, m2 = rng.normal(size=d), rng.normal(size=d)
    ref = ((m1 - m2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(np.real(linalg.sqrtm(s1 @ s2)))
    assert frechet_distance(m1, s1, m2, s2) == pytest.approx(ref, rel=1e-9)
    assert frechet_distance(m1, s1, m1, s1) == pytest.approx(0.0, abs=1e-8 * np.trace(s1))


def test_frechet_distance_handles_singular_covariances():
    x = np.random.default_rng(0).normal(size=(10, 32))  # fewer samples than dimensions
    mu, sigma = gaussian_stats(x)
    assert np.isfinite(frechet_distance(mu, sigma, mu + 1, sigma))


def test_sample_distances_are_zero_for_identical_sets_and_grow_with_shift():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(500, 2, generator=g)
    assert energy_distance(x, x) == pytest.approx(0.0, abs=1e-12)
    assert mmd_rbf(x, x) == pytest.approx(0.0, abs=1e-12)
    near, far = x + 0.1, x + 1.0
    assert 0 < energy_distance(x, near) < energy_distance(x, far)
    assert 0 < mmd_rbf(x, near) < mmd_rbf(x, far)
    # the values themselves: scipy's energy distance (its square root), and the MMD of two points by hand
    from scipy import stats

    u, v = torch.randn(300, generator=g, dtype=torch.float64), torch.randn(200, generator=g, dtype=torch.float64) * 1.5
    assert energy_distance(u[:, None], v[:, None]) == pytest.approx(stats.energy_distance(u, v) ** 2, rel=1e-10)
    a, b = torch.zeros(1, 2), torch.tensor([[3.0, 4.0]])  # 5 apart: k(a, a) = 1 for each of the 5 bandwidths
    expect = sum(2 - 2 * math.exp(-25 / (2 * h * h)) for h in (0.1, 0.2, 0.5, 1.0, 2.0))
    assert mmd_rbf(a, b) == pytest.approx(expect, rel=1e-12)
