"""Judge a jump where it settles: train the no-jump reference and the best landed candidates a few steps, compare.

A forecast that is right in most directions but overshoots in a few stiff ones spikes the loss where it lands, and
a few optimizer steps repair the spike; judged where it lands, such a jump is thrown away although it pays.
:func:`settle_and_choose` trains the reference (the current weights, no jump) ``steps`` optimizer steps on a fixed
set of training batches, then each candidate the same steps on the same batches, and keeps a candidate only if it
beats the settled reference. A candidate that is already behind the reference half-way stops there (early
stopping), so a hopeless one costs half. The winner keeps its settling steps as progress: the settled reference
when no candidate wins, the settled candidate otherwise; every other branch is rolled back bit-exactly
(:class:`TrainingState`: weights, optimizer state, module buffers).

:class:`AttemptBudget` is the do-no-harm rule around it: GFM spends on attempts no more than ``overhead`` of the
run's planned training time plus the time its accepted jumps saved, so a run that GFM cannot speed up loses about
``overhead`` of its wall-clock, and a run that it speeds up pays for its attempts with its own savings.

Pure torch: the Lightning adapter supplies the training step and the evaluation as callables.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from lightning_gfm.jump import better


@dataclass
class TrainingState:
    """A copy of everything a private optimizer step changes: tracked weights, optimizer state, module buffers.

    Memory: one copy of the tracked weights and of the optimizer's state tensors (``(1 + n_state) * P`` scalars),
    plus the module's buffers (BatchNorm statistics).
    """

    params: list[Tensor]
    optimizer: list[dict[str, Any]]
    buffers: list[Tensor]

    @classmethod
    @torch.no_grad()
    def capture(cls, module: nn.Module, optimizer: torch.optim.Optimizer, params: Sequence[Tensor]) -> TrainingState:
        """Copy ``params`` (the tracked tensors, local shards when sharded), their optimizer state, the buffers."""
        state = [
            {k: (v.detach().clone() if isinstance(v, Tensor) else v) for k, v in optimizer.state.get(p, {}).items()}
            for p in params
        ]
        return cls(
            params=[p.detach().clone() for p in params],
            optimizer=state,
            buffers=[b.detach().clone() for b in module.buffers()],
        )

    @torch.no_grad()
    def restore(self, module: nn.Module, optimizer: torch.optim.Optimizer, params: Sequence[Tensor]) -> None:
        """Write the copy back in place (the tensors' identities never change)."""
        for p, saved, state in zip(params, self.params, self.optimizer, strict=True):
            p.detach().copy_(saved)
            if not state:
                optimizer.state.pop(p, None)
                continue
            live = optimizer.state[p]
            for k in [k for k in live if k not in state]:
                del live[k]
            for k, v in state.items():
                current = live.get(k)
                if isinstance(v, Tensor) and isinstance(current, Tensor) and current.shape == v.shape:
                    current.copy_(v)
                else:
                    live[k] = v.clone() if isinstance(v, Tensor) else v
        for b, saved in zip(module.buffers(), self.buffers, strict=True):
            b.copy_(saved)


@dataclass
class Settled:
    """Result of :func:`settle_and_choose`.

    Attributes:
        index: the candidate kept (an index of the forecast path), ``None`` when the settled reference was kept.
        reference: the reference's metric half-way and after ``steps`` steps.
        candidates: ``(index, metric half-way, metric at the end or NaN when stopped early)`` per tried candidate.
        steps: private optimizer steps taken in all branches.
        kept: of them, the winner's (progress the run keeps).
    """

    index: int | None
    reference: tuple[float, float]
    candidates: list[tuple[int, float, float]] = field(default_factory=list)
    steps: int = 0
    kept: int = 0

    @property
    def metric(self) -> float:
        """The kept branch's settled metric."""
        if self.index is None:
            return self.reference[1]
        return next(end for k, _, end in self.candidates if k == self.index)


def settle_and_choose(
    candidates: Sequence[int],
    *,
    land: Callable[[int], None],
    step: Callable[[int], None],
    evaluate: Callable[[], float],
    capture: Callable[[], Any],
    restore: Callable[[Any], None],
    steps: int,
    mode: str = "min",
    min_delta: float = 0.0,
) -> Settled:
    """Settle the reference and ``candidates`` ``steps`` optimizer steps each; keep the first candidate that wins.

    The model holds the reference (the current weights) on entry; on return it holds the kept branch, settled.

    Args:
        candidates: path indices to try, in order (the first winner is kept).
        land: writes candidate ``k`` (weights and optimizer state) onto the start, which is restored before.
        step: one optimizer step on settling batch ``i`` (every branch sees batches ``0 .. steps - 1``).
        evaluate: the monitored metric of the weights in the model (every rank returns the same number).
        capture: returns a copy of the training state (:meth:`TrainingState.capture`).
        restore: writes such a copy back.
        steps: optimizer steps per branch (``>= 1``); a candidate behind the reference after ``steps // 2`` stops.
        mode: ``"min"`` or ``"max"``.
        min_delta: relative improvement over the settled reference a candidate must show.

    Returns:
        The :class:`Settled` decision.
    """
    if steps < 1:
        raise ValueError(f"`steps` must be >= 1, got {steps!r}.")
    half = max(steps // 2, 1)
    start = capture()
    taken = 0
    ref_half = float("nan")
    try:
        for i in range(steps):
            step(i)
            taken += 1
            if i + 1 == half and half < steps:
                ref_half = float(evaluate())
        ref_end = float(evaluate())
        if half == steps:
            ref_half = ref_end
        reference = capture()
        result = Settled(None, (ref_half, ref_end), steps=taken, kept=steps)
        for k in candidates:
            restore(start)
            land(k)
            mid, end = float("nan"), float("nan")
            for i in range(steps):
                step(i)
                result.steps += 1
                if i + 1 == half:
                    mid = float(evaluate()) if half < steps else float("nan")
                    if half < steps and not _at_least(mid, ref_half, mode):
                        break
            else:
                end = float(evaluate())
            result.candidates.append((k, mid, end))
            if math.isfinite(end) and better(end, ref_end, mode, min_delta):
                result.index, result.kept = k, steps
                return result
        restore(reference)
        return result
    except BaseException:
        restore(start)
        raise


def settling_cost(n_candidates: int, steps: int, *, step_seconds: float, eval_seconds: float) -> float:
    """Seconds a settling is predicted to cost the run: the discarded branches' steps and every evaluation.

    Exactly one branch of ``steps`` steps is always kept (the settled reference, or the winning candidate in its
    place) and is the run's own progress, credited back by :meth:`AttemptBudget.earn`; so the cost is the other
    ``n_candidates`` branches' steps (an upper bound: a candidate behind half-way stops there) and the two
    evaluations of each of the ``1 + n_candidates`` branches.

    Example:
        >>> settling_cost(2, 30, step_seconds=0.01, eval_seconds=0.05)  # 60 discarded steps, 6 evaluations
        0.9
    """
    return n_candidates * steps * step_seconds + (1 + n_candidates) * 2 * eval_seconds


def _at_least(a: float, b: float, mode: str) -> bool:
    """Whether ``a`` is at least as good as ``b`` (NaN never is)."""
    if not math.isfinite(a):
        return False
    return a <= b if mode == "min" else a >= b


class AttemptBudget:
    """The do-no-harm rule: what GFM may still spend on attempts.

    GFM may spend ``overhead`` of the run's planned training time, plus the training time its accepted jumps
    saved (their horizons times the mean time of an optimizer step) and its kept settling steps, on recording and
    attempts. An attempt (or its
    settling) whose predicted cost would exceed what is left is skipped. So a run whose jumps keep failing is slowed
    by about ``overhead``, and one whose jumps pay keeps attempting.

    Args:
        overhead: share of the planned training time (``0.03`` = 3 %); ``None`` means no limit.

    Example:
        >>> budget = AttemptBudget(0.03)
        >>> budget.allows(0.5, step_seconds=0.01, planned_steps=1000, spent=0.0)  # 0.5 s > 3 % of 10 s
        False
        >>> budget.earn(100)  # an accepted jump of 100 steps saved about 1 s
        >>> budget.allows(0.5, step_seconds=0.01, planned_steps=1000, spent=0.0)
        True
    """

    def __init__(self, overhead: float | None = 0.03) -> None:
        self.overhead = overhead
        self.saved_steps = 0
        self.skipped = 0

    def earn(self, steps: int) -> None:
        """Credit an accepted jump of ``steps`` optimizer steps."""
        self.saved_steps += int(steps)

    def allowance(self, *, step_seconds: float, planned_steps: int) -> float:
        """Seconds GFM may spend in all at this point of the run."""
        if self.overhead is None:
            return math.inf
        return step_seconds * (self.overhead * planned_steps + self.saved_steps)

    def allows(self, predicted: float, *, step_seconds: float, planned_steps: int, spent: float) -> bool:
        """Whether spending ``predicted`` more seconds, after ``spent``, stays within the allowance."""
        return spent + predicted <= self.allowance(step_seconds=step_seconds, planned_steps=planned_steps)

    def state_dict(self) -> dict[str, int]:
        """Plain values for checkpoints."""
        return {"saved_steps": self.saved_steps, "skipped": self.skipped}

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Restore from :meth:`state_dict`."""
        self.saved_steps = int(state.get("saved_steps", 0))
        self.skipped = int(state.get("skipped", 0))
