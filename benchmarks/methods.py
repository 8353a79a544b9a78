"""The competitors: callbacks each method adds to the same task, seed and data order.

* ``baseline``: the task's optimizer and schedule alone (it also records its weights for the oracle).
* ``linear``: :class:`LinearJumps`, linear extrapolation of the recorded snapshots (least-squares slope over the
  last 3), with GFM's schedule, candidates, acceptance and rollback (only ``forecast_path`` differs).
* ``ema``: Lightning's :class:`~lightning.pytorch.callbacks.EMAWeightAveraging`; the measured model is the EMA
  model, as Lightning evaluates it during validation and hands it back at the end of training.
* ``gfm``: :class:`~lightning_gfm.GFMCallback` at its defaults (the tasks' :class:`~benchmarks.tasks.JumpSchedule`
  leaves the schedule to them too; only ``eval_batches`` and ``seed`` are passed).
* ``gfm-meta``: the same callback with the meta-trained field shipped with the package
  (``field="pretrained:meta"``, :mod:`lightning_gfm.flow.meta`): its forecast joins the prior's and validation
  chooses among the points of both.
* ``gfm-pretrained``: the same callback starting from the field shipped with the package
  (``field="pretrained"``), frozen (``fit_steps=PRETRAINED_FIT_STEPS``); its backtest against the prior still
  decides, jump by jump, which of the two forecasts.
* ``oracle``: :class:`OracleJumps`, whose forecast is the baseline run's own recorded weights ``h`` steps ahead of
  where the run stands on the baseline's trajectory (its step plus the horizons it already jumped; linearly
  interpolated between records): the ceiling any forecaster reaches with this schedule.
* ``fastforward``: :class:`~benchmarks.competitors.FastForward` (Rahamim et al. 2024): every 6 steps the last
  update is repeated while the loss on the first ``eval_batches`` validation batches falls.
* ``lookahead``: :class:`~benchmarks.competitors.Lookahead`, a SNOO-style outer Nesterov step on the 20-step
  displacement (outer lr 0.7, momentum 0.9; fixed, see :mod:`benchmarks.competitors`).
"""

from __future__ import annotations

import time

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import EMAWeightAveraging
from torch import Tensor

from benchmarks.competitors import FastForward, Lookahead
from benchmarks.tasks import JumpSchedule
from lightning_gfm import GFMCallback
from lightning_gfm.flow.window import Window
from lightning_gfm.forecast import ForecastPath
from lightning_gfm.params import ParamSpec

METHODS = ("baseline", "linear", "ema", "gfm", "gfm-meta", "gfm-pretrained", "oracle", "fastforward", "lookahead")
JUMP_METHODS = ("linear", "gfm", "gfm-meta", "gfm-pretrained", "oracle")
PRETRAINED_FIT_STEPS = 0  # online fine-tuning of the shipped field: measured in docs/pretrained.md


