"""Flat views of a module's trainable parameters and of an optimizer's per-parameter state.

Everything the forecaster works on is a flat vector of shape ``(P,)`` where ``P`` is the number of tracked
scalars. :class:`ParamSpec` is the map between that vector and the live ``torch.nn.Parameter`` objects.
Weights are always written back in place (``p.detach().copy_``), so the optimizer, DDP buckets and anybody
else holding a reference to a parameter keep seeing the same tensor.

Sharded parameters (``DTensor``, e.g. FSDP2's ``fully_shard`` under Lightning's ``ModelParallelStrategy``) are
tracked by their *local* shard: the flat vector holds this rank's scalars only, and writes go into the shard's
local tensor in place. Nothing is gathered.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

#: Per-parameter roles, used as a categorical feature by the field. The index is the feature column.
ROLES: tuple[str, ...] = ("matrix", "bias", "vector", "embedding")


def is_sharded(t: object) -> bool:
    """Whether ``t`` is a ``DTensor`` (a sharded or replicated parameter or optimizer state)."""
    # no DTensor can exist before its module is imported; importing it here would cost half a second
    dtensor = sys.modules.get("torch.distributed.tensor")
    return dtensor is not None and isinstance(t, dtensor.DTensor)


def local(t: Tensor) -> Tensor:
    """This rank's local tensor of ``t`` (a view sharing its storage) for a ``DTensor``; ``t`` itself otherwise."""
    return t.to_local() if is_sharded(t) else t


def _check_owned(name: str, p: Tensor, world_size: int) -> None:
    """Refuse a parameter whose scalars are not each held by exactly one rank (see docs/distributed.md)."""
    if not is_sharded(p):
        if world_size > 1:
            raise ValueError(
                f"Per-shard GFM needs every tracked parameter sharded so that each scalar lives on exactly one rank; "
                f"parameter `{name}` is a plain tensor, replicated on all {world_size} ranks. Apply `fully_shard` "
                "to the whole model (e.g. `fully_shard(model)` last in `configure_model`), or use strategy='ddp'."
            )
        return
    mesh, placements = p.device_mesh, tuple(p.placements)
    copies = world_size // max(mesh.size(), 1)
    for dim, placement in enumerate(placements):
        if placement.is_partial():
            raise ValueError(
                f"Per-shard GFM reads each rank's local shard as the parameter's values, which needs `Shard` or "
                f"`Replicate` placements; parameter `{name}` has placements {placements}."
            )
        if placement.is_replicate():
            copies *= mesh.size(dim)
    if copies != 1:
        raise ValueError(
            f"Per-shard GFM needs each scalar on exactly one rank (placements `Shard(d)` on a mesh of all "
            f"{world_size} ranks, `Replicate` only on mesh dimensions of size 1); parameter `{name}` with "
            f"placements {placements} on a mesh of shape {tuple(mesh.shape)} is held by {copies} ranks. "
            "Replicated shards (HSDP, tensor parallelism leaving parameters replicated) are not supported: "
            "see docs/distributed.md."
        )


def _role(name: str, p: Tensor) -> int:
    if "emb" in name.lower():
        return ROLES.index("embedding")
    if p.ndim >= 2:
        return ROLES.index("matrix")
    if name.endswith("bias"):
        return ROLES.index("bias")
    return ROLES.index("vector")


