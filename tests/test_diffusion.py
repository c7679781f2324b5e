import math

import numpy as np
import pytest
import torch
from scipy import stats

from ddpm_lib import GaussianDiffusion, ToyMLP, discretized_gaussian_log_likelihood, normal_kl


def _nongaussian_x0(n, g):
    # a skewed, bimodal 1-D law: far from Gaussian, so the moments test the closed form properly
    comp = torch.rand(n, generator=g, dtype=torch.float64) < 0.3
    return torch.where(comp, 0.8 + 0.05 * torch.randn(n, generator=g, dtype=torch.float64),
                       -0.4 + 0.2 * torch.rand(n, generator=g, dtype=torch.float64))[:, None]


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_closed_form_equals_the_iterated_chain(schedule):
    g = torch.Generator().manual_seed(0)
    d = GaussianDiffusion(schedule, num_timesteps=200)
    n = 200_000
    x0 = _nongaussian_x0(n, g)
    x = x0.clone()
    checks = {0, 9, 49, 149, 199}
    for t in range(d.num_timesteps):
        x = torch.sqrt(1 - d.betas[t]) * x + torch.sqrt(d.betas[t]) * torch.randn(x.shape, generator=g, dtype=torch.float64)
        if t in checks:
            tt = torch.full((n,), t, dtype=torch.long)
            y = d.q_sample(x0, tt, torch.randn(x0.shape, generator=g, dtype=torch.float64))
            # first three moments, each within a few standard errors of the difference
            for k in (1, 2, 3):
                a, b = x.pow(k), y.pow(k)
                se = math.sqrt((a.var() + b.var()).item() / n)
                assert abs(a.mean().item() - b.mean().item()) < 5 * se, (schedule, t, k)
            # and the exact moments of the closed form
            ab = d.alphas_cumprod[t]
            assert x.mean().item() == pytest.approx((ab.sqrt() * x0.mean()).item(), abs=5 * x.std().item() / math.sqrt(n))
            # deterministically: q_sample's coefficients are the products over the paper's steps 1..t+1
            prod = torch.prod(1 - d.betas[: t + 1])
            torch.testing.assert_close(d.q_sample(x0[:8], tt[:8], torch.zeros_like(x0[:8])),
                                       prod.sqrt() * x0[:8], rtol=1e-12, atol=0)
            assert d.sqrt_one_minus_alphas_cumprod[t].item() ** 2 == pytest.approx(1 - prod.item(), rel=1e-12)


def test_q_mean_variance_matches_q_sample():
    d = GaussianDiffusion()
    x0 = torch.rand(4, 3, 2, 2, dtype=torch.float64) * 2 - 1
    t = torch.tensor([0, 10, 500, 999])
    mean, var, logvar = d.q_mean_variance(x0, t)
    assert torch.allclose(logvar.exp(), var)
    assert torch.allclose(d.q_sample(x0, t, torch.zeros_like(x0)), mean)


def test_posterior_given_x0_is_bayes_rule():
    """q(x_{t-1} | x_t, x_0) from conditioning the joint Gaussian of (x_{t-1}, x_t) given x_0."""
    d = GaussianDiffusion("linear", num_timesteps=100)
    x0 = torch.tensor([[0.3], [-0.7], [0.9]], dtype=torch.float64)
    for t in (1, 5, 50, 99):
        ab_prev, a, b = d.alphas_cumprod[t - 1], d.alphas[t], d.betas[t]
        # x_{t-1} = sqrt(ab_prev) x0 + sqrt(1-ab_prev) e1,  x_t = sqrt(a) x_{t-1} + sqrt(b) e2
        var_prev = 1 - ab_prev
        cov = var_prev * a.sqrt()
        var_t = a * var_prev + b
        x_t = torch.tensor([[0.1], [1.2], [-0.5]], dtype=torch.float64)
        mean_prev, mean_t = ab_prev.sqrt() * x0, ab_prev.sqrt() * a.sqrt() * x0
        cond_mean = mean_prev + cov / var_t * (x_t - mean_t)
        cond_var = var_prev - cov**2 / var_t
        tt = torch.full((3,), t)
        mean, var, _ = d.q_posterior_mean_variance(x0, x_t, tt)
        assert torch.allclose(mean, cond_mean, rtol=1e-10, atol=1e-12)
        assert torch.allclose(var.squeeze(), cond_var.expand(3), rtol=1e-10)


