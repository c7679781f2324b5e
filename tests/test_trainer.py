"""Training loop, EMA, warm-up, clipping, checkpoints (atomic, corrupt, mismatched), resume, NaN handling."""
import copy
import json
import math
import os
import signal
import warnings

import pytest
import torch

from ddpm_lib import GaussianDiffusion, UNet, load_dataset
from ddpm_lib.ema import EMA, ema_decay_at, ema_init_weight
from ddpm_lib.trainer import (
    CheckpointError,
    NonFiniteLossError,
    Trainer,
    TrainingOutOfMemoryError,
    TrainConfig,
    ema_updates,
    export_checkpoint,
    load_checkpoint,
    read_checkpoint,
    warmup_lr,
    young_ema_warning,
)

STEPS = 6


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One intra-op thread: much faster for these tiny networks, and immune to a busy CPU."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits", size=16)


def _model(conditional=False, seed=0):
    torch.manual_seed(seed)
    return UNet.from_preset("tiny", in_channels=1, image_size=16, dropout=0.1,
                            num_classes=10 if conditional else None)


def _diffusion():
    return GaussianDiffusion("linear", num_timesteps=100)


OPTS = dict(device="cpu", batch_size=8, warmup=4, ema_decay=0.9, ema_warmup=True, log_every=2, save_every=3,
            sample_every=0, progress=False, seed=3, hflip=True, cond_drop_prob=0.25)


def _trainer(data, out_dir, seed=0, **kw):
    return Trainer(_model(conditional=True, seed=seed), _diffusion(), data, out_dir=out_dir, **{**OPTS, **kw})


def _states(tr):
    return tr.model.state_dict(), tr.ema.state_dict(), tr.optimizer.state_dict()


def _assert_identical(a, b):
    for sa, sb in zip(a[:2], b[:2]):
        assert sa.keys() == sb.keys()
        for k in sa:
            assert torch.equal(sa[k], sb[k]), k
    oa, ob = a[2]["state"], b[2]["state"]
    for i in oa:
        for k in oa[i]:
            assert torch.equal(oa[i][k], ob[i][k]), (i, k)


@pytest.fixture(scope="module")
def reference(digits, tmp_path_factory):
    """An uninterrupted run of STEPS steps."""
    tr = _trainer(digits, tmp_path_factory.mktemp("ref"))
    tr.train(steps=STEPS)
    return tr


# ---------------------------------------------------------------------------------------------- schedules
def test_warmup_lr_values():
    assert warmup_lr(0, 2e-4, 5000) == pytest.approx(2e-4 / 5000)
    assert warmup_lr(2499, 2e-4, 5000) == pytest.approx(1e-4)
    assert warmup_lr(4999, 2e-4, 5000) == pytest.approx(2e-4)
    assert warmup_lr(10**6, 2e-4, 5000) == 2e-4
    assert warmup_lr(0, 1e-3, 0) == 1e-3
    cfg = TrainConfig()
    assert (cfg.lr, cfg.warmup, cfg.grad_clip, cfg.ema_decay, cfg.batch_size) == (2e-4, 5000, 1.0, 0.9999, 128)


def test_trainer_sets_warmup_lr(digits, tmp_path):
    for cuda_graph in (False, True):  # the plain step and accel.TrainStep (without a graph on the CPU)
        tr = _trainer(digits, None, warmup=4, lr=1e-3, cuda_graph=cuda_graph)
        seen = []
        tr.optimizer.register_step_pre_hook(lambda opt, a, k: seen.append(float(opt.param_groups[0]["lr"])))
        tr.train(steps=6)
        assert seen == pytest.approx([2.5e-4, 5e-4, 7.5e-4, 1e-3, 1e-3, 1e-3]), cuda_graph


def test_ema_math():
    assert ema_decay_at(0, 0.9999) == 0.9999
    assert ema_decay_at(0, 0.9999, warmup=True) == pytest.approx(0.1)
    assert ema_decay_at(8, 0.9999, warmup=True) == pytest.approx(0.5)
    assert ema_decay_at(10**7, 0.999, warmup=True) == 0.999
    net = torch.nn.Linear(3, 2)
    ema = EMA(net, decay=0.9)
    old = {k: v.clone() for k, v in ema.state_dict().items()}
    with torch.no_grad():
        for p in net.parameters():
            p.add_(1.0)
    d = ema.update(net, step=5)
    assert d == 0.9
    for k, v in net.state_dict().items():
        torch.testing.assert_close(ema.state_dict()[k], 0.9 * old[k] + 0.1 * v)
    assert not any(p.requires_grad for p in ema.model.parameters())


