"""Experiment runner for the levers of issue #7: GFMCallback variants against the baseline, steps and seconds.

Same protocol as ``benchmarks.run`` (target = the baseline's test loss averaged over its last 3 evaluations, each
task's shared jump schedule, one torch thread). A variant is ``name=JSON`` of ``GFMCallback`` keyword arguments
that override the benchmark's ``gfm`` method, ``name@method=JSON`` to override another jumping method's keyword
arguments (``lin8@linear={"n_fit": 8}``), or one of the benchmark's own methods (``gfm``, ``linear``,
``oracle``, ...). Baselines are cached per (task, seed) in ``--cache`` so that later experiments reuse them.

    python -m benchmarks.experiments.levers --tasks mnist1d-mlp digits-cnn --seeds 0 1 2 \\
        --variants gfm linear 'trend={"anchor": "trend"}'

Prints one line per (task, seed, variant): steps to target (None = never), steps saved, seconds saved, final test
loss, jumps accepted / tried and seconds per attempt; then per variant the medians of steps and seconds saved.
Appends every line as JSON to ``--log`` (default ``benchmarks/results/experiments/levers.jsonl``).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

import benchmarks.methods as methods
from benchmarks.run import _quiet, first_crossing, run_one

CACHE = Path("benchmarks/results/experiments/baselines.json")
LOG = Path("benchmarks/results/experiments/levers.jsonl")


_CLASSES = {"gfm": methods.TimedGFM, "gfm-pretrained": methods.TimedGFM, "linear": methods.LinearJumps}


def _variant(spec: str) -> tuple[str, str, dict]:
    """``name=JSON`` -> (name, "gfm", kwargs); ``name@method=JSON`` -> (name, method, kwargs); a bare method name
    -> (name, name, {})."""
    if "=" in spec:
        name, raw = spec.split("=", 1)
        name, _, method = name.partition("@")
        method = method or "gfm"
        if method not in _CLASSES:
            choices = sorted(_CLASSES)
            raise ValueError(f"`--variants`: keyword arguments apply to {choices}, got {method!r} in {spec!r}.")
        return name, method, json.loads(raw)
    return spec, spec, {}


def _baseline(task: str, seed: int, cache: Path) -> dict:
    runs = json.loads(cache.read_text()) if cache.exists() else {}
    key = f"{task}/{seed}"
    if key not in runs:
        run, recorder = run_one(task, "baseline", seed, False)
        steps, weights = recorder
        cache.parent.mkdir(parents=True, exist_ok=True)
        torch.save((steps, weights), cache.with_name(f"ref_{task}_{seed}.pt"))
        runs[key] = {"curve": run["curve"], "train_seconds": run["train_seconds"], "final": run["final_metric"]}
        cache.write_text(json.dumps(runs))
    return runs[key]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", nargs="+", required=True)
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--variants", nargs="+", required=True)
    parser.add_argument("--cache", type=Path, default=CACHE)
    parser.add_argument("--log", type=Path, default=LOG)
    parser.add_argument("--tag", default="", help="free text stored with every logged line")
    args = parser.parse_args(argv)
    _quiet()
    torch.set_num_threads(1)
    variants = [_variant(v) for v in args.variants]
    saved: dict[str, list[float]] = {name: [] for name, _, _ in variants}
    wall_saved: dict[str, list[float]] = {name: [] for name, _, _ in variants}
    originals = {cls: cls.__init__ for cls in set(_CLASSES.values())}
    args.log.parent.mkdir(parents=True, exist_ok=True)
    try:
        for seed in args.seeds:
            for task in args.tasks:
                base = _baseline(task, seed, args.cache)
                target = sum(base["curve"]["loss"][-3:]) / 3
                b_step, b_sec = first_crossing(base["curve"], target)
                ref = None
                for name, method, kwargs in variants:
                    if method == "oracle" and ref is None:
                        ref = torch.load(args.cache.with_name(f"ref_{task}_{seed}.pt"), weights_only=True)
                    for cls, init in originals.items():
                        cls.__init__ = init
                    if kwargs:
                        cls, init = _CLASSES[method], originals[_CLASSES[method]]
                        cls.__init__ = lambda self, kw=kwargs, init=init, **rest: init(self, **{**rest, **kw})
                    start = time.perf_counter()
                    run, _ = run_one(task, method, seed, False, reference=ref)
                    step, sec = first_crossing(run["curve"], target)
                    jumps = run["jumps"]
                    row = {
                        "tag": args.tag,
                        "task": task,
                        "seed": seed,
                        "variant": name,
                        "kwargs": kwargs,
                        "steps": step,
                        "baseline_steps": b_step,
                        "steps_saved": 0.0 if step is None else 1 - step / b_step,
                        "seconds_saved": 0.0 if sec is None else 1 - sec / b_sec,
                        "final": run["final_metric"],
                        "baseline_final": base["final"],
                        "accepted": sum(j["accepted"] for j in jumps),
                        "tried": len(jumps),
                        "horizons": [j["horizon"] for j in jumps],
                        "trends": [j["trend"] for j in jumps],
                        "sources": [j["source"] for j in jumps if j["accepted"]],
                        "attempt_seconds": statistics.median([j["seconds"] for j in jumps]) if jumps else 0.0,
                        "wall": time.perf_counter() - start,
                        "curve": {"step": run["curve"]["step"], "loss": run["curve"]["loss"]},
                    }
                    saved[name].append(row["steps_saved"])
                    wall_saved[name].append(row["seconds_saved"])
                    with args.log.open("a") as fh:
                        fh.write(json.dumps(row) + "\n")
                    print(
                        f"{task:15s} s{seed} {name:14s} steps {step} / {b_step} saved {row['steps_saved']:+.1%} "
                        f"secs {row['seconds_saved']:+.1%} final {row['final']:.4f} (base {base['final']:.4f}) "
                        f"acc {row['accepted']}/{row['tried']} h {row['horizons']} "
                        f"att {row['attempt_seconds']:.2f}s src {row['sources']}",
                        flush=True,
                    )
    finally:
        for cls, init in originals.items():
            cls.__init__ = init
    for name, values in saved.items():
        print(
            f"{name:14s} median steps saved {statistics.median(values):+.1%}, "
            f"seconds {statistics.median(wall_saved[name]):+.1%} "
            f"over {len(values)} runs"
        )


if __name__ == "__main__":
    main()
