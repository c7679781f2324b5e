"""The trained checkpoint that ships with ddpm_lib, so that readers see a trained model's samples
without training one (the book's chapters load it when they do not train).

The file lives inside the package (``ddpm_lib/pretrained/``), so it is there after
``pip install`` on Colab as well as in a clone of the repository. Its model card
(``ddpm_lib/pretrained/MODEL_CARD.md``) gives the exact command, steps, time and hardware.
"""
from __future__ import annotations

from pathlib import Path
from typing import Dict

__all__ = ["PRETRAINED", "pretrained_path", "load_pretrained", "model_card"]

_DIR = Path(__file__).resolve().parent / "pretrained"

#: Shipped checkpoints: name -> file name inside ``ddpm_lib/pretrained``.
PRETRAINED: Dict[str, str] = {
    "fashion-mnist": "fashion_mnist_small.pt",
}


def pretrained_path(name: str = "fashion-mnist") -> Path:
    """Path of a shipped checkpoint. Raises ``ValueError`` for an unknown name and
    ``FileNotFoundError`` when the file is missing from this installation."""
    if name not in PRETRAINED:
        raise ValueError(f"unknown pretrained model {name!r}; choose one of {sorted(PRETRAINED)}")
    path = _DIR / PRETRAINED[name]
    if not path.is_file():
        raise FileNotFoundError(
            f"the shipped checkpoint {path.name} is missing from this installation of ddpm_lib "
            f"(expected at {path}); reinstall the package, or train one with `python -m ddpm_lib train`"
        )
    return path


def load_pretrained(name: str = "fashion-mnist", map_location="cpu"):
    """``(model with EMA weights, diffusion, config)`` of a shipped checkpoint, ready to sample.

    Example::

        model, diffusion, config = ddpm_lib.load_pretrained("fashion-mnist")
        x = ddpm_lib.ddim_sample(model, diffusion, (16, 1, 32, 32), steps=50)
    """
    from .trainer import load_checkpoint

    return load_checkpoint(pretrained_path(name), map_location=map_location)


def model_card() -> str:
    """The text of the shipped model card."""
    return (_DIR / "MODEL_CARD.md").read_text()
