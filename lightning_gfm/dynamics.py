"""Optimizer-aware dynamics: the optimizer's own update rule, in continuous time.

Time is measured in optimizer steps. For a gradient surrogate ``g`` (shape ``(P,)``) the derivative of the ODE
state ``(w, optimizer state)`` is the change one optimizer step would make, so integrating from ``s`` to
``s + 1`` with Euler is exactly one optimizer step. Hyperparameters are read from the live optimizer's
``param_groups``; the learning rate along a forecast comes from :func:`future_learning_rates`, which replays the
scheduler on a copy and leaves the real one untouched.

Supported families (anything else raises, unless ``generic=True`` is asked for):

==================  ==================================  ============================================
optimizer           ODE state besides ``w``             gradient estimate at the anchor
==================  ==================================  ============================================
SGD                 none                                implied by the last observed velocity
SGD + momentum      ``momentum_buffer``                 steady state of the buffer
Adam / AdamW        ``exp_avg``, ``exp_avg_sq``         bias-corrected first moment
RMSprop             ``square_avg`` (+ buffer, + mean)   steady state of the buffer, or the velocity
NAdam / RAdam       ``exp_avg``, ``exp_avg_sq``         bias-corrected first moment
Adamax              ``exp_avg``, ``exp_inf``            bias-corrected first moment
Adagrad             ``sum``                             implied by the last observed velocity
generic (opt-in)    none                                ``dw/ds = -lr * g`` (an SGD-shaped fallback)
==================  ==================================  ============================================
"""

from __future__ import annotations

import copy
import functools
import warnings
from abc import ABC, abstractmethod

import torch
from torch import Tensor

from lightning_gfm.params import ParamSpec, local, step_count
from lightning_gfm.trajectory import Snapshot, TrajectoryBuffer

SUPPORTED = ("SGD", "Adam", "AdamW", "RMSprop", "NAdam", "RAdam", "Adamax", "Adagrad")
_TINY = 1e-12


def _is_zero(x: Tensor | float) -> bool:
    """Whether a hyperparameter from :meth:`Dynamics._hs` is the float zero (a term that can be skipped)."""
    return isinstance(x, float) and x == 0.0


class HeldGradient:
    """The optimizer driven by a gradient surrogate ``g`` held constant (the untrained prior field): a closed form.

    Every optimizer state then relaxes linearly to a fixed target, ``s' = rate_s (target_s - s)``, so along any
    linear integrator its value is ``target_s + c dev_s`` (``dev_s = s(0) - target_s``) with a scalar ``c`` that
    depends only on the integrator and ``rate_s``; the weights move by ``dw/ds = -lr (F + decay w)``, with ``F``
    computed (per scalar) from the states one optimizer step ahead, ``s + ds = target_s + (1 - rate_s) c dev_s``,
    as in :meth:`Dynamics.velocity`. This is what lets a forecast skip integrating the states
    (:func:`lightning_gfm.flow.ode.held_steps`).

    Attributes:
        rates: relaxation rate of each state per optimizer step (Python floats).
        targets: value each state relaxes to, shape ``(P,)``.
        devs: ``state(0) - target``, shape ``(P,)``.
        decay: the weights' own decay (AdamW's decoupled decay, SGD's weight decay): ``dw/ds`` holds ``-lr decay w``.
    """

    def __init__(self, state: dict[str, Tensor], rates: dict[str, float], targets: dict[str, Tensor], decay: float):
        self.rates, self.targets, self.decay = rates, targets, decay
        self.devs = {n: state[n] - targets[n] for n in rates}

    def _ahead(self, name: str, coef: dict[str, float]) -> Tensor:
        """State ``name`` one optimizer step ahead of ``target + coef dev`` (a new tensor)."""
        return torch.add(self.targets[name], self.devs[name], alpha=coef[name] * (1 - self.rates[name]))

    def add_update(self, acc: Tensor, coef: dict[str, float], k: float, scale: float) -> None:
        """``acc += scale * F`` for the states ``target + coef dev`` at optimizer step count ``k``, in place."""
        raise NotImplementedError


class _SGDHeld(HeldGradient):
    """SGD (and the generic fallback): ``F = g``, no state."""

    def __init__(self, gp: Tensor, decay: float) -> None:
        super().__init__({}, {}, {}, decay)
        self.gp = gp

    def add_update(self, acc, coef, k, scale):
        acc.add_(self.gp, alpha=scale)


class _MomentumHeld(HeldGradient):
    """SGD with momentum and no weight decay: ``F = b + db`` (Nesterov: ``g + mu (b + db)``)."""

    def __init__(self, state, gp: Tensor, mu: float, damp: float, nesterov: bool) -> None:
        super().__init__(state, {"momentum_buffer": 1 - mu}, {"momentum_buffer": gp * ((1 - damp) / (1 - mu))}, 0.0)
        self.gp, self.mu, self.nesterov = gp, mu, nesterov

    def add_update(self, acc, coef, k, scale):
        # F is linear in the buffer: no temporary
        f = self.mu if self.nesterov else 1.0
        acc.add_(self.targets["momentum_buffer"], alpha=scale * f)
        acc.add_(self.devs["momentum_buffer"], alpha=scale * f * coef["momentum_buffer"] * self.mu)
        if self.nesterov:
            acc.add_(self.gp, alpha=scale)


class LinearHeld(HeldGradient):
    """A held system in which the weights feed back into the state: ``z' = M(lr) z`` for ``z = (w, s, g)``.

    SGD with momentum and coupled weight decay: the buffer is driven by ``g + wd w``, so it has no fixed target and
    :class:`HeldGradient`'s relaxation does not apply. The system is still linear, and its ``3 x 3`` generator
    :meth:`generator` is shared by every scalar (one value of each hyperparameter), so the solution over an
    interval of constant learning rate is one matrix exponential: a forecast is a product of ``3 x 3`` matrices
    (float64, per schedule) and then three multiply-adds for the weights and three for the buffer per horizon,
    however far it reaches.

    Attributes:
        name: the state's key (``"momentum_buffer"``).
        gp: the held surrogate ``g`` (maximization's sign applied), shape ``(P,)``.
    """

    def __init__(self, state, gp: Tensor, mu: float, damp: float, nesterov: bool, decay: float) -> None:
        super().__init__({}, {}, {}, 0.0)
        self.name, self.gp, self.state0 = "momentum_buffer", gp, state["momentum_buffer"]
        self.rates = {self.name: 1 - mu}  # the state it carries (the forecast checks the names)
        self.mu, self.damp, self.nesterov, self.wd = mu, damp, nesterov, decay

    def generator(self, lr: float) -> list[list[float]]:
        """``M`` with ``d(w, b, g)/ds = M (w, b, g)`` at learning rate ``lr`` (as :meth:`MomentumDynamics.velocity`).

        ``b_next = mu b + c (g + wd w)`` with ``c = 1 - dampening``; ``dw/ds = -lr b_next`` (Nesterov:
        ``-lr ((g + wd w) + mu b_next)``), ``db/ds = b_next - b``.
        """
        mu, c, wd = self.mu, 1.0 - self.damp, self.wd
        drive, carry = (1.0 + mu * c, mu * mu) if self.nesterov else (c, mu)
        return [[-lr * drive * wd, -lr * carry, -lr * drive], [c * wd, mu - 1.0, c], [0.0, 0.0, 0.0]]


