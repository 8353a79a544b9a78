"""Trajectory corpora on disk: record small training runs, write them as safetensors shards, read them back.

Format (version 1). A corpus is a directory of shards, one trajectory per ``<name>.safetensors`` file:

* tensors: ``steps`` ``(K,)`` int64 (global optimizer step of each snapshot), ``weights`` ``(K, P)`` float32,
  ``state.<name>`` ``(K, P)`` float32 for each optimizer state the dynamics carry (e.g. ``state.exp_avg``),
  ``lrs`` ``(K, G)`` float64 (learning rate of each param group), ``opt_steps`` ``(K,)`` int64 (the optimizer's
  own step counter);
* metadata (strings): ``format`` = ``"lightning-gfm-trajectory"``, ``version`` = ``"1"`` and ``meta``, a JSON
  object with ``task`` (dataset, architecture, its kind, loss), ``optimizer`` (class and hyperparameters), ``schedule``,
  ``seeds`` (initialisation and data order), ``steps`` (planned total), ``record_every``, ``dynamics`` (class and
  per-group hyperparameters GFM reads), ``params`` (names, shapes, param groups and roles of the tracked tensors).

Snapshots follow :class:`~lightning_gfm.GFMCallback`'s convention: one after every ``record_every``-th optimizer
step (step ``record_every`` first). Shards are written to a temporary name and renamed, so an interrupted
``record`` leaves only complete shards and resumes where it stopped. Reading never unpickles anything.

Suites (:data:`SUITES`, ``lightning-gfm record --list``):

* ``pretrain``: what the shipped field was trained on (MLPs on wine, breast cancer, moons, blobs and a teacher
  regression; SGD, momentum, Adam, AdamW, RMSprop; constant and cosine schedules); ``heldout-init``,
  ``heldout-arch`` and ``heldout-opt`` differ from it along one axis each; ``smoke`` is a five-run sample.
* ``meta``: a broad corpus for meta-training a learned forecaster, 300 runs spread evenly over ten architecture
  kinds (``mlp``, ``mlp-ln``, ``mlp-bn``, ``resmlp``, ``cnn``, ``cnn-bn``, ``gru``, ``lstm``, ``gru-lm``,
  ``transformer-lm``; :data:`ARCHS`), five optimizer families (SGD, SGD with momentum, some Nesterov or with
  weight decay, Adam, AdamW, RMSprop, some with momentum) at two learning rates each and a setting between
  them, and five schedules (:data:`SCHEDULES`: constant, step, cosine, warm-up + cosine, one-cycle), with
  batches of 16 to 128, 300 to 900 steps and 50 snapshots a run; every (kind, family, schedule) triple occurs.
  Its data are generated with torch from fixed seeds (tabular sets, oriented-bar and shape images, frequency
  and counting sequences) or are the source text of standard-library packages (:data:`TEXTS`, which depends
  on the Python version); none is the benchmark's (no scikit-learn set, no mnist1d, none of the stdlib
  packages the benchmark's language models read), and none needs scikit-learn. Recording it takes about
  8.5 minutes on one core and writes about 1.3 GB (float32 weights and optimizer state of every snapshot).
  ``meta-smoke`` is one 120-step run of each kind, for tests.

Besides the snapshots, each shard's metadata keeps ``first_loss``, ``final_loss`` (the first and last minibatch
losses) and ``losses``, the mean minibatch loss of each record interval (one per snapshot).
"""

from __future__ import annotations

import functools
import json
import math
import os
import sysconfig
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
from torch import Tensor, nn

from lightning_gfm import dynamics as _dynamics
from lightning_gfm.budget import auto_schedule
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


def _spirals(n: int = 1536, arms: int = 3, noise: float = 0.25, seed: int = 3) -> tuple[Tensor, Tensor]:
    """Interleaved spiral arms in 2-D, one class per arm: a nonlinear boundary a small MLP learns gradually."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(arms, (n,), generator=g)
    r = torch.rand(n, generator=g) * 3 + 0.3
    t = r * 1.6 + y * (2 * math.pi / arms)
    x = torch.stack([r * torch.cos(t), r * torch.sin(t)], 1) + noise * torch.randn(n, 2, generator=g)
    return _standardise(x), y


def _friedman(n: int = 1024, dim: int = 10, seed: int = 4) -> tuple[Tensor, Tensor]:
    """Friedman's first regression function of uniform inputs (five informative, the rest distractors)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, dim, generator=g)
    y = (
        10 * torch.sin(math.pi * x[:, 0] * x[:, 1])
        + 20 * (x[:, 2] - 0.5) ** 2
        + 10 * x[:, 3]
        + 5 * x[:, 4]
        + torch.randn(n, generator=g)
    )
    return _standardise(x), ((y - y.mean()) / y.std())[:, None]