def test_posterior_for_gaussian_data_is_exact():
    """For x_0 ~ N(m, s^2), q(x_{t-1} | x_t) is Gaussian; averaging the posterior over
    p(x_0 | x_t) must give its exact mean and variance (law of total expectation / variance)."""
    d = GaussianDiffusion("cosine", num_timesteps=50)
    m, s = 0.4, 0.3
    x_t = torch.tensor([[-1.0], [0.2], [1.5]], dtype=torch.float64)
    for t in (1, 10, 30, 49):
        ab, ab_prev = d.alphas_cumprod[t], d.alphas_cumprod[t - 1]
        # exact: (x_{t-1}, x_t) jointly Gaussian
        m_prev, v_prev = ab_prev.sqrt() * m, ab_prev * s**2 + (1 - ab_prev)
        m_t, v_t = ab.sqrt() * m, ab * s**2 + (1 - ab)
        c = d.alphas[t].sqrt() * v_prev
        exact_mean = m_prev + c / v_t * (x_t - m_t)
        exact_var = v_prev - c**2 / v_t
        # via the posterior: x_0 | x_t is Gaussian too
        post_x0_var = 1 / (1 / s**2 + ab / (1 - ab))
        post_x0_mean = post_x0_var * (m / s**2 + ab.sqrt() * x_t / (1 - ab))
        tt = torch.full((3,), t)
        mu, var, _ = d.q_posterior_mean_variance(post_x0_mean, x_t, tt)
        total_var = var + d.posterior_mean_coef1[t] ** 2 * post_x0_var
        assert torch.allclose(mu, exact_mean, rtol=1e-9, atol=1e-12)
        assert torch.allclose(total_var.squeeze(), exact_var.expand(3), rtol=1e-9)


def test_posterior_mean_with_eps_equals_posterior_mean_with_x0():
    d = GaussianDiffusion()
    g = torch.Generator().manual_seed(1)
    x0 = torch.randn(8, 3, 4, 4, generator=g, dtype=torch.float64)
    eps = torch.randn(8, 3, 4, 4, generator=g, dtype=torch.float64)
    t = torch.tensor([0, 1, 2, 10, 100, 500, 998, 999])
    x_t = d.q_sample(x0, t, eps)
    via_x0, _, _ = d.q_posterior_mean_variance(x0, x_t, t)
    via_eps = d.mean_from_noise(x_t, t, eps)
    assert torch.allclose(via_x0, via_eps, rtol=1e-9, atol=1e-10)


def test_parameterisations_are_exact_inverses():
    d = GaussianDiffusion()
    g = torch.Generator().manual_seed(2)
    x0 = torch.randn(6, 2, 3, 3, generator=g, dtype=torch.float64)
    eps = torch.randn(6, 2, 3, 3, generator=g, dtype=torch.float64)
    t = torch.tensor([0, 5, 50, 400, 900, 999])
    x_t = d.q_sample(x0, t, eps)
    v = d.get_v(x0, eps, t)
    assert torch.allclose(d.predict_start_from_noise(x_t, t, eps), x0, atol=1e-9)
    assert torch.allclose(d.predict_noise_from_start(x_t, t, x0), eps, atol=1e-7)
    assert torch.allclose(d.predict_start_from_v(x_t, t, v), x0, atol=1e-10)
    assert torch.allclose(d.predict_noise_from_v(x_t, t, v), eps, atol=1e-10)
    # round trips
    x0_back = d.predict_start_from_noise(x_t, t, d.predict_noise_from_start(x_t, t, x0))
    assert torch.allclose(x0_back, x0, atol=1e-9)


