"""The do-no-harm budget (lightning_gfm.budget), exact rollback of a rejected jump, and removed arguments."""

from __future__ import annotations

import copy
import time

import lightning.pytorch as pl
import pytest
import torch

from lightning_gfm import GFMCallback
from lightning_gfm.budget import AttemptBudget
from lightning_gfm.forecast import ForecastPath
from tests.models import DigitsModule


def test_budget_spends_overhead_of_the_plan_plus_what_accepted_jumps_saved():
    budget = AttemptBudget(0.03)
    assert budget.allowance(step_seconds=0.01, planned_steps=1000) == pytest.approx(0.3)
    assert budget.allows(0.19, step_seconds=0.01, planned_steps=1000, spent=0.1)
    assert not budget.allows(0.21, step_seconds=0.01, planned_steps=1000, spent=0.1)
    budget.earn(50)
    assert budget.allowance(step_seconds=0.01, planned_steps=1000) == pytest.approx(0.8)
    assert AttemptBudget(None).allows(1e9, step_seconds=1.0, planned_steps=1, spent=1e9)
    restored = AttemptBudget(0.03)
    restored.load_state_dict(budget.state_dict())
    assert restored.saved_steps == 50


# ---------------------------------------------------------------------------------- in a real Trainer
class _Spike(GFMCallback):
    """A forecaster whose only candidate is the current weights pushed far off: it lands worse."""

    def forecast_path(self, trainer, pl_module, win, horizons):
        w = win.w[-1].float().to(pl_module.device)
        far = w + 5.0 * torch.sign(torch.sin(torch.arange(w.numel(), dtype=torch.float32) + 1.0))
        return ForecastPath([0, horizons[-1]], torch.stack([w, far]), {}, 0.0), {}


class _Take(pl.Callback):
    """Deep copies of the module and optimizer at ``step`` (before GFM acts, if listed before it)."""

    def __init__(self, step: int):
        self.step, self.taken = step, None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == self.step and self.taken is None:
            self.taken = (copy.deepcopy(pl_module.net), copy.deepcopy(trainer.optimizers[0].state_dict()))


def _fit(callbacks, max_steps=24, trainer_kw=None, **module_kw):
    pl.seed_everything(0, verbose=False)
    model = DigitsModule(**{"shuffle": False, **module_kw})
    trainer = pl.Trainer(
        max_steps=max_steps,
        callbacks=callbacks,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=2,
        num_sanity_val_steps=0,
        check_val_every_n_epoch=None,
        val_check_interval=max_steps,
        **(trainer_kw or {}),
    )
    trainer.fit(model)
    return model, trainer


def test_the_budget_and_its_credit_survive_a_checkpoint():
    gfm = _Spike(record_every=1, jump_every=12, window=12, overhead=0.5)
    _fit([gfm])
    restored = GFMCallback()
    restored.load_state_dict(gfm.state_dict())
    assert restored.budget.state_dict() == gfm.budget.state_dict()
    assert restored.jumps == gfm.jumps


def test_a_candidate_that_lands_worse_is_rolled_back_to_the_landing_point_exactly():
    gfm = _Spike(record_every=1, jump_every=12, window=12, overhead=None)
    before, after = _Take(12), _Take(12)
    _fit([before, gfm, after])
    assert not gfm.jumps[0].accepted
    for a, b in zip(before.taken[0].parameters(), after.taken[0].parameters(), strict=True):
        assert torch.equal(a, b)


def test_the_budget_skips_attempts_it_cannot_afford_and_counts_them():
    class Slow(_Spike):
        def forecast_path(self, trainer, pl_module, win, horizons):
            time.sleep(1.0)  # an attempt far dearer than this run's whole planned training allows
            return super().forecast_path(trainer, pl_module, win, horizons)

    # the whole run is ~0.1 s: even at 100 % of it, the first attempt shows its cost; every later attempt is skipped
    gfm = Slow(record_every=1, jump_every=12, window=12, overhead=1.0)
    _fit([gfm], max_steps=72)
    assert len(gfm.jumps) == 1 and gfm.budget.skipped == 1 + 5
    none = _Spike(record_every=1, jump_every=12, window=12, overhead=0.0)
    _fit([none], max_steps=72)
    assert not none.jumps and none.budget.skipped == 6  # nothing to spend: GFM only records


