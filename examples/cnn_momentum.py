"""A small CNN trained with SGD + momentum, with and without GFM.

GFM's field is optimizer-aware: with ``SGD(momentum=0.9)`` the ODE carries the momentum buffer along with the
weights, so a forecast respects the momentum's inertia (see the user guide). The data is scikit-learn's bundled
8x8 digits (nothing is downloaded), as 1x8x8 images; the split is fixed, the seed sets the initial weights and
batch order, and both runs share it.

Usage::

    python examples/cnn_momentum.py            # ~1 minute on 2 CPU cores
    python examples/cnn_momentum.py --quick    # smoke test
    python examples/cnn_momentum.py --wandb    # offline W&B runs under --out
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import lightning.pytorch as pl
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

try:
    from lightning_gfm import GFMCallback
except ImportError:  # running from a checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from lightning_gfm import GFMCallback


def digit_images():
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    x = torch.tensor(x, dtype=torch.float32).view(-1, 1, 8, 8) / 16.0
    x = (x - x.mean()) / x.std()
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    x, y = x[perm], torch.tensor(y)[perm]
    return TensorDataset(x[:1400], y[:1400]), TensorDataset(x[1400:], y[1400:])


class DigitsCNN(pl.LightningModule):
    def __init__(self, lr: float = 0.05, momentum: float = 0.9, weight_decay: float = 5e-4):
        super().__init__()
        self.save_hyperparameters()
        self.train_set, self.val_set = digit_images()
        self.net = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(16, 32, 3, padding=1),
            nn.ReLU(),
            nn.AvgPool2d(2),
            nn.Flatten(),
            nn.Linear(32 * 4 * 4, 10),
        )

    def _loss(self, batch):
        x, y = batch
        logits = self.net(x)
        return nn.functional.cross_entropy(logits, y), (logits.argmax(1) == y).float().mean()

    def training_step(self, batch, batch_idx):
        loss, _ = self._loss(batch)
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch, batch_idx):
        loss, acc = self._loss(batch)
        self.log_dict({"val_loss": loss, "val_acc": acc})

    def configure_optimizers(self):
        hp = self.hparams
        return torch.optim.SGD(self.parameters(), lr=hp.lr, momentum=hp.momentum, weight_decay=hp.weight_decay)

    def train_dataloader(self):
        return DataLoader(self.train_set, batch_size=32, shuffle=True)

    def val_dataloader(self):
        return DataLoader(self.val_set, batch_size=200)


def wandb_offline(out: Path, project: str, name: str):
    """A WandbLogger that never touches the network and keeps every file under ``out``."""
    os.environ.setdefault("WANDB_MODE", "offline")
    os.environ.setdefault("WANDB_SILENT", "true")
    os.environ["WANDB_DIR"] = str(out)
    for var in ("WANDB_CACHE_DIR", "WANDB_CONFIG_DIR", "WANDB_DATA_DIR"):
        path = out / "wandb" / var[6:-4].lower()
        path.mkdir(parents=True, exist_ok=True)
        os.environ[var] = str(path)
    from lightning.pytorch.loggers import WandbLogger

    return WandbLogger(offline=True, save_dir=str(out), project=project, name=name)


def run(steps: int, gfm: GFMCallback | None, out: Path, use_wandb: bool, seed: int) -> dict:
    pl.seed_everything(seed, verbose=False)
    name = "gfm" if gfm else "baseline"
    logger = wandb_offline(out, "lightning-gfm-cnn", name) if use_wandb else False
    trainer = pl.Trainer(
        max_steps=steps,
        callbacks=[gfm] if gfm else [],
        logger=logger,
        default_root_dir=out,
        accelerator="cpu",
        val_check_interval=min(steps, 50),
        check_val_every_n_epoch=None,
        enable_checkpointing=False,
        enable_model_summary=False,
        enable_progress_bar=False,
    )
    start = time.perf_counter()
    trainer.fit(DigitsCNN())
    seconds = time.perf_counter() - start
    if use_wandb:
        import wandb

        wandb.finish()
    m = trainer.callback_metrics
    result = {"val_loss": float(m["val_loss"]), "val_acc": float(m["val_acc"]), "seconds": seconds}
    if gfm:
        result["jumps"] = f"{sum(j.accepted for j in gfm.jumps)} accepted / {len(gfm.jumps)} tried"
    print(f"{name:9s} {result}")
    return result


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=800, help="optimizer steps per run")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="tiny budget, for a smoke test")
    parser.add_argument("--wandb", action="store_true", help="log both runs to offline W&B runs under --out")
    parser.add_argument("--out", default="runs/cnn_momentum")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    steps = 40 if args.quick else args.steps
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    # defaults; the whole validation split judges each jump (a 40-step smoke run cannot afford an attempt within
    # the default 3 % budget: --quick lifts it)
    gfm = GFMCallback(eval_batches=2, overhead=None if args.quick else 0.03)
    return {
        "baseline": run(steps, None, out, args.wandb, args.seed),
        "gfm": run(steps, gfm, out, args.wandb, args.seed),
    }


if __name__ == "__main__":
    main()
