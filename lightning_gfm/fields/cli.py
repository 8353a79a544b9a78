r"""``lightning-gfm``: record trajectory corpora, pre-train fields on them, evaluate fields on held-out runs.

::

    lightning-gfm record   --suite pretrain --out corpus/pretrain          # resumable: existing shards are kept
    lightning-gfm pretrain --corpus corpus/pretrain --out my_field.safetensors [--record pretrain]
    lightning-gfm evaluate --field pretrained my_field.safetensors --corpus corpus/heldout-opt
    lightning-gfm meta-train --corpus corpus/meta --out meta.safetensors [--record meta]  # a MetaField

Regenerate the shipped field's shape from scratch (records the corpus first when it is missing). The shipped
field has ``anchor="state"``, the only anchor when it was made (2.5 minutes on a 2-core machine, one thread);
``--anchor`` now defaults to the callback's ``trend`` (docs/pretrained.md: a trend-anchor field was measured and
not shipped)::

    lightning-gfm pretrain --record pretrain --corpus runs/corpus/pretrain --anchor state \
        --out lightning_gfm/fields/pretrained/default.safetensors
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import shlex
import sys
from collections.abc import Sequence
from pathlib import Path

import torch

__all__ = ["main"]


def _progress(args) -> bool:
    return not args.no_progress


def _cmd_record(args) -> int:
    from lightning_gfm.corpus import SUITES, record_suite

    if args.list:
        for name, fn in SUITES.items():
            print(f"{name}: {len(fn())} runs")
        return 0
    if not args.suite or not args.out:
        raise SystemExit("record: --suite and --out are required (or --list).")
    for suite in args.suite:
        out = Path(args.out) if len(args.suite) == 1 else Path(args.out) / suite
        paths = record_suite(suite, out, progress=_progress(args))
        print(f"{suite}: {len(paths)} shards in {out}")
    return 0


#: what the ``meta`` suite leaves out (lightning_gfm.corpus): every benchmark task's data, dev and held-out
META_DISJOINT = [
    "mnist1d-mlp", "digits-cnn", "charlm", "digits-rmsprop", "digits (forecasting)", "ho-diabetes-mlp",
    "ho-mnist1d-cnn-bn", "ho-digits-resnet", "ho-mnist1d-gru", "ho-charlm-lstm", "ho-cancer-mlp", "ho-digits-ae",
    "ho-mnist1d-sgd", "ho-gpt2-lm", "ho-llama-lm",
]  # fmt: skip


def _provenance(trajs, config, report, argv, disjoint: list[str] | None = None) -> str:
    tasks = sorted({f"{t.meta['task']['dataset']}/{t.meta['task']['arch']}" for t in trajs})
    optimizers = sorted({json.dumps(t.meta["optimizer"], sort_keys=True) for t in trajs})
    return json.dumps(
        {
            "summary": f"pre-trained on {len(trajs)} trajectories of {len(tasks)} (dataset, architecture) pairs",
            "tasks": tasks,
            "datasets": sorted({t.meta["task"]["dataset"] for t in trajs}),
            "optimizers": [json.loads(o) for o in optimizers],
            "schedules": sorted({t.meta.get("schedule", "?") for t in trajs}),
            "seeds": sorted({(t.meta["seeds"]["init"], t.meta["seeds"]["data"]) for t in trajs}),
            "record_every": sorted({t.meta.get("record_every") for t in trajs}),
            "disjoint_from": disjoint
            or ["mnist1d-mlp", "digits-cnn", "charlm", "digits-rmsprop", "digits (forecasting)"],
            "pretrain": config,
            "loss_first": report["loss_first"],
            "loss_last": report["loss_last"],
            "seconds": report["seconds"],
            "command": "lightning-gfm " + " ".join(shlex.quote(a) for a in argv),
            "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
            "torch": torch.__version__,
        }
    )


def _cmd_pretrain(args, argv) -> int:
    from lightning_gfm.corpus import load_corpus, record_suite
    from lightning_gfm.fields import save_field
    from lightning_gfm.pretrain import PretrainConfig, pretrain_field

    if args.record:
        record_suite(args.record, args.corpus[0], progress=_progress(args))
    trajs = load_corpus(args.corpus)
    config = PretrainConfig(
        steps=args.steps,
        windows_per_step=args.windows_per_step,
        batch=args.batch,
        lr=args.lr,
        seed=args.seed,
        hidden=args.hidden,
        history=args.history,
        depth=args.depth,
        span=args.span,
        anchor=args.anchor,
        trend=args.trend,
    )
    checkpoint = args.checkpoint or str(args.out) + ".ckpt"
    field, report = pretrain_field(trajs, config, checkpoint=checkpoint, progress=_progress(args), log=print)
    save_field(field, args.out, trained_on=_provenance(trajs, report["config"], report, argv))
    size = Path(args.out).stat().st_size
    print(
        f"wrote {args.out} ({size} bytes): loss {report['loss_first']:.4f} -> {report['loss_last']:.4f}, "
        f"{report['seconds']:.0f}s on {report['trajectories']} trajectories {report['families']}"
    )
    return 0


def _cmd_meta_train(args, argv) -> int:
    from lightning_gfm.corpus import load_corpus, record_suite
    from lightning_gfm.fields import save_field
    from lightning_gfm.flow.meta import MetaConfig, MetaRun, MetaTrainConfig, meta_train

    if args.record:
        record_suite(args.record, args.corpus[0], progress=_progress(args))
    trajs = load_corpus(args.corpus)
    config = MetaConfig(history=args.history, hidden=args.hidden, depth=args.depth, basis=args.basis)
    train = MetaTrainConfig(
        steps=args.steps, anchors_per_step=args.anchors_per_step, scalars=args.scalars, lr=args.lr, seed=args.seed
    )
    field, report = meta_train([MetaRun.from_trajectory(t) for t in trajs], config, train, log=print)
    report["trajectories"] = report["runs"]
    report["config"] = {"field": report["config"], "train": report["train"]}
    disjoint = META_DISJOINT if all(t.meta.get("run", {}).get("dataset") != "breast_cancer" for t in trajs) else None
    save_field(field, args.out, trained_on=_provenance(trajs, report["config"], report, argv, disjoint))
    size = Path(args.out).stat().st_size
    print(
        f"wrote {args.out} ({size} bytes): loss {report['loss_first']:.4f} -> {report['loss_last']:.4f}, "
        f"{report['seconds']:.0f}s on {report['runs']} trajectories {report['families']}"
    )
    return 0


def _load(name: str):
    from lightning_gfm.fields import load_field, resolve_field
    from lightning_gfm.flow.field import GradientField
    from lightning_gfm.pretrain import PretrainConfig

    if name == "prior":  # the callback's default field, untrained (its anchor, trend line and span)
        return GradientField(PretrainConfig().field_config)
    return load_field(resolve_field(name))


def _cmd_evaluate(args) -> int:
    from lightning_gfm.corpus import load_corpus
    from lightning_gfm.pretrain import PretrainConfig, evaluate_fields, summarise

    torch.manual_seed(args.seed)
    fields = {name: _load(name) for name in ["prior", *args.field] if name}
    trajs = load_corpus(args.corpus)
    rows = evaluate_fields(
        trajs,
        fields,
        window=args.window,
        lag=args.lag,
        anchors=args.anchors,
        online_steps=args.online_steps,
        online=args.online_steps > 0,
        finetune=[f for f in args.field if args.finetune],
        seed=args.seed,
        progress=_progress(args),
    )
    if not rows:
        raise SystemExit(
            f"evaluate: no trajectory has the min_anchor + 2 + {args.lag} snapshots a forecast needs (min_anchor: "
            "history, or trend - 1 for a trend anchor, of the most demanding field); lower --lag."
        )
    summary = summarise(rows)
    configs = {name: f.config for name, f in fields.items()}
    configs["online"] = PretrainConfig().field_config  # evaluate_fields' default online field
    configs.update({f"{name}+ft": fields[name].config for name in args.field if args.finetune})
    print(
        f"relative error forecasting {args.lag} record intervals ahead (1.0 = standing still), "
        f"{len(trajs)} trajectories; each field forecasts from its own anchor"
    )
    print("| field | anchor | median | mean (capped at 3) | n |\n|---|---|---|---|---|")
    for name, s in summary.items():
        c = configs[name]
        anchor = f"trend ({c.trend})" if c.anchor == "trend" else c.anchor
        print(f"| {name} | {anchor} | {s['median']:.3f} | {s['mean_capped']:.3f} | {s['n']} |")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        out = {"summary": summary, "configs": {k: configs[k].to_dict() for k in summary}, "rows": rows}
        Path(args.json).write_text(json.dumps(out, indent=1))
    return 0


def _trend_arg(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = None
    if value is None or value < 2:
        raise argparse.ArgumentTypeError(f"must be an integer >= 2 (snapshots in the trend line), got {text!r}")
    return value


def build_parser() -> argparse.ArgumentParser:
    """The ``lightning-gfm`` argument parser."""
    from lightning_gfm.flow.field import ANCHORS
    from lightning_gfm.pretrain import PretrainConfig

    _DEFAULTS = PretrainConfig()  # noqa: N806 - the callback's defaults, shared with PretrainConfig
    parser = argparse.ArgumentParser(
        prog="lightning-gfm",
        description="Record trajectory corpora, pre-train fields on them, evaluate fields on held-out runs.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__,
    )
    sub = parser.add_subparsers(dest="command", required=True)

    rec = sub.add_parser("record", help="train a suite of small runs and write their trajectories (safetensors)")
    rec.add_argument("--suite", nargs="+", help="suite name(s): see --list")
    rec.add_argument("--out", help="corpus directory (one sub-directory per suite when several are given)")
    rec.add_argument("--list", action="store_true", help="list the suites and exit")

    pre = sub.add_parser("pretrain", help="meta-train a field on one or more corpus directories")
    pre.add_argument("--corpus", nargs="+", required=True, help="corpus directories or shard files")
    pre.add_argument("--out", required=True, help="field file to write (safetensors)")
    pre.add_argument("--record", metavar="SUITE", help="first record SUITE into the first --corpus (resumable)")
    pre.add_argument("--steps", type=int, default=10000)
    pre.add_argument("--windows-per-step", type=int, default=4)
    pre.add_argument("--batch", type=int, default=1024, help="scalars per window and step")
    pre.add_argument("--lr", type=float, default=3e-3)
    pre.add_argument("--history", type=int, default=3)
    pre.add_argument("--hidden", type=int, default=16)
    pre.add_argument("--depth", type=int, default=2)
    pre.add_argument("--span", type=float, default=16.0)
    pre.add_argument(
        "--anchor",
        choices=ANCHORS,
        default=_DEFAULTS.anchor,
        help=f"where the field's forecasts start, kept in the saved field (default {_DEFAULTS.anchor}: the callback's)",
    )
    pre.add_argument(
        "--trend",
        type=_trend_arg,
        default=_DEFAULTS.trend,
        help=f"snapshots in the trend line of --anchor trend, >= 2 (default {_DEFAULTS.trend}, the callback's)",
    )
    pre.add_argument("--seed", type=int, default=0)
    pre.add_argument("--checkpoint", help="resume file (default OUT.ckpt; deleted when done)")

    meta = sub.add_parser("meta-train", help="meta-train a MetaField (lightning_gfm.flow.meta) on corpus directories")
    meta.add_argument("--corpus", nargs="+", required=True, help="corpus directories or shard files")
    meta.add_argument("--out", required=True, help="field file to write (safetensors)")
    meta.add_argument("--record", metavar="SUITE", help="first record SUITE into the first --corpus (resumable)")
    meta.add_argument("--steps", type=int, default=3000)
    meta.add_argument("--anchors-per-step", type=int, default=16, help="(run, anchor) pairs per step")
    meta.add_argument("--scalars", type=int, default=256, help="scalars per (run, anchor)")
    meta.add_argument("--lr", type=float, default=2e-3)
    meta.add_argument("--history", type=int, default=7)
    meta.add_argument("--hidden", type=int, default=32)
    meta.add_argument("--depth", type=int, default=1)
    meta.add_argument("--basis", type=int, default=8)
    meta.add_argument("--seed", type=int, default=0)

    ev = sub.add_parser("evaluate", help="forecasting error of fields on held-out trajectories")
    ev.add_argument(
        "--field",
        nargs="+",
        default=["pretrained"],
        help="'pretrained', 'pretrained:<name>' or paths ('prior' and 'online' are always added)",
    )
    ev.add_argument("--corpus", nargs="+", required=True)
    ev.add_argument("--lag", type=int, default=12, help="record intervals forecast ahead")
    ev.add_argument("--window", type=int, default=24, help="observed snapshots")
    ev.add_argument("--anchors", type=float, nargs="+", default=[0.5, 1.0])
    ev.add_argument("--online-steps", type=int, default=100, help="fit steps of online / fine-tuned fields (0: none)")
    ev.add_argument("--finetune", action="store_true", help="also fine-tune each --field online (<name>+ft)")
    ev.add_argument("--seed", type=int, default=0)
    ev.add_argument("--json", help="write rows and summary here")

    for p in (rec, pre, meta, ev):
        p.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
        p.add_argument("--no-progress", action="store_true", help="no progress bars")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``lightning-gfm`` console command."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.command == "record":
        return _cmd_record(args)
    if args.command == "pretrain":
        return _cmd_pretrain(args, argv)
    if args.command == "meta-train":
        return _cmd_meta_train(args, argv)
    return _cmd_evaluate(args)


if __name__ == "__main__":
    sys.exit(main())
