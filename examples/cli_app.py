"""Your own LightningCLI app, with Gradient Flow Matching one flag away.

``GFMLightningCLI`` is a drop-in ``LightningCLI``: everything LightningCLI offers works unchanged, and two settings
are added: ``--gfm true`` switches GFM on, ``--gfm_callback.<arg>`` sets any ``GFMCallback`` argument (``--help``
lists them with their types and docs; jsonargparse rejects a wrong type before training starts).

Usage::

    python examples/cli_app.py fit --trainer.max_steps 300                  # plain training
    python examples/cli_app.py fit --trainer.max_steps 300 --gfm true       # with GFM, default settings
    python examples/cli_app.py fit --gfm true --gfm_callback.jump_every 50  # with GFM, one setting changed
    python examples/cli_app.py fit --config examples/config.yaml            # everything from YAML
    python examples/cli_app.py fit --help                                   # every option

A plain ``LightningCLI`` app reads the same ``examples/config.yaml``: there the callback is listed under
``trainer.callbacks`` with ``class_path: lightning_gfm.GFMCallback``.
"""

from __future__ import annotations

import sys
from pathlib import Path

import lightning.pytorch as pl
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

try:
    from lightning_gfm.cli import GFMLightningCLI
except ImportError:  # running from a checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from lightning_gfm.cli import GFMLightningCLI


class DigitsData(pl.LightningDataModule):
    """scikit-learn's bundled 8x8 digits, standardised; a fixed 1400 / 397 split."""

    def __init__(self, batch_size: int = 64):
        super().__init__()
        self.batch_size = batch_size

    def setup(self, stage: str) -> None:
        from sklearn.datasets import load_digits

        x, y = load_digits(return_X_y=True)
        x = torch.tensor(x, dtype=torch.float32) / 16.0
        x = (x - x.mean(0)) / (x.std(0) + 1e-3)
        perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
        x, y = x[perm], torch.tensor(y)[perm]
        self.train_set, self.val_set = TensorDataset(x[:1400], y[:1400]), TensorDataset(x[1400:], y[1400:])

    def train_dataloader(self):
        return DataLoader(self.train_set, batch_size=self.batch_size, shuffle=True)

    def val_dataloader(self):
        return DataLoader(self.val_set, batch_size=200)


class MLP(pl.LightningModule):
    """A one-hidden-layer classifier; the optimizer comes from the CLI (``--optimizer``), Adam by default."""

    def __init__(self, hidden: int = 64, lr: float = 1e-3):
        super().__init__()
        self.save_hyperparameters()
        self.net = nn.Sequential(nn.Linear(64, hidden), nn.Tanh(), nn.Linear(hidden, 10))

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = nn.functional.cross_entropy(self.net(x), y)
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_loss", nn.functional.cross_entropy(self.net(x), y), prog_bar=True)

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=self.hparams.lr)


def main(argv: list[str] | None = None, run: bool = True) -> GFMLightningCLI:
    """Run the app on ``argv`` (default ``sys.argv[1:]``); ``run=False`` only builds model, data and trainer."""
    torch.set_num_threads(1)
    if not run and argv and argv[0] in ("fit", "validate", "test", "predict"):
        argv = argv[1:]  # without a run there is no subcommand
    return GFMLightningCLI(
        MLP,
        DigitsData,
        seed_everything_default=0,
        trainer_defaults={"accelerator": "cpu", "max_steps": 300, "enable_model_summary": False},
        args=argv,
        run=run,
    )


if __name__ == "__main__":
    main()
