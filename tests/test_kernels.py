"""The Triton kernel of ddpm_lib.kernels (GroupNorm + per-channel add + SiLU in one pass).

The tests run on a CUDA device where there is one, else on the CPU under Triton's interpreter:
``test_kernels_under_the_triton_interpreter`` reruns this file in a subprocess with ``TRITON_INTERPRET=1``
(the variable has to be set before Triton and ddpm_lib.kernels are imported).
"""
import copy
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch

from ddpm_lib import UNet, accel, ddim_sample, kernels
from ddpm_lib.diffusion import GaussianDiffusion

if torch.cuda.is_available():
    DEVICE = "cuda"
elif kernels.INTERPRET:
    DEVICE = "cpu"
else:
    DEVICE = None
needs_kernel = pytest.mark.skipif(DEVICE is None or kernels.triton is None,
                                  reason="needs Triton and a CUDA device, or TRITON_INTERPRET=1 (see below)")
pytestmark = pytest.mark.gpu

# the shapes of the paper's CIFAR-10 network at batch 2 (32 groups), and odd ones
SHAPES = [(2, 128, 32, 32, 32), (2, 384, 16, 16, 32), (2, 512, 4, 4, 32), (2, 256, 8, 8, 32),
          (3, 12, 5, 7, 4), (2, 8, 1, 1, 2)]


@pytest.fixture(autouse=True)
def _rule_tiles(monkeypatch):
    """The rule's tiles unless a test asks for the autotuner: timing every candidate of every shape the tests
    use would cost minutes of compiling on a GPU."""
    monkeypatch.setattr(kernels, "AUTOTUNE", False)


@pytest.mark.skipif(DEVICE is not None or kernels.INTERPRET, reason="the kernel runs directly here")
@pytest.mark.timeout(900)
def test_kernels_under_the_triton_interpreter():
    """Every test below, on the CPU, under Triton's interpreter (numpy): the kernel's own code, not a copy."""
    pytest.importorskip("triton", reason="Triton is not installed (make test installs the one torch asks for)")
    env = dict(os.environ, TRITON_INTERPRET="1", OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "no:xdist",
                        "-x", os.path.abspath(__file__)], env=env, capture_output=True, text=True, timeout=850)
    tail = (r.stdout[-4000:] + "\n" + r.stderr[-2000:]).strip()
    assert r.returncode == 0, tail
    counts = dict((k, int(n)) for n, k in re.findall(r"(\d+) (passed|skipped|failed)", r.stdout.splitlines()[-1]))
    # skipped there: this test, the compile-for-sm_90 test (which needs the compiler, not the interpreter) and
    # the autotuner's timing on CUDA
    assert counts.get("passed", 0) >= 27 and counts.get("skipped", 0) == 3, tail


def _reference64(x, groups, w, b, eps, add, act, **kw):
    def d(t):
        return None if t is None else t.double()
    return kernels.group_norm_act_reference(x.double(), groups, d(w), d(b), eps, d(add), act,
                                            **{k: (d(v) if torch.is_tensor(v) else v) for k, v in kw.items()})


def _maker(seed, dtype, channels_last):
    """``(t, g, fmt, tol)``: ``t(*shape)`` draws a tensor in ``dtype`` and memory format ``fmt`` from the generator
    ``g``; ``tol`` is the kernel's relative tolerance in that dtype."""
    g = torch.Generator().manual_seed(seed)
    fmt = torch.channels_last if channels_last else torch.contiguous_format

    def t(*shape):
        return torch.randn(*shape, generator=g).to(DEVICE, dtype).contiguous(memory_format=fmt)
    return t, g, fmt, (1e-5 if dtype == torch.float32 else 2 ** -7)


def _check_outputs(out, ref, kw, dtype, fmt, tol):
    """The kernel's output(s) (``(y, input)`` with ``return_input``) against float64 ``ref``: dtype, shape, memory
    format and values; returns them as a tuple."""
    outs, refs = (out, ref) if kw.get("return_input") else ((out,), (ref,))
    for o, r in zip(outs, refs):
        assert o.dtype == dtype and o.shape == r.shape, kw.keys()
        assert o.is_contiguous(memory_format=fmt), kw.keys()
        err = (o.double() - r).abs().max().item()
        assert err <= tol * r.abs().max().item() + 1e-6, (kw.keys(), err)
    return tuple(outs)


