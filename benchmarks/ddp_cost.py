"""Per-rank cost of one GFM jump attempt (fit + backtest + forecast) with 1 and 2 DDP ranks, CPU, gloo.

Every rank builds the same window (a real Adam trajectory of an MLP of about 1.3M parameters), then runs the
three phases exactly as ``GFMCallback.forecast_path`` does under DDP: each rank fits on, backtests and
forecasts its own slice of the scalars (:class:`lightning_gfm.distributed.Shard`) and the path is gathered.
One torch thread per rank. Prints a markdown table.

    python benchmarks/ddp_cost.py --ranks 1 2
"""

from __future__ import annotations

import argparse
import datetime
import os
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from lightning_gfm.distributed import Shard, fit_message_size
from lightning_gfm.dynamics import dynamics_for, future_learning_rates, lr_by_step, take_snapshot
from lightning_gfm.flow.field import FieldConfig, GradientField
from lightning_gfm.flow.matching import fit_field
from lightning_gfm.flow.window import Window
from lightning_gfm.forecast import backtest_error, forecast
from lightning_gfm.params import ParamSpec
from lightning_gfm.trajectory import TrajectoryBuffer


def build_window(args):
    """The same Adam trajectory on every rank: ``args.window`` snapshots, one every ``args.every`` steps."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(784, args.width), torch.nn.ReLU(), torch.nn.Linear(args.width, 512), torch.nn.ReLU(),
        torch.nn.Linear(512, 10),
    )  # fmt: skip
    x, y = torch.randn(512, 784), torch.randint(0, 10, (512,))
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    spec = ParamSpec.from_module(model, opt)
    dyn = dynamics_for(opt, spec)
    buf = TrajectoryBuffer(args.window)
    for s in range(1, args.window * args.every + 1):
        i = torch.randint(0, 512, (64,))
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x[i]), y[i]).backward()
        opt.step()
        if s % args.every == 0:
            buf.append(take_snapshot(opt, spec, dyn.state_names, s))
    return Window.from_buffer(buf, spec, dyn.state_names), dyn, opt


def worker(rank, world, init_file, args, out):
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"file://{init_file}", rank=rank, world_size=world, timeout=datetime.timedelta(minutes=20)
    )
    win, dyn, opt = build_window(args)
    shard = Shard.current(win.P)
    torch.manual_seed(0)
    field = GradientField(FieldConfig(span=float(args.span)))
    field_opt = torch.optim.Adam(field.parameters(), lr=3e-3)
    horizons = [round(args.horizon * (i + 1) / args.candidates) for i in range(args.candidates)]
    lr_steps = lr_by_step(future_learning_rates(opt, None, 0), horizons[-1], 1)
    dist.barrier()
    c0, t0 = time.process_time(), time.perf_counter()
    with shard.phase("fit", fit_message_size(field)):
        fit_field(field, field_opt, win, dyn, steps=args.fit_steps, batch=shard.batch(args.fit_batch),
                  seed=shard.seed(0), index_range=shard.index_range, grad_sync=shard.grad_sync)  # fmt: skip
    t1 = time.perf_counter()
    prior = GradientField(FieldConfig(span=float(args.span)))
    for candidate in (field, prior):
        with shard.phase("backtest", 2):
            backtest_error(candidate, win, dyn, args.backtest, "rk4", **shard.backtest_kwargs)
    t2 = time.perf_counter()
    with shard.phase("forecast", 0):
        path = forecast(field, win, dyn, lr_steps, horizons, solver="rk4", index=shard.index)
    path = shard.gather(path)
    t3, c3 = time.perf_counter(), time.process_time()
    assert path.weights.shape == (len(horizons) + 1, win.P)
    out[rank] = {"P": win.P, "share": (shard.index_range or (0, win.P)), "fit": t1 - t0, "backtest": t2 - t1,
                 "forecast": t3 - t2, "cpu": c3 - c0}  # fmt: skip
    dist.destroy_process_group()


def measure(world, args):
    with tempfile.TemporaryDirectory() as tmp, mp.Manager() as manager:
        out = manager.dict()
        mp.start_processes(
            worker, args=(world, os.path.join(tmp, "init"), args, out), nprocs=world, start_method="spawn"
        )
        return [out[r] for r in range(world)]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ranks", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--width", type=int, default=1024)
    parser.add_argument("--window", type=int, default=12)
    parser.add_argument("--every", type=int, default=10)
    parser.add_argument("--span", type=int, default=12)
    parser.add_argument("--fit-steps", type=int, default=100)
    parser.add_argument("--fit-batch", type=int, default=4096)
    parser.add_argument("--backtest", type=int, default=3)
    parser.add_argument("--horizon", type=int, default=40)
    parser.add_argument("--candidates", type=int, default=4)
    args = parser.parse_args()
    rows = []
    for world in args.ranks:
        ranks = measure(world, args)
        slowest = max(ranks, key=lambda r: r["fit"] + r["backtest"] + r["forecast"])
        rows.append((world, ranks[0]["P"], ranks[0]["share"], slowest))
    print(
        f"model: {rows[0][1]:,} parameters (Adam); fit {args.fit_steps} steps x {args.fit_batch} scalars in all; "
        f"backtest {args.backtest} snapshots back (field and prior); forecast to {args.horizon} steps, "
        f"{args.candidates} points, rk4; 1 torch thread per rank; wall-clock seconds of the slowest rank, and its "
        "CPU seconds (all its threads), which competing load on the machine inflates less\n"
    )
    print(
        "| ranks | scalars per rank | fit s | backtest s | forecast+gather s | attempt s | vs 1 rank | attempt CPU s |"
    )
    print("|---:|---:|---:|---:|---:|---:|---:|---:|")
    base = None
    for world, _, (lo, hi), r in rows:
        total = r["fit"] + r["backtest"] + r["forecast"]
        base = base or total
        print(f"| {world} | {hi - lo:,} | {r['fit']:.2f} | {r['backtest']:.2f} | {r['forecast']:.2f} | "
              f"{total:.2f} | {base / total:.2f}x | {r['cpu']:.2f} |")  # fmt: skip


if __name__ == "__main__":
    main()
