"""Forecast-quality metrics: hand-computed values, functional twins, chunking and DDP-style merging."""

import math

import pytest
import torch
from torchmetrics.utilities.data import dim_zero_sum

from lightning_gfm.metrics import (
    ForecastDirectionCosine,
    ForecastRelativeError,
    forecast_direction_cosine,
    forecast_relative_error,
)


def _data(n=1000, seed=0):
    gen = torch.Generator().manual_seed(seed)
    start = torch.randn(n, generator=gen)
    target = start + torch.randn(n, generator=gen)
    preds = start + 0.8 * (target - start) + 0.3 * torch.randn(n, generator=gen)
    return preds, target, start


def test_hand_computed_values():
    start = torch.tensor([0.0, 0.0])
    target = torch.tensor([3.0, 4.0])  # real update of length 5
    preds = torch.tensor([3.0, 0.0])  # error (0, -4): length 4
    assert float(forecast_relative_error(preds, target, start)) == pytest.approx(4 / 5)
    assert float(forecast_direction_cosine(preds, target, start)) == pytest.approx(9 / (3 * 5))
    assert float(forecast_relative_error(start, target, start)) == pytest.approx(1.0)  # standing still
    assert float(forecast_direction_cosine(-target, target, start)) == pytest.approx(-1.0)
    assert float(forecast_direction_cosine(start, target, start)) == 0.0  # no forecast update: defined as 0


@pytest.mark.parametrize(
    ("cls", "fn"),
    [(ForecastRelativeError, forecast_relative_error), (ForecastDirectionCosine, forecast_direction_cosine)],
)
def test_metric_equals_functional_twin_over_chunks(cls, fn):
    preds, target, start = _data()
    metric = cls()
    for chunk in zip(preds.split(137), target.split(137), start.split(137), strict=True):
        metric.update(*chunk)
    assert float(metric.compute()) == pytest.approx(float(fn(preds, target, start)), rel=1e-6)
    metric.reset()
    metric.update(preds.view(10, 100), target.view(10, 100), start.view(10, 100))  # any shape
    assert float(metric.compute()) == pytest.approx(float(fn(preds, target, start)), rel=1e-6)


@pytest.mark.parametrize(
    ("cls", "fn"),
    [(ForecastRelativeError, forecast_relative_error), (ForecastDirectionCosine, forecast_direction_cosine)],
)
def test_states_reduce_by_sum_so_ranks_pool_exactly(cls, fn):
    # Under DDP each rank holds part of the vector; torchmetrics reduces every state with its dist_reduce_fx.
    preds, target, start = _data()
    ranks = [cls(), cls()]
    for rank, part in zip(ranks, (slice(0, 400), slice(400, None)), strict=True):
        rank.update(preds[part], target[part], start[part])
    assert set(ranks[0]._reductions.values()) == {dim_zero_sum}  # what `sync` applies across processes
    synced = cls()
    for name in synced._defaults:
        setattr(synced, name, torch.stack([getattr(r, name) for r in ranks]).sum(0))
    synced._update_count = 1
    assert float(synced.compute()) == pytest.approx(float(fn(preds, target, start)), rel=1e-6)
    ranks[0].merge_state(ranks[1])  # torchmetrics' own pooling agrees
    assert float(ranks[0].compute()) == pytest.approx(float(fn(preds, target, start)), rel=1e-6)


def test_shape_mismatch_is_refused():
    with pytest.raises(ValueError, match=r"same shape, got \(2,\), \(3,\) and \(2,\)"):
        forecast_relative_error(torch.zeros(2), torch.zeros(3), torch.zeros(2))


def test_perfect_forecast():
    preds, target, start = _data()
    assert float(forecast_relative_error(target, target, start)) == 0.0
    assert math.isclose(float(forecast_direction_cosine(target, target, start)), 1.0, rel_tol=1e-6)
