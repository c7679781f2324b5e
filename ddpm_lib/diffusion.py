"""The Gaussian diffusion of Ho et al. (2020): forward process, posterior, reverse process, losses
and the variational bound.

Conventions (the book explains them in the notation table):

* Timesteps are 0-based: code index ``t`` in ``0..T-1`` is the paper's ``t+1`` in ``1..T``. So
  ``alphas_cumprod[t]`` is the paper's :math:`\\bar\\alpha_{t+1}`, ``q_sample(x0, t)`` draws the
  paper's :math:`x_{t+1}`, and the decoder :math:`p(x_0 \\mid x_1)` is the step at code ``t = 0``.
* Tensors ``x0``, ``x_t``, ``noise`` have shape ``(B, *)`` (images ``(B, C, H, W)``, 2-D points
  ``(B, 2)``); ``t`` is an integer tensor of shape ``(B,)``.
* Models are called as ``model(x_t, t, **model_kwargs)`` (class labels travel as ``y=...``) and
  return a tensor shaped like ``x_t`` (twice the channels with ``var_type="learned_range"``).
* All schedule coefficients are computed once from the betas in float64 and cast to the data's
  dtype only when used.
"""
from __future__ import annotations

import enum
import math
from typing import Any, Dict, Optional

import numpy as np
import torch

from .losses import discretized_gaussian_log_likelihood, gaussian_log_likelihood, mean_flat, normal_kl
from .schedules import BetasLike, as_betas

__all__ = ["MeanType", "VarType", "LossType", "GaussianDiffusion"]


class _Choice(str, enum.Enum):
    """A closed set of options that also accepts its string value."""

    @classmethod
    def parse(cls, value, argument: str):
        if isinstance(value, cls):
            return value
        if isinstance(value, str):
            for member in cls:
                if member.value == value.lower():
                    return member
        choices = ", ".join(repr(m.value) for m in cls)
        raise ValueError(f"unknown {argument} {value!r}; choose one of {choices}")


class MeanType(_Choice):
    """What the network predicts."""

    EPS = "eps"  # the noise epsilon (the paper)
    X0 = "x0"  # the clean data x_0
    V = "v"  # v = sqrt(abar) eps - sqrt(1 - abar) x_0 (Salimans & Ho 2022)


class VarType(_Choice):
    """The variance sigma_t^2 of the reverse step p(x_{t-1} | x_t)."""

    FIXED_LARGE = "fixed_large"  # beta_t, first entry replaced by beta-tilde_1 (the paper's code)
    FIXED_SMALL = "fixed_small"  # beta-tilde_t, the posterior variance
    LEARNED_RANGE = "learned_range"  # log-interpolation between the two (Improved DDPM)


class LossType(_Choice):
    """The training objective."""

    SIMPLE = "simple"  # L_simple: MSE on the predicted quantity (eps, x0 or v)
    VLB = "vlb"  # the true variational bound, T * L_t in bits/dim (an unbiased estimate of the sum)
    HYBRID = "hybrid"  # L_simple + vlb_weight * L_vlb, the bound training only the variance