class TimedGFM(GFMCallback):
    """``GFMCallback`` unchanged, except that it keeps the integration time and size of every final forecast."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.forecasts: list[tuple[int, float]] = []  # (scalars integrated x horizons, seconds)

    def forecast_path(self, trainer, pl_module, win, horizons):
        path, info = super().forecast_path(trainer, pl_module, win, horizons)
        self.forecasts.append((win.P, path.seconds))
        return path, info


class LinearJumps(GFMCallback):
    """Linear extrapolation: ``w_last + slope * h``, slope the least-squares fit over the last 3 snapshots."""

    def __init__(self, n_fit: int = 3, **kwargs):
        super().__init__(fit_steps=0, backtest=0, **kwargs)
        self.n_fit = n_fit

    def forecast_path(self, trainer, pl_module, win: Window, horizons: list[int]) -> tuple[ForecastPath, dict]:
        start = time.perf_counter()
        t = win.steps[-self.n_fit :].to(torch.float32).to(win.w.device)
        w = win.w[-self.n_fit :]
        dt = t - t.mean()
        slope = (dt[:, None] * (w - w.mean(0))).sum(0) / dt.pow(2).sum()
        h = torch.tensor([0, *horizons], dtype=torch.float32, device=w.device)
        weights = (w[-1][None] + h[:, None] * slope[None]).to(pl_module.device)
        return ForecastPath([0, *horizons], weights, {}, time.perf_counter() - start), {}


class WeightRecorder(pl.Callback):
    """Records the flat trainable weights every ``every`` optimizer steps (step 0 included), on CPU."""

    def __init__(self, every: int):
        self.every = every
        self.steps: list[int] = []
        self.weights: list[Tensor] = []
        self._spec: ParamSpec | None = None

    def on_train_start(self, trainer, pl_module):
        self._spec = ParamSpec.from_module(pl_module, trainer.optimizers[0])
        self._take(0)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        step = trainer.global_step
        if step % self.every == 0 and (not self.steps or step > self.steps[-1]):
            self._take(step)

    def _take(self, step: int) -> None:
        self.steps.append(step)
        self.weights.append(self._spec.flatten(device="cpu", dtype=torch.float32))

    def trajectory(self) -> tuple[Tensor, Tensor]:
        return torch.tensor(self.steps, dtype=torch.float64), torch.stack(self.weights)


class OracleJumps(GFMCallback):
    """Jumps to the baseline run's own weights ``h`` steps ahead (interpolated between its records).

    "Ahead" counts from where the run is on the baseline's trajectory: after accepted jumps of ``h1, h2, ...``
    steps the run at step ``s`` stands at the baseline's step ``s + h1 + h2 + ...``, so candidates are the
    baseline's weights at ``s + offset + h``. Without the offset, every later "forecast" would point at
    weights the run has already passed, and the oracle would stop being a ceiling.
    """

    def __init__(self, steps: Tensor, weights: Tensor, **kwargs):
        super().__init__(fit_steps=0, backtest=0, **kwargs)
        self.ref_steps, self.ref_weights = steps, weights

    def at(self, step: float) -> Tensor:
        s = self.ref_steps
        step = min(max(step, float(s[0])), float(s[-1]))
        hi = int(torch.searchsorted(s, torch.tensor(step, dtype=torch.float64)).clamp(max=len(s) - 1))
        if float(s[hi]) == step or hi == 0:
            return self.ref_weights[hi]
        lo = hi - 1
        a = (step - float(s[lo])) / float(s[hi] - s[lo])
        return torch.lerp(self.ref_weights[lo], self.ref_weights[hi], a)

    def forecast_path(self, trainer, pl_module, win: Window, horizons: list[int]) -> tuple[ForecastPath, dict]:
        start = time.perf_counter()
        step = int(win.steps[-1]) + sum(j.horizon for j in self.jumps if j.accepted)
        rows = [win.w[-1].float().cpu()] + [self.at(step + h) for h in horizons]
        weights = torch.stack(rows).to(pl_module.device)
        return ForecastPath([0, *horizons], weights, {}, time.perf_counter() - start), {}


def ema_decay(max_steps: int) -> float:
    """EMA decay whose averaging horizon ``1 / (1 - decay)`` is 5 % of the run (0.999 would lag most budgets)."""
    return 1.0 - 1.0 / max(10.0, 0.05 * max_steps)


def make_callbacks(
    method: str, schedule: JumpSchedule, max_steps: int, seed: int, reference: tuple[Tensor, Tensor] | None = None
) -> list[pl.Callback]:
    """The callbacks ``method`` adds (the baseline adds a :class:`WeightRecorder` for the oracle)."""
    shared = dict(schedule.callback_kwargs(), seed=seed)
    if method == "baseline":
        return [WeightRecorder(schedule.resolved(max_steps)["record_every"])]
    if method == "linear":
        return [LinearJumps(**shared)]
    if method == "gfm":
        return [TimedGFM(**shared)]
    if method == "gfm-meta":
        return [TimedGFM(field="pretrained:meta", **shared)]
    if method == "gfm-pretrained":
        return [TimedGFM(field="pretrained", fit_steps=PRETRAINED_FIT_STEPS, **shared)]
    if method == "oracle":
        if reference is None:
            raise ValueError("The oracle needs the baseline's recorded trajectory: run the baseline first.")
        return [OracleJumps(*reference, **shared)]
    if method == "ema":
        return [EMAWeightAveraging(decay=ema_decay(max_steps))]
    if method == "fastforward":
        return [FastForward(eval_batches=schedule.eval_batches)]
    if method == "lookahead":
        return [Lookahead()]
    raise ValueError(f"Unknown method {method!r}; choose from {METHODS}.")


def measured_net(pl_module: pl.LightningModule, callbacks: list[pl.Callback]) -> torch.nn.Module:
    """The network whose test metric counts: the EMA model for ``ema``, the trained module otherwise."""
    for cb in callbacks:
        if isinstance(cb, EMAWeightAveraging) and cb._average_model is not None:
            return cb._average_model.module
    return pl_module
