"""Quickstart: add ``GFMCallback`` to a Trainer and read what it did.

A 64-64-10 MLP learns scikit-learn's bundled 8x8 digits with Adam (nothing is downloaded). The callback records
the weights every ``record_every`` steps, tries a jump every ``jump_every`` steps, and keeps a jump only when the
validation loss it logs as ``val_loss`` improves. Scalars go to a CSV logger under ``--out``; ``--wandb`` adds an
offline Weights & Biases run (table of jumps, forecast histograms, trajectory picture) in the same folder.

Usage::

    python examples/quickstart.py            # ~20 s on 2 CPU cores
    python examples/quickstart.py --quick    # smoke test, a few seconds
    python examples/quickstart.py --wandb    # then: wandb sync runs/quickstart/wandb/offline-run-*
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import lightning.pytorch as pl
import torch
from lightning.pytorch.loggers import CSVLogger
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

try:
    from lightning_gfm import GFMCallback
except ImportError:  # running from a checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from lightning_gfm import GFMCallback


class Digits(pl.LightningModule):
    def __init__(self, lr: float = 1e-3):
        super().__init__()
        from sklearn.datasets import load_digits

        x, y = load_digits(return_X_y=True)
        x = torch.tensor(x, dtype=torch.float32) / 16.0
        x = (x - x.mean(0)) / (x.std(0) + 1e-3)
        perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
        x, y = x[perm], torch.tensor(y)[perm]
        self.train_set, self.val_set = TensorDataset(x[:1400], y[:1400]), TensorDataset(x[1400:], y[1400:])
        self.net = nn.Sequential(nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 10))
        self.lr = lr

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = nn.functional.cross_entropy(self.net(x), y)
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_loss", nn.functional.cross_entropy(self.net(x), y))  # GFM's default `monitor`

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=self.lr)

    def train_dataloader(self):
        return DataLoader(self.train_set, batch_size=64, shuffle=True)

    def val_dataloader(self):
        return DataLoader(self.val_set, batch_size=200)


def wandb_offline(out: Path, project: str):
    """A WandbLogger that never touches the network and keeps every file under ``out``."""
    os.environ.setdefault("WANDB_MODE", "offline")
    os.environ.setdefault("WANDB_SILENT", "true")
    os.environ["WANDB_DIR"] = str(out)
    for var in ("WANDB_CACHE_DIR", "WANDB_CONFIG_DIR", "WANDB_DATA_DIR"):
        path = out / "wandb" / var[6:-4].lower()
        path.mkdir(parents=True, exist_ok=True)
        os.environ[var] = str(path)
    from lightning.pytorch.loggers import WandbLogger

    return WandbLogger(offline=True, save_dir=str(out), project=project)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=600, help="optimizer steps")
    parser.add_argument("--quick", action="store_true", help="tiny budget, for a smoke test")
    parser.add_argument("--wandb", action="store_true", help="also log to an offline W&B run under --out")
    parser.add_argument("--out", default="runs/quickstart", help="folder for logs")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)  # a model this small only loses from more threads
    steps = 40 if args.quick else args.steps
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    pl.seed_everything(0, verbose=False)
    # the defaults: snapshots every 1/60 and a jump attempt every 1/6 of the planned steps, a denoised start and
    # the optimizer-aware field; only the validation batches that judge a jump are set here
    # the whole 397-sample validation split, 2 batches of 200; a 40-step smoke run is too short for the default
    # do-no-harm budget (3 % of the run) to afford an attempt, so --quick lifts it to show the mechanism
    gfm = GFMCallback(eval_batches=2, overhead=None if args.quick else 0.03)
    loggers = [CSVLogger(out, name="csv")]
    if args.wandb:
        loggers.append(wandb_offline(out, "lightning-gfm-quickstart"))
    trainer = pl.Trainer(
        max_steps=steps,
        callbacks=[gfm],
        logger=loggers,
        default_root_dir=out,
        accelerator="cpu",
        val_check_interval=min(steps, 50),
        check_val_every_n_epoch=None,
        enable_checkpointing=False,
        enable_model_summary=False,
    )
    trainer.fit(Digits())
    if args.wandb:
        import wandb

        wandb.finish()
    print(f"\n{'step':>5} {'outcome':>12} {'horizon':>8} {'val before':>11} {'val after':>10}")
    for j in gfm.jumps:
        print(f"{j.step:5d} {j.outcome:>12} {j.horizon:8d} {j.metric_before:11.4f} {j.metric_after:10.4f}")
    summary = {
        "steps": trainer.global_step,
        "val_loss": float(trainer.callback_metrics["val_loss"]),
        "jumps": len(gfm.jumps),
        "accepted": sum(j.accepted for j in gfm.jumps),
    }
    print(summary)
    return summary


if __name__ == "__main__":
    main()
