"""GFMCallback inside real Lightning fits: step counting, param groups, schedulers, jumps, rollback, resume,
pickling, logging, evaluation without a validation loop, optimizer families, state policies and field files."""

import copy
import csv
import math
import pickle
import warnings
from collections import Counter

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.plugins import MixedPrecision
from models import DigitsModule, tiny_trainer

from lightning_gfm import GFMCallback, JumpOutcome
from lightning_gfm.dynamics import future_learning_rates
from lightning_gfm.fields import load_field, save_field
from lightning_gfm.flow.field import FieldConfig, GradientField

FAST = dict(record_every=2, jump_every=20, window=12, trend=4, fit_steps=10, fit_batch=512, eval_batches=2)


def _fit(tmp_path, callbacks, module=None, seed=0, **trainer_kwargs):
    pl.seed_everything(seed, verbose=False)
    model = DigitsModule() if module is None else module
    trainer_kwargs.setdefault("max_steps", 60)
    trainer = tiny_trainer(tmp_path, callbacks, **trainer_kwargs)
    trainer.fit(model)
    return trainer, model


def _flat(model):
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    """One standard fit (Adam, 80 steps) shared by the read-only tests below."""
    cb = GFMCallback(overhead=None, **FAST)
    trainer, model = _fit(tmp_path_factory.mktemp("fitted"), [cb], max_steps=80)
    return cb, trainer, model


# --------------------------------------------------------------------------------------------- recording
class _RecordSpy(GFMCallback):
    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.calls = Counter()

    def should_record(self, step):
        self.calls[step] += 1
        return super().should_record(step)


def test_recording_counts_optimizer_steps_not_batches(tmp_path):
    cb = _RecordSpy(overhead=None, record_every=2, jump_every=10_000, window=12)
    trainer, _ = _fit(tmp_path, [cb], max_steps=30, accumulate_grad_batches=2)
    assert trainer.global_step == 30
    # every optimizer step is seen exactly once, although each spans two batches
    assert set(cb.calls) - {0} == set(range(1, 31)), sorted(cb.calls)
    assert all(n == 1 for n in cb.calls.values()), cb.calls
    steps = cb.buffer.steps
    assert len(steps) == len(set(steps)) == 12
    assert all(s % 2 == 0 for s in steps), steps
    assert steps == list(range(8, 31, 2))


# ---------------------------------------------------------------------------------------- param groups
class _TwoGroups(DigitsModule):
    def configure_optimizers(self):
        return torch.optim.Adam(
            [
                {"params": self.net[0].parameters(), "lr": 1e-3},
                {"params": self.net[2].parameters(), "lr": 3e-3},
            ]
        )


def test_param_groups_lrs_and_frozen_parameter_not_tracked(tmp_path):
    pl.seed_everything(0, verbose=False)
    model = _TwoGroups()
    model.net[2].bias.requires_grad_(False)
    frozen = model.net[2].bias.detach().clone()
    cb = GFMCallback(overhead=None, **FAST)
    _fit(tmp_path, [cb], module=model, max_steps=44)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert cb._spec.numel == trainable == 64 * 64 + 64 + 64 * 10
    assert "net.2.bias" not in cb._spec.names
    assert cb.buffer[-1].weights.numel() == trainable
    for i in range(len(cb.buffer)):
        assert cb.buffer[i].lrs.tolist() == [1e-3, 3e-3]
    assert cb._dyn.hyper["beta1"] == [0.9, 0.9]
    assert cb.jumps, "no jump attempted"
    assert torch.equal(model.net[2].bias, frozen), "a jump moved a frozen parameter"


# ------------------------------------------------------------------------------------------- schedulers
_SCHEDULERS = {
    "cosine": lambda opt: torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=10),
    "step": lambda opt: torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5),
    "onecycle": lambda opt: torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=[0.5, 1.0], total_steps=20),
    "lambda": lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lambda k: 1.0 / (1 + k)),
}


