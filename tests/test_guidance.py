import math

import pytest
import torch

from ddpm_lib import GaussianDiffusion, ToyMLP, UNet, ddim_sample, ddpm_sample, toy_mixture
from ddpm_lib.guidance import (ClassifierGuidedModel, NoisyClassifier, accuracy_and_diversity, classifier_grad,
                               classifier_guided_eps, classifier_loss)


class MixtureEps(torch.nn.Module):
    """The exact eps of a noised Gaussian mixture (all of a batch at one timestep), optionally of one component."""

    def __init__(self, mix, diffusion, component=None):
        super().__init__()
        self.mix, self.d, self.component = mix, diffusion, component

    def forward(self, x, t, **kw):
        ab = float(self.d.alphas_cumprod[int(t[0])])
        noised = self.mix.noised(ab)
        if self.component is None:
            return -math.sqrt(1 - ab) * noised.score(x)
        mu, s = noised.means[self.component].to(x.dtype), noised.stds[self.component].to(x.dtype)
        return math.sqrt(1 - ab) * (x - mu) / s**2


class MixtureClassifier(torch.nn.Module):
    """Exact log p(k | x_t) of the noised mixture, as logits."""

    def __init__(self, mix, diffusion):
        super().__init__()
        self.mix, self.d = mix, diffusion
        self.dummy = torch.nn.Parameter(torch.zeros(()))

    def forward(self, x, t):
        noised = self.mix.noised(float(self.d.alphas_cumprod[int(t[0])]))
        mu, sd, w = noised.means.to(x.dtype), noised.stds.to(x.dtype), noised.weights.to(x.dtype)
        return torch.log(w) - 0.5 * ((x[:, None, :] - mu[None]) ** 2).sum(-1) / sd**2 - x.shape[1] * torch.log(sd)


def test_noisy_classifier_shapes_and_gradient_matches_finite_differences():
    torch.manual_seed(0)
    clf = NoisyClassifier(in_channels=1, num_classes=5, ch=8, ch_mult=(1, 2), input_pool=2).double().eval()
    x = torch.randn(3, 1, 8, 8, dtype=torch.float64)
    t = torch.tensor([0, 10, 99])
    y = torch.tensor([0, 3, 4])
    assert clf(x, t).shape == (3, 5)
    g = classifier_grad(clf, x, t, y)
    assert g.shape == x.shape
    h = 1e-6
    for idx in [(0, 0, 1, 2), (1, 0, 7, 7), (2, 0, 4, 0)]:
        e = torch.zeros_like(x)
        e[idx] = h
        lp = lambda z: torch.log_softmax(clf(z, t), 1)[idx[0], y[idx[0]]]  # noqa: E731
        fd = (lp(x + e) - lp(x - e)) / (2 * h)
        assert abs(fd.item() - g[idx].item()) < 1e-7
    with torch.no_grad():  # the samplers' context
        assert torch.equal(classifier_grad(clf, x, t, y), g)
    with pytest.raises(ValueError):
        classifier_grad(clf, x, t, y[:2])
    with pytest.raises(ValueError):
        NoisyClassifier(ch=12, num_groups=8)


def test_classifier_loss_is_cross_entropy_on_q_sample():
    d = GaussianDiffusion(num_timesteps=50)
    clf = NoisyClassifier(ch=8, ch_mult=(1, 2)).eval()
    x0 = torch.rand(4, 1, 8, 8) * 2 - 1
    y = torch.tensor([1, 2, 3, 4])
    t = torch.tensor([0, 5, 20, 49])
    noise = torch.randn_like(x0)
    loss = classifier_loss(clf, d, x0, y, t=t, noise=noise)
    ref = torch.nn.functional.cross_entropy(clf(d.q_sample(x0, t, noise), t), y, reduction="none")
    assert loss.shape == (4,) and torch.allclose(loss, ref)
    g = torch.Generator().manual_seed(0)
    assert classifier_loss(clf, d, x0, y, generator=g).shape == (4,)


def test_guided_eps_formula_and_exact_mixture_identity():
    """With the exact classifier, scale 1 turns the unconditional eps into the component's eps:
    score p(x_t | y) = score p(x_t) + grad log p(y | x_t)."""
    d = GaussianDiffusion(num_timesteps=100)
    mix = toy_mixture("gaussian_mixture")
    model, clf = MixtureEps(mix, d), MixtureClassifier(mix, d)
    x = torch.randn(7, 2, dtype=torch.float64)
    for step in (0, 30, 99):
        t = torch.full((7,), step)
        for k in range(3):
            y = torch.full((7,), k)
            guided = classifier_guided_eps(model, clf, d, x, t, y, 1.0)
            assert torch.allclose(guided, MixtureEps(mix, d, k)(x, t), atol=1e-10)
        y = torch.tensor([0, 1, 2, 0, 1, 2, 0])
        s = 2.5
        expected = model(x, t) - math.sqrt(1 - float(d.alphas_cumprod[step])) * s * classifier_grad(clf, x, t, y)
        assert torch.allclose(classifier_guided_eps(model, clf, d, x, t, y, s), expected, rtol=0, atol=1e-12)
        assert torch.equal(classifier_guided_eps(model, clf, d, x, t, y, 0.0), model(x, t))
        per_example = torch.full((7,), s, dtype=torch.float64)
        assert torch.allclose(classifier_guided_eps(model, clf, d, x, t, y, per_example), expected, atol=1e-12)


