"""The held-out split: ten training set-ups that no default of the package may be chosen on.

**The rule.** Tasks come in two splits. ``dev`` (:mod:`benchmarks.tasks`) is where defaults are chosen and
tuned. ``heldout`` (this module) was committed in one change — tasks, data, models, optimizers, schedules,
budgets and seeds (0 and 1) — *before* any default (GFM, linear extrapolation, the oracle, or any other jump
method) was measured on it at its full budget. From then on no default, option or budget is chosen, tuned or
reverted because of a held-out result, and no held-out task is changed after a GFM result has been seen:
held-out results are only reported. Checking that a baseline still improves at the end of its budget (the
``--check`` rule of :mod:`benchmarks.check`) is allowed before freezing: it measures the task, not a method.
A crash fix in a method is allowed; the fix must not depend on the held-out numbers. A gain that shows on
``dev`` and not on ``heldout`` is not a gain.

Coverage. Each task is a real ``Trainer.fit`` on offline data (scikit-learn's bundled sets, mnist1d's
procedural data, the source of Python standard-library packages other than the dev char-LM's ``json``,
``email``, ``http``), and each differs from every dev task in data, architecture or optimizer:

=====================  ================  ============================  ====================  =======================
task                   data              model                         optimizer             schedule, extras, budget
=====================  ================  ============================  ====================  =======================
``ho-diabetes-mlp``    diabetes (regr.)  MLP 10-256-256-256-1 ReLU     SGD 2.5e-4            step x0.5 at 1/2, 3/4;
                                                                                             8000 steps, batch 32
``ho-mnist1d-cnn-bn``  mnist1d           1-D CNN 64-128, BatchNorm     SGD Nesterov 0.9,     cosine; 1500, batch 64
                                                                       lr 0.02, wd 5e-4
``ho-digits-resnet``   digits            residual MLP, 3 pre-LN        AdamW 2.5e-4, wd 0.1  one-cycle; 3000, batch 64
                                         blocks, width 128
``ho-mnist1d-gru``     mnist1d           GRU 64 sequence classifier    Adam 3e-3             step x0.3 at 2/3; 1200
``ho-charlm-lstm``     stdlib xml,       char LSTM 192                 Adam 3e-3             constant, clip 1.0; 450,
                       urllib                                                                batch 32 x 64 chars
``ho-cancer-mlp``      breast cancer     MLP 30-256-256-2              RMSprop 5e-6,         cosine; 8000, batch 32
                                                                       momentum 0.9
``ho-digits-ae``       digits (regr.)    autoencoder 64-256-16-256-64  Adam 1e-3             cosine, bf16-mixed;
                                                                                             6000, batch 64
``ho-mnist1d-sgd``     mnist1d           MLP 40-128-128-10 GELU        SGD 0.012             constant; 9000, batch 64
``ho-gpt2-lm``         stdlib logging,   transformers GPT-2 from a     AdamW 2e-3 (no-decay  cosine warm-up (10 %),
                       importlib,        config, 3 x 96                groups)               clip 1.0; 220, batch 16
                       concurrent
``ho-llama-lm``        stdlib asyncio    transformers Llama from a     AdamW 2e-3 (no-decay  linear warm-up (10 %),
                                         config, 3 x 96                groups)               clip 1.0; 220, batch 8 x
                                                                                             accumulate 2
=====================  ================  ============================  ====================  =======================

Budgets give baseline runs of about 8-17 s at one torch thread on a quiet 2-core machine, so that the split at
2 seeds and 7 methods runs in about 40 minutes, and were checked on seed 0 with ``python -m benchmarks.check
--split heldout --seeds 0`` before the split was frozen: the baseline's test loss still falls over the last
quarter of the budget, or, under a schedule that ends at (nearly) zero learning rate, is flat within 0.002 of
its best at the end. Seed 0, test loss at 3/4 of the budget -> at the end (best): diabetes 0.3996 -> 0.3956
at 10000 steps (the budget is 8000 with the same learning rate: less far along), cnn-bn 0.1220 -> 0.1197
(0.1197), resnet 0.0878 -> 0.0880 (0.0876, one-cycle annealed to zero), gru 0.8731 -> 0.6262 (0.6262), lstm
1.7462 -> 1.6652 (1.6652; at 600 steps 1.5844, so still falling at 1.33 budgets), cancer 0.0185 -> 0.0184
(0.0184), autoencoder 0.0847 -> 0.0849 (0.0847), mnist1d-sgd 1.2564 -> 1.2130 (1.2130; at 1.5 budgets,
``--extend 1.5``, 1.0976 and still falling), gpt2 2.3061 -> 2.2732 and llama 1.7242 -> 1.6133 at 300 steps
(the budget is 220 with the same schedule shape). Seeds: 0 and 1 (``HELDOUT_SEEDS``).

The ``transformers`` models are built from a config (``GPT2Config``, ``LlamaConfig``: a character
vocabulary, 3 layers, width 96, about 0.35M parameters); nothing is downloaded (``HF_HUB_OFFLINE=1`` and
``TRANSFORMERS_OFFLINE=1`` are set before ``transformers`` is imported). They are trained the way their users
train them: AdamW with weight decay off for biases and norms, transformers' own warm-up schedules
(``get_cosine_schedule_with_warmup``, ``get_linear_schedule_with_warmup``) and ``gradient_clip_val=1.0``.
``transformers`` is an optional extra (``.[bench]``); without it the two tasks are not registered.
"""

