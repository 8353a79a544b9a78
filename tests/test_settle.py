"""Settled acceptance (lightning_gfm.settle) and the do-no-harm budget: analytic oracles and real Trainer runs."""

from __future__ import annotations

import copy
import math
import time

import lightning.pytorch as pl
import pytest
import torch
from torch import nn

from lightning_gfm import GFMCallback
from lightning_gfm.forecast import ForecastPath
from lightning_gfm.settle import AttemptBudget, TrainingState, settle_and_choose
from tests.models import DigitsModule


# ------------------------------------------------------------------ analytic: a stiff and a drift direction
class _Quadratic:
    """``f(w) = 0.5 * (a * w0^2 + b * w1^2)`` with ``a >> b`` under gradient descent (lr ``1 / a``-ish).

    The stiff coordinate relaxes in a few steps, the drift coordinate creeps: a candidate that is far along the
    drift but overshoots the stiff one lands worse than staying put and settles better.
    """

    def __init__(self, a: float = 100.0, b: float = 1.0, lr: float = 0.009):
        self.a, self.b, self.lr = a, b, lr
        self.w = nn.Parameter(torch.tensor([0.0, 10.0], dtype=torch.float64))
        self.module = nn.Module()
        self.module.w = self.w
        self.opt = torch.optim.SGD([self.w], lr=lr, momentum=0.5)

    def loss(self) -> float:
        with torch.no_grad():
            w = self.w
            return float(0.5 * (self.a * w[0] ** 2 + self.b * w[1] ** 2))

    def step(self, i: int) -> None:
        self.opt.zero_grad()
        w = self.w
        (0.5 * (self.a * w[0] ** 2 + self.b * w[1] ** 2)).backward()
        self.opt.step()

    def run(self, candidates, points, steps=8):
        def land(k):
            with torch.no_grad():
                self.w.copy_(points[k])

        return settle_and_choose(
            candidates,
            land=land,
            step=self.step,
            evaluate=self.loss,
            capture=lambda: TrainingState.capture(self.module, self.opt, [self.w]),
            restore=lambda s: s.restore(self.module, self.opt, [self.w]),
            steps=steps,
        )


def _manual(problem: _Quadratic, start: torch.Tensor, state: TrainingState, steps: int) -> torch.Tensor:
    """The oracle: the same optimizer from ``state``, moved to ``start``, ``steps`` steps by hand."""
    twin = _Quadratic(problem.a, problem.b, problem.lr)
    twin.step(0)  # create the momentum buffer, then overwrite it with the captured one
    state.restore(twin.module, twin.opt, [twin.w])
    with torch.no_grad():
        twin.w.copy_(start)
    for i in range(steps):
        twin.step(i)
    return twin.w.detach().clone()


def test_a_spiking_candidate_that_settles_ahead_is_kept_with_its_settling_steps():
    q = _Quadratic()
    for i in range(3):
        q.step(i)  # a real momentum state
    state0 = TrainingState.capture(q.module, q.opt, [q.w])
    w0 = q.w.detach().clone()
    spike = torch.tensor([1.5, 2.0], dtype=torch.float64)  # the stiff one overshot, the drift far along
    assert q.loss() < 0.5 * (100 * 1.5**2 + 2.0**2)  # it lands worse than staying put
    result = q.run([1], {1: spike})
    assert result.index == 1
    assert result.steps == 16 and result.kept == 8
    assert torch.equal(q.w.detach(), _manual(q, spike, state0, 8))  # bit-exact: the candidate and its 8 steps
    assert result.metric < result.reference[1]
    assert not torch.equal(w0, q.w.detach())


def test_a_candidate_that_stays_behind_is_rolled_back_to_the_settled_reference_exactly():
    q = _Quadratic()
    for i in range(3):
        q.step(i)
    state0 = TrainingState.capture(q.module, q.opt, [q.w])
    w0 = q.w.detach().clone()
    bad = torch.tensor([0.0, 12.0], dtype=torch.float64)  # backwards along the drift: never catches up
    result = q.run([1], {1: bad})
    assert result.index is None
    assert torch.equal(q.w.detach(), _manual(q, w0, state0, 8))  # the reference, settled: progress kept
    after = TrainingState.capture(q.module, q.opt, [q.w])
    ref = _Quadratic()
    for i in range(3):
        ref.step(i)
    for i in range(8):
        ref.step(i)
    assert torch.equal(after.optimizer[0]["momentum_buffer"], ref.opt.state[ref.w]["momentum_buffer"])


