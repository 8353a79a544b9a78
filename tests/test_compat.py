"""Compatibility matrix (docs/compatibility.md): GFMCallback next to Lightning's callbacks, torch's lr schedulers
and torch's optimizers, each row one tiny CPU fit. Every row says what it checks: the run completes, GFM records and
jumps where it should, its snapshots keep one layout, and it stays inactive (with one warning) where it must.
"""

from __future__ import annotations

import functools
import math
import warnings

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch import callbacks as lc
from models import DigitsModule, tiny_trainer

from lightning_gfm import GFMCallback
from lightning_gfm.dynamics import AdagradDynamics, AdamaxDynamics, NAdamDynamics, RAdamDynamics

#: a short window so that a jump is attempted after a handful of snapshots
FAST = dict(record_every=2, jump_every=6, window=8, trend=3, history=2, eval_batches=2)
#: 1100 digits in batches of 128: 9 optimizer steps per epoch
SMALL = dict(hidden=16, batch_size=128)


def _fit(tmp_path, model, callbacks, **kwargs) -> pl.Trainer:
    pl.seed_everything(0, verbose=False)
    kwargs.setdefault("limit_val_batches", 2)
    trainer = tiny_trainer(tmp_path, callbacks, **kwargs)
    trainer.fit(model)
    return trainer


def _gfm(trainer: pl.Trainer) -> GFMCallback:
    return next(c for c in trainer.callbacks if isinstance(c, GFMCallback))


def _assert_consistent(cb: GFMCallback) -> None:
    """Every stored snapshot has the layout of the spec GFM tracks now."""
    groups = len(next(iter(cb._dyn.hyper.values())))
    for i in range(len(cb.buffer)):
        snap = cb.buffer[i]
        assert snap.weights.numel() == cb._spec.numel
        assert snap.lrs.numel() == groups
    assert set(cb.buffer.state_names) == set(cb._dyn.state_names)
    if len(cb.buffer):
        assert set(cb.buffer[-1].state) == set(cb._dyn.state_names)


def _assert_works(trainer: pl.Trainer, steps: int | None = None) -> GFMCallback:
    cb = _gfm(trainer)
    if steps is not None:
        assert trainer.global_step == steps
    assert cb.jumps, "GFM never attempted a jump"
    assert all(math.isfinite(j.metric_before) for j in cb.jumps)
    _assert_consistent(cb)
    return cb


