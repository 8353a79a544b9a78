"""The demo (``examples/demo.py``, a task outside the benchmark) under variants of the jump rules (E38).

Trains the demo's baseline and, for each variant, the demo's GFM run (``eval_batches=3, seed=0``) on each seed;
prints steps to the baseline's target (its mean validation loss over the last 3 evaluations), final validation
and test loss, and the jumps ``(step, horizon)``.

    python -m benchmarks.experiments.demo_variants --seeds 0 1 2 --variants default e37-reach old-first
    python -m benchmarks.experiments.demo_variants --variants e37-reach default --branch-trends 3   # E37, E38

Variants: ``default`` (the callback as it is); ``no-branch`` (``branch_trends=()``); ``e37-reach`` (the prior
reaches its span from its first attempt, as in E32-E37); ``old-first`` (the first attempt waits for backtest
snapshots even for the prior, as before E29); ``old-first-span`` (both: the old first attempt, the span reach);
``meta`` (the meta-trained field's points beside the prior's, ``field="pretrained:meta"``, E43).
``--meta-field PATH`` gives the ``meta`` variant another field file (E51). ``--branch-trends`` and ``--span`` set
those callback arguments for every variant (E37's defaults had ``branch_trends=(3,)``; before this session
``span`` was 12).
"""

from __future__ import annotations

import argparse
import logging
import sys
import warnings
from pathlib import Path

import torch

from lightning_gfm import GFMCallback

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


class _SpanReach(GFMCallback):
    """The prior forecasts ``span`` record intervals ahead from its first attempt (E32-E37's rule)."""

    def _horizons(self, trainer, step, win):
        if self.learns or self.horizon is not None:
            return super()._horizons(trainer, step, win)
        far = int(self.field_config.span * win.interval)
        total = self._total_steps(trainer)
        if total is not None:
            far = min(far, total - step)
        return sorted({round(far / 2**i) for i in range(self.n_candidates)} - {0})


class _OldFirst(GFMCallback):
    """The first attempt waits for the backtest's snapshots even when nothing is backtested (before E29)."""

    @property
    def min_snapshots(self) -> int:
        return max(self.field_config.min_anchor, self.prior_config.min_anchor) + max(self.backtest, 1) + 2


class _OldFirstSpanReach(_OldFirst, _SpanReach):
    pass


VARIANTS = {
    "default": (GFMCallback, {}),
    "no-branch": (GFMCallback, {"branch_trends": ()}),
    "e37-reach": (_SpanReach, {}),
    "old-first": (_OldFirst, {}),
    "old-first-span": (_OldFirstSpanReach, {}),
    "meta": (GFMCallback, {"field": "pretrained:meta"}),
}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=sorted(VARIANTS))
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--out", default="runs/demo_variants")
    parser.add_argument("--branch-trends", nargs="*", type=int, default=[], help="GFMCallback(branch_trends=...)")
    parser.add_argument("--span", type=int, default=None, help="GFMCallback(span=...); default: the callback's")
    parser.add_argument("--meta-field", default=None, help="the `meta` variant's field (default: pretrained:meta)")
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore")
    for name in ("lightning.pytorch.utilities.rank_zero", "lightning.pytorch.accelerators.cuda"):
        logging.getLogger(name).setLevel(logging.WARNING)
    torch.set_num_threads(1)
    sys.path.insert(0, str(EXAMPLES))
    import demo

    common = {"branch_trends": tuple(args.branch_trends)}
    if args.span is not None:
        common["span"] = args.span
    original = demo.GFMCallback
    try:
        for seed in args.seeds:
            base = demo.train(seed=seed, steps=args.steps, root_dir=args.out)
            target = demo.target_of(base["history"])
            b_steps, _ = demo.time_to_target(base["history"], target)
            print(
                f"seed {seed} baseline steps {b_steps} final val {base['final_val_loss']:.4f} "
                f"test {base['test_loss']:.4f}",
                flush=True,
            )
            for variant in args.variants:
                cls, kwargs = VARIANTS[variant]
                if variant == "meta" and args.meta_field:
                    kwargs = {**kwargs, "field": args.meta_field}
                demo.GFMCallback = lambda cls=cls, kwargs=kwargs, **k: cls(**{**k, **common, **kwargs})
                run = demo.train(seed=seed, steps=args.steps, gfm=dict(demo.GFM_SETTINGS), root_dir=args.out)
                steps, _ = demo.time_to_target(run["history"], target)
                jumps = [(j["step"], j["horizon"]) for j in run["jumps"]]
                print(
                    f"seed {seed} {variant:15s} steps {steps} final val {run['final_val_loss']:.4f} "
                    f"test {run['test_loss']:.4f} jumps {jumps}",
                    flush=True,
                )
    finally:
        demo.GFMCallback = original


if __name__ == "__main__":
    main()
