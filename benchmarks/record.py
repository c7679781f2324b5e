"""Put the results of one ``throughput.py`` run into the documents that quote them.

``throughput.py`` writes one JSON file per run (``benchmarks/results/<card>.json``). This script turns that
file into a Markdown section (the table of every mode, the two ratios against their targets, the
correctness checks of the same run, the projected sampling times) and writes it between the markers

    <!-- measured:begin -->
    ...
    <!-- measured:end -->

of ``benchmarks/RESULTS.md`` and of the book's GPU-speed page (``book/gpu_speed.md``), so the figures in
the documents are always the figures of a file in ``benchmarks/results/``. Nothing is typed by hand.

    python benchmarks/record.py benchmarks/results/nvidia-h100-80gb-hbm3.json
    python benchmarks/record.py RUN.json --print              # only print the section
    python benchmarks/record.py RUN.json --copy-to benchmarks/results   # copy the JSON there first

A CPU run (``--size tiny``, what CI runs) says nothing about a GPU; it is refused unless ``--allow-cpu``
(for tests).
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "benchmarks" / "RESULTS.md", ROOT / "book" / "gpu_speed.md"]
BEGIN, END = "<!-- measured:begin -->", "<!-- measured:end -->"
REQUIRED = ["card", "torch", "train_images_per_s", "infer_images_per_s", "diffusers_best_train_images_per_s",
            "diffusers_best_infer_images_per_s", "train_ratio_vs_diffusers", "infer_ratio_vs_diffusers", "modes"]


def _n(v: Optional[float], fmt: str = "{:,.0f}") -> str:
    return fmt.format(v) if isinstance(v, (int, float)) and v else "-"


def _duration(sec: Optional[float]) -> str:
    if not sec:
        return "-"
    return f"{sec / 60:.1f} min" if sec < 3600 else f"{sec / 3600:.2f} h"


def _tflops(rate: Optional[float], mult: int, gflop: Optional[float], peak: Optional[float]) -> str:
    if not (rate and gflop):
        return "-"
    v = rate * mult * gflop / 1e3
    return f"{v:.3g} ({100 * v / peak:.0f} %)" if peak else f"{v:.3g}"


def _ratio(a: Optional[float], b: Optional[float]) -> str:
    return f"{a / b:.2f}×" if a and b else "-"


def _networks_alone(d: Dict[str, Any]) -> Tuple[Optional[float], Optional[str]]:
    """diffusers' best training rate with its network in ddpm_lib's step: the ``+ddpm_step`` rows and the
    graphed ``bf16_cl_compile_graph`` row, the same step as ddpm_lib's ``fast``. Taken from the rows, not the
    JSON's summary: files written before 2026-12-07 left the graphed row out of it."""
    vals = [(r["train_images_per_s"], r["mode"]) for r in d.get("modes", [])
            if r.get("network") == "diffusers" and r.get("train_images_per_s")
            and (r["mode"].endswith("+ddpm_step") or r["mode"] == "bf16_cl_compile_graph")]
    return max(vals) if vals else (None, None)


def _pct(a: Optional[float], b: Optional[float]) -> str:
    return f"{100 * a / b:.0f} %" if a and b else "-"


def _verdict(ratio: Optional[float], target: float) -> str:
    if not ratio:
        return "not measured"
    return f"target {target}×: **met**" if ratio >= target else f"target {target}×: **not met**"


def public_command(command: str) -> str:
    """``command`` without the machine's own paths (the values of ``--out`` and ``--json-path``)."""
    words, out, skip = command.split(), [], False
    for w in words:
        if skip:
            skip = False
            continue
        if w in ("--out", "--json-path"):
            skip = True
            continue
        if w.startswith(("--out=", "--json-path=")):
            continue
        out.append(w)
    return " ".join(out)


def check(data: Dict[str, Any], allow_cpu: bool = False) -> None:
    """Raise ValueError if ``data`` is not a complete-enough result of ``throughput.py`` on a GPU."""
    missing = [k for k in REQUIRED if k not in data]
    if missing:
        raise ValueError(f"not a throughput.py result: missing {missing}")
    if data["card"] == "cpu" and not allow_cpu:
        raise ValueError("this is a CPU run (the CI check at a tiny size); it says nothing about a GPU. "
                         "Record a run of `throughput.py --device cuda` (or pass --allow-cpu for a test)")
    if not data["train_images_per_s"] and not data["infer_images_per_s"]:
        raise ValueError("the run measured no rate of ddpm_lib; nothing to record")


