"Contracts of simple_diffusion.training: config, data, EMA, checkpoints (atomic, safe, exact resume), DDP."
import json
import math
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import simple_diffusion.data as data
import simple_diffusion.training as training
from simple_diffusion.data import load_npy_images, load_training_data, make_toy
from simple_diffusion.nets import build_model
from simple_diffusion.training import (CheckpointError, CheckpointNotFoundError, TrainConfig, Trainer, atomic_write,
                                       load_checkpoint, load_trained, save_checkpoint, train)

TINY = dict(data="moons", batch_size=64, lr=3e-3, warmup=3, log_every=4, ckpt_every=6,
            model_kwargs={"hidden": 16, "depth": 1}, device="cpu")
MOONS = make_toy("moons", 2000)


def tiny(**kw):
    return TrainConfig(**{**TINY, **kw})


def params(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


# ---------------------------------------------------------------- config

def test_config_json_round_trip_and_validation():
    cfg = tiny(steps=7, class_conditional=False, model_kwargs={"hidden": 8})
    assert TrainConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    for bad, word in [(dict(steps=-1), "steps"), (dict(batch_size=0), "batch_size"), (dict(lr=-1.0), "lr"),
                      (dict(loss="l1"), "loss"), (dict(prediction="score"), "prediction"), (dict(p_uncond=2.0), "p_uncond"),
                      (dict(amp="yes"), "amp"), (dict(model_kwargs={"f": object()}), "model_kwargs"),
                      (dict(schedule="linear", num_timesteps=5), "num_timesteps"), (dict(steps=2.5), "steps"),
                      (dict(seed=-1), "seed")]:
        with pytest.raises(ValueError, match=word):
            TrainConfig(**bad)
    with pytest.raises(ValueError, match="learning_rate"):
        TrainConfig.from_dict({**cfg.to_dict(), "learning_rate": 1.0})


# ---------------------------------------------------------------- data

def test_npy_loader_accepts_uint8_and_float(tmp_path):
    a = np.arange(2 * 4 * 4, dtype=np.uint8).reshape(2, 4, 4) * 7
    np.save(tmp_path / "u8.npy", a)
    x = load_npy_images(tmp_path / "u8.npy")
    assert x.shape == (2, 1, 4, 4) and x.dtype == torch.float32
    assert torch.equal(x[:, 0], torch.from_numpy(a.astype(np.float32) / 127.5 - 1))
    f = np.linspace(-1, 1, 3 * 3 * 4 * 4, dtype=np.float64).reshape(3, 3, 4, 4)
    np.save(tmp_path / "f.npy", f)
    x = load_training_data(str(tmp_path / "f.npy"))[0]
    assert x.shape == (3, 3, 4, 4) and torch.allclose(x.double(), torch.from_numpy(f), atol=1e-7)


@pytest.mark.parametrize("array, word", [
    (np.full((2, 4, 4), 1.5, dtype=np.float32), "[-1, 1]"),            # floats out of range: an error, not clipped
    (np.full((2, 4, 4), -3.0), "[-1, 1]"),
    (np.array([[[np.nan]]], dtype=np.float32), "NaN"),
    (np.zeros((2, 4, 4), dtype=np.int64), "dtype"),
    (np.zeros((4, 4), dtype=np.uint8), "shape"),
    (np.zeros((0, 4, 4), dtype=np.uint8), "non-empty"),
    (np.zeros((2, 8, 8, 3), dtype=np.uint8), "channels"),              # channels-last
    (np.array([{"a": 1}], dtype=object), "readable"),                  # would need unpickling
])
def test_npy_loader_rejects_bad_arrays(tmp_path, array, word):
    np.save(tmp_path / "bad.npy", array, allow_pickle=True)
    with pytest.raises(ValueError, match=f"data=.*{__import__('re').escape(word)}"):
        load_npy_images(tmp_path / "bad.npy")


def test_data_names_and_paths(tmp_path):
    x, y = load_training_data("digits")
    assert x.shape[1:] == (1, 8, 8) and y is not None and len(x) == len(y)
    x, y = load_training_data("gmm25")
    assert x.shape == (data.TOY_SAMPLES, 2) and y is None
    with pytest.raises(FileNotFoundError, match="missing.npy"):
        load_training_data(str(tmp_path / "missing.npy"))
    (tmp_path / "junk.npy").write_bytes(b"not an array")
    with pytest.raises(ValueError, match="junk.npy"):
        load_training_data(str(tmp_path / "junk.npy"))
    with pytest.raises(ValueError, match="data must be"):
        load_training_data("cifar10")


def test_build_model_follows_the_data():
    assert type(tiny().make_model((2,))).__name__ == "MLPDenoiser"
    assert type(build_model("auto", (2,))).__name__ == "MLPDenoiser"
    unet = TrainConfig(loss="hybrid", model_kwargs={"base_channels": 8}).make_model((3, 8, 8), num_classes=4)
    out = unet(torch.zeros(2, 3, 8, 8), torch.tensor([0, 5]), y=torch.tensor([0, 4]))
    assert out.shape == (2, 6, 8, 8)                                      # learned variance doubles the channels
    with pytest.raises(ValueError, match="model='mlp'"):
        TrainConfig(model="mlp").make_model((1, 8, 8))


# ---------------------------------------------------------------- training

def test_steps_reduce_the_loss_on_a_fixed_batch():
    tr = Trainer(tiny(steps=60, lr=1e-2, warmup=1), data=(MOONS, None))
    x0 = MOONS[:256]
    def fixed_loss():
        g = torch.Generator().manual_seed(123)                            # the same t and ε every time
        t = torch.randint(tr.schedule.num_timesteps, (256,), generator=g)
        noise = torch.randn(x0.shape, generator=g)
        with torch.no_grad():
            return float(training.simple_loss(tr.model, tr.schedule, x0, t=t, noise=noise).mean())
    before = fixed_loss()
    tr.fit(progress=False)
    after = fixed_loss()
    assert after < 0.8 * before, (before, after)
    assert len(tr.history) == 60 and tr.step == 60


class _Scalar(nn.Module):
    def __init__(self):
        super().__init__(); self.w = nn.Parameter(torch.zeros((), dtype=torch.float64))
    def forward(self, x, t, y=None):
        return self.w * x


@pytest.mark.parametrize("warmup", [False, True])
def test_ema_is_the_hand_recursion(warmup):
    decay = 0.7
    tr = Trainer(tiny(steps=15, lr=0.05, warmup=1, ema_decay=decay, ema_warmup=warmup), model=_Scalar(),
                 data=(MOONS.double(), None))
    raw, ema = [], []
    for _ in range(15):
        tr.train_step(); raw.append(float(tr.model.w.detach())); ema.append(float(tr.ema.module.w.detach()))
    hand = [raw[0]]                                                       # θ̄_1 = θ_1
    for k, r in enumerate(raw[1:], start=2):
        b = min(decay, k / (k + 9)) if warmup else decay                  # diffusers' EMAModel: (1+t)/(10+t), t = k-1
        hand.append(b * hand[-1] + (1 - b) * r)                           # θ̄_k = β_k θ̄_{k-1} + (1-β_k) θ_k
    np.testing.assert_allclose(ema, hand, rtol=0, atol=1e-12)
    assert abs(ema[-1] - raw[-1]) > 1e-4                                  # the average lags the raw weight
    assert training.ema_start_weight(tr.config, 15) == pytest.approx(
        math.prod(min(decay, k / (k + 9)) if warmup else decay for k in range(2, 16)), rel=1e-12)


def test_warmup_and_clipping():
    tr = Trainer(tiny(steps=3, lr=1e-2, warmup=4, grad_clip=1e-3), data=(MOONS, None))
    lrs = []
    for _ in range(5):
        lrs.append(tr.opt.param_groups[0]["lr"]); tr.train_step()
    np.testing.assert_allclose(lrs, [1e-2 * k / 4 for k in (1, 2, 3, 4)] + [1e-2])   # Eq. (eq-train-warmup)
    norm = lambda t: float(torch.cat([p.grad.flatten() for p in t.model.parameters()]).norm())
    assert norm(tr) <= 1e-3 * (1 + 1e-5)                                  # the gradient the step used was clipped
    free = Trainer(tiny(steps=1, grad_clip=0), data=(MOONS, None)); free.train_step()
    assert norm(free) > 1e-2                                              # unclipped it is far larger


def test_nan_loss_names_the_step():
    class Breaks(nn.Module):
        def __init__(self):
            super().__init__(); self.lin, self.calls = nn.Linear(2, 2), 0
        def forward(self, x, t, y=None):
            self.calls += 1
            return self.lin(x) * (float("inf") if self.calls == 5 else 1.0)
    with pytest.raises(FloatingPointError, match="step 5"):
        Trainer(tiny(steps=10), model=Breaks(), data=(MOONS, None)).fit(progress=False)


def test_class_conditional_label_dropout():
    x, y = load_training_data("digits")
    tr = Trainer(TrainConfig(data="digits", steps=1, batch_size=4000, class_conditional=True, p_uncond=0.25,
                             model_kwargs={"base_channels": 8}, device="cpu"), data=(x, y))
    _, labels = tr.next_batch()
    null = float((labels == 10).float().mean())
    assert abs(null - 0.25) < 5 * math.sqrt(0.25 * 0.75 / 4000)          # 5 standard errors of a proportion
    with pytest.raises(ValueError, match="labelled"):
        Trainer(tiny(class_conditional=True), data=(MOONS, None))


# ---------------------------------------------------------------- checkpoints

def test_checkpoint_round_trip(tmp_path):
    tr = Trainer(tiny(steps=6), tmp_path / "run", data=(MOONS, None))
    tr.fit(progress=False)
    ck = load_checkpoint(tmp_path / "run")
    assert ck["path"].name == "ckpt-00000006" and ck["state"]["step"] == 6 and ck["config"] == tr.config.to_dict()
    for k, v in tr.model.state_dict().items(): assert torch.equal(ck["model"][k], v)
    for k, v in tr.ema.module.state_dict().items(): assert torch.equal(ck["ema"][k], v)
    model, cfg = load_trained(tmp_path / "run")
    assert cfg == tr.config and all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), tr.ema.module.state_dict().values()))
    raw, _ = load_trained(tmp_path / "run" / "ckpt-00000006", ema=False)
    assert all(torch.equal(a, b) for a, b in zip(raw.state_dict().values(), tr.model.state_dict().values()))
    log = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [4, 6] and all(math.isfinite(r["loss"]) for r in log)