class _AdamHeld(HeldGradient):
    """Adam/AdamW without coupled weight decay: ``F = m_hat / (sqrt(v_hat) + eps)`` of the moments a step ahead."""

    def __init__(self, state, gp: Tensor, noise: Tensor | None, b1: float, b2: float, eps: float, decay: float):
        sq = gp * gp if noise is None else gp * gp + noise
        super().__init__(state, {"exp_avg": 1 - b1, "exp_avg_sq": 1 - b2}, {"exp_avg": gp, "exp_avg_sq": sq}, decay)
        self.b1, self.b2, self.eps = b1, b2, eps

    def add_update(self, acc, coef, k, scale):
        c1, c2, root_c2 = _adam_corrections(self.b1, self.b2, k, acc.dtype)
        m = self._ahead("exp_avg", coef)
        # as AdamDynamics.velocity: sqrt(v / c2) + eps = (sqrt(v) + eps sqrt(c2)) / sqrt(c2); the clamp at
        # 1e-30 c2 stands for its clamp at 0 plus 1e-30 c2 (they differ by at most 1e-30 c2)
        den = self._ahead("exp_avg_sq", coef).clamp_min_(1e-30 * c2).sqrt_().add_(self.eps * root_c2)
        acc.addcdiv_(m, den, value=scale * root_c2 / c1)


@functools.lru_cache(maxsize=4096)
def _adam_corrections(b1: float, b2: float, k: float, dtype: torch.dtype) -> tuple[float, float, float]:
    """``1 - b1^(k + 1)``, ``1 - b2^(k + 1)`` and the root of the latter, computed as AdamDynamics.velocity does."""
    k1 = torch.tensor(k, dtype=dtype).add(1).clamp_min(1.0)
    c1, c2 = 1 - b1**k1, 1 - b2**k1
    return float(c1), float(c2), float(c2.sqrt())


class _RMSpropHeld(HeldGradient):
    """RMSprop without momentum or weight decay: ``F = g / (sqrt(v + dv [- (a + da)^2]) + eps)``."""

    def __init__(self, state, gp: Tensor, noise: Tensor | None, alpha: float, eps: float) -> None:
        targets = {"square_avg": gp * gp if noise is None else gp * gp + noise}
        if "grad_avg" in state:
            targets["grad_avg"] = gp
        super().__init__(state, dict.fromkeys(targets, 1 - alpha), targets, 0.0)
        self.gp, self.eps = gp, eps

    def add_update(self, acc, coef, k, scale):
        den = self._ahead("square_avg", coef)
        if "grad_avg" in self.targets:
            ga = self._ahead("grad_avg", coef)
            den.addcmul_(ga, ga, value=-1.0)
        acc.addcdiv_(self.gp, den.clamp_min_(1e-30).sqrt_().add_(self.eps), value=scale)


class Dynamics(ABC):
    """One optimizer family. Hyperparameters are per-scalar tensors of shape ``(P,)`` built from param groups.

    Args:
        hyper: name -> per-group values, each a list with one entry per param group.
        group_index: param group of every scalar, shape ``(P,)``.
    """

    #: keys of ``optimizer.state[p]`` carried in the ODE state, in order.
    state_names: tuple[str, ...] = ()

    def __init__(self, hyper: dict[str, list[float]], group_index: Tensor) -> None:
        self.hyper = hyper
        self.group_index = group_index
        self._expanded: dict[str, Tensor] = {}

    def h(self, name: str, like: Tensor) -> Tensor:
        """Hyperparameter ``name`` for every scalar, on ``like``'s device and dtype, shape ``(P,)``."""
        key = f"{name}/{like.device}/{like.dtype}/{like.numel()}"
        if key not in self._expanded:
            values = self.hyper[name]
            if all(v == values[0] for v in values):  # one value: a broadcast view, no gather
                one = torch.tensor(values[0], dtype=like.dtype, device=like.device)
                self._expanded[key] = one.expand(self.group_index.shape)
            else:
                table = torch.tensor(values, dtype=like.dtype, device=like.device)
                self._expanded[key] = table[self.group_index.to(like.device)]
        return self._expanded[key]

    def _hs(self, name: str, like: Tensor) -> Tensor | float:
        """Like :meth:`h`, but a Python float when every group shares the value (a cheaper broadcast)."""
        values = self.hyper[name]
        return float(values[0]) if all(v == values[0] for v in values) else self.h(name, like)

    def _shared(self, *names: str) -> list[float] | None:
        """Hyperparameters ``names`` as Python floats when every group shares each of them, else ``None``."""
        out = []
        for name in names:
            values = self.hyper[name]
            if any(v != values[0] for v in values):
                return None
            out.append(float(values[0]))
        return out

    def restrict(self, index: Tensor | slice) -> Dynamics:
        """The same dynamics for the subset ``index`` (indices, or a range) of scalars (chunked integration)."""
        clone = copy.copy(self)
        if isinstance(index, slice):
            clone.group_index = self.group_index[index]
        elif len(next(iter(self.hyper.values()), [])) == 1:  # one param group: every index is 0, no gather
            clone.group_index = torch.zeros((), dtype=self.group_index.dtype, device=self.group_index.device)
            clone.group_index = clone.group_index.expand(index.shape)
        else:
            clone.group_index = self.group_index[index.to(self.group_index.device)]
        clone._expanded = {}
        return clone

    @property
    def max_step(self) -> float:
        """Largest stable integration step, in optimizer steps (the fastest state relaxes at ``1/max_step``)."""
        return 8.0

    def advance_counters(self, optimizer: torch.optim.Optimizer, spec: ParamSpec, steps: int) -> None:
        """Move the optimizer's step counter of every tracked parameter ``steps`` ahead.

        Called after a jump wrote the state the forecast carried ``steps`` ahead, so that the state is that of one
        step count: the update after the jump applies the bias corrections (Adam's, NAdam's momentum schedule,
        RAdam's rectification, Adagrad's lr decay) the forecast itself applied there, not the anchor's.
        """
        if steps <= 0:
            return
        for p in spec.params:
            state = optimizer.state.get(p)
            if not state or "step" not in state:
                continue
            step = state["step"]
            if isinstance(step, Tensor):
                local(step).add_(steps)
            else:
                state["step"] = step + steps

    @abstractmethod
    def velocity(
        self, w: Tensor, state: dict[str, Tensor], g: Tensor, lr: Tensor, k: Tensor | float, noise: Tensor | None = None
    ) -> tuple:
        """Time derivative of the ODE state.

        Args:
            w: weights, shape ``(P,)``.
            state: optimizer state, each shape ``(P,)``.
            g: gradient surrogate of the loss (weight decay is added here), shape ``(P,)``.
            lr: learning rate of every scalar at this time, shape ``(P,)``.
            k: optimizer step count at this time (for bias correction).
            noise: variance of the minibatch gradient around ``g``, shape ``(P,)``; second-moment states
                average ``g^2 + noise`` (what a real run feeds them), not ``g^2``. ``None``: no noise.

        Returns:
            ``(dw, dstate)``: shape ``(P,)`` and a dict like ``state``.
        """

    def held_gradient(self, state: dict[str, Tensor], g: Tensor, noise: Tensor | None) -> HeldGradient | None:
        """The closed form of this optimizer under the constant surrogate ``g`` (:class:`HeldGradient`).

        ``None`` when there is none here: the weights feed back into a nonlinear state (Adam's coupled weight
        decay), a state is not a linear relaxation (RMSprop's momentum), or the groups' hyperparameters differ.
        SGD's momentum with coupled weight decay is linear in ``(w, b)``: :class:`LinearHeld`.
        """
        return None

    @abstractmethod
    def gradient_estimate(self, w: Tensor, state: dict[str, Tensor], u: Tensor, lr: Tensor, k: float) -> Tensor:
        """Loss gradient implied at the anchor by the optimizer state or the last velocity ``u``, shape ``(P,)``."""

    def gradient_noise(self, w: Tensor, state: dict[str, Tensor], g: Tensor, k) -> Tensor | None:
        """Variance of the minibatch gradient around ``g`` implied by a second-moment state, shape ``(P,)``.

        ``None`` for families without one. Holding it along a forecast keeps the preconditioner where the
        run keeps it: without it, a smooth surrogate gradient would drain Adam's ``exp_avg_sq`` towards ``g^2``
        and inflate every later step.
        """
        return None

    def gradient_from_velocity(self, w: Tensor, state: dict[str, Tensor], u: Tensor, lr: Tensor, k) -> Tensor:
        """Loss gradient that, held constant, would produce the velocity ``u`` in steady state, shape ``(P,)``.

        The optimizer's preconditioning is taken from ``state``; the direction from ``u`` (typically an average
        of recent velocities, which is less noisy than the instantaneous moments).
        """
        return self.gradient_estimate(w, state, u, lr, k)

    @abstractmethod
    def gradient_scale(self, state: dict[str, Tensor], u_rms: Tensor, lr: Tensor, k: float) -> Tensor:
        """Typical gradient magnitude of every scalar, shape ``(P,)``; the field predicts in these units."""

    def direction(self, state: dict[str, Tensor], g_scale: Tensor, k: float) -> Tensor:
        """Normalised update direction the optimizer state points to (a feature of the field), shape ``(P,)``."""
        return torch.zeros_like(g_scale)

    def _coupled(self, g: Tensor, w: Tensor) -> Tensor:
        wd = self._hs("weight_decay", w)
        return g if isinstance(wd, float) and wd == 0.0 else g + wd * w

    def _sign(self, g: Tensor) -> Tensor:
        return -g if self.hyper.get("maximize", [0.0])[0] else g


