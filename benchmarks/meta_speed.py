"""Forecast throughput of the meta-trained field on the CPU (issue 15's target: 10M parameters/s on 2 cores).

    python -m benchmarks.meta_speed [--params 10M] [--threads 1 2] [--field pretrained:meta]

A plain stack of ``nn.Linear`` layers (synthetic data, no download) is trained a few Adam steps, recording a
snapshot every step into a :class:`~lightning_gfm.trajectory.TrajectoryBuffer` as the callback does; then the
callback's own forecast path for the meta field is timed over every scalar, each part on its own: the lean window
(:meth:`~lightning_gfm.flow.window.Window.lean_from_buffer`, no copy of the buffer; the callback builds it for the
prior in any case) and :func:`~lightning_gfm.flow.meta.meta_forecast` to four horizons, with a constant and with a
cosine learning-rate schedule ahead (the latter integrates one optimizer step at a time). Median of
``--repeats``. Markdown to stdout.
"""

from __future__ import annotations

import argparse
import math
import platform
import statistics
import time

import torch
from torch import nn

from lightning_gfm.dynamics import dynamics_for
from lightning_gfm.fields import load_field, resolve_field
from lightning_gfm.flow.meta import family_of, meta_forecast
from lightning_gfm.flow.window import Window
from lightning_gfm.params import ParamSpec
from lightning_gfm.trajectory import TrajectoryBuffer

SIZES = {"1M": (256, 15), "10M": (1024, 10), "100M": (2048, 24)}


def window_of(size: str, snapshots: int = 10, seed: int = 0):
    """A lean window of ``snapshots`` Adam steps of the ``size`` Linear stack, its spec and dynamics."""
    width, depth = SIZES[size]
    torch.manual_seed(seed)
    model = nn.Sequential(*(nn.Linear(width, width) for _ in range(depth)))
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    spec = ParamSpec.from_module(model, opt)
    dyn = dynamics_for(opt, spec)
    buf = TrajectoryBuffer(snapshots)
    x, y = torch.randn(32, width), torch.randn(32, width) * 0.1
    for step in range(1, snapshots + 1):
        opt.zero_grad(set_to_none=True)
        nn.functional.mse_loss(model(x), y).backward()
        opt.step()
        buf.record(opt, spec, dyn.state_names, step * 20)
    return buf, spec, dyn


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", default="10M", choices=list(SIZES))
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--field", default="pretrained:meta")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    field = load_field(resolve_field(args.field)).eval()
    buf, spec, dyn = window_of(args.params)
    roles = spec.role_index(torch.device("cpu"), torch.uint8)
    horizons, total = [40, 80, 160, 320], 4000
    constant = torch.full((horizons[-1] + 1, 1), 1e-3, dtype=torch.float64)
    cosine = 1e-3 * (1 + torch.cos(math.pi * (200 + torch.arange(horizons[-1] + 1.0)) / total)).double().unsqueeze(1)
    print(f"{spec.numel:,} parameters, {platform.processor() or platform.machine()}, torch {torch.__version__}")
    print(
        "| threads | schedule ahead | lean window (s) | meta forecast (s) | forecast parameters/s | both |\n"
        "|---|---|---|---|---|---|"
    )
    for threads in args.threads:
        torch.set_num_threads(threads)
        for name, lr in (("constant", constant), ("cosine", cosine)):
            windows, forecasts = [], []
            for _ in range(args.repeats):
                start = time.perf_counter()
                win = Window.lean_from_buffer(buf, spec, total)  # the callback builds it for the prior anyway
                mid = time.perf_counter()
                meta_forecast(field, win, family_of(dyn), lr, horizons, total, roles, chunk_size=1 << 16)
                windows.append(mid - start)
                forecasts.append(time.perf_counter() - mid)
            w, f = statistics.median(windows), statistics.median(forecasts)
            print(
                f"| {threads} | {name} | {w:.2f} | {f:.2f} | {spec.numel / f / 1e6:.1f}M | "
                f"{spec.numel / (w + f) / 1e6:.1f}M |"
            )
    return 0


if __name__ == "__main__":
    main()
