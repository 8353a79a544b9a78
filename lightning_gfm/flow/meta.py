"""A flow-matching field meta-trained on many runs, and its forecast.

The field is optimizer-aware in the one way that holds for every torch optimizer: the learning rate multiplies
the update. It predicts each scalar's update per unit of learning rate, and the run's own, known learning-rate
schedule turns that into velocity:

    dw_i/dt(tau) = lr_i(tau) / lr_i(0) * r_i * sum_k c_ik phi_k(tau),

``tau`` steps after the anchor (the latest snapshot), ``r_i`` the scalar's recent motion per step rescaled to
the anchor's learning rate, ``c_i = C(context_i)`` from a per-scalar network and ``phi(tau)`` a shared learned
time basis. The context is what the run showed so far: the last ``history`` velocities of the scalar, each
rescaled by the learning rate it was taken at (so a decayed or warming-up schedule does not read as a slowing
or accelerating scalar), their scale relative to the tensor's, the weight relative to its tensor, training
progress, the optimizer family and the layer role.

Training is conditional flow matching on the recorded trajectories: a sample is a run, an anchor ``a``, a scalar,
a later segment ``j`` and a position ``theta`` on it; the conditional path between snapshots ``j`` and ``j + 1``
is the straight line, so the target is that segment's velocity, and the field's velocity at
``tau = s_j + theta (s_{j+1} - s_j) - s_a`` regresses onto it (Huber, in units of ``r_i``). Segments reach to
the end of each run, so one field forecasts any horizon.

Because ``phi`` depends on time only, the forecast ODE separates: integrating
``dz_g/dt = lr_g(t) / lr_g(0) * phi(t)`` (``G`` parameter groups x ``K`` basis functions) with torchdyn gives
every scalar's displacement as ``r_i * c_i . z_{g(i)}(tau)``. A forecast therefore costs one pass of the
per-scalar network over the model and a matrix product, whatever the horizon: it scales to models of any size.
"""

from __future__ import annotations

import dataclasses
import math
import random
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import torch
from torch import Tensor, nn

from lightning_gfm.dynamics import Dynamics
from lightning_gfm.flow.ode import integrate, time_grid
from lightning_gfm.flow.window import Window
from lightning_gfm.params import ROLES

#: Optimizer families the field knows (one-hot input); any other update rule gets an all-zero code.
META_FAMILIES: tuple[str, ...] = ("sgd", "momentum", "adam", "rmsprop")
_FAMILY_OF = {
    "SGDDynamics": "sgd",
    "MomentumDynamics": "momentum",
    "AdamDynamics": "adam",
    "RMSpropDynamics": "rmsprop",
}
N_TIME = 4
CLIP = 10.0


def family_of(dyn: Dynamics | str) -> str | None:
    """The :data:`META_FAMILIES` entry of an optimizer's dynamics (``None`` for the other update rules)."""
    if isinstance(dyn, str):
        return dyn if dyn in META_FAMILIES else None
    return _FAMILY_OF.get(type(dyn).__name__)


@dataclass(frozen=True)
class MetaConfig:
    """Shape of a :class:`MetaField`; travels with saved fields.

    Attributes:
        history: past velocities in each scalar's context (the window needs ``history + 1`` snapshots).
        hidden: width of the per-scalar network.
        depth: hidden layers of the per-scalar network (1 or more).
        basis: number of learned time-basis functions.
        time_hidden: width of the time-basis network.
        families: the optimizer families it was trained on; any other is given no family code, never the
            untrained input of a family it has not seen.
    """

    history: int = 7
    hidden: int = 32
    depth: int = 1
    basis: int = 8
    time_hidden: int = 32
    families: tuple[str, ...] = META_FAMILIES

    def __post_init__(self) -> None:
        object.__setattr__(self, "families", tuple(self.families))  # a JSON list when read back from a file

    @property
    def n_scalar(self) -> int:
        """Per-scalar continuous inputs: the velocities, their scale and the weight's."""
        return self.history + 2

    @property
    def n_anchor(self) -> int:
        """Inputs shared by every scalar of an anchor: progress, record interval, the family one-hot."""
        return 2 + len(META_FAMILIES)

    def to_dict(self) -> dict:
        return asdict(self)


