"""Integration with torchdyn. The only module of the package that imports torchdyn, and only when called.

torchdyn's functional ``odeint`` is used, never ``NeuralODE`` (which subclasses the legacy
``pytorch_lightning.LightningModule`` and must not be attached to a user's model).
"""

from __future__ import annotations

import contextlib
import functools
import io
import math
from collections.abc import Callable

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
