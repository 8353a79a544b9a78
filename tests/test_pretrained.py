"""Pre-trained fields: corpus shards, meta-training, the console commands, the shipped field and its loading."""

import fnmatch
import json
import math
import pickle
import sys
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch

from lightning_gfm import GFMCallback
from lightning_gfm.corpus import RunSpec, load_trajectory, record_run, save_trajectory
from lightning_gfm.fields import PRETRAINED, field_info, load_field, pretrained_path, resolve_field, save_field
from lightning_gfm.fields.cli import main
from lightning_gfm.flow.field import FieldConfig, GradientField
from lightning_gfm.flow.matching import anchors_and_segments, matching_loss, sample_batch
from lightning_gfm.flow.meta import MetaField
from lightning_gfm.forecast import backtest_error
from lightning_gfm.pretrain import PretrainConfig, evaluate_fields, pretrain_field, summarise

ROOT = Path(__file__).resolve().parents[1]
BENCHMARK_DATA = ("digits", "mnist1d", "charlm", "json", "email", "http")


pytestmark = pytest.mark.usefixtures("one_thread")


def _small(optimizer="adam", kw=(("lr", 3e-3),), steps=150, **extra):
    return RunSpec("moons", (16,), "tanh", optimizer, kw, "cosine", steps=steps, **extra)


# ------------------------------------------------------------------------------------------------ corpus
@pytest.mark.parametrize(
    "optimizer,kw",
    [("adam", (("lr", 3e-3),)), ("sgd", (("lr", 0.05), ("momentum", 0.9))), ("rmsprop", (("lr", 1e-3),))],
)
def test_shard_round_trip(tmp_path, optimizer, kw):
    traj = record_run(_small(optimizer, kw))
    path = save_trajectory(tmp_path / "t.safetensors", traj.buffer, traj.spec, traj.dyn, traj.meta)
    back = load_trajectory(path)
    assert back.buffer.steps == traj.buffer.steps == list(range(10, 151, 10))
    assert torch.equal(back.buffer.weights(), traj.buffer.weights())
    for name in traj.dyn.state_names:
        assert torch.equal(back.buffer.state(name), traj.buffer.state(name))
    assert torch.equal(back.buffer.lrs(), traj.buffer.lrs())
    assert type(back.dyn) is type(traj.dyn) and back.dyn.hyper == traj.dyn.hyper
    assert back.spec.offsets == traj.spec.offsets and back.spec.roles == traj.spec.roles
    meta = back.meta
    assert meta["task"]["dataset"] == "moons" and meta["optimizer"]["class"] in ("Adam", "SGD", "RMSprop")
    assert meta["schedule"] == "cosine" and meta["seeds"] == {"init": 0, "data": 0} and meta["steps"] == 150
    win = back.window(2, 14)
    assert win.K == 12 and traj.spec.numel == win.P and float(win.progress[-1]) == pytest.approx(140 / 150)


class _Payload:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


def test_hostile_pickles_are_refused_without_running(tmp_path):
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.safetensors"
    evil.write_bytes(pickle.dumps(_Payload(marker)))
    with pytest.raises(ValueError, match="Pickled checkpoints are refused"):
        load_field(evil)
    with pytest.raises(ValueError, match="not a safetensors trajectory shard"):
        load_trajectory(evil)
    assert not marker.exists()
    # a field file is not a trajectory shard and vice versa
    with pytest.raises(ValueError, match="not a lightning-gfm trajectory shard"):
        load_trajectory(pretrained_path())