def test_ema_init_weight_and_the_young_ema_warning(digits, tmp_path):
    """The share of the initial weights in the average is the product of the decays: measured on a weight that
    is 1 at the start and 0 after it. load_checkpoint and sample_grid warn while that share is over 10 %."""
    # 200 updates: past the warm-up's crossover to the plain decay for 0.9 and 0.95 (steps 80 and 170)
    for decay, warmup in [(0.9, False), (0.9, True), (0.95, True), (0.99, True), (1.0, False)]:
        net = torch.nn.Linear(1, 1, bias=False)
        with torch.no_grad():
            net.weight.fill_(1.0)
        ema = EMA(net, decay=decay, warmup=warmup)
        with torch.no_grad():
            net.weight.fill_(0.0)
        for step in range(200):
            ema.update(net, step)
        assert ema.model.weight.item() == pytest.approx(ema_init_weight(200, decay, warmup), rel=1e-3), (decay, warmup)
    assert ema_init_weight(5000, 0.9999) == pytest.approx(0.6065, abs=1e-4)
    assert ema_init_weight(23000, 0.9999) > 0.1 > ema_init_weight(23100, 0.9999)
    assert ema_init_weight(0, 0.9999, warmup=True) == 1.0 and ema_init_weight(1, 0.9999, warmup=True) == pytest.approx(0.1)
    with pytest.raises(ValueError, match="updates must be an int"):
        ema_init_weight(-1, 0.9)
    assert "61%" in young_ema_warning(5000, 0.9999, False) and "ema_warmup=True" in young_ema_warning(9, 0.9, False)
    assert young_ema_warning(1, 0.9, True) is None  # exactly 10 % left: not over
    assert "1 update at" in young_ema_warning(1, 0.95, False)
    assert "weights='model'" not in young_ema_warning(9, 0.9, False, raw_weights=False)  # an EMA-only export
    assert young_ema_warning(5000, 0.9999, True) is None and young_ema_warning(30000, 0.9999, False) is None
    tr = _trainer(digits, tmp_path, ema_decay=0.9999, ema_warmup=False)
    tr.train(steps=2)
    with pytest.warns(RuntimeWarning, match=r"still give 100% of their weight .*2 updates at decay 0.9999, without"):
        load_checkpoint(tmp_path / "last.pt")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load_checkpoint(tmp_path / "last.pt", weights="model")  # the raw weights: no warning
    with pytest.warns(RuntimeWarning, match="samples at step 2: the EMA weights still give"):
        tr.sample_grid(tmp_path / "grid.png", n=2, steps=2)
    # fp16's skipped updates skip the EMA's too: the warning counts the updates made, also after an export
    state = torch.load(tmp_path / "last.pt", weights_only=False)
    state.update(step=30000, skipped_steps=25000)
    torch.save(state, tmp_path / "skips.pt")
    assert ema_updates(state) == 5000
    export_checkpoint(tmp_path / "skips.pt", tmp_path / "skips_ema.pt")
    for path in ("skips.pt", "skips_ema.pt"):
        with pytest.warns(RuntimeWarning, match=r"still give 61% .*5,000 updates"):
            load_checkpoint(tmp_path / path)


def test_grad_clipping_happens(digits):
    norms = []

    def record(opt, args, kwargs):
        grads = [p.grad for g in opt.param_groups for p in g["params"] if p.grad is not None]
        norms.append(float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))))

    tr = _trainer(digits, None, grad_clip=1e-4)
    tr.optimizer.register_step_pre_hook(record)
    tr.train(steps=2)
    assert norms == pytest.approx([1e-4, 1e-4], rel=1e-3)
    norms.clear()
    tr = _trainer(digits, None, grad_clip=None)
    tr.optimizer.register_step_pre_hook(record)
    tr.train(steps=2)
    assert all(n > 1e-3 for n in norms)


def test_label_dropout_uses_null_class(digits):
    seen = []
    tr = _trainer(digits, None, cond_drop_prob=0.5, batch_size=64)
    tr.model.register_forward_pre_hook(lambda m, args, kwargs: seen.append(kwargs["y"].clone()), with_kwargs=True)
    tr.train(steps=2)
    y = torch.cat(seen)
    frac = float((y == 10).float().mean())
    assert 0.3 < frac < 0.7 and int(y.max()) == 10


# ---------------------------------------------------------------------------------------------- resume
def test_resume_is_bit_identical(digits, reference, tmp_path):
    tr = _trainer(digits, tmp_path)
    tr.train(steps=3)
    assert read_checkpoint(tmp_path / "last.pt")["step"] == 3
    tr2 = _trainer(digits, tmp_path, seed=2).resume()  # another init: all must come from the file
    assert tr2.step == 3
    tr2.train(steps=STEPS)
    _assert_identical(_states(tr2), _states(reference))
    assert tr2.history == reference.history