def test_a_candidate_behind_half_way_stops_early_and_the_first_winner_ends_the_search():
    q = _Quadratic()
    points = {1: torch.tensor([0.0, 12.0], dtype=torch.float64), 2: torch.tensor([1.5, 2.0], dtype=torch.float64)}
    result = q.run([1, 2, 3], points)
    # reference 8, candidate 1 stopped after 4 (behind half-way), candidate 2 wins after 8; 3 never tried
    assert result.steps == 8 + 4 + 8
    assert [c[0] for c in result.candidates] == [1, 2]
    assert math.isnan(result.candidates[0][2])
    assert result.index == 2


def test_an_error_inside_a_branch_restores_the_start():
    q = _Quadratic()
    q.step(0)
    w0 = q.w.detach().clone()

    def land(k):
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        settle_and_choose(
            [1],
            land=land,
            step=q.step,
            evaluate=q.loss,
            capture=lambda: TrainingState.capture(q.module, q.opt, [q.w]),
            restore=lambda s: s.restore(q.module, q.opt, [q.w]),
            steps=4,
        )
    assert torch.equal(q.w.detach(), w0)


def test_training_state_restores_weights_adam_moments_step_counts_and_batchnorm_statistics():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Linear(8, 1))
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    x = torch.randn(16, 4)
    for _ in range(2):
        opt.zero_grad()
        net(x).pow(2).mean().backward()
        opt.step()
    params = list(net.parameters())
    saved = TrainingState.capture(net, opt, params)
    before = copy.deepcopy((net.state_dict(), opt.state_dict()))
    for _ in range(3):
        opt.zero_grad()
        net(x + 1).pow(2).mean().backward()
        opt.step()
    saved.restore(net, opt, params)
    now = (net.state_dict(), opt.state_dict())
    for k, v in before[0].items():
        assert torch.equal(v, now[0][k]), k
    for i, s in before[1]["state"].items():
        for k, v in s.items():
            assert torch.equal(torch.as_tensor(v), torch.as_tensor(now[1]["state"][i][k])), (i, k)


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
    """A forecaster whose only candidate is the current weights pushed far off: it lands and settles worse."""

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


@pytest.mark.parametrize(
    ("optimizer", "accumulate", "clip"), [("adam", 1, None), ("momentum", 1, None), ("adam", 2, 0.05)]
)
def test_rejected_settle_leaves_the_reference_plus_its_settling_steps_bit_exactly(optimizer, accumulate, clip):
    gfm = _Spike(record_every=1, jump_every=12, window=12, settle=4, overhead=None)
    before, after = _Take(12), _Take(12)
    trainer_kw = {"accumulate_grad_batches": accumulate, "gradient_clip_val": clip}
    model, trainer = _fit([before, gfm, after], trainer_kw=trainer_kw, optimizer=optimizer, lr=1e-2)
    jump = gfm.jumps[0]
    assert not jump.accepted and jump.settle_steps == 6 and jump.settle_kept == 4  # reference 4, candidate stopped at 2
    assert trainer.global_step == 24
    # the oracle: the reference trained 4 steps by hand on the first training batches (an unshuffled private pass),
    # each step over `accumulate` batches with the loss divided among them, clipped as the Trainer clips
    net, opt_state = before.taken
    opt = {"adam": torch.optim.Adam, "momentum": lambda p, lr: torch.optim.SGD(p, lr=lr, momentum=0.9)}[optimizer](
        net.parameters(), lr=1e-2
    )
    opt.load_state_dict(opt_state)
    x, y = model.train_data
    for i in range(4):
        opt.zero_grad(set_to_none=True)
        for j in range(i * accumulate, (i + 1) * accumulate):
            loss = nn.functional.cross_entropy(net(x[64 * j : 64 * (j + 1)]), y[64 * j : 64 * (j + 1)])
            (loss / accumulate).backward()
        if clip is not None:
            torch.nn.utils.clip_grad_norm_(net.parameters(), clip)
        opt.step()
    for a, b in zip(net.parameters(), after.taken[0].parameters(), strict=True):
        assert torch.equal(a, b)


