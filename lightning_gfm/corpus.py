"""Trajectory corpora on disk: record small training runs, write them as safetensors shards, read them back.

Format (version 1). A corpus is a directory of shards, one trajectory per ``<name>.safetensors`` file:

* tensors: ``steps`` ``(K,)`` int64 (global optimizer step of each snapshot), ``weights`` ``(K, P)`` float32,
  ``state.<name>`` ``(K, P)`` float32 for each optimizer state the dynamics carry (e.g. ``state.exp_avg``),
  ``lrs`` ``(K, G)`` float64 (learning rate of each param group), ``opt_steps`` ``(K,)`` int64 (the optimizer's
  own step counter);
* metadata (strings): ``format`` = ``"lightning-gfm-trajectory"``, ``version`` = ``"1"`` and ``meta``, a JSON
  object with ``task`` (dataset, architecture, loss), ``optimizer`` (class and hyperparameters), ``schedule``,
  ``seeds`` (initialisation and data order), ``steps`` (planned total), ``record_every``, ``dynamics`` (class and
  per-group hyperparameters GFM reads), ``params`` (names, shapes, param groups and roles of the tracked tensors).

Snapshots follow :class:`~lightning_gfm.GFMCallback`'s convention: one after every ``record_every``-th optimizer
step (step ``record_every`` first). Shards are written to a temporary name and renamed, so an interrupted
``record`` leaves only complete shards and resumes where it stopped. Reading never unpickles anything.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
from torch import Tensor, nn

from lightning_gfm import dynamics as _dynamics
from lightning_gfm.dynamics import Dynamics, dynamics_for, take_snapshot
from lightning_gfm.params import ParamSpec
from lightning_gfm.trajectory import Snapshot, TrajectoryBuffer

FORMAT = "lightning-gfm-trajectory"
VERSION = 1
_DYNAMICS = {
    c.__name__: c
    for c in (_dynamics.SGDDynamics, _dynamics.MomentumDynamics, _dynamics.AdamDynamics, _dynamics.RMSpropDynamics)
}

__all__ = [
    "FORMAT",
    "SUITES",
    "VERSION",
    "RunSpec",
    "Trajectory",
    "load_corpus",
    "load_trajectory",
    "record_run",
    "record_suite",
    "save_trajectory",
]


# ---------------------------------------------------------------------------------------------- trajectories
@dataclass
class Trajectory:
    """One recorded run: its snapshots, the parameter layout and the optimizer dynamics, plus its metadata.

    Attributes:
        name: shard name.
        buffer: every snapshot, oldest first.
        spec: parameter layout (its ``params`` are shape-only ``meta`` tensors when read from disk).
        dyn: the optimizer's dynamics.
        meta: the JSON metadata.
    """

    name: str
    buffer: TrajectoryBuffer
    spec: ParamSpec
    dyn: Dynamics
    meta: dict = field(default_factory=dict)

    @property
    def total_steps(self) -> int:
        """Planned training steps (the callback's ``progress`` denominator)."""
        return int(self.meta.get("steps") or self.buffer.steps[-1])

    @property
    def family(self) -> str:
        """Optimizer family: ``sgd``, ``momentum``, ``adam`` or ``rmsprop`` (from the dynamics)."""
        return {"SGDDynamics": "sgd", "MomentumDynamics": "momentum", "AdamDynamics": "adam"}.get(
            type(self.dyn).__name__, "rmsprop"
        )

    def window(self, lo: int = 0, hi: int | None = None):
        """The :class:`~lightning_gfm.flow.window.Window` of snapshots ``lo..hi-1``, as the callback builds it."""
        from lightning_gfm.flow.window import Window

        hi = len(self.buffer) if hi is None else hi
        buf = TrajectoryBuffer(max(hi - lo, 2))
        for i in range(lo, hi):
            buf.append(self.buffer[i])
        return Window.from_buffer(buf, self.spec, self.dyn.state_names, total_steps=self.total_steps)


def _spec_meta(spec: ParamSpec) -> dict:
    return {
        "names": spec.names,
        "shapes": [list(p.shape) for p in spec.params],
        "groups": spec.groups,
        "roles": spec.roles,
    }


def _spec_from_meta(m: dict) -> ParamSpec:
    params = [torch.empty(s, device="meta") for s in m["shapes"]]
    offsets = [0]
    for p in params:
        offsets.append(offsets[-1] + p.numel())
    return ParamSpec(
        names=list(m["names"]), params=params, offsets=offsets, groups=list(m["groups"]), roles=list(m["roles"])
    )


def save_trajectory(
    path: str | os.PathLike, buffer: TrajectoryBuffer, spec: ParamSpec, dyn: Dynamics, meta: dict
) -> Path:
    """Write one trajectory shard (atomically: a temporary file renamed into place)."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {
        "steps": torch.tensor(buffer.steps, dtype=torch.int64),
        "weights": buffer.weights().contiguous(),
        "lrs": buffer.lrs().contiguous(),
        "opt_steps": torch.tensor([buffer[i].opt_step for i in range(len(buffer))], dtype=torch.int64),
    }
    for name in dyn.state_names:
        tensors[f"state.{name}"] = buffer.state(name).contiguous()
    full = dict(meta)
    full["dynamics"] = {"class": type(dyn).__name__, "hyper": dyn.hyper}
    full["params"] = _spec_meta(spec)
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp), metadata={"format": FORMAT, "version": str(VERSION), "meta": json.dumps(full)})
    os.replace(tmp, path)
    return path


def load_trajectory(path: str | os.PathLike) -> Trajectory:
    """Read a shard written by :func:`save_trajectory` (tensors and JSON only).

    Raises:
        FileNotFoundError: no such file.
        ValueError: not a safetensors trajectory shard (a pickle, another format, a newer version).
    """
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"trajectory shard not found: {str(path)!r}.")
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            md = f.metadata() or {}
            t = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    except Exception as err:
        raise ValueError(f"{str(path)!r} is not a safetensors trajectory shard ({type(err).__name__}).") from err
    if md.get("format") != FORMAT:
        raise ValueError(f"{str(path)!r} is not a lightning-gfm trajectory shard (format={md.get('format')!r}).")
    if int(md.get("version", "0")) > VERSION:
        raise ValueError(f"{str(path)!r} has trajectory format version {md['version']}; this reads up to {VERSION}.")
    meta = json.loads(md["meta"])
    spec = _spec_from_meta(meta["params"])
    cls = _DYNAMICS.get(meta["dynamics"]["class"])
    if cls is None:
        raise ValueError(f"{str(path)!r}: unknown dynamics {meta['dynamics']['class']!r}.")
    dyn = cls(meta["dynamics"]["hyper"], spec.group_index())
    steps, w, lrs, opt = t["steps"], t["weights"], t["lrs"], t["opt_steps"]
    buf = TrajectoryBuffer(max(len(steps), 2))
    for k in range(len(steps)):
        state = {n: t[f"state.{n}"][k] for n in dyn.state_names}
        buf.append(Snapshot(int(steps[k]), w[k], state, lrs[k], int(opt[k])))
    return Trajectory(path.stem, buf, spec, dyn, meta)


def load_corpus(paths: str | os.PathLike | Iterable[str | os.PathLike]) -> list[Trajectory]:
    """Every shard of one or several corpus directories (or shard files), sorted by name."""
    if isinstance(paths, str | os.PathLike):
        paths = [paths]
    files: list[Path] = []
    for p in map(Path, paths):
        files += sorted(p.glob("*.safetensors")) if p.is_dir() else [p]
    if not files:
        raise FileNotFoundError(f"no trajectory shard (*.safetensors) in {[str(p) for p in paths]}.")
    return [load_trajectory(f) for f in files]


# ------------------------------------------------------------------------------------------------- datasets
def _standardise(x: Tensor) -> Tensor:
    return (x - x.mean(0)) / x.std(0).clamp_min(1e-3)


def _sklearn(name: str) -> tuple[Tensor, Tensor]:
    try:
        from sklearn import datasets
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError(f"dataset {name!r} needs scikit-learn: pip install scikit-learn") from err
    x, y = getattr(datasets, f"load_{name}")(return_X_y=True)
    return _standardise(torch.tensor(x, dtype=torch.float32)), torch.tensor(y, dtype=torch.long)


def _moons(n: int = 1024, noise: float = 0.15, seed: int = 0) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(seed)
    t = torch.rand(n, generator=g) * math.pi
    y = torch.randint(2, (n,), generator=g)
    x = torch.stack([torch.cos(t), torch.sin(t)], 1)
    x = torch.where(y[:, None] == 1, torch.stack([1 - torch.cos(t), 0.5 - torch.sin(t)], 1), x)
    x = x + noise * torch.randn(n, 2, generator=g)
    return _standardise(x), y


def _blobs(n: int = 1024, dim: int = 16, classes: int = 5, seed: int = 1) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(classes, dim, generator=g) * 1.2
    y = torch.randint(classes, (n,), generator=g)
    x = centres[y] + torch.randn(n, dim, generator=g) * 1.5
    return _standardise(x), y


def _teacher(n: int = 1024, dim: int = 8, seed: int = 2) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, dim, generator=g)
    w1, w2 = torch.randn(dim, 32, generator=g) / dim**0.5, torch.randn(32, 1, generator=g) / 32**0.5
    y = torch.tanh(x @ w1) @ w2 + 0.05 * torch.randn(n, 1, generator=g)
    return x, y / y.std()


#: name -> (loader, number of outputs, loss); all offline: scikit-learn's bundled sets or generated here.
DATASETS: dict[str, tuple[Callable[[], tuple[Tensor, Tensor]], int, str]] = {
    "wine": (lambda: _sklearn("wine"), 3, "ce"),
    "breast_cancer": (lambda: _sklearn("breast_cancer"), 2, "ce"),
    "iris": (lambda: _sklearn("iris"), 3, "ce"),
    "moons": (_moons, 2, "ce"),
    "blobs": (_blobs, 5, "ce"),
    "teacher": (_teacher, 1, "mse"),
}

_ACT = {"tanh": nn.Tanh, "relu": nn.ReLU, "gelu": nn.GELU, "silu": nn.SiLU}


def _mlp(n_in: int, hidden: Sequence[int], n_out: int, act: str) -> nn.Module:
    layers: list[nn.Module] = []
    for h in hidden:
        layers += [nn.Linear(n_in, h), _ACT[act]()]
        n_in = h
    return nn.Sequential(*layers, nn.Linear(n_in, n_out))


_OPTIMIZERS = {
    "sgd": torch.optim.SGD,
    "adam": torch.optim.Adam,
    "adamw": torch.optim.AdamW,
    "rmsprop": torch.optim.RMSprop,
}


@dataclass(frozen=True)
class RunSpec:
    """One recorded training run (a plain torch loop, full-batch-free minibatch SGD-style training).

    Attributes:
        dataset: key of :data:`DATASETS`.
        hidden: hidden widths of the MLP.
        act: activation (``tanh``, ``relu``, ``gelu``, ``silu``).
        optimizer: ``sgd``, ``adam``, ``adamw`` or ``rmsprop``.
        opt_kwargs: optimizer hyperparameters (``lr``, ``momentum``, ``betas``, ...), as ``(key, value)`` pairs.
        schedule: ``constant``, ``cosine`` (to 5 % of the lr, per step) or ``step`` (x0.3 at half the run).
        steps: optimizer steps.
        batch: minibatch size.
        record_every: steps between snapshots.
        init_seed: seeds the initialisation.
        data_seed: seeds the minibatch order.
    """

    dataset: str
    hidden: tuple[int, ...]
    act: str
    optimizer: str
    opt_kwargs: tuple[tuple[str, object], ...]
    schedule: str = "constant"
    steps: int = 300
    batch: int = 32
    record_every: int = 10
    init_seed: int = 0
    data_seed: int = 0

    @property
    def name(self) -> str:
        kw = "-".join(f"{k}{v if not isinstance(v, tuple) else '_'.join(map(str, v))}" for k, v in self.opt_kwargs)
        arch = "x".join(map(str, self.hidden)) or "linear"
        return (
            f"{self.dataset}_{arch}{self.act}_{self.optimizer}-{kw}_{self.schedule}_i{self.init_seed}d{self.data_seed}"
        )

    def to_meta(self) -> dict:
        d = asdict(self)
        d["opt_kwargs"] = dict(self.opt_kwargs)
        return d


def _scheduler(opt: torch.optim.Optimizer, kind: str, steps: int):
    if kind == "constant":
        return None
    if kind == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps, eta_min=0.05 * opt.param_groups[0]["lr"])
    if kind == "step":
        return torch.optim.lr_scheduler.StepLR(opt, steps // 2, gamma=0.3)
    raise ValueError(f"unknown schedule {kind!r}; choose constant, cosine or step.")


def record_run(spec: RunSpec) -> Trajectory:
    """Train ``spec`` with a plain torch loop, recording a snapshot every ``record_every`` steps."""
    loader, n_out, loss_kind = DATASETS[spec.dataset]
    x, y = loader()
    torch.manual_seed(spec.init_seed)
    model = _mlp(x.shape[1], spec.hidden, n_out, spec.act)
    opt = _OPTIMIZERS[spec.optimizer](model.parameters(), **dict(spec.opt_kwargs))
    sched = _scheduler(opt, spec.schedule, spec.steps)
    pspec = ParamSpec.from_module(model, opt)
    dyn = dynamics_for(opt, pspec)
    buf = TrajectoryBuffer(spec.steps // spec.record_every + 1)
    gen = torch.Generator().manual_seed(10_000 + spec.data_seed)
    batch = min(spec.batch, len(x))
    order, pos = torch.randperm(len(x), generator=gen), 0
    for s in range(1, spec.steps + 1):
        if pos + batch > len(order):
            order, pos = torch.randperm(len(x), generator=gen), 0
        idx = order[pos : pos + batch]
        pos += batch
        out = model(x[idx])
        loss = nn.functional.cross_entropy(out, y[idx]) if loss_kind == "ce" else nn.functional.mse_loss(out, y[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if sched is not None:
            sched.step()
        if s % spec.record_every == 0:
            buf.append(take_snapshot(opt, pspec, dyn.state_names, s))
    meta = {
        "task": {"dataset": spec.dataset, "arch": f"mlp{list(spec.hidden)}-{spec.act}", "loss": loss_kind},
        "optimizer": {
            "class": type(opt).__name__,
            **{k: list(v) if isinstance(v, tuple) else v for k, v in spec.opt_kwargs},
        },
        "schedule": spec.schedule,
        "seeds": {"init": spec.init_seed, "data": spec.data_seed},
        "steps": spec.steps,
        "batch": batch,
        "record_every": spec.record_every,
        "run": spec.to_meta(),
        "final_loss": float(loss.detach()),
    }
    return Trajectory(spec.name, buf, pspec, dyn, meta)


# --------------------------------------------------------------------------------------------------- suites
_OPTS = {  # name -> (torch optimizer, kwargs) used by the pre-training suite
    "sgd-0.05": ("sgd", (("lr", 0.05),)),
    "sgd-0.1": ("sgd", (("lr", 0.1),)),
    "momentum-0.01": ("sgd", (("lr", 0.01), ("momentum", 0.9))),
    "momentum-0.03": ("sgd", (("lr", 0.03), ("momentum", 0.9))),
    "adam-1e-3": ("adam", (("lr", 1e-3),)),
    "adam-3e-3": ("adam", (("lr", 3e-3),)),
    "adamw-1e-3": ("adamw", (("lr", 1e-3), ("weight_decay", 0.01))),
    "rmsprop-1e-3": ("rmsprop", (("lr", 1e-3),)),
    "rmsprop-3e-4": ("rmsprop", (("lr", 3e-4),)),
}
_ARCHS = [((32,), "tanh"), ((64, 64), "relu"), ((16, 16, 16), "silu")]
_TRAIN_DATA = ("wine", "breast_cancer", "moons", "blobs", "teacher")


def _suite_pretrain() -> list[RunSpec]:
    runs = []
    i = 0
    for data in _TRAIN_DATA:
        for hidden, act in _ARCHS:
            for opt, kw in _OPTS.values():
                schedule = ("constant", "cosine")[i % 2]
                runs.append(RunSpec(data, hidden, act, opt, kw, schedule, init_seed=i % 3, data_seed=i % 2))
                i += 1
    return runs


def _suite_heldout_init() -> list[RunSpec]:
    # same tasks, architectures and optimizer settings as pre-training; initialisations 100+ never trained on.
    # One run per (dataset, architecture), its optimizer setting rotating through all nine.
    runs = _suite_pretrain()
    n_opt = len(_OPTS)
    pick = [runs[g * n_opt + g % n_opt] for g in range(len(runs) // n_opt)]
    return [replace(r, init_seed=100 + k % 3, data_seed=7) for k, r in enumerate(pick)]


def _suite_heldout_arch() -> list[RunSpec]:
    # an architecture never trained on: a deeper, wider GELU MLP
    opts = ["sgd-0.1", "momentum-0.03", "adam-1e-3", "adamw-1e-3", "rmsprop-1e-3"]
    return [
        RunSpec(d, (96, 48, 24), "gelu", *_OPTS[o], "constant", init_seed=200 + k, data_seed=7)
        for k, (d, o) in enumerate((d, o) for d in ("wine", "blobs") for o in opts)
    ]


def _suite_heldout_opt() -> list[RunSpec]:
    # optimizer hyperparameters (and a step schedule) never trained on
    settings = [
        ("sgd", (("lr", 0.2),), "step"),
        ("sgd", (("lr", 0.005), ("momentum", 0.95), ("nesterov", True)), "constant"),
        ("adam", (("lr", 5e-3), ("betas", (0.8, 0.95))), "step"),
        ("adamw", (("lr", 3e-4), ("weight_decay", 0.1)), "constant"),
        ("rmsprop", (("lr", 2e-3), ("alpha", 0.9)), "step"),
    ]
    return [
        RunSpec(d, h, a, o, kw, sch, init_seed=300 + k, data_seed=7)
        for k, (d, (h, a), (o, kw, sch)) in enumerate(
            (d, arch, s) for d in ("wine", "moons") for arch in _ARCHS[:1] + _ARCHS[1:2] for s in settings
        )
    ]


def _suite_smoke() -> list[RunSpec]:
    return [replace(r, steps=200) for r in _suite_pretrain()[::27]]


#: named sets of runs; ``pretrain`` is what the shipped field was trained on; the ``heldout-*`` suites differ
#: from it along one axis each. None uses the acceleration benchmark's data (mnist1d, digits, text).
SUITES: dict[str, Callable[[], list[RunSpec]]] = {
    "pretrain": _suite_pretrain,
    "heldout-init": _suite_heldout_init,
    "heldout-arch": _suite_heldout_arch,
    "heldout-opt": _suite_heldout_opt,
    "smoke": _suite_smoke,
}


def record_suite(
    suite: str | Sequence[RunSpec],
    out: str | os.PathLike,
    *,
    progress: bool = True,
    log: Callable[[str], None] | None = None,
) -> list[Path]:
    """Record every run of ``suite`` into the directory ``out``, skipping shards already there (resumable)."""
    from tqdm.auto import tqdm

    runs = SUITES[suite]() if isinstance(suite, str) else list(suite)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for spec in tqdm(runs, desc="record", disable=not progress, unit="run"):
        path = out / f"{spec.name}.safetensors"
        if not path.exists():
            traj = record_run(spec)
            save_trajectory(path, traj.buffer, traj.spec, traj.dyn, traj.meta)
            if log:
                log(f"recorded {path.name} (final loss {traj.meta['final_loss']:.4f})")
        paths.append(path)
    return paths
