import numpy as np
import pytest
import torch
from sklearn.datasets import make_moons

from ddpm_lib import GaussianDiffusion, ToyMLP, ddim_invert, ddim_sample, ddim_timesteps, ddpm_sample, energy_distance


def _moons(n, seed):
    x, _ = make_moons(n, noise=0.05, random_state=seed)
    x = (x - np.array([0.5, 0.25])) / np.array([1.0, 0.5]) * 0.5  # roughly within [-1, 1]
    return torch.tensor(x, dtype=torch.float32)


@pytest.fixture(scope="module")
def trained():
    """A small MLP trained on two moons for a few thousand steps (about 20-40 s on 2 cores)."""
    torch.manual_seed(0)
    d = GaussianDiffusion("linear", num_timesteps=200)
    model = ToyMLP(dim=2, hidden=128, depth=3)
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    steps = 4000
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    data = _moons(20_000, seed=0)
    g = torch.Generator().manual_seed(0)
    for step in range(steps):
        idx = torch.randint(0, len(data), (512,), generator=g)
        loss = d.training_losses(model, data[idx], generator=g)["loss"].mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    model.eval()
    return d, model


def test_ddpm_and_ddim_samples_match_the_data(trained):
    d, model = trained
    n = 1500
    ref, other = _moons(n, seed=1), _moons(n, seed=2)
    baseline = energy_distance(ref, other)
    # a strong reference that knows only the first two moments: a Gaussian fitted to the data
    chol = torch.linalg.cholesky(torch.cov(ref.T))
    gauss = ref.mean(0) + torch.randn(n, 2, generator=torch.Generator().manual_seed(9)) @ chol.T
    e_gauss = energy_distance(gauss, ref)
    untrained = ToyMLP(dim=2, hidden=128, depth=3)
    g = torch.Generator().manual_seed(0)
    bad = ddpm_sample(untrained, d, (n, 2), generator=g, clip_denoised=False, progress=False)
    e_bad = energy_distance(bad, ref)
    x_ddpm = ddpm_sample(model, d, (n, 2), generator=g, clip_denoised=False, progress=False)
    x_ddim = ddim_sample(model, d, (n, 2), steps=50, generator=g, clip_denoised=False, progress=False)
    e_ddpm, e_ddim = energy_distance(x_ddpm, ref), energy_distance(x_ddim, ref)
    print(f"energy distance: data-vs-data {baseline:.5f}, DDPM {e_ddpm:.5f}, DDIM-50 {e_ddim:.5f}, "
          f"Gaussian fit {e_gauss:.5f}, untrained {e_bad:.3g}")
    assert e_bad > 1.0  # an untrained network's chain goes nowhere near the data
    for e in (e_ddpm, e_ddim):
        assert e < 40 * baseline  # near data-versus-data (about 1e-4 here; DDPM lands about 1e-3)
        assert e < e_gauss / 4  # and far better than matching the first two moments


def test_ddim_eta0_is_deterministic_given_x_T(trained):
    d, model = trained
    x_T = torch.randn(64, 2, generator=torch.Generator().manual_seed(5))
    a = ddim_sample(model, d, (64, 2), steps=20, x_T=x_T, generator=torch.Generator().manual_seed(1), progress=False)
    b = ddim_sample(model, d, (64, 2), steps=20, x_T=x_T, generator=torch.Generator().manual_seed(2), progress=False)
    assert torch.equal(a, b)
    c = ddim_sample(model, d, (64, 2), steps=20, eta=1.0, x_T=x_T, generator=torch.Generator().manual_seed(2), progress=False)
    assert not torch.equal(a, c)


def test_samplers_are_reproducible_with_a_generator(trained):
    d, model = trained
    a = ddpm_sample(model, d, (16, 2), generator=torch.Generator().manual_seed(3), progress=False)
    b = ddpm_sample(model, d, (16, 2), generator=torch.Generator().manual_seed(3), progress=False)
    assert torch.equal(a, b)


