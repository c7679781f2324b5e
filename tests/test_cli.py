"""The command line: train -> sample (png, npz) -> bpd -> info end to end, resume, errors, --help."""
import argparse
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from ddpm_lib.cli import build_parser, main

TINY = ["--preset", "tiny", "--dataset", "digits", "--batch-size", "8", "--T", "30", "--log-every", "2",
        "--sample-n", "4", "--sample-steps", "3", "--no-progress"]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("cli") / "run"
    assert main(["train", *TINY, "--steps", "4", "--save-every", "2", "--sample-every", "4", "--out", str(out)]) == 0
    return out


def _err_line(capsys):
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


def test_train_writes_everything(run):
    assert (run / "last.pt").is_file() and (run / "config.json").is_file()
    assert (run / "samples" / "step_0000004.png").is_file()
    assert (run / "loss_history.json").is_file()


def test_sample_png_and_npz(run, tmp_path, capsys):
    png = tmp_path / "grid.png"
    assert main(["sample", "--ckpt", str(run / "last.pt"), "--n", "4", "--steps", "3", "--out", str(png),
                 "--no-progress"]) == 0
    assert png.read_bytes()[:4] == b"\x89PNG"
    npz = tmp_path / "s.npz"
    assert main(["sample", "--ckpt", str(run / "last.pt"), "--n", "5", "--batch-size", "3", "--sampler", "ddpm",
                 "--out", str(npz), "--no-progress"]) == 0
    arr = np.load(npz)
    assert arr.files == ["arr_0"]
    assert arr["arr_0"].dtype == np.uint8 and arr["arr_0"].shape == (5, 8, 8, 1)
    assert "wrote 5 samples (ddpm)" in capsys.readouterr().out


def test_bpd_and_info(run, capsys):
    assert main(["bpd", "--ckpt", str(run / "last.pt"), "--n", "4", "--batch-size", "2", "--no-progress"]) == 0
    out = capsys.readouterr().out
    for word in ("total", "prior L_T", "step KLs", "decoder L_0", "bits/dim"):
        assert word in out
    assert main(["info", "--ckpt", str(run / "last.pt")]) == 0
    out = capsys.readouterr().out
    assert "step: 4" in out and "parameters: " in out and "preset=tiny" in out
    # four updates at the paper's decay 0.9999 without warm-up: 0.9999 ** 4 of the average is the initial network
    assert "EMA: 100% of its weight is still on the weights training started from (samples from it may look like " \
           "noise)" in out


def test_resume_continues(run, tmp_path, capsys):
    import shutil

    out = tmp_path / "copy"
    shutil.copytree(run, out)
    assert main(["train", "--out", str(out), "--resume", "--steps", "6", "--no-progress"]) == 0
    assert "resumed" in capsys.readouterr().out
    from ddpm_lib import load_checkpoint

    _, diffusion, cfg = load_checkpoint(out / "last.pt")
    assert cfg["step"] == 6 and diffusion.num_timesteps == 30 and cfg["train"]["batch_size"] == 8


def test_a_new_run_does_not_replace_an_old_one_and_seeds_its_weights(run, tmp_path, capsys):
    """Without --resume or --overwrite, an OUT that holds a run is refused (a forgotten --resume lost runs);
    --seed fixes the initial weights too (the model was built before the Trainer seeded torch)."""
    import shutil

    out = tmp_path / "copy"
    shutil.copytree(run, out)
    assert main(["train", *TINY, "--steps", "1", "--out", str(out)]) == 1
    assert "holds a run at step 4: pass --resume (without a path) to continue it, --overwrite" in _err_line(capsys)
    other = tmp_path / "other"
    assert main(["train", *TINY, "--steps", "1", "--sample-every", "0", "--out", str(other)]) == 0
    capsys.readouterr()
    assert main(["train", "--out", str(out), "--resume", str(other / "last.pt"), "--steps", "2"]) == 1
    assert "holds a run at step 4" in _err_line(capsys)  # resuming another run into OUT would replace it too
    assert main(["train", "--out", str(out), "--resume", "--overwrite", "--steps", "5"]) == 1
    assert "--overwrite starts a new run; --resume continues one" in _err_line(capsys)
    assert torch.load(out / "last.pt", map_location="cpu", weights_only=False)["step"] == 4  # left as it was
    states = []
    for name in ("a", "b"):
        args = ["train", *TINY, "--steps", "1", "--sample-every", "0", "--seed", "5", "--out", str(tmp_path / name)]
        assert main(args) == 0
        states.append(torch.load(tmp_path / name / "last.pt", map_location="cpu", weights_only=False)["model"])
    for k in states[0]:
        assert torch.equal(states[0][k], states[1][k]), k
    assert main(["train", *TINY, "--steps", "1", "--sample-every", "0", "--seed", "6", "--overwrite",
                 "--out", str(tmp_path / "a")]) == 0
    other = torch.load(tmp_path / "a" / "last.pt", map_location="cpu", weights_only=False)["model"]
    assert not torch.equal(other["conv_in.weight"], states[1]["conv_in.weight"])


