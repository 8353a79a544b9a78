"""Generalisation of pre-trained fields: forecasting error on held-out trajectories along four axes.

Axes (each a corpus the shipped field never saw; see ``docs/pretrained.md``):

* ``unseen-init``: the pre-training suite's tasks, architectures and optimizer settings, new initialisation and
  data-order seeds (``lightning-gfm record --suite heldout-init``);
* ``unseen-arch``: a deeper, wider GELU MLP (96-48-24) never trained on (``heldout-arch``);
* ``unseen-opt``: optimizer settings and schedules never trained on: SGD lr 0.2 with a step decay, Nesterov
  momentum 0.95, Adam betas (0.8, 0.95), AdamW weight decay 0.1, RMSprop alpha 0.9 (``heldout-opt``);
* ``unseen-task``: scikit-learn's 8x8 digits with the forecasting benchmark's three architectures (MLPs and a
  CNN) and five optimizers, recorded by :func:`benchmarks.forecasting.record_run` (digits is also the data of two
  acceleration-benchmark tasks, and is in no pre-training run).

Each trajectory is forecast from two anchors (mid-run and the latest one with ``lag`` snapshots after it), from
the ``window`` = 24 snapshots before the anchor, ``lag`` = 12 record intervals ahead (the callback's span).
Fields: ``prior`` (unfitted: constant gradient), ``pretrained`` (shipped, frozen), ``online`` (a fresh field
fitted 100 steps on the observed window: the callback's default online fit), ``pretrained+ft`` (the shipped
field fine-tuned the same way).

Run ``python -m benchmarks.pretrained_fields [--field PATH] [--out benchmarks/results/pretrained_fields.json]``.
"""

from __future__ import annotations

import argparse
import json
import math
import shlex
import statistics
import sys
import time
from pathlib import Path

import torch

from lightning_gfm.corpus import Trajectory, load_corpus, record_suite
from lightning_gfm.fields import load_field, resolve_field
from lightning_gfm.flow.field import FieldConfig, GradientField
from lightning_gfm.pretrain import evaluate_fields

AXES = {"unseen-init": "heldout-init", "unseen-arch": "heldout-arch", "unseen-opt": "heldout-opt", "unseen-task": None}
FIELDS = ("prior", "pretrained", "online", "pretrained+ft")


def digits_trajectories(quick: bool = False) -> list[Trajectory]:
    """The forecasting benchmark's digits runs (3 architectures x 5 optimizers, init 0, data order 0)."""
    from benchmarks.forecasting import ARCHS, OPTIMIZERS, Config, digits_data, record_run

    cfg = Config()
    data = digits_data()
    out = []
    archs = ("mlp-tanh",) if quick else tuple(ARCHS)
    for arch in archs:
        for opt in OPTIMIZERS:
            run = record_run(arch, opt, 0, 0, data, cfg)
            meta = {
                "task": {"dataset": "digits", "arch": arch},
                "optimizer": {"name": opt},
                "steps": cfg.steps,
                "record_every": cfg.every,
                "seeds": {"init": 0, "data": 0},
                "schedule": "constant",
            }
            out.append(Trajectory(f"digits_{arch}_{opt}", run.buffer, run.spec, run.dyn, meta))
    return out


def run(field_path: str = "pretrained", corpus_root: str = "runs/corpus", quick: bool = False, log=print) -> dict:
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    pretrained = load_field(resolve_field(field_path))
    prior = GradientField(FieldConfig(**{**pretrained.config.to_dict()}))
    fields = {"prior": prior, "pretrained": pretrained}
    rows, timings = [], {}
    for axis, suite in AXES.items():
        t = time.perf_counter()
        if suite is None:
            trajs = digits_trajectories(quick)
        else:
            paths = record_suite(suite, Path(corpus_root) / suite, progress=False)
            trajs = load_corpus(paths[:3] if quick else paths)
        got = evaluate_fields(trajs, fields, finetune=["pretrained"], online_steps=20 if quick else 100, progress=False)
        rows += [{**r, "axis": axis} for r in got]
        timings[axis] = round(time.perf_counter() - t, 1)
        log(f"{axis}: {len(trajs)} trajectories in {timings[axis]}s")
    timings["total"] = round(time.perf_counter() - t0, 1)
    return {"field": field_path, "rows": rows, "timings_s": timings}


def _stats(xs: list) -> tuple[float, float]:
    xs = [x if x is not None else math.inf for x in xs]
    return statistics.median(xs), statistics.fmean(min(x, 3.0) for x in xs)


def render(result: dict) -> str:
    rows = result["rows"]
    lines = [
        "| axis | n | " + " | ".join(FIELDS) + " |",
        "|---|---|" + "---|" * len(FIELDS),
    ]
    for axis in AXES:
        cells, n = [], 0
        for f in FIELDS:
            xs = [r["rel_error"] for r in rows if r["axis"] == axis and r["field"] == f]
            n = len(xs) or n
            cells.append("—" if not xs else "{:.3f} ({:.3f})".format(*_stats(xs)))
        lines.append(f"| {axis} | {n} | " + " | ".join(cells) + " |")
    fams = sorted({r["family"] for r in rows})
    lines += [
        "",
        "Per optimizer family, all axes pooled: median relative error.",
        "",
        "| family | " + " | ".join(FIELDS) + " |",
        "|---|" + "---|" * len(FIELDS),
    ]
    for fam in fams:
        cells = []
        for f in FIELDS:
            xs = [r["rel_error"] for r in rows if r["family"] == fam and r["field"] == f]
            cells.append("—" if not xs else f"{_stats(xs)[0]:.3f}")
        lines.append(f"| {fam} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--field", default="pretrained", help="'pretrained', 'pretrained:<name>' or a path")
    parser.add_argument("--corpus-root", default="runs/corpus", help="where held-out suites are recorded")
    parser.add_argument("--out", default="benchmarks/results/pretrained_fields.json")
    parser.add_argument("--quick", action="store_true", help="3 trajectories per axis, short fine-tuning")
    parser.add_argument("--table", metavar="JSON", help="print the table of a result file")
    args = parser.parse_args(argv)
    if args.table:
        result = json.loads(Path(args.table).read_text())
    else:
        result = run(args.field, args.corpus_root, args.quick)
        result["command"] = "python -m benchmarks.pretrained_fields " + " ".join(
            shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv)
        )
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=1))
    print(render(result))
    return result


if __name__ == "__main__":
    main()