def render(data: Dict[str, Any], json_name: str) -> str:
    """The Markdown section for one run (no markers); ``json_name``: its file in ``benchmarks/results/``."""
    d = data
    gflop, peak = d.get("forward_gflop_per_image"), d.get("matmul_peak_tflops")
    st = d.get("settings", {})
    tb, ib = st.get("train_batch", "?"), st.get("infer_batch", "?")
    name = d.get("device_name") or d["card"]
    versions = [f"PyTorch {d['torch']}"]
    for key, label in (("cuda", "CUDA"), ("cudnn", "cuDNN"), ("triton", "Triton"), ("python", "Python")):
        if d.get(key):
            versions.append(f"{label} {d[key]}")
    if d.get("diffusers"):
        versions.append(str(d["diffusers"]))
    card_bits = [b for b in (f"{d['memory_gib']} GiB" if d.get("memory_gib") else "",
                             f"compute capability {d['capability']}" if d.get("capability") else "") if b]
    out: List[str] = []
    out.append(f"Measured on one **{name}**" + (f" ({', '.join(card_bits)})" if card_bits else "")
               + (f", {d['date_utc']} UTC" if d.get("date_utc") else "") + ", in one run: "
               + ", ".join(versions) + ".")
    out.append("")
    if d.get("command"):
        out.append(f"Command: `{public_command(d['command'])}`. Raw numbers: `benchmarks/results/{json_name}`.")
        out.append("")
    if d.get("size", "full") != "full":
        out.append(f"**This is a `--size {d['size']}` run: a small network, not the paper's. Its rates say "
                   "nothing about the CIFAR-10 model.**")
        out.append("")
    out.append(f"| network | mode | train img/s (batch {tb}) | train TFLOP/s (% of peak) | × diffusers | "
               f"inference img/s (batch {ib}) | inference TFLOP/s (% of peak) | × diffusers | compile s (train/inf) |")
    out.append("|---|---|---:|---:|---:|---:|---:|---:|---:|")
    dt, di = d["diffusers_best_train_images_per_s"], d["diffusers_best_infer_images_per_s"]
    notes: List[str] = []
    per_call: List[Tuple[str, str, Dict[str, Any]]] = []
    info_only = experiment = option = False
    for r in sorted(d["modes"], key=lambda r: (r["network"] != "ours", r["mode"])):
        tr, inf = r.get("train_images_per_s"), r.get("infer_images_per_s")
        mode = f"`{r['mode']}`"
        if r["network"] == "diffusers" and not r.get("counts_for_diffusers_baseline", True):
            mode += "*"
            info_only = True
        if r.get("experiment"):
            mode += "‡" if r.get("sampling_option") else "†"
            experiment = True
            option = option or bool(r.get("sampling_option"))
        net = "ddpm_lib" if r["network"] == "ours" else r["network"]
        comp = f"{r.get('train_compile_s', '-')}/{r.get('infer_compile_s', '-')}"
        out.append(f"| {net} | {mode} | {_n(tr)} | {_tflops(tr, 3, gflop, peak)} | {_ratio(tr, dt)} | {_n(inf)} | "
                   f"{_tflops(inf, 1, gflop, peak)} | {_ratio(inf, di)} | {comp} |")
        for what in ("train_error", "infer_error"):
            if r.get(what):
                notes.append(f"{net} `{r['mode']}` {what.split('_')[0]}: {str(r[what])[:200]}")
        if r.get("infer_rel_err_vs_fp32") is not None:
            notes.append(f"{net} `{r['mode']}`: output against float32 eager, relative error "
                         f"{r['infer_rel_err_vs_fp32']:.1e} ({'within' if r.get('infer_same_function') else 'NOT within'}"
                         f" bf16 tolerance 2e-2)")
        kt = r.get("gn_kernel_traffic") or {}
        if kt.get("calls_per_forward"):
            line = (f"{net} `{r['mode']}`: the GroupNorm kernel (`ddpm_lib.kernels`) moves {kt['gb']:.3g} GB per "
                    f"forward ({kt['bytes_read'] / 1e9:.3g} read, {kt['bytes_written'] / 1e9:.3g} written) in "
                    f"{kt['calls_per_forward']} launches")
            if kt.get("tb_per_s"):
                line += (f", in {kt['kernel_ms']:.3g} ms of kernel time (profile): **{kt['tb_per_s']:.3g} TB/s** on "
                         f"average")
            notes.append(line)
            if any(v.get("timed_tb_per_s") for v in (kt.get("by_call") or {}).values()):
                per_call.append((net, r["mode"], kt))
        elif kt.get("error"):
            notes.append(f"{net} `{r['mode']}`: GroupNorm kernel traffic not counted: {kt['error']}")
    out.append("")
    if info_only:
        base = ", ".join(f"`{r['mode']}`" for r in d["modes"] if r.get("counts_for_diffusers_baseline"))
        out.append(f"\\* For information only: not among the modes diffusers' baseline is taken over ({base}).")
        out.append("")
    if experiment:
        out.append("† An experiment, not (yet) what ddpm_lib does by default, so not counted as its best: `_tgn` "
                   "runs each GroupNorm (+ SiLU, + the residual block's bias and time-embedding term) as one Triton "
                   "kernel when no gradient is needed (`ddpm_lib.kernels`, `set_group_norm(model, \"triton\")`), "
                   "`_sp` computes each upsampling convolution at the low resolution (`accel.set_upsample`), "
                   "`_pad` pads the first and last convolutions' 3 channels to 8 (`accel.set_channel_padding`), "
                   "`_all` the three, `_fold` the three with each residual sum and skip concatenation formed, each "
                   "convolution bias added and each sub-pixel upsampling interleaved by the GroupNorm kernel that "
                   "follows it (`accel.set_residual_fold`), `_gnm` every GroupNorm from "
                   "per-channel moments. The TFLOP/s of every row count the paper network's multiply-adds; `_sp`, "
                   "`_all` and `_fold` do fewer (the upsampling convolutions at the low resolution), so theirs "
                   "are equivalent rates.")
        out.append("")
    if option:
        out.append("‡ The experiment that ddpm_lib's sampling option `accel.make_sampler_forward(experimental=True)` "
                   "(`python -m ddpm_lib sample --experimental-kernels`) sets up, off by default: its inference "
                   "counts as ddpm_lib's best only where its output passed the check against float32 eager.")
        out.append("")
    if st.get("diffusers_baseline_step"):
        out.append(f"diffusers' training rows without a star time its network in a plain PyTorch step "
                   f"(`torch.optim.Adam` with PyTorch's default implementation, `clip_grad_norm_` with its defaults, "
                   f"diffusers' `EMAModel`; data, t and noise drawn on the device, no host synchronisation): the "
                   f"baseline of the ratios. The `+ddpm_step` rows run the same network in ddpm_lib's step "
                   f"(fused Adam, foreach clipping and EMA) and compare the networks alone.")
        out.append("")
    tr_ratio, inf_ratio = d["train_ratio_vs_diffusers"], d["infer_ratio_vs_diffusers"]
    targets = d.get("targets", {"train_ratio": 2.0, "infer_ratio": 1.5})
    out.append(f"- **Training:** ddpm_lib {_n(d['train_images_per_s'])} images/s (`{d.get('train_best_mode')}`) "
               f"against diffusers' best {_n(dt)} (`{d.get('diffusers_best_train_mode')}`): "
               f"**{_n(tr_ratio, '{:.2f}')}×** ({_verdict(tr_ratio, targets['train_ratio'])}).")
    alone, alone_mode = _networks_alone(d)
    if alone and d.get("train_images_per_s"):
        out.append(f"- Networks alone: diffusers' network in ddpm_lib's own training step (rows `+ddpm_step`, "
                   f"and `bf16_cl_compile_graph`, the graphed step `fast` uses) reaches at best "
                   f"{_n(alone)} images/s (`{alone_mode}`), and ddpm_lib's best is "
                   f"**{_n(d['train_images_per_s'] / alone, '{:.2f}')}×** that.")
    for r in d["modes"]:
        opts = r.get("trainer_options")
        if opts and r.get("train_images_per_s"):
            # what the trainer meant to use (recorded since 2026-11-27; before, only an explicit option says it)
            wants_graph = r.get("train_cuda_graph_requested", "cuda_graph=True" in opts)
            graphed = ("" if not wants_graph or r.get("train_cuda_graph")
                       else "; **the CUDA graph was not used**, see the JSON's note")
            out.append(f"- `ddpm_lib.Trainer` itself (`{r['mode']}`: options {opts}, {trainer_settings(r)}, its own "
                       f"loop with logging{graphed}): {_n(r['train_images_per_s'])} images/s, "
                       f"{_ratio(r['train_images_per_s'], dt)} diffusers' best.")
    via = f", the sampling option `{d['infer_best_option']}`" if d.get("infer_best_option") else ""
    out.append(f"- **Inference:** ddpm_lib {_n(d['infer_images_per_s'])} images/s (`{d.get('infer_best_mode')}`{via}) "
               f"against diffusers' best {_n(di)} (`{d.get('diffusers_best_infer_mode')}`): "
               f"**{_n(inf_ratio, '{:.2f}')}×** ({_verdict(inf_ratio, targets['infer_ratio'])}).")
    cf = d.get("conv_floor") or {}
    if cf.get("train_images_per_s") and cf.get("bias") is False:
        out.append(f"- Convolution floor, same run: the network's {cf.get('convolutions')} convolutions, each timed "
                   f"alone ({cf.get('note', '')}) and added up, with everything else counted as free, allow at "
                   f"most {_n(cf['train_images_per_s'])} training images/s "
                   f"({_n(cf.get('train_ms_per_step'), '{:.2f}')} ms per step) and {_n(cf['infer_images_per_s'])} "
                   f"inference images/s, i.e. {_ratio(cf['train_images_per_s'], dt)} and "
                   f"{_ratio(cf['infer_images_per_s'], di)} diffusers' best: the most any implementation reaches "
                   f"with these convolution kernels. ddpm_lib's best runs at "
                   f"{_pct(d['train_images_per_s'], cf['train_images_per_s'])} and "
                   f"{_pct(d['infer_images_per_s'], cf['infer_images_per_s'])} of it.")
    elif cf.get("train_images_per_s"):  # runs before 2026-11-27 timed each convolution with its bias
        out.append(f"- Convolution sum, same run (**not a floor**): the network's {cf.get('convolutions')} "
                   f"convolutions, each timed alone with its bias ({cf.get('note', '')}) and added up, take "
                   f"{_n(cf.get('train_ms_per_step'), '{:.2f}')} ms per training step and "
                   f"{_n(cf.get('infer_ms_per_batch'), '{:.2f}')} ms per inference batch "
                   f"({_n(cf['train_images_per_s'])} and {_n(cf['infer_images_per_s'])} images/s). PyTorch adds "
                   "a cuDNN convolution's bias in a kernel of its own, which a compiled network folds into the "
                   "next kernel, so this sum overstates what the convolutions need (compare the convolution row "
                   "of the profile below); throughput.py now times them without the bias.")
    elif cf.get("error"):
        out.append(f"- Convolution floor not measured: {cf['error']}")
    for what in ("train", "infer"):
        lack = d.get(f"diffusers_baseline_missing_{what}")
        if lack:
            out.append(f"- Warning: diffusers' {what} baseline lacks {', '.join(lack)}, so the {what} ratio is "
                       "not yet the one the issue defines.")
    if gflop:
        out.append(f"- Arithmetic: {gflop:.2f} GFLOP per forward pass and image (2 per multiply-add), training "
                   f"3× that; the peak is a matrix product measured in the same run: {_n(peak, '{:.3g}')} TFLOP/s "
                   f"({d.get('matmul_peak_note', '')}).")
    c = d.get("correctness")
    if c:
        parts = []
        if "fast_vs_fp32_rel_err" in c:
            parts.append(f"the fast path against float32 eager, relative error {c['fast_vs_fp32_rel_err']:.1e}")
        if "ours_fp32_vs_diffusers_fp32_rel_err" in c:
            parts.append(f"ddpm_lib against diffusers in float32 with the same weights, "
                         f"{c['ours_fp32_vs_diffusers_fp32_rel_err']:.1e}")
        out.append(f"- Same outputs, checked in the same run: {'; '.join(parts)} "
                   f"({c.get('tolerance', '')}; {'passed' if c.get('ok') else '**failed**'}).")
    lc = d.get("loss_curve_check")
    if lc and "error" not in lc:
        out.append(f"- Same loss curve: {lc['steps']} training steps of the fast step"
                   f"{' (replayed from its CUDA graph)' if lc.get('fast_step_graphed') else ''} against the float32 "
                   f"eager step from the same start and draws: first step {100 * lc['first_step_rel_diff']:.2f} % "
                   f"apart, mean of the last quarter {lc['last_quarter_mean_fast']} against "
                   f"{lc['last_quarter_mean_plain']} ({100 * lc['last_quarter_rel_diff']:.2f} % apart)"
                   + (f"; the float32 step with other seeds for the data, t and the noise ends at "
                      f"{lc['last_quarter_mean_other_seed']} ({100 * lc['other_seed_rel_diff']:.2f} % from the first "
                      f"float32 run): "
                      f"{'within' if lc['within_run_to_run_noise'] else '**outside**'} run-to-run noise "
                      f"(at most that spread, or 5 %)" if "other_seed_rel_diff" in lc else "") + ".")
    elif lc:
        out.append(f"- Loss-curve check not done: {lc['error']}")
    if d.get("projected_50k_samples_ddpm1000_s"):
        line = (f"- Projected time for 50,000 CIFAR-10 samples (network forwards only, at batch {ib}, from the best "
                f"inference rate): DDPM with 1000 steps {_duration(d['projected_50k_samples_ddpm1000_s'])}, "
                f"DDIM-50 {_duration(d['projected_50k_samples_ddim50_s'])}")
        if d.get("diffusers_projected_50k_samples_ddpm1000_s"):
            line += (f"; with diffusers' best {_duration(d['diffusers_projected_50k_samples_ddpm1000_s'])} and "
                     f"{_duration(d['diffusers_projected_50k_samples_ddim50_s'])}")
        out.append(line + ".")
    profiles = {k: v for k, v in (d.get("profiles") or {}).items() if "error" not in v}
    if profiles:
        keys = list(profiles)
        what = next(iter(profiles.values()))["what"]
        out.append("")
        out.append(f"Where the time goes (same run, `torch.profiler` over {profiles[keys[0]]['steps']} calls of each "
                   f"compiled mode; {what}, ms per call, grouped by name):")
        out.append("")
        out.append("| | " + " | ".join(f"`{k}`" for k in keys) + " |")
        out.append("|---|" + "---:|" * len(keys))
        cats: List[str] = []
        for v in profiles.values():
            cats += [c for c in v["categories_ms_per_call"] if c not in cats]
        cats.sort(key=lambda c: -max(v["categories_ms_per_call"].get(c, 0.0) for v in profiles.values()))
        for c in cats:
            out.append(f"| {c} | " + " | ".join(_n(v["categories_ms_per_call"].get(c), "{:.2f}")
                                                for v in profiles.values()) + " |")
        out.append("| **busy, all kinds** | " + " | ".join(f"**{v['busy_ms_per_call']:.2f}**" for v in profiles.values())
                   + " |")
        out.append("| measured without the profiler | " + " | ".join(f"{v['measured_ms_per_call']:.2f}"
                                                                    for v in profiles.values()) + " |")
        out.append(f"| {what.split(' (')[0]} per call | " + " | ".join(f"{v['kernels_per_call']:,.0f}"
                                                                     for v in profiles.values()) + " |")
        out.append("")
    gk = d.get("gn_kernels") or {}
    if gk.get("layers"):
        out.append("")
        out.append(f"GroupNorm + SiLU alone (the experiment's Triton kernel against PyTorch's and inductor's, each "
                   f"from a CUDA graph, batch {gk['batch']}, bf16 channels_last, with the per-channel addend; GB/s "
                   f"counts one read and one write):")
        out.append("")
        rule = any(r.get("triton_rule_ms") for r in gk["layers"])
        out.append("| channels, groups, H×W | count | Triton ms (GB/s) | " + ("Triton, rule's tile | " if rule else "")
                   + "inductor ms (GB/s) | eager ms (GB/s) |")
        out.append("|---|---:|---:|" + ("---:|" if rule else "") + "---:|---:|")
        for r in gk["layers"]:
            def cell(name, r=r):
                if not r.get(name + "_ms"):
                    return "-"
                eager = "" if r.get(name + "_graphed", True) else ", not graphed"
                return f"{r[name + '_ms']:.3f} ({r[name + '_gb_per_s']:,.0f}{eager})"
            tile = f" tile {tuple(r['triton_tile'])}" if r.get("triton_tile") else ""
            rule_tile = f" tile {tuple(r['triton_tile_rule'])}" if r.get("triton_tile_rule") else ""
            rule_cell = f"{cell('triton_rule')}{rule_tile} | " if rule else ""
            out.append(f"| {r['channels']}, {r['groups']}, {r['hw'][0]}×{r['hw'][1]} | {r['count']} | {cell('triton')}"
                       f"{tile} | {rule_cell}{cell('inductor')} | {cell('eager')} |")
        nm = gk.get("network_ms") or {}
        label = "the network's GroupNorms"
        if gk.get("shapes_in_sums") is not None and gk.get("shapes_in_sums") != gk.get("shapes"):
            label += f" ({gk['shapes_in_sums']} of {gk['shapes']} shapes)"

        def total(name):
            return f"**{nm[name]:.2f}**" if nm.get(name) is not None else "-"
        out.append(f"| **{label}** | | {total('triton')} | " + (f"{total('triton_rule')} | " if rule else "")
                   + f"{total('inductor')} | {total('eager')} |")
        out.append("")
        out.append("Tiles are (BLOCK_HW, BLOCK_G, BLOCK_CPG, num_warps); the Triton column uses the tile the first "
                   "call timed fastest among `kernels.candidates` (every candidate's time is in the JSON).")
        out.append("")
    elif gk.get("error"):
        notes.append(f"GroupNorm kernels alone: {gk['error'][:200]}")
    for net, mode, kt in per_call:
        out.extend(render_kernel_calls(net, mode, kt))
    for k, v in (d.get("profiles") or {}).items():
        if "error" in v:
            notes.append(f"profile `{k}` failed: {v['error'][:200]}")
    if not d.get("complete", True):
        out.append("- The run stopped before every mode had finished (`complete: false` in the JSON).")
    for n in notes:
        out.append(f"- {n}")
    return "\n".join(out)