def test_settings_that_cannot_train_are_refused(tmp_path, capsys):
    for flags, words in [(["--var-type", "learned_range"], "var_type='learned_range' needs loss_type='hybrid'"),
                         (["--preset", "cifar10"], "the cifar10 preset on 8x8 images: attn_resolutions [16] are not"),
                         (["--dropout", "2"], "dropout"),
                         (["--lr", "0"], "lr must be a number > 0"),
                         (["--ema-decay", "1"], "ema_decay must lie in [0, 1)")]:
        assert main(["train", *TINY, *flags, "--steps", "1", "--out", str(tmp_path / "x")]) == 1
        assert words in _err_line(capsys)
    assert not (tmp_path / "x" / "last.pt").exists()


def test_sample_from_the_raw_weights(run, tmp_path, capsys):
    out = tmp_path / "raw.npz"
    with pytest.warns(RuntimeWarning, match="EMA weights still give"):  # four updates at decay 0.9999
        assert main(["sample", "--ckpt", str(run / "last.pt"), "--n", "2", "--steps", "2", "--out",
                     str(tmp_path / "ema.npz"), "--no-progress"]) == 0
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert main(["sample", "--ckpt", str(run / "last.pt"), "--weights", "model", "--n", "2", "--steps", "2",
                     "--out", str(out), "--no-progress"]) == 0
    assert np.load(out)["arr_0"].shape == (2, 8, 8, 1)
    with pytest.raises(SystemExit) as e:
        main(["sample", "--ckpt", str(run / "last.pt"), "--weights", "raw", "--out", str(out)])
    assert e.value.code == 2
    capsys.readouterr()
    assert main(["sample", "--ckpt", str(run / "last.pt"), "--sampler", "ddpm", "--steps", "10", "--out", str(out)]) == 1
    assert "--steps is DDIM's; --sampler ddpm (Algorithm 2) takes all T steps" in _err_line(capsys)


def test_fp16_flag_reaches_the_trainer(tmp_path, capsys):
    out = tmp_path / "fp16"
    assert main(["train", *TINY, "--fp16", "on", "--steps", "2", "--sample-every", "0", "--out", str(out)]) == 0
    assert "bf16 False, fp16 True (loss scaling), channels_last" in capsys.readouterr().out
    state = torch.load(out / "last.pt", map_location="cpu", weights_only=False)
    assert state["config"]["train"]["fp16"] is True and state["scaler"]["scale"] == 2.0**16
    with pytest.raises(SystemExit) as e:  # on|off only
        main(["train", *TINY, "--fp16", "auto", "--out", str(out)])
    assert e.value.code == 2
    # a run trained with --bf16 on, resumed with --fp16 on: bf16 goes back to auto (off under fp16)
    bf = tmp_path / "bf16"
    assert main(["train", *TINY, "--bf16", "on", "--steps", "1", "--sample-every", "0", "--out", str(bf)]) == 0
    assert main(["train", "--out", str(bf), "--resume", "--fp16", "on", "--steps", "2", "--no-progress"]) == 0
    train = torch.load(bf / "last.pt", map_location="cpu", weights_only=False)["config"]["train"]
    assert train["fp16"] is True and train["bf16"] == "auto"


