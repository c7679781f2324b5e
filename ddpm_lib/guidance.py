"""Guidance: steering a diffusion model towards a class label (book sections 11.3 and 11.4).

Classifier guidance (Dhariwal & Nichol 2021). A classifier ``p_phi(y | x_t, t)`` trained on noisy
images adds its gradient to the model's score. With ``score = -eps / sqrt(1 - abar_t)``
(book ``eq-eps-score``) the guided score ``score + s * grad log p_phi(y | x_t)`` becomes the guided
noise prediction (book ``eq-classifier-guidance``)

    eps_hat = eps_theta(x_t, t) - sqrt(1 - abar_t) * s * grad_x log p_phi(y | x_t, t),

which any sampler of ``ddpm_lib`` uses in place of ``eps_theta``: :class:`ClassifierGuidedModel`
wraps the model and the classifier into such a "model".

Classifier-free guidance (Ho & Salimans 2022; book ``eq-cfg``) needs no code here: a class-conditional
:class:`~ddpm_lib.UNet` or :class:`~ddpm_lib.ToyMLP` returns ``(1 + w) eps(x, y) - w eps(x, null)``
when called with ``guidance_scale=w``.

:func:`accuracy_and_diversity` gives the two measures that both sections plot against the guidance
scale. Shapes follow the library: ``x (B, C, H, W)`` (or ``(B, d)``), ``t (B,)`` 0-based integer
timesteps, ``y (B,)`` integer labels.
"""
from __future__ import annotations

from typing import Any, Dict, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import nn

from .diffusion import GaussianDiffusion, MeanType
from .nn import timestep_embedding

__all__ = [
    "NoisyClassifier",
    "classifier_loss",
    "classifier_grad",
    "classifier_guided_eps",
    "ClassifierGuidedModel",
    "accuracy_and_diversity",
]

Scale = Union[float, torch.Tensor]


