"""Probe: are BatchNorm candidates judged with statistics that belong to other weights?

A jump moves the weights but not BatchNorm's running mean and variance, which the network uses in evaluation;
they describe the activations of the weights before the jump, so a candidate is scored with statistics that are
not its own, while the no-jump reference is scored with (nearly) its own. At one attempt of a BatchNorm CNN on the
dev data (the ``digits-cnn`` task's data, optimizer and schedule with a BatchNorm after each convolution), each of
GFM's candidates and the no-jump reference is scored on the validation split three ways:

* ``stale``: the running statistics as they are (what the callback's evaluation sees today);
* ``batch``: BatchNorm in training mode, the validation batch's own statistics (nothing written back);
* ``fresh``: running statistics recomputed from ``--refresh`` training batches at these weights (a cumulative
  average, what the statistics settle to when training continues from here; the reference for the other two).

    python -m benchmarks.experiments.batchnorm --at 200 300 --seeds 0 1 2

Dev data only: held-out tasks are measured by the benchmark, never probed (``benchmarks/heldout.py``).
"""

from __future__ import annotations

import argparse
import copy

import lightning.pytorch as pl
import torch
from torch import nn

from benchmarks.methods import TimedGFM
from benchmarks.run import _quiet
from benchmarks.suite import TASKS
from benchmarks.tasks import DigitsCNN, digits_splits


class DigitsCNNBN(DigitsCNN):
    """The dev CNN with a BatchNorm after each convolution (same data, optimizer and schedule)."""

    def __init__(self, splits, **kw):
        super().__init__(splits, **kw)
        self.net = nn.Sequential(
            nn.Unflatten(1, (1, 8, 8)),
            nn.Conv2d(1, 16, 3, padding=1),
            nn.BatchNorm2d(16),
            nn.ReLU(),
            nn.Conv2d(16, 32, 3, padding=1),
            nn.BatchNorm2d(32),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Flatten(),
            nn.Linear(32 * 4 * 4, 10),
        )


def _norms(net: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    return [m for m in net.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


@torch.no_grad()
def scores(module: DigitsCNNBN, refresh: int) -> dict[str, float]:
    """Validation loss of ``module``'s weights with stale, batch and fresh BatchNorm statistics."""
    out = {"stale": module.score("val")["loss"]}
    batch = copy.deepcopy(module)
    batch.eval()
    for m in _norms(batch):
        m.train()  # the batch's own statistics (the copy's running statistics are discarded)
    x, y = batch.val_data
    parts = [batch.loss_and_correct(batch, (x[i : i + 256], y[i : i + 256]))[0] for i in range(0, len(x), 256)]
    total = sum(float(v) for v in parts)
    out["batch"] = total / len(x)
    fresh = copy.deepcopy(module)
    for m in _norms(fresh):
        m.reset_running_stats()
        m.momentum = None  # a cumulative average over the refresh batches
    fresh.train()
    gen = torch.Generator().manual_seed(0)
    xt, _ = fresh.train_data
    for _ in range(refresh):
        fresh(xt[torch.randint(len(xt), (fresh.batch_size,), generator=gen)])
    out["fresh"] = fresh.score("val")["loss"]
    return out


class _Probe(TimedGFM):
    def __init__(self, at: list[int], refresh: int, **kwargs):
        super().__init__(overhead=None, **kwargs)
        self.at, self.refresh, self.rows = set(at), refresh, []

    def should_jump(self, step: int) -> bool:
        return step in self.at

    def _attempt(self, trainer, pl_module, step, start) -> None:
        from lightning_gfm.flow.window import Window

        spec = self._spec
        win = Window.from_buffer(self.buffer, spec, self._dyn.state_names, self._total_steps(trainer), lean=self._lean)
        path, _ = self.forecast_path(trainer, pl_module, win, self._horizons(trainer, step, win))
        now = spec.flatten().clone()
        self.rows.append((step, 0, scores(pl_module, self.refresh)))
        for k, h in enumerate(path.horizons):
            if k:
                spec.write_(path.weights[k].to(spec.device))
                self.rows.append((step, h, scores(pl_module, self.refresh)))
        spec.write_(now)
        trainer.should_stop = step >= max(self.at)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--at", type=int, nargs="+", default=[200, 300], help="global steps of the attempts")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--refresh", type=int, default=20, help="training batches the fresh statistics average")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    _quiet()
    task = TASKS["digits-cnn"]
    budget = task.budget(False)
    for seed in args.seeds:
        pl.seed_everything(seed, verbose=False)
        _, kwargs = task.make(seed, False)
        module = DigitsCNNBN(digits_splits(seed), lr=0.005, batch_size=32, seed=seed, max_steps=budget.max_steps)
        cb = _Probe(args.at, args.refresh, **budget.schedule.callback_kwargs(), seed=seed)
        pl.Trainer(callbacks=[cb], **kwargs).fit(module)
        for step, h, s in cb.rows:
            name = "no jump" if h == 0 else f"gfm +{h}"
            print(f"seed {seed} step {step:4d} {name:9s} " + "  ".join(f"{k} {v:.4f}" for k, v in s.items()))


if __name__ == "__main__":
    main()
