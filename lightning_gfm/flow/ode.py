"""Integration with torchdyn. The only module of the package that imports torchdyn, and only when called.

torchdyn's functional ``odeint`` is used, never ``NeuralODE`` (which subclasses the legacy
``pytorch_lightning.LightningModule`` and must not be attached to a user's model).
"""

from __future__ import annotations

import contextlib
import functools
import io
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

SOLVERS = ("euler", "midpoint", "rk4")


@functools.cache
def _torchdyn():
    """The ``odeint`` function and ``RungeKutta4`` class of torchdyn, imported on first use."""
    try:
        # torchdyn prints notices at import; keep the user's console clean
        with contextlib.redirect_stdout(io.StringIO()):
            from torchdyn.numerics import odeint
            from torchdyn.numerics.solvers.ode import RungeKutta4
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError(
            "lightning-gfm integrates its forecasts with torchdyn, which is not installed. Install it without "
            "its heavy declared extras: `pip install --no-deps torchdyn==1.0.6 torchsde torchcde scipy attrs`."
        ) from err

    class FusedRungeKutta4(RungeKutta4):
        """torchdyn's ``rk4`` (its tableau) with its vector arithmetic fused and the textbook stage times.

        torchdyn's step spends 24 passes over the state on the stage combinations; this one spends 8, which on a
        state of millions of scalars is most of the cost once the vector field itself is cheap. The stages are
        evaluated at ``t, t + dt/2, t + dt/2, t + dt``: torchdyn 1.0.6 reads its ``c`` one entry early
        (``t, t, t + dt/2, t + dt/2``), which integrates explicitly time-dependent terms (the learning-rate
        schedule, the field's ``tau``) to first order only.
        """

        def step(self, f, x, t, dt, k1=None, args=None):
            half, sixth = dt * 0.5, dt / 6
            if k1 is None:
                k1 = f(t, x)
            k2 = f(t + half, torch.addcmul(x, k1, half))
            k3 = f(t + half, torch.addcmul(x, k2, half))
            k4 = f(t + dt, torch.addcmul(x, k3, dt))
            acc = torch.add(k1, k2, alpha=2).add_(k3, alpha=2).add_(k4)
            return None, torch.addcmul(x, acc, sixth), None

    return odeint, FusedRungeKutta4


def time_grid(horizons: Tensor, max_step: float) -> tuple[Tensor, Tensor]:
    """The solver's time grid: no step longer than ``max_step``, and every horizon on it.

    Args:
        horizons: increasing positive times, shape ``(H,)``.
        max_step: longest allowed solver step.

    Returns:
        ``(grid, knots)``, float64 on the CPU: the grid from 0 to the last horizon, shape ``(N + 1,)``, and
        ``[0, *horizons]``, shape ``(H + 1,)``.
    """
    if horizons.numel() == 0 or bool((horizons <= 0).any()) or bool((horizons[1:] <= horizons[:-1]).any()):
        raise ValueError(f"`horizons` must be positive and increasing, got {horizons.tolist()}.")
    knots = torch.cat([torch.zeros(1, dtype=torch.float64), horizons.double().cpu()])
    pieces = []
    for lo, hi in zip(knots[:-1].tolist(), knots[1:].tolist(), strict=False):
        n = max(1, math.ceil((hi - lo) / max_step))
        pieces.append(torch.linspace(lo, hi, n + 1, dtype=torch.float64)[:-1])
    return torch.cat([*pieces, knots[-1:]]), knots


