"""Data sets: images in [-1, 1] (Fashion-MNIST, MNIST, CIFAR-10, scikit-learn's 8x8 digits), the
2-D toy distributions, an exact Gaussian mixture, a batch loader with random flips, and image grids.

Conventions:

* Images are ``float32`` tensors of shape ``(N, C, H, W)`` holding 8-bit values mapped to [-1, 1]
  (``x = k / 127.5 - 1`` for ``k`` in ``0..255``), the scaling of the paper (book:
  ``eq-data-scaling``); labels are ``int64`` of shape ``(N,)``.
* Toy data are ``float32`` tensors of shape ``(N, 2)`` with roughly unit standard deviation.
* Randomness comes from a ``torch.Generator`` or an ``int`` seed (``None``: torch's global RNG).

Where the image files come from (first hit wins):

1. Fashion-MNIST (and MNIST): the system directories in :data:`SYSTEM_DATA_DIRS`, e.g. Debian's
   ``/usr/share/datasets/fashion-mnist`` (gzipped IDX files).
2. The torchvision layout under ``root`` (argument, else the environment variable
   ``DDPM_DATA_DIR``, else ``~/.cache/ddpm_lib``): ``<root>/FashionMNIST/raw``,
   ``<root>/MNIST/raw`` (IDX files, gzipped or not), ``<root>/cifar-10-batches-py``.
3. A download through torchvision into ``root`` (works on Colab), unless ``download=False``.
   Offline, the download fails within seconds with :class:`DatasetUnavailableError`, whose message
   says what is available offline and how to get the missing data set.

IDX and CIFAR-10 pickle files are parsed here with numpy, so the offline path needs no torchvision.
"""
from __future__ import annotations

import dataclasses
import functools
import gzip
import math
import os
import pickle
import socket
import threading
import urllib.parse
from pathlib import Path
from typing import Iterator, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F

__all__ = [
    "DATA_DIR_ENV_VAR",
    "SYSTEM_DATA_DIRS",
    "IMAGE_DATASETS",
    "TOY_DATASETS",
    "DatasetUnavailableError",
    "ImageData",
    "TensorLoader",
    "GaussianMixture2D",
    "default_root",
    "available_datasets",
    "load_dataset",
    "load_digits",
    "read_idx",
    "make_loader",
    "random_hflip",
    "toy_data",
    "toy_mixture",
    "to_uint8",
    "image_grid",
    "save_image_grid",
]

DATA_DIR_ENV_VAR = "DDPM_DATA_DIR"

#: Directories searched first for ``<dir>/<name>/*-idx?-ubyte[.gz]`` (Debian's ``dataset-*`` packages).
SYSTEM_DATA_DIRS: Tuple[str, ...] = ("/usr/share/datasets",)

FASHION_MNIST_CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)
CIFAR10_CLASSES = (
    "airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck",
)
DIGIT_CLASSES = tuple(str(i) for i in range(10))

#: Canonical image data set names (aliases such as ``"fashion-mnist"`` or ``"cifar-10"`` also work).
IMAGE_DATASETS = ("fashion_mnist", "mnist", "cifar10", "digits")
#: The 2-D toy distributions of :func:`toy_data`.
TOY_DATASETS = ("moons", "eight_gaussians", "swiss_roll", "checkerboard", "two_gaussians", "gaussian_mixture")

_ALIASES = {
    "fashion_mnist": "fashion_mnist", "fashionmnist": "fashion_mnist", "fmnist": "fashion_mnist",
    "mnist": "mnist",
    "cifar10": "cifar10", "cifar_10": "cifar10", "cifar": "cifar10",
    "digits": "digits", "sklearn_digits": "digits",
}
_DISPLAY = {"fashion_mnist": "Fashion-MNIST", "mnist": "MNIST", "cifar10": "CIFAR-10", "digits": "digits"}
# (torchvision folder, system folder) for the IDX data sets
_IDX_DIRS = {"fashion_mnist": ("FashionMNIST", "fashion-mnist"), "mnist": ("MNIST", "mnist")}
_IDX_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
_CIFAR_DIR = "cifar-10-batches-py"
_CIFAR_FILES = {"train": tuple(f"data_batch_{i}" for i in range(1, 6)), "test": ("test_batch",)}
_PROBE_TIMEOUT_S = 5.0
_DOWNLOAD_SOCKET_TIMEOUT_S = 60.0

SeedLike = Union[None, int, torch.Generator]
_LEVELS = (np.arange(256) / 127.5 - 1.0).astype(np.float32)  # 8-bit level k -> k / 127.5 - 1


class DatasetUnavailableError(RuntimeError):
    """An image data set is neither on disk nor downloadable (typically: offline)."""


# ---------------------------------------------------------------------------------------------
# small helpers


def _canonical(name: str) -> str:
    if not isinstance(name, str):
        raise TypeError(f"name must be a str, got {type(name).__name__}")
    key = name.strip().lower().replace("-", "_").replace(" ", "_")
    if key in _ALIASES:
        return _ALIASES[key]
    if key in TOY_DATASETS:
        raise ValueError(f"name {name!r} is a 2-D toy distribution: use toy_data({name!r}, n)")
    raise ValueError(f"unknown dataset name {name!r}; choose one of {', '.join(IMAGE_DATASETS)}")


def _check_split(split: str) -> str:
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    return split


