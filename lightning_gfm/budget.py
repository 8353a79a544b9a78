"""When GFM records and attempts (:func:`auto_schedule`), and the do-no-harm budget: what it may still spend.

GFM spends on attempts no more than ``overhead`` of the run's planned training time plus the time its accepted
jumps saved, so a run that GFM cannot speed up loses about ``overhead`` of its wall-clock, and a run that it speeds
up pays for its attempts with its own savings. Pure Python: the Lightning adapter measures the time and asks.
"""

from __future__ import annotations

import math


def auto_schedule(
    total_steps: int | None, record_every: int | None = None, jump_every: int | None = None
) -> tuple[int, int]:
    """The recording and jumping intervals GFM uses when they are not given.

    A jump is attempted every sixth of the planned training and the window records ten snapshots per jump
    interval, so a forecast of about one interval ahead rests on a trend measured over a comparable stretch.

    Args:
        total_steps: planned optimizer steps of the run (``None`` when unknown: a jump every 200 steps).
        record_every: a given recording interval, kept as is.
        jump_every: a given jump interval, kept as is.

    Returns:
        ``(record_every, jump_every)``.

    Example:
        >>> auto_schedule(2000), auto_schedule(None), auto_schedule(2000, record_every=5)
        ((33, 333), (20, 200), (5, 333))
    """
    if jump_every is None:
        jump_every = 200 if total_steps is None else max(6, round(total_steps / 6))
    if record_every is None:
        record_every = max(1, round(jump_every / 10))
    return record_every, jump_every


class AttemptBudget:
    """The do-no-harm rule: what GFM may still spend on attempts.

    GFM may spend ``overhead`` of the run's planned training time, plus the training time its accepted jumps
    saved (their horizons times the mean time of an optimizer step), on recording and attempts. An attempt (or
    one of its evaluations) whose predicted cost would exceed what is left is skipped. So a run whose jumps keep
    failing is slowed by about ``overhead``, and one whose jumps pay keeps attempting.

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
