"""How much memory GFM needs, how much it may take, and the largest configuration that fits (pure functions).

GFM's own memory, beyond the model and its optimizer, is proportional to the number ``P`` of tracked scalars
(``S`` optimizer states per scalar, e.g. 2 for Adam, ``K`` snapshots, ``H`` forecast horizons). Its parts at
their peak (a jump attempt):

* the :class:`~lightning_gfm.trajectory.TrajectoryBuffer`: ``K P`` weights in the storage dtype, plus the
  optimizer states of ``K`` snapshots (a field that is fitted or loaded reads them all) or of the latest one
  only (the prior forecasts from the latest snapshot and reads nothing older: the *lean* layout);
* the :class:`~lightning_gfm.flow.window.Window` built from it: lean, it reads the buffer in place and adds
  per-scalar scales and indices (``4 P`` float32-sized values); otherwise float32 copies of the weights, the
  states and the velocities, ``(K (1 + S) + K - 1) P`` values, one ``(K, P)`` stack in flight, and indices;
* the forecast path, ``(H + 1) (1 + S) P`` float32 values, and the copy of the weights a rollback restores;
* the forecast's working set per chunk of ``C`` scalars (hidden activations, solver stages);
* the dynamics' per-scalar tables (the param-group index, a hyperparameter that differs between groups);
* a fixed :data:`OVERHEAD` for the modules a forecast imports and GFM's Python objects.

How much GFM may take, when the user does not say (:func:`default_budget`): at most a quarter of the memory
available on the buffer's device when fit starts, and at most 10 times the training footprint of the tracked
parameters (weights, gradients and optimizer state) plus the fixed :data:`OVERHEAD`, with 1 GiB allowed for any
model where a quarter of the available memory allows it. 10 is about the smallest multiple at which every
optimizer family keeps a useful window (a forecast holds ``H + 1`` float32 points of the weights and their
optimizer state): at 10 snapshots in bfloat16 the lean layout takes 7-9 times the footprint. A plan is chosen
before the first training step and its buffer allocated at once.

Example:
    >>> plan = plan_memory(n_params=10_000_000, n_states=2, window=24, budget_bytes=12 * 2**30)
    >>> plan.window, plan.dtype, plan.chunk_size
    (24, torch.float32, 1048576)
    >>> plan = plan_memory(n_params=10_000_000, n_states=2, window=24, budget_bytes=3 * 2**30)
    >>> plan.window, plan.dtype, plan.chunk_size
    (7, torch.bfloat16, 524288)
    >>> plan = plan_memory(n_params=10_000_000, n_states=2, window=24, budget_bytes=3 * 2**30, lean=True)
    >>> plan.window, plan.dtype
    (24, torch.float32)
"""

from __future__ import annotations

import contextlib
import math
import os
from dataclasses import dataclass

import torch

#: what GFM takes whatever the model's size: the modules it imports when it first forecasts (torchdyn, scipy)
#: and its Python objects, about 0.1-0.2 GiB of resident memory measured by ``benchmarks/memory.py``
OVERHEAD = 256 << 20

#: storage dtypes tried, best first: float32 keeps the recorded path exact, bfloat16 halves the buffer.
DTYPES = (torch.float32, torch.bfloat16)

#: the default bound: this fraction of the memory available on the buffer's device when fit starts ...
DEFAULT_FRACTION = 0.25
#: ... and at most this multiple of the tracked parameters' training footprint (weights, gradients, state) ...
DEFAULT_MULTIPLE = 10
#: ... but never less than this for a small model (still within the fraction of what is available).
DEFAULT_FLOOR = 1 << 30


