"""benchmarks/throughput.py runs on a CPU at a tiny size and writes its JSON (the GPU run is the real one)."""
import importlib.util
import json
import time
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "throughput.py"
REQUIRED = ["card", "torch", "train_images_per_s", "infer_images_per_s", "diffusers_best_train_images_per_s",
            "diffusers_best_infer_images_per_s", "train_ratio_vs_diffusers", "infer_ratio_vs_diffusers"]


def _load():
    spec = importlib.util.spec_from_file_location("ddpm_throughput_benchmark", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_benchmark_tiny_cpu_writes_json(tmp_path, capsys):
    bench = _load()
    try:
        import diffusers  # noqa: F401

        have_diffusers = True
    except ImportError:
        have_diffusers = False
    t0 = time.perf_counter()
    # ours' fast path (compiled by dynamo's eager backend on the CPU) and fp32; diffusers' bf16 eager and fp32
    out = bench.main(["--device", "cpu", "--size", "tiny", "--out", str(tmp_path), "--budget-s", "45",
                      "--modes", "ours:fast,ours:fp32,ours:trainer,ours:trainer_graph,ours:bf16_cl_compile_gnm,"
                      "ours:bf16_cl_compile_fold,"
                      "diffusers:bf16_cl,diffusers:fp32",
                      "--loss-check-steps", "4"])
    elapsed = time.perf_counter() - t0
    assert elapsed < 60, f"the tiny CPU benchmark took {elapsed:.0f} s"

    path = tmp_path / "cpu-tiny.json"
    assert Path(out["json_path"]) == path and path.exists()
    data = json.loads(path.read_text())
    for key in REQUIRED:
        assert key in data, key
    assert data["card"] == "cpu" and data["complete"] is True
    assert data["train_images_per_s"] > 0 and data["infer_images_per_s"] > 0
    assert data["forward_gflop_per_image"] > 0 and data["matmul_peak_tflops"] > 0
    assert data["correctness"]["ok"], data["correctness"]
    lc = data["loss_curve_check"]
    assert len(lc["fast_losses"]) == len(lc["plain_losses"]) == 4 and lc["first_step_rel_diff"] < 0.05
    # the run-to-run noise it is judged by: the plain step again with other draws
    assert len(lc["other_seed_plain_losses"]) == 4 and lc["other_seed_plain_losses"] != lc["plain_losses"]
    assert lc["other_seed_rel_diff"] > 0 and lc["within_run_to_run_noise"] is True
    section = _load_record().render(data, path.name)
    assert (f"the float32 step with other seeds for the data, t and the noise ends at "
            f"{lc['last_quarter_mean_other_seed']}") in section and "within run-to-run noise" in section
    modes = {(m["network"], m["mode"]): m for m in data["modes"]}
    assert modes[("ours", "fast")]["train_images_per_s"] > 0
    trainer = modes[("ours", "trainer")]  # ddpm_lib.Trainer itself, with its defaults
    assert trainer["train_images_per_s"] > 0 and trainer["train_note"].startswith("ddpm_lib.Trainer (defaults)")
    gnm = modes[("ours", "bf16_cl_compile_gnm")]  # the experiment: listed, never ddpm_lib's best
    assert gnm["experiment"] is True and gnm["train_images_per_s"] > 0 and gnm["infer_images_per_s"] > 0
    assert "gnm" not in data["train_best_mode"] and "gnm" not in data["infer_best_mode"]
    every = modes[("ours", "bf16_cl_compile_fold")]  # every inference experiment (the kernel has no backward)
    assert every["experiment"] is True and every["infer_images_per_s"] > 0 and "train_images_per_s" not in every
    assert every["infer_same_function"] is True and every["infer_rel_err_vs_fp32"] < 2e-2
    # what the GroupNorm kernel moved (none here: without CUDA or Triton's interpreter PyTorch's operators run)
    assert every["gn_kernel_traffic"]["calls_per_forward"] == 0 and "tb_per_s" not in every["gn_kernel_traffic"]
    # the sampling option (make_sampler_forward(experimental=True)) sets it up: its checked inference counts
    assert every["sampling_option"] == "make_sampler_forward(experimental=True)"
    inf = {m: r["infer_images_per_s"] for (n, m), r in modes.items() if n == "ours" and r.get("infer_images_per_s")
           and (not r["experiment"] or m == "bf16_cl_compile_fold")}
    assert data["infer_images_per_s"] == max(inf.values()) == inf[data["infer_best_mode"]]
    assert data["infer_best_option"] == ("make_sampler_forward(experimental=True)"
                                         if data["infer_best_mode"] == "bf16_cl_compile_fold" else None)
    graph = modes[("ours", "trainer_graph")]  # through accel.TrainStep; no CUDA here, so no graph
    assert graph["train_images_per_s"] > 0 and graph["train_note"].startswith("ddpm_lib.Trainer (compile=False, cuda_graph=True)")
    assert graph["train_cuda_graph"] is False and "CUDA graph False" in graph["train_note"]
    if have_diffusers:
        assert data["diffusers_best_train_images_per_s"] > 0 and data["diffusers_best_infer_images_per_s"] > 0
        assert data["train_ratio_vs_diffusers"] > 0 and data["infer_ratio_vs_diffusers"] > 0
        assert data["correctness"]["ours_fp32_vs_diffusers_fp32_rel_err"] < 1e-4  # the same function
        # the baseline rows time diffusers' network in the plain PyTorch step; +ddpm_step rows in ddpm_lib's step
        for mode in ("fp32", "bf16_cl"):
            assert "plain PyTorch step" in modes[("diffusers", mode)]["train_note"]
            lib = modes[("diffusers", f"{mode}+ddpm_step")]
            assert lib["train_images_per_s"] > 0 and lib["counts_for_diffusers_baseline"] is False
        assert data["diffusers_best_train_mode"] in ("fp32", "bf16_cl")
        assert data["train_ratio_vs_diffusers_ddpm_step"] > 0
    # the convolution floor: every Conv2d of the network, timed alone, added up with its multiplicity
    cf = data["conv_floor"]
    assert "error" not in cf, cf
    assert cf["convolutions"] == sum(l["count"] for l in cf["layers"]) == sum(
        isinstance(m, bench.nn.Conv2d) for m in bench.build_networks("tiny")[0].modules())
    assert cf["distinct"] == len(cf["layers"]) < cf["convolutions"]
    train_ms = sum(l["count"] * l["train_ms"] for l in cf["layers"])
    assert abs(train_ms - cf["train_ms_per_step"]) <= 1e-3 * cf["train_ms_per_step"] + 0.01
    assert cf["train_images_per_s"] == pytest.approx(4e3 / cf["train_ms_per_step"], rel=1e-3)  # batch 4
    assert data["conv_floor_infer_images_per_s"] == cf["infer_images_per_s"] > 0
    if have_diffusers:
        assert data["conv_floor_train_ratio_vs_diffusers"] == pytest.approx(
            cf["train_images_per_s"] / data["diffusers_best_train_images_per_s"], rel=1e-2)
    printed = capsys.readouterr().out
    assert "ratio vs diffusers" in printed and "projected 50,000 samples" in printed
    assert "convolution floor" in printed
    prof = data["profiles"]["ours:bf16_cl_compile train"]  # ours' compiled step (the fast path's) under the profiler
    assert "error" not in prof, prof
    assert prof["busy_ms_per_call"] == pytest.approx(sum(prof["categories_ms_per_call"].values()), abs=0.01)
    assert prof["categories_ms_per_call"]["convolution"] > 0 and prof["steps"] == 5 and prof["top"]
    assert "profile ours:bf16_cl_compile train" in printed
    section = _load_record().render(data, path.name)  # record.py puts the profiles into a table
    assert "Where the time goes" in section and "| `ours:bf16_cl_compile train` |" in section
    assert f"| **busy, all kinds** | **{prof['busy_ms_per_call']:.2f}** |" in section


def test_plain_step_trains_the_diffusers_network():
    """The baseline step is a real training step: Adam moves the weights, the EMA follows, the loss is finite."""
    pytest.importorskip("diffusers")
    import torch
    from ddpm_lib import GaussianDiffusion, accel

    bench = _load()
    _, diff, _ = bench.build_networks("tiny")
    fast = accel.prepare_model(diff, "cpu", bf16=False, channels_last=False, compile=False)
    step = bench.PlainStep(fast, GaussianDiffusion(), torch.Generator().manual_seed(0))
    assert "EMAModel" in step.note and isinstance(step.optimizer, torch.optim.Adam)
    before = [p.detach().clone() for p in step.params]
    shadow0 = [e.detach().clone() for e in step.ema.shadow_params]
    x0 = torch.rand(2, 3, 16, 16) * 2 - 1
    for _ in range(2):
        loss, gnorm = step(x0)
        assert gnorm is None and torch.isfinite(loss) and loss.ndim == 0
    assert all(len(step.optimizer.state[p]) > 0 for p in step.params)
    moved = sum(not torch.equal(a, p) for a, p in zip(before, step.params))
    assert moved > 0.9 * len(before)
    # the EMA's first update copies the weights (diffusers' decay schedule), the second averages
    assert any(not torch.equal(a, e) for a, e in zip(shadow0, step.ema.shadow_params))


def test_benchmark_rejects_unknown_modes(tmp_path):
    bench = _load()
    with pytest.raises(SystemExit, match="unknown modes"):
        bench.main(["--device", "cpu", "--size", "tiny", "--json-path", str(tmp_path / "x.json"),
                    "--modes", "ours:warp-speed"])


# --------------------------------------------------------------------------- gpu_run.sh and record.py
RECORD = SCRIPT.parent / "record.py"
GPU_RUN = SCRIPT.parent / "gpu_run.sh"
DOCS = [SCRIPT.parent / "RESULTS.md", SCRIPT.parents[1] / "book" / "gpu_speed.md"]


def _load_record():
    spec = importlib.util.spec_from_file_location("ddpm_record_benchmark", RECORD)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """benchmarks/gpu_run.sh end to end, on the CPU at the tiny size (three modes): (result JSON, its output)."""
    import os
    import subprocess
    import sys

    out = tmp_path_factory.mktemp("gpu_run")
    env = dict(os.environ, OUT=str(out), DEVICE="cpu", SIZE="tiny", MODES="ours:fp32,ours:trainer,diffusers:fp32", BUDGET="40",
               PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
    proc = subprocess.run(["bash", str(GPU_RUN)], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    return out / "cpu-tiny.json", proc.stdout


def test_record_documents_hold_one_measured_section():
    record = _load_record()
    for doc in DOCS:
        text = doc.read_text()
        assert text.count(record.BEGIN) == 1 and text.count(record.END) == 1, doc
        assert text.index(record.BEGIN) < text.index(record.END), doc


def test_gpu_run_prints_the_recorded_section(tiny_run):
    path, printed = tiny_run
    data = json.loads(path.read_text())
    assert data["card"] == "cpu" and data["complete"] is True and data["date_utc"]
    assert "the section benchmarks/record.py writes from cpu-tiny.json" in printed
    fp32 = next(m for m in data["modes"] if m["network"] == "ours" and m["mode"] == "fp32")
    assert f"| ddpm_lib | `fp32` | {fp32['train_images_per_s']:,.0f} |" in printed


def test_record_writes_sections_from_the_json(tiny_run, tmp_path):
    record = _load_record()
    path, _ = tiny_run
    data = json.loads(path.read_text())
    docs = []
    for doc in DOCS:
        copy = tmp_path / doc.name
        copy.write_text(doc.read_text())
        docs.append(copy)
    # a CPU run is refused for the real documents; nothing is written
    assert record.main([str(path), "--docs", *map(str, docs)]) == 2
    assert [d.read_text() for d in docs] == [d.read_text() for d in DOCS]
    # accepted for a test: both documents get the same section, the text around it is kept
    assert record.main([str(path), "--docs", *map(str, docs), "--allow-cpu",
                        "--copy-to", str(tmp_path / "results")]) == 0
    assert (tmp_path / "results" / "cpu-tiny.json").read_text() == path.read_text()
    section = record.render(data, path.name)
    for doc, orig in zip(docs, DOCS):
        text, old = doc.read_text(), orig.read_text()
        assert section in text and "Not measured yet" not in text
        assert text[: text.index(record.BEGIN)] == old[: old.index(record.BEGIN)]
        assert text[text.index(record.END):] == old[old.index(record.END):]
    assert not data["train_ratio_vs_diffusers"] or f"{data['train_ratio_vs_diffusers']:.2f}×" in section
    assert "--out" not in section and str(tmp_path) not in section  # no machine paths in the documents
    assert "--size tiny" in section and "say nothing about the CIFAR-10 model" in section
    assert "`ddpm_lib.Trainer` itself (`trainer`" in section
    assert f"allow at most {data['conv_floor']['train_images_per_s']:,.0f} training images/s" in section
    if data["diffusers_best_train_images_per_s"]:
        assert "plain PyTorch step" in section and "`fp32+ddpm_step`*" in section
    # running it again replaces the section instead of adding one
    assert record.main([str(path), "--docs", *map(str, docs), "--allow-cpu"]) == 0
    assert docs[0].read_text().count(record.BEGIN) == 1


def test_record_rejects_bad_input(tmp_path):
    record = _load_record()
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"card": "nvidia-h100"}))
    assert record.main([str(bad), "--print"]) == 2
    with pytest.raises(ValueError, match="exactly one"):
        record.replace_section("no markers here", "x")
    assert record.public_command("python t.py --device cuda --out /tmp/x --json-path=/a/b.json --size full") == \
        "python t.py --device cuda --size full"