def test_crop_undoes_recorded_padding_and_only_that(tmp_path, capsys):
    """--pad-to on any data set is recorded with the unpadded size, and --crop cuts exactly the padding (the
    centre of the padded samples); without padding nothing is recorded as padded and --crop refuses."""
    out = tmp_path / "pad"
    base = ["--preset", "tiny", "--dataset", "digits", "--batch-size", "4", "--T", "30", "--steps", "1",
            "--sample-every", "0", "--no-progress"]
    assert main(["train", *base, "--pad-to", "16", "--out", str(out)]) == 0
    from ddpm_lib import load_checkpoint

    data = load_checkpoint(out / "last.pt")[2]["data"]
    assert data["pad_to"] == 16 and data["original_size"] == 8 and data["shape"] == [1, 16, 16]
    arrays = {}
    for crop in ([], ["--crop"]):
        npz = tmp_path / f"s{len(crop)}.npz"
        assert main(["sample", "--ckpt", str(out / "last.pt"), "--n", "2", "--steps", "2", *crop,
                     "--no-progress", "--out", str(npz)]) == 0
        arrays[len(crop)] = np.load(npz)["arr_0"]
    assert arrays[1].shape == (2, 8, 8, 1)
    np.testing.assert_array_equal(arrays[1], arrays[0][:, 4:12, 4:12])
    plain = tmp_path / "plain"
    assert main(["train", *base, "--size", "16", "--out", str(plain)]) == 0
    assert load_checkpoint(plain / "last.pt")[2]["data"]["pad_to"] == 0
    capsys.readouterr()
    assert main(["sample", "--ckpt", str(plain / "last.pt"), "--n", "1", "--steps", "1", "--crop",
                 "--no-progress", "--out", str(tmp_path / "c.png")]) == 1
    assert "records no padding" in _err_line(capsys)


def test_resume_says_which_flags_it_ignores(run, tmp_path, capsys):
    import shutil

    out = tmp_path / "copy"
    shutil.copytree(run, out)
    assert main(["train", "--out", str(out), "--resume", "--steps", "5", "--T", "500", "--schedule", "cosine",
                 "--lr", "1e-3", "--no-progress"]) == 0
    err = capsys.readouterr().err
    assert "ignoring --schedule, --T" in err and "--lr" not in err
    from ddpm_lib import load_checkpoint

    _, diffusion, cfg = load_checkpoint(out / "last.pt")
    assert diffusion.num_timesteps == 30 and cfg["train"]["lr"] == 1e-3  # training options do apply
    before = (out / "last.pt").stat().st_mtime_ns
    export = tmp_path / "export.pt"
    assert main(["train", "--out", str(out), "--resume", "--steps", "2", "--no-progress", "--export", str(export)]) == 0
    printed = capsys.readouterr().out
    assert "already at step 5, at or past --steps 2 (the total, not a number to add): nothing to train" in printed
    assert (out / "last.pt").stat().st_mtime_ns == before and export.is_file()  # the export is still written


def test_cifar10_takes_the_papers_network_and_flips(tmp_path, monkeypatch, capsys):
    """--dataset cifar10 without --preset: the paper's 35.7M network and random flips (the data stubbed: the
    real set needs a download); --steps 0 builds everything and trains nothing."""
    from ddpm_lib import cli
    from ddpm_lib.data import CIFAR10_CLASSES, ImageData

    import ddpm_lib.trainer as trainer_module

    fake = ImageData(torch.zeros(4, 3, 32, 32), torch.zeros(4, dtype=torch.int64), CIFAR10_CLASSES, "cifar10")
    monkeypatch.setattr(cli, "_load_data", lambda *a, **k: fake)
    flips = []

    class Recording(trainer_module.Trainer):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            flips.append(self.cfg.hflip)

    monkeypatch.setattr(trainer_module, "Trainer", Recording)
    base = ["train", "--dataset", "cifar10", "--steps", "0", "--batch-size", "4", "--no-progress"]
    assert main([*base, "--out", str(tmp_path / "a")]) == 0
    out = capsys.readouterr().out
    assert "training cifar10 (35,746,307 parameters) on cifar10 [3, 32, 32]" in out and "nothing to train" in out
    assert not (tmp_path / "a" / "last.pt").exists()
    assert main([*base, "--hflip", "off", "--preset", "fashion-small", "--out", str(tmp_path / "b")]) == 0
    assert "training fashion-small" in capsys.readouterr().out and flips == [True, False]  # what is given is kept


def test_sample_steps_above_T_are_named(tmp_path, capsys):
    """The grids cannot take more DDIM steps than T: train says so instead of clamping silently."""
    assert main(["train", *TINY, "--sample-steps", "50", "--steps", "0", "--out", str(tmp_path / "r")]) == 0
    assert "note: --sample-steps 50 is above T = 30: the sample grids use 30 DDIM steps" in capsys.readouterr().out
    assert main(["train", *TINY, "--steps", "0", "--out", str(tmp_path / "q")]) == 0
    assert "note: --sample-steps" not in capsys.readouterr().out