def test_the_budget_and_its_credit_survive_a_checkpoint():
    gfm = _Spike(record_every=1, jump_every=12, window=12, settle=4, overhead=0.5)
    _fit([gfm])
    restored = GFMCallback()
    restored.load_state_dict(gfm.state_dict())
    assert restored.budget.state_dict() == gfm.budget.state_dict()
    assert restored.jumps[0].settle_steps == gfm.jumps[0].settle_steps


def test_settle_off_rolls_back_to_the_landing_point_exactly():
    gfm = _Spike(record_every=1, jump_every=12, window=12, settle=0, overhead=None)
    before, after = _Take(12), _Take(12)
    _fit([before, gfm, after])
    assert gfm.jumps[0].settle_steps == 0 and not gfm.jumps[0].accepted
    for a, b in zip(before.taken[0].parameters(), after.taken[0].parameters(), strict=True):
        assert torch.equal(a, b)


def test_settling_leaves_the_users_random_stream_the_scheduler_and_logged_metrics_alone():
    streams = {}
    for settle in (0, 4):  # a shuffled loader: the private pass draws its order, and must not from the user's stream
        gfm = _Spike(record_every=1, jump_every=12, window=12, settle=settle, overhead=None)
        model, trainer = _fit([gfm], schedule="cosine", shuffle=True)
        streams[settle] = torch.random.get_rng_state()
        assert (gfm.jumps[0].settle_steps > 0) == (settle > 0)
    assert torch.equal(streams[0], streams[4])  # the same draws as a run that never settled
    sched = trainer.lr_scheduler_configs[0].scheduler
    assert sched.last_epoch == 24  # the scheduler stepped with the run only
    assert "train_loss" in trainer.callback_metrics  # the run's own logging survived the captured branches


def test_the_budget_skips_attempts_it_cannot_afford_and_counts_them():
    class Slow(_Spike):
        def forecast_path(self, trainer, pl_module, win, horizons):
            time.sleep(1.0)  # an attempt far dearer than this run's whole planned training allows
            return super().forecast_path(trainer, pl_module, win, horizons)

    # the whole run is ~0.1 s: even at 100 % of it, the first attempt shows its cost; its settling and every later
    # attempt are skipped
    gfm = Slow(record_every=1, jump_every=12, window=12, settle=2, overhead=1.0)
    _fit([gfm], max_steps=72)
    assert len(gfm.jumps) == 1 and gfm.jumps[0].settle_steps == 0 and gfm.budget.skipped == 1 + 5
    none = _Spike(record_every=1, jump_every=12, window=12, overhead=0.0)
    _fit([none], max_steps=72)
    assert not none.jumps and none.budget.skipped == 6  # nothing to spend: GFM only records


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [({"settle": -1}, "`settle` must be an int >= 0"), ({"overhead": -0.1}, "`overhead` must be a finite number")],
)
def test_bad_settle_and_overhead_name_the_argument(kwargs, match):
    with pytest.raises(ValueError, match=match):
        GFMCallback(**kwargs)


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
def test_settling_under_precision_plugins(precision):
    from lightning.pytorch.plugins.precision import MixedPrecision

    gfm = _Spike(record_every=1, jump_every=12, window=12, settle=4, overhead=None)
    if precision == "bf16-mixed":
        kw = {"precision": "bf16-mixed"}
    else:  # Lightning's 16-mixed path with torch's CPU gradient scaler: settling would move the scaler's state
        kw = {"plugins": [MixedPrecision("16-mixed", "cpu", torch.amp.GradScaler("cpu", init_scale=2.0**8))]}
    model, trainer = _fit([gfm], trainer_kw=kw)
    assert trainer.global_step == 24 and all(torch.isfinite(p).all() for p in model.parameters())
    jump = gfm.jumps[0]
    assert jump.settle_steps == (6 if precision == "bf16-mixed" else 0)  # with a scaler: judged where it lands
