"""Forecast quality as torchmetrics: relative error and direction cosine, each with a functional twin.

A forecast starts at the anchor weights ``start``, predicts ``preds`` and the run really reaches ``target``. Both
metrics treat every scalar seen (across ``update`` calls and, under DDP, across ranks) as one long vector, so
feeding a parameter vector in chunks, or splitting it over ranks, gives exactly the whole-vector value. Their
states are sums, reduced across ranks with ``"sum"``.

* relative error ``||preds - target|| / ||target - start||``: 0 is perfect, 1.0 is no better than standing still.
* direction cosine ``<preds - start, target - start> / (||preds - start|| ||target - start||)``: 1 is the right
  direction, 0 orthogonal, -1 backwards.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torchmetrics import Metric

__all__ = [
    "ForecastDirectionCosine",
    "ForecastRelativeError",
    "forecast_direction_cosine",
    "forecast_relative_error",
]

_EPS = 1e-30


def _check(preds: Tensor, target: Tensor, start: Tensor) -> None:
    if preds.shape != target.shape or preds.shape != start.shape:
        raise ValueError(
            "`preds`, `target` and `start` must have the same shape, got "
            f"{tuple(preds.shape)}, {tuple(target.shape)} and {tuple(start.shape)}."
        )


def _relative_error_update(preds: Tensor, target: Tensor, start: Tensor) -> tuple[Tensor, Tensor]:
    """Sums of squared forecast error and squared real displacement (float64 scalars)."""
    _check(preds, target, start)
    target = target.double()
    err = (preds.double() - target).pow(2).sum()
    disp = (target - start.double()).pow(2).sum()
    return err, disp


def _relative_error_compute(sq_error: Tensor, sq_displacement: Tensor) -> Tensor:
    return (sq_error / sq_displacement.clamp_min(_EPS)).sqrt().float()


def _direction_cosine_update(preds: Tensor, target: Tensor, start: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Sums of ``<a, b>``, ``|a|^2`` and ``|b|^2`` for ``a = preds - start``, ``b = target - start``."""
    _check(preds, target, start)
    start = start.double()
    a, b = preds.double() - start, target.double() - start
    return (a * b).sum(), a.pow(2).sum(), b.pow(2).sum()


def _direction_cosine_compute(dot: Tensor, sq_forecast: Tensor, sq_real: Tensor) -> Tensor:
    return (dot / (sq_forecast * sq_real).sqrt().clamp_min(_EPS)).float()


def forecast_relative_error(preds: Tensor, target: Tensor, start: Tensor) -> Tensor:
    """Relative error of a forecast: ``||preds - target|| / ||target - start||`` over all elements.

    Args:
        preds: forecast weights, any shape ``(...)``.
        target: weights the run really reached, same shape.
        start: weights the forecast started from, same shape.

    Returns:
        A 0-dim float tensor; 1.0 means no better than standing still at ``start``.

    Example:
        >>> forecast_relative_error(torch.tensor([1.0, 1.0]), torch.tensor([2.0, 0.0]), torch.zeros(2))
        tensor(0.7071)
    """
    return _relative_error_compute(*_relative_error_update(preds, target, start))


def forecast_direction_cosine(preds: Tensor, target: Tensor, start: Tensor) -> Tensor:
    """Cosine between the forecast update ``preds - start`` and the real one ``target - start``.

    Args:
        preds: forecast weights, any shape ``(...)``.
        target: weights the run really reached, same shape.
        start: weights the forecast started from, same shape.

    Returns:
        A 0-dim float tensor in ``[-1, 1]`` (0 when either update is zero).

    Example:
        >>> forecast_direction_cosine(torch.tensor([1.0, 1.0]), torch.tensor([2.0, 0.0]), torch.zeros(2))
        tensor(0.7071)
    """
    return _direction_cosine_compute(*_direction_cosine_update(preds, target, start))


class ForecastRelativeError(Metric):
    """Accumulated :func:`forecast_relative_error`: ``sqrt(sum |preds - target|^2 / sum |target - start|^2)``.

    Example:
        >>> metric = ForecastRelativeError()
        >>> metric.update(torch.tensor([1.0]), torch.tensor([2.0]), torch.tensor([0.0]))
        >>> metric.update(torch.tensor([1.0]), torch.tensor([0.0]), torch.tensor([0.0]))
        >>> metric.compute()
        tensor(0.7071)
    """

    is_differentiable = True
    higher_is_better = False
    full_state_update = False

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.add_state("sq_error", torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("sq_displacement", torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, preds: Tensor, target: Tensor, start: Tensor) -> None:
        """Add forecast ``preds``, reached ``target`` and anchor ``start``, all of one shape ``(...)``."""
        err, disp = _relative_error_update(preds, target, start)
        self.sq_error += err.to(self.sq_error.device)
        self.sq_displacement += disp.to(self.sq_displacement.device)

    def compute(self) -> Tensor:
        """The relative error over everything seen, a 0-dim tensor."""
        return _relative_error_compute(self.sq_error, self.sq_displacement)


class ForecastDirectionCosine(Metric):
    """Accumulated :func:`forecast_direction_cosine` over everything seen, as one vector.

    Example:
        >>> metric = ForecastDirectionCosine()
        >>> metric.update(torch.tensor([1.0, 1.0]), torch.tensor([2.0, 0.0]), torch.zeros(2))
        >>> metric.compute()
        tensor(0.7071)
    """

    is_differentiable = True
    higher_is_better = True
    full_state_update = False

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        for name in ("dot", "sq_forecast", "sq_real"):
            self.add_state(name, torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, preds: Tensor, target: Tensor, start: Tensor) -> None:
        """Add forecast ``preds``, reached ``target`` and anchor ``start``, all of one shape ``(...)``."""
        dot, sq_a, sq_b = _direction_cosine_update(preds, target, start)
        self.dot += dot.to(self.dot.device)
        self.sq_forecast += sq_a.to(self.sq_forecast.device)
        self.sq_real += sq_b.to(self.sq_real.device)

    def compute(self) -> Tensor:
        """The direction cosine over everything seen, a 0-dim tensor."""
        return _direction_cosine_compute(self.dot, self.sq_forecast, self.sq_real)
