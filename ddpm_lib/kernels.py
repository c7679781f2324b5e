"""Hand-written Triton kernels for the forward pass without gradients (sampling); an experiment.

:func:`group_norm_act` is ``GroupNorm(x + add)`` followed by SiLU (``act=True``) in one kernel that reads
the activation once and writes the result once. PyTorch's and inductor's GroupNorm read it twice (once for
the statistics, once to normalise) and, in ``channels_last`` memory, with a strided pattern: the first
profile on an H200 (``benchmarks/RESULTS.md``) put the network's 51 GroupNorms at 14 of the 38 ms of a
forward pass at batch 1024, where one read and one write (13.8 GB) at 4.3 TB/s would take about 3.2 ms.

How: one program normalises whole groups of one sample. It loads the ``(H*W, groups, channels per group)``
tile of one or more groups into registers (at most :data:`MAX_TILE` elements; float32 arithmetic), adds
the optional per-(sample, channel) ``add`` (a convolution's bias plus the time embedding's projection,
which would otherwise cost a pass of their own), takes each group's mean, then the mean of the squared
deviations from it (the two-pass variance from registers, with the mean's rounding error measured and
removed), and writes ``(x - mean) * rstd * weight + bias``, SiLU'd, in ``x``'s dtype and memory format
(``channels_last`` or contiguous).

Two more inputs let a network skip the passes around it (:class:`ddpm_lib.accel.FoldedUNet`): ``res``, a second
activation of ``x``'s shape added to it (a residual connection: ``x + res + add`` is normalised without being
written first, and ``return_input=True`` writes it in the same pass for the layers that need it), and ``x2``,
channels appended after ``x``'s (the U-Net's concatenation of the upsampling path with a skip connection: the
groups span both, and ``return_input=True`` writes the concatenation for the residual block's 1x1 convolution).
With ``subpixel=True``, ``x`` is the output of the low-resolution convolution of
:func:`ddpm_lib.accel.upsample_conv_subpixel` (its four phases as channel blocks, :func:`subpixel_interleave`),
and the kernel reads each position of the upsampled activation from its phase: the interleaved activation is
never written (its convolution's bias goes in as ``add``).

Which tile is fastest depends on the card and the shape, and no GPU was at hand when the tile rule
(:func:`tile_for`) was written: so on CUDA, the first call of each new shape (and memory format, dtype and
options) times the candidate tiles of :func:`candidates` (the rule's among them; each is compiled on the spot,
a fraction of a second) and keeps the fastest for that shape (:func:`tuned` lists the choices and timings).
``DDPM_GN_AUTOTUNE=0`` in the environment, or :func:`set_autotune(False) <set_autotune>`, keeps the rule's tile.
No timing happens while a CUDA graph is being captured (the rule's tile is used there unless the shape was
timed before), so a warm-up call before capturing is what gets the timed tile into the graph.

Where it does not apply it is not used, and :func:`group_norm_act` computes the same function with
PyTorch's operators: no Triton, a device other than CUDA (on a CPU, Triton's interpreter runs it under
``TRITON_INTERPRET=1``, set before this module is first imported: that is how the tests check it), a
gradient to compute (the kernel has no backward), a group larger than :data:`MAX_TILE` elements (e.g. a
64x64 activation with more than 4 channels per group), or an input that is not 4-D with its two spatial
dimensions in one stride. Under ``torch.compile`` the kernel is the custom operator
``torch.ops.ddpm_lib.group_norm_act`` (PyTorch >= 2.4), which the compiler calls as it is.
"""
from __future__ import annotations

import contextlib
import os
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F

__all__ = ["MAX_TILE", "available", "supported", "group_norm_act", "group_norm_act_reference", "tile_for",
           "candidates", "set_autotune", "tuned", "subpixel_interleave", "count_traffic"]

try:
    import triton
    import triton.language as tl
except Exception as _exc:  # noqa: BLE001 (no Triton, or one that does not load)
    triton = None
    tl = None
    _IMPORT_ERROR: Optional[str] = f"{type(_exc).__name__}: {str(_exc)[:200]}"
