"""Smoke tests of the forecasting benchmark (benchmarks/forecasting.py), in-process, < 60 s in all.

The quick mode runs once (module fixture); the other tests check on the data actually used that each split's
sequence models never trained on what the split holds out, and that GFM integrates with the run's own scheduled
learning rates.
"""

import json
import math
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import benchmarks.forecasting as bf  # noqa: E402
from benchmarks.forecasting import (  # noqa: E402
    FORECASTERS,
    QUICK,
    SPLITS,
    Exclusion,
    digits_data,
    forecast_gfm,
    make_scheduler,
    observed,
    record_run,
    render_tables,
    run_benchmark,
    seq_dataset,
    seq_features,
    train_seq_model,
)

KEYS = {
    "split",
    "p",
    "forecaster",
    "optimizer",
    "family",
    "arch",
    "schedule",
    "rel_error",
    "val_loss",
    "val_acc",
    "true_val_loss",
    "true_val_acc",
    "seq_model",
}


@pytest.fixture(scope="module")
def single_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: more threads only contend on a shared machine
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def quick(tmp_path_factory, single_thread) -> tuple[dict, dict]:
    """The quick benchmark's returned result and the JSON it wrote."""
    out = tmp_path_factory.mktemp("forecasting") / "forecasting.json"
    result = run_benchmark(QUICK, out, command="run_benchmark(QUICK)", log=lambda *_: None)
    return result, json.loads(out.read_text())


@pytest.fixture(scope="module")
def data():
    return digits_data()


def test_quick_forecasting_benchmark(quick):
    result, saved = quick
    assert saved["command"] == "run_benchmark(QUICK)"
    rows = saved["rows"]
    assert len(rows) == len(result["rows"]) > 0
    assert all(set(r) >= KEYS for r in rows)
    assert {r["split"] for r in rows} == set(SPLITS)
    for split in SPLITS:
        for p in QUICK.fractions:
            assert {r["forecaster"] for r in rows if r["split"] == split and r["p"] == p} == set(FORECASTERS)
    assert {r["p"] for r in rows} == set(QUICK.fractions)
    last = [r for r in rows if r["forecaster"] == "last"]
    assert all(abs(r["rel_error"] - 1.0) < 1e-9 for r in last)
    for r in rows:
        assert math.isfinite(r["true_val_loss"]) and 0.0 <= r["true_val_acc"] <= 1.0
        if r["forecaster"] in ("last", "linear", "lstm", "transformer"):
            assert r["rel_error"] is not None and math.isfinite(r["rel_error"])
    # the old splits evaluate constant-lr runs only; unseen-schedule only the schedules held out of training
    for r in rows:
        expected = set(QUICK.unseen_schedules) if r["split"] == "unseen-schedule" else {"constant"}
        assert r["schedule"] in expected
    assert {r["schedule"] for r in rows if r["split"] == "unseen-schedule"} == set(QUICK.unseen_schedules)
    assert {r["family"] for r in rows if r["split"] == "unseen-optimizer"} == set(QUICK.holdout_families)
    diag = saved["gfm_diagnostics"]
    assert {d["chose"] for d in diag} <= {"fitted", "prior"}
    # every GFM forecast integrated with the rates its run really used; the scheduled ones really vary
    assert all(d["lr_replay_error"] is not None and d["lr_replay_error"] <= 1e-12 for d in diag)
    assert {d["schedule"] for d in diag} == {"constant", *QUICK.unseen_schedules}
    assert all(d["lr_range"][1] > 1.5 * d["lr_range"][0] for d in diag if d["schedule"] != "constant")
    table = render_tables(saved)
    for split in SPLITS:
        assert f"| {split} |" in table
    assert "gfm-prior" in table and "| unseen-schedule | gfm |" in table and "one-cycle" in table


def test_each_split_forecasts_with_models_that_never_saw_its_held_out_runs(quick):
    _, saved = quick
    info = {(i["kind"], i["model"]): i for i in saved["seq_models"]}
    whole = info["lstm", "all"]["trained_on"]
    assert set(whole["schedule"]) == {"constant", *QUICK.train_schedules}  # scheduled runs are in the corpus
    checked = set()
    for r in saved["rows"]:
        if r["forecaster"] not in ("lstm", "transformer"):
            continue
        trained = info[r["forecaster"], r["seq_model"]]["trained_on"]
        if r["split"] == "unseen-arch":
            assert r["arch"] not in trained["arch"] and trained["arch"]
        elif r["split"] == "unseen-optimizer":
            assert r["family"] not in trained["family"] and r["optimizer"] not in trained["optimizer"]
        elif r["split"] == "unseen-schedule":
            assert r["schedule"] not in trained["schedule"]
        else:
            assert r["seq_model"] == "all"
            assert r["arch"] in trained["arch"] and r["family"] in trained["family"]
        checked.add(r["split"])
    assert checked == set(SPLITS)
    # one family is one update rule: holding Adam out holds AdamW out too
    held = info["lstm", "family!=adam"]
    assert not {"adam", "adamw"} & set(held["trained_on"]["optimizer"])
    assert 0 < held["samples"] < info["lstm", "all"]["samples"]
    assert 0 < info["transformer", "arch!=cnn"]["samples"] < info["transformer", "all"]["samples"]
    # no training run uses an unseen-schedule schedule, so that exclusion keeps every sample
    name = Exclusion("schedule", QUICK.unseen_schedules).name
    assert info["lstm", name]["reused"] == "all" and info["lstm", name]["samples"] == info["lstm", "all"]["samples"]


