"""The ``meta`` corpus suite: its coverage, its disjointness from the benchmark's data, its recording."""

import collections
import hashlib
import math
from dataclasses import replace

import pytest
import torch

from lightning_gfm import corpus
from lightning_gfm.corpus import (
    ARCHS,
    DATASETS,
    SCHEDULES,
    SUITES,
    TEXTS,
    load_trajectory,
    record_run,
    save_trajectory,
)
from lightning_gfm.fields.cli import main

#: data the benchmark's tasks train or evaluate on: scikit-learn's digits, diabetes and breast cancer, mnist1d,
#: and the source text of these standard-library packages.
FORBIDDEN_DATA = ("digits", "diabetes", "breast_cancer", "breast-cancer", "mnist1d", "mnist")
FORBIDDEN_TEXT = ("json", "email", "http", "xml", "urllib", "logging", "importlib", "concurrent", "asyncio")
NEW_KINDS = sorted(set(ARCHS) - {"mlp"})

#: names of the suites recorded before the ``meta`` suite existed: (count, sha256 of the joined names, first name).
EXISTING = {
    "pretrain": (135, "6cf0d9bbcee0d7d5", "wine_32tanh_sgd-lr0.05_constant_i0d0"),
    "heldout-init": (15, "cb805e98fdb471dc", None),
    "heldout-arch": (10, "53c8416e1f13d81b", None),
    "heldout-opt": (20, "b4922e85f1f6aeaa", None),
    "smoke": (5, "24a0a4fbfa2ef5d5", None),
}


pytestmark = pytest.mark.usefixtures("one_thread")


def _family(run) -> str:
    """The optimizer family a run is meant to cover (AdamW apart from Adam, momentum apart from SGD)."""
    kw = dict(run.opt_kwargs)
    if run.optimizer == "sgd":
        return "momentum" if kw.get("momentum", 0) > 0 else "sgd"
    return run.optimizer


def _dynamics_family(run) -> str:
    """The family :attr:`Trajectory.family` must report for ``run`` (read from its dynamics class)."""
    return {"sgd": "sgd", "momentum": "momentum", "adam": "adam", "adamw": "adam", "rmsprop": "rmsprop"}[_family(run)]