@pytest.mark.parametrize("name", sorted(_SCHEDULERS))
def test_future_learning_rates_match_real_steps_and_touch_nothing(name):
    w = [torch.nn.Parameter(torch.ones(3)), torch.nn.Parameter(torch.ones(2))]
    opt = torch.optim.SGD([{"params": [w[0]], "lr": 0.1}, {"params": [w[1]], "lr": 0.2}], momentum=0.9)
    sched = _SCHEDULERS[name](opt)
    for _ in range(3):  # start mid-schedule
        opt.step()
        sched.step()
    sched_state = copy.deepcopy(sched.state_dict())
    opt_state = copy.deepcopy(opt.state_dict())
    lrs_now = [g["lr"] for g in opt.param_groups]

    rows = future_learning_rates(opt, sched, 5)

    assert rows.shape == (6, 2) and rows.dtype == torch.float64
    assert sched.state_dict() == sched_state
    assert opt.state_dict()["param_groups"] == opt_state["param_groups"]
    assert [g["lr"] for g in opt.param_groups] == lrs_now
    expected = [lrs_now]
    for _ in range(5):
        opt.step()
        sched.step()
        expected.append([g["lr"] for g in opt.param_groups])
    assert rows.tolist() == expected


# ------------------------------------------------------------------------------------------------ jumps
def test_jumps_happen_and_are_recorded(fitted):
    cb, _, _ = fitted
    assert [j.step for j in cb.jumps] == [20, 40, 60]
    for j in cb.jumps:
        for key in ("step", "horizon", "accepted", "metric_before", "metric_after", "outcome", "seconds"):
            assert hasattr(j, key)
        assert math.isfinite(j.metric_before) and j.seconds > 0
        assert j.outcome in {o.value for o in JumpOutcome}
        if j.accepted:
            assert j.outcome == "accepted"
            assert j.horizon > 0
            assert j.metric_after < j.metric_before
            assert (j.horizon, j.metric_after) in j.candidates
        else:
            assert j.horizon == 0
            assert j.metric_after == j.metric_before
    assert any(j.accepted for j in cb.jumps)


class _RollbackSpy(GFMCallback):
    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.checked = []

    def _jump(self, trainer, pl_module, step):
        opt = trainer.optimizers[0]
        params = list(pl_module.parameters())
        before = [p.detach().clone() for p in params]
        ids = [id(p) for p in params]
        state_ids = {id(p): {k: id(v) for k, v in opt.state[p].items()} for p in params}
        opt_before = copy.deepcopy(opt.state_dict())
        buffer_before = (self.buffer.steps, self.buffer.weights().clone())
        super()._jump(trainer, pl_module, step)
        params_after = list(pl_module.parameters())
        opt_after = opt.state_dict()
        self.checked.append(
            dict(
                same_ids=[id(p) for p in params_after] == ids
                and all(p is q for p, q in zip(params, opt_params(opt), strict=True)),
                same_values=all(torch.equal(a, b.detach()) for a, b in zip(before, params_after, strict=True)),
                same_state=_state_equal(opt_before, opt_after),
                same_state_ids=state_ids == {id(p): {k: id(v) for k, v in opt.state[p].items()} for p in params},
                same_buffer=self.buffer.steps == buffer_before[0]
                and torch.equal(self.buffer.weights(), buffer_before[1]),
            )
        )


def opt_params(opt):
    return [p for g in opt.param_groups for p in g["params"]]


def _state_equal(a, b):
    if a["param_groups"] != b["param_groups"] or a["state"].keys() != b["state"].keys():
        return False
    for k in a["state"]:
        sa, sb = a["state"][k], b["state"][k]
        if sa.keys() != sb.keys():
            return False
        for name in sa:
            x, y = sa[name], sb[name]
            if isinstance(x, torch.Tensor):
                if not (isinstance(y, torch.Tensor) and x.dtype == y.dtype and torch.equal(x, y)):
                    return False
            elif x != y:
                return False
    return True


def test_rollback_is_bit_exact_and_keeps_identity(tmp_path):
    # min_delta=10 asks a jump to cut the loss by 1000 %: every attempt must be rolled back
    cb = _RollbackSpy(overhead=None, **{**FAST, "min_delta": 10.0})  # judged where it lands
    _fit(tmp_path, [cb], max_steps=60)
    assert [j.outcome for j in cb.jumps] == ["rolled_back", "rolled_back"]
    assert all(len(j.candidates) > 0 for j in cb.jumps)  # candidates were really written and evaluated
    assert len(cb.checked) == 3  # the attempt at the last step has no horizon left and changes nothing either
    for check in cb.checked:
        assert all(check.values()), check