class MetaField(nn.Module):
    """Per-scalar coefficients times a shared time basis (see the module docstring).

    The first layer takes the scalar's own inputs through a matrix, and adds a bias for the anchor (its progress,
    record interval and optimizer family, shared by all scalars) and one for the layer role (a table): the same
    affine map as one layer over all inputs, at the cost of the per-scalar inputs only.

    Args:
        config: the network's shape.
    """

    def __init__(self, config: MetaConfig | None = None) -> None:
        super().__init__()
        self.config = c = config or MetaConfig()
        if min(c.history, c.hidden, c.depth, c.basis, c.time_hidden) < 1:
            raise ValueError(f"`MetaConfig` needs every size >= 1, got {c}.")
        self.scalar_in = nn.Linear(c.n_scalar, c.hidden)
        self.anchor_in = nn.Linear(c.n_anchor, c.hidden, bias=False)
        self.role_in = nn.Embedding(len(ROLES), c.hidden)
        nn.init.normal_(self.role_in.weight, std=0.1)
        self.body = nn.ModuleList(nn.Linear(c.hidden, c.hidden) for _ in range(c.depth - 1))
        self.out = nn.Linear(c.hidden, c.basis)
        self.time = nn.Sequential(nn.Linear(N_TIME, c.time_hidden), nn.SiLU(), nn.Linear(c.time_hidden, c.basis))

    def features(self, inputs: MetaInputs) -> Tensor:
        """The last hidden layer's activations, shape ``(B, hidden)``."""
        bias = self.anchor_in(inputs.anchor)  # (hidden,)
        h = torch.addmm(self.scalar_in.bias + bias, inputs.scalar, self.scalar_in.weight.T)
        h = nn.functional.silu(h.add_(self.role_in(inputs.roles)))
        for layer in self.body:
            h = nn.functional.silu(layer(h))
        return h

    def coefficients(self, inputs: MetaInputs) -> Tensor:
        """Each scalar's basis coefficients, shape ``(B, basis)``."""
        return self.out(self.features(inputs))

    def phi(self, time_features: Tensor) -> Tensor:
        """The time basis, shape ``(..., basis)`` from :func:`time_features` ``(..., N_TIME)``."""
        return self.time(time_features)


def time_features(tau: Tensor, s_a: float | Tensor, total: float | Tensor, interval: float | Tensor) -> Tensor:
    """Inputs of the time basis at ``tau`` steps after an anchor at step ``s_a`` of a ``total``-step run.

    Args:
        tau: shape ``(...)``.
        s_a: the anchor's step (a scalar or broadcastable to ``tau``, as the next two).
        total: the run's planned steps.
        interval: steps between snapshots.

    Returns:
        Shape ``(..., N_TIME)``: ``tau / total``, ``tau`` over the steps left (clipped at 2), ``log1p(tau /
        interval) / log(65)`` and the anchor's progress.
    """
    tau = torch.as_tensor(tau, dtype=torch.float32)
    s_a, total, interval = (torch.as_tensor(v, dtype=torch.float32, device=tau.device) for v in (s_a, total, interval))
    left = (total - s_a).clamp_min(interval)
    cols = [tau / total, (tau / left).clamp(max=2.0), torch.log1p(tau / interval) / math.log(65.0), s_a / total]
    return torch.stack([torch.broadcast_to(c, tau.shape) for c in cols], dim=-1)


@dataclass
class MetaInputs:
    """A batch of scalars' contexts at one anchor.

    Attributes:
        scalar: the scalars' own inputs, shape ``(B, n_scalar)``: the last ``history`` velocities at the anchor's
            learning rate in units of ``r`` (oldest first), ``log(r / r_tensor)`` and the weight over its
            tensor's RMS, each clipped to ``[-CLIP, CLIP]``.
        anchor: inputs shared by the batch, shape ``(n_anchor,)``: progress, record interval over the planned
            steps, the optimizer family's one-hot.
        roles: layer role index of each scalar, shape ``(B,)``.
        scale: ``r``, each scalar's recent velocity per step at the anchor's learning rate, shape ``(B,)``.
        lr0: the anchor's learning rate of each scalar, shape ``(B,)``.
        group: each scalar's param group, shape ``(B,)``.
    """

    scalar: Tensor
    anchor: Tensor
    roles: Tensor
    scale: Tensor
    lr0: Tensor
    group: Tensor