@needs_kernel
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("channels_last", [True, False], ids=["cl", "nchw"])
def test_group_norm_act_is_group_norm_then_silu(shape, dtype, channels_last):
    """Against float64 PyTorch: float32 to 1e-5 of the output's scale, bfloat16 to its rounding; the output
    keeps the input's dtype and memory format; a large mean costs no precision (two-pass variance)."""
    N, C, H, W, G = shape
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(N, C, H, W, generator=g) * 3 + 1e3 * (dtype == torch.float32)).to(DEVICE, dtype)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    w, b = (torch.randn(C, generator=g).to(DEVICE) for _ in range(2))
    adds = [None, torch.randn(N, C, generator=g).to(DEVICE), torch.randn(C, generator=g).to(DEVICE)]
    for i, (add, act, wb) in enumerate([(adds[0], True, True), (adds[1], True, True), (adds[2], False, True),
                                        (adds[1], False, False)]):
        ww, bb = (w, b) if wb else (None, None)
        assert kernels.supported(x, G, ww, bb, add)
        with torch.no_grad():
            y = kernels.group_norm_act(x, G, ww, bb, 1e-6, add, act=act)
        ref = _reference64(x, G, ww, bb, 1e-6, add, act)
        assert y.dtype == dtype and y.shape == x.shape and y.stride() == x.stride(), i
        scale = ref.abs().max().item()
        tol = 1e-5 if dtype == torch.float32 else 2 ** -7  # bf16: 8 significant bits (the interpreter truncates)
        err = (y.double() - ref).abs().max().item()
        assert err <= tol * scale + 1e-6, (i, err, scale)


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("channels_last", [True, False], ids=["cl", "nchw"])
def test_a_residual_sum_and_a_concatenation_in_the_same_pass(dtype, channels_last):
    """GroupNorm(x + res + add) and GroupNorm(cat([x, x2])) (groups inside one half and across both), each
    returning the normalised input too: against float64 PyTorch, in x's dtype and memory format."""
    t, g, fmt, tol = _maker(11, dtype, channels_last)
    for N, C1, C2, H, W, G in [(2, 16, 16, 4, 4, 8), (2, 8, 4, 5, 3, 4), (3, 64, 32, 8, 8, 32)]:
        x, res, x2 = t(N, C1, H, W), t(N, C1, H, W), t(N, C2, H, W)
        w, b = (torch.randn(C1 + C2, generator=g).to(DEVICE) for _ in range(2))
        add = torch.randn(C1, generator=g).to(DEVICE)
        cases = [dict(res=res, add=add, return_input=True), dict(x2=x2, return_input=True),
                 dict(res=res, add=add, x2=x2, return_input=True), dict(res=res), dict(x2=x2, act=False)]
        for kw in cases:
            kw = dict(dict(act=True), **kw)
            ww, bb = (w, b) if "x2" in kw else (w[:C1], b[:C1])
            a = kw.pop("add", None)
            assert kernels.supported(x, G, ww, bb, a, kw.get("res"), kw.get("x2")), kw.keys()
            with torch.no_grad():
                out = kernels.group_norm_act(x, G, ww, bb, 1e-6, a, **kw)
            _check_outputs(out, _reference64(x, G, ww, bb, 1e-6, a, **kw), kw, dtype, fmt, tol)
    # what the kernel does not take: PyTorch's operators, the same function
    x = t(2, 8, 4, 4)
    for bad in [dict(res=t(2, 8, 2, 2)), dict(res=t(2, 4, 4, 4)), dict(x2=t(1, 8, 4, 4)),
                dict(x2=t(2, 8, 4, 4).to(torch.float16)), dict(x2=t(2, 4, 4, 4)[..., :2])]:
        assert not kernels.supported(x, 4, **bad), bad.keys()
    with torch.no_grad():
        y, v = kernels.group_norm_act(x, 4, act=True, x2=t(2, 4, 4, 4).to(torch.float16), return_input=True)
    assert v.shape == (2, 12, 4, 4) and y.shape == v.shape


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("channels_last", [True, False], ids=["cl", "nchw"])
def test_an_upsampling_read_from_its_four_phases(dtype, channels_last):
    """subpixel=True: the kernel reads the upsampled activation from the four phases of
    accel.upsample_conv_subpixel's convolution (its bias as add), alone or concatenated with a skip connection,
    returning the interleaved input too: against float64 PyTorch, and the same as the interleaved activation."""
    t, g, fmt, tol = _maker(12, dtype, channels_last)
    for N, C1, C2, H, W, G in [(2, 16, 16, 4, 4, 8), (2, 8, 4, 3, 5, 4), (3, 64, 32, 8, 8, 32)]:
        z, x2 = t(N, 4 * C1, H + 1, W + 1), t(N, C2, 2 * H, 2 * W)
        w, b = (torch.randn(C1 + C2, generator=g).to(DEVICE) for _ in range(2))
        add = torch.randn(C1, generator=g).to(DEVICE)
        x = kernels.subpixel_interleave(z)
        assert x.shape == (N, C1, 2 * H, 2 * W) and x.is_contiguous(memory_format=fmt)
        for kw in [dict(add=add, act=True), dict(add=add, act=True, x2=x2, return_input=True),
                   dict(act=False, return_input=True)]:
            ww, bb = (w, b) if "x2" in kw else (w[:C1], b[:C1])
            a = kw.pop("add", None)
            assert kernels.supported(z, G, ww, bb, a, None, kw.get("x2"), subpixel=True), kw.keys()
            with torch.no_grad():
                out = kernels.group_norm_act(z, G, ww, bb, 1e-6, a, subpixel=True, **kw)
                same = kernels.group_norm_act(x, G, ww, bb, 1e-6, a, **kw)
            outs = _check_outputs(out, _reference64(z, G, ww, bb, 1e-6, a, subpixel=True, **kw), kw, dtype, fmt, tol)
            for o, o2 in zip(outs, same if kw.get("return_input") else (same,)):
                torch.testing.assert_close(o, o2, rtol=0, atol=0)  # the same arithmetic, the same values
    # what the kernel does not take: PyTorch's operators, the same function
    z = t(2, 16, 3, 3)
    assert not kernels.supported(z, 4, res=t(2, 4, 4, 4), subpixel=True)
    assert not kernels.supported(t(2, 10, 3, 3), 2, subpixel=True)
    res = t(2, 4, 4, 4)
    with torch.no_grad():
        y, v = kernels.group_norm_act(z, 2, act=True, res=res, return_input=True, subpixel=True)
    ry, rv = _reference64(z, 2, None, None, 1e-5, None, True, res=res, return_input=True, subpixel=True)
    assert y.shape == v.shape == (2, 4, 4, 4)
    for o, r in ((y, ry), (v, rv)):
        assert (o.double() - r).abs().max().item() <= tol * r.abs().max().item() + 1e-6
    with pytest.raises(ValueError):
        kernels.subpixel_interleave(t(2, 6, 3, 3))


