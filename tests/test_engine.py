"""Training machinery (wsss.engine, wsss.config) on toy models: learning-rate schedules,
checkpoint round trips, exact mid-epoch resume, the non-finite loss guard, config parsing."""

from __future__ import annotations

import argparse
import hashlib
import random
import subprocess
import sys
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import Dataset

from wsss import checkpoints, distributed, engine, loaders, lr_schedule
from wsss import config as C
from wsss import rundir as R

# --------------------------------------------------------------------------- toys

class NoisyToy(Dataset):
    """Regression items whose 'augmentation' draws from torch's RNG, like v2 transforms."""

    def __init__(self, n=24):
        g = torch.Generator().manual_seed(0)
        self.x = torch.randn(n, 6, generator=g)
        self.y = self.x @ torch.randn(6, 1, generator=g)
        self.epoch = -1

    def __len__(self):
        return len(self.x)

    def set_epoch(self, epoch):
        self.epoch = epoch

    def __getitem__(self, i):
        return {"x": self.x[i] + 0.1 * torch.randn(6), "y": self.y[i], "index": i}


class DropToy(nn.Module):
    """Uses the model-side RNG too (dropout), so resume must restore RNG state."""

    def __init__(self):
        super().__init__()
        self.body = nn.Linear(6, 8)
        self.head = nn.Linear(8, 1)

    def forward(self, x):
        return self.head(nn.functional.dropout(torch.relu(self.body(x)), 0.2, self.training))

    def param_groups(self):
        return list(self.body.parameters()), list(self.head.parameters())


def mse_step(model, batch, epoch):
    err = nn.functional.mse_loss(model(batch["x"]), batch["y"])
    return {"mse": err, "total": err}


def make_toy(lr=0.01, schedule="poly", total=12, spe=6):
    torch.manual_seed(0)
    model = DropToy()
    body, head = model.param_groups()
    opt = torch.optim.SGD(lr_schedule.param_groups(body, head, lr, 1e-4), lr=lr, momentum=0.9, nesterov=True)
    sched = lr_schedule.build_scheduler(opt, schedule=schedule, total_steps=total, steps_per_epoch=spe,
                                        step_epochs=(1,))
    return model, opt, sched


def fit_toy(run_dir, epochs=2, **kw):
    model, opt, sched = make_toy()
    hist = engine.fit(model, opt, sched, NoisyToy(), kw.pop("step_fn", mse_step), run_dir=run_dir, cfg={"toy": 1},
                 epochs=epochs, batch_size=4, seed=3, device=torch.device("cpu"), log_every=0, **kw)
    return model, hist