def _as_generator(generator: SeedLike, argument: str = "generator") -> Optional[torch.Generator]:
    if generator is None or isinstance(generator, torch.Generator):
        return generator
    if isinstance(generator, (int, np.integer)) and not isinstance(generator, bool):
        return torch.Generator().manual_seed(int(generator))
    raise TypeError(f"{argument} must be None, an int seed or a torch.Generator, got {type(generator).__name__}")


def _check_positive_int(value, argument: str, allow_none: bool = True) -> Optional[int]:
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{argument} must be an int, got {type(value).__name__}")
    if value < 1:
        raise ValueError(f"{argument} must be at least 1, got {value}")
    return int(value)


def default_root() -> Path:
    """The torchvision root used when ``root=None``: ``$DDPM_DATA_DIR``, else ``~/.cache/ddpm_lib``."""
    env = os.environ.get(DATA_DIR_ENV_VAR, "").strip()
    return Path(env).expanduser() if env else Path("~/.cache/ddpm_lib").expanduser()


def _resolve_root(root) -> Path:
    return default_root() if root is None else Path(root).expanduser()


# ---------------------------------------------------------------------------------------------
# file formats


def read_idx(path: Union[str, Path]) -> np.ndarray:
    """Read an IDX file (the MNIST format, gzipped or not) into a read-only numpy array.

    Shapes: images ``(N, 28, 28)`` uint8, labels ``(N,)`` uint8.
    """
    path = Path(path)
    st = path.stat()
    return _read_idx_cached(str(path), st.st_mtime_ns, st.st_size)


