"""Metrics: bits/dim, the FID-unavailable message, and the offline FD (Fashion-MNIST classifier)."""
import builtins
import math
import os

import numpy as np
import pytest
import torch

from ddpm_lib import GaussianDiffusion, UNet, load_dataset
from ddpm_lib import metrics
from ddpm_lib.metrics import FD_NAME, FIDUnavailableError, bits_per_dim, fd_fashion, fid


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def test_bits_per_dim_terms_add_up():
    torch.manual_seed(0)
    model = UNet.from_preset("tiny", in_channels=1, image_size=8).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))
    diffusion = GaussianDiffusion("cosine", num_timesteps=20)
    data = load_dataset("digits", limit=6)
    res = bits_per_dim(model, diffusion, data, n=5, batch_size=2, seed=1)
    assert res.n == 5
    assert res.total == pytest.approx(res.prior + res.kl + res.decoder, rel=1e-5)
    assert all(np.isfinite([res.total_se, res.kl_se, res.decoder_se])) and res.total_se > 0
    direct = diffusion.calc_bpd_loop(model, data.images[:5], generator=torch.Generator().manual_seed(1))
    # the same noise stream only when the whole set is one batch
    res1 = bits_per_dim(model, diffusion, data, n=5, batch_size=5, seed=1)
    assert res1.total == pytest.approx(float(direct["total_bpd"].double().mean()), rel=1e-5)
    # each term is its own part of the bound: L_0 is the step at code t = 0, the KLs the steps 1..T-1
    vb = direct["vb"].double()
    assert vb.shape == (5, 20)
    for name, per_image in (("decoder", vb[:, 0]), ("kl", vb[:, 1:].sum(1)), ("prior", direct["prior_bpd"])):
        per_image = per_image.double()
        assert getattr(res1, name) == pytest.approx(float(per_image.mean()), rel=1e-5), name
        assert getattr(res1, f"{name}_se") == pytest.approx(float(per_image.std() / 5 ** 0.5), rel=1e-4), name
    assert "bits/dim" in str(res) and res1.conditional is False


def test_bits_per_dim_checks_its_data():
    """Data outside [-1, 1] (0..255), non-finite data: an error; data in [0, 1], off the 8-bit grid, or a
    class-conditional model without labels: a warning (each would give a number that is not the bound)."""
    model = UNet.from_preset("tiny", in_channels=1, image_size=8).eval()
    diffusion = GaussianDiffusion("cosine", num_timesteps=4)
    x = load_dataset("digits", limit=2).images
    with pytest.raises(ValueError, match=r"must lie in \[-1, 1\]"):
        bits_per_dim(model, diffusion, (x + 1) * 127.5, n=2)
    with pytest.raises(ValueError, match="NaN"):
        bits_per_dim(model, diffusion, x * float("nan"), n=2)
    with pytest.warns(RuntimeWarning, match=r"images in \[0, 1\]"):
        bits_per_dim(model, diffusion, (x + 1) / 2, n=2)
    with pytest.warns(RuntimeWarning, match="not the 256 levels"):
        bits_per_dim(model, diffusion, x * 0.999, n=2)
    cond = UNet.from_preset("tiny", in_channels=1, image_size=8, num_classes=10).eval()
    with torch.no_grad():  # past the zero-initialised output layer, so that the label matters
        for p in cond.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    with pytest.warns(RuntimeWarning, match="no labels: it runs with its null class"):
        null = bits_per_dim(cond, diffusion, x, n=2)
    data = load_dataset("digits", limit=2)
    given = bits_per_dim(cond, diffusion, data, n=2)
    assert given.conditional is True and null.conditional is False
    assert abs(given.total - null.total) > 1e-4  # the labels reached the model (same noise, other class)


def test_fid_passes_uint8_rgb_images_to_torchmetrics(monkeypatch):
    """Without the Inception weights, a stand-in for torchmetrics' FrechetInceptionDistance records what fid()
    gives it: uint8 in 0..255, three channels (grey repeated), the reference as real, in batches."""
    import sys
    import types

    seen = []

    class FakeFID:
        def __init__(self, feature, normalize):
            assert (feature, normalize) == (2048, False)

        def to(self, device):
            return self

        def update(self, imgs, real):
            seen.append((imgs.clone(), real))

        def compute(self):
            return torch.tensor(1.25)

    mod = types.ModuleType("torchmetrics.image.fid")
    mod.FrechetInceptionDistance = FakeFID
    for name in ("torchmetrics", "torchmetrics.image"):
        monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
    monkeypatch.setitem(sys.modules, "torchmetrics.image.fid", mod)
    monkeypatch.setattr(metrics, "_inception_cached", lambda: True)
    real = torch.linspace(-1, 1, 5 * 4 * 4).reshape(5, 1, 4, 4)
    fake = np.full((3, 4, 4, 1), 7, dtype=np.uint8)  # a samples .npz: uint8 NHWC
    with pytest.warns(RuntimeWarning, match="fewer than the 2048"):
        assert fid(fake, real, device="cpu", batch_size=2) == 1.25
    assert [(t.shape, r) for t, r in seen] == [((2, 3, 4, 4), True)] * 2 + [((1, 3, 4, 4), True)] + \
        [((2, 3, 4, 4), False), ((1, 3, 4, 4), False)]
    got = torch.cat([t for t, r in seen if r])
    assert got.dtype == torch.uint8 and torch.equal(got[:, 0], got[:, 2])
    assert torch.equal(got[:, 0], torch.round((real[:, 0] + 1) * 127.5).to(torch.uint8))
    assert int(got.min()) == 0 and int(got.max()) == 255
    assert all(bool((t == 7).all()) for t, r in seen if not r)
    # images in the wrong range: 0..255 floats are refused, 0..1 floats draw a warning, NaN is refused
    with pytest.raises(ValueError, match=r"must lie in \[-1, 1\]"):
        fid(real * 255, real)
    with pytest.raises(ValueError, match="NaN"):
        fid(real * float("nan"), real)
    with pytest.warns(RuntimeWarning, match=r"images in \[0, 1\]"):
        fid((real + 1) / 2, real)
    with pytest.raises(ValueError, match="uint8 .0..255. or float"):
        fid(torch.zeros(2, 1, 4, 4, dtype=torch.int64), real)


