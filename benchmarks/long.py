"""The ``long`` split: dev runs long enough that GFM's 3 % do-no-harm budget covers a settled attempt.

Why a split of its own. The ``dev`` runs (:mod:`benchmarks.tasks`) are 600-1500 steps: 3 % of them is 18-45
steps, and a candidate judged where it settles needs about 30 private steps per branch (docs/experiments.md,
E41), so on dev no settled attempt is ever affordable and ``settle`` cannot be chosen there (issue 14). These
tasks are as much ``dev`` as the four short ones — defaults may be chosen and tuned on them — and are kept
apart only so that the ``dev`` median stays comparable with every earlier run. Nothing here shares data with
the ``heldout`` split: the text is the dev char-LM's (the source of stdlib ``json``, ``email``, ``http``),
the tabular task is scikit-learn's digits (dev), and they were defined before any method ran on them.

* ``long-charlm-gru``: character-level GRU language model (embedding 32, one GRU layer of 96, linear head) on
  the dev char-LM's text, context 32 (stride 16), Adam 2e-3 constant, batch 32, 5000 steps, test loss every
  100. A recurrent LM with Adam at a constant rate: the set-up of issue 14's probe, where rejected jumps paid
  after settling.
* ``long-digits-sgd``: digits, MLP 64-256-256-10 (ReLU), SGD momentum 0.9 lr 5e-4 with cosine to zero per step,
  batch 32, 6000 steps, test loss every 150: a cheap step (about 1 ms), so 3 % of the run is about 180 steps.

Budgets were checked before any method ran on them (``python -m benchmarks.check --split long --seeds 0 1 2`` and,
for the constant rate, ``--extend 1.5`` on seed 0). Test loss at 3/4 of the budget -> at the end (best):
char-GRU 1.3508 -> 1.3418 (1.3241) / 1.3342 -> 1.3310 (1.3183) / 1.3342 -> 1.3271 (1.3129) for seeds 0 / 1 / 2,
about 40 s a run, and at 1.5 budgets 1.3195 -> 1.3186 (1.3073): still falling, slowly, with evaluation noise of
about 0.01 (the target averages the last three); digits-SGD 0.1935 -> 0.1892 / 0.1614 -> 0.1562 / 0.1888 ->
0.1835, best at the end on every seed, about 8 s a run. (Tried first and dropped because of the check: digits-SGD
at lr 0.003, whose test loss was lowest at step 1950 and flat after.)
"""

from __future__ import annotations

import torch
from torch import nn

from benchmarks.tasks import BenchModule, Budget, JumpSchedule, MLPModule, Task, charlm_splits, digits_splits


class CharGRU(nn.Module):
    """Embedding -> one GRU layer -> linear head over characters; ``forward(ids (B, T))`` -> logits (B, T, V)."""

    def __init__(self, vocab: int, d: int = 32, hidden: int = 96):
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.gru = nn.GRU(d, hidden, batch_first=True)
        self.head = nn.Linear(hidden, vocab)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, _ = self.gru(self.emb(x))
        return self.head(out)


class GRULM(BenchModule):
    def __init__(self, splits, vocab: int, *, lr: float, **kw):
        super().__init__(*splits, **kw)
        self.net = CharGRU(vocab)
        self.lr = lr
        self.eval_batch_size = 64

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=self.lr)


class CosineSGDMLP(MLPModule):
    def configure_optimizers(self):
        opt = torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=self.max_steps)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


def _charlm_gru(seed: int, max_steps: int) -> BenchModule:
    splits, vocab = charlm_splits(context=32)
    return GRULM(splits, vocab, lr=2e-3, batch_size=32, seed=seed, max_steps=max_steps)


def _digits_sgd(seed: int, max_steps: int) -> BenchModule:
    return CosineSGDMLP(
        digits_splits(seed), (64, 256, 256, 10), opt="sgd", lr=5e-4, batch_size=32, seed=seed, max_steps=max_steps
    )


def _quick(max_steps: int = 240) -> Budget:
    return Budget(max_steps, 20, JumpSchedule(budget=False))


TASKS: dict[str, Task] = {
    t.name: t
    for t in [
        Task(
            "long-charlm-gru",
            _charlm_gru,
            full=Budget(5000, 100, JumpSchedule()),
            quick=_quick(),
            classification=False,
            limit_val_batches=2,
            description="char-level GRU 96 on the dev text, context 32, Adam 2e-3 constant, batch 32",
            constant_lr=True,
            split="long",
        ),
        Task(
            "long-digits-sgd",
            _digits_sgd,
            full=Budget(6000, 150, JumpSchedule()),
            quick=_quick(),
            limit_val_batches=2,
            description="digits 8x8, MLP 64-256-256-10, SGD momentum 0.9 lr 5e-4 + cosine (per step)",
            split="long",
        ),
    ]
}

QUICK_TASKS = ("long-digits-sgd",)
