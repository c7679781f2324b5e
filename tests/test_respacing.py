import numpy as np
import pytest
import torch

from ddpm_lib import GaussianDiffusion, ToyMLP, ddpm_sample
from ddpm_lib.respacing import RespacedModel, respace, space_timesteps


def test_space_timesteps():
    assert space_timesteps(1000, 10).tolist() == [0, 111, 222, 333, 444, 555, 666, 777, 888, 999]
    assert space_timesteps(1000, 1000).tolist() == list(range(1000))
    assert space_timesteps(1000, 1).tolist() == [999]
    with pytest.raises(ValueError, match="steps"):
        space_timesteps(100, 101)


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_respacing_keeps_the_marginals(schedule):
    d = GaussianDiffusion(schedule, var_type="learned_range", loss_type="hybrid", num_timesteps=1000)
    for K in (1000, 250, 37, 2):
        seq = space_timesteps(1000, K)
        dk = respace(d, seq)
        assert dk.num_timesteps == K and dk.var_type == d.var_type and dk.loss_type == d.loss_type
        assert np.abs(dk.alphas_cumprod.numpy() - d.alphas_cumprod.numpy()[seq]).max() < 1e-14
        assert torch.equal(dk.timestep_map, torch.as_tensor(seq))
    assert torch.allclose(respace(d, 1000).betas, d.betas, rtol=1e-12, atol=0)
    irregular = [3, 10, 500, 999]
    dk = respace(d, irregular)
    ab = d.alphas_cumprod.numpy()
    assert dk.betas[1].item() == pytest.approx(1 - ab[10] / ab[3], rel=1e-12)
    # every other setting carries over, not only the defaults'
    other = GaussianDiffusion(schedule, mean_type="v", var_type="learned_range", loss_type="hybrid", vlb_weight=0.01,
                              decoder="gaussian", num_timesteps=1000)
    dk = respace(other, 50)
    assert (dk.mean_type, dk.var_type, dk.loss_type, dk.vlb_weight, dk.decoder) == \
        (other.mean_type, other.var_type, other.loss_type, other.vlb_weight, other.decoder)
    assert respace(GaussianDiffusion(schedule, var_type="fixed_small", num_timesteps=1000), 50).var_type == \
        GaussianDiffusion(var_type="fixed_small").var_type


def test_respaced_model_calls_original_timesteps():
    seen = []

    def model(x, t):
        seen.append(t.clone())
        return torch.zeros_like(x)

    d = GaussianDiffusion("linear", num_timesteps=100)
    dk, mk = RespacedModel.wrap(model, d, 5)
    out = ddpm_sample(mk, dk, (3, 2), progress=False, generator=torch.Generator().manual_seed(0))
    assert out.shape == (3, 2)
    assert [int(t[0]) for t in seen] == [99, 74, 50, 25, 0]


def test_respaced_learned_variance_sampling_and_bound():
    torch.manual_seed(0)
    model = ToyMLP(dim=2, hidden=16, depth=1, out_mult=2).eval()
    d = GaussianDiffusion("cosine", var_type="learned_range", num_timesteps=200, decoder="gaussian")
    dk, mk = RespacedModel.wrap(model, d, 20)
    x = ddpm_sample(mk, dk, (8, 2), progress=False, generator=torch.Generator().manual_seed(0))
    assert torch.isfinite(x).all()
    bound = dk.calc_bpd_loop(mk, torch.randn(4, 2))
    assert bound["vb"].shape == (4, 20) and torch.isfinite(bound["total_bpd"]).all()


def test_bad_timesteps():
    d = GaussianDiffusion("linear", num_timesteps=50)
    with pytest.raises(ValueError, match="increasing"):
        respace(d, [5, 3])
    with pytest.raises(ValueError, match="lie in"):
        respace(d, [0, 50])
    with pytest.raises(ValueError, match="ints"):
        respace(d, [0.5, 2.0])


def test_respaced_conditional_model_keeps_its_labels_in_the_bound():
    """bits_per_dim reads num_classes through the wrapper, so the K-step bound is given the labels."""
    from ddpm_lib.metrics import bits_per_dim

    torch.manual_seed(0)
    m = ToyMLP(2, 16, 1, num_classes=3)
    d = GaussianDiffusion("linear", num_timesteps=100, decoder="gaussian")
    dk, mk = RespacedModel.wrap(m, d, 10)
    assert mk.num_classes == 3 and RespacedModel(ToyMLP(2, 16, 1), dk.timestep_map).num_classes is None
    x, y = torch.randn(8, 2) * 0.5, torch.arange(8) % 3
    seen = []
    m.register_forward_hook(lambda mod, args, kwargs, out: seen.append(kwargs.get("y")), with_kwargs=True)
    res = bits_per_dim(mk, dk, (x, y), clip_denoised=False)
    assert res.conditional and all(v is not None and int(v.max()) < 3 for v in seen)
    # a tensor of timesteps is accepted (one on a GPU is moved to the CPU first)
    assert torch.equal(respace(d, torch.tensor([0, 50, 99])).timestep_map, torch.tensor([0, 50, 99]))