def test_fid_unavailable_without_torchmetrics(monkeypatch):
    real_import = builtins.__import__

    def fake_import(name, *args, **kwargs):
        if name.startswith("torchmetrics"):
            raise ImportError(f"No module named {name!r}")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", fake_import)
    x = torch.zeros(4, 1, 28, 28)
    with pytest.raises(FIDUnavailableError) as e:
        fid(x, x)
    msg = str(e.value)
    assert "pip install torchmetrics torch-fidelity" in msg and "fd_fashion" in msg
    assert "FD (Fashion-MNIST classifier)" in msg


def test_fid_unavailable_offline(monkeypatch):
    pytest.importorskip("torchmetrics")
    monkeypatch.setattr(metrics, "_inception_cached", lambda: False)
    import ddpm_lib.data as data

    def offline(url, timeout=5.0):
        raise OSError("cannot reach github.com:443: no network")

    monkeypatch.setattr(data, "_probe", offline)
    x = torch.zeros(4, 1, 28, 28)
    with pytest.raises(FIDUnavailableError, match="Inception weights.*cannot be downloaded"):
        fid(x, x)


def test_classifier_cache_is_written_atomically_and_reused(tmp_path, monkeypatch):
    net, info = metrics.fashion_classifier(cache=tmp_path, epochs=0.01, seed=1)  # a few steps: fast
    assert (tmp_path / "fd_classifier_fashion.pt").is_file()
    assert not [p for p in os.listdir(tmp_path) if p.endswith(".tmp")]
    assert 0.0 <= info["test_accuracy"] <= 1.0 and not net.training
    metrics._CLASSIFIERS.clear()

    def no_training(*a, **k):
        raise AssertionError("should load from the cache")

    monkeypatch.setattr(metrics, "_train_classifier", no_training)
    net2, info2 = metrics.fashion_classifier(cache=tmp_path, epochs=0.01, seed=1)
    assert info2["test_accuracy"] == info["test_accuracy"]
    for a, b in zip(net.state_dict().values(), net2.state_dict().values()):
        assert torch.equal(a, b)


@pytest.mark.slow  # trains the classifier (~40 s of one core) the first time on a machine; cached afterwards
def test_fd_real_small_noise_large():
    real = load_dataset("fashion_mnist", "train", limit=400, pad_to=32).images  # 32x32: cropped inside
    res = fd_fashion(real, n=400)
    assert res.name == FD_NAME and "FID" not in str(res)
    assert FD_NAME in str(res) and "baseline" in str(res)
    # the baseline's spread over five disjoint sets of 400 test images; baseline itself is the first set's
    assert res.baseline_draws == 5 and 0 < res.baseline_sd < res.baseline and "over 5 disjoint sets" in str(res)
    one = fd_fashion(real, n=400, baseline_draws=1)
    assert one.baseline == res.baseline and one.baseline_draws == 1 and math.isnan(one.baseline_sd)
    assert res.classifier_accuracy > 0.88
    assert res.fd < 3 * res.baseline + 1.0
    g = torch.Generator().manual_seed(0)
    noise = torch.rand(400, 1, 28, 28, generator=g) * 2 - 1
    bad = fd_fashion(noise)
    assert bad.fd > 20 * bad.baseline and bad.fd > 10 * res.fd
    # uint8 (N, H, W, 1) arrays, as in a samples .npz, give the same number as the floats
    u8 = np.round((real.numpy()[:, 0, :, :, None] + 1) * 127.5).astype(np.uint8)
    assert fd_fashion(u8, n=400).fd == pytest.approx(res.fd, rel=1e-6)


def test_fd_bad_inputs():
    with pytest.raises(ValueError, match="28x28"):
        metrics._prepare_fashion(torch.zeros(3, 1, 20, 20))
    with pytest.raises(ValueError, match="n must lie"):
        fd_fashion(torch.zeros(3, 1, 28, 28), n=10)
    from ddpm_lib.data import available_datasets

    if "fashion_mnist" in available_datasets():  # set A of the default reference is the 10,000 test images
        with pytest.raises(ValueError, match="more than the 10,000 images"):
            fd_fashion(-torch.ones(10_001, 1, 28, 28))


def test_each_caller_gets_its_own_classifier():
    """What a caller does to the network it was given (train mode, another dtype) does not reach fd_fashion."""
    a, _ = metrics.fashion_classifier()
    b, _ = metrics.fashion_classifier()
    assert a is not b
    x = torch.rand(4, 1, 28, 28) * 2 - 1
    before = metrics.classifier_features(x)
    a.train().to(torch.float64)
    assert torch.equal(metrics.classifier_features(x), before)