def test_step_through_accel_train_step_trains_and_resumes_bit_identically(digits, tmp_path):
    """cuda_graph=True routes every update through accel.TrainStep (one CUDA graph on CUDA; on the CPU the same
    step code without one): it trains (the loss falls on average, the EMA moves), its own generator for t and
    the noise is saved, and a resumed run ends with the same weights as an uninterrupted one."""
    ref = _trainer(digits, None, cuda_graph=True)
    assert ref._step_fn is not None and ref.step_gen is not None and not ref.use_cuda_graph
    ema0 = [p.clone() for p in ref.ema.model.parameters()]
    ref.train(steps=STEPS)
    assert ref.stats["cuda_graph"] is False and len(ref.history) == STEPS // 2
    assert all(math.isfinite(l) for _, l in ref.history)
    assert any(not torch.equal(a, b) for a, b in zip(ema0, ref.ema.model.parameters()))
    assert ref.optimizer.param_groups[0]["lr"] == pytest.approx(warmup_lr(STEPS - 1, OPTS.get("lr", 2e-4), 4))
    # the same settings without it draw t and the noise elsewhere: another run
    plain = _trainer(digits, None)
    plain.train(steps=STEPS)
    assert any(not torch.equal(a, b) for a, b in zip(ref.model.parameters(), plain.model.parameters()))

    tr = _trainer(digits, tmp_path, cuda_graph=True)
    tr.train(steps=3)
    assert "step_gen" in read_checkpoint(tmp_path / "last.pt")["rng"]
    tr2 = Trainer.from_checkpoint(tmp_path / "last.pt", digits, device="cpu")
    assert tr2.cfg.cuda_graph is True and tr2.step == 3
    tr2.train(steps=STEPS)
    _assert_identical(_states(tr2), _states(ref))
    assert tr2.history == ref.history
    # a checkpoint of this step resumes with the usual one, and back
    tr3 = _trainer(digits, tmp_path / "usual").resume(tmp_path / "last.pt")
    assert tr3.optimizer.param_groups[0]["capturable"] is False and tr3._step_fn is None
    tr3.train(steps=STEPS)
    tr4 = _trainer(digits, None, cuda_graph=True).resume(tmp_path / "usual" / "last.pt")
    assert tr4.step == STEPS
    tr4.train(steps=STEPS + 2)
    assert tr4.step == STEPS + 2 and all(math.isfinite(l) for _, l in tr4.history)
    with pytest.raises(ValueError, match="cuda_graph must be True, False or 'auto'"):
        TrainConfig(cuda_graph="sometimes")


def test_resume_from_another_kind_of_device_reseeds_the_generators(digits):
    """A CUDA generator's state (16 bytes) cannot be loaded into a CPU generator (5056), nor the reverse: such a
    checkpoint resumes with generators seeded from its states (deterministically), with a warning."""
    tr = _trainer(digits, None, cuda_graph=True)
    tr.train(steps=2)
    state = tr.state_dict()
    state["rng"]["gen"] = torch.arange(16, dtype=torch.uint8)  # what a CUDA generator's get_state() returns
    state["rng"]["step_gen"] = torch.arange(16, dtype=torch.uint8) + 1
    runs = []
    for _ in range(2):
        tr2 = _trainer(digits, None, cuda_graph=True)
        with pytest.warns(RuntimeWarning, match=r"another kind of device \(gen, step_gen\)"):
            tr2.load_state_dict(copy.deepcopy(state))  # (as from a file: nothing shared between the runs)
        tr2.train(steps=4)
        assert tr2.step == 4 and all(math.isfinite(l) for _, l in tr2.history)
        runs.append(tr2)
    _assert_identical(_states(runs[0]), _states(runs[1]))  # the same reseeding both times
    assert not torch.equal(runs[0].gen.get_state(), tr.gen.get_state())


def test_resume_puts_adams_moments_in_the_parameters_layout(digits, tmp_path):
    """A checkpoint written without channels_last (a CPU run) resumed with it (as on CUDA): Adam's moments take
    the parameters' strides, which CUDA's fused Adam requires (it raised 'must have same dtype, device, and
    layout' on an H200 before)."""
    _trainer(digits, tmp_path, channels_last=False).train(steps=3)
    tr = _trainer(digits, None, channels_last=True, fused=True).resume(tmp_path / "last.pt")
    conv = [p for p in tr.model.parameters() if p.ndim == 4]
    assert any(not p.is_contiguous() for p in conv)  # channels_last weights (3x3 kernels)
    for p in tr.model.parameters():
        for k in ("exp_avg", "exp_avg_sq"):
            assert tr.optimizer.state[p][k].stride() == p.stride(), k
    tr.train(steps=5)
    assert all(math.isfinite(l) for _, l in tr.history)