@needs_kernel
def test_where_the_kernel_does_not_apply_it_is_not_used():
    """A gradient to compute, a group larger than MAX_TILE, a 3-D input: PyTorch's operators, same function."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 16, 8, 8, generator=g).to(DEVICE).requires_grad_()
    w = torch.randn(16, generator=g).to(DEVICE)
    assert not kernels.supported(x, 4, w)
    y = kernels.group_norm_act(x, 4, w, None, 1e-5, act=True)
    y.sum().backward()  # the reference path is differentiable
    assert x.grad is not None
    big = torch.randn(1, 64, 64, 64, generator=g).to(DEVICE)  # 64*64 positions x 8 channels per group
    assert kernels.tile_for(64 * 64, 64, 8) is None and not kernels.supported(big, 8)
    with torch.no_grad():
        torch.testing.assert_close(kernels.group_norm_act(big, 8, act=True),
                                   torch.nn.functional.silu(torch.nn.functional.group_norm(big, 8)))
    flat = torch.randn(3, 8, 5, generator=g).to(DEVICE)
    assert not kernels.supported(flat, 2)
    # an addend of shape (1, C) broadcasts in the reference; the kernel reads (N, C) or (C,) only
    x4 = torch.randn(4, 16, 4, 4, generator=g).to(DEVICE)
    one = torch.randn(1, 16, generator=g).to(DEVICE)
    assert not kernels.supported(x4, 4, add=one)
    with torch.no_grad():
        torch.testing.assert_close(kernels.group_norm_act(x4, 4, add=one, act=True),
                                   kernels.group_norm_act_reference(x4, 4, add=one, act=True))


CIFAR_GN = [(1024, 128), (1024, 256), (1024, 384), (256, 128), (256, 256), (256, 384), (256, 512), (64, 256),
            (64, 512), (16, 256), (16, 512)]  # (H*W, channels) of the paper's CIFAR-10 network's GroupNorms


def test_candidate_tiles():
    """The tiles the autotuner times: the rule's (tile_for) first, no repeats, whole groups, at most MAX_TILE
    elements, and 16 to 64 values per thread for the others; none where a group does not fit."""
    for hw, C, G in [(hw, C, 32) for hw, C in CIFAR_GN] + [(35, 12, 4), (1, 8, 2), (256, 96, 32)]:
        cands = kernels.candidates(hw, C, G)
        assert cands[0] == kernels.tile_for(hw, C, G) and len(set(cands)) == len(cands), (hw, C)
        for bhw, bg, bcpg, warps in cands:
            assert bhw >= hw and bcpg >= C // G and bhw * bg * bcpg <= kernels.MAX_TILE, (hw, C)
            assert bg & (bg - 1) == 0 and bg <= 32 and warps in (4, 8, 16), (hw, C)
        for bhw, bg, bcpg, warps in cands[1:]:
            assert 16 <= bhw * bg * bcpg // (32 * warps) <= 64, (hw, C)
    assert len(kernels.candidates(1024, 128, 32)) > 4
    assert kernels.candidates(64 * 64, 64, 8) == []


@needs_kernel
def test_the_autotuner_keeps_the_fastest_tile(monkeypatch):
    """The first call of a shape times every candidate tile (here a stand-in clock makes the third fastest and
    the second fail) and later calls of that shape use the fastest without timing again; every candidate
    computes the same function; with autotuning off (or while a CUDA graph is captured) nothing is timed."""
    real_on = kernels._autotune_on
    monkeypatch.setattr(kernels, "_TUNED", {})
    monkeypatch.setattr(kernels, "AUTOTUNE", True)
    monkeypatch.setattr(kernels, "_autotune_on", lambda x: True)
    N, C, H, W, G = 2, 96, 16, 16, 32
    cands = kernels.candidates(H * W, C, G)
    assert len(cands) >= 4
    timed = []

    def clock(tile, run, device):
        run()
        timed.append(tile)
        if tile == cands[1]:
            raise RuntimeError("out of resources")
        return 1.0 if tile == cands[2] else 2.0

    monkeypatch.setattr(kernels, "_time_tile", clock)
    g = torch.Generator().manual_seed(7)
    x = torch.randn(N, C, H, W, generator=g).to(DEVICE).contiguous(memory_format=torch.channels_last)
    w, b = (torch.randn(C, generator=g).to(DEVICE) for _ in range(2))
    add = torch.randn(N, C, generator=g).to(DEVICE)
    ref = _reference64(x, G, w, b, 1e-6, add, True)
    with torch.no_grad():
        y = kernels.group_norm_act(x, G, w, b, 1e-6, add, act=True)
        assert timed == cands
        (entry,) = kernels.tuned()
        assert tuple(entry["tile"]) == cands[2] and entry["candidates"] == [list(c) for c in cands]
        assert entry["ms"][1] is None and entry["ms"][2] == 1.0 and entry["ms"][0] == 2.0
        assert entry["shape"] == [N, C, H, W] and entry["options"] == dict(
            weight=True, bias=True, add=True, act=True, res=False, x2=None, return_input=False, subpixel=False)
        y2 = kernels.group_norm_act(x, G, w, b, 1e-6, add, act=True)
        assert len(timed) == len(cands)  # the same shape again: the chosen tile, no timing
        for out in [y, y2] + [kernels._launch(x, w, b, add, G, 1e-6, True, tile=t) for t in cands]:
            torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5 * ref.abs().max().item())
        # another batch size is another shape: timed anew
        kernels.group_norm_act(x[:1], G, w, b, 1e-6, add[:1], act=True)
        assert len(timed) == 2 * len(cands) and len(kernels.tuned()) == 2
    kernels.set_autotune(False)
    assert not real_on(x)
    kernels.set_autotune(True)
    assert real_on(x) == (x.device.type == "cuda")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="times the tiles on a CUDA device")
def test_the_autotuner_on_cuda(monkeypatch):
    """On a GPU: the first call times every candidate (all run, positive times) and keeps the fastest."""
    monkeypatch.setattr(kernels, "_TUNED", {})
    monkeypatch.setattr(kernels, "AUTOTUNE", True)
    x = torch.randn(8, 128, 32, 32, device="cuda", dtype=torch.bfloat16).contiguous(memory_format=torch.channels_last)
    w, b = torch.randn(128, device="cuda"), torch.randn(128, device="cuda")
    with torch.no_grad():
        y = kernels.group_norm_act(x, 32, w, b, 1e-6, act=True)
    (entry,) = kernels.tuned()
    assert all(m is not None and m > 0 for m in entry["ms"]), entry
    assert entry["ms"][entry["candidates"].index(entry["tile"])] == min(entry["ms"])
    ref = _reference64(x, 32, w, b, 1e-6, None, True)
    assert (y.double() - ref).abs().max().item() <= 2 ** -7 * ref.abs().max().item()


@needs_kernel
def test_strided_weight_and_bias():
    """A weight or bias that is a strided view is read correctly (the kernel reads them with stride 1)."""
    g = torch.Generator().manual_seed(5)
    x = torch.randn(2, 16, 4, 4, generator=g).to(DEVICE).contiguous(memory_format=torch.channels_last)
    wide = torch.randn(32, generator=g).to(DEVICE)
    w, b = wide[::2], wide[1::2]
    assert kernels.supported(x, 4, w, b)
    with torch.no_grad():
        out = kernels.group_norm_act(x, 4, w, b, 1e-6, act=True)
    torch.testing.assert_close(out.double(), _reference64(x, 4, w, b, 1e-6, None, True), rtol=1e-5, atol=1e-5)


@needs_kernel
def test_count_traffic():
    """kernels.count_traffic counts each launch and the bytes it moves (each value loaded or stored once), by
    hand here; the fallback to PyTorch's operators and calls outside the block are not counted."""
    g = torch.Generator().manual_seed(6)

    def t(*shape, dtype=torch.bfloat16):
        return torch.randn(*shape, generator=g).to(DEVICE, dtype).contiguous(memory_format=torch.channels_last)

    x, res, x2 = t(2, 8, 4, 4), t(2, 8, 4, 4), t(2, 4, 4, 4)
    w, b, add = (torch.randn(*s, generator=g).to(DEVICE) for s in ((12,), (12,), (2, 8)))  # float32
    z = t(2, 32, 3, 3)  # the four phases of a (2, 8, 4, 4) activation
    with torch.no_grad():
        kernels.group_norm_act(x, 4, act=True)  # not counted: outside the block
        with kernels.count_traffic() as tr:
            kernels.group_norm_act(x, 4, w[:8], b[:8], 1e-6, add, act=True, res=res, return_input=True)
            kernels.group_norm_act(x, 4, w, b, 1e-6, x2=x2)
            kernels.group_norm_act(z, 4, add=add[0], act=True, subpixel=True)
            kernels.group_norm_act(x, 4, add=torch.randn(1, 8).to(DEVICE), act=True)  # (1, C): the reference's
    e, pos = 2, 2 * 16  # bf16 bytes, positions of the batch
    reads = [e * pos * 16 + 2 * 8 * 4 + 2 * 8 * 4, e * pos * 12 + 2 * 12 * 4, e * pos * 8 + 8 * 4]
    writes = [e * pos * 8 * 2, e * pos * 12, e * pos * 8]
    assert tr["calls"] == 3 and tr["bytes_read"] == sum(reads) and tr["bytes_written"] == sum(writes), tr
    assert [(v["calls"], v["bytes_read"], v["bytes_written"]) for v in tr["by_call"].values()] == \
        list(zip([1, 1, 1], reads, writes))
    assert list(tr["by_call"]) == ["8+0 4x4, add, res, return_input, act", "8+4 4x4",
                                   "8+0 4x4, add, subpixel, act"]


BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def _benchmark_module(name):
    """benchmarks/<name>.py, loaded from its file (benchmarks/ is not a package)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(f"{name}_under_test", BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _benchmark_run(bench, tmp_path):
    """throughput.py's Run at the tiny size on this device, for its inference diagnoses."""
    import argparse

    return bench.Run(argparse.Namespace(device=DEVICE, size="tiny", budget_s=300, out=str(tmp_path), json_path=None,
                                        what="infer", mode_list=[], loss_check_steps=0))


@needs_kernel
def test_the_benchmark_times_the_kernel_alone(tmp_path):
    """benchmarks/throughput.py's GroupNorm diagnosis (the kernel alone against PyTorch's GroupNorm, per shape of
    the network) runs and records every shape (on the CPU under the interpreter; inductor left out for time)."""
    bench = _benchmark_module("throughput")
    run = _benchmark_run(bench, tmp_path)
    shapes = bench.group_norm_shapes(UNet.from_preset("tiny", ch=16), 16)
    run.gn_kernels(shapes, with_inductor=DEVICE == "cuda")
    gk = run.results["gn_kernels"]
    assert gk["shapes"] == gk["shapes_in_sums"] == len(shapes) > 0, gk
    for r in gk["layers"]:
        assert r["triton_ms"] > 0 and r["eager_ms"] > 0 and r["triton_max_abs_err_vs_fp32"] < 0.1, r
    assert gk["network_ms"]["triton"] > 0


