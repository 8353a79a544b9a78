"""Probe: what would a jump buy at a given step? Validation loss of simple forecasts against the true future.

Trains a task's baseline once, recording the weights every ``--every`` steps, then at each ``--at`` step
prints the change in validation loss (negative = better than the current weights) of

* ``true{h}``: the run's own weights ``h`` steps later (what a perfect forecaster would offer);
* ``ls{n}_{h}``: the least-squares line through the last ``n`` snapshots, evaluated ``h`` steps ahead
  (``h = 0``: the denoised current point, the start of ``anchor="trend"``);
* ``adam{h}``: for Adam, ``h`` more steps along the current update direction ``m_hat / sqrt(v_hat)``, the
  constant-gradient extrapolation of the ``anchor="state"`` prior.

    python -m benchmarks.experiments.probe charlm --at 200 400 600 800 --every 10
"""

from __future__ import annotations

import argparse

import lightning.pytorch as pl
import torch
from torch import Tensor

from benchmarks.run import _quiet
from benchmarks.tasks import TASKS
from lightning_gfm.params import ParamSpec


class _Recorder(pl.Callback):
    def __init__(self, every: int):
        self.every = every
        self.records: dict[int, tuple[Tensor, Tensor | None, Tensor | None, float, int]] = {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        step = trainer.global_step
        if step % self.every:
            return
        opt = trainer.optimizers[0]
        spec = ParamSpec.from_module(pl_module, opt)
        first = opt.state[spec.params[0]]
        m = v = None
        if "exp_avg" in first:
            m = spec.flatten([opt.state[p]["exp_avg"] for p in spec.params], device="cpu").clone()
            v = spec.flatten([opt.state[p]["exp_avg_sq"] for p in spec.params], device="cpu").clone()
        w = spec.flatten(device="cpu").clone()
        self.records[step] = (w, m, v, opt.param_groups[0]["lr"], int(first.get("step", step)))


def _line(steps: list[int], rec: dict, n: int, at: float) -> Tensor:
    t = torch.tensor(steps[-n:], dtype=torch.float32)
    w = torch.stack([rec[s][0] for s in steps[-n:]])
    dt = t - t.mean()
    slope = (dt[:, None] * (w - w.mean(0))).sum(0) / dt.pow(2).sum()
    return w.mean(0) + slope * (at - t.mean())


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("task", choices=sorted(TASKS))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--at", nargs="+", type=int, required=True)
    parser.add_argument("--every", type=int, default=10)
    parser.add_argument("--horizons", nargs="+", type=int, default=[10, 20, 40])
    parser.add_argument("--points", nargs="+", type=int, default=[2, 4, 8])
    args = parser.parse_args(argv)
    _quiet()
    torch.set_num_threads(1)
    task = TASKS[args.task]
    pl.seed_everything(args.seed, verbose=False)
    module, trainer_kwargs = task.make(args.seed)
    rec = _Recorder(args.every)
    pl.Trainer(callbacks=[rec], **trainer_kwargs).fit(module)
    spec = ParamSpec.from_module(module)

    def val(w: Tensor) -> float:
        spec.write_(w)
        return module.score("val")["loss"]

    for s in args.at:
        w, m, v, lr, k = rec.records[s]
        cur = val(w)
        steps = sorted(x for x in rec.records if x <= s)
        out = {f"ls{n}_0": val(_line(steps, rec.records, n, s)) - cur for n in args.points if n <= len(steps)}
        for h in args.horizons:
            if s + h in rec.records:
                out[f"true{h}"] = val(rec.records[s + h][0]) - cur
            for n in args.points:
                if n <= len(steps):
                    out[f"ls{n}_{h}"] = val(_line(steps, rec.records, n, s + h)) - cur
            if m is not None:
                d = (m / (1 - 0.9**k)) / ((v / (1 - 0.999**k)).sqrt() + 1e-8)
                out[f"adam{h}"] = val(w - lr * h * d) - cur
        print(s, f"val {cur:.4f}", " ".join(f"{key}:{value:+.4f}" for key, value in out.items()), flush=True)


if __name__ == "__main__":
    main()