def _rescaled_velocities(win: Window, anchor: int, cols, history: int, device) -> tuple[Tensor, Tensor, Tensor]:
    """Per-step velocities of the last ``history`` intervals at the anchor's lr ``(history, B)``, that lr, groups.

    Velocities taken at another learning rate are rescaled by the ratio of the rates (so a decaying or warming-up
    schedule does not read as a slowing or accelerating scalar).
    """
    lo = anchor - history
    w = win.w[lo : anchor + 1, cols]
    w = w.to(device=device, dtype=torch.float32) if w.dtype != torch.float32 or w.device != device else w
    ds = (win.steps[lo + 1 : anchor + 1] - win.steps[lo:anchor]).to(torch.float32)
    lrs = win.lrs.to(torch.float32)
    lr_then, lr_now = lrs[lo:anchor], lrs[anchor]  # (history, G), (G,)
    per_step = torch.where(lr_then > 0, lr_now / lr_then.clamp_min(1e-30), torch.zeros_like(lr_then))
    per_step = per_step / ds.unsqueeze(1)  # (history, G): rescaling and 1 / interval length at once
    group = win.group_index[cols].to(device=device, dtype=torch.long)
    vel = torch.diff(w, dim=0)
    if lrs.shape[1] == 1 or bool((per_step == per_step[:, :1]).all()):
        vel.mul_(per_step[:, :1].to(device))
        lr0 = lr_now[0].to(device).expand(vel.shape[1])
    else:
        vel.mul_(per_step.to(device)[:, group])
        lr0 = lr_now.to(device)[group]
    return vel, lr0, group


def meta_inputs(
    win: Window,
    anchor: int,
    cols: Tensor | slice,
    family: str | None,
    history: int,
    total_steps: float | None,
    tensor_scale: Tensor,
    roles: Tensor,
    device=None,
) -> MetaInputs:
    """The contexts of scalars ``cols`` at snapshot ``anchor`` of ``win`` (needs ``anchor >= history``).

    Args:
        win: the recorded window (any storage dtype: the rows read are converted to float32).
        anchor: index of the anchor snapshot.
        cols: the scalars (an index tensor or a slice).
        family: a :data:`META_FAMILIES` entry, or ``None``.
        history: velocities in the context.
        total_steps: the run's planned steps (``None``: unknown, taken as twice the anchor's step).
        tensor_scale: :func:`tensor_scales` of the whole model at this anchor, shape ``(n_tensors,)``.
        roles: role index of every scalar of the model, shape ``(P,)``.
        device: where to compute.
    """
    if anchor < history:
        raise ValueError(f"A meta-field context needs {history + 1} snapshots up to the anchor, got {anchor + 1}.")
    device = torch.device(device) if device is not None else win.w.device
    vel, lr0, group = _rescaled_velocities(win, anchor, cols, history, device)
    tindex = win.tensor_index[cols].to(device=device, dtype=torch.long)
    r_tensor = tensor_scale.to(device)[tindex]
    r = vel.square().mean(0).sqrt_().add_(r_tensor, alpha=0.1).add_(1e-20)
    w0 = win.w[anchor, cols].to(device=device, dtype=torch.float32)
    w_rms = win.w_rms_tensor[anchor].to(device=device, dtype=torch.float32)[tindex]
    scalar = torch.empty(vel.shape[1], history + 2, device=device)
    torch.div(vel.T, r.unsqueeze(1), out=scalar[:, :history])
    torch.div(r, r_tensor.add(1e-30), out=scalar[:, history]).log_()
    torch.div(w0, w_rms.add_(1e-12), out=scalar[:, history + 1])
    scalar.nan_to_num_(0.0).clamp_(-CLIP, CLIP)
    s_a = float(win.steps[anchor])
    total = float(total_steps) if total_steps else 2.0 * s_a
    fam = [1.0 if family == f else 0.0 for f in META_FAMILIES]
    anchor_feats = torch.tensor([s_a / total, win.interval / total, *fam], device=device)
    role = roles[cols.to(roles.device) if isinstance(cols, Tensor) else cols].to(device=device, dtype=torch.long)
    return MetaInputs(scalar, anchor_feats, role, r, lr0, group)