@dataclass(frozen=True)
class MemoryPlan:
    """A configuration of GFM that fits a byte budget.

    Attributes:
        dtype: storage dtype of the trajectory buffer (``buffer_dtype``).
        window: snapshots kept (``window``).
        chunk_size: scalars integrated at once by the forecast (``chunk_size``).
        estimated_bytes: GFM's peak memory with this plan, by :func:`estimate_bytes`.
        budget_bytes: the budget the plan was fitted to (0 when unknown).
        lean: whether only the latest snapshot keeps its optimizer state and the window is read in place.
        source: where the budget came from: ``"memory_budget"`` (the user's), or the default rule with the
            numbers it used.
    """

    dtype: torch.dtype
    window: int
    chunk_size: int
    estimated_bytes: int
    budget_bytes: int = 0
    lean: bool = False
    source: str = ""

    def describe(self) -> str:
        """One line for the log: the plan and the budget it fits."""
        gib = 2**30
        layout = "lean (state of the latest snapshot only)" if self.lean else "full"
        return (
            f"{self.window} snapshots in {str(self.dtype).replace('torch.', '')}, {layout}, chunks of "
            f"{self.chunk_size} scalars: ~{self.estimated_bytes / gib:.2f} GiB of a {self.budget_bytes / gib:.2f} GiB "
            f"budget ({self.source})"
        )


def forecast_bytes(n_params: int, n_states: int, chunk_size: int, *, n_horizons: int = 4, hidden: int = 16) -> int:
    """The part of :func:`estimate_bytes` that lives on the model's device: path, rollback copy, chunk work."""
    rows = 1 + n_states
    path = (n_horizons + 1) * rows * n_params * 4
    work = (3 * hidden + 12 * rows) * min(chunk_size, n_params) * 4
    return path + n_params * 4 + work


def estimate_bytes(
    n_params: int,
    n_states: int,
    window: int,
    dtype: torch.dtype,
    chunk_size: int,
    *,
    n_horizons: int = 4,
    hidden: int = 16,
    lean: bool = False,
) -> int:
    """GFM's peak memory in bytes (buffer, window, forecast path, rollback copy, one chunk's working set).

    Args:
        n_params: tracked scalars ``P``.
        n_states: optimizer states carried per scalar ``S`` (:attr:`~lightning_gfm.dynamics.Dynamics.state_names`).
        window: snapshots ``K``.
        dtype: buffer storage dtype.
        chunk_size: scalars per forecast chunk (no more than ``n_params`` are ever integrated at once).
        n_horizons: forecast points ``H`` (the callback's ``n_candidates``, times its paths).
        hidden: width of the field's hidden layers.
        lean: the prior's layout (see the module): one state row, the window read in place.
    """
    item = torch.empty(0, dtype=dtype).element_size()
    rows = 1 + n_states
    p = n_params
    dynamics = 2 * p * 4  # the dynamics' group index (int32) and one per-scalar hyperparameter table
    if lean:
        buffer = (window + n_states) * p * item
        win = 4 * p * 4  # u_rms, u_rms_tensor (float32), tensor and group index (int32)
    else:
        buffer = window * rows * p * item
        win = ((window * rows + window - 1) + window) * p * 4 + 6 * p * 4  # + roles, tensor, group index
    path = (n_horizons + 1) * rows * p * 4
    rollback = p * 4  # the weights choose_and_apply restores
    work = (3 * hidden + 12 * rows) * min(chunk_size, p) * 4
    return OVERHEAD + dynamics + buffer + win + path + rollback + work


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
    lean: bool = False,
    source: str = "memory_budget",
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
        lean: plan the prior's lean layout (see :func:`estimate_bytes`).
        source: where ``budget_bytes`` came from, kept in the plan.

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
        return estimate_bytes(n_params, n_states, k, dtype, chunk, n_horizons=n_horizons, hidden=hidden, lean=lean)

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
    return MemoryPlan(
        dtype=dtype,
        window=k,
        chunk_size=chunk,
        estimated_bytes=cost(k, dtype, chunk),
        budget_bytes=budget_bytes,
        lean=lean,
        source=source,
    )


