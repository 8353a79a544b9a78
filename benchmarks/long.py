"""The ``long`` split: dev runs long enough that GFM's 3 % do-no-harm budget covers a settled attempt.

Why a split of its own. The ``dev`` runs (:mod:`benchmarks.tasks`) are 600-1500 steps: 3 % of them is 18-45
steps, and a candidate judged where it settles needs about 30 private steps per branch (docs/experiments.md,
E41), so on dev no settled attempt was ever affordable and the ``settle`` option could not be chosen there (issue
14). It was measured here instead, saved nothing and was removed (E48); the split stays, as dev runs of thousands
of steps where the budget does not bind. These tasks are as much ``dev`` as the four short ones — defaults may be
chosen and tuned on them — and are kept apart only so that the ``dev`` median stays comparable with every earlier
run. Nothing here shares data with the ``heldout`` split: the text is the dev char-LM's (the source of stdlib
``json``, ``email``, ``http``), the tabular task is scikit-learn's digits (dev), and they were defined before any
method ran on them.

* ``long-charlm-gru``: character-level GRU language model (embedding 32, one GRU layer of 96, linear head) on
  the dev char-LM's text, context 32 (stride 16), Adam 3e-3 with cosine to zero per step, batch 32, 5000 steps,
  test loss every 100 on all 996 test windows. A recurrent LM under Adam: the set-up of issue 14's probe, where
  rejected jumps paid after settling.
* ``long-digits-sgd``: digits, MLP 64-256-256-10 (ReLU), SGD momentum 0.9 lr 5e-4 with cosine to zero per step,
  batch 32, 6000 steps, test loss every 150: a cheap step (about 1 ms), so 3 % of the run is about 180 steps.

Budgets were checked before any method ran on them (``python -m benchmarks.check --split long --seeds 0 1 2``).
Test loss at 3/4 of the budget -> at the end (best), and where the baseline first reaches its own target:
char-GRU 1.6596 -> 1.6530 (1.6525, target at 0.90 of the run) / 1.6768 -> 1.6698 (1.6689, 0.86) / 1.6438 ->
1.6411 (1.6411, 0.98) for seeds 0 / 1 / 2, about 41 s a run; digits-SGD 0.1935 -> 0.1892 / 0.1614 -> 0.1562 /
0.1888 -> 0.1835, best at the end on every seed (target at 0.975 of the run on seed 0), about 8 s a run.
Tried first and dropped on the baselines alone: digits-SGD at lr 0.003 (test loss lowest at step 1950, flat
after), and the char-GRU at a constant Adam 2e-3 scored on 128 test windows, whose baseline reached its target at
0.70 of the run (a plateau with evaluation noise of about 0.01, where steps saved measure the noise; its one
partial run of the methods is kept in ``benchmarks/results/experiments/e48_levers_constant_gru.txt``).
"""

from __future__ import annotations

import torch
from torch import nn

from benchmarks.tasks import (
    BenchModule,
    Budget,
    JumpSchedule,
    MLPModule,
    Task,
    _quick,  # the dev split's smoke budgets
    charlm_splits,
    digits_splits,
)


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
        opt = torch.optim.Adam(self.parameters(), lr=self.lr)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=self.max_steps)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


class CosineSGDMLP(MLPModule):
    def configure_optimizers(self):
        opt = torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=self.max_steps)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


def _charlm_gru(seed: int, max_steps: int) -> BenchModule:
    splits, vocab = charlm_splits(context=32, test_windows=None)  # all 996: a steadier target
    return GRULM(splits, vocab, lr=3e-3, batch_size=32, seed=seed, max_steps=max_steps)


def _digits_sgd(seed: int, max_steps: int) -> BenchModule:
    return CosineSGDMLP(
        digits_splits(seed), (64, 256, 256, 10), opt="sgd", lr=5e-4, batch_size=32, seed=seed, max_steps=max_steps
    )


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
            description="char-level GRU 96 on the dev text, context 32, Adam 3e-3 + cosine (per step), batch 32",
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
