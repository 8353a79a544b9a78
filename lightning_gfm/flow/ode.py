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
    """One ``rk4`` step of a system whose states relax linearly and whose weights follow them (see below).

    The system: states ``s_r' = -rate_r (s_r - target_r)`` and weights ``w' = a(t) w + b(t) F(t)``, with ``F`` a
    per-scalar function of the states at ``t``. On it ``rk4`` (the tableau and stage times of
    ``FusedRungeKutta4``) keeps every state at ``target_r + c dev_r`` (``dev_r`` its deviation at ``t = 0``) with a
    scalar ``c``, and its step is linear in ``w`` and in ``F`` at the four stages.

    Attributes:
        times: time of each of the four stages.
        coefs: ``coefs[j][r]``: the coefficient ``c`` of state ``r`` at stage ``j``.
        keep: ``w`` after the step is ``keep * w + sum_j gains[j] * F_j``.
        gains: see ``keep``.
        end: the coefficient ``c`` of each state at the end of the step.
        save: whether the step ends on a requested time.
    """

    times: tuple[float, float, float, float]
    coefs: tuple[tuple[float, ...], ...]
    keep: float
    gains: tuple[float, float, float, float]
    end: tuple[float, ...]
    save: bool


def rk4_linear_steps(
    horizons: Tensor,
    max_step: float,
    rates: Sequence[float],
    a: Callable[[float], float],
    b: Callable[[float], float],
    dtype: torch.dtype = torch.float32,
) -> list[LinearStep]:
    """The steps :func:`integrate` takes with ``"rk4"`` on the system of :class:`LinearStep`, as coefficients.

    Integrating the system with these coefficients is the same computation as :func:`integrate` in ``dtype``
    up to rounding: the same grid, walked as torchdyn walks it in ``dtype``, the same stage times and saved times,
    the states' stage values in closed form. Scalar Python arithmetic only (float64).

    Args:
        horizons: increasing positive times, shape ``(H,)``.
        max_step: longest allowed solver step.
        rates: relaxation rate of each state.
        a: ``a(t)`` of the weights' equation (e.g. ``-lr(t) * decay``).
        b: ``b(t)`` of the weights' equation (e.g. ``-lr(t)``).
        dtype: the dtype :func:`integrate` would step time in (the state's).

    Returns:
        The steps in order; exactly ``H`` of them have ``save``.
    """
    grid, knots = time_grid(horizons, max_step)
    t_span, save_at = grid.to(dtype), knots.to(dtype)
    steps: list[LinearStep] = []
    c = [1.0] * len(rates)
    t, dt = t_span[0], t_span[1] - t_span[0]
    for i in range(1, len(t_span)):
        half, sixth = dt * 0.5, dt / 6  # as FusedRungeKutta4.step computes them, in dtype
        hv, dv, sv = float(half), float(dt), float(sixth)
        times = (float(t), float(t + half), float(t + half), float(t + dt))
        # each state: deviation coefficient at each stage (rk4 on s' = -rate s)
        coefs = []
        for r, rate in enumerate(rates):
            s1 = c[r]
            s2 = s1 - hv * rate * s1
            s3 = s1 - hv * rate * s2
            s4 = s1 - dv * rate * s3
            coefs.append((s1, s2, s3, s4, s1 - sv * rate * (s1 + 2 * s2 + 2 * s3 + s4)))
        # the weights: each stage value and slope as (coefficient of w, coefficients of F_1..F_4)
        stage_w = (1.0, [0.0] * 4)
        slopes = []
        for j, (tj, lead) in enumerate(zip(times, (0.0, hv, hv, dv), strict=True)):
            if j:
                prev = slopes[-1]
                stage_w = (1.0 + lead * prev[0], [lead * q for q in prev[1]])
            aj, bj = a(tj), b(tj)
            gain = [aj * q for q in stage_w[1]]
            gain[j] += bj
            slopes.append((aj * stage_w[0], gain))
        weights = (sv, 2 * sv, 2 * sv, sv)
        keep = 1.0 + sum(wt * sl[0] for wt, sl in zip(weights, slopes, strict=True))
        gains = tuple(sum(wt * sl[1][j] for wt, sl in zip(weights, slopes, strict=True)) for j in range(4))
        c = [row[4] for row in coefs]
        t = t + dt
        save = bool(torch.isclose(t, save_at).any())
        steps.append(
            LinearStep(times, tuple(tuple(row[j] for row in coefs) for j in range(4)), keep, gains, tuple(c), save)
        )
        if i < len(t_span) - 1:
            dt = t_span[i + 1] - t
    if sum(st.save for st in steps) != len(knots) - 1:
        raise RuntimeError(f"rk4 steps end on {sum(st.save for st in steps)} of {len(knots) - 1} requested times.")
    return steps