def render_kernel_calls(net: str, mode: str, kt: Dict[str, Any]) -> List[str]:
    """The table of one row's GroupNorm kernel calls (``gn_kernel_traffic.by_call``): bytes and, where the
    autotuner timed the call's tile, its time and bandwidth alone."""
    out = [f"The GroupNorm kernel's calls in one forward of {net} `{mode}` (bytes counted by "
           f"`kernels.count_traffic`; time: the autotuner's for the chosen tile, the kernel alone on the same tensors, "
           f"back to back, so that tensors smaller than the L2 cache are read from it):", "",
           "| call (channels of x + x2, H×W, options) | launches | MB per launch | µs per launch | TB/s | tile |",
           "|---|---:|---:|---:|---:|---|"]
    for name, v in kt["by_call"].items():
        mb = (v["bytes_read"] + v["bytes_written"]) / v["calls"] / 1e6
        us = f"{v['timed_ms'] / v['calls'] * 1e3:,.0f}" if v.get("timed_tb_per_s") else "-"
        tb = f"{v['timed_tb_per_s']:.2f}" if v.get("timed_tb_per_s") else "-"
        tiles = ", ".join(f"({', '.join(map(str, t))})" for t in v.get("tiles", []))
        out.append(f"| {name} | {v['calls']} | {mb:,.1f} | {us} | {tb} | {tiles} |")
    if kt.get("timed_kernel_ms"):
        prof = f" (profile: {kt['kernel_ms']:.2f} ms)" if kt.get("kernel_ms") else ""
        out.append(f"| **all, per forward** | {kt['calls_per_forward']} | {kt['gb']:.3g} GB | "
                   f"**{kt['timed_kernel_ms']:.2f} ms**{prof} | **{kt['timed_tb_per_s']:.2f}** | |")
    out += ["", "Tiles are (BLOCK_HW, BLOCK_G, BLOCK_CPG, num_warps).", ""]
    return out


