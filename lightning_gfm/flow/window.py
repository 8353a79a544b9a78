"""The recorded window as tensors, the anchor context, and the optimizer-aware vector field they define.

Notation (shared by fitting and forecasting): snapshots ``0..K-1`` at steps ``s_k``; velocities
``u_k = (w_{k+1} - w_k) / (s_{k+1} - s_k)``, shape ``(K-1, P)``; an *anchor* ``a`` is the snapshot a forecast
starts from; ``tau`` is time since the anchor in record intervals.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

import torch
from torch import Tensor

from lightning_gfm.dynamics import Dynamics
from lightning_gfm.flow.field import FieldConfig, GradientField, dynamic_features, static_features
from lightning_gfm.params import ParamSpec, per_tensor_rms
from lightning_gfm.trajectory import TrajectoryBuffer


def _velocity_scales(u: Tensor, tensor_index: Tensor, n_tensors: int) -> tuple[Tensor, Tensor]:
    """RMS velocity of each scalar over ``u`` (shape ``(K-1, P)``) and its RMS within each tensor, both ``(P,)``."""
    u_rms = (u.pow(2).mean(0) + 1e-30).sqrt()
    return u_rms, per_tensor_rms(u_rms, tensor_index, n_tensors, 1e-30)


def _tensor_rms(w: Tensor, tensor_index: Tensor, offsets: list[int], eps: float) -> Tensor:
    """RMS of each row of ``w`` (shape ``(K, P)``) within each parameter tensor, shape ``(K, n_tensors)``.

    One ``index_add_`` over all rows; the same sums, in the same order, as :func:`per_tensor_rms` row by row.
    """
    sizes = torch.tensor([b - a for a, b in zip(offsets[:-1], offsets[1:], strict=True)], dtype=w.dtype)
    sq = torch.zeros(w.shape[0], len(sizes), dtype=w.dtype, device=w.device).index_add_(1, tensor_index, w * w)
    return (sq / sizes.to(w.device).clamp_min(1) + eps).sqrt()


def shard_sums_size(k: int, n_tensors: int) -> int:
    """Values in the one message :meth:`Window.from_buffer` sums over the ranks for ``k`` snapshots."""
    return (2 * k) * n_tensors


def _shard_sums(w: Tensor, u: Tensor, tensor_index: Tensor, n: int, reduce: Callable[[Tensor], Tensor]):
    """Per-tensor sums over all ranks' shards: ``u**2`` per row ``(K-1, n)``, ``w**2`` per row ``(K, n)``, counts.

    One message of :func:`shard_sums_size` values (float64) through ``reduce`` (a sum over the ranks).
    """
    u_sq = torch.zeros(u.shape[0], n, dtype=u.dtype, device=u.device).index_add_(1, tensor_index, u * u)
    w_sq = torch.zeros(w.shape[0], n, dtype=w.dtype, device=w.device).index_add_(1, tensor_index, w * w)
    count = torch.zeros(n, dtype=w.dtype, device=w.device).index_add_(0, tensor_index, torch.ones_like(w[0]))
    total = reduce(torch.cat([u_sq.reshape(-1), w_sq.reshape(-1), count]).double()).to(w.device)
    a, b = u_sq.numel(), u_sq.numel() + w_sq.numel()
    return total[:a].view_as(u_sq), total[a:b].view_as(w_sq), total[b:]


def _u_rms_tensor_from_sums(u_sq: Tensor, count: Tensor, tensor_index: Tensor, dtype) -> Tensor:
    """:func:`_velocity_scales`' per-tensor RMS of ``u_rms`` from whole-tensor sums (``(K-1, n)``, ``(n,)``)."""
    mean_sq = (u_sq.sum(0) / u_sq.shape[0] + count * 1e-30) / count.clamp_min(1)  # mean over the tensor of u_rms**2
    return (mean_sq + 1e-30).sqrt().to(dtype)[tensor_index.to(u_sq.device)].to(tensor_index.device)


