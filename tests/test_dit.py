import json

import pytest
import torch

from ddpm_lib import GaussianDiffusion
from ddpm_lib.dit import DiT, patchify, sincos_pos_embed_2d, unpatchify


def _randomised(model, std=0.05, seed=0):
    """Every parameter random (zero-initialised layers would hide errors)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * std)
    return model.eval()


def _inputs(model, batch=3, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, model.in_channels, model.image_size, model.image_size, generator=g)
    t = torch.randint(0, 1000, (batch,), generator=g)
    return x, t


def _count(name, **kw):
    with torch.device("meta"):
        m = DiT.from_preset(name, **kw)
    return sum(p.numel() for p in m.parameters()), m


def test_paper_parameter_counts_and_gflops():
    # The official code counts the fixed position table as a (frozen) parameter: 675,129,632 for DiT-XL/2.
    n, m = _count("DiT-XL/2")
    assert n + m.pos_embed.numel() == 675_129_632
    assert m.pos_embed.numel() == 256 * 1152
    # The paper's "Gflops" are multiply-accumulates: 118.6 for DiT-XL/2, 6.06 for DiT-S/2.
    assert round(m.flops_per_forward() / 2e9, 1) == 118.6
    assert round(_count("DiT-S/2")[1].flops_per_forward() / 2e9, 2) == 6.06
    assert 32e6 < _count("DiT-S/2")[0] < 34e6
    assert {"DiT-S/2", "DiT-XL/8", "fashion-small", "fashion-base", "latent-small", "tiny"} <= set(DiT.presets())


def test_patchify_roundtrip_and_order():
    x = torch.randn(2, 3, 8, 12)
    tok = patchify(x, 4)
    assert tok.shape == (2, 2 * 3, 4 * 4 * 3)
    assert torch.equal(unpatchify(tok, 4, 3, 8, 12), x)
    # token 1 is the patch at row 0, columns 4..7, flattened (row, column, channel)
    assert torch.equal(tok[:, 1], x[:, :, 0:4, 4:8].permute(0, 2, 3, 1).reshape(2, -1))
    with pytest.raises(ValueError, match="patch_size"):
        patchify(x, 5)


def test_sincos_table_depends_on_offsets_only():
    pe = sincos_pos_embed_2d(32, 5)
    assert pe.shape == (25, 32) and pe.dtype == torch.float64
    gram = pe @ pe.T
    idx = lambda i, j: i * 5 + j  # noqa: E731
    # <PE(a), PE(b)> depends only on b - a
    assert torch.allclose(gram[idx(0, 0), idx(2, 1)], gram[idx(2, 3), idx(4, 4)], atol=1e-12)
    assert torch.allclose(torch.diagonal(gram), torch.full((25,), 16.0, dtype=torch.float64))
    # the values (the docstring's layout): row first, then column, each [sin, cos] with w_k = 1e4^(-k/8)
    w = 1e4 ** (-torch.arange(8, dtype=torch.float64) / 8)
    zero = torch.cat([torch.zeros(8, dtype=torch.float64), torch.ones(8, dtype=torch.float64)])
    torch.testing.assert_close(pe[idx(2, 3)], torch.cat([torch.sin(2 * w), torch.cos(2 * w),
                                                         torch.sin(3 * w), torch.cos(3 * w)]), rtol=0, atol=1e-15)
    torch.testing.assert_close(pe[idx(0, 1), :16], zero, rtol=0, atol=0)  # row 0
    with pytest.raises(ValueError, match="divisible by 4"):
        sincos_pos_embed_2d(30, 4)


def test_flops_formula_matches_pytorch_count():
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    m = DiT.from_preset("tiny", in_channels=1, learn_sigma=True)
    with FlopCounterMode(display=False) as fc, torch.no_grad(), sdpa_kernel([SDPBackend.MATH]):
        m(torch.zeros(1, 1, 16, 16), torch.zeros(1, dtype=torch.long))
    assert fc.get_total_flops() == m.flops_per_forward()


def test_untrained_output_is_zero_and_blocks_are_identity():
    m = DiT.from_preset("tiny", num_classes=5, learn_sigma=True)
    x, t = _inputs(m)
    out = m(x, t, y=torch.tensor([0, 1, 4]))
    assert out.shape == (3, 6, 16, 16) and torch.count_nonzero(out) == 0
    h = torch.randn(3, m.num_patches, 32)
    c = torch.randn(3, 32)
    for block in m.blocks:
        assert torch.equal(block(h, c), h)


def test_config_roundtrip_and_state_dict():
    m = _randomised(DiT.from_preset("tiny", pos_embed="learned", num_classes=3))
    cfg = json.loads(json.dumps(m.config))
    m2 = DiT(**cfg)
    m2.load_state_dict(m.state_dict())
    x, t = _inputs(m)
    assert torch.equal(m(x, t), m2.eval()(x, t))
    assert "pos_embed" in dict(m.named_parameters())
    assert "pos_embed" not in dict(DiT.from_preset("tiny").named_parameters())


def test_conditioning_reaches_every_token_and_guidance():
    m = _randomised(DiT.from_preset("tiny", num_classes=4, learn_sigma=True))
    x, t = _inputs(m)
    y = torch.tensor([0, 1, 2])
    a, b = m(x, t, y=y), m(x, t + 1, y=y)
    assert (a - b).abs().amax(dim=(1, 2, 3)).min() > 0
    assert not torch.allclose(m(x, t, y=y), m(x, t, y=(y + 1) % 4))
    w = 2.0
    cond, uncond = m(x, t, y=y), m(x, t)  # y=None is the null class
    guided = m(x, t, y=y, guidance_scale=w)
    assert torch.allclose(guided[:, :3], (1 + w) * cond[:, :3] - w * uncond[:, :3], atol=1e-5)
    assert torch.allclose(guided[:, 3:], cond[:, 3:], atol=1e-6)
    with pytest.raises(ValueError, match="unconditional"):
        _randomised(DiT.from_preset("tiny"))(x, t, y=y)


def test_bad_arguments():
    with pytest.raises(ValueError, match="patch_size"):
        DiT(image_size=10, patch_size=4)
    with pytest.raises(ValueError, match="num_heads"):
        DiT(hidden_size=36, num_heads=5)
    with pytest.raises(ValueError, match="pos_embed"):
        DiT(pos_embed="rope")
    with pytest.raises(ValueError, match="preset"):
        DiT.from_preset("DiT-XXL/2")
    m = DiT.from_preset("tiny")
    with pytest.raises(ValueError, match="shape"):
        m(torch.randn(2, 3, 8, 8), torch.zeros(2, dtype=torch.long))


def test_trains_with_the_hybrid_loss():
    torch.manual_seed(0)
    m = DiT.from_preset("tiny", in_channels=1, learn_sigma=True, depth=1)
    diffusion = GaussianDiffusion("cosine", var_type="learned_range", loss_type="hybrid", num_timesteps=100)
    x0 = torch.rand(16, 1, 16, 16) * 2 - 1
    t, noise = torch.randint(0, 100, (16,)), torch.randn_like(x0)  # a fixed objective: the loss must fall
    opt = torch.optim.Adam(m.parameters(), lr=1e-3)
    first = None
    for _ in range(30):
        loss = diffusion.training_losses(m, x0, t=t, noise=noise)["loss"].mean()
        first = loss.item() if first is None else first
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert torch.isfinite(loss) and loss.item() < first