def _teacher_cls(n: int = 1024, dim: int = 12, classes: int = 4, seed: int = 5) -> tuple[Tensor, Tensor]:
    """Labels of a random ReLU teacher network with a little label noise (Gumbel-perturbed argmax)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, dim, generator=g)
    w1, w2 = torch.randn(dim, 24, generator=g) / dim**0.5, torch.randn(24, classes, generator=g) / 24**0.5
    logits = torch.relu(x @ w1) @ w2
    logits = 3 * (logits - logits.mean(0)) / logits.std(0)  # every class about as frequent
    gumbel = -torch.log(-torch.log(torch.rand(n, classes, generator=g).clamp(1e-9, 1 - 1e-9)))
    return x, (logits + 0.3 * gumbel).argmax(1)


def _grid(size: int) -> tuple[Tensor, Tensor]:
    c = torch.arange(size, dtype=torch.float32) - (size - 1) / 2
    return c[None, :].expand(size, size), c[:, None].expand(size, size)  # (x, y) pixel coordinates


def _bars(n: int = 2048, size: int = 12, classes: int = 6, seed: int = 6) -> tuple[Tensor, Tensor]:
    """``size`` x ``size`` images of one bar whose orientation is the class, jittered, shifted, plus noise."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(classes, (n,), generator=g)
    theta = y * (math.pi / classes) + (torch.rand(n, generator=g) - 0.5) * 0.25
    cx, cy = ((torch.rand(n, 2, generator=g) - 0.5) * 4).unbind(1)
    width = 0.7 + 0.5 * torch.rand(n, generator=g)
    length = 3.0 + 2.0 * torch.rand(n, generator=g)
    gx, gy = _grid(size)
    dx, dy = gx[None] - cx[:, None, None], gy[None] - cy[:, None, None]
    c, s = torch.cos(theta)[:, None, None], torch.sin(theta)[:, None, None]
    along, across = dx * c + dy * s, -dx * s + dy * c
    bar = torch.exp(-0.5 * (across / width[:, None, None]) ** 2)
    img = bar * torch.sigmoid(2 * (length[:, None, None] - along.abs()))
    img = img + 0.3 * torch.randn(n, size, size, generator=g)
    return ((img - img.mean()) / img.std())[:, None], y


def _shapes(n: int = 2048, size: int = 8, seed: int = 7) -> tuple[Tensor, Tensor]:
    """``size`` x ``size`` images of a blob, a ring, a cross or a square outline (the class), shifted, noisy."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(4, (n,), generator=g)
    cx, cy = ((torch.rand(n, 2, generator=g) - 0.5) * 2).unbind(1)
    scale = (1.6 + 0.8 * torch.rand(n, generator=g))[:, None, None]
    gx, gy = _grid(size)
    dx, dy = gx[None] - cx[:, None, None], gy[None] - cy[:, None, None]
    r = (dx**2 + dy**2).sqrt()
    shapes = torch.stack(
        [
            torch.exp(-0.5 * (r / (0.6 * scale)) ** 2),  # blob
            torch.exp(-0.5 * ((r - scale) / 0.5) ** 2),  # ring
            torch.exp(-0.5 * (torch.minimum(dx.abs(), dy.abs()) / 0.5) ** 2) * (r < 1.8 * scale),  # cross
            torch.exp(-0.5 * ((torch.maximum(dx.abs(), dy.abs()) - scale) / 0.45) ** 2),  # square outline
        ],
        1,
    )
    img = shapes[torch.arange(n), y] + 0.25 * torch.randn(n, size, size, generator=g)
    return ((img - img.mean()) / img.std())[:, None], y


def _seq_freq(n: int = 2048, length: int = 20, classes: int = 4, seed: int = 8) -> tuple[Tensor, Tensor]:
    """Noisy sinusoids ``(n, length, 2)`` (signal, noise channel); the class is the frequency (1-4 cycles)."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(classes, (n,), generator=g)
    freq = (y + 1) * (1 + 0.08 * (torch.rand(n, generator=g) - 0.5))
    phase = torch.rand(n, generator=g) * 2 * math.pi
    amp = 1.5 + 0.5 * torch.rand(n, generator=g)
    t = torch.arange(length, dtype=torch.float32) / length
    sig = amp[:, None] * torch.sin(2 * math.pi * freq[:, None] * t[None] + phase[:, None])
    x = torch.stack([sig + 0.2 * torch.randn(n, length, generator=g), torch.randn(n, length, generator=g)], 2)
    return x, y