def _as_slice(i: Tensor) -> slice | Tensor:
    """``i`` (shape ``(B,)``) as a slice when it is a contiguous increasing range (indexing then makes views)."""
    if i.numel() == 0:
        return i
    lo, hi = int(i[0]), int(i[-1]) + 1
    if hi - lo != i.numel() or not torch.equal(i, torch.arange(lo, hi, device=i.device, dtype=i.dtype)):
        return i
    return slice(lo, hi)


@dataclass
class Window:
    """Tensors of a recorded window (on the buffer's device, float32).

    Attributes:
        steps: global step of each snapshot, shape ``(K,)`` (float64).
        w: weights, shape ``(K, P)`` (float32, or the buffer's storage dtype in a lean window).
        state: optimizer state by name, each ``(K_s, P)``: the last ``K_s <= K`` snapshots' (all of them unless
            the buffer keeps fewer state rows); index it from the end.
        lrs: learning rate of each group, shape ``(K, G)`` (float64).
        opt_steps: optimizer step counter of each snapshot, shape ``(K,)``.
        u: velocities between consecutive snapshots, shape ``(K-1, P)`` (``None`` in a lean window).
        u_rms: RMS velocity of each scalar over the window, shape ``(P,)``.
        u_rms_tensor: RMS of ``u_rms`` within each scalar's tensor, shape ``(P,)``.
        w_rms_tensor: RMS of the weights within each tensor, per snapshot, shape ``(K, n_tensors)``.
        roles, tensor_index, group_index: per-scalar indices, shape ``(P,)``.
        interval: median steps between snapshots.
        progress: fraction of planned training done at each snapshot, shape ``(K,)`` (zeros when unknown).
        u_sq_tensor: with sharded parameters, each tensor's sum of ``u**2`` over all ranks' shards per velocity,
            shape ``(K-1, n_tensors)`` (float64), so that :meth:`head` recomputes whole-tensor scales without
            another collective; ``None`` otherwise.
        tensor_count: with sharded parameters, each tensor's number of scalars over all ranks, ``(n_tensors,)``.
    """

    steps: Tensor
    w: Tensor
    state: dict[str, Tensor]
    lrs: Tensor
    opt_steps: Tensor
    u: Tensor | None
    u_rms: Tensor
    u_rms_tensor: Tensor
    w_rms_tensor: Tensor
    roles: Tensor
    tensor_index: Tensor
    group_index: Tensor
    interval: float
    progress: Tensor
    u_sq_tensor: Tensor | None = None
    tensor_count: Tensor | None = None

    @classmethod
    def from_buffer(
        cls,
        buffer: TrajectoryBuffer,
        spec: ParamSpec,
        state_names,
        total_steps: int | None = None,
        reduce: Callable[[Tensor], Tensor] | None = None,
        lean: bool = False,
    ) -> Window:
        """Build the window from ``buffer``; needs at least two snapshots.

        Args:
            buffer: the recorded snapshots.
            spec: the tracked parameters (the buffer's flat layout).
            state_names: optimizer state to read.
            total_steps: planned training length (for the progress feature), if known.
            reduce: with sharded parameters (each rank holds a shard of every tensor), sums a float64 message of
                :func:`shard_sums_size` values over the ranks, so that the per-tensor scales (``u_rms_tensor``,
                ``w_rms_tensor``) are those of the whole tensors, not of the local shards; ``None``: local.
            lean: read the weights and states in place, in the buffer's storage dtype (:meth:`lean_from_buffer`):
                what a forecast from the latest snapshot with the prior needs, without a model-sized copy per
                snapshot. Not with ``reduce``.
        """
        if len(buffer) < 2:
            raise ValueError(f"A window needs at least 2 snapshots, the buffer holds {len(buffer)}.")
        if lean and reduce is None:
            return cls.lean_from_buffer(buffer, spec, total_steps)
        dev = buffer.device
        steps = torch.tensor(buffer.steps, dtype=torch.float64)
        w = buffer.weights(device=dev)  # the one float32 copy of the window's weights
        dt = (steps[1:] - steps[:-1]).to(torch.float32).to(dev).unsqueeze(1)
        u = torch.sub(w[1:], w[:-1]).div_(dt)
        tindex = spec.tensor_index(dev)
        n = len(spec.params)
        u_rms, u_rms_tensor = _velocity_scales(u, tindex, n)
        w_rms_tensor, u_sq_tensor, tensor_count = None, None, None
        if reduce is not None:
            u_sq_tensor, w_sq, tensor_count = _shard_sums(w, u, tindex, n, reduce)
            u_rms_tensor = _u_rms_tensor_from_sums(u_sq_tensor, tensor_count, tindex, u.dtype)
            w_rms_tensor = (w_sq / tensor_count.clamp_min(1) + 1e-12).sqrt().to(w.dtype)
        else:
            w_rms_tensor = _tensor_rms(w, tindex, spec.offsets, 1e-12)
        progress = steps / total_steps if total_steps else torch.zeros_like(steps)
        return cls(
            steps=steps,
            w=w,
            state={name: buffer.state(name, device=dev) for name in state_names},
            lrs=buffer.lrs(),
            opt_steps=torch.tensor(buffer.opt_steps, dtype=torch.float64),
            u=u,
            u_rms=u_rms,
            u_rms_tensor=u_rms_tensor,
            w_rms_tensor=w_rms_tensor,
            roles=spec.role_index(dev),
            tensor_index=tindex,
            group_index=spec.group_index(dev),
            interval=float((steps[1:] - steps[:-1]).median()),
            progress=progress.clamp(0, 1).to(torch.float32),
            u_sq_tensor=u_sq_tensor,
            tensor_count=tensor_count,
        )

    @classmethod
    def lean_from_buffer(
        cls, buffer: TrajectoryBuffer, spec: ParamSpec, total_steps: int | None = None, chunk: int = 1 << 20
    ) -> Window:
        """The window as views of the buffer's storage (oldest first, no copy of a snapshot), for the prior.

        ``w`` and ``state`` are the buffer's rows in its storage dtype (readers convert the scalars they take to
        float32); ``state`` holds the rows the buffer keeps (the latest snapshot's alone when it keeps one), so
        it is indexed from the end (``v[row - K]``). The velocities are not materialised (``u`` is ``None``):
        their per-scalar RMS is accumulated ``chunk`` scalars at a time in float32, the same values as
        :meth:`from_buffer`'s up to summation order (the per-tensor sums too, over views of each tensor's range:
        a scatter over every scalar costs several times more). ``roles`` is empty (only the network's features read it);
        the per-scalar indices are int32. The views change when the buffer records again.
        """
        if len(buffer) < 2:
            raise ValueError(f"A window needs at least 2 snapshots, the buffer holds {len(buffer)}.")
        w, state = buffer.ordered_()
        dev = w.device
        steps = torch.tensor(buffer.steps, dtype=torch.float64)
        dt = (steps[1:] - steps[:-1]).to(torch.float32)
        sizes = torch.tensor([b - a for a, b in zip(spec.offsets[:-1], spec.offsets[1:], strict=True)])
        tindex, gindex = spec.tensor_index(dev, torch.int32), spec.group_index(dev, torch.int32)
        n, k, p = len(spec.params), w.shape[0], w.shape[1]
        u_rms = torch.zeros(p, dtype=torch.float32, device=dev)
        w_sq = torch.zeros(k, n, dtype=torch.float32, device=dev)
        for lo in range(0, p, chunk):
            hi = min(lo + chunk, p)
            # the parameter tensors this chunk holds (contiguous ranges): sums over views, not a scatter
            ids = [t for t in range(n) if spec.offsets[t] < hi and spec.offsets[t + 1] > lo]
            pieces = [min(hi, spec.offsets[t + 1]) - max(lo, spec.offsets[t]) for t in ids]

            def square_sums(x: Tensor, pieces=pieces) -> Tensor:
                return torch.stack([piece.square().sum() for piece in x.split(pieces)])

            prev = w[0, lo:hi].float()
            w_sq[0, ids] += square_sums(prev)
            acc = u_rms[lo:hi]
            for r in range(1, k):
                cur = w[r, lo:hi].float()
                w_sq[r, ids] += square_sums(cur)
                acc.add_(torch.sub(cur, prev).div_(float(dt[r - 1])).pow_(2))
                prev = cur
        u_rms.div_(k - 1).add_(1e-30).sqrt_()
        w_rms_tensor = (w_sq / sizes.to(dev, torch.float32).clamp_min(1) + 1e-12).sqrt()
        progress = steps / total_steps if total_steps else torch.zeros_like(steps)
        return cls(
            steps=steps,
            w=w,
            state=state,
            lrs=buffer.lrs(),
            opt_steps=torch.tensor(buffer.opt_steps, dtype=torch.float64),
            u=None,
            u_rms=u_rms,
            u_rms_tensor=per_tensor_rms(u_rms, tindex, n, 1e-30),
            w_rms_tensor=w_rms_tensor,
            roles=torch.zeros(0, dtype=torch.int32, device=dev),
            tensor_index=tindex,
            group_index=gindex,
            interval=float((steps[1:] - steps[:-1]).median()),
            progress=progress.clamp(0, 1).to(torch.float32),
        )

    def head(self, n: int) -> Window:
        """The window of the first ``n`` snapshots, its scales recomputed from those alone (no look-ahead)."""
        if not 2 <= n <= self.K:
            raise ValueError(f"`n` must be in [2, {self.K}], got {n}.")
        if self.u is None or any(v.shape[0] != self.K for v in self.state.values()):
            raise ValueError("`head` needs a full window (velocities and every snapshot's state): build it lean=False.")
        u = self.u[: n - 1]
        u_rms, u_rms_tensor = _velocity_scales(u, self.tensor_index, self.w_rms_tensor.shape[1])
        u_sq_tensor = None if self.u_sq_tensor is None else self.u_sq_tensor[: n - 1]
        if u_sq_tensor is not None:  # sharded: whole-tensor scales from the sums taken when the window was built
            u_rms_tensor = _u_rms_tensor_from_sums(u_sq_tensor, self.tensor_count, self.tensor_index, u.dtype)
        return replace(
            self,
            steps=self.steps[:n],
            w=self.w[:n],
            state={k: v[:n] for k, v in self.state.items()},
            lrs=self.lrs[:n],
            opt_steps=self.opt_steps[:n],
            u=u,
            u_rms=u_rms,
            u_rms_tensor=u_rms_tensor,
            w_rms_tensor=self.w_rms_tensor[:n],
            interval=float((self.steps[1:n] - self.steps[: n - 1]).median()),
            progress=self.progress[:n],
            u_sq_tensor=u_sq_tensor,
        )

    def recorded_lr_steps(self, start: int) -> Tensor:
        """Per-step learning rates from snapshot ``start`` to the last, from the recorded ones, ``(n + 1, G)``."""
        s = torch.arange(int(self.steps[-1] - self.steps[start]) + 1, dtype=torch.float64) + self.steps[start]
        row = torch.searchsorted(self.steps, s, right=True) - 1
        return self.lrs[row]

    @property
    def K(self) -> int:  # noqa: N802 - the maths' name
        """Number of snapshots."""
        return self.w.shape[0]

    @property
    def P(self) -> int:  # noqa: N802
        """Number of tracked scalars."""
        return self.w.shape[1]


