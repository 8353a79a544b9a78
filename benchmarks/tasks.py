"""Benchmark tasks: real, offline data and small models, each a LightningModule with fixed splits and data order.

Every task is built by ``TASKS[name].make(seed, quick)`` which returns ``(module, trainer_kwargs)``. The module
holds three tensor splits (train / val / test), serves train batches in a seeded order (a ``torch.Generator``
of its own, so nothing else consumes or disturbs it), logs ``val_loss`` in ``validation_step`` (what the jump
methods' acceptance decides on) and scores any split with :meth:`BenchModule.score` (what the benchmark's
measuring callback uses on the test split, which no method ever sees during training).

Budgets (full mode) were chosen so that the test loss is still falling (or, under a cosine schedule that ends
at zero, flat within 0.002 of its best) at the last evaluation; checked on seed 0 (all tasks) and seeds 0-2
(digits-cnn) with ``python -m benchmarks.tasks --check`` (now ``python -m benchmarks.check``), which prints the
baseline's test loss at 3/4 of the budget, at the end, and its best. Tasks with a constant learning rate must
also keep improving up to 1.5 times their budget (``python -m benchmarks.tasks --check --extend 1.5``, seeds
0-2): a method that saves a third of the steps has, at the end of the budget, trained about as far as the
baseline in 1.5 budgets, and the final-quality check must not measure over-training instead of the method
(docs/experiments.md, E21).

These four tasks are the ``dev`` split: the package's defaults were chosen on them, and may be tuned on them.
The ``heldout`` split (:mod:`benchmarks.heldout`) is frozen and only reported; the rule is written there and
in docs/benchmark.md. :mod:`benchmarks.suite` holds both splits in one registry.

* ``mnist1d-mlp``: mnist1d (4000 train, 1000 test; 500 of the train set held out for validation), MLP
  40-256-256-10, Adam 2e-4, batch 128, 1300 steps, test loss every 25. Its baseline's test loss is lowest at step
  2250 / 2000 / 2300 (seeds 0 / 1 / 2) and rises after (1.15-1.19 at step 4000), so the former budget of 2000
  steps ended where over-training starts: the oracle itself (the baseline's own future weights) ended worse
  than the baseline there. Adam 1e-3 / batch 64 overfits mnist1d early; this slower setting is the "drift"
  regime of the notes.
* ``digits-cnn``: scikit-learn's 8x8 digits (1100 / 348 / 349), CNN 1-16-32 conv + linear, SGD momentum 0.9,
  lr 0.005, weight decay 5e-4, cosine to zero per step, batch 32, 600 steps (last quarter -0.003 / -0.002 /
  -0.001 for seeds 0 / 1 / 2; seed 0's best, 0.002 lower, was at step 480). At lr 0.02 / 1200 steps the test
  loss bottomed out at step ~520 and rose after: the tiny test set overfits quickly.
* ``charlm``: character-level causal transformer (d=64, 2 layers, 4 heads, context 64) on the source of
  Python's stdlib ``json``, ``email`` and ``http`` packages (90 % / 5 % / 5 % by position; 128 windows of 64
  characters for val and for test), AdamW 3e-3, weight decay 0.01, linear warm-up (5 %) then cosine, batch
  16, 1000 steps. Far from converged: its loss falls all along (seed 0 at 1200 steps: 1.816 -> 1.781 over the
  last quarter).
* ``digits-rmsprop``: digits, MLP 64-128-128-10 (tanh), RMSprop 1e-4, batch 32, 1500 steps (seed 0: 0.179 at
  step 1100 -> 0.148 at 1500, best at the end; trained twice as long, best at 1.97 / 1.60 / 1.50 budgets).

``quick=True`` shrinks budgets so the whole benchmark smoke-runs in about a minute; quick budgets are not
checked for anything.
"""

from __future__ import annotations

import functools
import math
import os
from collections.abc import Callable
from dataclasses import dataclass, field

import lightning.pytorch as pl
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_gfm import GFMCallback, auto_schedule

Split = tuple[Tensor, Tensor]