def integrate(
    f: Callable[[Tensor, Tensor], Tensor],
    x0: Tensor,
    horizons: Tensor,
    max_step: float,
    solver: str,
) -> Tensor:
    """Integrate ``dx/dt = f(t, x)`` from ``t = 0`` and return the state at each horizon.

    The grid is refined so that no step is longer than ``max_step`` (the optimizer's fastest relaxation
    makes the system stiff for explicit solvers beyond that), and every horizon lies on it.

    Args:
        f: vector field ``(t, x) -> dx/dt``, ``t`` a 0-dim tensor.
        x0: initial state, shape ``(D,)``.
        horizons: increasing positive times, shape ``(H,)``.
        max_step: longest allowed solver step.
        solver: one of :data:`SOLVERS` (fixed-step).

    Returns:
        Shape ``(H + 1, D)``: the start followed by the state at each horizon.
    """
    if solver not in SOLVERS:
        raise ValueError(f"`solver` must be one of {SOLVERS}, got {solver!r}.")
    grid, knots = time_grid(horizons, max_step)
    odeint, rk4 = _torchdyn()
    if solver == "rk4":
        solver = rk4(x0.dtype)
    return _solve(odeint, f, x0, grid, knots, solver)


def _solve(odeint, f, x0: Tensor, grid: Tensor, save: Tensor, solver) -> Tensor:
    """One torchdyn call: the state at each time of ``save`` (on ``grid``), shape ``(len(save), D)``."""
    t_span = grid.to(device=x0.device, dtype=x0.dtype)
    save_at = save.to(device=x0.device, dtype=x0.dtype)
    _, traj = odeint(f, x0, t_span, solver=solver, save_at=save_at)
    if traj.shape[0] != len(save):  # torchdyn matches save_at with isclose; a miss must not go unnoticed
        raise RuntimeError(f"torchdyn returned {traj.shape[0]} states for {len(save)} requested times.")
    return traj


@dataclass(frozen=True)
class LinearStep:
    """One step of the weights' quadrature on a system whose states relax linearly (see :func:`held_steps`).

    The system: states ``s_r' = -rate_r (s_r - target_r)`` and weights ``w' = a(t) w + b(t) F(t)``, with ``F`` a
    per-scalar function of the states at ``t``. Each state is ``target_r + c dev_r`` (``dev_r`` its deviation at
    ``t = 0``) with a scalar ``c``, and the step is linear in ``w`` and in ``F`` at its stages.

    Attributes:
        times: time of each stage.
        coefs: ``coefs[j][r]``: the coefficient ``c`` of state ``r`` at stage ``j``.
        keep: ``w`` after the step is ``keep * w + sum_j gains[j] * F_j``.
        gains: see ``keep``.
        end: the coefficient ``c`` of each state at the end of the step.
        save: whether the step ends on a requested time.
    """

    times: tuple[float, ...]
    coefs: tuple[tuple[float, ...], ...]
    keep: float
    gains: tuple[float, ...]
    end: tuple[float, ...]
    save: bool


def widening_grid(
    horizons: Sequence[float], min_step: float, breaks: Sequence[float] = (), cap: float = math.inf
) -> list[float]:
    """A time grid from 0 whose steps grow with the time ahead: ``max(min_step, t / 2)``, at most ``cap``.

    Every horizon and every break (e.g. where the learning rate moves) is a grid point. Far ahead the integrand of
    a forecast changes on the scale of the time already covered (its transients have decayed), so a step of half
    of it is about as accurate there as ``min_step`` is at the start, and the cost grows with the log of the
    horizon instead of the horizon.

    Args:
        horizons: increasing positive times.
        min_step: the step near the start.
        breaks: more times the grid must hold; those past the last horizon are ignored.
        cap: longest step.

    Returns:
        The grid, increasing, from 0 to the last horizon (Python floats).
    """
    if not horizons or min(horizons) <= 0 or any(b <= a for a, b in zip(horizons, horizons[1:], strict=False)):
        raise ValueError(f"`horizons` must be positive and increasing, got {list(horizons)}.")
    end = float(horizons[-1])
    knots = sorted({float(h) for h in horizons} | {float(b) for b in breaks if 0 < b < end})
    grid, t = [0.0], 0.0
    for knot in knots:
        while t < knot:
            h = min(max(min_step, t / 2), cap)
            left = knot - t
            # the last one or two steps before a knot split what is left evenly (no sliver of a step)
            t = knot if left <= h * (1 + 1e-9) else t + left / 2 if left <= 2 * h else t + h
            grid.append(t)
    return grid