@dataclass
class Context:
    """What the field knows at an anchor, for a batch of ``B`` scalars (everything shape ``(B,)``).

    Attributes:
        w0: weights at the anchor.
        state0: optimizer state at the anchor.
        g0_norm: gradient estimate over ``g_scale``.
        g_scale: gradient scale (the field's unit).
        lr0: learning rate at the anchor.
        k0: optimizer step counter at the anchor.
        u_scale: velocity scale of each scalar (its RMS velocity, floored by a tenth of its tensor's).
        static: static features, shape ``(B, n_static)`` (``None`` when built without them).
        dynamics: the dynamics restricted to these scalars.
        interval: steps between snapshots.
        noise: minibatch-gradient variance around ``g0`` implied by the optimizer's second moment (``None`` for
            families without one), held along the path.
    """

    w0: Tensor
    state0: dict[str, Tensor]
    g0_norm: Tensor
    g_scale: Tensor
    lr0: Tensor
    k0: Tensor
    u_scale: Tensor
    static: Tensor | None
    dynamics: Dynamics
    interval: float
    noise: Tensor | None = None


def anchor_context(
    win: Window,
    dyn: Dynamics,
    anchor: Tensor | int,
    idx: Tensor,
    history: int,
    device=None,
    anchor_mode="state",
    trend: int = 8,
    features: bool = True,
) -> Context:
    """Gather the anchor's context for scalars ``idx``.

    Args:
        win: the window.
        dyn: dynamics over all ``P`` scalars.
        anchor: anchor snapshot, an int or one per scalar (shape ``(B,)``); must be ``>= history``.
        idx: scalar indices, shape ``(B,)``.
        history: number of past velocities used.
        device: where the context lives (the model's device).
        anchor_mode: ``"state"``, ``"velocity"`` or ``"trend"`` (see :class:`~lightning_gfm.flow.field.FieldConfig`).
        trend: snapshots in the least-squares line of ``anchor_mode="trend"``.
        features: build the network's static features; ``False`` leaves ``static`` as ``None`` (enough for a
            field whose output is constant, :meth:`~lightning_gfm.flow.field.GradientField.constant_output`,
            and the larger part of the cost otherwise).
    """
    a = torch.as_tensor(anchor, device=win.w.device)
    first = FieldConfig(history=history, anchor=anchor_mode, trend=trend).min_anchor
    if int(a.min()) < first:
        raise ValueError(f"An anchor needs {first} earlier snapshots; got anchor {int(a.min())}.")
    i = idx.to(win.w.device)
    # a forecast's chunks are contiguous ranges with one anchor: read them as views, not gathers
    cols = _as_slice(i) if a.ndim == 0 else i
    row = int(a) if isinstance(cols, slice) else a
    d = dyn.restrict(cols)

    def g(t: Tensor) -> Tensor:
        return t.to(device)

    def g32(t: Tensor) -> Tensor:  # a lean window holds the buffer's storage dtype
        return t.to(device=device, dtype=torch.float32)

    w0 = g32(win.w[row, cols])
    state0 = {n: g32(v[row - win.K, cols]) for n, v in win.state.items()}  # states are kept for the last rows
    group = win.group_index[cols]
    lr0 = g(win.lrs.to(win.w.device)[a, group].float())
    k0 = g(win.opt_steps.to(win.w.device)[a].float().expand_as(w0))
    u_rms = g(win.u_rms[cols])
    hist = None
    if features or anchor_mode != "trend":
        if win.u is None:
            raise ValueError("This window was built lean (no velocities); build it with `lean=False` for features.")
        hist = torch.stack([g(win.u[row - history + r, cols]) for r in range(history)])
    if anchor_mode == "trend":
        w0, slope = _trend(win, a, cols if a.ndim == 0 else i, trend)
        w0, slope = g(w0), g(slope)
        g0 = d.gradient_from_velocity(w0, state0, slope, lr0, k0)
    elif anchor_mode == "velocity":
        g0 = d.gradient_from_velocity(w0, state0, hist.mean(0), lr0, k0)
    else:
        g0 = d.gradient_estimate(w0, state0, hist[-1], lr0, k0)
    g_scale = d.gradient_scale(state0, u_rms, lr0, k0)
    g0_norm = g0 / g_scale
    static = None
    if features:
        static = static_features(
            hist=hist,
            u_rms=u_rms,
            u_rms_tensor=g(win.u_rms_tensor[cols]),
            w=w0,
            w_rms_tensor=g(win.w_rms_tensor[a, win.tensor_index[cols]]),
            g0_norm=g0_norm,
            progress=g(win.progress.to(win.w.device)[a].float()),
            roles=g(win.roles[cols]),
        )
    u_scale = u_rms + 0.1 * g(win.u_rms_tensor[cols])
    return Context(
        w0=w0,
        state0=state0,
        g0_norm=g0_norm,
        g_scale=g_scale,
        lr0=lr0,
        k0=k0,
        u_scale=u_scale,
        static=static,
        dynamics=d,
        interval=win.interval,
        noise=d.gradient_noise(w0, state0, g0, k0),
    )