# ------------------------------------------------------------------------------------------------ coverage
def test_meta_suite_covers_kinds_families_and_schedules():
    runs = SUITES["meta"]()
    assert 250 <= len(runs) <= 350
    assert len({r.name for r in runs}) == len(runs)
    assert {r.arch for r in runs} == set(ARCHS)
    assert {_family(r) for r in runs} == {"sgd", "momentum", "adam", "adamw", "rmsprop"}
    assert {r.schedule for r in runs} == set(SCHEDULES) == {"constant", "step", "cosine", "warmup-cosine", "onecycle"}
    # spread evenly: the same count in every (kind, family) and (kind, schedule) cell, and every triple present
    for key in (lambda r: (r.arch, _family(r)), lambda r: (r.arch, r.schedule)):
        assert len(set(collections.Counter(map(key, runs)).values())) == 1
    assert len({(r.arch, _family(r), r.schedule) for r in runs}) == len(ARCHS) * 5 * len(SCHEDULES)
    kws = [dict(r.opt_kwargs) for r in runs]
    assert any(kw.get("nesterov") for kw in kws)
    assert any(r.optimizer == "rmsprop" and dict(r.opt_kwargs).get("momentum") for r in runs)
    assert all(dict(r.opt_kwargs).get("weight_decay", 0) > 0 for r in runs if r.optimizer == "adamw")
    rates = collections.defaultdict(set)
    for r in runs:
        rates[r.arch, _family(r)].add(dict(r.opt_kwargs)["lr"])
    assert all(len(v) >= 2 for v in rates.values())  # at least two learning rates per (kind, family)
    assert all(300 <= r.steps <= 900 and 16 <= r.batch <= 128 for r in runs)
    assert {r.batch for r in runs} >= {16, 128}
    assert all(40 <= r.steps // r.record_every <= 60 for r in runs)
    assert len({r.init_seed for r in runs}) == len({r.data_seed for r in runs}) == len(runs)
    assert {r.dataset for r in runs if r.arch.endswith("-lm")} <= set(TEXTS)


def test_meta_long_is_the_meta_suite_three_times_as_long_at_the_callbacks_interval():
    from lightning_gfm import auto_schedule

    short, long = SUITES["meta"](), SUITES["meta-long"]()
    assert len(long) == len(short)
    for s, r in zip(short, long, strict=True):
        assert replace(r, steps=s.steps, record_every=s.record_every) == s  # the same cell, data, setting, seeds
        assert r.steps == 3 * s.steps and r.record_every == auto_schedule(r.steps)[0]
    assert all(900 <= r.steps <= 2700 and 59 <= r.steps // r.record_every <= 61 for r in long)


def test_meta_smoke_has_one_short_run_per_kind():
    runs = SUITES["meta-smoke"]()
    assert sorted(r.arch for r in runs) == sorted(ARCHS)
    assert len({_family(r) for r in runs}) == 5 and all(r.steps <= 150 for r in runs)
    assert len({r.name for r in runs}) == len(runs)


def test_existing_suite_names_unchanged():
    for suite, (count, digest, first) in EXISTING.items():
        names = [r.name for r in SUITES[suite]()]
        assert len(names) == count
        assert hashlib.sha256("\n".join(names).encode()).hexdigest()[:16] == digest, suite
        if first is not None:
            assert names[0] == first
    assert corpus._suite_pretrain()[0].name == "wine_32tanh_sgd-lr0.05_constant_i0d0"
    assert all(r.arch == "mlp" for s in EXISTING for r in SUITES[s]())


# ---------------------------------------------------------------------------------------------- disjointness
def test_meta_uses_no_benchmark_data(monkeypatch):
    runs = SUITES["meta"]() + SUITES["meta-smoke"]()
    datasets = {r.dataset for r in runs}
    assert datasets <= set(DATASETS)
    assert not datasets & {"wine", "iris"}  # scikit-learn's sets: the suite records without scikit-learn
    for r in runs:
        assert not any(bad in r.name for bad in FORBIDDEN_DATA), r.name
    packages = {p for name in datasets if name in TEXTS for p in TEXTS[name]}
    assert packages and not packages & set(FORBIDDEN_TEXT)
    assert all(p.split(".")[0] not in FORBIDDEN_TEXT for ps in TEXTS.values() for p in ps)

    def no_sklearn(name):
        raise AssertionError(f"the meta suite loaded scikit-learn's {name!r}")

    monkeypatch.setattr(corpus, "_sklearn", no_sklearn)
    corpus._load.cache_clear()
    try:
        for name in sorted(datasets):
            x, y = corpus._load(name)
            assert len(x) == len(y) >= 1000 and torch.isfinite(x.float()).all()
    finally:
        corpus._load.cache_clear()


def test_stdlib_source_is_sorted_and_skips_tests():
    text = corpus.stdlib_source(("unittest",))
    assert "class TestCase" in text and len(text) > 10_000
    assert "class Test_TestCase" not in text  # unittest/test/test_case.py: test folders are left out
    assert text == corpus.stdlib_source(("unittest",))
    with pytest.raises(FileNotFoundError):
        corpus.stdlib_source(("no_such_package_here",))


# ------------------------------------------------------------------------------------------------ recording
@pytest.mark.parametrize("kind", NEW_KINDS)
def test_meta_smoke_run_records_and_round_trips(tmp_path, kind):
    run = next(r for r in SUITES["meta-smoke"]() if r.arch == kind)
    traj = record_run(run)
    assert traj.buffer.steps == list(range(run.record_every, run.steps + 1, run.record_every))
    assert 2_000 <= traj.spec.numel <= 60_000
    meta = traj.meta
    assert meta["task"]["kind"] == kind and meta["task"]["dataset"] == run.dataset
    assert meta["schedule"] == run.schedule and len(meta["losses"]) == len(traj.buffer)
    assert all(math.isfinite(v) for v in meta["losses"])
    assert meta["losses"][-1] < 0.9 * meta["losses"][0]  # mean minibatch losses of the first and last intervals
    assert math.isfinite(meta["first_loss"]) and math.isfinite(meta["final_loss"])
    lr = dict(run.opt_kwargs)["lr"]
    assert float(traj.buffer.lrs().max()) <= lr * (1 + 1e-9)

    path = save_trajectory(tmp_path / f"{run.name}.safetensors", traj.buffer, traj.spec, traj.dyn, traj.meta)
    back = load_trajectory(path)
    assert back.name == run.name and back.family == _dynamics_family(run)
    assert type(back.dyn) is type(traj.dyn) and back.dyn.state_names == traj.dyn.state_names
    assert torch.equal(back.buffer.weights(), traj.buffer.weights())
    for name in traj.dyn.state_names:
        assert torch.equal(back.buffer.state(name), traj.buffer.state(name))
    assert torch.equal(back.buffer.lrs(), traj.buffer.lrs())
    assert back.meta["task"] == meta["task"] and back.meta["run"]["arch"] == kind
    assert back.total_steps == run.steps


def test_schedules_follow_their_shapes():
    base = next(r for r in SUITES["meta-smoke"]() if r.arch == "mlp")
    lrs = {}
    for schedule in SCHEDULES:
        traj = record_run(replace(base, schedule=schedule, steps=100, record_every=5))
        lrs[schedule] = traj.buffer.lrs()[:, 0]
    lr = dict(base.opt_kwargs)["lr"]
    assert torch.allclose(lrs["constant"], torch.full_like(lrs["constant"], lr))
    warm = lrs["warmup-cosine"]
    assert warm[0] < warm[1] < lr * 1.0001 and warm[-1] < 0.1 * lr
    one = lrs["onecycle"]
    assert one[0] < 0.2 * lr and float(one.max()) == pytest.approx(lr, rel=0.05) and one[-1] < 0.01 * lr
    steps = list(range(5, 101, 5))
    assert lrs["step"][steps.index(45)] == pytest.approx(lr) and lrs["step"][steps.index(50)] == pytest.approx(0.3 * lr)
    assert lrs["cosine"][-1] == pytest.approx(0.05 * lr)


def test_record_list_names_the_meta_suites(capsys):
    assert main(["record", "--list"]) == 0
    out = capsys.readouterr().out
    assert f"meta: {len(SUITES['meta']())} runs" in out and "meta-smoke:" in out
