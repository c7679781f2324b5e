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


def test_ddim_with_noise_is_reproducible_with_a_generator(trained):
    d, model = trained
    x_T = torch.randn(16, 2, generator=torch.Generator().manual_seed(5))
    a, b, c = (ddim_sample(model, d, (16, 2), steps=10, eta=1.0, x_T=x_T, progress=False,
                           generator=torch.Generator().manual_seed(seed)) for seed in (3, 3, 4))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_ddpm_intermediates(trained):
    d, model = trained
    x_T = torch.randn(8, 2, generator=torch.Generator().manual_seed(7))
    x, chain = ddpm_sample(model, d, (8, 2), x_T=x_T, progress=False, return_intermediates=True, record_every=50,
                           clip_denoised=False)
    assert chain["t"] == [199, 150, 100, 50, 0]
    assert chain["x_t"].shape == (5, 8, 2) and chain["pred_x0"].shape == (5, 8, 2)
    # x_t[k] is the state at t[k] (before its step), pred_x0[k] the prediction from it
    assert torch.equal(chain["x_t"][0], x_T)
    t = torch.full((8,), 199)
    with torch.no_grad():
        assert torch.allclose(chain["pred_x0"][0], d.predict_start_from_noise(x_T, t, model(x_T, t)), atol=1e-6)
    # the last step (code t = 0) adds no noise and its mean is the x_0 prediction itself
    assert torch.allclose(x, chain["pred_x0"][-1], atol=1e-6)
    with pytest.raises(ValueError, match="record_every"):
        ddpm_sample(model, d, (2, 2), progress=False, return_intermediates=True, record_every=0)


def test_ddim_repeated_quadratic_timestep_leaves_x_unchanged(trained):
    d, model = trained
    seq = ddim_timesteps(200, 50, "quadratic")
    assert len(seq) == 50 and seq[:6].tolist() == [0, 0, 0, 0, 1, 1] and seq[-1] == 160
    x, chain = ddim_sample(model, d, (8, 2), steps=50, skip_type="quadratic", progress=False,
                           return_intermediates=True, generator=torch.Generator().manual_seed(0))
    assert chain["t"][-6:] == [1, 1, 0, 0, 0, 0] and len(chain["t"]) == 50  # 50 network calls, as asked
    for k in (-1, -2, -3, -5):  # the steps from a timestep to itself
        assert torch.allclose(chain["x_t"][k], chain["x_t"][k - 1], atol=1e-6)
    with pytest.raises(ValueError, match="eta"):
        ddim_sample(model, d, (2, 2), steps=5, eta=float("nan"), progress=False)
    # record_every=k keeps every k-th visited step and the last, the same values as the full record
    x2, part = ddim_sample(model, d, (8, 2), steps=50, skip_type="quadratic", progress=False, record_every=7,
                           return_intermediates=True, generator=torch.Generator().manual_seed(0))
    keep = sorted({n for n in range(50) if n % 7 == 0} | {49})
    assert part["t"] == [chain["t"][n] for n in keep] and torch.equal(part["x_t"], chain["x_t"][keep])
    assert torch.equal(x2, x)
    with pytest.raises(ValueError, match="record_every"):
        ddim_sample(model, d, (2, 2), steps=5, progress=False, return_intermediates=True, record_every=0)


def test_samplers_keep_a_float64_model_in_float64():
    torch.manual_seed(0)
    model = ToyMLP(dim=2).double()
    d = GaussianDiffusion("linear", num_timesteps=100)
    a = ddim_sample(model, d, (4, 2), steps=10, progress=False, clip_denoised=False)
    b = ddpm_sample(model, d, (4, 2), progress=False, clip_denoised=False)
    x_T = ddim_invert(model, d, a, steps=10, progress=False)
    assert a.dtype == b.dtype == x_T.dtype == torch.float64


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
    # tau_i = floor((i - 1) T / S) for every S: S distinct steps from 0 to within T / S of T
    assert ddim_timesteps(1000, 300)[-3:].tolist() == [990, 993, 996]
    for T in (1000, 7):
        for steps in range(1, T + 1):
            seq = ddim_timesteps(T, steps)
            assert len(seq) == steps and seq[0] == 0 and (np.diff(seq) > 0).all(), (T, steps)
            assert seq[-1] == (steps - 1) * T // steps >= T - -(-T // steps), (T, steps)
            if T % steps == 0:
                assert seq.tolist() == list(range(0, T, T // steps))
    # quadratic: the DDIM paper's code, repeats included (its CIFAR-10 settings S = 50 and 100)
    assert ddim_timesteps(1000, 10, "quadratic").tolist() == [0, 9, 39, 88, 158, 246, 355, 483, 632, 800]
    for steps in (50, 100):
        seq = ddim_timesteps(1000, steps, "quadratic")
        assert len(seq) == steps and seq[0] == seq[1] == 0 and seq[-1] == 800 and (np.diff(seq) >= 0).all()
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
