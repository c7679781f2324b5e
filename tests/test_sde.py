"""ddpm_lib.sde: the VP-SDE, the Dormand-Prince solver, samplers, exact likelihoods, consistency models."""
import math

import numpy as np
import pytest
import torch
from scipy.integrate import solve_ivp

from ddpm_lib import GaussianDiffusion, ToyMLP, energy_distance, toy_mixture
from ddpm_lib.sde import (
    ConsistencyModel,
    VPSDE,
    consistency_distillation_loss,
    consistency_sample,
    consistency_scalings,
    divergence,
    dopri5,
    ode_log_likelihood,
    sample_pf_ode,
    sample_reverse_sde,
    score_from_eps,
    ve_sigma,
)

F64 = torch.float64


@pytest.fixture(autouse=True)
def one_thread():
    """Small tensors: one thread is faster than several (and immune to a loaded machine)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def mixture_score(mix, sde):
    """The exact score of the VP-diffused mixture, as a score function (t may vary in the batch)."""

    def score(x, t):
        out = torch.empty_like(x)
        for tv in t.unique():
            m = t == tv
            out[m] = mix.noised(float(sde.alpha_bar(float(tv)))).score(x[m])
        return out

    return score


def test_vpsde_is_the_limit_of_the_linear_schedule():
    errs = []
    for T in (100, 1000, 10000):
        d = GaussianDiffusion("linear", num_timesteps=T)
        sde = VPSDE.from_diffusion(d)
        assert sde.beta_min == pytest.approx(0.1) and sde.beta_max == pytest.approx(20.0)
        t = VPSDE.time_of_index(torch.arange(T, dtype=F64), T)
        errs.append(float((d.alphas_cumprod - sde.alpha_bar(t)).abs().max()))
    # O(1/T): ten times more steps, ten times smaller error, and about 0.81 / T (code index i is time (i + 1) / T;
    # i / T would give the same rate with about 2.3 / T)
    assert errs[0] / errs[1] == pytest.approx(10, rel=0.05) and errs[1] / errs[2] == pytest.approx(10, rel=0.05)
    assert all(e * T < 0.85 for e, T in zip(errs, (100, 1000, 10000))), errs
    with pytest.raises(ValueError, match="linear"):
        VPSDE.from_diffusion(GaussianDiffusion("cosine", num_timesteps=100))


def test_vpsde_coefficients():
    sde = VPSDE(0.1, 20.0)
    t = torch.tensor([0.0, 0.3, 1.0], dtype=F64)
    ab = sde.alpha_bar(t)
    assert float(ab[0]) == 1.0 and float(ab[-1]) == pytest.approx(math.exp(-10.05))
    assert torch.allclose(sde.marginal_std(t) ** 2, 1 - ab)
    # d/dt int beta = beta (central difference)
    h = 1e-6
    assert (sde.integral_beta(0.4 + h) - sde.integral_beta(0.4 - h)) / (2 * h) == pytest.approx(sde.beta(0.4), rel=1e-8)
    x = torch.randn(3, 2, dtype=F64)
    assert torch.allclose(sde.drift(x, torch.full((3,), 0.5, dtype=F64)), -0.5 * sde.beta(0.5) * x)
    with pytest.raises(ValueError):
        VPSDE(1.0, 0.5)
    with pytest.raises(ValueError, match="shape"):
        sde.drift(x, torch.zeros(2, dtype=F64))


def test_dopri5_matches_closed_form_and_scipy():
    y0 = torch.tensor([1.0, 2.0], dtype=F64)
    sol = dopri5(lambda t, y: -2 * t * y, y0, 0.0, 2.0, rtol=1e-9, atol=1e-12)
    assert torch.allclose(sol.y, y0 * math.exp(-4.0), rtol=1e-7, atol=0)
    ref = solve_ivp(lambda t, y: -2 * t * y, (0.0, 2.0), y0.numpy(), method="RK45", rtol=1e-6, atol=1e-8)
    ours = dopri5(lambda t, y: -2 * t * y, y0, 0.0, 2.0, rtol=1e-6, atol=1e-8)
    assert abs(ours.nfe - ref.nfev) <= 0.2 * ref.nfev  # same method, same step control
    assert np.allclose(ours.y.numpy(), ref.y[:, -1], rtol=1e-5)
    back = dopri5(lambda t, y: math.cos(t) * y, torch.ones(1, dtype=F64), 2.0, 0.0, rtol=1e-9, atol=1e-12)
    assert float(back.y) == pytest.approx(math.exp(-math.sin(2.0)), rel=1e-7)
    assert back.ts[0] == 2.0 and back.ts[-1] == 0.0
    with pytest.raises(ValueError, match="shape"):
        dopri5(lambda t, y: y[:1], y0, 0.0, 1.0)


def test_divergence_exact_and_hutchinson():
    A = torch.tensor([[1.0, 2.0, 0.0], [0.5, -3.0, 1.0], [0.0, 4.0, 0.25]], dtype=F64)
    x = torch.randn(5, 3, dtype=F64, generator=torch.Generator().manual_seed(1))  # (unseeded, it failed now and then)
    fn = lambda z: z @ A.T + z**2  # noqa: E731
    out, div = divergence(fn, x)
    assert torch.allclose(out, fn(x))
    assert torch.allclose(div, torch.trace(A) + 2 * x.sum(1))
    probes = torch.randn(4000, 5, 3, dtype=F64, generator=torch.Generator().manual_seed(0))
    _, est = divergence(fn, x, probes)
    assert torch.allclose(est, div, atol=0.5)  # Monte-Carlo estimate


def test_ode_log_likelihood_is_exact_for_the_mixture():
    mix, sde = toy_mixture("gaussian_mixture"), VPSDE()
    x = mix.sample(64, 0, dtype=F64)
    p1 = mix.noised(sde.alpha_bar(1.0))
    out = ode_log_likelihood(mixture_score(mix, sde), sde, x, 0.0, rtol=1e-6, atol=1e-6, prior_log_prob=p1.log_prob)
    assert torch.allclose(out["log_prob"], mix.log_prob(x), atol=1e-3)
    assert torch.allclose(out["bits_per_dim"], -out["log_prob"] / (2 * math.log(2)))
    assert out["z"].shape == x.shape and out["nfe"] > 0


def test_pf_ode_and_reverse_sde_sample_the_mixture():
    mix, sde = toy_mixture("gaussian_mixture"), VPSDE()
    g = torch.Generator().manual_seed(0)
    n = 600
    ref, other = mix.sample(n, 1, dtype=F64), mix.sample(n, 2, dtype=F64)
    base = energy_distance(ref, other)
    xT = torch.randn(n, 2, generator=g, dtype=F64)
    score = mixture_score(mix, sde)
    x_ode, nfe = sample_pf_ode(score, sde, xT, 1e-3, rtol=1e-4, atol=1e-4)
    x_sde = sample_reverse_sde(score, sde, xT, 300, 1e-3, generator=g)
    assert nfe > 10
    assert energy_distance(x_ode, ref) < 5 * base + 2e-3
    assert energy_distance(x_sde, ref) < 5 * base + 2e-3
    x_eu, nfe_eu = sample_pf_ode(score, sde, xT, 1e-3, method="euler", steps=200)
    assert nfe_eu == 200 and torch.allclose(x_eu, x_ode, atol=0.1)
    # Euler by hand: x <- x + dt v(x, t) at the start of each step, v = -1/2 beta(t) (x + score), dt < 0
    x, ts = xT[:50], torch.linspace(1.0, 1e-3, 21, dtype=F64)
    for a, b in zip(ts[:-1], ts[1:]):
        t = torch.full((50,), float(a), dtype=F64)
        x = x + float(b - a) * (-0.5 * sde.beta(float(a)) * (x + score(x, t)))
    assert torch.allclose(sample_pf_ode(score, sde, xT[:50], 1e-3, method="euler", steps=20)[0], x, atol=1e-10)


def test_ode_log_likelihood_with_hutchinson_probes():
    """With probes, the divergence along the path is Hutchinson's estimate: unbiased, so the mean over many
    probe draws is the exact log-density, and each draw scatters about it."""
    mix, sde = toy_mixture("gaussian_mixture"), VPSDE()
    x = mix.sample(8, 0, dtype=F64)
    p1 = mix.noised(sde.alpha_bar(1.0)).log_prob
    score = mixture_score(mix, sde)
    exact = ode_log_likelihood(score, sde, x, 0.0, rtol=1e-6, atol=1e-6, prior_log_prob=p1)["log_prob"]
    probes = torch.randn(400, 8, 2, dtype=F64, generator=torch.Generator().manual_seed(0))
    est = ode_log_likelihood(score, sde, x, 0.0, rtol=1e-6, atol=1e-6, prior_log_prob=p1, probes=probes)["log_prob"]
    assert torch.allclose(est, exact, atol=0.3)  # measured: at most 0.16 with these 400 probes
    one = ode_log_likelihood(score, sde, x, 0.0, rtol=1e-6, atol=1e-6, prior_log_prob=p1, probes=probes[:1])["log_prob"]
    # one probe scatters far more than 400 (measured: mean 1.0 against 0.07; 1/sqrt(K) predicts 20 times)
    assert (est - exact).abs().mean() < 0.25 * (one - exact).abs().mean()


def test_score_from_eps_uses_real_labels():
    d = GaussianDiffusion("linear", num_timesteps=100)
    sde = VPSDE.from_diffusion(d)
    seen = {}

    def model(x, t):
        seen["t"] = t
        return torch.ones_like(x)

    s = score_from_eps(model, sde, 100, labels="time")
    t = torch.tensor([0.01, 0.5, 1.0], dtype=F64)
    out = s(torch.zeros(3, 2, dtype=F64), t)
    assert torch.allclose(seen["t"], torch.tensor([0.0, 49.0, 99.0], dtype=F64))
    assert torch.allclose(out, -1 / sde.marginal_std(t)[:, None].expand(3, 2))
    with pytest.raises(ValueError, match="'matched' or 'time'"):
        score_from_eps(model, sde, 100, labels="index")
    # sigma(0) = 0: a clear error instead of an infinite score (e.g. ode_log_likelihood's default t_start)
    with pytest.raises(ValueError, match="undefined at t = 0"):
        s(torch.zeros(3, 2, dtype=F64), torch.tensor([0.0, 0.5, 1.0], dtype=F64))
    with pytest.raises(ValueError, match="t = 1/T"):
        ode_log_likelihood(s, sde, torch.zeros(3, 2, dtype=F64))


@pytest.mark.parametrize("T", [200, 1000])
def test_score_from_eps_matches_the_noise_level_of_its_label(T):
    """labels='matched': at the time whose abar(t) is the schedule's abar_i the network gets label i, so the
    ideal eps-network of Gaussian data (known in closed form at each integer label) gives the exact score;
    the 'time' labels (t T - 1) miss the noise level at the smallest t by 22 % (T = 200) and 5 % (T = 1000)."""
    d = GaussianDiffusion("linear", num_timesteps=T)
    sde = VPSDE.from_diffusion(d)
    ab, var0 = d.alphas_cumprod.double(), 0.3  # data N(0, 0.3 I)

    def ideal(x, label):  # E[eps | x_i = x] at the integer label nearest to `label`
        i = torch.round(label).long()
        assert (label - i).abs().max() < 1e-9 or ideal.loose
        a = ab[i][:, None]
        return torch.sqrt(1 - a) * x / (a * var0 + 1 - a)

    ideal.loose = False
    i = torch.arange(T)
    g = -torch.log(ab)  # solve int_0^t beta = -log abar_i for t
    a2, b1 = 0.5 * (sde.beta_max - sde.beta_min), sde.beta_min
    t = (-b1 + torch.sqrt(b1 * b1 + 4 * a2 * g)) / (2 * a2)
    x = torch.randn(T, 2, dtype=F64, generator=torch.Generator().manual_seed(0))
    exact = -x / (sde.alpha_bar(t) * var0 + 1 - sde.alpha_bar(t))[:, None]  # the score of N(0, abar var0 + 1 - abar)
    got = score_from_eps(ideal, sde, T)(x, t)
    assert torch.allclose(got, exact, rtol=1e-9, atol=0)
    ideal.loose = True  # 'time' labels are integers only at the grid times (i + 1) / T
    tg = sde.time_of_index(i.double(), T)
    exact_g = -x / (sde.alpha_bar(tg) * var0 + 1 - sde.alpha_bar(tg))[:, None]
    rel = ((score_from_eps(ideal, sde, T, labels="time")(x, tg) - exact_g) / exact_g).abs()[:, 0]
    assert rel[0] > (0.15 if T == 200 else 0.03)  # measured: 0.18 and 0.046 at i = 0
    assert rel[T // 2] < 1e-2


def test_consistency_boundary_and_scalings():
    d = GaussianDiffusion("linear", num_timesteps=50)
    cm = ConsistencyModel(ToyMLP(hidden=16, depth=1), d)
    x = torch.randn(7, 2)
    out = cm(x, torch.zeros(7, dtype=torch.long))
    assert torch.allclose(out, x / math.sqrt(float(d.alphas_cumprod[0])), atol=1e-6)
    sig = torch.tensor([cm.sigma_min, 1.0, 100.0], dtype=F64)
    c_skip, c_out, c_in = consistency_scalings(sig, cm.sigma_min, 1.0)
    assert float(c_skip[0]) == 1.0 and float(c_out[0]) == 0.0
    ab = d.alphas_cumprod[[0, 10, 49]]
    assert torch.allclose(consistency_scalings(ve_sigma(ab), cm.sigma_min)[2], ab.sqrt())  # c_in xhat = x_t
    with pytest.raises(ValueError):
        cm(x, torch.zeros(7))
    # exact in float64 too: sigma_min is the value of the buffer forward() reads at t = 0
    cm64 = ConsistencyModel(lambda z, t: torch.full_like(z, 1e3), d).to(F64)
    x64 = x.double()
    assert torch.equal(cm64(x64, torch.zeros(7, dtype=torch.long)), x64 / cm64.sqrt_alphas_cumprod[0])


def test_consistency_distillation_of_an_exact_teacher():
    """Distilling the exact eps of a two-Gaussian mixture gives a one-step sampler near the data."""
    torch.manual_seed(0)
    mix = toy_mixture("two_gaussians")
    d = GaussianDiffusion("linear", num_timesteps=100)
    ab = d.alphas_cumprod

    def teacher(x, t):  # one example at a time: the definition
        return torch.stack([mix.optimal_eps(x[i:i + 1].double(), float(ab[int(t[i])]))[0] for i in range(len(t))]).float()

    def fast_teacher(x, t):  # vectorised over distinct timesteps
        out = torch.empty_like(x)
        for tv in t.unique():
            m = t == tv
            out[m] = mix.optimal_eps(x[m].double(), float(ab[int(tv)])).float()
        return out

    xs = torch.randn(5, 2)
    ts = torch.tensor([0, 3, 50, 99, 3])
    assert torch.allclose(teacher(xs, ts), fast_teacher(xs, ts))
    student = ConsistencyModel(ToyMLP(hidden=64, depth=2), d)
    target = ConsistencyModel(ToyMLP(hidden=64, depth=2), d)
    target.load_state_dict(student.state_dict())
    opt = torch.optim.Adam(student.parameters(), lr=2e-3)
    grid = np.round(np.linspace(0, 99, 20)).astype(int)
    g = torch.Generator().manual_seed(0)
    for _ in range(250):
        x0 = mix.sample(128, g)
        loss = consistency_distillation_loss(student, target, fast_teacher, d, x0, grid, generator=g).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        with torch.no_grad():
            for pt, ps in zip(target.parameters(), student.parameters()):
                pt.lerp_(ps, 0.05)
    n = 800
    ref = mix.sample(n, 1)
    xT = torch.randn(n, 2, generator=g)
    one = consistency_sample(student, d, xT, [99])
    two = consistency_sample(student, d, xT, [99, 40], generator=g)
    mean_only = ref.mean(0, keepdim=True).expand(n, 2)
    assert energy_distance(one, ref) < 0.35 * energy_distance(mean_only, ref)  # about 0.17 here
    assert energy_distance(two, ref) < 0.2 * energy_distance(mean_only, ref)  # about 0.06 here
    with pytest.raises(ValueError):
        consistency_sample(student, d, xT, [10, 40])