@dataclass(frozen=True)
class JumpSchedule:
    """When every jump method (linear, GFM, oracle) records and tries to jump, and how far it may look.

    One place per task, shared by all jump methods so that only the forecaster differs between them. ``None``
    leaves a value to :class:`~lightning_gfm.GFMCallback`'s default: every task now runs the defaults (a jump
    every sixth of the budget, ten snapshots per jump interval, up to the field's fitted span ahead).
    """

    record_every: int | None = None
    jump_every: int | None = None
    horizon: int | None = None
    n_candidates: int | None = None
    window: int | None = None
    eval_batches: int = 4
    #: ``False`` lifts GFM's do-no-harm budget (``overhead=None``): quick smoke runs are too short to afford an
    #: attempt within it, and exist to exercise every method's attempts, not to measure them
    budget: bool = True

    def callback_kwargs(self) -> dict:
        """The keyword arguments a jump method passes on (those left to the callback's defaults omitted)."""
        extra = {} if self.budget else {"overhead": None}
        return extra | self._given()

    def _given(self) -> dict:
        kwargs = dict(
            record_every=self.record_every,
            jump_every=self.jump_every,
            horizon=self.horizon,
            n_candidates=self.n_candidates,
            window=self.window,
            eval_batches=self.eval_batches,
        )
        return {k: v for k, v in kwargs.items() if v is not None}

    def resolved(self, max_steps: int) -> dict:
        """The schedule a run of ``max_steps`` steps really gets (for the report)."""
        record_every, jump_every = auto_schedule(max_steps, self.record_every, self.jump_every)
        cb = GFMCallback(**self.callback_kwargs())  # the callback's defaults for what is left to them
        fitted = cb.field_config.fitted_steps(cb.window, record_every)
        return {
            "record_every": record_every,
            "jump_every": jump_every,
            "horizon": self.horizon if self.horizon is not None else fitted,
            "n_candidates": cb.n_candidates,
            "window": cb.window,
            "eval_batches": self.eval_batches,
        }


@dataclass(frozen=True)
class Budget:
    max_steps: int
    val_every: int
    schedule: JumpSchedule


@dataclass(frozen=True)
class Task:
    name: str
    build: Callable[[int, int], BenchModule]  # (seed, max_steps) -> module
    full: Budget
    quick: Budget
    classification: bool = True
    limit_val_batches: int = 4
    description: str = ""
    constant_lr: bool = False  # no schedule ties the run to its budget (the ``--check --extend`` rule applies)
    split: str = "dev"  # "dev": defaults may be chosen here; "heldout": frozen, only reported (benchmarks/heldout.py)
    trainer_kwargs: dict = field(default_factory=dict)  # e.g. precision, gradient clipping, accumulation

    def budget(self, quick: bool = False) -> Budget:
        return self.quick if quick else self.full

    def make(self, seed: int, quick: bool = False) -> tuple[BenchModule, dict]:
        """The module and the ``Trainer`` keyword arguments (call ``seed_everything(seed)`` first)."""
        b = self.budget(quick)
        module = self.build(seed, b.max_steps)
        kwargs = dict(
            max_steps=b.max_steps,
            max_epochs=-1,
            val_check_interval=b.val_every,
            check_val_every_n_epoch=None,
            limit_val_batches=self.limit_val_batches,
            num_sanity_val_steps=0,
            accelerator="cpu",
            devices=1,
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
        )
        kwargs.update(self.trainer_kwargs)
        return module, kwargs


# ---------------------------------------------------------------------------------------------------- module
class BenchModule(pl.LightningModule):
    """Holds the splits, serves seeded batches, logs ``val_loss``; subclasses define ``net`` and the optimizer."""

    def __init__(self, train: Split, val: Split, test: Split, *, batch_size: int, seed: int, max_steps: int):
        super().__init__()
        self.train_data, self.val_data, self.test_data = train, val, test
        self.batch_size = batch_size
        self.data_seed = seed
        self.max_steps = max_steps
        self.eval_batch_size = 256

    def loss_and_correct(self, net: nn.Module, batch) -> tuple[Tensor, Tensor, int]:
        """Summed loss, number correct, and number of predictions in ``batch`` when forwarded by ``net``."""
        x, y = batch
        logits = net(x)
        logits, y = logits.reshape(-1, logits.shape[-1]), y.reshape(-1)
        loss = nn.functional.cross_entropy(logits, y, reduction="sum")
        return loss, (logits.argmax(-1) == y).sum(), y.numel()

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        loss, _, n = self.loss_and_correct(self, batch)
        return loss / n

    def validation_step(self, batch, batch_idx):
        loss, _, n = self.loss_and_correct(self, batch)
        self.log("val_loss", loss / n, batch_size=n)

    @torch.no_grad()
    def score(self, split: str = "test", net: nn.Module | None = None) -> dict[str, float]:
        """Mean loss (and accuracy) of ``net`` (default: this module) on ``split``, in eval mode, RNG untouched."""
        net = self if net is None else net
        x, y = {"train": self.train_data, "val": self.val_data, "test": self.test_data}[split]
        was = net.training
        net.eval()
        total, correct, count = 0.0, 0, 0
        try:
            for lo in range(0, len(x), self.eval_batch_size):
                batch = (x[lo : lo + self.eval_batch_size], y[lo : lo + self.eval_batch_size])
                loss, c, n = self.loss_and_correct(net, batch)
                total, correct, count = total + float(loss), correct + int(c), count + n
        finally:
            net.train(was)
        return {"loss": total / count, "acc": correct / count}

    def train_dataloader(self):
        gen = torch.Generator().manual_seed(1000 + self.data_seed)
        return DataLoader(TensorDataset(*self.train_data), batch_size=self.batch_size, shuffle=True, generator=gen)

    def val_dataloader(self):
        return DataLoader(TensorDataset(*self.val_data), batch_size=self.eval_batch_size)


