"""Probe: do the prior's landings overshoot in the scalars whose velocity is already decaying?

At one attempt (the step ``--at`` of a dev task's run) GFM's default forecast is taken, and each scalar's
relaxation rate is estimated from the window: the least-squares line through its last ``trend - 1`` velocities,
``u(t) = a + b (t - t_mean)``, whose slope is shrunk by its own signal-to-noise ratio (as the trend's slope is);
``lam = max(0, -b / u_end)`` per optimizer step. A scalar relaxing exponentially at ``lam`` moves
``u_end (1 - exp(-lam h)) / lam`` in ``h`` steps, not ``u_end h``. Printed, per horizon:

* the best scaling of the prior's move against the baseline run's own future weights (the oracle), per quintile of
  ``lam h`` (``sum d d* / sum d^2``): if the prior overshoots in relaxing scalars it falls with ``lam h``;
* the validation loss where the prior, its relaxed variant (each scalar's move times ``(1 - exp(-lam h)) /
  (lam h)``) and the oracle land.

    python -m benchmarks.experiments.relax charlm --at 500 --seed 0

Dev tasks only: held-out tasks are measured by the benchmark, never probed (``benchmarks/heldout.py``).
"""

from __future__ import annotations

import argparse
import math

import lightning.pytorch as pl
import torch

from benchmarks.methods import OracleJumps, TimedGFM
from benchmarks.run import _quiet, run_one
from benchmarks.suite import TASKS, TUNABLE


def relaxation_rates(w: torch.Tensor, steps: torch.Tensor) -> torch.Tensor:
    """Per-scalar relaxation rate of the velocity, per optimizer step, shape ``(P,)`` (``>= 0``).

    Args:
        w: the last ``n >= 4`` snapshots, shape ``(n, P)``.
        steps: their global steps, shape ``(n,)``.
    """
    t = steps.to(torch.float64)
    dt = (t[1:] - t[:-1]).to(w.dtype)[:, None]
    u = (w[1:] - w[:-1]).float() / dt  # (n - 1, P)
    tm = ((t[1:] + t[:-1]) / 2).to(w.dtype)[:, None]
    x = tm - tm.mean(0)
    sxx = x.pow(2).sum(0)
    b = (x * (u - u.mean(0))).sum(0) / sxx
    resid = u - u.mean(0) - b * x
    var_b = resid.pow(2).sum(0) / ((u.shape[0] - 2) * sxx)
    b = b * b.pow(2) / (b.pow(2) + var_b).clamp_min(1e-30)
    u_end = u.mean(0) + b * x[-1]
    lam = -b / u_end.where(u_end.abs() > 1e-30, torch.full_like(u_end, 1e-30))
    return lam.clamp_min(0.0).nan_to_num(0.0)


class _Probe(TimedGFM):
    def __init__(self, at: int, oracle: OracleJumps, n: int, **kwargs):
        super().__init__(overhead=None, **kwargs)
        self.at, self.oracle, self.n, self.rows = at, oracle, n, []

    def should_jump(self, step: int) -> bool:
        return step == self.at

    def _attempt(self, trainer, pl_module, step, start) -> None:
        from lightning_gfm.flow.window import Window

        spec = self._spec
        win = Window.from_buffer(self.buffer, spec, self._dyn.state_names, self._total_steps(trainer), lean=self._lean)
        horizons = self._horizons(trainer, step, win)
        path, _ = self.forecast_path(trainer, pl_module, win, horizons)
        now = spec.flatten().float().cpu()
        lam = relaxation_rates(win.w[-self.n :].float().cpu(), win.steps[-self.n :].cpu())
        self.rows.append(("no jump", 0, self._evaluate(trainer, pl_module), float("nan")))
        for k, h in enumerate(path.horizons):
            if not k:
                continue
            d = path.weights[k].float().cpu() - now
            truth = self.oracle.at(step + h).float().cpu() - now
            x = lam * h
            factor = torch.where(x > 1e-6, -torch.expm1(-x) / x.clamp_min(1e-12), 1.0 - x / 2)
            edges = torch.quantile(x[torch.randperm(x.numel())[:100_000]], torch.tensor([0.2, 0.4, 0.6, 0.8]))
            bins = torch.bucketize(x, edges)
            gains = []
            for q in range(5):
                m = bins == q
                gain = (d[m] * truth[m]).sum() / d[m].pow(2).sum().clamp_min(1e-30) if m.any() else math.nan
                gains.append(float(gain))  # a quintile is empty where many scalars tie at lam = 0
            tops = [float(x[bins == q].median()) if (bins == q).any() else math.nan for q in range(5)]
            for name, move in (("prior", d), ("relaxed", d * factor), ("oracle", truth)):
                spec.write_((now + move).to(spec.device))
                self.rows.append((f"{name} +{h}", h, self._evaluate(trainer, pl_module), float("nan")))
            spec.write_(now.to(spec.device))
            print(
                f"  +{h}: best scaling of the prior's move by quintile of lam*h (median lam*h "
                + ", ".join(f"{v:.2g}" for v in tops)
                + "): "
                + ", ".join(f"{g:.2f}" for g in gains)
                + f"; relaxed move / prior move {float((d * factor).norm() / d.norm()):.2f}"
            )
        trainer.should_stop = True


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("task", choices=[n for n, t in TASKS.items() if t.split in TUNABLE])
    parser.add_argument("--at", type=int, required=True, help="global step of the attempt")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--snapshots", type=int, default=8, help="snapshots the rates are estimated from")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    _quiet()
    _, recorder = run_one(args.task, "baseline", args.seed, False)
    t = TASKS[args.task]
    pl.seed_everything(args.seed, verbose=False)
    module, kwargs = t.make(args.seed, False)
    shared = dict(t.budget(False).schedule.callback_kwargs(), seed=args.seed)
    cb = _Probe(args.at, OracleJumps(*recorder, **shared), args.snapshots, **shared)
    print(f"{args.task} seed {args.seed}, attempt at step {args.at}:")
    pl.Trainer(callbacks=[cb], **kwargs).fit(module)
    for name, _, loss, _ in cb.rows:
        print(f"  {name:14s} validation loss {loss:.4f}")


if __name__ == "__main__":
    main()