def test_guidance_of_x0_and_v_models_is_that_of_their_eps():
    """A model that predicts x_0 or v, guided, returns the x_0 or v of the guided eps: the exact mixture's
    networks in the three parameterisations give the component's eps after conversion."""
    mix = toy_mixture("gaussian_mixture")
    d_eps = GaussianDiffusion(num_timesteps=100)
    clf = MixtureClassifier(mix, d_eps)
    x = torch.randn(7, 2, dtype=torch.float64)
    for mean_type in ("x0", "v"):
        d = GaussianDiffusion(num_timesteps=100, mean_type=mean_type)
        eps_model = MixtureEps(mix, d_eps)

        def model(x, t, eps_model=eps_model, d=d, mean_type=mean_type):  # the same network, as x_0 or v
            eps = eps_model(x, t)
            x0 = d.predict_start_from_noise(x, t, eps)
            return x0 if mean_type == "x0" else d.get_v(x0, eps, t)

        for step in (0, 30, 99):
            t = torch.full((7,), step)
            for k in range(3):
                out = classifier_guided_eps(model, clf, d, x, t, torch.full((7,), k), 1.0)
                eps = d.predict_noise_from_start(x, t, out) if mean_type == "x0" else d.predict_noise_from_v(x, t, out)
                assert torch.allclose(eps, MixtureEps(mix, d_eps, k)(x, t), atol=1e-8), (mean_type, step, k)


def test_guided_model_in_the_samplers_and_learned_variance_channels():
    torch.manual_seed(0)
    d = GaussianDiffusion(num_timesteps=50)
    model = UNet.from_preset("tiny", in_channels=1, image_size=8).eval()
    clf = NoisyClassifier(ch=8, ch_mult=(1, 2)).eval()
    y = torch.tensor([0, 1, 2])
    shape = (3, 1, 8, 8)
    plain = ddim_sample(model, d, shape, steps=5, generator=torch.Generator().manual_seed(1), progress=False)
    zero = ddim_sample(ClassifierGuidedModel(model, clf, d, 0.0), d, shape, steps=5, y=y,
                       generator=torch.Generator().manual_seed(1), progress=False)
    assert torch.equal(plain, zero)
    guided = ddpm_sample(ClassifierGuidedModel(model, clf, d, 5.0), d, shape, y=y,
                         generator=torch.Generator().manual_seed(1), progress=False)
    assert guided.shape == shape and torch.isfinite(guided).all()
    # a model with extra (variance) channels: only the eps channels are guided
    two = lambda x, t: torch.cat([model(x, t), torch.ones_like(x)], 1)  # noqa: E731
    x, t = torch.randn(shape), torch.tensor([3, 10, 49])
    out = classifier_guided_eps(two, clf, d, x, t, y, 2.0)
    assert torch.equal(out[:, 1:], torch.ones_like(x))
    assert torch.allclose(out[:, :1], classifier_guided_eps(model, clf, d, x, t, y, 2.0))


def test_cfg_of_the_library_models_is_the_rearranged_formula():
    torch.manual_seed(0)
    mlp = ToyMLP(dim=4, hidden=16, depth=1, num_classes=3).eval()
    x, t, y = torch.randn(5, 4), torch.tensor([0, 1, 2, 3, 4]), torch.tensor([0, 1, 2, 0, 1])
    eps_c, eps_u = mlp(x, t, y=y), mlp(x, t)
    for w in (0.0, 1.0, 3.0):
        assert torch.allclose(mlp(x, t, y=y, guidance_scale=w), eps_u + (1 + w) * (eps_c - eps_u), atol=1e-5)
    with pytest.raises(ValueError, match="unconditional"):  # labels are not silently dropped
        ToyMLP(dim=4)(x, t, y=y)


def test_accuracy_and_diversity():
    logits = torch.tensor([[2.0, 0.0], [0.0, 1.0], [3.0, 1.0], [1.0, 0.0]])
    labels = torch.tensor([0, 0, 1, 1])
    feats = torch.tensor([[0.0, 0.0], [3.0, 4.0], [1.0, 1.0], [1.0, 2.0]])
    out = accuracy_and_diversity(logits, feats, labels)
    assert out["accuracy"] == pytest.approx(0.25)
    assert out["diversity"] == pytest.approx((5.0 + 1.0) / 2)
    with pytest.raises(ValueError):
        accuracy_and_diversity(logits, feats, torch.tensor([0, 1, 2, 3]))