class SGDDynamics(Dynamics):
    """Plain SGD: ``dw/ds = -lr (g + wd w)``."""

    def velocity(self, w, state, g, lr, k, noise=None):
        return -lr * self._coupled(self._sign(g), w), {}

    def held_gradient(self, state, g, noise):
        wd = self._shared("weight_decay")
        return None if wd is None else _SGDHeld(self._sign(g), wd[0])

    def gradient_estimate(self, w, state, u, lr, k):
        return self._sign(-u / lr.clamp_min(_TINY) - self.h("weight_decay", w) * w)

    def gradient_scale(self, state, u_rms, lr, k):
        return u_rms / lr.clamp_min(_TINY) + _TINY


class MomentumDynamics(Dynamics):
    """SGD with (Nesterov) momentum: the buffer ``b`` is ODE state, ``b' = mu b + (1 - dampening) g'``."""

    state_names = ("momentum_buffer",)

    @property
    def max_step(self) -> float:
        return 1.0 / (1.0 - max(self.hyper["momentum"]))

    def velocity(self, w, state, g, lr, k, noise=None):
        mu, damp = self._hs("momentum", w), self._hs("dampening", w)
        gp = self._coupled(self._sign(g), w)
        b = state["momentum_buffer"]
        b_next = mu * b + (1 - damp) * gp
        step = gp + mu * b_next if self.hyper["nesterov"][0] else b_next
        return -lr * step, {"momentum_buffer": b_next - b}

    def held_gradient(self, state, g, noise):
        hs = self._shared("momentum", "dampening", "weight_decay")
        if hs is None or not 0.0 < hs[0] < 1.0:
            return None
        if hs[2] != 0.0:  # the weights drive the buffer: a linear system of (w, b), not a relaxation
            return LinearHeld(state, self._sign(g), hs[0], hs[1], bool(self.hyper["nesterov"][0]), hs[2])
        return _MomentumHeld(state, self._sign(g), hs[0], hs[1], bool(self.hyper["nesterov"][0]))

    def gradient_estimate(self, w, state, u, lr, k):
        mu, damp = self.h("momentum", w), self.h("dampening", w)
        gp = state["momentum_buffer"] * (1 - mu) / (1 - damp).clamp_min(_TINY)
        return self._sign(gp - self.h("weight_decay", w) * w)

    def gradient_from_velocity(self, w, state, u, lr, k):
        mu, damp = self.h("momentum", w), self.h("dampening", w)
        gain = (1 - damp) / (1 - mu)
        if self.hyper["nesterov"][0]:
            gain = 1 + mu * gain
        gp = -u / (lr.clamp_min(_TINY) * gain)
        return self._sign(gp - self.h("weight_decay", w) * w)

    def gradient_scale(self, state, u_rms, lr, k):
        mu = self.h("momentum", u_rms)
        return u_rms * (1 - mu) / lr.clamp_min(_TINY) + _TINY

    def direction(self, state, g_scale, k):
        mu = self.h("momentum", g_scale)
        return state["momentum_buffer"] * (1 - mu) / g_scale


