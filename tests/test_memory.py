"""plan_memory: the largest window / storage dtype / chunk that fits a byte budget, and clear refusals."""

import pytest
import torch

from lightning_gfm.memory import MemoryPlan, estimate_bytes, plan_memory
from lightning_gfm.trajectory import Snapshot, TrajectoryBuffer

P, S = 1_000_000, 2


def test_generous_budget_keeps_everything():
    plan = plan_memory(P, S, 24, 1 << 40)
    expected = estimate_bytes(P, S, 24, torch.float32, 1 << 20)
    assert plan == MemoryPlan(torch.float32, 24, 1 << 20, expected, budget_bytes=1 << 40, source="memory_budget")


def test_preference_order_fp32_then_bf16_then_smaller_window():
    full32 = estimate_bytes(P, S, 24, torch.float32, 1 << 12)
    full16 = estimate_bytes(P, S, 24, torch.bfloat16, 1 << 12)
    assert full16 < full32
    assert plan_memory(P, S, 24, full32).dtype == torch.float32
    between = plan_memory(P, S, 24, full32 - 1)
    assert (between.window, between.dtype) == (24, torch.bfloat16)
    shrunk = plan_memory(P, S, 24, full16 - 1)
    assert shrunk.dtype == torch.bfloat16 and shrunk.window == 23


@pytest.mark.parametrize("budget_gib", [0.5, 0.7, 1.0, 1.5, 2.0])
def test_plan_fits_and_is_the_largest_window(budget_gib):
    budget = int(budget_gib * 2**30)
    plan = plan_memory(P, S, 24, budget)
    assert plan.estimated_bytes <= budget
    assert 4 <= plan.window <= 24 and (1 << 12) <= plan.chunk_size <= (1 << 20)
    if plan.window < 24:  # one more snapshot would not have fitted, even at the smallest chunk
        assert estimate_bytes(P, S, plan.window + 1, torch.bfloat16, 1 << 12) > budget
    if plan.chunk_size < (1 << 20):  # twice the chunk would not have fitted
        assert estimate_bytes(P, S, plan.window, plan.dtype, plan.chunk_size * 2) > budget


def test_chunk_never_counts_more_than_the_model():
    small = estimate_bytes(1000, 0, 4, torch.float32, 1 << 20)
    assert small == estimate_bytes(1000, 0, 4, torch.float32, 1000)


def test_estimate_covers_a_real_buffer():
    buf = TrajectoryBuffer(4, dtype=torch.bfloat16)
    for step in range(4):
        buf.append(Snapshot(step, torch.zeros(P), {"a": torch.zeros(P), "b": torch.zeros(P)}))
    assert buf.nbytes <= estimate_bytes(P, S, 4, torch.bfloat16, 1)


def test_budget_below_the_minimum_names_argument_rule_and_value():
    floor = estimate_bytes(P, S, 4, torch.bfloat16, 1 << 12)
    with pytest.raises(ValueError, match=rf"`budget_bytes` must be at least {floor} bytes.*min_window = 4.*got 1000"):
        plan_memory(P, S, 24, 1000)
    assert plan_memory(P, S, 24, floor).window == 4


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(n_params=0), "`n_params` must be an int >= 1, got 0"),
        (dict(n_states=-1), "`n_states` must be an int >= 0, got -1"),
        (dict(window=3), "`window` must be an int >= min_window = 4, got 3"),
        (dict(budget_bytes=-5), "`budget_bytes` must be an int >= 0, got -5"),
        (dict(chunk_size=100), "`chunk_size` must be an int >= min_chunk = 4096, got 100"),
        (dict(n_params=1.5), "`n_params` must be an int >= 1, got 1.5"),
    ],
)
def test_bad_arguments(kwargs, match):
    args = dict(n_params=P, n_states=S, window=8, budget_bytes=1 << 30) | kwargs
    with pytest.raises(ValueError, match=match):
        plan_memory(**args)
