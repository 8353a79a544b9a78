"""Every refusal of GFMCallback: bad arguments at construction, unsupported set-ups when fit starts."""

import math
import pathlib
import pickle
from types import SimpleNamespace

import lightning.pytorch as pl
import pytest
import torch
from models import DigitsModule, tiny_trainer

from lightning_gfm import GFMCallback

FAST = dict(record_every=2, jump_every=20, window=12, trend=4, fit_steps=10, fit_batch=512, eval_batches=2)


# ------------------------------------------------------------------------------------------ arguments
@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("record_every", 0),
        ("record_every", -1),
        ("record_every", 1.5),
        ("record_every", True),
        ("window", 3),
        ("window", 10.0),
        ("jump_every", 0),
        ("jump_every", "10"),
        ("horizon", 0),
        ("horizon", 2.5),
        ("n_candidates", 0),
        ("eval_batches", 0),
        ("fit_steps", -1),
        ("fit_batch", 0),
        ("backtest", -1),
        ("history", 0),
        ("hidden", 0),
        ("span", 0),
        ("chunk_size", 0),
        ("seed", -1),
        ("seed", False),
    ],
)
def test_integer_arguments_are_checked(name, value):
    with pytest.raises(ValueError, match=rf"`{name}` must be an int >= \d+, got {value!r}"):
        GFMCallback(overhead=None, **{name: value})


@pytest.mark.parametrize(
    ("kwargs", "minimum"),
    [
        (dict(window=7, anchor="state"), 8),  # history 3 + backtest 3 + 2
        (dict(window=9, history=5, anchor="velocity"), 10),
        (dict(window=5, backtest=0, anchor="state"), 6),  # max(backtest, 1)
    ],
)
def test_window_too_short_for_history_and_backtest(kwargs, minimum):
    with pytest.raises(ValueError, match=rf"`window` must be >= history \+ max\(backtest, 1\) \+ 2 = {minimum}"):
        GFMCallback(overhead=None, **kwargs)
    GFMCallback(overhead=None, **{**kwargs, "window": minimum})  # the bound itself is accepted


@pytest.mark.parametrize(
    ("kwargs", "minimum"),
    [
        (dict(window=11), 12),  # the default trend of 8 snapshots: anchor 7 + backtest 3 + 2
        (dict(window=19, trend=16), 20),
        (dict(window=7, trend=2, history=4), 9),
    ],
)
def test_window_too_short_for_the_trend(kwargs, minimum):
    with pytest.raises(
        ValueError, match=rf"`window` must be >= max\(history, trend - 1\) \+ max\(backtest, 1\) \+ 2 = {minimum}"
    ):
        GFMCallback(overhead=None, **kwargs)
    GFMCallback(overhead=None, **{**kwargs, "window": minimum})  # the bound itself is accepted


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(memory_budget="lots"), "`memory_budget` must be a positive number of bytes, .* got 'lots'"),
        (dict(memory_budget=0), "`memory_budget` must be a positive number of bytes, .* got 0"),
        (dict(anchor="smooth"), "`anchor` must be 'state', 'velocity' or 'trend', got 'smooth'"),
        (dict(trend=1), "`trend` must be an int >= 2, got 1"),
        (dict(spacing="log"), "`spacing` must be 'geometric' or 'even', got 'log'"),
    ],
)
def test_anchor_trend_and_spacing_are_checked(kwargs, message):
    with pytest.raises(ValueError, match=message):
        GFMCallback(overhead=None, **kwargs)


@pytest.mark.parametrize(
    ("name", "value", "pattern"),
    [
        ("monitor", "", "`monitor` must be a non-empty metric name"),
        ("monitor", None, "`monitor` must be a non-empty metric name"),
        ("mode", "avg", "`mode` must be 'min' or 'max', got 'avg'"),
        ("min_delta", -0.1, "`min_delta` must be a finite number >= 0"),
        ("min_delta", math.nan, "`min_delta` must be a finite number >= 0"),
        ("min_delta", math.inf, "`min_delta` must be a finite number >= 0"),
        ("min_delta", "0.1", "`min_delta` must be a finite number >= 0"),
        ("fit_seconds", 0, "`fit_seconds` must be a positive number of seconds or None"),
        ("fit_seconds", -1.0, "`fit_seconds` must be a positive number of seconds or None"),
        ("optimizer_state", "bogus", r"`optimizer_state` must be one of \['keep', 'reset', 'forecast'\], got 'bogus'"),
        ("solver", "dopri5", r"`solver` must be one of \('euler', 'midpoint', 'rk4'\), got 'dopri5'"),
        ("buffer_dtype", torch.int64, "`buffer_dtype` must be a floating torch.dtype"),
        ("buffer_dtype", "int8", "`buffer_dtype` must be a floating torch.dtype"),
        ("field", 42, "`field` must be a path to a saved field or None, got int"),
    ],
)
def test_other_arguments_are_checked(name, value, pattern):
    with pytest.raises(ValueError, match=pattern):
        GFMCallback(overhead=None, **{name: value})


def test_missing_field_file(tmp_path):
    missing = tmp_path / "nope.safetensors"
    with pytest.raises(FileNotFoundError, match="`field` file not found"):
        GFMCallback(overhead=None, field=missing)
    with pytest.raises(FileNotFoundError, match="`field` file not found"):
        GFMCallback(overhead=None, field=str(tmp_path))  # a directory is not a field file