# ----------------------------------------------------------------------------------------------- resume
RESUME = dict(record_every=2, jump_every=12, window=12, trend=4, fit_steps=10, fit_batch=512, eval_batches=2)


class _Crash(pl.Callback):
    def __init__(self, epoch):
        self.epoch = epoch

    def on_train_epoch_start(self, trainer, pl_module):
        if trainer.current_epoch == self.epoch:
            raise RuntimeError(f"simulated crash at epoch {self.epoch}")


def _resume_run(tmp_path, callbacks, ckpt_path=None, **trainer_kwargs):
    pl.seed_everything(0, verbose=False)
    model = DigitsModule(shuffle=False)
    trainer = tiny_trainer(tmp_path, callbacks, max_epochs=4, **trainer_kwargs)
    trainer.fit(model, ckpt_path=ckpt_path)
    return trainer, model


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    cb = GFMCallback(overhead=None, **RESUME)
    trainer, model = _resume_run(tmp_path_factory.mktemp("uninterrupted"), [cb])
    assert trainer.global_step == 72
    return cb, _flat(model)


def _decisions(cb):
    return [(j.step, j.accepted, j.horizon) for j in cb.jumps]


@pytest.mark.parametrize("crash_epoch", [1, 2, 3])
def test_resume_after_crash_equals_uninterrupted_run(tmp_path, uninterrupted, crash_epoch):
    cb_a, weights_a = uninterrupted
    assert len(cb_a.jumps) >= 3 and any(j.accepted for j in cb_a.jumps)

    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", filename="{epoch}", every_n_epochs=1, save_top_k=-1)
    with pytest.raises(RuntimeError, match="simulated crash"):
        _resume_run(
            tmp_path, [GFMCallback(overhead=None, **RESUME), _Crash(crash_epoch), ckpt], enable_checkpointing=True
        )
    path = tmp_path / "ckpt" / f"epoch={crash_epoch - 1}.ckpt"
    assert path.is_file(), sorted(p.name for p in (tmp_path / "ckpt").iterdir())

    cb_b = GFMCallback(overhead=None, **RESUME)
    trainer, model = _resume_run(tmp_path, [cb_b], ckpt_path=str(path))  # Lightning loads with weights_only=True
    assert trainer.global_step == 72
    assert _decisions(cb_b) == _decisions(cb_a)
    assert cb_b.buffer.steps == cb_a.buffer.steps
    torch.testing.assert_close(_flat(model), weights_a, rtol=0, atol=1e-6)


# --------------------------------------------------------------------------------------------- pickling
def test_pickle_fresh_and_fitted_callback(fitted):
    fresh = pickle.loads(pickle.dumps(GFMCallback(overhead=None, record_every=3)))
    assert fresh.record_every == 3 and fresh.jumps == [] and len(fresh.buffer) == 0

    cb, _, _ = fitted
    clone = pickle.loads(pickle.dumps(cb))
    assert clone.buffer.steps == cb.buffer.steps
    assert torch.equal(clone.buffer.weights(), cb.buffer.weights())
    assert [(j.step, j.accepted, j.horizon) for j in clone.jumps] == _decisions(cb)
    for (k, v), (k2, v2) in zip(clone.field.state_dict().items(), cb.field.state_dict().items(), strict=True):
        assert k == k2 and torch.equal(v, v2)


def test_state_dict_round_trip_weights_only(fitted, tmp_path):
    cb, _, _ = fitted
    path = tmp_path / "gfm.pt"
    torch.save(cb.state_dict(), path)
    state = torch.load(path, weights_only=True)
    fresh = GFMCallback(overhead=None, **FAST)
    fresh.load_state_dict(state)
    # the window waits for the ring the memory plan allocates when fit starts (test_memory_plan.py resumes it)
    snaps, want_snaps = fresh.state_dict()["buffer"]["snapshots"], cb.state_dict()["buffer"]["snapshots"]
    assert [s["step"] for s in snaps] == cb.buffer.steps
    assert all(torch.equal(a["weights"], b["weights"]) for a, b in zip(snaps, want_snaps, strict=True))
    assert fresh._last_step == cb._last_step == 80
    got = [(j.step, j.accepted, j.horizon, j.outcome, j.metric_before, j.metric_after) for j in fresh.jumps]
    want = [(j.step, j.accepted, j.horizon, j.outcome, j.metric_before, j.metric_after) for j in cb.jumps]
    assert got == want