class AdamDynamics(Dynamics):
    """Adam and AdamW: both moments are ODE state, with bias correction and coupled or decoupled decay."""

    state_names = ("exp_avg", "exp_avg_sq")

    @property
    def max_step(self) -> float:
        return 1.0 / (1.0 - max(self.hyper["beta1"]))

    def _hat(self, m: Tensor, v: Tensor, k: float, like: Tensor) -> tuple[Tensor, Tensor]:
        c1, c2 = self._corrections(k, like)
        return m / c1, v / c2

    def _corrections(self, k: float, like: Tensor) -> tuple[Tensor, Tensor]:
        """Adam's bias corrections ``1 - beta^k`` of both moments: 0-dim when they are the same for every scalar."""
        k = torch.as_tensor(k, dtype=like.dtype, device=like.device)
        shared = self._shared("beta1", "beta2")
        if shared is not None and (k.ndim == 0 or (k.ndim == 1 and k.stride(0) == 0 and k.numel() > 0)):
            # one step counter (a broadcast view) and shared betas: the bias corrections are 0-dim, the same values
            b1, b2 = (torch.tensor(b, dtype=like.dtype, device=like.device) for b in shared)
            k = k.reshape(-1)[0] if k.ndim else k
        else:
            b1, b2 = self.h("beta1", like), self.h("beta2", like)
        k = k.clamp_min(1.0)
        return 1 - b1**k, 1 - b2**k

    def _coupled_decay(self, w: Tensor) -> Tensor | float:
        """Adam's coupled (L2) weight decay, a float when shared by the groups."""
        return (1 - self._hs("decoupled", w)) * self._hs("weight_decay", w)

    def velocity(self, w, state, g, lr, k, noise=None):
        b1, b2, eps = self._hs("beta1", w), self._hs("beta2", w), self._hs("eps", w)
        decoupled, wd = self._hs("decoupled", w), self._hs("weight_decay", w)
        coupled, decay = (1 - decoupled) * wd, decoupled * wd
        gp = self._sign(g)
        if not _is_zero(coupled):
            gp = gp + coupled * w
        m, v = state["exp_avg"], state["exp_avg_sq"]
        k1 = torch.as_tensor(k + 1, dtype=w.dtype, device=w.device).clamp_min(1.0)
        c1, c2 = 1 - b1**k1, 1 - b2**k1
        # m_next - m = b1 m + (1 - b1) g - m, written as torch's Adam does (a lerp)
        if torch.is_grad_enabled():  # fitting differentiates through here: no in-place ops
            dm = (gp - m) * (1 - b1)
            dv = (gp * gp - v if noise is None else gp * gp + noise - v) * (1 - b2)
            dw = (m + dm) / c1 / (((v + dv).clamp_min(0) / c2 + 1e-30).sqrt() + eps)
            dw = dw + decay * w if not _is_zero(decay) else dw
            return -(dw * lr), {"exp_avg": dm, "exp_avg_sq": dv}
        # in place, with the bias corrections folded in as torch's Adam does (sqrt(v / c2) = sqrt(v) / sqrt(c2)):
        # a third of the passes over memory, and forecasts run under no_grad
        dm = (gp - m).mul_(1 - b1)
        dv = (gp * gp).sub_(v) if noise is None else (gp * gp).add_(noise).sub_(v)
        dv.mul_(1 - b2)
        root_c2 = c2.sqrt()
        dw = (m + dm).div_((v + dv).clamp_min_(0).add_(1e-30 * c2).sqrt_().add_(eps * root_c2))
        if _is_zero(decay):
            return dw.mul_(-lr * root_c2 / c1), {"exp_avg": dm, "exp_avg_sq": dv}
        dw.mul_(root_c2 / c1).add_(decay * w)
        return dw.mul_(-lr), {"exp_avg": dm, "exp_avg_sq": dv}

    def held_gradient(self, state, g, noise):
        hs = self._shared("beta1", "beta2", "eps", "decoupled", "weight_decay")
        if hs is None:
            return None
        b1, b2, eps, decoupled, wd = hs
        if (1 - decoupled) * wd != 0.0:  # coupled decay: the weights feed back into the moments
            return None
        return _AdamHeld(state, self._sign(g), noise, b1, b2, eps, decoupled * wd)

    def gradient_estimate(self, w, state, u, lr, k):
        m_hat = state["exp_avg"] / self._corrections(k, w)[0]
        coupled = self._coupled_decay(w)
        return self._sign(m_hat if _is_zero(coupled) else m_hat - coupled * w)

    def gradient_noise(self, w, state, g, k):
        v_hat = state["exp_avg_sq"] / self._corrections(k, w)[1]
        gp, coupled = self._sign(g), self._coupled_decay(w)
        gp = gp if _is_zero(coupled) else gp + coupled * w
        return v_hat.sub_(gp * gp).clamp_min_(0)

    def gradient_from_velocity(self, w, state, u, lr, k):
        decoupled, wd = self.h("decoupled", w), self.h("weight_decay", w)
        denom = self.gradient_scale(state, u, lr, k)
        m_hat = (-u / lr.clamp_min(_TINY) - decoupled * wd * w) * denom
        return self._sign(m_hat - (1 - decoupled) * wd * w)

    def gradient_scale(self, state, u_rms, lr, k):
        v_hat = state["exp_avg_sq"] / self._corrections(k, u_rms)[1]
        return (v_hat.clamp_min(0) + 1e-30).sqrt() + self.h("eps", u_rms)

    def direction(self, state, g_scale, k):
        m_hat, _ = self._hat(state["exp_avg"], state["exp_avg_sq"], k, g_scale)
        return m_hat / g_scale