def tensor_scales(win: Window, anchor: int, history: int, chunk: int = 1 << 20, device=None) -> Tensor:
    """RMS over each tensor of the scalars' rescaled recent velocity (the unit of ``log(r / r_tensor)``).

    A pass over the model ``chunk`` scalars at a time; shape ``(n_tensors,)``.
    """
    device = torch.device(device) if device is not None else win.w.device
    n = int(win.w_rms_tensor.shape[1])
    sq = torch.zeros(n, device=device)
    cnt = torch.zeros(n, device=device)
    for lo in range(0, win.P, chunk):
        cols = slice(lo, min(lo + chunk, win.P))
        vel, _, _ = _rescaled_velocities(win, anchor, cols, history, device)
        tindex = win.tensor_index[cols].to(device=device, dtype=torch.long)
        sq.index_add_(0, tindex, vel.square().mean(0))
        cnt.index_add_(0, tindex, torch.ones_like(vel[0]))
    return (sq / cnt.clamp_min(1)).sqrt()


# ------------------------------------------------------------------------------------------------- forecast
def basis_integrals(
    field: MetaField,
    lr_steps: Tensor,
    horizons: Sequence[int],
    s_a: float,
    total: float,
    interval: float,
    solver: str = "rk4",
    device=None,
) -> Tensor:
    """``z_g(h) = int_0^h lr_g(t) / lr_g(0) phi(t) dt`` at each horizon, integrated with torchdyn.

    Args:
        field: the meta-trained field.
        lr_steps: learning rate of each group for the next steps, shape ``(n + 1, G)``, row ``s`` used by the
            ``s``-th next step; rows past the end repeat the last.
        horizons: positive increasing step counts.
        s_a: the anchor's step.
        total: the run's planned steps.
        interval: steps between snapshots.
        solver: a fixed-step solver of :mod:`lightning_gfm.flow.ode`.
        device: where to integrate.

    Returns:
        Shape ``(H + 1, G, basis)``, or ``(H + 1, 1, basis)`` when every group follows the same schedule (the
        same learning rates relative to its own now); row 0 is zero.
    """
    lr = lr_steps.to(device=device, dtype=torch.float32)
    lr0 = lr[0].clamp_min(1e-30)
    ratio = torch.where(lr[0] > 0, lr / lr0, torch.zeros_like(lr))  # (n + 1, G)
    if bool((ratio == ratio[:, :1]).all()):  # the groups follow one schedule (e.g. decay and no-decay groups)
        ratio = ratio[:, :1]
    n_groups, k = ratio.shape[1], field.config.basis
    times = torch.tensor(list(horizons), dtype=torch.float64)
    # the field has no state to be stiff in: a grid of half a record interval where the learning rate holds, in
    # learning-rate time where one schedule moves, else of one optimizer step (the integrand changes between steps)
    held = bool((ratio[: int(times[-1]) + 1] == ratio[:1]).all())
    if n_groups == 1:  # one schedule (a held rate is one): in learning-rate time, on a grid that widens with tau
        z = _integrate_in_lr_time(field, ratio[:, 0], times, s_a, total, interval, solver, device)
        if z is not None:
            return z.view(len(times) + 1, 1, k)
    max_step = max(1.0, interval / 2) if held else 1.0
    grid, _ = time_grid(times, max_step)
    stages = torch.cat([grid, (grid[1:] + grid[:-1]) / 2]).unique().to(device=device, dtype=torch.float32)
    with torch.no_grad():  # the basis at every time rk4 evaluates, in one batched call
        phi = field.phi(time_features(stages, s_a, total, interval))  # (n_stages, K)

    def f(t: Tensor, x: Tensor) -> Tensor:
        i = int(torch.searchsorted(stages, t.reshape(1).to(stages)).clamp(max=len(stages) - 1))
        if i > 0 and abs(float(stages[i - 1]) - float(t)) < abs(float(stages[i]) - float(t)):
            i -= 1
        tt = float(t)
        row = min(int(math.floor(tt + 1e-6)), ratio.shape[0] - 1)
        lr_t = ratio[row]
        if row > 0 and abs(tt - round(tt)) < 1e-6:
            # between two steps: the mean of both rates, so that rk4's end stage of one step and start stage of
            # the next together weigh each step's own rate exactly (a per-step schedule is integrated exactly)
            lr_t = (ratio[row - 1] + lr_t) / 2
        return (lr_t.unsqueeze(1) * phi[i]).reshape(-1)

    x0 = torch.zeros(n_groups * k, device=device)
    with torch.no_grad():
        z = integrate(f, x0, times, max_step, solver)
    return z.view(len(times) + 1, n_groups, k)


