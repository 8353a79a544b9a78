"""Acceleration benchmark runner (protocol: ``shared/design/BENCHMARK.md``).

    python -m benchmarks.run [--quick] [--split dev heldout | --tasks ...] [--methods ...] [--seeds 0 1 2]
        [--out PATH] [--report]

For each seed, for each task, every method trains the same module with the same seed and data order (the
baseline first: its target and its recorded trajectory are needed by the others; then the rest, interleaved
so that machine drift hits all alike). A measuring callback scores the test split every ``val_every`` steps
and subtracts its own time from the run's clock, so ``seconds`` counts the training and every overhead of the
method (snapshots, fitting, integrating, candidate evaluation, rollbacks, Lightning's validation loop) but not
the benchmark's measurement. Every run goes to the end of its budget; crossings are read off the curves.

Target: the baseline's test loss averaged over its last 3 evaluations. ``steps_to_target`` /
``seconds_to_target``: the first evaluation at or below it (``None`` if never).

Splits: without ``--split`` or ``--tasks`` the dev tasks run (the acceleration benchmark of docs/benchmark.md).
``--split heldout`` (or ``--split heldout dev``) runs those splits and writes, beside the full ``runs``, one flat
``rows`` entry per run (task, split, method, seed, steps_saved, wall_saved, final_test, baseline_final_test,
reached, ...): the held-out benchmark of issue 13, reported by ``python -m benchmarks.report --heldout``::

    python -m benchmarks.run --split heldout --seeds 0 1 \
        --methods baseline linear ema gfm oracle fastforward lookahead --out benchmarks/results/heldout.json --report

Held-out results are only reported: no default is chosen, tuned or reverted because of them (benchmarks/heldout.py).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import shlex
import sys
import time
import warnings
from pathlib import Path

import lightning.pytorch as pl
import torch

from benchmarks.competitors import FastForward, Lookahead
from benchmarks.methods import JUMP_METHODS, METHODS, TimedGFM, WeightRecorder, make_callbacks, measured_net
from benchmarks.report import summary_row, write_heldout_section, write_report
from benchmarks.suite import SPLITS, TASKS, tasks_in
from benchmarks.tasks import QUICK_TASKS, Task
from lightning_gfm import GFMCallback

DEFAULT_OUT = "benchmarks/results/acceleration.json"
TARGET_LAST = 3  # evaluations averaged into the target

#: rough wall seconds per run (baseline, gfm) at 1 thread; only the first ETA uses them. Dev: a busy 2-core
#: machine. Held-out: one full-budget baseline per task (seed 0, ``python -m benchmarks.check``, a quiet machine;
#: test-split scoring added), gfm at 1.5 times that (all 7 methods on ho-llama-lm and ho-digits-ae, seed 0, came
#: to 9-10 baselines in all). The held-out split at 2 seeds and 7 methods: about 38 min on a quiet machine.
_ESTIMATE = {
    False: {
        "mnist1d-mlp": (14, 60),
        "digits-cnn": (4, 10),
        "charlm": (50, 100),
        "digits-rmsprop": (4, 14),
        "ho-diabetes-mlp": (9, 14),
        "ho-mnist1d-cnn-bn": (11, 17),
        "ho-digits-resnet": (8, 12),
        "ho-mnist1d-gru": (11, 17),
        "ho-charlm-lstm": (12, 18),
        "ho-cancer-mlp": (9, 14),
        "ho-digits-ae": (10, 15),
        "ho-mnist1d-sgd": (10, 15),
        "ho-gpt2-lm": (19, 29),
        "ho-llama-lm": (20, 30),
    },
    True: {
        "mnist1d-mlp": (4, 15),
        "digits-cnn": (2, 4),
        "charlm": (6, 15),
        "digits-rmsprop": (2, 4),
        "ho-mnist1d-cnn-bn": (2, 2),
        "ho-diabetes-mlp": (0.3, 0.5),
        "ho-llama-lm": (3, 6),
    },
}
#: the other methods' cost as a multiple of the baseline's (jump methods evaluate candidates; Fast Forward
#: evaluates its validation batches at least twice every 6 steps: 1.8x on ho-llama-lm)
_FACTOR = {"baseline": 1.0, "ema": 1.1, "lookahead": 1.05, "linear": 1.4, "oracle": 1.4, "fastforward": 2.0}


def _estimate(task: str, method: str, quick: bool) -> float:
    base, gfm = _ESTIMATE[quick].get(task, (2.0, 4.0) if quick else (15.0, 35.0))
    return gfm if method.startswith("gfm") else base * _FACTOR.get(method, 1.1)


class Measure(pl.Callback):
    """Scores the test split every ``every`` steps (and at step 0), timing itself out of the run's clock."""

    def __init__(self, every: int, method_callbacks: list[pl.Callback]):
        self.every = every
        self.method_callbacks = method_callbacks
        self.curve: dict[str, list] = {"step": [], "seconds": [], "loss": [], "acc": []}
        self.excluded = 0.0
        self.t0 = 0.0
        self.train_seconds = 0.0

    def _measure(self, step: int, pl_module) -> None:
        t = time.perf_counter()
        score = pl_module.score("test", measured_net(pl_module, self.method_callbacks))
        for k, v in (("step", step), ("seconds", t - self.t0 - self.excluded), *score.items()):
            self.curve[k].append(v)
        self.excluded += time.perf_counter() - t

    def on_train_start(self, trainer, pl_module):
        self.t0 = time.perf_counter()
        self._measure(0, pl_module)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        step = trainer.global_step
        if step % self.every == 0 and step > self.curve["step"][-1]:
            self._measure(step, pl_module)

    def on_train_end(self, trainer, pl_module):
        self.train_seconds = time.perf_counter() - self.t0 - self.excluded


