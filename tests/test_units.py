"""Pure-tensor pieces: params, trajectory buffer, jump choice and rollback, field files, public API."""

import math
import pickle
import subprocess
import sys

import pytest
import torch

import lightning_gfm
from lightning_gfm.dynamics import dynamics_for
from lightning_gfm.fields import load_field, save_field
from lightning_gfm.flow.field import FieldConfig, GradientField
from lightning_gfm.forecast import ForecastPath
from lightning_gfm.jump import JumpOutcome, StatePolicy, apply_state_policy, better, choose_and_apply
from lightning_gfm.params import ParamSpec
from lightning_gfm.trajectory import Snapshot, TrajectoryBuffer


def _model():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))
    model[2].bias.requires_grad_(False)
    return model


def test_param_spec_tracks_trainable_and_writes_in_place():
    model = _model()
    spec = ParamSpec.from_module(model)
    assert spec.names == ["0.weight", "0.bias", "2.weight"]
    assert spec.numel == 12 + 4 + 8
    ids = [id(p) for p in spec.params]
    flat = spec.flatten()
    spec.write_(flat * 2)
    assert [id(p) for p in model.parameters() if p.requires_grad] == ids
    torch.testing.assert_close(spec.flatten(), flat * 2)
    with pytest.raises(ValueError, match=r"`flat` must have shape \(24,\)"):
        spec.write_(torch.zeros(5))


def test_param_spec_refuses_nothing_to_track():
    model = torch.nn.Linear(2, 2).requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameter"):
        ParamSpec.from_module(model)


def test_buffer_is_bounded_and_round_trips():
    buf = TrajectoryBuffer(3)
    for s in range(5):
        buf.append(Snapshot(s, torch.full((4,), float(s)), {"m": torch.ones(4)}, torch.ones(1, dtype=torch.float64)))
    assert buf.steps == [2, 3, 4] and buf.nbytes == 3 * (16 + 16 + 8)
    with pytest.raises(ValueError, match="increasing steps"):
        buf.append(Snapshot(4, torch.zeros(4)))
    with pytest.raises(ValueError, match="changed shape"):
        buf.append(Snapshot(9, torch.zeros(5)))
    other = TrajectoryBuffer(3)
    other.load_state_dict(pickle.loads(pickle.dumps(buf.state_dict())))
    assert other.steps == buf.steps and torch.equal(other.weights(), buf.weights())
    buf.translate_(torch.ones(4))
    assert torch.equal(buf.weights(), other.weights() + 1)
    with pytest.raises(ValueError, match="`capacity` must be an int >= 2"):
        TrajectoryBuffer(1)


def test_buffer_bf16_storage_halves_memory():
    a, b = TrajectoryBuffer(2), TrajectoryBuffer(2, dtype=torch.bfloat16)
    for buf in (a, b):
        buf.append(Snapshot(0, torch.randn(100)))
    assert b.nbytes * 2 == a.nbytes


def _path(spec, deltas, state=None):
    w0 = spec.flatten()
    weights = torch.stack([w0 + d for d in deltas])
    return ForecastPath(list(range(len(deltas))), weights, state or {}, 0.0)


def test_choose_accepts_the_best_candidate():
    model = _model()
    spec = ParamSpec.from_module(model)
    target = spec.flatten() + 3.0
    path = _path(spec, [0.0, 1.0, 2.0, 4.0])

    def evaluate():
        return float((spec.flatten() - target).abs().mean())

    decision = choose_and_apply(spec, path, evaluate)
    # points 2 and 3 tie at 1.0: the farther one wins (the same metric, more steps ahead)
    assert decision.outcome is JumpOutcome.ACCEPTED and decision.index == 3
    torch.testing.assert_close(spec.flatten(), path.weights[3])
    assert decision.metrics == pytest.approx([2.0, 1.0, 1.0])
    assert decision.metric_after == pytest.approx(1.0) and decision.metric_start is None