def test_valid_arguments_are_stored():
    cb = GFMCallback(
        overhead=None,
        record_every=3,
        window=12,
        min_delta=0,
        fit_seconds=2,
        solver="euler",
        buffer_dtype=torch.bfloat16,
    )
    assert (cb.record_every, cb.window, cb.min_delta, cb.solver) == (3, 12, 0.0, "euler")
    assert isinstance(cb.min_delta, float) and cb.buffer.dtype == torch.bfloat16


# ---------------------------------------------------------------------------------------- fit set-ups
def _fit(tmp_path, model, cb, max_steps=50, **kwargs):
    trainer = tiny_trainer(tmp_path, [cb], max_steps=max_steps, **kwargs)
    trainer.fit(model)
    return trainer


class _Manual(DigitsModule):
    def __init__(self):
        super().__init__()
        self.automatic_optimization = False

    def training_step(self, batch, batch_idx):
        opt = self.optimizers()
        opt.zero_grad()
        loss = self._loss(batch)
        self.manual_backward(loss)
        opt.step()
        return loss


def test_manual_optimization_is_refused(tmp_path):
    pl.seed_everything(0, verbose=False)
    with pytest.raises(ValueError, match="GFMCallback needs automatic optimization"):
        _fit(tmp_path, _Manual(), GFMCallback(overhead=None, **FAST))


class _TwoOptimizers(DigitsModule):
    def configure_optimizers(self):
        return [torch.optim.SGD(self.net[0].parameters(), lr=0.1), torch.optim.SGD(self.net[2].parameters(), lr=0.1)]


def test_two_optimizers_are_refused(tmp_path):
    pl.seed_everything(0, verbose=False)
    # Lightning itself refuses several optimizers under automatic optimization before GFM sees them ...
    with pytest.raises(RuntimeError, match="manual optimization"):
        _fit(tmp_path, _TwoOptimizers(), GFMCallback(overhead=None, **FAST))
    # ... so GFM's own check is reached only by a trainer that got past that; it names the fix.
    model = _TwoOptimizers()
    trainer = SimpleNamespace(optimizers=model.configure_optimizers())
    with pytest.raises(ValueError, match="GFMCallback needs exactly one optimizer.*returned 2"):
        GFMCallback(overhead=None, **FAST).on_fit_start(trainer, model)


def test_unsupported_strategy_is_refused():
    class FSDPStrategy:  # only the class name matters to the check
        pass

    trainer = SimpleNamespace(strategy=FSDPStrategy())
    with pytest.raises(ValueError, match="supports single-device and DDP strategies; got `FSDPStrategy`"):
        GFMCallback().setup(trainer, DigitsModule(), "fit")
    GFMCallback().setup(trainer, DigitsModule(), "validate")  # other stages are left alone


def test_unsupported_optimizer_is_refused_unless_generic(tmp_path):
    pl.seed_everything(0, verbose=False)
    pattern = r"SGD, Adam, AdamW, RMSprop.*got `Adadelta`.*generic_dynamics=True"
    with pytest.raises(ValueError, match=pattern):
        _fit(tmp_path, DigitsModule(optimizer="adadelta", lr=0.5), GFMCallback(overhead=None, **FAST))

    pl.seed_everything(0, verbose=False)
    cb = GFMCallback(overhead=None, **FAST, generic_dynamics=True)
    trainer = _fit(tmp_path, DigitsModule(optimizer="adadelta", lr=0.5), cb, max_steps=44)
    assert trainer.global_step == 44
    assert type(cb._dyn).__name__ == "GenericDynamics"
    assert cb.jumps and all(math.isfinite(j.metric_after) for j in cb.jumps)


class _AmsGrad(DigitsModule):
    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=1e-3, amsgrad=True)


def test_amsgrad_is_refused(tmp_path):
    pl.seed_everything(0, verbose=False)
    with pytest.raises(ValueError, match="`amsgrad=True` is not supported"):
        _fit(tmp_path, _AmsGrad(), GFMCallback(overhead=None, **FAST))


def test_monitor_not_logged_names_what_was(tmp_path):
    pl.seed_everything(0, verbose=False)
    model = DigitsModule()
    with pytest.raises(ValueError, match=r"`validation_step` did not log 'nope' \(it logged \['val_loss'\]\)") as err:
        _fit(tmp_path, model, GFMCallback(overhead=None, **FAST, monitor="nope"))
    assert "set `monitor`" in str(err.value)
    # the failing evaluation happened before any candidate was written: the module left evaluation cleanly
    assert model.training
    assert "log" not in vars(model)


class _Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (pathlib.Path.touch, (self.marker,))


@pytest.mark.parametrize("kind", ["torch_save", "pickle_payload", "garbage"])
def test_non_safetensors_field_is_refused_without_unpickling(tmp_path, kind):
    path = tmp_path / "field.bin"
    marker = tmp_path / "pwned"
    if kind == "torch_save":
        torch.save({"a": 1}, path)
    elif kind == "pickle_payload":
        path.write_bytes(pickle.dumps(_Payload(marker)))
    else:
        path.write_bytes(bytes(range(256)) * 4)
    cb = GFMCallback(
        overhead=None, **FAST, field=path
    )  # construction only checks the file exists; it is read at fit start
    assert cb.field is None
    pl.seed_everything(0, verbose=False)
    with pytest.raises(ValueError, match="safetensors.*Pickled checkpoints are refused"):
        _fit(tmp_path, DigitsModule(), cb)
    assert not marker.exists()
    assert cb.field is None
