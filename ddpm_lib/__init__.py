"""ddpm_lib: Denoising Diffusion Probabilistic Models (Ho, Jain & Abbeel 2020) in PyTorch.

The library behind the interactive DDPM book. The paper's settings are the defaults; every
departure is a named option. Timesteps are 0-based in code (0..T-1 is the paper's 1..T).
"""
from .config import choose, default_device, quick_mode
from .data import (
    DatasetUnavailableError,
    GaussianMixture2D,
    ImageData,
    available_datasets,
    image_grid,
    load_dataset,
    load_digits,
    make_loader,
    random_hflip,
    save_image_grid,
    to_uint8,
    toy_data,
    toy_mixture,
)
from .diffusion import GaussianDiffusion, LossType, MeanType, VarType
from .distances import energy_distance, frechet_distance, mmd_rbf
from .losses import discretized_gaussian_log_likelihood, normal_kl
from .nn import timestep_embedding
from .samplers import ddim_invert, ddim_sample, ddim_timesteps, ddpm_sample
from .schedules import make_beta_schedule
from .toy import ToyMLP
from .unet import UNet

from .ema import EMA
from .metrics import BPDResult, FDResult, FIDUnavailableError, bits_per_dim, fd_fashion, fid
from .trainer import (CheckpointError, NonFiniteLossError, TrainConfig, Trainer, export_checkpoint,
                      load_checkpoint, train)
from .flow import RectifiedFlow
from .sde import ConsistencyModel, VPSDE, dopri5, ode_log_likelihood, score_from_eps

__version__ = "0.1.0"

__all__ = [
    "DatasetUnavailableError",
    "GaussianDiffusion",
    "GaussianMixture2D",
    "ImageData",
    "LossType",
    "MeanType",
    "ToyMLP",
    "UNet",
    "VarType",
    "available_datasets",
    "choose",
    "ddim_invert",
    "ddim_sample",
    "ddim_timesteps",
    "ddpm_sample",
    "default_device",
    "discretized_gaussian_log_likelihood",
    "energy_distance",
    "frechet_distance",
    "image_grid",
    "load_dataset",
    "load_digits",
    "make_beta_schedule",
    "make_loader",
    "mmd_rbf",
    "normal_kl",
    "quick_mode",
    "random_hflip",
    "save_image_grid",
    "timestep_embedding",
    "to_uint8",
    "toy_data",
    "toy_mixture",
]
__all__ += [
    "BPDResult", "CheckpointError", "EMA", "FDResult", "FIDUnavailableError", "NonFiniteLossError",
    "TrainConfig", "Trainer", "bits_per_dim", "export_checkpoint", "fd_fashion", "fid", "load_checkpoint", "train",
]
__all__ += ["ConsistencyModel", "RectifiedFlow", "VPSDE", "dopri5", "ode_log_likelihood", "score_from_eps"]
from .autoencoder import Autoencoder, train_autoencoder  # noqa: E402  (section 11.5)
from .dit import DiT  # noqa: E402  (section 11.9)
from .respace import RespacedModel, respace, space_timesteps  # noqa: E402  (section 11.2)
__all__ += ["Autoencoder", "DiT", "RespacedModel", "respace", "space_timesteps", "train_autoencoder"]
from .pretrained import load_pretrained, pretrained_path  # noqa: E402  (the shipped checkpoint)
__all__ += ["load_pretrained", "pretrained_path"]
from . import web  # noqa: E402  (figures for the static web book)
from .web import chain_scrubber, schedule_explorer  # noqa: E402
__all__ += ["chain_scrubber", "schedule_explorer"]
from .guidance import ClassifierGuidedModel, NoisyClassifier, classifier_guided_eps  # noqa: E402  (11.3)
__all__ += ["ClassifierGuidedModel", "NoisyClassifier", "classifier_guided_eps"]
