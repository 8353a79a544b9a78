"""What GFMCallback reports, and where: scalars to every Lightning logger, extras to Weights & Biases.

The only module of the package that imports ``wandb``, and only inside functions, so ``import lightning_gfm``
never does. It does not import Lightning either: loggers are recognised by their class name and used through
their public ``log_metrics`` / ``experiment``.

* Scalars (``gfm/...``): after every jump attempt, and ``gfm/forecast_skill/...`` when the run reaches the step a
  rolled-back forecast aimed at, through every attached logger (CSV, TensorBoard, W&B, ...).
* W&B extras, when a ``WandbLogger`` is attached: a table of every :class:`~lightning_gfm.jump.JumpRecord`
  (``gfm/jumps``), histograms of the forecast update per layer (``gfm/forecast_update/<layer>``) and a picture
  of the trajectory (``gfm/trajectory``): a 2-D projection of the recorded window, the forecast path and the
  chosen point.

A logger that raises is reported once with a warning and otherwise ignored: it never stops training.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import Tensor

from lightning_gfm.forecast import ForecastPath
from lightning_gfm.jump import JumpRecord
from lightning_gfm.metrics import forecast_direction_cosine, forecast_relative_error
from lightning_gfm.params import ParamSpec

__all__ = ["GFMReporter", "is_wandb_logger", "jump_scalars", "layer_groups", "trajectory_projection"]

#: Columns of the W&B table of jump records, in order.
TABLE_COLUMNS: tuple[str, ...] = (
    "step",
    "outcome",
    "accepted",
    "horizon",
    "trend",
    "metric_before",
    "metric_after",
    "seconds",
    "fit_loss",
    "backtest_fitted",
    "backtest_prior",
    "candidates",
)


def is_wandb_logger(logger: Any) -> bool:
    """Whether ``logger`` is Lightning's ``WandbLogger`` (or a subclass), without importing Lightning or wandb."""
    return any(cls.__name__ == "WandbLogger" for cls in type(logger).__mro__)


def jump_scalars(record: JumpRecord, jumps: Sequence[JumpRecord], buffer_mb: float, record_seconds: float) -> dict:
    """The ``gfm/...`` scalars logged after a jump attempt.

    Args:
        record: the attempt just made.
        jumps: every attempt so far (``record`` included).
        buffer_mb: size of the snapshot window in MiB.
        record_seconds: wall-clock spent recording snapshots so far.

    Example:
        >>> r = JumpRecord(step=50, horizon=20, accepted=True, metric_before=1.0, metric_after=0.9,
        ...                outcome="accepted", seconds=0.2)
        >>> s = jump_scalars(r, [r], buffer_mb=1.5, record_seconds=0.1)
        >>> s["gfm/accepted"], s["gfm/jumps_accepted"], s["gfm/jumps_rolled_back"]
        (1.0, 1.0, 0.0)
    """
    accepted = sum(j.accepted for j in jumps)
    return {
        "gfm/accepted": float(record.accepted),
        "gfm/horizon": float(record.horizon),
        "gfm/trend": float(record.trend),
        "gfm/metric_before": record.metric_before,
        "gfm/metric_after": record.metric_after,
        "gfm/jump_seconds": record.seconds,
        "gfm/fit_loss": record.fit_loss,
        "gfm/backtest_fitted": record.backtest_fitted,
        "gfm/backtest_prior": record.backtest_prior,
        "gfm/jumps_accepted": float(accepted),
        "gfm/jumps_rolled_back": float(len(jumps) - accepted),
        "gfm/buffer_mb": buffer_mb,
        "gfm/record_seconds": record_seconds,
    }