def test_normal_kl_matches_torch_distributions():
    g = torch.Generator().manual_seed(3)
    m1, m2 = torch.randn(100, generator=g, dtype=torch.float64), torch.randn(100, generator=g, dtype=torch.float64)
    lv1, lv2 = torch.randn(100, generator=g, dtype=torch.float64), torch.randn(100, generator=g, dtype=torch.float64)
    ours = normal_kl(m1, lv1, m2, lv2)
    ref = torch.distributions.kl_divergence(
        torch.distributions.Normal(m1, (0.5 * lv1).exp()), torch.distributions.Normal(m2, (0.5 * lv2).exp())
    )
    assert torch.allclose(ours, ref, rtol=1e-10, atol=1e-12)
    assert normal_kl(m1, lv1, m1, lv1).abs().max() < 1e-12


def test_normal_kl_keeps_float32_precision_for_nearly_equal_variances():
    # the prior term: d = log(1 - abar_T) ~ -4e-5; the textbook form cancels to ~1e-3 relative in float32
    d64 = torch.tensor([1e-7, -4.0359e-5, 1e-3, -0.05, 0.0999, 0.1001, 0.7, -3.0], dtype=torch.float64)
    ref = 0.5 * (torch.expm1(d64) - d64)
    zero = torch.zeros(len(d64))
    ours = normal_kl(zero, d64.float(), zero, zero).double()
    assert torch.allclose(ours, ref, rtol=1e-6, atol=0), (ours / ref - 1)
    # the gradient is finite on both sides of the series' range
    lv = d64.float().clone().requires_grad_(True)
    normal_kl(zero, lv, zero, zero).sum().backward()
    assert torch.isfinite(lv.grad).all()
    assert torch.allclose(lv.grad.double(), 0.5 * torch.expm1(d64), rtol=1e-5, atol=1e-12)


def test_discretized_gaussian_log_likelihood_matches_scipy():
    grid = torch.linspace(-1, 1, 256, dtype=torch.float64)
    for mean, log_scale in [(0.0, math.log(0.1)), (0.3, math.log(0.02)), (-0.95, math.log(0.5))]:
        means = torch.full_like(grid, mean)
        ls = torch.full_like(grid, log_scale)
        logp = discretized_gaussian_log_likelihood(grid, means, ls)
        p = logp.exp()
        # a probability mass function over the 256 bins
        assert p.sum().item() == pytest.approx(1.0, abs=1e-6)
        edges = np.concatenate([[-np.inf], (grid[:-1].numpy() + grid[1:].numpy()) / 2, [np.inf]])
        ref = np.diff(stats.norm.cdf(edges, loc=mean, scale=math.exp(log_scale)))
        # the tanh approximation of the normal CDF is good to about 3e-4 absolute
        assert np.abs(p.numpy() - ref).max() < 5e-4
    for bins in (2, 16, 4096):  # the open edge bins are the first and last at any number of levels
        grid = torch.linspace(-1, 1, bins, dtype=torch.float64)
        for mean in (0.0, -0.99):
            logp = discretized_gaussian_log_likelihood(grid, torch.full_like(grid, mean),
                                                       torch.full_like(grid, math.log(0.1)), num_bins=bins)
            assert logp.exp().sum().item() == pytest.approx(1.0, abs=1e-6), (bins, mean)


def _oracle(d, point):
    """The exact eps for a dataset with a single point: eps = (x_t - sqrt(ab) x0) / sqrt(1 - ab)."""

    def model(x_t, t):
        return d.predict_noise_from_start(x_t, t, point.expand_as(x_t))

    return model