def test_state_file_loads_with_weights_only(tmp_path):
    Trainer(tiny(steps=2), tmp_path, data=(MOONS, None)).fit(progress=False)
    st = torch.load(tmp_path / "ckpt-00000002" / "state.pt", weights_only=True)   # raises if anything needs unpickling
    assert st["step"] == 2 and len(st["rng"]) == 1


@pytest.mark.parametrize("n", [5, 6])       # a resume point between checkpoints/log lines, and one on them
def test_resume_is_bit_identical(tmp_path, n):
    cfg = tiny(steps=2 * n, seed=7)
    whole = Trainer(cfg, tmp_path / "whole", data=(MOONS, None)); whole.fit(progress=False)
    first = Trainer(tiny(steps=n, seed=7), tmp_path / "half", data=(MOONS, None)); first.fit(progress=False)
    resumed = Trainer(cfg, tmp_path / "half", data=(MOONS, None)).load(tmp_path / "half")
    assert resumed.step == n
    resumed.fit(progress=False)
    for k, v in whole.model.state_dict().items(): assert torch.equal(v, resumed.model.state_dict()[k]), k
    for k, v in whole.ema.module.state_dict().items(): assert torch.equal(v, resumed.ema.module.state_dict()[k]), k
    assert whole.history == resumed.history
    sa, sb = whole.opt.state_dict()["state"], resumed.opt.state_dict()["state"]
    assert all(torch.equal(sa[i]["exp_avg_sq"], sb[i]["exp_avg_sq"]) for i in sa)