class RMSpropDynamics(Dynamics):
    """RMSprop: ``square_avg`` is ODE state, plus ``momentum_buffer`` and ``grad_avg`` when used."""

    def __init__(self, hyper, group_index):
        super().__init__(hyper, group_index)
        names = ["square_avg"]
        if max(hyper["momentum"]) > 0:
            names.append("momentum_buffer")
        if hyper["centered"][0]:
            names.append("grad_avg")
        self.state_names = tuple(names)

    @property
    def max_step(self) -> float:
        mu = max(self.hyper["momentum"])
        return 1.0 / (1.0 - mu) if mu > 0 else 1.0 / (1.0 - max(self.hyper["alpha"]))

    def _avg(self, v: Tensor, ga: Tensor | None, eps: Tensor) -> Tensor:
        var = v - ga * ga if ga is not None else v
        return (var.clamp_min(0) + 1e-30).sqrt() + eps

    def velocity(self, w, state, g, lr, k, noise=None):
        alpha, eps = self._hs("alpha", w), self._hs("eps", w)
        gp = self._coupled(self._sign(g), w)
        v = state["square_avg"]
        sq = gp * gp if noise is None else gp * gp + noise
        d = {"square_avg": sq.sub_(v).mul_(1 - alpha)}
        ga_next = None
        if "grad_avg" in state:
            ga_next = alpha * state["grad_avg"] + (1 - alpha) * gp
            d["grad_avg"] = ga_next - state["grad_avg"]
        avg = self._avg(v + d["square_avg"], ga_next, eps)
        if "momentum_buffer" in state:
            b = state["momentum_buffer"]
            b_next = self._hs("momentum", w) * b + gp / avg
            d["momentum_buffer"] = b_next - b
            return -lr * b_next, d
        return -lr * gp / avg, d

    def held_gradient(self, state, g, noise):
        hs = self._shared("alpha", "eps", "weight_decay")
        if hs is None or hs[2] != 0.0 or "momentum_buffer" in state:
            return None
        return _RMSpropHeld(state, self._sign(g), noise, hs[0], hs[1])

    def gradient_estimate(self, w, state, u, lr, k):
        avg = self._avg(state["square_avg"], state.get("grad_avg"), self.h("eps", w))
        if "momentum_buffer" in state:
            gp = state["momentum_buffer"] * (1 - self.h("momentum", w)) * avg
        else:
            gp = -u * avg / lr.clamp_min(_TINY)
        return self._sign(gp - self.h("weight_decay", w) * w)

    def gradient_noise(self, w, state, g, k):
        gp = self._coupled(self._sign(g), w)
        return (state["square_avg"] - gp * gp).clamp_min(0)

    def gradient_from_velocity(self, w, state, u, lr, k):
        avg = self._avg(state["square_avg"], state.get("grad_avg"), self.h("eps", w))
        gp = -u * avg / lr.clamp_min(_TINY)
        if "momentum_buffer" in state:
            gp = gp * (1 - self.h("momentum", w))
        return self._sign(gp - self.h("weight_decay", w) * w)

    def gradient_scale(self, state, u_rms, lr, k):
        return self._avg(state["square_avg"], state.get("grad_avg"), self.h("eps", u_rms))

    def direction(self, state, g_scale, k):
        if "momentum_buffer" in state:
            return state["momentum_buffer"] * (1 - self.h("momentum", g_scale))
        if "grad_avg" in state:
            return state["grad_avg"] / g_scale
        return torch.zeros_like(g_scale)


def _step_tensor(k: Tensor | float, like: Tensor) -> Tensor:
    """The step count ``k + 1`` of the update being taken, a float64 tensor on ``like``'s device.

    Float64 as torch's optimizers (Python floats): RAdam's ``rho_t`` is a difference of two numbers near
    ``2 / (1 - beta2)``, which float32 would round away.
    """
    return torch.as_tensor(k, device=like.device).to(torch.float64) + 1


class _MomentsDynamics(Dynamics):
    """Shared parts of the Adam-like families (NAdam, RAdam): an EMA first moment and an EMA second moment.

    Subclasses give :meth:`_gain`, the factor that turns ``m_next / denom`` into the step (``F`` of the update).
    Coupled (L2) weight decay is added to the gradient; decoupled decay (``decoupled_weight_decay=True``)
    shrinks the weights by ``lr * weight_decay`` per step.
    """

    state_names = ("exp_avg", "exp_avg_sq")

    @property
    def max_step(self) -> float:
        return 1.0 / (1.0 - max(self.hyper["beta1"]))

    def _decays(self, w: Tensor) -> tuple[Tensor | float, Tensor | float]:
        decoupled, wd = self._hs("decoupled", w), self._hs("weight_decay", w)
        return (1 - decoupled) * wd, decoupled * wd

    def _moments_next(self, w, state, g, noise):
        b1, b2 = self._hs("beta1", w), self._hs("beta2", w)
        coupled, _ = self._decays(w)
        gp = self._sign(g)
        if not _is_zero(coupled):
            gp = gp + coupled * w
        m, v = state["exp_avg"], state["exp_avg_sq"]
        sq = gp * gp if noise is None else gp * gp + noise
        return gp, {"exp_avg": (gp - m) * (1 - b1), "exp_avg_sq": (sq - v) * (1 - b2)}

    def _hat(self, state: dict[str, Tensor], k, like: Tensor) -> tuple[Tensor, Tensor]:
        """Bias-corrected moments after ``k`` steps."""
        kk = torch.as_tensor(k, dtype=like.dtype, device=like.device).clamp_min(1.0)
        c1, c2 = 1 - self._hs("beta1", like) ** kk, 1 - self._hs("beta2", like) ** kk
        return state["exp_avg"] / c1, state["exp_avg_sq"].clamp_min(0) / c2

    def gradient_estimate(self, w, state, u, lr, k):
        coupled, _ = self._decays(w)
        m_hat = self._hat(state, k, w)[0]
        return self._sign(m_hat if _is_zero(coupled) else m_hat - coupled * w)

    def gradient_noise(self, w, state, g, k):
        coupled, _ = self._decays(w)
        gp = self._sign(g)
        gp = gp if _is_zero(coupled) else gp + coupled * w
        return (self._hat(state, k, w)[1] - gp * gp).clamp_min(0)

    def gradient_scale(self, state, u_rms, lr, k):
        return (self._hat(state, k, u_rms)[1] + 1e-30).sqrt() + self.h("eps", u_rms)

    def direction(self, state, g_scale, k):
        return self._hat(state, k, g_scale)[0] / g_scale


class NAdamDynamics(_MomentsDynamics):
    """NAdam (and NAdamW): Adam's moments with Nesterov momentum under the decaying schedule ``mu_t``.

    ``mu_t = beta1 (1 - 0.96^(t psi) / 2)`` (``psi = momentum_decay``); the optimizer keeps the running product of
    the ``mu_t`` as state, which depends on the step count alone, so it is computed from ``k`` here
    (:func:`_nadam_log_product`) instead of being carried in the ODE state.
    """

    def _mu(self, t: Tensor, like: Tensor) -> Tensor:
        return self._hs("beta1", like) * (1.0 - 0.5 * 0.96 ** (t * self._hs("momentum_decay", like)))

    def advance_counters(self, optimizer, spec, steps):
        """The step counter and, with it, the running product ``mu_product`` of the steps it now counts."""
        super().advance_counters(optimizer, spec, steps)
        if steps <= 0:
            return
        tracked = {id(p) for p in spec.params}
        for group in optimizer.param_groups:
            b1, psi = float(group["betas"][0]), float(group["momentum_decay"])
            for p in group["params"]:
                state = optimizer.state.get(p) if id(p) in tracked else None
                if not state or "mu_product" not in state:
                    continue
                step = state["step"]
                t = torch.tensor(float(local(step).item() if isinstance(step, Tensor) else step), dtype=torch.float64)
                product = torch.exp(_nadam_log_product(b1, psi, t))
                mu = state["mu_product"]
                if isinstance(mu, Tensor):
                    local(mu).fill_(float(product))
                else:
                    state["mu_product"] = float(product)

    def _coefficients(self, t: Tensor, like: Tensor) -> tuple[Tensor, Tensor]:
        """Weights of the gradient and of the new first moment in the step taken at step count ``t``."""
        b1, psi = self._hs("beta1", like), self._hs("momentum_decay", like)
        mu, mu_next = self._mu(t, like), self._mu(t + 1, like)
        prod = torch.exp(_nadam_log_product(b1, psi, t))
        return ((1.0 - mu) / (1.0 - prod)).to(like.dtype), (mu_next / (1.0 - prod * mu_next)).to(like.dtype)

    def velocity(self, w, state, g, lr, k, noise=None):
        gp, d = self._moments_next(w, state, g, noise)
        t = _step_tensor(k, w)
        c2 = (1 - self._hs("beta2", w) ** t).to(w.dtype)
        denom = ((state["exp_avg_sq"] + d["exp_avg_sq"]).clamp_min(0) / c2 + 1e-30).sqrt() + self._hs("eps", w)
        a, b = self._coefficients(t, w)
        step = (a * gp + b * (state["exp_avg"] + d["exp_avg"])) / denom
        _, decay = self._decays(w)
        if not _is_zero(decay):
            step = step + decay * w
        return -lr * step, d

    def gradient_from_velocity(self, w, state, u, lr, k):
        # held constant, the first moment settles at g: the step is (a + b) g / denom
        coupled, decay = self._decays(w)
        a, b = self._coefficients(_step_tensor(k, w), w)
        denom = self.gradient_scale(state, u, lr, k)
        gp = (-u / lr.clamp_min(_TINY) - decay * w) * denom / (a + b)
        return self._sign(gp - coupled * w)