# ------------------------------------------------------------------------------------------- pre-training
def test_pretrain_learns_and_resumes(tmp_path):
    trajs = [record_run(_small()), record_run(_small("sgd", (("lr", 0.1),), init_seed=1))]
    cfg = PretrainConfig(
        steps=60, windows_per_step=2, batch=256, min_window=10, window=14
    )  # each window has a trend anchor
    gen = torch.Generator().manual_seed(0)
    probes = []
    for t in trajs:
        win = t.window(0, len(t.buffer))
        probes.append(
            (win, t.dyn, sample_batch(win, anchors_and_segments(win, cfg.field_config.min_anchor, 12.0), 2048, gen))
        )

    def probe_loss(f):
        with torch.no_grad():
            return sum(float(matching_loss(f, w, d, s, 3)) for w, d, s in probes)

    before = probe_loss(GradientField(cfg.field_config))
    field, report = pretrain_field(trajs, cfg, progress=False)
    assert report["trajectories"] == 2 and set(report["families"]) == {"adam", "sgd"}
    assert probe_loss(field) < 0.9 * before
    # interrupted after 25 steps (checkpoint every 10), then resumed from step 20
    ckpt = tmp_path / "f.ckpt"
    import lightning_gfm.pretrain as pt

    calls = {"n": 0}
    real = pt.matching_loss

    def flaky(*a, **k):
        calls["n"] += 1
        if calls["n"] > 25 * cfg.windows_per_step:
            raise KeyboardInterrupt
        return real(*a, **k)

    pt.matching_loss = flaky
    try:
        with pytest.raises(KeyboardInterrupt):
            pretrain_field(trajs, cfg, checkpoint=ckpt, checkpoint_every=10, progress=False)
    finally:
        pt.matching_loss = real
    assert ckpt.exists()
    logs = []
    _, rep2 = pretrain_field(trajs, cfg, checkpoint=ckpt, checkpoint_every=10, progress=False, log=logs.append)
    assert logs == [f"resumed from {ckpt} at step 20"] and not ckpt.exists()
    assert math.isfinite(rep2["loss_last"])


def test_evaluate_rows_and_online_fine_tuning():
    trajs = [record_run(_small(steps=300))]
    fields = {"pretrained": load_field(pretrained_path())}
    rows = evaluate_fields(trajs, fields, finetune=["pretrained"], online_steps=5, online_batch=256, progress=False)
    assert {r["field"] for r in rows} == {"pretrained", "online", "pretrained+ft"}
    assert {r["p"] for r in rows} == {0.5, 1.0}
    assert all(r["rel_error"] is not None and r["rel_error"] >= 0 for r in rows)
    assert set(summarise(rows)) == {"pretrained", "online", "pretrained+ft"}


def test_pretrain_defaults_are_the_callbacks():
    assert PretrainConfig().field_config.to_dict() == GFMCallback().field_config.to_dict()
    assert PretrainConfig().field_config.anchor == "trend"


def test_trend_anchor_round_trips_through_save_and_load(tmp_path):
    cfg = PretrainConfig(steps=3, windows_per_step=1, batch=64, anchor="trend", trend=5)
    field, report = pretrain_field([record_run(_small())], cfg, progress=False)
    assert (field.config.anchor, field.config.trend) == ("trend", 5)
    assert (report["config"]["anchor"], report["config"]["trend"]) == ("trend", 5)
    path = save_field(field, tmp_path / "trend.safetensors")
    back = load_field(path)
    assert back.config == field.config and (back.config.anchor, back.config.trend) == ("trend", 5)
    assert field_info(path)["config"]["anchor"] == "trend" and field_info(path)["config"]["trend"] == 5
    assert all(torch.equal(a, b) for a, b in zip(field.state_dict().values(), back.state_dict().values(), strict=True))


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (
            {"anchor": "latest"},
            r"`PretrainConfig.anchor` \(--anchor\) must be one of 'state', 'velocity', 'trend', got 'latest'",
        ),
        ({"trend": 1}, r"`PretrainConfig.trend` \(--trend\) must be an integer >= 2 .*got 1\."),
        ({"trend": 4.0}, r"`PretrainConfig.trend` \(--trend\) must be an integer >= 2 .*got 4.0\."),
        ({"trend": True}, r"`PretrainConfig.trend` \(--trend\) must be an integer >= 2 .*got True\."),
    ],
)
def test_bad_anchor_or_trend_is_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        PretrainConfig(**kwargs)