def test_resume_trims_the_log(tmp_path):
    Trainer(tiny(steps=6), tmp_path, data=(MOONS, None)).fit(progress=False)
    with open(tmp_path / "log.jsonl", "a") as f:                          # lines of a run that died after step 6
        f.write(json.dumps({"step": 8, "loss": 0.5}) + "\n" + '{"step": 10, "lo')
    tr = Trainer(tiny(steps=8), tmp_path, data=(MOONS, None)).load(tmp_path)
    assert [json.loads(line)["step"] for line in (tmp_path / "log.jsonl").read_text().splitlines()] == [4, 6]
    tr.fit(progress=False)
    assert [json.loads(line)["step"] for line in (tmp_path / "log.jsonl").read_text().splitlines()] == [4, 6, 8]


def test_atomic_write_keeps_the_old_checkpoint(tmp_path, monkeypatch):
    tr = Trainer(tiny(steps=6), tmp_path, data=(MOONS, None)); tr.fit(progress=False)
    good = params(tr.model)
    for _ in range(3): tr.train_step()
    real = os.replace
    def failing(src, dst):
        if Path(dst).name == "state.pt": raise OSError("disk full (simulated)")
        return real(src, dst)
    monkeypatch.setattr(os, "replace", failing)
    with pytest.raises(OSError, match="simulated"):
        tr.save()
    monkeypatch.setattr(os, "replace", real)
    ck = load_checkpoint(tmp_path)                                        # latest still names the old, complete one
    assert ck["state"]["step"] == 6 and all(torch.equal(ck["model"][k], v) for k, v in good.items())
    assert not list(tmp_path.rglob("*.tmp"))                              # no temporary files left behind
    # the safetensors serialiser failing half-way is no worse
    monkeypatch.setattr(training, "_st_save", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("writer died")))
    with pytest.raises(RuntimeError, match="writer died"):
        tr.save()
    assert load_checkpoint(tmp_path)["state"]["step"] == 6


