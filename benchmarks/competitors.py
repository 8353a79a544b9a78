"""What a user would pick instead of a forecaster: two jump methods without a forecast, as Lightning callbacks.

* :class:`FastForward` (Rahamim, Saphra, Kangaslahti, Belinkov, EMNLP 2024, arXiv 2409.04206): every
  ``every=6`` optimizer steps, repeat the last optimizer update ``Δw`` as a line search, ``w + k·Δw`` for
  ``k = 1, 2, ...``, while the loss on a small validation set keeps falling; the last point that lowered it is
  kept. The optimizer's state is left as it is, as in the paper. Its "tiny validation set" here is the first
  ``eval_batches`` validation batches, the same batches GFM's acceptance test uses. The authors report it
  effective for LoRA fine-tuning and ineffective for full-rank training; these benchmark tasks are all
  full-rank, which is the point of measuring it. Its line-search steps are not optimizer steps: *steps saved*
  counts optimizer steps only, so its evaluation cost shows in *wall-clock saved* alone.
* :class:`Lookahead`, SNOO-style (Kallusky et al., arXiv 2510.15830, 2025; Lookahead: Zhang et al. 2019):
  every ``k`` inner steps the displacement of the weights since the last outer step is a pseudo-gradient
  ``s = w_slow - w_fast``; a Nesterov outer step ``b = μ b + s``, ``w_slow -= η (s + μ b)`` moves the slow
  weights, and the fast weights restart from them (the inner optimizer's state is kept). ``μ = 0, η = α`` is
  Lookahead. Fixed values, not tuned on any benchmark task: ``k = 20`` (SNOO's step-K outer loop runs every
  few to tens of inner steps), ``η = 0.7`` and ``μ = 0.9``, DiLoCo's published outer Nesterov values (Douillard
  et al. 2023), which SNOO starts from. In a steady drift the outer step moves ``η / (1 - μ) = 7`` times the
  inner displacement.

Both write the weights in place (``p.detach().copy_``), act only when ``trainer.global_step`` advanced (so
gradient accumulation is honoured), evaluate under the precision plugin's validation context (autocast for
``bf16-mixed``), in eval mode, with the module's own loss (:meth:`benchmarks.tasks.BenchModule.loss_and_correct`).
"""

from __future__ import annotations

import time

import lightning.pytorch as pl
import torch
from torch import Tensor


def _trainable(pl_module: pl.LightningModule) -> list[Tensor]:
    return [p for p in pl_module.parameters() if p.requires_grad]


class FastForward(pl.Callback):
    """Fast Forward: every ``every`` steps, line-search along the last update while validation loss falls.

    Args:
        every: optimizer steps between Fast Forward stages (the paper's 6).
        eval_batches: validation batches of the "tiny validation set".
        max_repeats: safety cap on the line search (the paper has none; it is never reached on these tasks
            unless the loss keeps falling along one update for that long).
    """

    def __init__(self, every: int = 6, eval_batches: int = 4, max_repeats: int = 100):
        self.every = every
        self.eval_batches = eval_batches
        self.max_repeats = max_repeats
        self._prev: list[Tensor] | None = None
        self._last_step = 0
        self._batches: list | None = None
        self.stages: list[dict] = []  # one per stage: step, repeats kept, loss before / after, seconds
        self.seconds = 0.0

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        if (trainer.global_step + 1) % self.every == 0:  # the update about to happen is the one to repeat
            self._prev = [p.detach().clone() for p in _trainable(pl_module)]

    def _val_batches(self, trainer, pl_module) -> list:
        if self._batches is None:
            if trainer.val_dataloaders is None:
                trainer.fit_loop.epoch_loop.val_loop.setup_data()
            loader = trainer.val_dataloaders
            loader = loader[0] if isinstance(loader, list | tuple) else loader
            batches = []
            with torch.random.fork_rng(devices=[]):
                for i, batch in enumerate(loader):
                    if i >= self.eval_batches:
                        break
                    batches.append(trainer.strategy.batch_to_device(batch))
            self._batches = batches
        return self._batches

    @torch.no_grad()
    def _loss(self, trainer, pl_module) -> float:
        total, count = 0.0, 0
        was = pl_module.training
        pl_module.eval()
        try:
            with trainer.precision_plugin.val_step_context():
                for batch in self._val_batches(trainer, pl_module):
                    loss, _, n = pl_module.loss_and_correct(pl_module, batch)
                    total, count = total + float(loss), count + n
        finally:
            pl_module.train(was)
        return total / count

    @torch.no_grad()
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        step = trainer.global_step
        if step == self._last_step:
            return  # an accumulation micro-batch: no optimizer step happened
        self._last_step = step
        if step % self.every != 0 or self._prev is None or step >= trainer.max_steps:
            return
        start = time.perf_counter()
        params = _trainable(pl_module)
        delta = [p.detach() - q for p, q in zip(params, self._prev, strict=True)]
        self._prev = None
        before = best = self._loss(trainer, pl_module)
        repeats = 0
        while repeats < self.max_repeats:
            for p, d in zip(params, delta, strict=True):
                p.detach().add_(d)
            loss = self._loss(trainer, pl_module)
            if not loss < best:  # NaN or no better: step back to the last point that lowered it
                for p, d in zip(params, delta, strict=True):
                    p.detach().sub_(d)
                break
            best, repeats = loss, repeats + 1
        seconds = time.perf_counter() - start
        self.seconds += seconds
        self.stages.append({"step": step, "repeats": repeats, "before": before, "after": best, "seconds": seconds})


class Lookahead(pl.Callback):
    """SNOO-style outer step: Nesterov momentum on the ``k``-step displacement of the weights.

    Args:
        k: inner optimizer steps per outer step.
        lr: outer learning rate ``η``.
        momentum: outer Nesterov momentum ``μ`` (0: plain Lookahead with ``α = lr``).
    """

    def __init__(self, k: int = 20, lr: float = 0.7, momentum: float = 0.9):
        self.k, self.lr, self.momentum = k, lr, momentum
        self._slow: list[Tensor] | None = None
        self._buf: list[Tensor] | None = None
        self._last_step = 0
        self.outer_steps = 0
        self.seconds = 0.0

    def on_train_start(self, trainer, pl_module):
        self._slow = [p.detach().clone() for p in _trainable(pl_module)]
        self._buf = [torch.zeros_like(p) for p in self._slow]
        self._last_step = trainer.global_step

    @torch.no_grad()
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        step = trainer.global_step
        if step == self._last_step:
            return
        self._last_step = step
        if step % self.k != 0:
            return
        start = time.perf_counter()
        for p, slow, buf in zip(_trainable(pl_module), self._slow, self._buf, strict=True):
            s = slow - p.detach()  # pseudo-gradient: where the inner steps came from minus where they went
            buf.mul_(self.momentum).add_(s)
            slow.sub_(self.lr * (s + self.momentum * buf))
            p.detach().copy_(slow)
        self.outer_steps += 1
        self.seconds += time.perf_counter() - start