@pytest.mark.parametrize(
    "flags,message",
    [
        (["--anchor", "latest"], "argument --anchor: invalid choice: 'latest'"),
        (["--trend", "1"], "argument --trend: must be an integer >= 2 (snapshots in the trend line), got '1'"),
        (["--trend", "eight"], "argument --trend: must be an integer >= 2 (snapshots in the trend line), got 'eight'"),
    ],
)
def test_cli_refuses_bad_anchor_or_trend(tmp_path, capsys, flags, message):
    with pytest.raises(SystemExit) as exc:
        main(["pretrain", "--corpus", str(tmp_path), "--out", str(tmp_path / "f.safetensors"), *flags])
    assert exc.value.code == 2 and message in capsys.readouterr().err


def test_evaluate_forecasts_each_field_from_its_own_anchor():
    traj = record_run(_small(steps=300))
    fields = {
        "state": GradientField(FieldConfig(span=12.0, anchor="state")),
        "trend": GradientField(FieldConfig(span=12.0, anchor="trend", trend=8)),
    }
    rows = evaluate_fields([traj], fields, anchors=(0.0, 1.0), online=False, progress=False)
    err = {(r["field"], r["p"]): r["rel_error"] for r in rows}
    assert set(err) == {(f, p) for f in fields for p in (0.0, 1.0)}
    # the earliest anchor is one every field can start from (the trend line needs 8 snapshots), the same for all
    assert all(e is not None and math.isfinite(e) for e in err.values())
    assert err["state", 0.0] != err["trend", 0.0] and err["state", 1.0] != err["trend", 1.0]
    a = 7 + 2  # observed snapshots at p=0: min_anchor (7 for trend=8) + 2, the same for every field
    expected = backtest_error(fields["trend"], traj.window(0, a + 12), traj.dyn, 12, max_scalars=None)
    assert err["trend", 0.0] == pytest.approx(expected)


