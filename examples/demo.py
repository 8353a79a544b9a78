"""Gradient Flow Matching on a small real model: same run with and without ``GFMCallback``.

A 64-128-10 MLP learns scikit-learn's bundled 8x8 digits (nothing is downloaded). The data is split once,
independently of ``--seed``: 1100 train / 348 validation / 349 test. Both runs share the seed, hence the same
initial weights and the same order of training batches; they differ only by the callback.

Validation runs every 25 optimizer steps. The *target* is the baseline's final validation loss, taken as the
mean of its last 3 evaluations (a single evaluation is noisy). For each run the script reports the first
evaluation at which validation loss reached the target (in optimizer steps and in wall-clock seconds since
fit start; GFM's recording, fitting, forecasting and candidate evaluations are all inside that clock), the
final validation loss, and, on the test split that neither run's validation (nor GFM's jump decisions) ever
sees, the final test loss and accuracy.

Usage::

    python examples/demo.py                 # default budget (~1 minute on 2 CPU cores)
    python examples/demo.py --quick         # smoke test
    python examples/demo.py --wandb         # also log both runs to an offline W&B run under --out

Torch runs on one CPU thread by default (``--threads``): this model is far too small to gain from more, and on
a machine that is busy with anything else, torch's default of one thread per core made the same demo 5-10x
slower (measured: baseline fit 29 s with 2 threads next to two other jobs, 2.5 s with 1 thread).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

try:
    from lightning_gfm import GFMCallback
except ImportError:  # running from a checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from lightning_gfm import GFMCallback

VAL_EVERY = 25  # optimizer steps between validations
TARGET_LAST = 3  # the target averages the baseline's last this-many validation losses

# Settings used by the demo's GFM run (see GFMCallback's docstring for every option).
GFM_SETTINGS: dict[str, Any] = dict(
    eval_batches=3,  # the whole 348-sample validation split, 3 batches of 128; everything else: the defaults
    seed=0,
)


# ----------------------------------------------------------------------------------------------- data / model
def digits_splits(split_seed: int = 0):
    """Digits, standardised, shuffled once by ``split_seed``: (train, val, test) as (x, y) tensor pairs."""
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    x = torch.tensor(x, dtype=torch.float32) / 16.0
    x = (x - x.mean(0)) / (x.std(0) + 1e-3)
    y = torch.tensor(y)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(split_seed))
    x, y = x[perm], y[perm]
    return (x[:1100], y[:1100]), (x[1100:1448], y[1100:1448]), (x[1448:], y[1448:])


class DigitsMLP(pl.LightningModule):
    """64-128-10 tanh MLP on digits; ``optimizer`` is ``"adam"`` or ``"momentum"`` (SGD, momentum 0.9)."""

    def __init__(self, optimizer: str = "adam", lr: float = 1e-3, batch_size: int = 64, data_seed: int = 0):
        super().__init__()
        self.save_hyperparameters()
        self.net = nn.Sequential(nn.Linear(64, 128), nn.Tanh(), nn.Linear(128, 10))
        self.train_data, self.val_data, self.test_data = digits_splits()

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = nn.functional.cross_entropy(self(x), y)
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_loss", nn.functional.cross_entropy(self(x), y))

    def configure_optimizers(self):
        hp = self.hparams
        if hp.optimizer == "adam":
            return torch.optim.Adam(self.parameters(), lr=hp.lr)
        if hp.optimizer == "momentum":
            return torch.optim.SGD(self.parameters(), lr=hp.lr, momentum=0.9)
        raise ValueError(f"unknown optimizer {hp.optimizer!r}")

    def train_dataloader(self):
        # A dedicated generator: the order of training batches depends on the seed only.
        gen = torch.Generator().manual_seed(self.hparams.data_seed)
        data = TensorDataset(*self.train_data)
        return DataLoader(data, batch_size=self.hparams.batch_size, shuffle=True, generator=gen)

    def val_dataloader(self):
        return DataLoader(TensorDataset(*self.val_data), batch_size=128)

    @torch.no_grad()
    def test_metrics(self) -> tuple[float, float]:
        """Loss and accuracy on the held-out test split (never used for validation or jump decisions)."""
        was_training = self.training
        self.eval()
        x, y = self.test_data
        logits = self(x.to(self.device)).cpu()
        self.train(was_training)
        return float(nn.functional.cross_entropy(logits, y)), float((logits.argmax(1) == y).float().mean())


class ValHistory(pl.Callback):
    """Validation loss after each evaluation, with the global step and seconds since fit start."""

    def __init__(self, monitor: str = "val_loss"):
        self.monitor = monitor
        self.rows: list[dict[str, float]] = []
        self._t0 = 0.0

    def on_fit_start(self, trainer, pl_module):
        self._t0 = time.perf_counter()

    def on_validation_end(self, trainer, pl_module):
        if trainer.sanity_checking:
            return
        value = trainer.callback_metrics.get(self.monitor)
        if value is not None:
            self.rows.append(
                {"step": trainer.global_step, "seconds": time.perf_counter() - self._t0, "val_loss": float(value)}
            )


# -------------------------------------------------------------------------------------------------- training
def train(
    *,
    seed: int,
    steps: int,
    optimizer: str = "adam",
    lr: float = 1e-3,
    gfm: dict[str, Any] | None = None,
    logger: Any = False,
    root_dir: str | os.PathLike = "runs",
) -> dict[str, Any]:
    """One fit; ``gfm`` = GFMCallback keyword arguments, or ``None`` for the baseline."""
    pl.seed_everything(seed, verbose=False)
    model = DigitsMLP(optimizer=optimizer, lr=lr, data_seed=seed)
    history = ValHistory()
    callbacks: list[pl.Callback] = [history]
    cb = None
    if gfm is not None:
        cb = GFMCallback(**gfm)
        callbacks.append(cb)
    trainer = pl.Trainer(
        default_root_dir=root_dir,
        accelerator="cpu",
        devices=1,
        max_steps=steps,
        max_epochs=-1,
        val_check_interval=VAL_EVERY,
        check_val_every_n_epoch=None,
        num_sanity_val_steps=0,
        logger=logger,
        log_every_n_steps=10,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        deterministic=True,
        callbacks=callbacks,
    )
    start = time.perf_counter()
    trainer.fit(model)
    seconds = time.perf_counter() - start
    test_loss, test_acc = model.test_metrics()
    jumps = [] if cb is None else cb.jumps
    return {
        "gfm": gfm is not None,
        "seed": seed,
        "steps": steps,
        "optimizer": optimizer,
        "lr": lr,
        "fit_seconds": seconds,
        "history": history.rows,
        "final_val_loss": history.rows[-1]["val_loss"] if history.rows else math.nan,
        "test_loss": test_loss,
        "test_acc": test_acc,
        "jumps_attempted": len(jumps),
        "jumps_accepted": sum(j.accepted for j in jumps),
        "jump_seconds": sum(j.seconds for j in jumps),
        "jumps": [
            {
                "step": j.step,
                "accepted": j.accepted,
                "horizon": j.horizon,
                "before": j.metric_before,
                "after": j.metric_after,
                "outcome": j.outcome,
            }
            for j in jumps
        ],
    }


def target_of(history: list[dict[str, float]], last: int = TARGET_LAST) -> float:
    """The target: mean validation loss over the last ``last`` evaluations."""
    tail = [r["val_loss"] for r in history[-last:]]
    return sum(tail) / len(tail) if tail else math.nan


def time_to_target(history: list[dict[str, float]], target: float) -> tuple[int | None, float | None]:
    """(global step, seconds) of the first evaluation with validation loss <= target; (None, None) if never."""
    for r in history:
        if r["val_loss"] <= target:
            return int(r["step"]), float(r["seconds"])
    return None, None


# ------------------------------------------------------------------------------------------------------- CLI
def _wandb_logger(run_dir: Path, name: str):
    """An offline WandbLogger whose files, cache, config and staging data all stay inside ``run_dir``."""
    os.environ["WANDB_DIR"] = str(run_dir)  # runs go to <run_dir>/wandb/offline-run-*
    for var in ("WANDB_CACHE_DIR", "WANDB_CONFIG_DIR", "WANDB_DATA_DIR"):
        path = run_dir / "wandb" / var.removeprefix("WANDB_").removesuffix("_DIR").lower()
        path.mkdir(parents=True, exist_ok=True)
        os.environ[var] = str(path)
    os.environ.setdefault("WANDB_SILENT", "true")
    from lightning.pytorch.loggers import WandbLogger

    return WandbLogger(offline=True, save_dir=str(run_dir), project="lightning-gfm-demo", name=name)


def _fmt(value: float | int | None, spec: str) -> str:
    return "never" if value is None else format(value, spec)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=None, help="optimizer steps per run (default 1500, quick 150)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the initial weights and batch order")
    parser.add_argument("--quick", action="store_true", help="tiny budget, for a smoke test")
    parser.add_argument("--wandb", action="store_true", help="log both runs to an offline W&B run under --out")
    parser.add_argument("--out", default="runs/demo", help="folder for summary.json (and wandb files)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads; 0 keeps torch's default")
    args = parser.parse_args(argv)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    steps = args.steps or (150 if args.quick else 1500)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    warnings.filterwarnings("ignore", ".*does not have many workers.*")
    warnings.filterwarnings("ignore", ".*LeafSpec.*")
    for name in ("lightning.pytorch.utilities.rank_zero", "lightning.pytorch.accelerators.cuda"):
        logging.getLogger(name).setLevel(logging.WARNING)  # "GPU available", tips, "`Trainer.fit` stopped"

    print(
        f"digits MLP 64-128-10, Adam lr 1e-3, batch 64, {steps} steps, seed {args.seed}, "
        f"validation every {VAL_EVERY} steps, {torch.get_num_threads()} torch thread(s)"
    )
    print("GFMCallback(" + ", ".join(f"{k}={v}" for k, v in GFM_SETTINGS.items()) + ")")
    results = {}
    for name, gfm in (("baseline", None), ("gfm", GFM_SETTINGS)):
        logger: Any = False
        if args.wandb:
            logger = _wandb_logger(out, f"{name}-seed{args.seed}")
        results[name] = train(seed=args.seed, steps=steps, gfm=gfm, logger=logger, root_dir=out)
        if args.wandb:
            import wandb

            logger.log_metrics({"test_loss": results[name]["test_loss"], "test_acc": results[name]["test_acc"]})
            wandb.finish()
        print(f"  {name:8s} fit done in {results[name]['fit_seconds']:.1f} s")

    base, gfm = results["baseline"], results["gfm"]
    target = target_of(base["history"])
    for r in results.values():
        r["steps_to_target"], r["seconds_to_target"] = time_to_target(r["history"], target)

    print(f"\ntarget = baseline's final validation loss (mean of its last {TARGET_LAST} evaluations) = {target:.4f}\n")
    header = (
        f"| {'run':8s} | steps to target | seconds to target | final val loss | test loss | test acc | jumps acc/att |"
    )
    print(header)
    print("|" + "|".join("-" * (len(c)) for c in header.split("|")[1:-1]) + "|")
    for name, r in results.items():
        jumps = f"{r['jumps_accepted']}/{r['jumps_attempted']}" if r["gfm"] else "-"
        print(
            f"| {name:8s} | {_fmt(r['steps_to_target'], 'd'):>15s} | {_fmt(r['seconds_to_target'], '.1f'):>17s} "
            f"| {r['final_val_loss']:14.4f} | {r['test_loss']:9.4f} | {r['test_acc']:8.3f} | {jumps:>13s} |"
        )

    print()
    if gfm["steps_to_target"] is None:
        print(f"GFM did NOT reach the baseline's final validation loss ({target:.4f}) within {steps} steps.")
    else:
        ds = base["steps_to_target"] / gfm["steps_to_target"] if gfm["steps_to_target"] else math.inf
        dt = base["seconds_to_target"] / gfm["seconds_to_target"] if gfm["seconds_to_target"] else math.inf
        print(
            f"GFM reached the target at step {gfm['steps_to_target']} vs {base['steps_to_target']} "
            f"({ds:.2f}x fewer steps) and after {gfm['seconds_to_target']:.1f} s vs {base['seconds_to_target']:.1f} s "
            f"({dt:.2f}x, all GFM overhead included)."
        )
    better = "lower" if gfm["test_loss"] < base["test_loss"] else "higher"
    print(
        f"Held-out test: GFM loss {gfm['test_loss']:.4f} ({better} than baseline {base['test_loss']:.4f}), "
        f"accuracy {gfm['test_acc']:.3f} vs {base['test_acc']:.3f}. "
        f"GFM spent {gfm['jump_seconds']:.1f} s in jump attempts."
    )

    summary = {
        "command": " ".join([sys.executable.rsplit("/", 1)[-1], *sys.argv]),
        "steps": steps,
        "seed": args.seed,
        "torch_threads": torch.get_num_threads(),
        "val_every": VAL_EVERY,
        "target": target,
        "target_definition": f"mean of the baseline's last {TARGET_LAST} validation losses",
        "gfm_settings": GFM_SETTINGS,
        "runs": results,
    }
    path = out / "summary.json"
    path.write_text(json.dumps(summary, indent=2))
    print(f"\nsummary written to {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
