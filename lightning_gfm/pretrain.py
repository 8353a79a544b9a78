"""Meta-train one field on many recorded trajectories, and measure how fields forecast held-out ones.

Pre-training is the callback's flow matching (:func:`~lightning_gfm.flow.matching.matching_loss` on
:func:`~lightning_gfm.flow.matching.sample_batch` samples) summed over several windows per step. A window is
``window`` (or, at random, fewer: the callback's first jumps see a shorter one) consecutive snapshots of a
trajectory, built exactly as the callback builds its own (:class:`~lightning_gfm.flow.window.Window`, progress
from the run's planned steps), so the pre-trained field sees the inputs it will see during a run. Trajectories
are drawn optimizer family first (SGD, momentum, Adam/AdamW, RMSprop equally often), so the field is
optimizer-aware for all of them whatever the corpus' mix.

Evaluation (:func:`evaluate_fields`) forecasts held-out trajectories the way a jump does: observe a window of
``window`` snapshots, forecast ``lag`` record intervals ahead, and report the relative error
``||w_hat - w|| / ||w - w_anchor||`` (1.0 = standing still), for the prior, the pre-trained field, a field fitted
online on the observed window only, and the pre-trained field fine-tuned on it.
"""

from __future__ import annotations

import math
import random
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from lightning_gfm.corpus import Trajectory
from lightning_gfm.flow.field import ANCHORS, FieldConfig, GradientField
from lightning_gfm.flow.matching import anchors_and_segments, fit_field, matching_loss, sample_batch
from lightning_gfm.forecast import backtest_error

__all__ = ["PretrainConfig", "evaluate_fields", "pretrain_field", "summarise"]


@dataclass(frozen=True)
class PretrainConfig:
    """Meta-training budget and the field's shape (the defaults are the callback's: a drop-in field).

    Attributes:
        steps: gradient steps.
        windows_per_step: windows whose matching losses are averaged in one step.
        batch: scalars sampled per window and step.
        lr: Adam learning rate (cosine-annealed to 10 %).
        window: longest window, in snapshots (the callback's ``window``).
        min_window: shortest window drawn.
        history, hidden, depth, span: the field's :class:`~lightning_gfm.flow.field.FieldConfig`.
        anchor: where the field's forecasts start (``"state"``, ``"velocity"`` or ``"trend"``, see
            :class:`~lightning_gfm.flow.field.FieldConfig`); meta-training builds each sample's anchor context
            this way, and the saved field keeps it, so a loaded field forecasts from the anchor it was trained on.
        trend: snapshots in the least-squares line of ``anchor="trend"`` (an integer >= 2).
        seed: seeds initialisation and sampling.

    Raises:
        ValueError: ``anchor`` is not one of ``"state"``, ``"velocity"``, ``"trend"``, or ``trend`` is not an
            integer >= 2 (the message names the argument, the rule and the value).
    """

    steps: int = 10000
    windows_per_step: int = 4
    batch: int = 1024
    lr: float = 3e-3
    window: int = 24
    min_window: int = 12
    history: int = 3
    hidden: int = 16
    depth: int = 2
    span: float = 16.0
    anchor: str = "trend"
    trend: int = 8
    seed: int = 0

    def __post_init__(self) -> None:
        if self.anchor not in ANCHORS:
            raise ValueError(
                f"`PretrainConfig.anchor` (--anchor) must be one of {', '.join(map(repr, ANCHORS))}, "
                f"got {self.anchor!r}."
            )
        if isinstance(self.trend, bool) or not isinstance(self.trend, int) or self.trend < 2:
            raise ValueError(
                f"`PretrainConfig.trend` (--trend) must be an integer >= 2 (snapshots in the trend line), "
                f"got {self.trend!r}."
            )

    @property
    def field_config(self) -> FieldConfig:
        return FieldConfig(
            history=self.history,
            hidden=self.hidden,
            depth=self.depth,
            span=self.span,
            anchor=self.anchor,
            trend=self.trend,
        )


def _families(trajs: Sequence[Trajectory]) -> dict[str, list[int]]:
    fam: dict[str, list[int]] = {}
    for i, t in enumerate(trajs):
        fam.setdefault(t.family, []).append(i)
    return fam


