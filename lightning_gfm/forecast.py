"""Forecast the weights along the fitted optimizer-aware field: dynamics + field + torchdyn."""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch
from torch import Tensor

from lightning_gfm.dynamics import Dynamics, HeldGradient, LinearHeld
from lightning_gfm.flow.field import GradientField, dynamic_features
from lightning_gfm.flow.ode import LinearStep, held_steps, integrate
from lightning_gfm.flow.window import Context, Window, anchor_context

#: On a CPU, chunks are cut to at most this many scalars: the network's hidden activations (``hidden`` floats per
#: scalar) then stay in the core's cache, which makes a fitted field's forecast about 1.7x faster than 1M-scalar chunks.
CPU_CHUNK = 1 << 16
#: On a CPU, chunks of a forecast computed in closed form (:func:`_held_path`: no network) are at most this many
#: scalars: ATen's grain size, below which an elementwise op runs on the calling thread only; with several
#: intra-op threads the chunks are spread over as many Python threads instead (see :func:`forecast`).
HELD_CHUNK = 1 << 15


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


def _held_context(
    field: GradientField, win: Window, dyn: Dynamics, anchor: int, idx: Tensor | slice, device=None
) -> tuple[HeldGradient | None, Tensor, dict[str, Tensor], float]:
    """What the closed form of a constant field needs at the anchor for scalars ``idx``.

    :func:`~lightning_gfm.flow.window.anchor_context` without the network's static features (the larger part of
    its cost, unused when the output is constant).

    Returns:
        ``(held, w0, state0, k0)``: :meth:`Dynamics.held_gradient` of the surrogate ``constant_output * g_scale``
        (``None`` when the dynamics have no closed form), the anchor's weights and state, its step counter.
    """
    cfg = field.config
    if isinstance(idx, slice):
        idx = torch.arange(idx.start, idx.stop)
    ctx = anchor_context(win, dyn, anchor, idx, cfg.history, device, cfg.anchor, cfg.trend, features=False)
    surrogate = field.constant_output(ctx.g0_norm) * ctx.g_scale
    held = ctx.dynamics.held_gradient(ctx.state0, surrogate, ctx.noise)
    return held, ctx.w0, ctx.state0, float(win.opt_steps[anchor])


#: The closed form's grid holds a point wherever the learning rate has moved by more than this share of its
#: largest value ahead since the last point (a schedule's steps, a warm-up, a cosine's descent).
LR_MOVE = 0.05


def _held_steps(held: HeldGradient, names: list[str], lr_tab: Tensor, times: Tensor, max_step: float, cache: dict):
    """The quadrature steps of a :class:`HeldGradient` system (:func:`held_steps`), shared by all chunks."""
    rates = tuple(held.rates[n] for n in names)
    key = (rates, held.decay)
    if key not in cache:
        horizons = times.tolist()
        lrs = lr_tab[: math.ceil(horizons[-1]) + 1, 0].tolist()

        def lr(t: float) -> float:
            return lrs[min(math.floor(t), len(lrs) - 1)]

        top = max(abs(x) for x in lrs)
        breaks, ref = [], lrs[0]
        for s, x in enumerate(lrs):
            if abs(x - ref) > LR_MOVE * top:
                breaks.append(float(s))
                ref = x
        cache[key] = held_steps(
            horizons,
            max_step / 8,  # the fastest state relaxes in max_step: its transient in 8 steps, then wider ones
            rates,
            lambda t: -lr(t) * held.decay,
            lambda t: -lr(t),
            breaks=breaks,
            max_a=top * abs(held.decay),
        )
    return cache[key]