# ---------------------------------------------------------------------------------------------- logging
def test_csv_logger_receives_gfm_metrics(tmp_path):
    logger = CSVLogger(save_dir=tmp_path, name="csv")
    cb = GFMCallback(overhead=None, **FAST)
    _fit(tmp_path, [cb], max_steps=60, logger=logger)
    with open(f"{logger.log_dir}/metrics.csv") as f:
        rows = list(csv.DictReader(f))
    assert {"gfm/accepted", "gfm/jumps_accepted", "gfm/horizon", "gfm/trend", "gfm/metric_before"} <= set(rows[0])
    logged = [r for r in rows if r["gfm/accepted"] != ""]
    assert [int(r["step"]) for r in logged] == [j.step for j in cb.jumps]
    assert float(logged[-1]["gfm/jumps_accepted"]) == sum(j.accepted for j in cb.jumps)


class _RefusesGFM(CSVLogger):
    def log_metrics(self, metrics, step=None):
        if any(k.startswith("gfm/") for k in metrics):
            raise RuntimeError("this logger refuses gfm metrics")
        super().log_metrics(metrics, step)


def test_failing_logger_never_stops_training(tmp_path):
    cb = GFMCallback(overhead=None, **FAST)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer, _ = _fit(tmp_path, [cb], max_steps=60, logger=_RefusesGFM(save_dir=tmp_path, name="bad"))
    assert trainer.global_step == 60
    assert len(cb.jumps) == 2
    ours = [w for w in caught if "GFMCallback: logger _RefusesGFM failed" in str(w.message)]
    assert len(ours) == 1, [str(w.message) for w in caught]  # warned once, not once per jump


# -------------------------------------------------------------------------------------- no validation
@pytest.mark.parametrize("monitor", ["train_loss", "val_loss"])
def test_no_validation_loop_evaluates_on_training_batches(tmp_path, monitor):
    # "val_loss" is not logged by training_step: the returned loss decides instead
    cb = GFMCallback(overhead=None, **{**FAST, "monitor": monitor})
    trainer, _ = _fit(tmp_path, [cb], max_steps=60, limit_val_batches=0)
    assert cb._eval_cache is None  # dropped at fit end
    assert len(cb.jumps) == 2
    assert all(math.isfinite(j.metric_before) for j in cb.jumps)
    # a cross-entropy over 10 classes, evaluated on training batches (log 10 = 2.3 at chance)
    assert all(0 < j.metric_before < 3 for j in cb.jumps)


# ---------------------------------------------------------------------------------- optimizer families
@pytest.mark.parametrize(
    ("optimizer", "lr", "schedule"),
    [
        ("sgd", 0.1, None),
        ("momentum", 0.05, None),
        ("momentum", 0.05, "cosine"),
        ("nesterov", 0.05, None),
        ("adam", 1e-3, None),
        ("adamw", 1e-3, None),
        ("rmsprop", 1e-3, None),
    ],
)
def test_optimizer_families_end_to_end(tmp_path, optimizer, lr, schedule):
    cb = GFMCallback(overhead=None, **FAST)
    pl.seed_everything(0, verbose=False)
    model = DigitsModule(optimizer=optimizer, lr=lr, schedule=schedule)
    trainer, _ = _fit(tmp_path, [cb], module=model, max_steps=60)
    assert trainer.global_step == 60
    assert len(cb.jumps) == 2, cb.jumps
    for j in cb.jumps:
        assert math.isfinite(j.metric_before) and math.isfinite(j.metric_after), j
        assert all(math.isfinite(m) for _, m in j.candidates), j
    assert all(torch.isfinite(p).all() for p in trainer.lightning_module.parameters())
    lrs = cb.buffer.lrs()[:, 0].tolist()
    if schedule == "cosine":
        assert all(a > b for a, b in zip(lrs, lrs[1:], strict=False)), lrs
    else:
        assert lrs == [lr] * len(lrs)