#: relative gap below which two points of learning-rate time are merged (above torchdyn's isclose tolerance)
_U_GAP = 1e-4
#: relative change of the learning rate within one grid step of learning-rate time above which the step is split
_RATE_MOVE = 0.05


def _integrate_in_lr_time(
    field: MetaField,
    ratio: Tensor,
    times: Tensor,
    s_a: float,
    total: float,
    interval: float,
    solver: str,
    device,
) -> Tensor | None:
    """``z(h)`` for one schedule (held or moving), integrated with torchdyn over learning-rate time ``u``.

    With ``u(t) = int_0^t lr(s) / lr(0) ds`` (exact: the rate is constant within each optimizer step, row ``j`` of
    ``ratio`` on ``[j, j + 1)``), ``dz/du = phi(t(u))``: the schedule leaves the integrand and the grid needs no
    optimizer-step resolution, so a schedule over thousands of steps costs what a held one does (a grid that
    widens with ``tau``). Returns ``None`` (the caller integrates step by step) when the rate vanishes at a
    horizon's end, so that ``u`` would not increase between horizons.
    """
    r = ratio.to(dtype=torch.float64, device="cpu")
    cum = torch.cat([torch.zeros(1, dtype=torch.float64), r.cumsum(0)])  # u at each whole step

    def u_of(t: Tensor) -> Tensor:
        j = t.floor().long().clamp(0, len(r) - 1)
        return cum[j] + (t - j) * r[j]

    u_h = u_of(times)
    if bool((u_h <= 0).any()) or bool((u_h[1:] <= u_h[:-1] * (1 + _U_GAP)).any()):
        return None
    # whole steps (every horizon among them), half of (a record interval + tau) apart: the basis moves fastest
    # early, as log(1 + tau / interval), one of its inputs, so the grid widens geometrically (by half a step each
    # step); closer where the rate moves by more than _RATE_MOVE within a grid step (there t(u) bends, and rk4
    # wants a smooth integrand). Mapped to u, points closer than the solver can tell apart (where the rate all but
    # vanishes) are merged, horizons kept
    rates, ends = r.tolist(), {int(h) for h in times.tolist()}
    points, ref = [0], rates[0]
    for j in range(1, int(times[-1]) + 1):
        rate = rates[min(j, len(rates) - 1)]
        spacing = max(1.0, (interval + points[-1]) / 2)
        if j in ends or j - points[-1] >= spacing or abs(rate - ref) > _RATE_MOVE * abs(ref):
            points.append(j)
            ref = rate
    horizons_u = set(u_h.tolist())
    kept = [0.0]
    for u in u_of(torch.tensor(points, dtype=torch.float64)).tolist()[1:]:
        if u - kept[-1] > _U_GAP * u:
            kept.append(u)
        elif u in horizons_u:
            kept[-1] = u  # the one before it is no horizon: horizons are farther apart than the gap
    grid = torch.tensor(kept, dtype=torch.float64)
    stages_u = torch.cat([grid, (grid[1:] + grid[:-1]) / 2]).unique()
    # t(u): the last whole step whose start is at or before u (steps at rate 0 take no learning-rate time)
    j = (torch.searchsorted(cum, stages_u, right=True) - 1).clamp(0, len(r) - 1)
    stages_t = j.double() + (stages_u - cum[j]) / r[j].clamp_min(1e-300)
    with torch.no_grad():  # the basis at every time rk4 evaluates, in one batched call
        phi = field.phi(time_features(stages_t.to(device=device, dtype=torch.float32), s_a, total, interval))
    phi = phi.double()  # float64 time: a long schedule's grid points stay distinct
    stages = stages_u.to(device=device)

    def f(u: Tensor, x: Tensor) -> Tensor:
        i = int(torch.searchsorted(stages, u.reshape(1).to(stages)).clamp(max=len(stages) - 1))
        if i > 0 and abs(float(stages[i - 1]) - float(u)) < abs(float(stages[i]) - float(u)):
            i -= 1
        return phi[i]

    x0 = torch.zeros(field.config.basis, device=device, dtype=torch.float64)
    with torch.no_grad():  # every grid point as a knot (no further refinement), then the horizons' rows
        z = integrate(f, x0, grid[1:], math.inf, solver)
    rows = torch.searchsorted(grid, u_h).clamp(max=len(grid) - 1)
    return torch.cat([z[:1], z[rows.to(z.device)]]).float()


