"""Reporting: scalars through any logger, W&B extras offline, forecast skill, progress bar, failing loggers."""

import csv
import pathlib
import re
import warnings

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import TQDMProgressBar
from lightning.pytorch.loggers import CSVLogger, Logger
from models import DigitsModule, tiny_trainer

from lightning_gfm import GFMCallback, JumpRecord
from lightning_gfm.forecast import ForecastPath
from lightning_gfm.loggers import GFMReporter, is_wandb_logger, trajectory_projection
from lightning_gfm.params import ParamSpec

FAST = dict(record_every=2, jump_every=20, window=12, trend=4, fit_steps=10, fit_batch=512, eval_batches=2)


def _fit(tmp_path, cb, max_steps=60, **kwargs):
    pl.seed_everything(0, verbose=False)
    model = DigitsModule()
    trainer = tiny_trainer(tmp_path, [cb], max_steps=max_steps, **kwargs)
    trainer.fit(model)
    return trainer


# ------------------------------------------------------------------------------------------- pure parts
def test_only_loggers_module_imports_wandb():
    root = pathlib.Path(__file__).resolve().parents[1] / "lightning_gfm"
    importers = sorted(
        p.relative_to(root).as_posix()
        for p in root.rglob("*.py")
        if re.search(r"^\s*(import wandb|from wandb)", p.read_text(), re.M)
    )
    assert importers == ["loggers.py"]
    top_level = [line for line in (root / "loggers.py").read_text().splitlines() if line.startswith("import wandb")]
    assert not top_level  # only inside functions


def test_is_wandb_logger_by_class_name():
    class WandbLogger:
        pass

    class Mine(WandbLogger):
        pass

    assert is_wandb_logger(Mine()) and not is_wandb_logger(CSVLogger("."))


def test_trajectory_projection_keeps_distances_in_the_plane():
    gen = torch.Generator().manual_seed(0)
    basis = torch.linalg.qr(torch.randn(50, 2, generator=gen)).Q.T  # two orthonormal directions in R^50
    coords = torch.tensor([[0.0, 0.0], [1.0, 0.5], [2.0, 0.7], [3.0, 0.8]])
    real = coords @ basis
    forecast = torch.tensor([[3.0, 0.8], [5.0, 1.0]]) @ basis
    real_xy, fc_xy = trajectory_projection(real, forecast)
    assert real_xy.shape == (4, 2) and fc_xy.shape == (2, 2)
    assert torch.allclose(fc_xy[0], torch.zeros(2), atol=1e-6)  # the anchor is the origin
    want = torch.cdist(torch.cat([coords, torch.tensor([[5.0, 1.0]])]), torch.tensor([[3.0, 0.8]]))
    got = torch.cdist(torch.cat([real_xy, fc_xy[1:]]), torch.zeros(1, 2))
    assert torch.allclose(got, want, atol=1e-5)


class _Recorder(Logger):
    def __init__(self):
        super().__init__()
        self.rows = []

    @property
    def name(self):
        return "rec"

    @property
    def version(self):
        return 0

    def log_hyperparams(self, params, *args, **kwargs):
        pass

    def log_metrics(self, metrics, step=None):
        self.rows.append((step, dict(metrics)))


def test_reporter_measures_forecast_skill_by_hand():
    lin = torch.nn.Linear(3, 2)  # 8 scalars
    spec = ParamSpec.from_module(lin)
    start = spec.flatten().clone()
    ahead = start + torch.arange(8.0)
    path = ForecastPath([0, 5], torch.stack([start, ahead]), {}, 0.0)
    rec = JumpRecord(
        step=10, horizon=0, accepted=False, metric_before=1.0, metric_after=1.0, outcome="rolled_back", seconds=0.0
    )
    logger = _Recorder()
    reporter = GFMReporter(skill_scalars=4)
    reporter.log_jump([logger], 10, rec, [rec], buffer_mb=0.0, record_seconds=0.0, spec=spec, path=path)
    assert reporter.pending is not None and list(reporter.pending.targets) == [15]
    index = reporter.pending.index
    assert index.numel() == 4
    real = start + 0.5 * torch.arange(8.0)  # the run moved half as far, same direction
    spec.write_(real)
    reporter.observe([logger], 14, spec)
    assert reporter.skill == []  # not there yet
    reporter.observe([logger], 15, spec)
    ((step, horizon, rel, cos),) = reporter.skill
    d = torch.arange(8.0)[index]
    assert (step, horizon) == (15, 5)
    assert rel == pytest.approx(float((0.5 * d).norm() / (0.5 * d).norm()), rel=1e-6)  # error = displacement
    assert cos == pytest.approx(1.0, abs=1e-6)
    assert logger.rows[-1] == (
        15,
        {
            "gfm/forecast_skill/relative_error": rel,
            "gfm/forecast_skill/direction_cosine": cos,
            "gfm/forecast_skill/horizon": 5.0,
        },
    )
    assert reporter.pending is None