def sha(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


# --------------------------------------------------------------------------- lr

def test_lr_factor_poly_and_step_by_hand():
    assert lr_schedule.lr_factor(0, schedule="poly", total_steps=10, steps_per_epoch=5) == 1.0
    assert lr_schedule.lr_factor(5, schedule="poly", total_steps=10, steps_per_epoch=5) == pytest.approx(0.5 ** 0.9)
    assert lr_schedule.lr_factor(10, schedule="poly", total_steps=10, steps_per_epoch=5) == 0.0
    # step: x0.1 at epochs 5 and 10 (reference), 4 steps per epoch
    f = [lr_schedule.lr_factor(s, schedule="step", total_steps=60, steps_per_epoch=4, step_epochs=(5, 10))
         for s in (19, 20, 39, 40)]
    assert f == pytest.approx([1.0, 0.1, 0.1, 0.01])
    with pytest.raises(ValueError, match="schedule"):
        lr_schedule.lr_factor(0, schedule="cosine", total_steps=1, steps_per_epoch=1)


def test_param_groups_give_new_layers_ten_times_the_lr_and_scheduler_steps_per_step():
    model, opt, sched = make_toy(lr=0.05, schedule="poly", total=4)
    assert [g["name"] for g in opt.param_groups] == ["backbone", "new"]
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([0.05, 0.5])
    assert all(g["weight_decay"] == 1e-4 for g in opt.param_groups)
    opt.step()
    sched.step()
    assert opt.param_groups[1]["lr"] == pytest.approx(0.5 * 0.75 ** 0.9)


# --------------------------------------------------------------------------- checkpoints

def test_checkpoint_round_trip_restores_model_optimizer_scheduler_and_rng(tmp_path):
    model, opt, sched = make_toy()
    batch = NoisyToy()[0]
    for _ in range(3):
        opt.zero_grad()
        mse_step(model, {"x": batch["x"][None], "y": batch["y"][None]}, 0)["total"].backward()
        opt.step()
        sched.step()
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    path = checkpoints.save_checkpoint(tmp_path / "ck.pt", model, opt, sched, epoch=2, step=3, cfg={"a": [1, 2]},
                             extra={"note": "x"})
    expect = (random.random(), np.random.rand(), torch.rand(1))
    assert [p.name for p in tmp_path.iterdir()] == ["ck.pt"], "no temporary file may be left behind"

    model2, opt2, sched2 = make_toy()
    random.seed(9), np.random.seed(9), torch.manual_seed(9)
    ck = checkpoints.load_checkpoint(path, model2, opt2, sched2)
    assert (ck["epoch"], ck["step"], ck["cfg"], ck["extra"]) == (2, 3, {"a": [1, 2]}, {"note": "x"})
    for a, b in zip(model.state_dict().values(), model2.state_dict().values()):
        assert torch.equal(a, b)
    assert opt2.state_dict()["state"][0]["momentum_buffer"].equal(opt.state_dict()["state"][0]["momentum_buffer"])
    assert sched2.last_epoch == 3 and sched2.get_last_lr() == sched.get_last_lr()
    assert (random.random(), np.random.rand()) == expect[:2] and torch.equal(torch.rand(1), expect[2])


def test_load_checkpoint_explains_a_corrupt_file(tmp_path):
    bad = tmp_path / "checkpoint_last.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(RuntimeError, match="delete it to start over"):
        checkpoints.load_checkpoint(bad)


# --------------------------------------------------------------------------- loop

def test_train_loader_order_is_a_function_of_seed_and_epoch():
    ds = NoisyToy()

    def batches(epoch, workers=0):
        return [b for b in loaders.make_train_loader(ds, 4, seed=5, epoch=epoch, workers=workers)]

    a, b, c = batches(0), batches(0), batches(1)
    assert ds.epoch == 1, "set_epoch must reach the dataset"
    assert all(torch.equal(x["x"], y["x"]) for x, y in zip(a, b))
    assert not torch.equal(torch.cat([x["index"] for x in a]), torch.cat([x["index"] for x in c]))
    assert len(a) == 6 and all(len(x["index"]) == 4 for x in a)
    # augmentation is seeded per item: identical with worker processes
    w = batches(0, workers=2)
    assert all(torch.equal(x["x"], y["x"]) for x, y in zip(a, w))


def test_fit_logs_every_term_per_epoch(tmp_path):
    _, hist = fit_toy(tmp_path, epochs=2)
    log = engine.read_log(tmp_path)
    assert [r["epoch"] for r in log] == [1, 2] and log == hist
    assert {"loss/mse", "loss/total", "lr/backbone", "lr/new", "seconds", "step"} <= set(log[0])
    assert log[1]["step"] == 12


class Interrupt(Exception):
    pass


def test_resume_mid_epoch_gives_the_same_weights(tmp_path):
    ref, ref_hist = fit_toy(tmp_path / "ref", epochs=2)

    calls = {"n": 0}

    def crashing_step(model, batch, epoch):
        calls["n"] += 1
        if calls["n"] == 9:  # after the checkpoint at step 8 (epoch 2, batch 2)
            raise Interrupt
        return mse_step(model, batch, epoch)

    with pytest.raises(Interrupt):
        fit_toy(tmp_path / "cut", epochs=2, ckpt_every=4, step_fn=crashing_step)
    ck = torch.load(tmp_path / "cut" / R.CHECKPOINT, weights_only=True)
    assert (ck["epoch"], ck["step"], ck["extra"]["batch_in_epoch"]) == (1, 8, 2)
    resumed, hist = fit_toy(tmp_path / "cut", epochs=2, ckpt_every=4)
    for (k, a), b in zip(ref.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), k
    assert hist[-1]["loss/total"] == pytest.approx(ref_hist[-1]["loss/total"], rel=1e-6)


def test_non_finite_loss_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    saved = []
    original = checkpoints.save_checkpoint

    def recording_save(path, *a, **kw):
        out = original(path, *a, **kw)
        saved.append(sha(out))
        return out

    monkeypatch.setattr(engine, "save_checkpoint", recording_save)
    calls = {"n": 0}

    def nan_at_step_8(model, batch, epoch):
        calls["n"] += 1
        terms = mse_step(model, batch, epoch)
        if calls["n"] == 8:
            terms["mse"] = terms["mse"] * float("nan")
            terms["total"] = terms["mse"]
        return terms

    with pytest.raises(engine.NonFiniteLossError) as err:
        fit_toy(tmp_path, epochs=2, step_fn=nan_at_step_8)
    msg = str(err.value)
    ckpt = tmp_path / R.CHECKPOINT
    for part in ("step 8", "epoch 2", "'mse'", "'total'", str(tmp_path), str(ckpt), "lower the learning rate", "amp"):
        assert part in msg, part
    assert err.value.terms == ["mse", "total"] and err.value.checkpoint == ckpt
    assert len(saved) == 1 and sha(ckpt) == saved[0], "the last good checkpoint must not be rewritten"
    model, opt, sched = make_toy()
    ck = checkpoints.load_checkpoint(ckpt, model, opt, sched)
    assert ck["epoch"] == 1 and all(torch.isfinite(p).all() for p in model.parameters())
    assert len(engine.read_log(tmp_path)) == 1


def test_max_steps_stops_mid_epoch_and_a_rerun_does_nothing(tmp_path):
    model, hist = fit_toy(tmp_path, epochs=3, max_steps=8)
    assert hist[-1]["step"] == 8 and hist[-1]["epoch"] == pytest.approx(1 + 2 / 6)
    again, hist2 = fit_toy(tmp_path, epochs=3, max_steps=8)
    assert hist2 == hist and all(torch.equal(a, b) for a, b in zip(model.state_dict().values(),
                                                                       again.state_dict().values()))


def test_single_process_helpers():
    dist = distributed.init_distributed("cpu")
    assert (dist.rank, dist.world_size, dist.enabled, dist.is_main) == (0, 1, False, True)
    assert distributed.is_main() and distributed.all_reduce_mean({"a": 1.5, "b": 2}) == {"a": 1.5, "b": 2.0}
    assert distributed.all_reduce_mean(3) == 3.0 and distributed.all_gather_objects("x") == ["x"]
    assert distributed.resolve_device("cpu").type == "cpu"
    with pytest.raises(ValueError, match="device must be"):
        distributed.resolve_device("tpu")
    m = nn.Linear(2, 2)
    assert distributed.wrap_ddp(m, torch.device("cpu"), dist) is m and distributed.unwrap(m) is m
    assert loaders.steps_per_epoch(41, 4, 2) == 5
    with distributed.autocast(torch.device("cpu"), True):  # a no-op on CPU
        assert m(torch.ones(1, 2)).dtype == torch.float32


# --------------------------------------------------------------------------- config

@dataclass
class Inner:
    flag: bool = True
    weight: float = 1.0


@dataclass
class Outer:
    root: str
    n: int = 2
    rate: float = 1e-3
    mode: Literal["a", "b"] = "a"
    cap: int | None = None
    epochs_at: tuple[int, ...] = (5, 10)
    inner: Inner = field(default_factory=Inner)


def test_from_dict_rejects_unknown_keys_and_lists_the_valid_ones():
    with pytest.raises(C.ConfigError) as err:
        C.from_dict(Outer, {"root": "r", "nn": 3})
    msg = str(err.value)
    assert "'nn'" in msg and "Outer" in msg
    for key in ("root", "n", "rate", "mode", "cap", "epochs_at", "inner.flag", "inner.weight"):
        assert key in msg
    with pytest.raises(C.ConfigError, match="inner.nope|nope"):
        C.from_dict(Outer, {"root": "r", "inner": {"nope": 1}})
    with pytest.raises(C.ConfigError, match="needs a value"):
        C.from_dict(Outer, {})
    with pytest.raises(C.ConfigError, match="not one of"):
        C.from_dict(Outer, {"root": "r", "mode": "c"})
    with pytest.raises(C.ConfigError, match="integer"):
        C.from_dict(Outer, {"root": "r", "n": "two"})


def test_from_dict_coerces_yaml_values_and_dotted_keys(tmp_path):
    cfg = C.from_dict(Outer, {"root": "r", "rate": "1e-4", "epochs_at": [3], "inner.weight": 2, "cap": None})
    assert cfg == Outer(root="r", rate=1e-4, epochs_at=(3,), inner=Inner(weight=2.0))
    path = C.save_yaml(cfg, tmp_path / "c.yaml")
    assert C.load_yaml(Outer, path) == cfg


def test_argparse_flags_from_the_dataclass(tmp_path):
    parser = C.command_line(argparse.ArgumentParser(), Outer)
    args = parser.parse_args(["--root", "R", "--rate", "0.5", "--mode", "b", "--cap", "7", "--epochs-at", "1", "2",
                              "--no-inner.flag", "--inner.weight", "3"])
    assert C.from_args(Outer, args) == Outer("R", 2, 0.5, "b", 7, (1, 2), Inner(False, 3.0))
    # a YAML file first, flags on top of it
    C.save_yaml(Outer("Y", n=5, inner=Inner(weight=9.0)), tmp_path / "o.yaml")
    args = parser.parse_args(["--config", str(tmp_path / "o.yaml"), "--n", "6"])
    assert C.from_args(Outer, args) == Outer("Y", n=6, inner=Inner(weight=9.0))
    with pytest.raises(SystemExit):
        C.from_args(Outer, parser.parse_args([]), parser=parser)  # --root missing


@dataclass
class WithNestedDefault:
    inner: Inner = field(default_factory=lambda: Inner(flag=False))


def test_a_nested_default_is_kept_when_other_nested_keys_are_given():
    assert C.from_dict(WithNestedDefault, {"inner": {"weight": 2}}).inner == Inner(flag=False, weight=2.0)
    assert C.from_dict(WithNestedDefault, {}).inner == Inner(flag=False)
    parser = argparse.ArgumentParser()
    C.add_arguments(parser, WithNestedDefault)
    assert "(default: False)" in parser.format_help()
    assert C.from_args(WithNestedDefault, parser.parse_args(["--inner.weight", "3"])).inner == Inner(False, 3.0)


def test_a_checkpoint_write_removes_what_a_killed_earlier_write_left(tmp_path):
    finished = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    left = tmp_path / f".checkpoint_last.pt.{finished.stdout.strip()}.tmp"  # SIGKILL in the middle of torch.save
    left.write_bytes(b"half a checkpoint")
    checkpoints.atomic_torch_save({"step": 3}, tmp_path / "checkpoint_last.pt")
    assert not left.exists() and [p.name for p in tmp_path.iterdir()] == ["checkpoint_last.pt"]
    assert torch.load(tmp_path / "checkpoint_last.pt")["step"] == 3