@needs_kernel
def test_the_benchmark_counts_the_kernels_traffic(tmp_path, monkeypatch):
    """benchmarks/throughput.py's count of what the kernel moves in one forward of the folded network (the
    sampling option's), and its bandwidth from the kernel time a profile reports and, per call, from the
    autotuner's timing (faked here: the autotuner times on CUDA only); record.py renders both."""
    monkeypatch.setattr(kernels, "_TUNED", {})
    monkeypatch.setattr(kernels, "_autotune_on", lambda x: True)
    monkeypatch.setattr(kernels, "_VALUES_PER_THREAD", (1, 1024))  # two or more candidates for each tiny shape
    monkeypatch.setattr(kernels, "_time_tile", lambda tile, run, device: (run(), 0.01 * tile[3] + 1e-4 * tile[1])[1])
    run = _benchmark_run(_benchmark_module("throughput"), tmp_path)
    m = UNet.from_preset("tiny", ch=16).eval()
    norms = sum(isinstance(mod, torch.nn.GroupNorm) for mod in m.modules())
    fast = accel.prepare_model(m, DEVICE, bf16=False, channels_last=False, compile=False, **accel.SAMPLER_EXPERIMENTS)
    x, t = torch.randn(2, 3, 16, 16).to(DEVICE), torch.tensor([1, 9], device=DEVICE)
    run.results["profiles"] = {"ours:fast_fold infer":
                               dict(categories_ms_per_call={"GroupNorm (ddpm_lib.kernels)": 0.5})}
    row = dict(network="ours", mode="fast_fold", experiment=True, infer_images_per_s=1.0)
    with torch.no_grad():
        run.kernel_traffic(row, "ours:fast_fold", lambda: fast(x, t))
    kt = row["gn_kernel_traffic"]
    assert kt["calls_per_forward"] == norms and len(kt["by_call"]) > 1, kt
    gb = (kt["bytes_read"] + kt["bytes_written"]) / 1e9
    assert kt["gb"] == pytest.approx(gb, rel=1e-3) and kt["tb_per_s"] == pytest.approx(gb / 0.5, rel=1e-3)
    # each call's time alone: the fake timing of the tile the autotuner chose (the fewest warps, then groups)
    for v in kt["by_call"].values():
        (tile,) = v["tiles"]
        assert v["timed_calls"] == v["calls"] and tile[3] == 4, v
        assert v["timed_ms"] == pytest.approx(v["calls"] * (0.04 + 1e-4 * tile[1]), rel=1e-3), v
        assert v["timed_tb_per_s"] == pytest.approx((v["bytes_read"] + v["bytes_written"]) / 1e9 / v["timed_ms"],
                                                    rel=1e-3)
    alone = sum(v["timed_ms"] for v in kt["by_call"].values())
    assert kt["timed_kernel_ms"] == pytest.approx(alone, rel=1e-3)
    assert kt["timed_tb_per_s"] == pytest.approx(gb / alone, rel=1e-3)
    import json

    data = json.loads((BENCHMARKS / "results" / "nvidia-h200.json").read_text())
    data["modes"].append(row)
    section = _benchmark_module("record").render(data, "nvidia-h200.json")
    assert (f"ddpm_lib `fast_fold`: the GroupNorm kernel (`ddpm_lib.kernels`) moves {kt['gb']:.3g} GB per forward "
            f"({kt['bytes_read'] / 1e9:.3g} read, {kt['bytes_written'] / 1e9:.3g} written) in {norms} launches, in "
            f"0.5 ms of kernel time (profile): **{kt['tb_per_s']:.3g} TB/s** on average") in section
    name, v = next(iter(kt["by_call"].items()))
    assert (f"| {name} | {v['calls']} | {(v['bytes_read'] + v['bytes_written']) / v['calls'] / 1e6:,.1f} | "
            f"{v['timed_ms'] / v['calls'] * 1e3:,.0f} | {v['timed_tb_per_s']:.2f} | "
            f"({', '.join(map(str, v['tiles'][0]))}) |") in section
    assert (f"| **all, per forward** | {norms} | {kt['gb']:.3g} GB | **{alone:.2f} ms** (profile: 0.50 ms) | "
            f"**{kt['timed_tb_per_s']:.2f}** | |") in section


