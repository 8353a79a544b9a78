"""Scale benchmark on the CPU: snapshot overhead, field fitting, forecast throughput and memory, bf16 storage cost.

    python -m benchmarks.scale [--sizes 10M 100M] [--threads 2] [--out docs/scale.md]

For each size a plain stack of ``nn.Linear`` layers is trained with Adam on synthetic data generated in the
process (no download), recording a snapshot every ``--record-every`` real optimizer steps, then the callback's own
path is replayed: ``Window.from_buffer`` -> ``fit_field`` (the callback's defaults: 100 steps of 4096 scalars, Adam
3e-3) -> ``backtest_error`` -> ``forecast``. Measured:

* snapshot overhead: :meth:`~lightning_gfm.trajectory.TrajectoryBuffer.record` (the callback's path) in float32
  and bfloat16, over the median optimizer step (per snapshot, and amortised over ``--record-every`` steps);
* fitting seconds;
* forecast throughput (tracked scalars per second) of the untrained prior over every scalar and of the fitted field
  over a fixed subset of ``--fitted-scalars`` (the system separates per scalar, so the rate carries over), and the
  peak resident memory the forecast added (Linux ``VmHWM``, reset through ``/proc/self/clear_refs``; falls back
  to ``resource.getrusage`` when that is not available);
* what bfloat16 storage costs: the forecast from a bf16 window against the one from the fp32 window of the same
  run, relative to the forecast move, and each one's backtest error and error against the real future weights.

The window and storage dtype of each size come from :func:`lightning_gfm.memory.plan_memory` with ``--budget-gib``
(the fp32 comparison runs only where fp32 fits). Medians of ``--repeats`` runs. Markdown to stdout and ``--out``.
"""

from __future__ import annotations

import argparse
import datetime
import platform
import resource
import shlex
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

from lightning_gfm.dynamics import dynamics_for, future_learning_rates, lr_by_step
from lightning_gfm.flow.field import FieldConfig, GradientField
from lightning_gfm.flow.matching import fit_field
from lightning_gfm.flow.window import Window
from lightning_gfm.forecast import backtest_error, forecast
from lightning_gfm.memory import estimate_bytes, plan_memory
from lightning_gfm.params import ParamSpec
from lightning_gfm.trajectory import TrajectoryBuffer

#: size name -> (width, depth) of the Linear stack
SIZES = {"1M": (256, 15), "10M": (1024, 10), "100M": (2048, 24)}


def reset_peak() -> bool:
    """Reset the kernel's peak-RSS mark of this process; whether it worked."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _status_bytes(key: str) -> int | None:
    """A ``kB`` field of ``/proc/self/status`` (``"VmHWM"``, ``"VmRSS"``) in bytes; ``None`` where unavailable."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(f"{key}:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def peak_rss() -> int:
    """Peak resident bytes of this process (since the last :func:`reset_peak` where supported)."""
    peak = _status_bytes("VmHWM")
    return peak if peak is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def rss() -> int:
    """Current resident bytes."""
    now = _status_bytes("VmRSS")
    return now if now is not None else peak_rss()


def median_time(fn, repeats: int):
    """Median seconds of ``repeats`` calls of ``fn`` and the last result."""
    times, out = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), out


def build(width: int, depth: int, seed: int) -> tuple[nn.Module, torch.optim.Optimizer]:
    """A plain MLP of ``depth`` ``width x width`` layers and its Adam optimizer."""
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    for _ in range(depth):
        layers += [nn.Linear(width, width), nn.ReLU()]
    model = nn.Sequential(*layers[:-1])
    return model, torch.optim.Adam(model.parameters(), lr=1e-3)


def record(args, size: str, window: int) -> dict:
    """Train, snapshot every ``record_every`` steps into an fp32 and a bf16 buffer, keep the future weights."""
    width, depth = SIZES[size]
    model, opt = build(width, depth, args.seed)
    spec = ParamSpec.from_module(model, opt)
    dyn = dynamics_for(opt, spec)
    gen = torch.Generator().manual_seed(args.seed)
    x = torch.randn(args.batch, width, generator=gen)
    y = torch.randn(args.batch, width, generator=gen) * 0.1
    fp32_fits = args.budget_gib * 2**30 >= estimate_bytes(spec.numel, 2, window, torch.float32, 1 << 12, n_horizons=1)
    buffers = {"bf16": TrajectoryBuffer(window, dtype=torch.bfloat16)}
    if fp32_fits:
        buffers["fp32"] = TrajectoryBuffer(window, dtype=torch.float32)
    step_times, snap_times = [], {k: [] for k in buffers}
    n_steps = window * args.record_every
    future = None
    for step in range(1, n_steps + args.horizon + 1):
        start = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        nn.functional.mse_loss(model(x), y).backward()
        opt.step()
        step_times.append(time.perf_counter() - start)
        if step % args.record_every == 0 and step <= n_steps:
            for name, buf in buffers.items():
                start = time.perf_counter()
                buf.record(opt, spec, dyn.state_names, step)
                snap_times[name].append(time.perf_counter() - start)
        if step == n_steps + args.horizon:
            future = spec.flatten().clone()
    del model
    times = dict(step_times=step_times, snap_times=snap_times)
    return dict(spec=spec, opt=opt, dyn=dyn, buffers=buffers, future=future, **times)


