"""Run-time settings shared by the library and the book: quick mode and the device.

Quick mode is the one switch that makes every notebook of the book CPU-sized (small models, few
steps, little data). The environment variable ``DDPM_BOOK_QUICK`` sets it (``1`` or ``0``); when it
is unset, quick mode is on exactly when no CUDA device is present. Notebooks never test the variable
themselves: they call :func:`quick_mode` or :func:`choose`.
"""
from __future__ import annotations

import os
from typing import TypeVar

import torch

__all__ = ["QUICK_ENV_VAR", "quick_mode", "choose", "default_device"]

QUICK_ENV_VAR = "DDPM_BOOK_QUICK"

T = TypeVar("T")

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


def quick_mode() -> bool:
    """Whether the book runs at CPU size.

    ``DDPM_BOOK_QUICK=1`` forces quick mode, ``DDPM_BOOK_QUICK=0`` forces full size; unset (or
    empty), quick mode is on exactly when ``torch.cuda.is_available()`` is false.
    """
    value = os.environ.get(QUICK_ENV_VAR, "").strip().lower()
    if value == "":
        return not torch.cuda.is_available()
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise ValueError(
        f"{QUICK_ENV_VAR} must be 1 or 0 (or unset to decide by the presence of a GPU), got {value!r}"
    )


def choose(quick: T, full: T) -> T:
    """Return ``quick`` in quick mode and ``full`` otherwise.

    Example: ``steps = choose(quick=300, full=20_000)``.
    """
    return quick if quick_mode() else full


def default_device() -> torch.device:
    """CUDA when available, else Apple's MPS when available, else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda")
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")