def test_kernel_categories():
    """The profile groups kernels by name: typical CUDA kernel names of the two networks' steps, and aten ops."""
    bench = _load()
    cases = {
        "sm90_xmma_fprop_implicit_gemm_bf16bf16_bf16f32_f32_nhwckrsc_nhwc_tilesize128x128x64": "convolution",
        "sm90_xmma_dgrad_implicit_gemm_bf16bf16_bf16f32_f32_nhwckrsc_nhwc": "convolution",
        "sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x128x64_warpgroupsize1x1x1": "matmul",
        "nvjet_tst_128x64_64x6_1x1_h_bz_TNT": "matmul",
        "triton_red_fused_native_group_norm_silu_3": "GroupNorm (fused, Triton)",
        "_group_norm_act_kernel": "GroupNorm (ddpm_lib.kernels)",
        "triton_poi_fused_add_convolution_5": "other fused (Triton)",
        "triton_tem_fused_mm_7": "matmul",
        "void pytorch_flash::flash_fwd_kernel<Flash_fwd_kernel_traits<256, 64, 64, 4>>": "attention",
        "void at::native::(anonymous namespace)::multi_tensor_apply_kernel<FusedAdamMathFunctor<float>>": "optimizer, clip, EMA",
        "void cudnn::engines_precompiled::nchwToNhwcKernel<__nv_bfloat16>": "copy, layout, indexing",
        "void at::native::(anonymous namespace)::RowwiseMomentsCUDAKernel<float>": "GroupNorm (eager)",
        "void at::native::(anonymous namespace)::fused_dropout_kernel_vec<float>": "random numbers",
        "void at::native::vectorized_elementwise_kernel<4, at::native::CUDAFunctor_add<float>>": "other elementwise, reductions",
        "Memcpy DtoD (Device -> Device)": "copy, layout, indexing",
        "aten::mkldnn_convolution": "convolution",
        "aten::native_group_norm_backward": "GroupNorm (eager)",
        "aten::_fused_adam_": "optimizer, clip, EMA",
        "aten::addmm": "matmul",
        "aten::_scaled_dot_product_flash_attention_for_cpu": "attention",
        "aten::cat": "copy, layout, indexing",
        "aten::silu": "other elementwise, reductions",
    }
    for name, want in cases.items():
        assert bench.kernel_category(name) == want, name
        assert want in bench.PROFILE_CATEGORIES