class NoisyClassifier(nn.Module):
    """A small CNN ``p_phi(y | x_t, t)`` for noisy images, conditioned on the timestep.

    Each level is conv 3x3 -> GroupNorm -> + a per-channel bias from the timestep embedding -> SiLU,
    followed by 2x2 average pooling (except after the last level); then global average pooling and a
    linear head. Only smooth operations are used (no max pooling, no BatchNorm), so the input gradient
    that guidance needs is well defined and does not depend on the other images in the batch.

    Args:
        in_channels: image channels.
        num_classes: number of classes.
        ch: channels of the first level; level ``i`` has ``ch * ch_mult[i]``.
        ch_mult: channel multipliers, one level each.
        time_dim: size of the sinusoidal timestep embedding (default ``4 * ch``).
        input_pool: average-pool the input by this factor first (1: off). A cheap classifier for CPU
            demos: it sees a low-resolution view of ``x_t``, and its gradient spreads evenly over each
            ``input_pool x input_pool`` block.
        num_groups: GroupNorm groups (must divide every level's channels).

    Shapes: ``x (B, in_channels, H, W)``, ``t (B,)`` -> logits ``(B, num_classes)``.
    """

    def __init__(self, in_channels: int = 1, num_classes: int = 10, ch: int = 32,
                 ch_mult: Sequence[int] = (1, 2, 2), time_dim: Optional[int] = None, input_pool: int = 1,
                 num_groups: int = 8):
        super().__init__()
        if num_classes < 2:
            raise ValueError(f"num_classes must be at least 2, got {num_classes}")
        if input_pool < 1:
            raise ValueError(f"input_pool must be >= 1, got {input_pool}")
        widths = [ch * m for m in ch_mult]
        if any(w % num_groups for w in widths):
            raise ValueError(f"num_groups={num_groups} must divide every level's channels {widths}")
        self.in_channels, self.num_classes, self.input_pool = in_channels, num_classes, int(input_pool)
        self.time_dim = int(time_dim or 4 * ch)
        emb_dim = 4 * ch
        self.time_mlp = nn.Sequential(nn.Linear(self.time_dim, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        self.convs, self.norms, self.time_proj = nn.ModuleList(), nn.ModuleList(), nn.ModuleList()
        prev = in_channels
        for w in widths:
            self.convs.append(nn.Conv2d(prev, w, 3, padding=1))
            self.norms.append(nn.GroupNorm(num_groups, w))
            self.time_proj.append(nn.Linear(emb_dim, w))
            prev = w
        self.head = nn.Linear(prev, num_classes)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if x.ndim != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"x must have shape (batch, {self.in_channels}, H, W), got {tuple(x.shape)}")
        if not torch.is_tensor(t) or t.shape != (x.shape[0],):
            raise ValueError(f"t must be a tensor of shape ({x.shape[0]},)")
        emb = F.silu(self.time_mlp(timestep_embedding(t, self.time_dim).to(x.dtype)))
        h = F.avg_pool2d(x, self.input_pool) if self.input_pool > 1 else x
        for i, (conv, norm, proj) in enumerate(zip(self.convs, self.norms, self.time_proj)):
            h = F.silu(norm(conv(h)) + proj(emb)[:, :, None, None])
            if i < len(self.convs) - 1:
                h = F.avg_pool2d(h, 2)
        return self.head(h.mean(dim=(2, 3)))


def classifier_loss(classifier: nn.Module, diffusion: GaussianDiffusion, x0: torch.Tensor, y: torch.Tensor, *,
                    t: Optional[torch.Tensor] = None, noise: Optional[torch.Tensor] = None,
                    generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Cross-entropy of ``classifier(x_t, t)`` against ``y`` on noised data, per example ``(B,)``.

    ``x_t = q_sample(x0, t, noise)`` (book ``eq-q-sample``) with ``t`` uniform on ``0..T-1`` and
    standard normal ``noise`` when not given (drawn from ``generator``): the classifier learns
    ``p(y | x_t)`` at every noise level that the sampler visits.
    """
    B = x0.shape[0]
    if y.shape != (B,):
        raise ValueError(f"y must have shape ({B},), got {tuple(y.shape)}")
    if t is None:
        t = torch.randint(0, diffusion.num_timesteps, (B,), generator=generator,
                          device=generator.device if generator is not None else x0.device).to(x0.device)
    if noise is None:
        noise = torch.randn(x0.shape, generator=generator, dtype=x0.dtype,
                            device=generator.device if generator is not None else x0.device).to(x0.device)
    x_t = diffusion.q_sample(x0, t, noise)
    return F.cross_entropy(classifier(x_t, t), y, reduction="none")


def classifier_grad(classifier: nn.Module, x_t: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``grad_x log p_phi(y | x_t, t)`` for each example, shape of ``x_t`` (book ``eq-classifier-guidance``).

    Computed by autograd through ``log_softmax(classifier(x_t, t))[y]`` summed over the batch; each
    example's term depends only on its own ``x_t`` (the classifier must not mix the batch, e.g. no
    BatchNorm in training mode), so the sum's gradient is the per-example gradient. Works inside
    ``torch.no_grad()`` (the samplers' context).
    """
    if y.shape != (x_t.shape[0],):
        raise ValueError(f"y must have shape ({x_t.shape[0]},), got {tuple(y.shape)}")
    with torch.enable_grad():
        x = x_t.detach().requires_grad_(True)
        log_p = F.log_softmax(classifier(x, t), dim=1).gather(1, y[:, None]).sum()
        (grad,) = torch.autograd.grad(log_p, x)
    return grad


def _scale_like(scale: Scale, x: torch.Tensor) -> Any:
    if torch.is_tensor(scale) and scale.ndim == 1:
        if scale.shape[0] != x.shape[0]:
            raise ValueError(f"scale must be a float or of shape ({x.shape[0]},), got {tuple(scale.shape)}")
        return scale.to(x.device, x.dtype).reshape(-1, *([1] * (x.ndim - 1)))
    return scale


def classifier_guided_eps(model, classifier: nn.Module, diffusion: GaussianDiffusion, x: torch.Tensor,
                          t: torch.Tensor, y: torch.Tensor, scale: Scale,
                          model_kwargs: Optional[Dict[str, Any]] = None) -> torch.Tensor:
    """The classifier-guided noise prediction (book ``eq-classifier-guidance``):

    ``eps_hat = eps_theta(x_t, t) - sqrt(1 - abar_t) * scale * grad_x log p_phi(y | x_t, t)``.

    For a model that predicts x_0 or v (``diffusion.mean_type``), the output is the x_0 or v that this
    ``eps_hat`` stands for: ``x0 + sqrt(1 - abar) / sqrt(abar) * shift`` or ``v - shift / sqrt(abar)``, with
    ``shift = sqrt(1 - abar_t) * scale * grad``.

    Args:
        model: the network (``eps_theta``, or x_0 or v as ``diffusion.mean_type`` says), called as
            ``model(x, t, **model_kwargs)`` (unconditional or not).
        classifier: ``classifier(x_t, t) -> logits (B, K)``, e.g. a trained :class:`NoisyClassifier`.
        x, t, y: ``x_t (B, C, ...)``, timesteps ``(B,)`` (0-based), labels ``(B,)``.
        scale: the guidance scale ``s`` (a float or a ``(B,)`` tensor); 0 returns the model's output.
    Returns:
        the model's output with its first ``C`` channels guided (extra channels, such as a learned
        variance, are returned unchanged), shape of ``model(x, t)``.
    """
    out = model(x, t, **(model_kwargs or {}))
    if isinstance(scale, (int, float)) and scale == 0:
        return out
    grad = classifier_grad(classifier, x, t, y).to(out.dtype)
    shift = diffusion._extract("sqrt_one_minus_alphas_cumprod", t, grad) * _scale_like(scale, grad) * grad
    c = x.shape[1]
    pred = out[:, :c]
    if diffusion.mean_type is MeanType.EPS:
        guided = pred - shift
    elif diffusion.mean_type is MeanType.X0:  # the x_0 of the guided eps
        eps = diffusion.predict_noise_from_start(x, t, pred) - shift
        guided = diffusion.predict_start_from_noise(x, t, eps).to(out.dtype)
    else:  # v
        eps = diffusion.predict_noise_from_v(x, t, pred) - shift
        guided = diffusion.get_v(diffusion.predict_start_from_noise(x, t, eps), eps, t).to(out.dtype)
    if out.shape[1] == c:
        return guided
    return torch.cat([guided, out[:, c:]], dim=1)


class ClassifierGuidedModel(nn.Module):
    """``model`` and ``classifier`` as one guided "model" for the samplers (book ``eq-classifier-guidance``).

    ``guided(x, t, y=labels)`` returns :func:`classifier_guided_eps` with the scale given here;
    without ``y`` it returns the plain model's output. So
    ``ddim_sample(ClassifierGuidedModel(model, clf, diffusion, 3.0), diffusion, shape, y=labels)``
    (or ``ddpm_sample``) samples with classifier guidance. ``y`` is not passed on to ``model``.
    With respacing, wrap the guided model and give it the original diffusion, so that the classifier and
    the model see the original timesteps: ``RespacedModel(ClassifierGuidedModel(model, clf, diffusion, s),
    respaced.timestep_map)``, sampled with ``respaced``.

    Args:
        model: ``eps_theta(x, t)`` (or x_0 or v, as ``diffusion.mean_type`` says); classifier:
        ``p_phi(y | x_t, t)``; diffusion: the schedule and parameterisation the model was trained with;
        scale: the guidance scale ``s`` (float or ``(B,)`` tensor).
    """

    def __init__(self, model: nn.Module, classifier: nn.Module, diffusion: GaussianDiffusion, scale: Scale = 1.0):
        super().__init__()
        self.model, self.classifier, self.diffusion, self.scale = model, classifier, diffusion, scale

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: Optional[torch.Tensor] = None, **model_kwargs):
        if y is None:
            return self.model(x, t, **model_kwargs)
        return classifier_guided_eps(self.model, self.classifier, self.diffusion, x, t, y, self.scale, model_kwargs)


@torch.no_grad()
def accuracy_and_diversity(logits: torch.Tensor, features: torch.Tensor, labels: torch.Tensor) -> Dict[str, float]:
    """Two measures of class-conditional samples, from an independent classifier's outputs.

    Args:
        logits: ``(N, K)`` the independent classifier's logits for the samples.
        features: ``(N, F)`` its features (e.g. the penultimate layer) for the same samples.
        labels: ``(N,)`` the labels the samples were asked for.
    Returns:
        ``{"accuracy": fraction with argmax(logits) == label, "diversity": the mean over labels (with
        at least two samples) of the mean pairwise Euclidean distance between the features of the
        samples asked for that label}``. Computed the same way on real images, the second gives the
        diversity of the data to compare with.
    """
    if logits.shape[0] != labels.shape[0] or features.shape[0] != labels.shape[0]:
        raise ValueError("logits, features and labels must have the same first dimension")
    acc = (logits.argmax(1) == labels).double().mean().item()
    spreads = [torch.pdist(features[labels == c].double()).mean() for c in torch.unique(labels)
               if int((labels == c).sum()) >= 2]
    if not spreads:
        raise ValueError("diversity needs at least two samples of some label")
    return {"accuracy": acc, "diversity": torch.stack(spreads).mean().item()}