def _nadam_log_product(b1: Tensor | float, psi: Tensor | float, t: Tensor, terms: int = 48) -> Tensor:
    """``log prod_{i=1..t} b1 (1 - q^i / 2)`` with ``q = 0.96^psi``: NAdam's ``mu_product`` after ``t`` steps.

    ``log(1 - x) = -sum_j x^j / j`` turns the sum over steps into geometric series in closed form,
    ``sum_i (q^i / 2)^j = 2^-j q^j (1 - q^(j t)) / (1 - q^j)``, which is exact at integer ``t`` (up to the
    ``terms``-th term, below ``2^-terms``) and smooth in between, as the ODE's fractional times need.
    """
    q = 0.96**psi
    out = t * torch.log(torch.as_tensor(b1, dtype=t.dtype, device=t.device))
    for j in range(1, terms + 1):
        qj = q**j
        if isinstance(qj, float):
            geo = t if qj >= 1.0 else qj * (1 - qj**t) / (1 - qj)
        else:
            qj = torch.as_tensor(qj, dtype=t.dtype, device=t.device)
            flat = qj >= 1.0
            geo = torch.where(flat, t, qj * (1 - qj**t) / torch.where(flat, torch.ones_like(qj), 1 - qj))
        out = out - (0.5**j / j) * geo
    return out


class RAdamDynamics(_MomentsDynamics):
    """RAdam (and its decoupled-decay form): Adam's step rectified by the variance of its adaptive learning rate.

    While the length of the approximated simple moving average ``rho_t`` is at most 5 (the first few steps) the
    step is the bias-corrected first moment alone, as in torch.
    """

    def _gain(self, t: Tensor, v_next: Tensor, like: Tensor) -> Tensor:
        """Factor from the bias-corrected first moment to the step at step count ``t``."""
        b2, eps = self._hs("beta2", like), self._hs("eps", like)
        c2 = 1 - b2**t
        rho_inf = 2 / (1 - b2) - 1
        rho_t = rho_inf - 2 * t * b2**t / c2
        rect = ((rho_t - 4) * (rho_t - 2) * rho_inf / ((rho_inf - 4) * (rho_inf - 2) * rho_t)).clamp_min(0).sqrt()
        rect, rho_t, c2 = rect.to(like.dtype), rho_t.to(like.dtype), c2.to(like.dtype)
        adaptive = c2.sqrt() / ((v_next.clamp_min(0) + 1e-30).sqrt() + eps)
        return torch.where(rho_t > 5.0, rect * adaptive, torch.ones_like(adaptive))

    def velocity(self, w, state, g, lr, k, noise=None):
        _, d = self._moments_next(w, state, g, noise)
        t = _step_tensor(k, w)
        m_hat = (state["exp_avg"] + d["exp_avg"]) / (1 - self._hs("beta1", w) ** t).to(w.dtype)
        step = m_hat * self._gain(t, state["exp_avg_sq"] + d["exp_avg_sq"], w)
        _, decay = self._decays(w)
        if not _is_zero(decay):
            step = step + decay * w
        return -lr * step, d

    def gradient_from_velocity(self, w, state, u, lr, k):
        coupled, decay = self._decays(w)
        gain = self._gain(_step_tensor(k, w), state["exp_avg_sq"], w)
        gp = (-u / lr.clamp_min(_TINY) - decay * w) / gain
        return self._sign(gp - coupled * w)


class AdamaxDynamics(Dynamics):
    """Adamax: Adam's first moment and an exponentially weighted infinity norm ``exp_inf`` of the gradients.

    ``exp_inf`` follows ``max(beta2 exp_inf, |g| + eps)``. A smooth surrogate gradient would let it decay below
    the run's (whose minibatch gradients keep pushing it up), so the noise implied at the anchor
    (:meth:`gradient_noise`) enters as ``|g| -> sqrt(g^2 + noise)``, which holds ``exp_inf`` where the run keeps it.
    """

    state_names = ("exp_avg", "exp_inf")

    @property
    def max_step(self) -> float:
        return 1.0 / (1.0 - max(self.hyper["beta1"]))

    def velocity(self, w, state, g, lr, k, noise=None):
        b1, b2, eps = self._hs("beta1", w), self._hs("beta2", w), self._hs("eps", w)
        gp = self._coupled(self._sign(g), w)
        m, u = state["exp_avg"], state["exp_inf"]
        dm = (gp - m) * (1 - b1)
        size = gp.abs() if noise is None else (gp * gp + noise).sqrt()
        u_next = torch.maximum(u * b2, size + eps)
        c1 = (1 - b1 ** _step_tensor(k, w)).to(w.dtype)
        return -lr / c1 * (m + dm) / u_next, {"exp_avg": dm, "exp_inf": u_next - u}

    def _m_hat(self, state, k, like):
        kk = torch.as_tensor(k, dtype=like.dtype, device=like.device).clamp_min(1.0)
        return state["exp_avg"] / (1 - self._hs("beta1", like) ** kk)

    def gradient_estimate(self, w, state, u, lr, k):
        return self._sign(self._m_hat(state, k, w) - self.h("weight_decay", w) * w)

    def gradient_noise(self, w, state, g, k):
        gp = self._coupled(self._sign(g), w)
        size = (state["exp_inf"] - self.h("eps", w)).clamp_min(0)
        return (size * size - gp * gp).clamp_min(0)

    def gradient_from_velocity(self, w, state, u, lr, k):
        gp = -u * state["exp_inf"] / lr.clamp_min(_TINY)
        return self._sign(gp - self.h("weight_decay", w) * w)

    def gradient_scale(self, state, u_rms, lr, k):
        return state["exp_inf"].clamp_min(0) + _TINY

    def direction(self, state, g_scale, k):
        return self._m_hat(state, k, g_scale) / g_scale


