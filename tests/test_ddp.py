"""Two processes on CPU (gloo): GFM shares its work between DDP ranks and every rank still acts alike.

* Lightning's ``ddp_spawn``: the ranks make the same decisions and end with identical weights, each rank
  integrates only its own slice of the scalars, and a rank that fails inside the forecast stops every rank.
* The helpers of :mod:`lightning_gfm.distributed` in spawned gloo processes: the sharded fit keeps one field on
  every rank, the sharded backtest and forecast equal the single-process ones, and a rank that raises in any
  phase makes every rank raise the same error instead of hanging (each worker has a deadline).
"""

import datetime
import pathlib

import lightning.pytorch as pl
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from models import DigitsModule, run_two_ranks, save_rank_outcome, tiny_trainer

import lightning_gfm.callback as gfm_callback
from lightning_gfm import GFMCallback
from lightning_gfm.distributed import Shard, agree, fit_message_size, gather_path, rank_slice
from lightning_gfm.dynamics import dynamics_for, future_learning_rates, lr_by_step, take_snapshot
from lightning_gfm.flow.field import FieldConfig, GradientField
from lightning_gfm.flow.matching import fit_field
from lightning_gfm.flow.window import Window
from lightning_gfm.forecast import backtest_error, forecast
from lightning_gfm.params import ParamSpec
from lightning_gfm.trajectory import TrajectoryBuffer

FAST = dict(record_every=2, jump_every=20, window=12, trend=4, fit_steps=10, fit_batch=512, eval_batches=2)
DEADLINE = 90  # seconds a spawned pair may take before the test calls it a hang


# ---------------------------------------------------------------------------------------------- Lightning
class _NoBroadcast(GFMCallback):
    """GFM without the final safety broadcast: agreement must come from the sharded work itself."""

    def _sync_weights(self, trainer):
        pass


class _DumpRank(pl.Callback):
    """Runs inside each spawned worker: writes what that rank ended with to ``out_dir/rank{r}.pt``."""

    def __init__(self, out_dir, fail_rank=None):
        self.out_dir = str(out_dir)
        self.fail_rank = fail_rank
        self.widths = []

    def setup(self, trainer, pl_module, stage):
        # the default "file_descriptor" strategy can fail to share tensors back to the parent in small sandboxes
        mp.set_sharing_strategy("file_system")
        real, widths, fail = gfm_callback.forecast, self.widths, trainer.global_rank == self.fail_rank

        def spy(*args, index=None, **kwargs):  # the callback's own forecast call: record the slice it integrates
            if fail:
                raise RuntimeError("injected failure on one rank")
            widths.append(None if index is None else (int(index[0]), int(index[-1]) + 1))
            return real(*args, index=index, **kwargs)

        gfm_callback.forecast = spy

    def on_fit_end(self, trainer, pl_module):
        gfm = next(c for c in trainer.callbacks if isinstance(c, GFMCallback))
        torch.save(
            {
                "rank": trainer.global_rank,
                "world_size": trainer.world_size,
                "strategy": type(trainer.strategy).__name__,
                "weights": torch.cat([p.detach().reshape(-1) for p in pl_module.parameters()]).clone(),
                "field": torch.cat([p.detach().reshape(-1) for p in gfm.field.parameters()]).clone(),
                "decisions": [(j.step, j.accepted, j.horizon, j.outcome) for j in gfm.jumps],
                "metrics": [(j.metric_before, j.metric_after, j.candidates) for j in gfm.jumps],
                "fit": [(j.fit_loss, j.backtest_fitted, j.backtest_prior) for j in gfm.jumps],
                "buffer_steps": gfm.buffer.steps,
                "slices": self.widths,
                "n_params": sum(p.numel() for p in pl_module.parameters()),
            },
            pathlib.Path(self.out_dir) / f"rank{trainer.global_rank}.pt",
        )


