"""The ring storage of :class:`TrajectoryBuffer`: single-pass recording, order, wrap-around, resume."""

import pickle

import pytest
import torch

from lightning_gfm.dynamics import dynamics_for, take_snapshot
from lightning_gfm.flow.window import Window, anchor_context
from lightning_gfm.params import ParamSpec, per_tensor_rms
from lightning_gfm.trajectory import TrajectoryBuffer


def _trained(steps: int):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.Tanh(), torch.nn.Linear(7, 3))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    spec = ParamSpec.from_module(model, opt)
    x, y = torch.randn(16, 5), torch.randn(16, 3)

    def step():
        opt.zero_grad()
        torch.nn.functional.mse_loss(model(x), y).backward()
        opt.step()

    return spec, opt, dynamics_for(opt, spec), step


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_record_matches_take_snapshot_and_wraps(dtype):
    spec, opt, dyn, step = _trained(0)
    rec, ref = TrajectoryBuffer(3, dtype=dtype), TrajectoryBuffer(3, dtype=dtype)
    for s in range(1, 8):  # 7 records into 3 slots: the ring wraps twice
        step()
        snap = take_snapshot(opt, spec, dyn.state_names, s, into=rec)
        ref.append(take_snapshot(opt, spec, dyn.state_names, s))
        assert snap.step == s and torch.equal(snap.weights, rec[-1].weights)
    assert rec.steps == ref.steps == [5, 6, 7] and rec.opt_steps == [5, 6, 7]
    assert torch.equal(rec.weights(), ref.weights()) and rec.weights().dtype == torch.float32
    for name in dyn.state_names:
        assert torch.equal(rec.state(name), ref.state(name))
    assert torch.equal(rec.lrs(), ref.lrs()) and rec[0].weights.dtype == dtype
    torch.testing.assert_close(rec.weights()[-1], spec.flatten().to(dtype).float(), rtol=0, atol=0)


def test_wrapped_ring_translates_round_trips_and_clears():
    buf = TrajectoryBuffer(3)
    spec, opt, dyn, step = _trained(0)
    for s in range(1, 6):
        step()
        buf.record(opt, spec, dyn.state_names, s)
    before = buf.weights()
    buf.translate_(torch.ones(spec.numel), {"exp_avg": torch.full((spec.numel,), 2.0)})
    torch.testing.assert_close(buf.weights(), before + 1)
    other = TrajectoryBuffer(3)
    other.load_state_dict(pickle.loads(pickle.dumps(buf.state_dict())))
    assert other.steps == buf.steps and torch.equal(other.weights(), buf.weights())
    assert torch.equal(other.state("exp_avg"), buf.state("exp_avg"))
    storage = buf[0].weights.untyped_storage().data_ptr()
    buf.clear()
    assert len(buf) == 0 and buf.steps == []
    step()
    buf.record(opt, spec, dyn.state_names, 1)  # steps restart after a clear, the slots are reused
    assert buf.steps == [1] and buf[0].weights.untyped_storage().data_ptr() == storage
    with pytest.raises(ValueError, match="increasing steps"):
        buf.record(opt, spec, dyn.state_names, 1)
    with pytest.raises(IndexError):
        buf[1]


def test_window_scales_and_contiguous_context_match_gathers():
    spec, opt, dyn, step = _trained(0)
    buf = TrajectoryBuffer(6)
    for s in range(1, 7):
        step()
        buf.record(opt, spec, dyn.state_names, s)
    win = Window.from_buffer(buf, spec, dyn.state_names)
    w, n = buf.weights(), len(spec.params)
    first = torch.tensor(spec.offsets[:-1])
    expected = torch.stack([per_tensor_rms(r, spec.tensor_index(), n, 1e-12) for r in w])[:, first]
    assert torch.equal(win.w_rms_tensor, expected)
    assert torch.equal(win.u, (w[1:] - w[:-1]) / 1.0)
    lo, hi = 3, spec.numel - 2
    view = anchor_context(win, dyn, 4, torch.arange(lo, hi), 3)
    gathered = anchor_context(win, dyn, 4, torch.arange(lo, hi).flip(0), 3)  # not a range: gathers
    assert torch.equal(view.w0, gathered.w0.flip(0)) and torch.equal(view.static, gathered.static.flip(0))
    assert torch.equal(view.g0_norm, gathered.g0_norm.flip(0))