def test_record_the_committed_gpu_results(tmp_path, capsys):
    """The committed H200 results render as the documents hold them: the main run, the Trainer rows of two further
    runs (--trainer-run), what each Trainer row ran with, and the first run's convolution sum marked as no floor."""
    record = _load_record()
    results = SCRIPT.parent / "results"
    main, runs = results / "nvidia-h200.json", [results / "nvidia-h200-run2.json", results / "nvidia-h200-run3.json"]
    args = [str(main)] + [a for r in runs for a in ("--trainer-run", str(r))]
    assert record.main(args + ["--print"]) == 0
    section = capsys.readouterr().out
    assert "**3.09×** (target 2.0×: **met**)" in section and "(target 1.5×: **not met**)" in section
    assert "| `nvidia-h200-run3.json` | 2026-11-27 02:37 | `trainer` | defaults | compiled True, CUDA graph True |" \
        in section
    assert "not a floor" in section and "compiled False, CUDA graph False" in section
    # networks alone: like for like, diffusers' network in the same graphed step as `fast` (4,933 / 4,560);
    # the JSON's own summary left that row out (1,731, the ungraphed `bf16_cl_compile+ddpm_step`)
    assert "reaches at best 4,560 images/s (`bf16_cl_compile_graph`), and ddpm_lib's best is **1.08×** that" \
        in section
    for doc in record.DOCS:  # the documents hold this very section
        assert section.strip() in doc.read_text(), doc
    other = json.loads(runs[0].read_text())
    other["card"] = "nvidia-h100-80gb-hbm3"
    (tmp_path / "h100.json").write_text(json.dumps(other))
    assert record.main([str(main), "--trainer-run", str(tmp_path / "h100.json"), "--print"]) == 2