def pretrain_field(
    trajs: Sequence[Trajectory],
    config: PretrainConfig = PretrainConfig(),
    *,
    field: GradientField | None = None,
    checkpoint: str | Path | None = None,
    checkpoint_every: int = 250,
    progress: bool = True,
    log: Callable[[str], None] | None = None,
) -> tuple[GradientField, dict]:
    """Meta-train a field on ``trajs``.

    Resumable: every ``checkpoint_every`` steps the field, its optimizer and the step go to ``checkpoint`` (a
    ``torch.save`` of tensors and numbers, read back with ``weights_only=True``), deleted when training ends.

    Returns:
        The field and a report (losses, seconds, steps, windows).
    """
    from tqdm.auto import tqdm

    torch.manual_seed(config.seed)
    field = field if field is not None else GradientField(config.field_config)
    trajs = [t for t in trajs if len(t.buffer) >= field.config.min_anchor + 3]
    if not trajs:
        raise ValueError(
            f"no trajectory long enough to pre-train on (a field with anchor={field.config.anchor!r} needs "
            f"{field.config.min_anchor + 3} snapshots)."
        )
    opt = torch.optim.Adam(field.parameters(), lr=config.lr)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(s, config.steps) / config.steps))
    )
    start_step, losses = 0, []
    ckpt = Path(checkpoint) if checkpoint else None
    if ckpt is not None and ckpt.exists():
        state = torch.load(ckpt, weights_only=True)
        field.load_state_dict(state["field"])
        opt.load_state_dict(state["opt"])
        sched.load_state_dict(state["sched"])
        start_step, losses = int(state["step"]), list(state["losses"])
        if log:
            log(f"resumed from {ckpt} at step {start_step}")
    fam = _families(trajs)
    names = sorted(fam)
    rng = random.Random(config.seed * 1_000_003 + start_step)
    gen = torch.Generator().manual_seed(config.seed + start_step)
    history, span = field.config.history, field.config.span
    t0 = time.perf_counter()
    field.train()
    bar = tqdm(
        range(start_step, config.steps),
        desc="pretrain",
        disable=not progress,
        unit="step",
        initial=start_step,
        total=config.steps,
    )
    for step in bar:
        total = 0.0
        for _ in range(config.windows_per_step):
            t = trajs[rng.choice(fam[rng.choice(names)])]
            k = len(t.buffer)
            n = rng.randint(min(config.min_window, k), min(config.window, k))
            hi = rng.randint(n, k)
            win = t.window(hi - n, hi)
            pairs = anchors_and_segments(win, field.config.min_anchor, span)
            if len(pairs) == 0:
                continue
            sample = sample_batch(win, pairs, config.batch, gen)
            total = total + matching_loss(field, win, t.dyn, sample, history) / config.windows_per_step
        if not isinstance(total, torch.Tensor) or not torch.isfinite(total):
            continue
        opt.zero_grad(set_to_none=True)
        total.backward()
        torch.nn.utils.clip_grad_norm_(field.parameters(), 1.0)
        opt.step()
        sched.step()
        losses.append(float(total.detach()))
        if step % 50 == 0:
            bar.set_postfix(loss=f"{statistics.fmean(losses[-50:]):.4f}")
        if ckpt is not None and (step + 1) % checkpoint_every == 0 and step + 1 < config.steps:
            ckpt.parent.mkdir(parents=True, exist_ok=True)
            torch.save(
                {
                    "field": field.state_dict(),
                    "opt": opt.state_dict(),
                    "sched": sched.state_dict(),
                    "step": step + 1,
                    "losses": losses,
                },
                ckpt,
            )
    field.eval()
    if ckpt is not None and ckpt.exists():
        ckpt.unlink()
    n_avg = max(1, min(500, len(losses) // 20))
    head, tail = losses[:n_avg], losses[-n_avg:]
    report = {
        "config": asdict(config),
        "trajectories": len(trajs),
        "families": {f: len(v) for f, v in fam.items()},
        "loss_first": statistics.fmean(head) if head else float("nan"),
        "loss_last": statistics.fmean(tail) if tail else float("nan"),
        "seconds": round(time.perf_counter() - t0, 1),
    }
    return field, report


def _error(field: GradientField, traj: Trajectory, lo: int, hi: int, lag: int) -> float:
    return backtest_error(field, traj.window(lo, hi), traj.dyn, lag, max_scalars=None)


def evaluate_fields(
    trajs: Sequence[Trajectory],
    fields: dict[str, GradientField],
    *,
    window: int = 24,
    lag: int = 12,
    anchors: Sequence[float] = (0.5, 1.0),
    online_steps: int = 100,
    online_batch: int = 4096,
    online_lr: float = 3e-3,
    finetune: Sequence[str] = (),
    online: bool = True,
    online_config: FieldConfig | None = None,
    seed: int = 0,
    progress: bool = True,
) -> list[dict]:
    """Forecasting error of ``fields`` (plus ``online`` and ``<name>+ft`` fine-tuned variants) on ``trajs``.

    Every field forecasts with its own :class:`~lightning_gfm.flow.field.FieldConfig` (anchor, trend line,
    history), as the callback does with a loaded field. For each trajectory and each anchor position ``p`` (0 =
    the earliest anchor every field can start from: ``min_anchor + 2`` snapshots observed for the
    most demanding field, 1 = the latest with ``lag`` snapshots after it), the observed past is the at most
    ``window`` snapshots ending at the anchor; every field forecasts ``lag`` snapshots ahead from the same
    positions. ``online`` is a fresh field with ``online_config`` (default: the callback's default config,
    :attr:`PretrainConfig.field_config`) fitted for ``online_steps`` on the observed past only (the callback's
    online fit); ``<name>+ft`` is field ``<name>`` fine-tuned the same way (for each name in ``finetune``).

    Returns:
        One row per (trajectory, anchor, field): ``trajectory``, ``family``, ``p``, ``field``, ``rel_error``.
    """
    from tqdm.auto import tqdm

    rows = []
    config = online_config if online_config is not None else PretrainConfig().field_config
    configs = [f.config for f in fields.values()] + ([config] if online else [])
    first = max((c.min_anchor for c in configs), default=config.min_anchor) + 2
    for traj in tqdm(trajs, desc="evaluate", disable=not progress, unit="traj"):
        k = len(traj.buffer)
        for p in anchors:
            a_min, a_max = first, k - lag  # a: observed snapshots end (exclusive) at the anchor
            if a_max < a_min:
                continue
            a = a_min + round(p * (a_max - a_min))
            end, lo = a + lag, max(0, a - window)
            results = {name: _error(f, traj, lo, end, lag) for name, f in fields.items()}
            past = traj.window(lo, a)
            variants = {}
            if online:
                torch.manual_seed(seed)
                variants["online"] = GradientField(config)
            for name in finetune:
                variants[f"{name}+ft"] = _clone(fields[name])
            for name, f in variants.items():
                fit_field(
                    f,
                    torch.optim.Adam(f.parameters(), lr=online_lr),
                    past,
                    traj.dyn,
                    steps=online_steps,
                    batch=online_batch,
                    seed=seed,
                )
                results[name] = _error(f, traj, lo, end, lag)
            for name, err in results.items():
                rows.append(
                    {
                        "trajectory": traj.name,
                        "family": traj.family,
                        "p": p,
                        "field": name,
                        "rel_error": err if math.isfinite(err) else None,
                    }
                )
    return rows


def _clone(field: GradientField) -> GradientField:
    out = GradientField(field.config)
    out.load_state_dict(field.state_dict())
    return out


def summarise(rows: Sequence[dict], by: str = "field") -> dict[str, dict[str, float]]:
    """Median (non-finite counted as worst) and mean of ``min(err, 3)`` of ``rel_error`` grouped by ``by``."""
    out: dict[str, dict[str, float]] = {}
    for key in dict.fromkeys(r[by] for r in rows):
        errs = [r["rel_error"] if r["rel_error"] is not None else math.inf for r in rows if r[by] == key]
        out[key] = {
            "median": statistics.median(errs),
            "mean_capped": statistics.fmean(min(e, 3.0) for e in errs),
            "n": len(errs),
        }
    return out