def layer_groups(names: Sequence[str], offsets: Sequence[int], max_groups: int = 32) -> dict[str, list[tuple]]:
    """Ranges of the flat parameter vector grouped by layer (the parameter name without its last part).

    Args:
        names: parameter names, as in :class:`~lightning_gfm.params.ParamSpec`.
        offsets: start of each parameter in the flat vector, ``len(names) + 1`` entries.
        max_groups: layers beyond this many are pooled into ``"other"``.

    Returns:
        ``{layer: [(start, end), ...]}`` in the model's order.

    Example:
        >>> layer_groups(["net.0.weight", "net.0.bias", "net.2.weight"], [0, 6, 8, 14])
        {'net.0': [(0, 6), (6, 8)], 'net.2': [(8, 14)]}
    """
    groups: dict[str, list[tuple]] = {}
    for i, name in enumerate(names):
        layer = name.rsplit(".", 1)[0] if "." in name else name
        if layer not in groups and len(groups) >= max_groups:
            layer = "other"
        groups.setdefault(layer, []).append((offsets[i], offsets[i + 1]))
    return groups


@torch.no_grad()
def trajectory_projection(real: Tensor, forecast: Tensor) -> tuple[Tensor, Tensor]:
    """Project the recorded window and the forecast path onto the window's two principal directions.

    Args:
        real: recorded weights, shape ``(K, B)`` (``K >= 2`` snapshots of ``B`` scalars), the last row the anchor.
        forecast: forecast path, shape ``(H + 1, B)``, row 0 the anchor.

    Returns:
        ``(real_xy, forecast_xy)`` of shapes ``(K, 2)`` and ``(H + 1, 2)``, in weight units, the anchor at the
        origin. With fewer than two directions of spread, the missing coordinate is 0.

    Example:
        >>> real = torch.tensor([[0.0, 0.0], [1.0, 0.0], [2.0, 0.0]])
        >>> xy, fxy = trajectory_projection(real, torch.tensor([[2.0, 0.0], [4.0, 0.0]]))
        >>> xy[:, 0].abs().tolist(), fxy[:, 0].abs().tolist()
        ([2.0, 1.0, 0.0], [0.0, 2.0])
    """
    real, forecast = real.double(), forecast.double().to(real.device)
    anchor = real[-1]
    centred = real - real.mean(0)
    gram = centred @ centred.T  # (K, K): cheap for any number of scalars
    evals, evecs = torch.linalg.eigh(gram)
    order = evals.argsort(descending=True)[:2]
    basis = torch.zeros(2, real.shape[1], dtype=real.dtype, device=real.device)
    for row, j in enumerate(order.tolist()):
        if evals[j] > 1e-12 * evals.clamp_min(0).sum().clamp_min(1e-300):
            direction = evecs[:, j] @ centred
            basis[row] = direction / direction.norm()
    return ((real - anchor) @ basis.T).float(), ((forecast - anchor) @ basis.T).float()


@dataclass
class _PendingSkill:
    """A forecast that was not applied, kept on a subset of scalars until the run reaches its target steps."""

    index: Tensor  # (B,) scalars kept
    start: Tensor  # (B,) anchor weights
    targets: dict[int, tuple[int, Tensor]]  # global step -> (horizon, forecast weights (B,))


