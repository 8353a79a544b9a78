"""Choose a point of the forecast path, accept it or roll back exactly, and set the optimizer state after it."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from enum import Enum
from typing import Any

import torch
from torch import Tensor

from lightning_gfm.dynamics import Dynamics, write_state
from lightning_gfm.forecast import ForecastPath
from lightning_gfm.params import ParamSpec


class JumpOutcome(str, Enum):
    """Why a jump ended the way it did."""

    ACCEPTED = "accepted"
    """The best candidate beat staying put by ``min_delta``; the weights moved there."""
    ROLLED_BACK = "rolled_back"
    """No candidate beat staying put; weights restored bit-exactly."""
    NON_FINITE = "non_finite"
    """Every candidate had a non-finite weight, state or metric; nothing was applied."""
    NO_FORECAST = "no_forecast"
    """The window was too short or the horizon empty; nothing was tried."""
    OVER_BUDGET = "over_budget"
    """A candidate passed the screen, but evaluating it in full would exceed the do-no-harm budget; weights
    restored bit-exactly, the screens spent."""


class StatePolicy(str, Enum):
    """What happens to the optimizer state after an accepted jump.

    * ``keep``: leave moments and buffers as they were at the anchor.
    * ``reset``: forget the state, as if the optimizer started afresh at the new weights.
    * ``forecast``: write the optimizer state the ODE carried to the chosen horizon (``GFMCallback``'s default,
      chosen by ``benchmarks/state_policy.py``: best median test loss with Adam, a tie with SGD momentum).
    """

    KEEP = "keep"
    RESET = "reset"
    FORECAST = "forecast"


class OverBudget(Exception):
    """Raised by an evaluation passed to :func:`choose_and_apply` to stop an attempt the budget cannot afford.

    The weights are restored bit-exactly and the decision is ``OVER_BUDGET``.
    """


@dataclass
class JumpRecord:
    """One attempted jump, as kept in ``GFMCallback.jumps`` and written to checkpoints.

    Attributes:
        step: global step at which it was tried.
        horizon: steps ahead of the chosen point (0 when nothing was applied).
        accepted: whether the weights moved.
        metric_before: monitored metric at the current weights (on the screen's one batch when the screen
            rejected every candidate: nothing was then evaluated in full).
        metric_after: monitored metric after the decision (equals ``metric_before`` when rolled back).
        outcome: the reason, a :class:`JumpOutcome` value.
        seconds: wall-clock of fitting, forecasting and evaluating.
        candidates: ``(horizon, metric)`` of every point evaluated in full (path by path when several were joined).
        screened: ``(horizon, metric on the first evaluation batch)`` of every point, when candidates were screened
            (``eval_batches > 1`` and more candidates than are evaluated in full); else empty.
        fit_loss: flow-matching loss of the field after this jump's fit (NaN when not fitted).
        backtest_fitted: backtest relative error of the fitted field (1.0 = standing still; NaN when off).
        backtest_prior: the same for the prior (constant-gradient) field; the better of the two forecasts.
        trend: when the forecast joined several trend lines (``GFMCallback(branch_trends=...)``), the length of
            the one the chosen point came from (0 when nothing was applied, or for a single forecast).
        source: which forecaster the applied point came from: ``"meta"`` (the meta-trained field) or ``"prior"``
            (the optimizer-aware prior, or a fitted field); empty when nothing was applied.
    """

    step: int
    horizon: int
    accepted: bool
    metric_before: float
    metric_after: float
    outcome: str
    seconds: float
    candidates: list[tuple[int, float]] = field(default_factory=list)
    fit_loss: float = float("nan")
    backtest_fitted: float = float("nan")
    backtest_prior: float = float("nan")
    trend: int = 0
    screened: list[tuple[int, float]] = field(default_factory=list)
    source: str = ""

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> JumpRecord:
        """A record from :func:`dataclasses.asdict`'s dict, as checkpoints store it.

        Keys of fields this version no longer has (a checkpoint from before ``settle`` was removed holds
        ``settle_steps``, ``settle_kept``, ``settled``, ``settle_reference``) are dropped.
        """
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in values.items() if k in names})


@dataclass
class Decision:
    """Result of :func:`choose_and_apply`.

    Attributes:
        index: index of the applied point of the path, ``None`` when rolled back (``0``: the path's start,
            when it is not the current weights, e.g. a denoised anchor).
        metric_before: metric at the current weights; when the screen rejected every candidate (nothing was
            evaluated in full, so the full metric was never needed) it is the screen's, ``screen_before``.
        metrics: metric of each path point after the start (NaN for non-finite points, and for points the screen
            dropped).
        outcome: the reason.
        metric_start: metric of the path's start when it was evaluated, else ``None``.
        screened: with a screen, each point's screening metric (NaN for non-finite points); else empty.
        screen_before: the screening metric at the current weights (NaN without a screen).
    """

    index: int | None
    metric_before: float
    metrics: list[float]
    outcome: JumpOutcome
    metric_start: float | None = None
    screened: list[float] = field(default_factory=list)
    screen_before: float = float("nan")

    def ranking(self, mode: str = "min") -> list[int]:
        """Path indices of the finite candidates, best first: those evaluated in full, then the screened rest.

        Ties go to the farther point.
        """
        sign = 1.0 if mode == "min" else -1.0

        def order(values: list[float], skip: set[int]) -> list[int]:
            pairs = [(v, k + 1) for k, v in enumerate(values) if math.isfinite(v) and k + 1 not in skip]
            return [k for _, k in sorted(pairs, key=lambda vk: (sign * vk[0], -vk[1]))]

        full = order(self.metrics, set())
        return full + order(self.screened, set(full))

    @property
    def metric_after(self) -> float:
        """Metric of the weights left in place."""
        if self.index is None:
            return self.metric_before
        return self.metric_start if self.index == 0 else self.metrics[self.index - 1]


def better(a: float, b: float, mode: str, min_delta: float) -> bool:
    """Whether ``a`` beats ``b`` by more than ``min_delta`` (relative to ``|b|``) in ``mode``."""
    if not math.isfinite(a):
        return False
    margin = min_delta * abs(b)
    return a < b - margin if mode == "min" else a > b + margin


def choose_and_apply(
    spec: ParamSpec,
    path: ForecastPath,
    evaluate: Callable[[], float],
    *,
    mode: str = "min",
    min_delta: float = 0.0,
    metric_before: float | None = None,
    evaluate_start: bool = False,
    start_is_candidate: bool = True,
    screen: Callable[[], Any] | None = None,
    screen_before: Any = None,
    keep: int = 2,
    complete: Callable[[Any], float] | None = None,
    afford: Callable[[int], bool] | None = None,
) -> Decision:
    """Evaluate every point of ``path`` in place, then keep the best one or restore the weights bit-exactly.

    Args:
        spec: the tracked parameters (written in place; ``id(p)`` never changes).
        path: the forecast; point 0 is the anchor and is not re-evaluated.
        evaluate: returns the monitored metric of the weights currently in the model (all ranks must return
            the same number).
        mode: ``"min"`` or ``"max"``.
        min_delta: relative improvement over staying put that a jump must show.
        metric_before: the metric at the current weights, when already known; otherwise it is evaluated only
            when a candidate is to be evaluated in full (a screen that rejects every candidate never needs it).
        evaluate_start: also evaluate point 0, the path's start (for paths that start from a denoised point
            rather than the current weights).
        start_is_candidate: with ``evaluate_start``, whether the start may be chosen; if not, it is a second
            reference that a jump must beat as well as the current weights (what denoising alone buys is
            discounted, so that only progress along the path earns a jump).
        screen: a cheaper metric (e.g. ``evaluate`` on one of its batches): with more than ``keep`` candidates,
            every candidate is screened with it, and only the best ``keep`` are evaluated in full, and only if one
            of them beats the current weights' screen (successive halving: a failing attempt costs its screen).
        screen_before: the screen's result at the current weights, when already known.
        keep: candidates evaluated in full after the screen.
        complete: with ``screen``, evaluates in full the weights in the model from that point's screen result
            (e.g. the remaining batches added to the screen's sums), so the screen's batch is not evaluated
            twice; ``screen`` then returns a result whose ``float()`` is its metric. Without it, ``evaluate``.
        afford: called with the number of full evaluations about to be made, before the first of them; when it
            returns False nothing is evaluated in full and the weights are restored (``OVER_BUDGET``). An
            evaluation may also raise :class:`OverBudget` (e.g. a screen the budget cannot afford), to the same end.

    Returns:
        The :class:`Decision`.
    """
    saved = [p.detach().clone() for p in spec.tensors]  # local shards when sharded
    before = metric_before
    finite = path.finite()
    n = len(path.horizons) - 1
    metrics = [float("nan")] * n
    screened: list[float] = []
    screen_value = float("nan")
    start_metric = None
    tokens: dict[int, Any] = {}  # screen results by path index (-1: the current weights), for ``complete``

    def full_metric(key: int) -> float:
        return float(complete(tokens[key])) if complete is not None and key in tokens else float(evaluate())

    if screen_before is not None:
        tokens[-1] = screen_before
    try:
        full = [h for h in range(1, n + 1) if bool(finite[h])]
        if screen is not None and len(full) > keep:
            tokens[-1] = screen() if screen_before is None else screen_before
            screen_value = float(tokens[-1])
            screened = [float("nan")] * n
            for h in full:
                spec.write_(path.weights[h].to(spec.device))
                tokens[h] = screen()
                screened[h - 1] = float(tokens[h])
            sign = 1.0 if mode == "min" else -1.0
            ranked = sorted((h for h in full if math.isfinite(screened[h - 1])), key=lambda h: sign * screened[h - 1])
            full = ranked[:keep] if any(better(screened[h - 1], screen_value, mode, 0.0) for h in ranked) else []
        need_before = before is None and bool(full or evaluate_start or not screened)
        n_full = len(full) + int(need_before) + int(evaluate_start and bool(finite[0]))
        if afford is not None and n_full and not afford(n_full):
            _restore(spec, saved)
            over = screen_value if before is None else before
            return Decision(None, over, metrics, JumpOutcome.OVER_BUDGET, None, screened, screen_value)
        if need_before:
            _restore(spec, saved)
            before = full_metric(-1)
        if evaluate_start and bool(finite[0]):
            spec.write_(path.weights[0].to(spec.device))
            start_metric = float(evaluate())
        for h in full:
            spec.write_(path.weights[h].to(spec.device))
            metrics[h - 1] = full_metric(h)
    except OverBudget:
        _restore(spec, saved)
        over = screen_value if before is None else before
        return Decision(None, over, metrics, JumpOutcome.OVER_BUDGET, start_metric, screened, screen_value)
    except BaseException:
        _restore(spec, saved)
        raise
    if before is None:  # the screen rejected every candidate: the full metric was never needed
        before = screen_value
    first = None if start_metric is not None and not start_is_candidate else start_metric
    valid = [(m, k) for k, m in enumerate([first, *metrics]) if m is not None and math.isfinite(m)]
    extra = dict(screened=screened, screen_before=screen_value)
    if not valid:
        _restore(spec, saved)
        outcome = JumpOutcome.ROLLED_BACK if any(math.isfinite(m) for m in screened) else JumpOutcome.NON_FINITE
        return Decision(None, before, metrics, outcome, start_metric, **extra)
    # ties go to the farther point: the same metric for more steps saved
    best_metric, best = min(valid, key=lambda mk: (mk[0], -mk[1])) if mode == "min" else max(valid)
    bar = before
    if start_metric is not None and not start_is_candidate and math.isfinite(start_metric):
        bar = min(before, start_metric) if mode == "min" else max(before, start_metric)
    if better(best_metric, bar, mode, min_delta):
        spec.write_(path.weights[best].to(spec.device))
        return Decision(best, before, metrics, JumpOutcome.ACCEPTED, start_metric, **extra)
    _restore(spec, saved)
    return Decision(None, before, metrics, JumpOutcome.ROLLED_BACK, start_metric, **extra)


@torch.no_grad()
def _restore(spec: ParamSpec, saved: list[Tensor]) -> None:
    for p, t in zip(spec.tensors, saved, strict=False):
        p.detach().copy_(t)


def apply_state_policy(
    optimizer: torch.optim.Optimizer,
    spec: ParamSpec,
    policy: StatePolicy,
    path: ForecastPath,
    index: int,
    dynamics: Dynamics,
) -> None:
    """Settle the optimizer state after moving to ``path`` point ``index`` (see :class:`StatePolicy`).

    Under ``forecast`` the written state is the one the ODE carried ``path.state_ahead(index)`` steps ahead, and
    ``dynamics`` (the optimizer's family) advances the optimizer's step counter by as much (every family's counter,
    so that state and counter agree; Adam's bias corrections and NAdam's momentum schedule read it): a forecast
    second moment divided by the bias correction of the anchor's step would shrink every later step
    (docs/experiments.md, E50).
    """
    if policy is StatePolicy.KEEP:
        return
    if policy is StatePolicy.RESET:
        for p in spec.params:
            optimizer.state.pop(p, None)
        return
    state = {n: v[index].to(spec.device) for n, v in path.state.items()}
    if "exp_avg_sq" in state:
        state["exp_avg_sq"] = state["exp_avg_sq"].clamp_min(0)
    if "square_avg" in state:
        state["square_avg"] = state["square_avg"].clamp_min(0)
    write_state(optimizer, spec, state)
    dynamics.advance_counters(optimizer, spec, path.state_ahead(index))
