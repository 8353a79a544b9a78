"""GFM's memory is planned at set-up by default: the default budget, the lean buffer, and switching off safely."""

import lightning.pytorch as pl
import pytest
import torch
from models import DigitsModule, tiny_trainer

import lightning_gfm.callback as callback_module
from lightning_gfm import GFMCallback
from lightning_gfm.dynamics import dynamics_for
from lightning_gfm.flow.field import FieldConfig, GradientField
from lightning_gfm.flow.window import Window
from lightning_gfm.forecast import forecast
from lightning_gfm.memory import DEFAULT_FLOOR, OVERHEAD, default_budget, estimate_bytes, footprint_bytes
from lightning_gfm.params import ParamSpec
from lightning_gfm.trajectory import Snapshot, TrajectoryBuffer

GIB = 2**30
PRIOR = dict(record_every=2, jump_every=20, window=12, trend=4, eval_batches=2)  # the prior: lean layout


# ------------------------------------------------------------------------------------------ default budget
def test_default_budget_quarter_of_available_binds_for_a_large_model():
    budget, why = default_budget(footprint=4 * GIB, available=16 * GIB)
    assert budget == 4 * GIB  # 25 % of 16 GiB < 10 x 4 GiB
    assert "25% of 16.00 GiB available" in why


def test_default_budget_multiple_of_footprint_binds_on_a_big_machine():
    budget, _ = default_budget(footprint=GIB // 2, available=1024 * GIB)
    assert budget == 5 * GIB + OVERHEAD  # 10 x 0.5 GiB + the fixed overhead < 25 % of 1 TiB


def test_default_budget_floor_for_small_models_but_never_above_the_fraction():
    assert default_budget(footprint=1000, available=64 * GIB)[0] == DEFAULT_FLOOR
    assert default_budget(footprint=1000, available=2 * GIB)[0] == GIB // 2  # 25 % of 2 GiB < the 1 GiB floor


def test_default_budget_is_shared_by_the_processes_of_one_host():
    alone, _ = default_budget(footprint=64 * GIB, available=32 * GIB)
    shared, why = default_budget(footprint=64 * GIB, available=32 * GIB, sharing=4)
    assert shared == alone // 4 and "/ 4" in why


def test_unknown_available_memory_still_bounds_by_the_footprint():
    assert default_budget(footprint=GIB, available=None)[0] == 10 * GIB + OVERHEAD


# -------------------------------------------------------------------------------------------- lean layout
def _buffer(state_rows, n=7, capacity=5, p=6, dtype=torch.float32):
    buf = TrajectoryBuffer(capacity, dtype=dtype, state_rows=state_rows)
    gen = torch.Generator().manual_seed(0)
    snaps = []
    for step in range(n):
        s = Snapshot(
            step=10 * (step + 1),
            weights=torch.randn(p, generator=gen),
            state={"exp_avg": torch.randn(p, generator=gen), "exp_avg_sq": torch.rand(p, generator=gen)},
            lrs=torch.tensor([0.1], dtype=torch.float64),
            opt_step=10 * (step + 1),
        )
        buf.append(s)
        snaps.append(s)
    return buf, snaps


@pytest.mark.parametrize("n", [3, 5, 7, 12])
@pytest.mark.parametrize("state_rows", [1, 2, None])
def test_ordered_views_match_the_gathered_copies_after_wrapping(n, state_rows):
    buf, snaps = _buffer(state_rows, n=n)
    weights, state = buf.weights(), buf.state("exp_avg")
    steps = buf.steps
    w_view, s_view = buf.ordered_()
    assert torch.equal(w_view, weights) and torch.equal(s_view["exp_avg"], state)
    assert buf.steps == steps == [s.step for s in snaps[-len(buf) :]]
    kept = min(len(buf), buf.state_rows)
    assert torch.equal(state, torch.stack([s.state["exp_avg"] for s in snaps[-kept:]]))
    assert buf._w.data_ptr() == w_view.data_ptr()  # a view, not a copy
    buf.append(Snapshot(step=10_000, weights=torch.zeros(6), state={k: torch.zeros(6) for k in buf.state_names}))
    assert buf.steps[-1] == 10_000 and torch.equal(buf[-1].weights, torch.zeros(6))
    assert buf.steps[:-1] == steps[-(len(buf) - 1) :]
    assert torch.equal(buf.state("exp_avg")[-1], torch.zeros(6))


def test_older_snapshots_keep_no_state_in_the_lean_buffer():
    buf, _ = _buffer(state_rows=1)
    assert buf[-1].state and not buf[0].state
    assert buf.state("exp_avg").shape == (1, 6)
    assert buf.allocated_bytes == (5 + 2 * 1) * 6 * 4


@pytest.mark.parametrize(("saved_rows", "loaded_rows", "kept"), [(None, 1, 5), (1, 1, 5), (1, None, 1), (2, 3, 2)])
def test_checkpoint_between_layouts_never_invents_state(saved_rows, loaded_rows, kept):
    buf, snaps = _buffer(saved_rows)
    other = TrajectoryBuffer(5, state_rows=loaded_rows)
    other.load_state_dict(buf.state_dict())
    assert len(other) == kept
    assert other.steps == [s.step for s in snaps[-kept:]]
    n_state = min(kept, other.state_rows)
    assert torch.equal(other.state("exp_avg_sq"), torch.stack([s.state["exp_avg_sq"] for s in snaps[-n_state:]]))


def test_lean_window_forecasts_what_the_full_window_forecasts():
    """The prior from views of a bfloat16-free lean buffer equals the prior from the float32 window copy."""
    model = torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.Tanh(), torch.nn.Linear(7, 3))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    spec = ParamSpec.from_module(model, opt)
    dyn = dynamics_for(opt, spec)
    full, lean = TrajectoryBuffer(9), TrajectoryBuffer(9, state_rows=1)
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(64, 5, generator=gen), torch.randn(64, 3, generator=gen)
    for step in range(1, 61):
        opt.zero_grad()
        torch.nn.functional.mse_loss(model(x), y).backward()
        opt.step()
        if step % 5 == 0:
            full.record(opt, spec, dyn.state_names, step)
            lean.record(opt, spec, dyn.state_names, step)
    field = GradientField(FieldConfig(anchor="trend", trend=4, span=8.0))
    lr_steps = torch.full((41, 1), 1e-2, dtype=torch.float64)
    paths = []
    for buf, is_lean in ((full, False), (lean, True)):
        win = Window.from_buffer(buf, spec, dyn.state_names, 100, lean=is_lean)
        assert (win.u is None) == is_lean
        paths.append(forecast(field, win, dyn, lr_steps, [10, 20, 40]))
    move = (paths[0].weights[-1] - paths[0].weights[0]).norm()
    assert (paths[1].weights - paths[0].weights).norm() <= 1e-5 * move
    for name in dyn.state_names:
        assert torch.allclose(paths[1].state[name], paths[0].state[name], rtol=1e-5, atol=1e-12)