def _seq_count(n: int = 2048, length: int = 20, vocab: int = 8, seed: int = 9) -> tuple[Tensor, Tensor]:
    """One-hot token sequences ``(n, length, vocab)``; the class is the most frequent of tokens 0-3."""
    g = torch.Generator().manual_seed(seed)
    tok = torch.randint(vocab, (n, length), generator=g)
    planted = torch.randint(4, (n,), generator=g)
    pos = torch.rand(n, length, generator=g).argsort(1)[:, :4]  # four planted copies of one token
    tok.scatter_(1, pos, planted[:, None].expand(-1, 4))
    counts = torch.stack([(tok == k).sum(1) for k in range(4)], 1).float()
    y = (counts - 1e-3 * torch.arange(4)).argmax(1)  # ties go to the lower token
    return nn.functional.one_hot(tok, vocab).float(), y


#: character-level text corpora: the ``.py`` source of standard-library packages the benchmark never reads.
TEXTS: dict[str, tuple[str, ...]] = {
    "stdlib-a": ("unittest", "multiprocessing", "collections"),
    "stdlib-b": ("ctypes", "sqlite3", "wsgiref", "zoneinfo", "dbm", "curses"),
}
#: size of the text vocabulary: 1 for a newline, 2.. for printable ASCII, 0 for any other byte (tabs, UTF-8).
TEXT_VOCAB = 2 + 95
TEXT_CONTEXT = 32


def stdlib_source(packages: Sequence[str]) -> str:
    """The ``.py`` files of stdlib ``packages`` (sorted paths, ``test*`` folders left out), joined by newlines.

    Raises:
        FileNotFoundError: a package is not in this Python's standard library.
    """
    root = Path(sysconfig.get_paths()["stdlib"])
    parts = []
    for pkg in packages:
        base = root / pkg
        if not base.is_dir():
            raise FileNotFoundError(f"stdlib package {pkg!r} not found under {str(root)!r}.")
        files = sorted(base.rglob("*.py"), key=lambda f: f.relative_to(base).parts)
        for f in files:
            if not any(d.startswith("test") or d == "__pycache__" for d in f.relative_to(base).parts[:-1]):
                parts.append(f.read_text(encoding="utf-8", errors="replace"))
    return "\n".join(parts)


def _text(name: str) -> tuple[Tensor, Tensor]:
    """Windows of ``TEXT_CONTEXT + 1`` characters (stride ``TEXT_CONTEXT``) as ``(inputs, next characters)``."""
    raw = torch.frombuffer(bytearray(stdlib_source(TEXTS[name]).encode("utf-8")), dtype=torch.uint8)
    table = torch.zeros(256, dtype=torch.long)
    table[10] = 1
    table[32:127] = torch.arange(2, TEXT_VOCAB)
    ids = table[raw.long()]
    starts = torch.arange(0, len(ids) - TEXT_CONTEXT - 1, TEXT_CONTEXT)
    win = ids[starts[:, None] + torch.arange(TEXT_CONTEXT + 1)]
    return win[:, :-1].contiguous(), win[:, 1:].contiguous()


#: name -> (loader, number of outputs, loss); all offline: scikit-learn's bundled sets (``wine``,
#: ``breast_cancer``, ``iris``), generated here from fixed seeds, or stdlib source text (:data:`TEXTS`). Losses:
#: ``ce`` (classification), ``mse`` (regression), ``lm`` (next-character cross-entropy at every position).
DATASETS: dict[str, tuple[Callable[[], tuple[Tensor, Tensor]], int, str]] = {
    "wine": (lambda: _sklearn("wine"), 3, "ce"),
    "breast_cancer": (lambda: _sklearn("breast_cancer"), 2, "ce"),
    "iris": (lambda: _sklearn("iris"), 3, "ce"),
    "moons": (_moons, 2, "ce"),
    "blobs": (_blobs, 5, "ce"),
    "teacher": (_teacher, 1, "mse"),
    "spirals": (_spirals, 3, "ce"),
    "friedman": (_friedman, 1, "mse"),
    "teacher_cls": (_teacher_cls, 4, "ce"),
    "bars12": (_bars, 6, "ce"),
    "shapes8": (_shapes, 4, "ce"),
    "seq_freq": (_seq_freq, 4, "ce"),
    "seq_count": (_seq_count, 4, "ce"),
    **{name: (functools.partial(_text, name), TEXT_VOCAB, "lm") for name in TEXTS},
}


@functools.lru_cache(maxsize=16)
def _load(dataset: str) -> tuple[Tensor, Tensor]:
    """The dataset's tensors, made once per process (they are only read)."""
    return DATASETS[dataset][0]()


_ACT = {"tanh": nn.Tanh, "relu": nn.ReLU, "gelu": nn.GELU, "silu": nn.SiLU}