def _fit_ddp_spawn(tmp_path, callbacks, **kwargs):
    previous = mp.get_sharing_strategy()
    mp.set_sharing_strategy("file_system")
    try:
        pl.seed_everything(0, verbose=False)
        trainer = tiny_trainer(tmp_path, callbacks, strategy="ddp_spawn", devices=2, accelerator="cpu", **kwargs)
        trainer.fit(DigitsModule())
    finally:
        mp.set_sharing_strategy(previous)


@pytest.mark.timeout(120)
def test_ddp_ranks_agree_and_share_the_forecast(tmp_path):
    _fit_ddp_spawn(tmp_path, [_NoBroadcast(overhead=None, **FAST), _DumpRank(tmp_path)], max_steps=50)
    r0 = torch.load(tmp_path / "rank0.pt", weights_only=True)
    r1 = torch.load(tmp_path / "rank1.pt", weights_only=True)
    assert (r0["rank"], r1["rank"]) == (0, 1)
    assert r0["world_size"] == r1["world_size"] == 2
    assert r0["strategy"] == "DDPStrategy"
    assert r0["decisions"] == r1["decisions"]
    assert [d[0] for d in r0["decisions"]] == [20, 40], r0["decisions"]
    assert r0["metrics"] == r1["metrics"]  # the candidates' metric is reduced over ranks
    assert r0["fit"] == r1["fit"]  # fit loss averaged, backtest errors summed over the ranks' slices
    assert r0["buffer_steps"] == r1["buffer_steps"]
    assert torch.equal(r0["field"], r1["field"])  # averaged gradients: one field on every rank
    assert torch.equal(r0["weights"], r1["weights"])  # without the safety broadcast
    # each rank integrated only its own half of the scalars, once per attempt
    n = r0["n_params"]
    assert r0["slices"] == [rank_slice(n, 0, 2)] * 2 and r1["slices"] == [rank_slice(n, 1, 2)] * 2