def _trend(win: Window, a: Tensor, i: Tensor, n: int) -> tuple[Tensor, Tensor]:
    """Denoised position and velocity at snapshot ``a``: the least-squares line through ``a - n + 1 .. a``.

    The value at ``a`` is the line's (the mean of the snapshots moved along the line to ``a``); the slope is
    shrunk per scalar by its signal-to-noise ratio (for ``n > 2``).

    Args:
        win: the window.
        a: anchor snapshot, 0-dim or shape ``(B,)``.
        i: scalar indices, shape ``(B,)``, or a slice of them (read as views).
        n: points in the fit.

    Returns:
        ``(w, slope)``, each shape ``(B,)``; slope per optimizer step.
    """
    rows = [a - n + 1 + r for r in range(n)]
    w = torch.stack([win.w[r, i] for r in rows]).float()  # (n, B), float32 also from a lean window
    t = torch.stack([win.steps.to(win.w.device)[r] for r in rows]).to(torch.float64)  # (n,) or (n, B)
    dt = t - t.mean(0)
    dt = (dt if dt.dim() == 2 else dt.unsqueeze(1)).to(w.dtype)
    slope = (dt * (w - w.mean(0))).sum(0) / dt.pow(2).sum(0).clamp_min(1e-30)
    if n > 2:
        # Shrink each slope towards 0 by how well its own noise supports it. Noise model: a random walk, the
        # velocities between snapshots are drift + independent noise, so the slope's variance is about
        # var(u) / (n - 1); keep slope^2 / (slope^2 + var). A scalar that only wanders is not extrapolated.
        u = (w[1:] - w[:-1]) / (dt[1:] - dt[:-1])
        # var(0) spelled out: torch's column-wise var over a short first dim is ~20x slower on a CPU
        var = (u - u.mean(0)).pow_(2).sum(0) / ((n - 2) * (n - 1))
        slope = slope * slope.pow(2) / (slope.pow(2) + var).clamp_min(1e-30)
    return w.mean(0) + slope * dt[-1], slope