class AdagradDynamics(Dynamics):
    """Adagrad: the sum of squared gradients ``sum`` is ODE state; ``lr_decay`` divides the lr by ``1 + k decay``.

    The sum grows without bound (no relaxation), so there is no closed form under a held gradient and the
    forecast integrates with torchdyn. The minibatch noise implied at the anchor is the average squared gradient
    beyond the surrogate's, so the sum keeps growing as fast as the run makes it grow.
    """

    state_names = ("sum",)

    def _clr(self, lr: Tensor, k, like: Tensor) -> Tensor:
        kk = torch.as_tensor(k, dtype=like.dtype, device=like.device)
        decay = self._hs("lr_decay", like)
        return lr if _is_zero(decay) else lr / (1 + kk * decay)

    def velocity(self, w, state, g, lr, k, noise=None):
        gp = self._coupled(self._sign(g), w)
        ds = gp * gp if noise is None else gp * gp + noise
        std = (state["sum"] + ds).clamp_min(0).sqrt() + self._hs("eps", w)
        return -self._clr(lr, k, w) * gp / std, {"sum": ds}

    def _std(self, state, like):
        return state["sum"].clamp_min(0).sqrt() + self.h("eps", like)

    def gradient_estimate(self, w, state, u, lr, k):
        gp = -u * self._std(state, w) / self._clr(lr, k, w).clamp_min(_TINY)
        return self._sign(gp - self.h("weight_decay", w) * w)

    def gradient_noise(self, w, state, g, k):
        kk = torch.as_tensor(k, dtype=w.dtype, device=w.device).clamp_min(1.0)
        gp = self._coupled(self._sign(g), w)
        mean_sq = (state["sum"] - self.h("initial_accumulator_value", w)).clamp_min(0) / kk
        return (mean_sq - gp * gp).clamp_min(0)

    def gradient_scale(self, state, u_rms, lr, k):
        kk = torch.as_tensor(k, dtype=u_rms.dtype, device=u_rms.device).clamp_min(1.0)
        return (state["sum"].clamp_min(0) / kk + 1e-30).sqrt() + self.h("eps", u_rms)


class GenericDynamics(SGDDynamics):
    """Opt-in fallback for other optimizers: SGD-shaped, ``dw/ds = -lr g``, the field learns ``g`` outright."""

    def held_gradient(self, state, g, noise):
        return _SGDHeld(self._sign(g), 0.0)

    def _coupled(self, g: Tensor, w: Tensor) -> Tensor:
        return g


def _groups(optimizer: torch.optim.Optimizer, keys: dict[str, object]) -> dict[str, list[float]]:
    out: dict[str, list[float]] = {k: [] for k in keys}
    for group in optimizer.param_groups:
        for k, default in keys.items():
            out[k].append(float(group.get(k, default)))
    return out


def dynamics_for(optimizer: torch.optim.Optimizer, spec: ParamSpec, generic: bool = False) -> Dynamics:
    """Build the dynamics of ``optimizer``'s family, reading every hyperparameter from its param groups.

    Args:
        optimizer: the live torch optimizer (not a Lightning wrapper).
        spec: the tracked parameters.
        generic: use :class:`GenericDynamics` for optimizers outside :data:`SUPPORTED` instead of raising.

    Raises:
        ValueError: unsupported optimizer or option (AMSGrad, RMSprop with ``centered`` and momentum mixed).
    """
    gidx = spec.group_index(dtype=torch.int32)  # indexes only: int32 keeps it at 4 bytes a scalar
    name = type(optimizer).__name__
    if isinstance(optimizer, torch.optim.Adam | torch.optim.AdamW):
        if any(g.get("amsgrad", False) for g in optimizer.param_groups):
            raise ValueError("`amsgrad=True` is not supported by GFM's Adam dynamics; use `amsgrad=False`.")
        hyper = _groups(optimizer, {"weight_decay": 0.0, "eps": 1e-8, "maximize": 0.0})
        hyper["beta1"] = [float(g["betas"][0]) for g in optimizer.param_groups]
        hyper["beta2"] = [float(g["betas"][1]) for g in optimizer.param_groups]
        is_w = isinstance(optimizer, torch.optim.AdamW)
        hyper["decoupled"] = [float(g.get("decoupled_weight_decay", is_w) or is_w) for g in optimizer.param_groups]
        return AdamDynamics(hyper, gidx)
    if isinstance(optimizer, torch.optim.SGD):
        hyper = _groups(
            optimizer,
            {"weight_decay": 0.0, "momentum": 0.0, "dampening": 0.0, "nesterov": 0.0, "maximize": 0.0},
        )
        if max(hyper["momentum"]) > 0:
            return MomentumDynamics(hyper, gidx)
        return SGDDynamics(hyper, gidx)
    if isinstance(optimizer, torch.optim.RMSprop):
        hyper = _groups(
            optimizer,
            {
                "weight_decay": 0.0,
                "momentum": 0.0,
                "alpha": 0.99,
                "eps": 1e-8,
                "centered": 0.0,
                "maximize": 0.0,
            },
        )
        return RMSpropDynamics(hyper, gidx)
    if isinstance(optimizer, torch.optim.NAdam | torch.optim.RAdam):
        hyper = _groups(optimizer, {"weight_decay": 0.0, "eps": 1e-8, "maximize": 0.0, "momentum_decay": 4e-3})
        hyper["beta1"] = [float(g["betas"][0]) for g in optimizer.param_groups]
        hyper["beta2"] = [float(g["betas"][1]) for g in optimizer.param_groups]
        hyper["decoupled"] = [float(bool(g.get("decoupled_weight_decay", False))) for g in optimizer.param_groups]
        cls = NAdamDynamics if isinstance(optimizer, torch.optim.NAdam) else RAdamDynamics
        return cls(hyper, gidx)
    if isinstance(optimizer, torch.optim.Adamax):
        hyper = _groups(optimizer, {"weight_decay": 0.0, "eps": 1e-8, "maximize": 0.0})
        hyper["beta1"] = [float(g["betas"][0]) for g in optimizer.param_groups]
        hyper["beta2"] = [float(g["betas"][1]) for g in optimizer.param_groups]
        return AdamaxDynamics(hyper, gidx)
    if isinstance(optimizer, torch.optim.Adagrad):
        hyper = _groups(
            optimizer,
            {"weight_decay": 0.0, "eps": 1e-10, "maximize": 0.0, "lr_decay": 0.0, "initial_accumulator_value": 0.0},
        )
        return AdagradDynamics(hyper, gidx)
    if generic:
        return GenericDynamics(_groups(optimizer, {"maximize": 0.0, "weight_decay": 0.0}), gidx)
    raise ValueError(
        f"GFM has optimizer-aware dynamics for {', '.join(SUPPORTED)} (torch.optim); got `{name}`. "
        "Use one of those, or pass `generic_dynamics=True` to GFMCallback for an SGD-shaped fallback in which "
        "the field learns the update direction without knowing the optimizer's preconditioning."
    )