# ------------------------------------------------------------------------------------------ in a fit
def test_forecast_skill_logged_where_rolled_back_forecasts_land(tmp_path):
    logger = CSVLogger(save_dir=tmp_path, name="csv")
    cb = GFMCallback(overhead=None, **FAST, min_delta=1.0)  # a loss can never fall by 100 %: every jump rolls back
    _fit(tmp_path, cb, logger=logger)
    assert [j.outcome for j in cb.jumps] == ["rolled_back", "rolled_back"]
    with open(f"{logger.log_dir}/metrics.csv") as f:
        rows = [r for r in csv.DictReader(f) if r.get("gfm/forecast_skill/relative_error")]
    # with trend branches every path shares the horizons and the skill follows the field's path: count each once
    # (every horizon of the path: screened, whether or not it was then evaluated in full)
    first, second = (sorted({h for h, _ in (j.screened or j.candidates) if h > 0}) for j in cb.jumps)
    # the second attempt replaces the first's pending forecast
    want = [20 + h for h in first if 20 + h < 40] + [40 + h for h in second if 40 + h <= 60]
    assert [int(r["step"]) for r in rows] == want
    for r in rows:
        assert 0 < float(r["gfm/forecast_skill/relative_error"]) < 10
        assert -1 <= float(r["gfm/forecast_skill/direction_cosine"]) <= 1
    assert [s for s, *_ in cb._reporter.skill] == want


def test_progress_bar_shows_accepted_and_rolled_back(tmp_path):
    cb = GFMCallback(overhead=None, **FAST)
    pl.seed_everything(0, verbose=False)
    bar = TQDMProgressBar(refresh_rate=1000)
    trainer = tiny_trainer(tmp_path, [cb, bar], max_steps=60, enable_progress_bar=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(DigitsModule())
    accepted = sum(j.accepted for j in cb.jumps)
    assert len(cb.jumps) == 2
    shown = trainer.progress_bar_metrics
    assert shown["gfm_acc"] == accepted and shown["gfm_rb"] == 2 - accepted
    assert "gfm_acc" in bar.get_metrics(trainer, trainer.lightning_module)
    assert "gfm_acc" not in trainer.logged_metrics  # progress bar only, loggers get gfm/jumps_accepted


class _Broken(CSVLogger):
    def log_metrics(self, metrics, step=None):
        if any(k.startswith("gfm/") for k in metrics):  # Lightning's own calls must work, or Lightning stops
            raise RuntimeError("disk full")
        super().log_metrics(metrics, step)


class WandbLogger(_Broken):  # recognised by name: the W&B extras path fails too
    def log_metrics(self, metrics, step=None):
        if any(not isinstance(v, int | float) for v in metrics.values()):
            raise RuntimeError("disk full")  # the extras (table, image) fail too
        super().log_metrics(metrics, step)


@pytest.mark.parametrize("cls", [_Broken, WandbLogger])
def test_logger_that_raises_never_stops_training(tmp_path, cls):
    cb = GFMCallback(overhead=None, **FAST, min_delta=1.0)  # rolled back: forecast skill is logged (and fails) too
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer = _fit(tmp_path, cb, logger=cls(save_dir=tmp_path, name="bad"))
    assert trainer.global_step == 60 and len(cb.jumps) == 2
    ours = [str(w.message) for w in caught if "GFMCallback: logger" in str(w.message)]
    assert len(ours) == 1 and cls.__name__ in ours[0] and "disk full" in ours[0], ours


# --------------------------------------------------------------------------------------- W&B offline
def test_wandb_offline_gets_table_histograms_picture_and_scalars(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    pytest.importorskip("matplotlib")
    from lightning.pytorch.loggers import WandbLogger as RealWandbLogger

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    for var in ("WANDB_CACHE_DIR", "WANDB_CONFIG_DIR", "WANDB_DATA_DIR"):
        (tmp_path / var).mkdir()
        monkeypatch.setenv(var, str(tmp_path / var))
    import wandb

    logger = RealWandbLogger(offline=True, save_dir=str(tmp_path), project="gfm-test")
    logged = []
    experiment = logger.experiment
    real_log = experiment.log
    experiment.log = lambda data, *a, **k: (logged.append(dict(data)), real_log(data, *a, **k))[1]
    cb = GFMCallback(overhead=None, **FAST)
    try:
        _fit(tmp_path, cb, logger=logger)
    finally:
        wandb.finish()
    keys = set().union(*logged)
    assert {"gfm/accepted", "gfm/jumps_accepted", "gfm/metric_before"} <= keys  # scalars, as for any logger
    tables = [d["gfm/jumps"] for d in logged if "gfm/jumps" in d]
    assert len(tables) == 2 and isinstance(tables[-1], wandb.Table)
    assert len(tables[-1].data) == 2 and tables[-1].columns[:3] == ["step", "outcome", "accepted"]
    assert [row[0] for row in tables[-1].data] == [j.step for j in cb.jumps]
    images = [d["gfm/trajectory"] for d in logged if "gfm/trajectory" in d]
    assert len(images) == 2 and all(isinstance(i, wandb.Image) for i in images)
    hist = {k for k in keys if k.startswith("gfm/forecast_update/")}
    assert hist == {"gfm/forecast_update/net.0", "gfm/forecast_update/net.2"}
    assert all(isinstance(d[k], wandb.Histogram) for d in logged for k in hist & set(d))
    runs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and list(runs[0].glob("*.wandb")), list(tmp_path.rglob("*"))
    assert any(runs[0].rglob("*.png"))  # the picture reached the run's files


def test_skill_sample_of_a_large_model_is_distinct_sorted_and_seeded():
    from lightning_gfm.loggers import GFMReporter

    reporter = GFMReporter(seed=3)
    total = (1 << 22) + 12345  # above the size where a full permutation is drawn
    a, b = reporter._subset(1000, total, 7), reporter._subset(1000, total, 7)
    assert torch.equal(a, b) and a.numel() == 1000 and a.unique().numel() == 1000
    assert bool((a[1:] > a[:-1]).all()) and int(a[0]) >= 0 and int(a[-1]) < total