@pytest.mark.parametrize("overhead", [-0.1, float("inf"), "3%", True])
def test_bad_overhead_names_the_argument_and_the_value(overhead):
    with pytest.raises(ValueError, match=r"`overhead` must be a finite number >= 0 .* got"):
        GFMCallback(overhead=overhead)


def test_the_removed_settle_argument_says_why_and_an_unknown_one_is_a_type_error():
    with pytest.raises(TypeError, match=r"`settle` was removed: .*E48.* Remove the argument"):
        GFMCallback(settle=4)
    with pytest.raises(TypeError, match="unexpected keyword argument 'overheads'"):
        GFMCallback(overheads=0.03)


def test_a_checkpoint_written_before_settle_was_removed_loads_its_jump_records():
    gfm = _Spike(record_every=1, jump_every=12, window=12, overhead=None)
    _fit([gfm])
    state = gfm.state_dict()
    old = dict(settle_steps=6, settle_kept=4, settled=[(24, 1.0, float("nan"))], settle_reference=0.5)
    state["jumps"] = [{**j, **old} for j in state["jumps"]]  # the fields such a checkpoint also holds
    restored = GFMCallback()
    restored.load_state_dict(state)
    assert restored.jumps == gfm.jumps


def test_a_first_attempt_too_dear_to_evaluate_skips_every_later_attempt_without_evaluating():
    class DearEval(_Spike):
        evaluations = 0

        def _evaluate_from(self, trainer, pl_module, resume, n):
            DearEval.evaluations += 1
            time.sleep(0.2)  # one evaluation alone costs more than 3 % of this whole run
            return super()._evaluate_from(trainer, pl_module, resume, n)

    gfm = DearEval(record_every=1, jump_every=12, window=12, overhead=0.03)
    _fit([gfm], max_steps=72)
    # the first attempt's own screen shows the cost: its candidates' screens are not made, nor any later attempt
    assert [j.outcome for j in gfm.jumps] == ["over_budget"] and not gfm.jumps[0].accepted
    assert gfm.budget.skipped == 6 and DearEval.evaluations == 1


def test_a_full_evaluation_continued_from_its_screen_is_the_full_evaluation_bit_for_bit(tmp_path):
    from tests.models import tiny_trainer

    gfm = GFMCallback(jump_every=10**6, eval_batches=4)
    model = DigitsModule(batch_size=16)
    trainer = tiny_trainer(tmp_path, [gfm], max_steps=3)
    trainer.fit(model)
    batches, _ = gfm._eval_data(trainer, model)
    assert len(batches) >= 3  # the screen's batch, then at least two more
    screened = gfm._screen(trainer, model)
    assert screened.done == 1 and screened.metric == gfm._evaluate(trainer, model, n=1)
    assert gfm._complete(trainer, model, screened) == gfm._evaluate(trainer, model)  # exact, not approximate
    two = gfm._evaluate_from(trainer, model, None, 2)  # any prefix continues
    assert two.done == 2 and gfm._complete(trainer, model, two) == gfm._evaluate(trainer, model)


@pytest.mark.parametrize("precision", ["bf16-mixed", "16-mixed-scaler"])
def test_a_rejected_jump_under_precision_plugins_rolls_back_and_the_run_finishes(precision):
    from lightning.pytorch.plugins.precision import MixedPrecision

    gfm = _Spike(record_every=1, jump_every=12, window=12, overhead=None)
    if precision == "bf16-mixed":
        kw = {"precision": "bf16-mixed"}
    else:  # Lightning's 16-mixed path with torch's CPU gradient scaler
        kw = {"plugins": [MixedPrecision("16-mixed", "cpu", torch.amp.GradScaler("cpu", init_scale=2.0**8))]}
    model, trainer = _fit([gfm], trainer_kw=kw)
    assert trainer.global_step == 24 and all(torch.isfinite(p).all() for p in model.parameters())
    assert gfm.jumps and not any(j.accepted for j in gfm.jumps)
