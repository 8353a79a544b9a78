"""Which optimizer state should follow an accepted jump: ``keep``, ``reset`` or ``forecast``?

On digits (the model and data of ``examples/demo.py``: 64-128-10 MLP, 1100 train / 348 val / 349 test), for
Adam (lr 1e-3) and SGD with momentum 0.9 (lr 0.05), batch 64, for each seed the baseline (no callback) and
GFM with each state policy are run back to back (interleaved, so slow drifts of the machine hit every method
alike). A seed fixes the initial weights and the order of training batches for all methods of that seed.

Per run: final validation loss, final loss/accuracy on the held-out test split (which neither validation nor
GFM's jump decisions see), steps and seconds to the target (the baseline's final validation loss, the mean of
its last 3 evaluations, same seed), jumps accepted/attempted and wall-clock of the fit.

Writes ``benchmarks/results/state_policy.json`` and prints a markdown table (median and min-max over seeds).

    python benchmarks/state_policy.py                      # full measurement (a few minutes on 2 CPU cores)
    python benchmarks/state_policy.py --steps 200 --seeds 0  # smoke test
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import shlex
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
OPTIMIZERS = {"adam": 1e-3, "momentum": 0.05}
POLICIES = ("keep", "reset", "forecast")


def _load_demo():
    """``examples/demo.py`` as a module: the model, data, training loop and target logic live there."""
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    spec = importlib.util.spec_from_file_location("gfm_demo", ROOT / "examples" / "demo.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _stat(values: list[float | None], spec: str) -> str:
    """``median (min-max)`` over the seeds; ``None`` (target never reached) counts as +inf and prints "never"."""
    xs = [float("inf") if v is None else float(v) for v in values]

    def fmt(x: float) -> str:
        return "never" if x == float("inf") else format(int(x) if spec == "d" else x, spec)

    return f"{fmt(statistics.median(xs))} ({fmt(min(xs))}-{fmt(max(xs))})"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=1000, help="optimizer steps per run")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--optimizers", nargs="+", default=list(OPTIMIZERS), choices=list(OPTIMIZERS))
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (1: stable timings)")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "state_policy.json"))
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", ".*does not have many workers.*")
    warnings.filterwarnings("ignore", ".*LeafSpec.*")
    for name in ("lightning.pytorch.utilities.rank_zero", "lightning.pytorch.accelerators.cuda"):
        logging.getLogger(name).setLevel(logging.WARNING)
    demo = _load_demo()
    root_dir = ROOT / "benchmarks" / ".cache"

    command = shlex.join(["python", "benchmarks/state_policy.py", *(sys.argv[1:] if argv is None else argv)])
    runs: list[dict] = []
    start = time.perf_counter()
    for optimizer in args.optimizers:
        lr = OPTIMIZERS[optimizer]
        for seed in args.seeds:
            target = None
            for method in ("baseline", *POLICIES):
                gfm = None if method == "baseline" else {**demo.GFM_SETTINGS, "optimizer_state": method}
                r = demo.train(seed=seed, steps=args.steps, optimizer=optimizer, lr=lr, gfm=gfm, root_dir=root_dir)
                if target is None:
                    target = demo.target_of(r["history"])
                r["steps_to_target"], r["seconds_to_target"] = demo.time_to_target(r["history"], target)
                r.update(method=method, target=target)
                runs.append(r)
                print(
                    f"{optimizer:8s} seed {seed} {method:8s} val {r['final_val_loss']:.4f} test {r['test_loss']:.4f} "
                    f"to-target {_stat([r['steps_to_target']], 'd').split()[0]} steps "
                    f"/ {_stat([r['seconds_to_target']], '.1f').split()[0]} s "
                    f"jumps {r['jumps_accepted']}/{r['jumps_attempted']} fit {r['fit_seconds']:.1f} s",
                    flush=True,
                )
    total = time.perf_counter() - start

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {
        "steps": args.steps,
        "seeds": args.seeds,
        "optimizers": {k: OPTIMIZERS[k] for k in args.optimizers},
        "torch_threads": args.threads,
        "gfm_settings": demo.GFM_SETTINGS,
        "target": "baseline's final validation loss: mean of its last 3 evaluations (every 25 steps), same seed",
        "total_seconds": total,
        "torch": torch.__version__,
    }
    out.write_text(json.dumps({"command": command, "meta": meta, "runs": runs}, indent=2))

    print(f"\n{args.steps} steps, seeds {args.seeds}, median (min-max) over seeds; total {total:.0f} s\n")
    print(
        "| optimizer | method | final val loss | test loss | test acc | steps to target | s to target "
        "| jumps acc/att | fit s |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for optimizer in args.optimizers:
        for method in ("baseline", *POLICIES):
            rs = [r for r in runs if r["optimizer"] == optimizer and r["method"] == method]
            acc = f"{sum(r['jumps_accepted'] for r in rs)}/{sum(r['jumps_attempted'] for r in rs)}"
            cells = [
                _stat([r["final_val_loss"] for r in rs], ".4f"),
                _stat([r["test_loss"] for r in rs], ".4f"),
                _stat([r["test_acc"] for r in rs], ".3f"),
                _stat([r["steps_to_target"] for r in rs], "d"),
                _stat([r["seconds_to_target"] for r in rs], ".1f"),
                acc if method != "baseline" else "-",
                _stat([r["fit_seconds"] for r in rs], ".1f"),
            ]
            print(f"| {optimizer} | {method} | " + " | ".join(cells) + " |")
    print(f"\nresults written to {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