def _mlp(n_in: int, hidden: Sequence[int], n_out: int, act: str, norm: str | None = None) -> nn.Module:
    layers: list[nn.Module] = []
    for h in hidden:
        layers.append(nn.Linear(n_in, h))
        if norm is not None:
            layers.append(nn.LayerNorm(h) if norm == "ln" else nn.BatchNorm1d(h))
        layers.append(_ACT[act]())
        n_in = h
    return nn.Sequential(*layers, nn.Linear(n_in, n_out))


class _ResMLP(nn.Module):
    """Pre-LayerNorm residual MLP: an input projection, ``x + W2 act(W1 LN(x)))`` blocks, a normed linear head."""

    def __init__(self, n_in: int, hidden: Sequence[int], n_out: int, act: str):
        super().__init__()
        width = hidden[0]
        self.proj = nn.Linear(n_in, width)
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.LayerNorm(width), nn.Linear(width, h), _ACT[act](), nn.Linear(h, width)) for h in hidden
        )
        self.head = nn.Sequential(nn.LayerNorm(width), nn.Linear(width, n_out))

    def forward(self, x: Tensor) -> Tensor:
        h = self.proj(x)
        for block in self.blocks:
            h = h + block(h)
        return self.head(h)


def _cnn(shape: Sequence[int], hidden: Sequence[int], n_out: int, act: str, bn: bool) -> nn.Module:
    """Conv 3x3 - conv 3x3 (each optionally BatchNorm'd) - 2x2 max-pool - linear, for ``(C, H, W)`` images."""
    c_in, height, width = shape
    c1, c2 = hidden
    layers: list[nn.Module] = []
    for a, b in ((c_in, c1), (c1, c2)):
        layers += [nn.Conv2d(a, b, 3, padding=1), *([nn.BatchNorm2d(b)] if bn else []), _ACT[act]()]
    return nn.Sequential(*layers, nn.MaxPool2d(2), nn.Flatten(), nn.Linear(c2 * (height // 2) * (width // 2), n_out))


class _RNNClassifier(nn.Module):
    """A GRU or LSTM (``len(hidden)`` layers of width ``hidden[0]``) read to the end, then a linear head."""

    def __init__(self, cell: str, n_in: int, hidden: Sequence[int], n_out: int):
        super().__init__()
        rnn = nn.GRU if cell == "gru" else nn.LSTM
        self.rnn = rnn(n_in, hidden[0], num_layers=len(hidden), batch_first=True)
        self.head = nn.Linear(hidden[0], n_out)

    def forward(self, x: Tensor) -> Tensor:
        out, _ = self.rnn(x)
        return self.head(out[:, -1])


class _GRULM(nn.Module):
    """Character language model: an embedding (width ``hidden[0]``), a GRU (width ``hidden[1]``), a linear head."""

    def __init__(self, vocab: int, hidden: Sequence[int]):
        super().__init__()
        self.emb = nn.Embedding(vocab, hidden[0])
        self.rnn = nn.GRU(hidden[0], hidden[1], batch_first=True)
        self.head = nn.Linear(hidden[1], vocab)

    def forward(self, x: Tensor) -> Tensor:
        out, _ = self.rnn(self.emb(x))
        return self.head(out)


class _TransformerLM(nn.Module):
    """Causal pre-LN ``nn.TransformerEncoder`` character model: ``len(hidden)`` layers of width ``hidden[0]``."""

    def __init__(self, vocab: int, hidden: Sequence[int], act: str, context: int):
        super().__init__()
        d = hidden[0]
        self.emb = nn.Embedding(vocab, d)
        self.pos_emb = nn.Parameter(torch.randn(context, d) * 0.02)
        layer = nn.TransformerEncoderLayer(
            d, nhead=4, dim_feedforward=2 * d, dropout=0.0, activation=act, batch_first=True, norm_first=True
        )
        self.encoder = nn.TransformerEncoder(layer, len(hidden), enable_nested_tensor=False)
        self.norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, vocab)
        self.register_buffer("mask", nn.Transformer.generate_square_subsequent_mask(context), persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        t = x.shape[1]
        h = self.emb(x) + self.pos_emb[:t]
        h = self.encoder(h, mask=self.mask[:t, :t], is_causal=True)
        return self.head(self.norm(h))


#: architecture kinds of :class:`RunSpec` (``arch``) and what ``hidden`` means for each.
ARCHS: dict[str, str] = {
    "mlp": "MLP, hidden widths",
    "mlp-ln": "MLP with LayerNorm before each activation, hidden widths",
    "mlp-bn": "MLP with BatchNorm before each activation, hidden widths",
    "resmlp": "pre-LN residual MLP, one block per entry (its inner width), width hidden[0]",
    "cnn": "conv-conv-pool-linear on images, (channels 1, channels 2)",
    "cnn-bn": "conv-BN-conv-BN-pool-linear on images, (channels 1, channels 2)",
    "gru": "GRU sequence classifier, len(hidden) layers of width hidden[0]",
    "lstm": "LSTM sequence classifier, len(hidden) layers of width hidden[0]",
    "gru-lm": "character GRU language model, (embedding width, GRU width)",
    "transformer-lm": "causal Transformer character model, len(hidden) layers of width hidden[0] (4 heads)",
}


def _model(arch: str, x: Tensor, n_out: int, hidden: Sequence[int], act: str) -> nn.Module:
    """Build the ``arch`` model for inputs shaped like ``x`` (the whole dataset) and ``n_out`` outputs."""
    if arch in ("mlp", "mlp-ln", "mlp-bn"):
        return _mlp(x.shape[1], hidden, n_out, act, {"mlp": None, "mlp-ln": "ln", "mlp-bn": "bn"}[arch])
    if arch == "resmlp":
        return _ResMLP(x.shape[1], hidden, n_out, act)
    if arch in ("cnn", "cnn-bn"):
        return _cnn(x.shape[1:], hidden, n_out, act, arch == "cnn-bn")
    if arch in ("gru", "lstm"):
        return _RNNClassifier(arch, x.shape[2], hidden, n_out)
    if arch == "gru-lm":
        return _GRULM(n_out, hidden)
    if arch == "transformer-lm":
        return _TransformerLM(n_out, hidden, act, x.shape[1])
    raise ValueError(f"unknown architecture kind {arch!r}; choose one of {sorted(ARCHS)}.")


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
        hidden: the architecture's widths (their meaning per kind: :data:`ARCHS`).
        act: activation (``tanh``, ``relu``, ``gelu``, ``silu``; the Transformer takes ``relu`` or ``gelu``,
            the recurrent kinds ignore it).
        optimizer: ``sgd``, ``adam``, ``adamw`` or ``rmsprop``.
        opt_kwargs: optimizer hyperparameters (``lr``, ``momentum``, ``betas``, ...), as ``(key, value)`` pairs.
        schedule: ``constant``, ``cosine`` (to 5 % of the lr), ``step`` (x0.3 at half the run),
            ``warmup-cosine`` (linear warm-up over the first 10 %, then cosine to 5 %) or ``onecycle``
            (``OneCycleLR`` peaking at ``lr``, momentum not cycled); every schedule steps once per optimizer step.
        steps: optimizer steps.
        batch: minibatch size.
        record_every: steps between snapshots.
        init_seed: seeds the initialisation.
        data_seed: seeds the minibatch order.
        arch: architecture kind, a key of :data:`ARCHS`; part of :attr:`name` unless ``mlp`` (so that the names
            of runs recorded before there were other kinds do not change).
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
    arch: str = "mlp"

    @property
    def name(self) -> str:
        kw = "-".join(f"{k}{v if not isinstance(v, tuple) else '_'.join(map(str, v))}" for k, v in self.opt_kwargs)
        arch = "x".join(map(str, self.hidden)) or "linear"
        if self.arch != "mlp":
            arch = f"{self.arch}{arch}"
        return (
            f"{self.dataset}_{arch}{self.act}_{self.optimizer}-{kw}_{self.schedule}_i{self.init_seed}d{self.data_seed}"
        )

    def to_meta(self) -> dict:
        d = asdict(self)
        d["opt_kwargs"] = dict(self.opt_kwargs)
        return d


SCHEDULES = ("constant", "step", "cosine", "warmup-cosine", "onecycle")


def _warmup_cosine(steps: int, warmup: float = 0.1, floor: float = 0.05) -> Callable[[int], float]:
    """``LambdaLR`` factor: linear warm-up over ``warmup`` of the run, then cosine from 1 down to ``floor``."""
    n_warm = max(1, int(warmup * steps))

    def factor(s: int) -> float:
        if s < n_warm:
            return (s + 1) / n_warm
        t = min(1.0, (s - n_warm) / max(1, steps - n_warm))
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * t))

    return factor


def _scheduler(opt: torch.optim.Optimizer, kind: str, steps: int):
    if kind == "constant":
        return None
    if kind == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps, eta_min=0.05 * opt.param_groups[0]["lr"])
    if kind == "step":
        return torch.optim.lr_scheduler.StepLR(opt, steps // 2, gamma=0.3)
    if kind == "warmup-cosine":
        return torch.optim.lr_scheduler.LambdaLR(opt, _warmup_cosine(steps))
    if kind == "onecycle":
        lr = [float(g["lr"]) for g in opt.param_groups]
        return torch.optim.lr_scheduler.OneCycleLR(opt, lr, total_steps=steps, cycle_momentum=False)
    raise ValueError(f"unknown schedule {kind!r}; choose one of {', '.join(SCHEDULES)}.")


def _loss(kind: str, out: Tensor, y: Tensor) -> Tensor:
    if kind == "mse":
        return nn.functional.mse_loss(out, y)
    if kind == "lm":
        return nn.functional.cross_entropy(out.reshape(-1, out.shape[-1]), y.reshape(-1))
    return nn.functional.cross_entropy(out, y)


def record_run(spec: RunSpec) -> Trajectory:
    """Train ``spec`` with a plain torch loop, recording a snapshot every ``record_every`` steps.

    The snapshot after optimizer step ``s`` is taken after the optimizer step and the scheduler step, as
    :class:`~lightning_gfm.GFMCallback` takes it. The model stays in training mode throughout (BatchNorm uses
    batch statistics; its running statistics are buffers, not tracked parameters).
    """
    _, n_out, loss_kind = DATASETS[spec.dataset]
    x, y = _load(spec.dataset)
    torch.manual_seed(spec.init_seed)
    model = _model(spec.arch, x, n_out, spec.hidden, spec.act)
    opt = _OPTIMIZERS[spec.optimizer](model.parameters(), **dict(spec.opt_kwargs))
    sched = _scheduler(opt, spec.schedule, spec.steps)
    pspec = ParamSpec.from_module(model, opt)
    dyn = dynamics_for(opt, pspec)
    buf = TrajectoryBuffer(spec.steps // spec.record_every + 1)
    gen = torch.Generator().manual_seed(10_000 + spec.data_seed)
    batch = min(spec.batch, len(x))
    order, pos = torch.randperm(len(x), generator=gen), 0
    losses, interval, first = [], 0.0, None
    for s in range(1, spec.steps + 1):
        if pos + batch > len(order):
            order, pos = torch.randperm(len(x), generator=gen), 0
        idx = order[pos : pos + batch]
        pos += batch
        loss = _loss(loss_kind, model(x[idx]), y[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if sched is not None:
            sched.step()
        value = float(loss.detach())
        first = value if first is None else first
        interval += value
        if s % spec.record_every == 0:
            buf.append(take_snapshot(opt, pspec, dyn.state_names, s))
            losses.append(interval / spec.record_every)
            interval = 0.0
    arch = f"mlp{list(spec.hidden)}-{spec.act}" if spec.arch == "mlp" else f"{spec.arch}{list(spec.hidden)}-{spec.act}"
    meta = {
        "task": {"dataset": spec.dataset, "arch": arch, "kind": spec.arch, "loss": loss_kind},
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
        "first_loss": first,
        "final_loss": value,
        "losses": losses,
        "n_params": pspec.numel,
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


# ----------------------------------------------------------------------------------------------- meta suite
#: optimizer families of the ``meta`` suite: name -> torch optimizer key of :data:`_OPTIMIZERS`.
META_FAMILIES: dict[str, str] = {
    "sgd": "sgd",
    "momentum": "sgd",
    "adam": "adam",
    "adamw": "adamw",
    "rmsprop": "rmsprop",
}


def _between(a: float, b: float) -> float:
    """The geometric mean of two learning rates, to two significant digits."""
    return float(f"{math.sqrt(a * b):.2g}")


def _meta_opts(sgd: Sequence[float], mom: Sequence[float], adam: Sequence[float], rms: Sequence[float]) -> dict:
    """Three hyperparameter settings per family from its two learning rates (a third setting in between).

    SGD: the two rates, then the rate in between with a little weight decay. Momentum (0.9): the low rate, the
    high rate with Nesterov, the rate in between with weight decay 5e-4. Adam: the two rates, then the rate in
    between with ``beta2 = 0.98``. AdamW: Adam's rates with weight decay 0.01, 0.05, 0.1. RMSprop: the two rates,
    then a third of the low rate with momentum 0.9 (momentum multiplies the step by up to ten).
    """
    lo, hi = sgd
    m_lo, m_hi = mom
    a_lo, a_hi = adam
    r_lo, r_hi = rms
    mid = _between
    return {
        "sgd": ((("lr", lo),), (("lr", hi),), (("lr", mid(lo, hi)), ("weight_decay", 1e-4))),
        "momentum": (
            (("lr", m_lo), ("momentum", 0.9)),
            (("lr", m_hi), ("momentum", 0.9), ("nesterov", True)),
            (("lr", mid(m_lo, m_hi)), ("momentum", 0.9), ("weight_decay", 5e-4)),
        ),
        "adam": ((("lr", a_lo),), (("lr", a_hi),), (("lr", mid(a_lo, a_hi)), ("betas", (0.9, 0.98)))),
        "adamw": (
            (("lr", a_lo), ("weight_decay", 0.01)),
            (("lr", a_hi), ("weight_decay", 0.05)),
            (("lr", mid(a_lo, a_hi)), ("weight_decay", 0.1)),
        ),
        "rmsprop": (
            (("lr", r_lo),),
            (("lr", r_hi),),
            (("lr", float(f"{r_lo / 3:.2g}")), ("momentum", 0.9)),
        ),
    }


_TABULAR = ("moons", "blobs", "teacher", "spirals", "friedman", "teacher_cls")


@dataclass(frozen=True)
class _Kind:
    """How the ``meta`` suite varies one architecture kind: its data, shapes, lengths, batches and rates."""

    datasets: tuple[str, ...]
    variants: tuple[tuple[tuple[int, ...], str], ...]  # (hidden, act)
    steps: tuple[int, ...]
    batches: tuple[int, ...]
    opts: dict


_TAB_OPTS = _meta_opts(sgd=(0.05, 0.15), mom=(0.01, 0.03), adam=(1e-3, 3e-3), rms=(3e-4, 1e-3))
# lower SGD rates for the normalised and residual MLPs: at 0.08 with batch 16 they diverge on the regressions
_NORMED_OPTS = _meta_opts(sgd=(0.02, 0.05), mom=(0.005, 0.02), adam=(1e-3, 3e-3), rms=(3e-4, 1e-3))
_RNN_OPTS = _meta_opts(sgd=(0.5, 1.5), mom=(0.05, 0.15), adam=(3e-3, 1e-2), rms=(1e-3, 3e-3))
_LSTM_OPTS = _meta_opts(sgd=(0.8, 2.0), mom=(0.05, 0.15), adam=(3e-3, 1e-2), rms=(1e-3, 3e-3))  # slower to start
_META_KINDS: dict[str, _Kind] = {
    "mlp": _Kind(
        _TABULAR,
        (((64, 32), "tanh"), ((64, 64), "relu"), ((32, 32, 32), "gelu"), ((48, 48), "silu")),
        (450, 600, 900),
        (16, 32, 64, 128),
        _TAB_OPTS,
    ),
    "mlp-ln": _Kind(
        _TABULAR,
        (((64, 64), "gelu"), ((32, 32, 32), "relu"), ((96, 48), "tanh")),
        (450, 600, 900),
        (16, 32, 64, 128),
        _NORMED_OPTS,
    ),
    "mlp-bn": _Kind(
        _TABULAR,
        (((64, 64), "relu"), ((48, 48), "silu"), ((32, 32, 32), "tanh")),
        (450, 600, 900),
        (16, 32, 64, 128),
        _NORMED_OPTS,
    ),
    "resmlp": _Kind(
        _TABULAR,
        (((32, 32), "gelu"), ((48, 48, 48), "relu"), ((32, 64, 32), "silu")),
        (300, 450, 600),
        (16, 32, 64, 128),
        _NORMED_OPTS,
    ),
    "cnn": _Kind(
        ("bars12", "shapes8"),
        (((8, 16), "relu"), ((12, 24), "gelu"), ((16, 16), "silu")),
        (300, 450, 600),
        (16, 32, 64, 128),
        _meta_opts(sgd=(0.03, 0.1), mom=(0.005, 0.02), adam=(1e-3, 3e-3), rms=(3e-4, 1e-3)),
    ),
    "cnn-bn": _Kind(
        ("bars12", "shapes8"),
        (((8, 16), "relu"), ((12, 24), "relu"), ((12, 16), "gelu")),
        (300, 450, 600),
        (16, 32, 64, 128),
        _meta_opts(sgd=(0.03, 0.1), mom=(0.005, 0.02), adam=(1e-3, 3e-3), rms=(3e-4, 1e-3)),
    ),
    "gru": _Kind(
        ("seq_freq", "seq_count"),
        (((32,), "tanh"), ((48,), "tanh"), ((24,), "tanh")),
        (300, 450),
        (16, 32, 64, 128),
        _RNN_OPTS,
    ),
    "lstm": _Kind(
        ("seq_freq", "seq_count"),
        (((32,), "tanh"), ((48,), "tanh"), ((64,), "tanh")),
        (300, 450),
        (16, 32, 64, 128),
        _LSTM_OPTS,
    ),
    "gru-lm": _Kind(
        tuple(TEXTS),
        (((16, 48), "tanh"), ((24, 64), "tanh"), ((32, 48), "tanh")),
        (300, 450),
        (16, 32),
        _meta_opts(sgd=(0.5, 1.0), mom=(0.05, 0.1), adam=(3e-3, 1e-2), rms=(1e-3, 3e-3)),
    ),
    "transformer-lm": _Kind(
        tuple(TEXTS),
        (((32,), "gelu"), ((32, 32), "gelu"), ((48,), "relu"), ((64,), "gelu")),
        (300, 450),
        (16, 32),
        _meta_opts(sgd=(0.1, 0.3), mom=(0.01, 0.03), adam=(1e-3, 3e-3), rms=(3e-4, 1e-3)),
    ),
}
_META_SNAPSHOTS = 50


def _balanced(n: int, options: int, seed: int) -> list[int]:
    """``n`` indices into ``options`` choices, each used ``n // options`` or one more times, in a seeded order."""
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    return [i % options for i in order]


def _suite_meta(runs_per_cell: int = 6) -> list[RunSpec]:
    """The ``meta`` suite: ``runs_per_cell`` runs per (architecture kind, optimizer family), 300 in all.

    Within a cell the schedule rotates through all five (one repeats, a different one per family, so that every
    (kind, schedule) pair also gets ``runs_per_cell`` runs) and the hyperparameter setting through the family's
    three. Datasets, widths, run lengths and batch sizes are each spread evenly over a kind's runs in a seeded
    order, so that none is tied to one family, schedule or setting. Every run has its own initialisation and
    data-order seeds and :data:`_META_SNAPSHOTS` snapshots.
    """
    runs = []
    n = 0
    per_kind = runs_per_cell * len(META_FAMILIES)
    for ki, (arch, kind) in enumerate(_META_KINDS.items()):
        data = _balanced(per_kind, len(kind.datasets), 10 * ki + 1)
        variant = _balanced(per_kind, len(kind.variants), 10 * ki + 2)
        steps = _balanced(per_kind, len(kind.steps), 10 * ki + 3)
        batch = _balanced(per_kind, len(kind.batches), 10 * ki + 4)
        for fi, family in enumerate(META_FAMILIES):
            for j in range(runs_per_cell):
                i = fi * runs_per_cell + j
                hidden, act = kind.variants[variant[i]]
                length = kind.steps[steps[i]]
                runs.append(
                    RunSpec(
                        dataset=kind.datasets[data[i]],
                        hidden=hidden,
                        act=act,
                        optimizer=META_FAMILIES[family],
                        opt_kwargs=kind.opts[family][j % 3],
                        schedule=SCHEDULES[(j + fi + ki) % len(SCHEDULES)],
                        steps=length,
                        batch=kind.batches[batch[i]],
                        record_every=length // _META_SNAPSHOTS,
                        init_seed=1000 + n,
                        data_seed=2000 + n,
                        arch=arch,
                    )
                )
                n += 1
    return runs


def _suite_meta_long(scale: int = 3) -> list[RunSpec]:
    """The ``meta`` suite's runs ``scale`` times as long, each recorded at the interval the callback would use.

    Same cells, data, widths, settings and seeds as ``meta``; run lengths 900 to 2700 steps (as the benchmark's
    runs, not 300 to 900) and a snapshot every :func:`~lightning_gfm.budget.auto_schedule` interval (about 60 a
    run), so that the meta field trains on velocities averaged over the stretches the callback's window sees.
    """
    out = []
    for r in _suite_meta():
        steps = scale * r.steps
        out.append(replace(r, steps=steps, record_every=auto_schedule(steps)[0]))
    return out


def _suite_meta_smoke() -> list[RunSpec]:
    # one short run of each kind, the optimizer family rotating with the kind; each cell's second run, which has
    # the family's higher learning rate, so that the loss falls within the few steps
    runs = _suite_meta()
    per_kind = len(runs) // len(_META_KINDS)
    per_family = per_kind // len(META_FAMILIES)
    pick = [runs[k * per_kind + (k % len(META_FAMILIES)) * per_family + 1] for k in range(len(_META_KINDS))]
    return [replace(r, steps=120, record_every=4, batch=min(r.batch, 32)) for r in pick]


#: named sets of runs; ``pretrain`` is what the shipped field was trained on; the ``heldout-*`` suites differ
#: from it along one axis each; ``meta`` is the broad meta-training corpus (module docstring), ``meta-smoke``
#: one short run of each of its kinds. None uses the acceleration benchmark's data (mnist1d, digits, diabetes,
#: breast cancer in ``meta``, the stdlib text of its language models).
SUITES: dict[str, Callable[[], list[RunSpec]]] = {
    "pretrain": _suite_pretrain,
    "heldout-init": _suite_heldout_init,
    "heldout-arch": _suite_heldout_arch,
    "heldout-opt": _suite_heldout_opt,
    "smoke": _suite_smoke,
    "meta": _suite_meta,
    "meta-long": _suite_meta_long,
    "meta-smoke": _suite_meta_smoke,
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
