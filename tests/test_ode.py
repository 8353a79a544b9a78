"""The fixed-step solvers of ``flow/ode.py`` against closed forms."""

import math

import pytest
import torch

from lightning_gfm.flow.ode import integrate


def _cos_error(max_step: float) -> float:
    """Error at ``t = 2`` of ``dx/dt = cos(t)``, ``x(0) = 0`` (exact: ``sin(2)``), float64 ``rk4``."""
    x0 = torch.zeros(1, dtype=torch.float64)
    traj = integrate(lambda t, x: torch.cos(t).expand_as(x), x0, torch.tensor([2.0]), max_step, "rk4")
    return abs(float(traj[-1, 0]) - math.sin(2.0))


def test_rk4_is_fourth_order_for_time_dependent_fields():
    # a right-hand side that depends on t only: the stage times alone decide the order
    errors = [_cos_error(h) for h in (0.5, 0.25, 0.125)]
    ratios = [a / b for a, b in zip(errors[:-1], errors[1:], strict=False)]
    for r in ratios:
        assert r == pytest.approx(16.0, rel=0.1), (errors, ratios)
    assert errors[-1] < 1e-6


def test_rk4_exact_for_cubic_in_time():
    # Simpson's rule (what rk4 reduces to for f(t)) integrates cubics exactly
    x0 = torch.zeros(1, dtype=torch.float64)
    traj = integrate(lambda t, x: (3 * t**2 - t**3).expand_as(x), x0, torch.tensor([1.0, 3.0]), 0.5, "rk4")
    exact = torch.tensor([1.0 - 1 / 4, 27.0 - 81 / 4], dtype=torch.float64)
    torch.testing.assert_close(traj[1:, 0], exact, rtol=0, atol=1e-12)