def read_state(optimizer: torch.optim.Optimizer, spec: ParamSpec, names, device=None, dtype=None) -> dict:
    """Flatten the optimizer state ``names`` of every tracked parameter; absent entries read as zeros.

    A sharded parameter's state (a ``DTensor`` sharded like it) is read through its local tensor.

    Returns:
        name -> tensor of shape ``(P,)``.
    """
    out = {}
    for name in names:
        parts = []
        for p, x in zip(spec.params, spec.tensors, strict=True):
            t = optimizer.state.get(p, {}).get(name)
            parts.append(torch.zeros_like(x) if t is None else t)
        out[name] = spec.flatten(parts, device=device, dtype=dtype)
    return out


@torch.no_grad()
def write_state(optimizer: torch.optim.Optimizer, spec: ParamSpec, state: dict[str, Tensor]) -> None:
    """Copy flat state tensors (shape ``(P,)``) into ``optimizer.state`` in place where the entry exists.

    A sharded parameter's state (``DTensor``) is written through its local tensor.
    """
    for name, flat in state.items():
        for p, view in zip(spec.params, spec.unflatten(flat), strict=False):
            t = optimizer.state.get(p, {}).get(name)
            if t is not None:
                local(t).copy_(view)


def take_snapshot(
    optimizer: torch.optim.Optimizer,
    spec: ParamSpec,
    state_names,
    step: int,
    device=None,
    dtype=None,
    *,
    into: TrajectoryBuffer | None = None,
) -> Snapshot:
    """The training state after optimizer step ``step``: flat weights, optimizer state, group lrs, step counter.

    Args:
        optimizer: the live optimizer.
        spec: the tracked parameters.
        state_names: optimizer state to keep (:attr:`Dynamics.state_names`).
        step: global optimizer step.
        device: where the flat copies are made (e.g. the buffer's device); ignored with ``into``.
        dtype: dtype of the flat copies; ignored with ``into``.
        into: a buffer to record into directly (:meth:`TrajectoryBuffer.record`, one copy, no intermediate).

    Returns:
        The snapshot: new flat tensors of shape ``(P,)``, or with ``into`` the buffer's newest slot (views).
    """
    if into is not None:
        into.record(optimizer, spec, state_names, step)
        return into[-1]
    return Snapshot(
        step=step,
        weights=spec.flatten(device=device, dtype=dtype),
        state=read_state(optimizer, spec, state_names, device=device, dtype=dtype),
        lrs=torch.tensor([float(g["lr"]) for g in optimizer.param_groups], dtype=torch.float64),
        opt_step=step_count(optimizer, spec),
    )


def future_learning_rates(optimizer: torch.optim.Optimizer, scheduler, n_calls: int) -> Tensor:
    """Learning rates after each of the next ``n_calls`` ``scheduler.step()`` calls, without disturbing it.

    The scheduler is deep-copied onto a stand-in optimizer that holds one dummy tensor per param group, and the
    copy is stepped. The real scheduler, optimizer and parameters are never touched.

    Args:
        optimizer: the optimizer the scheduler drives.
        scheduler: a ``torch.optim.lr_scheduler`` object, or ``None`` (constant learning rate).
        n_calls: how many future scheduler steps to replay.

    Returns:
        Shape ``(n_calls + 1, G)``: row 0 is the current learning rate of each of the ``G`` groups.
    """
    now = torch.tensor([float(g["lr"]) for g in optimizer.param_groups], dtype=torch.float64)
    if scheduler is None or n_calls <= 0 or not hasattr(scheduler, "get_last_lr"):
        return now.expand(max(n_calls, 0) + 1, -1).clone()
    stand_in = torch.optim.SGD([torch.zeros(1)], lr=1.0)
    stand_in.param_groups = [
        {**{k: v for k, v in g.items() if k != "params"}, "params": [torch.zeros(1)]} for g in optimizer.param_groups
    ]
    stand_in.state = {}  # type: ignore[assignment]
    shadow = copy.deepcopy(scheduler, memo={id(optimizer): stand_in})
    rows = [now]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for _ in range(n_calls):
            shadow.step()
            rows.append(torch.tensor([float(g["lr"]) for g in stand_in.param_groups], dtype=torch.float64))
    return torch.stack(rows)


def lr_by_step(lr_calls: Tensor, horizon: int, every: int, offset: int = 0) -> Tensor:
    """Expand per-scheduler-call learning rates to one row per future optimizer step.

    Args:
        lr_calls: ``(n_calls + 1, G)`` from :func:`future_learning_rates`.
        horizon: number of future optimizer steps wanted.
        every: optimizer steps between two scheduler calls (``1`` for ``interval="step"``).
        offset: optimizer steps already done since the last scheduler call.

    Returns:
        Shape ``(horizon + 1, G)``; row ``s`` is the learning rate used by the ``s``-th next step.
    """
    s = torch.arange(horizon + 1)
    idx = ((s + offset) // max(every, 1)).clamp_max(lr_calls.shape[0] - 1)
    return lr_calls[idx]


def lr_at_calls(lr_calls: Tensor, horizon: int, call_steps: list[int]) -> Tensor:
    """Expand per-scheduler-call learning rates to one row per future optimizer step, calls at given steps.

    For schedulers whose calls are not evenly spaced in optimizer steps: an epoch-interval scheduler when the
    epochs have different lengths (gradient accumulation that changes between epochs).

    Args:
        lr_calls: ``(n_calls + 1, G)`` from :func:`future_learning_rates`.
        horizon: number of future optimizer steps wanted.
        call_steps: increasing; the ``i``-th future scheduler call happens after this many more optimizer steps.

    Returns:
        Shape ``(horizon + 1, G)``; row ``s`` follows every call at ``call_steps <= s``.

    Example:
        >>> calls = torch.tensor([[1.0], [0.5], [0.25]], dtype=torch.float64)
        >>> lr_at_calls(calls, 5, [2, 3])[:, 0].tolist()
        [1.0, 1.0, 0.5, 0.25, 0.25, 0.25]
    """
    at = torch.tensor(list(call_steps), dtype=torch.long)
    idx = torch.searchsorted(at, torch.arange(horizon + 1), right=True).clamp_max(lr_calls.shape[0] - 1)
    return lr_calls[idx]


def calls_needed(horizon: int, every: int, offset: int = 0) -> int:
    """Number of scheduler calls that :func:`lr_by_step` needs for ``horizon`` steps."""
    return (horizon + offset) // max(every, 1)