def trainer_settings(row: Dict[str, Any]) -> str:
    """What a Trainer row ran with: the options alone do not say it, since what ``defaults`` means changed
    (2026-11-27: compile and the CUDA graph became the defaults on CUDA)."""
    return f"compiled {row.get('train_compiled', '?')}, CUDA graph {row.get('train_cuda_graph', '?')}"


def render_trainer_runs(main: Dict[str, Any], runs: Sequence[Tuple[str, Dict[str, Any]]]) -> str:
    """The ``ddpm_lib.Trainer`` rows of further runs on the same card (``--trainer-run``), in one table."""
    dt = main.get("diffusers_best_train_images_per_s")
    out = ["", f"`ddpm_lib.Trainer` in further runs on the same card ({main.get('device_name') or main['card']}), "
           "each its own process; the ratio is to diffusers' best training rate of the run above, so it crosses "
           "runs: read it as rough, and compare a row measured in both runs (same settings) for the spread "
           "between runs:", "",
           "| file | date (UTC) | row | options | settings | train img/s | compile s | × diffusers (run above) |",
           "|---|---|---|---|---|---:|---:|---:|"]
    for name, d in runs:
        for r in d["modes"]:
            if r.get("trainer_options") is not None and r.get("train_images_per_s"):
                out.append(f"| `{name}` | {d.get('date_utc', '-')} | `{r['mode']}` | {r['trainer_options']} | "
                           f"{trainer_settings(r)} | {_n(r['train_images_per_s'])} | {r.get('train_compile_s', '-')} | "
                           f"{_ratio(r['train_images_per_s'], dt)} |")
    return "\n".join(out)