def test_resume_keeps_this_trainers_kind_of_adam(digits, tmp_path):
    """load_state_dict takes fused/foreach/capturable from the file: the trainer puts its own back (a fused run
    resumed without fusing, and the reverse), with the step counts where that kind of Adam keeps them."""
    fused = _trainer(digits, tmp_path / "fused", fused=True)
    if not fused.fused:
        pytest.skip("fused Adam is not available on this CPU build of torch")
    fused.train(steps=3)
    plain = _trainer(digits, tmp_path / "plain")
    plain.train(steps=3)
    back = _trainer(digits, None).resume(tmp_path / "fused" / "last.pt")
    assert not back.optimizer.param_groups[0].get("fused")
    assert all(st["step"].device.type == "cpu" for st in back.optimizer.state.values())
    back.train(steps=STEPS)
    on = _trainer(digits, None, fused=True).resume(tmp_path / "plain" / "last.pt")
    assert on.optimizer.param_groups[0]["fused"] is True
    assert all(st["step"].dtype == torch.float32 for st in on.optimizer.state.values())
    on.train(steps=STEPS)
    assert all(math.isfinite(l) for _, l in back.history + on.history)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_graph_training_replays_and_resumes(digits, tmp_path):
    """On CUDA, cuda_graph=True captures the whole update after three eager steps and replays it; a resumed
    run (which warms up and captures again) follows the uninterrupted one."""
    ref = _trainer(digits, None, device="cuda", cuda_graph=True, compile=False, log_every=2)
    ref.train(steps=8)
    assert ref._step_fn.graphed, ref._step_fn.graph_error
    assert ref.stats["cuda_graph"] and ref.optimizer.param_groups[0]["capturable"]
    assert all(math.isfinite(l) for _, l in ref.history)
    # the learning rate is the device tensor the graph reads, changed in place (a new tensor would mean a
    # capture per step): the warm-up's value after step 8 of OPTS' 4 warm-up steps
    lr = ref.optimizer.param_groups[0]["lr"]
    assert torch.is_tensor(lr) and lr.device.type == "cuda"
    assert float(lr) == pytest.approx(warmup_lr(7, 2e-4, 4))
    graph = ref._step_fn._graph
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ref.train(steps=10)
    assert ref.optimizer.param_groups[0]["lr"] is lr and ref._step_fn._graph is graph  # replayed, not recaptured
    assert not [w for w in caught if "captur" in str(w.message)], [str(w.message) for w in caught]
    ref = _trainer(digits, None, device="cuda", cuda_graph=True, compile=False, log_every=2)
    ref.train(steps=8)
    tr = _trainer(digits, tmp_path, device="cuda", cuda_graph=True, compile=False, log_every=2)
    tr.train(steps=4)
    tr2 = Trainer.from_checkpoint(tmp_path / "last.pt", digits, device="cuda")
    tr2.train(steps=8)
    assert tr2._step_fn.graphed
    for a, b in zip(tr2.ema.model.parameters(), ref.ema.model.parameters()):
        torch.testing.assert_close(a, b, rtol=2e-3, atol=1e-4)
    # a checkpoint of the usual step without fused Adam (step counts on the CPU) resumes with the graph
    cpu_run = _trainer(digits, tmp_path / "cpu", device="cpu")
    cpu_run.train(steps=4)
    with pytest.warns(RuntimeWarning, match="another kind of device"):  # a CPU generator's state
        tr3 = _trainer(digits, None, device="cuda", cuda_graph=True, compile=False).resume(tmp_path / "cpu" / "last.pt")
    tr3.train(steps=10)
    assert tr3._step_fn.graphed and all(math.isfinite(l) for _, l in tr3.history)


def test_ctrl_c_saves_then_resume_is_bit_identical(digits, reference, tmp_path):
    tr = _trainer(digits, tmp_path)
    calls = []

    def interrupt(module, args, output):
        calls.append(1)
        if len(calls) == 2:  # during step 2
            os.kill(os.getpid(), signal.SIGINT)

    tr.model.register_forward_hook(interrupt)
    # Python's own Ctrl-C handler, also where pytest runs as a background job (SIGINT ignored there)
    outer = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with pytest.raises(KeyboardInterrupt):
            tr.train(steps=STEPS)
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # the trainer put it back
    finally:
        signal.signal(signal.SIGINT, outer)
    assert read_checkpoint(tmp_path / "last.pt")["step"] == 2  # the step in flight was finished, then saved
    tr2 = Trainer.from_checkpoint(tmp_path / "last.pt", digits, device="cpu")
    assert tr2.cfg == TrainConfig(**{k: v for k, v in OPTS.items() if k != "device"})
    tr2.train(steps=STEPS)
    _assert_identical(_states(tr2), _states(reference))
    assert tr2.history == reference.history  # step 2, interrupted, is a logging step: its entry is kept


def test_ignored_ctrl_c_stays_ignored(digits, tmp_path):
    """Under nohup or as a background job SIGINT is ignored; the trainer leaves it so and trains on."""
    tr = _trainer(digits, tmp_path)
    outer = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        tr.model.register_forward_hook(lambda m, a, o: os.kill(os.getpid(), signal.SIGINT))
        tr.train(steps=2)
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGINT, outer)
    assert tr.step == 2


# ---------------------------------------------------------------------------------------------- files
def test_outputs_written(digits, tmp_path):
    tr = _trainer(digits, tmp_path, sample_every=2, sample_n=4, sample_steps=2, log_every=1)
    tr.train(steps=2)
    png = tmp_path / "samples" / "step_0000002.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    from PIL import Image

    with Image.open(png) as im:
        assert im.size == (2 * 16 + 3 * 2, 2 * 16 + 3 * 2)  # 2x2 grid, padding 2
    hist = json.loads((tmp_path / "loss_history.json").read_text())
    assert [h[0] for h in hist] == [1, 2] and all(isinstance(h[1], float) for h in hist)
    assert (tmp_path / "loss_history.csv").read_text().splitlines()[0] == "step,loss"
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert cfg["train"]["batch_size"] == 8 and cfg["model"]["config"]["num_classes"] == 10
    assert not [p for p in os.listdir(tmp_path) if p.endswith(".tmp")]


def test_atomic_save_keeps_old_file_on_failure(digits, tmp_path, monkeypatch):
    tr = _trainer(digits, tmp_path)
    tr.train(steps=1)
    before = (tmp_path / "last.pt").read_bytes()
    real_save = torch.save

    def failing_save(obj, f, *a, **k):
        f.write(b"partial data")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", failing_save)
    with pytest.raises(OSError, match="disk full"):
        tr.save()
    monkeypatch.setattr(torch, "save", real_save)
    assert (tmp_path / "last.pt").read_bytes() == before
    assert sorted(os.listdir(tmp_path)) == ["config.json", "last.pt", "loss_history.csv", "loss_history.json"]