class GFMReporter:
    """Sends GFMCallback's reports to the attached loggers; one per callback.

    Args:
        skill_scalars: scalars kept from each rolled-back forecast to measure its skill later (bounds memory:
            ``skill_scalars * (n_candidates + 1)`` floats on CPU).
        picture_scalars: scalars used to draw the trajectory picture.
        histogram_values: most values per forecast-update histogram.
        seed: seeds the subsets.
        warn: called with a message the first time a logger fails (default :func:`warnings.warn`).
    """

    def __init__(
        self,
        skill_scalars: int = 4096,
        picture_scalars: int = 1 << 16,
        histogram_values: int = 10_000,
        seed: int = 0,
        warn: Callable[[str], None] | None = None,
    ) -> None:
        self.skill_scalars = skill_scalars
        self.picture_scalars = picture_scalars
        self.histogram_values = histogram_values
        self.seed = seed
        self.warn = warn or (lambda msg: warnings.warn(msg, stacklevel=3))
        self.failed = False
        self.pending: _PendingSkill | None = None
        #: ``(step, horizon, relative_error, direction_cosine)`` of every measured forecast, in order.
        self.skill: list[tuple[int, int, float, float]] = []

    # ---------------------------------------------------------------- guard
    def _guard(self, logger: Any, fn: Callable[[], Any]) -> Any:
        try:
            return fn()
        except Exception as err:  # a failing logger must never stop training
            if not self.failed:
                self.failed = True
                self.warn(f"GFMCallback: logger {type(logger).__name__} failed ({err!r}); continuing.")
            return None

    def log_scalars(self, loggers: Sequence[Any], metrics: dict[str, float], step: int) -> None:
        """``log_metrics`` on every logger, each call guarded."""
        for logger in loggers:
            self._guard(logger, lambda logger=logger: logger.log_metrics(metrics, step=step))

    # ----------------------------------------------------------------- jump
    def log_jump(
        self,
        loggers: Sequence[Any],
        step: int,
        record: JumpRecord,
        jumps: Sequence[JumpRecord],
        *,
        buffer_mb: float,
        record_seconds: float,
        spec: ParamSpec | None = None,
        path: ForecastPath | None = None,
        window: Tensor | None = None,
        is_global_zero: bool = True,
    ) -> None:
        """Report a jump attempt: scalars everywhere, W&B extras, and keep a rolled-back forecast for its skill.

        Args:
            loggers: ``trainer.loggers``.
            step: global step.
            record: the attempt.
            jumps: every attempt so far.
            buffer_mb: window size in MiB.
            record_seconds: recording wall-clock so far.
            spec: the tracked parameters (names and offsets for the histograms).
            path: the forecast, weights shape ``(H + 1, P)``.
            window: recorded weights, shape ``(K, P)``, the last row the anchor.
            is_global_zero: only rank 0 keeps forecasts and writes W&B extras.
        """
        self.log_scalars(loggers, jump_scalars(record, jumps, buffer_mb, record_seconds), step)
        if not is_global_zero:
            return
        self.pending = None
        if path is not None and not record.accepted and record.outcome == "rolled_back":
            self._keep_for_skill(step, path)
        for logger in loggers:
            if is_wandb_logger(logger):
                self._guard(
                    logger, lambda logger=logger: self._wandb_jump(logger, step, record, jumps, spec, path, window)
                )

    def _subset(self, n: int, total: int, salt: int) -> Tensor | None:
        if total <= n:
            return None
        gen = torch.Generator().manual_seed(self.seed + salt)
        if total <= 1 << 22:
            return torch.randperm(total, generator=gen)[:n].sort().values
        # a large model: draw distinct indices without a model-sized permutation (int64, 8 bytes a scalar)
        picked = torch.unique(torch.randint(total, (2 * n,), generator=gen))
        while picked.numel() < n:
            picked = torch.unique(torch.cat([picked, torch.randint(total, (n,), generator=gen)]))
        return picked[torch.randperm(picked.numel(), generator=gen)[:n]].sort().values

    def _keep_for_skill(self, step: int, path: ForecastPath) -> None:
        weights = path.weights
        index = self._subset(self.skill_scalars, weights.shape[1], step)
        if index is None:
            index = torch.arange(weights.shape[1])
        kept = weights[:, index.to(weights.device)].detach().float().cpu()
        if not torch.isfinite(kept).all():
            return
        targets = {step + h: (h, kept[i]) for i, h in enumerate(path.horizons) if h > 0}
        self.pending = _PendingSkill(index=index, start=kept[0], targets=targets)

    # ---------------------------------------------------------------- skill
    def observe(self, loggers: Sequence[Any], step: int, spec: ParamSpec, is_global_zero: bool = True) -> None:
        """At the start of a batch (weights after ``step`` optimizer steps): measure any forecast aimed here.

        Args:
            loggers: ``trainer.loggers``.
            step: global step.
            spec: the tracked parameters (the real weights are read from them).
            is_global_zero: only rank 0 measures.
        """
        pending = self.pending
        if pending is None or not is_global_zero or step not in pending.targets:
            return
        horizon, predicted = pending.targets.pop(step)
        real = _gather(spec, pending.index)
        rel = float(forecast_relative_error(predicted, real, pending.start))
        cos = float(forecast_direction_cosine(predicted, real, pending.start))
        self.skill.append((step, horizon, rel, cos))
        metrics = {
            "gfm/forecast_skill/relative_error": rel,
            "gfm/forecast_skill/direction_cosine": cos,
            "gfm/forecast_skill/horizon": float(horizon),
        }
        self.log_scalars(loggers, metrics, step)
        if not pending.targets:
            self.pending = None

    # ---------------------------------------------------------------- wandb
    def _wandb_jump(self, logger, step, record, jumps, spec, path, window) -> None:
        import wandb

        payload: dict[str, Any] = {
            "gfm/jumps": wandb.Table(columns=list(TABLE_COLUMNS), data=[_table_row(j) for j in jumps])
        }
        if path is not None and spec is not None and len(path.horizons) > 1:
            k = path.horizons.index(record.horizon) if record.accepted else len(path.horizons) - 1
            update = (path.weights[k] - path.weights[0]).detach().float()
            for layer, ranges in layer_groups(spec.names, spec.offsets).items():
                values = torch.cat([update[a:b] for a, b in ranges])
                values = values[torch.isfinite(values)]
                if values.numel() == 0:
                    continue
                stride = max(1, math.ceil(values.numel() / self.histogram_values))
                payload[f"gfm/forecast_update/{layer}"] = wandb.Histogram(values[::stride].cpu().numpy(), num_bins=64)
        if path is not None and window is not None and window.shape[0] >= 2:
            image = self._guard(logger, lambda: _trajectory_image(self, step, record, path, window))
            if image is not None:
                payload["gfm/trajectory"] = wandb.Image(image, caption=f"step {step}: {record.outcome}")
        logger.log_metrics(payload, step=step)