class GaussianDiffusion:
    """The diffusion process of the paper, with its options as named choices.

    Args:
        betas: a schedule name (``"linear"``, ``"cosine"``, ...) with ``num_timesteps``, or explicit
            betas of shape ``(T,)`` in (0, 1).
        mean_type: ``"eps"`` (default, the paper), ``"x0"`` or ``"v"``.
        var_type: ``"fixed_large"`` (default, the paper's code), ``"fixed_small"`` or
            ``"learned_range"``.
        loss_type: ``"simple"`` (default, the paper's L_simple), ``"vlb"`` or ``"hybrid"``.
        num_timesteps: T when ``betas`` is a name (default 1000).
        vlb_weight: weight of the bound in the hybrid loss (Improved DDPM's lambda = 0.001).
        decoder: ``"discretized"`` (default, the paper's decoder for 8-bit images in [-1, 1]) or
            ``"gaussian"`` (a continuous Gaussian density, for data that were never discretized, such
            as 2-D points; then the bound is a bound on a density and can be negative).

    Public float64 tensors of shape ``(T,)``: ``betas, alphas, alphas_cumprod,
    alphas_cumprod_prev, alphas_cumprod_next, sqrt_alphas_cumprod, sqrt_one_minus_alphas_cumprod,
    posterior_variance, posterior_log_variance_clipped, posterior_mean_coef1,
    posterior_mean_coef2``.
    """

    def __init__(
        self,
        betas: BetasLike = "linear",
        mean_type: str | MeanType = "eps",
        var_type: str | VarType = "fixed_large",
        loss_type: str | LossType = "simple",
        *,
        num_timesteps: Optional[int] = None,
        vlb_weight: float = 0.001,
        decoder: str = "discretized",
    ):
        self.mean_type = MeanType.parse(mean_type, "mean_type")
        self.var_type = VarType.parse(var_type, "var_type")
        self.loss_type = LossType.parse(loss_type, "loss_type")
        if decoder not in ("discretized", "gaussian"):
            raise ValueError(f"unknown decoder {decoder!r}; choose 'discretized' or 'gaussian'")
        if self.loss_type is LossType.HYBRID and self.var_type is not VarType.LEARNED_RANGE:
            raise ValueError(
                "loss_type='hybrid' uses the bound to train the variance only; it needs "
                "var_type='learned_range' (use loss_type='vlb' to train a fixed-variance model on the bound)"
            )
        if num_timesteps is not None and (isinstance(num_timesteps, bool) or not isinstance(num_timesteps, int)):
            raise TypeError(f"num_timesteps must be an int, got {type(num_timesteps).__name__}")
        if num_timesteps is not None and num_timesteps < 1:
            raise ValueError(f"num_timesteps must be at least 1, got {num_timesteps}")
        self.vlb_weight = float(vlb_weight)
        self.decoder = decoder

        betas = as_betas(betas, num_timesteps)
        self.num_timesteps = T = int(betas.shape[0])

        # ---- coefficients, float64 (book: eq-alpha-bar, eq-posterior-mean, eq-posterior-variance)
        b = betas.numpy()
        alphas = 1.0 - b
        ab = np.cumprod(alphas)
        ab_prev = np.append(1.0, ab[:-1])
        ab_next = np.append(ab[1:], 0.0)
        post_var = b * (1.0 - ab_prev) / (1.0 - ab)
        # beta-tilde at code t = 0 is 0; the log is clipped to its value at t = 1 (as the paper's code)
        post_logvar_clipped = np.log(np.append(post_var[1], post_var[1:])) if T > 1 else np.log(b)

        def f64(a) -> torch.Tensor:
            return torch.as_tensor(np.asarray(a, dtype=np.float64))

        self.betas = f64(b)
        self.alphas = f64(alphas)
        self.alphas_cumprod = f64(ab)
        self.alphas_cumprod_prev = f64(ab_prev)
        self.alphas_cumprod_next = f64(ab_next)
        self.sqrt_alphas_cumprod = f64(np.sqrt(ab))
        self.sqrt_one_minus_alphas_cumprod = f64(np.sqrt(1.0 - ab))
        self.log_one_minus_alphas_cumprod = f64(np.log(1.0 - ab))
        self.sqrt_recip_alphas_cumprod = f64(np.sqrt(1.0 / ab))
        self.sqrt_recipm1_alphas_cumprod = f64(np.sqrt(1.0 / ab - 1.0))
        self.posterior_variance = f64(post_var)
        self.posterior_log_variance_clipped = f64(post_logvar_clipped)
        self.posterior_mean_coef1 = f64(b * np.sqrt(ab_prev) / (1.0 - ab))
        self.posterior_mean_coef2 = f64((1.0 - ab_prev) * np.sqrt(alphas) / (1.0 - ab))
        # Fixed reverse variances (eq-reverse-variance). "fixed_large" is beta_t with its first entry
        # replaced by beta-tilde of code t = 1, as in the paper's code, for a better decoder NLL.
        if T > 1:
            large = np.append(post_var[1], b[1:])
        else:
            large = b.copy()
        self.fixed_large_variance = f64(large)
        self.fixed_large_log_variance = f64(np.log(large))
        self._cache: Dict[tuple, torch.Tensor] = {}
        self._last_checked: Optional[tuple] = None

    # ------------------------------------------------------------------ helpers
    def __repr__(self) -> str:
        return (
            f"GaussianDiffusion(T={self.num_timesteps}, mean_type={self.mean_type.value!r}, "
            f"var_type={self.var_type.value!r}, loss_type={self.loss_type.value!r}, decoder={self.decoder!r})"
        )

    def _coef(self, name: str, device: torch.device) -> torch.Tensor:
        """A schedule tensor on ``device``, kept float64 where the device supports it."""
        key = (name, str(device))
        out = self._cache.get(key)
        if out is None:
            src = getattr(self, name)
            dtype = torch.float32 if device.type == "mps" else torch.float64
            out = src.to(device=device, dtype=dtype)
            self._cache[key] = out
        return out

    def _check_t(self, t: torch.Tensor, batch: int) -> None:
        if not torch.is_tensor(t):
            raise TypeError(f"t must be an integer tensor of shape (batch,), got {type(t).__name__}")
        if t.dtype.is_floating_point or t.dtype == torch.bool or t.dtype.is_complex:
            raise TypeError(f"t must be an integer tensor, got dtype {t.dtype}")
        if t.shape != (batch,):
            raise ValueError(f"t must have shape ({batch},) to match the batch, got {tuple(t.shape)}")
        # Reading values forces a host sync on a GPU: check only CPU tensors (an out-of-range index
        # on a GPU still fails, inside the indexing kernel). A sampler step calls this about ten
        # times with the same t, so the last tensor checked (and not modified since) is remembered.
        if t.device.type == "cpu" and batch > 0:
            if self._last_checked is not None and self._last_checked[0] is t and self._last_checked[1] == t._version:
                return
            lo, hi = int(t.min()), int(t.max())
            if lo < 0 or hi >= self.num_timesteps:
                raise ValueError(
                    f"t must lie in 0..{self.num_timesteps - 1} (0-based timesteps), got values in {lo}..{hi}"
                )
            self._last_checked = (t, t._version)

    def _extract(self, name: str, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """``coef[t]`` reshaped to broadcast against ``x`` of shape ``(B, *)``, in x's dtype."""
        self._check_t(t, x.shape[0])
        coef = self._coef(name, x.device)[t.to(x.device)]
        return coef.to(x.dtype).reshape(x.shape[0], *([1] * (x.ndim - 1)))

    @staticmethod
    def _same_shape(a: torch.Tensor, b: torch.Tensor, na: str, nb: str) -> None:
        if a.shape != b.shape:
            raise ValueError(f"{na} and {nb} must have the same shape, got {tuple(a.shape)} and {tuple(b.shape)}")

    # ------------------------------------------------------------------ forward process
    def q_step(self, x_prev: torch.Tensor, t: torch.Tensor, noise: Optional[torch.Tensor] = None) -> torch.Tensor:
        """One forward step, x_{t} ~ q(x_t | x_{t-1}) (book ``eq-forward-step``).

        ``x_t = sqrt(1 - beta_t) x_{t-1} + sqrt(beta_t) noise`` with code index ``t`` (so ``t = 0``
        takes x_0 to the paper's x_1). Shapes: ``x_prev, noise (B, *)``, ``t (B,)`` -> ``(B, *)``.
        """
        if noise is None:
            noise = torch.randn_like(x_prev)
        self._same_shape(x_prev, noise, "x_prev", "noise")
        beta = self._extract("betas", t, x_prev)
        return torch.sqrt(1.0 - beta) * x_prev + torch.sqrt(beta) * noise

    def q_mean_variance(self, x0: torch.Tensor, t: torch.Tensor):
        """Mean, variance and log-variance of q(x_t | x_0) (book ``eq-q-closed-form``).

        Shapes: ``x0 (B, *)``, ``t (B,)`` -> mean ``(B, *)``, variance and log-variance ``(B, 1..)``.
        """
        mean = self._extract("sqrt_alphas_cumprod", t, x0) * x0
        var = 1.0 - self._extract("alphas_cumprod", t, x0)
        logvar = self._extract("log_one_minus_alphas_cumprod", t, x0)
        return mean, var, logvar

    def q_sample(self, x0: torch.Tensor, t: torch.Tensor, noise: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Draw x_t ~ q(x_t | x_0) in one step (book ``eq-q-sample``).

        ``x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) noise``. Shapes: ``x0, noise (B, *)``,
        ``t (B,)`` -> ``(B, *)``.
        """
        if noise is None:
            noise = torch.randn_like(x0)
        self._same_shape(x0, noise, "x0", "noise")
        return (
            self._extract("sqrt_alphas_cumprod", t, x0) * x0
            + self._extract("sqrt_one_minus_alphas_cumprod", t, x0) * noise
        )

    def q_posterior_mean_variance(self, x0: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor):
        """Mean, variance and log-variance (clipped) of the posterior q(x_{t-1} | x_t, x_0).

        Book equations ``eq-posterior-mean`` and ``eq-posterior-variance``:
        ``mu~ = coef1 * x_0 + coef2 * x_t`` with ``coef1 = beta_t sqrt(abar_{t-1}) / (1 - abar_t)``,
        ``coef2 = (1 - abar_{t-1}) sqrt(alpha_t) / (1 - abar_t)`` and
        ``beta~_t = beta_t (1 - abar_{t-1}) / (1 - abar_t)``.
        Shapes: ``x0, x_t (B, *)``, ``t (B,)`` -> mean ``(B, *)``, variance and log-variance
        broadcastable ``(B, 1, ...)``.
        """
        self._same_shape(x0, x_t, "x0", "x_t")
        mean = self._extract("posterior_mean_coef1", t, x_t) * x0 + self._extract("posterior_mean_coef2", t, x_t) * x_t
        var = self._extract("posterior_variance", t, x_t)
        logvar = self._extract("posterior_log_variance_clipped", t, x_t)
        return mean, var, logvar

    # ------------------------------------------------------------------ parameterisations
    def predict_start_from_noise(self, x_t: torch.Tensor, t: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        """x_0 from x_t and eps (book ``eq-x0-from-eps``): ``(x_t - sqrt(1-abar) eps) / sqrt(abar)``."""
        self._same_shape(x_t, eps, "x_t", "eps")
        return self._extract("sqrt_recip_alphas_cumprod", t, x_t) * x_t - self._extract(
            "sqrt_recipm1_alphas_cumprod", t, x_t
        ) * eps

    def predict_noise_from_start(self, x_t: torch.Tensor, t: torch.Tensor, x0: torch.Tensor) -> torch.Tensor:
        """eps from x_t and x_0: ``(x_t - sqrt(abar) x_0) / sqrt(1 - abar)``."""
        self._same_shape(x_t, x0, "x_t", "x0")
        return (self._extract("sqrt_recip_alphas_cumprod", t, x_t) * x_t - x0) / self._extract(
            "sqrt_recipm1_alphas_cumprod", t, x_t
        )

    def get_v(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The v target (book ``eq-v``): ``sqrt(abar) eps - sqrt(1 - abar) x_0``."""
        self._same_shape(x0, noise, "x0", "noise")
        return self._extract("sqrt_alphas_cumprod", t, x0) * noise - self._extract(
            "sqrt_one_minus_alphas_cumprod", t, x0
        ) * x0

    def predict_start_from_v(self, x_t: torch.Tensor, t: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """x_0 from x_t and v: ``sqrt(abar) x_t - sqrt(1 - abar) v``."""
        self._same_shape(x_t, v, "x_t", "v")
        return self._extract("sqrt_alphas_cumprod", t, x_t) * x_t - self._extract(
            "sqrt_one_minus_alphas_cumprod", t, x_t
        ) * v

    def predict_noise_from_v(self, x_t: torch.Tensor, t: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """eps from x_t and v: ``sqrt(1 - abar) x_t + sqrt(abar) v``."""
        self._same_shape(x_t, v, "x_t", "v")
        return self._extract("sqrt_one_minus_alphas_cumprod", t, x_t) * x_t + self._extract(
            "sqrt_alphas_cumprod", t, x_t
        ) * v

    def mean_from_noise(self, x_t: torch.Tensor, t: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        """The paper's mean (book ``eq-mean-from-eps``):
        ``mu = (x_t - beta_t / sqrt(1 - abar_t) * eps) / sqrt(alpha_t)``.

        Equal to ``q_posterior_mean_variance(predict_start_from_noise(x_t, t, eps), x_t, t)[0]``
        (without clipping); the book checks the identity numerically.
        """
        self._same_shape(x_t, eps, "x_t", "eps")
        beta = self._extract("betas", t, x_t)
        return (x_t - beta / self._extract("sqrt_one_minus_alphas_cumprod", t, x_t) * eps) / torch.sqrt(
            self._extract("alphas", t, x_t)
        )

    def target(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """What the network is trained to output under ``mean_type`` (eps, x0 or v)."""
        if self.mean_type is MeanType.EPS:
            return noise
        if self.mean_type is MeanType.X0:
            return x0
        return self.get_v(x0, noise, t)

    # ------------------------------------------------------------------ reverse process
    def _model_variance(self, var_output: Optional[torch.Tensor], x_t: torch.Tensor, t: torch.Tensor):
        if self.var_type is VarType.LEARNED_RANGE:
            # Improved DDPM: v in [-1, 1] interpolates log sigma^2 between log beta~ and log beta.
            min_log = self._extract("posterior_log_variance_clipped", t, x_t)
            max_log = torch.log(self._extract("betas", t, x_t))
            frac = (var_output + 1.0) / 2.0
            logvar = frac * max_log + (1.0 - frac) * min_log
            return torch.exp(logvar), logvar
        if self.var_type is VarType.FIXED_LARGE:
            var, logvar = self._extract("fixed_large_variance", t, x_t), self._extract("fixed_large_log_variance", t, x_t)
        else:
            var, logvar = self._extract("posterior_variance", t, x_t), self._extract("posterior_log_variance_clipped", t, x_t)
        return var.expand_as(x_t), logvar.expand_as(x_t)

    def split_model_output(self, output: torch.Tensor, x_t: torch.Tensor):
        """Split a network output into (mean part, variance part or None), checking its shape."""
        if self.var_type is VarType.LEARNED_RANGE:
            expected = (x_t.shape[0], 2 * x_t.shape[1], *x_t.shape[2:])
            if output.shape != expected:
                raise ValueError(
                    f"with var_type='learned_range' the model must return shape {expected} "
                    f"(twice the channels of x_t), got {tuple(output.shape)}"
                )
            return output[:, : x_t.shape[1]], output[:, x_t.shape[1] :]
        if output.shape != x_t.shape:
            raise ValueError(f"the model must return the shape of x_t {tuple(x_t.shape)}, got {tuple(output.shape)}")
        return output, None

    def p_mean_variance(
        self,
        model,
        x_t: torch.Tensor,
        t: torch.Tensor,
        clip_denoised: bool = True,
        model_kwargs: Optional[Dict[str, Any]] = None,
        model_output: Optional[torch.Tensor] = None,
    ) -> Dict[str, torch.Tensor]:
        """The reverse step p(x_{t-1} | x_t) (book ``eq-reverse-step``).

        The network's output is turned into a prediction of x_0 (clipped to [-1, 1] when
        ``clip_denoised``), and the mean is the posterior mean ``mu~(x0_pred, x_t)``; with eps
        prediction and no clipping this is exactly the paper's ``eq-mean-from-eps``.

        Args:
            model: called as ``model(x_t, t, **model_kwargs)``; ignored when ``model_output`` is given.
            x_t: ``(B, *)``; t: ``(B,)`` integer timesteps, 0-based.
        Returns:
            dict with ``mean``, ``variance``, ``log_variance`` (each ``(B, *)``), ``pred_x0`` and
            ``pred_eps`` (``(B, *)``), and ``model_output``.
        """
        if model_output is None:
            model_output = model(x_t, t, **(model_kwargs or {}))
        out, var_out = self.split_model_output(model_output, x_t)
        out = out.to(x_t.dtype)
        if var_out is not None:
            var_out = var_out.to(x_t.dtype)
        variance, log_variance = self._model_variance(var_out, x_t, t)

        if self.mean_type is MeanType.EPS:
            pred_x0 = self.predict_start_from_noise(x_t, t, out)
        elif self.mean_type is MeanType.X0:
            pred_x0 = out
        else:
            pred_x0 = self.predict_start_from_v(x_t, t, out)
        if clip_denoised:
            pred_x0 = pred_x0.clamp(-1.0, 1.0)
        if self.mean_type is MeanType.EPS and not clip_denoised:
            pred_eps = out
        else:
            pred_eps = self.predict_noise_from_start(x_t, t, pred_x0)
        mean, _, _ = self.q_posterior_mean_variance(pred_x0, x_t, t)
        return {
            "mean": mean,
            "variance": variance,
            "log_variance": log_variance,
            "pred_x0": pred_x0,
            "pred_eps": pred_eps,
            "model_output": model_output,
        }

    def p_sample(
        self,
        model,
        x_t: torch.Tensor,
        t: torch.Tensor,
        clip_denoised: bool = True,
        model_kwargs: Optional[Dict[str, Any]] = None,
        noise: Optional[torch.Tensor] = None,
    ) -> Dict[str, torch.Tensor]:
        """One step of Algorithm 2: ``x_{t-1} = mean + sigma_t z``, with z = 0 at code t = 0.

        Returns the dict of :meth:`p_mean_variance` plus ``sample`` (``(B, *)``).
        """
        out = self.p_mean_variance(model, x_t, t, clip_denoised=clip_denoised, model_kwargs=model_kwargs)
        if noise is None:
            noise = torch.randn_like(x_t)
        nonzero = (t != 0).to(x_t.dtype).reshape(-1, *([1] * (x_t.ndim - 1)))
        out["sample"] = out["mean"] + nonzero * torch.exp(0.5 * out["log_variance"]) * noise
        return out

    # ------------------------------------------------------------------ the bound
    def _decoder_nll(self, x0: torch.Tensor, mean: torch.Tensor, log_variance: torch.Tensor) -> torch.Tensor:
        if self.decoder == "discretized":
            return -discretized_gaussian_log_likelihood(x0, means=mean, log_scales=0.5 * log_variance)
        return -gaussian_log_likelihood(x0, mean, log_variance)

    def vb_terms_bpd(
        self,
        model,
        x0: torch.Tensor,
        x_t: torch.Tensor,
        t: torch.Tensor,
        clip_denoised: bool = True,
        model_kwargs: Optional[Dict[str, Any]] = None,
        model_output: Optional[torch.Tensor] = None,
    ) -> Dict[str, torch.Tensor]:
        """One term of the bound per example, in bits per dimension (book ``eq-vlb-terms``).

        For code t > 0 it is ``L_{t} = KL(q(x_{t-1} | x_t, x_0) || p(x_{t-1} | x_t))`` (the paper's
        L_{t-1} for its t = code t + 1); for code t = 0 it is the decoder term
        ``L_0 = -log p(x_0 | x_1)``. Returns ``output`` of shape ``(B,)`` and ``pred_x0``.
        """
        true_mean, _, true_logvar = self.q_posterior_mean_variance(x0, x_t, t)
        out = self.p_mean_variance(
            model, x_t, t, clip_denoised=clip_denoised, model_kwargs=model_kwargs, model_output=model_output
        )
        kl = mean_flat(normal_kl(true_mean, true_logvar, out["mean"], out["log_variance"])) / math.log(2.0)
        nll = mean_flat(self._decoder_nll(x0, out["mean"], out["log_variance"])) / math.log(2.0)
        return {"output": torch.where(t == 0, nll, kl), "pred_x0": out["pred_x0"]}

    def prior_bpd(self, x0: torch.Tensor) -> torch.Tensor:
        """``L_T = KL(q(x_T | x_0) || N(0, I))`` per example in bits/dim (book ``eq-prior-term``)."""
        T = self.num_timesteps
        t = torch.full((x0.shape[0],), T - 1, dtype=torch.long, device=x0.device)
        mean, _, logvar = self.q_mean_variance(x0, t)
        return mean_flat(normal_kl(mean, logvar, torch.zeros_like(mean), 0.0)) / math.log(2.0)

    def training_losses(
        self,
        model,
        x0: torch.Tensor,
        t: Optional[torch.Tensor] = None,
        noise: Optional[torch.Tensor] = None,
        model_kwargs: Optional[Dict[str, Any]] = None,
        generator: Optional[torch.Generator] = None,
    ) -> Dict[str, torch.Tensor]:
        """Per-example training loss (Algorithm 1) and its parts.

        ``simple``: ``mse = mean over dims of (target - prediction)^2`` with the target of
        ``mean_type`` (book ``eq-l-simple``). ``vlb``: ``T * L_t`` in bits/dim, an unbiased estimate
        of the bound's sum over t (book ``eq-vlb``). ``hybrid``: ``mse + vlb_weight * T * L_t`` with
        the mean detached inside the bound, so that the bound trains only the variance.

        Args:
            x0: data ``(B, *)`` in [-1, 1]; t: ``(B,)`` timesteps (uniform over 0..T-1 when None);
            noise: ``(B, *)`` (standard normal when None); generator: for t and noise.
        Returns:
            dict of ``(B,)`` tensors: ``loss`` and, where computed, ``mse`` and ``vb``; plus ``t``.
        """
        B = x0.shape[0]
        if t is None:
            gen_device = generator.device if generator is not None else x0.device
            t = torch.randint(0, self.num_timesteps, (B,), device=gen_device, generator=generator).to(x0.device)
        if noise is None:
            if generator is not None:
                noise = torch.randn(x0.shape, generator=generator, device=generator.device, dtype=x0.dtype).to(x0.device)
            else:
                noise = torch.randn_like(x0)
        self._same_shape(x0, noise, "x0", "noise")
        x_t = self.q_sample(x0, t, noise)
        model_output = model(x_t, t, **(model_kwargs or {}))
        terms: Dict[str, torch.Tensor] = {"t": t}

        if self.loss_type is LossType.VLB:
            vb = self.vb_terms_bpd(model, x0, x_t, t, clip_denoised=False, model_output=model_output)["output"]
            terms["vb"] = vb
            terms["loss"] = vb * self.num_timesteps
            return terms

        pred, var_out = self.split_model_output(model_output, x_t)
        target = self.target(x0, noise, t)
        dtype = torch.promote_types(pred.dtype, torch.float32)  # float32 under bf16, float64 kept
        terms["mse"] = mean_flat((target.to(dtype) - pred.to(dtype)) ** 2)
        if self.loss_type is LossType.HYBRID:
            frozen = torch.cat([pred.detach(), var_out], dim=1)
            vb = self.vb_terms_bpd(model, x0, x_t, t, clip_denoised=False, model_output=frozen)["output"]
            terms["vb"] = vb
            terms["loss"] = terms["mse"] + self.vlb_weight * self.num_timesteps * vb
        else:
            terms["loss"] = terms["mse"]
        return terms

    @torch.no_grad()
    def calc_bpd_loop(
        self,
        model,
        x0: torch.Tensor,
        clip_denoised: bool = True,
        model_kwargs: Optional[Dict[str, Any]] = None,
        generator: Optional[torch.Generator] = None,
        progress: bool = False,
    ) -> Dict[str, torch.Tensor]:
        """The whole variational bound per example, in bits/dim, with every term (book ``eq-vlb``).

        ``total_bpd = prior_bpd + sum_t vb[:, t]``, where ``vb[:, 0]`` is the decoder NLL
        ``-log p(x_0 | x_1)`` (discretized for 8-bit data) and ``vb[:, t]`` for t >= 1 is the KL of
        step t. One network call per timestep, each with fresh noise.

        Returns:
            dict: ``total_bpd (B,)``, ``prior_bpd (B,)``, ``vb (B, T)``, ``xstart_mse (B, T)``,
            ``mse (B, T)`` (the eps error at each t).
        """
        from tqdm.auto import tqdm

        B, T = x0.shape[0], self.num_timesteps
        vb, xstart_mse, mse = [], [], []
        for step in tqdm(list(range(T))[::-1], disable=not progress, desc="bound"):
            t = torch.full((B,), step, dtype=torch.long, device=x0.device)
            if generator is not None:
                noise = torch.randn(x0.shape, generator=generator, device=generator.device, dtype=x0.dtype).to(x0.device)
            else:
                noise = torch.randn_like(x0)
            x_t = self.q_sample(x0, t, noise)
            out = self.vb_terms_bpd(model, x0, x_t, t, clip_denoised=clip_denoised, model_kwargs=model_kwargs)
            vb.append(out["output"])
            xstart_mse.append(mean_flat((out["pred_x0"] - x0) ** 2))
            eps = self.predict_noise_from_start(x_t, t, out["pred_x0"])
            mse.append(mean_flat((eps - noise) ** 2))
        vb_t = torch.stack(vb[::-1], dim=1)
        prior = self.prior_bpd(x0)
        return {
            "total_bpd": vb_t.sum(dim=1) + prior,
            "prior_bpd": prior,
            "vb": vb_t,
            "xstart_mse": torch.stack(xstart_mse[::-1], dim=1),
            "mse": torch.stack(mse[::-1], dim=1),
        }