def held_steps(
    horizons: Sequence[float],
    min_step: float,
    rates: Sequence[float],
    a: Callable[[float], float],
    b: Callable[[float], float],
    breaks: Sequence[float] = (),
    max_a: float = 0.0,
) -> list[LinearStep]:
    """The steps of the weights' integral on the system of :class:`LinearStep`, as coefficients.

    The states relax exactly, ``c_r(t) = exp(-rate_r t)``, so they set no stability limit on the step; the weights
    are integrated with the classical ``rk4`` tableau (Simpson's rule on the forcing ``b F``), whose two
    mid-step stages then coincide and are one evaluation: three per step. Steps grow with the time ahead
    (:func:`widening_grid`), and are short enough that the weights' own rate ``a`` is integrated to about
    ``(0.2)^5 / 120`` of its effect per step. ``a`` and ``b`` are read just inside a step's end, so that a
    schedule whose value changes at a grid point (a break) gives each step the value of its own interval.
    Scalar Python arithmetic only (float64).

    Args:
        horizons: increasing positive times.
        min_step: the step near the start, a fraction of the fastest state's relaxation time ``1 / max(rates)``
            (the forecast uses an eighth: within about 1e-4 of the move of a fine integration).
        rates: relaxation rate of each state.
        a: ``a(t)`` of the weights' equation (e.g. ``-lr(t) * decay``).
        b: ``b(t)`` of the weights' equation (e.g. ``-lr(t)``).
        breaks: times the grid must hold (where ``a`` or ``b`` jump or move far).
        max_a: the largest ``|a(t)|`` on the way.

    Returns:
        The steps in order; exactly ``len(horizons)`` of them have ``save``.
    """
    cap = 0.2 / max_a if max_a > 0 else math.inf
    grid = widening_grid(horizons, min_step, breaks, cap)
    saves = {float(h) for h in horizons}
    steps: list[LinearStep] = []
    for t, t_next in zip(grid[:-1], grid[1:], strict=True):
        dt = t_next - t
        times = (t, t + dt / 2, t_next)
        coefs = tuple(tuple(math.exp(-rate * tj) for rate in rates) for tj in times)
        # rk4 on w' = a(t) w + b(t) F(t), F known at the stage times: each stage value and slope as
        # (coefficient of w, coefficients of F at the three distinct times)
        slopes = []
        stage_w = (1.0, [0.0, 0.0, 0.0])
        stages = zip((times[0], times[1], times[1], times[2]), (0.0, 0.5, 0.5, 1.0), (0, 1, 1, 2), strict=True)
        for j, (tj, lead, f) in enumerate(stages):
            if j:
                prev = slopes[-1]
                stage_w = (1.0 + lead * dt * prev[0], [lead * dt * q for q in prev[1]])
            inside = min(tj, t_next - 1e-9 * max(1.0, t_next))
            aj, bj = a(inside), b(inside)
            gain = [aj * q for q in stage_w[1]]
            gain[f] += bj
            slopes.append((aj * stage_w[0], gain))
        weights = (dt / 6, dt / 3, dt / 3, dt / 6)
        keep = 1.0 + sum(wt * sl[0] for wt, sl in zip(weights, slopes, strict=True))
        gains = tuple(sum(wt * sl[1][j] for wt, sl in zip(weights, slopes, strict=True)) for j in range(3))
        steps.append(LinearStep(times, coefs, keep, gains, coefs[2], t_next in saves))
    if sum(st.save for st in steps) != len(saves):
        raise RuntimeError(f"The grid ends steps on {sum(st.save for st in steps)} of {len(saves)} requested times.")
    return steps