# ------------------------------------------------------------------------------------- layout changes
class _Backbone(DigitsModule):
    """A backbone (the first layer) that BackboneFinetuning freezes, then unfreezes into a new param group."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.backbone = self.net[0]

    def configure_optimizers(self):
        return torch.optim.Adam([p for p in self.parameters() if p.requires_grad], lr=self.hparams.lr)


def test_backbone_finetuning_restarts_the_window_and_jumps_again(tmp_path):
    # regression: `stack expects each tensor to be equal size` once the backbone's param group was added
    finetune = lc.BackboneFinetuning(unfreeze_backbone_at_epoch=3)
    trainer = _fit(tmp_path, _Backbone(**SMALL), [finetune, GFMCallback(overhead=None, **FAST)], max_epochs=6)
    cb = _assert_works(trainer, steps=54)
    assert cb.layout_changes == 1
    assert len(trainer.optimizers[0].param_groups) == 2
    assert cb._spec.numel == sum(p.numel() for p in trainer.lightning_module.parameters())
    unfrozen_at = 3 * 9
    assert any(j.step < unfrozen_at for j in cb.jumps), "no jump before the unfreezing"
    assert any(j.step > unfrozen_at + 5 * FAST["record_every"] for j in cb.jumps), "jumps did not resume"


class _FreezeAt(pl.Callback):
    """Freezes the first layer at a step, then unfreezes it later (no new param group)."""

    def __init__(self, freeze: int, unfreeze: int) -> None:
        self.freeze, self.unfreeze = freeze, unfreeze

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step in (self.freeze, self.unfreeze):
            for p in pl_module.net[0].parameters():
                p.requires_grad_(trainer.global_step == self.unfreeze)


def test_freezing_and_unfreezing_mid_run(tmp_path):
    trainer = _fit(
        tmp_path, DigitsModule(**SMALL), [_FreezeAt(14, 32), GFMCallback(overhead=None, **FAST)], max_steps=54
    )
    cb = _assert_works(trainer, steps=54)
    assert cb.layout_changes == 2
    assert cb._spec.numel == sum(p.numel() for p in trainer.lightning_module.parameters())


def test_a_new_layout_in_a_resumed_window_is_dropped(tmp_path):
    # a window saved under one layout, resumed under another: re-recorded, never mixed
    cb = GFMCallback(overhead=None, **FAST)
    trainer = _fit(tmp_path, DigitsModule(**SMALL), [cb], max_steps=12)
    state = cb.state_dict()
    model = DigitsModule(**SMALL)
    for p in model.net[0].parameters():
        p.requires_grad_(False)
    resumed = GFMCallback(overhead=None, **FAST)
    resumed.load_state_dict(state)
    trainer = _fit(tmp_path, model, [resumed], max_steps=40)
    _assert_works(trainer, steps=40)
    assert resumed._spec.numel == sum(p.numel() for p in model.net[2].parameters())


# ----------------------------------------------------------------------------------------- callbacks
def test_gradient_accumulation_scheduler_follows_the_schedule(tmp_path):
    # regression: `upper bound and lower bound inconsistent with step sign` (a negative horizon) once the
    # accumulation doubled, because the planned total assumed the first epoch's accumulation for every epoch
    class _Totals(pl.Callback):
        def __init__(self, gfm):
            self.gfm, self.totals = gfm, []

        def on_train_batch_end(self, trainer, *args):
            self.totals.append(self.gfm._total_steps(trainer))

    gfm = GFMCallback(overhead=None, window=8, trend=3, history=2, eval_batches=2)  # the schedule derived from the plan
    totals = _Totals(gfm)
    trainer = _fit(tmp_path, DigitsModule(**SMALL), [lc.GradientAccumulationScheduler({0: 1, 4: 2}), gfm, totals],
                   max_epochs=10)  # fmt: skip
    steps = 4 * 9 + 6 * 5
    cb = _assert_works(trainer, steps=steps)
    assert set(totals.totals) == {steps}
    assert (cb.record_every, cb.jump_every) == (1, 11)
    assert all(0 < j.horizon <= steps - j.step for j in cb.jumps if j.accepted)


class _Accumulate(pl.Callback):
    """Changes ``accumulate_grad_batches`` at an epoch, as a user's own callback might."""

    def on_train_epoch_start(self, trainer, pl_module):
        trainer.accumulate_grad_batches = 1 if trainer.current_epoch < 2 else 3


def test_accumulation_changed_by_another_callback(tmp_path):
    gfm = GFMCallback(overhead=None, window=8, trend=3, history=2, eval_batches=2)
    trainer = _fit(tmp_path, DigitsModule(**SMALL), [_Accumulate(), gfm], max_epochs=6)
    steps = 2 * 9 + 4 * 3
    cb = _assert_works(trainer, steps=steps)
    assert cb._total_steps(trainer) == steps
    assert cb.jump_every == max(6, round(steps / 6))  # re-derived from the new plan (auto)
    assert all(j.step + j.horizon <= steps for j in cb.jumps)


def test_accumulation_change_keeps_intervals_given_by_the_user(tmp_path):
    gfm = GFMCallback(overhead=None, **FAST)
    trainer = _fit(tmp_path, DigitsModule(**SMALL), [_Accumulate(), gfm], max_epochs=6)
    assert (gfm.record_every, gfm.jump_every) == (FAST["record_every"], FAST["jump_every"])
    _assert_works(trainer, steps=30)


class _EpochSchedule(DigitsModule):
    def configure_optimizers(self):
        opt = torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9)
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "epoch"}}


def test_epoch_scheduler_replay_follows_changing_epoch_lengths(tmp_path):
    # the forecast's learning rate halves at each future epoch end: epochs of 9 steps, then of 3 (accumulating 3)
    class _Check(pl.Callback):
        def __init__(self, gfm):
            self.gfm, self.rows = gfm, {}

        def on_train_batch_end(self, trainer, *args):
            if trainer.global_step in (16, 18):
                self.rows[trainer.global_step] = self.gfm._lr_steps(trainer, trainer.global_step, 8)[:, 0]

    gfm = GFMCallback(overhead=None, **FAST)
    check = _Check(gfm)
    schedule = lc.GradientAccumulationScheduler({0: 1, 2: 3})
    _fit(tmp_path, _EpochSchedule(**SMALL), [schedule, gfm, check], max_epochs=4)
    halvings = {16: [0, 0, 1, 1, 1, 2, 2, 2, 3], 18: [0, 0, 0, 1, 1, 1, 2, 2, 2]}  # 2 steps left at 16, none at 18
    for step, n in halvings.items():
        expect = 0.1 * 0.5 ** (1 + torch.tensor(n, dtype=torch.float64)) * (0.5 if step == 18 else 1.0)
        torch.testing.assert_close(check.rows[step], expect)


