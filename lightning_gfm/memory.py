"""How much memory GFM needs, and the largest configuration that fits a byte budget (a pure function).

GFM's own memory, beyond the model and its optimizer, has four parts, each proportional to the number ``P`` of
tracked scalars (``S`` optimizer states per scalar, e.g. 2 for Adam, ``K`` snapshots):

* the :class:`~lightning_gfm.trajectory.TrajectoryBuffer`: ``K (1 + S) P`` values in the storage dtype;
* the :class:`~lightning_gfm.flow.window.Window` built from it at a jump: float32 weights, states and velocities,
  ``(K (1 + S) + K - 1) P`` values, plus one ``(K, P)`` float32 stack in flight while it is built;
* the forecast path: ``(H + 1) (1 + S) P`` float32 values for ``H`` horizons;
* the forecast's working set per chunk of ``C`` scalars: the network's hidden activations and the solver's
  stages, about ``(3 hidden + 12 (1 + S)) C`` float32 values.

Example:
    >>> plan = plan_memory(n_params=10_000_000, n_states=2, window=24, budget_bytes=12 * 2**30)
    >>> plan.window, plan.dtype, plan.chunk_size
    (24, torch.float32, 1048576)
    >>> plan = plan_memory(n_params=10_000_000, n_states=2, window=24, budget_bytes=3 * 2**30)
    >>> plan.window, plan.dtype, plan.chunk_size
    (10, torch.bfloat16, 131072)
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

#: storage dtypes tried, best first: float32 keeps the recorded path exact, bfloat16 halves the buffer.
DTYPES = (torch.float32, torch.bfloat16)


@dataclass(frozen=True)
class MemoryPlan:
    """A configuration of GFM that fits a byte budget.

    Attributes:
        dtype: storage dtype of the trajectory buffer (``buffer_dtype``).
        window: snapshots kept (``window``).
        chunk_size: scalars integrated at once by the forecast (``chunk_size``).
        estimated_bytes: GFM's peak memory with this plan, by :func:`estimate_bytes`.
    """

    dtype: torch.dtype
    window: int
    chunk_size: int
    estimated_bytes: int


def estimate_bytes(
    n_params: int,
    n_states: int,
    window: int,
    dtype: torch.dtype,
    chunk_size: int,
    *,
    n_horizons: int = 4,
    hidden: int = 16,
) -> int:
    """GFM's peak memory in bytes (buffer, window, forecast path and one chunk's working set; see the module).

    Args:
        n_params: tracked scalars ``P``.
        n_states: optimizer states carried per scalar ``S`` (:attr:`~lightning_gfm.dynamics.Dynamics.state_names`).
        window: snapshots ``K``.
        dtype: buffer storage dtype.
        chunk_size: scalars per forecast chunk (no more than ``n_params`` are ever integrated at once).
        n_horizons: forecast horizons ``H`` (the callback's ``n_candidates``).
        hidden: width of the field's hidden layers.
    """
    item = torch.empty(0, dtype=dtype).element_size()
    rows = 1 + n_states
    buffer = window * rows * n_params * item
    win = ((window * rows + window - 1) + window) * n_params * 4
    path = (n_horizons + 1) * rows * n_params * 4
    work = (3 * hidden + 12 * rows) * min(chunk_size, n_params) * 4
    return buffer + win + path + work


def plan_memory(
    n_params: int,
    n_states: int,
    window: int,
    budget_bytes: int,
    *,
    chunk_size: int = 1 << 20,
    min_window: int = 4,
    min_chunk: int = 1 << 12,
    n_horizons: int = 4,
    hidden: int = 16,
) -> MemoryPlan:
    """The largest configuration that fits ``budget_bytes``.

    Preference, in order: the full ``window`` in float32; the full ``window`` in bfloat16; then the largest
    window (down to ``min_window``) in bfloat16. The chunk size is then ``chunk_size``, halved (not below
    ``min_chunk``) until the plan fits.

    Args:
        n_params: tracked scalars.
        n_states: optimizer states per scalar (0 for plain SGD, 1 for momentum, 2 for Adam).
        window: the window wanted, in snapshots.
        budget_bytes: bytes GFM may use beyond the model and its optimizer.
        chunk_size: the largest chunk wanted.
        min_window: the smallest acceptable window (the callback needs ``history + max(backtest, 1) + 2``).
        min_chunk: the smallest acceptable chunk.
        n_horizons: forecast horizons (the callback's ``n_candidates``).
        hidden: width of the field's hidden layers.

    Returns:
        A :class:`MemoryPlan`.

    Raises:
        ValueError: an argument out of range, or a budget below the smallest plan (``min_window`` snapshots in
            bfloat16 with ``min_chunk`` scalars per chunk).
    """
    for name, value, low in (
        ("n_params", n_params, 1),
        ("n_states", n_states, 0),
        ("min_window", min_window, 2),
        ("min_chunk", min_chunk, 1),
        ("n_horizons", n_horizons, 1),
        ("hidden", hidden, 1),
        ("budget_bytes", budget_bytes, 0),
    ):
        if not isinstance(value, int) or isinstance(value, bool) or value < low:
            raise ValueError(f"`{name}` must be an int >= {low}, got {value!r}.")
    if not isinstance(window, int) or isinstance(window, bool) or window < min_window:
        raise ValueError(f"`window` must be an int >= min_window = {min_window}, got {window!r}.")
    if not isinstance(chunk_size, int) or isinstance(chunk_size, bool) or chunk_size < min_chunk:
        raise ValueError(f"`chunk_size` must be an int >= min_chunk = {min_chunk}, got {chunk_size!r}.")

    def cost(k: int, dtype: torch.dtype, chunk: int) -> int:
        return estimate_bytes(n_params, n_states, k, dtype, chunk, n_horizons=n_horizons, hidden=hidden)

    floor = cost(min_window, torch.bfloat16, min_chunk)
    if floor > budget_bytes:
        raise ValueError(
            f"`budget_bytes` must be at least {floor} bytes ({floor / 2**30:.2f} GiB): the smallest plan keeps "
            f"min_window = {min_window} snapshots in bfloat16 and integrates min_chunk = {min_chunk} scalars at once, "
            f"for n_params = {n_params} with n_states = {n_states}; got {budget_bytes}."
        )
    smaller = [(k, torch.bfloat16) for k in range(window - 1, min_window - 1, -1)]
    candidates = [(window, dtype) for dtype in DTYPES] + smaller
    k, dtype = next((k, d) for k, d in candidates if cost(k, d, min_chunk) <= budget_bytes)
    chunk = chunk_size
    while chunk > min_chunk and cost(k, dtype, chunk) > budget_bytes:
        chunk = max(min_chunk, chunk // 2)
    return MemoryPlan(dtype=dtype, window=k, chunk_size=chunk, estimated_bytes=cost(k, dtype, chunk))


_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "kib": 2**10, "mib": 2**20, "gib": 2**30}


def parse_bytes(value: int | str, name: str = "memory_budget") -> int:
    """Bytes from an int or a string with a unit (``"8GiB"``, ``"500 MB"``, ``"1e9"``).

    Example:
        >>> parse_bytes("8GiB"), parse_bytes("1.5 GB"), parse_bytes(4096)
        (8589934592, 1500000000, 4096)
    """
    if isinstance(value, int) and not isinstance(value, bool) and value > 0:
        return value
    if isinstance(value, str):
        text = value.strip().lower().replace(" ", "")
        number = text.rstrip("kmgib")
        unit = text[len(number) :]
        try:
            count = float(number)
        except ValueError:
            count = float("nan")
        if unit in _UNITS and math.isfinite(count) and count > 0:
            return int(count * _UNITS[unit])
    raise ValueError(
        f"`{name}` must be a positive number of bytes, an int or a string such as '8GiB' or '500MB', got {value!r}."
    )
