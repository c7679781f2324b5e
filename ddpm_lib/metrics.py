"""Measuring a trained model: the variational bound in bits/dim, FID, and an offline Fréchet distance.

* :func:`bits_per_dim`: the paper's negative log-likelihood bound (Table 1, CIFAR-10 test: at most 3.75
  bits/dim for L_simple, 3.70 for the true bound L) over a data set, with each of its terms and their standard errors
  (book ``eq-vlb``).
* :func:`fid`: the Fréchet Inception Distance (the paper's sample-quality metric, 3.17 on CIFAR-10)
  through ``torchmetrics`` (``pip install 'ddpm_lib[fid]'``). It needs the Inception weights, which
  are downloaded on first use; where they cannot be had it raises :class:`FIDUnavailableError`
  saying why, and never substitutes anything else.
* :func:`fd_fashion`: offline, a Fréchet distance between the features (penultimate layer, 128-d) of
  a small Fashion-MNIST classifier that ddpm_lib trains once (seeded, on the CPU) and caches. It is
  **not** FID and is always reported as "FD (Fashion-MNIST classifier)", together with the same
  distance between two disjoint sets of real test images of the same size (the real-versus-real
  baseline: what a perfect model would score at this sample size).
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import time
import warnings
from pathlib import Path
from typing import Any, Dict, Optional, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .distances import frechet_distance, gaussian_stats

__all__ = [
    "BPDResult",
    "bits_per_dim",
    "FIDUnavailableError",
    "fid",
    "FD_NAME",
    "FDResult",
    "FashionClassifier",
    "fashion_classifier",
    "classifier_features",
    "fd_fashion",
    "cache_dir",
]

CACHE_ENV_VAR = "DDPM_CACHE_DIR"
FD_NAME = "FD (Fashion-MNIST classifier)"


def cache_dir() -> Path:
    """Where ddpm_lib caches files it makes itself: ``$DDPM_CACHE_DIR``, else ``~/.cache/ddpm_lib``."""
    env = os.environ.get(CACHE_ENV_VAR, "").strip()
    return Path(env).expanduser() if env else Path("~/.cache/ddpm_lib").expanduser()


def _images_labels(data) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    from .data import ImageData

    if isinstance(data, ImageData):
        return data.images, data.labels
    if torch.is_tensor(data):
        return data, None
    if isinstance(data, (tuple, list)) and len(data) == 2 and all(torch.is_tensor(t) for t in data):
        return data[0], data[1]
    raise TypeError(f"data must be ImageData, an image tensor (N, C, H, W) or a pair (images, labels), "
                    f"got {type(data).__name__}")


# ---------------------------------------------------------------------------------------------- bits/dim
@dataclasses.dataclass
class BPDResult:
    """The variational bound in bits/dim, averaged over ``n`` images, with standard errors.

    ``total = prior + kl + decoder``: ``prior`` is L_T (the KL of q(x_T | x_0) from N(0, I)),
    ``kl`` the sum over steps of KL(q(x_{t-1} | x_t, x_0) || p(x_{t-1} | x_t)) (the paper's
    L_1..L_{T-1}) and ``decoder`` the discretized decoder's -log p(x_0 | x_1) (L_0). Each ``*_se`` is
    the standard error of the mean over images (one noise draw per image and step). ``conditional``: a
    class-conditional model was given the labels (a bound on ``-log p(x | y)``).
    """

    total: float
    total_se: float
    prior: float
    prior_se: float
    kl: float
    kl_se: float
    decoder: float
    decoder_se: float
    n: int
    conditional: bool = False

    def as_dict(self) -> Dict[str, Union[float, int, bool]]:
        return dataclasses.asdict(self)

    def __str__(self) -> str:
        return (f"bound: {self.total:.4f} ± {self.total_se:.4f} bits/dim over {self.n} images "
                f"(prior L_T {self.prior:.5f} ± {self.prior_se:.5f}, "
                f"sum of step KLs {self.kl:.4f} ± {self.kl_se:.4f}, "
                f"decoder L_0 {self.decoder:.4f} ± {self.decoder_se:.4f})")


def _mean_se(x: torch.Tensor) -> Tuple[float, float]:
    x = x.double()
    n = x.numel()
    se = float(x.std(unbiased=True) / math.sqrt(n)) if n > 1 else float("nan")
    return float(x.mean()), se


@torch.no_grad()
def bits_per_dim(model, diffusion, data, n: Optional[int] = 256, batch_size: int = 64, *, device=None,
                 seed: int = 0, clip_denoised: bool = True, progress: bool = False) -> BPDResult:
    """The negative log-likelihood bound in bits/dim of the first ``n`` images of ``data`` (book ``eq-vlb``).

    Wraps :meth:`GaussianDiffusion.calc_bpd_loop` (T network calls per batch). A class-conditional
    model (``num_classes``) gets the labels when ``data`` has them (a bound on ``-log p(x | y)``); without
    labels it warns and runs with its null class (``BPDResult.conditional`` records which). Data outside
    [-1, 1] or non-finite are refused; data in [0, 1] or off the 8-bit grid draw a warning.

    Args:
        data: :class:`~ddpm_lib.data.ImageData`, an image tensor ``(N, C, H, W)`` in [-1, 1] (8-bit
            levels for the discretized decoder) or a pair ``(images, labels)``.
        n: how many images (the first ``n``; None: all).
        batch_size: images per batch; device: default the model's; seed: for the noise.
    """
    images, labels = _images_labels(data)
    if n is not None:
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"n must be a positive int or None, got {n!r}")
        images = images[:n]
        labels = None if labels is None else labels[:n]
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    if device is None:
        try:
            device = next(model.parameters()).device
        except (AttributeError, StopIteration):
            device = torch.device("cpu")
    device = torch.device(device)
    _check_data_range(images, "bits_per_dim's data", on_grid=getattr(diffusion, "decoder", None) == "discretized",
                      stacklevel=4)  # the caller of bits_per_dim, past torch.no_grad's wrapper
    conditional = bool(getattr(model, "num_classes", None)) and labels is not None
    if getattr(model, "num_classes", None) and labels is None:
        warnings.warn("the model is class-conditional but the data have no labels: it runs with its null class "
                      "(the classifier-free guidance label), a bound on -log p(x) only if it was trained with label "
                      "dropout; pass (images, labels) or ImageData for the bound given the labels",
                      RuntimeWarning, stacklevel=2)
    was_training = getattr(model, "training", False)
    if hasattr(model, "eval"):
        model.eval()
    gen = torch.Generator().manual_seed(seed)
    parts: Dict[str, list] = {"total": [], "prior": [], "kl": [], "decoder": []}
    try:
        for i in range(0, images.shape[0], batch_size):
            x0 = images[i:i + batch_size].to(device)
            kw = {"y": labels[i:i + batch_size].to(device)} if conditional else None
            out = diffusion.calc_bpd_loop(model, x0, clip_denoised=clip_denoised, model_kwargs=kw,
                                          generator=gen, progress=progress)
            parts["total"].append(out["total_bpd"].cpu())
            parts["prior"].append(out["prior_bpd"].cpu())
            parts["kl"].append(out["vb"][:, 1:].sum(dim=1).cpu())
            parts["decoder"].append(out["vb"][:, 0].cpu())
    finally:
        if was_training and hasattr(model, "train"):
            model.train()
    values: Dict[str, Any] = {}
    for key, chunks in parts.items():
        m, se = _mean_se(torch.cat(chunks))
        values[key], values[f"{key}_se"] = m, se
    return BPDResult(n=int(images.shape[0]), conditional=conditional, **values)


def _check_data_range(x: torch.Tensor, what: str, on_grid: bool = False, stacklevel: int = 3) -> None:
    """Images meant to lie in [-1, 1]: raise on non-finite values or on values far outside (0..255 data), warn
    when none is negative (0..1 data, whose pixels would all read as mid-grey or brighter) and, with ``on_grid``,
    when they are not 256 levels (the discretized decoder's bins)."""
    if not x.dtype.is_floating_point:
        raise ValueError(f"{what} must be float images in [-1, 1], got {x.dtype}")
    x = x.detach()
    if not bool(torch.isfinite(x).all()):
        raise ValueError(f"{what} contain NaN or infinite values")
    lo, hi = float(x.min()), float(x.max())
    if lo < -2 or hi > 2:  # unclipped samples may overshoot [-1, 1] a little (and are clamped); 0..255 data not
        raise ValueError(f"{what} must lie in [-1, 1] (uint8 levels as x / 127.5 - 1), got values in "
                         f"[{lo:g}, {hi:g}]")
    if lo >= 0:
        warnings.warn(f"{what} have no negative value (range [{lo:g}, {hi:g}]): images in [0, 1]? ddpm_lib "
                      f"expects [-1, 1] (x * 2 - 1)", RuntimeWarning, stacklevel=stacklevel)
    if on_grid:
        levels = (x.float() + 1) * 127.5  # float32 resolves the levels to about 2e-5
        if lo < -1 - 1e-6 or hi > 1 + 1e-6 or float((levels - levels.round()).abs().max()) > 1e-3:
            warnings.warn(f"{what} are not the 256 levels of 8-bit images scaled to [-1, 1], which the "
                          f"discretized decoder assumes (its bins are 2/255 wide)", RuntimeWarning,
                      stacklevel=stacklevel)


# ---------------------------------------------------------------------------------------------- FID
class FIDUnavailableError(RuntimeError):
    """FID cannot be computed here (torchmetrics missing, or the Inception weights cannot be loaded)."""


_OFFLINE_ALTERNATIVE = (
    "Offline alternative for Fashion-MNIST: ddpm_lib.metrics.fd_fashion(samples), a Fréchet distance in "
    "the feature space of a small Fashion-MNIST classifier (reported as 'FD (Fashion-MNIST classifier)', "
    "not comparable to FID), or `python -m ddpm_lib sample ... --fd`."
)
_INCEPTION_FILE = "weights-inception-2015-12-05-6726825d.pth"
_INCEPTION_HOST = "https://github.com"


def _to_uint8_nchw(x) -> torch.Tensor:
    """Images in [-1, 1] (float, NCHW) or uint8 (NHWC / NCHW / NHW) -> uint8 ``(N, C, H, W)``."""
    if isinstance(x, np.ndarray):
        x = torch.from_numpy(np.ascontiguousarray(x))
    if not torch.is_tensor(x):
        raise TypeError(f"images must be a tensor or a numpy array, got {type(x).__name__}")
    if x.dtype == torch.uint8:
        if x.ndim == 3:
            x = x[:, None]
        elif x.ndim == 4 and x.shape[-1] in (1, 3) and x.shape[1] not in (1, 3):
            x = x.permute(0, 3, 1, 2)
        if x.ndim != 4:
            raise ValueError(f"uint8 images must have shape (N, H, W), (N, H, W, C) or (N, C, H, W), "
                             f"got {tuple(x.shape)}")
        return x.contiguous()
    if not x.dtype.is_floating_point:
        raise ValueError(f"images must be uint8 (0..255) or float in [-1, 1], got {x.dtype}")
    if x.ndim != 4:
        raise ValueError(f"float images must have shape (N, C, H, W) with values in [-1, 1], got "
                         f"{tuple(x.shape)} {x.dtype}")
    _check_data_range(x, "the images")
    return torch.round((x.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).to(torch.uint8)


def _inception_cached() -> bool:
    try:
        hub = Path(torch.hub.get_dir()) / "checkpoints" / _INCEPTION_FILE
    except Exception:  # noqa: BLE001
        return False
    return hub.is_file()


def fid(samples, reference, *, device=None, batch_size: int = 100) -> float:
    """The Fréchet Inception Distance between ``samples`` and ``reference`` (Heusel et al. 2017).

    Uses ``torchmetrics.image.fid.FrechetInceptionDistance`` (2048-d pool features of the standard
    Inception network of torch-fidelity, images resized to 299x299 inside; grey images are repeated
    to 3 channels). Both sets: float ``(N, C, H, W)`` in [-1, 1] or uint8 arrays (e.g. the ``.npz``
    written by ``python -m ddpm_lib sample``). Use at least a few thousand images of each set; the
    paper's numbers use 50,000 samples against the training set. Below 2,048 images in a set (the
    features' dimension) its covariance is singular and FID is biased upwards: a ``RuntimeWarning`` says so.

    Raises:
        FIDUnavailableError: torchmetrics/torch-fidelity are not installed, or the Inception weights
            are not cached and cannot be downloaded (offline). The message names the cause and the
            offline alternative, :func:`fd_fashion`.
        ValueError: float images with non-finite values or far outside [-1, 1] (0..255 floats: pass
            uint8); float images with no negative value (0..1?) draw a ``RuntimeWarning``.
    """
    try:
        from torchmetrics.image.fid import FrechetInceptionDistance
    except ImportError as exc:
        raise FIDUnavailableError(
            f"FID needs torchmetrics with torch-fidelity (pip install torchmetrics torch-fidelity, ddpm_lib's "
            f"'fid' extra): {exc}. "
            + _OFFLINE_ALTERNATIVE) from exc
    if not _inception_cached():
        from .data import _probe

        try:
            _probe(_INCEPTION_HOST)
        except OSError as exc:
            raise FIDUnavailableError(
                f"FID needs the Inception weights ({_INCEPTION_FILE}), which are not in the torch hub cache "
                f"({torch.hub.get_dir()}) and cannot be downloaded: {exc}. Run once with internet access (or "
                f"copy the file there). " + _OFFLINE_ALTERNATIVE) from exc
    try:
        metric = FrechetInceptionDistance(feature=2048, normalize=False)
    except Exception as exc:  # noqa: BLE001 - any failure to build the network means "unavailable"
        raise FIDUnavailableError(
            f"FID is unavailable: the Inception network could not be loaded ({type(exc).__name__}: {exc}). "
            + _OFFLINE_ALTERNATIVE) from exc
    device = torch.device(device) if device is not None else (
        torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu"))
    metric = metric.to(device)
    for images, real in ((reference, True), (samples, False)):
        u8 = _to_uint8_nchw(images)
        if u8.shape[0] < 2048:
            warnings.warn(f"FID from {u8.shape[0]} {'reference' if real else 'sample'} images: fewer than the 2048 "
                          f"feature dimensions, so the covariance is singular and FID is biased upwards; not "
                          f"comparable to figures from 50,000 images", RuntimeWarning, stacklevel=2)
        if u8.shape[1] == 1:
            u8 = u8.repeat(1, 3, 1, 1)
        for i in range(0, u8.shape[0], batch_size):
            metric.update(u8[i:i + batch_size].to(device), real=real)
    return float(metric.compute())


# ---------------------------------------------------------------------------------------------- the FD classifier
_CLF_FILE = "fd_classifier_fashion.pt"
_CLF_FORMAT = "ddpm_lib.fd_classifier"
_CLF_VERSION = 1


class FashionClassifier(nn.Module):
    """A small CNN for 28x28 Fashion-MNIST: two conv-BN-ReLU-pool stages (16 and 32 channels), a
    128-d ReLU layer (the features of :func:`fd_fashion`) and a 10-way linear head.

    Shapes: ``x (B, 1, 28, 28)`` in [-1, 1] -> logits ``(B, 10)``; :meth:`features` -> ``(B, 128)``.
    """

    feature_dim = 128

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(16, 32, 3, padding=1, bias=False), nn.BatchNorm2d(32), nn.ReLU(), nn.MaxPool2d(2),
            nn.Flatten(), nn.Linear(32 * 7 * 7, self.feature_dim), nn.ReLU(),
        )
        self.head = nn.Linear(self.feature_dim, 10)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


def _train_classifier(epochs: float, seed: int, batch_size: int = 128, lr: float = 3e-3,
                      progress: bool = False) -> Tuple[Dict[str, torch.Tensor], Dict[str, Any]]:
    """Train :class:`FashionClassifier` on the Fashion-MNIST training split, on the CPU, seeded.

    Adam (lr 3e-3 decaying linearly to 0), batch 128, ``epochs`` passes over shuffled data; about
    90% test accuracy after 2 epochs, ~40 s of one CPU core. The global RNG is left untouched.
    """
    from tqdm.auto import tqdm

    from .data import load_dataset

    train = load_dataset("fashion_mnist", "train")
    test = load_dataset("fashion_mnist", "test")
    t0 = time.perf_counter()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = FashionClassifier()
        opt = torch.optim.Adam(net.parameters(), lr)
        g = torch.Generator().manual_seed(seed)
        N = train.images.shape[0]
        per_epoch = N // batch_size
        steps = max(1, int(round(epochs * per_epoch)))
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: 1.0 - i / steps)
        perm = torch.randperm(N, generator=g)
        net.train()
        for i in tqdm(range(steps), disable=not progress, desc="FD classifier"):
            j = i % per_epoch
            if j == 0 and i:
                perm = torch.randperm(N, generator=g)
            idx = perm[j * batch_size:(j + 1) * batch_size]
            loss = F.cross_entropy(net(train.images[idx]), train.labels[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    net.eval()
    with torch.no_grad():
        correct = sum(int((net(test.images[i:i + 1000]).argmax(1) == test.labels[i:i + 1000]).sum())
                      for i in range(0, test.images.shape[0], 1000))
    info = {"test_accuracy": correct / test.images.shape[0], "epochs": float(epochs), "steps": steps,
            "seed": seed, "train_seconds": time.perf_counter() - t0, "torch": str(torch.__version__)}
    return net.state_dict(), info


@contextlib.contextmanager
def _file_lock(path: Path):
    """An exclusive lock on ``path`` (POSIX ``flock``; a no-op where unavailable)."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows
        yield
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def _read_classifier(path: Path, epochs: float, seed: int):
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # noqa: BLE001 - a damaged cache is simply rebuilt
        return None
    if (not isinstance(state, dict) or state.get("format") != _CLF_FORMAT or state.get("version") != _CLF_VERSION
            or state.get("info", {}).get("epochs") != float(epochs) or state.get("info", {}).get("seed") != seed):
        return None
    return state


_CLASSIFIERS: Dict[Tuple, Tuple[Dict[str, torch.Tensor], Dict[str, Any]]] = {}  # weights, info


def fashion_classifier(device=None, *, cache: Optional[Union[str, os.PathLike]] = None, epochs: float = 2.0,
                       seed: int = 0, retrain: bool = False,
                       progress: bool = False) -> Tuple[FashionClassifier, Dict[str, Any]]:
    """The Fashion-MNIST classifier of :func:`fd_fashion`: ``(model in eval mode on device, info)``.

    Loaded from ``cache`` (a folder; default :func:`cache_dir`, i.e. ``$DDPM_CACHE_DIR`` or
    ``~/.cache/ddpm_lib``, file ``fd_classifier_fashion.pt``), else (default settings only) from the
    copy shipped in ``ddpm_lib/pretrained/`` (trained by this function with ``epochs=2, seed=0``),
    else trained once on the CPU (seeded,
    ``epochs`` passes, ~40 s on one core; needs the Fashion-MNIST training and test splits through
    :func:`~ddpm_lib.load_dataset`, downloading them where possible) and written there atomically
    under a file lock (parallel processes train it once). ``info["test_accuracy"]`` is its accuracy
    on the 10,000 test images (about 0.90). Each call returns a network of its own: what a caller does
    to it (``.train()``, ``.to(...)``, fine-tuning) does not reach :func:`fd_fashion`.
    """
    folder = Path(cache).expanduser() if cache is not None else cache_dir()
    path = folder / _CLF_FILE
    key = (str(path), float(epochs), seed)
    if not retrain and key in _CLASSIFIERS:
        return _classifier_from(*_CLASSIFIERS[key], device)
    state = None if retrain else _read_classifier(path, epochs, seed)
    if state is None and not retrain and cache is None:
        # the package ships the default classifier (epochs=2, seed=0), so FDs agree across machines
        shipped = Path(__file__).resolve().parent / "pretrained" / _CLF_FILE
        if shipped.is_file():
            state = _read_classifier(shipped, epochs, seed)
            if state is not None:
                path = shipped
    if state is None:
        from .trainer import save_checkpoint

        with _file_lock(folder / (_CLF_FILE + ".lock")):
            state = None if retrain else _read_classifier(path, epochs, seed)  # another process may have won
            if state is None:
                sd, info = _train_classifier(epochs, seed, progress=progress)
                state = {"format": _CLF_FORMAT, "version": _CLF_VERSION, "state_dict": sd, "info": info}
                save_checkpoint(state, path)  # temporary file + os.replace
    info = dict(state["info"])
    info["path"] = str(path)
    _CLASSIFIERS[key] = (state["state_dict"], info)
    return _classifier_from(state["state_dict"], info, device)


def _classifier_from(state_dict, info, device) -> Tuple[FashionClassifier, Dict[str, Any]]:
    net = FashionClassifier()
    net.load_state_dict(state_dict)
    net.eval().requires_grad_(False)
    return net.to(device or "cpu"), dict(info)


def _prepare_fashion(images, crop: bool = True) -> torch.Tensor:
    """Images (float in [-1, 1] NCHW, or uint8 arrays) -> float ``(N, 1, 28, 28)`` on the 8-bit levels.

    32x32 images (Fashion-MNIST padded by ``load_dataset(pad_to=32)``) are cropped to the centre 28x28.
    """
    x = _to_uint8_nchw(images)
    if x.shape[1] != 1:
        raise ValueError(f"Fashion-MNIST images have 1 channel, got shape {tuple(x.shape)}")
    h, w = x.shape[-2:]
    if (h, w) != (28, 28):
        if crop and h == w and h > 28 and (h - 28) % 2 == 0:
            o = (h - 28) // 2
            x = x[..., o:o + 28, o:o + 28]
        else:
            raise ValueError(f"images must be 28x28 (or 32x32 padded Fashion-MNIST), got {h}x{w}")
    return x.float() / 127.5 - 1.0


@torch.no_grad()
def classifier_features(images, *, device=None, batch_size: int = 1000, classifier=None) -> torch.Tensor:
    """The 128-d penultimate-layer features ``(N, 128)`` of the Fashion-MNIST classifier for ``images``
    (float ``(N, 1, H, W)`` in [-1, 1] or uint8; 32x32 are cropped to 28x28)."""
    net = classifier if classifier is not None else fashion_classifier(device)[0]
    dev = next(net.parameters()).device
    x = _prepare_fashion(images)
    feats = [net.features(x[i:i + batch_size].to(dev)).cpu() for i in range(0, x.shape[0], batch_size)]
    return torch.cat(feats) if feats else torch.zeros(0, FashionClassifier.feature_dim)


@dataclasses.dataclass
class FDResult:
    """A Fréchet distance in the Fashion-MNIST classifier's feature space, with its real-vs-real baseline.

    ``fd``: samples versus ``n`` real test images; ``baseline``: another ``n`` real images versus the
    same ``n`` (what a perfect model would score at this sample size: the distance is biased upwards
    for small ``n``). ``baseline_sd``: the standard deviation of that baseline over ``baseline_draws``
    disjoint sets of ``n`` real images (NaN for one set): how much an FD moves between sample sets of
    this size, so differences of that order between two models mean little. ``classifier_accuracy``:
    the classifier's test accuracy. Not FID.
    """

    fd: float
    baseline: float
    n: int
    classifier_accuracy: float
    baseline_source: str
    name: str = FD_NAME
    baseline_sd: float = float("nan")
    baseline_draws: int = 1

    def as_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)

    def __str__(self) -> str:
        spread = (f" (sd {self.baseline_sd:.3f} over {self.baseline_draws} disjoint sets)"
                  if self.baseline_draws > 1 else "")
        return (f"{self.name}: {self.fd:.3f} for {self.n} samples; real-vs-real baseline {self.baseline:.3f}"
                f"{spread} ({self.baseline_source}); classifier test accuracy {100 * self.classifier_accuracy:.1f}%")


def fd_fashion(samples, reference=None, n: Optional[int] = None, *, device=None, seed: int = 0,
               batch_size: int = 1000, cache: Optional[Union[str, os.PathLike]] = None,
               baseline_draws: int = 5) -> FDResult:
    """The Fréchet distance "FD (Fashion-MNIST classifier)" of ``samples`` to real images, with its baseline.

    Features: the 128-d penultimate layer of :func:`fashion_classifier`; statistics
    :func:`~ddpm_lib.distances.gaussian_stats`, distance :func:`~ddpm_lib.distances.frechet_distance`
    (``|mu1 - mu2|^2 + tr(S1 + S2 - 2 (S1 S2)^{1/2})``, book ``eq-frechet``).

    Args:
        samples: ``(N, 1, 28, 28)`` or ``(N, 1, 32, 32)`` (padded; cropped to 28x28) floats in [-1, 1],
            or uint8 arrays ``(N, H, W[, 1])`` (e.g. ``np.load("samples.npz")["arr_0"]``); values are
            rounded to 8-bit levels like the real data. Non-finite floats or floats far outside [-1, 1] are
            refused, floats with no negative value draw a warning, as in :func:`fid`.
        reference: real images (same formats); default the Fashion-MNIST test split. Two disjoint sets
            of ``n`` are drawn from it (seeded): ``A`` for the distance and ``B`` for the baseline
            FD(B, A). When the test split holds fewer than ``2 n`` images, ``B`` comes from the
            training split. Where the reference holds more, up to ``baseline_draws - 1`` further disjoint
            sets ``B_2, ...`` give the baseline's standard deviation (``baseline`` stays FD(B, A)).
        n: how many samples to use (the first ``n``; default all, at least 2).
        baseline_draws: at most this many disjoint sets for the baseline's spread (1: no spread).

    Returns:
        :class:`FDResult` (``print`` it for one line with both numbers).
    """
    from .data import load_dataset

    x = _prepare_fashion(samples)
    n = x.shape[0] if n is None else int(n)
    if n < 2 or n > x.shape[0]:
        raise ValueError(f"n must lie in 2..{x.shape[0]} (the number of samples), got {n}")
    x = x[:n]
    if isinstance(baseline_draws, bool) or not isinstance(baseline_draws, (int, np.integer)) or baseline_draws < 1:
        raise ValueError(f"baseline_draws must be an int >= 1, got {baseline_draws!r}")
    g = torch.Generator().manual_seed(seed)
    pool = None  # where further disjoint sets of n for the baseline's spread come from
    if reference is None:
        test = load_dataset("fashion_mnist", "test").images
        if n > test.shape[0]:
            raise ValueError(f"n = {n} is more than the {test.shape[0]:,} images of the Fashion-MNIST test split, "
                             f"the default reference's set A: use n <= {test.shape[0]} or pass a reference")
        perm = torch.randperm(test.shape[0], generator=g)
        a = test[perm[:n]]
        if 2 * n <= test.shape[0]:
            b, source, pool = test[perm[n:2 * n]], f"two disjoint sets of {n} test images", test
        else:
            train = load_dataset("fashion_mnist", "train").images
            b = train[torch.randperm(train.shape[0], generator=g)[:n]]
            source = f"{n} training versus {n} test images"
    else:
        ref = _prepare_fashion(reference)
        if ref.shape[0] < 2 * n:
            raise ValueError(f"reference must hold at least 2 n = {2 * n} images (two disjoint sets of n), "
                             f"got {ref.shape[0]}")
        perm = torch.randperm(ref.shape[0], generator=g)
        a, b = ref[perm[:n]], ref[perm[n:2 * n]]
        source, pool = f"two disjoint sets of {n} reference images", ref
    extra = [] if pool is None else [pool[perm[j * n:(j + 1) * n]]
                                     for j in range(2, min(baseline_draws + 1, pool.shape[0] // n))]
    net, info = fashion_classifier(device, cache=cache)
    fa = classifier_features(a, classifier=net, batch_size=batch_size)
    fb = classifier_features(b, classifier=net, batch_size=batch_size)
    fx = classifier_features(x, classifier=net, batch_size=batch_size)
    mu_a, s_a = gaussian_stats(fa)
    baselines = [frechet_distance(*gaussian_stats(f), mu_a, s_a)
                 for f in [fb] + [classifier_features(e, classifier=net, batch_size=batch_size) for e in extra]]
    return FDResult(
        fd=frechet_distance(*gaussian_stats(fx), mu_a, s_a),
        baseline=baselines[0],
        n=n,
        classifier_accuracy=float(info["test_accuracy"]),
        baseline_source=source,
        baseline_sd=float(np.std(baselines, ddof=1)) if len(baselines) > 1 else float("nan"),
        baseline_draws=len(baselines),
    )