@dataclass
class ParamSpec:
    """The tracked parameters, in a fixed order, and where each lives in the flat vector.

    Attributes:
        names: parameter names, as ``module.named_parameters()`` gives them.
        params: the live parameters (only those with ``requires_grad``), the keys of ``optimizer.state``; for a
            sharded model the ``DTensor`` parameters (:attr:`tensors` are their local shards).
        offsets: start of each parameter (its local shard) in the flat vector; ``offsets[-1] == numel``.
        groups: index of the optimizer param group that owns each parameter (``0`` without an optimizer).
        roles: index into :data:`ROLES` for each parameter.
    """

    names: list[str]
    params: list[Tensor]
    offsets: list[int]
    groups: list[int]
    roles: list[int]

    @classmethod
    def from_module(cls, module: torch.nn.Module, optimizer: torch.optim.Optimizer | None = None) -> ParamSpec:
        """Track every parameter of ``module`` with ``requires_grad=True``, in ``named_parameters`` order.

        Args:
            module: the model.
            optimizer: when given, each parameter's param group is looked up; trainable parameters the
                optimizer does not hold are not tracked (they never move).

        Raises:
            ValueError: if no trainable parameter is left to track, or (sharded parameters, ``DTensor``) if a
                scalar would not live on exactly one rank (a replicated or partial placement).
        """
        group_of: dict[int, int] = {}
        if optimizer is not None:
            for gi, group in enumerate(optimizer.param_groups):
                for p in group["params"]:
                    group_of[id(p)] = gi
        names, params, groups, roles, offsets = [], [], [], [], [0]
        for name, p in module.named_parameters():
            if not p.requires_grad or (optimizer is not None and id(p) not in group_of):
                continue
            names.append(name)
            params.append(p)
            groups.append(group_of.get(id(p), 0))
            roles.append(_role(name, p))
            offsets.append(offsets[-1] + local(p).numel())
        if not params:
            raise ValueError(
                "`module` has no trainable parameter held by the optimizer: nothing to forecast. "
                "Check `requires_grad` and the parameters passed to `configure_optimizers`."
            )
        if any(is_sharded(p) for p in params):
            dist = torch.distributed
            world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
            for name, p in zip(names, params, strict=True):
                _check_owned(name, p, world)
        return cls(names=names, params=params, offsets=offsets, groups=groups, roles=roles)

    @property
    def numel(self) -> int:
        """Number of tracked scalars ``P`` (this rank's local ones when the parameters are sharded)."""
        return self.offsets[-1]

    @property
    def sharded(self) -> bool:
        """Whether the parameters are ``DTensor`` shards (each rank then tracks only its local scalars)."""
        return any(is_sharded(p) for p in self.params)

    @property
    def tensors(self) -> list[Tensor]:
        """The tensors the flat vector covers: the parameters, or their local shards (views) when sharded."""
        return [local(p) for p in self.params]

    @property
    def device(self) -> torch.device:
        """Device of the first tracked parameter (the model's device)."""
        return local(self.params[0]).device

    def flatten(self, tensors: Iterable[Tensor] | None = None, device=None, dtype=None) -> Tensor:
        """Concatenate the parameters (or per-parameter tensors in the same order) into shape ``(P,)``.

        Args:
            tensors: tensors shaped like the parameters (``DTensor`` ones are read through their local shard);
                defaults to the parameters themselves.
            device: target device, defaults to the tensors' own.
            dtype: target dtype, defaults to the tensors' own.

        Returns:
            A new tensor of shape ``(P,)`` (always a copy, never a view of a parameter).
        """
        tensors = self.params if tensors is None else tensors
        parts = [local(t).detach().reshape(-1).to(device=device, dtype=dtype) for t in tensors]
        flat = torch.cat(parts)
        if len(parts) == 1 and flat.data_ptr() == parts[0].data_ptr():
            flat = flat.clone()
        return flat

    def unflatten(self, flat: Tensor) -> list[Tensor]:
        """Views of ``flat`` (shape ``(P,)``) shaped like each parameter (its local shard when sharded)."""
        self._check(flat, "flat")
        bounds = zip(self.tensors, self.offsets[:-1], self.offsets[1:], strict=False)
        return [flat[a:b].view_as(p) for p, a, b in bounds]

    @torch.no_grad()
    def write_(self, flat: Tensor, targets: Sequence[Tensor] | None = None) -> None:
        """Copy ``flat`` (shape ``(P,)``) into the parameters (or ``targets``) in place.

        The parameter objects are not replaced, so ``id(p)`` and every reference to them stay valid; a sharded
        parameter's local shard is written (``DTensor`` targets likewise).
        """
        targets = self.params if targets is None else targets
        for t, view in zip(targets, self.unflatten(flat), strict=False):
            local(t).detach().copy_(view)

    def group_index(self, device=None, dtype: torch.dtype = torch.long) -> Tensor:
        """Param-group index of every scalar, shape ``(P,)``, dtype ``dtype``."""
        sizes = torch.tensor([b - a for a, b in zip(self.offsets[:-1], self.offsets[1:], strict=False)])
        return torch.repeat_interleave(torch.tensor(self.groups).to(dtype), sizes).to(device)

    def role_index(self, device=None, dtype: torch.dtype = torch.long) -> Tensor:
        """Role (index into :data:`ROLES`) of every scalar, shape ``(P,)``, dtype ``dtype``."""
        sizes = torch.tensor([b - a for a, b in zip(self.offsets[:-1], self.offsets[1:], strict=False)])
        return torch.repeat_interleave(torch.tensor(self.roles).to(dtype), sizes).to(device)

    def tensor_index(self, device=None, dtype: torch.dtype = torch.long) -> Tensor:
        """Index of the parameter tensor each scalar belongs to, shape ``(P,)``, dtype ``dtype``."""
        sizes = torch.tensor([b - a for a, b in zip(self.offsets[:-1], self.offsets[1:], strict=False)])
        return torch.repeat_interleave(torch.arange(len(self.params)).to(dtype), sizes).to(device)

    def _check(self, flat: Tensor, name: str) -> None:
        if flat.ndim != 1 or flat.numel() != self.numel:
            raise ValueError(f"`{name}` must have shape ({self.numel},), got {tuple(flat.shape)}.")


def per_tensor_rms(flat: Tensor, index: Tensor, n: int, eps: float = 1e-12) -> Tensor:
    """Root mean square of ``flat`` within each parameter tensor, broadcast back to every scalar.

    Args:
        flat: values, shape ``(P,)``.
        index: tensor index of every scalar (:meth:`ParamSpec.tensor_index`), shape ``(P,)``.
        n: number of tensors.
        eps: floor added under the root.

    Returns:
        Shape ``(P,)``: each scalar gets the RMS of its own tensor.
    """
    sq = torch.zeros(n, dtype=flat.dtype, device=flat.device).index_add_(0, index, flat * flat)
    cnt = torch.zeros(n, dtype=flat.dtype, device=flat.device).index_add_(0, index, torch.ones_like(flat))
    return (sq / cnt.clamp_min(1) + eps).sqrt()[index]


def step_count(optimizer: torch.optim.Optimizer, spec: ParamSpec) -> int:
    """The optimizer's own step counter (Adam's ``step``), or 0 where it keeps none."""
    for p in spec.params:
        step = optimizer.state.get(p, {}).get("step")
        if step is not None:
            return int(local(step).item() if isinstance(step, Tensor) else step)
    return 0