def test_choose_can_take_a_denoised_start():
    model = _model()
    spec = ParamSpec.from_module(model)
    target = spec.flatten() + 0.5
    path = _path(spec, [0.5, 2.0, 4.0])  # the path starts off the current weights, right on the target
    calls = []

    def evaluate():
        calls.append(1)
        return float((spec.flatten() - target).abs().mean())

    skipped = choose_and_apply(spec, path, evaluate)  # start not a candidate: staying (0.5) beats 1.5 and 3.5
    assert skipped.outcome is JumpOutcome.ROLLED_BACK and skipped.metric_start is None and len(calls) == 3
    decision = choose_and_apply(spec, path, evaluate, evaluate_start=True)
    assert decision.outcome is JumpOutcome.ACCEPTED and decision.index == 0
    assert decision.metric_start == pytest.approx(0.0) and decision.metric_after == pytest.approx(0.0)
    torch.testing.assert_close(spec.flatten(), path.weights[0])


def test_rollback_is_bit_exact_and_keeps_identity():
    model = _model()
    spec = ParamSpec.from_module(model)
    before = [p.detach().clone() for p in spec.params]
    ids = [id(p) for p in spec.params]
    path = _path(spec, [0.0, 0.1234567, float("nan")])
    decision = choose_and_apply(spec, path, lambda: float(spec.flatten().abs().sum()) + 0.0, mode="max", min_delta=1.0)
    assert decision.outcome is JumpOutcome.ROLLED_BACK and decision.index is None
    assert math.isnan(decision.metrics[1])  # the non-finite point was never applied or evaluated
    assert all(torch.equal(a, p) for a, p in zip(before, spec.params, strict=True))
    assert [id(p) for p in spec.params] == ids


def test_all_non_finite_is_reported_and_restored():
    model = _model()
    spec = ParamSpec.from_module(model)
    before = spec.flatten()
    decision = choose_and_apply(spec, _path(spec, [0.0, float("inf")]), lambda: 1.0)
    assert decision.outcome is JumpOutcome.NON_FINITE
    assert torch.equal(spec.flatten(), before)


def test_evaluation_error_restores_weights():
    model = _model()
    spec = ParamSpec.from_module(model)
    before = spec.flatten()
    calls = []

    def evaluate():
        calls.append(1)
        if len(calls) > 1:
            raise RuntimeError("boom")
        return 1.0

    with pytest.raises(RuntimeError, match="boom"):
        choose_and_apply(spec, _path(spec, [0.0, 1.0]), evaluate)
    assert torch.equal(spec.flatten(), before)


def test_better_respects_mode_and_margin():
    assert better(0.9, 1.0, "min", 0.05) and not better(0.96, 1.0, "min", 0.05)
    assert better(1.1, 1.0, "max", 0.05) and not better(float("nan"), 1.0, "min", 0.0)


def test_state_policies():
    model = _model()
    opt = torch.optim.Adam(p for p in model.parameters() if p.requires_grad)
    model(torch.randn(2, 3)).sum().backward()
    opt.step()
    spec = ParamSpec.from_module(model, opt)
    dyn = dynamics_for(opt, spec)
    n = spec.numel
    path = ForecastPath([0, 5], torch.zeros(2, n), {"exp_avg": torch.ones(2, n), "exp_avg_sq": -torch.ones(2, n)}, 0)
    keep = [opt.state[p]["exp_avg"].clone() for p in spec.params]
    apply_state_policy(opt, spec, StatePolicy.KEEP, path, 1, dyn)
    assert all(torch.equal(k, opt.state[p]["exp_avg"]) for k, p in zip(keep, spec.params, strict=True))
    apply_state_policy(opt, spec, StatePolicy.FORECAST, path, 1, dyn)
    assert all(opt.state[p]["exp_avg"].eq(1).all() and opt.state[p]["exp_avg_sq"].eq(0).all() for p in spec.params)
    assert all(int(opt.state[p]["step"]) == 1 + 5 for p in spec.params)  # the counter goes with the state
    apply_state_policy(opt, spec, StatePolicy.RESET, path, 1, dyn)
    assert all(p not in opt.state for p in spec.params)