def test_stochastic_weight_averaging(tmp_path):
    swa = lc.StochasticWeightAveraging(swa_lrs=1e-2, swa_epoch_start=2)
    _assert_works(
        _fit(tmp_path, DigitsModule(**SMALL), [swa, GFMCallback(overhead=None, **FAST)], max_epochs=5), steps=45
    )


def test_ema_weight_averaging(tmp_path):
    ema = lc.EMAWeightAveraging(decay=0.9)
    _assert_works(
        _fit(tmp_path, DigitsModule(**SMALL), [ema, GFMCallback(overhead=None, **FAST)], max_steps=40), steps=40
    )


def test_model_pruning(tmp_path):
    # pruning re-parametrises `weight` as `weight_orig * weight_mask`: the same parameter object, so the
    # layout does not change; GFM moves `weight_orig`, and the mask keeps the pruned scalars at zero
    prune = lc.ModelPruning("l1_unstructured", amount=0.3, verbose=0)
    trainer = _fit(tmp_path, DigitsModule(**SMALL), [prune, GFMCallback(overhead=None, **FAST)], max_epochs=5)
    cb = _assert_works(trainer, steps=45)
    assert cb.layout_changes == 0


def test_early_stopping(tmp_path):
    stop = lc.EarlyStopping(monitor="val_loss", patience=0, min_delta=10.0)  # stops after the second validation
    trainer = _fit(tmp_path, DigitsModule(**SMALL), [stop, GFMCallback(overhead=None, **FAST)], max_epochs=20)
    assert trainer.current_epoch < 20 and trainer.should_stop
    _assert_works(trainer)


def test_learning_rate_finder(tmp_path):
    finder = lc.LearningRateFinder(min_lr=1e-4, max_lr=1e-1, num_training_steps=20)
    trainer = _fit(tmp_path, DigitsModule(**SMALL), [finder, GFMCallback(overhead=None, **FAST)], max_steps=40)
    cb = _assert_works(trainer, steps=40)
    assert all(j.step > 0 for j in cb.jumps)


def test_batch_size_finder(tmp_path):
    finder = lc.BatchSizeFinder(mode="power", steps_per_trial=2, init_val=64, max_trials=2)
    trainer = _fit(tmp_path, DigitsModule(**SMALL), [finder, GFMCallback(overhead=None, **FAST)], max_steps=40)
    _assert_works(trainer, steps=40)


def test_model_checkpoint_resume(tmp_path):
    ckpt = lc.ModelCheckpoint(dirpath=tmp_path, save_last=True)
    first = _fit(tmp_path, DigitsModule(**SMALL), [ckpt, GFMCallback(overhead=None, **FAST)], max_epochs=2,
                 enable_checkpointing=True)  # fmt: skip
    before = len(_gfm(first).jumps)
    pl.seed_everything(0, verbose=False)
    cb = GFMCallback(overhead=None, **FAST)
    trainer = tiny_trainer(tmp_path, [cb], max_epochs=4, limit_val_batches=2)
    trainer.fit(DigitsModule(**SMALL), ckpt_path=str(tmp_path / "last.ckpt"))
    _assert_works(trainer, steps=36)
    assert len(cb.jumps) > before
    assert [j.step for j in cb.jumps[:before]] == [j.step for j in _gfm(first).jumps]


# ----------------------------------------------------------------------------------------- schedulers
class _Scheduled(DigitsModule):
    """The scheduler is built by ``make(optimizer, total_steps)``; Lightning's scheduler dict by ``config``."""

    def __init__(self, make, config=None, optimizer=None, **kwargs):
        super().__init__(**kwargs)
        self.make, self.config, self.make_opt = make, config or {"interval": "step"}, optimizer

    def configure_optimizers(self):
        opt = (self.make_opt or (lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9)))(self.parameters())
        sched = self.make(opt, int(self.trainer.estimated_stepping_batches))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, **self.config}}


def _linear_warmup(step: int, warmup: int, total: int) -> float:
    """``transformers.get_linear_schedule_with_warmup``'s lambda (a ``functools.partial`` of it, as there)."""
    if step < warmup:
        return step / max(1, warmup)
    return max(0.0, (total - step) / max(1, total - warmup))