# ------------------------------------------------------------------------------------------ console commands
def test_cli_record_pretrain_evaluate(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    assert exc.value.code == 0
    for cmd in ("record", "pretrain", "evaluate"):
        with pytest.raises(SystemExit):
            main([cmd, "--help"])
    assert "--corpus" in capsys.readouterr().out
    corpus = tmp_path / "corpus"
    assert main(["record", "--suite", "smoke", "--out", str(corpus), "--no-progress"]) == 0
    shards = sorted(corpus.glob("*.safetensors"))
    assert len(shards) == 5
    stamp = [s.stat().st_mtime_ns for s in shards]
    main(["record", "--suite", "smoke", "--out", str(corpus), "--no-progress"])  # resumable: nothing re-recorded
    assert [s.stat().st_mtime_ns for s in shards] == stamp
    out = tmp_path / "f.safetensors"
    args = ["pretrain", "--corpus", str(corpus), "--out", str(out), "--steps", "15", "--batch", "128"]
    assert main([*args, "--no-progress"]) == 0
    info = field_info(out)
    assert info["format"] == "lightning-gfm-field" and info["version"] == "1"
    assert len(info["trained_on"]["tasks"]) >= 3 and info["trained_on"]["command"].startswith("lightning-gfm pretrain")
    report = tmp_path / "ev.json"
    main(
        [
            "evaluate",
            "--field",
            str(out),
            "--corpus",
            str(shards[0]),
            "--online-steps",
            "3",
            "--lag",
            "6",
            "--json",
            str(report),
            "--no-progress",
        ]
    )
    text = capsys.readouterr().out
    assert "| prior |" in text and "| online |" in text
    assert set(json.loads(report.read_text())["summary"]) == {"prior", str(out), "online"}


def test_console_script_and_package_data_are_declared():
    text = (ROOT / "pyproject.toml").read_text()
    assert 'lightning-gfm = "lightning_gfm.fields.cli:main"' in text
    rel = pretrained_path().relative_to(ROOT / "lightning_gfm" / "fields").as_posix()
    globs = ["*.safetensors", "**/*.safetensors"]
    assert all(g in text for g in globs) and any(fnmatch.fnmatch(rel, g) for g in globs)


# --------------------------------------------------------------------------------------------- shipped field
def test_shipped_field_is_small_documented_and_a_drop_in():
    for name in PRETRAINED:
        path = pretrained_path(name)
        assert path.stat().st_size <= 1 << 20
        info = field_info(path)
        assert info["format"] == "lightning-gfm-field" and int(info["version"]) >= 1
        trained = info["trained_on"]
        assert trained["tasks"] and trained["optimizers"] and trained["command"].startswith("lightning-gfm")
        assert not any(b in t for t in trained["datasets"] for b in BENCHMARK_DATA)  # disjoint from the benchmark
        field = load_field(path)
        if isinstance(field, MetaField):  # a meta-trained field forecasts beside the prior, not in its place
            cb = GFMCallback(overhead=None, field=f"pretrained:{name}")
            assert cb.meta_path == str(path) and cb.field_path is None and not cb.learns
            assert set(trained["disjoint_from"]) >= {"ho-cancer-mlp", "ho-digits-resnet", "mnist1d-mlp"}
            held_out = ("diabetes", "breast_cancer", "cancer", "xml", "urllib", "logging", "importlib", "asyncio")
            assert not any(b in t for t in trained["datasets"] for b in held_out)
            continue
        cb = GFMCallback()
        c, d = field.config, cb.field_config
        assert (c.history, c.hidden, c.depth) == (d.history, d.hidden, d.depth)
        # its span is its own (12 record intervals, the default when it was trained): a loaded field is learned
        # (backtested, window-limited horizons) and forecasts as far as it was fitted, whatever the callback's span
        assert c.span == 12.0 and cb.learns is False and GFMCallback(overhead=None, field=str(path)).learns


def test_field_names_resolve(tmp_path):
    assert resolve_field("pretrained") == str(pretrained_path("default"))
    assert resolve_field("pretrained:default") == str(pretrained_path("default"))
    cb = GFMCallback(overhead=None, field="pretrained")
    assert cb.field_path == str(pretrained_path())
    with pytest.raises(ValueError, match="Unknown pretrained field 'nope'.*default"):
        GFMCallback(overhead=None, field="pretrained:nope")
    with pytest.raises(FileNotFoundError, match="not found"):
        GFMCallback(overhead=None, field=str(tmp_path / "missing.safetensors"))


def test_callback_loads_and_optionally_fine_tunes_the_pretrained_field(tmp_path):
    sys.path.insert(0, str(ROOT / "tests"))
    from models import DigitsModule

    shipped = load_field(pretrained_path())
    for fit_steps in (0, 3):
        pl.seed_everything(0, verbose=False)
        cb = GFMCallback(
            overhead=None,
            field="pretrained",
            record_every=2,
            jump_every=20,
            window=12,
            trend=4,  # the prior it is backtested against: a line through 4 snapshots, so step 20 can jump
            fit_steps=fit_steps,
            fit_batch=256,
            eval_batches=1,
        )
        trainer = pl.Trainer(
            max_steps=22,
            callbacks=[cb],
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            limit_val_batches=1,
            default_root_dir=tmp_path,
            num_sanity_val_steps=0,
        )
        trainer.fit(DigitsModule(hidden=16))
        assert len(cb.jumps) == 1
        same = all(
            torch.equal(a, b.to(a.device))
            for a, b in zip(cb.field.state_dict().values(), shipped.state_dict().values(), strict=True)
        )
        assert same == (fit_steps == 0)  # frozen, or fine-tuned online on the run's own window