def storage(args, row: dict, paths: dict, name: str, rec: dict, lr_steps, field_cfg, subset) -> None:
    """The callback's path on one stored window: build it, forecast with the prior, fit, forecast fitted."""
    spec, dyn = rec["spec"], rec["dyn"]
    buf = rec["buffers"].pop(name)
    start = time.perf_counter()
    win = Window.from_buffer(buf, spec, dyn.state_names)
    row[f"window_{name}_s"] = time.perf_counter() - start
    del buf
    prior = GradientField(field_cfg)
    base = rss()
    reset_peak()
    t, path = median_time(lambda: forecast(prior, win, dyn, lr_steps, [args.horizon]), args.repeats)
    row[f"prior_{name}_rate"] = win.P / t
    row[f"prior_{name}_peak_gib"] = (peak_rss() - base) / 2**30
    paths[name] = path.weights[1]
    field = GradientField(field_cfg)
    warm = GradientField(field_cfg)  # the first backward pass of a process pays one-off set-up costs
    fit_field(warm, torch.optim.Adam(warm.parameters(), lr=3e-3), win, dyn, steps=2, batch=4096, seed=0)
    torch.manual_seed(args.seed)
    start = time.perf_counter()
    report = fit_field(field, torch.optim.Adam(field.parameters(), lr=3e-3), win, dyn, steps=100, batch=4096, seed=0)
    row[f"fit_{name}_s"] = time.perf_counter() - start
    row[f"fit_{name}_steps"] = report.steps
    t, fitted = median_time(lambda: forecast(field, win, dyn, lr_steps, [args.horizon], index=subset), args.repeats)
    row[f"fitted_{name}_rate"] = subset.numel() / t
    paths[f"fitted_{name}"] = fitted.weights[1]
    row[f"backtest_{name}"] = backtest_error(prior, win, dyn, 1)
    move = (rec["future"] - win.w[-1]).norm()
    row[f"truth_err_{name}"] = float((paths[name] - rec["future"]).norm() / move)
    paths["anchor"] = win.w[-1].clone()


def measure(args, size: str) -> dict:
    width, depth = SIZES[size]
    n_params = depth * (width * width + width)
    plan = plan_memory(n_params, 2, args.window, int(args.budget_gib * 2**30), n_horizons=1)
    print(f"# {size}: {n_params:,} params, plan {plan}", file=sys.stderr, flush=True)
    rec = record(args, size, plan.window)
    spec, opt = rec["spec"], rec["opt"]
    step = statistics.median(rec["step_times"])
    row = dict(size=size, params=spec.numel, window=plan.window, step_ms=1e3 * step, plan=plan)
    for name, times in rec["snap_times"].items():
        snap = statistics.median(times)
        row[f"snap_{name}_ms"] = 1e3 * snap
        row[f"snap_{name}_share"] = snap / step
        row[f"snap_{name}_amortised"] = snap / (step * args.record_every)
    lr_steps = lr_by_step(future_learning_rates(opt, None, 0), args.horizon, 1)
    field_cfg = FieldConfig(span=float(args.span))
    paths, subset = {}, torch.randperm(spec.numel, generator=torch.Generator().manual_seed(0))[: args.fitted_scalars]
    subset = subset.sort().values
    for name in ("fp32", "bf16"):
        if name in rec["buffers"]:
            storage(args, row, paths, name, rec, lr_steps, field_cfg, subset)
    if "fp32" in paths:
        anchor = paths["anchor"]
        ref = paths["fp32"]
        row["bf16_vs_fp32"] = float((paths["bf16"] - ref).norm() / (ref - anchor).norm())
        ref = paths["fitted_fp32"]
        row["bf16_vs_fp32_fitted"] = float(
            (paths["fitted_bf16"] - ref).norm() / (ref - anchor[subset]).norm().clamp_min(1e-30)
        )
    return row


def fmt(row: dict, key: str, spec: str, scale: float = 1.0) -> str:
    return format(row[key] * scale, spec) if key in row else "n/a (fp32 does not fit the budget)"


