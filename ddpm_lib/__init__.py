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
