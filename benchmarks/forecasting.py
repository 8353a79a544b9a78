"""Forecasting benchmark: the Gradient Flow Matching paper's own evaluation, on a corpus recorded here.

Protocol (see ``docs/forecasting.md``):

1. Corpus. Plain torch training loops on scikit-learn's 8x8 digits (fixed train/val split), three architectures,
   several initialisations, five optimizers (SGD, SGD+momentum, Adam, AdamW, RMSprop), ``T`` steps of batch 64,
   a snapshot (flat weights, optimizer state, learning rates, optimizer step) every ``every`` steps, stored in a
   :class:`~lightning_gfm.trajectory.TrajectoryBuffer` exactly as :class:`~lightning_gfm.GFMCallback` records.
   Each run has a learning-rate schedule (:data:`SCHEDULES`, a torch scheduler stepped after every optimizer
   step): ``constant`` for every run evaluated in ``seen``, ``unseen-init``, ``unseen-arch`` and
   ``unseen-optimizer`` and for the bulk of the training split, which also holds ``step`` and ``cosine`` runs;
   ``warmup-cosine`` and ``one-cycle`` runs are only ever evaluated (``unseen-schedule``).
2. Task. Observe the snapshots up to step ``s_p = p * T`` and forecast the final weights ``w_T``. Metrics: relative
   error ``||w_hat - w_T|| / ||w_T - w_p||`` (1.0 = the last observed value) and validation loss / accuracy of the
   model with the forecast weights versus with the true final ones.
3. Forecasters: ``last``, ``linear`` (least-squares slope of the last 3 observed snapshots), ``lstm`` and
   ``transformer`` (per-scalar sequence models shared by all parameters, trained on the corpus' training split with
   the same budget), ``gfm`` (a fresh field fitted on the run's own observed window, chosen against the prior by
   the callback's backtest), ``gfm-fitted`` (the fitted field, no backtest choice), ``gfm-prior`` (unfitted) and
   ``gfm-meta`` (a :class:`~lightning_gfm.flow.meta.MetaField` meta-trained by conditional flow matching on the
   same training split, with the sequence models' budget and exclusions, forecasting with the run's own rates).
   GFM integrates with the run's own future learning rates: its scheduler, copied at ``s_p``, replayed on a
   stand-in optimizer (as the callback replays a Lightning scheduler).
4. Splits: ``seen`` (initialisations also used for training, a different data-order seed), ``unseen-init``
   (initialisation seeds never trained on), ``unseen-arch`` (sequence models trained without the evaluated
   architecture), ``unseen-optimizer`` (sequence models trained without the evaluated run's optimizer family:
   ``sgd``, ``momentum``, ``adam`` = Adam and AdamW, ``rmsprop``), ``unseen-schedule`` (runs with a schedule that
   no training run uses). GFM is fitted per trajectory on its own observed part, so for it (and for
   ``last``/``linear``) the splits differ only in which trajectories are evaluated.

Run ``python -m benchmarks.forecasting [--quick] [--out benchmarks/results/forecasting.json]``.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
from torch import Tensor, nn
from torch.optim.lr_scheduler import LRScheduler

from lightning_gfm.dynamics import Dynamics, dynamics_for, future_learning_rates, lr_by_step, take_snapshot
from lightning_gfm.flow.field import FieldConfig, GradientField
from lightning_gfm.flow.matching import fit_field
from lightning_gfm.flow.meta import (
    MetaConfig,
    MetaField,
    MetaRun,
    MetaTrainConfig,
    family_of,
    meta_forecast,
    meta_train,
)
from lightning_gfm.flow.window import Window
from lightning_gfm.forecast import backtest_error, forecast
from lightning_gfm.params import ParamSpec
from lightning_gfm.trajectory import TrajectoryBuffer

FORECASTERS = ("last", "linear", "lstm", "transformer", "gfm-meta", "gfm", "gfm-fitted", "gfm-prior")
SPLITS = ("seen", "unseen-init", "unseen-arch", "unseen-optimizer", "unseen-schedule")
SCHEDULES = ("constant", "step", "cosine", "warmup-cosine", "one-cycle")


# --------------------------------------------------------------------------------------------------- corpus
def _mlp_tanh() -> nn.Module:
    return nn.Sequential(nn.Linear(64, 32), nn.Tanh(), nn.Linear(32, 10))


def _mlp_relu() -> nn.Module:
    return nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))


def _cnn() -> nn.Module:
    return nn.Sequential(
        nn.Unflatten(1, (1, 8, 8)),
        nn.Conv2d(1, 8, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(8, 16, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(16 * 4 * 4, 10),
    )


ARCHS = {"mlp-tanh": _mlp_tanh, "mlp-relu": _mlp_relu, "cnn": _cnn}
OPTIMIZERS = {
    "sgd": lambda p: torch.optim.SGD(p, lr=0.1),
    "momentum": lambda p: torch.optim.SGD(p, lr=0.01, momentum=0.9),
    "adam": lambda p: torch.optim.Adam(p, lr=1e-3),
    "adamw": lambda p: torch.optim.AdamW(p, lr=1e-3, weight_decay=0.05),
    "rmsprop": lambda p: torch.optim.RMSprop(p, lr=1e-3),
}
# optimizer family = the update rule GFM's dynamics model (AdamW is Adam's rule with decoupled weight decay)
FAMILIES = {"SGDDynamics": "sgd", "MomentumDynamics": "momentum", "AdamDynamics": "adam", "RMSpropDynamics": "rmsprop"}


def make_scheduler(name: str, opt: torch.optim.Optimizer, total: int) -> LRScheduler | None:
    """The learning-rate schedule ``name`` for a run of ``total`` optimizer steps, stepped after every step.

    Every schedule scales each param group's own learning rate (the optimizer's, from :data:`OPTIMIZERS`), so the
    five optimizers keep their relative step sizes:

    - ``constant``: no scheduler.
    - ``step``: halved after every quarter of the run (``StepLR``).
    - ``cosine``: cosine annealing to 0 at ``total`` (``CosineAnnealingLR``).
    - ``warmup-cosine``: linear warm-up over the first tenth, then cosine annealing to 0 (``LambdaLR``).
    - ``one-cycle``: from lr/25 up to lr over the first 30 %, then cosine down to lr/25e4 (``OneCycleLR``), with
      its momentum cycling off: cycling would give plain SGD a momentum and change Adam's betas, i.e. change the
      optimizer family rather than only the learning rate.

    Raises:
        ValueError: for a name outside :data:`SCHEDULES`.
    """
    sched = torch.optim.lr_scheduler
    if name == "constant":
        return None
    if name == "step":
        return sched.StepLR(opt, step_size=max(1, total // 4), gamma=0.5)
    if name == "cosine":
        return sched.CosineAnnealingLR(opt, T_max=total)
    if name == "warmup-cosine":
        warm = max(1, total // 10)
        decay = max(1, total - warm)

        def factor(calls: int) -> float:  # ``calls`` scheduler steps done: the factor of step ``calls + 1``
            if calls < warm:
                return (calls + 1) / warm
            return 0.5 * (1.0 + math.cos(math.pi * min(calls - warm, decay) / decay))

        return sched.LambdaLR(opt, factor)
    if name == "one-cycle":
        peak = [float(g["lr"]) for g in opt.param_groups]
        return sched.OneCycleLR(opt, max_lr=peak, total_steps=total, pct_start=0.3, cycle_momentum=False)
    raise ValueError(f"Unknown schedule {name!r}; choose one of {', '.join(SCHEDULES)}.")


def lr_checkpoint(
    opt: torch.optim.Optimizer, sched: LRScheduler | None
) -> tuple[torch.optim.Optimizer, LRScheduler | None]:
    """A detached copy of the run's learning-rate state now: what GFM may know about the future lrs at this step.

    A stand-in optimizer holds a copy of every param group's hyperparameters (current and initial lr included)
    with one dummy tensor each, and the scheduler is deep-copied onto it. Replaying it
    (:func:`~lightning_gfm.dynamics.future_learning_rates`) yields the learning rates the run will use next without
    touching the live optimizer, its parameters or anything recorded after this step.
    """
    stand_in = torch.optim.SGD([torch.zeros(1)], lr=1.0)
    stand_in.param_groups = [
        {**{k: copy.deepcopy(v) for k, v in g.items() if k != "params"}, "params": [torch.zeros(1)]}
        for g in opt.param_groups
    ]
    stand_in.state = {}  # type: ignore[assignment]
    if sched is None:
        return stand_in, None
    return stand_in, copy.deepcopy(sched, memo={id(opt): stand_in})


@dataclass(frozen=True)
class Config:
    """Everything that sizes a benchmark run (the full mode's defaults; :data:`QUICK` shrinks them)."""

    steps: int = 320
    every: int = 10
    batch: int = 64
    fractions: tuple[float, ...] = (0.25, 0.5, 0.75)
    archs: tuple[str, ...] = tuple(ARCHS)
    optimizers: tuple[str, ...] = tuple(OPTIMIZERS)
    train_inits: tuple[int, ...] = (0, 1, 2)  # data seed 0, constant lr: the sequence models' training split
    seen_inits: tuple[int, ...] = (0, 1)  # data seed 1: same initialisations, new trajectories
    unseen_inits: tuple[int, ...] = (3, 4)  # data seed 0: initialisations never trained on
    holdout_archs: tuple[str, ...] = tuple(ARCHS)  # leave-one-architecture-out for `unseen-arch`
    holdout_families: tuple[str, ...] = ("sgd", "momentum", "adam", "rmsprop")  # leave-one-out, `unseen-optimizer`
    train_schedules: tuple[str, ...] = ("step", "cosine")  # scheduled runs added to the training split
    schedule_train_inits: tuple[int, ...] = (0,)  # data seed 2: their initialisations
    unseen_schedules: tuple[str, ...] = ("warmup-cosine", "one-cycle")  # `unseen-schedule`: never trained on
    schedule_eval_inits: tuple[int, ...] = (0,)  # data seed 1: `seen`'s runs, with an unseen schedule instead
    schedule_archs: tuple[str, ...] = tuple(ARCHS)  # architectures of the scheduled runs (training and evaluated)
    seq_len: int = 7  # observed velocities fed to the sequence models
    seq_hidden: int = 32
    seq_steps: int = 1000
    seq_batch: int = 1024
    seq_lr: float = 2e-3
    seq_samples: int = 600  # scalars drawn per (training trajectory, anchor)
    gfm_steps: int = 200
    gfm_batch: int = 2048
    gfm_lr: float = 3e-3
    gfm_window: int = 24
    gfm_span: float = 12.0
    gfm_history: int = 3
    gfm_anchor: str = "trend"  # GFMCallback's default anchor and trend length
    gfm_trend: int = 8
    backtest: int = 3
    seed: int = 0

    def check(self) -> None:
        """Raise ``ValueError`` unless the ``unseen-schedule`` runs' schedules are really absent from training."""
        for name in (*self.train_schedules, *self.unseen_schedules):
            if name not in SCHEDULES:
                raise ValueError(f"Unknown schedule {name!r}; choose one of {', '.join(SCHEDULES)}.")
        trained = {"constant", *self.train_schedules}
        if trained & set(self.unseen_schedules):
            raise ValueError(f"`unseen_schedules` {self.unseen_schedules} overlap the training schedules {trained}.")


QUICK = Config(
    steps=160,
    fractions=(0.5,),
    train_inits=(0,),
    seen_inits=(0,),
    unseen_inits=(1,),
    holdout_archs=("cnn",),
    optimizers=("sgd", "adam", "adamw", "rmsprop"),
    holdout_families=("adam",),
    schedule_archs=("mlp-tanh",),
    seq_steps=40,
    seq_samples=200,
    gfm_steps=20,
    gfm_batch=1024,
)


def digits_data() -> tuple[tuple[Tensor, Tensor], tuple[Tensor, Tensor]]:
    """Digits in [0, 1], centred and scaled with the training split's statistics; fixed stratified 75/25 split.

    The scale is floored at 0.1: a pixel that is (almost) always blank in the training split must not become a
    huge input on a validation image where it is inked.
    """
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    x, y = load_digits(return_X_y=True)
    xtr, xva, ytr, yva = train_test_split(x, y, test_size=0.25, random_state=0, stratify=y)
    xtr, xva = xtr / 16.0, xva / 16.0
    mean, std = xtr.mean(0), xtr.std(0).clip(min=0.1)
    xtr, xva = (xtr - mean) / std, (xva - mean) / std
    f = torch.float32
    return (torch.tensor(xtr, dtype=f), torch.tensor(ytr)), (torch.tensor(xva, dtype=f), torch.tensor(yva))


@dataclass
class Run:
    """One recorded trajectory and the live objects that produced it (used to evaluate forecast weights).

    ``lr_states[k]`` is :func:`lr_checkpoint` taken with snapshot ``k``: the only source of future learning rates a
    forecaster may use. ``lr_trace`` (``(T, G)``, the lr each optimizer step actually used) is ground truth, read
    only to check the replayed rates.
    """

    arch: str
    optimizer: str
    init_seed: int
    data_seed: int
    model: nn.Module
    opt: torch.optim.Optimizer
    spec: ParamSpec
    dyn: Dynamics
    buffer: TrajectoryBuffer
    schedule: str = "constant"
    lr_states: list[tuple[torch.optim.Optimizer, LRScheduler | None]] = field(default_factory=list)
    lr_trace: Tensor | None = None
    w: Tensor = field(init=False)  # (K, P) float64
    steps: Tensor = field(init=False)  # (K,) float64

    def __post_init__(self) -> None:
        self.w = self.buffer.weights(dtype=torch.float64)
        self.steps = torch.tensor(self.buffer.steps, dtype=torch.float64)

    @property
    def family(self) -> str:
        """Optimizer family (:data:`FAMILIES`): the update rule, so ``adam`` and ``adamw`` are one family."""
        return FAMILIES[type(self.dyn).__name__]

    @property
    def key(self) -> tuple:
        return (self.arch, self.optimizer, self.schedule, self.init_seed, self.data_seed)


def record_run(
    arch: str, optimizer: str, init_seed: int, data_seed: int, data, cfg: Config, schedule: str = "constant"
) -> Run:
    """Train one model with a plain torch loop and record a snapshot every ``cfg.every`` steps.

    The scheduler (:func:`make_scheduler`) is stepped after every optimizer step and before the snapshot, as
    Lightning steps an ``interval="step"`` scheduler before ``on_train_batch_end``: a snapshot's learning rates
    are those of the next step. A constant schedule creates no scheduler, so those runs are the same as without
    schedules.
    """
    (xtr, ytr), _ = data
    torch.manual_seed(init_seed)
    model = ARCHS[arch]()
    opt = OPTIMIZERS[optimizer](model.parameters())
    spec = ParamSpec.from_module(model, opt)
    dyn = dynamics_for(opt, spec)
    sched = make_scheduler(schedule, opt, cfg.steps)
    buf = TrajectoryBuffer(cfg.steps // cfg.every + 1)
    lr_states, trace = [], torch.empty(cfg.steps, len(opt.param_groups), dtype=torch.float64)
    gen = torch.Generator().manual_seed(10_000 + data_seed)
    order, pos = torch.randperm(len(xtr), generator=gen), 0
    for s in range(1, cfg.steps + 1):
        if pos + cfg.batch > len(order):
            order, pos = torch.randperm(len(xtr), generator=gen), 0
        idx = order[pos : pos + cfg.batch]
        pos += cfg.batch
        loss = nn.functional.cross_entropy(model(xtr[idx]), ytr[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        trace[s - 1] = torch.tensor([float(g["lr"]) for g in opt.param_groups], dtype=torch.float64)
        opt.step()
        if sched is not None:
            sched.step()
        if s % cfg.every == 0:
            buf.append(take_snapshot(opt, spec, dyn.state_names, s))
            lr_states.append(lr_checkpoint(opt, sched))
    return Run(arch, optimizer, init_seed, data_seed, model, opt, spec, dyn, buf, schedule, lr_states, trace)


@torch.no_grad()
def evaluate(run: Run, w: Tensor, data) -> tuple[float, float]:
    """Validation loss and accuracy of ``run``'s model with weights ``w`` (the live weights are restored)."""
    _, (xva, yva) = data
    keep = run.spec.flatten()
    if not torch.isfinite(w).all():
        return float("nan"), float("nan")
    run.spec.write_(w.to(torch.float32))
    logits = run.model(xva)
    loss = float(nn.functional.cross_entropy(logits, yva))
    acc = float((logits.argmax(1) == yva).float().mean())
    run.spec.write_(keep)
    return loss, acc


def observed(run: Run, p: float) -> int:
    """Number of snapshots observed at fraction ``p`` of the run (the last one is at step ``p * T``)."""
    return max(2, round(p * len(run.steps)))


# ------------------------------------------------------------------------------------- simple forecasters
def forecast_last(run: Run, n: int) -> Tensor:
    return run.w[n - 1].clone()


def forecast_linear(run: Run, n: int, k: int = 3) -> Tensor:
    """Least-squares slope over the last ``k`` observed snapshots, extrapolated from ``w_p`` to ``T``."""
    s, w = run.steps[n - k : n], run.w[n - k : n]
    sc = s - s.mean()
    slope = (sc.unsqueeze(1) * (w - w.mean(0))).sum(0) / sc.pow(2).sum()
    return run.w[n - 1] + slope * float(run.steps[-1] - run.steps[n - 1])


# ----------------------------------------------------------------------------------- sequence forecasters
N_SEQ, N_STATIC, TARGET_CLIP = 2, 3, 5.0


def _tensor_index(spec: ParamSpec) -> tuple[Tensor, int]:
    return spec.tensor_index(), len(spec.params)


def seq_features(run: Run, n: int, length: int) -> tuple[Tensor, Tensor, Tensor]:
    """Per-scalar inputs of the sequence models at ``n`` observed snapshots.

    Returns:
        ``seq`` ``(P, length, 2)``: each observed velocity and the position relative to ``w_p``, both in units
        of ``r`` = the scalar's RMS velocity per record interval over the last ``length`` intervals (floored by a
        tenth of its tensor's RMS); ``static`` ``(P, 3)``: progress ``s_p / T``, horizon ``(T - s_p) / T``, and
        ``log(r / r_tensor)``; ``unit`` ``(P,)``: ``r * h`` with ``h`` the horizon in record intervals, so that
        ``w_hat = w_p + unit * output``.
    """
    if n < length + 1:
        raise ValueError(f"The sequence models need {length + 1} observed snapshots, got {n}.")
    w = run.w[n - length - 1 : n].float()  # (length + 1, P)
    inc = w[1:] - w[:-1]
    tindex, nt = _tensor_index(run.spec)
    r = inc.pow(2).mean(0).sqrt()
    sq = torch.zeros(nt).index_add_(0, tindex, r * r)
    cnt = torch.zeros(nt).index_add_(0, tindex, torch.ones_like(r))
    r_tensor = (sq / cnt + 1e-30).sqrt()[tindex]
    r = r + 0.1 * r_tensor + 1e-12
    pos = (w[1:] - w[-1]) / r
    seq = torch.stack([(inc / r).clamp(-10, 10), pos.clamp(-50, 50) / length], dim=2).transpose(0, 1)
    total, s_p = float(run.steps[-1]), float(run.steps[n - 1])
    interval = float(run.steps[1] - run.steps[0])
    h = (total - s_p) / interval
    static = torch.stack(
        [
            torch.full_like(r, s_p / total),
            torch.full_like(r, (total - s_p) / total),
            torch.log(r / (r_tensor + 1e-12)).clamp(-10, 10),
        ],
        dim=1,
    )
    return seq.contiguous(), static, r * h


class SeqLSTM(nn.Module):
    """LSTM over a scalar's normalised recent trajectory -> normalised displacement to ``T``."""

    def __init__(self, hidden: int = 32) -> None:
        super().__init__()
        self.inp = nn.Linear(N_SEQ + N_STATIC, hidden)
        self.lstm = nn.LSTM(hidden, hidden, batch_first=True)
        self.head = nn.Sequential(nn.Linear(hidden + N_STATIC, hidden), nn.SiLU(), nn.Linear(hidden, 1))

    def forward(self, seq: Tensor, static: Tensor) -> Tensor:
        st = static.unsqueeze(1).expand(-1, seq.shape[1], -1)
        out, _ = self.lstm(self.inp(torch.cat([seq, st], dim=2)))
        return self.head(torch.cat([out[:, -1], static], dim=1)).squeeze(-1)


class SeqTransformer(nn.Module):
    """Transformer encoder over the same inputs (learned positions, read out at the last token)."""

    def __init__(self, hidden: int = 32, length: int = 7, layers: int = 2, heads: int = 4) -> None:
        super().__init__()
        self.inp = nn.Linear(N_SEQ + N_STATIC, hidden)
        self.pos = nn.Parameter(torch.zeros(length, hidden))
        nn.init.normal_(self.pos, std=0.1)
        layer = nn.TransformerEncoderLayer(hidden, heads, 2 * hidden, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.head = nn.Sequential(nn.Linear(hidden + N_STATIC, hidden), nn.SiLU(), nn.Linear(hidden, 1))

    def forward(self, seq: Tensor, static: Tensor) -> Tensor:
        st = static.unsqueeze(1).expand(-1, seq.shape[1], -1)
        h = self.encoder(self.inp(torch.cat([seq, st], dim=2)) + self.pos[: seq.shape[1]])
        return self.head(torch.cat([h[:, -1], static], dim=1)).squeeze(-1)


LABELS = ("arch", "optimizer", "family", "schedule")  # per-sample provenance kept in SeqData


@dataclass
class SeqData:
    """Training samples for the sequence models: inputs, clipped targets and each sample's provenance.

    ``labels[attr]`` lists the values of a :data:`LABELS` attribute over the training runs (sorted) and
    ``codes[attr]`` gives each sample's index into it, so that a split's exclusion is applied to the samples
    themselves.
    """

    seq: Tensor
    static: Tensor
    target: Tensor
    labels: dict[str, list[str]]
    codes: dict[str, Tensor]

    def values(self, attr: str, keep: Tensor | None = None) -> list[str]:
        """The values of ``attr`` that occur among the samples selected by ``keep`` (all samples by default)."""
        codes = self.codes[attr] if keep is None else self.codes[attr][keep]
        return [self.labels[attr][i] for i in sorted(set(codes.tolist()))]


@dataclass(frozen=True)
class Exclusion:
    """Training runs a sequence model must not see: those whose ``attr`` (one of :data:`LABELS`) is in ``values``."""

    attr: str
    values: tuple[str, ...]

    @property
    def name(self) -> str:
        """Identifier of the resulting model (``"family!=adam"``), also written into every row it forecasts."""
        return f"{self.attr}!={'|'.join(self.values)}"

    def keep(self, data: SeqData) -> Tensor:
        """Boolean mask over ``data``'s samples: ``True`` where the sample's run is not excluded."""
        ids = [data.labels[self.attr].index(v) for v in self.values if v in data.labels[self.attr]]
        return ~torch.isin(data.codes[self.attr], torch.tensor(ids, dtype=torch.long))


def model_name(exclude: Exclusion | None) -> str:
    """``"all"`` for the models trained on the whole training split, else the exclusion's name."""
    return "all" if exclude is None else exclude.name


def split_exclusion(split: str, run: Run, cfg: Config) -> Exclusion | None:
    """What the sequence models that forecast ``run`` in ``split`` were trained without.

    ``unseen-arch`` leaves out the run's architecture, ``unseen-optimizer`` its optimizer family (so that holding
    out Adam also holds out AdamW, the same update rule), ``unseen-schedule`` every schedule of that split (none of
    which the training split uses: the exclusion states, and the benchmark checks, that it removes nothing).
    """
    if split == "unseen-arch":
        return Exclusion("arch", (run.arch,))
    if split == "unseen-optimizer":
        return Exclusion("family", (run.family,))
    if split == "unseen-schedule":
        return Exclusion("schedule", tuple(cfg.unseen_schedules))
    return None


def seq_dataset(runs: list[Run], cfg: Config) -> SeqData:
    """Every anchor with a full input sequence, a random subset of scalars each; target is always ``w_T``."""
    gen = torch.Generator().manual_seed(cfg.seed)
    seqs, statics, targets = [], [], []
    labels = {a: sorted({str(getattr(r, a)) for r in runs}) for a in LABELS}
    codes: dict[str, list[Tensor]] = {a: [] for a in LABELS}
    for run in runs:
        K = len(run.steps)  # noqa: N806
        for n in range(cfg.seq_len + 1, K):
            seq, static, unit = seq_features(run, n, cfg.seq_len)
            pick = torch.randperm(run.w.shape[1], generator=gen)[: cfg.seq_samples]
            z = (run.w[-1, pick] - run.w[n - 1, pick]).float() / unit[pick]
            seqs.append(seq[pick])
            statics.append(static[pick])
            targets.append(z.clamp(-TARGET_CLIP, TARGET_CLIP))
            for a in LABELS:
                codes[a].append(torch.full((len(pick),), labels[a].index(str(getattr(run, a)))))
    return SeqData(
        torch.cat(seqs), torch.cat(statics), torch.cat(targets), labels, {a: torch.cat(c) for a, c in codes.items()}
    )


def train_seq_model(kind: str, data: SeqData, exclude: Exclusion | None, cfg: Config) -> tuple[nn.Module, dict]:
    """Train one sequence model on ``data`` minus the excluded runs' samples.

    The budget (steps, batch, optimizer, seeds) is the same for both kinds and every exclusion, so the splits
    differ only in the data. The returned info's ``trained_on`` lists, per :data:`LABELS` attribute, the values
    present in the samples actually trained on.

    Raises:
        ValueError: when the exclusion leaves no sample.
    """
    keep = torch.ones(len(data.target), dtype=torch.bool) if exclude is None else exclude.keep(data)
    if not keep.any():
        raise ValueError(f"Excluding {model_name(exclude)} leaves no training sample.")
    seq, static, target = data.seq[keep], data.static[keep], data.target[keep]
    torch.manual_seed(cfg.seed)
    model = SeqLSTM(cfg.seq_hidden) if kind == "lstm" else SeqTransformer(cfg.seq_hidden, cfg.seq_len)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.seq_lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, max(cfg.seq_steps, 1))
    gen = torch.Generator().manual_seed(cfg.seed + 1)
    start, losses = time.perf_counter(), []
    model.train()
    for _ in range(cfg.seq_steps):
        idx = torch.randint(len(target), (cfg.seq_batch,), generator=gen)
        loss = nn.functional.huber_loss(model(seq[idx], static[idx]), target[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        losses.append(loss.item())
    model.eval()
    tail = losses[-max(1, len(losses) // 10) :]
    info = {
        "kind": kind,
        "model": model_name(exclude),
        "exclude_arch": exclude.values[0] if exclude is not None and exclude.attr == "arch" else None,
        "trained_on": {a: data.values(a, keep) for a in LABELS},
        "params": sum(p.numel() for p in model.parameters()),
        "samples": int(keep.sum()),
        "steps": cfg.seq_steps,
        "batch": cfg.seq_batch,
        "final_loss": sum(tail) / len(tail),
        "seconds": round(time.perf_counter() - start, 2),
    }
    return model, info


@torch.no_grad()
def forecast_seq(model: nn.Module, run: Run, n: int, cfg: Config) -> Tensor:
    seq, static, unit = seq_features(run, n, cfg.seq_len)
    z = torch.cat([model(seq[i : i + 8192], static[i : i + 8192]) for i in range(0, len(unit), 8192)])
    return run.w[n - 1] + (z * unit).double()


# -------------------------------------------------------------------------------------------------- GFM
def gfm_lr_steps(run: Run, n: int) -> Tensor:
    """Learning rates of the ``H = T - s_p`` steps after the ``n``-th snapshot, shape ``(H + 1, G)``.

    The run's scheduler as it was at ``s_p`` (:attr:`Run.lr_states`) is replayed for ``H - 1`` calls: row ``j`` is
    the learning rate of step ``s_p + j + 1``. The last row, which no step uses, repeats the final step's rate
    rather than the one a scheduler gives after ``T`` (off the schedule for ``OneCycleLR``, which is defined for
    ``T`` steps only).
    """
    stand_in, sched = run.lr_states[n - 1]
    horizon = int(run.steps[-1] - run.steps[n - 1])
    return lr_by_step(future_learning_rates(stand_in, sched, horizon - 1), horizon, 1)


def forecast_gfm(run: Run, n: int, cfg: Config) -> tuple[dict[str, Tensor], dict]:
    """Fit a fresh field on the run's observed window (at most ``gfm_window`` latest snapshots) and forecast ``T``.

    Returns ``{"gfm": chosen, "gfm-fitted": fitted, "gfm-prior": prior}`` and diagnostics. The choice is the
    callback's: the fitted field unless its backtest error (forecasting the last observed snapshot from
    ``backtest`` snapshots earlier) is worse than the prior's. The learning rates come from :func:`gfm_lr_steps`;
    the diagnostics compare them with the rates the run really used (``lr_replay_error``, relative).
    """
    start = time.perf_counter()
    cap = min(cfg.gfm_window, n)
    buf = TrajectoryBuffer(cap)
    for i in range(n - cap, n):
        buf.append(run.buffer[i])
    total = int(run.steps[-1])
    win = Window.from_buffer(buf, run.spec, run.dyn.state_names, total_steps=total)
    s_p = int(run.steps[n - 1])
    horizon = total - s_p
    lr_steps = gfm_lr_steps(run, n)
    config = FieldConfig(history=cfg.gfm_history, span=cfg.gfm_span, anchor=cfg.gfm_anchor, trend=cfg.gfm_trend)
    torch.manual_seed(cfg.seed)
    fitted, prior = GradientField(config), GradientField(config)
    report = fit_field(
        fitted,
        torch.optim.Adam(fitted.parameters(), cfg.gfm_lr),
        win,
        run.dyn,
        steps=cfg.gfm_steps,
        batch=cfg.gfm_batch,
        seed=cfg.seed,
    )
    bt_fitted = backtest_error(fitted, win, run.dyn, cfg.backtest)
    bt_prior = backtest_error(prior, win, run.dyn, cfg.backtest)
    use_fitted = bt_fitted <= bt_prior  # NaN (window too short to backtest) -> prior, as the callback does
    out = {}
    for name, f in (("gfm-fitted", fitted), ("gfm-prior", prior)):
        out[name] = forecast(f, win, run.dyn, lr_steps, [horizon]).weights[1].double()
    out["gfm"] = out["gfm-fitted"] if use_fitted else out["gfm-prior"]
    used = lr_steps[:horizon]
    info = {
        "window": cap,
        "horizon_steps": horizon,
        "horizon_over_span": horizon / (cfg.gfm_span * win.interval),
        "fit_samples": report.samples,
        "fit_loss_start": report.loss_start,
        "fit_loss_end": report.loss_end,
        "backtest_fitted": bt_fitted,
        "backtest_prior": bt_prior,
        "chose": "fitted" if use_fitted else "prior",
        "lr_range": [float(used.min()), float(used.max())],
        "lr_replay_error": _lr_error(used, run, s_p),
        "seconds": round(time.perf_counter() - start, 3),
    }
    return out, info


def _lr_error(lr_steps: Tensor, run: Run, s_p: int) -> float:
    """Largest relative gap between ``lr_steps`` and the rates steps ``s_p + 1, ...`` really used (NaN: unknown)."""
    if run.lr_trace is None:
        return math.nan
    true = run.lr_trace[s_p : s_p + len(lr_steps)]
    return float(((lr_steps - true).abs() / true.abs().clamp_min(1e-30)).max())


# ------------------------------------------------------------------------------------------ GFM, meta-trained
def _window(run: Run, n: int) -> Window:
    """The window of the first ``n`` snapshots, as the callback builds it (planned steps known)."""
    buf = TrajectoryBuffer(n)
    for i in range(n):
        buf.append(run.buffer[i])
    return Window.from_buffer(buf, run.spec, run.dyn.state_names, total_steps=int(run.steps[-1]))


def meta_budget(cfg: Config) -> MetaTrainConfig:
    """The meta-field's training budget: the sequence models' (steps x samples per step), seed included."""
    return MetaTrainConfig(steps=cfg.seq_steps, anchors_per_step=4, scalars=max(1, cfg.seq_batch // 4), seed=cfg.seed)


def train_meta_field(runs: list[Run], exclude: Exclusion | None, cfg: Config) -> tuple[MetaField, dict]:
    """Meta-train a :class:`~lightning_gfm.flow.meta.MetaField` on ``runs`` minus the excluded ones.

    Conditional flow matching on each whole training trajectory (every anchor, every later segment), with the
    sequence models' budget; the exclusion acts on the runs, so a split's held-out architecture, optimizer
    family or schedules are absent from the field's data exactly as from theirs.
    """
    keep = [r for r in runs if exclude is None or str(getattr(r, exclude.attr)) not in exclude.values]
    if not keep:
        raise ValueError(f"Excluding {model_name(exclude)} leaves no training run.")
    meta_runs = [
        MetaRun(_window(r, len(r.steps)), family_of(r.dyn), float(r.steps[-1]), r.spec.role_index()) for r in keep
    ]
    field, report = meta_train(meta_runs, MetaConfig(), meta_budget(cfg))
    info = {
        "kind": "gfm-meta",
        "model": model_name(exclude),
        "trained_on": {a: sorted({str(getattr(r, a)) for r in keep}) for a in LABELS},
        "params": sum(p.numel() for p in field.parameters()),
        "runs": len(keep),
        "steps": report["train"]["steps"],
        "samples_per_step": report["train"]["anchors_per_step"] * report["train"]["scalars"],
        "final_loss": report["loss_last"],
        "seconds": report["seconds"],
    }
    return field, info


def forecast_meta(field: MetaField, run: Run, n: int) -> Tensor:
    """The meta-field's forecast of ``w_T`` from the first ``n`` snapshots, with the run's own future rates."""
    horizon = int(run.steps[-1] - run.steps[n - 1])
    w, _ = meta_forecast(
        field,
        _window(run, n),
        family_of(run.dyn),
        gfm_lr_steps(run, n),
        [horizon],
        float(run.steps[-1]),
        run.spec.role_index(),
    )
    return w[1].double()


# ---------------------------------------------------------------------------------------------- driver
def _rel_error(w_hat: Tensor, run: Run, n: int) -> float:
    w_t, w_p = run.w[-1], run.w[n - 1]
    return float((w_hat - w_t).norm() / (w_t - w_p).norm().clamp_min(1e-30))


def _finite(x: float) -> float | None:
    return round(x, 6) if math.isfinite(x) else None


def _record_corpus(cfg: Config, data) -> tuple[list[Run], dict[str, list[Run]]]:
    """The sequence models' training runs and the evaluated runs, by role (see :class:`Config` for the seeds)."""

    def record(archs, inits, data_seed, schedules=("constant",)):
        return [
            record_run(a, o, i, data_seed, data, cfg, schedule=s)
            for a in archs
            for o in cfg.optimizers
            for s in schedules
            for i in inits
        ]

    train = record(cfg.archs, cfg.train_inits, 0)
    train += record(cfg.schedule_archs, cfg.schedule_train_inits, 2, cfg.train_schedules)
    evals = {
        "seen": record(cfg.archs, cfg.seen_inits, 1),
        "unseen-init": record(cfg.archs, cfg.unseen_inits, 0),
        "unseen-schedule": record(cfg.schedule_archs, cfg.schedule_eval_inits, 1, cfg.unseen_schedules),
    }
    return train, evals


def run_benchmark(cfg: Config = Config(), out: str | Path | None = None, command: str = "", log=print) -> dict:
    """Record the corpus, train the sequence models, evaluate every forecaster; write the JSON to ``out``."""
    cfg.check()
    t0 = time.perf_counter()
    timings: dict[str, float] = {}
    data = digits_data()

    # 1. corpus
    train_runs, eval_runs = _record_corpus(cfg, data)
    timings["record"] = time.perf_counter() - t0
    n_runs = len(train_runs) + sum(map(len, eval_runs.values()))
    log(f"recorded {n_runs} trajectories in {timings['record']:.1f}s")
    constant = eval_runs["seen"] + eval_runs["unseen-init"]
    split_runs = {
        "seen": eval_runs["seen"],
        "unseen-init": eval_runs["unseen-init"],
        "unseen-arch": [r for r in constant if r.arch in cfg.holdout_archs],
        "unseen-optimizer": [r for r in constant if r.family in cfg.holdout_families],
        "unseen-schedule": eval_runs["unseen-schedule"],
    }

    # 2. sequence models: one pair on the whole training split, one pair per exclusion a split needs
    t = time.perf_counter()
    sdata = seq_dataset(train_runs, cfg)
    exclusions = list(dict.fromkeys(split_exclusion(s, r, cfg) for s in SPLITS for r in split_runs[s]))
    if None not in exclusions:
        exclusions.insert(0, None)
    exclusions.sort(key=lambda e: e is not None)  # the whole-split models first: a no-op exclusion reuses them
    seq_models: dict[tuple[str, str], nn.Module] = {}
    seq_info = []
    for exclude in exclusions:
        name = model_name(exclude)
        for kind in ("lstm", "transformer"):
            if exclude is not None and bool(exclude.keep(sdata).all()):
                # nothing to leave out (``unseen-schedule``): the same data and seeds would give the same model
                model = seq_models[kind, "all"]
                info = {**next(i for i in seq_info if i["kind"] == kind and i["model"] == "all")}
                info.update(model=name, exclude_arch=None, reused="all", seconds=0.0)
                log(f"{kind} ({name}): nothing to leave out, the whole-split model is reused")
            else:
                model, info = train_seq_model(kind, sdata, exclude, cfg)
                log(f"trained {kind} ({name}): loss {info['final_loss']:.4f} in {info['seconds']}s")
            seq_models[kind, name] = model
            seq_info.append(info)
    timings["seq_train"] = time.perf_counter() - t

    # 2b. the meta-trained GFM field: the same training runs and exclusions as the sequence models
    t = time.perf_counter()
    meta_fields: dict[str, MetaField] = {}
    for exclude in exclusions:
        name = model_name(exclude)
        if exclude is not None and not any(str(getattr(r, exclude.attr)) in exclude.values for r in train_runs):
            meta_fields[name] = meta_fields["all"]
            seq_info.append(
                {
                    **next(i for i in seq_info if i["kind"] == "gfm-meta" and i["model"] == "all"),
                    "model": name,
                    "reused": "all",
                    "seconds": 0.0,
                }
            )
            continue
        meta_fields[name], info = train_meta_field(train_runs, exclude, cfg)
        seq_info.append(info)
        log(
            f"meta-trained the GFM field ({name}) on {info['runs']} runs: loss {info['final_loss']:.4f} "
            f"in {info['seconds']}s"
        )
    timings["meta_train"] = time.perf_counter() - t

    # 3. forecasts on every evaluated trajectory (GFM, last, linear do not depend on the split)
    t = time.perf_counter()
    shared: dict[tuple, dict[str, Tensor]] = {}
    gfm_diag = []
    for run in (r for rs in eval_runs.values() for r in rs):
        for p in cfg.fractions:
            n = observed(run, p)
            gfm, info = forecast_gfm(run, n, cfg)
            shared[run.key, p] = {"last": forecast_last(run, n), "linear": forecast_linear(run, n), **gfm}
            gfm_diag.append(
                {
                    "arch": run.arch,
                    "optimizer": run.optimizer,
                    "schedule": run.schedule,
                    "init_seed": run.init_seed,
                    "data_seed": run.data_seed,
                    "p": p,
                    **{k: _jsonable(v) for k, v in info.items()},
                }
            )
    timings["gfm"] = time.perf_counter() - t
    log(f"GFM on {len(gfm_diag)} (trajectory, p) pairs in {timings['gfm']:.1f}s")

    t = time.perf_counter()
    rows = []
    true_metrics = {run.key: evaluate(run, run.w[-1], data) for rs in eval_runs.values() for run in rs}
    for split, runs in split_runs.items():
        for run in runs:
            name = model_name(split_exclusion(split, run, cfg))
            for p in cfg.fractions:
                n = observed(run, p)
                preds = dict(shared[run.key, p])
                for kind in ("lstm", "transformer"):
                    preds[kind] = forecast_seq(seq_models[kind, name], run, n, cfg)
                preds["gfm-meta"] = forecast_meta(meta_fields[name], run, n)
                true_loss, true_acc = true_metrics[run.key]
                for f in FORECASTERS:
                    loss, acc = evaluate(run, preds[f], data)
                    rows.append(
                        {
                            "split": split,
                            "p": p,
                            "forecaster": f,
                            "optimizer": run.optimizer,
                            "family": run.family,
                            "arch": run.arch,
                            "schedule": run.schedule,
                            "rel_error": _finite(_rel_error(preds[f], run, n)),
                            "val_loss": _finite(loss),
                            "val_acc": _finite(acc),
                            "true_val_loss": round(true_loss, 6),
                            "true_val_acc": round(true_acc, 6),
                            "init_seed": run.init_seed,
                            "data_seed": run.data_seed,
                            "seq_model": name,
                        }
                    )
    timings["evaluate"] = time.perf_counter() - t
    timings["total"] = time.perf_counter() - t0
    result = {
        "command": command,
        "config": _jsonable(asdict(cfg)),
        "gfm_setup": {
            "field": f"fresh GradientField(FieldConfig(history={cfg.gfm_history}, span={cfg.gfm_span}, "
            f"anchor={cfg.gfm_anchor!r}, trend={cfg.gfm_trend})) per "
            f"(trajectory, p), fit_field {cfg.gfm_steps} steps x {cfg.gfm_batch} scalars, Adam {cfg.gfm_lr}",
            "window": f"the latest min({cfg.gfm_window}, observed) snapshots",
            "choice": f"backtest_error(lag={cfg.backtest}) fitted <= prior, else prior (the callback's rule)",
            "lr": "lr_by_step(future_learning_rates(stand-in optimizer, the run's scheduler copied at s_p, H - 1), "
            "H, 1): the run's own schedule replayed (constant runs: the constant lr)",
        },
        "seq_models": seq_info,
        "gfm_diagnostics": gfm_diag,
        "timings_s": {k: round(v, 2) for k, v in timings.items()},
        "torch_threads": torch.get_num_threads(),
        "rows": rows,
    }
    if out is not None:
        path = Path(out)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(dump_json(result))
        log(f"wrote {len(rows)} rows to {path} ({timings['total']:.1f}s)")
    return result


def dump_json(result: dict) -> str:
    """JSON text: the header indented, one line per row and per diagnostic (keeps the file small and diffable)."""
    head = {k: v for k, v in result.items() if k not in ("rows", "gfm_diagnostics")}
    text = json.dumps(head, indent=1)[:-2]
    for key in ("gfm_diagnostics", "rows"):
        items = ",\n  ".join(json.dumps(x) for x in result.get(key, []))
        text += f',\n "{key}": [\n  {items}\n ]'
    return text + "\n}\n"


def _jsonable(v):
    if isinstance(v, dict):
        return {k: _jsonable(x) for k, x in v.items()}
    if isinstance(v, tuple | list):
        return [_jsonable(x) for x in v]
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v


# ---------------------------------------------------------------------------------------------- tables
def _median(xs: list) -> float:
    xs = [x if x is not None else math.inf for x in xs]  # a non-finite forecast counts as the worst
    return statistics.median(xs) if xs else math.nan


def _fmt(x: float) -> str:
    return "—" if math.isnan(x) else ("inf" if math.isinf(x) else f"{x:.3f}")


def render_tables(result: dict) -> str:
    """Markdown tables of the result: median relative error / val-loss gap per split x p x forecaster, per
    optimizer at p = 0.5 (or the middle fraction run), and per schedule for the splits with scheduled runs.

    Rows without ``schedule`` (result files written before schedules existed) count as ``constant``.
    """
    rows = result["rows"]
    names = [f for f in FORECASTERS if any(r["forecaster"] == f for r in rows)]
    fractions = sorted({r["p"] for r in rows})
    splits = [s for s in SPLITS if any(r["split"] == s for r in rows)]

    def schedule(r: dict) -> str:
        return r.get("schedule", "constant")

    def pick(**kw):
        return [r for r in rows if all((schedule(r) if k == "schedule" else r[k]) == v for k, v in kw.items())]

    def gap(rs):
        return [None if r["val_loss"] is None else r["val_loss"] - r["true_val_loss"] for r in rs]

    def cell(rs) -> str:
        return f"{_fmt(_median([r['rel_error'] for r in rs]))} ({_fmt(_median(gap(rs)))})"

    lines = [
        "Median relative error `||w_hat - w_T|| / ||w_T - w_p||` (median validation-loss gap to the true final "
        "weights in parentheses; n = trajectories per cell).",
        "",
        "| split | p | n | " + " | ".join(names) + " |",
        "|---|---|---|" + "---|" * len(names),
    ]
    for split in splits:
        for p in fractions:
            n = len(pick(split=split, p=p, forecaster="last"))
            cells = [cell(pick(split=split, p=p, forecaster=f)) for f in names]
            lines.append(f"| {split} | {p} | {n} | " + " | ".join(cells) + " |")
    p_mid = 0.5 if 0.5 in fractions else fractions[len(fractions) // 2]
    optimizers = sorted({r["optimizer"] for r in rows}, key=lambda o: list(OPTIMIZERS).index(o))

    def breakdown(title: str, in_splits: list[str], values: list[str], cell_rows) -> list[str]:
        """A table per (split, forecaster) over ``values``; ``cell_rows(split, f, v)`` picks one cell's rows."""
        out = ["", f"Per {title} at p = {p_mid}: median relative error (median val-loss gap).", ""]
        out += ["| split | forecaster | " + " | ".join(values) + " |", "|---|---|" + "---|" * len(values)]
        for split in in_splits:
            for f in names:
                out.append(f"| {split} | {f} | " + " | ".join(cell(cell_rows(split, f, v)) for v in values) + " |")
        return out

    lines += breakdown(
        "optimizer", splits, optimizers, lambda split, f, o: pick(split=split, p=p_mid, forecaster=f, optimizer=o)
    )
    scheduled = [s for s in splits if any(schedule(r) != "constant" for r in pick(split=s))]
    if scheduled:
        present = [s for s in SCHEDULES if any(schedule(r) == s for r in rows if r["split"] in scheduled)]
        lines += breakdown(
            "schedule", scheduled, present, lambda split, f, s: pick(split=split, p=p_mid, forecaster=f, schedule=s)
        )
    diag = result.get("gfm_diagnostics", [])
    if diag:
        lines += ["", "GFM backtest choice (fitted field vs prior) and median backtest errors, per optimizer.", ""]
        lines += ["| optimizer | chose fitted | median backtest fitted | median backtest prior |", "|---|---|---|---|"]
        for o in optimizers:
            ds = [d for d in diag if d["optimizer"] == o]
            k = sum(d["chose"] == "fitted" for d in ds)
            lines.append(
                f"| {o} | {k}/{len(ds)} | {_fmt(_median([d['backtest_fitted'] for d in ds]))} | "
                f"{_fmt(_median([d['backtest_prior'] for d in ds]))} |"
            )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a small corpus and budgets (< 60 s), for smoke tests")
    parser.add_argument("--out", default=None, help="JSON path (default benchmarks/results/forecasting[-quick].json)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--gfm-span", type=float, default=None, help="the field's fitted span, in record intervals")
    parser.add_argument("--table", metavar="JSON", default=None, help="print the markdown tables of a result file")
    args = parser.parse_args(argv)
    if args.table:
        result = json.loads(Path(args.table).read_text())
        print(render_tables(result))
        return result
    torch.set_num_threads(args.threads)
    cfg = QUICK if args.quick else Config()
    if args.gfm_span is not None:
        cfg = replace(cfg, gfm_span=args.gfm_span)
    out = args.out or f"benchmarks/results/forecasting{'-quick' if args.quick else ''}.json"
    command = "python -m benchmarks.forecasting " + " ".join(sys.argv[1:] if argv is None else argv)
    result = run_benchmark(cfg, out, command.strip())
    print(render_tables(result))
    return result


if __name__ == "__main__":
    main()