def test_bound_of_an_oracle_on_a_one_point_dataset_is_prior_plus_decoder():
    d = GaussianDiffusion("linear", num_timesteps=100, var_type="fixed_small")
    point = torch.tensor([[[[0.5, -0.25], [1.0, -1.0]]]], dtype=torch.float64)  # on the 8-bit grid? near it
    point = torch.round((point + 1) * 127.5) / 127.5 - 1
    x0 = point.expand(4, 1, 2, 2).clone()
    out = d.calc_bpd_loop(_oracle(d, point), x0, generator=torch.Generator().manual_seed(0))
    assert out["vb"].shape == (4, 100) and out["total_bpd"].shape == (4,)
    assert out["vb"][:, 1:].abs().max().item() < 1e-8  # every step KL is zero
    assert torch.allclose(out["total_bpd"], out["prior_bpd"] + out["vb"][:, 0], atol=1e-10)
    assert (out["prior_bpd"] > 0).all() and torch.isfinite(out["vb"][:, 0]).all()
    # the prior term in closed form: KL(N(sqrt(ab) x0, 1 - ab) || N(0, 1)) per dim, in bits
    ab = d.alphas_cumprod[-1]
    kl = 0.5 * (-1 - torch.log(1 - ab) + (1 - ab) + ab * x0[0] ** 2).mean() / math.log(2)
    assert out["prior_bpd"][0].item() == pytest.approx(kl.item(), rel=1e-9)


def test_bound_of_a_random_model_is_finite_and_positive():
    torch.manual_seed(0)
    d = GaussianDiffusion("linear", num_timesteps=50)
    model = ToyMLP(dim=2).double()
    x0 = torch.rand(16, 2, dtype=torch.float64) * 2 - 1
    out = d.calc_bpd_loop(model, x0)
    assert torch.isfinite(out["total_bpd"]).all() and (out["total_bpd"] > 0).all()
    assert (out["vb"][:, 1:] >= -1e-9).all()


def test_training_losses_simple_is_the_eps_mse():
    torch.manual_seed(0)
    d = GaussianDiffusion("linear", num_timesteps=100)
    model = ToyMLP(dim=2)
    x0 = torch.randn(32, 2)
    t = torch.randint(0, 100, (32,))
    noise = torch.randn(32, 2)
    out = d.training_losses(model, x0, t, noise)
    pred = model(d.q_sample(x0, t, noise), t)
    assert torch.allclose(out["loss"], ((pred - noise) ** 2).mean(dim=1), atol=1e-6)
    assert out["loss"].shape == (32,)


@pytest.mark.parametrize("mean_type", ["eps", "x0", "v"])
def test_training_losses_targets(mean_type):
    d = GaussianDiffusion("linear", num_timesteps=100, mean_type=mean_type)
    x0, noise, t = torch.randn(5, 2, dtype=torch.float64), torch.randn(5, 2, dtype=torch.float64), torch.arange(5) * 20
    expect = {"eps": noise, "x0": x0, "v": d.get_v(x0, noise, t)}[mean_type]
    perfect = lambda x_t, tt: expect
    assert d.training_losses(perfect, x0, t, noise)["loss"].abs().max() < 1e-20


def test_vlb_and_hybrid_losses():
    torch.manual_seed(0)
    d = GaussianDiffusion("linear", num_timesteps=100, loss_type="vlb", decoder="gaussian")
    model = ToyMLP(dim=2)
    out = d.training_losses(model, torch.randn(8, 2), torch.arange(8) * 12)
    assert torch.allclose(out["loss"], out["vb"] * 100)
    out["loss"].mean().backward()
    h = GaussianDiffusion("linear", num_timesteps=100, var_type="learned_range", loss_type="hybrid", decoder="gaussian")
    model2 = ToyMLP(dim=2, out_mult=2)
    out = h.training_losses(model2, torch.randn(8, 2), torch.arange(8) * 12)
    assert torch.allclose(out["loss"], out["mse"] + 0.001 * 100 * out["vb"])
    # the bound trains the variance only (the mean is detached in it): no gradient reaches the mean's outputs
    seen = {}
    model2.register_forward_hook(lambda m, a, o: seen.update(out=o) or o.retain_grad())
    out = h.training_losses(model2, torch.randn(8, 2), torch.arange(1, 9) * 12)
    out["vb"].sum().backward()
    grad = seen["out"].grad
    assert torch.count_nonzero(grad[:, :2]) == 0 and torch.count_nonzero(grad[:, 2:]) > 0
    with pytest.raises(ValueError, match="learned_range"):
        GaussianDiffusion(loss_type="hybrid")


