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
                      "--modes", "ours:fast,ours:fp32,diffusers:bf16_cl,diffusers:fp32", "--loss-check-steps", "4"])
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
    modes = {(m["network"], m["mode"]): m for m in data["modes"]}
    assert modes[("ours", "fast")]["train_images_per_s"] > 0
    if have_diffusers:
        assert data["diffusers_best_train_images_per_s"] > 0 and data["diffusers_best_infer_images_per_s"] > 0
        assert data["train_ratio_vs_diffusers"] > 0 and data["infer_ratio_vs_diffusers"] > 0
        assert data["correctness"]["ours_fp32_vs_diffusers_fp32_rel_err"] < 1e-4  # the same function
    printed = capsys.readouterr().out
    assert "ratio vs diffusers" in printed and "projected 50,000 samples" in printed


def test_benchmark_rejects_unknown_modes(tmp_path):
    bench = _load()
    with pytest.raises(SystemExit, match="unknown modes"):
        bench.main(["--device", "cpu", "--size", "tiny", "--json-path", str(tmp_path / "x.json"),
                    "--modes", "ours:warp-speed"])
