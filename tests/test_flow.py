"""ddpm_lib.flow: the rectified-flow path, its loss, sampling, straightness, exact mixture velocities."""
import math

import pytest
import torch

from ddpm_lib import ToyMLP, energy_distance, toy_mixture
from ddpm_lib.flow import RectifiedFlow, gaussian_mixture_path, gaussian_mixture_velocity

F64 = torch.float64


@pytest.fixture(autouse=True)
def one_thread():
    """Small tensors: one thread is faster than several (and immune to a loaded machine)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def test_path_and_velocity_by_finite_differences():
    fm = RectifiedFlow()
    x0, noise = torch.randn(6, 3, dtype=F64), torch.randn(6, 3, dtype=F64)
    t = torch.rand(6, dtype=F64) * 0.98 + 0.01
    h = 1e-6
    fd = (fm.interpolate(x0, noise, t + h) - fm.interpolate(x0, noise, t - h)) / (2 * h)
    assert torch.allclose(fd, fm.velocity_target(x0, noise), atol=1e-8)
    assert torch.equal(fm.interpolate(x0, noise, torch.zeros(6, dtype=F64)), x0)
    assert torch.equal(fm.interpolate(x0, noise, torch.ones(6, dtype=F64)), noise)
    with pytest.raises(ValueError):
        fm.interpolate(x0, noise[:, :2], t)
    with pytest.raises(ValueError):
        RectifiedFlow(time_scale=0)


def test_mixture_velocity_satisfies_the_continuity_equation():
    """d/dt log p_t = -div v - v . grad log p_t, with p_t the exact mixture path."""
    mix = toy_mixture("gaussian_mixture")
    x = torch.randn(50, 2, dtype=F64)
    t, h = 0.4, 1e-5
    dlogp = (gaussian_mixture_path(mix, t + h).log_prob(x) - gaussian_mixture_path(mix, t - h).log_prob(x)) / (2 * h)
    xr = x.clone().requires_grad_(True)
    v = gaussian_mixture_velocity(mix, xr, t)
    div = sum(torch.autograd.grad(v[:, j].sum(), xr, retain_graph=True)[0][:, j] for j in range(2))
    rhs = -div - (v * gaussian_mixture_path(mix, t).score(x)).sum(1)
    assert torch.allclose(dlogp, rhs.detach(), atol=1e-6)
    # the closed form equals (e - x) / (1 - t) with e = -t score_t, and at t = 0 the path is the data
    e = -t * gaussian_mixture_path(mix, t).score(x)
    assert torch.allclose(gaussian_mixture_velocity(mix, x, t), (e - x) / (1 - t), atol=1e-12)
    assert torch.allclose(gaussian_mixture_path(mix, 0.0).log_prob(x), mix.log_prob(x))
    assert torch.allclose(gaussian_mixture_velocity(mix, x, 1.0), x - mix.mean, atol=1e-12)


def test_exact_velocity_transports_noise_to_the_mixture():
    mix = toy_mixture("two_gaussians")
    fm = RectifiedFlow()
    model = lambda x, label: gaussian_mixture_velocity(mix, x, float(label[0]) / 1000.0)  # noqa: E731
    g = torch.Generator().manual_seed(0)
    noise = torch.randn(800, 2, generator=g, dtype=F64)
    ref, other = mix.sample(800, 1, dtype=F64), mix.sample(800, 2, dtype=F64)
    x = fm.sample(model, noise, steps=100, method="heun")
    assert energy_distance(x, ref) < 5 * energy_distance(ref, other) + 2e-3
    x1 = fm.sample(model, noise, steps=1)
    # one Euler step from t = 1 lands on E[x_0] (the velocity at t = 1 is x - E[x_0])
    assert torch.allclose(x1.mean(0), mix.mean, atol=0.1) and float(x1.std(0).max()) < 0.2


def test_training_losses_and_straightness():
    torch.manual_seed(0)
    fm = RectifiedFlow()
    model = ToyMLP(hidden=64, depth=2)
    x0 = toy_mixture("two_gaussians").sample(256, 0)
    out = fm.training_losses(model, x0, generator=torch.Generator().manual_seed(1))
    assert out["loss"].shape == (256,) and out["t"].shape == (256,)
    assert float(out["t"].min()) >= 0 and float(out["t"].max()) <= 1
    noise = torch.randn_like(x0)
    t = torch.full((256,), 0.3)
    manual = ((model(fm.interpolate(x0, noise, t), 1000 * t) - (noise - x0)) ** 2).mean(1)
    assert torch.allclose(fm.training_losses(model, x0, t=t, noise=noise)["loss"], manual)
    # straightness is zero for a constant velocity field, positive otherwise
    const = lambda x, lab: torch.ones_like(x)  # noqa: E731
    assert float(fm.straightness(const, noise, steps=10).abs().max()) < 1e-10
    assert float(fm.straightness(model, noise, steps=10).mean()) > 0
    x, path = fm.sample(model, noise, steps=4, return_path=True)
    assert path.shape == (5, 256, 2) and torch.equal(path[-1], x)


def test_flow_matching_learns_two_gaussians():
    """A short flow-matching run gives few-step samples near the data (and works with DDPM's trainer)."""
    torch.manual_seed(0)
    mix = toy_mixture("two_gaussians")
    fm = RectifiedFlow()
    model = ToyMLP(hidden=64, depth=2)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(0)
    for _ in range(600):
        loss = fm.training_losses(model, mix.sample(256, g), generator=g)["loss"].mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    ref = mix.sample(800, 1)
    noise = torch.randn(800, 2, generator=g)
    e10 = energy_distance(fm.sample(model, noise, steps=10), ref)
    e1 = energy_distance(fm.sample(model, noise, steps=1), ref)
    assert e10 < 0.05 and e10 < e1 / 4


def test_the_ddpm_trainer_trains_a_flow():
    trainer_mod = pytest.importorskip("ddpm_lib.trainer")
    fm = RectifiedFlow()
    model = ToyMLP(hidden=32, depth=1)
    data = toy_mixture("two_gaussians").sample(1000, 0)
    tr = trainer_mod.Trainer(model, fm, data, device="cpu", batch_size=64, lr=1e-3, warmup=0, ema_decay=0.9,
                             sample_every=0, save_every=0, progress=False, log_every=10)
    tr.train(steps=20)
    assert tr.step == 20 and math.isfinite(tr.history[-1][1])


def test_straightness_needs_a_step():
    with pytest.raises(ValueError, match="steps must be >= 1"):
        RectifiedFlow().straightness(lambda x, t: x, torch.randn(3, 2), steps=0)