else:
    _IMPORT_ERROR = None

#: The most elements of one program's tile (H*W rounded up to a power of two, times the channels it holds).
MAX_TILE = 16384
# Programs hold about this many elements (several groups where they are small), so that a thread holds about
# 32 values (ptxas for sm_90, the paper's CIFAR-10 shapes in channels_last: 56-64 registers, no spills, so
# four programs of 8 warps fit on a multiprocessor)
_TARGET_TILE = 8192
#: Time the candidate tiles of each new shape on its first call on CUDA (see the module's docstring)
AUTOTUNE = os.environ.get("DDPM_GN_AUTOTUNE", "1") != "0"
# the candidates hold this many values per thread at most and at least (ptxas for sm_90: 64 values take
# about 100 registers and 128 take 168, without spills)
_VALUES_PER_THREAD = (16, 64)
#: Triton's interpreter (numpy on the host) is on: the kernel also runs on CPU tensors.
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def available(device) -> Tuple[bool, str]:
    """Whether the kernel can run on ``device``, and why not."""
    if triton is None:
        return False, f"Triton does not import ({_IMPORT_ERROR})"
    dev = torch.device(device)
    if dev.type == "cuda" or (INTERPRET and dev.type == "cpu"):
        return True, ""
    return False, "the Triton kernel runs on CUDA (on a CPU only under TRITON_INTERPRET=1)"


