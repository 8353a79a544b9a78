"""Share GFM's work between data-parallel ranks with tensor collectives (no Lightning, no pickled objects).

Under DDP every rank holds the same weights and the same window, and the forecast is separable per scalar, so
each rank fits and integrates only a contiguous slice of the flat scalar index:

* fitting samples its batch from the rank's slice and :func:`average_gradients` averages the field's gradients
  every step, so every rank keeps an identical field (its fit equals one fit on the union of the batches);
* a backtest sums its squared error and squared move over the ranks' slices (:meth:`Shard.sum`);
* the forecast integrates the rank's slice and :func:`gather_path` assembles the full path with ``all_gather``.

Under a sharded strategy (FSDP2 ``fully_shard``, ``ModelParallelStrategy``) each rank already owns distinct
scalars, its local shards: a :class:`Shard` with ``owned=True`` fits and backtests on all of them (gradients
averaged and errors summed as above) and forecasts them with no gather at all.

Every collective of an attempt carries a failure count, and a rank whose own work raises takes part, once, in
the collective its peers are waiting in (:meth:`Shard.phase`): every rank then raises the same
:class:`ShardFailure` at the same point instead of waiting forever for a rank that will never come.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from lightning_gfm.forecast import ForecastPath


class ShardFailure(RuntimeError):
    """Raised on every rank when any rank failed during a sharded phase of a jump attempt."""


def rank_slice(n: int, rank: int, world_size: int) -> tuple[int, int]:
    """Contiguous, balanced share ``[lo, hi)`` of ``n`` scalars for ``rank`` (sizes differ by at most one).

    Args:
        n: number of scalars ``P``.
        rank: this rank, ``0 <= rank < world_size``.
        world_size: number of ranks.

    Example:
        >>> [rank_slice(10, r, 3) for r in range(3)]
        [(0, 4), (4, 7), (7, 10)]
    """
    if not 0 <= rank < world_size:
        raise ValueError(f"`rank` must be in [0, {world_size}), got {rank}.")
    base, extra = divmod(n, world_size)
    lo = rank * base + min(rank, extra)
    return lo, lo + base + (rank < extra)


def _world(group: Any = None) -> tuple[int, int]:
    if not (dist.is_available() and dist.is_initialized()):
        return 0, 1
    return dist.get_rank(group), dist.get_world_size(group)


def exchange(values: Tensor, failed: bool = False, group: Any = None) -> tuple[Tensor, int]:
    """All-reduce (sum) ``values`` together with a count of failed ranks, in one collective.

    Args:
        values: shape ``(n,)``, any floating dtype; summed over ranks (as float64).
        failed: whether this rank failed (its ``values`` are then ignored by convention: send zeros).
        group: process group (default: the world).

    Returns:
        ``(summed values, shape (n,), float64; number of ranks that failed)``.
    """
    msg = torch.cat([values.detach().reshape(-1).double(), values.new_tensor([float(failed)], dtype=torch.float64)])
    if _world(group)[1] > 1:
        dist.all_reduce(msg, op=dist.ReduceOp.SUM, group=group)
    return msg[:-1], int(msg[-1].item())


def agree(ok: bool, group: Any = None, device: torch.device | str = "cpu") -> bool:
    """Whether ``ok`` holds on every rank (one small all-reduce; ``device`` must suit the backend).

    Example:
        >>> agree(True)  # without a process group: this rank's own answer
        True
    """
    _, n_failed = exchange(torch.zeros(0, device=device), failed=not ok, group=group)
    return n_failed == 0


def min_over_ranks(value: int | None, device: torch.device | str = "cpu", group: Any = None) -> int | None:
    """The smallest ``value`` over all ranks (``None`` if any rank does not know it); one small all-reduce.

    Example:
        >>> min_over_ranks(7), min_over_ranks(None)  # without a process group: this rank's own value
        (7, None)
    """
    if _world(group)[1] <= 1:
        return value
    t = torch.tensor([-1.0 if value is None else float(value)], dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MIN, group=group)  # -1 wins when a rank does not know
    return None if float(t) < 0 else int(t)


def average_gradients(module: nn.Module, stop: bool = False, group: Any = None) -> tuple[bool, int]:
    """Average ``module``'s gradients over ranks in place, in one collective, and agree on stopping.

    The message holds every parameter (zeros where ``.grad`` is ``None``; such gradients stay ``None``, and
    every rank computes the same graph), then the stop vote: :func:`fit_message_size` values in all.

    Args:
        module: the network whose ``.grad`` are averaged.
        stop: this rank's wish to stop after this step (e.g. its time budget ran out).
        group: process group (default: the world).

    Returns:
        ``(whether any rank wants to stop, number of ranks that failed)``; the gradients are left untouched when
        a rank failed.
    """
    params = list(module.parameters())
    grads = torch.cat([(torch.zeros_like(p) if p.grad is None else p.grad).reshape(-1) for p in params])
    total, n_failed = exchange(torch.cat([grads.double(), grads.new_tensor([float(stop), 0.0]).double()]), group=group)
    if n_failed:
        return True, n_failed
    flat = (total[:-2] / _world(group)[1]).to(grads.dtype)
    offset = 0
    for p in params:
        if p.grad is not None:
            p.grad.copy_(flat[offset : offset + p.numel()].view_as(p.grad))
        offset += p.numel()
    return bool(total[-2] > 0), 0


def fit_message_size(module: nn.Module) -> int:
    """Values in every message of a sharded fit: the parameters, a stop vote and a free slot."""
    return sum(p.numel() for p in module.parameters()) + 2


def gather_path(path: ForecastPath, n: int, group: Any = None) -> ForecastPath:
    """Assemble the full path from every rank's slice (:func:`rank_slice` of ``n``) with one ``all_gather``.

    Args:
        path: this rank's forecast: weights and each state shape ``(H + 1, hi - lo)``.
        n: total number of scalars ``P``.
        group: process group (default: the world).

    Returns:
        The path over all scalars: weights and each state shape ``(H + 1, P)``, bit-identical on every rank;
        ``seconds`` is this rank's own.
    """
    rank, world = _world(group)
    if world == 1:
        return path
    names = list(path.state)
    width = math.ceil(n / world)
    lo, hi = rank_slice(n, rank, world)
    local = torch.stack([path.weights, *(path.state[k] for k in names)])  # (1 + S, H + 1, hi - lo)
    block = local.new_zeros(*local.shape[:2], width)
    block[..., : hi - lo] = local
    blocks = [torch.empty_like(block) for _ in range(world)]
    dist.all_gather(blocks, block.contiguous(), group=group)
    parts = [b[..., : rank_slice(n, r, world)[1] - rank_slice(n, r, world)[0]] for r, b in enumerate(blocks)]
    full = torch.cat(parts, dim=-1)
    state = dict(zip(names, full[1:], strict=True))
    return ForecastPath(list(path.horizons), full[0], state, path.seconds, list(path.branches), list(path.state_steps))


@dataclass
class Shard:
    """This rank's share of a jump attempt; on a single process every hook is a no-op.

    Attributes:
        n: total number of scalars ``P`` (with ``owned``: this rank's local scalars).
        rank: this rank.
        world_size: number of ranks sharing the work.
        device: where messages are built (the model's device: CPU for gloo, CUDA for NCCL).
        group: process group (``None``: the world).
        owned: each rank already holds distinct scalars (its local shards of sharded parameters): no slicing
            (:attr:`index_range` and :attr:`index` are ``None``) and no gather (:meth:`gather` only agrees).
    """

    n: int
    rank: int = 0
    world_size: int = 1
    device: torch.device | str = "cpu"
    group: Any = None
    owned: bool = False

    @classmethod
    def current(cls, n: int, device: torch.device | str = "cpu", group: Any = None, owned: bool = False) -> Shard:
        """The shard of this process in ``group`` (a single-process shard without an initialised group)."""
        rank, world = _world(group)
        return cls(n, rank, world, device, group, owned)

    @property
    def active(self) -> bool:
        """Whether the work is split (more than one rank)."""
        return self.world_size > 1

    @property
    def index_range(self) -> tuple[int, int] | None:
        """This rank's scalars ``[lo, hi)``, ``None`` on a single process or with ``owned`` (all of them)."""
        return rank_slice(self.n, self.rank, self.world_size) if self.active and not self.owned else None

    @property
    def index(self) -> Tensor | None:
        """This rank's scalar indices, shape ``(hi - lo,)``, ``None`` on a single process."""
        return None if self.index_range is None else torch.arange(*self.index_range)

    def batch(self, total: int) -> int:
        """Per-rank share of a fitting batch of ``total`` scalars (the ranks together draw about ``total``)."""
        return total if not self.active else max(1, math.ceil(total / self.world_size))

    def seed(self, seed: int) -> int:
        """A per-rank seed, so the ranks' batches are independent draws."""
        return seed + 1_000_003 * self.rank

    @property
    def grad_sync(self) -> Callable[[nn.Module, bool], bool] | None:
        """``fit_field``'s ``grad_sync`` hook (``None`` on a single process)."""
        return self._grad_sync if self.active else None

    @property
    def backtest_kwargs(self) -> dict[str, Any]:
        """``backtest_error``'s keyword arguments for this rank's share (none on a single process)."""
        return {"index_range": self.index_range, "reduce": self._reduce} if self.active else {}

    def _grad_sync(self, module: nn.Module, stop: bool) -> bool:
        stop, n_failed = average_gradients(module, stop, self.group)
        self._check(n_failed, "fit")
        return stop

    def mean(self, module: nn.Module, value: float) -> float:
        """Close a fit of ``module``: the mean of ``value`` over ranks, in a message shaped like :meth:`grad_sync`'s."""
        if not self.active:
            return value
        values = torch.zeros(fit_message_size(module), dtype=torch.float64, device=self.device)
        values[-1] = value
        total, n_failed = exchange(values, group=self.group)
        self._check(n_failed, "fit")
        return float(total[-1]) / self.world_size

    def _reduce(self, values: Tensor) -> Tensor:
        return self.sum(values, "backtest")

    def sum(self, values: Tensor, name: str) -> Tensor:
        """Sum ``values`` (shape ``(n,)``) over the ranks as float64; raise :class:`ShardFailure` if a rank failed.

        Run it inside :meth:`phase` ``(name, values.numel())`` so that a rank failing before it does not hang.
        """
        if not self.active:
            return values.double()
        total, n_failed = exchange(values.to(self.device), group=self.group)
        self._check(n_failed, name)
        return total

    def gather(self, path: ForecastPath) -> ForecastPath:
        """Agree that every rank forecast its slice, then assemble the full path (see :func:`gather_path`).

        With ``owned`` nothing is gathered: the ranks agree on which points are finite (a point non-finite on
        any rank becomes non-finite on every rank, its weights set to NaN), so that every rank evaluates the
        same candidates.
        """
        if not self.active:
            return path
        _, n_failed = exchange(torch.zeros(0, device=self.device), group=self.group)
        self._check(n_failed, "forecast")
        if not self.owned:
            return gather_path(path, self.n, self.group)
        bad, _ = exchange((~path.finite()).to(self.device, torch.float64), group=self.group)
        bad = bad > 0
        if bool(bad.any()):
            path.weights[bad.to(path.weights.device)] = float("nan")
        return path

    @contextlib.contextmanager
    def phase(self, name: str, numel: int) -> Iterator[None]:
        """Run one phase (``"fit"``, ``"backtest"``, ``"forecast"``) so that a failure on one rank stops every rank.

        A rank whose own work raises sends a failure message of ``numel`` values (the size of the collective its
        peers are waiting in during this phase) and raises :class:`ShardFailure` from its error; its peers raise
        the same error from that collective.

        Args:
            name: the phase, for the message.
            numel: values in this phase's messages, before the failure count.
        """
        if not self.active:
            yield
            return
        try:
            yield
        except ShardFailure:
            raise
        except Exception as exc:
            _, n_failed = exchange(torch.zeros(numel, device=self.device), failed=True, group=self.group)
            raise ShardFailure(self._message(n_failed, name)) from exc

    def _check(self, n_failed: int, name: str) -> None:
        if n_failed:
            raise ShardFailure(self._message(n_failed, name))

    def _message(self, n_failed: int, name: str) -> str:
        return (
            f"GFMCallback: {n_failed} of {self.world_size} ranks failed during the sharded {name} of a jump "
            "attempt; every rank raises this error at the same point instead of waiting for the others. "
            "The failing rank's traceback shows the cause."
        )