SCHEDULERS = {
    "reduce_on_plateau": (
        lambda opt, n: torch.optim.lr_scheduler.ReduceLROnPlateau(opt, patience=0, factor=0.5),
        {"interval": "epoch", "monitor": "val_loss"},
    ),
    "sequential": (
        lambda opt, n: torch.optim.lr_scheduler.SequentialLR(
            opt,
            [
                torch.optim.lr_scheduler.LinearLR(opt, start_factor=0.1, total_iters=10),
                torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=n - 10),
            ],
            milestones=[10],
        ),
        None,
    ),
    "chained": (
        lambda opt, n: torch.optim.lr_scheduler.ChainedScheduler(
            [
                torch.optim.lr_scheduler.LinearLR(opt, start_factor=0.2, total_iters=10),
                torch.optim.lr_scheduler.ExponentialLR(opt, gamma=0.98),
            ]
        ),
        None,
    ),
    "cyclic": (
        lambda opt, n: torch.optim.lr_scheduler.CyclicLR(opt, base_lr=0.01, max_lr=0.1, step_size_up=8),
        None,
    ),
    "transformers_warmup": (
        lambda opt, n: torch.optim.lr_scheduler.LambdaLR(opt, functools.partial(_linear_warmup, warmup=6, total=n)),
        None,
    ),
}


@pytest.mark.parametrize("name", list(SCHEDULERS))
def test_lr_scheduler(tmp_path, name):
    make, config = SCHEDULERS[name]
    model = _Scheduled(make, config, **SMALL)
    trainer = _fit(tmp_path, model, [GFMCallback(overhead=None, **FAST)], max_epochs=5)
    cb = _assert_works(trainer, steps=45)
    if name == "cyclic":  # CyclicLR also cycles SGD's momentum: the dynamics follow it at each record
        cb._follow_layout(trainer)
        assert cb._dyn.hyper["momentum"] == [trainer.optimizers[0].param_groups[0]["momentum"]] != [0.9]


# ----------------------------------------------------------------------------------------- optimizers
OPTIMIZERS = {
    "nadam": (lambda p: torch.optim.NAdam(p, lr=3e-3), NAdamDynamics),
    "radam": (lambda p: torch.optim.RAdam(p, lr=3e-3, weight_decay=0.01, decoupled_weight_decay=True), RAdamDynamics),
    "adamax": (lambda p: torch.optim.Adamax(p, lr=3e-3), AdamaxDynamics),
    "adagrad": (lambda p: torch.optim.Adagrad(p, lr=3e-2), AdagradDynamics),
    "sgd_foreach": (lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9, foreach=True), None),
    "sgd_fused": (lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9, fused=True), None),
    "adam_foreach": (lambda p: torch.optim.Adam(p, lr=3e-3, foreach=True), None),
    "adam_fused": (lambda p: torch.optim.Adam(p, lr=3e-3, fused=True), None),
    "adamw_fused": (lambda p: torch.optim.AdamW(p, lr=3e-3, fused=True), None),
    "rmsprop_foreach": (lambda p: torch.optim.RMSprop(p, lr=1e-3, foreach=True), None),
}


class _Optimized(DigitsModule):
    def __init__(self, make, **kwargs):
        super().__init__(**kwargs)
        self.make = make

    def configure_optimizers(self):
        return self.make(self.parameters())


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_optimizer(tmp_path, name):
    make, dynamics = OPTIMIZERS[name]
    trainer = _fit(tmp_path, _Optimized(make, **SMALL), [GFMCallback(overhead=None, **FAST)], max_steps=36)
    cb = _assert_works(trainer, steps=36)
    if dynamics is not None:
        assert type(cb._dyn) is dynamics
    assert any(j.accepted for j in cb.jumps)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="capturable=True needs CUDA parameters")
@pytest.mark.parametrize("name", ["Adam", "AdamW", "RMSprop", "NAdam", "RAdam", "Adamax"])
def test_capturable_optimizer(tmp_path, name):
    # capturable keeps `step` as a tensor on the device; GFM reads it as the step count
    make = functools.partial(getattr(torch.optim, name), lr=3e-3, capturable=True)
    trainer = _fit(
        tmp_path, _Optimized(make, **SMALL), [GFMCallback(overhead=None, **FAST)], max_steps=36, accelerator="gpu"
    )
    _assert_works(trainer, steps=36)


def test_other_optimizers_are_refused_at_set_up(tmp_path):
    make = functools.partial(torch.optim.Adadelta, lr=0.5)
    with pytest.raises(ValueError, match=r"got `Adadelta`.*generic_dynamics=True"):
        _fit(tmp_path, _Optimized(make, **SMALL), [GFMCallback(overhead=None, **FAST)], max_steps=10)