def test_corrupt_or_foreign_files_give_clear_errors(digits, tmp_path):
    tr = _trainer(digits, tmp_path)
    tr.train(steps=1)
    good = (tmp_path / "last.pt").read_bytes()
    bad = tmp_path / "truncated.pt"
    bad.write_bytes(good[: len(good) // 2])
    with pytest.raises(CheckpointError, match="truncated.pt.*not a readable checkpoint"):
        load_checkpoint(bad)
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"hello world")
    with pytest.raises(CheckpointError, match="junk.pt"):
        load_checkpoint(junk)
    foreign = tmp_path / "foreign.pt"
    torch.save({"weights": torch.zeros(3)}, foreign)
    with pytest.raises(CheckpointError, match="not a ddpm_lib checkpoint"):
        load_checkpoint(foreign)
    with pytest.raises(FileNotFoundError, match="missing.pt"):
        load_checkpoint(tmp_path / "missing.pt")
    assert issubclass(CheckpointError, ValueError)


def test_config_mismatch_names_keys(digits, tmp_path):
    tr = _trainer(digits, tmp_path, preset=None)
    tr.preset = "tiny"
    tr.train(steps=1)
    path = tmp_path / "last.pt"
    model, diffusion, cfg = load_checkpoint(path, expect={"preset": "tiny", "image_size": 16, "channels": 1})
    assert cfg["step"] == 1 and diffusion.num_timesteps == 100 and not model.training
    with pytest.raises(CheckpointError, match=r"preset: checkpoint has 'tiny', expected 'fashion-base'"):
        load_checkpoint(path, expect={"preset": "fashion-base"})
    other = UNet.from_preset("tiny", in_channels=1, image_size=16, ch=16, num_classes=10, dropout=0.1)
    with pytest.raises(CheckpointError, match=r"model\.config\.ch: checkpoint has 32, expected 16") as e:
        load_checkpoint(path, expect={"model_config": other.config, "T": 50})
    assert "T: checkpoint has 100, expected 50" in str(e.value) and "in_channels" not in str(e.value)
    with pytest.raises(ValueError, match="unknown key"):
        load_checkpoint(path, expect={"colour": "red"})
    # another schedule: named with the betas' ends and count, not 100 numbers
    with pytest.raises(CheckpointError, match=r"\(100 values\), expected \[.*\(50 values\)") as e:
        load_checkpoint(path, expect={"diffusion": GaussianDiffusion("linear", num_timesteps=50)})
    assert len(str(e.value)) < 1500, len(str(e.value))
    betas = _diffusion().betas.clone()
    betas[40] *= 1.5  # the same ends and length: the first entry that differs is named
    with pytest.raises(CheckpointError, match=r"\(100 values\), \[40\] = ") as e:
        load_checkpoint(path, expect={"diffusion": GaussianDiffusion(betas)})
    # resuming into a different network is refused, naming the key
    t3 = Trainer(other, _diffusion(), digits, out_dir=tmp_path, **OPTS)
    with pytest.raises(CheckpointError, match="model.config.ch"):
        t3.resume()


def test_resume_keeps_the_checkpoints_preset(digits, tmp_path):
    tr = _trainer(digits, tmp_path, preset="tiny")
    tr.train(steps=1)
    again = _trainer(digits, tmp_path).resume()  # built without a preset name: the checkpoint's is kept
    again.train(steps=2)
    assert again.preset == "tiny" and read_checkpoint(tmp_path / "last.pt")["config"]["model"]["preset"] == "tiny"


def test_export_ema_only_fp16(digits, tmp_path):
    tr = _trainer(digits, tmp_path)
    tr.train(steps=2)
    out = export_checkpoint(tmp_path / "last.pt", tmp_path / "small.pt")
    assert out.stat().st_size < 0.3 * (tmp_path / "last.pt").stat().st_size
    model, _, cfg = load_checkpoint(out)
    assert cfg["kind"] == "ema" and cfg["step"] == 2
    for k, v in model.state_dict().items():
        assert v.dtype == torch.float32
        torch.testing.assert_close(v, tr.ema.state_dict()[k].half().float())
    with pytest.raises(CheckpointError, match="cannot be resumed"):
        _trainer(digits, tmp_path).resume(out)


# ---------------------------------------------------------------------------------------------- failures
def test_nan_loss_stops_and_keeps_last_good_checkpoint(digits, reference, tmp_path):
    tr = _trainer(digits, tmp_path, save_every=2)
    calls = []

    def poison(module, args, output):
        calls.append(1)
        return output * float("nan") if len(calls) >= 5 else output

    hook = tr.model.register_forward_hook(poison)
    with pytest.raises(NonFiniteLossError, match="non-finite at step 5") as e:
        tr.train(steps=STEPS)
    assert e.value.step == 5
    # the advice fits the run: float32 on the CPU with clipping on, so neither bf16=False nor clipping is offered
    assert "Try a lower learning rate (lr=0.0002)." in str(e.value), str(e.value)
    unclipped = _trainer(digits, None, grad_clip=None, bf16=True)
    unclipped.model.register_forward_hook(lambda m, a, out: out * float("nan"))
    with pytest.raises(NonFiniteLossError, match=r"or gradient clipping \(grad_clip=1.0\) or bf16=False\.$"):
        unclipped.train(steps=1)
    state = read_checkpoint(tmp_path / "last.pt")
    assert state["step"] == 4
    assert all(torch.isfinite(v).all() for v in state["model"].values())
    assert str(tmp_path / "last.pt") in str(e.value)
    # the same trainer, resumed from that checkpoint, trains on as an uninterrupted run (the flag is cleared)
    hook.remove()
    tr.resume()
    tr.train(steps=STEPS)
    _assert_identical(_states(tr), _states(reference))


def test_out_of_memory_says_what_to_change_and_lets_go(digits, tmp_path):
    """A GPU out-of-memory error (simulated: PyTorch's exception, raised in the forward pass of step 4) becomes
    a TrainingOutOfMemoryError naming the batch size and the remedies; the failed step's tensors are not held
    (no chained exception, no gradients), and the same trainer goes on afterwards."""
    import weakref

    tr = _trainer(digits, tmp_path, save_every=2)
    calls, held = [], []

    def oom(module, args, output):
        calls.append(1)
        if len(calls) == 4:
            held.append(weakref.ref(output))
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return output

    handle = tr.model.register_forward_hook(oom)
    with pytest.raises(TrainingOutOfMemoryError) as e:
        tr.train(steps=STEPS)
    err = e.value
    assert isinstance(err, torch.cuda.OutOfMemoryError)
    msg = str(err)
    assert "ran out of memory in training step 4 (batch_size 8" in msg
    assert "a smaller batch_size (e.g. 4" in msg and "bf16=True" in msg and "Runtime > Restart" in msg
    assert f"The last checkpoint is {tmp_path / 'last.pt'}" in msg and "Tried to allocate 2.00 GiB" in msg
    assert err.__context__ is None and err.__cause__ is None  # the failed step's traceback is not kept
    del err, e
    import gc

    gc.collect()
    assert held[0]() is None  # the failed forward's output was freed
    assert tr.step == 3 and all(p.grad is None for p in tr.model.parameters())
    handle.remove()
    tr.train(steps=STEPS)  # the same trainer goes on
    assert tr.step == STEPS


def test_settings_that_cannot_train_are_refused(digits):
    with pytest.raises(ValueError, match="learned_range' needs loss_type='hybrid'"):
        Trainer(_model(), GaussianDiffusion("linear", num_timesteps=100, var_type="learned_range"), digits.images,
                **{**OPTS, "cond_drop_prob": 0.0})
    with pytest.raises(ValueError, match=r"lr must be a number > 0"):
        TrainConfig(lr=0.0)
    with pytest.raises(ValueError, match=r"ema_decay must lie in \[0, 1\)"):
        TrainConfig(ema_decay=1.0)


def test_data_with_nan_are_refused_up_front(digits):
    images = digits.images.clone()
    images[3, 0, 2, 2] = float("nan")
    images[5, 0, 1, 1] = float("inf")
    with pytest.raises(ValueError, match="data: 2 image values are NaN or infinite"):
        Trainer(_model(), _diffusion(), images, **{**OPTS, "cond_drop_prob": 0.0})


def test_infinite_lr_never_saves_bad_weights(digits, tmp_path):
    tr = _trainer(digits, tmp_path, save_every=1, lr=float("inf"), warmup=0)
    with pytest.raises(NonFiniteLossError, match="step 1"):
        tr.train(steps=3)
    assert not (tmp_path / "last.pt").exists()


def test_minutes_budget_and_bf16_autocast_on_cpu(digits):
    tr = _trainer(digits, None, bf16=True)
    tr.train(minutes=0.02)
    assert 1 <= tr.step and tr.stats["bf16"] and tr.stats["images_per_s"] > 0
    with pytest.raises(ValueError, match="steps"):
        tr.train()


def test_fp16_runs_under_float16_autocast_with_unscaled_gradients(digits):
    """fp16=True: the forward runs in float16 (bf16 and the TrainStep path off), the loss is scaled by 2**16 for
    the backward pass and unscaled before clipping and Adam: the gradient of the third update is the float32
    run's to float16 precision (a missing unscale would be 65536 times too large)."""
    runs = {}
    for fp16 in (False, True):
        tr = _trainer(digits, None, fp16=fp16, grad_clip=None)
        dtypes = []
        tr.model.register_forward_hook(lambda m, i, o: dtypes.append(o.dtype))
        tr.train(steps=3)
        runs[fp16] = (tr, torch.cat([p.grad.flatten() for p in tr._params]), set(dtypes))
    # with clipping that acts (the norm is about 3.8): the gradient is unscaled before it is clipped
    clipped = []
    for fp16 in (False, True):
        tr = _trainer(digits, None, fp16=fp16, grad_clip=0.01)
        tr.train(steps=3)
        clipped.append(torch.cat([p.grad.flatten() for p in tr._params]))
    assert clipped[0].norm() == pytest.approx(0.01, rel=1e-4)
    assert (clipped[1] - clipped[0]).norm() / clipped[0].norm() < 5e-3
    tr, g16, dtypes = runs[True]
    assert dtypes == {torch.float16} and runs[False][2] == {torch.float32}
    assert tr.use_fp16 and not tr.use_bf16 and tr._step_fn is None and tr.stats["fp16"]
    assert tr.scaler.get_scale() == 2.0**16 and tr.skipped_steps == 0
    assert all(p.dtype == torch.float32 for p in tr.model.parameters())  # float32 master weights
    g32 = runs[False][1]
    assert (g16 - g32).norm() / g32.norm() < 5e-3
    assert all(math.isfinite(l) for _, l in tr.history)


def test_fp16_first_compiled_step_scales_its_backward(digits, monkeypatch):
    """The first step under compile=True runs its own backward (compiling it): under fp16 that backward is
    scaled too, so the update equals the uncompiled one (torch.compile stood in for by the identity here)."""
    monkeypatch.setattr(torch, "compile", lambda module, **kw: module)
    grads = []
    for compile_ in (False, True):
        tr = _trainer(digits, None, fp16=True, compile=compile_, grad_clip=None)
        tr.train(steps=1)
        assert tr.compiled is compile_
        grads.append(torch.cat([p.grad.flatten() for p in tr._params]))
    assert torch.equal(grads[0], grads[1]) and grads[0].norm() > 0


def _overflow_at(tr, steps):
    """Make the gradient of the given (1-based) updates infinite, as a float16 overflow would."""
    p = tr._params[0]
    return p.register_hook(lambda g: g * float("inf") if tr.step + 1 in steps else g)


def test_fp16_skips_an_overflowing_update_and_resumes_bit_identically(digits, tmp_path):
    """An update whose gradient overflows is skipped (weights, Adam's moments and the EMA stay), the scale halves
    and training goes on; the scaler's state is in the checkpoint, so a resumed run is bit-identical."""
    ref = _trainer(digits, None, fp16=True)
    _overflow_at(ref, {2})
    ref.train(steps=1)
    before = copy.deepcopy(_states(ref))
    ref.train(steps=2)
    _assert_identical(_states(ref), before)  # update 2 was skipped altogether
    assert ref.skipped_steps == 1 and ref.scaler.get_scale() == 2.0**15
    ref.train(steps=STEPS)
    assert any(not torch.equal(a, b) for a, b in zip(before[0].values(), ref.model.state_dict().values()))
    assert all(math.isfinite(l) for _, l in ref.history)

    tr = _trainer(digits, tmp_path, fp16=True)
    _overflow_at(tr, {2})
    tr.train(steps=3)
    state = read_checkpoint(tmp_path / "last.pt")
    assert state["scaler"]["scale"] == 2.0**15 and state["skipped_steps"] == 1
    tr2 = Trainer.from_checkpoint(tmp_path / "last.pt", digits, device="cpu")
    assert tr2.use_fp16 and tr2.scaler.get_scale() == 2.0**15 and tr2.skipped_steps == 1
    tr2.train(steps=STEPS)
    _assert_identical(_states(tr2), _states(ref))
    assert tr2.history == ref.history and tr2.skipped_steps == 1
    # a float32 run's checkpoint resumes under fp16 with a fresh scale
    plain = _trainer(digits, tmp_path / "plain")
    plain.train(steps=2)
    tr3 = _trainer(digits, None, fp16=True).resume(tmp_path / "plain" / "last.pt")
    assert tr3.scaler.get_scale() == 2.0**16 and tr3.skipped_steps == 0
    # and an fp16 run resumed without fp16 keeps its count of skipped (EMA) updates in its checkpoints
    tr4 = _trainer(digits, tmp_path / "plain2", fp16=False).resume(tmp_path / "last.pt")
    assert tr4.scaler is None and tr4.skipped_steps == 1
    tr4.save()
    assert read_checkpoint(tmp_path / "plain2" / "last.pt")["skipped_steps"] == 1


def test_fp16_stops_when_the_gradient_overflows_even_unscaled(digits, tmp_path):
    """A gradient that is never finite halves the scale at every update; below a scale of 1 the run stops with
    NonFiniteLossError (the last good checkpoint kept). A non-finite loss stops it at once, as without fp16."""
    tr = _trainer(digits, tmp_path, fp16=True, save_every=2)
    _overflow_at(tr, set(range(1, 100)))
    with pytest.raises(NonFiniteLossError, match="loss scaling until the scale fell to 0.5") as e:
        tr.train(steps=40)
    assert e.value.step == 17 and tr.skipped_steps == 17  # 2**16 halved 17 times
    assert read_checkpoint(tmp_path / "last.pt")["step"] == 16
    for sync_each_step in (True, False):  # False: as on CUDA, where the loss flag is read every log_every steps
        tr = _trainer(digits, None, fp16=True, log_every=100)
        tr._sync_each_step = sync_each_step
        tr.model.register_forward_hook(lambda m, i, o: o * float("nan") if tr.step >= 2 else o)
        with pytest.raises(NonFiniteLossError, match="non-finite at step 3.*fp16=False"):
            tr.train(steps=40)


def test_fp16_trainer_goes_on_after_a_step_cut_short(digits, monkeypatch):
    """Out of memory after the gradient was unscaled (in the clipping): the same trainer trains on."""
    tr = _trainer(digits, None, fp16=True)
    clip = torch.nn.utils.clip_grad_norm_
    calls = []

    def oom_once(*a, **k):
        calls.append(1)
        if len(calls) == 3:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")
        return clip(*a, **k)

    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", oom_once)
    with pytest.raises(TrainingOutOfMemoryError):
        tr.train(steps=STEPS)
    assert tr.step == 2
    tr.train(steps=STEPS)
    assert tr.step == STEPS and tr.scaler.get_scale() == 2.0**16


def test_compile_auto_falls_back(digits, monkeypatch):
    def broken(*a, **k):
        raise RuntimeError("no compiler here")

    monkeypatch.setattr(torch, "compile", broken)
    tr = _trainer(digits, None, compile=True)
    with pytest.raises(RuntimeError, match="no compiler"):
        tr.train(steps=1)
    tr = _trainer(digits, None)
    tr._compile_mode, tr._compile_pending = "auto", True  # "auto" on a CPU is off; force the attempt
    with pytest.warns(RuntimeWarning, match="torch.compile failed"):
        tr.train(steps=2)
    assert tr.step == 2 and not tr.stats["compiled"]


def test_bad_options():
    with pytest.raises(ValueError, match="batch_size"):
        TrainConfig(batch_size=0)
    with pytest.raises(ValueError, match="cond_drop_prob"):
        TrainConfig(cond_drop_prob=1.0)
    with pytest.raises(ValueError, match="bf16"):
        TrainConfig(bf16="yes")
    for name in ("hflip", "ema_warmup", "progress", "fp16"):  # on/off only: a string would count as on
        with pytest.raises(ValueError, match=name):
            TrainConfig(**{name: "off"})
    for other in ("bf16", "cuda_graph"):  # fp16 (loss scaling on the host) excludes both
        with pytest.raises(ValueError, match=f"excludes {other}=True"):
            TrainConfig(fp16=True, **{other: True})
    assert TrainConfig(fp16=True).bf16 == "auto"  # "auto": off under fp16


def test_options_the_trainer_would_ignore_are_refused(digits, tmp_path):
    from ddpm_lib import make_loader, train

    with pytest.raises(ValueError, match="not class-conditional"):
        Trainer(_model(), _diffusion(), digits, device="cpu", cond_drop_prob=0.1)
    loader = make_loader(digits.images, batch_size=8, hflip=True)
    with pytest.raises(ValueError, match="pass batch_size=8, hflip=True"):
        Trainer(_model(), _diffusion(), loader, device="cpu")
    Trainer(_model(), _diffusion(), loader, device="cpu", batch_size=8, hflip=True)  # matching: accepted
    with pytest.raises(ValueError, match="give out_dir"):
        train(_model(), _diffusion(), digits, steps=1, device="cpu", resume=True)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_training_defaults_are_the_fast_path(digits, tmp_path):
    """On CUDA the defaults are bf16, channels_last, fused Adam, data on the GPU, torch.compile and the CUDA
    graph (captured after three eager steps)."""
    tr = _trainer(digits, tmp_path, device="cuda", log_every=2)
    tr.train(steps=6)
    assert tr.stats["bf16"] and tr.stats["channels_last"] and tr.stats["fused_adam"]
    assert tr.compiled and tr.stats["cuda_graph"], tr._step_fn.graph_error
    assert all(math.isfinite(l) for _, l in tr.history)
    assert tr._images.device.type == "cuda"
    model, _, _ = load_checkpoint(tmp_path / "last.pt", map_location="cuda")
    assert next(model.parameters()).device.type == "cuda"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_fp16_trains_with_fused_adam_and_the_loss_scaler(digits, tmp_path):
    """fp16=True on CUDA (what a T4 or V100 would run): float16 autocast, fused Adam through the GradScaler
    (unscale, clip, step), no CUDA graph; the gradient of update 3 is the float32 run's to float16 precision.
    Without torch.compile, to fit the device call's time (the compiled forward is the same code path)."""
    runs = {}
    for fp16 in (False, True):
        torch.manual_seed(0)  # no dropout: CUDA's dropout may draw differently for float16 and float32 tensors
        model = UNet.from_preset("tiny", in_channels=1, image_size=16, dropout=0.0, num_classes=10)
        tr = Trainer(model, _diffusion(), digits, out_dir=tmp_path / str(fp16),
                     **{**OPTS, "device": "cuda", "fp16": fp16, "bf16": False, "cuda_graph": False,
                        "compile": False, "grad_clip": None})
        tr.train(steps=3)
        runs[fp16] = (tr, torch.cat([p.grad.flatten().float() for p in tr._params]))
    tr, g16 = runs[True]
    assert tr.stats["fp16"] and tr.stats["fused_adam"] and not tr.stats["cuda_graph"]
    g32 = runs[False][1]
    assert (g16 - g32).norm() / g32.norm() < 5e-3
    tr.train(steps=6)
    assert all(math.isfinite(l) for _, l in tr.history) and tr.skipped_steps <= 2
