"""GFMCallback: the Lightning adapter. The only module of the package that imports Lightning.

Hooks decide *when*; the pure modules decide *what*: :mod:`~lightning_gfm.trajectory` stores snapshots,
:mod:`~lightning_gfm.flow.matching` fits the field, :mod:`~lightning_gfm.forecast` integrates it and
:mod:`~lightning_gfm.jump` chooses, applies or rolls back.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import sys
import time
import warnings
from collections.abc import Sequence
from dataclasses import asdict
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities.data import extract_batch_size
from lightning.pytorch.utilities.model_helpers import is_overridden
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn
from torch import Tensor

from lightning_gfm.budget import AttemptBudget, auto_schedule
from lightning_gfm.distributed import Shard, agree, exchange, fit_message_size, min_over_ranks
from lightning_gfm.dynamics import (
    calls_needed,
    dynamics_for,
    future_learning_rates,
    lr_at_calls,
    lr_by_step,
)
from lightning_gfm.fields import field_info, load_field, resolve_field, save_field
from lightning_gfm.flow.field import FieldConfig, GradientField
from lightning_gfm.flow.matching import fit_field
from lightning_gfm.flow.meta import MetaField, family_of, meta_forecast
from lightning_gfm.flow.ode import SOLVERS, _torchdyn
from lightning_gfm.flow.window import Window, shard_sums_size
from lightning_gfm.forecast import ForecastPath, backtest_error, forecast
from lightning_gfm.jump import (
    JumpOutcome,
    JumpRecord,
    OverBudget,
    StatePolicy,
    apply_state_policy,
    choose_and_apply,
)
from lightning_gfm.loggers import GFMReporter
from lightning_gfm.memory import (
    DEFAULT_FRACTION,
    MemoryPlan,
    available_bytes,
    default_budget,
    footprint_bytes,
    forecast_bytes,
    parse_bytes,
    plan_memory,
)
from lightning_gfm.params import ParamSpec, local
from lightning_gfm.trajectory import TrajectoryBuffer

#: candidates evaluated in full after the screen (successive halving: the best two of the screen)
FULL_CANDIDATES = 2
#: keyword arguments that were removed, and why (``GFMCallback(**{name: ...})`` raises this message)
REMOVED: dict[str, str] = {
    "settle": (
        "judging candidates after a few private optimizer steps measured no better than judging them where they "
        "land, on the dev runs and on runs long enough to afford it (docs/experiments.md, E41 and E48); "
        "candidates are judged where they land. Remove the argument."
    ),
}
#: branch label of the meta-trained field's points in a joined forecast path (trend lengths label the prior's)
META_LABEL = -1
#: scalars per chunk of a meta-trained field's forecast on a CPU (its per-scalar network's activations fit the cache)
META_CHUNK = 1 << 16

#: strategies GFM refuses at setup, and why (docs/distributed.md has the support matrix and the per-shard design)
_UNSUPPORTED_STRATEGIES = {
    "FSDP": "each rank holds a flat shard of every parameter, and per-shard snapshots are not implemented yet.",
    "DeepSpeed": "DeepSpeed owns the optimizer step and (ZeRO) partitions the optimizer state GFM reads and writes.",
    "XLA": "GFM's many small, data-dependent tensor operations are not written for XLA's lazy tensors.",
}


def _field_kind(path: str) -> str:
    """The kind of field a file holds (``"gradient"`` when it cannot be read: loading it then says why)."""
    try:
        return str(field_info(path).get("kind", "gradient"))
    except Exception:
        return "gradient"


def _check_int(name: str, value: Any, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"`{name}` must be an int >= {minimum}, got {value!r}.")


class GFMCallback(pl.Callback):
    r"""Gradient Flow Matching: forecast the run's own weight trajectory and jump ahead along it.

    Every ``record_every`` optimizer steps the callback stores the trainable weights and the optimizer state.
    Every ``jump_every`` steps it starts from the denoised trend of the recent snapshots, integrates the
    optimizer-aware vector field (the optimizer's own update rule driven by a gradient surrogate, under the
    known learning-rate schedule; fitted online by flow matching when ``fit_steps > 0``, or loaded with
    ``field``) with torchdyn up to ``horizon`` steps ahead (and, if asked, the prior along each shorter trend line
    of ``branch_trends``). Every path is moved to start at the current weights (only the forecast's move counts,
    not the denoising); ``n_candidates`` points of each are evaluated on validation batches, the weights move (in
    place) to the best one if it beats staying put by ``min_delta``, and are otherwise restored bit-exactly.

    Args:
        record_every: optimizer steps between snapshots; ``None`` (default) derives it from ``jump_every``
            (:func:`auto_schedule`).
        window: snapshots kept (memory: about ``window * (1 + n_state)`` copies of the weights on
            ``buffer_device``, where ``n_state`` is 0 for SGD, 1 for momentum, 2 for Adam).
        jump_every: optimizer steps between jump attempts (attempts wait until the window is long enough);
            ``None`` (default) makes it a sixth of the planned training (:func:`auto_schedule`), so that the
            same callback fits runs of a few hundred and of a million steps.
        horizon: farthest forecast, in optimizer steps; ``None`` means as far as the field was fitted
            (``span`` record intervals, fewer while the window is shorter than ``span + history + 1``);
            ``"end"`` means the end of the planned training (the forecasted convergence point; beyond the fitted
            span the field holds its last learned time dependence).
            Never beyond the end of the planned training.
        n_candidates: points of each forecast path evaluated up to the horizon.
        spacing: ``"geometric"``, candidates at the horizon, half of it, a quarter, ...; ``"even"``, evenly
            spaced up to it.
        monitor: metric logged by ``validation_step`` that decides; default ``"val_loss"``. Without a
            validation loop, ``training_step`` is run on a held-back slice of training batches and its logged
            ``monitor`` or, failing that, its returned loss decides.
        mode: ``"min"`` or ``"max"``.
        min_delta: relative improvement over staying put a jump must show (``0.01`` = 1 %). (A forecaster whose
            path starts elsewhere than the current weights, see :meth:`forecast_path`, must also beat its start.)
        eval_batches: validation batches used for each evaluation (fixed for the whole fit, cached on device).
        overhead: share of the planned training time GFM may spend on recording and attempts, beyond the time
            its accepted jumps saved (``0.03`` = 3 %, :class:`~lightning_gfm.budget.AttemptBudget`): an attempt
            or an evaluation predicted to exceed it is skipped, so a run GFM cannot speed up loses about this much.
            ``None``: no limit.
        optimizer_state: after an accepted jump, take the ``"forecast"`` optimizer state the ODE carried, with the
            step counter advanced to match (the default: the state the forecast itself assumed; in
            ``benchmarks/state_policy.py`` it ties ``"keep"`` with Adam and SGD momentum), ``"keep"`` the anchor's
            moments and counter, or ``"reset"`` them.
        field: path (``str`` or ``os.PathLike``) of a saved field (safetensors) to start from; ``"pretrained"``
            (or ``"pretrained:<name>"``) for a field shipped with the package (see ``docs/pretrained.md``);
            ``None`` starts from the prior (the constant-gradient forecast). With ``fit_steps > 0`` a loaded field
            is fine-tuned online on the run's own window; ``fit_steps=0`` uses it as it is. A meta-trained field
            (:class:`~lightning_gfm.flow.meta.MetaField`, e.g. ``"pretrained:meta"``, trained on a corpus of
            runs by ``lightning-gfm meta-train``) forecasts beside the prior: the two share an attempt's
            ``n_candidates`` points (the prior's farther half within its reach, the meta field's at the planned
            end of the run and its half) and validation chooses (:attr:`JumpRecord.source
            <lightning_gfm.jump.JumpRecord>` says whose won).
        fit_steps: gradient steps of each online flow-matching fit of the field to the run's own window (e.g.
            ``100``). ``0`` (default) forecasts with the optimizer-aware prior field (or the loaded ``field``)
            unchanged: on the benchmark the online fit cost time and saved no more steps (docs/experiments.md).
        fit_batch: scalars per fitting step.
        fit_seconds: wall-clock cap of one fit.
        backtest: snapshots held back to check a fitted or loaded field against the prior before trusting it
            (0 disables; unused while the field is the prior itself). The prior is this callback's own (its
            ``anchor``, ``trend``, ``history``), also when a loaded field was trained with other settings, so a
            loaded field is used only where it beats what the callback would do without it.
        history: past velocities the field sees.
        hidden: hidden width of the field's network.
        span: record intervals ahead the field is fitted for, and the farthest default horizon (16: measured in
            docs/experiments.md, E30-E33, E38).
        anchor: where the forecast starts and its starting gradient comes from: ``"state"``, the latest
            snapshot and the optimizer's moments there; ``"velocity"``, the latest snapshot and the mean of the
            last ``history`` velocities pushed back through the optimizer's preconditioning (less noisy; the
            prior field then extrapolates the recent average velocity, shaped by the optimizer and its
            learning-rate schedule); ``"trend"``, denoised: the least-squares line through the last ``trend``
            snapshots gives the starting weights (its value now) and the velocity (its slope).
        trend: snapshots in the least-squares line of ``anchor="trend"`` (at least 2).
        branch_trends: shorter trend lines (each in ``[2, trend - 1]``, e.g. ``(3,)``) along which the prior
            forecasts too; their points compete with the main path's on validation, so each attempt picks its own
            bias-variance trade (a long line denoises, a short one follows a bending path). Each costs a forecast
            and ``n_candidates`` evaluations per attempt. ``None`` (default) or ``()``: none. At the default reach a
            3-snapshot branch won 1 of 40 accepted jumps and changed no crossing (docs/experiments.md, E39); with
            longer early reaches it helped (E35-E36).
        solver: fixed-step torchdyn solver: ``"euler"``, ``"midpoint"`` or ``"rk4"``.
        buffer_device: where snapshots are stored.
        buffer_dtype: dtype of stored snapshots (a ``torch.dtype`` or its name; ``"bfloat16"`` halves memory).
        chunk_size: scalars integrated at once (bounds forecasting memory).
        memory_budget: bytes GFM may use beyond the model and its optimizer: ``"auto"`` (default), an int, or
            a string such as ``"8GiB"`` or ``"500MB"``. ``"auto"`` is a quarter of the memory available on
            ``buffer_device`` when fit starts (shared by the processes of one host that record there), and at most
            10 times the tracked parameters' training footprint (weights, gradients, optimizer state) plus 0.25 GiB,
            1 GiB allowed to any model where that quarter allows it (:func:`~lightning_gfm.memory.default_budget`).
            When fit starts, :func:`~lightning_gfm.memory.plan_memory` picks the largest plan within it (the
            full ``window`` in ``buffer_dtype``, else in bfloat16, else fewer snapshots, and a ``chunk_size`` no
            larger than asked), the buffer is allocated at once, and the plan is kept in ``memory_plan`` and
            logged. A budget too small for a useful window switches GFM off for the run with one warning
            (training goes on untouched). ``None`` plans nothing: the arguments are used as given.
        generic_dynamics: allow optimizers outside SGD, Adam, AdamW, RMSprop with an SGD-shaped fallback.
        num_threads: CPU threads for GFM's own fitting and integration (restored afterwards); ``None`` keeps
            torch's setting. GFM's work is many small tensor operations, where extra intra-op threads mostly add
            synchronisation: one fitting step took 5.7 ms with 1 thread and 400 ms with 2 on a loaded 2-core
            machine. Raise it for models of tens of millions of parameters.
        seed: seeds fitting, so runs are reproducible.

    Example:
        >>> cb = GFMCallback(record_every=5, jump_every=50)
        >>> cb.should_record(10), cb.should_jump(50), cb.should_jump(60)
        (True, True, False)
    """

    def __init__(
        self,
        *,
        record_every: int | None = None,
        window: int = 24,
        jump_every: int | None = None,
        horizon: int | Literal["end"] | None = None,
        n_candidates: int = 4,
        spacing: Literal["geometric", "even"] = "geometric",
        monitor: str = "val_loss",
        mode: Literal["min", "max"] = "min",
        min_delta: float = 0.0,
        eval_batches: int = 4,
        overhead: float | None = 0.03,
        optimizer_state: Literal["forecast", "keep", "reset"] = "forecast",
        field: str | None = None,
        fit_steps: int = 0,
        fit_batch: int = 4096,
        fit_seconds: float | None = None,
        backtest: int = 3,
        history: int = 3,
        hidden: int = 16,
        span: int = 16,
        anchor: Literal["state", "velocity", "trend"] = "trend",
        trend: int = 8,
        branch_trends: Sequence[int] | None = None,
        solver: Literal["euler", "midpoint", "rk4"] = "rk4",
        buffer_device: str | torch.device = "cpu",
        buffer_dtype: torch.dtype | Literal["float32", "bfloat16", "float16"] = "float32",
        chunk_size: int = 1 << 20,
        memory_budget: int | str | None = "auto",
        generic_dynamics: bool = False,
        num_threads: int | None = 1,
        seed: int = 0,
        **removed: Any,
    ) -> None:
        super().__init__()
        for name in removed:
            if name in REMOVED:
                raise TypeError(f"GFMCallback's `{name}` was removed: {REMOVED[name]}")
            raise TypeError(f"GFMCallback() got an unexpected keyword argument {name!r}.")
        if record_every is not None:
            _check_int("record_every", record_every, 1)
        _check_int("window", window, 4)
        if memory_budget is None or memory_budget == "auto":
            self.memory_budget: int | str | None = memory_budget
        else:
            self.memory_budget = parse_bytes(memory_budget, "memory_budget")
        #: the memory plan chosen when fit started (:class:`~lightning_gfm.memory.MemoryPlan`), ``None`` before.
        self.memory_plan: MemoryPlan | None = None
        #: why GFM is switched off for this run (its memory plan did not fit), ``None`` while it works.
        self.inactive_reason: str | None = None
        if jump_every is not None:
            _check_int("jump_every", jump_every, 1)
        if horizon is not None and horizon != "end":
            if isinstance(horizon, str):
                raise ValueError(f"`horizon` must be an int >= 1, 'end' or None, got {horizon!r}.")
            _check_int("horizon", horizon, 1)
        _check_int("n_candidates", n_candidates, 1)
        _check_int("eval_batches", eval_batches, 1)
        if overhead is not None and not (
            isinstance(overhead, int | float)
            and not isinstance(overhead, bool)
            and math.isfinite(overhead)
            and overhead >= 0
        ):
            raise ValueError(
                f"`overhead` must be a finite number >= 0 (a share of the run's time) or None, got {overhead!r}."
            )
        _check_int("fit_steps", fit_steps, 0)
        _check_int("fit_batch", fit_batch, 1)
        _check_int("backtest", backtest, 0)
        _check_int("history", history, 1)
        _check_int("hidden", hidden, 1)
        _check_int("span", span, 1)
        _check_int("chunk_size", chunk_size, 1)
        _check_int("seed", seed, 0)
        if num_threads is not None:
            _check_int("num_threads", num_threads, 1)
        if not isinstance(monitor, str) or not monitor:
            raise ValueError(f"`monitor` must be a non-empty metric name, got {monitor!r}.")
        if mode not in ("min", "max"):
            raise ValueError(f"`mode` must be 'min' or 'max', got {mode!r}.")
        if not isinstance(min_delta, int | float) or not math.isfinite(min_delta) or min_delta < 0:
            raise ValueError(f"`min_delta` must be a finite number >= 0, got {min_delta!r}.")
        if fit_seconds is not None and not (isinstance(fit_seconds, int | float) and fit_seconds > 0):
            raise ValueError(f"`fit_seconds` must be a positive number of seconds or None, got {fit_seconds!r}.")
        try:
            self.optimizer_state = StatePolicy(optimizer_state)
        except ValueError:
            choices = [p.value for p in StatePolicy]
            raise ValueError(f"`optimizer_state` must be one of {choices}, got {optimizer_state!r}.") from None
        if solver not in SOLVERS:
            raise ValueError(f"`solver` must be one of {SOLVERS}, got {solver!r}.")
        if isinstance(buffer_dtype, str) and buffer_dtype in ("float32", "bfloat16", "float16"):
            buffer_dtype = getattr(torch, buffer_dtype)
        if not isinstance(buffer_dtype, torch.dtype) or not buffer_dtype.is_floating_point:
            raise ValueError(
                "`buffer_dtype` must be a floating torch.dtype (or 'float32', 'bfloat16', 'float16'), "
                f"got {buffer_dtype!r}."
            )
        if anchor not in ("state", "velocity", "trend"):
            raise ValueError(f"`anchor` must be 'state', 'velocity' or 'trend', got {anchor!r}.")
        _check_int("trend", trend, 2)
        if branch_trends is None:
            branch_trends = ()
        if isinstance(branch_trends, str | bytes) or not isinstance(branch_trends, Sequence):
            raise ValueError(f"`branch_trends` must be a sequence of ints (or None), got {branch_trends!r}.")
        branch_trends = tuple(branch_trends)
        if branch_trends and anchor != "trend":
            raise ValueError(f"`branch_trends` needs `anchor='trend'`, got anchor={anchor!r} and {branch_trends!r}.")
        for n in branch_trends:
            if isinstance(n, bool) or not isinstance(n, int) or not 2 <= n < trend or branch_trends.count(n) > 1:
                raise ValueError(
                    f"`branch_trends` must hold distinct ints in [2, trend - 1] = [2, {trend - 1}] (shorter lines "
                    f"than `trend`), got {branch_trends!r}."
                )
        config = FieldConfig(history=history, hidden=hidden, span=float(span), anchor=anchor, trend=trend)
        min_window = config.min_anchor + max(backtest, 1) + 2
        if window < min_window:
            raise ValueError(
                f"`window` must be >= {'max(history, trend - 1)' if anchor == 'trend' else 'history'} "
                f"+ max(backtest, 1) + 2 = {min_window} snapshots to fit and backtest a field, got {window}."
            )
        if field is not None and not isinstance(field, str | os.PathLike):
            raise ValueError(f"`field` must be a path to a saved field or None, got {type(field).__name__}.")
        if field is not None:
            field = resolve_field(field)  # "pretrained" / "pretrained:<name>" -> the shipped file
        if field is not None and not os.path.isfile(field):
            raise FileNotFoundError(f"`field` file not found: {str(field)!r}.")
        self._schedule_args = (record_every, jump_every)
        self.record_every, self.jump_every = auto_schedule(None, record_every, jump_every)
        self.window = window
        self.horizon = horizon
        self.n_candidates = n_candidates
        if spacing not in ("geometric", "even"):
            raise ValueError(f"`spacing` must be 'geometric' or 'even', got {spacing!r}.")
        self.spacing = spacing
        self.monitor = monitor
        self.mode = mode
        self.min_delta = float(min_delta)
        self.eval_batches = eval_batches
        #: the do-no-harm rule (:class:`~lightning_gfm.budget.AttemptBudget`); ``budget.skipped`` counts skips.
        self.budget = AttemptBudget(overhead)
        self.field_path = None if field is None else os.fspath(field)
        #: a meta-trained field's file (:class:`~lightning_gfm.flow.meta.MetaField`): its forecast shares an
        #: attempt's points with the prior's and validation chooses; ``field_path`` then names no gradient field.
        self.meta_path: str | None = None
        if self.field_path is not None and _field_kind(self.field_path) == "meta":
            self.meta_path, self.field_path = self.field_path, None
        self.meta: MetaField | None = None
        self.fit_steps = fit_steps
        self.fit_batch = fit_batch
        self.fit_seconds = fit_seconds
        self.backtest = backtest
        self.field_config = config
        self.prior_config = config  # the prior a fitted or loaded field must beat: this callback's own settings
        self.branch_trends = branch_trends
        self.solver = solver
        self.buffer_device = torch.device(buffer_device)
        self.buffer_dtype = buffer_dtype
        self.chunk_size = chunk_size
        self._chunk_asked = chunk_size  # what the memory plan may shrink, never exceed
        self._world = 1
        self.generic_dynamics = generic_dynamics
        self.num_threads = num_threads
        self.seed = seed

        #: one :class:`~lightning_gfm.jump.JumpRecord` per jump attempt, in order.
        self.jumps: list[JumpRecord] = []
        self.buffer = TrajectoryBuffer(window, device=self.buffer_device, dtype=buffer_dtype)
        self.field: GradientField | None = None
        self.record_seconds = 0.0
        self._field_opt: torch.optim.Optimizer | None = None
        self._pending: dict | None = None
        self._spec: ParamSpec | None = None
        self._window_per_rank = False  # sharded over several ranks: each records its own shard (see state_dict)
        self._dyn = None
        self._last_step = -1
        self._epoch_start_step = 0
        self._eval_cache: tuple[list, str] | None = None
        self._restored_buffer: dict | None = None  # a checkpoint's window, until fit starts and plans the ring
        self._reporter = GFMReporter(seed=seed, warn=rank_zero_warn)
        #: times the trainable parameters or param groups changed mid-run (each restarted the window).
        self.layout_changes = 0
        self._layout: tuple | None = None  # what the spec was built for (see _follow_layout)
        self._hyper: tuple | None = None  # the param groups' hyperparameters the dynamics were built from
        self._no_params = False  # the optimizer holds no trainable parameter right now: nothing to record
        self._accumulation: int | None = None  # trainer.accumulate_grad_batches the schedule was derived for
        self._clock: tuple[float, int] | None = None  # (perf_counter, global_step) when this fit's training began
        self._spent = 0.0  # GFM's own seconds in this fit (recording and attempts), against the budget
        self._roles: Tensor | None = None  # every scalar's layer role (uint8), for a meta-trained field's inputs
        self._attempt_cost = 0.0  # wall-clock of the last attempt's forecast and landing evaluation

    # ------------------------------------------------------------------ when
    def should_record(self, step: int) -> bool:
        """Whether to snapshot after optimizer step ``step`` (override to change the schedule)."""
        return step % self.record_every == 0

    def should_jump(self, step: int) -> bool:
        """Whether to attempt a jump after optimizer step ``step`` (override to change the schedule).

        An attempt also needs a window long enough to fit and backtest; until then it is skipped silently.
        """
        return step > 0 and step % self.jump_every == 0

    @property
    def learns(self) -> bool:
        """Whether the field may differ from the prior: fitted online, or loaded (and then backtested)."""
        return bool(self.fit_steps or self.field_path)

    @property
    def _lean(self) -> bool:
        """Whether the forecast reads only the latest state and the trend's weights (the buffer's lean layout).

        True for the prior along the trend: no velocity history, no older optimizer state (fitting, backtesting
        and the other anchors read them).
        """
        field = self.field
        return not self.learns and self.field_config.anchor == "trend" and (field is None or field.constant)

    @property
    def min_snapshots(self) -> int:
        """Snapshots needed before a jump can be attempted.

        The trend line, the snapshots a fitted or loaded field is backtested on (none for the prior, which is not
        backtested), and two more. The prior therefore tries its first jump as early as linear extrapolation does
        (docs/experiments.md, E29: at each task's current budget; E19's harm on mnist1d was its old budget's).
        """
        backtested = self.backtest if self.learns else 0
        return max(self.field_config.min_anchor, self.prior_config.min_anchor) + max(backtested, 1) + 2

    # ----------------------------------------------------------------- hooks
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Refuse set-ups GFM cannot serve, with what to do instead."""
        if stage != "fit":
            return
        self._layout, self._no_params, self._accumulation = None, False, None  # re-read once this fit runs
        if not pl_module.automatic_optimization:
            raise ValueError(
                "GFMCallback needs automatic optimization (it counts optimizer steps through Lightning). "
                "Set `self.automatic_optimization = True` or remove the callback."
            )
        name = type(trainer.strategy).__name__
        why = next((why for s, why in _UNSUPPORTED_STRATEGIES.items() if s in name), None)
        if why is not None:
            raise ValueError(
                f"GFMCallback supports single-device and DDP strategies; got `{name}`: {why} "
                "Use strategy='ddp' (or 'ddp_spawn'; GFM then shares its fitting and forecasting between the "
                "ranks), ModelParallelStrategy with FSDP2's `fully_shard` (GFM then forecasts each rank's own "
                "shard), or remove the callback. See docs/distributed.md."
            )

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Bind to the model and optimizer; build or load the field; apply a pending checkpoint state."""
        if len(trainer.optimizers) != 1:
            raise ValueError(
                f"GFMCallback needs exactly one optimizer, `configure_optimizers` returned {len(trainer.optimizers)}. "
                "Combine the parameters into one optimizer with several param groups."
            )
        opt = trainer.optimizers[0]
        self.record_every, self.jump_every = auto_schedule(self._total_steps(trainer), *self._schedule_args)
        _reshard(pl_module)  # FSDP2 registers gathered plain parameters while a root module stays unsharded
        self._spec = ParamSpec.from_module(pl_module, opt)
        # each rank records its own shard: a checkpoint (rank 0's callback state only) cannot carry the window
        self._window_per_rank = self._spec.sharded and trainer.world_size > 1
        self._dyn = dynamics_for(opt, self._spec, generic=self.generic_dynamics)
        device = pl_module.device
        with torch.random.fork_rng(devices=[]):  # never disturb the user's random stream
            torch.manual_seed(self.seed)
            if self.field is None:
                self.field = load_field(self.field_path) if self.field_path else GradientField(self.field_config)
        if self.meta_path is not None and self.meta is None:
            self.meta = load_field(self.meta_path)
            if self.window <= self.meta.config.history:
                raise ValueError(
                    f"`field={self.meta_path!r}` is a meta-trained field reading {self.meta.config.history + 1} "
                    f"snapshots; `window` must be at least that, got window={self.window}."
                )
        if self.meta is not None:
            self.meta.to(device)
            self._roles = self._spec.role_index(torch.device("cpu"), torch.uint8)
        self.field.to(device)
        self.field_config = self.field.config
        _torchdyn()  # import the integrator now: a one-time cost, not an attempt's (the budget predicts from those)
        self._field_opt = torch.optim.Adam(self.field.parameters(), lr=3e-3)
        self._eval_cache = None
        if self._pending is not None:
            self._apply_pending(device)
        # processes of one host that record into the same memory (DDP ranks keeping their buffers in host RAM)
        self._sharing = trainer.num_devices if self.buffer_device.type == "cpu" else 1
        self._world = trainer.world_size
        self.inactive_reason, self.memory_plan = None, None
        self._plan_memory()  # last: the plan depends on the field in use (a checkpoint's may differ)

    def _plan_memory(self) -> None:
        """Plan GFM's memory for the current layout and allocate the buffer now, before anything is recorded.

        Called when fit starts and when the trainable layout changes. A plan that does not fit switches GFM off
        for the run with one warning (``inactive_reason``); an allocation that fails raises before training.
        Every rank plans from the smallest available memory of all ranks, so they all take the same plan.
        """
        spec, names = self._spec, self._dyn.state_names
        lean = self._lean
        restored, self._restored_buffer = self._restored_buffer, None  # a window resumed from a checkpoint
        if restored is None and len(self.buffer):
            restored = self.buffer.state_dict()
        self.buffer = TrajectoryBuffer(2, device=self.buffer_device, dtype=self.buffer_dtype)  # free the old ring
        window, dtype, chunk = self.window, self.buffer_dtype, self._chunk_asked
        if self.memory_budget is not None:
            # every path's points; joined paths coexist with their join for a moment (ForecastPath.join), and so
            # do the ranks' slices with the gathered path under DDP
            paths = 1 + len(self.branch_trends) + (self.meta is not None)
            joined = paths > 1 or self._world > 1
            # the meta field shares the attempt's points with the prior (one more when there is one point)
            extra = int(self.meta is not None and self.n_candidates < 2)
            n_points = (self.n_candidates * (1 + len(self.branch_trends)) + extra) * (2 if joined else 1)
            hidden = max(self.field_config.hidden, 0 if self.meta is None else 3 * self.meta.config.hidden // 2)
            sizes = dict(n_horizons=n_points, hidden=hidden)
            if self.memory_budget == "auto":
                item = local(spec.params[0]).element_size()
                footprint = footprint_bytes(spec.numel, len(names), item)
                available = min_over_ranks(available_bytes(self.buffer_device), spec.device)
                budget, source = default_budget(footprint, available, sharing=self._sharing)
                if spec.device.type != self.buffer_device.type:  # the path and its rollback live on the model's
                    room = min_over_ranks(available_bytes(spec.device), spec.device)
                    need = forecast_bytes(spec.numel, len(names), min(chunk, 1 << 20), **sizes)
                    if room is not None and need > DEFAULT_FRACTION * room:
                        self._switch_off(
                            f"a forecast needs {need / 2**30:.2f} GiB on {spec.device}, more than "
                            f"{DEFAULT_FRACTION:.0%} of the {room / 2**30:.2f} GiB available there."
                        )
                        return
            else:
                budget, source = self.memory_budget, "memory_budget"
            try:
                plan = plan_memory(
                    spec.numel,
                    len(names),
                    self.window,
                    budget,
                    chunk_size=chunk,
                    min_window=min(self.window, self.min_snapshots),
                    min_chunk=min(chunk, 1 << 12),
                    lean=lean and not spec.sharded,
                    source=source,
                    **sizes,
                )
            except ValueError as err:
                self._switch_off(f"its memory plan does not fit ({source}): {err}")
                return
            if plan.dtype == torch.float32 and self.buffer_dtype != torch.float32:
                plan = dataclasses.replace(plan, dtype=self.buffer_dtype)  # a narrower dtype asked for is kept
            self.memory_plan = plan
            window, dtype, chunk = plan.window, plan.dtype, plan.chunk_size
            rank_zero_info(f"GFMCallback memory plan: {plan.describe()}.")
        self.chunk_size = chunk
        self.buffer = TrajectoryBuffer(window, device=self.buffer_device, dtype=dtype, state_rows=1 if lean else None)
        self.buffer.allocate(spec.numel, names)
        snaps = (restored or {}).get("snapshots", [])
        # a window recorded under another layout (other parameters, other optimizer states) is dropped, not loaded
        if snaps and snaps[-1]["weights"].numel() == spec.numel and set(snaps[-1].get("state", {})) == set(names):
            self.buffer.load_state_dict(restored)

    def _switch_off(self, why: str) -> None:
        """Stop recording and jumping for the rest of the run, saying why once; training goes on untouched."""
        self.inactive_reason = why
        self.buffer = TrajectoryBuffer(2, device=self.buffer_device, dtype=self.buffer_dtype)
        rank_zero_warn(f"GFMCallback is inactive for this run: {why} Training continues without GFM.")

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Start the clock the do-no-harm budget measures the run's own step time with."""
        self._clock, self._spent = (time.perf_counter(), trainer.global_step), 0.0
        self._attempt_cost = 0.0

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Remember where the epoch started (epoch-interval schedulers step at epoch ends)."""
        self._epoch_start_step = trainer.global_step

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs, batch, batch_idx) -> None:
        """After an optimizer step: record, and maybe jump."""
        step = trainer.global_step
        if step == self._last_step or step == 0:  # gradient accumulation: no optimizer step happened
            return
        self._last_step = step
        if self.inactive_reason is not None:
            return
        self._follow_accumulation(trainer)
        jump = self.should_jump(step)
        if jump or self.should_record(step):
            self._record(trainer, step)
        if jump and not self._no_params and len(self.buffer) >= self.min_snapshots:
            self._jump(trainer, pl_module, step)

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Drop the cached evaluation batches."""
        self._eval_cache = None

    # ------------------------------------------------------------- recording
    def _record(self, trainer: pl.Trainer, step: int) -> None:
        start = time.perf_counter()
        self._follow_layout(trainer)
        # one copy, into the ring; a re-plan at a new layout may have switched GFM off
        if not self._no_params and self.inactive_reason is None:
            self.buffer.record(trainer.optimizers[0], self._spec, self._dyn.state_names, step)
        seconds = time.perf_counter() - start
        self.record_seconds += seconds
        self._spent += seconds

    def _follow_layout(self, trainer: pl.Trainer) -> None:
        """Rebuild the tracked-parameter spec and the dynamics when the optimizer's trainable layout changed.

        Unfreezing or freezing parameters, a param group added by a callback (``BackboneFinetuning``) or a new
        optimizer object change what a snapshot holds; the window recorded before no longer lines up with the
        weights, so it restarts for the new layout and jumps resume once it is long enough again. The check is one
        pass over the param groups (ids, group index and size of the trainable parameters), no tensor work. Under
        DDP every rank sees the same change (it comes from the user's code), so no collective is needed.
        """
        opt = trainer.optimizers[0]
        key = _layout_key(opt)
        if self._layout is None:  # first record of this fit: the spec was built when fit started
            self._layout = _layout_key(opt, self._spec, len(next(iter(self._dyn.hyper.values()))))
            if self._layout == key[1:]:
                self._layout = key
        stale = len(self.buffer) and (
            self.buffer[-1].weights.numel() != self._spec.numel
            or set(self.buffer.state_names) != set(self._dyn.state_names)
            or self.buffer[-1].lrs.numel() != len(opt.param_groups)
        )  # e.g. a window resumed from a checkpoint written under another layout
        if key == self._layout and not stale:
            hyper = _hyper_key(opt)
            if hyper != self._hyper:  # e.g. CyclicLR cycling the momentum: same layout, new coefficients
                self._hyper = hyper
                self._dyn = dynamics_for(opt, self._spec, generic=self.generic_dynamics)
            return
        self._hyper = _hyper_key(opt)
        changed = self._layout is not None and key[1:] != self._layout[-2:]
        self._layout = key
        self.buffer.clear()
        self._reporter.pending = None  # a forecast made for the old layout cannot be compared any more
        pl_module = trainer.lightning_module
        _reshard(pl_module)
        try:
            self._spec = ParamSpec.from_module(pl_module, opt)
        except ValueError:  # everything frozen for now: record nothing until something is trainable again
            if not self._no_params:
                rank_zero_warn(
                    f"GFMCallback: at step {trainer.global_step} the optimizer holds no trainable parameter "
                    "(`requires_grad=False` everywhere), so GFM records and jumps nothing until one is trainable again."
                )
            self._no_params = True
            return
        self._no_params = False
        self._window_per_rank = self._spec.sharded and trainer.world_size > 1
        self._dyn = dynamics_for(opt, self._spec, generic=self.generic_dynamics)
        if self.memory_budget is not None or self.memory_plan is not None:
            self._plan_memory()
        if changed or stale:
            self.layout_changes += 1
            rank_zero_info(
                f"GFMCallback: the trainable parameters or param groups changed at step {trainer.global_step} "
                f"(now {self._spec.numel} scalars in {len(opt.param_groups)} groups); the window restarts, and jumps "
                f"resume once it holds {self.min_snapshots} snapshots."
            )

    def _follow_accumulation(self, trainer: pl.Trainer) -> None:
        """Re-derive an automatic schedule when a callback changed ``accumulate_grad_batches`` mid-run.

        The planned number of optimizer steps changes with it; intervals given by the user are kept as given.
        """
        acc = trainer.accumulate_grad_batches
        if self._accumulation is None:
            self._accumulation = acc
        if acc == self._accumulation:
            return
        self._accumulation = acc
        if None in self._schedule_args:
            self.record_every, self.jump_every = auto_schedule(self._total_steps(trainer), *self._schedule_args)

    # ----------------------------------------------------------------- jumps
    def _total_steps(self, trainer: pl.Trainer) -> int | None:
        if trainer.max_steps and trainer.max_steps > 0:
            return trainer.max_steps
        est = trainer.estimated_stepping_batches  # also loads the train dataloader if needed
        if not math.isfinite(est):
            return None
        # Lightning's estimate assumes today's accumulation for every epoch; a schedule that changes it
        # (GradientAccumulationScheduler, or any callback) makes the run longer or shorter than that
        epochs = _epoch_steps(trainer)
        if epochs is None:
            return int(est)
        n_left = max(trainer.max_epochs - trainer.current_epoch, 1)
        return trainer.global_step + sum(next(epochs) for _ in range(n_left))

    def _lr_steps(self, trainer: pl.Trainer, step: int, horizon: int) -> Tensor:
        opt = trainer.optimizers[0]
        configs = trainer.lr_scheduler_configs
        if not configs:
            return lr_by_step(future_learning_rates(opt, None, 0), horizon, 1)
        cfg = configs[0]
        if cfg.interval == "step":
            every, offset = cfg.frequency, step % cfg.frequency
            n_calls = calls_needed(horizon, every, offset)
        else:  # a call after each epoch (of ``frequency``) that ends within the horizon, at its own length
            epochs, ends, at, epoch = _epoch_steps(trainer), [], 0, trainer.current_epoch
            while epochs is not None and at <= horizon:
                length = next(epochs)
                at += length
                if (epoch + 1) % cfg.frequency == 0 and at > 0 and at <= horizon:
                    ends.append(at)  # at 0 the epoch just ended: its call is in the current lr already
                epoch += 1
                if length == 0 and epoch > trainer.current_epoch + 1:
                    break  # no batch at all: nothing ever ends
            n_calls = len(ends)
        try:
            calls = future_learning_rates(opt, cfg.scheduler, n_calls)
        except Exception:  # a scheduler that cannot be replayed (e.g. ReduceLROnPlateau): hold the lr
            calls = future_learning_rates(opt, None, 0)
        if cfg.interval == "step":
            return lr_by_step(calls, horizon, every, offset)
        return lr_at_calls(calls, horizon, ends)

    def _horizons(self, trainer: pl.Trainer, step: int, win: Window) -> list[int]:
        total = self._total_steps(trainer)
        if self.horizon == "end":
            if total is None:
                raise ValueError("`horizon='end'` needs a planned end of training: set `max_steps` or `max_epochs`.")
            far = total - step
        elif self.horizon is not None:
            far = self.horizon
        else:
            # as far as the field was fitted: its span, and no farther than the window's longest anchor-to-end. The
            # prior too, though it fits nothing: reaching its span from the first attempt on made the demo, a task
            # outside the benchmark, end worse on every seed (docs/experiments.md, E32, E38)
            far = self.field_config.fitted_steps(win.K, win.interval)
        if total is not None:
            far = max(min(far, total - step), 0)  # nothing left of the planned run: no jump
        if self.spacing == "geometric":  # far, far/2, far/4, ...: short hops are tried too
            points = {round(far / 2**i) for i in range(self.n_candidates)}
        else:
            points = {round(far * (i + 1) / self.n_candidates) for i in range(self.n_candidates)}
        return sorted(points - {0})

    def _shared_horizons(self, trainer: pl.Trainer, step: int, horizons: list[int]) -> tuple[list[int], list[int]]:
        """The prior's and the meta-trained field's candidates, sharing one attempt's ``len(horizons)`` points.

        Each proposes the farther half of its own reach (the prior its ``horizons``, the meta field the planned end
        of the run and its halves), so that an attempt costs what the prior's alone does. The meta field was
        trained on segments reaching to the end of every run, so it forecasts far where the prior's reach is
        limited by what the window shows; with a given ``horizon``, or no planned end, it takes the prior's.
        """
        n_meta = max(1, len(horizons) // 2)
        prior = horizons[-max(1, len(horizons) - n_meta) :]
        total = self._total_steps(trainer)
        if self.horizon is not None or total is None or total - step <= horizons[-1]:
            return prior, horizons[-n_meta:]
        far = total - step
        return prior, sorted({round(far / 2**i) for i in range(len(horizons))} - {0})[-n_meta:]

    def forecast_path(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, win: Window, horizons: list[int]
    ) -> tuple[ForecastPath, dict[str, float]]:
        """Forecast the weights at ``horizons`` steps ahead of the window's last snapshot (the current weights).

        GFM fits its field online, backtests it against the prior, and integrates the better one. Override this to
        plug in another forecaster (the benchmark's linear-extrapolation and oracle competitors do) while keeping
        the schedule, evaluation, acceptance and rollback identical.

        Returns:
            The path and diagnostics to store in the :class:`~lightning_gfm.jump.JumpRecord`.
        """
        step, dyn, device = trainer.global_step, self._dyn, pl_module.device
        # Under DDP each rank fits on, backtests and forecasts its own slice of the scalars (a no-op shard on
        # one device); every collective also tells whether a rank failed, so no rank waits for a failed one.
        # Under ModelParallel (sharded parameters) each rank already owns distinct scalars: no slicing, no gather.
        sharded = self._spec is not None and self._spec.sharded
        shard = Shard.current(win.P, device, owned=sharded) if trainer.world_size > 1 else Shard(win.P, device=device)
        info = {"fit_loss": float("nan"), "backtest_fitted": float("nan"), "backtest_prior": float("nan")}
        if self.fit_steps:
            with shard.phase("fit", fit_message_size(self.field)):
                report = fit_field(
                    self.field,
                    self._field_opt,
                    win,
                    dyn,
                    steps=self.fit_steps,
                    batch=shard.batch(self.fit_batch),
                    seed=shard.seed(self.seed + step),
                    max_seconds=self.fit_seconds,
                    device=device,
                    index_range=shard.index_range,
                    grad_sync=shard.grad_sync,
                )
                info["fit_loss"] = shard.mean(self.field, report.loss_end)
        use = self.field
        if self.backtest and self.learns:  # a field that may differ from the prior
            prior = self._prior(device)
            for key, candidate in (("backtest_fitted", self.field), ("backtest_prior", prior)):
                with shard.phase("backtest", 2):
                    info[key] = backtest_error(
                        candidate, win, dyn, self.backtest, self.solver, device, **shard.backtest_kwargs
                    )
            if not info["backtest_fitted"] <= info["backtest_prior"]:
                use = prior
        # the field in use, then the prior along each shorter trend line: validation picks among all their points
        fields = [use, *(self._prior(device, trend=n) for n in self.branch_trends)]
        meta = self.meta is not None and self.meta.config.history < win.K  # beside the prior's: validation chooses
        meta_horizons = horizons
        if meta:
            horizons, meta_horizons = self._shared_horizons(trainer, step, horizons)
        lr_steps = self._lr_steps(trainer, step, max(horizons[-1], meta_horizons[-1]))
        local = []
        for f in fields:
            with shard.phase("forecast", 0):
                local.append(
                    forecast(
                        f,
                        win,
                        dyn,
                        lr_steps,
                        horizons,
                        solver=self.solver,
                        chunk_size=self.chunk_size,
                        device=device,
                        out_device=device,
                        index=shard.index,
                    )
                )
        labels = [f.config.trend if f.config.anchor == "trend" else 0 for f in fields]
        if meta:
            with shard.phase("forecast", 0):
                weights, seconds = meta_forecast(
                    self.meta,
                    win,
                    family_of(dyn),
                    lr_steps,
                    meta_horizons,
                    self._total_steps(trainer),
                    self._roles,
                    chunk_size=min(self.chunk_size, META_CHUNK if device.type == "cpu" else 4 * META_CHUNK),
                    device=device,
                    out_device=device,
                    index=shard.index,
                )
            # it forecasts no optimizer state: a jump to it takes the prior's forecast state at a horizon the prior
            # forecast too, else the current state
            prior_rows = {h: k for k, h in enumerate(local[0].horizons)}
            rows = [0, *(prior_rows.get(h, 0) for h in meta_horizons)]
            state = {n: v[rows] for n, v in local[0].state.items()}
            ahead = [local[0].horizons[r] for r in rows]  # the step counter goes with the state taken
            local.append(ForecastPath([0, *meta_horizons], weights, state, seconds, state_steps=ahead))
            labels.append(META_LABEL)
        # every path starts from the current weights (only the forecast's move counts, docs/experiments.md E34)
        paths = [shard.gather(path).start_at_(win.w[-1]) for path in local]
        if len(paths) == 1:
            return paths[0], info
        return ForecastPath.join(paths, labels), info

    def _jump(self, trainer: pl.Trainer, pl_module: pl.LightningModule, step: int) -> None:
        start = time.perf_counter()
        try:
            self._attempt(trainer, pl_module, step, start)
        finally:
            self._spent += time.perf_counter() - start

    def _attempt(self, trainer: pl.Trainer, pl_module: pl.LightningModule, step: int, start: float) -> None:
        spec, dyn = self._spec, self._dyn
        # do no harm: an attempt the budget cannot afford is skipped before any work (the last one's cost predicts)
        if not self._affordable(trainer, pl_module, self._attempt_cost, start):
            self.budget.skipped += 1
            return
        shard = Shard.current(spec.numel, pl_module.device, owned=True) if spec.sharded else None
        if shard is not None and shard.active:  # per-tensor scales over all ranks' shards, in one collective
            with shard.phase("window", shard_sums_size(len(self.buffer), len(spec.params))):
                total = self._total_steps(trainer)
                win = Window.from_buffer(self.buffer, spec, dyn.state_names, total, lambda v: shard.sum(v, "window"))
        else:
            # the prior reads the buffer in place (no float32 copy of the window: lightning_gfm.memory)
            total = self._total_steps(trainer)
            win = Window.from_buffer(self.buffer, spec, dyn.state_names, total, lean=self._lean)
        horizons = self._horizons(trainer, step, win)
        if not horizons:
            return
        batches, _ = self._eval_data(trainer, pl_module)  # cached once per fit: a one-time cost, not predicted
        # successive halving starts at the current weights' screen (one batch): the full evaluation of the current
        # weights waits until a candidate passes the screen, so a failing attempt costs its screens only
        screened = self.eval_batches > 1 and len(batches) > 1
        tick = time.perf_counter()
        before = self._screen(trainer, pl_module) if screened else self._evaluate(trainer, pl_module)
        first_seconds = time.perf_counter() - tick  # a screen, or a full evaluation
        n_points = len(horizons) * (1 + len(self.branch_trends)) + (self.meta is not None and len(horizons) < 2)
        screens: list[float] = []  # seconds of this attempt's candidate screens (warm, unlike a fit's first one)
        full_seconds = [0.0]  # seconds of this attempt's full evaluations (checked before they run)
        stopped: list[bool] = []  # a screen the budget refused (it then predicted the next attempt itself)

        def screen() -> _Screened:
            # each screen is checked against the budget, predicted by the last one: a first attempt, whose cost
            # is unknown, stops where the budget ends (and predicts its successors from what it would have cost)
            last = screens[-1] if screens else first_seconds
            if not self._affordable(trainer, pl_module, last, start):
                self.budget.skipped += 1
                self._attempt_cost = time.perf_counter() - start + last * (n_points - len(screens))
                stopped.append(True)
                raise OverBudget
            t = time.perf_counter()
            out = self._screen(trainer, pl_module)
            screens.append(time.perf_counter() - t)
            return out

        def timed(fn):
            def run(*args):
                t = time.perf_counter()
                try:
                    return fn(*args)
                finally:
                    full_seconds[0] += time.perf_counter() - t

            return run

        def screen_seconds() -> float:  # a warm screen: the median of this attempt's, else the first
            return sorted(screens)[len(screens) // 2] if screens else first_seconds

        def afford(n_full: int) -> bool:
            # a full evaluation after a screen evaluates the batches the screen did not (all of them when the
            # metric cannot be continued); without a screen, what the current weights' evaluation took
            if screened:
                rest = len(batches) - (1 if before.sums is not None else 0)
                per = screen_seconds() * rest
            else:
                per = first_seconds
            ok = self._affordable(trainer, pl_module, n_full * per, start)
            self.budget.skipped += not ok
            return ok

        with _cpu_threads(self.num_threads, pl_module.device):
            path, info = self.forecast_path(trainer, pl_module, win, horizons)
        moved_start = not _equal_rows(path.weights[0], win.w[-1])
        if shard is not None and shard.active:  # each rank sees its own shard: evaluate the start if any moved
            moved_start = not agree(not moved_start, device=pl_module.device)
        opt = trainer.optimizers[0]
        decision = choose_and_apply(
            spec,
            path,
            timed(lambda: self._evaluate(trainer, pl_module)),
            mode=self.mode,
            min_delta=self.min_delta,
            metric_before=None if screened else before,
            evaluate_start=moved_start,
            start_is_candidate=False,  # denoising alone is undone by training (docs/experiments.md, E7-E8)
            # successive halving: every candidate on one batch, the best two on all of them (continuing the
            # screen's sums: its batch is not evaluated twice)
            screen=screen if screened else None,
            screen_before=before if screened else None,
            keep=FULL_CANDIDATES,
            complete=timed(lambda s: self._complete(trainer, pl_module, s)) if screened else None,
            afford=afford,
        )
        if not stopped:
            # the next attempt's first check: forecast and screens (its full evaluations are checked when they come)
            self._attempt_cost = time.perf_counter() - start - full_seconds[0]
        if spec.sharded:
            _reshard(pl_module)  # the next forward must gather the shards just written, not reuse stale ones
            self._check_same_decision(trainer, decision.index)
        self._sync_weights(trainer)
        index = decision.index
        accepted = decision.outcome is JumpOutcome.ACCEPTED
        if accepted:
            apply_state_policy(opt, spec, self.optimizer_state, path, index, dyn)
            self.budget.earn(path.horizons[index])
        evaluated = [
            (h, m)
            for h, m in zip(path.horizons[1:], decision.metrics, strict=False)
            if not (decision.screened and math.isnan(m))  # points the screen dropped were not evaluated in full
        ]
        if decision.metric_start is not None:
            evaluated.insert(0, (0, decision.metric_start))
        record = JumpRecord(
            step=step,
            horizon=path.horizons[index] if accepted else 0,
            trend=max(path.branches[index], 0) if accepted and path.branches else 0,
            source=("meta" if path.branches and path.branches[index] == META_LABEL else "prior") if accepted else "",
            accepted=accepted,
            metric_before=decision.metric_before,
            metric_after=decision.metric_after,
            outcome=decision.outcome.value,
            seconds=time.perf_counter() - start,
            candidates=evaluated,
            screened=[(h, m) for h, m in zip(path.horizons[1:], decision.screened, strict=False)],
            **info,
        )
        self.jumps.append(record)
        self._log(trainer, record, path.branch(index if accepted else None), win)
        # after logging: a lean window is a view of the buffer, and the picture shows it as recorded
        if accepted:
            k = decision.index
            dstate = None
            if self.optimizer_state is StatePolicy.FORECAST:
                dstate = {n: (v[k], v[0]) for n, v in path.state.items()}
            # a forecaster's path may start elsewhere than the current weights: translate from the weights we left
            self.buffer.shift_(path.weights[k], win.w[-1], dstate)
        if accepted and self.optimizer_state is StatePolicy.RESET:
            self.buffer.clear()
            self._record(trainer, step)

    # -------------------------------------------------------------- budget
    def _step_seconds(self, trainer: pl.Trainer, now: float) -> float:
        """Mean wall-clock of one of this fit's optimizer steps, GFM's own time left out (NaN before the first)."""
        if self._clock is None:
            return float("nan")
        clock, step0 = self._clock
        steps = trainer.global_step - step0
        return (now - clock - self._spent) / steps if steps > 0 else float("nan")

    def _affordable(self, trainer: pl.Trainer, pl_module: pl.LightningModule, predicted: float, start: float) -> bool:
        """Whether the do-no-harm budget allows ``predicted`` more seconds now (the same answer on every rank)."""
        if self.budget.overhead is None:
            return True
        now = time.perf_counter()
        step_seconds = self._step_seconds(trainer, start)
        planned = self._total_steps(trainer) or trainer.global_step
        spent = self._spent + (now - start)
        ok = not math.isfinite(step_seconds) or self.budget.allows(
            predicted, step_seconds=step_seconds, planned_steps=planned, spent=spent
        )
        if trainer.world_size > 1 and torch.distributed.is_available() and torch.distributed.is_initialized():
            ok = agree(ok, device=pl_module.device)
        return ok

    def _prior(self, device, trend: int | None = None) -> GradientField:
        config = self.prior_config if trend is None else dataclasses.replace(self.prior_config, trend=trend)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)
            return GradientField(config).to(device)

    def _check_same_decision(self, trainer: pl.Trainer, index: int | None) -> None:
        # Sharded: each rank moved its own scalars after the same reduced metrics, so the ranks must have taken
        # the same decision; one small all-reduce proves it (sum and sum of squares of the chosen point + 2).
        if trainer.world_size <= 1 or not torch.distributed.is_initialized():
            return
        code = float(-1 if index is None else index) + 2
        total, _ = exchange(torch.tensor([code, code * code], device=self._spec.device))
        if float(total[0]) ** 2 != trainer.world_size * float(total[1]):
            raise RuntimeError(
                "GFMCallback: the ranks took different jump decisions under a sharded strategy, so the model's "
                "shards no longer belong to one set of weights; this is a bug, please report it."
            )

    def _sync_weights(self, trainer: pl.Trainer) -> None:
        # The gathered path is bit-identical on every rank and the decision comes from reduced metrics, so the
        # ranks already agree; one broadcast of rank 0's flat weights (a single tensor collective, written back
        # in place) keeps "identical weights on every rank" true even against float nondeterminism.
        # Sharded parameters: every rank holds different scalars, there is nothing to broadcast.
        if self._spec is not None and self._spec.sharded:
            return
        if trainer.world_size > 1 and torch.distributed.is_available() and torch.distributed.is_initialized():
            flat = self._spec.flatten()
            torch.distributed.broadcast(flat, src=0)
            self._spec.write_(flat)

    # ------------------------------------------------------------ evaluation
    def _eval_data(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> tuple[list, str]:
        if self._eval_cache is not None:
            return self._eval_cache
        loaders, step_name = None, "validation_step"
        if is_overridden("validation_step", pl_module) and trainer.limit_val_batches != 0:
            if trainer.val_dataloaders is None:
                trainer.fit_loop.epoch_loop.val_loop.setup_data()
            loaders = trainer.val_dataloaders
        if not loaders:
            loaders, step_name = trainer.train_dataloader, "training_step"
        if isinstance(loaders, list | tuple):
            loaders = loaders[0]
        if isinstance(loaders, dict):
            loaders = next(iter(loaders.values()))
        batches = []
        with torch.random.fork_rng(devices=[]):  # iterating a shuffled loader must not move the user's RNG
            for i, batch in enumerate(loaders):
                if i >= self.eval_batches:
                    break
                batch = trainer.strategy.batch_to_device(batch)
                batches.append(trainer.precision_plugin.convert_input(batch))  # e.g. bf16-true casts inputs
        if trainer.world_size > 1 and torch.distributed.is_available() and torch.distributed.is_initialized():
            # every rank evaluates the same number of batches: whether to screen, how far a full evaluation goes
            # and each reduction of the sums are then the same on every rank (uneven shards would hang them)
            del batches[min_over_ranks(len(batches), device=pl_module.device) :]
        if not batches:
            raise ValueError("GFMCallback found no batch to evaluate candidates on (the loader is empty).")
        self._eval_cache = (batches, step_name)
        return self._eval_cache

    def _evaluate(self, trainer: pl.Trainer, pl_module: pl.LightningModule, n: int | None = None) -> float:
        """The monitored metric of the weights in the model, on the cached batches (the first ``n`` of them)."""
        return self._evaluate_from(trainer, pl_module, None, n).metric

    def _screen(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> _Screened:
        """The metric on the first cached batch, with the sums :meth:`_complete` continues."""
        return self._evaluate_from(trainer, pl_module, None, 1)

    def _complete(self, trainer: pl.Trainer, pl_module: pl.LightningModule, screened: _Screened) -> float:
        """The full metric of the weights in the model, continuing from their screen (``screened``).

        The same sums in the same order as :meth:`_evaluate` over every batch, so the same number, bit for bit;
        a metric that cannot be continued (a torchmetrics ``Metric``) is evaluated in full.
        """
        return self._evaluate_from(trainer, pl_module, screened, None).metric

    @torch.no_grad()
    def _evaluate_from(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, resume: _Screened | None, n: int | None
    ) -> _Screened:
        """Evaluate the cached batches ``[done, n)`` (``done``: those ``resume`` covered), continuing its sums."""
        if self._spec is not None and self._spec.sharded:
            _reshard(pl_module)  # FSDP2 would reuse the parameters it gathered for the previous candidate
        batches, step_name = self._eval_data(trainer, pl_module)
        if resume is not None and resume.sums is None:
            resume = None  # not continuable: evaluate every batch
        done = 0 if resume is None else resume.done
        stop = len(batches) if n is None else min(n, len(batches))
        if resume is not None and done >= stop:
            return resume
        total = torch.zeros(2, dtype=torch.float64, device=pl_module.device) if resume is None else resume.sums.clone()
        plugin = trainer.precision_plugin
        context = plugin.val_step_context() if step_name == "validation_step" else plugin.train_step_context()
        continuable = True
        with _quiet_evaluation(pl_module) as logs, context:  # the same autocast as the real step
            for i in range(done, stop):
                batch = batches[i]
                logs.batch_size = _batch_size(batch)
                out = getattr(pl_module, step_name)(batch, i)
                if step_name == "training_step" and self.monitor not in logs.values:
                    loss = out["loss"] if isinstance(out, dict) else out
                    logs.add("__loss__", loss)
            name = self.monitor if (self.monitor in logs.values or self.monitor in logs.metrics) else "__loss__"
            if name not in logs.values and name not in logs.metrics:
                logged = sorted(set(logs.values) | set(logs.metrics))
                raise ValueError(
                    f"GFMCallback(monitor={self.monitor!r}): `{step_name}` did not log {self.monitor!r} "
                    f"(it logged {logged}). Log it with `self.log({self.monitor!r}, ...)` or set `monitor`."
                )
            if name in logs.metrics:
                continuable = False
                if resume is None:
                    total[0], total[1] = float(logs.metrics[name].compute()), 1.0
            else:
                for value, weight in logs.values[name]:
                    total[0] += value * weight
                    total[1] += weight
        if not continuable and resume is not None:  # a metric object's state cannot be continued: every batch again
            return self._evaluate_from(trainer, pl_module, None, n)
        local_sums = total.clone() if continuable else None
        total = trainer.strategy.reduce(total, reduce_op="sum") if trainer.world_size > 1 else total
        return _Screened(float(total[0] / total[1]), local_sums, stop)

    # --------------------------------------------------------------- logging
    def _log(
        self, trainer: pl.Trainer, record: JumpRecord, path: ForecastPath | None = None, win: Window | None = None
    ) -> None:
        self._reporter.log_jump(
            trainer.loggers,
            trainer.global_step,
            record,
            self.jumps,
            buffer_mb=self.buffer.nbytes / 2**20,
            record_seconds=self.record_seconds,
            spec=self._spec,
            path=path,
            window=None if win is None else win.w,
            is_global_zero=trainer.is_global_zero,
        )
        accepted = sum(j.accepted for j in self.jumps)
        with contextlib.suppress(Exception):  # the progress bar is a nicety; never fail a jump over it
            for name, value in (("gfm_acc", accepted), ("gfm_rb", len(self.jumps) - accepted)):
                trainer.lightning_module.log(
                    name, float(value), prog_bar=True, logger=False, on_step=True, on_epoch=False
                )

    # ------------------------------------------------------------ field I/O
    def save_field(self, path: str | os.PathLike, trained_on: str = "") -> None:
        """Export the fitted field (safetensors) so a later run can start from it with ``field=path``."""
        if self.field is None:
            raise RuntimeError("No field to save yet: the callback builds its field when `fit` starts.")
        save_field(self.field, path, trained_on=trained_on)

    # ----------------------------------------------------------------- state
    def state_dict(self) -> dict[str, Any]:
        """Window, field, field optimizer, counters and jump records: tensors and plain values only.

        Under a sharded strategy with several ranks the window is left out: each rank records its own shard,
        and Lightning saves the callback state of rank 0 only (it is re-recorded after a resume).
        """
        per_rank = self._window_per_rank
        return {
            "version": 1,
            "buffer": {"capacity": self.buffer.capacity, "snapshots": []}
            if per_rank
            else (self._restored_buffer if self._restored_buffer is not None else self.buffer.state_dict()),
            "window_per_rank": per_rank,
            "field": None if self.field is None else {k: v.cpu() for k, v in self.field.state_dict().items()},
            "field_config": self.field_config.to_dict(),
            "field_optimizer": None if self._field_opt is None else self._field_opt.state_dict(),
            "jumps": [asdict(j) for j in self.jumps],
            "last_step": self._last_step,
            "epoch_start_step": self._epoch_start_step,
            "record_seconds": self.record_seconds,
            "budget": self.budget.state_dict(),
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore from :meth:`state_dict`; the field is rebuilt and the window refilled when fit starts.

        The window goes straight into the ring the memory plan allocates then (:meth:`state_dict` returns it as
        loaded until that moment), so a resumed run never holds a ring of the unplanned size.
        """
        if state_dict.get("window_per_rank", False):
            rank_zero_warn(
                "GFMCallback: this checkpoint comes from a sharded run, whose window (each rank's own shard) is not "
                "saved; the window is re-recorded from the resumed step, so jumps resume once it is long enough."
            )
        # restored into the ring the memory plan allocates when fit starts (no ring of the unplanned size first);
        # a strategy that restores after fit started (ModelParallel) gets it in the current ring at once
        self._restored_buffer = state_dict.get("buffer", {})
        self.buffer.clear()
        if self._spec is not None and self.inactive_reason is None:
            restored, self._restored_buffer = self._restored_buffer, None
            snaps = restored.get("snapshots", [])
            spec, names = self._spec, self._dyn.state_names
            if snaps and snaps[-1]["weights"].numel() == spec.numel and set(snaps[-1].get("state", {})) == set(names):
                self.buffer.load_state_dict(restored)
        self.jumps = [JumpRecord.from_dict(j) for j in state_dict.get("jumps", [])]
        self._last_step = state_dict.get("last_step", -1)
        self._epoch_start_step = state_dict.get("epoch_start_step", 0)
        self.record_seconds = state_dict.get("record_seconds", 0.0)
        self.budget.load_state_dict(state_dict.get("budget", {}))
        self._pending = state_dict

    def _apply_pending(self, device) -> None:
        pending, self._pending = self._pending, None
        if pending.get("field") is not None:
            config = FieldConfig(**pending["field_config"])
            if config != self.field.config:
                self.field = GradientField(config).to(device)
                self.field_config = config
                self._field_opt = torch.optim.Adam(self.field.parameters(), lr=3e-3)
            self.field.load_state_dict(pending["field"])
            if pending.get("field_optimizer") is not None:
                self._field_opt.load_state_dict(pending["field_optimizer"])

    # ------------------------------------------------------------- reporting
    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch, batch_idx) -> None:
        """Measure a rolled-back forecast once the run reaches the step it aimed at (``gfm/forecast_skill/...``)."""
        reporter = self._reporter
        if reporter.pending is not None:
            reporter.observe(trainer.loggers, trainer.global_step, self._spec, trainer.is_global_zero)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Measure a forecast aimed at the very last step."""
        self.on_train_batch_start(trainer, pl_module, None, -1)


def _layout_key(optimizer: torch.optim.Optimizer, spec: ParamSpec | None = None, n_groups: int = 0) -> tuple:
    """What a snapshot's layout depends on: the optimizer, its group count, each trainable parameter's group and size.

    With ``spec``, the same key (without the optimizer) for the parameters ``spec`` tracks and ``n_groups`` groups.
    """
    if spec is not None:
        tracked = frozenset(
            (id(p), g, b - a)
            for p, g, a, b in zip(spec.params, spec.groups, spec.offsets[:-1], spec.offsets[1:], strict=True)
        )
        return n_groups, tracked
    tracked = frozenset(
        (id(p), g, local(p).numel())
        for g, group in enumerate(optimizer.param_groups)
        for p in group["params"]
        if p.requires_grad
    )
    return id(optimizer), len(optimizer.param_groups), tracked


def _hyper_key(optimizer: torch.optim.Optimizer) -> tuple:
    """The param groups' scalar hyperparameters but the learning rate (which snapshots record themselves)."""
    skip = ("params", "lr", "initial_lr", "max_lr", "min_lr", "base_lr")
    return tuple(
        tuple((k, v) for k, v in group.items() if k not in skip and isinstance(v, int | float | bool | tuple))
        for group in optimizer.param_groups
    )


def _accumulation_scheduler(trainer: pl.Trainer) -> Any:
    from lightning.pytorch.callbacks import GradientAccumulationScheduler

    return next((c for c in trainer.callbacks if isinstance(c, GradientAccumulationScheduler)), None)


def _epoch_steps(trainer: pl.Trainer):
    """Optimizer steps left in the current epoch, then the number in each later epoch (an endless iterator).

    Each epoch's count uses the accumulation it will run with: a ``GradientAccumulationScheduler``'s schedule, or
    else the trainer's current ``accumulate_grad_batches``. Lightning steps after every ``accumulate`` batches and
    after an epoch's last batch. ``None`` when the epoch length is unknown (an iterable dataset without a length).
    """
    n_batches = trainer.num_training_batches
    if not isinstance(n_batches, int) and not (isinstance(n_batches, float) and math.isfinite(n_batches)):
        return None
    n_batches = int(n_batches)
    gas = _accumulation_scheduler(trainer)

    def accumulation(epoch: int) -> int:
        return max(1, gas.get_accumulate_grad_batches(epoch) if gas is not None else trainer.accumulate_grad_batches)

    def steps():
        epoch = trainer.current_epoch
        done = trainer.fit_loop.epoch_loop.batch_progress.current.processed
        acc = accumulation(epoch)
        yield 0 if done >= n_batches else math.ceil(n_batches / acc) - done // acc
        while True:
            epoch += 1
            yield math.ceil(n_batches / accumulation(epoch))

    return steps()


class _LogCapture:
    """Stands in for ``LightningModule.log``/``log_dict`` while candidates are evaluated."""

    def __init__(self) -> None:
        self.values: dict[str, list[tuple[float, float]]] = {}
        self.metrics: dict[str, Any] = {}
        self.batch_size = 1.0

    def add(self, name: str, value: Any, batch_size: float | None = None) -> None:
        from torchmetrics import Metric

        if isinstance(value, Metric):
            self.metrics[name] = value
            return
        value = float(value.detach().float().mean()) if isinstance(value, Tensor) else float(value)
        self.values.setdefault(name, []).append((value, float(batch_size or self.batch_size)))

    def log(self, name: str, value: Any, *args, batch_size: int | None = None, **kwargs) -> None:
        self.add(name, value, batch_size)

    def log_dict(self, dictionary: dict, *args, batch_size: int | None = None, **kwargs) -> None:
        for name, value in dictionary.items():
            self.add(name, value, batch_size)


def _equal_rows(a: Tensor, b: Tensor, chunk: int = 1 << 20) -> bool:
    """Whether ``a`` equals ``b`` (shape ``(P,)``) after converting ``b`` to ``a``'s dtype, a chunk at a time."""
    return all(torch.equal(a[lo : lo + chunk], b[lo : lo + chunk].to(a)) for lo in range(0, a.numel(), chunk))


def _batch_size(batch: Any) -> float:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            return float(extract_batch_size(batch))
        except Exception:
            return 1.0


def _reshard(module: torch.nn.Module) -> None:
    """Free FSDP2's gathered parameters (``FSDPModule.reshard``, no collective).

    A root module keeps its gathered parameters after a forward that no backward follows (GFM's evaluations), and
    its next forward reuses them: after writing the local shards, the next forward must gather them afresh.
    """
    fsdp = sys.modules.get("torch.distributed.fsdp")  # a model sharded by FSDP2 has imported it (importing costs)
    fsdp_module = getattr(fsdp, "FSDPModule", None)
    if fsdp_module is None:
        return
    for m in module.modules():
        if isinstance(m, fsdp_module):
            m.reshard()


@contextlib.contextmanager
def _cpu_threads(n: int | None, device: torch.device):
    """Run GFM's own CPU work with ``n`` intra-op threads, restoring the user's setting after."""
    if n is None or device.type != "cpu":
        yield
        return
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


@dataclasses.dataclass
class _Screened:
    """The monitored metric on the first ``done`` evaluation batches, and the sums the rest continue.

    Attributes:
        metric: the metric over those batches (reduced over ranks).
        sums: this rank's ``(sum of value * weight, sum of weight)`` over them, float64, shape ``(2,)``; ``None``
            for a torchmetrics metric, whose state cannot be continued.
        done: how many of the cached batches were evaluated.
    """

    metric: float
    sums: Tensor | None
    done: int

    def __float__(self) -> float:
        return self.metric


@contextlib.contextmanager
def _quiet_evaluation(module: pl.LightningModule, train: bool = False):
    """Eval mode (unless ``train``), logging captured, torchmetrics states saved; everything restored on exit.

    Nests: an inner one hands logging back to the outer one's capture.
    """
    from torchmetrics import Metric

    modes = {m: m.training for m in module.modules()}
    metric_states = {}
    for m in module.modules():
        if isinstance(m, Metric):
            metric_states[m] = (
                {
                    k: (v.clone() if isinstance(v, Tensor) else [t.clone() for t in v])
                    for k, v in m.metric_state.items()
                },
                m._update_count,
                m._computed,
            )
    capture = _LogCapture()
    outer = {name: module.__dict__[name] for name in ("log", "log_dict") if name in module.__dict__}
    module.log, module.log_dict = capture.log, capture.log_dict
    if not train:
        module.eval()
    try:
        yield capture
    finally:
        del module.log, module.log_dict
        for name, fn in outer.items():
            setattr(module, name, fn)
        for m, training in modes.items():
            m.training = training
        for m, (state, count, computed) in metric_states.items():
            for k, v in state.items():
                setattr(m, k, v)
            m._update_count, m._computed = count, computed