@torch.no_grad()
def meta_forecast(
    field: MetaField,
    win: Window,
    family: str | None,
    lr_steps: Tensor,
    horizons: list[int],
    total_steps: float | None,
    roles: Tensor,
    *,
    chunk_size: int = 1 << 18,
    device=None,
    out_device=None,
    index: Tensor | None = None,
) -> tuple[Tensor, float]:
    """The weights at ``horizons`` steps after the window's last snapshot.

    Args:
        field: the meta-trained field.
        win: the recorded window (at least ``history + 1`` snapshots).
        family: the optimizer's :data:`META_FAMILIES` entry (``None``: another update rule).
        lr_steps: per-step learning rates ahead, shape ``(n + 1, G)`` (see :func:`basis_integrals`).
        horizons: positive increasing step counts.
        total_steps: the run's planned steps, if known.
        roles: role index of every scalar, shape ``(P,)``.
        chunk_size: scalars processed at once (bounds the working memory).
        device: where to compute.
        out_device: where the result is stored (defaults to ``device``).
        index: forecast only these scalars, shape ``(B,)``.

    Returns:
        The weights, shape ``(H + 1, P)`` (or ``(H + 1, B)``; row 0 the anchor's), and the seconds spent.
    """
    start = time.perf_counter()
    device = torch.device(device) if device is not None else win.w.device
    out_device = device if out_device is None else out_device
    c = field.config
    anchor = win.K - 1
    s_a = float(win.steps[anchor])
    total = float(total_steps) if total_steps else 2.0 * s_a
    z = basis_integrals(field, lr_steps, horizons, s_a, total, win.interval, device=device)  # (H + 1, G, K)
    r_tensor = tensor_scales(win, anchor, c.history, device=device)
    head, head_bias = z[:, 0] @ field.out.weight, z[:, 0] @ field.out.bias  # (H + 1, hidden), (H + 1,)
    known = family if family in c.families else None  # a family it never trained on gets no code
    n_out = win.P if index is None else index.numel()
    out = torch.empty(len(horizons) + 1, n_out, device=out_device)
    for lo in range(0, n_out, chunk_size):
        hi = min(lo + chunk_size, n_out)
        cols = slice(lo, hi) if index is None else index[lo:hi].to(win.group_index.device)
        inp = meta_inputs(win, anchor, cols, known, c.history, total_steps, r_tensor, roles, device)
        if z.shape[1] == 1:  # one schedule for all scalars: the output layer and the basis integrals in one product
            move = torch.addmm(head_bias.unsqueeze(1), head, field.features(inp).T).mul_(inp.scale)  # (H + 1, B)
        else:
            move = torch.einsum("bk,hbk->hb", field.coefficients(inp), z[:, inp.group]).mul_(inp.scale)
        w0 = win.w[anchor, cols].to(device=device, dtype=torch.float32)
        out[:, lo:hi] = (w0 + move).to(out_device)
    return out, time.perf_counter() - start


# ------------------------------------------------------------------------------------------------- training
@dataclass
class MetaRun:
    """One recorded trajectory to meta-train on: its whole window, optimizer family and planned steps."""

    win: Window
    family: str | None
    total_steps: float
    roles: Tensor
    scales: dict = dataclasses.field(default_factory=dict)  # anchor -> :func:`tensor_scales`, filled on use

    @classmethod
    def from_trajectory(cls, traj) -> MetaRun:
        """From a recorded :class:`~lightning_gfm.corpus.Trajectory` (its whole window)."""
        return cls(traj.window(), family_of(traj.dyn), float(traj.total_steps), traj.spec.role_index())


@dataclass(frozen=True)
class MetaTrainConfig:
    """Meta-training budget.

    Attributes:
        steps: gradient steps.
        anchors_per_step: (run, anchor) pairs per step (runs drawn optimizer family first).
        scalars: scalars per (run, anchor), each with its own later segment and position.
        lr: Adam learning rate (cosine-annealed to 5 %).
        target_clip: targets (in units of ``r``) are clipped to this.
        family_dropout: share of samples trained without their family code, so that the field also forecasts
            well for an optimizer family it was not trained on (which gets no code).
        seed: seeds initialisation and sampling.
    """

    steps: int = 3000
    anchors_per_step: int = 16
    scalars: int = 256
    lr: float = 2e-3
    target_clip: float = 20.0
    family_dropout: float = 0.2
    seed: int = 0