def test_learned_range_interpolates_between_the_two_variances():
    d = GaussianDiffusion("linear", num_timesteps=100, var_type="learned_range")
    x_t = torch.zeros(3, 2, dtype=torch.float64)
    t = torch.tensor([5, 5, 5])
    lo, hi = d.posterior_log_variance_clipped[5], torch.log(d.betas[5])
    # the log-variance is interpolated (Nichol & Dhariwal), not the variance: at v = 0 the midpoint of the logs
    for v, expect in ((-1.0, lo), (1.0, hi), (0.0, (lo + hi) / 2)):
        out = d.p_mean_variance(lambda x, tt: torch.cat([torch.zeros_like(x), torch.full_like(x, v)], 1), x_t, t)
        assert torch.allclose(out["log_variance"], expect.expand(3, 2))


def test_fixed_large_uses_hos_first_entry():
    d = GaussianDiffusion()
    assert d.fixed_large_variance[0].item() == pytest.approx(d.posterior_variance[1].item(), rel=1e-12)
    assert torch.equal(d.fixed_large_variance[1:], d.betas[1:])
    assert d.posterior_variance[0].item() == 0.0
    assert d.posterior_log_variance_clipped[0] == d.posterior_log_variance_clipped[1]


def test_bad_diffusion_input():
    with pytest.raises(ValueError, match="mean_type"):
        GaussianDiffusion(mean_type="epsilon")
    with pytest.raises(ValueError, match="var_type"):
        GaussianDiffusion(var_type="large")
    with pytest.raises(ValueError, match="loss_type"):
        GaussianDiffusion(loss_type="mse")
    with pytest.raises(ValueError, match="num_timesteps"):
        GaussianDiffusion("linear", num_timesteps=0)
    with pytest.raises(ValueError, match="betas"):
        GaussianDiffusion([0.5, 1.2])
    with pytest.raises(ValueError, match="decoder"):
        GaussianDiffusion(decoder="logistic")
    d = GaussianDiffusion("cosine", num_timesteps=10)
    x = torch.zeros(2, 3)
    with pytest.raises(ValueError, match="t must lie in 0..9"):
        d.q_sample(x, torch.tensor([0, 10]))
    with pytest.raises(ValueError, match="t must lie"):
        d.q_sample(x, torch.tensor([-1, 0]))
    with pytest.raises(ValueError, match="t must have shape"):
        d.q_sample(x, torch.tensor([0, 1, 2]))
    with pytest.raises(TypeError, match="integer"):
        d.q_sample(x, torch.tensor([0.0, 1.0]))
    with pytest.raises(ValueError, match="noise"):
        d.q_sample(x, torch.tensor([0, 1]), torch.zeros(2, 4))
    with pytest.raises(ValueError, match="x0 and x_t"):
        d.q_posterior_mean_variance(x, torch.zeros(2, 2), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="model must return"):
        d.p_mean_variance(lambda a, b: torch.zeros(2, 2), x, torch.tensor([0, 1]))


def test_timestep_check_is_not_fooled_by_in_place_changes():
    d = GaussianDiffusion("cosine", num_timesteps=10)
    x, t = torch.zeros(2, 3), torch.tensor([0, 1])
    d.q_sample(x, t)  # checked once and remembered
    t[1] = 10
    with pytest.raises(ValueError, match="t must lie"):
        d.q_sample(x, t)
