"""Forecast the weights along the fitted optimizer-aware field: dynamics + field + torchdyn."""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from torch import Tensor

from lightning_gfm.dynamics import Dynamics
from lightning_gfm.flow.field import GradientField
from lightning_gfm.flow.ode import integrate
from lightning_gfm.flow.window import Window, anchor_context, field_velocity


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
    last_row = lr_tab.shape[0] - 1
    names = list(win.state)
    for lo in range(0, n_out, chunk_size):
        idx = index[lo : lo + chunk_size]
        ctx = anchor_context(win, dyn, anchor, idx, history, device=device, anchor_mode=field.config.anchor)
        emb = field.embed(ctx.static)
        group = win.group_index[idx.to(win.group_index.device)].to(device)
        c = idx.numel()

        def f(t: Tensor, x: Tensor, ctx=ctx, emb=emb, group=group, c=c) -> Tensor:
            parts = x.view(1 + len(names), c)
            st = dict(zip(names, parts[1:], strict=False))
            lr = lr_tab[min(int(t.floor()), last_row)][group]
            dw, dst = field_velocity(field, ctx, emb, t / win.interval, parts[0], st, lr, ctx.k0 + t)
            return torch.cat([dw, *(dst[n] for n in names)])

        x0 = torch.cat([ctx.w0, *(ctx.state0[n] for n in names)])
        traj = integrate(f, x0, torch.tensor(horizons, dtype=torch.float64), ctx.dynamics.max_step, solver)
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
    """
    past = win.head(win.K - lag)
    if field.config.history > past.K - 1:
        return float("nan")
    horizon = int(win.steps[-1] - past.steps[-1])
    index = None
    if max_scalars is not None and max_scalars < win.P:
        gen = torch.Generator().manual_seed(seed)
        index = torch.randperm(win.P, generator=gen)[:max_scalars].sort().values
    lr_steps = win.recorded_lr_steps(past.K - 1)
    path = forecast(field, past, dyn, lr_steps, [horizon], solver=solver, device=device, index=index)
    truth, start = win.w[-1], past.w[-1]
    if index is not None:
        truth, start = truth[index], start[index]
    truth, start = truth.to(path.weights.device), start.to(path.weights.device)
    return float((path.weights[1] - truth).norm() / (truth - start).norm().clamp_min(1e-30))