def test_amsgrad_is_refused_at_set_up(tmp_path):
    make = functools.partial(torch.optim.Adam, lr=3e-3, amsgrad=True)
    with pytest.raises(ValueError, match="amsgrad"):
        _fit(tmp_path, _Optimized(make, **SMALL), [GFMCallback(overhead=None, **FAST)], max_steps=10)


# ------------------------------------------------------------------------------------------- inactive
class _HeadOnly(DigitsModule):
    """The optimizer holds the head only, frozen for the first steps (its other layer is never stepped)."""

    def configure_optimizers(self):
        return torch.optim.Adam(self.net[2].parameters(), lr=1e-3)


class _UnfreezeAt(pl.Callback):
    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        for p in pl_module.net[2].parameters():
            p.requires_grad_(trainer.global_step >= self.step)


def test_nothing_trainable_for_a_while_keeps_gfm_inactive_until_it_is(tmp_path):
    gfm = GFMCallback(overhead=None, **FAST)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer = _fit(tmp_path, _HeadOnly(**SMALL), [_UnfreezeAt(20), gfm], max_steps=50)
    assert sum("holds no trainable parameter" in str(w.message) for w in caught) == 1
    assert trainer.global_step == 50
    assert gfm.jumps and all(j.step > 20 for j in gfm.jumps)
    _assert_consistent(gfm)


def test_without_a_planned_end_gfm_jumps_on_a_fixed_schedule(tmp_path):
    class _Stream(torch.utils.data.IterableDataset):
        def __init__(self, data):
            self.data = data

        def __iter__(self):
            return iter(zip(*self.data, strict=True))

    class _Iterable(DigitsModule):
        def train_dataloader(self):
            return torch.utils.data.DataLoader(_Stream(self.train_data), batch_size=64)

    trainer = _fit(tmp_path, _Iterable(**SMALL), [GFMCallback(overhead=None, **FAST)], max_steps=30)
    _assert_works(trainer, steps=30)


def test_a_diverging_run_is_never_jumped_into(tmp_path):
    class _Diverge(DigitsModule):
        def training_step(self, batch, batch_idx):
            loss = super().training_step(batch, batch_idx)
            return loss * (1e30 if self.global_step >= 20 else 1.0)

    gfm = GFMCallback(overhead=None, **FAST)
    _fit(tmp_path, _Diverge(optimizer="sgd", lr=0.1, **SMALL), [gfm], max_steps=40)
    late = [j for j in gfm.jumps if j.step > 22]
    assert not any(j.accepted and not math.isfinite(j.metric_after) for j in late)


def test_no_layout_noise(tmp_path):
    # nothing changes: never a rebuild, never a restarted window
    gfm = GFMCallback(overhead=None, **FAST)
    _fit(tmp_path, DigitsModule(**SMALL), [gfm], max_steps=24)
    assert gfm.layout_changes == 0 and len(gfm.buffer) >= gfm.min_snapshots


def test_a_model_too_large_for_the_memory_plan_leaves_gfm_inactive(tmp_path, monkeypatch):
    import lightning_gfm.callback as callback_module

    monkeypatch.setattr(callback_module, "available_bytes", lambda device: 10_000)  # a quarter: 2.5 kB
    gfm = GFMCallback(overhead=None, **FAST)
    with pytest.warns(UserWarning, match="GFMCallback is inactive for this run: its memory plan does not fit"):
        _fit(tmp_path, DigitsModule(**SMALL), [gfm], max_steps=24)
    assert gfm.inactive_reason and not gfm.jumps and len(gfm.buffer) == 0


def test_the_documented_matrix_names_these_tests():
    """docs/compatibility.md: every row's test exists here, and every test here is a row."""
    import pathlib
    import re

    page = (pathlib.Path(__file__).resolve().parents[1] / "docs" / "compatibility.md").read_text()
    rows = re.findall(r"`(test_\w+)(?:\[(\w+)\])?`", page)
    named = {name for name, _ in rows}
    here = {name for name in globals() if name.startswith("test_")} - {"test_the_documented_matrix_names_these_tests"}
    assert named == here, f"in the docs only: {sorted(named - here)}; in the tests only: {sorted(here - named)}"
    for test, cases in (("test_lr_scheduler", SCHEDULERS), ("test_optimizer", OPTIMIZERS)):
        assert {case for name, case in rows if name == test} == set(cases)