def _proc_meminfo_available() -> int | None:
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def _cgroup_headroom() -> int | None:
    """Bytes left under a cgroup memory limit (containers), or ``None`` where there is none."""
    for limit_file, usage_file in (
        ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),  # cgroup v2
        ("/sys/fs/cgroup/memory/memory.limit_in_bytes", "/sys/fs/cgroup/memory/memory.usage_in_bytes"),  # v1
    ):
        try:
            with open(limit_file) as fh:
                raw = fh.read().strip()
            if raw == "max":
                return None
            limit = int(raw)
            with open(usage_file) as fh:
                usage = int(fh.read().strip())
        except (OSError, ValueError):
            continue
        if limit >= 1 << 60:  # "no limit" spelled as a huge number (cgroup v1)
            return None
        return max(0, limit - usage)
    return None


def available_bytes(device: str | torch.device = "cpu") -> int | None:
    """Memory available for new allocations on ``device`` now, in bytes (``None`` when it cannot be known).

    CPU: the kernel's ``MemAvailable`` (free plus reclaimable page cache), bounded by a container's cgroup limit.
    CUDA: the free memory ``torch.cuda.mem_get_info`` reports for the device.
    """
    device = torch.device(device)
    if device.type == "cuda":
        free = torch.cuda.mem_get_info(device)[0]
        # blocks torch's caching allocator holds but does not use are free to this process too
        return int(free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device))
    if device.type != "cpu":
        return None
    found = [b for b in (_proc_meminfo_available(), _cgroup_headroom()) if b is not None]
    if not found and hasattr(os, "sysconf"):
        with contextlib.suppress(ValueError, OSError):
            found.append(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    return min(found) if found else None


def footprint_bytes(n_params: int, n_states: int, item_size: int = 4) -> int:
    """Training memory of ``n_params`` tracked scalars: weights, gradients and ``n_states`` optimizer states."""
    return n_params * item_size * (2 + n_states)


def default_budget(
    footprint: int,
    available: int | None,
    *,
    sharing: int = 1,
    fraction: float = DEFAULT_FRACTION,
    multiple: float = DEFAULT_MULTIPLE,
    floor: int = DEFAULT_FLOOR,
) -> tuple[int, str]:
    """The bytes GFM takes when the user sets no ``memory_budget``, and a sentence saying why.

    ``min(fraction * available / sharing, max(floor, multiple * footprint + OVERHEAD))``: a quarter of what the
    device has free (shared by the ``sharing`` processes that record on it, e.g. the DDP ranks of one host), and a
    small multiple of what training the model already takes, with room for small models.

    Args:
        footprint: training footprint of the tracked parameters (:func:`footprint_bytes`).
        available: memory available on the buffer's device (:func:`available_bytes`), ``None`` when unknown
            (then only the multiple bounds).
        sharing: processes that each take this budget from the same memory.
        fraction: share of the available memory.
        multiple: multiple of the footprint.
        floor: bytes allowed for any model, when the available memory allows it.

    Example:
        >>> budget, why = default_budget(footprint=400 * 2**20, available=64 * 2**30)
        >>> budget / 2**30, why
        (4.15625, 'default: min(25% of 64.00 GiB available, max(1.00 GiB, 10 x 0.39 GiB footprint + 0.25 GiB))')
    """
    gib = 2**30
    cap = max(floor, int(multiple * footprint) + OVERHEAD)
    avail_text = "unknown available"
    if available is not None:
        share = int(fraction * available / max(1, sharing))
        cap = min(cap, share)
        avail_text = f"{fraction:.0%} of {available / gib:.2f} GiB available" + (f" / {sharing}" if sharing > 1 else "")
    why = (
        f"default: min({avail_text}, max({floor / gib:.2f} GiB, {multiple:g} x {footprint / gib:.2f} GiB footprint"
        f" + {OVERHEAD / gib:.2f} GiB))"
    )
    return cap, why


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