@needs_kernel
def test_the_kernel_traces_under_torch_compile():
    """torch.compile sees one custom operator (fullgraph); the compiled result equals the eager one."""
    if kernels._OP is None:
        pytest.skip("torch.library.custom_op needs PyTorch >= 2.4")
    g = torch.Generator().manual_seed(2)
    x = torch.randn(2, 64, 8, 8, generator=g).to(DEVICE).contiguous(memory_format=torch.channels_last)
    w, b, a = torch.randn(64, generator=g).to(DEVICE), torch.randn(64, generator=g).to(DEVICE), \
        torch.randn(2, 64, generator=g).to(DEVICE)

    def f(x, a):
        return kernels.group_norm_act(x * 2, 32, w, b, 1e-6, a, act=True) + 1

    with torch.no_grad():
        ref = f(x, a)
        out = torch.compile(f, backend="inductor" if DEVICE == "cuda" else "eager", fullgraph=True)(x, a)
    torch.testing.assert_close(out, ref)
    torch._dynamo.reset()


def _tiny():
    torch.manual_seed(0)
    m = UNet.from_preset("tiny", ch=16)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return m.eval()


@needs_kernel
def test_the_network_with_the_kernel(monkeypatch):
    """set_group_norm(model, "triton"): every GroupNorm runs the kernel without gradients, the network's
    function is unchanged in float32 and within bf16 tolerance on the fast path (and in DDIM sampling)."""
    calls = []
    launch = kernels._launch
    monkeypatch.setattr(kernels, "_launch", lambda *a, **k: calls.append(1) or launch(*a, **k))
    m = _tiny().to(DEVICE)
    g = torch.Generator().manual_seed(1)
    x, t = torch.randn(2, 3, 16, 16, generator=g).to(DEVICE), torch.tensor([5, 900], device=DEVICE)
    with torch.no_grad():
        ref = m(x, t)
        tri = copy.deepcopy(m)
        n = accel.set_group_norm(tri, "triton")
        out = tri(x, t)
    assert len(calls) == n > 0
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5 * ref.abs().max().item())
    fast = accel.prepare_model(copy.deepcopy(m), DEVICE, bf16=True, channels_last=True, compile=False,
                               group_norm="triton", upsample="subpixel", pad_channels=8)
    with torch.no_grad():
        o = fast(x, t).float()
    assert ((o - ref).norm() / ref.norm()).item() < 2e-2
    d = GaussianDiffusion("linear", num_timesteps=100)
    f = accel.make_sampler_forward(fast, cuda_graph=DEVICE == "cuda")
    shape = (2, 3, 16, 16)
    s_ref = ddim_sample(m, d, shape, steps=4, generator=torch.Generator(DEVICE).manual_seed(3))
    s = ddim_sample(f, d, shape, steps=4, generator=torch.Generator(DEVICE).manual_seed(3))
    assert ((s - s_ref).norm() / s_ref.norm()).item() < 2e-2