# -------------------------------------------------------------------------------------- state policies
class _StateSpy(GFMCallback):
    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.events = []
        self._check_next = None

    def _jump(self, trainer, pl_module, step):
        opt = trainer.optimizers[0]
        before = {p: {k: v.clone() for k, v in opt.state[p].items()} for p in self._spec.params}
        n = len(self.jumps)
        super()._jump(trainer, pl_module, step)
        if len(self.jumps) > n and self.jumps[-1].accepted:
            after = {p: dict(opt.state.get(p, {})) for p in self._spec.params}
            self.events.append(
                dict(
                    step=step,
                    empty=all(not s for s in after.values()),
                    unchanged=all(
                        after[p].keys() == before[p].keys()
                        and all(torch.equal(after[p][k], before[p][k]) for k in before[p])
                        for p in self._spec.params
                    ),
                    buffer=self.buffer.steps,
                    horizon=self.jumps[-1].horizon,
                )
            )
            self._check_next = step + 1

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if self._check_next == trainer.global_step:
            opt = trainer.optimizers[0]
            self.events[-1]["recreated"] = all("exp_avg" in opt.state.get(p, {}) for p in self._spec.params)
            self.events[-1]["adam_step"] = int(opt.state[self._spec.params[0]]["step"])
            self._check_next = None
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)


@pytest.mark.parametrize("policy", ["keep", "reset", "forecast"])
def test_optimizer_state_policies(tmp_path, policy):
    cb = _StateSpy(overhead=None, **{**FAST, "optimizer_state": policy})
    trainer, _ = _fit(tmp_path, [cb], max_steps=60)
    assert trainer.global_step == 60
    assert cb.events, [j.outcome for j in cb.jumps]
    for e in cb.events:
        assert e["recreated"], e
        if policy == "keep":
            assert e["unchanged"], e
        elif policy == "reset":
            assert e["empty"], e
            assert e["buffer"] == [e["step"]], e  # the old path was dropped, the new weights recorded
            assert e["adam_step"] == 1, e  # Adam started afresh at the new weights
        else:
            assert not e["empty"] and not e["unchanged"], e
    if policy == "forecast":
        # the state the forecast carried `horizon` steps ahead comes with its step counter, jump after jump (E50)
        ahead = [sum(e["horizon"] for e in cb.events[: i + 1]) for i in range(len(cb.events))]
        assert all(e["horizon"] > 0 for e in cb.events)
        assert [e["adam_step"] for e in cb.events] == [e["step"] + 1 + a for e, a in zip(cb.events, ahead, strict=True)]


# ------------------------------------------------------------------------------------------ field files
class _FieldSpy(GFMCallback):
    def on_fit_start(self, trainer, pl_module):
        super().on_fit_start(trainer, pl_module)
        self.start_field = {k: v.detach().clone() for k, v in self.field.state_dict().items()}


def test_a_loaded_field_is_backtested_against_the_callbacks_own_prior(tmp_path):
    # a field trained with another anchor keeps it, but the prior it must beat is the callback's (trend, 6 here)
    torch.manual_seed(0)
    other = GradientField(FieldConfig(anchor="state", span=12.0))
    torch.nn.init.normal_(other.out.weight, std=0.1)  # not the prior: its output varies
    path = save_field(other, tmp_path / "state.safetensors")
    pl.seed_everything(0, verbose=False)
    cb = GFMCallback(overhead=None, **{**FAST, "fit_steps": 0, "trend": 6}, field=path)
    tiny_trainer(tmp_path, [cb], max_steps=60).fit(DigitsModule())
    assert cb.field_config.anchor == "state" and cb.prior_config.anchor == "trend" and cb.prior_config.trend == 6
    assert cb._prior("cpu").config == cb.prior_config
    assert cb.min_snapshots == 5 + 3 + 2  # the trend prior's earliest anchor (trend - 1 = 5), not the field's (3)
    tried = [j for j in cb.jumps if math.isfinite(j.backtest_prior)]
    assert tried and all(math.isfinite(j.backtest_fitted) for j in tried)


def test_saved_field_is_the_starting_field(fitted, tmp_path):
    cb, _, _ = fitted
    path = tmp_path / "field.safetensors"
    cb.save_field(path, trained_on="digits")
    saved = load_field(path).state_dict()

    new = _FieldSpy(overhead=None, **{**FAST, "hidden": 8, "field": path})
    trainer, _ = _fit(tmp_path, [new], max_steps=44)
    assert trainer.global_step == 44
    assert new.field_config.hidden == cb.field_config.hidden != 8  # the file's config wins
    assert new.start_field.keys() == saved.keys()
    for k, v in saved.items():
        assert torch.equal(new.start_field[k], v), k
    # and the saved field is the fitted one, not the prior
    assert any(
        not torch.equal(v, w) for v, w in zip(saved.values(), new._prior("cpu").state_dict().values(), strict=True)
    )
    assert new.jumps


