"""GFM's peak extra memory at its defaults, on real Lightning fits of 1M to 100M parameters (issue: bounded memory).

    python -m benchmarks.memory [--sizes 1M 17M 67M 100M] [--optimizers adam sgd] [--steps 48] [--out PATH]

Each (size, optimizer) trains a stack of ``nn.Linear`` layers on synthetic data generated in the process (no
download) for ``--steps`` optimizer steps, twice, each in a fresh process: without GFM and with ``GFMCallback()`` at
its defaults (which plan their memory from the machine; the default schedule attempts a jump every sixth of the run).
Measured per process: the peak resident memory (Linux ``VmHWM``); GFM's extra memory is the difference, reported in
GiB and as a multiple of the model and its optimizer state, with the plan GFM chose (window, dtype, budget and
where it came from), its estimate, the jump attempts made, and whether GFM switched itself off.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shlex
import subprocess
import sys
from pathlib import Path

#: size name -> (width, depth) of the Linear stack (width x width weights plus biases per layer)
SIZES = {"1M": (256, 15), "17M": (1024, 16), "67M": (2048, 16), "100M": (2048, 24)}
DEFAULT_OUT = "benchmarks/results/memory.json"


def _child(size: str, optimizer: str, gfm: bool, steps: int) -> dict:
    """One fit in this process; returns its measurements (run through ``--child``)."""
    import lightning.pytorch as pl
    import torch
    from torch import nn

    from benchmarks.scale import peak_rss
    from lightning_gfm import GFMCallback

    torch.set_num_threads(2)
    width, depth = SIZES[size]

    class Stack(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = nn.Sequential(*[nn.Linear(width, width) for _ in range(depth)])
            gen = torch.Generator().manual_seed(0)
            self.x = torch.randn(64, width, generator=gen)
            self.y = torch.randn(64, width, generator=gen)

        def training_step(self, batch, batch_idx):
            x, y = batch
            return nn.functional.mse_loss(self.net(x) / depth, y)

        def validation_step(self, batch, batch_idx):
            x, y = batch
            self.log("val_loss", nn.functional.mse_loss(self.net(x) / depth, y))

        def _loader(self):
            data = torch.utils.data.TensorDataset(self.x, self.y)
            return torch.utils.data.DataLoader(data, batch_size=4)

        def train_dataloader(self):
            return self._loader()

        def val_dataloader(self):
            return self._loader()

        def configure_optimizers(self):
            if optimizer == "adam":
                return torch.optim.Adam(self.parameters(), lr=1e-4)
            return torch.optim.SGD(self.parameters(), lr=1e-2)

    pl.seed_everything(0, verbose=False)
    model = Stack()
    n = sum(p.numel() for p in model.parameters())
    callbacks = [GFMCallback()] if gfm else []
    trainer = pl.Trainer(
        max_steps=steps,
        limit_val_batches=0,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        callbacks=callbacks,
    )
    trainer.fit(model)
    row = {"size": size, "optimizer": optimizer, "gfm": gfm, "n_params": n, "peak_rss": peak_rss()}
    if gfm:
        cb = callbacks[0]
        plan = cb.memory_plan
        row |= {
            "jumps": len(cb.jumps),
            "accepted": sum(j.accepted for j in cb.jumps),
            "inactive_reason": cb.inactive_reason,
            "plan": None
            if plan is None
            else {
                "window": plan.window,
                "dtype": str(plan.dtype).replace("torch.", ""),
                "estimated_bytes": plan.estimated_bytes,
                "budget_bytes": plan.budget_bytes,
                "lean": plan.lean,
                "source": plan.source,
            },
        }
    return row


def run(sizes, optimizers, steps: int, out: Path, log=print) -> dict:
    rows = []
    for size in sizes:
        for optimizer in optimizers:
            pair = {}
            for gfm in (False, True):
                cmd = [sys.executable, "-m", "benchmarks.memory", "--child", size, optimizer, str(int(gfm)), str(steps)]
                env = os.environ | {"PYTHONWARNINGS": "ignore"}
                done = subprocess.run(cmd, capture_output=True, text=True, env=env)
                if done.returncode != 0:
                    raise RuntimeError(f"{size} {optimizer} gfm={gfm} failed:\n{done.stderr[-3000:]}")
                pair[gfm] = json.loads(done.stdout.strip().splitlines()[-1])
            base, with_gfm = pair[False], pair[True]
            states = 2 if optimizer == "adam" else 0
            model_opt = base["n_params"] * 4 * (1 + states)
            extra = with_gfm["peak_rss"] - base["peak_rss"]
            row = with_gfm | {
                "baseline_peak_rss": base["peak_rss"],
                "extra_bytes": extra,
                "model_opt_bytes": model_opt,
                "extra_over_model_opt": extra / model_opt,
            }
            rows.append(row)
            plan = row["plan"] or {}
            log(
                f"{size} {optimizer}: extra {extra / 2**30:.2f} GiB = {row['extra_over_model_opt']:.2f}x model+opt; "
                f"plan {plan.get('window')} x {plan.get('dtype')} "
                f"(estimate {plan.get('estimated_bytes', 0) / 2**30:.2f} GiB "
                f"of {plan.get('budget_bytes', 0) / 2**30:.2f}); jumps {row['jumps']}; "
                f"inactive: {row['inactive_reason']}"
            )
    result = {
        "command": " ".join(
            shlex.quote(p)
            for p in [
                "python",
                "-m",
                "benchmarks.memory",
                "--sizes",
                *sizes,
                "--optimizers",
                *optimizers,
                "--steps",
                str(steps),
            ]
        ),
        "date": datetime.date.today().isoformat(),
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count()},
        "rows": rows,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    return result


def table(result: dict) -> str:
    """Markdown table of a result."""
    lines = [
        "| model | optimizer | plan (window x dtype, layout) | budget (source) | estimate | measured extra peak RSS | "
        "x model+optimizer | jump attempts |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        plan = r["plan"]
        if r["inactive_reason"] or plan is None:
            what = "GFM inactive: plan does not fit"
            budget = estimate = "-"
        else:
            what = f"{plan['window']} x {plan['dtype']}, {'lean' if plan['lean'] else 'full'}"
            budget = f"{plan['budget_bytes'] / 2**30:.2f} GiB ({plan['source'].split(':')[0]})"
            estimate = f"{plan['estimated_bytes'] / 2**30:.2f} GiB"
        lines.append(
            f"| {r['n_params'] / 1e6:.1f}M | {r['optimizer']} | {what} | {budget} | {estimate} | "
            f"{r['extra_bytes'] / 2**30:.2f} GiB | {r['extra_over_model_opt']:.2f} | {r['jumps']} |"
        )
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--child", nargs=4, metavar=("SIZE", "OPT", "GFM", "STEPS"), help=argparse.SUPPRESS)
    parser.add_argument("--sizes", nargs="+", default=list(SIZES), choices=list(SIZES))
    parser.add_argument("--optimizers", nargs="+", default=["adam", "sgd"], choices=["adam", "sgd"])
    parser.add_argument("--steps", type=int, default=48)
    parser.add_argument("--out", default=DEFAULT_OUT)
    args = parser.parse_args(argv)
    if args.child:
        size, opt, gfm, steps = args.child
        print(json.dumps(_child(size, opt, bool(int(gfm)), int(steps))))
        return
    result = run(args.sizes, args.optimizers, args.steps, Path(args.out))
    print(table(result))


if __name__ == "__main__":
    main()