from __future__ import annotations

import functools
import importlib.util
import os
from collections.abc import Callable

import torch
from torch import Tensor, nn

from benchmarks.tasks import (
    BenchModule,
    Budget,
    JumpSchedule,
    Split,
    Task,
    _digits,
    _mnist1d,
    _windows,
)

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing may download at run time
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

HELDOUT_SEEDS = (0, 1)
HAVE_TRANSFORMERS = importlib.util.find_spec("transformers") is not None


# ------------------------------------------------------------------------------------------------------ data
def _seeded_split(x: Tensor, y: Tensor, seed: int, n_val: int, n_test: int) -> tuple[Split, Split, Split]:
    """A seeded permutation: the first ``n_val`` for validation, the next ``n_test`` for test, the rest train."""
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    x, y = x[perm], y[perm]
    a, b = n_val, n_val + n_test
    return (x[b:], y[b:]), (x[:a], y[:a]), (x[a:b], y[a:b])


@functools.lru_cache(maxsize=1)
def _diabetes() -> Split:
    from sklearn.datasets import load_diabetes

    x, y = load_diabetes(return_X_y=True)  # bundled with scikit-learn: no download
    x, y = torch.tensor(x, dtype=torch.float32), torch.tensor(y, dtype=torch.float32)
    return (x - x.mean(0)) / x.std(0), ((y - y.mean()) / y.std())[:, None]


@functools.lru_cache(maxsize=1)
def _breast_cancer() -> Split:
    from sklearn.datasets import load_breast_cancer

    x, y = load_breast_cancer(return_X_y=True)
    x = torch.tensor(x, dtype=torch.float32)
    return (x - x.mean(0)) / (x.std(0) + 1e-6), torch.tensor(y, dtype=torch.long)


def diabetes_splits(seed: int) -> tuple[Split, Split, Split]:
    """Diabetes regression (442 samples, 10 features, standardized target): 302 train / 70 val / 70 test."""
    return _seeded_split(*_diabetes(), seed, 70, 70)


def cancer_splits(seed: int) -> tuple[Split, Split, Split]:
    """Breast cancer (569 samples, 30 features, 2 classes): 409 train / 80 val / 80 test."""
    return _seeded_split(*_breast_cancer(), seed, 80, 80)


def mnist1d_splits(seed: int) -> tuple[Split, Split, Split]:
    """mnist1d's 4000 training samples split by a seeded permutation (500 val), its 1000 test samples as test.

    The permutation is offset from the dev split's (``seed + 100``), so a held-out task never sees the dev
    tasks' validation samples for the same seed.
    """
    (x, y), test = _mnist1d()
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed + 100))
    x, y = x[perm], y[perm]
    return (x[500:], y[500:]), (x[:500], y[:500]), test