@pytest.mark.parametrize(
    ("precision", "buffer_dtype"), [("bf16-mixed", "float32"), ("bf16-true", "float32"), ("32-true", "bfloat16")]
)
def test_precisions_and_bf16_snapshots(tmp_path, precision, buffer_dtype):
    pl.seed_everything(0, verbose=False)
    cb = GFMCallback(
        overhead=None, record_every=5, jump_every=50, trend=4, fit_steps=10, fit_batch=512, buffer_dtype=buffer_dtype
    )
    trainer = tiny_trainer(tmp_path, [cb], max_steps=100, precision=precision)
    trainer.fit(DigitsModule())
    assert cb.jumps and all(math.isfinite(j.metric_before) for j in cb.jumps)
    assert cb.buffer.weights().dtype == torch.float32 and cb.buffer[0].weights.dtype == getattr(torch, buffer_dtype)


def test_16_mixed_with_a_real_grad_scaler_that_skips_steps(tmp_path):
    # Lightning refuses precision="16-mixed" on a CPU, but its MixedPrecision plugin with torch's CPU GradScaler
    # runs the same path as on a GPU: float16 autocast, loss scaling, optimizer steps skipped on overflow.
    pl.seed_everything(0, verbose=False)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**40)  # overflows at first: the scaler skips ~20 steps
    cb = GFMCallback(overhead=None, record_every=2, jump_every=20, window=12, trend=4, eval_batches=2)
    trainer = tiny_trainer(tmp_path, [cb], max_steps=60, plugins=[MixedPrecision("16-mixed", "cpu", scaler)])
    module = DigitsModule()
    trainer.fit(module)
    adam_steps = int(trainer.optimizers[0].state[next(module.parameters())]["step"])
    assert 0 < adam_steps < trainer.global_step  # steps were skipped, and training went on
    assert any(j.accepted for j in cb.jumps) and all(math.isfinite(j.metric_before) for j in cb.jumps)
    assert all(torch.isfinite(p).all() for p in module.parameters())


class _EpochSchedule(DigitsModule):
    def configure_optimizers(self):
        opt = torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9)
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "epoch"}}


class _LrSpy(GFMCallback):
    """Predicts the learning rates of the next steps at step 10, then records the ones really used."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.predicted, self.used = None, {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        super().on_train_batch_start(trainer, pl_module, batch, batch_idx)
        self.used[trainer.global_step] = trainer.optimizers[0].param_groups[0]["lr"]

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        if trainer.global_step == 10:
            self.predicted = self._lr_steps(trainer, 10, 40)[:, 0].tolist()


def test_epoch_interval_schedule_is_forecast_exactly(tmp_path):
    # 1100 samples / batch 64 = 18 steps per epoch: the forecast from step 10 crosses two epoch boundaries
    pl.seed_everything(0, verbose=False)
    cb = _LrSpy(overhead=None, record_every=5, jump_every=1000)
    tiny_trainer(tmp_path, [cb], max_steps=51).fit(_EpochSchedule())
    real = [cb.used[10 + s] for s in range(41)]
    assert cb.predicted == pytest.approx(real)
    assert len(set(real)) == 3  # 0.1, 0.05, 0.025: the test can see a wrong epoch boundary


def test_memory_budget_shrinks_the_buffer_and_still_jumps(tmp_path):
    from lightning_gfm.memory import estimate_bytes

    model = DigitsModule()
    n = sum(p.numel() for p in model.parameters())
    # room for 14 bfloat16 snapshots of the Adam run, not for 24 in float32 nor in bfloat16
    budget = estimate_bytes(n, 2, 14, torch.bfloat16, 1 << 20)
    cb = GFMCallback(overhead=None, **{**FAST, "window": 24}, memory_budget=budget)
    pl.seed_everything(0, verbose=False)
    tiny_trainer(tmp_path, [cb], max_steps=60).fit(model)
    assert cb.memory_plan is not None and cb.memory_plan.estimated_bytes <= budget
    assert (cb.buffer.capacity, cb.buffer.dtype) == (cb.memory_plan.window, torch.bfloat16)
    assert 8 <= cb.buffer.capacity < 24 and cb.jumps