def test_field_file_round_trip_and_hostile_files(tmp_path):
    field = GradientField(FieldConfig(history=2, hidden=8, depth=3, span=5.0))
    with torch.no_grad():
        for p in field.parameters():
            p.normal_()
    path = save_field(field, tmp_path / "f.safetensors", trained_on="test")
    loaded = load_field(path)
    assert loaded.config == field.config
    assert all(
        torch.equal(a, b) for a, b in zip(field.state_dict().values(), loaded.state_dict().values(), strict=True)
    )

    pickled = tmp_path / "evil.pt"
    torch.save({"x": 1}, pickled)
    with pytest.raises(ValueError, match="not readable as safetensors.*Pickled checkpoints are refused"):
        load_field(pickled)
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"\x00" * 64)
    with pytest.raises(ValueError, match="safetensors"):
        load_field(junk)
    from safetensors.torch import save_file

    other = tmp_path / "other.safetensors"
    save_file({"a": torch.zeros(2)}, str(other))
    with pytest.raises(ValueError, match="not a lightning-gfm field"):
        load_field(other)
    with pytest.raises(FileNotFoundError, match="`field` file not found"):
        load_field(tmp_path / "missing.safetensors")


def test_public_names_resolve():
    for name in lightning_gfm.__all__:
        assert getattr(lightning_gfm, name) is not None, name