def test_no_progress_prints_the_logged_losses(tmp_path, capsys):
    assert main(["train", *TINY, "--steps", "4", "--sample-every", "0", "--out", str(tmp_path / "r")]) == 0
    lines = [l for l in capsys.readouterr().out.splitlines() if l.startswith("step ")]
    assert [l.split(":")[0] for l in lines] == ["step 2", "step 4"] and "images/s, lr" in lines[0], lines
    with_bar = [a for a in TINY if a != "--no-progress"]
    assert main(["train", *with_bar, "--steps", "2", "--sample-every", "0", "--out", str(tmp_path / "bar")]) == 0
    assert not [l for l in capsys.readouterr().out.splitlines() if l.startswith("step ")]  # the bar shows them


def test_warnings_are_one_line_and_the_format_is_restored(run, tmp_path):
    import warnings

    before = warnings.formatwarning
    seen = []
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.showwarning = lambda m, c, f, l, file=None, line=None: seen.append(warnings.formatwarning(m, c, f, l))
        assert main(["sample", "--ckpt", str(run / "last.pt"), "--n", "1", "--steps", "1", "--no-progress",
                     "--out", str(tmp_path / "one.png")]) == 0
    assert seen and all(s.startswith("warning: ") and s.count("\n") == 1 for s in seen), seen
    assert warnings.formatwarning is before


def test_sample_seed_and_early_errors(run, tmp_path, capsys):
    outs = []
    for seed in (1, 1, 2):
        npz = tmp_path / "s.npz"
        assert main(["sample", "--ckpt", str(run / "last.pt"), "--n", "3", "--steps", "3", "--eta", "1",
                     "--seed", str(seed), "--no-progress", "--out", str(npz)]) == 0
        outs.append(np.load(npz)["arr_0"])
    assert np.array_equal(outs[0], outs[1]) and not np.array_equal(outs[0], outs[2])
    capsys.readouterr()
    assert main(["sample", "--ckpt", str(run / "last.pt"), "--sampler", "ddpm", "--eta", "1"]) == 1
    assert "--eta is DDIM's" in _err_line(capsys)
    png = tmp_path / "fd.png"  # --fd on a digits checkpoint: refused before any sampling
    assert main(["sample", "--ckpt", str(run / "last.pt"), "--n", "2", "--fd", "--out", str(png)]) == 1
    assert "--fd needs a Fashion-MNIST checkpoint" in _err_line(capsys) and not png.exists()
    (tmp_path / "afile").write_text("x")  # an output folder that is a file: one line, no traceback
    assert main(["sample", "--ckpt", str(run / "last.pt"), "--n", "1", "--steps", "1", "--no-progress",
                 "--out", str(tmp_path / "afile" / "x.png")]) == 1
    _err_line(capsys)
    if not torch.backends.mps.is_available():
        assert main(["sample", "--ckpt", str(run / "last.pt"), "--device", "mps"]) == 1
        assert "--device mps" in _err_line(capsys)
    assert main(["bpd", "--ckpt", str(run / "last.pt"), "--n", "2", "--data-root", str(tmp_path)]) == 0


def test_conditional_npz_has_labels(tmp_path):
    out = tmp_path / "cond"
    assert main(["train", *TINY, "--conditional", "--cond-drop-prob", "0.2", "--steps", "2", "--sample-every", "0",
                 "--out", str(out)]) == 0
    npz = tmp_path / "c.npz"
    assert main(["sample", "--ckpt", str(out / "last.pt"), "--n", "3", "--steps", "2", "--guidance-scale", "1.5",
                 "--class-label", "7", "--out", str(npz), "--no-progress"]) == 0
    arr = np.load(npz)
    assert arr["arr_0"].shape == (3, 8, 8, 1) and arr["arr_1"].tolist() == [7, 7, 7]
    assert main(["sample", "--ckpt", str(out / "last.pt"), "--n", "12", "--batch-size", "5", "--steps", "1",
                 "--out", str(npz), "--no-progress"]) == 0  # no --class-label: the classes in turn
    assert np.load(npz)["arr_1"].tolist() == [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 0, 1]


def test_fashion_crop_undoes_padding(tmp_path):
    out = tmp_path / "fm"
    assert main(["train", "--preset", "fashion-small", "--limit", "16", "--batch-size", "2", "--T", "30",
                 "--steps", "1", "--sample-every", "0", "--no-progress", "--out", str(out)]) == 0
    npz = tmp_path / "fm.npz"
    assert main(["sample", "--ckpt", str(out / "last.pt"), "--n", "2", "--steps", "2", "--crop", "--out", str(npz),
                 "--no-progress"]) == 0
    assert np.load(npz)["arr_0"].shape == (2, 28, 28, 1)