@pytest.mark.timeout(120)
def test_ddp_ranks_agree_with_the_meta_field_beside_the_prior(tmp_path):
    from lightning_gfm.fields import save_field
    from lightning_gfm.flow.meta import MetaConfig, MetaField

    torch.manual_seed(0)
    path = save_field(MetaField(MetaConfig()), tmp_path / "meta.safetensors")
    kwargs = {**FAST, "fit_steps": 0, "eval_batches": 1}
    gfm = _NoBroadcast(overhead=None, field=path, **kwargs)
    _fit_ddp_spawn(tmp_path, [gfm, _DumpRank(tmp_path)], max_steps=60)
    r0 = torch.load(tmp_path / "rank0.pt", weights_only=True)
    r1 = torch.load(tmp_path / "rank1.pt", weights_only=True)
    assert r0["decisions"] == r1["decisions"] and r0["metrics"] == r1["metrics"]
    # every attempt has at least 10 snapshots, enough for the meta field's 8: the attempt's points, shared by both
    # paths, were all evaluated, the meta field's (the last half) reaching past the prior's
    n = gfm.n_candidates
    assert r0["metrics"] and all(len(c) == n for _, _, c in r0["metrics"])
    assert any(max(h for h, _ in c[n // 2 :]) > max(h for h, _ in c[: n // 2]) for _, _, c in r0["metrics"])
    assert torch.equal(r0["weights"], r1["weights"])  # without the safety broadcast


class _SpikeNoBroadcast(_NoBroadcast):
    """A forecaster whose one candidate lands far off, so every attempt rolls back; no safety broadcast."""

    def forecast_path(self, trainer, pl_module, win, horizons):
        from lightning_gfm.forecast import ForecastPath

        w = win.w[-1].float().to(pl_module.device)
        far = w + 3.0 * torch.sign(torch.sin(torch.arange(w.numel(), dtype=torch.float32) + 1.0))
        return ForecastPath([0, horizons[-1]], torch.stack([w, far]), {}, 0.0), {}


@pytest.mark.timeout(120)
def test_ddp_rollbacks_and_the_budget_agree_across_ranks(tmp_path):
    # a budget that is set (its decisions are agreed by a collective) but large enough to allow every attempt
    gfm = _SpikeNoBroadcast(overhead=100.0, record_every=2, jump_every=20, window=12, trend=4, eval_batches=2)
    _fit_ddp_spawn(tmp_path, [gfm, _DumpRank(tmp_path)], max_steps=45)
    r0 = torch.load(tmp_path / "rank0.pt", weights_only=True)
    r1 = torch.load(tmp_path / "rank1.pt", weights_only=True)
    assert r0["decisions"] == r1["decisions"] and len(r0["decisions"]) == 2
    assert not any(accepted for _, accepted, _, _ in r0["decisions"])
    assert repr(r0["metrics"]) == repr(r1["metrics"])  # the same reduced evaluations on both ranks
    assert torch.equal(r0["weights"], r1["weights"])  # the exact rollbacks kept the ranks identical, unbroadcast


class _UnevenValidation(DigitsModule):
    """Each rank reads its own validation loader: one batch on rank 0, two on rank 1 (no distributed sampler)."""

    def val_dataloader(self):
        x, y = self.val_data
        n = 100 if self.global_rank == 0 else 200
        return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x[:n], y[:n]), batch_size=128)


@pytest.mark.timeout(120)
def test_ddp_ranks_with_uneven_validation_batches_evaluate_alike(tmp_path):
    # rank 0 alone could not screen (one batch) while rank 1 would: their reductions would no longer pair up and
    # the fit would hang. The ranks agree on the smallest count, so both evaluate one batch, without a screen.
    previous = mp.get_sharing_strategy()
    mp.set_sharing_strategy("file_system")
    try:
        pl.seed_everything(0, verbose=False)
        gfm = _NoBroadcast(overhead=None, **FAST)
        trainer = tiny_trainer(
            tmp_path,
            [gfm, _DumpRank(tmp_path)],
            strategy="ddp_spawn",
            devices=2,
            max_steps=45,
            use_distributed_sampler=False,
        )
        trainer.fit(_UnevenValidation())
    finally:
        mp.set_sharing_strategy(previous)
    r0 = torch.load(tmp_path / "rank0.pt", weights_only=True)
    r1 = torch.load(tmp_path / "rank1.pt", weights_only=True)
    assert len(r0["decisions"]) == 2 and r0["decisions"] == r1["decisions"]
    assert r0["metrics"] == r1["metrics"]
    assert all(before is not None for before, _, _ in r0["metrics"])  # no screen: the current weights in full
    assert torch.equal(r0["weights"], r1["weights"])  # without the safety broadcast


@pytest.mark.timeout(120)
def test_ddp_rank_failure_stops_every_rank(tmp_path):
    with pytest.raises(Exception, match="ranks failed during the sharded forecast"):
        _fit_ddp_spawn(tmp_path, [GFMCallback(overhead=None, **FAST), _DumpRank(tmp_path, fail_rank=1)], max_steps=25)
    assert not (tmp_path / "rank0.pt").exists()  # no rank went on training alone


# ------------------------------------------------------------------------------------------------ helpers
def test_rank_slices_partition_the_scalars():
    for n in (0, 1, 7, 10, 1001):
        for world in (1, 2, 3, 8):
            slices = [rank_slice(n, r, world) for r in range(world)]
            assert slices[0][0] == 0 and slices[-1][1] == n
            assert all(a[1] == b[0] for a, b in zip(slices, slices[1:], strict=False))
            sizes = [hi - lo for lo, hi in slices]
            assert max(sizes) - min(sizes) <= 1
    with pytest.raises(ValueError, match="rank"):
        rank_slice(10, 2, 2)


def _window(p_in=12, p_out=20, steps=60, every=5):
    """A real Adam trajectory of a small linear model (the same on every process)."""
    torch.manual_seed(0)
    model = torch.nn.Linear(p_in, p_out)
    x, y = torch.randn(256, p_in), torch.randn(256, p_out)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    spec = ParamSpec.from_module(model, opt)
    dyn = dynamics_for(opt, spec)
    buf = TrajectoryBuffer(24)
    for s in range(1, steps + 1):
        opt.zero_grad()
        torch.nn.functional.mse_loss(model(x), y).backward()
        opt.step()
        if s % every == 0:
            buf.append(take_snapshot(opt, spec, dyn.state_names, s))
    return Window.from_buffer(buf, spec, dyn.state_names), dyn, opt


def _field(win, dyn, shard=None, steps=8):
    torch.manual_seed(0)
    field = GradientField(FieldConfig(span=4))
    opt = torch.optim.Adam(field.parameters(), lr=3e-3)
    shard = shard or Shard(win.P)
    fit_field(field, opt, win, dyn, steps=steps, batch=shard.batch(256), seed=shard.seed(0), **_fit_kwargs(shard))
    return field


def _fit_kwargs(shard):
    return {"index_range": shard.index_range, "grad_sync": shard.grad_sync}


def test_union_of_slices_is_the_full_forecast():
    win, dyn, opt = _window()
    field = _field(win, dyn)
    lr_steps = lr_by_step(future_learning_rates(opt, None, 0), 20, 1)
    full = forecast(field, win, dyn, lr_steps, [5, 20])
    parts = [
        forecast(field, win, dyn, lr_steps, [5, 20], index=torch.arange(*rank_slice(win.P, r, 3))) for r in range(3)
    ]
    torch.testing.assert_close(torch.cat([p.weights for p in parts], dim=1), full.weights, rtol=1e-6, atol=1e-7)
    for name in full.state:
        torch.testing.assert_close(torch.cat([p.state[name] for p in parts], dim=1), full.state[name])


def test_single_process_shard_changes_nothing():
    win, dyn, _ = _window()
    shard = Shard(win.P)
    assert not shard.active and shard.index is None and shard.grad_sync is None and shard.backtest_kwargs == {}
    assert shard.batch(100) == 100 and shard.seed(3) == 3 and shard.mean(torch.nn.Linear(1, 1), 0.5) == 0.5
    plain = _field(win, dyn)
    assert torch.equal(torch.cat([p.reshape(-1) for p in _field(win, dyn, shard).parameters()]),
                       torch.cat([p.reshape(-1) for p in plain.parameters()]))  # fmt: skip
    assert agree(True) and not agree(False)


def _worker(rank, world, init_file, scenario, out_dir):
    """One rank of a spawned gloo pair: runs ``scenario`` and writes its outcome (or its error) to a file."""
    torch.set_num_threads(1)

    def run():
        dist.init_process_group(
            "gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
            timeout=datetime.timedelta(seconds=30),
        )  # fmt: skip
        return _SCENARIOS[scenario.split(":")[0]](rank, world, scenario)

    save_rank_outcome(rank, out_dir, run)


def _sharded_attempt(rank, world, scenario):
    win, dyn, opt = _window()
    shard = Shard.current(win.P)
    fail = scenario.split(":")[1] if ":" in scenario and rank == 1 else None

    def boom(*args, **kwargs):
        raise RuntimeError(f"injected failure in the {fail}")

    torch.manual_seed(0)
    field = GradientField(FieldConfig(span=4))
    field_opt = torch.optim.Adam(field.parameters(), lr=3e-3)
    steps = {"n": 0}

    def grad_sync(module, stop):
        steps["n"] += 1
        if fail == "fit" and steps["n"] == 3:  # a failure in the middle of the fit, before this step's collective
            boom()
        return shard.grad_sync(module, stop)

    with shard.phase("fit", fit_message_size(field)):
        report = fit_field(field, field_opt, win, dyn, steps=8, batch=shard.batch(256), seed=shard.seed(0),
                           index_range=shard.index_range, grad_sync=grad_sync)  # fmt: skip
        fit_loss = shard.mean(field, report.loss_end)
    kwargs = shard.backtest_kwargs
    if fail == "backtest":
        kwargs = {**kwargs, "reduce": boom}
    with shard.phase("backtest", 2):
        err = backtest_error(field, win, dyn, 2, max_scalars=100, **kwargs)
    lr_steps = lr_by_step(future_learning_rates(opt, None, 0), 20, 1)
    with shard.phase("forecast", 0):
        path = (boom if fail == "forecast" else forecast)(field, win, dyn, lr_steps, [5, 20], index=shard.index)
    path = shard.gather(path)
    return {
        "field": torch.cat([p.detach().reshape(-1) for p in field.parameters()]),
        "steps": report.steps,
        "fit_loss": fit_loss,
        "backtest": err,
        "backtest_single": backtest_error(field, win, dyn, 2, max_scalars=100),
        "path": path,
        "single": forecast(field, win, dyn, lr_steps, [5, 20]),
    }


def _gather_uneven(rank, world, scenario):
    # 5 scalars over 2 ranks: slices of 3 and 2, padded for the collective and trimmed after it
    from lightning_gfm.forecast import ForecastPath

    lo, hi = rank_slice(5, rank, world)
    cols = torch.arange(lo, hi, dtype=torch.float32)
    local = ForecastPath([0, 1], torch.stack([cols, cols + 10]), {"m": torch.stack([-cols, -cols])}, 0.0)
    return {"path": gather_path(local, 5), "agree": agree(rank == 0)}


_SCENARIOS = {"attempt": _sharded_attempt, "gather": _gather_uneven}


def _spawn_pair(tmp_path, scenario):
    return run_two_ranks(_worker, lambda r: (r, 2, str(tmp_path / "init"), scenario, str(tmp_path)), tmp_path, DEADLINE)


@pytest.mark.timeout(120)
def test_sharded_fit_backtest_and_forecast_equal_the_single_process_ones(tmp_path):
    r0, r1 = _spawn_pair(tmp_path, "attempt")
    for r in (r0, r1):
        assert "error" not in r and "shard_failure" not in r, r
    assert r0["steps"] == r1["steps"] == 8
    assert torch.equal(r0["field"], r1["field"])  # averaged gradients keep one field on every rank
    assert r0["fit_loss"] == r1["fit_loss"]
    assert r0["backtest"] == r1["backtest"]
    assert r0["backtest"] == pytest.approx(r0["backtest_single"], rel=1e-5)  # sum of the slices' squares
    assert torch.equal(r0["path"].weights, r1["path"].weights)  # all_gather: bit-identical on every rank
    for r in (r0, r1):
        assert r["path"].horizons == r["single"].horizons == [0, 5, 20]
        torch.testing.assert_close(r["path"].weights, r["single"].weights, rtol=1e-6, atol=1e-7)
        for name in r["single"].state:
            torch.testing.assert_close(r["path"].state[name], r["single"].state[name], rtol=1e-6, atol=1e-10)


@pytest.mark.timeout(120)
def test_gather_path_handles_uneven_slices_and_agree_votes(tmp_path):
    r0, r1 = _spawn_pair(tmp_path, "gather")
    for r in (r0, r1):
        assert "error" not in r, r
        cols = torch.arange(5, dtype=torch.float32)
        assert torch.equal(r["path"].weights, torch.stack([cols, cols + 10]))
        assert torch.equal(r["path"].state["m"], torch.stack([-cols, -cols]))
        assert r["agree"] is False  # rank 1 voted no


@pytest.mark.timeout(120)
@pytest.mark.parametrize("phase", ["fit", "backtest", "forecast"])
def test_a_failing_rank_stops_every_rank_without_hanging(tmp_path, phase):
    r0, r1 = _spawn_pair(tmp_path, f"attempt:{phase}")
    for r in (r0, r1):
        assert "error" not in r, r["error"]
        assert r["shard_failure"] == r0["shard_failure"]  # the same error on every rank
    assert f"1 of 2 ranks failed during the sharded {phase}" in r0["shard_failure"]
