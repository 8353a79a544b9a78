"""A bounded window of training snapshots: weights, optimizer state, learning rates and step."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import Tensor

from lightning_gfm.params import ParamSpec, local, step_count


@dataclass
class Snapshot:
    """Training state after optimizer step ``step``.

    Attributes:
        step: global optimizer step (``trainer.global_step``) at which it was taken.
        weights: flat tracked weights, shape ``(P,)``.
        state: optimizer state by name (e.g. ``exp_avg``), each shape ``(P,)``.
        lrs: learning rate of each param group, shape ``(G,)`` (float64).
        opt_step: the optimizer's own step counter (bias correction), 0 where it keeps none.
    """

    step: int
    weights: Tensor
    state: dict[str, Tensor] = field(default_factory=dict)
    lrs: Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.float64))
    opt_step: int = 0

    @property
    def nbytes(self) -> int:
        """Bytes held by the tensors of this snapshot."""
        tensors = [self.weights, self.lrs, *self.state.values()]
        return sum(t.numel() * t.element_size() for t in tensors)


class TrajectoryBuffer:
    """The most recent ``capacity`` snapshots, oldest first, stored on ``device`` in ``dtype``.

    Storage is a ring of ``capacity`` slots allocated on the first snapshot: weights ``(capacity, P)`` and one
    ``(capacity, P)`` tensor per optimizer state, in ``dtype`` on ``device``. A snapshot is written straight into
    its slot (the dtype conversion happens in that one copy); when full, the oldest slot is overwritten.
    ``buffer[i]`` is a :class:`Snapshot` whose tensors are views of the slot: clone them to keep them past the
    next ``capacity`` records.

    Args:
        capacity: number of snapshots kept; older ones are dropped.
        device: where snapshots live (``"cpu"`` by default, keeping accelerator memory free).
        dtype: storage dtype of weights and state (``torch.bfloat16`` halves memory at a cost in precision).
        state_rows: how many of the most recent snapshots keep their optimizer state (``None``: all of them).
            A forecast from the latest snapshot with the prior field reads the optimizer state there only, so
            the callback keeps one row and saves ``(capacity - 1) * n_state`` model-sized copies; fitting and
            backtesting a field read the state of every snapshot.

    Example:
        >>> buf = TrajectoryBuffer(capacity=2)
        >>> for step in range(3):
        ...     buf.append(Snapshot(step=step, weights=torch.full((4,), float(step))))
        >>> buf.steps
        [1, 2]
        >>> buf.weights().shape
        torch.Size([2, 4])
        >>> buf[-1].weights.tolist()
        [2.0, 2.0, 2.0, 2.0]
    """

    def __init__(
        self,
        capacity: int,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
        state_rows: int | None = None,
    ):
        if not isinstance(capacity, int) or capacity < 2:
            raise ValueError(f"`capacity` must be an int >= 2 (a velocity needs two snapshots), got {capacity!r}.")
        if state_rows is not None and (isinstance(state_rows, bool) or not isinstance(state_rows, int)):
            raise ValueError(f"`state_rows` must be an int in [1, capacity] or None, got {state_rows!r}.")
        if state_rows is not None and not 1 <= state_rows <= capacity:
            raise ValueError(f"`state_rows` must be in [1, capacity = {capacity}] or None, got {state_rows!r}.")
        self.capacity = capacity
        self.state_rows = capacity if state_rows is None else state_rows
        self.device = torch.device(device)
        self.dtype = dtype
        self._w: Tensor | None = None  # (capacity, P)
        self._state: dict[str, Tensor] = {}  # name -> (state_rows, P): a ring of its own, indexed by record count
        self._count = 0  # snapshots recorded since the last clear (the state ring's position)
        self._step = [0] * capacity
        self._lrs: list[Tensor] = [torch.zeros(0, dtype=torch.float64)] * capacity
        self._opt_step = [0] * capacity
        self._start = 0  # slot of the oldest snapshot
        self._len = 0

    def __len__(self) -> int:
        return self._len

    def _slot(self, i: int) -> int:
        if not -self._len <= i < self._len:
            raise IndexError(f"snapshot index {i} out of range for a buffer of {self._len}.")
        return (self._start + i % self._len) % self.capacity

    def _state_slot(self, i: int) -> int | None:
        """Row of snapshot ``i`` in the state ring, ``None`` when its state is no longer kept."""
        i = i % self._len if self._len else i
        back = self._len - 1 - i  # 0 for the latest snapshot
        if back >= self.state_rows:
            return None
        return (self._count - 1 - back) % self.state_rows

    def __getitem__(self, i: int) -> Snapshot:
        k = self._slot(i)
        r = self._state_slot(i)
        return Snapshot(
            step=self._step[k],
            weights=self._w[k],
            state={} if r is None else {name: t[r] for name, t in self._state.items()},
            lrs=self._lrs[k],
            opt_step=self._opt_step[k],
        )

    def clear(self) -> None:
        """Forget every snapshot (after a jump, the old path no longer leads to the current weights).

        The slots stay allocated for the snapshots to come.
        """
        self._start, self._len, self._count = 0, 0, 0

    def allocate(self, numel: int, state_names) -> None:
        """Allocate the ring for ``numel`` scalars and ``state_names`` now (forgetting any stored snapshot).

        The callback calls this when fit starts, so that the memory the plan promised is taken before the first
        training step: an allocation that cannot succeed fails before any work is lost.
        """
        self.clear()
        self._w, self._state = None, {}  # free before allocating the new ring
        kw = dict(device=self.device, dtype=self.dtype)
        # zeros, not empty: the pages are written now, so memory that is not there fails here, not mid-run
        self._w = torch.zeros(self.capacity, numel, **kw)
        self._state = {name: torch.zeros(self.state_rows, numel, **kw) for name in tuple(state_names)}

    @property
    def allocated_bytes(self) -> int:
        """Bytes of the allocated ring (weights and state slots), whether filled or not."""
        tensors = ([] if self._w is None else [self._w]) + list(self._state.values())
        return sum(t.numel() * t.element_size() for t in tensors)

    def _next_slot(self, step: int, numel: int, state_names) -> int:
        """Check a new snapshot against the stored ones, (re)allocate the ring if needed; the slot to write."""
        if self._len and step <= self._step[self._slot(-1)]:
            raise ValueError(
                f"Snapshots must have increasing steps: got step {step} after {self._step[self._slot(-1)]}."
            )
        names = tuple(state_names)
        if self._len and numel != self._w.shape[1]:
            raise ValueError(
                f"Snapshot weights changed shape from ({self._w.shape[1]},) to ({numel},); the tracked parameters "
                "must stay fixed during fit."
            )
        if self._len and names and set(names) != set(self._state):
            raise ValueError(f"Snapshot state changed from {tuple(self._state)} to {names}.")
        if self._w is None or self._w.shape[1] != numel or (names and set(names) != set(self._state)):
            self.allocate(numel, names)
        if self._len == self.capacity:
            k = self._start
            self._start = (self._start + 1) % self.capacity
        else:
            k = (self._start + self._len) % self.capacity
            self._len += 1
        self._count += 1
        return k

    def _state_row(self) -> int:
        """Row of the state ring the snapshot being written goes to (after :meth:`_next_slot`)."""
        return (self._count - 1) % self.state_rows

    def _set_meta(self, k: int, step: int, lrs: Tensor, opt_step: int) -> None:
        self._step[k] = int(step)
        self._lrs[k] = lrs.detach().to(dtype=torch.float64, device="cpu", copy=True)
        self._opt_step[k] = int(opt_step)

    @torch.no_grad()
    def append(self, snap: Snapshot) -> None:
        """Store ``snap`` (copied to the buffer's device and dtype); the oldest snapshot goes when full."""
        if snap.weights.ndim != 1:
            raise ValueError(f"Snapshot weights must be flat, shape (P,), got {tuple(snap.weights.shape)}.")
        k = self._next_slot(snap.step, snap.weights.numel(), snap.state)
        r = self._state_row()
        self._w[k].copy_(snap.weights.detach())
        for name, slots in self._state.items():
            t = snap.state.get(name)
            if t is None:  # a checkpoint's older snapshot whose state was not kept: the row is never read
                slots[r].zero_()
            else:
                slots[r].copy_(t.detach())
        self._set_meta(k, snap.step, snap.lrs, snap.opt_step)

    @torch.no_grad()
    def record(self, optimizer: torch.optim.Optimizer, spec: ParamSpec, state_names, step: int) -> None:
        """Snapshot the live training state after optimizer step ``step`` straight into the next slot.

        One pass over the weights and each optimizer state: every parameter (and its state) is copied, converted
        to the buffer's dtype on the way, into its place in the flat slot. Absent state entries read as zeros.
        Sharded parameters (``DTensor``) and their state are read through their local shard: ``P`` is local.

        Args:
            optimizer: the live optimizer.
            spec: the tracked parameters (their order and offsets define the flat layout, shape ``(P,)``).
            state_names: optimizer state to keep (:attr:`~lightning_gfm.dynamics.Dynamics.state_names`).
            step: global optimizer step.
        """
        k = self._next_slot(step, spec.numel, state_names)
        r = self._state_row()
        bounds = list(zip(spec.params, spec.offsets[:-1], spec.offsets[1:], strict=True))
        w = self._w[k]
        for (_, a, b), x in zip(bounds, spec.tensors, strict=True):
            w[a:b].copy_(x.detach().reshape(-1))
        for name, slots in self._state.items():
            row = slots[r]
            for p, a, b in bounds:
                t = optimizer.state.get(p, {}).get(name)
                if t is None:
                    row[a:b].zero_()
                else:
                    row[a:b].copy_(local(t).detach().reshape(-1))
        lrs = torch.tensor([float(g["lr"]) for g in optimizer.param_groups], dtype=torch.float64)
        self._set_meta(k, step, lrs, step_count(optimizer, spec))

    def _ring(self, t: Tensor) -> tuple[int, int, int]:
        """``(start, length, capacity)`` of ring tensor ``t``: the weights' ring or a state's own ring."""
        if t is self._w:
            return self._start, self._len, self.capacity
        n = min(self._len, self.state_rows)
        return (self._count - n) % self.state_rows, n, self.state_rows

    def _pieces(self, t: Tensor) -> list[Tensor]:
        """The stored rows of ring tensor ``t``, oldest first, as one or two views (``(n, P)`` each)."""
        start, n, cap = self._ring(t)
        end = start + n
        if end <= cap:
            return [t[start:end]]
        return [t[start:], t[: end - cap]]

    def _gather(self, t: Tensor | None, device, dtype) -> Tensor:
        """A new ``(n, P)`` tensor of the stored rows of ``t``, oldest first (one copy, converting on the way)."""
        if t is None or self._len == 0:
            raise ValueError("The buffer holds no snapshot.")
        pieces = self._pieces(t)
        device = t.device if device is None else device
        out = torch.empty(sum(len(p) for p in pieces), t.shape[1], device=device, dtype=dtype)
        row = 0
        for piece in pieces:
            out[row : row + len(piece)].copy_(piece)
            row += len(piece)
        return out

    @torch.no_grad()
    def _rotate_(self, t: Tensor, shift: int, n_rows: int) -> None:
        """Rotate the first ``n_rows`` rows of ``t`` left by ``shift`` in place (one spare row of memory)."""
        shift %= n_rows
        if shift == 0:
            return
        spare = torch.empty_like(t[0])
        for first in range(math.gcd(shift, n_rows)):  # each cycle of the permutation i <- i + shift
            spare.copy_(t[first])
            i = first
            while True:
                j = (i + shift) % n_rows
                if j == first:
                    break
                t[i].copy_(t[j])
                i = j
            t[i].copy_(spare)

    @torch.no_grad()
    def ordered_(self) -> tuple[Tensor, dict[str, Tensor]]:
        """Views of the stored weights ``(K, P)`` and states ``(min(K, state_rows), P)``, oldest first, no copy.

        Rotates the rings in place so that the oldest snapshot sits in slot 0 (at most ``capacity`` row copies
        through one spare row): a forecast then reads the window straight from the buffer, in its storage dtype,
        instead of a float32 copy of it. The views stay valid until the next record.
        """
        if self._w is None or self._len == 0:
            raise ValueError("The buffer holds no snapshot.")
        if self._start:  # the start only moves once the ring is full: rotate all of it
            self._rotate_(self._w, self._start, self.capacity)
            self._step = self._step[self._start :] + self._step[: self._start]
            self._lrs = self._lrs[self._start :] + self._lrs[: self._start]
            self._opt_step = self._opt_step[self._start :] + self._opt_step[: self._start]
            self._start = 0
        n_state = min(self._len, self.state_rows)
        state_start = (self._count - n_state) % self.state_rows
        if state_start:
            for t in self._state.values():
                self._rotate_(t, state_start, self.state_rows)
            self._count = n_state  # the state ring now starts at row 0: the same rows, renumbered
        return self._w[: self._len], {name: t[:n_state] for name, t in self._state.items()}

    @torch.no_grad()
    def translate_(self, dw: Tensor, dstate: dict[str, Tensor] | None = None) -> None:
        """Shift every stored snapshot by ``dw`` (shape ``(P,)``), and state by ``dstate``, in place.

        After a jump the run continues from displaced weights; shifting the window keeps its velocities (the
        information the field is fitted on) while making its last snapshot the weights the run now has.
        """
        if self._len == 0:
            return
        dw = dw.to(device=self.device, dtype=self.dtype)
        for piece in self._pieces(self._w):
            piece.add_(dw)
        for name, d in (dstate or {}).items():
            d = d.to(device=self.device, dtype=self.dtype)
            for piece in self._pieces(self._state[name]):
                piece.add_(d)

    @torch.no_grad()
    def shift_(
        self,
        to: Tensor,
        frm: Tensor,
        states: dict[str, tuple[Tensor, Tensor]] | None = None,
        chunk: int = 1 << 20,
    ) -> None:
        """:meth:`translate_` by ``to - frm`` (and each state by its pair's difference), ``chunk`` scalars at a time.

        The same shift without a model-sized difference in memory; ``frm`` may be a view of this buffer's own last
        row (each chunk's difference is taken before any row of that chunk moves).
        """
        if self._len == 0:
            return
        pairs = [(self._w, to, frm)] + [(self._state[n], a, b) for n, (a, b) in (states or {}).items()]
        for ring, a, b in pairs:
            pieces = self._pieces(ring)
            for lo in range(0, ring.shape[1], chunk):
                hi = min(lo + chunk, ring.shape[1])
                d = torch.sub(a[lo:hi].to(torch.float32), b[lo:hi].to(torch.float32)).to(self.device, self.dtype)
                for piece in pieces:
                    piece[:, lo:hi].add_(d)

    @property
    def steps(self) -> list[int]:
        """Global steps of the stored snapshots, oldest first."""
        return [self._step[self._slot(i)] for i in range(self._len)]

    @property
    def opt_steps(self) -> list[int]:
        """Optimizer step counters of the stored snapshots, oldest first."""
        return [self._opt_step[self._slot(i)] for i in range(self._len)]

    @property
    def state_names(self) -> tuple[str, ...]:
        """Names of the stored optimizer states."""
        return tuple(self._state)

    def weights(self, device=None, dtype=torch.float32) -> Tensor:
        """All stored weights, a new tensor of shape ``(K, P)``."""
        return self._gather(self._w, device, dtype)

    def state(self, name: str, device=None, dtype=torch.float32) -> Tensor:
        """Optimizer state ``name`` of the snapshots that keep it, a new tensor ``(min(K, state_rows), P)``."""
        if name not in self._state:
            raise KeyError(f"The buffer stores no optimizer state {name!r}; it stores {tuple(self._state)}.")
        return self._gather(self._state[name], device, dtype)

    def lrs(self) -> Tensor:
        """Learning rates, shape ``(K, G)``, float64."""
        return torch.stack([self._lrs[self._slot(i)] for i in range(self._len)])

    @property
    def nbytes(self) -> int:
        """Bytes held by the stored snapshots (the ring itself holds ``capacity`` slots)."""
        return sum(self[i].nbytes for i in range(self._len))

    def state_dict(self) -> dict:
        """Plain values and tensors only, so Lightning can reload it with ``weights_only=True``.

        The tensors are views of the ring (no copy of a model-sized window at checkpoint time): save or clone
        them before the buffer records again.
        """
        snaps = []
        for i in range(self._len):
            s = self[i]
            snaps.append({"step": s.step, "weights": s.weights, "state": s.state, "lrs": s.lrs, "opt_step": s.opt_step})
        return {"capacity": self.capacity, "snapshots": snaps}

    def load_state_dict(self, state: dict) -> None:
        """Restore from :meth:`state_dict` (the capacity and ``state_rows`` configured now win).

        A checkpoint whose snapshots kept fewer optimizer-state rows than this buffer needs is restored from the
        last snapshot that the kept rows cover, so that no stored state is ever invented.
        """
        self.clear()
        snaps = list(state.get("snapshots", []))[-self.capacity :]
        if not snaps:
            return
        names = tuple(snaps[-1].get("state", {}))
        if names:
            with_state = next((i for i, s in enumerate(snaps) if set(s.get("state", {})) == set(names)), len(snaps))
            if any(set(s.get("state", {})) != set(names) for s in snaps[with_state:]):
                with_state = len(snaps) - 1
            if len(snaps) - with_state < min(len(snaps), self.state_rows):
                snaps = snaps[with_state:]
        self.allocate(snaps[-1]["weights"].numel(), names)
        for s in snaps:
            self.append(
                Snapshot(
                    step=s["step"],
                    weights=s["weights"],
                    state=s.get("state", {}),
                    lrs=s["lrs"],
                    opt_step=s.get("opt_step", 0),
                )
            )