@functools.lru_cache(maxsize=8)
def _read_idx_cached(path: str, mtime_ns: int, size: int) -> np.ndarray:
    with open(path, "rb") as f:
        head = f.read(2)
    opener = gzip.open if head == b"\x1f\x8b" else open
    with opener(path, "rb") as f:
        raw = f.read()
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0:
        raise ValueError(f"{path} is not an IDX file (bad magic number)")
    dtypes = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
    if raw[2] not in dtypes:
        raise ValueError(f"{path}: unknown IDX data type 0x{raw[2]:02x}")
    ndim = raw[3]
    dims = tuple(int(d) for d in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    dtype = np.dtype(dtypes[raw[2]])
    count = int(np.prod(dims)) if dims else 1
    offset = 4 + 4 * ndim
    if len(raw) - offset < count * dtype.itemsize:
        raise ValueError(f"{path} is truncated: header says {dims}, file has {len(raw) - offset} bytes of data")
    arr = np.frombuffer(raw, dtype=dtype, count=count, offset=offset).reshape(dims)
    arr.setflags(write=False)
    return arr


def _find_file(directory: Path, stem: str) -> Optional[Path]:
    for candidate in (directory / stem, directory / (stem + ".gz")):
        if candidate.is_file():
            return candidate
    return None


def _idx_dirs(name: str, root: Path) -> list:
    tv_dir, sys_dir = _IDX_DIRS[name]
    return [Path(d) / sys_dir for d in SYSTEM_DATA_DIRS] + [root / tv_dir / "raw"]


def _find_idx(name: str, split: str, root: Path) -> Optional[Tuple[Path, Path]]:
    img_stem, lbl_stem = _IDX_FILES[split]
    for directory in _idx_dirs(name, root):
        img, lbl = _find_file(directory, img_stem), _find_file(directory, lbl_stem)
        if img is not None and lbl is not None:
            return img, lbl
    return None


def _find_cifar(split: str, root: Path) -> Optional[list]:
    files = [root / _CIFAR_DIR / f for f in _CIFAR_FILES[split]]
    return files if all(f.is_file() for f in files) else None


def _read_cifar(files: Sequence[Path]) -> Tuple[np.ndarray, np.ndarray]:
    images, labels = [], []
    for f in files:
        with open(f, "rb") as fh:
            batch = pickle.load(fh, encoding="latin1")
        images.append(np.asarray(batch["data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
        labels.append(np.asarray(batch["labels"], dtype=np.int64))
    return np.concatenate(images), np.concatenate(labels)


def _locate(name: str, split: str, root: Path):
    """Files of ``name``/``split`` on disk, or None."""
    if name in _IDX_DIRS:
        return _find_idx(name, split, root)
    if name == "cifar10":
        return _find_cifar(split, root)
    raise AssertionError(name)


# ---------------------------------------------------------------------------------------------
# downloads (torchvision)


def _probe(url: str, timeout: float = _PROBE_TIMEOUT_S) -> None:
    """Raise OSError unless a TCP connection to the host of ``url`` opens within ``timeout`` s.

    Where a proxy is set for the URL's scheme (``HTTPS_PROXY`` and the like, honoured by the downloads
    themselves) and the host is not exempt (``NO_PROXY``), the proxy is probed instead. Runs in a daemon thread
    so that a slow DNS lookup cannot block longer than ``timeout`` either.
    """
    import urllib.request

    parts = urllib.parse.urlsplit(url)
    host, port = parts.hostname, parts.port or (443 if parts.scheme == "https" else 80)
    via = ""
    proxy = urllib.request.getproxies().get(parts.scheme)
    if proxy and not urllib.request.proxy_bypass(host):
        pp = urllib.parse.urlsplit(proxy if "://" in proxy else "http://" + proxy)
        if pp.hostname:
            host, port, via = pp.hostname, pp.port or (443 if pp.scheme == "https" else 80), "the proxy "
    result: list = []

    def target():
        try:
            socket.create_connection((host, port), timeout=timeout).close()
            result.append(None)
        except OSError as exc:  # DNS failure, refused, unreachable, timeout
            result.append(exc)

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(timeout + 0.5)
    if not result:
        raise OSError(f"no answer from {via}{host}:{port} within {timeout:.0f} s")
    if result[0] is not None:
        raise OSError(f"cannot reach {via}{host}:{port}: {result[0]}")


def _download(name: str, root: Path) -> None:
    """Download ``name`` into the torchvision layout under ``root``; raise on any failure.

    A quick connection probe runs first so that an offline machine fails in seconds instead of
    waiting on network timeouts.
    """
    import torchvision.datasets as tvd

    cls = {"fashion_mnist": tvd.FashionMNIST, "mnist": tvd.MNIST, "cifar10": tvd.CIFAR10}[name]
    url = cls.url if name == "cifar10" else cls.mirrors[0]
    _probe(url)
    old = socket.getdefaulttimeout()
    socket.setdefaulttimeout(_DOWNLOAD_SOCKET_TIMEOUT_S)  # torchvision's urlopen has no timeout
    try:
        root.mkdir(parents=True, exist_ok=True)
        for train in (True, False):
            cls(str(root), train=train, download=True)
    finally:
        socket.setdefaulttimeout(old)


def _unavailable_message(name: str, root: Path, reason: str) -> str:
    offline = available_datasets(root)
    where = (" or ".join(str(d) for d in _idx_dirs(name, root)) if name in _IDX_DIRS
             else str(root / _CIFAR_DIR))
    return (
        f"{_DISPLAY[name]} is not available: no files under {where}, and {reason}. "
        f"Available offline now: {', '.join(offline)} (load_dataset), and the 2-D toy sets "
        f"{', '.join(TOY_DATASETS)} (toy_data). To get {_DISPLAY[name]}, run once with internet access "
        f"(e.g. on Colab), where load_dataset and the command line download it through torchvision into the "
        f"data root by default (unless download=False), or copy the "
        f"torchvision files there yourself and pass root=... (--data-root on the command line) or set "
        f"{DATA_DIR_ENV_VAR}."
    )


def _fetch(name: str, split: str, root: Path, download: Optional[bool]):
    found = _locate(name, split, root)
    if found is not None:
        return found
    if download is False:
        raise DatasetUnavailableError(_unavailable_message(name, root, "download=False"))
    try:
        _download(name, root)
    except Exception as exc:  # noqa: BLE001 - any failure of the download means "unavailable"
        msg = _unavailable_message(name, root, f"the download failed ({type(exc).__name__}: {exc})")
        raise DatasetUnavailableError(msg) from exc
    found = _locate(name, split, root)
    if found is None:
        raise DatasetUnavailableError(
            _unavailable_message(name, root, "the download finished but the expected files are missing")
        )
    return found


# ---------------------------------------------------------------------------------------------
# image data sets


@dataclasses.dataclass(eq=False)
class ImageData:
    """An image data set held in memory; also a ``torch.utils.data.Dataset`` of ``(image, label)``.

    Attributes:
        images: ``(N, C, H, W)`` float32 in [-1, 1] (8-bit values ``k / 127.5 - 1``).
        labels: ``(N,)`` int64 class indices.
        class_names: the name of each class index.
        name: canonical data set name (``"fashion_mnist"``, ``"mnist"``, ``"cifar10"``, ``"digits"``).
        split: ``"train"`` or ``"test"``.
    """

    images: torch.Tensor
    labels: torch.Tensor
    class_names: Tuple[str, ...]
    name: str
    split: str = "train"

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def __getitem__(self, index):
        return self.images[index], self.labels[index]

    def __repr__(self) -> str:
        return (
            f"ImageData(name={self.name!r}, split={self.split!r}, images={tuple(self.images.shape)}, "
            f"classes={len(self.class_names)}, device={self.images.device})"
        )

    @property
    def shape(self) -> Tuple[int, int, int]:
        """``(C, H, W)`` of one image."""
        return tuple(self.images.shape[1:])

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def to(self, device) -> "ImageData":
        """A copy with images and labels on ``device``."""
        return dataclasses.replace(self, images=self.images.to(device), labels=self.labels.to(device))

    def tensors(self) -> Tuple[torch.Tensor, torch.Tensor]:
        """``(images, labels)``."""
        return self.images, self.labels


def _uint8_to_unit(arr: np.ndarray) -> torch.Tensor:
    """uint8 ``(N, C, H, W)`` -> float32 in [-1, 1] (book: ``eq-data-scaling``)."""
    return torch.from_numpy(_LEVELS[arr])  # one gather pass: the fastest way on a CPU


def _quantize(x: torch.Tensor) -> torch.Tensor:
    """Round values in [-1, 1] to the nearest 8-bit level ``k / 127.5 - 1``."""
    k = torch.round((x.clamp(-1, 1) + 1) * 127.5).long()
    return torch.from_numpy(_LEVELS).to(x.device)[k].to(x.dtype)


def load_digits(size: Optional[int] = None, resize_mode: str = "nearest") -> ImageData:
    """scikit-learn's 8x8 handwritten digits (1797 images, offline) as ``(1797, 1, 8, 8)`` in [-1, 1].

    The 17 grey levels ``0..16`` map to the 8-bit levels ``round(v * 255 / 16)`` and then to [-1, 1],
    so the values suit the discretized decoder. ``size`` resizes (see :func:`load_dataset`).
    """
    from sklearn.datasets import load_digits as _sk_load_digits

    bunch = _sk_load_digits()
    levels = np.round(bunch.images * (255.0 / 16.0)).astype(np.uint8)[:, None]
    data = ImageData(_uint8_to_unit(levels), torch.as_tensor(bunch.target, dtype=torch.int64), DIGIT_CLASSES,
                     "digits", "train")
    return _postprocess(data, size=size, resize_mode=resize_mode, pad_to=None, limit=None, classes=None)


def _resize(images: torch.Tensor, size: int, mode: str) -> torch.Tensor:
    if mode not in ("nearest", "bilinear", "bicubic", "area"):
        raise ValueError(f"resize_mode must be 'nearest', 'bilinear', 'bicubic' or 'area', got {mode!r}")
    if images.shape[-1] == size and images.shape[-2] == size:
        return images
    kwargs = {}
    if mode in ("bilinear", "bicubic"):
        kwargs = {"align_corners": False, "antialias": size < images.shape[-1]}
    elif mode == "nearest":
        mode = "nearest-exact"
    out = F.interpolate(images, size=(size, size), mode=mode, **kwargs)
    return _quantize(out)


def _pad(images: torch.Tensor, pad_to: int) -> torch.Tensor:
    h, w = images.shape[-2:]
    if pad_to < h or pad_to < w:
        raise ValueError(f"pad_to={pad_to} is smaller than the images ({h}x{w}); use size= (--size) to shrink them")
    top, left = (pad_to - h) // 2, (pad_to - w) // 2
    return F.pad(images, (left, pad_to - w - left, top, pad_to - h - top), value=-1.0)


def _select_classes(data: ImageData, classes) -> ImageData:
    wanted = []
    for c in classes:
        if isinstance(c, str):
            if c not in data.class_names:
                raise ValueError(f"classes: unknown class {c!r}; {data.name} has {', '.join(data.class_names)}")
            wanted.append(data.class_names.index(c))
        elif isinstance(c, (int, np.integer)) and not isinstance(c, bool) and 0 <= c < data.num_classes:
            wanted.append(int(c))
        else:
            raise ValueError(f"classes: expected class names or indices in 0..{data.num_classes - 1}, got {c!r}")
    if not wanted:
        raise ValueError("classes: an empty list selects no image (None keeps every class)")
    keep = torch.isin(data.labels, torch.tensor(wanted, dtype=torch.int64))
    return dataclasses.replace(data, images=data.images[keep], labels=data.labels[keep])


def _postprocess(data: ImageData, *, size, resize_mode, pad_to, limit, classes) -> ImageData:
    size = _check_positive_int(size, "size")
    pad_to = _check_positive_int(pad_to, "pad_to")
    limit = _check_positive_int(limit, "limit")
    if classes is not None:
        data = _select_classes(data, [classes] if isinstance(classes, (str, int, np.integer)) else list(classes))
    if limit is not None:
        data = dataclasses.replace(data, images=data.images[:limit], labels=data.labels[:limit])
    images = data.images
    if size is not None:
        images = _resize(images, size, resize_mode)
    if pad_to is not None:
        images = _pad(images, pad_to)
    return dataclasses.replace(data, images=images.contiguous(), labels=data.labels.contiguous())


def load_dataset(
    name: str,
    split: str = "train",
    *,
    root=None,
    download: Optional[bool] = None,
    pad_to: Optional[int] = None,
    size: Optional[int] = None,
    resize_mode: str = "nearest",
    limit: Optional[int] = None,
    classes=None,
) -> ImageData:
    """Load an image data set into memory as :class:`ImageData` (images in [-1, 1], book:
    ``eq-data-scaling``).

    Args:
        name: ``"fashion_mnist"`` (28x28 grey), ``"mnist"`` (28x28 grey), ``"cifar10"`` (32x32 RGB),
            ``"digits"`` (scikit-learn's 8x8 grey, offline; it has only ``split="train"``, all 1797
            images). Hyphens and case are ignored (``"Fashion-MNIST"``, ``"CIFAR-10"``).
        split: ``"train"`` or ``"test"``.
        root: torchvision data root; default ``$DDPM_DATA_DIR`` or ``~/.cache/ddpm_lib``.
        download: ``None`` or ``True``: download through torchvision when the files are missing;
            ``False``: never (raise :class:`DatasetUnavailableError` instead).
        pad_to: pad the images to ``pad_to x pad_to`` with -1 (black), centred; ``pad_to=32`` turns
            28x28 Fashion-MNIST into the 32x32 the U-Net presets use (2 pixels each side).
        size: resize to ``size x size`` first (``resize_mode``: ``"nearest"`` default, ``"bilinear"``,
            ``"bicubic"``, ``"area"``); results are rounded back to the 8-bit levels.
        limit: keep only the first ``limit`` images (after ``classes``).
        classes: keep only these classes (indices or names, e.g. ``["Sneaker"]``); labels keep their
            original indices.

    Returns:
        ``ImageData`` with ``images (N, C, H, W)`` float32 and ``labels (N,)`` int64, on the CPU.

    Raises:
        DatasetUnavailableError: the files are missing and cannot be downloaded (offline).
    """
    name = _canonical(name)
    split = _check_split(split)
    limit = _check_positive_int(limit, "limit")
    head = slice(None) if limit is None or classes is not None else slice(0, limit)  # convert no more
    if download is not None and not isinstance(download, bool):
        raise TypeError(f"download must be None, True or False, got {type(download).__name__}")
    if name == "digits":
        if split != "train":
            raise ValueError("split: the digits data set has no test split; use split='train' (all 1797 images)")
        data = load_digits()
    else:
        root_path = _resolve_root(root)
        found = _fetch(name, split, root_path, download)
        if name == "cifar10":
            images, labels = _read_cifar(found)
            data = ImageData(_uint8_to_unit(images[head]), torch.from_numpy(labels[head]), CIFAR10_CLASSES,
                             name, split)
        else:
            img_path, lbl_path = found
            images, labels = read_idx(img_path), read_idx(lbl_path)
            if images.ndim != 3 or labels.shape != images.shape[:1]:
                raise ValueError(f"{img_path}: unexpected shapes {images.shape} / {labels.shape}")
            names = FASHION_MNIST_CLASSES if name == "fashion_mnist" else DIGIT_CLASSES
            data = ImageData(_uint8_to_unit(images[head, None]), torch.from_numpy(labels[head].astype(np.int64)),
                             names, name, split)
    return _postprocess(data, size=size, resize_mode=resize_mode, pad_to=pad_to, limit=limit, classes=classes)


def available_datasets(root=None) -> list:
    """Names of the image data sets loadable right now without a download (``"digits"`` always).

    Checks only for files (both splits), so it is instant.
    """
    root_path = _resolve_root(root)
    out = []
    for name in IMAGE_DATASETS:
        if name == "digits":
            out.append(name)
        elif all(_locate(name, split, root_path) is not None for split in ("train", "test")):
            out.append(name)
    return out


# ---------------------------------------------------------------------------------------------
# batches and augmentation


def random_hflip(x: torch.Tensor, p: float = 0.5, generator: SeedLike = None) -> torch.Tensor:
    """Flip each image of ``x (B, C, H, W)`` left-right with probability ``p`` (the paper's CIFAR-10
    augmentation). One vectorized op; works on any device. Returns a new tensor."""
    if not torch.is_tensor(x) or x.ndim < 2:
        raise ValueError("x must be a tensor of shape (B, ..., W)")
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"p must lie in [0, 1], got {p}")
    gen = _as_generator(generator)
    rng_device = gen.device if gen is not None else x.device
    mask = torch.rand(x.shape[0], generator=gen, device=rng_device) < p
    mask = mask.to(x.device).reshape(-1, *([1] * (x.ndim - 1)))
    return torch.where(mask, x.flip(-1), x)


class TensorLoader:
    """Mini-batches of in-memory tensors, by indexing (no per-sample collation).

    Iterate for one epoch (reshuffled each time); :meth:`forever` cycles epochs endlessly. Yields
    ``(x, y)`` when there are labels, else ``x``. Build it with :func:`make_loader`.
    """

    def __init__(self, images: torch.Tensor, labels: Optional[torch.Tensor], batch_size: int, shuffle: bool,
                 hflip: bool, generator: Optional[torch.Generator], drop_last: bool, device):
        self.images, self.labels = images, labels
        self.batch_size, self.shuffle, self.hflip = batch_size, shuffle, hflip
        self.generator, self.drop_last = generator, drop_last
        self.device = None if device is None else torch.device(device)

    def __len__(self) -> int:
        n = self.images.shape[0]
        return n // self.batch_size if self.drop_last else math.ceil(n / self.batch_size)

    def __iter__(self) -> Iterator:
        n = self.images.shape[0]
        if self.shuffle:
            gen_device = self.generator.device if self.generator is not None else "cpu"
            order = torch.randperm(n, generator=self.generator, device=gen_device)
        else:
            order = torch.arange(n)
        order = order.to(self.images.device)
        for b in range(len(self)):
            idx = order[b * self.batch_size:(b + 1) * self.batch_size]
            x = self.images[idx]
            y = None if self.labels is None else self.labels[idx.to(self.labels.device)]
            if self.device is not None:
                x = x.to(self.device, non_blocking=True)
                y = None if y is None else y.to(self.device, non_blocking=True)
            if self.hflip:
                x = random_hflip(x, generator=self.generator)
            yield x if y is None else (x, y)

    def forever(self) -> Iterator:
        """Batches without end, epoch after epoch (for step-based training loops)."""
        if len(self) == 0:  # an empty epoch would make this loop spin without yielding
            n = self.images.shape[0]
            raise ValueError(f"no batch to yield: {n} image{'' if n == 1 else 's'}"
                             + (f" < batch_size {self.batch_size} with drop_last=True" if n else ""))
        while True:
            yield from self


def make_loader(
    data,
    batch_size: int,
    shuffle: bool = True,
    *,
    hflip: bool = False,
    generator: SeedLike = None,
    drop_last: bool = False,
    device=None,
) -> TensorLoader:
    """A fast loader over in-memory data.

    Args:
        data: :class:`ImageData`, a pair ``(images, labels)`` or a tensor ``(N, ...)`` (toy points).
        batch_size: images per batch.
        shuffle: reshuffle each epoch.
        hflip: random horizontal flips, each image its own draw (the paper's CIFAR-10 augmentation),
            applied after moving to ``device``.
        generator: ``torch.Generator`` or seed for the shuffling and the flips (reproducible epochs).
        drop_last: drop the last incomplete batch.
        device: move each batch there (e.g. ``"cuda"``); default: where the data are.

    Yields ``(x (B, C, H, W), y (B,))``, or ``x`` alone when ``data`` is a bare tensor.
    """
    if isinstance(data, ImageData):
        images, labels = data.images, data.labels
    elif torch.is_tensor(data):
        images, labels = data, None
    elif isinstance(data, (tuple, list)) and len(data) == 2 and all(torch.is_tensor(t) for t in data):
        images, labels = data
        if labels.shape[0] != images.shape[0]:
            raise ValueError(f"data: {images.shape[0]} images but {labels.shape[0]} labels")
    else:
        raise TypeError(f"data must be ImageData, a tensor or a pair of tensors, got {type(data).__name__}")
    batch_size = _check_positive_int(batch_size, "batch_size", allow_none=False)
    if hflip and images.ndim != 4:
        raise ValueError(f"hflip needs images of shape (N, C, H, W), got {tuple(images.shape)}")
    return TensorLoader(images, labels, batch_size, bool(shuffle), bool(hflip), _as_generator(generator),
                        bool(drop_last), device)


# ---------------------------------------------------------------------------------------------
# 2-D toy distributions


class GaussianMixture2D:
    """A mixture of isotropic Gaussians ``sum_k w_k N(mu_k, s_k^2 I)`` with exact density and score.

    Args:
        means: ``(K, d)`` component means (d = 2 for the book's plots; any d works).
        stds: ``(K,)`` or a scalar: the standard deviation of each component.
        weights: ``(K,)`` nonnegative mixture weights (normalized here); default uniform.

    Its forward-diffused law is again such a mixture (:meth:`noised`), which makes it the book's
    exact test bed: the optimal eps-predictor is ``-sqrt(1 - abar) * score`` (:meth:`optimal_eps`).
    Parameters are float64; methods compute in the dtype and on the device of their input.
    """

    def __init__(self, means, stds, weights=None):
        means = torch.as_tensor(means, dtype=torch.float64)
        if means.ndim != 2 or means.shape[0] < 1:
            raise ValueError(f"means must have shape (K, d), got {tuple(means.shape)}")
        k = means.shape[0]
        stds = torch.as_tensor(stds, dtype=torch.float64)
        stds = stds.expand(k).clone() if stds.ndim == 0 else stds
        if stds.shape != (k,) or not bool((stds > 0).all()):
            raise ValueError(f"stds must be positive, a scalar or of shape ({k},), got {tuple(stds.shape)}")
        if weights is None:
            weights = torch.full((k,), 1.0 / k, dtype=torch.float64)
        weights = torch.as_tensor(weights, dtype=torch.float64)
        if weights.shape != (k,) or bool((weights < 0).any()) or float(weights.sum()) <= 0:
            raise ValueError(f"weights must be nonnegative of shape ({k},) with a positive sum")
        self.means, self.stds, self.weights = means, stds, weights / weights.sum()

    @property
    def num_components(self) -> int:
        return int(self.means.shape[0])

    @property
    def dim(self) -> int:
        return int(self.means.shape[1])

    def __repr__(self) -> str:
        return f"GaussianMixture2D(K={self.num_components}, d={self.dim})"

    def _params(self, x: torch.Tensor):
        return (self.means.to(x.device, x.dtype), self.stds.to(x.device, x.dtype),
                self.weights.to(x.device, x.dtype))

    def _check_x(self, x) -> torch.Tensor:
        if not torch.is_tensor(x) or not x.dtype.is_floating_point:
            raise TypeError("x must be a floating-point tensor of shape (N, d)")
        if x.ndim != 2 or x.shape[1] != self.dim:
            raise ValueError(f"x must have shape (N, {self.dim}), got {tuple(x.shape)}")
        return x

    def sample(self, n: int, generator: SeedLike = None, *, return_labels: bool = False,
               dtype: torch.dtype = torch.float32):
        """``n`` samples ``(n, d)`` (and their component indices ``(n,)`` with ``return_labels``)."""
        n = _check_positive_int(n, "n", allow_none=False)
        gen = _as_generator(generator)
        if gen is not None and gen.device.type != "cpu":
            raise ValueError("generator must be a CPU torch.Generator (points are drawn on the CPU)")
        comp = torch.multinomial(self.weights.cpu(), n, replacement=True, generator=gen)
        z = torch.randn(n, self.dim, generator=gen, dtype=torch.float64)
        x = (self.means[comp] + self.stds[comp, None] * z).to(dtype)
        return (x, comp) if return_labels else x

    def _log_joint(self, x: torch.Tensor) -> torch.Tensor:
        """``log w_k + log N(x; mu_k, s_k^2 I)``, shape ``(N, K)``."""
        mu, s, w = self._params(x)
        d = self.dim
        sq = ((x[:, None, :] - mu[None]) ** 2).sum(-1)
        return torch.log(w) - 0.5 * sq / s**2 - d * torch.log(s) - 0.5 * d * math.log(2 * math.pi)

    def log_prob(self, x: torch.Tensor) -> torch.Tensor:
        """Exact log density ``log p(x)``; ``x (N, d)`` -> ``(N,)``. Differentiable."""
        return torch.logsumexp(self._log_joint(self._check_x(x)), dim=1)

    def responsibilities(self, x: torch.Tensor) -> torch.Tensor:
        """Posterior component probabilities ``p(k | x)``, ``(N, K)``."""
        return torch.softmax(self._log_joint(self._check_x(x)), dim=1)

    def score(self, x: torch.Tensor) -> torch.Tensor:
        """Exact score ``grad_x log p(x) = sum_k p(k|x) (mu_k - x) / s_k^2``; ``(N, d)`` -> ``(N, d)``
        (book: ``eq-score``)."""
        x = self._check_x(x)
        mu, s, _ = self._params(x)
        r = torch.softmax(self._log_joint(x), dim=1)
        return ((r / s**2)[:, :, None] * (mu[None] - x[:, None, :])).sum(1)

    def noised(self, alpha_bar) -> "GaussianMixture2D":
        """The law of ``x_t = sqrt(abar) x_0 + sqrt(1 - abar) eps`` (book: ``eq-q-marginal``):
        means ``sqrt(abar) mu_k``, variances ``abar s_k^2 + 1 - abar``, same weights."""
        ab = float(alpha_bar)
        if not 0.0 < ab <= 1.0:
            raise ValueError(f"alpha_bar must lie in (0, 1], got {ab}")
        return GaussianMixture2D(math.sqrt(ab) * self.means, torch.sqrt(ab * self.stds**2 + (1.0 - ab)),
                                 self.weights)

    def optimal_eps(self, x_t: torch.Tensor, alpha_bar) -> torch.Tensor:
        """The minimizer of ``L_simple`` at noise level ``abar``: ``E[eps | x_t] =
        -sqrt(1 - abar) * score_t(x_t)`` (book: ``eq-eps-score``); ``(N, d)`` -> ``(N, d)``."""
        return -math.sqrt(1.0 - float(alpha_bar)) * self.noised(alpha_bar).score(x_t)

    def posterior_mean(self, x_t: torch.Tensor, alpha_bar) -> torch.Tensor:
        """Tweedie's ``E[x_0 | x_t] = (x_t + (1 - abar) score_t(x_t)) / sqrt(abar)``; ``(N, d)`` (book ``eq-tweedie``)."""
        ab = float(alpha_bar)
        return (x_t + (1.0 - ab) * self.noised(ab).score(x_t)) / math.sqrt(ab)

    @property
    def mean(self) -> torch.Tensor:
        """``(d,)`` float64 mean."""
        return (self.weights[:, None] * self.means).sum(0)

    @property
    def covariance(self) -> torch.Tensor:
        """``(d, d)`` float64 covariance."""
        m = self.mean
        second = (self.weights[:, None, None] * (self.means[:, :, None] * self.means[:, None, :])).sum(0)
        second = second + (self.weights * self.stds**2).sum() * torch.eye(self.dim, dtype=torch.float64)
        return second - m[:, None] * m[None, :]


def toy_mixture(name: str) -> GaussianMixture2D:
    """The exact mixture behind ``"eight_gaussians"``, ``"two_gaussians"`` or ``"gaussian_mixture"``.

    * ``eight_gaussians``: 8 components on a circle of radius sqrt(1.98), std 0.1 (unit variance).
    * ``two_gaussians``: means (+-1, 0), std 0.35, equal weights.
    * ``gaussian_mixture``: 3 components with unequal stds (0.3, 0.45, 0.25) and weights
      (0.5, 0.3, 0.2), means (-1.2, -0.6), (1.0, -0.8), (0.0, 1.1).
    """
    if name == "eight_gaussians":
        angles = torch.arange(8, dtype=torch.float64) * (math.pi / 4)
        means = math.sqrt(2.0 * (1.0 - 0.1**2)) * torch.stack([torch.cos(angles), torch.sin(angles)], 1)
        return GaussianMixture2D(means, 0.1)
    if name == "two_gaussians":
        return GaussianMixture2D([[-1.0, 0.0], [1.0, 0.0]], 0.35)
    if name == "gaussian_mixture":
        return GaussianMixture2D([[-1.2, -0.6], [1.0, -0.8], [0.0, 1.1]], [0.3, 0.45, 0.25], [0.5, 0.3, 0.2])
    raise ValueError(f"unknown mixture {name!r}; choose 'eight_gaussians', 'two_gaussians' or 'gaussian_mixture'")


def toy_data(name: str, n: int, generator: SeedLike = None, *, device=None,
             dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``n`` points ``(n, 2)`` from a 2-D toy distribution, with roughly unit standard deviation.

    Names: ``"moons"`` (two interleaved half circles), ``"eight_gaussians"``, ``"swiss_roll"`` (the
    2-D spiral), ``"checkerboard"`` (uniform on 8 squares of a 4x4 board on [-2, 2]^2),
    ``"two_gaussians"`` and ``"gaussian_mixture"`` (exact mixtures, see :func:`toy_mixture`).
    Drawn on the CPU from ``generator`` (a ``torch.Generator`` or an int seed) and then moved to
    ``device``, so a seed gives the same points on every device.
    """
    if not isinstance(name, str) or name not in TOY_DATASETS:
        raise ValueError(f"unknown toy data set {name!r}; choose one of {', '.join(TOY_DATASETS)}")
    n = _check_positive_int(n, "n", allow_none=False)
    gen = _as_generator(generator)
    if gen is not None and gen.device.type != "cpu":
        raise ValueError("generator must be a CPU torch.Generator (points are drawn on the CPU)")
    f64 = torch.float64
    if name in ("eight_gaussians", "two_gaussians", "gaussian_mixture"):
        x = toy_mixture(name).sample(n, gen, dtype=f64)
    elif name == "moons":
        t = math.pi * torch.rand(n, generator=gen, dtype=f64)
        upper = torch.rand(n, generator=gen) < 0.5
        x = torch.where(upper[:, None], torch.stack([torch.cos(t), torch.sin(t)], 1),
                        torch.stack([1.0 - torch.cos(t), 0.5 - torch.sin(t)], 1))
        x = x + 0.05 * torch.randn(n, 2, generator=gen, dtype=f64)
        x = (x - torch.tensor([0.5, 0.25], dtype=f64)) * math.sqrt(2.0)
    elif name == "swiss_roll":
        t = 1.5 * math.pi * (1.0 + 2.0 * torch.rand(n, generator=gen, dtype=f64))
        x = torch.stack([t * torch.cos(t), t * torch.sin(t)], 1)
        x = x + 0.25 * torch.randn(n, 2, generator=gen, dtype=f64)
        x = (x - torch.tensor([2.0, 0.2], dtype=f64)) / 7.0
    else:  # checkerboard
        x1 = 4.0 * torch.rand(n, generator=gen, dtype=f64) - 2.0
        x2 = torch.rand(n, generator=gen, dtype=f64) - 2.0 * torch.randint(0, 2, (n,), generator=gen).to(f64)
        x2 = x2 + torch.remainder(torch.floor(x1), 2.0)
        x = torch.stack([x1, x2], 1)
    return x.to(device=device, dtype=dtype)


# ---------------------------------------------------------------------------------------------
# images out


def to_uint8(x) -> np.ndarray:
    """Images in [-1, 1] to uint8 channels-last: ``(N, C, H, W)`` -> ``(N, H, W, C)``, or
    ``(C, H, W)`` -> ``(H, W, C)``. Values are clipped and rounded (``k = round((x + 1) * 127.5)``).

    uint8 input is taken as pixel values 0..255 (as ``python -m ddpm_lib sample`` writes them to .npz),
    channels-last already when its last axis has 1 or 3 entries and the channel axis does not.
    """
    x = torch.as_tensor(x).detach()
    if x.ndim not in (3, 4):
        raise ValueError(f"x must have shape (N, C, H, W) or (C, H, W), got {tuple(x.shape)}")
    if x.dtype == torch.uint8:
        if not (x.shape[-1] in (1, 3) and x.shape[-3] not in (1, 3)):
            x = x.movedim(-3, -1)
        return np.ascontiguousarray(x.cpu().numpy())
    x = torch.round((x.to(device="cpu", dtype=torch.float32).clamp(-1, 1) + 1) * 127.5).to(torch.uint8)
    return np.ascontiguousarray(x.movedim(-3, -1).numpy())


def image_grid(x, nrow: int = 8, padding: int = 2, pad_value: int = 255, upscale: int = 1) -> np.ndarray:
    """Tile images ``(N, C, H, W)`` in [-1, 1] (or uint8, see :func:`to_uint8`) into one uint8 picture
    ``(H', W', C)``.

    ``nrow`` images per row (as ``torchvision.utils.make_grid``), ``padding`` pixels of ``pad_value``
    between and around them, each image enlarged ``upscale`` times (nearest; for 8x8 digits).
    """
    nrow = _check_positive_int(nrow, "nrow", allow_none=False)
    upscale = _check_positive_int(upscale, "upscale", allow_none=False)
    if isinstance(padding, bool) or not isinstance(padding, int) or padding < 0:
        raise ValueError(f"padding must be a nonnegative int, got {padding!r}")
    imgs = to_uint8(x)
    if imgs.ndim == 3:
        imgs = imgs[None]
    if upscale > 1:
        imgs = imgs.repeat(upscale, axis=1).repeat(upscale, axis=2)
    n, h, w, c = imgs.shape
    cols = min(nrow, max(n, 1))
    rows = math.ceil(n / cols) if n else 1
    grid = np.full((rows * (h + padding) + padding, cols * (w + padding) + padding, c), pad_value, np.uint8)
    for i in range(n):
        r, col = divmod(i, cols)
        y0, x0 = padding + r * (h + padding), padding + col * (w + padding)
        grid[y0:y0 + h, x0:x0 + w] = imgs[i]
    return grid


def save_image_grid(x, path: Union[str, Path], nrow: int = 8, **kwargs) -> Path:
    """Save :func:`image_grid` of ``x (N, C, H, W)`` as a PNG (grey ``"L"`` or ``"RGB"``) at ``path``,
    whatever its extension; returns the path. ``kwargs`` go to :func:`image_grid`."""
    from PIL import Image

    grid = image_grid(x, nrow, **kwargs)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    img = Image.fromarray(grid[..., 0] if grid.shape[-1] == 1 else grid)
    img.save(path, format="PNG")
    return path