def field_velocity(
    field: GradientField,
    ctx: Context,
    embedded: Tensor,
    tau: Tensor,
    w: Tensor,
    state: dict[str, Tensor],
    lr: Tensor,
    k: Tensor,
) -> tuple[Tensor, dict[str, Tensor]]:
    """The optimizer-aware vector field: network -> gradient surrogate -> optimizer update rule.

    Args:
        field: the network.
        ctx: anchor context of these ``B`` scalars.
        embedded: ``field.embed(ctx.static)``, shape ``(B, hidden)``.
        tau: time since the anchor in record intervals, shape ``(B,)`` or scalar.
        w: current weights, shape ``(B,)``.
        state: current optimizer state, each ``(B,)``.
        lr: current learning rate, shape ``(B,)``.
        k: current optimizer step counter, shape ``(B,)`` or scalar.

    Returns:
        ``(dw/ds, dstate/ds)`` per optimizer step.
    """
    dyn, interval = ctx.dynamics, ctx.interval
    direction = dyn.direction(state, ctx.g_scale, k) if state else torch.zeros_like(w)
    reach = ctx.u_scale * (field.config.span * interval)
    dyn_feat = dynamic_features(tau / field.config.span, direction, lr / ctx.lr0.clamp_min(1e-30), (w - ctx.w0) / reach)
    g = field(embedded, dyn_feat, ctx.g0_norm) * ctx.g_scale
    return dyn.velocity(w, state, g, lr, k, noise=ctx.noise)