def tile_for(hw: int, channels: int, num_groups: int) -> Optional[Tuple[int, int, int, int]]:
    """``(BLOCK_HW, BLOCK_G, BLOCK_CPG, num_warps)``: one program's tile of ``BLOCK_G`` whole groups of
    ``BLOCK_CPG`` (channels per group, rounded up to a power of two) channels at ``BLOCK_HW`` positions, for an
    activation of ``hw`` positions; None where one group does not fit in :data:`MAX_TILE` elements."""
    cpg = channels // num_groups
    bhw, bcpg = _pow2(hw), _pow2(cpg)
    if bhw * bcpg > MAX_TILE:
        return None
    bg = max(1, min(_pow2(num_groups), _TARGET_TILE // (bhw * bcpg), 32))
    elements = bhw * bcpg * bg
    return bhw, bg, bcpg, min(16, max(4, elements // 1024))  # about 32 values per thread


def candidates(hw: int, channels: int, num_groups: int) -> List[Tuple[int, int, int, int]]:
    """The tiles the autotuner times for an activation of ``hw`` positions: :func:`tile_for`'s first, then every
    other number of groups per program (a power of two, up to 32 and :data:`MAX_TILE` elements) with 4, 8 or 16
    warps holding 16 to 64 values per thread. Empty where :func:`tile_for` is None."""
    first = tile_for(hw, channels, num_groups)
    if first is None:
        return []
    bhw, _, bcpg, _ = first
    out = [first]
    lo, hi = _VALUES_PER_THREAD
    bg = 1
    while bg <= min(_pow2(num_groups), 32) and bhw * bcpg * bg <= MAX_TILE:
        for warps in (4, 8, 16):
            tile = (bhw, bg, bcpg, warps)
            if lo <= bhw * bcpg * bg // (32 * warps) <= hi and tile not in out:
                out.append(tile)
        bg *= 2
    return out


def set_autotune(on: bool = True) -> None:
    """Switch the timing of candidate tiles on CUDA on or off (:data:`AUTOTUNE`); the tiles chosen so far stay."""
    global AUTOTUNE
    AUTOTUNE = bool(on)


def tuned() -> List[Dict[str, Any]]:
    """The tiles chosen so far: for each timed shape its ``shape``, ``strides``, ``dtype``, options, the chosen
    ``tile`` ``(BLOCK_HW, BLOCK_G, BLOCK_CPG, num_warps)``, each candidate's time (``ms``, in the order of
    :func:`candidates`; None where it failed) and the chosen tile's (``best_ms``)."""
    return [dict(v, tile=list(v["tile"])) for v in _TUNED.values()]


def subpixel_interleave(z: torch.Tensor) -> torch.Tensor:
    """The ``(N, C, 2H, 2W)`` activation whose four phases ``z (N, 4 C, H+1, W+1)`` holds: pixel ``(2i+a, 2j+b)``
    is ``z[:, p C:(p+1) C, i+a, j+b]`` with ``p = 2a + b`` (the layout of
    :func:`ddpm_lib.accel.upsample_conv_subpixel`'s convolution), in ``z``'s memory format."""
    N, C4, Hz, Wz = z.shape
    if C4 % 4 or Hz < 2 or Wz < 2:
        raise ValueError(f"z must be (N, 4 C, H + 1, W + 1), got {tuple(z.shape)}")
    C, H, W = C4 // 4, Hz - 1, Wz - 1
    cl = not z.is_contiguous() and z.is_contiguous(memory_format=torch.channels_last)
    out = torch.empty((N, C, 2 * H, 2 * W), dtype=z.dtype, device=z.device,
                      memory_format=torch.channels_last if cl else torch.contiguous_format)
    for a in (0, 1):
        for b in (0, 1):
            p = 2 * a + b
            out[:, :, a::2, b::2] = z[:, p * C:(p + 1) * C, a:a + H, b:b + W]
    return out


def _logical_shape(x: torch.Tensor, subpixel: bool) -> Tuple[int, int, int, int]:
    """``(N, C1, H, W)`` of the activation ``x`` stands for (its four phases with ``subpixel``)."""
    N, C, H, W = x.shape
    return (N, C // 4, 2 * (H - 1), 2 * (W - 1)) if subpixel else (N, C, H, W)


def _spatial_ok(t: torch.Tensor) -> bool:
    """4-D with the two spatial dimensions in one stride (one index over ``H*W`` positions)."""
    return t.ndim == 4 and (t.shape[2] <= 1 or t.stride(2) == t.shape[3] * t.stride(3))


def supported(x: torch.Tensor, num_groups: int, weight: Optional[torch.Tensor] = None,
              bias: Optional[torch.Tensor] = None, add: Optional[torch.Tensor] = None,
              res: Optional[torch.Tensor] = None, x2: Optional[torch.Tensor] = None, subpixel: bool = False) -> bool:
    """Whether :func:`group_norm_act` runs the kernel for these arguments."""
    if triton is None or x.ndim != 4 or x.dtype not in _DTYPES:
        return False
    if subpixel and (x.shape[1] % 4 or x.shape[2] < 2 or x.shape[3] < 2 or res is not None):
        return False
    if not (x.device.type == "cuda" or (INTERPRET and x.device.type == "cpu")):
        return False
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, weight, bias, add, res, x2)):
        return False
    N, C1, H, W = _logical_shape(x, subpixel)
    C = C1 + (x2.shape[1] if x2 is not None and x2.ndim == 4 else 0)
    if C % num_groups or N == 0 or H * W == 0 or not _spatial_ok(x):
        return False
    for t in (res, x2):  # same batch, positions, dtype and device as x
        if t is not None and not (t.ndim == 4 and t.shape[0] == N and tuple(t.shape[2:]) == (H, W)
                                  and t.dtype == x.dtype and t.device == x.device and _spatial_ok(t)):
            return False
    if res is not None and res.shape[1] != C1:
        return False
    if any(t is not None and tuple(t.shape) != (C,) for t in (weight, bias)):
        return False
    if add is not None and tuple(add.shape) not in ((N, C1), (C1,)):  # (1, C) and others: the reference broadcasts
        return False
    return tile_for(H * W, C, num_groups) is not None


def group_norm_act_reference(x: torch.Tensor, num_groups: int, weight: Optional[torch.Tensor] = None,
                             bias: Optional[torch.Tensor] = None, eps: float = 1e-5,
                             add: Optional[torch.Tensor] = None, act: bool = False, *,
                             res: Optional[torch.Tensor] = None, x2: Optional[torch.Tensor] = None,
                             return_input: bool = False, subpixel: bool = False):
    """The function the kernel computes, in PyTorch operators: with ``v = cat([x + res + add[..., None, None],
    x2], dim=1)`` (each of ``res``, ``add``, ``x2`` optional; ``add`` is ``(N, C1)`` or ``(C1,)`` for ``x``'s
    ``C1`` channels; with ``subpixel``, ``x`` is first :func:`subpixel_interleave` of the ``x`` given),
    ``SiLU(GroupNorm(v))`` (SiLU only with ``act``), and ``v`` too with ``return_input``."""
    if subpixel:
        x = subpixel_interleave(x)
    if res is not None:
        x = x + res
    if add is not None:
        x = x + (add.reshape(1, -1, 1, 1) if add.ndim == 1 else add[:, :, None, None])
    if x2 is not None:
        x = torch.cat([x, x2], dim=1)
    y = F.group_norm(x, num_groups, weight, bias, eps)
    y = F.silu(y) if act else y
    return (y, x) if return_input else y


if triton is not None:
    @triton.jit
    def _group_norm_act_kernel(X, RES, X2, Y, S, Wt, Bs, ADD, inv_count, eps, san, sac,
                               sxn: tl.constexpr, sxhw: tl.constexpr, sxc: tl.constexpr, srn: tl.constexpr,
                               srhw: tl.constexpr, src: tl.constexpr, s2n: tl.constexpr, s2hw: tl.constexpr,
                               s2c: tl.constexpr, syn: tl.constexpr, syhw: tl.constexpr, syc: tl.constexpr,
                               ssn: tl.constexpr, sshw: tl.constexpr, ssc: tl.constexpr, C1: tl.constexpr,
                               HW: tl.constexpr, G: tl.constexpr, CPG: tl.constexpr, BLOCK_HW: tl.constexpr,
                               BLOCK_G: tl.constexpr, BLOCK_CPG: tl.constexpr, HAS_W: tl.constexpr,
                               HAS_B: tl.constexpr, HAS_ADD: tl.constexpr, HAS_RES: tl.constexpr,
                               HAS_X2: tl.constexpr, HAS_S: tl.constexpr, ACT: tl.constexpr,
                               SUBPIXEL: tl.constexpr, WO: tl.constexpr, WZ: tl.constexpr):
        # one program: sample n, groups g0 .. g0 + BLOCK_G - 1, all HW positions; tile (BLOCK_HW, BLOCK_G, BLOCK_CPG).
        # The activations' strides are compile-time constants (one compilation per shape and memory format), so
        # that the compiler sees a channels_last group's channels lie together and loads them as vectors.
        # programs next to each other in the launch order take neighbouring groups of one sample, so that the
        # memory sectors they share (channels_last: a position's channels lie together) meet in L2.
        # Channels c < C1 are x (+ res + add), channels c >= C1 are x2's channel c - C1. With SUBPIXEL, X holds the
        # four phases of an upsampled activation of width WO (subpixel_interleave): position (h, w) of phase
        # p = 2 (h % 2) + w % 2 is X's position (h // 2 + h % 2, w // 2 + w % 2) of a row of WZ, channels p C1 + c.
        blocks: tl.constexpr = (G + BLOCK_G - 1) // BLOCK_G
        pid = tl.program_id(0)
        n = (pid // blocks).to(tl.int64)
        g = (pid % blocks) * BLOCK_G + tl.arange(0, BLOCK_G)
        j = tl.arange(0, BLOCK_CPG)
        c = g[:, None] * CPG + j[None, :]  # (BLOCK_G, BLOCK_CPG) channel indices
        cmask = (g[:, None] < G) & (j[None, :] < CPG)
        hw = tl.arange(0, BLOCK_HW)
        mask = (hw < HW)[:, None, None] & cmask[None, :, :]
        if HAS_X2:
            cmask1 = cmask & (c < C1)
        else:
            cmask1 = cmask
        mask1 = (hw < HW)[:, None, None] & cmask1[None, :, :]
        if SUBPIXEL:
            hh = hw // WO
            ww = hw % WO
            xoff = ((hh // 2 + hh % 2) * WZ + ww // 2 + ww % 2) * sxhw + ((hh % 2) * 2 + ww % 2) * (C1 * sxc)
        else:
            xoff = hw * sxhw
        x = tl.load(X + n * sxn + xoff[:, None, None] + c[None, :, :] * sxc, mask=mask1, other=0.0)
        x = x.to(tl.float32)
        if HAS_RES:
            x += tl.load(RES + n * srn + hw[:, None, None] * srhw + c[None, :, :] * src, mask=mask1,
                         other=0.0).to(tl.float32)
        if HAS_ADD:
            a = tl.load(ADD + n * san + c * sac, mask=cmask1, other=0.0).to(tl.float32)
            x = tl.where(mask1, x + a[None, :, :], 0.0)
        if HAS_X2:
            mask2 = (hw < HW)[:, None, None] & (cmask & (c >= C1))[None, :, :]
            x += tl.load(X2 + n * s2n + hw[:, None, None] * s2hw + (c[None, :, :] - C1) * s2c, mask=mask2,
                         other=0.0).to(tl.float32)
        if HAS_S:  # the normalised input itself, for the layers that read it
            tl.store(S + n * ssn + hw[:, None, None] * sshw + c[None, :, :] * ssc, x.to(S.dtype.element_ty), mask=mask)
        mean = tl.sum(tl.sum(x, axis=2), axis=0) * inv_count  # (BLOCK_G,)
        d = tl.where(mask, x - mean[None, :, None], 0.0)
        # the mean's own rounding error (a large mean summed in float32), measured and taken out
        dm = tl.sum(tl.sum(d, axis=2), axis=0) * inv_count
        var = tl.sum(tl.sum(d * d, axis=2), axis=0) * inv_count - dm * dm
        rstd = 1.0 / tl.sqrt(tl.maximum(var, 0.0) + eps)
        scale = tl.broadcast_to(rstd[:, None], (BLOCK_G, BLOCK_CPG))
        if HAS_W:
            scale = scale * tl.load(Wt + c, mask=cmask, other=1.0).to(tl.float32)
        y = (d - dm[None, :, None]) * scale[None, :, :]
        if HAS_B:
            y = y + tl.load(Bs + c, mask=cmask, other=0.0).to(tl.float32)[None, :, :]
        if ACT:
            y = y * tl.sigmoid(y)
        tl.store(Y + n * syn + hw[:, None, None] * syhw + c[None, :, :] * syc, y.to(Y.dtype.element_ty), mask=mask)


_TUNED: Dict[Any, Dict[str, Any]] = {}
# the counts of count_traffic's block (None outside one)
_TRAFFIC: Optional[Dict[str, Any]] = None


@contextlib.contextmanager
def count_traffic():
    """Count, within the block, what the kernel's launches move: yields a dict that fills with ``calls`` (launches
    of :func:`group_norm_act`'s kernel, not the autotuner's timing runs), ``bytes_read`` and ``bytes_written``
    (each activation value the kernel loads or stores once: ``x`` at its logical positions, ``res``, ``x2``,
    ``add``, ``weight`` and ``bias``; ``y`` and, with ``return_input``, the input), and ``by_call``: for each
    distinct call (``"C1+C2 HxW"`` and its options) its ``calls``, ``bytes_read`` and ``bytes_written``, the
    ``tiles`` its launches used, and ``timed_ms``, the sum over its ``timed_calls`` launches of the autotuner's time
    of the chosen tile (on CUDA, for a shape it timed: the kernel alone on that call's tensors, the best of three
    rounds of three calls back to back, so that a tensor smaller than the L2 cache is read from it).
    With the kernels' time (a profile), the bytes give their bandwidth. The reference's fallbacks are not
    counted, nor the launches a CUDA graph replays (they do not run this module's code)."""
    global _TRAFFIC
    outer, _TRAFFIC = _TRAFFIC, dict(calls=0, bytes_read=0, bytes_written=0, by_call={})
    try:
        yield _TRAFFIC
    finally:
        _TRAFFIC = outer


def _count(x: torch.Tensor, N: int, C1: int, C2: int, H: int, W: int, weight, bias, add,
           options: Dict[str, Any], tile: Tuple[int, int, int, int], timed_ms: Optional[float] = None) -> None:
    """Add one launch (``options`` as :func:`_launch` keys its tiles by, with ``tile``; ``timed_ms``: the autotuner's
    time of that tile for this call, where it timed one) to :func:`count_traffic`'s counts."""
    e = x.element_size()
    read = e * N * H * W * (C1 * (2 if options["res"] else 1) + C2)
    read += sum(t.numel() * t.element_size() for t in (weight, bias) if t is not None)
    if add is not None:  # (N, C1), possibly an expanded (C1,)
        read += (add.numel() if add.stride(0) else C1) * add.element_size()
    written = e * N * H * W * (C1 + C2) * (2 if options["return_input"] else 1)
    name = f"{C1}+{C2} {H}x{W}" + "".join(f", {k}" for k in ("add", "res", "return_input", "subpixel", "act")
                                          if options[k])
    by = _TRAFFIC["by_call"].setdefault(name, dict(calls=0, bytes_read=0, bytes_written=0, timed_calls=0,
                                                   timed_ms=0.0, tiles=[]))
    for d in (_TRAFFIC, by):
        d["calls"] += 1
        d["bytes_read"] += read
        d["bytes_written"] += written
    if list(tile) not in by["tiles"]:
        by["tiles"].append(list(tile))
    if timed_ms is not None:
        by["timed_calls"] += 1
        by["timed_ms"] += timed_ms


def _autotune_on(x: torch.Tensor) -> bool:
    return AUTOTUNE and x.device.type == "cuda" and not torch.cuda.is_current_stream_capturing()


def _time_tile(tile: Tuple[int, int, int, int], run: Callable[[], Any], device: torch.device) -> float:
    """Milliseconds per call of ``run`` (the kernel with ``tile``, compiled by a first call): the best of three
    rounds of three calls, timed with CUDA events."""
    with torch.cuda.device(device):
        run()
        best = float("inf")
        for _ in range(3):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(3):
                run()
            end.record()
            end.synchronize()
            best = min(best, start.elapsed_time(end) / 3)
    return best


def _tile(x: torch.Tensor, key: Any, run: Callable[[Tuple[int, int, int, int]], Any], num_groups: int,
          channels: int, hw: int, options: Dict[str, Any]) -> Tuple[int, int, int, int]:
    """The tile for this call: the one chosen for ``key`` before, else (autotuning) the fastest candidate, timed
    now (writing the outputs, which the caller writes again), else :func:`tile_for`'s."""
    entry = _TUNED.get(key)
    if entry is not None:
        return entry["tile"]
    cands = candidates(hw, channels, num_groups)
    if len(cands) < 2 or not _autotune_on(x):
        return cands[0]
    ms: List[Optional[float]] = []
    for tile in cands:
        try:
            ms.append(float(_time_tile(tile, lambda tile=tile: run(tile), x.device)))
        except Exception:  # noqa: BLE001 (a tile this card or compiler cannot run: not a candidate)
            ms.append(None)
    ok = [(m, i) for i, m in enumerate(ms) if m is not None and m == m]
    tile = cands[min(ok)[1]] if ok else cands[0]
    _TUNED[key] = dict(shape=list(x.shape), strides=list(x.stride()), dtype=str(x.dtype).replace("torch.", ""),
                       options=dict(options), tile=tuple(tile), candidates=[list(c) for c in cands],
                       ms=[None if m is None else round(m, 4) for m in ms], best_ms=min(ok)[0] if ok else None)
    return tile


def _outputs(x: torch.Tensor, x2: Optional[torch.Tensor], return_input: bool, subpixel: bool = False):
    """The kernel's outputs, empty: ``y`` and (``return_input``) the normalised input, in ``x``'s dtype and memory
    format (its strides where there is neither ``x2`` nor ``subpixel``; else channels_last or contiguous, as
    ``x`` is), else None."""
    if x2 is None and not subpixel:
        y = torch.empty_like(x)
        return y, (torch.empty_like(x) if return_input else None)
    N, C1, H, W = _logical_shape(x, subpixel)
    cl = x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
    fmt = torch.channels_last if cl else torch.contiguous_format

    def new() -> torch.Tensor:
        return torch.empty((N, C1 + (0 if x2 is None else x2.shape[1]), H, W), dtype=x.dtype, device=x.device,
                           memory_format=fmt)
    return new(), (new() if return_input else None)


def _strides(t: Optional[torch.Tensor]) -> Tuple[int, int, int]:
    """(sample, position, channel) strides; zeros for an absent tensor."""
    return (t.stride(0), t.stride(3), t.stride(1)) if t is not None else (0, 0, 0)


def _launch(x: torch.Tensor, weight: Optional[torch.Tensor], bias: Optional[torch.Tensor],
            add: Optional[torch.Tensor], num_groups: int, eps: float, act: bool,
            tile: Optional[Tuple[int, int, int, int]] = None, *, res: Optional[torch.Tensor] = None,
            x2: Optional[torch.Tensor] = None, return_input: bool = False, subpixel: bool = False):
    """The kernel (arguments as :func:`group_norm_act`'s, already :func:`supported`) with ``tile``, or with the
    tile chosen for this shape (:func:`_tile`) when ``tile`` is None. Returns ``y``, or ``(y, input)``."""
    N, C1, H, W = _logical_shape(x, subpixel)
    C = C1 + (x2.shape[1] if x2 is not None else 0)
    hw = H * W
    cpg = C // num_groups
    y, s = _outputs(x, x2, return_input, subpixel)
    if add is not None and add.ndim == 1:
        add = add.reshape(1, C1).expand(N, C1)
    # the kernel reads weight and bias with stride 1
    weight = None if weight is None else weight.contiguous()
    bias = None if bias is None else bias.contiguous()
    dummy = x  # never read: the matching HAS_* is False
    sx, sr, s2, sy, ss = (_strides(t) for t in (x, res, x2, y, s))

    def run(tile: Tuple[int, int, int, int]) -> None:
        bhw, bg, bcpg, warps = tile
        grid = (triton.cdiv(num_groups, bg) * N,)  # one axis: no limit of 65,535 on the batch
        _group_norm_act_kernel[grid](
            x, res if res is not None else dummy, x2 if x2 is not None else dummy, y, s if s is not None else y,
            weight if weight is not None else dummy, bias if bias is not None else dummy,
            add if add is not None else dummy, 1.0 / (cpg * hw), float(eps),
            add.stride(0) if add is not None else 0, add.stride(1) if add is not None else 0,
            sxn=sx[0], sxhw=sx[1], sxc=sx[2], srn=sr[0], srhw=sr[1], src=sr[2], s2n=s2[0], s2hw=s2[1], s2c=s2[2],
            syn=sy[0], syhw=sy[1], syc=sy[2], ssn=ss[0], sshw=ss[1], ssc=ss[2], C1=C1,
            HW=hw, G=num_groups, CPG=cpg, BLOCK_HW=bhw, BLOCK_G=bg, BLOCK_CPG=bcpg, HAS_W=weight is not None,
            HAS_B=bias is not None, HAS_ADD=add is not None, HAS_RES=res is not None, HAS_X2=x2 is not None,
            HAS_S=s is not None, ACT=bool(act), SUBPIXEL=bool(subpixel), WO=W if subpixel else 1,
            WZ=x.shape[3] if subpixel else 1, num_warps=warps)

    # one tile per shape, memory formats, dtype, device and options (the compiled kernel's constants, and the batch)
    options = dict(weight=weight is not None, bias=bias is not None, add=add is not None, act=bool(act),
                   res=res is not None, x2=None if x2 is None else x2.shape[1], return_input=bool(return_input),
                   subpixel=bool(subpixel))
    key = (tuple(x.shape), sx, sr, s2, sy, x.dtype, x.device, num_groups, tuple(options.items()))
    chosen = tuple(tile) if tile is not None else _tile(x, key, run, num_groups, C, hw, options)
    run(chosen)
    if _TRAFFIC is not None:
        timed = _TUNED.get(key) if tile is None else None
        _count(x, N, C1, C - C1, H, W, weight, bias, add, options, chosen, timed and timed.get("best_ms"))
    return (y, s) if return_input else y


_OP = None
if hasattr(torch.library, "custom_op"):  # PyTorch >= 2.4: one opaque operator under torch.compile
    try:
        @torch.library.custom_op("ddpm_lib::group_norm_act", mutates_args=())
        def _group_norm_act_op(x: torch.Tensor, weight: Optional[torch.Tensor], bias: Optional[torch.Tensor],
                               add: Optional[torch.Tensor], res: Optional[torch.Tensor], x2: Optional[torch.Tensor],
                               num_groups: int, eps: float, act: bool, return_input: bool,
                               subpixel: bool) -> Tuple[torch.Tensor, torch.Tensor]:
            out = _launch(x, weight, bias, add, num_groups, eps, act, res=res, x2=x2, return_input=return_input,
                          subpixel=subpixel)
            return out if return_input else (out, x.new_empty(0))

        @_group_norm_act_op.register_fake
        def _(x, weight, bias, add, res, x2, num_groups, eps, act, return_input, subpixel):
            y, s = _outputs(x, x2, return_input, subpixel)
            return y, (s if s is not None else x.new_empty(0))
    except Exception:  # noqa: BLE001 (already registered by an earlier import of this file under another name)
        _OP = getattr(getattr(torch.ops, "ddpm_lib", None), "group_norm_act", None)
    else:
        _OP = _group_norm_act_op


def group_norm_act(x: torch.Tensor, num_groups: int, weight: Optional[torch.Tensor] = None,
                   bias: Optional[torch.Tensor] = None, eps: float = 1e-5, add: Optional[torch.Tensor] = None,
                   act: bool = False, *, res: Optional[torch.Tensor] = None, x2: Optional[torch.Tensor] = None,
                   return_input: bool = False, subpixel: bool = False):
    """``SiLU(GroupNorm(v))`` (SiLU with ``act``) of ``v = cat([x + res + add, x2], dim=1)`` (``res``, ``add``
    and ``x2`` optional; with ``subpixel``, ``x`` is the four phases of the activation, ``(N, 4 C1, H/2 + 1,
    W/2 + 1)``, :func:`subpixel_interleave`): the Triton kernel where :func:`supported`, else
    :func:`group_norm_act_reference`.
    Returns the result, and ``v`` too with ``return_input`` (``(y, v)``). Shapes: ``x (N, C1, H, W)``, ``res``
    as ``x``, ``add (N, C1)`` or ``(C1,)``, ``x2 (N, C2, H, W)``, ``weight, bias (C1 + C2,)`` ->
    ``(N, C1 + C2, H, W)``. The kernel returns ``x``'s dtype and memory format; the reference follows PyTorch's
    own rules (``x + add`` promotes bfloat16 to a float32 ``add``'s dtype, and GroupNorm under CUDA autocast
    returns float32), so that its dtype can differ: the values do not."""
    if not supported(x, num_groups, weight, bias, add, res, x2, subpixel):
        return group_norm_act_reference(x, num_groups, weight, bias, eps, add, act, res=res, x2=x2,
                                        return_input=return_input, subpixel=subpixel)
    if _OP is not None:
        y, v = _OP(x, weight, bias, add, res, x2, num_groups, float(eps), bool(act), bool(return_input),
                   bool(subpixel))
        return (y, v) if return_input else y
    return _launch(x, weight, bias, add, num_groups, eps, act, res=res, x2=x2, return_input=return_input,
                   subpixel=subpixel)