def _table_row(j: JumpRecord) -> list:
    row = asdict(j)
    row["candidates"] = ", ".join(f"{h}: {m:.4g}" for h, m in j.candidates)
    return [row[c] for c in TABLE_COLUMNS]


def _gather(spec: ParamSpec, index: Tensor) -> Tensor:
    """The live weights at flat positions ``index`` (sorted, shape ``(B,)``), on CPU, without flattening all."""
    offsets = torch.tensor(spec.offsets)
    owner = torch.bucketize(index, offsets[1:], right=True)
    parts = []
    for t in owner.unique().tolist():
        local = index[owner == t] - spec.offsets[t]
        p = spec.tensors[t].detach().reshape(-1)  # the local shard when sharded
        parts.append(p[local.to(p.device)].float().cpu())
    return torch.cat(parts)


def _trajectory_image(reporter: GFMReporter, step: int, record: JumpRecord, path: ForecastPath, window: Tensor):
    """RGB array ``(H, W, 3)`` of the projected trajectory (needs matplotlib)."""
    import numpy as np
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    index = reporter._subset(reporter.picture_scalars, window.shape[1], step)
    real, fc = window, path.weights
    if index is not None:
        real, fc = real[:, index.to(real.device)], fc[:, index.to(fc.device)]
    real, fc = real.float().cpu(), fc.detach().float().cpu()  # the window may be the buffer's bfloat16 storage
    real_xy, fc_xy = (t.cpu().numpy() for t in trajectory_projection(real, fc))
    fig = Figure(figsize=(5, 4), dpi=100)
    canvas = FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ax.plot(real_xy[:, 0], real_xy[:, 1], "o-", color="tab:blue", ms=3, label="recorded")
    ax.plot(fc_xy[:, 0], fc_xy[:, 1], "s--", color="tab:orange", ms=4, label="forecast")
    for (x, y), h in zip(fc_xy[1:], path.horizons[1:], strict=False):
        ax.annotate(f"+{h}", (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points")
    if record.accepted:
        k = path.horizons.index(record.horizon)
        ax.plot(*fc_xy[k], "*", color="tab:green", ms=14, label=f"jump to +{record.horizon}")
    ax.plot(0.0, 0.0, "kx", ms=8, label="now")
    ax.set_title(f"step {step}: {record.outcome}")
    ax.set_xlabel("principal direction 1 of the window")
    ax.set_ylabel("principal direction 2")
    ax.legend(fontsize=7)
    fig.tight_layout()
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())[..., :3].copy()