def first_crossing(curve: dict, target: float, mode: str = "min") -> tuple[int | None, float | None]:
    """Step and seconds of the first evaluation reaching ``target`` (``None, None`` if never)."""
    for step, sec, value in zip(curve["step"], curve["seconds"], curve["loss"], strict=False):
        if (value <= target) if mode == "min" else (value >= target):
            return int(step), float(sec)
    return None, None


def _model_bytes(module: torch.nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters() if p.requires_grad)


def run_one(
    task_name: str, method: str, seed: int, quick: bool, reference=None, task: Task | None = None
) -> tuple[dict, object]:
    """Train ``method`` on ``task_name`` with ``seed``; return the run's record and the baseline's trajectory.

    ``task``: a replacement definition (e.g. a longer budget for a check); by default the registry's.
    """
    task = task if task is not None else TASKS[task_name]
    budget = task.budget(quick)
    pl.seed_everything(seed, verbose=False)
    module, trainer_kwargs = task.make(seed, quick)
    callbacks = make_callbacks(method, budget.schedule, budget.max_steps, seed, reference)
    measure = Measure(budget.val_every, callbacks)
    trainer = pl.Trainer(callbacks=[*callbacks, measure], **trainer_kwargs)
    trainer.fit(module)
    run = {
        "task": task_name,
        "split": task.split,
        "method": method,
        "seed": seed,
        "metric": "test_loss",
        "mode": "min",
        "max_steps": budget.max_steps,
        "val_every": budget.val_every,
        "train_seconds": measure.train_seconds,
        "final_metric": measure.curve["loss"][-1],
        "final_acc": measure.curve["acc"][-1] if task.classification else None,
        "curve": measure.curve,
        "jumps": [],
        "n_params": sum(p.numel() for p in module.parameters() if p.requires_grad),
        "model_bytes": _model_bytes(module),
    }
    recorder = None
    for cb in callbacks:
        if isinstance(cb, WeightRecorder):
            recorder = cb.trajectory()
        if isinstance(cb, GFMCallback):
            run["jumps"] = [
                {
                    "step": j.step,
                    "horizon": j.horizon,
                    "trend": j.trend,
                    "source": j.source,
                    "accepted": j.accepted,
                    "outcome": j.outcome,
                    "seconds": j.seconds,
                    "metric_before": j.metric_before,
                    "metric_after": j.metric_after,
                    "backtest_fitted": j.backtest_fitted,
                    "backtest_prior": j.backtest_prior,
                    "candidates": j.candidates,
                }
                for j in cb.jumps
            ]
            run["record_seconds"] = cb.record_seconds
            run["attempts_skipped"] = cb.budget.skipped
            run["buffer_bytes"] = cb.buffer.nbytes
        if isinstance(cb, TimedGFM):
            run["forecasts"] = [{"scalars": p, "seconds": s} for p, s in cb.forecasts]
        if isinstance(cb, FastForward):
            run["fastforward"] = {
                "stages": len(cb.stages),
                "repeats": sum(st["repeats"] for st in cb.stages),
                "stages_with_repeats": sum(st["repeats"] > 0 for st in cb.stages),
                "seconds": cb.seconds,
            }
        if isinstance(cb, Lookahead):
            run["lookahead"] = {"outer_steps": cb.outer_steps, "seconds": cb.seconds, "k": cb.k, "lr": cb.lr}
            run["lookahead"]["momentum"] = cb.momentum
    return run, recorder


def command_line(quick: bool, tasks, methods, seeds, out, threads: int = 1, splits=None) -> str:
    parts = ["python", "-m", "benchmarks.run"] + (["--quick"] if quick else [])
    if splits and list(tasks) == tasks_in(*splits, quick=quick):
        parts += ["--split", *splits]
    else:
        parts += ["--tasks", *tasks]
    parts += ["--methods", *methods, "--seeds", *map(str, seeds), "--out", str(out)]
    parts += ["--threads", str(threads)]
    return " ".join(shlex.quote(p) for p in parts)