def digits_splits(seed: int, targets: str = "labels") -> tuple[Split, Split, Split]:
    """Digits, 1197 train / 300 val / 300 test (seed offset from the dev split); ``targets="pixels"``: x -> x."""
    x, y = _digits()
    if targets == "pixels":
        y = x
    return _seeded_split(x, y, seed + 100, 300, 300)


@functools.lru_cache(maxsize=4)
def stdlib_text(packages: tuple[str, ...]) -> tuple[Tensor, int]:
    """The ``.py`` sources of the given stdlib packages (sorted paths, test folders left out) as char ids."""
    parts = []
    for pkg in packages:
        spec = importlib.util.find_spec(pkg)
        root = os.path.dirname(spec.origin)
        for dirpath, dirnames, files in sorted(os.walk(root)):
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("test"))
            for f in sorted(files):
                if f.endswith(".py"):
                    with open(os.path.join(dirpath, f), encoding="utf-8", errors="replace") as fh:
                        parts.append(fh.read())
    text = "\n".join(parts)
    chars = sorted(set(text))
    lookup = {c: i for i, c in enumerate(chars)}
    return torch.tensor([lookup[c] for c in text], dtype=torch.long), len(chars)


def text_splits(packages: tuple[str, ...], context: int = 64) -> tuple[tuple[Split, Split, Split], int]:
    """First 90 % train (windows at half-context stride), then 5 % val, 5 % test (128 windows each)."""
    ids, vocab = stdlib_text(packages)
    a, b = int(0.9 * len(ids)), int(0.95 * len(ids))
    train = _windows(ids[:a], context, context // 2)
    val = _windows(ids[a:b], context, context, limit=128)
    test = _windows(ids[b:], context, context, limit=128)
    return (train, val, test), vocab


# ---------------------------------------------------------------------------------------------------- modules
def _step_schedule(opt: torch.optim.Optimizer, sched) -> dict:
    return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


def _no_decay_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """AdamW parameter groups as transformers' Trainer builds them: no decay for biases and norm weights."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim < 2 or "norm" in name.lower() or "ln_" in name else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


class RegressionModule(BenchModule):
    """Mean squared error (per target element) instead of cross-entropy; no accuracy."""

    def loss_and_correct(self, net: nn.Module, batch) -> tuple[Tensor, Tensor, int]:
        x, y = batch
        pred = net(x).float()
        loss = nn.functional.mse_loss(pred, y, reduction="sum")
        return loss, torch.zeros((), dtype=torch.long), y.numel()


class Configured(BenchModule):
    """A module whose network and optimizer come from two callables (so each task is a few readable lines)."""

    def __init__(self, splits, net: nn.Module, optimizers: Callable[[Configured], dict | torch.optim.Optimizer], **kw):
        super().__init__(*splits, **kw)
        self.net = net
        self._optimizers = optimizers

    def configure_optimizers(self):
        return self._optimizers(self)


class ConfiguredRegression(RegressionModule, Configured):
    """:class:`Configured` with the regression loss."""


class ResidualMLP(nn.Module):
    """Pre-LayerNorm residual blocks ``x + W2 gelu(W1 LN(x))`` between an input and an output projection."""

    def __init__(self, d_in: int, width: int, blocks: int, d_out: int):
        super().__init__()
        self.inp = nn.Linear(d_in, width)
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.LayerNorm(width), nn.Linear(width, 2 * width), nn.GELU(), nn.Linear(2 * width, width))
            for _ in range(blocks)
        )
        self.norm = nn.LayerNorm(width)
        self.out = nn.Linear(width, d_out)

    def forward(self, x: Tensor) -> Tensor:
        h = self.inp(x)
        for block in self.blocks:
            h = h + block(h)
        return self.out(self.norm(h))


class CNN1d(nn.Module):
    """Two Conv1d-BatchNorm-ReLU stages with pooling, then a linear head (mnist1d's 40-sample signals)."""

    def __init__(self, channels: tuple[int, int] = (32, 64), classes: int = 10):
        super().__init__()
        a, b = channels
        self.features = nn.Sequential(
            nn.Unflatten(1, (1, 40)),
            nn.Conv1d(1, a, 5, padding=2),
            nn.BatchNorm1d(a),
            nn.ReLU(),
            nn.MaxPool1d(2),
            nn.Conv1d(a, b, 5, padding=2),
            nn.BatchNorm1d(b),
            nn.ReLU(),
            nn.MaxPool1d(2),
            nn.Flatten(),
        )
        self.head = nn.Linear(b * 10, classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x))


class GRUClassifier(nn.Module):
    """A GRU reading the signal one sample at a time; its last hidden state is classified."""

    def __init__(self, hidden: int = 64, classes: int = 10):
        super().__init__()
        self.gru = nn.GRU(1, hidden, batch_first=True)
        self.head = nn.Linear(hidden, classes)

    def forward(self, x: Tensor) -> Tensor:
        out, _ = self.gru(x.unsqueeze(-1))
        return self.head(out[:, -1])


class CharLSTM(nn.Module):
    """Embedding -> one LSTM layer -> linear head over characters."""

    def __init__(self, vocab: int, d: int = 64, hidden: int = 192):
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.lstm = nn.LSTM(d, hidden, batch_first=True)
        self.head = nn.Linear(hidden, vocab)

    def forward(self, x: Tensor) -> Tensor:
        out, _ = self.lstm(self.emb(x))
        return self.head(out)


class HFCausalLM(nn.Module):
    """A ``transformers`` causal LM built from a config; ``forward(ids)`` returns the logits."""

    def __init__(self, kind: str, vocab: int, context: int):
        super().__init__()
        import transformers

        transformers.logging.set_verbosity_error()
        if kind == "gpt2":
            config = transformers.GPT2Config(
                vocab_size=vocab,
                n_positions=context,
                n_embd=96,
                n_layer=3,
                n_head=4,
                resid_pdrop=0.0,
                embd_pdrop=0.0,
                attn_pdrop=0.0,
                bos_token_id=0,
                eos_token_id=0,
            )
            self.model = transformers.GPT2LMHeadModel(config)
        elif kind == "llama":
            config = transformers.LlamaConfig(
                vocab_size=vocab,
                hidden_size=96,
                intermediate_size=256,
                num_hidden_layers=3,
                num_attention_heads=4,
                num_key_value_heads=4,
                max_position_embeddings=context,
                bos_token_id=0,
                eos_token_id=0,
                pad_token_id=None,
            )
            self.model = transformers.LlamaForCausalLM(config)
        else:
            raise ValueError(f"unknown transformers model {kind!r}")

    def forward(self, x: Tensor) -> Tensor:
        return self.model(input_ids=x).logits


# ----------------------------------------------------------------------------------------------------- tasks
def _diabetes_mlp(seed: int, max_steps: int) -> BenchModule:
    net = nn.Sequential(
        nn.Linear(10, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 1)
    )

    def optimizers(m: BenchModule):
        opt = torch.optim.SGD(m.parameters(), lr=2.5e-4)
        milestones = [max_steps // 2, (3 * max_steps) // 4]
        return _step_schedule(opt, torch.optim.lr_scheduler.MultiStepLR(opt, milestones, gamma=0.5))

    return ConfiguredRegression(diabetes_splits(seed), net, optimizers, batch_size=32, seed=seed, max_steps=max_steps)


def _mnist1d_cnn_bn(seed: int, max_steps: int) -> BenchModule:
    def optimizers(m: BenchModule):
        opt = torch.optim.SGD(m.parameters(), lr=0.02, momentum=0.9, nesterov=True, weight_decay=5e-4)
        return _step_schedule(opt, torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max_steps))

    return Configured(mnist1d_splits(seed), CNN1d((64, 128)), optimizers, batch_size=64, seed=seed, max_steps=max_steps)


def _digits_resnet(seed: int, max_steps: int) -> BenchModule:
    def optimizers(m: BenchModule):
        opt = torch.optim.AdamW(m.parameters(), lr=2.5e-4, weight_decay=0.1)
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=2.5e-4, total_steps=max_steps)
        return _step_schedule(opt, sched)

    return Configured(
        digits_splits(seed), ResidualMLP(64, 128, 3, 10), optimizers, batch_size=64, seed=seed, max_steps=max_steps
    )