# ------------------------------------------------------------------------------------------------------ data
@functools.lru_cache(maxsize=1)
def _mnist1d() -> tuple[Split, Split]:
    from mnist1d.data import get_dataset_args, make_dataset

    d = make_dataset(get_dataset_args())  # procedural, seed 42: no download
    x, y = torch.tensor(d["x"], dtype=torch.float32), torch.tensor(d["y"], dtype=torch.long)
    xt, yt = torch.tensor(d["x_test"], dtype=torch.float32), torch.tensor(d["y_test"], dtype=torch.long)
    mean, std = x.mean(0), x.std(0) + 1e-3
    return ((x - mean) / std, y), ((xt - mean) / std, yt)


def mnist1d_splits(seed: int) -> tuple[Split, Split, Split]:
    """mnist1d: 3500 train / 500 val (a seeded split of the 4000 training samples) / the 1000 test samples."""
    (x, y), test = _mnist1d()
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    x, y = x[perm], y[perm]
    return (x[500:], y[500:]), (x[:500], y[:500]), test


@functools.lru_cache(maxsize=1)
def _digits() -> Split:
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    x = torch.tensor(x, dtype=torch.float32) / 16.0
    return (x - x.mean(0)) / (x.std(0) + 1e-3), torch.tensor(y, dtype=torch.long)


def digits_splits(seed: int) -> tuple[Split, Split, Split]:
    """Digits: 1100 train / 348 val / 349 test, split by a seeded permutation."""
    x, y = _digits()
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    x, y = x[perm], y[perm]
    return (x[:1100], y[:1100]), (x[1100:1448], y[1100:1448]), (x[1448:], y[1448:])


@functools.lru_cache(maxsize=1)
def _corpus() -> tuple[Tensor, int]:
    """The ``.py`` files of stdlib ``json``, ``email``, ``http`` (sorted paths), as character ids, and the vocab."""
    import email
    import http
    import json

    parts = []
    for pkg in (json, email, http):
        root = os.path.dirname(pkg.__file__)
        for dirpath, dirnames, files in sorted(os.walk(root)):
            dirnames.sort()
            for f in sorted(files):
                if f.endswith(".py"):
                    with open(os.path.join(dirpath, f), encoding="utf-8", errors="replace") as fh:
                        parts.append(fh.read())
    text = "\n".join(parts)
    chars = sorted(set(text))
    lookup = {c: i for i, c in enumerate(chars)}
    return torch.tensor([lookup[c] for c in text], dtype=torch.long), len(chars)


def _windows(ids: Tensor, context: int, stride: int, limit: int | None = None) -> Split:
    starts = torch.arange(0, len(ids) - context - 1, stride)
    if limit is not None:
        starts = starts[:limit]
    idx = starts[:, None] + torch.arange(context + 1)[None]
    seq = ids[idx]
    return seq[:, :-1].contiguous(), seq[:, 1:].contiguous()


def charlm_splits(context: int = 64, test_windows: int | None = 128) -> tuple[tuple[Split, Split, Split], int]:
    """Deterministic split by position: first 90 % train, next 5 % val (128 windows), last 5 % test.

    ``test_windows``: how many test windows of the last 5 % are scored (``None``: all of them).
    """
    ids, vocab = _corpus()
    a, b = int(0.9 * len(ids)), int(0.95 * len(ids))
    train = _windows(ids[:a], context, context // 2)
    val = _windows(ids[a:b], context, context, limit=128)
    test = _windows(ids[b:], context, context, limit=test_windows)
    return (train, val, test), vocab


# ---------------------------------------------------------------------------------------------------- models
class MLPModule(BenchModule):
    def __init__(self, splits, sizes, *, opt: str, lr: float, act=nn.ReLU, **kw):
        super().__init__(*splits, **kw)
        layers = []
        for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:], strict=False)):
            layers.append(nn.Linear(a, b))
            if i < len(sizes) - 2:
                layers.append(act())
        self.net = nn.Sequential(*layers)
        self.opt, self.lr = opt, lr

    def configure_optimizers(self):
        if self.opt == "adam":
            return torch.optim.Adam(self.parameters(), lr=self.lr)
        return torch.optim.RMSprop(self.parameters(), lr=self.lr)


