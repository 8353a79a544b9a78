"""GPU check: CUDA tests, end-to-end Lightning runs on one GPU, forecast throughput at 10M / 100M / 1B, snapshots.

    python -m benchmarks.gpu_check [--out-dir benchmarks/results/gpu] [--time-limit 540]
    python -m benchmarks.gpu_check --dry-run        # CPU, tiny sizes: checks the script itself

Phases, each skipped (and said so in the result) once ``--time-limit`` seconds are spent, so the whole script ends
within the limit plus one phase's guard:

1. ``pytest -q -k "cuda or gpu"`` on the test suite (a subprocess with its own timeout);
2. a few ``Trainer(accelerator="gpu", devices=1)`` runs of a small model with :class:`~lightning_gfm.GFMCallback`;
3. forecast throughput on a synthetic Adam window (bf16 storage, ``--window`` snapshots) of each size, the prior
   over every scalar and a fitted field over a subset, with the peak GPU memory;
4. snapshot overhead of a real ``nn.Linear`` stack trained with Adam on the GPU, into CPU and GPU buffers.

Writes ``<date>_<device>.md`` and ``.json`` into ``--out-dir`` with the date, ``torch.cuda.get_device_name()``
and the command. Without CUDA (and without ``--dry-run``) it exits with status 2 and says why.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
SIZES = {"10M": 10_000_000, "100M": 100_000_000, "1B": 1_000_000_000}
DRY_SIZES = {"10k": 10_000, "50k": 50_000}


class Clock:
    """Wall-clock budget shared by the phases."""

    def __init__(self, limit: float) -> None:
        self.start, self.limit = time.perf_counter(), limit

    @property
    def left(self) -> float:
        return self.limit - (time.perf_counter() - self.start)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device: torch.device, repeats: int):
    """Median seconds of ``repeats`` synchronised calls, and the last result."""
    times, out = [], None
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        out = fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times), out


def run_tests(clock: Clock, dry_run: bool) -> dict:
    """Phase 1: the suite's CUDA-relevant tests."""
    if dry_run:
        return {"status": "skipped (dry run)"}
    timeout = max(10.0, min(240.0, clock.left - 300))
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-k", "cuda or gpu", "tests"]
    try:
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"status": f"timed out after {timeout:.0f} s", "command": shlex.join(cmd)}
    tail = (proc.stdout + proc.stderr).strip().splitlines()[-1:] or [""]
    return {"status": "passed" if proc.returncode in (0, 5) else "FAILED", "returncode": proc.returncode,
            "summary": tail[0], "command": shlex.join(cmd)}  # fmt: skip


def run_lightning(clock: Clock, device: torch.device, dry_run: bool) -> list[dict]:
    """Phase 2: end-to-end fits with GFMCallback on one device."""
    import lightning.pytorch as pl

    from lightning_gfm import GFMCallback

    class Regression(pl.LightningModule):
        def __init__(self, optimizer: str) -> None:
            super().__init__()
            self.net = nn.Sequential(nn.Linear(32, 64), nn.Tanh(), nn.Linear(64, 1))
            self.optimizer = optimizer

        def training_step(self, batch, _):
            x, y = batch
            return nn.functional.mse_loss(self.net(x), y)

        def validation_step(self, batch, _):
            x, y = batch
            self.log("val_loss", nn.functional.mse_loss(self.net(x), y))

        def configure_optimizers(self):
            if self.optimizer == "adam":
                return torch.optim.Adam(self.parameters(), lr=3e-3)
            return torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9)

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2048, 32, generator=gen)
    y = (x[:, :8].sum(1, keepdim=True)).sin()
    data = torch.utils.data.TensorDataset(x, y)
    results = []
    runs = [("adam", "32-true"), ("momentum", "32-true")]
    if not dry_run:  # Lightning refuses float16 mixed precision on a CPU
        runs += [("adam", "16-mixed"), ("adam", "bf16-mixed")]
    for optimizer, precision in runs:
        if clock.left < 60:
            results.append({"optimizer": optimizer, "precision": precision, "status": "skipped (time limit)"})
            continue
        pl.seed_everything(0, verbose=False)
        model = Regression(optimizer)
        # overhead=None: these short runs check that attempts work on the device, not whether they would pay
        cb = GFMCallback(record_every=4, window=16, jump_every=40, fit_steps=30, overhead=None)
        trainer = pl.Trainer(
            accelerator="cpu" if dry_run else "gpu",
            devices=1,
            max_steps=100 if dry_run else 200,
            precision=precision,
            val_check_interval=20,
            check_val_every_n_epoch=None,
            callbacks=[cb],
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            default_root_dir=os.environ.get("TMPDIR", "/tmp"),
        )
        loader = torch.utils.data.DataLoader(data, batch_size=64, shuffle=True)
        start = time.perf_counter()
        trainer.fit(model, loader, torch.utils.data.DataLoader(data, batch_size=512))
        on = {str(p.device) for p in model.parameters()}
        results.append(
            {
                "optimizer": optimizer,
                "precision": precision,
                "status": "ok",
                "seconds": round(time.perf_counter() - start, 2),
                "jumps": len(cb.jumps),
                "accepted": sum(j.accepted for j in cb.jumps),
                "param_device": ",".join(sorted(on)),
            }
        )
    return results