def _mnist1d_gru(seed: int, max_steps: int) -> BenchModule:
    def optimizers(m: BenchModule):
        opt = torch.optim.Adam(m.parameters(), lr=3e-3)
        sched = torch.optim.lr_scheduler.MultiStepLR(opt, [(2 * max_steps) // 3], gamma=0.3)
        return _step_schedule(opt, sched)

    return Configured(mnist1d_splits(seed), GRUClassifier(), optimizers, batch_size=64, seed=seed, max_steps=max_steps)


LSTM_TEXT = ("xml", "urllib")
GPT2_TEXT = ("logging", "importlib", "concurrent")
LLAMA_TEXT = ("asyncio",)


def _charlm_lstm(seed: int, max_steps: int) -> BenchModule:
    splits, vocab = text_splits(LSTM_TEXT)
    module = Configured(
        splits,
        CharLSTM(vocab),
        lambda m: torch.optim.Adam(m.parameters(), lr=3e-3),
        batch_size=32,
        seed=seed,
        max_steps=max_steps,
    )
    module.eval_batch_size = 64
    return module


def _hf_lm(kind: str, packages: tuple[str, ...], schedule: str, lr: float, batch_size: int) -> Callable:
    def build(seed: int, max_steps: int) -> BenchModule:
        import transformers

        splits, vocab = text_splits(packages)

        def optimizers(m: BenchModule):
            opt = torch.optim.AdamW(_no_decay_groups(m.net, 0.01), lr=lr, betas=(0.9, 0.95))
            warm = max(1, max_steps // 10)
            helper = {
                "cosine": transformers.get_cosine_schedule_with_warmup,
                "linear": transformers.get_linear_schedule_with_warmup,
            }[schedule]
            return _step_schedule(opt, helper(opt, num_warmup_steps=warm, num_training_steps=max_steps))

        module = Configured(
            splits, HFCausalLM(kind, vocab, 64), optimizers, batch_size=batch_size, seed=seed, max_steps=max_steps
        )
        module.eval_batch_size = 64
        return module

    return build


def _cancer_mlp(seed: int, max_steps: int) -> BenchModule:
    net = nn.Sequential(nn.Linear(30, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 2))

    def optimizers(m: BenchModule):
        opt = torch.optim.RMSprop(m.parameters(), lr=5e-6, momentum=0.9, weight_decay=1e-4)
        return _step_schedule(opt, torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max_steps))

    return Configured(cancer_splits(seed), net, optimizers, batch_size=32, seed=seed, max_steps=max_steps)


def _digits_ae(seed: int, max_steps: int) -> BenchModule:
    net = nn.Sequential(
        nn.Linear(64, 256), nn.GELU(), nn.Linear(256, 16), nn.GELU(), nn.Linear(16, 256), nn.GELU(), nn.Linear(256, 64)
    )

    def optimizers(m: BenchModule):
        opt = torch.optim.Adam(m.parameters(), lr=1e-3)
        return _step_schedule(opt, torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max_steps))

    return ConfiguredRegression(
        digits_splits(seed, targets="pixels"), net, optimizers, batch_size=64, seed=seed, max_steps=max_steps
    )


def _mnist1d_sgd(seed: int, max_steps: int) -> BenchModule:
    net = nn.Sequential(nn.Linear(40, 128), nn.GELU(), nn.Linear(128, 128), nn.GELU(), nn.Linear(128, 10))
    return Configured(
        mnist1d_splits(seed),
        net,
        lambda m: torch.optim.SGD(m.parameters(), lr=0.012),
        batch_size=64,
        seed=seed,
        max_steps=max_steps,
    )


def _quick(max_steps: int = 120, val_every: int = 20) -> Budget:
    return Budget(max_steps, val_every, JumpSchedule(budget=False))


_TASKS = [
    Task(
        "ho-diabetes-mlp",
        _diabetes_mlp,
        full=Budget(8000, 250, JumpSchedule()),
        quick=_quick(),
        classification=False,
        limit_val_batches=1,
        description="diabetes regression, MLP 10-256-256-256-1, SGD 2.5e-4, step decay x0.5 at 1/2 and 3/4",
        split="heldout",
    ),
    Task(
        "ho-mnist1d-cnn-bn",
        _mnist1d_cnn_bn,
        full=Budget(1500, 50, JumpSchedule()),
        quick=_quick(),
        limit_val_batches=2,
        description="mnist1d, 1-D CNN 64-128 with BatchNorm, SGD Nesterov 0.9 lr 0.02 wd 5e-4 + cosine",
        split="heldout",
    ),
    Task(
        "ho-digits-resnet",
        _digits_resnet,
        full=Budget(3000, 100, JumpSchedule()),
        quick=_quick(),
        limit_val_batches=2,
        description="digits 8x8, residual MLP with LayerNorm (3 blocks, width 128), AdamW 2.5e-4 wd 0.1 + one-cycle",
        split="heldout",
    ),
    Task(
        "ho-mnist1d-gru",
        _mnist1d_gru,
        full=Budget(1200, 40, JumpSchedule()),
        quick=_quick(),
        limit_val_batches=2,
        description="mnist1d as a sequence, GRU 64 classifier, Adam 3e-3, step x0.3 at 2/3",
        split="heldout",
    ),
    Task(
        "ho-charlm-lstm",
        _charlm_lstm,
        full=Budget(450, 25, JumpSchedule()),
        quick=_quick(),
        classification=False,
        limit_val_batches=2,
        description="char-level LSTM 192 on stdlib xml + urllib, Adam 3e-3 constant, gradient clipping 1.0",
        constant_lr=True,
        split="heldout",
        trainer_kwargs={"gradient_clip_val": 1.0},
    ),
    Task(
        "ho-cancer-mlp",
        _cancer_mlp,
        full=Budget(8000, 250, JumpSchedule()),
        quick=_quick(),
        limit_val_batches=1,
        description="breast cancer, MLP 30-256-256-2, RMSprop momentum 0.9 lr 5e-6 + cosine",
        split="heldout",
    ),
    Task(
        "ho-digits-ae",
        _digits_ae,
        full=Budget(6000, 150, JumpSchedule()),
        quick=_quick(),
        classification=False,
        limit_val_batches=2,
        description="digits autoencoder 64-256-16-256-64 (MSE on pixels), Adam 1e-3 + cosine, bf16-mixed",
        split="heldout",
        trainer_kwargs={"precision": "bf16-mixed"},
    ),
    Task(
        "ho-mnist1d-sgd",
        _mnist1d_sgd,
        full=Budget(9000, 250, JumpSchedule()),
        quick=_quick(),
        limit_val_batches=2,
        description="mnist1d, MLP 40-128-128-10 GELU, plain SGD 0.012 constant",
        constant_lr=True,
        split="heldout",
    ),
]
if HAVE_TRANSFORMERS:
    _TASKS += [
        Task(
            "ho-gpt2-lm",
            _hf_lm("gpt2", GPT2_TEXT, "cosine", 2e-3, 16),
            full=Budget(220, 10, JumpSchedule()),
            quick=_quick(24, 6),
            classification=False,
            limit_val_batches=2,
            description="transformers GPT-2 from a config (3 x 96, char vocab) on stdlib logging + importlib + "
            "concurrent, AdamW 2e-3 (no-decay groups) + get_cosine_schedule_with_warmup (10 %), clip 1.0",
            split="heldout",
            trainer_kwargs={"gradient_clip_val": 1.0},
        ),
        Task(
            "ho-llama-lm",
            _hf_lm("llama", LLAMA_TEXT, "linear", 2e-3, 8),
            full=Budget(220, 10, JumpSchedule()),
            quick=_quick(24, 6),
            classification=False,
            limit_val_batches=2,
            description="transformers Llama from a config (3 x 96, char vocab) on stdlib asyncio, AdamW 2e-3 "
            "(no-decay groups) + get_linear_schedule_with_warmup (10 %), clip 1.0, batch 8 x accumulate 2",
            split="heldout",
            trainer_kwargs={"gradient_clip_val": 1.0, "accumulate_grad_batches": 2},
        ),
    ]

TASKS: dict[str, Task] = {t.name: t for t in _TASKS}

#: the quick smoke run: two small tasks and one transformers model (when installed)
QUICK_TASKS = ("ho-mnist1d-cnn-bn", "ho-diabetes-mlp") + (("ho-llama-lm",) if HAVE_TRANSFORMERS else ())