def test_errors_are_one_line(run, tmp_path, capsys):
    assert main(["sample", "--ckpt", str(tmp_path / "missing.pt")]) == 1
    assert "checkpoint not found" in _err_line(capsys)
    bad = tmp_path / "bad.pt"
    bad.write_bytes((run / "last.pt").read_bytes()[:1000])
    assert main(["info", "--ckpt", str(bad)]) == 1
    assert "not a readable checkpoint" in _err_line(capsys)
    assert main(["sample", "--ckpt", str(run / "last.pt"), "--out", str(tmp_path / "x.jpg")]) == 1
    assert ".png or .npz" in _err_line(capsys)
    assert main(["sample", "--ckpt", str(run / "last.pt"), "--crop", "--n", "1", "--steps", "1", "--no-progress",
                 "--out", str(tmp_path / "y.png")]) == 1
    assert "records no padding" in _err_line(capsys)
    assert main(["sample", "--ckpt", str(run / "last.pt"), "--guidance-scale", "2"]) == 1
    assert "class-conditional" in _err_line(capsys)
    assert main(["train", "--out", str(tmp_path / "r"), "--resume", str(tmp_path / "none.pt")]) == 1
    assert "not found" in _err_line(capsys)
    with pytest.raises(SystemExit) as e:
        main(["train", "--preset", "imagenet", "--out", str(tmp_path)])
    assert e.value.code == 2
    for flag in ("--hflip", "--ema-warmup"):  # on|off only ("auto" would have counted as on)
        with pytest.raises(SystemExit) as e:
            main(["train", "--out", str(tmp_path), flag, "auto"])
        assert e.value.code == 2


def test_help_documents_every_option(capsys):
    parser = build_parser()
    subs = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    assert set(subs.choices) == {"train", "sample", "bpd", "info"}
    for name, sp in subs.choices.items():
        for action in sp._actions:
            assert action.help, f"{name} {action.option_strings} has no help"
        with pytest.raises(SystemExit) as e:
            main([name, "--help"])
        assert e.value.code == 0
        out = capsys.readouterr().out
        assert "--ckpt" in out or name == "train"
        assert "(default: None)" not in out and "] (default:" not in out, name  # no contradicting defaults
        if name == "train":
            assert "batch size [128]" in out and "number of diffusion steps [1000]" in out
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0