def synthetic_window(n: int, window: int, device: torch.device, dtype: torch.dtype):
    """An Adam window of ``n`` scalars built from synthetic snapshots (a drifting random walk), and its dynamics."""
    from lightning_gfm.dynamics import dynamics_for
    from lightning_gfm.flow.window import Window
    from lightning_gfm.params import ParamSpec
    from lightning_gfm.trajectory import Snapshot, TrajectoryBuffer

    holder = nn.Module()
    holder.w = nn.Parameter(torch.zeros(n, device=device))
    opt = torch.optim.Adam(holder.parameters(), lr=1e-3)
    spec = ParamSpec.from_module(holder, opt)
    dyn = dynamics_for(opt, spec)
    gen = torch.Generator(device=device).manual_seed(0)
    grad = torch.randn(n, device=device, generator=gen)
    w, m, v = torch.randn(n, device=device, generator=gen) * 0.05, grad * 0.1, grad * grad * 1e-3
    buf = TrajectoryBuffer(window, device=device, dtype=dtype)
    for k in range(window):
        buf.append(Snapshot(10 * (k + 1), w, {"exp_avg": m, "exp_avg_sq": v}, torch.tensor([1e-3]), 10 * (k + 1)))
        w = w - 1e-2 * (m / (v.sqrt() + 1e-8))
        m = 0.35 * m + 0.65 * grad * (1 + 0.1 * torch.randn(n, device=device, generator=gen))
        v = 0.99 * v + 0.01 * grad * grad
    del w, m, v, grad
    win = Window.from_buffer(buf, spec, dyn.state_names)
    del buf, holder, opt
    return win, dyn


def run_forecast(clock: Clock, device: torch.device, sizes: dict, args) -> list[dict]:
    """Phase 3: forecast throughput and peak memory per size."""
    from lightning_gfm.flow.field import FieldConfig, GradientField
    from lightning_gfm.flow.matching import fit_field
    from lightning_gfm.forecast import forecast

    rows = []
    for name, n in sizes.items():
        if clock.left < (120 if n >= 10**9 else 45):
            rows.append({"size": name, "status": "skipped (time limit)"})
            continue
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
        dtype = torch.bfloat16
        start = time.perf_counter()
        win, dyn = synthetic_window(n, args.window, device, dtype)
        build = time.perf_counter() - start
        lr_steps = torch.full((args.horizon + 1, 1), 1e-3, dtype=torch.float64)
        prior = GradientField(FieldConfig(span=12)).to(device)
        chunk = args.chunk_size

        def go(field, index=None, win=win, dyn=dyn, lr_steps=lr_steps, chunk=chunk):
            return forecast(field, win, dyn, lr_steps, [args.horizon], chunk_size=chunk, device=device, index=index)

        t_prior, path = timed(lambda go=go, prior=prior: go(prior), device, args.repeats if n < 10**9 else 1)
        field = GradientField(FieldConfig(span=12)).to(device)
        fit_field(
            field, torch.optim.Adam(field.parameters(), 3e-3), win, dyn, steps=20, batch=4096, seed=0, device=device
        )
        subset = torch.arange(min(n, args.fitted_scalars))
        t_fit, _ = timed(lambda field=field, subset=subset, go=go: go(field, subset), device, args.repeats)
        peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan")
        rows.append(
            {
                "size": name,
                "status": "ok" if bool(path.finite().all()) else "non-finite",
                "params": n,
                "window": args.window,
                "storage": str(dtype).removeprefix("torch."),
                "window_build_s": round(build, 3),
                "prior_params_per_s": n / t_prior,
                "fitted_params_per_s": subset.numel() / t_fit,
                "peak_gpu_gib": round(peak, 2),
            }
        )
        del win, dyn, path
    return rows


def run_snapshots(clock: Clock, device: torch.device, widths: dict, repeats: int) -> list[dict]:
    """Phase 4: snapshot cost against the optimizer step of a real Linear stack."""
    from lightning_gfm.dynamics import dynamics_for, take_snapshot
    from lightning_gfm.params import ParamSpec
    from lightning_gfm.trajectory import TrajectoryBuffer

    rows = []
    for name, (width, depth) in widths.items():
        if clock.left < 30:
            rows.append({"size": name, "status": "skipped (time limit)"})
            continue
        torch.manual_seed(0)
        model = nn.Sequential(*[nn.Linear(width, width) for _ in range(depth)]).to(device)
        opt = torch.optim.Adam(model.parameters(), lr=1e-4)
        spec = ParamSpec.from_module(model, opt)
        dyn = dynamics_for(opt, spec)
        x = torch.randn(256, width, device=device)

        def step(model=model, opt=opt, x=x):
            opt.zero_grad(set_to_none=True)
            model(x).square().mean().backward()
            opt.step()

        step()
        t_step, _ = timed(step, device, max(repeats, 5))
        row = {"size": name, "status": "ok", "params": spec.numel, "step_ms": 1e3 * t_step}
        for where, dtype in (("cpu", torch.float32), ("cpu", torch.bfloat16), (device.type, torch.bfloat16)):
            buf = TrajectoryBuffer(4, device=where, dtype=dtype)
            counter = iter(range(1, 10**6))

            def snap(buf=buf, counter=counter, opt=opt, spec=spec, dyn=dyn):
                buf.append(take_snapshot(opt, spec, dyn.state_names, next(counter), buf.device, buf.dtype))

            t_snap, _ = timed(snap, device, repeats)
            row[f"snapshot_{where}_{str(dtype).removeprefix('torch.')}_share"] = t_snap / t_step
        rows.append(row)
        del model, opt
    return rows