def test_atomic_write_replaces_whole_files(tmp_path):
    f = tmp_path / "x.bin"
    atomic_write(f, b"old"); atomic_write(f, b"new contents")
    assert f.read_bytes() == b"new contents" and [p.name for p in tmp_path.iterdir()] == ["x.bin"]


@pytest.mark.parametrize("victim", ["model.safetensors", "ema.safetensors", "state.pt", "config.json"])
def test_truncated_checkpoint_names_the_file(tmp_path, victim):
    Trainer(tiny(steps=2), tmp_path, data=(MOONS, None)).fit(progress=False)
    f = tmp_path / "ckpt-00000002" / victim
    f.write_bytes(f.read_bytes()[: len(f.read_bytes()) // 2])
    with pytest.raises(CheckpointError, match=victim.replace(".", r"\.")):
        load_checkpoint(tmp_path)


def test_missing_and_mismatched_checkpoints(tmp_path):
    with pytest.raises(CheckpointNotFoundError, match="nowhere"):
        load_checkpoint(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError):                                # it is a FileNotFoundError too
        load_checkpoint(tmp_path / "nowhere")
    Trainer(tiny(steps=2), tmp_path / "run", data=(MOONS, None)).fit(progress=False)
    (tmp_path / "run" / "ckpt-00000002" / "ema.safetensors").unlink()
    with pytest.raises(CheckpointNotFoundError, match="ema.safetensors"):
        load_checkpoint(tmp_path / "run")
    (tmp_path / "run" / "latest").write_text("ckpt-00000099")
    with pytest.raises(CheckpointNotFoundError, match="latest"):
        load_checkpoint(tmp_path / "run")
    (tmp_path / "run" / "latest").write_text("../../elsewhere")
    with pytest.raises(CheckpointError, match="latest.*not hold a checkpoint name"):
        load_checkpoint(tmp_path / "run")
    Trainer(tiny(steps=2), tmp_path / "r2", data=(MOONS, None)).fit(progress=False)
    wider = Trainer(tiny(steps=2, model_kwargs={"hidden": 32, "depth": 1}), data=(MOONS, None))
    with pytest.raises(CheckpointError, match="config.*model_kwargs"):
        wider.load(tmp_path / "r2")
    wider.config = tiny(steps=2)                                          # same config, different network: weights don't fit
    with pytest.raises(CheckpointError, match=r"model\.safetensors.*does not fit"):
        wider.load(tmp_path / "r2")


def test_train_refuses_to_overwrite_and_resumes(tmp_path):
    train(tmp_path, progress=False, **tiny(steps=4).to_dict())
    with pytest.raises(ValueError, match="already holds a checkpoint"):
        train(tmp_path, progress=False, **tiny(steps=4).to_dict())
    with pytest.raises(CheckpointNotFoundError, match="nothing to resume|no checkpoint"):
        train(tmp_path / "empty", resume=True, progress=False)
    tr = train(tmp_path, resume=True, progress=False, steps=8)
    assert tr.step == 8 and len(tr.history) == 8
    with pytest.raises(CheckpointError, match="lr"):
        train(tmp_path, resume=True, progress=False, steps=10, lr=1.0)


# ---------------------------------------------------------------- devices

@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_trains_on_device(tmp_path, device):
    x, y = load_training_data("digits")
    cfg = TrainConfig(data="digits", steps=4, batch_size=16, class_conditional=True, log_every=2, ckpt_every=4,
                      model_kwargs={"base_channels": 8}, device=device)
    tr = Trainer(cfg, tmp_path, data=(x, y)); tr.fit(progress=False)
    assert tr.device.type == device and next(tr.model.parameters()).device.type == device
    assert tr.use_amp == (device == "cuda" and torch.cuda.is_bf16_supported()) and all(math.isfinite(v) for v in tr.history)
    resumed = Trainer(cfg, data=(x, y)).load(tmp_path)
    assert resumed.step == 4 and all(torch.equal(a, b) for a, b in zip(resumed.model.parameters(), tr.model.parameters()))


@pytest.mark.gpu
def test_cuda_resume_is_exact_in_fp32(tmp_path):
    cfg = tiny(steps=8, amp=False, device="cuda")
    whole = Trainer(cfg, data=(MOONS, None)); whole.fit(progress=False)
    Trainer(tiny(steps=4, amp=False, device="cuda"), tmp_path, data=(MOONS, None)).fit(progress=False)
    resumed = Trainer(cfg, data=(MOONS, None)).load(tmp_path); resumed.fit(progress=False)
    for a, b in zip(whole.model.parameters(), resumed.model.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)           # cuBLAS may pick other kernels


# ---------------------------------------------------------------- several processes

DDP_SCRIPT = textwrap.dedent("""
    import json, sys, torch
    from simple_diffusion.data import make_toy
    from simple_diffusion.training import Trainer, TrainConfig
    out = sys.argv[1]
    cfg = TrainConfig(data="moons", steps=30, batch_size=128, lr=1e-2, warmup=5, log_every=5, ckpt_every=30,
                      model_kwargs={"hidden": 32, "depth": 1}, device="cpu")
    tr = Trainer(cfg, out)
    first, _ = tr.next_batch()          # what this rank draws (the trainer then draws on from there)
    tr.fit(progress=False)
    flat = torch.cat([p.detach().flatten() for p in tr.model.parameters()]).double()
    json.dump(dict(rank=tr.rank, world=tr.world, step=tr.step, first=first.tolist(), params=flat.tolist(),
                   history=tr.history), open(f"{out}/rank{tr.rank}.json", "w"))
""")


@pytest.mark.slow
def test_ddp_two_cpu_processes(tmp_path):
    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent)) or shutil.which("torchrun")
    (tmp_path / "ddp.py").write_text(DDP_SCRIPT)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run([torchrun, "--nproc_per_node=2", "--master_port", str(29500 + os.getpid() % 1000),
                        str(tmp_path / "ddp.py"), str(tmp_path)], capture_output=True, text=True, timeout=240, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    a, b = (json.loads((tmp_path / f"rank{i}.json").read_text()) for i in (0, 1))
    assert a["world"] == b["world"] == 2 and a["step"] == b["step"] == 30
    assert a["first"] != b["first"]                                       # each rank draws its own batches
    assert a["params"] == b["params"]                                     # DDP keeps the replicas identical
    assert a["history"] == b["history"]                                   # the logged loss is the mean over ranks
    h = a["history"]
    assert np.mean(h[-10:]) < 0.85 * np.mean(h[:5]), (h[:5], h[-10:])    # loss decreasing
    ck = load_checkpoint(tmp_path)                                        # written once, by rank 0
    assert ck["state"]["step"] == 30 and ck["state"]["world_size"] == 2 and len(ck["state"]["rng"]) == 2
    assert not torch.equal(ck["state"]["rng"][0]["data"], ck["state"]["rng"][1]["data"])
    model, _ = load_trained(tmp_path, ema=False)                          # a single process can load it
    np.testing.assert_array_equal(torch.cat([p.detach().flatten() for p in model.parameters()]).double().numpy(), a["params"])
    with pytest.warns(UserWarning, match="2 process"):                     # resuming with 1 process: allowed, not exact
        Trainer(TrainConfig.from_dict({**ck["config"], "steps": 31})).load(tmp_path)


# ---------------------------------------------------------------- no host syncs in the hot path
def _host_reads_by_package(fn):
    "Run fn; return the files of simple_diffusion that read a tensor's value back to Python (item/bool/int)."
    import traceback
    from torch.utils._python_dispatch import TorchDispatchMode
    ours = []

    class Spy(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func is torch.ops.aten._local_scalar_dense.default:
                skip = ("_python_dispatch", f"torch{os.sep}_compile.py", f"{os.sep}_dynamo{os.sep}")
                frames = [f for f in traceback.extract_stack()[:-1] if not any(s in f.filename for s in skip)]
                inner = frames[-1]                     # the Python line that asked for the value
                if f"{os.sep}simple_diffusion{os.sep}" in inner.filename:
                    ours.append(f"{Path(inner.filename).name}:{inner.lineno}")
            return func(*args, **(kwargs or {}))

    with Spy():
        fn()
    return ours


@pytest.mark.parametrize("kw", [dict(), dict(loss="min_snr"), dict(prediction="v"),
                                dict(class_conditional=True, data="digits", model="auto",
                                     model_kwargs={"base_channels": 8}, batch_size=8)])
def test_train_step_reads_nothing_back_to_the_host(kw, one_thread):
    "No `.item()`/`int()`/`bool()` on a tensor from our code inside train_step (torch's optimiser keeps its own host counters)."
    cfg = tiny(**kw)
    data = None if cfg.data == "digits" else (MOONS, None)
    tr = Trainer(cfg, data=data)
    tr.train_step()
    assert _host_reads_by_package(tr.train_step) == []
    # the spy does see our reads where there are some: check_t reads t's values
    t = torch.zeros(4, dtype=torch.long)
    assert _host_reads_by_package(lambda: tr.schedule.check_t(t)) != []


def test_ema_warmup_makes_a_short_run_sample_like_its_raw_weights(one_thread):
    "A 100-step run: with the warm-up its EMA samples the moons; with a constant 0.999 it is still ~90 % its start."
    import warnings
    from simple_diffusion.sampling import sample
    X = make_toy("moons", 2000)
    near = {}
    for warm in (True, False):
        cfg = TrainConfig(data="moons", steps=100, batch_size=128, lr=3e-3, warmup=10, device="cpu",
                          model_kwargs={"hidden": 64, "depth": 2}, ema_warmup=warm)
        tr, init = Trainer(cfg, data=(X, None)), Trainer(cfg, data=(X, None)).model
        tr.fit(progress=False)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")                               # the untrained nets' samples blow up
            for name, m in (("ema", tr.ema.module), ("init", init), ("raw", tr.model)):
                x = sample(m.eval(), tr.schedule, (500, 2), sampler="ddim", steps=20,
                           generator=torch.Generator().manual_seed(0), progress=False)
                # median distance of a sample to its nearest data point (moons: spread ~1; noise: ~80)
                near[warm, name] = float(torch.cdist(x.nan_to_num(1e3), X[:1000]).min(dim=1).values.median())
        assert training.ema_warmed_up(cfg, 100) == warm
    assert near[True, "ema"] < 0.5 and near[True, "raw"] < 0.5            # both on the data (measured ≈ 0.14, 0.18)
    assert near[True, "init"] > 10 and near[False, "ema"] > 10            # initial weights, and the unwarmed EMA: far off