def test_exclusion_removes_exactly_the_held_out_runs_samples(data, single_thread):
    cfg = replace(QUICK, steps=100, seq_samples=50, seq_steps=2, seq_batch=64)
    runs = [
        record_run("mlp-tanh", "sgd", 0, 0, data, cfg),
        record_run("mlp-tanh", "adamw", 0, 0, data, cfg, schedule="cosine"),
        record_run("cnn", "rmsprop", 0, 0, data, cfg, schedule="step"),
    ]
    sdata = seq_dataset(runs, cfg)
    per_run = (len(runs[0].steps) - cfg.seq_len - 1) * cfg.seq_samples  # samples each run contributes
    assert len(sdata.target) == per_run * len(runs)
    cases = [
        (Exclusion("family", ("adam",)), [0, 2]),
        (Exclusion("arch", ("cnn",)), [0, 1]),
        (Exclusion("schedule", ("step", "cosine")), [0]),
        (Exclusion("schedule", ("one-cycle",)), [0, 1, 2]),
    ]
    for exclusion, kept_runs in cases:
        keep = exclusion.keep(sdata)
        expected = torch.cat([sdata.seq[i * per_run : (i + 1) * per_run] for i in kept_runs])
        assert torch.equal(sdata.seq[keep], expected)
        _, info = train_seq_model("lstm", sdata, exclusion, cfg)
        assert info["samples"] == len(kept_runs) * per_run
        assert info["trained_on"]["schedule"] == sorted({runs[i].schedule for i in kept_runs})
    # the blocks are the runs' own inputs, in order: the first is the first run's first anchor
    seq, _, _ = seq_features(runs[0], cfg.seq_len + 1, cfg.seq_len)
    pick = torch.randperm(runs[0].w.shape[1], generator=torch.Generator().manual_seed(cfg.seed))[: cfg.seq_samples]
    assert torch.equal(sdata.seq[: cfg.seq_samples], seq[pick])
    assert sdata.values("optimizer", sdata.codes["arch"] == sdata.labels["arch"].index("cnn")) == ["rmsprop"]


@pytest.mark.parametrize("schedule", ["one-cycle", "step", "warmup-cosine", "constant"])
def test_gfm_integrates_with_the_schedulers_real_learning_rates(schedule, data, single_thread, monkeypatch):
    cfg = QUICK
    run = record_run("mlp-tanh", "sgd", 0, 0, data, cfg, schedule=schedule)
    handed = []
    real_forecast = bf.forecast

    def spy(field, win, dyn, lr_steps, horizons, **kw):
        handed.append(lr_steps.clone())
        return real_forecast(field, win, dyn, lr_steps, horizons, **kw)

    monkeypatch.setattr(bf, "forecast", spy)
    n = observed(run, 0.5)
    forecast_gfm(run, n, cfg)
    s_p = int(run.steps[n - 1])
    horizon = cfg.steps - s_p

    # the scheduler's true sequence: a fresh copy of the schedule driving a real optimizer for the whole run
    param = nn.Parameter(torch.zeros(1))
    opt = bf.OPTIMIZERS["sgd"]([param])
    sched = make_scheduler(schedule, opt, cfg.steps)
    true = []
    for _ in range(cfg.steps):
        true.append(opt.param_groups[0]["lr"])
        param.grad = torch.zeros(1)
        opt.step()
        if sched is not None:
            sched.step()
    true = torch.tensor(true, dtype=torch.float64)

    assert len(handed) == 2  # the fitted field's forecast and the prior's
    for lr_steps in handed:
        assert lr_steps.shape == (horizon + 1, 1)
        torch.testing.assert_close(lr_steps[:horizon, 0], true[s_p:], rtol=1e-12, atol=0.0)
        torch.testing.assert_close(lr_steps[:horizon, 0], run.lr_trace[s_p:, 0], rtol=1e-12, atol=0.0)
    # a snapshot's recorded lr is the next step's (Lightning steps the scheduler before on_train_batch_end)
    assert float(run.buffer[n - 1].lrs[0]) == float(true[s_p])
    if schedule == "constant":
        assert run.lr_states[n - 1][1] is None and bool((handed[0] == 0.1).all())
    else:
        assert float(handed[0][:horizon].max()) > 1.5 * float(handed[0][:horizon].min())  # really scheduled
        final = torch.full((horizon,), float(run.opt.param_groups[0]["lr"]), dtype=torch.float64)
        assert not torch.allclose(handed[0][:horizon, 0], final)  # not the live optimizer's lr after step T