def test_record_renders_the_group_norm_kernel_table():
    """A run's `gn_kernels` (the Triton GroupNorm kernel alone against inductor's and eager) becomes a table with
    the network's totals; a run where it failed says why."""
    record = _load_record()
    data = json.loads((SCRIPT.parent / "results" / "nvidia-h200.json").read_text())
    data["gn_kernels"] = dict(batch=1024, network_ms=dict(triton=4.0, inductor=12.5, eager=20.0), layers=[
        dict(channels=128, groups=32, hw=[32, 32], count=11, triton_ms=0.2, triton_gb_per_s=2684.0,
             inductor_ms=0.5, inductor_gb_per_s=1074.0, eager_ms=0.9, eager_gb_per_s=596.0),
        dict(channels=384, groups=32, hw=[16, 16], count=1, triton_ms=0.1, triton_gb_per_s=2013.0,
             eager_ms=0.3, eager_gb_per_s=671.0, inductor_error="RuntimeError: x")])
    section = record.render(data, "nvidia-h200.json")
    assert "| 128, 32, 32×32 | 11 | 0.200 (2,684) | 0.500 (1,074) | 0.900 (596) |" in section
    assert "| 384, 32, 16×16 | 1 | 0.100 (2,013) | - | 0.300 (671) |" in section
    assert "| **the network's GroupNorms** | | **4.00** | **12.50** | **20.00** |" in section
    # with the autotuner's tile against the rule's (a CUDA run)
    data["gn_kernels"]["network_ms"]["triton_rule"] = 5.0
    data["gn_kernels"]["layers"][0].update(triton_tile=[1024, 4, 4, 16], triton_rule_ms=0.3,
                                           triton_rule_gb_per_s=1789.0, triton_tile_rule=[1024, 2, 4, 8])
    section = record.render(data, "nvidia-h200.json")
    assert ("| 128, 32, 32×32 | 11 | 0.200 (2,684) tile (1024, 4, 4, 16) | 0.300 (1,789) tile (1024, 2, 4, 8) | "
            "0.500 (1,074) | 0.900 (596) |") in section
    assert "| **the network's GroupNorms** | | **4.00** | **5.00** | **12.50** | **20.00** |" in section
    data["gn_kernels"] = dict(error="skipped: 12 s left")
    assert "GroupNorm kernels alone: skipped: 12 s left" in record.render(data, "nvidia-h200.json")


def test_record_renders_the_sampling_option():
    """A run whose inference best is the sampling option (make_sampler_forward(experimental=True), rows `_fold`)
    names it in the inference line and marks its rows with their own footnote."""
    record = _load_record()
    data = json.loads((SCRIPT.parent / "results" / "nvidia-h200.json").read_text())
    data["modes"].append(dict(network="ours", mode="fast_fold", experiment=True, infer_images_per_s=41000.0,
                              sampling_option="make_sampler_forward(experimental=True)", infer_same_function=True,
                              infer_rel_err_vs_fp32=0.009))
    data.update(infer_images_per_s=41000.0, infer_best_mode="fast_fold",
                infer_best_option="make_sampler_forward(experimental=True)",
                infer_ratio_vs_diffusers=round(41000.0 / data["diffusers_best_infer_images_per_s"], 3))
    section = record.render(data, "nvidia-h200.json")
    assert "| ddpm_lib | `fast_fold`‡ |" in section and "‡ The experiment that ddpm_lib's sampling option" in section
    assert ("ddpm_lib 41,000 images/s (`fast_fold`, the sampling option `make_sampler_forward(experimental=True)`)"
            in section) and "(target 1.5×: **met**)" in section
