"""Small real models and data for the tests: scikit-learn's bundled 8x8 digits, no download."""

from __future__ import annotations

import lightning.pytorch as pl
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset


def digits_tensors(seed: int = 0):
    """Digits split 1100 train / 348 val / 349 test, standardised, in a seeded order."""
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    x = torch.tensor(x, dtype=torch.float32) / 16.0
    x = (x - x.mean(0)) / (x.std(0) + 1e-3)
    y = torch.tensor(y)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    x, y = x[perm], y[perm]
    return (x[:1100], y[:1100]), (x[1100:1448], y[1100:1448]), (x[1448:], y[1448:])


class DigitsModule(pl.LightningModule):
    """MLP classifier on digits; the optimizer and scheduler are arguments."""

    def __init__(
        self,
        optimizer: str = "adam",
        lr: float = 1e-3,
        hidden: int = 64,
        schedule: str | None = None,
        weight_decay: float = 0.0,
        batch_size: int = 64,
        shuffle: bool = True,
        data_seed: int = 0,
    ):
        super().__init__()
        self.save_hyperparameters()
        self.net = nn.Sequential(nn.Linear(64, hidden), nn.Tanh(), nn.Linear(hidden, 10))
        self.train_data, self.val_data, self.test_data = digits_tensors(data_seed)

    def forward(self, x):
        return self.net(x)

    def _loss(self, batch):
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)

    def training_step(self, batch, batch_idx):
        loss = self._loss(batch)
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch, batch_idx):
        self.log("val_loss", self._loss(batch))

    def configure_optimizers(self):
        hp = self.hparams
        params = self.parameters()
        opt = {
            "sgd": lambda: torch.optim.SGD(params, lr=hp.lr, weight_decay=hp.weight_decay),
            "momentum": lambda: torch.optim.SGD(params, lr=hp.lr, momentum=0.9, weight_decay=hp.weight_decay),
            "nesterov": lambda: torch.optim.SGD(params, lr=hp.lr, momentum=0.9, nesterov=True),
            "adam": lambda: torch.optim.Adam(params, lr=hp.lr, weight_decay=hp.weight_decay),
            "adamw": lambda: torch.optim.AdamW(params, lr=hp.lr, weight_decay=hp.weight_decay or 1e-2),
            "rmsprop": lambda: torch.optim.RMSprop(params, lr=hp.lr),
            "adagrad": lambda: torch.optim.Adagrad(params, lr=hp.lr),
            "adadelta": lambda: torch.optim.Adadelta(params, lr=hp.lr),
        }[hp.optimizer]()
        if hp.schedule == "cosine":
            sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=self.trainer.estimated_stepping_batches)
            return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}
        return opt

    def train_dataloader(self):
        return DataLoader(
            TensorDataset(*self.train_data), batch_size=self.hparams.batch_size, shuffle=self.hparams.shuffle
        )

    def val_dataloader(self):
        return DataLoader(TensorDataset(*self.val_data), batch_size=128)


def tiny_trainer(tmp_path, callbacks=(), **kwargs) -> pl.Trainer:
    """A quiet CPU Trainer writing into ``tmp_path``."""
    defaults = dict(
        default_root_dir=tmp_path,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        deterministic=True,
    )
    defaults.update(kwargs)
    return pl.Trainer(callbacks=list(callbacks), **defaults)


def run_two_ranks(target, args_of_rank, out_dir, deadline: float) -> list:
    """Start ``target(*args_of_rank(r))`` for ranks 0 and 1 (spawned), wait, and load each rank's ``rank{r}.pt``.

    A rank still running after ``deadline`` seconds is killed and the test fails: a collective was left waiting.
    """
    import pathlib

    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=target, args=args_of_rank(r), daemon=True) for r in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(deadline)
    hung = [p.pid for p in procs if p.is_alive()]
    for p in procs:
        if p.is_alive():
            p.kill()
    assert not hung, f"ranks {hung} still running after {deadline} s: a collective is waiting for another rank"
    return [torch.load(pathlib.Path(out_dir) / f"rank{r}.pt", weights_only=False) for r in range(2)]


def save_rank_outcome(rank: int, out_dir, run) -> None:
    """Run ``run()`` (a dict of results) on one spawned rank and save its outcome to ``out_dir/rank{rank}.pt``.

    A :class:`~lightning_gfm.distributed.ShardFailure` is kept as ``shard_failure``, any other error as ``error``
    (its traceback); the process group, if any, is destroyed afterwards.
    """
    import pathlib
    import traceback

    import torch.distributed as dist

    from lightning_gfm.distributed import ShardFailure

    result = {"rank": rank}
    try:
        result.update(run())
    except ShardFailure as exc:
        result["shard_failure"] = str(exc)
    except Exception:
        result["error"] = traceback.format_exc()
    finally:
        torch.save(result, pathlib.Path(out_dir) / f"rank{rank}.pt")
        if dist.is_initialized():
            dist.destroy_process_group()