def _linear_plan(held: LinearHeld, lr_tab: Tensor, times: Tensor, cache: dict) -> Tensor:
    """The propagators of a :class:`LinearHeld` system from the anchor to each horizon, shape ``(H, 3, 3)`` (float64).

    The learning rate is constant on each interval ``[s, s + 1)`` of the schedule (row ``s`` of ``lr_tab``), so
    the solution is exact: one matrix exponential per run of equal rates, multiplied in order. Shared by all chunks.
    """
    key = ("linear", held.mu, held.damp, held.nesterov, held.wd)
    if key not in cache:
        horizons = times.tolist()
        lrs = lr_tab[: math.ceil(horizons[-1]) + 1, 0].tolist()
        changes = (float(s) for s in range(1, min(len(lrs), math.ceil(horizons[-1]))) if lrs[s] != lrs[s - 1])
        cuts = sorted({*horizons, *changes})  # rows past the table's end repeat its last
        spans, t = [], 0.0
        for cut in cuts:
            spans.append((lrs[min(math.floor(t), len(lrs) - 1)], cut - t))
            t = cut
        gens = torch.tensor([held.generator(lr) for lr, _ in spans], dtype=torch.float64)
        lengths = torch.tensor([dt for _, dt in spans], dtype=torch.float64)
        steps = torch.linalg.matrix_exp(gens * lengths[:, None, None])
        phi, out, saves = torch.eye(3, dtype=torch.float64), [], set(horizons)
        for cut, step in zip(cuts, steps, strict=True):
            phi = step @ phi
            if cut in saves:
                out.append(phi)
        cache[key] = torch.stack(out)
    return cache[key]


def _linear_path(
    held: LinearHeld,
    w0: Tensor,
    plan: Tensor,
    weights: Tensor,
    state: dict[str, Tensor],
    cols: slice,
) -> None:
    """The forecast of a :class:`LinearHeld` system, written into ``weights[:, cols]`` and ``state``.

    With ``z = (w, b, g)`` at the anchor and ``Phi`` a horizon's propagator: ``w = w0 + (Phi_00 - 1) w0 + Phi_01 b0
    + Phi_02 g`` (the displacement formed first: float32 rounding relative to the move, not to the weights) and
    ``b = Phi_10 w0 + Phi_11 b0 + Phi_12 g``.
    """
    b0, gp, name = held.state0, held.gp, held.name
    weights[0, cols] = w0
    state[name][0, cols] = b0
    for h, phi in enumerate(plan.tolist(), start=1):
        move = torch.mul(w0, phi[0][0] - 1.0).add_(b0, alpha=phi[0][1]).add_(gp, alpha=phi[0][2])
        weights[h, cols] = move.add_(w0)
        state[name][h, cols] = torch.mul(w0, phi[1][0]).add_(b0, alpha=phi[1][1]).add_(gp, alpha=phi[1][2])


def _held_path(
    held: HeldGradient,
    names: list[str],
    w0: Tensor,
    state0: dict[str, Tensor],
    k0: float,
    steps: list[LinearStep],
    weights: Tensor,
    state: dict[str, Tensor],
    cols: slice,
) -> None:
    """The forecast of a :class:`HeldGradient` system in closed form, written into ``weights[:, cols]`` and ``state``.

    The optimizer states are never integrated (each is ``target + c dev`` with a scalar ``c``: they relax
    exactly) and the weights are one accumulator, advanced by the quadrature of :func:`held_steps`: a few passes
    over memory per stage instead of the full vector field, its state concatenation and a solver's combinations,
    and steps that widen with the time ahead instead of the explicit integrator's ``max_step``. The weights'
    displacement is accumulated stage by stage and added to ``w0`` at each saved time: float32 rounding relative
    to the move rather than to the weights.
    """
    # the displacement from w0, not w: its rounding is relative to the move, not to the weights
    acc = torch.zeros_like(w0)
    weights[0, cols] = w0
    for n in names:
        state[n][0, cols] = state0[n]
    h = 1
    for st in steps:
        if st.keep != 1.0:  # w -> keep * w: the displacement d -> keep * d + (keep - 1) * w0
            acc.mul_(st.keep).add_(w0, alpha=st.keep - 1.0)
        for j in range(len(st.times)):
            coef = {n: st.coefs[j][r] for r, n in enumerate(names)}
            held.add_update(acc, coef, k0 + st.times[j], st.gains[j])
        if st.save:
            if weights.device == acc.device:
                torch.add(w0, acc, out=weights[h, cols])
            else:
                weights[h, cols] = w0 + acc
            for n, c in zip(names, st.end, strict=True):
                if state[n].device == acc.device:
                    torch.add(held.targets[n], held.devs[n], alpha=c, out=state[n][h, cols])
                else:
                    state[n][h, cols] = torch.add(held.targets[n], held.devs[n], alpha=c)
            h += 1


