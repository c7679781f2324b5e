"""ddpm_lib: Denoising Diffusion Probabilistic Models (Ho, Jain & Abbeel 2020) in PyTorch.

The library behind the interactive DDPM book. The paper's settings are the defaults; every
departure is a named option. Timesteps are 0-based in code (0..T-1 is the paper's 1..T).

The paper: ``schedules`` (betas), ``diffusion`` (GaussianDiffusion: forward process, posterior,
reverse step, losses, the bound in bits/dim), ``samplers`` (DDPM, DDIM), ``unet`` (the network),
``data``, ``trainer``, ``metrics``, ``pretrained`` (the shipped checkpoint), ``cli``.
The follow-ups of chapter 11: ``respacing``, ``guidance``, ``autoencoder``, ``sde``, ``flow``, ``dit``.
Support: ``config`` (quick mode), ``nn``, ``toy``, ``distances``, ``losses``, ``ema``, ``accel``
(the GPU fast path), ``web`` (figures that run in the static web book).
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
from .ema import EMA, ema_decay_at, ema_init_weight
from .metrics import BPDResult, FDResult, FIDUnavailableError, bits_per_dim, fd_fashion, fid
from .trainer import (
    CheckpointError,
    NonFiniteLossError,
    TrainConfig,
    TrainingOutOfMemoryError,
    Trainer,
    export_checkpoint,
    load_checkpoint,
    train,
)
from .pretrained import load_pretrained, pretrained_path
# chapter 11
from .respacing import RespacedModel, respace, space_timesteps
from .guidance import ClassifierGuidedModel, NoisyClassifier, classifier_guided_eps
from .autoencoder import Autoencoder, train_autoencoder
from .sde import VPSDE, ConsistencyModel, dopri5, ode_log_likelihood, score_from_eps
from .flow import RectifiedFlow
from .dit import DiT
# the static web book
from . import web
from .web import chain_scrubber, schedule_explorer

__version__ = "0.1.0"

__all__ = [
    # the paper
    "GaussianDiffusion", "LossType", "MeanType", "VarType", "make_beta_schedule",
    "ddpm_sample", "ddim_sample", "ddim_timesteps", "ddim_invert",
    "UNet", "ToyMLP", "timestep_embedding", "normal_kl", "discretized_gaussian_log_likelihood",
    # data
    "DatasetUnavailableError", "GaussianMixture2D", "ImageData", "available_datasets", "image_grid",
    "load_dataset", "load_digits", "make_loader", "random_hflip", "save_image_grid", "to_uint8",
    "toy_data", "toy_mixture",
    # training, checkpoints and metrics
    "EMA", "ema_decay_at", "ema_init_weight", "TrainConfig", "Trainer", "train", "CheckpointError",
    "NonFiniteLossError", "TrainingOutOfMemoryError",
    "export_checkpoint", "load_checkpoint", "load_pretrained", "pretrained_path",
    "BPDResult", "FDResult", "FIDUnavailableError", "bits_per_dim", "fd_fashion", "fid",
    "energy_distance", "frechet_distance", "mmd_rbf",
    # chapter 11
    "RespacedModel", "respace", "space_timesteps",
    "ClassifierGuidedModel", "NoisyClassifier", "classifier_guided_eps",
    "Autoencoder", "train_autoencoder",
    "VPSDE", "ConsistencyModel", "dopri5", "ode_log_likelihood", "score_from_eps",
    "RectifiedFlow", "DiT",
    # settings and the web book
    "choose", "default_device", "quick_mode", "web", "chain_scrubber", "schedule_explorer",
]