def test_lean_estimate_is_far_below_the_full_one_and_covers_the_ring():
    p, s = 10_000_000, 2
    lean = estimate_bytes(p, s, 24, torch.float32, 1 << 20, lean=True)
    full = estimate_bytes(p, s, 24, torch.float32, 1 << 20)
    assert lean < full / 2.5
    buf = TrajectoryBuffer(24, state_rows=1)
    buf.allocate(1000, ("exp_avg", "exp_avg_sq"))
    assert buf.allocated_bytes <= estimate_bytes(1000, s, 24, torch.float32, 1, lean=True)


# ------------------------------------------------------------------------------------------- the callback
class _Seen(pl.Callback):
    """Notes what GFM had allocated before the first training step."""

    def __init__(self, gfm):
        self.gfm, self.allocated = gfm, None

    def on_train_start(self, trainer, pl_module):
        self.allocated = self.gfm.buffer.allocated_bytes


def test_default_plans_and_allocates_before_the_first_step(tmp_path):
    cb = GFMCallback(overhead=None, **PRIOR)
    seen = _Seen(cb)
    pl.seed_everything(0, verbose=False)
    tiny_trainer(tmp_path, [cb, seen], max_steps=60).fit(DigitsModule())
    plan = cb.memory_plan
    assert plan is not None and plan.lean and plan.source.startswith("default:")
    assert (cb.buffer.capacity, cb.buffer.dtype, cb.buffer.state_rows) == (12, torch.float32, 1)
    assert seen.allocated == cb.buffer.allocated_bytes > 0
    assert plan.estimated_bytes <= plan.budget_bytes and cb.jumps and cb.inactive_reason is None


def test_little_available_memory_shrinks_the_plan(tmp_path, monkeypatch):
    model = DigitsModule()
    n = sum(p.numel() for p in model.parameters())
    # a quarter of this is room for about 10 bfloat16 snapshots of the lean Adam layout, not 24 float32 ones
    room = estimate_bytes(n, 2, 10, torch.bfloat16, 1 << 12, lean=True, n_horizons=4)
    monkeypatch.setattr(callback_module, "available_bytes", lambda device: 4 * room + 3)
    cb = GFMCallback(overhead=None, **{**PRIOR, "window": 24})
    pl.seed_everything(0, verbose=False)
    tiny_trainer(tmp_path, [cb], max_steps=60).fit(model)
    plan = cb.memory_plan
    assert plan.budget_bytes == room and plan.estimated_bytes <= room
    assert (plan.dtype, cb.buffer.dtype) == (torch.bfloat16, torch.bfloat16)
    assert cb.min_snapshots <= plan.window == cb.buffer.capacity < 24 and cb.jumps


def _weights(model):
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