def markdown(result: dict) -> str:
    lines = [
        f"# GPU check: {result['device']}",
        "",
        f"Date: {result['date']}  ",
        f"Command: `{result['command']}`  ",
        f"torch {result['torch']}, CUDA {result['cuda']}, dry run: {result['dry_run']}, {result['seconds']:.0f} s",
        "",
        f"Tests: {result['tests']}",
        "",
        "| optimizer | precision | status | seconds | jumps | accepted | param device |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in result["lightning"]:
        lines.append(
            f"| {r['optimizer']} | {r['precision']} | {r['status']} | {r.get('seconds', '')} | {r.get('jumps', '')} | "
            f"{r.get('accepted', '')} | {r.get('param_device', '')} |"
        )
    lines += [
        "",
        "| size | status | window | storage | prior forecast (params/s) | fitted forecast (params/s) "
        "| peak GPU (GiB) |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in result["forecast"]:
        if r["status"] != "ok":
            lines.append(f"| {r['size']} | {r['status']} | | | | | |")
            continue
        lines.append(
            f"| {r['size']} | ok | {r['window']} | {r['storage']} | {r['prior_params_per_s']:.3g} | "
            f"{r['fitted_params_per_s']:.3g} | {r['peak_gpu_gib']} |"
        )
    lines += ["", "| size | step (ms) | snapshot shares of a step (per snapshot) |", "|---|---|---|"]
    for r in result["snapshots"]:
        shares = ", ".join(
            f"{k.removeprefix('snapshot_').removesuffix('_share')}: {v:.1%}"
            for k, v in r.items()
            if k.endswith("_share")
        )
        lines.append(f"| {r['size']} | {r.get('step_ms', float('nan')):.1f} | {shares or r['status']} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dry-run", action="store_true", help="run on the CPU with tiny sizes (checks the script)")
    parser.add_argument("--out-dir", type=Path, default=ROOT / "benchmarks" / "results" / "gpu")
    parser.add_argument("--time-limit", type=float, default=540.0, help="seconds; later phases are skipped past it")
    parser.add_argument("--window", type=int, default=4)
    parser.add_argument("--horizon", type=int, default=30)
    parser.add_argument("--chunk-size", type=int, default=1 << 22)
    parser.add_argument("--fitted-scalars", type=int, default=1 << 24)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--skip-tests", action="store_true")
    args = parser.parse_args(argv)
    if not args.dry_run and not torch.cuda.is_available():
        print(
            "gpu_check: no CUDA device is visible to torch "
            f"(torch {torch.__version__}, CUDA build {torch.version.cuda}). Run it on a machine with an NVIDIA GPU "
            "and a CUDA build of torch, or pass --dry-run to check the script on the CPU.",
            file=sys.stderr,
        )
        return 2
    clock = Clock(args.time_limit)
    device = torch.device("cpu") if args.dry_run else torch.device("cuda", 0)
    if args.dry_run:
        sizes, widths = DRY_SIZES, {"tiny": (64, 2)}
        args.fitted_scalars = min(args.fitted_scalars, 4096)
        args.chunk_size = min(args.chunk_size, 1 << 14)
        args.repeats = 1
    else:
        sizes, widths = SIZES, {"10M": (1024, 10), "100M": (2048, 24)}
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU dry run ({platform.machine()})"
    result = {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "device": name,
        "command": "python -m benchmarks.gpu_check " + shlex.join(sys.argv[1:] if argv is None else argv),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "dry_run": args.dry_run,
    }
    result["tests"] = {"status": "skipped (--skip-tests)"} if args.skip_tests else run_tests(clock, args.dry_run)
    result["lightning"] = run_lightning(clock, device, args.dry_run)
    result["forecast"] = run_forecast(clock, device, sizes, args)
    result["snapshots"] = run_snapshots(clock, device, widths, args.repeats)
    result["seconds"] = time.perf_counter() - clock.start
    args.out_dir.mkdir(parents=True, exist_ok=True)
    stem = f"{datetime.date.today().isoformat()}_{re.sub(r'[^A-Za-z0-9]+', '-', name).strip('-').lower()}"
    (args.out_dir / f"{stem}.json").write_text(json.dumps(result, indent=2) + "\n")
    (args.out_dir / f"{stem}.md").write_text(markdown(result))
    print(markdown(result))
    failed = result["tests"].get("status") == "FAILED" or any(
        r["status"] not in ("ok",) and not r["status"].startswith("skipped") for r in result["forecast"]
    )
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
