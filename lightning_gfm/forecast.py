"""Forecast the weights along the fitted optimizer-aware field: dynamics + field + torchdyn."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from lightning_gfm.dynamics import Dynamics
from lightning_gfm.flow.field import GradientField, dynamic_features
from lightning_gfm.flow.ode import integrate
from lightning_gfm.flow.window import Context, Window, anchor_context

#: On a CPU, chunks are cut to at most this many scalars: the network's hidden activations (``hidden`` floats per
#: scalar) then stay in the core's cache, which makes a fitted field's forecast about 1.7x faster than 1M-scalar chunks.
CPU_CHUNK = 1 << 16


class _ChunkSystem:
    """The forecast ODE of ``c`` scalars; its state ``x = [w, *optimizer state]`` has shape ``((1 + S) * c,)``.

    The same vector field as :func:`lightning_gfm.flow.window.field_velocity` (network -> gradient surrogate ->
    the optimizer's update rule), arranged for speed: the learning rate of each step is looked up once, one step
    counter serves every scalar, and the network is skipped when its output cannot depend on the path
    (:meth:`GradientField.constant_output`).

    Args:
        field: the network.
        ctx: anchor context of these scalars.
        names: optimizer state names, in the order they sit in ``x``.
        lr_tab: learning rate of each group for the next steps, shape ``(n + 1, G)``, on the chunk's device.
        group: param group of every scalar, shape ``(c,)``.
    """

    def __init__(self, field: GradientField, ctx: Context, names: list[str], lr_tab: Tensor, group: Tensor) -> None:
        self.field, self.ctx, self.names = field, ctx, names
        self.c = ctx.w0.numel()
        k0 = ctx.k0
        self.k0 = k0[0] if self.c and bool((k0 == k0[0]).all()) else k0
        self.lr_tab, self.group = lr_tab, group
        self.shared_lr = bool((lr_tab == lr_tab[:, :1]).all())
        self._lr_row: tuple[int, Tensor | None] = (-1, None)
        constant = field.constant_output(ctx.g0_norm)
        self.constant = constant is not None
        self.g = constant * ctx.g_scale if self.constant else None
        if not self.constant:
            cfg = field.config
            self.embedded = field.embed(ctx.static)
            self.reach = ctx.u_scale * (cfg.span * ctx.interval)
            self.lr0 = ctx.lr0.clamp_min(1e-30)

    def lr(self, t: Tensor) -> Tensor:
        """Learning rate of the step ``t`` falls in: 0-dim when the groups share it, else shape ``(c,)``."""
        row = min(int(t.floor()), self.lr_tab.shape[0] - 1)
        if row != self._lr_row[0]:
            lr = self.lr_tab[row, 0] if self.shared_lr else self.lr_tab[row][self.group]
            self._lr_row = (row, lr)
        return self._lr_row[1]

    def split(self, x: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        """Views of the weights, shape ``(c,)``, and of each optimizer state, shape ``(c,)``, inside ``x``."""
        parts = x.view(1 + len(self.names), self.c)
        return parts[0], dict(zip(self.names, parts[1:], strict=False))

    def surrogate(self, t: Tensor, w: Tensor, state: dict[str, Tensor], lr: Tensor, k: Tensor) -> Tensor:
        """The network's gradient surrogate at time ``t`` (steps since the anchor), shape ``(c,)``."""
        ctx, cfg = self.ctx, self.field.config
        direction = ctx.dynamics.direction(state, ctx.g_scale, k) if state else torch.zeros_like(w)
        tau = t / ctx.interval
        feat = dynamic_features(tau / cfg.span, direction, lr / self.lr0, (w - ctx.w0) / self.reach)
        return self.field(self.embedded, feat, ctx.g0_norm) * ctx.g_scale

    def __call__(self, t: Tensor, x: Tensor) -> Tensor:
        """``dx/dt`` per optimizer step, shape like ``x``."""
        w, state = self.split(x)
        lr, k = self.lr(t), self.k0 + t
        g = self.g if self.constant else self.surrogate(t, w, state, lr, k)
        dw, dstate = self.ctx.dynamics.velocity(w, state, g, lr, k, noise=self.ctx.noise)
        return torch.cat([dw, *(dstate[n] for n in self.names)])


@dataclass
class ForecastPath:
    """Weights (and optimizer state) forecast at several horizons from the latest snapshot.

    Attributes:
        horizons: optimizer steps ahead of the anchor; ``horizons[0] == 0`` is the anchor itself.
        weights: shape ``(H + 1, P)``.
        state: optimizer state by name, each ``(H + 1, P)``.
        seconds: wall-clock spent integrating.
    """

    horizons: list[int]
    weights: Tensor
    state: dict[str, Tensor]
    seconds: float

    def finite(self) -> Tensor:
        """Whether each point (weights and state) is finite, shape ``(H + 1,)``."""
        ok = torch.isfinite(self.weights).all(dim=1)
        for v in self.state.values():
            ok &= torch.isfinite(v).all(dim=1)
        return ok


@torch.no_grad()
def forecast(
    field: GradientField,
    win: Window,
    dyn: Dynamics,
    lr_steps: Tensor,
    horizons: list[int],
    *,
    solver: str = "rk4",
    chunk_size: int = 1 << 20,
    device=None,
    out_device=None,
    index: Tensor | None = None,
) -> ForecastPath:
    """Integrate the field from the window's last snapshot to each horizon.

    The field acts on each scalar separately (shared weights, per-scalar inputs), so the system splits exactly
    into independent chunks of ``chunk_size`` scalars: peak working memory is bounded by the chunk, not the
    model.

    Args:
        field: the fitted network.
        win: the recorded window (its last snapshot is the anchor).
        dyn: dynamics over all scalars.
        lr_steps: learning rate of each group for the next steps, shape ``(n + 1, G)``, row ``s`` used by the
            ``s``-th next step (:func:`lightning_gfm.dynamics.lr_by_step`); rows past the end repeat the last.
        horizons: positive increasing step counts.
        solver: fixed-step torchdyn solver name.
        chunk_size: scalars integrated at once.
        device: where to integrate (the model's device).
        out_device: where the path is stored (defaults to ``device``).
        index: forecast only these scalars (shape ``(B,)``); the path then has ``B`` columns.

    Returns:
        The :class:`ForecastPath`, horizon 0 included.
    """
    start = time.perf_counter()
    out_device = device if out_device is None else out_device
    anchor = win.K - 1
    history = field.config.history
    n_h = len(horizons) + 1
    index = torch.arange(win.P) if index is None else index.cpu()
    n_out = index.numel()
    weights = torch.empty(n_h, n_out, device=out_device)
    state = {n: torch.empty(n_h, n_out, device=out_device) for n in win.state}
    lr_tab = lr_steps.to(device=device, dtype=torch.float32)
    names = list(win.state)
    times = torch.tensor(horizons, dtype=torch.float64)
    if torch.device(device or "cpu").type == "cpu":
        chunk_size = min(chunk_size, CPU_CHUNK)
    for lo in range(0, n_out, chunk_size):
        idx = index[lo : lo + chunk_size]
        ctx = anchor_context(
            win, dyn, anchor, idx, history, device=device, anchor_mode=field.config.anchor, trend=field.config.trend
        )
        group = win.group_index[idx.to(win.group_index.device)].to(device)
        system = _ChunkSystem(field, ctx, names, lr_tab, group)
        x0 = torch.cat([ctx.w0, *(ctx.state0[n] for n in names)])
        traj = integrate(system, x0, times, ctx.dynamics.max_step, solver)
        c = idx.numel()
        traj = traj.view(n_h, 1 + len(names), c).to(out_device)
        weights[:, lo : lo + c] = traj[:, 0]
        for k, n in enumerate(names, start=1):
            state[n][:, lo : lo + c] = traj[:, k]
    return ForecastPath([0, *horizons], weights, state, time.perf_counter() - start)


def backtest_error(
    field: GradientField,
    win: Window,
    dyn: Dynamics,
    lag: int,
    solver: str = "rk4",
    device=None,
    max_scalars: int | None = 1 << 14,
    seed: int = 0,
    index_range: tuple[int, int] | None = None,
    reduce: Callable[[Tensor], Tensor] | None = None,
) -> float:
    """Relative error of forecasting the last snapshot from the one ``lag`` snapshots earlier.

    ``||w_hat - w_K|| / ||w_K - w_{K-lag}||``: 1.0 is no better than standing still. It tells whether a freshly
    fitted field beats its prior on the run's own recent past before it is trusted with the future.

    Args:
        field: the field to test.
        win: the full window; its first ``K - lag`` snapshots are the past seen by the forecast.
        dyn: dynamics over all scalars.
        lag: snapshots between the backtest's anchor and the last one.
        solver: fixed-step solver name.
        device: where to integrate.
        max_scalars: estimate on a fixed random subset of this many scalars (the system separates per scalar,
            so a subset gives an unbiased, much cheaper estimate); ``None`` uses all.
        seed: seeds the subset.
        index_range: forecast only the (subset's) scalars in ``[lo, hi)``: this rank's share under DDP.
        reduce: sums ``[squared error, squared move]`` (float64, shape ``(2,)``) over the ranks' shares
            (:meth:`lightning_gfm.distributed.Shard.reduce`), so every rank gets the error of the whole subset.
    """
    past = win.head(win.K - lag)
    if field.config.min_anchor > past.K - 1:
        return float("nan")
    horizon = int(win.steps[-1] - past.steps[-1])
    index = None
    if max_scalars is not None and max_scalars < win.P:
        gen = torch.Generator().manual_seed(seed)
        index = torch.randperm(win.P, generator=gen)[:max_scalars].sort().values
    if index_range is not None:
        lo, hi = index_range
        index = torch.arange(lo, hi) if index is None else index[(index >= lo) & (index < hi)]
    lr_steps = win.recorded_lr_steps(past.K - 1)
    path = forecast(field, past, dyn, lr_steps, [horizon], solver=solver, device=device, index=index)
    truth, start = win.w[-1], past.w[-1]
    if index is not None:
        truth, start = truth[index], start[index]
    truth, start = truth.to(path.weights.device), start.to(path.weights.device)
    if reduce is not None:
        sq = reduce(
            torch.stack([(path.weights[1] - truth).double().square().sum(), (truth - start).double().square().sum()])
        )
        return float(sq[0].sqrt() / sq[1].sqrt().clamp_min(1e-30))
    return float((path.weights[1] - truth).norm() / (truth - start).norm().clamp_min(1e-30))