def test_ddpm_intermediates(trained):
    d, model = trained
    x, chain = ddpm_sample(model, d, (8, 2), progress=False, return_intermediates=True, record_every=50)
    assert chain["t"] == [199, 150, 100, 50, 0]
    assert chain["x_t"].shape == (5, 8, 2) and chain["pred_x0"].shape == (5, 8, 2)


def test_ddim_inversion_round_trip(trained):
    d, model = trained
    x0 = _moons(64, seed=3)
    x_T = ddim_invert(model, d, x0, steps=100, progress=False)
    back = ddim_sample(model, d, (64, 2), steps=100, x_T=x_T, clip_denoised=False, progress=False)
    err = (back - x0).norm() / x0.norm()
    assert err < 0.1, err


def test_ddim_timesteps_are_the_papers():
    assert list(ddim_timesteps(1000, 50)) == list(range(0, 1000, 20))
    assert list(ddim_timesteps(1000, 10))[:3] == [0, 100, 200]
    assert ddim_timesteps(1000, 1000).tolist() == list(range(1000))
    assert ddim_timesteps(1000, 1, "trailing").tolist() == [999]
    assert ddim_timesteps(1000, 4, "trailing").tolist() == [249, 499, 749, 999]
    assert ddim_timesteps(1000, 1000, "trailing").tolist() == list(range(1000))
    for T in (1000, 100, 7):  # every step count is valid (float steps once gave one value too many, -1)
        for steps in range(1, T + 1):
            seq = ddim_timesteps(T, steps, "trailing")
            assert len(seq) == steps and seq[0] >= 0 and seq[-1] == T - 1, (T, steps)
    with pytest.raises(ValueError, match="steps"):
        ddim_timesteps(100, 0)
    with pytest.raises(ValueError, match="skip_type"):
        ddim_timesteps(100, 10, "cubic")


def test_ddim_with_eta1_and_all_steps_is_ddpm_with_fixed_small():
    """One DDIM step with eta = 1 and no skipping equals one DDPM step with sigma^2 = beta-tilde."""
    torch.manual_seed(0)
    d = GaussianDiffusion("linear", num_timesteps=100, var_type="fixed_small")
    model = ToyMLP(dim=2).double()
    from ddpm_lib.samplers import ddim_step

    x = torch.randn(10, 2, dtype=torch.float64)
    noise = torch.randn(10, 2, dtype=torch.float64)
    for step in (99, 50, 1, 0):
        t = torch.full((10,), step)
        out = d.p_sample(model, x, t, clip_denoised=False, noise=noise)
        ddim = ddim_step(d, out, x, step, step - 1, eta=1.0, noise=noise)
        assert torch.allclose(out["sample"], ddim, atol=1e-10), step


def test_ddim_agrees_with_diffusers_step_for_step():
    diffusers = pytest.importorskip("diffusers")
    sched = diffusers.DDIMScheduler(
        num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02, beta_schedule="linear",
        clip_sample=False, set_alpha_to_one=True, steps_offset=0, timestep_spacing="leading",
    )
    sched.set_timesteps(50)
    assert sched.timesteps.tolist() == list(range(980, -1, -20))
    d = GaussianDiffusion()

    def model(x, t):  # any deterministic function of (x, t) will do
        return torch.tanh(x * 0.7 + t[:, None, None, None].float() / 1000.0)

    x_T = torch.randn(2, 1, 4, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    ours = ddim_sample(model, d, x_T.shape, steps=50, x_T=x_T, clip_denoised=False, progress=False).double()
    x = x_T.float()
    for t in sched.timesteps:
        eps = model(x, torch.full((2,), int(t)))
        x = sched.step(eps, t, x, eta=0.0).prev_sample
    assert torch.allclose(ours.float(), x, rtol=1e-4, atol=1e-5)


def test_bad_sampler_input(trained):
    d, model = trained
    with pytest.raises(ValueError, match="x_T"):
        ddpm_sample(model, d, (4, 2), x_T=torch.zeros(3, 2), progress=False)
    with pytest.raises(ValueError, match="eta"):
        ddim_sample(model, d, (4, 2), eta=-1.0, progress=False)
    with pytest.raises(ValueError, match="steps"):
        ddim_sample(model, d, (4, 2), steps=500, progress=False)
