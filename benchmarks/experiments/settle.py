"""Probe: does a jump that lands worse settle ahead? Validation loss of each candidate trained a few more steps.

At one attempt (the step ``--at`` of a task's run), GFM's default forecast is taken; then the no-jump reference,
each of GFM's candidates and, for reference, the baseline run's own weights at the same horizons (the oracle) are
each trained ``--settle`` more optimizer steps (default 10, 30 and 60) on the same training batches, and their
validation loss (GFM's own evaluation batches, lower is better) is printed where they land and after each count:

    python -m benchmarks.experiments.settle charlm --at 500 --seed 0

One row per branch: ``no jump`` (now -> +10 -> +30 -> +60), ``gfm +h`` and ``oracle +h`` (landed -> ...). A
candidate whose landed loss is above the reference's but whose settled loss is below it is the case settled
acceptance was built for (issue 14; it measured no better and was removed, docs/experiments.md E48). Dev tasks
only by default: the held-out tasks are measured, never probed to choose a default (``benchmarks/heldout.py``).
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from torch import Tensor, nn

from benchmarks.methods import OracleJumps, TimedGFM
from benchmarks.run import _quiet, run_one
from benchmarks.suite import TASKS, TUNABLE
from lightning_gfm.callback import META_LABEL
from lightning_gfm.jump import apply_state_policy

LOG = Path("benchmarks/results/experiments/settle.jsonl")


# The package judges candidates where they land (``settle`` was removed, docs/experiments.md E48); the probe keeps
# its own copy of the private training it measures with: a copy of the training state, training batches from a
# private pass over the data, and one optimizer step as the loop takes it, without its counters.
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


def settle_batches(trainer: pl.Trainer, steps: int) -> list[list[Any]]:
    """Training batches for ``steps`` optimizer steps (``accumulate_grad_batches`` each), from a fresh pass."""
    loader, out = trainer.train_dataloader, []
    it = iter(loader)
    for _ in range(steps):
        micro = []
        for _ in range(trainer.accumulate_grad_batches):
            batch = next(it, None)
            if batch is None:
                it = iter(loader)
                batch = next(it)
            micro.append(trainer.precision_plugin.convert_input(trainer.strategy.batch_to_device(batch)))
        out.append(micro)
    return out


def private_step(trainer: pl.Trainer, pl_module: pl.LightningModule, opt: torch.optim.Optimizer, micro) -> None:
    """One optimizer step on ``micro`` (its batches accumulated), the run's gradient clipping applied."""
    opt.zero_grad(set_to_none=True)
    for i, batch in enumerate(micro):
        out = trainer.strategy.training_step(batch, i)
        loss = out["loss"] if isinstance(out, dict) else out
        if loss is not None:
            (loss / len(micro)).backward()
    pl_module.configure_gradient_clipping(
        opt, gradient_clip_val=trainer.gradient_clip_val, gradient_clip_algorithm=trainer.gradient_clip_algorithm
    )
    opt.step()
    opt.zero_grad(set_to_none=True)