@dataclass
class ForecastPath:
    """Weights (and optimizer state) forecast at several horizons from the latest snapshot.

    Attributes:
        horizons: optimizer steps ahead of the anchor; ``horizons[0] == 0`` is the anchor itself.
        weights: shape ``(H + 1, P)``.
        state: optimizer state by name, each ``(H + 1, P)``.
        seconds: wall-clock spent integrating.
        branches: when several forecasts were joined (:meth:`join`), the label of each point's own (e.g. its
            trend length; point 0, the shared start, carries the first's); empty for a single forecast.
        state_steps: optimizer steps each point's ``state`` is ahead of the anchor (a jump to the point advances
            the optimizer's step counter by as much, :meth:`state_ahead`); empty means ``horizons``, where the
            forecast carried the state.
    """

    horizons: list[int]
    weights: Tensor
    state: dict[str, Tensor]
    seconds: float
    branches: list[int] = dataclasses.field(default_factory=list)
    state_steps: list[int] = dataclasses.field(default_factory=list)

    def state_ahead(self, k: int) -> int:
        """Optimizer steps point ``k``'s state is ahead of the anchor: 0 where the path carries no state."""
        if not self.state:
            return 0
        return self.state_steps[k] if self.state_steps else self.horizons[k]

    def finite(self) -> Tensor:
        """Whether each point (weights and state) is finite, shape ``(H + 1,)``."""
        rows = [self.weights, *self.state.values()]
        # row by row, so that the check costs one point's booleans, not the whole path's
        return torch.tensor([all(bool(torch.isfinite(t[h]).all()) for t in rows) for h in range(len(self.horizons))])

    def start_at_(self, w: Tensor) -> ForecastPath:
        """Move the path, in place, to start at ``w`` (shape ``(P,)``): each point keeps its displacement.

        A path from a denoised start (``anchor="trend"``) then begins at the current weights: its points differ
        from them only by the forecast's move, not by denoising, which training would undo (docs/experiments.md,
        E7-E8, E34), and paths from different starts compare on equal terms. ``weights[0]`` becomes ``w``
        exactly. In place, so that a model-sized path is not copied.

        Returns:
            This path.
        """
        chunk = 1 << 20  # a chunk at a time: no model-sized copy of the start or of ``w`` (e.g. bfloat16)
        for lo in range(0, self.weights.shape[1], chunk):
            rows = self.weights[:, lo : lo + chunk]
            rows.sub_(rows[0].clone()).add_(w[lo : lo + chunk].to(rows))
        return self

    @staticmethod
    def join(paths: list[ForecastPath], labels: list[int]) -> ForecastPath:
        """One path holding every point of ``paths``, which share their start (point 0 is the first's).

        The points are copied into new tensors: while it runs, the inputs and the result coexist (twice the
        memory of the result; :func:`~lightning_gfm.memory.plan_memory` counts it so).

        Args:
            paths: forecasts from the same start.
            labels: one per path (e.g. its trend length); ``branches`` then names each point's path.
        """
        first = paths[0]
        return ForecastPath(
            [h for k, p in enumerate(paths) for h in p.horizons[min(k, 1) :]],
            torch.cat([p.weights[min(k, 1) :] for k, p in enumerate(paths)]),
            {n: torch.cat([p.state[n][min(k, 1) :] for k, p in enumerate(paths)]) for n in first.state},
            sum(p.seconds for p in paths),
            [label for k, (p, label) in enumerate(zip(paths, labels, strict=True)) for _ in p.horizons[min(k, 1) :]],
            [p.state_ahead(i) for k, p in enumerate(paths) for i in range(min(k, 1), len(p.horizons))],
        )

    def branch(self, k: int | None) -> ForecastPath:
        """The start and the points of the path that point ``k`` came from.

        The first path's when ``k`` is 0 or ``None``; the whole path when it holds one.
        """
        if not self.branches:
            return self
        label = self.branches[k or 0]
        keep = [0] + [i for i in range(1, len(self.horizons)) if self.branches[i] == label]
        return ForecastPath(
            [self.horizons[i] for i in keep],
            self.weights[keep],
            {n: v[keep] for n, v in self.state.items()},
            self.seconds,
            [label] * len(keep),
            [self.state_ahead(i) for i in keep],
        )


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
    closed_form: bool = True,
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
        closed_form: where the field's output is constant (the untrained prior) and the optimizer's states then
            relax linearly (:meth:`Dynamics.held_gradient`), compute the forecast in closed form
            (:func:`_held_path`: the states exact, the weights' integral on a widening grid; within about 1e-3
            of the move of a fine integration, and many times cheaper; SGD momentum with coupled weight decay,
            a linear system of weights and buffer, exactly: :func:`_linear_path`); ``False`` always integrates
            the full system with torchdyn.

    Returns:
        The :class:`ForecastPath`, horizon 0 included.
    """
    start = time.perf_counter()
    out_device = device if out_device is None else out_device
    anchor = win.K - 1
    history = field.config.history
    n_h = len(horizons) + 1
    whole, index = index is None, None if index is None else index.cpu()
    n_out = win.P if whole else index.numel()
    weights = torch.empty(n_h, n_out, device=out_device)
    state = {n: torch.empty(n_h, n_out, device=out_device) for n in win.state}
    lr_tab = lr_steps.to(device=device, dtype=torch.float32)
    names = list(win.state)
    times = torch.tensor(horizons, dtype=torch.float64)
    shared_lr = bool((lr_tab == lr_tab[:, :1]).all())
    held_ok = closed_form and solver == "rk4" and shared_lr and field.constant
    if held_ok and anchor < field.config.min_anchor:
        held_ok = False  # anchor_context raises the error
    cpu = torch.device(device or "cpu").type == "cpu"
    if cpu:
        chunk_size = min(chunk_size, HELD_CHUNK if held_ok else CPU_CHUNK)
    plans: dict = {}

    def held_chunk(lo: int) -> bool:
        """Forecast the chunk at ``lo`` in closed form; ``False`` (nothing written) when there is none."""
        hi = min(lo + chunk_size, n_out)
        with torch.no_grad():  # grad mode is per thread: the pool's threads do not inherit the caller's
            cols = slice(lo, hi) if whole else index[lo:hi]
            held, w0, state0, k0 = _held_context(field, win, dyn, anchor, cols, device)
            if held is None or set(held.rates) != set(names):
                return False
            if isinstance(held, LinearHeld):
                _linear_path(held, w0, _linear_plan(held, lr_tab, times, plans), weights, state, slice(lo, hi))
                return True
            steps = _held_steps(held, names, lr_tab, times, dyn.max_step, plans)
            _held_path(held, names, w0, state0, k0, steps, weights, state, slice(lo, hi))
        return True

    first = 0
    if held_ok and n_out and held_chunk(0):  # the first chunk decides for all (the groups share hyperparameters)
        rest = range(chunk_size, n_out, chunk_size)
        workers = min(torch.get_num_threads() if cpu else 1, len(rest))
        if workers > 1:
            # chunks of at most ATen's grain size run each op on one thread: spread the chunks over the threads
            # instead, which does not stall on every op's barrier when another process holds a core
            with ThreadPoolExecutor(workers) as pool:
                done = list(pool.map(held_chunk, rest))
        else:
            done = [held_chunk(lo) for lo in rest]
        if not all(done):
            raise RuntimeError("The closed-form forecast applied to some chunks only.")
        first = n_out
    features = not field.constant  # a constant field reads no network features
    for lo in range(first, n_out, chunk_size):
        hi = min(lo + chunk_size, n_out)
        c = hi - lo
        idx = torch.arange(lo, hi) if whole else index[lo:hi]
        ctx = anchor_context(
            win,
            dyn,
            anchor,
            idx,
            history,
            device=device,
            anchor_mode=field.config.anchor,
            trend=field.config.trend,
            features=features,
        )
        group = win.group_index[idx.to(win.group_index.device)].to(device)
        system = _ChunkSystem(field, ctx, names, lr_tab, group)
        x0 = torch.cat([ctx.w0, *(ctx.state0[n] for n in names)])
        traj = integrate(system, x0, times, ctx.dynamics.max_step, solver)
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
            (:meth:`lightning_gfm.distributed.Shard.sum`), so every rank gets the error of the whole subset.
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