def replace_section(text: str, section: str, where: str = "document") -> str:
    """``text`` with the part between the markers replaced by ``section``; ValueError without the markers."""
    i, j = text.find(BEGIN), text.find(END)
    if i < 0 or j < 0 or j < i or text.count(BEGIN) != 1 or text.count(END) != 1:
        raise ValueError(f"{where} needs exactly one {BEGIN} ... {END} pair")
    return text[: i + len(BEGIN)] + "\n" + section.strip() + "\n" + text[j:]


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("json", type=Path, help="a result of benchmarks/throughput.py")
    ap.add_argument("--docs", type=Path, nargs="*", default=DOCS,
                    help="documents whose measured section is replaced (default: RESULTS.md and the book's page)")
    ap.add_argument("--copy-to", type=Path, default=None,
                    help="copy the JSON into this folder first (e.g. benchmarks/results)")
    ap.add_argument("--print", dest="only_print", action="store_true", help="print the section, change nothing")
    ap.add_argument("--allow-cpu", action="store_true", help="accept a CPU run (tests only)")
    ap.add_argument("--trainer-run", dest="trainer_runs", type=Path, action="append", default=[],
                    help="a further result on the same card whose ddpm_lib.Trainer rows are listed too (repeatable)")
    args = ap.parse_args(argv)
    data = json.loads(args.json.read_text())
    try:
        check(data, allow_cpu=args.allow_cpu)
        extra = [(f.name, json.loads(f.read_text())) for f in args.trainer_runs]
        for name, d in extra:
            if d.get("card") != data["card"] or not isinstance(d.get("modes"), list):
                raise ValueError(f"{name} is not a result with modes from {data['card']}")
    except (OSError, ValueError) as exc:
        print(f"record.py: {exc}", file=sys.stderr)
        return 2
    section = render(data, json_name=args.json.name)
    if extra:
        section += "\n" + render_trainer_runs(data, extra)
    if args.only_print:
        print(section)
        return 0
    if args.copy_to is not None:
        args.copy_to.mkdir(parents=True, exist_ok=True)
        for f in [args.json, *args.trainer_runs]:
            target = args.copy_to / f.name
            if target.resolve() != f.resolve():
                shutil.copyfile(f, target)
            print(f"copied {f} -> {target}")
    new = {}
    for doc in args.docs:  # check every document before writing any
        try:
            new[doc] = replace_section(doc.read_text(), section, str(doc))
        except (OSError, ValueError) as exc:
            print(f"record.py: {exc}", file=sys.stderr)
            return 2
    for doc, text in new.items():
        doc.write_text(text)
        print(f"updated {doc}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