@pytest.mark.parametrize("how", ["explicit", "auto"])
def test_a_budget_too_small_switches_gfm_off_and_leaves_training_untouched(tmp_path, monkeypatch, how):
    pl.seed_everything(0, verbose=False)
    plain = DigitsModule()
    tiny_trainer(tmp_path / "plain", [], max_steps=50).fit(plain)
    if how == "auto":
        monkeypatch.setattr(callback_module, "available_bytes", lambda device: 4000)
        cb = GFMCallback(overhead=None, **PRIOR)
    else:
        cb = GFMCallback(overhead=None, **PRIOR, memory_budget="1KB")
    pl.seed_everything(0, verbose=False)
    model = DigitsModule()
    with pytest.warns(UserWarning, match=r"GFMCallback is inactive for this run: its memory plan does not fit.*"):
        tiny_trainer(tmp_path / "gfm", [cb], max_steps=50).fit(model)
    assert "budget_bytes` must be at least" in cb.inactive_reason
    assert cb.jumps == [] and len(cb.buffer) == 0 and cb.buffer.allocated_bytes == 0
    assert torch.equal(_weights(model), _weights(plain))


def test_no_budget_uses_the_arguments_as_given(tmp_path, monkeypatch):
    monkeypatch.setattr(callback_module, "available_bytes", lambda device: 4000)  # would switch "auto" off
    cb = GFMCallback(overhead=None, **PRIOR, memory_budget=None)
    pl.seed_everything(0, verbose=False)
    tiny_trainer(tmp_path, [cb], max_steps=60).fit(DigitsModule())
    assert cb.memory_plan is None and cb.buffer.capacity == 12 and cb.jumps


def test_footprint_counts_weights_gradients_and_state():
    assert footprint_bytes(1000, 2) == 16_000 and footprint_bytes(1000, 0, item_size=2) == 4000


def test_a_resumed_window_goes_straight_into_the_planned_ring(tmp_path):
    cb = GFMCallback(overhead=None, **PRIOR)
    pl.seed_everything(0, verbose=False)
    trainer = tiny_trainer(tmp_path, [cb], max_steps=30)
    trainer.fit(DigitsModule())
    ckpt = tmp_path / "gfm.ckpt"
    trainer.save_checkpoint(ckpt)
    steps = cb.buffer.steps
    last_state = cb.buffer.state("exp_avg").clone()

    resumed = GFMCallback(overhead=None, **PRIOR)
    seen = _Seen(resumed)
    restored = {}

    class _Steps(pl.Callback):
        def on_train_start(self, trainer, pl_module):
            restored["steps"], restored["state"] = resumed.buffer.steps, resumed.buffer.state("exp_avg").clone()

    pl.seed_everything(0, verbose=False)
    tiny_trainer(tmp_path, [resumed, seen, _Steps()], max_steps=40).fit(DigitsModule(), ckpt_path=ckpt)
    assert restored["steps"] == steps and torch.equal(restored["state"], last_state)
    assert resumed.buffer.state_rows == 1 and seen.allocated == resumed.buffer.allocated_bytes


def test_a_fitted_field_from_a_checkpoint_gets_the_full_layout(tmp_path):
    fitted = GFMCallback(overhead=None, **PRIOR, fit_steps=10, fit_batch=512)
    pl.seed_everything(0, verbose=False)
    trainer = tiny_trainer(tmp_path, [fitted], max_steps=40)
    trainer.fit(DigitsModule())
    assert not fitted.field.constant
    ckpt = tmp_path / "fitted.ckpt"
    trainer.save_checkpoint(ckpt)
    resumed = GFMCallback(overhead=None, **PRIOR)  # the prior's settings, but the checkpoint brings a fitted field
    pl.seed_everything(0, verbose=False)
    tiny_trainer(tmp_path, [resumed], max_steps=80).fit(DigitsModule(), ckpt_path=ckpt)
    assert not resumed.field.constant and not resumed.memory_plan.lean
    assert resumed.buffer.state_rows == resumed.buffer.capacity
    assert len(resumed.jumps) > len(fitted.jumps)  # it forecast with the fitted field from a full window


def test_a_callback_switched_off_in_one_fit_plans_afresh_in_the_next(tmp_path, monkeypatch):
    cb = GFMCallback(overhead=None, **PRIOR)
    monkeypatch.setattr(callback_module, "available_bytes", lambda device: 4000)
    pl.seed_everything(0, verbose=False)
    with pytest.warns(UserWarning, match="inactive for this run"):
        tiny_trainer(tmp_path, [cb], max_steps=30).fit(DigitsModule())
    assert cb.inactive_reason and cb.memory_plan is None
    monkeypatch.undo()
    pl.seed_everything(0, verbose=False)
    tiny_trainer(tmp_path, [cb], max_steps=60).fit(DigitsModule())
    assert cb.inactive_reason is None and cb.memory_plan is not None and cb.jumps