class DigitsCNN(BenchModule):
    def __init__(self, splits, *, lr: float, weight_decay: float = 5e-4, **kw):
        super().__init__(*splits, **kw)
        self.weight_decay = weight_decay
        self.net = nn.Sequential(
            nn.Unflatten(1, (1, 8, 8)),
            nn.Conv2d(1, 16, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(16, 32, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Flatten(),
            nn.Linear(32 * 4 * 4, 10),
        )
        self.lr = lr

    def configure_optimizers(self):
        opt = torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9, weight_decay=self.weight_decay)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=self.max_steps)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


class TinyGPT(nn.Module):
    def __init__(self, vocab: int, context: int, d: int = 64, layers: int = 2, heads: int = 4):
        super().__init__()
        self.tok_emb = nn.Embedding(vocab, d)
        self.pos_emb = nn.Embedding(context, d)
        layer = nn.TransformerEncoderLayer(d, heads, 4 * d, dropout=0.0, batch_first=True, norm_first=True)
        self.blocks = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, vocab)
        self.register_buffer("mask", nn.Transformer.generate_square_subsequent_mask(context), persistent=False)

    def forward(self, x):
        t = x.shape[1]
        h = self.tok_emb(x) + self.pos_emb.weight[:t]
        h = self.blocks(h, mask=self.mask[:t, :t], is_causal=True)
        return self.head(self.norm(h))


class CharLM(BenchModule):
    def __init__(self, splits, vocab: int, *, lr: float, context: int = 64, **kw):
        super().__init__(*splits, **kw)
        self.net = TinyGPT(vocab, context)
        self.lr = lr
        self.eval_batch_size = 64

    def configure_optimizers(self):
        opt = torch.optim.AdamW(self.parameters(), lr=self.lr, weight_decay=0.01)
        warm = max(1, self.max_steps // 20)

        def factor(step: int) -> float:
            if step < warm:
                return (step + 1) / warm
            return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warm) / max(1, self.max_steps - warm))))

        sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


# ----------------------------------------------------------------------------------------------------- tasks
def _mnist1d_mlp(seed: int, max_steps: int) -> BenchModule:
    return MLPModule(
        mnist1d_splits(seed), (40, 256, 256, 10), opt="adam", lr=2e-4, batch_size=128, seed=seed, max_steps=max_steps
    )


def _digits_cnn(seed: int, max_steps: int) -> BenchModule:
    return DigitsCNN(digits_splits(seed), lr=0.005, batch_size=32, seed=seed, max_steps=max_steps)


def _charlm(seed: int, max_steps: int) -> BenchModule:
    splits, vocab = charlm_splits()
    return CharLM(splits, vocab, lr=3e-3, batch_size=16, seed=seed, max_steps=max_steps)


def _digits_rmsprop(seed: int, max_steps: int) -> BenchModule:
    return MLPModule(
        digits_splits(seed),
        (64, 128, 128, 10),
        opt="rmsprop",
        lr=1e-4,
        act=nn.Tanh,
        batch_size=32,
        seed=seed,
        max_steps=max_steps,
    )


def _quick(max_steps: int = 240) -> Budget:
    return Budget(max_steps, 20, JumpSchedule(budget=False))


TASKS: dict[str, Task] = {
    t.name: t
    for t in [
        Task(
            "mnist1d-mlp",
            _mnist1d_mlp,
            full=Budget(1300, 25, JumpSchedule()),
            quick=_quick(),
            limit_val_batches=2,
            description="mnist1d, MLP 40-256-256-10, Adam 2e-4, batch 128",
            constant_lr=True,
        ),
        Task(
            "digits-cnn",
            _digits_cnn,
            full=Budget(600, 20, JumpSchedule()),
            quick=_quick(),
            limit_val_batches=2,
            description="digits 8x8, CNN, SGD momentum 0.9 lr 0.005 + cosine (per step)",
        ),
        Task(
            "charlm",
            _charlm,
            full=Budget(1000, 40, JumpSchedule()),
            quick=_quick(),
            classification=False,
            limit_val_batches=2,
            description="char-level transformer d=64 x2, context 64, AdamW 3e-3 + warm-up/cosine (per step)",
        ),
        Task(
            "digits-rmsprop",
            _digits_rmsprop,
            full=Budget(1500, 50, JumpSchedule()),
            quick=_quick(),
            limit_val_batches=2,
            description="digits 8x8, MLP 64-128-128-10 tanh, RMSprop 1e-4",
            constant_lr=True,
        ),
    ]
}

QUICK_TASKS = ("mnist1d-mlp", "digits-cnn")


if __name__ == "__main__":  # the baseline check lives in benchmarks/check.py (it needs the runner)
    from benchmarks.check import main

    main()
