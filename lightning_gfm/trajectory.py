"""A bounded window of training snapshots: weights, optimizer state, learning rates and step."""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

import torch
from torch import Tensor


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

    Args:
        capacity: number of snapshots kept; older ones are dropped.
        device: where snapshots live (``"cpu"`` by default, keeping accelerator memory free).
        dtype: storage dtype of weights and state (``torch.bfloat16`` halves memory at a cost in precision).

    Example:
        >>> buf = TrajectoryBuffer(capacity=2)
        >>> for step in range(3):
        ...     buf.append(Snapshot(step=step, weights=torch.full((4,), float(step))))
        >>> buf.steps
        [1, 2]
        >>> buf.weights().shape
        torch.Size([2, 4])
    """

    def __init__(self, capacity: int, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32):
        if not isinstance(capacity, int) or capacity < 2:
            raise ValueError(f"`capacity` must be an int >= 2 (a velocity needs two snapshots), got {capacity!r}.")
        self.capacity = capacity
        self.device = torch.device(device)
        self.dtype = dtype
        self._snaps: deque[Snapshot] = deque(maxlen=capacity)

    def __len__(self) -> int:
        return len(self._snaps)

    def __getitem__(self, i: int) -> Snapshot:
        return self._snaps[i]

    def clear(self) -> None:
        """Forget every snapshot (after a jump, the old path no longer leads to the current weights)."""
        self._snaps.clear()

    def append(self, snap: Snapshot) -> None:
        """Store ``snap`` (moved to the buffer's device and dtype); the oldest snapshot goes when full."""
        if self._snaps and snap.step <= self._snaps[-1].step:
            raise ValueError(
                f"Snapshots must have increasing steps: got step {snap.step} after {self._snaps[-1].step}."
            )
        if self._snaps and snap.weights.shape != self._snaps[-1].weights.shape:
            raise ValueError(
                f"Snapshot weights changed shape from {tuple(self._snaps[-1].weights.shape)} to "
                f"{tuple(snap.weights.shape)}; the tracked parameters must stay fixed during fit."
            )

        def put(t: Tensor) -> Tensor:
            return t.detach().to(device=self.device, dtype=self.dtype, copy=True)

        self._snaps.append(
            Snapshot(
                step=int(snap.step),
                weights=put(snap.weights),
                state={k: put(v) for k, v in snap.state.items()},
                lrs=snap.lrs.detach().to(dtype=torch.float64, device="cpu", copy=True),
                opt_step=int(snap.opt_step),
            )
        )

    @torch.no_grad()
    def translate_(self, dw: Tensor, dstate: dict[str, Tensor] | None = None) -> None:
        """Shift every stored snapshot by ``dw`` (shape ``(P,)``), and state by ``dstate``, in place.

        After a jump the run continues from displaced weights; shifting the window keeps its velocities (the
        information the field is fitted on) while making its last snapshot the weights the run now has.
        """
        dw = dw.to(device=self.device, dtype=self.dtype)
        for s in self._snaps:
            s.weights.add_(dw)
            for name, d in (dstate or {}).items():
                s.state[name].add_(d.to(device=self.device, dtype=self.dtype))

    @property
    def steps(self) -> list[int]:
        """Global steps of the stored snapshots, oldest first."""
        return [s.step for s in self._snaps]

    def weights(self, device=None, dtype=torch.float32) -> Tensor:
        """All stored weights, shape ``(K, P)``."""
        return torch.stack([s.weights.to(device=device, dtype=dtype) for s in self._snaps])

    def state(self, name: str, device=None, dtype=torch.float32) -> Tensor:
        """Optimizer state ``name`` of every snapshot, shape ``(K, P)``."""
        return torch.stack([s.state[name].to(device=device, dtype=dtype) for s in self._snaps])

    def lrs(self) -> Tensor:
        """Learning rates, shape ``(K, G)``, float64."""
        return torch.stack([s.lrs for s in self._snaps])

    @property
    def nbytes(self) -> int:
        """Bytes held by all stored snapshots."""
        return sum(s.nbytes for s in self._snaps)

    def state_dict(self) -> dict:
        """Plain values and tensors only, so Lightning can reload it with ``weights_only=True``."""
        return {
            "capacity": self.capacity,
            "snapshots": [
                {
                    "step": s.step,
                    "weights": s.weights,
                    "state": dict(s.state),
                    "lrs": s.lrs,
                    "opt_step": s.opt_step,
                }
                for s in self._snaps
            ],
        }

    def load_state_dict(self, state: dict) -> None:
        """Restore from :meth:`state_dict` (the capacity configured now wins)."""
        self._snaps.clear()
        for s in state.get("snapshots", []):
            self.append(
                Snapshot(
                    step=s["step"],
                    weights=s["weights"],
                    state=s.get("state", {}),
                    lrs=s["lrs"],
                    opt_step=s.get("opt_step", 0),
                )
            )