def _quiet() -> None:
    for name in ("lightning.pytorch", "lightning.fabric", "lightning"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", message=".*LeafSpec.*")
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")
    warnings.filterwarnings("ignore", message=".*smaller than the logging interval.*")
    warnings.filterwarnings("ignore", message=".*litlogger.*")


def run_benchmark(
    *,
    quick: bool = False,
    tasks=None,
    methods=None,
    seeds=None,
    out: str | os.PathLike = DEFAULT_OUT,
    threads: int = 1,
    splits=None,
    log=print,
) -> dict:
    """Run the benchmark, write the JSON to ``out`` (after every run) and return it.

    ``threads``: torch intra-op threads (1 by default: these models are too small to gain from more, and one
    thread keeps the timings steady when anything else runs on the machine). ``splits``: run these splits'
    tasks (their quick selection with ``quick``) unless ``tasks`` is given; without either, the dev split.
    """
    _quiet()
    torch.set_num_threads(threads)
    splits = list(splits) if splits else None
    if tasks:
        tasks = list(tasks)
    elif splits:
        tasks = tasks_in(*splits, quick=quick)
    else:
        tasks = list(QUICK_TASKS) if quick else tasks_in("dev")
    methods = list(methods or METHODS)
    seeds = list(seeds if seeds is not None else ([0] if quick else [0, 1, 2]))
    unknown = [t for t in tasks if t not in TASKS] + [m for m in methods if m not in METHODS]
    if unknown:
        raise ValueError(f"Unknown task or method: {unknown}; tasks {list(TASKS)}, methods {list(METHODS)}.")
    methods = ["baseline"] + [m for m in methods if m != "baseline"]  # target and oracle need the baseline
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    result = {
        "command": command_line(quick, tasks, methods, seeds, out, threads, splits),
        "quick": quick,
        "splits": splits or sorted({TASKS[t].split for t in tasks}),
        "machine": {
            "platform": platform.platform(),
            "python": sys.version.split()[0],
            "torch": torch.__version__,
            "lightning": pl.__version__,
            "cpus": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
        },
        "schedules": {
            t: TASKS[t].budget(quick).schedule.resolved(TASKS[t].budget(quick).max_steps)
            | {"max_steps": TASKS[t].budget(quick).max_steps}
            for t in tasks
        },
        "rows": [],
        "runs": [],
    }
    plan = [(s, t, m) for s in seeds for t in tasks for m in methods]
    estimate = {(t, m): _estimate(t, m, quick) for t in tasks for m in methods}
    log(f"benchmark: {len(plan)} runs, first estimate {sum(estimate[t, m] for _, t, m in plan) / 60:.1f} min")
    measured: dict[tuple[str, str], float] = {}
    speed = []  # measured / estimated, to correct estimates of runs not yet measured
    start = time.perf_counter()
    targets: dict[tuple[int, str], float] = {}
    baselines: dict[tuple[int, str], dict] = {}
    reference = None
    for i, (seed, task, method) in enumerate(plan):
        t0 = time.perf_counter()
        run, recorder = run_one(task, method, seed, quick, reference if method == "oracle" else None)
        if method == "baseline":
            reference = recorder
            targets[seed, task] = sum(run["curve"]["loss"][-TARGET_LAST:]) / len(run["curve"]["loss"][-TARGET_LAST:])
        run["target"] = targets[seed, task]
        run["steps_to_target"], run["seconds_to_target"] = first_crossing(run["curve"], run["target"], run["mode"])
        run["wall_seconds"] = time.perf_counter() - t0
        if method == "baseline":
            baselines[seed, task] = run
        result["runs"].append(run)
        result["rows"].append(summary_row(run, baselines[seed, task]))
        out.write_text(json.dumps(result, indent=1))
        measured[task, method] = run["wall_seconds"]
        speed.append(run["wall_seconds"] / estimate[task, method])
        ratio = sorted(speed)[len(speed) // 2]
        left = sum(measured.get((t, m), estimate[t, m] * ratio) for _, t, m in plan[i + 1 :])
        jumps = run["jumps"]
        acc = f" jumps {sum(j['accepted'] for j in jumps)}/{len(jumps)}" if method in JUMP_METHODS else ""
        log(
            f"[{i + 1}/{len(plan)}] seed {seed} {task:14s} {method:8s} {run['wall_seconds']:6.1f}s "
            f"final {run['final_metric']:.4f} steps_to_target {run['steps_to_target']}{acc} | "
            f"elapsed {(time.perf_counter() - start) / 60:.1f} min, ETA {left / 60:.1f} min"
        )
    return result


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description="GFM acceleration benchmark")
    parser.add_argument("--quick", action="store_true", help="tiny budgets, 1 seed, 2-3 tasks a split (smoke run)")
    parser.add_argument("--split", nargs="+", choices=SPLITS, help="run these splits' tasks (default: dev)")
    parser.add_argument("--tasks", nargs="+", choices=list(TASKS))
    parser.add_argument("--methods", nargs="+", choices=list(METHODS))
    parser.add_argument("--seeds", nargs="+", type=int)
    parser.add_argument("--out", default=DEFAULT_OUT)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    parser.add_argument(
        "--report",
        action="store_true",
        help="also write docs/benchmark.md and docs/img/ (with --split: its held-out section only)",
    )
    args = parser.parse_args(argv)
    run_benchmark(
        quick=args.quick,
        tasks=args.tasks,
        methods=args.methods,
        seeds=args.seeds,
        out=args.out,
        threads=args.threads,
        splits=args.split,
    )
    if args.report:
        (write_heldout_section if args.split else write_report)(args.out)


if __name__ == "__main__":
    main()
