import json

import pytest
import torch

from ddpm_lib.autoencoder import Autoencoder, train_autoencoder


def test_shapes_and_presets():
    ae = Autoencoder.from_preset("fashion")
    assert ae.factor == 4
    x = torch.rand(2, 1, 32, 32) * 2 - 1
    z = ae.encode(x)
    assert z.shape == (2, 4, 8, 8)
    assert ae.decode(z).shape == x.shape
    assert sum(p.numel() for p in ae.parameters()) < 1e6
    plain = Autoencoder.from_preset("tiny", latent="plain", num_res_blocks=0)
    assert plain.encode(torch.zeros(1, 3, 16, 16)).shape == (1, 2, 8, 8)
    assert set(Autoencoder.presets()) >= {"fashion", "tiny"}


def test_kl_term_and_loss():
    torch.manual_seed(0)
    ae = Autoencoder.from_preset("tiny", kl_weight=0.5).double()
    x = torch.rand(3, 3, 16, 16, dtype=torch.float64) * 2 - 1
    mean, logvar = ae.posterior(x)
    kl = (0.5 * (mean**2 + logvar.exp() - 1 - logvar)).flatten(1).mean(1)
    out = ae.loss(x, generator=torch.Generator().manual_seed(1))
    assert torch.allclose(out["kl"], kl, rtol=1e-12)
    assert torch.allclose(out["loss"], out["rec"] + 0.5 * out["kl"], rtol=1e-12)
    # the reconstruction of z = mean + exp(logvar / 2) noise, the same noise redrawn
    noise = torch.randn(mean.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    with torch.no_grad():
        rec = ((ae.decoder(mean + torch.exp(0.5 * logvar) * noise) - x) ** 2).flatten(1).mean(1)
    torch.testing.assert_close(out["rec"].detach(), rec, rtol=1e-12, atol=0)
    plain = Autoencoder.from_preset("tiny", latent="plain").double()
    out = plain.loss(x)
    assert torch.count_nonzero(out["kl"]) == 0 and torch.equal(out["loss"], out["rec"])


def test_scale_round_trip_and_config():
    torch.manual_seed(0)
    ae = Autoencoder.from_preset("tiny").double()
    x = torch.rand(40, 3, 16, 16, dtype=torch.float64) * 2 - 1
    rec_before = ae(x)
    s = ae.fit_scale(x)
    z = ae.encode(x)
    assert abs(z.std().item() - 1) < 1e-9 and s == pytest.approx(ae.scale.item())
    assert torch.allclose(ae(x), rec_before, atol=1e-12)  # scaling is undone by decode
    ae2 = Autoencoder(**json.loads(json.dumps(ae.config))).double()
    ae2.load_state_dict(ae.state_dict())  # the scale travels in the state dict
    assert torch.equal(ae2.encode(x), z)


def test_training_reduces_reconstruction_error():
    torch.manual_seed(0)
    ae = Autoencoder.from_preset("tiny", latent="plain", ch=8)
    g = torch.Generator().manual_seed(0)
    # a small family of smooth images: random mixtures of a few fixed patterns
    basis = torch.randn(4, 3, 16, 16, generator=g)
    basis = torch.nn.functional.avg_pool2d(basis, 3, 1, 1)
    x = torch.tanh(torch.einsum("nk,kchw->nchw", torch.randn(256, 4, generator=g), basis))
    before = ((ae(x) - x) ** 2).mean().item()
    history = train_autoencoder(ae, x, steps=60, batch_size=32, lr=3e-3, generator=torch.Generator().manual_seed(1))
    after = ((ae(x) - x) ** 2).mean().item()
    assert len(history) == 60 and after < 0.5 * before
    assert not ae.training
    assert abs(ae.encode(x).std().item() - 1) < 1e-4


def test_bad_arguments():
    with pytest.raises(ValueError, match="latent"):
        Autoencoder(latent="vq")
    with pytest.raises(ValueError, match="divisible"):
        Autoencoder(image_size=30)
    with pytest.raises(ValueError, match="preset"):
        Autoencoder.from_preset("imagenet")
    with pytest.raises(ValueError, match="num_res_blocks must be at least 0"):
        Autoencoder(num_res_blocks=-1)
    ae = Autoencoder.from_preset("tiny")
    with pytest.raises(ValueError, match="x must have shape"):
        ae.encode(torch.zeros(1, 1, 16, 16))
    with pytest.raises(ValueError, match="z must have shape"):
        ae.decode(torch.zeros(1, 3, 8, 8))
    with pytest.raises(ValueError, match="steps"):
        train_autoencoder(ae, torch.zeros(4, 3, 16, 16), steps=0)