def _ptxas():
    import triton
    path = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    return path if os.path.exists(path) else None


@pytest.mark.skipif(kernels.triton is None or kernels.INTERPRET, reason="needs Triton's compiler (not its interpreter)")
def test_the_kernel_compiles_for_an_h100_without_spilling():
    """No GPU needed: Triton compiles the kernel for sm_90 (H100/H200) for each GroupNorm shape of the paper's
    CIFAR-10 network in channels_last, the activation is loaded and stored in vectors, and ptxas reports no
    register spills (a kernel that spills or moves 2-byte scalars would not run near the memory bandwidth,
    which is its whole point)."""
    ptxas = _ptxas()
    try:
        from triton.backends.compiler import GPUTarget
        from triton.compiler import ASTSource
    except ImportError as exc:
        pytest.skip(f"this Triton has another compiler API ({exc})")
    if ptxas is None:
        pytest.skip("this Triton ships no ptxas")
    names = kernels._group_norm_act_kernel.arg_names
    sig = {"X": "*bf16", "RES": "*bf16", "X2": "*bf16", "Y": "*bf16", "S": "*bf16", "Wt": "*fp32", "Bs": "*fp32",
           "ADD": "*fp32", "inv_count": "fp32", "eps": "fp32", "san": "i32", "sac": "i32"}
    # what Triton's launcher assumes of PyTorch's tensors and of a stride like C: 16-byte alignment
    attrs = {(names.index(n),): [["tt.divisibility", 16]]
             for n in ("X", "RES", "X2", "Y", "S", "Wt", "Bs", "ADD", "san")}

    def cl(hw, c):  # channels_last (sample, position, channel) strides
        return hw * c, c, 1

    # each GroupNorm shape of the network as the plain kernel (GroupNorm(x + add) + SiLU), and the fused forms
    # of accel.FoldedUNet: a residual sum normalised and written, a concatenation with a skip connection, and the
    # concatenation of an upsampling read from its four phases (subpixel) with a skip connection
    cases = [(hw, C, None, False, False) for hw, C in CIFAR_GN] + [
        (1024, 128, None, True, False), (256, 256, None, True, False), (1024, 384, 128, True, False),
        (1024, 256, 128, True, False), (256, 512, 256, True, False), (256, 384, 128, True, False),
        (16, 512, 256, True, False), (1024, 384, 128, True, True), (256, 512, 256, True, True),
        (64, 512, 256, True, True)]
    for hw, C, C2, fused, sub in cases:
        C1 = C - (C2 or 0)
        bhw, bg, bcpg, warps = kernels.tile_for(hw, C, 32)
        none = (0, 0, 0)
        W = int(round(hw ** 0.5))
        sx = ((W // 2 + 1) ** 2 * 4 * C1, 4 * C1, 1) if sub else cl(hw, C1)
        sr, s2 = (cl(hw, C1) if fused and not C2 else none), (cl(hw, C2) if C2 else none)
        ss = cl(hw, C) if fused else none
        consts = dict(sxn=sx[0], sxhw=sx[1], sxc=sx[2], srn=sr[0], srhw=sr[1], src=sr[2], s2n=s2[0], s2hw=s2[1],
                      s2c=s2[2], syn=hw * C, syhw=C, syc=1, ssn=ss[0], sshw=ss[1], ssc=ss[2], C1=C1,
                      HW=hw, G=32, CPG=C // 32, BLOCK_HW=bhw, BLOCK_G=bg, BLOCK_CPG=bcpg, HAS_W=True, HAS_B=True,
                      HAS_ADD=True, HAS_RES=fused and not C2 and not sub, HAS_X2=C2 is not None, HAS_S=fused, ACT=True,
                      SUBPIXEL=sub, WO=W if sub else 1, WZ=W // 2 + 1 if sub else 1)
        src = ASTSource(fn=kernels._group_norm_act_kernel, signature={**sig, **{k: "constexpr" for k in consts}},
                        constexprs=consts, attrs=attrs)
        compiled = kernels.triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": warps})
        # the activation moves in vectors (8 or 16 bytes), not 2-byte scalars (except where a group straddles
        # the two halves of a concatenation: 12 channels per group, 256 + 128)
        scalar = re.findall(r"(?:ld|st)\.global(?:\.\w+)*\.b16 ", compiled.asm["ptx"])
        assert not scalar or (C2 and C1 % (C // 32)), (hw, C, C2, fused, sub, len(scalar))
        ptx = Path(tempfile.mkdtemp()) / "k.ptx"
        ptx.write_text(compiled.asm["ptx"])
        r = subprocess.run([ptxas, "-v", "--gpu-name", "sm_90a", str(ptx), "-o", os.devnull],
                           capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r.stderr[-2000:]
        spills = [int(n) for n in re.findall(r"(\d+) bytes spill (?:stores|loads)", r.stderr)]
        regs = [int(n) for n in re.findall(r"Used (\d+) registers", r.stderr)]
        assert spills and not any(spills) and regs and max(regs) <= 168, (hw, C, C2, fused, sub, r.stderr[-600:])


@needs_kernel
def test_the_folded_network_with_the_kernel(monkeypatch):
    """accel.FoldedUNet with the kernel: every GroupNorm of the paper's CIFAR-10 network (narrowed) is one kernel
    call, which adds up the residual sums (and forms the up path's concatenations, adds the convolutions' biases and,
    with sub-pixel upsampling, interleaves the upsampling's phases) in its own pass; the function is unchanged in
    float32, within bf16 tolerance on the fast path with every inference experiment, and the same under
    torch.compile (fullgraph)."""
    calls = []
    launch = kernels._launch
    monkeypatch.setattr(kernels, "_launch", lambda *a, **k: calls.append(
        (k.get("res") is not None, k.get("x2") is not None, k.get("return_input", False),
         k.get("subpixel", False))) or launch(*a, **k))
    torch.manual_seed(0)
    m = UNet.from_preset("cifar10", ch=32).eval()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    m = m.to(DEVICE)
    x, t = torch.randn(2, 3, 32, 32, generator=g).to(DEVICE), torch.tensor([3, 700], device=DEVICE)
    norms = sum(isinstance(mod, torch.nn.GroupNorm) for mod in m.modules())
    folded = copy.deepcopy(m)
    accel.set_residual_fold(folded)
    with torch.no_grad():
        ref = m(x, t)
        out = folded(x, t)
    assert len(calls) == norms
    # down path 6 residual sums, middle 3 and the final GroupNorm's; up path 9 concatenations of a sum, and 3
    # after an upsampling (no sum); the up path's 3 attention blocks' inputs; the first convolution's and the 3
    # downsamplings' outputs (their biases added, the sum written for the skip connections)
    counts = {k: calls.count(k) for k in set(calls)}
    assert counts == {(False, False, False, False): 22, (True, False, True, False): 12, (True, True, True, False): 9,
                      (False, True, True, False): 3, (True, False, False, False): 1,
                      (False, False, True, False): 4}, counts
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5 * ref.abs().max().item())
    with torch.no_grad(), kernels.count_traffic() as tr:  # every call counted (benchmarks/throughput.py's bandwidth)
        folded(x, t)
    assert tr["calls"] == norms and sum(v["calls"] for v in tr["by_call"].values()) == norms
    assert tr["bytes_read"] == sum(v["bytes_read"] for v in tr["by_call"].values()) > 0
    # with sub-pixel upsampling the 3 upsamplings' outputs are read from their phases
    sub = copy.deepcopy(folded)
    assert accel.set_upsample(sub, "subpixel") == 3
    calls.clear()
    with torch.no_grad():
        out_sub = sub(x, t)
    counts = {k: calls.count(k) for k in set(calls)}
    assert counts == {(False, False, False, False): 22, (True, False, True, False): 12, (True, True, True, False): 9,
                      (False, True, True, True): 3, (True, False, False, False): 1,
                      (False, False, True, False): 4}, counts
    torch.testing.assert_close(out_sub, ref, rtol=1e-4, atol=1e-5 * ref.abs().max().item())
    fast = accel.prepare_model(copy.deepcopy(m), DEVICE, bf16=True, channels_last=True, compile=False,
                               group_norm="triton", upsample="subpixel", pad_channels=8, residual_fold=True)
    with torch.no_grad():
        o = fast(x, t).float()
        assert ((o - ref).norm() / ref.norm()).item() < 2e-2
        for net, expect in ((folded, out), (sub, out_sub)):
            comp = torch.compile(net, backend="aot_eager", fullgraph=True)  # the fake outputs are the real ones
            torch.testing.assert_close(comp(x, t), expect, rtol=1e-4, atol=1e-5 * ref.abs().max().item())
    torch._dynamo.reset()
