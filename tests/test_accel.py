"""The fast path (ddpm_lib.accel): same function and same training as the plain float32 path, clean fallbacks."""
import copy
import warnings

import pytest
import torch

from ddpm_lib import GaussianDiffusion, UNet, accel, ddim_sample
from ddpm_lib.ema import EMA

BF16_TOL = 2e-2  # relative error of a bf16 forward against float32


def _rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def _tiny(seed=0, dropout=0.0, randomise=True):
    torch.manual_seed(seed)
    m = UNet.from_preset("tiny", ch=16, dropout=dropout)
    if randomise:  # every weight non-zero (the paper zero-initialises the last layer of each branch)
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for p in m.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return m


def _inputs(batch=4, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 3, 16, 16, generator=g), torch.randint(0, 1000, (batch,), generator=g)


def _images(n=32, seed=0):
    """Smooth images in [-1, 1] (learnable, unlike white noise)."""
    g = torch.Generator().manual_seed(seed)
    low = torch.rand(n, 3, 4, 4, generator=g) * 2 - 1
    return torch.nn.functional.interpolate(low, size=(16, 16), mode="bilinear", align_corners=False)


@pytest.fixture(autouse=True)
def _fresh_warnings(monkeypatch):
    monkeypatch.setattr(accel, "_WARNED", set())


