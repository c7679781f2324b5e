import math

import numpy as np
import pytest
import torch

from ddpm_lib import GaussianDiffusion, make_beta_schedule
from ddpm_lib.schedules import as_betas


def test_linear_is_the_papers_schedule():
    b = make_beta_schedule("linear", 1000)
    assert b.dtype == torch.float64 and b.shape == (1000,)
    assert b[0].item() == pytest.approx(1e-4, abs=1e-15)
    assert b[-1].item() == pytest.approx(0.02, abs=1e-15)
    assert torch.allclose(b.diff(), torch.full((999,), (0.02 - 1e-4) / 999, dtype=torch.float64))


def test_linear_scales_with_T():
    b = make_beta_schedule("linear", 500)
    assert b[0].item() == pytest.approx(2e-4) and b[-1].item() == pytest.approx(0.04)
    # explicit ends override the scaling
    b = make_beta_schedule("linear", 10, beta_start=0.1, beta_end=0.2)
    assert b[0].item() == pytest.approx(0.1) and b[-1].item() == pytest.approx(0.2)


def test_cosine_follows_its_alpha_bar_and_is_clipped():
    T, s = 1000, 0.008
    d = GaussianDiffusion("cosine", num_timesteps=T)
    f = lambda u: math.cos((u + s) / (1 + s) * math.pi / 2) ** 2
    expected = np.array([f((t + 1) / T) / f(0) for t in range(T)])
    # away from the clipped tail alpha-bar equals f(t)/f(0) to float64 precision
    assert np.allclose(d.alphas_cumprod.numpy()[:-5], expected[:-5], rtol=1e-10, atol=0)
    assert d.betas.max().item() == pytest.approx(0.999)
    assert d.betas[-1].item() == pytest.approx(0.999)


@pytest.mark.parametrize("name", ["linear", "cosine", "quadratic", "sigmoid"])
@pytest.mark.parametrize("T", [1, 50, 1000])
def test_every_schedule_is_valid(name, T):
    b = make_beta_schedule(name, T)
    assert b.shape == (T,) and b.dtype == torch.float64
    assert (b > 0).all() and (b < 1).all()


def test_quadratic_and_sigmoid_share_the_linear_end_points():
    b = make_beta_schedule("quadratic", 1000)
    assert b[0].item() == pytest.approx(1e-4) and b[-1].item() == pytest.approx(0.02)
    assert (b.diff() >= 0).all()
    # linear in sqrt(beta), not in beta: the midpoint of the square roots, squared
    mid = torch.linspace(1e-4 ** 0.5, 0.02 ** 0.5, 1000, dtype=torch.float64)[500] ** 2
    assert b[500].item() == pytest.approx(mid.item(), rel=1e-12)
    assert not torch.allclose(b, make_beta_schedule("linear", 1000))
    b = make_beta_schedule("sigmoid", 1000)  # approaches the ends without reaching them
    assert 1e-4 < b[0].item() < 2e-4 and 0.0199 < b[-1].item() < 0.02
    assert (b.diff() >= 0).all()


def test_alpha_bar_at_T_of_the_linear_schedule():
    d = GaussianDiffusion()
    assert d.alphas_cumprod[-1].item() == pytest.approx(4.0358e-05, rel=1e-3)


def test_bad_schedule_input():
    with pytest.raises(ValueError, match="name"):
        make_beta_schedule("cosin", 100)
    with pytest.raises(ValueError, match="num_timesteps"):
        make_beta_schedule("linear", 0)
    with pytest.raises(TypeError, match="num_timesteps"):
        make_beta_schedule("linear", 10.5)
    with pytest.raises(ValueError, match="beta_end"):
        make_beta_schedule("linear", 10)  # 1000/T scaling would give betas above 1
    assert make_beta_schedule("cosine", 10).shape == (10,)
    with pytest.raises(ValueError, match="options"):
        make_beta_schedule("linear", 10, gamma=3)
    with pytest.raises(ValueError, match=r"\(0, 1\)"):
        make_beta_schedule("linear", 10, beta_start=0.5, beta_end=1.5)
    with pytest.raises(ValueError, match="betas"):
        as_betas([0.1, 0.0, 0.2])
    with pytest.raises(ValueError, match="betas"):
        as_betas([0.1, 1.0])
    with pytest.raises(ValueError, match="one-dimensional"):
        as_betas(np.full((2, 2), 0.1))


def test_explicit_betas_accepted_wherever_a_schedule_is():
    betas = [0.1, 0.2, 0.3]
    for b in (betas, np.array(betas), torch.tensor(betas, dtype=torch.float32)):
        d = GaussianDiffusion(b)
        assert d.num_timesteps == 3 and d.betas.dtype == torch.float64
        assert d.alphas_cumprod[-1].item() == pytest.approx(0.9 * 0.8 * 0.7, rel=1e-6)
