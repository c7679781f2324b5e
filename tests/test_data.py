"""Tests of ddpm_lib.data: image data sets, the loader and flips, toy sets, the exact Gaussian mixture
and image grids. No network: downloads are mocked or refused."""
import gzip
import math
import pickle
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from ddpm_lib import data as D

HAS_FASHION = "fashion_mnist" in D.available_datasets()
needs_fashion = pytest.mark.skipif(not HAS_FASHION, reason="Fashion-MNIST files not found offline")


# ------------------------------------------------------------------ fixtures and fakes


@pytest.fixture(scope="module")
def fashion():
    t0 = time.perf_counter()
    data = D.load_dataset("fashion_mnist", download=False)
    return data, time.perf_counter() - t0


@pytest.fixture
def no_system_dirs(monkeypatch):
    monkeypatch.setattr(D, "SYSTEM_DATA_DIRS", ())


@pytest.fixture
def no_download(monkeypatch):
    calls = []

    def fail(name, root):
        calls.append((name, root))
        raise OSError("network is unreachable (mocked)")

    monkeypatch.setattr(D, "_download", fail)
    return calls


def _write_idx(path, arr, gz):
    arr = np.asarray(arr, dtype=np.uint8)
    header = bytes([0, 0, 0x08, arr.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in arr.shape)
    payload = header + arr.tobytes()
    if gz:
        path = path.with_name(path.name + ".gz")
        payload = gzip.compress(payload)
    path.write_bytes(payload)


def _fake_idx_root(tmp_path, folder, n=12, gz=True):
    raw = tmp_path / folder / "raw"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for split, m in (("train", n), ("test", n // 2)):
        img_stem, lbl_stem = D._IDX_FILES[split]
        images = rng.integers(0, 256, size=(m, 28, 28))
        images[0] = 0
        images[1] = 255
        _write_idx(raw / img_stem, images, gz)
        _write_idx(raw / lbl_stem, np.arange(m) % 10, gz)
    return tmp_path


# ------------------------------------------------------------------ Fashion-MNIST (offline, real files)


@needs_fashion
def test_fashion_mnist_train(fashion):
    data, seconds = fashion
    assert data.images.shape == (60000, 1, 28, 28)
    assert data.images.dtype == torch.float32 and data.labels.dtype == torch.int64
    assert data.images.min() == -1 and data.images.max() == 1
    assert torch.bincount(data.labels).tolist() == [6000] * 10
    assert len(data.class_names) == 10 and data.class_names[9] == "Ankle boot"
    assert len(data) == 60000 and data[3][0].shape == (1, 28, 28)
    # 8-bit levels k / 127.5 - 1 exactly
    k = (data.images[:100] + 1) * 127.5
    assert torch.allclose(k, k.round(), atol=1e-4)
    assert seconds < 5.0  # about a second or less on 2 cores


@needs_fashion
def test_fashion_mnist_test_split_pad_limit_classes(fashion):
    full = fashion[0]
    test = D.load_dataset("Fashion-MNIST", "test", limit=500, download=False)
    assert test.images.shape == (500, 1, 28, 28) and test.split == "test"
    padded = D.load_dataset("fashion_mnist", pad_to=32, limit=64, download=False)
    assert padded.images.shape == (64, 1, 32, 32)
    assert torch.equal(padded.images[:, :, 2:30, 2:30], full.images[:64])
    border = torch.ones(32, 32, dtype=torch.bool)
    border[2:30, 2:30] = False
    assert (padded.images[:, :, border] == -1).all()
    sneakers = D.load_dataset("fashion_mnist", classes=["Sneaker", 9], limit=100, download=False)
    assert set(sneakers.labels.tolist()) == {7, 9} and len(sneakers) == 100
    keep = (full.labels == 7) | (full.labels == 9)  # the first 100 of those classes, in order
    assert torch.equal(sneakers.images, full.images[keep][:100])
    assert torch.equal(sneakers.labels, full.labels[keep][:100])
    with pytest.raises(ValueError, match="empty list"):
        D.load_dataset("fashion_mnist", classes=[], download=False)
    nines = D.load_dataset("fashion_mnist", classes=np.int64(9), limit=10, download=False)  # a numpy integer too
    assert set(nines.labels.tolist()) == {9}


@needs_fashion
def test_fashion_mnist_pixels_are_the_idx_files(fashion):
    """An independent parse of the IDX files (big-endian header, then rows of 28 bytes): the same pixels, in the
    same orientation, scaled k / 127.5 - 1, and the same labels."""
    test = D.load_dataset("fashion_mnist", "test", download=False)
    folder = next(Path(d) / "fashion-mnist" for d in D.SYSTEM_DATA_DIRS if (Path(d) / "fashion-mnist").is_dir())
    raw = gzip.decompress((folder / "t10k-images-idx3-ubyte.gz").read_bytes())
    n, h, w = (int.from_bytes(raw[i:i + 4], "big") for i in (4, 8, 12))
    pixels = np.frombuffer(raw, np.uint8, offset=16).reshape(n, h, w)
    labels = np.frombuffer(gzip.decompress((folder / "t10k-labels-idx1-ubyte.gz").read_bytes()), np.uint8, offset=8)
    assert (n, h, w) == (10_000, 28, 28) and test.images.shape == (n, 1, h, w)
    img = test.images[:, 0].numpy()
    np.testing.assert_array_equal(np.round((img.astype(np.float64) + 1) * 127.5), pixels)
    np.testing.assert_allclose(img, pixels / 127.5 - 1, rtol=0, atol=1e-6)
    np.testing.assert_array_equal(test.labels.numpy(), labels)
    assert not np.array_equal(pixels[:50], pixels[:50].transpose(0, 2, 1))  # orientation is testable


def test_available_datasets_lists_offline_sets(tmp_path):
    names = D.available_datasets(root=tmp_path)
    assert "digits" in names and "cifar10" not in names and "mnist" not in names
    assert ("fashion_mnist" in names) == HAS_FASHION


# ------------------------------------------------------------------ torchvision layout (fake files)


@pytest.mark.parametrize("gz", [True, False])
def test_torchvision_layout_idx(tmp_path, no_system_dirs, no_download, gz):
    root = _fake_idx_root(tmp_path, "FashionMNIST", gz=gz)
    assert D.available_datasets(root) == ["fashion_mnist", "digits"]
    data = D.load_dataset("fashion_mnist", root=root)
    assert data.images.shape == (12, 1, 28, 28) and data.labels.tolist() == [i % 10 for i in range(12)]
    assert (data.images[0] == -1).all() and (data.images[1] == 1).all()
    assert D.load_dataset("fashion_mnist", "test", root=root, pad_to=32).images.shape == (6, 1, 32, 32)
    assert no_download == []


def test_root_from_environment(tmp_path, monkeypatch, no_system_dirs, no_download):
    root = _fake_idx_root(tmp_path, "MNIST")
    monkeypatch.setenv(D.DATA_DIR_ENV_VAR, str(root))
    assert D.default_root() == root
    data = D.load_dataset("mnist", limit=5)
    assert data.images.shape == (5, 1, 28, 28) and data.class_names[3] == "3"


def test_cifar10_from_torchvision_files(tmp_path, no_download):
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    rng = np.random.default_rng(0)
    batches = {}
    for name in D._CIFAR_FILES["train"] + D._CIFAR_FILES["test"]:
        batch = {"data": rng.integers(0, 256, size=(4, 3072), dtype=np.uint8), "labels": [0, 1, 2, 9]}
        batches[name] = batch
        with open(folder / name, "wb") as f:
            pickle.dump(batch, f)
    train = D.load_dataset("cifar-10", root=tmp_path)
    assert train.images.shape == (20, 3, 32, 32) and train.labels.dtype == torch.int64
    assert -1 <= train.images.min() and train.images.max() <= 1
    # the CIFAR-10 row layout: 1024 red values, then green, then blue, each row by row; labels as stored
    first = batches[D._CIFAR_FILES["train"][0]]
    want = first["data"][1].reshape(3, 32, 32).astype(np.float64) / 127.5 - 1
    np.testing.assert_allclose(train.images[1].numpy(), want, atol=1e-6)
    assert train.labels[:4].tolist() == [0, 1, 2, 9]
    assert train.class_names[0] == "airplane"
    assert len(D.load_dataset("cifar10", "test", root=tmp_path)) == 4
    assert "cifar10" in D.available_datasets(tmp_path)


# ------------------------------------------------------------------ offline errors


def test_cifar10_offline_error(tmp_path, no_download):
    with pytest.raises(D.DatasetUnavailableError) as info:
        D.load_dataset("cifar10", root=tmp_path)
    assert isinstance(info.value, RuntimeError)
    msg = str(info.value)
    assert "CIFAR-10" in msg and "digits" in msg and "moons" in msg and "root" in msg
    assert "internet" in msg and "mocked" in msg
    assert ("fashion_mnist" in msg) == HAS_FASHION
    assert no_download == [("cifar10", tmp_path)]


def test_download_false_never_downloads(tmp_path, no_download):
    with pytest.raises(D.DatasetUnavailableError, match="download=False"):
        D.load_dataset("mnist", root=tmp_path, download=False)
    assert no_download == []


def test_probe_fails_fast_on_closed_port():
    t0 = time.perf_counter()
    with pytest.raises(OSError):
        D._probe("http://127.0.0.1:1/", timeout=2.0)
    assert time.perf_counter() - t0 < 3.0


def test_probe_goes_through_a_configured_proxy(monkeypatch):
    """With HTTPS_PROXY set (the downloads honour it), the proxy is what must answer, not the host itself."""
    import socket

    for var in ("https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY", "no_proxy", "NO_PROXY"):
        monkeypatch.delenv(var, raising=False)
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    try:
        monkeypatch.setenv("HTTPS_PROXY", f"http://127.0.0.1:{server.getsockname()[1]}")
        D._probe("https://weights.example.invalid/file", timeout=2.0)  # the host itself does not resolve
        monkeypatch.setenv("HTTPS_PROXY", "http://127.0.0.1:1")
        with pytest.raises(OSError, match="the proxy 127.0.0.1:1"):
            D._probe("https://weights.example.invalid/file", timeout=2.0)
        monkeypatch.setenv("NO_PROXY", "weights.example.invalid")  # exempt: the host is probed, and fails
        with pytest.raises(OSError) as e:
            D._probe("https://weights.example.invalid/file", timeout=2.0)
        assert "proxy" not in str(e.value)
    finally:
        server.close()


def test_bad_names_and_arguments():
    with pytest.raises(ValueError, match="fashion_mnist"):
        D.load_dataset("imagenet")
    with pytest.raises(ValueError, match="toy_data"):
        D.load_dataset("moons")
    with pytest.raises(ValueError, match="split"):
        D.load_dataset("digits", "valid")
    with pytest.raises(ValueError, match="test split"):
        D.load_dataset("digits", "test")
    with pytest.raises(ValueError, match="pad_to"):
        D.load_dataset("digits", pad_to=4)
    with pytest.raises(TypeError, match="limit"):
        D.load_dataset("digits", limit=2.5)


# ------------------------------------------------------------------ digits


def test_digits():
    data = D.load_dataset("digits")
    assert data.images.shape == (1797, 1, 8, 8) and data.images.dtype == torch.float32
    assert data.images.min() == -1 and data.images.max() == 1
    assert data.images.unique().numel() == 17  # the grey levels 0..16
    assert data.labels.dtype == torch.int64 and torch.bincount(data.labels).sum() == 1797
    big = D.load_dataset("digits", size=16, limit=10)
    assert big.images.shape == (10, 1, 16, 16)
    assert torch.equal(big.images[:, :, ::2, ::2], data.images[:10])  # nearest: exact 2x2 blocks
    smooth = D.load_digits(size=16, resize_mode="bilinear")
    assert smooth.images.shape == (1797, 1, 16, 16) and smooth.images.abs().max() <= 1
    assert D.load_dataset("digits", pad_to=12).images.shape == (1797, 1, 12, 12)


# ------------------------------------------------------------------ loader and flips


def test_random_hflip_flips_and_is_random():
    x = torch.arange(64 * 3 * 4 * 5, dtype=torch.float32).reshape(64, 3, 4, 5)
    y = D.random_hflip(x, generator=0)
    flipped = (y == x.flip(-1)).flatten(1).all(1)
    same = (y == x).flatten(1).all(1)
    assert (flipped | same).all()
    assert 10 < int(flipped.sum()) < 54  # about half
    assert torch.equal(y, D.random_hflip(x, generator=0))
    assert not torch.equal(y, D.random_hflip(x, generator=1))
    assert torch.equal(D.random_hflip(x, p=0.0), x) and torch.equal(D.random_hflip(x, p=1.0), x.flip(-1))


def test_loader_epochs_and_flips():
    x = torch.randn(10, 1, 4, 4)
    labels = torch.arange(10)
    loader = D.make_loader((x, labels), batch_size=4, generator=0, hflip=True)
    assert len(loader) == 3
    seen = []
    n_flipped = 0
    for xb, yb in loader:
        assert xb.shape[1:] == (1, 4, 4) and yb.dtype == torch.int64
        for img, lab in zip(xb, yb):
            flipped = torch.equal(img, x[lab].flip(-1))
            assert flipped or torch.equal(img, x[lab])
            n_flipped += flipped
        seen += yb.tolist()
    assert sorted(seen) == list(range(10)) and seen != list(range(10))
    assert 0 < n_flipped < 10
    order2 = [int(v) for _, yb in loader for v in yb]
    assert order2 != seen  # reshuffled each epoch
    again = D.make_loader((x, labels), batch_size=4, generator=0, hflip=True)
    assert [yb.tolist() for _, yb in again] == [seen[i:i + 4] for i in range(0, 10, 4)]

    plain = D.make_loader(torch.randn(7, 2), batch_size=3, shuffle=False, drop_last=True)
    batches = list(plain)
    assert len(plain) == len(batches) == 2 and batches[0].shape == (3, 2)
    stream = plain.forever()
    assert all(next(stream).shape == (3, 2) for _ in range(5))


def test_loader_from_image_data():
    data = D.load_dataset("digits", limit=50)
    xb, yb = next(iter(D.make_loader(data, batch_size=16, hflip=True, generator=3)))
    assert xb.shape == (16, 1, 8, 8) and yb.shape == (16,)
    with pytest.raises(TypeError, match="data"):
        D.make_loader([1, 2, 3], batch_size=2)


# ------------------------------------------------------------------ toy data


@pytest.mark.parametrize("name", D.TOY_DATASETS)
def test_toy_data(name):
    x = D.toy_data(name, 4000, generator=0)
    assert x.shape == (4000, 2) and x.dtype == torch.float32
    assert torch.isfinite(x).all()
    assert torch.equal(x, D.toy_data(name, 4000, generator=torch.Generator().manual_seed(0)))
    assert not torch.equal(x, D.toy_data(name, 4000, generator=1))
    std = x.std(0)
    assert (std > 0.25).all() and (std < 1.6).all(), std
    assert x.abs().max() < 4.0 and x.mean(0).abs().max() < 0.5


def test_toy_data_bad_name():
    with pytest.raises(ValueError, match="moons"):
        D.toy_data("spirals", 10)


def test_checkerboard_occupies_black_squares():
    x = D.toy_data("checkerboard", 5000, 0)
    assert x.min() >= -2 and x.max() <= 2
    cells = torch.floor(x).long()
    assert ((cells[:, 0] + cells[:, 1]) % 2 == 0).all()


# ------------------------------------------------------------------ Gaussian mixture


def _mixture():
    return D.GaussianMixture2D([[-1.0, 0.5], [1.2, -0.3], [0.0, 1.4]], [0.3, 0.5, 0.2], [0.5, 0.3, 0.2])


def test_mixture_score_matches_autograd():
    gm = _mixture()
    x = torch.randn(200, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0)) * 1.5
    x.requires_grad_(True)
    (grad,) = torch.autograd.grad(gm.log_prob(x).sum(), x)
    assert torch.allclose(gm.score(x.detach()), grad, atol=1e-10, rtol=1e-8)
    for ab in (0.9, 0.3):
        nt = gm.noised(ab)
        (grad,) = torch.autograd.grad(nt.log_prob(x).sum(), x)
        assert torch.allclose(nt.score(x.detach()), grad, atol=1e-10, rtol=1e-8)


def test_mixture_log_prob_integrates_to_one_and_matches_normal():
    gm = _mixture()
    g = torch.linspace(-5, 5, 401, dtype=torch.float64)
    xx, yy = torch.meshgrid(g, g, indexing="ij")
    p = gm.log_prob(torch.stack([xx.flatten(), yy.flatten()], 1)).exp()
    integral = float(p.sum() * (g[1] - g[0]) ** 2)
    assert abs(integral - 1.0) < 1e-6
    single = D.GaussianMixture2D([[0.3, -0.2]], 0.7)
    x = torch.randn(50, 2, dtype=torch.float64)
    ref = torch.distributions.MultivariateNormal(torch.tensor([0.3, -0.2], dtype=torch.float64),
                                                 0.49 * torch.eye(2, dtype=torch.float64)).log_prob(x)
    assert torch.allclose(single.log_prob(x), ref, atol=1e-12)


def test_mixture_sample_moments():
    gm = _mixture()
    x, comp = gm.sample(200_000, generator=0, return_labels=True, dtype=torch.float64)
    freq = torch.bincount(comp, minlength=3).double() / len(comp)
    assert torch.allclose(freq, gm.weights, atol=0.01)
    assert torch.allclose(x.mean(0), gm.mean, atol=0.01)
    assert torch.allclose(torch.cov(x.T), gm.covariance, atol=0.02)


def test_noised_mixture_matches_monte_carlo():
    gm = _mixture()
    gen = torch.Generator().manual_seed(1)
    ab = 0.4
    x0 = gm.sample(200_000, gen, dtype=torch.float64)
    eps = torch.randn(x0.shape, generator=gen, dtype=torch.float64)
    xt = math.sqrt(ab) * x0 + math.sqrt(1 - ab) * eps
    nt = gm.noised(ab)
    assert torch.allclose(xt.mean(0), nt.mean, atol=0.01)
    assert torch.allclose(torch.cov(xt.T), nt.covariance, atol=0.02)
    # density: p_t(x) = E_{x0}[N(x; sqrt(ab) x0, (1 - ab) I)], Monte Carlo over x0
    pts = torch.tensor([[0.0, 0.0], [0.7, -0.4], [-0.8, 0.6]], dtype=torch.float64)
    sq = ((pts[:, None] - math.sqrt(ab) * x0[None]) ** 2).sum(-1)
    mc = (torch.exp(-0.5 * sq / (1 - ab)) / (2 * math.pi * (1 - ab))).mean(1)
    assert torch.allclose(mc, nt.log_prob(pts).exp(), rtol=0.01)
    # the optimal eps-prediction is E[eps | x_t]: its error is orthogonal to functions of x_t
    # (book: eq-eps-score), and Tweedie's formula inverts x_t = sqrt(ab) x0 + sqrt(1 - ab) eps
    eps_star = gm.optimal_eps(xt, ab)
    resid = eps - eps_star
    for g in (torch.ones_like(xt), xt, torch.tanh(xt)):
        assert (resid * g).mean(0).abs().max() < 0.01
    x0_star = gm.posterior_mean(xt, ab)
    assert torch.allclose(math.sqrt(ab) * x0_star + math.sqrt(1 - ab) * eps_star, xt, atol=1e-10)
    mse = ((eps - eps_star) ** 2).mean()
    assert mse < ((eps - 0.9 * eps_star) ** 2).mean() and mse < ((eps - 1.1 * eps_star) ** 2).mean()


def test_toy_mixtures_and_bad_arguments():
    eight = D.toy_mixture("eight_gaussians")
    assert eight.num_components == 8 and torch.allclose(eight.covariance, torch.eye(2, dtype=torch.float64))
    assert torch.allclose(eight.noised(1.0).means, eight.means)
    with pytest.raises(ValueError, match="alpha_bar"):
        eight.noised(0.0)
    with pytest.raises(ValueError, match="stds"):
        D.GaussianMixture2D([[0.0, 0.0]], -1.0)
    with pytest.raises(ValueError, match="means"):
        D.GaussianMixture2D([0.0, 0.0], 1.0)
    with pytest.raises(ValueError, match="shape"):
        eight.log_prob(torch.zeros(3, 3))


# ------------------------------------------------------------------ images out


def test_to_uint8_and_grid(tmp_path):
    x = torch.linspace(-1, 1, 10 * 28 * 28).reshape(10, 1, 28, 28)
    u = D.to_uint8(x)
    assert u.shape == (10, 28, 28, 1) and u.dtype == np.uint8
    assert u.min() == 0 and u.max() == 255
    assert D.to_uint8(torch.full((3, 2, 2), 0.0)).shape == (2, 2, 3)
    assert D.to_uint8(torch.tensor([[[[-1.5, 2.0]]]])).tolist() == [[[[0], [255]]]]
    grid = D.image_grid(x, nrow=4, padding=2)
    assert grid.shape == (3 * 30 + 2, 4 * 30 + 2, 1) and grid.dtype == np.uint8
    assert np.array_equal(grid[2:30, 2:30], u[0])
    rgb = D.image_grid(torch.zeros(5, 3, 8, 8), nrow=8, padding=0, upscale=2)
    assert rgb.shape == (16, 80, 3)

    from PIL import Image

    path = D.save_image_grid(x, tmp_path / "sub" / "grid.png", nrow=5)
    with Image.open(path) as img:
        assert img.size == (5 * 30 + 2, 2 * 30 + 2) and img.mode == "L"
    path = D.save_image_grid(torch.zeros(4, 3, 8, 8), tmp_path / "rgb.png", nrow=2)
    with Image.open(path) as img:
        assert img.mode == "RGB"
    # a PNG whatever the extension (PIL would write a lossy JPEG for .jpg, and fail without one)
    for name in ("grid.jpg", "grid"):
        assert D.save_image_grid(x, tmp_path / name).read_bytes()[:4] == b"\x89PNG"
    # uint8 pixels (as `python -m ddpm_lib sample` writes them to .npz, channels-last) pass through unchanged
    assert np.array_equal(D.to_uint8(u), u) and np.array_equal(D.to_uint8(u.transpose(0, 3, 1, 2)), u)
    assert np.array_equal(D.image_grid(u, nrow=4, padding=2), grid)


def test_a_loader_without_a_batch_says_so():
    """drop_last with fewer images than a batch: forever() would spin without yielding."""
    loader = D.make_loader(torch.zeros(10, 1, 4, 4), batch_size=64, drop_last=True)
    with pytest.raises(ValueError, match="10 images < batch_size 64 with drop_last=True"):
        next(loader.forever())
    assert next(D.make_loader(torch.zeros(10, 1, 4, 4), batch_size=64).forever()).shape == (10, 1, 4, 4)