def steady(args, size: str) -> dict:
    """Snapshot cost once the ring has wrapped: record ``window`` snapshots, then ``--steady`` more, timed."""
    width, depth = SIZES[size]
    model, opt = build(width, depth, args.seed)
    spec = ParamSpec.from_module(model, opt)
    dyn = dynamics_for(opt, spec)
    gen = torch.Generator().manual_seed(args.seed)
    x = torch.randn(args.batch, width, generator=gen)
    y = torch.randn(args.batch, width, generator=gen) * 0.1
    dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16}
    buffers = {name: TrajectoryBuffer(args.window, dtype=dtype) for name, dtype in dtypes.items()}
    step_times, snap_times = [], {name: [] for name in buffers}
    for step in range(1, args.window + args.steady + 1):
        start = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        nn.functional.mse_loss(model(x), y).backward()
        opt.step()
        step_times.append(time.perf_counter() - start)
        for name, buf in buffers.items():
            start = time.perf_counter()
            buf.record(opt, spec, dyn.state_names, step)
            if step > args.window:  # the ring has wrapped: this overwrites the oldest slot
                snap_times[name].append(time.perf_counter() - start)
    row = {"size": size, "threads": args.threads, "step_ms": 1e3 * statistics.median(step_times)}
    for name, times in snap_times.items():
        row[f"{name}_ms"] = 1e3 * statistics.median(times)
    return row


def steady_table(rows: list[dict]) -> str:
    out = [
        "| size | threads | step (ms) | snapshot fp32, ring wrapped (ms) | snapshot bf16, ring wrapped (ms) |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        out.append(f"| {r['size']} | {r['threads']} | {r['step_ms']:.1f} | {r['fp32_ms']:.1f} | {r['bf16_ms']:.1f} |")
    return "\n".join(out)


def tables(rows: list[dict], args) -> str:
    out = [
        "| size | tracked params | window | step (ms) | snapshot fp32 (ms) | share of a step | amortised "
        f"(every {args.record_every}) | snapshot bf16 (ms) | share of a step | amortised |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        out.append(
            f"| {r['size']} | {r['params']:,} | {r['window']} | {r['step_ms']:.1f} | {fmt(r, 'snap_fp32_ms', '.1f')} | "
            f"{fmt(r, 'snap_fp32_share', '.1%')} | {fmt(r, 'snap_fp32_amortised', '.2%')} | "
            f"{r['snap_bf16_ms']:.1f} | {r['snap_bf16_share']:.1%} | {r['snap_bf16_amortised']:.2%} |"
        )
    out += [
        "",
        "| size | storage | Window.from_buffer (s) | fit_field 100x4096 (s) | prior forecast (params/s) | "
        "forecast peak RSS added (GiB) | fitted forecast (params/s) |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        for name in ("fp32", "bf16"):
            if f"prior_{name}_rate" not in r:
                out.append(f"| {r['size']} | {name} | n/a (does not fit the budget) | | | | |")
                continue
            out.append(
                f"| {r['size']} | {name} | {r[f'window_{name}_s']:.2f} | {r[f'fit_{name}_s']:.2f} | "
                f"{r[f'prior_{name}_rate']:.3g} | {r[f'prior_{name}_peak_gib']:.2f} | {r[f'fitted_{name}_rate']:.3g} |"
            )
    out += [
        "",
        f"| size | bf16 vs fp32 forecast, prior (rel. to the move) | same, fitted field | backtest fp32 | "
        f"backtest bf16 | error vs real weights at +{args.horizon}, fp32 | same, bf16 |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        out.append(
            f"| {r['size']} | {fmt(r, 'bf16_vs_fp32', '.2e')} | {fmt(r, 'bf16_vs_fp32_fitted', '.2e')} | "
            f"{fmt(r, 'backtest_fp32', '.3f')} | {r['backtest_bf16']:.3f} | {fmt(r, 'truth_err_fp32', '.3f')} | "
            f"{r['truth_err_bf16']:.3f} |"
        )
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", nargs="+", default=["10M", "100M"], choices=list(SIZES))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--window", type=int, default=8, help="window wanted; plan_memory may shrink it")
    parser.add_argument("--budget-gib", type=float, default=13.0, help="GFM's memory budget for plan_memory")
    parser.add_argument("--record-every", type=int, default=10)
    parser.add_argument("--horizon", type=int, default=30)
    parser.add_argument("--span", type=int, default=12)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--fitted-scalars", type=int, default=1 << 20)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=None, help="markdown file to write (e.g. docs/scale.md)")
    parser.add_argument(
        "--steady", type=int, default=0, help="only time this many snapshots after the ring has wrapped (median)"
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    rows = []
    for size in args.sizes:
        rows.append(steady(args, size) if args.steady else measure(args, size))
        print(steady_table(rows) if args.steady else tables(rows, args), file=sys.stderr, flush=True)
    text = steady_table(rows) if args.steady else tables(rows, args)
    command = "python -m benchmarks.scale " + shlex.join(sys.argv[1:] if argv is None else argv)
    header = (
        f"Command: `{command}`  \nDate: {datetime.date.today().isoformat()}  \n"
        f"Machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, "
        f"torch {torch.__version__}, Python {platform.python_version()}  \n"
        f"Memory: peak resident set size added during the forecast "
        f"({'VmHWM reset through /proc/self/clear_refs' if reset_peak() else 'resource.getrusage, process peak'})."
    )
    print(header + "\n\n" + text)
    if args.out is not None:
        args.out.write_text(header + "\n\n" + text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