class _Probe(TimedGFM):
    """GFM at its defaults that, at step ``at``, trains every branch privately instead of jumping, then stops."""

    def __init__(
        self, at: int, counts: list[int], oracle: OracleJumps | None, horizons: list[int] | None = None, **kwargs
    ):
        super().__init__(overhead=None, **kwargs)
        self.at, self.counts, self.oracle, self.rows = at, sorted(counts), oracle, []
        self.probe_horizons = sorted(horizons) if horizons else None

    def should_jump(self, step: int) -> bool:
        return step == self.at

    def _attempt(self, trainer, pl_module, step, start) -> None:
        from lightning_gfm.flow.window import Window

        spec, opt = self._spec, trainer.optimizers[0]
        win = Window.from_buffer(self.buffer, spec, self._dyn.state_names, self._total_steps(trainer), lean=self._lean)
        horizons = self.probe_horizons or self._horizons(trainer, step, win)
        path, _ = self.forecast_path(trainer, pl_module, win, horizons)
        names = {META_LABEL: "meta"}  # a joined path's points are named by the forecaster that made them

        def source(k: int) -> str:
            return names.get(path.branches[k], "prior") if path.branches else "gfm"

        branches = [("no jump", 0, None)]
        branches += [(f"{source(k)} +{h}", h, ("gfm", k)) for k, h in enumerate(path.horizons) if k]
        if self.oracle is not None:
            branches += [(f"oracle +{h}", h, ("oracle", h)) for h in sorted(set(path.horizons[1:]))]
        devices = [pl_module.device] if pl_module.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(self.seed + step)
            batches = settle_batches(trainer, self.counts[-1])
        start_state = TrainingState.capture(pl_module, opt, spec.tensors)
        for name, h, how in branches:
            start_state.restore(pl_module, opt, spec.tensors)
            if how is not None and how[0] == "gfm":
                spec.write_(path.weights[how[1]].to(spec.device))
                apply_state_policy(opt, spec, self.optimizer_state, path, how[1], self._dyn)
            elif how is not None:
                spec.write_(self.oracle.at(step + h).to(spec.device))
            move = {}
            if how is not None and self.oracle is not None:  # the jump's move against the oracle's, same horizon
                now, truth = win.w[-1].float(), self.oracle.at(step + h).float()
                d, d_true = spec.flatten().float() - now, truth - now
                move = {
                    "norm_ratio": float(d.norm() / d_true.norm().clamp_min(1e-30)),
                    "cosine": float(torch.nn.functional.cosine_similarity(d, d_true, dim=0)),
                }
            losses = [self._evaluate(trainer, pl_module)]
            with torch.random.fork_rng(devices=devices):
                torch.manual_seed(self.seed + step)
                done = 0
                for n in self.counts:
                    for i in range(done, n):
                        private_step(trainer, pl_module, opt, batches[i])
                    done = n
                    losses.append(self._evaluate(trainer, pl_module))
            self.rows.append({"branch": name, "horizon": h, "losses": losses, **move})
        start_state.restore(pl_module, opt, spec.tensors)
        trainer.should_stop = True


def probe(
    task: str, at: int, seed: int, counts: list[int], field: str | None = None, horizons: list[int] | None = None
) -> list[dict]:
    """Rows ``{"branch", "horizon", "losses"}``: validation loss where each branch lands, then after each count."""
    base, recorder = run_one(task, "baseline", seed, False)
    t = TASKS[task]
    budget = t.budget(False)
    pl.seed_everything(seed, verbose=False)
    module, kwargs = t.make(seed, False)
    shared = dict(budget.schedule.callback_kwargs(), seed=seed)
    oracle = OracleJumps(*recorder, **shared)
    cb = _Probe(at, counts, oracle, horizons, field=field, **shared)
    pl.Trainer(callbacks=[cb], **kwargs).fit(module)
    if not cb.rows:
        raise SystemExit(f"No attempt at step {at}: the window was not long enough yet, or the run ended first.")
    return cb.rows


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("task", choices=list(TASKS))
    parser.add_argument("--at", type=int, required=True, help="global step of the attempt")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--settle", type=int, nargs="+", default=[10, 30, 60], help="settling steps to report")
    parser.add_argument("--field", default=None, help="GFM's field, e.g. pretrained:meta (its points join the prior's)")
    parser.add_argument("--horizons", type=int, nargs="+", default=None, help="candidate horizons (default: GFM's)")
    parser.add_argument("--log", default=str(LOG))
    args = parser.parse_args(argv)
    if TASKS[args.task].split not in TUNABLE:
        print(f"note: {args.task} is a {TASKS[args.task].split} task; no default may be chosen from this probe.")
    torch.set_num_threads(1)
    _quiet()
    rows = probe(args.task, args.at, args.seed, args.settle, args.field, args.horizons)
    ref = rows[0]["losses"]
    head = " -> ".join(["landed", *(f"+{n}" for n in sorted(args.settle))])
    print(f"{args.task} seed {args.seed}, attempt at step {args.at}: validation loss ({head})")
    for r in rows:
        marks = " ".join("<" if v < ref[i] else " " for i, v in enumerate(r["losses"]))
        move = f"  |d|/|d*| {r['norm_ratio']:.2f} cos {r['cosine']:.2f}" if "cosine" in r else ""
        print(f"  {r['branch']:13s} " + " -> ".join(f"{v:.4f}" for v in r["losses"]) + f"   [{marks}]{move}")
    print("  ('<': below the no-jump reference after the same steps; d: the move, d*: the oracle's, same horizon)")
    log = Path(args.log)
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("a") as f:
        record = {"task": args.task, "at": args.at, "seed": args.seed, "field": args.field, "rows": rows}
        f.write(json.dumps(record) + "\n")


if __name__ == "__main__":
    main()
