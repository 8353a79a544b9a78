"""One registry of every benchmark task, by split.

``dev`` (:mod:`benchmarks.tasks`): where the package's defaults are chosen and may be tuned; ``long``
(:mod:`benchmarks.long`): dev runs long enough to afford a settled attempt, kept apart so that the ``dev``
median stays comparable with earlier runs. ``heldout``
(:mod:`benchmarks.heldout`): frozen before any default was measured on it; its results are only reported,
never used to choose, tune or revert a default (the rule is written in :mod:`benchmarks.heldout` and in
docs/benchmark.md).

Import order is one-way: ``tasks`` <- ``long``, ``heldout`` <- ``suite`` <- ``run`` (and ``methods`` <- ``run``);
no module here imports one that imports it.
"""

from __future__ import annotations

from benchmarks import heldout, long, tasks
from benchmarks.tasks import Task

SPLITS = ("dev", "long", "heldout")
#: the splits defaults may be chosen and tuned on (everything but ``heldout``)
TUNABLE = ("dev", "long")
TASKS: dict[str, Task] = {**tasks.TASKS, **long.TASKS, **heldout.TASKS}
QUICK_TASKS: dict[str, tuple[str, ...]] = {
    "dev": tasks.QUICK_TASKS,
    "long": long.QUICK_TASKS,
    "heldout": heldout.QUICK_TASKS,
}


def tasks_in(*splits: str, quick: bool = False) -> list[str]:
    """The task names of ``splits`` in registry order (``quick``: the smoke-run selection of each split)."""
    unknown = [s for s in splits if s not in SPLITS]
    if unknown:
        raise ValueError(f"Unknown split {unknown}; choose from {SPLITS}.")
    if quick:
        return [name for s in splits for name in QUICK_TASKS[s]]
    return [name for s in splits for name, task in TASKS.items() if task.split == s]


assert all(t.split == "dev" for t in tasks.TASKS.values())
assert all(t.split == "long" for t in long.TASKS.values())
assert all(t.split == "heldout" for t in heldout.TASKS.values())
assert len(TASKS) == len(tasks.TASKS) + len(long.TASKS) + len(heldout.TASKS), "a task name is in two splits"