def cfm_loss(
    field: MetaField,
    run: MetaRun,
    anchor: int,
    scalars: Tensor,
    gen: torch.Generator,
    clip: float,
    family: str | None = None,
):
    """Conditional flow-matching loss of ``field`` at one anchor of ``run`` (see the module docstring).

    ``family`` is the family code the sample is given (the run's, or ``None`` when it is dropped).
    """
    win, c = run.win, field.config
    if anchor not in run.scales:
        run.scales[anchor] = tensor_scales(win, anchor, c.history)
    r_tensor = run.scales[anchor]
    inp = meta_inputs(win, anchor, scalars, family, c.history, run.total_steps, r_tensor, run.roles)
    n = len(scalars)
    j = torch.randint(anchor, win.K - 1, (n,), generator=gen)
    theta = torch.rand(n, generator=gen)
    steps = win.steps.float()
    s = steps[j] + theta * (steps[j + 1] - steps[j])
    tau = s - steps[anchor]
    w = win.w
    target = (w[j + 1, scalars] - w[j, scalars]).float() / (steps[j + 1] - steps[j])
    lrs = win.lrs.float()
    lr_t = torch.lerp(lrs[j, inp.group], lrs[j + 1, inp.group], theta)
    ratio = torch.where(inp.lr0 > 0, lr_t / inp.lr0.clamp_min(1e-30), torch.zeros_like(lr_t))
    phi = field.phi(time_features(tau, float(steps[anchor]), run.total_steps, win.interval))  # (n, K)
    pred = ratio * (field.coefficients(inp) * phi).sum(-1)
    goal = (target / inp.scale).clamp(-clip, clip)
    return nn.functional.huber_loss(pred, goal)


def meta_train(
    runs: Sequence[MetaRun],
    config: MetaConfig = MetaConfig(),
    train: MetaTrainConfig = MetaTrainConfig(),
    log=None,
) -> tuple[MetaField, dict]:
    """Meta-train a :class:`MetaField` on ``runs`` by conditional flow matching.

    Returns:
        The field (in eval mode) and a report (losses, seconds, runs per family).
    """
    runs = [r for r in runs if config.history + 2 <= r.win.K]
    if not runs:
        raise ValueError(f"No run has the {config.history + 2} snapshots a meta-field needs.")
    torch.manual_seed(train.seed)
    config = dataclasses.replace(config, families=tuple(f for f in META_FAMILIES if any(r.family == f for r in runs)))
    field = MetaField(config)
    opt = torch.optim.Adam(field.parameters(), lr=train.lr)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: 0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * min(s, train.steps) / train.steps))
    )
    fam: dict[str, list[int]] = {}
    for i, r in enumerate(runs):
        fam.setdefault(str(r.family), []).append(i)
    names = sorted(fam)
    rng = random.Random(train.seed)
    gen = torch.Generator().manual_seed(train.seed)
    t0, losses = time.perf_counter(), []
    field.train()
    for step in range(train.steps):
        total = 0.0
        for _ in range(train.anchors_per_step):
            run = runs[rng.choice(fam[rng.choice(names)])]
            anchor = rng.randint(config.history, run.win.K - 2)
            scalars = torch.randint(run.win.P, (train.scalars,), generator=gen)
            family = None if rng.random() < train.family_dropout else run.family
            loss = cfm_loss(field, run, anchor, scalars, gen, train.target_clip, family)
            total = total + loss / train.anchors_per_step
        opt.zero_grad(set_to_none=True)
        total.backward()
        nn.utils.clip_grad_norm_(field.parameters(), 1.0)
        opt.step()
        sched.step()
        losses.append(float(total.detach()))
        if log is not None and (step + 1) % 500 == 0:
            log(f"meta-train step {step + 1}/{train.steps}: loss {sum(losses[-500:]) / 500:.4f}")
    field.eval()
    n = max(1, len(losses) // 20)
    report = {
        "config": config.to_dict(),
        "train": asdict(train),
        "runs": len(runs),
        "families": {k: len(v) for k, v in fam.items()},
        "loss_first": sum(losses[:n]) / n,
        "loss_last": sum(losses[-n:]) / n,
        "seconds": round(time.perf_counter() - t0, 1),
    }
    return field, report
