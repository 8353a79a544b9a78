"""The learned part of the vector field: one small network shared by every scalar parameter.

The network does not output a velocity. It outputs a correction to the gradient estimate the optimizer state
already implies at the anchor (the latest snapshot); :mod:`lightning_gfm.dynamics` then pushes that gradient
surrogate through the optimizer's own update rule. A freshly initialised field (last layer zero) therefore
forecasts "the gradient stays what it is now", and fitting teaches it how the gradient changes along the way.

Inputs per scalar, all dimensionless:

* static (computed once per anchor): the last ``history`` velocities in units of the scalar's own RMS velocity,
  the log of that RMS relative to its tensor, the weight in units of its tensor's RMS, the normalised
  gradient estimate, the training progress, and a one-hot layer role;
* dynamic (every evaluation): time since the anchor as a fraction of the fitted range, the normalised update
  direction of the evolving optimizer state, and the learning rate relative to the anchor's.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import Tensor, nn

from lightning_gfm.params import ROLES

N_DYNAMIC = 4
ANCHORS = ("state", "velocity", "trend")
CAP = 4.0  # bound of the normalised gradient surrogate: keeps long forecasts of the moments from blowing up


@dataclass(frozen=True)
class FieldConfig:
    """Shape of a :class:`GradientField`; travels with saved fields.

    Attributes:
        history: number of past velocities in the static features.
        hidden: width of the hidden layers.
        depth: number of hidden layers (at least 1).
        span: fitted time range, in record intervals, that ``tau = 1`` stands for.
        anchor: where the anchor's gradient estimate comes from: ``"state"`` (the optimizer's moments at the
            anchor), ``"velocity"`` (the mean of the last ``history`` velocities pushed back through the
            optimizer's preconditioning: smoother, and the prior becomes linear extrapolation shaped by the
            optimizer and its learning-rate schedule) or ``"trend"`` (denoised: the least-squares line through
            the last ``trend`` snapshots gives both the starting weights, its value at the anchor, and the
            velocity pushed back through the preconditioning, its slope).
        trend: snapshots in the least-squares line of ``anchor="trend"`` (at least 2).
    """

    history: int = 3
    hidden: int = 16
    depth: int = 2
    span: float = 8.0
    anchor: str = "state"
    trend: int = 8

    @property
    def min_anchor(self) -> int:
        """Earliest snapshot that can serve as an anchor (enough history, and a full trend line)."""
        return max(self.history, self.trend - 1) if self.anchor == "trend" else self.history

    def fitted_steps(self, snapshots: int, interval: float) -> int:
        """How far ahead the field is fitted: ``span`` record intervals, fewer in a window of ``snapshots``."""
        return int(min(self.span, snapshots - 1 - self.min_anchor) * interval)

    @property
    def n_static(self) -> int:
        """Number of static input features."""
        return self.history + 4 + len(ROLES)

    def to_dict(self) -> dict:
        """Plain dict for metadata."""
        return asdict(self)


def _clip(x: Tensor, bound: float = 5.0) -> Tensor:
    return x.clamp(-bound, bound).nan_to_num(0.0)


def static_features(
    hist: Tensor,
    u_rms: Tensor,
    u_rms_tensor: Tensor,
    w: Tensor,
    w_rms_tensor: Tensor,
    g0_norm: Tensor,
    progress: Tensor | float,
    roles: Tensor,
) -> Tensor:
    """Assemble the static inputs.

    Args:
        hist: last velocities, oldest first, shape ``(h, B)``.
        u_rms: RMS velocity of each scalar over the window, shape ``(B,)``.
        u_rms_tensor: RMS of ``u_rms`` over each scalar's tensor, shape ``(B,)``.
        w: weights at the anchor, shape ``(B,)``.
        w_rms_tensor: RMS of the weights of each scalar's tensor, shape ``(B,)``.
        g0_norm: gradient estimate in units of the gradient scale, shape ``(B,)``.
        progress: fraction of planned training done at the anchor (0 when unknown), shape ``(B,)`` or scalar.
        roles: role index of each scalar, shape ``(B,)``.

    Returns:
        Shape ``(B, n_static)``.
    """
    cols = [
        _clip(hist / u_rms).T,
        _clip(torch.log(u_rms / u_rms_tensor)).unsqueeze(1),
        _clip(w / w_rms_tensor).unsqueeze(1),
        _clip(g0_norm).unsqueeze(1),
        torch.as_tensor(progress, dtype=w.dtype, device=w.device).expand_as(w).unsqueeze(1),
        nn.functional.one_hot(roles, len(ROLES)).to(w.dtype),
    ]
    return torch.cat(cols, dim=1)


def dynamic_features(tau: Tensor, direction: Tensor, lr_ratio: Tensor, displacement: Tensor) -> Tensor:
    """Assemble the dynamic inputs.

    Args:
        tau: time since the anchor over the fitted span, shape ``(B,)`` or scalar.
        direction: normalised update direction of the optimizer state, shape ``(B,)``.
        lr_ratio: learning rate now over the anchor's, shape ``(B,)``.
        displacement: ``w - w0`` in units of the scalar's typical motion over the fitted span, shape ``(B,)``.

    Returns:
        Shape ``(B, 4)``.
    """
    tau = torch.as_tensor(tau, dtype=direction.dtype, device=direction.device).expand_as(direction)
    return torch.stack([_clip(tau, 4.0), _clip(direction), _clip(lr_ratio), _clip(displacement)], dim=1)


class GradientField(nn.Module):
    """Per-scalar MLP: (static, dynamic) features -> normalised gradient surrogate.

    The first layer is split so that the static part is computed once per forecast and each ODE evaluation
    only pays for the dynamic part.

    Args:
        config: the network's shape.
    """

    def __init__(self, config: FieldConfig | None = None) -> None:
        super().__init__()
        self.config = config or FieldConfig()
        c = self.config
        if c.depth < 1 or c.hidden < 1 or c.history < 1:
            raise ValueError(f"`FieldConfig` needs depth, hidden and history >= 1, got {c}.")
        if c.anchor not in ANCHORS:
            raise ValueError(f"`FieldConfig.anchor` must be one of {ANCHORS}, got {c.anchor!r}.")
        if c.trend < 2:
            raise ValueError(f"`FieldConfig.trend` must be >= 2 snapshots, got {c.trend!r}.")
        self.static_in = nn.Linear(c.n_static, c.hidden)
        self.dynamic_in = nn.Linear(N_DYNAMIC, c.hidden, bias=False)
        self.body = nn.ModuleList(nn.Linear(c.hidden, c.hidden) for _ in range(c.depth - 1))
        self.out = nn.Linear(c.hidden, 1)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def embed(self, static: Tensor) -> Tensor:
        """Static part of the first layer, shape ``(B, hidden)`` from ``(B, n_static)``."""
        return self.static_in(static)

    @property
    def constant(self) -> bool:
        """Whether the output cannot depend on the path (last layer's weight zero: the untrained prior)."""
        return not bool(self.out.weight.any())

    def constant_output(self, g0_norm: Tensor) -> Tensor | None:
        """The output when it cannot depend on the path (last layer's weight zero, as in the untrained prior).

        Equal to :meth:`forward` for any finite input, without evaluating the hidden layers.

        Args:
            g0_norm: the anchor's normalised gradient estimate, shape ``(B,)``.

        Returns:
            Shape ``(B,)``, or ``None`` when the output depends on the dynamic features.
        """
        if bool(self.out.weight.any()):
            return None
        return CAP * torch.tanh((_clip(g0_norm, CAP) + self.out.bias) / CAP)

    def forward(self, embedded: Tensor, dynamic: Tensor, g0_norm: Tensor) -> Tensor:
        """Normalised gradient surrogate, bounded in ``(-CAP, CAP)``.

        Args:
            embedded: :meth:`embed` of the static features, shape ``(B, hidden)``.
            dynamic: :func:`dynamic_features`, shape ``(B, 4)``.
            g0_norm: the anchor's normalised gradient estimate, shape ``(B,)``.

        Returns:
            Shape ``(B,)``; multiply by the gradient scale to get the surrogate.
        """
        h = nn.functional.silu(embedded + self.dynamic_in(dynamic))
        for layer in self.body:
            h = nn.functional.silu(layer(h))
        return CAP * torch.tanh((_clip(g0_norm, CAP) + self.out(h).squeeze(-1)) / CAP)