def test_python_m_missing_checkpoint_subprocess(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-m", "ddpm_lib", "sample", "--ckpt", str(tmp_path / "nope.pt")],
                       capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 1
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: checkpoint not found") and "nope.pt" in lines[0]
    assert "Traceback" not in r.stderr


def test_train_out_of_memory_is_one_clear_line(tmp_path, monkeypatch, capsys):
    from ddpm_lib.trainer import Trainer

    def oom(self):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 1.00 GiB")

    monkeypatch.setattr(Trainer, "_train_step", oom)
    assert main(["train", *TINY, "--steps", "2", "--out", str(tmp_path / "run")]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: the GPU ran out of memory in training step 1 (batch_size 8)")
    assert "--batch-size on the command line" in err and len(err.splitlines()) == 1


def test_sample_fast_path_is_wired_through(run, tmp_path, capsys, monkeypatch):
    """--fast on routes the network through accel.make_sampler_forward (bf16, channels_last and CUDA graphs
    on CUDA): on the CPU it changes nothing, so the samples are identical; conditional + guidance included."""
    from ddpm_lib import accel

    calls = []
    call = accel.SamplerForward.__call__
    monkeypatch.setattr(accel.SamplerForward, "__call__", lambda self, *a, **k: calls.append(1) or call(self, *a, **k))
    out, used = {}, {}
    for fast in ("on", "off"):
        npz = tmp_path / f"{fast}.npz"
        calls.clear()
        assert main(["sample", "--ckpt", str(run / "last.pt"), "--n", "5", "--batch-size", "3", "--steps", "3",
                     "--eta", "1", "--fast", fast, "--device", "cpu", "--no-progress", "--out", str(npz)]) == 0
        out[fast], used[fast] = np.load(npz)["arr_0"], len(calls)
    np.testing.assert_array_equal(out["on"], out["off"])
    assert used == {"on": 2 * 3, "off": 0}  # the sampler calls the fast forward: 2 batches x 3 steps
    assert "fast sampling on cpu: bf16 False, channels_last False, compile False, CUDA graph False" in \
        capsys.readouterr().out
    # the inference experiments: the same function, the sums in another order
    npz = tmp_path / "exp.npz"
    assert main(["sample", "--ckpt", str(run / "last.pt"), "--n", "5", "--batch-size", "3", "--steps", "3",
                 "--eta", "1", "--fast", "on", "--experimental-kernels", "--device", "cpu", "--no-progress",
                 "--out", str(npz)]) == 0
    assert np.abs(np.load(npz)["arr_0"].astype(np.float64) - out["off"]).max() <= 1  # uint8 levels
    # float16 autocast (for GPUs without native bf16): float16 arithmetic, the same samples to a few levels
    npz = tmp_path / "fp16.npz"
    assert main(["sample", "--ckpt", str(run / "last.pt"), "--n", "5", "--batch-size", "3", "--steps", "3",
                 "--eta", "1", "--fast", "on", "--fp16", "on", "--device", "cpu", "--no-progress",
                 "--out", str(npz)]) == 0
    assert "fast sampling on cpu: bf16 False, fp16 True, channels_last False" in capsys.readouterr().out
    assert np.abs(np.load(npz)["arr_0"].astype(np.float64) - out["off"]).max() <= 2  # uint8 levels
    for flags in (["--compile"], ["--experimental-kernels"], ["--fp16", "on"]):
        assert main(["sample", "--ckpt", str(run / "last.pt"), "--n", "2", "--steps", "2", *flags, "--fast", "off",
                     "--device", "cpu", "--out", str(tmp_path / "x.png")]) == 1
        assert f"{flags[0]} needs the fast path" in capsys.readouterr().err


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_sample_fast_path_on_cuda_matches_float32(run, tmp_path):
    """On CUDA, --fast auto (bf16 where native, channels_last, CUDA graphs) gives the float32 samples within
    bf16 tolerance (the same x_T and noise: the generator is on the CPU)."""
    out = {}
    for fast in ("auto", "off"):
        npz = tmp_path / f"{fast}.npz"
        assert main(["sample", "--ckpt", str(run / "last.pt"), "--n", "6", "--batch-size", "4", "--steps", "5",
                     "--fast", fast, "--device", "cuda", "--no-progress", "--out", str(npz)]) == 0
        out[fast] = np.load(npz)["arr_0"].astype(np.float64)
    assert np.abs(out["auto"] - out["off"]).mean() < 3.0  # uint8 levels, out of 255


def test_train_cuda_graph_option(tmp_path, capsys):
    """--cuda-graph on: the update runs through accel.TrainStep (on the CPU without a graph) and is recorded."""
    out = tmp_path / "g"
    assert main(["train", *TINY, "--steps", "2", "--sample-every", "0", "--cuda-graph", "on", "--out", str(out)]) == 0
    assert "CUDA graph False" in capsys.readouterr().out  # no CUDA here: the same step code, no graph
    assert json.loads((out / "config.json").read_text())["train"]["cuda_graph"] is True


def test_sample_chain_shows_x_t_and_the_x0_prediction(run, tmp_path, capsys):
    """--chain: per sample a row of x_t and a row of the predicted x_0 at 11 steps, then the sample itself."""
    from PIL import Image

    for sampler, extra, top in (("ddim", ["--steps", "20"], 29), ("ddpm", [], 30)):  # DDIM's tau ends at 28
        chain = tmp_path / f"chain_{sampler}.png"
        assert main(["sample", "--ckpt", str(run / "last.pt"), "--n", "3", "--batch-size", "2", "--sampler",
                     sampler, *extra, "--chain", str(chain), "--out", str(tmp_path / "s.png"),
                     "--no-progress"]) == 0
        out = capsys.readouterr().out
        with Image.open(chain) as img:  # 8x8 digits, padding 2: 12 columns, 2 samples x 2 rows
            assert img.size == (12 * 10 + 2, 4 * 10 + 2), img.size
        assert "wrote the chain of 2 samples" in out and f"the paper's t = {top}, " in out and out.count(", ") >= 10
        grid = np.asarray(Image.open(chain))
        # the last column holds the sample in both rows of a sample
        assert np.array_equal(grid[2:10, -10:-2], grid[12:20, -10:-2])
    assert main(["sample", "--ckpt", str(run / "last.pt"), "--chain", str(tmp_path / "c.jpg")]) == 1
    assert "--chain must end in .png" in _err_line(capsys)