@pytest.fixture(autouse=True)
def one_thread():
    """Small networks run fastest, and immune to a busy machine, on one thread."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# ---------------------------------------------------------------------------------------------- outputs
def test_fast_forward_matches_fp32_within_bf16_tolerance():
    m = _tiny().eval()
    x, t = _inputs()
    with torch.no_grad():
        ref = m(x, t)
        fast = accel.prepare_model(copy.deepcopy(m), "cpu", bf16=True, channels_last=True, compile=False)
        out = fast(x, t)
    assert fast.bf16 and fast.channels_last and not fast.compiled
    assert out.dtype == torch.bfloat16 and out.shape == ref.shape
    assert 1e-5 < _rel(out, ref) < BF16_TOL  # bf16 arithmetic, but the same function
    # the master weights stay float32, in channels_last
    w = fast.module.conv_in.weight
    assert w.dtype == torch.float32 and w.is_contiguous(memory_format=torch.channels_last)


def test_sampler_forward_float32_and_in_ddim():
    m = _tiny().eval()
    x, t = _inputs()
    f = accel.make_sampler_forward(copy.deepcopy(m), "cpu", bf16=True, channels_last=True, compile=False)
    assert not f.cuda_graph  # no graphs on the CPU
    out = f(x, t)
    assert out.dtype == torch.float32 and not out.requires_grad
    assert _rel(out, m(x, t).detach()) < BF16_TOL
    d = GaussianDiffusion("linear", num_timesteps=100)
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    ref = ddim_sample(m, d, (2, 3, 16, 16), steps=5, generator=g1, progress=False)
    fast = ddim_sample(f, d, (2, 3, 16, 16), steps=5, generator=g2, progress=False)
    assert torch.isfinite(fast).all() and _rel(fast, ref) < 5e-2


def test_fp16_forward_is_float16_autocast_and_excludes_bf16():
    """fp16=True (for GPUs without native bf16): float16 autocast, float32 output from the sampler's forward, the
    float32 network's function to float16 precision (about 8 times finer than bf16's); bf16 "auto" turns off."""
    m = _tiny().eval()
    x, t = _inputs()
    with torch.no_grad():
        ref = m(x, t)
        fast = accel.prepare_model(copy.deepcopy(m), "cpu", fp16=True, channels_last=True, compile=False)
        out = fast(x, t)
        bf = accel.prepare_model(copy.deepcopy(m), "cpu", bf16=True, compile=False)(x, t)
    assert fast.fp16 and not fast.bf16 and out.dtype == torch.float16
    assert 1e-6 < _rel(out, ref) < _rel(bf, ref) / 4
    f = accel.make_sampler_forward(copy.deepcopy(m), "cpu", fp16=True, compile=False)
    assert f.fast.fp16 and f(x, t).dtype == torch.float32 and _rel(f(x, t), ref) < _rel(bf, ref) / 4
    with pytest.raises(ValueError, match="exclude each other"):
        accel.prepare_model(copy.deepcopy(m), "cpu", bf16=True, fp16=True)
    with pytest.raises(ValueError, match="fp16 must be True or False"):
        accel.prepare_model(copy.deepcopy(m), "cpu", fp16="auto")
    plain = accel.prepare_model(copy.deepcopy(m), "cpu", compile=False)
    with pytest.raises(ValueError, match="prepared without it"):  # not silently ignored
        accel.make_sampler_forward(plain, fp16=True)
    opt = accel.make_optimizer(fast.module.parameters(), lr=1e-4)
    with pytest.raises(ValueError, match="no loss scaling"):  # float16 training needs the Trainer's scaler
        accel.make_train_step(fast, GaussianDiffusion("linear", num_timesteps=100), opt)


def test_sampler_forward_experimental_is_the_same_network():
    """experimental=True swaps in the inference experiments (folded U-Net, Triton GroupNorms, sub-pixel
    upsampling, padded channels), in place, with or without a FastModel given: the same function (here on the
    CPU, where the kernel falls back to PyTorch's operators; the kernel itself: tests/test_kernels.py)."""
    m = _tiny().eval()
    x, t = _inputs()
    ref = m(x, t).detach()
    for given in ("module", "fast"):
        net = copy.deepcopy(m)
        if given == "fast":
            net = accel.prepare_model(net, "cpu", bf16=False, channels_last=True, compile=False)
        f = accel.make_sampler_forward(net, "cpu", bf16=False, channels_last=True, compile=False, experimental=True)
        mod = f.module
        assert type(mod) is accel.FoldedUNet
        kinds = {type(s) for s in mod.modules()}
        assert {accel.TritonGroupNorm, accel.SubpixelUpsample, accel.ChannelPaddedConv2d} <= kinds, given
        assert torch.nn.GroupNorm not in kinds
        assert _rel(f(x, t), ref) < 1e-5, given


def test_defaults_on_cpu_are_the_plain_path():
    fast = accel.prepare_model(_tiny(), "cpu")
    assert not (fast.bf16 or fast.channels_last or fast.compiled)
    opt = accel.make_optimizer(fast.module.parameters())
    assert not opt.defaults.get("fused") and not opt.defaults.get("capturable")
    step = accel.make_train_step(fast, GaussianDiffusion(), opt)
    assert not step._want_graph
    with pytest.raises(ValueError, match="capturable"):
        accel.make_optimizer(fast.module.parameters(), capturable=True)
    with pytest.raises(ValueError, match="bf16"):
        accel.prepare_model(_tiny(), "cpu", bf16="yes")


def test_bf16_auto_only_on_gpus_with_native_bf16(monkeypatch):
    """A free Colab T4 (compute capability 7.5) emulates bf16 slowly: "auto" must leave it in float32."""
    assert not accel.bf16_native("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    for capability, native in (((7, 0), False), ((7, 5), False), ((8, 0), True), ((8, 9), True), ((9, 0), True)):
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None, c=capability: c)
        assert accel.bf16_native("cuda:0") is native, capability

    def no_device(device=None):
        raise RuntimeError("no CUDA GPUs are available")

    monkeypatch.setattr(torch.cuda, "get_device_capability", no_device)
    assert not accel.bf16_native("cuda:0")


# ---------------------------------------------------------------------------------------------- one step
def _reference_steps(model, diffusion, batches, seed, lr=2e-4, clip=1.0, decay=0.9):
    """Algorithm 1 written out plainly: the step make_train_step must equal in float32."""
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=lr, betas=(0.9, 0.999), eps=1e-8)
    ema = [p.detach().clone() for p in model.parameters()]
    losses, norms = [], []
    for x0 in batches:
        t = torch.randint(0, diffusion.num_timesteps, (x0.shape[0],), generator=gen)
        noise = torch.randn(x0.shape, generator=gen)
        x_t = diffusion.q_sample(x0, t, noise)
        loss = ((model(x_t, t) - noise) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        norms.append(torch.nn.utils.clip_grad_norm_(model.parameters(), clip))
        opt.step()
        with torch.no_grad():
            for e, p in zip(ema, model.parameters()):
                e.mul_(decay).add_(p, alpha=1 - decay)
        losses.append(loss.item())
    return losses, norms, ema


@pytest.mark.parametrize("clip", [1.0, 0.01])  # the norms are about 0.84: only 0.01 clips
def test_train_step_fp32_equals_algorithm_1(clip):
    d = GaussianDiffusion("linear", num_timesteps=1000)
    batches = [_images(8, seed=i) for i in range(3)]
    ref_model = _tiny(randomise=True)
    model = copy.deepcopy(ref_model)
    ref_losses, ref_norms, ref_ema = _reference_steps(ref_model, d, batches, seed=5, clip=clip)

    fast = accel.prepare_model(model, "cpu", bf16=False, channels_last=False, compile=False)
    opt = accel.make_optimizer(fast.module.parameters(), lr=2e-4)
    ema = EMA(fast.module, decay=0.9)
    step = accel.make_train_step(fast, d, opt, ema, generator=torch.Generator().manual_seed(5), grad_clip=clip)
    for i, x0 in enumerate(batches):
        loss, gnorm = step(x0, step=i)
        assert loss.shape == () and loss.dtype == torch.float32 and not loss.requires_grad
        assert loss.item() == pytest.approx(ref_losses[i], rel=1e-5)
        assert gnorm.item() == pytest.approx(ref_norms[i].item(), rel=1e-4)
    for p, q in zip(fast.module.parameters(), ref_model.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
    for e, r in zip(ema.model.parameters(), ref_ema):
        torch.testing.assert_close(e, r, rtol=1e-5, atol=1e-6)
    assert step.calls == 3 and not step.graphed


def test_fast_loss_curve_matches_plain():
    """40 updates from the same start, with the same batches, t and noise: the bf16 + channels_last
    path follows the float32 path within run-to-run noise (measured here with another t/noise seed)."""
    d = GaussianDiffusion("linear", num_timesteps=1000)
    data = _images(64)
    start = _tiny(randomise=False)  # the paper's initialisation

    def run(bf16, seed, steps=40):
        fast = accel.prepare_model(copy.deepcopy(start), "cpu", bf16=bf16, channels_last=bf16, compile=False)
        opt = accel.make_optimizer(fast.module.parameters(), lr=2e-3)
        step = accel.make_train_step(fast, d, opt, EMA(fast.module, 0.999),
                                     generator=torch.Generator().manual_seed(seed))
        idx = torch.Generator().manual_seed(11)
        out = []
        for _ in range(steps):
            loss, _ = step(data[torch.randint(0, data.shape[0], (16,), generator=idx)])
            out.append(loss.item())
        return torch.tensor(out)

    plain, fast, other_seed = run(False, 1), run(True, 1), run(False, 2)
    k = 10
    assert plain[-k:].mean() < 0.8 * plain[:k].mean() and fast[-k:].mean() < 0.8 * fast[:k].mean()  # learning
    # per step, the same draws give nearly the same loss ...
    assert ((fast - plain).abs() / plain).mean() < 0.02
    # ... and the curves agree within the spread that another seed gives
    noise = (other_seed[-k:].mean() - plain[-k:].mean()).abs()
    assert (fast[-k:].mean() - plain[-k:].mean()).abs() < max(noise, 0.05 * plain[-k:].mean())


def test_ema_update_tensor_weight_equals_lerp():
    g = torch.Generator().manual_seed(0)
    params = [torch.randn(5, 3, generator=g), torch.randn(7, generator=g)]
    a = [torch.randn(5, 3, generator=g), torch.randn(7, generator=g)]
    b = [x.clone() for x in a]
    accel.ema_update_(a, params, 0.1)
    accel.ema_update_(b, params, torch.tensor(0.1))
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y)
    with pytest.raises(ValueError, match="tensors"):
        accel.ema_update_(a[:1], params, 0.1)


# ---------------------------------------------------------------------------------------------- compile and fallbacks
def test_compile_failure_falls_back_with_one_warning(monkeypatch):
    def broken_compile(module, **kw):
        def fn(*a, **k):
            raise RuntimeError("inductor exploded")
        return fn

    monkeypatch.setattr(torch, "compile", broken_compile)
    m = _tiny().eval()
    x, t = _inputs()
    fast = accel.prepare_model(copy.deepcopy(m), "cpu", bf16=False, channels_last=False, compile=True)
    assert fast.compiled
    with pytest.warns(RuntimeWarning, match="inductor exploded"):
        out = fast(x, t)
    assert not fast.compiled and "inductor exploded" in fast.compile_error
    torch.testing.assert_close(out, m(x, t))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # only once
        fast(x, t)

    # the training step: the first (compiling) step fails, is rolled back (RNG included) and redone eagerly
    d = GaussianDiffusion("linear", num_timesteps=1000)
    batches = [_images(8, seed=i) for i in range(2)]
    ref_model = _tiny()
    ref_losses, _, _ = _reference_steps(copy.deepcopy(ref_model), d, batches, seed=5, decay=0.9999)
    fast = accel.prepare_model(copy.deepcopy(ref_model), "cpu", bf16=False, channels_last=False, compile=True)
    step = accel.make_train_step(fast, d, accel.make_optimizer(fast.module.parameters()),
                                 generator=torch.Generator().manual_seed(5))
    accel._WARNED.clear()
    with pytest.warns(RuntimeWarning, match="running eagerly"):
        losses = [step(b)[0].item() for b in batches]
    assert losses == pytest.approx(ref_losses, rel=1e-5)


def test_bad_input_is_not_taken_for_a_compiler_failure(monkeypatch):
    def broken_compile(module, **kw):
        def fn(*a, **k):
            raise RuntimeError("compiler failure")
        return fn

    monkeypatch.setattr(torch, "compile", broken_compile)
    fast = accel.prepare_model(_tiny(), "cpu", bf16=False, channels_last=False, compile=True)
    with pytest.raises(ValueError, match="x must have shape"):
        fast(torch.randn(2, 1, 16, 16), torch.zeros(2, dtype=torch.long))
    assert fast.compiled and fast.compile_error is None  # still compiling: the input was at fault


def test_compile_unavailable_runs_eagerly(monkeypatch):
    monkeypatch.setattr(accel, "compile_available", lambda device: (False, "no Triton here"))
    with pytest.warns(RuntimeWarning, match="no Triton here"):
        fast = accel.prepare_model(_tiny(), "cpu", compile=True)
    assert not fast.compiled and fast.forward is fast.module
    fast = accel.prepare_model(_tiny(), "cpu", compile="auto")  # auto: silently off
    assert not fast.compiled


def test_compiled_train_step_traces_and_matches_eager():
    """torch.compile (dynamo tracing; the eager backend keeps the test fast) on the training step."""
    torch._dynamo.reset()
    d = GaussianDiffusion("linear", num_timesteps=1000)
    batches = [_images(8, seed=i) for i in range(2)]
    start = _tiny()
    res = []
    for compile in (False, True):
        fast = accel.prepare_model(copy.deepcopy(start), "cpu", bf16=False, channels_last=True, compile=compile,
                                   compile_backend="eager")
        step = accel.make_train_step(fast, d, accel.make_optimizer(fast.module.parameters()),
                                     generator=torch.Generator().manual_seed(2))
        res.append([step(b)[0].item() for b in batches])
        assert fast.compiled == compile
    assert res[1] == pytest.approx(res[0], rel=1e-5)
    torch._dynamo.reset()


# ---------------------------------------------------------------------------------------------- CUDA
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_graph_step_equals_eager_step():
    d = GaussianDiffusion("linear", num_timesteps=1000)
    data = _images(64).cuda()
    start = _tiny(randomise=False)
    runs = []
    for graph in (False, True):
        fast = accel.prepare_model(copy.deepcopy(start), "cuda", compile=False)
        opt = accel.make_optimizer(fast.module.parameters(), capturable=True)
        ema = EMA(fast.module, 0.999)
        step = accel.make_train_step(fast, d, opt, ema, cuda_graph=graph,
                                     generator=torch.Generator(device="cuda").manual_seed(4), warmup_calls=2)
        idx = torch.Generator(device="cuda").manual_seed(9)
        losses = []
        for i in range(8):
            loss, gnorm = step(data[torch.randint(0, 64, (16,), device="cuda", generator=idx)], lr=1e-3 * (i + 1) / 8)
            losses.append(loss.clone())
        assert step.graphed == graph, step.graph_error
        runs.append((torch.stack(losses).cpu(), [p.detach().cpu() for p in ema.model.parameters()]))
    torch.testing.assert_close(runs[1][0], runs[0][0], rtol=2e-3, atol=1e-4)
    for a, b in zip(runs[1][1], runs[0][1]):
        torch.testing.assert_close(a, b, rtol=2e-3, atol=1e-4)
    # the sampler's forward from a graph
    m = _tiny().eval().cuda()
    x, t = (v.cuda() for v in _inputs(8))
    f = accel.make_sampler_forward(copy.deepcopy(m), compile=False, warmup_calls=1)
    outs = [f(x, t) for _ in range(3)]
    assert f._graphs, f.graph_error
    for o in outs:
        assert _rel(o, m(x, t).detach()) < BF16_TOL


# ---------------------------------------------------------------------------------------------- GroupNorm from moments
@pytest.mark.parametrize("shape,groups,mean,std", [((4, 64, 8, 8), 32, 0.0, 1.0), ((3, 96, 5, 7), 32, 5.0, 3.0),
                                                   ((2, 8, 4), 4, -2.0, 0.5), ((2, 64, 4, 4), 32, 1e3, 1.0)])
def test_group_norm_from_moments_is_group_norm(shape, groups, mean, std):
    """The same function as F.group_norm, values and gradients, also where a large mean would cancel a naive
    E[x^2] - E[x]^2 (the error is measured against float64 and compared with PyTorch's own float32 kernel)."""
    g = torch.Generator().manual_seed(0)
    x64 = torch.randn(*shape, generator=g, dtype=torch.float64) * std + mean
    w64, b64 = torch.randn(shape[1], generator=g, dtype=torch.float64), torch.randn(shape[1], generator=g,
                                                                                   dtype=torch.float64)
    ref = torch.nn.functional.group_norm(x64, groups, w64, b64, 1e-6)
    x, w, b = (v.float().requires_grad_() for v in (x64, w64, b64))
    out = accel.group_norm_from_moments(x, groups, w, b, 1e-6)
    native = torch.nn.functional.group_norm(x.detach(), groups, w.detach(), b.detach(), 1e-6)
    assert out.dtype == torch.float32 and out.shape == x.shape
    err, err_native = (out.double() - ref).abs().max().item(), (native.double() - ref).abs().max().item()
    assert err <= max(3 * err_native, 1e-5), (err, err_native)
    gy = torch.randn(*shape, generator=g)
    grads = torch.autograd.grad(out, (x, w, b), gy)
    xn, wn, bn = (v.detach().clone().requires_grad_() for v in (x, w, b))
    grads_native = torch.autograd.grad(torch.nn.functional.group_norm(xn, groups, wn, bn, 1e-6), (xn, wn, bn), gy)
    for a, n in zip(grads, grads_native):
        torch.testing.assert_close(a, n, rtol=1e-3, atol=1e-3 * n.abs().max().item())


def test_set_group_norm_keeps_the_network():
    """set_group_norm switches every GroupNorm in place (same state dict, same function) and back; prepare_model
    takes it as an option; the bf16 fast path with it matches float32 within bf16 tolerance."""
    m = _tiny().eval()
    x, t = _inputs()
    with torch.no_grad():
        ref = m(x, t)
    moments = copy.deepcopy(m)
    n = accel.set_group_norm(moments, "moments")
    assert n == sum(isinstance(mod, torch.nn.GroupNorm) for mod in m.modules()) > 0
    assert all(type(mod) is accel.MomentGroupNorm for mod in moments.modules() if isinstance(mod, torch.nn.GroupNorm))
    assert moments.state_dict().keys() == m.state_dict().keys()
    with torch.no_grad():
        torch.testing.assert_close(moments(x, t), ref, rtol=1e-4, atol=1e-5)
    accel.set_group_norm(moments, "native")
    assert all(type(mod) is torch.nn.GroupNorm for mod in moments.modules() if isinstance(mod, torch.nn.GroupNorm))
    fast = accel.prepare_model(copy.deepcopy(m), "cpu", bf16=True, channels_last=True, compile=False,
                               group_norm="moments")
    assert any(type(mod) is accel.MomentGroupNorm for mod in fast.module.modules())
    with torch.no_grad():
        out = fast(x, t).float()
    assert ((out - ref).norm() / ref.norm()).item() < 2e-2
    with pytest.raises(ValueError, match="group_norm must be one of"):
        accel.set_group_norm(m, "fused")
    flat = torch.nn.GroupNorm(4, 8)  # (N, C): no spatial dimensions
    x2 = torch.randn(3, 8)
    ref2 = flat(x2)
    accel.set_group_norm(flat, "moments")
    torch.testing.assert_close(flat(x2), ref2)


def _same_values_and_gradients(changed, m, x, t, rtol=1e-4, atol=1e-5, grad_atol=1e-6):
    """``changed`` (a network with swapped-in classes) computes what ``m`` computes: outputs and the gradients of
    every parameter of a loss on them."""
    ref, out = m(x, t), changed(x, t)
    assert out.shape == ref.shape
    torch.testing.assert_close(out, ref, rtol=rtol, atol=atol)
    grads_ref = torch.autograd.grad(ref.square().mean(), list(m.parameters()))
    for a, b in zip(torch.autograd.grad(out.square().mean(), list(changed.parameters())), grads_ref):
        torch.testing.assert_close(a, b, rtol=rtol, atol=grad_atol)


def test_set_group_norm_triton_is_the_same_network_where_the_kernel_cannot_run():
    """"triton" swaps the GroupNorms and residual blocks in place (same state dict) and back; where the kernel
    does not run (here: a CPU without Triton's interpreter, or a gradient to compute) the blocks compute the
    same function, values and gradients, with PyTorch's operators. The kernel itself: tests/test_kernels.py."""
    from ddpm_lib.unet import ResBlock
    m = _tiny().train()
    x, t = _inputs()
    tri = copy.deepcopy(m)
    n = accel.set_group_norm(tri, "triton")
    assert n == sum(isinstance(mod, torch.nn.GroupNorm) for mod in m.modules())
    assert all(type(mod) is accel.TritonResBlock for mod in tri.modules() if isinstance(mod, ResBlock))
    assert tri.state_dict().keys() == m.state_dict().keys()
    _same_values_and_gradients(tri, m, x, t)
    accel.set_group_norm(tri, "native")
    assert not any(type(mod) in (accel.TritonResBlock, accel.TritonGroupNorm) for mod in tri.modules())


@pytest.mark.parametrize("preset", ["tiny", "cifar10", "class-conditional"])
def test_residual_fold_is_the_same_network_where_the_kernel_cannot_run(preset):
    """set_residual_fold swaps the U-Net's forward in place (same state dict) and back; where the kernel does not
    run (a CPU without Triton's interpreter, a gradient) the folded residual sums and concatenations are
    PyTorch's operators: the same values and gradients, with attention (cifar10) and class labels too."""
    torch.manual_seed(0)
    kw = dict(ch=16, dropout=0.0) if preset == "tiny" else dict(ch=32, dropout=0.0)  # train mode, no randomness
    m = UNet.from_preset("tiny" if preset == "tiny" else "cifar10",
                         **dict(kw, num_classes=5) if preset == "class-conditional" else kw).train()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in m.parameters():  # non-zero everywhere (the paper zero-initialises each branch's last layer)
            p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    size = 16 if preset == "tiny" else 32
    x, t = torch.randn(2, 3, size, size, generator=g), torch.tensor([4, 901])
    folded = copy.deepcopy(m)
    assert accel.set_residual_fold(folded) == 1 and type(folded) is accel.FoldedUNet
    assert folded.state_dict().keys() == m.state_dict().keys()
    if preset == "class-conditional":
        y = torch.tensor([1, 3])
        torch.testing.assert_close(folded(x, t, y), m(x, t, y), rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(folded(x, t), m(x, t), rtol=1e-4, atol=1e-6)  # the null class
    _same_values_and_gradients(folded, m, x, t, grad_atol=1e-5)
    accel.set_residual_fold(folded, False)
    assert type(folded) is UNet
    fast = accel.prepare_model(copy.deepcopy(m).eval(), "cpu", compile=False, residual_fold=True)
    assert type(fast.module) is accel.FoldedUNet


# ---------------------------------------------------------------------------------------------- upsampling
@pytest.mark.parametrize("shape,out_ch,bias", [((2, 5, 4, 6), 7, True), ((1, 3, 1, 1), 3, True),
                                               ((2, 8, 3, 2), 4, False)])
def test_upsample_subpixel_is_nearest_then_conv(shape, out_ch, bias):
    """conv3x3(nearest x2 upsample) computed at the low resolution: the same values and gradients (float64)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(*shape, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(out_ch, shape[1], 3, 3, generator=g, dtype=torch.float64, requires_grad=True)
    b = torch.randn(out_ch, generator=g, dtype=torch.float64, requires_grad=True) if bias else None
    ref = torch.nn.functional.conv2d(torch.nn.functional.interpolate(x, scale_factor=2.0, mode="nearest"), w, b,
                                     padding=1)
    out = accel.upsample_conv_subpixel(x, w, b)
    assert out.shape == ref.shape == (shape[0], out_ch, 2 * shape[2], 2 * shape[3])
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    gy = torch.randn(ref.shape, generator=g, dtype=torch.float64)
    inputs = [v for v in (x, w, b) if v is not None]
    for a, r in zip(torch.autograd.grad(out, inputs, gy), torch.autograd.grad(ref, inputs, gy)):
        torch.testing.assert_close(a, r, rtol=1e-12, atol=1e-12)
    if shape[2] * shape[3] > 1:  # (a 1x1 image is in both memory formats at once)
        xc = x.detach().float().contiguous(memory_format=torch.channels_last)
        assert accel.upsample_conv_subpixel(xc, w.detach().float()).is_contiguous(memory_format=torch.channels_last)
    with pytest.raises(ValueError, match="3x3"):
        accel.upsample_conv_subpixel(x, w[..., :2, :2])
    # the 2x2 kernels are sums of the weight's slices: no host constant copied to the device in each forward
    # (which an eager forward could not be captured in a CUDA graph with)
    from unittest import mock

    with mock.patch("torch.tensor", side_effect=AssertionError("a host constant")), torch.no_grad():
        accel.upsample_conv_subpixel(x, w, b)


def test_set_upsample_keeps_the_network():
    """set_upsample swaps every Upsample in place (same state dict, same function and gradients) and back;
    prepare_model takes it; in bf16 + channels_last it matches float32 within bf16 tolerance."""
    from ddpm_lib.unet import Upsample
    m = _tiny().train()
    x, t = _inputs()
    sp = copy.deepcopy(m)
    n = accel.set_upsample(sp, "subpixel")
    assert n == sum(isinstance(mod, Upsample) for mod in m.modules()) > 0
    assert sp.state_dict().keys() == m.state_dict().keys()
    _same_values_and_gradients(sp, m, x, t)
    accel.set_upsample(sp, "nearest")
    assert all(type(mod) is Upsample for mod in sp.modules() if isinstance(mod, Upsample))
    fast = accel.prepare_model(copy.deepcopy(m).eval(), "cpu", bf16=True, channels_last=True, compile=False,
                               upsample="subpixel")
    assert any(type(mod) is accel.SubpixelUpsample for mod in fast.module.modules())
    with torch.no_grad():
        assert _rel(fast(x, t), m.eval()(x, t)) < BF16_TOL
    with pytest.raises(ValueError, match="upsample must be one of"):
        accel.set_upsample(m, "bilinear")


def test_channel_padding_is_the_same_convolution():
    """set_channel_padding pads the first and last convolution's 3 channels to 8 with zeros for the computation:
    same state dict, same values and gradients; undone by None; prepare_model takes it."""
    m = _tiny().train()
    x, t = _inputs()
    padded = copy.deepcopy(m)
    assert accel.set_channel_padding(padded, 8) == 2  # conv_in (3 -> 16) and conv_out (16 -> 3)
    assert type(padded.conv_in) is type(padded.conv_out) is accel.ChannelPaddedConv2d
    assert padded.state_dict().keys() == m.state_dict().keys()
    _same_values_and_gradients(padded, m, x, t, rtol=1e-5, atol=1e-6, grad_atol=1e-7)
    xc = x.contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        torch.testing.assert_close(padded.conv_in(xc), m.conv_in(x), rtol=1e-5, atol=1e-6)
    assert accel.set_channel_padding(padded, None) == 0
    assert not any(type(mod) is accel.ChannelPaddedConv2d for mod in padded.modules())
    fast = accel.prepare_model(copy.deepcopy(m).eval(), "cpu", bf16=True, channels_last=True, compile=False,
                               pad_channels=8)
    with torch.no_grad():
        assert _rel(fast(x, t), m.eval()(x, t)) < BF16_TOL
