"""Integration with torchdyn. The only module of the package that imports torchdyn, and only when called.

torchdyn's functional ``odeint`` is used, never ``NeuralODE`` (which subclasses the legacy
``pytorch_lightning.LightningModule`` and must not be attached to a user's model).
"""

from __future__ import annotations

import contextlib
import io
from collections.abc import Callable

import torch
from torch import Tensor

SOLVERS = ("euler", "midpoint", "rk4")


def _odeint():
    try:
        # torchdyn prints notices at import; keep the user's console clean
        with contextlib.redirect_stdout(io.StringIO()):
            from torchdyn.numerics import odeint
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError(
            "lightning-gfm integrates its forecasts with torchdyn, which is not installed. Install it without "
            "its heavy declared extras: `pip install --no-deps torchdyn==1.0.6 torchsde torchcde scipy attrs`."
        ) from err
    return odeint


def integrate(
    f: Callable[[Tensor, Tensor], Tensor], x0: Tensor, horizons: Tensor, max_step: float, solver: str
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
    if horizons.numel() == 0 or bool((horizons <= 0).any()) or bool((horizons[1:] <= horizons[:-1]).any()):
        raise ValueError(f"`horizons` must be positive and increasing, got {horizons.tolist()}.")
    knots = torch.cat([torch.zeros(1, dtype=torch.float64), horizons.double().cpu()])
    pieces = []
    for lo, hi in zip(knots[:-1], knots[1:], strict=False):
        n = max(1, int(torch.ceil((hi - lo) / max_step)))
        pieces.append(torch.linspace(float(lo), float(hi), n + 1, dtype=torch.float64)[:-1])
    grid = torch.cat([*pieces, knots[-1:]])
    t_span = grid.to(device=x0.device, dtype=x0.dtype)
    save_at = knots.to(device=x0.device, dtype=x0.dtype)
    _, traj = _odeint()(f, x0, t_span, solver=solver, save_at=save_at)
    if traj.shape[0] != len(knots):  # torchdyn matches save_at with isclose; a miss must not go unnoticed
        raise RuntimeError(f"torchdyn returned {traj.shape[0]} states for {len(knots)} requested times.")
    return traj
