"""Conditional flow matching on the recorded window.

A training sample is a scalar ``i``, an anchor ``a``, a segment ``j`` (``a <= j < a + span``) and a position
``theta ~ U(0, 1)`` on it. The path between snapshots ``j`` and ``j + 1`` is the straight line, so the sample
sits at ``x = (1 - theta) w_j + theta w_{j+1}`` with optimizer state interpolated alike, and its target is
the segment's finite-difference velocity ``u_j``. The field, conditioned on the anchor's context and on
``tau`` (time since the anchor), regresses onto it; errors are measured in units of each scalar's RMS
velocity so that every parameter counts alike.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from lightning_gfm.dynamics import Dynamics
from lightning_gfm.flow.field import GradientField
from lightning_gfm.flow.window import Window, anchor_context, field_velocity


@dataclass
class FitReport:
    """Outcome of one fit.

    Attributes:
        loss_start: matching loss of the field before this fit (on a fixed probe batch).
        loss_end: the same after fitting.
        steps: gradient steps taken.
        seconds: wall-clock spent.
        samples: number of (anchor, segment) pairs the window offers.
    """

    loss_start: float
    loss_end: float
    steps: int
    seconds: float
    samples: int


def anchors_and_segments(win: Window, first: int, span: float) -> Tensor:
    """All valid ``(anchor, segment)`` pairs with anchors from ``first`` on, shape ``(N, 2)`` (possibly ``N == 0``)."""
    pairs = [
        (a, j)
        for a in range(first, win.K - 1)
        for j in range(a, win.K - 1)
        if (win.steps[j] - win.steps[a]) / win.interval < span
    ]
    return torch.tensor(pairs, dtype=torch.long).reshape(-1, 2)


def sample_batch(
    win: Window, pairs: Tensor, batch: int, generator: torch.Generator, index_range: tuple[int, int] | None = None
) -> tuple[Tensor, ...]:
    """Draw ``batch`` samples: scalar index, anchor, segment and position, each shape ``(batch,)``.

    ``index_range = (lo, hi)`` draws the scalars from ``[lo, hi)`` only (a rank's share under DDP).
    """
    if index_range is None:
        i = torch.randint(win.P, (batch,), generator=generator)
    else:
        i = torch.randint(index_range[0], index_range[1], (batch,), generator=generator)
    pick = pairs[torch.randint(len(pairs), (batch,), generator=generator)]
    theta = torch.rand(batch, generator=generator)
    return i, pick[:, 0], pick[:, 1], theta


def matching_loss(
    field: GradientField, win: Window, dyn: Dynamics, sample: tuple[Tensor, ...], history: int, device=None
) -> Tensor:
    """Mean squared error between the field's velocity and the segment velocity, in RMS-velocity units.

    Args:
        field: the network being fitted.
        win: the recorded window.
        dyn: dynamics over all scalars.
        sample: ``(i, a, j, theta)`` from :func:`sample_batch`.
        history: velocities in the static features.
        device: the device to compute on.

    Returns:
        A scalar tensor.
    """
    i, a, j, theta = (t.to(win.w.device) for t in sample)
    c = field.config
    ctx = anchor_context(win, dyn, a, i, history, device=device, anchor_mode=c.anchor, trend=c.trend)
    th = theta.to(device)

    def lerp(v: Tensor) -> Tensor:
        return torch.lerp(v[j, i].to(device), v[j + 1, i].to(device), th)

    x = lerp(win.w)
    state = {n: lerp(v) for n, v in win.state.items()}
    steps = win.steps.to(win.w.device)
    s = steps[j] + theta.double() * (steps[j + 1] - steps[j])
    tau = ((s - steps[a]) / win.interval).float().to(device)
    lr = win.lrs.to(win.w.device)[j, win.group_index[i]].float().to(device)
    opt = win.opt_steps.to(win.w.device)
    k = (opt[j] + theta.double() * (opt[j + 1] - opt[j])).float().to(device)
    pred, _ = field_velocity(field, ctx, field.embed(ctx.static), tau, x, state, lr, k)
    target = win.u[j, i].to(device)
    scale = win.u_rms_tensor[i].to(device)
    return ((pred - target) / scale).pow(2).mean()


def fit_field(
    field: GradientField,
    optimizer: torch.optim.Optimizer,
    win: Window,
    dyn: Dynamics,
    *,
    steps: int,
    batch: int,
    seed: int,
    max_seconds: float | None = None,
    device=None,
    index_range: tuple[int, int] | None = None,
    grad_sync: Callable[[nn.Module, bool], bool] | None = None,
) -> FitReport:
    """Fit ``field`` to the window by flow matching, warm-starting from its current weights.

    Args:
        field: the network (updated in place).
        optimizer: its optimizer (kept across fits, so the warm start includes its moments).
        win: the recorded window.
        dyn: dynamics of the run's optimizer.
        steps: gradient steps.
        batch: scalars per step.
        seed: seeds the sampling, so a fit is a function of (window, field, seed).
        max_seconds: stop early when exceeded.
        device: where to compute (the model's device).
        index_range: draw the scalars from ``[lo, hi)`` only (this rank's share when the fit is sharded).
        grad_sync: called after each backward pass as ``grad_sync(field, stop)``, ``stop`` being this rank's wish
            to stop (its ``max_seconds`` ran out); it must average the gradients over the ranks and return
            whether any rank wants to stop, so that every rank takes the same steps and keeps the same field
            (see :meth:`lightning_gfm.distributed.Shard.grad_sync`). ``None``: a single process.

    Returns:
        A :class:`FitReport`; ``steps == 0`` when the window is too short to offer a sample.
    """
    history, span = field.config.history, field.config.span
    pairs = anchors_and_segments(win, field.config.min_anchor, span)
    if len(pairs) == 0:
        return FitReport(float("nan"), float("nan"), 0, 0.0, 0)
    gen = torch.Generator().manual_seed(seed)
    probe = sample_batch(win, pairs, batch, gen, index_range)
    start = time.perf_counter()
    with torch.no_grad():
        loss_start = float(matching_loss(field, win, dyn, probe, history, device))
    done = 0
    field.train()
    for done in range(1, steps + 1):  # noqa: B007 - `done` is reported
        loss = matching_loss(field, win, dyn, sample_batch(win, pairs, batch, gen, index_range), history, device)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        over = max_seconds is not None and time.perf_counter() - start > max_seconds
        if grad_sync is not None:  # the ranks' time budgets run out at different steps: stop together
            over = grad_sync(field, over)
        torch.nn.utils.clip_grad_norm_(field.parameters(), 1.0)
        optimizer.step()
        if over or (grad_sync is None and max_seconds is not None and time.perf_counter() - start > max_seconds):
            break
    field.eval()
    with torch.no_grad():
        loss_end = float(matching_loss(field, win, dyn, probe, history, device))
    return FitReport(loss_start, loss_end, done, time.perf_counter() - start, len(pairs))