def test_import_weight():
    code = (
        "import sys, lightning_gfm; bad = [m for m in ('torchdyn', 'wandb') if m in sys.modules]; assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def _counted(spec: ParamSpec, target: torch.Tensor, screen_offset: float = 0.0):
    """``(calls, evaluate, screen)``: the mean distance to ``target``, each metric counting its calls; the screen
    is a cheaper, noisier look (here the same metric plus ``screen_offset``)."""
    calls = {"full": 0, "screen": 0}

    def metric(kind: str, offset: float = 0.0) -> float:
        calls[kind] += 1
        return float((spec.flatten() - target).abs().mean()) + offset

    return calls, lambda: metric("full"), lambda: metric("screen", screen_offset)


def test_screening_evaluates_only_the_best_two_in_full():
    model = _model()
    spec = ParamSpec.from_module(model)
    path = _path(spec, [0.0, 1.0, 2.0, 3.5, 5.0])
    calls, evaluate, screen = _counted(spec, spec.flatten() + 3.0, screen_offset=0.1)
    decision = choose_and_apply(spec, path, evaluate, screen=screen, keep=2)
    # the current weights and every candidate screened; the best two (3.5 and 2.0 from the target 3) in full
    assert calls == {"full": 1 + 2, "screen": 1 + 4}
    assert decision.outcome is JumpOutcome.ACCEPTED and decision.index == 3
    assert [math.isnan(m) for m in decision.metrics] == [True, False, False, True]
    assert decision.screened == pytest.approx([2.1, 1.1, 0.6, 2.1])
    assert decision.ranking() == [3, 2, 4, 1]  # full first, then the screen (ties: the farther)


def test_screening_rejects_cheaply_when_no_candidate_beats_the_current_weights():
    model = _model()
    spec = ParamSpec.from_module(model)
    target = spec.flatten()
    before = spec.flatten().clone()
    path = _path(spec, [0.0, 1.0, 2.0, 3.0, 4.0])
    calls = []

    def evaluate():
        calls.append("full")
        return float((spec.flatten() - target).abs().mean())

    decision = choose_and_apply(spec, path, evaluate, screen=evaluate, keep=2)
    # the current weights' screen and four screens: neither a candidate nor the current weights in full
    assert len(calls) == 1 + 4
    assert decision.outcome is JumpOutcome.ROLLED_BACK and decision.index is None
    assert all(math.isnan(m) for m in decision.metrics)
    assert decision.metric_before == decision.screen_before == 0.0  # the screen's value: nothing else was needed
    assert torch.equal(spec.flatten(), before)


def test_a_known_screen_of_the_current_weights_is_not_evaluated_again():
    model = _model()
    spec = ParamSpec.from_module(model)
    path = _path(spec, [0.0, 1.0, 2.0, 3.0, 4.0])
    calls, evaluate, screen = _counted(spec, spec.flatten() + 3.0)
    decision = choose_and_apply(spec, path, evaluate, screen=screen, screen_before=3.0, keep=2)
    # four screens; then the current weights and the best two in full, the current weights after the screen
    assert calls == {"screen": 4, "full": 1 + 2}
    assert decision.screen_before == 3.0 and decision.metric_before == pytest.approx(3.0)
    assert decision.outcome is JumpOutcome.ACCEPTED and decision.index == 3


def test_a_screened_point_is_completed_from_its_screen_not_evaluated_again():
    model = _model()
    spec = ParamSpec.from_module(model)
    target = spec.flatten() + 3.0
    path = _path(spec, [0.0, 1.0, 2.0, 3.5, 5.0])
    calls = {"screen": 0, "full": 0, "complete": 0}

    def distance() -> float:
        return float((spec.flatten() - target).abs().mean())

    def screen():
        calls["screen"] += 1
        return (distance() + 0.1, spec.flatten().clone())  # the token carries what it screened

    class Token(tuple):
        def __float__(self):
            return self[0]

    def complete(token):
        calls["complete"] += 1
        assert torch.equal(token[1], spec.flatten())  # completed at the weights it screened
        return token[0] - 0.1

    def full():
        calls["full"] += 1
        return distance()

    decision = choose_and_apply(spec, path, full, screen=lambda: Token(screen()), keep=2, complete=complete)
    assert calls == {"screen": 1 + 4, "full": 0, "complete": 1 + 2}
    assert decision.outcome is JumpOutcome.ACCEPTED and decision.index == 3
    assert decision.metric_before == pytest.approx(3.0)


def _five_candidates():
    """A model, its weights, a path of four candidates (the best at 3.5) and counted full / screen metrics."""
    spec = ParamSpec.from_module(_model())
    before = spec.flatten().clone()
    path = _path(spec, [0.0, 1.0, 2.0, 3.5, 5.0])
    calls, evaluate, screen = _counted(spec, spec.flatten() + 3.0, screen_offset=0.1)
    return spec, before, path, calls, evaluate, screen


def test_an_unaffordable_full_evaluation_restores_the_weights_and_evaluates_nothing_in_full():
    spec, before, path, calls, evaluate, screen = _five_candidates()
    asked = []
    decision = choose_and_apply(spec, path, evaluate, screen=screen, keep=2, afford=lambda n: asked.append(n) and False)
    assert asked == [1 + 2]  # the current weights and the best two, asked for at once
    assert calls == {"screen": 1 + 4, "full": 0}
    assert decision.outcome is JumpOutcome.OVER_BUDGET and decision.index is None
    assert decision.metric_before == decision.screen_before
    assert torch.equal(spec.flatten(), before)


def test_a_screen_that_raises_over_budget_ends_the_attempt_with_the_weights_restored():
    from lightning_gfm.jump import OverBudget

    spec, before, path, calls, evaluate, screen = _five_candidates()

    def dear_screen():
        if calls["screen"] == 2:
            raise OverBudget
        return screen()

    decision = choose_and_apply(spec, path, evaluate, screen=dear_screen, keep=2)
    assert calls == {"screen": 2, "full": 0}
    assert decision.outcome is JumpOutcome.OVER_BUDGET and torch.equal(spec.flatten(), before)
