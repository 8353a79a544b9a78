"""A character-level language model trained with AdamW and a cosine schedule, with GFM.

A two-layer causal transformer (d=64) predicts the next character of the source of Python's standard ``json``
package (nothing is downloaded): first 90 % train, last 10 % validation. GFM replays the cosine schedule on a
copy of the scheduler to know the learning rate along each forecast, and AdamW's decoupled weight decay is part
of its dynamics. The script prints validation loss (nats per character) and each jump attempt.

Usage::

    python examples/char_lm.py            # ~1 minute on 2 CPU cores
    python examples/char_lm.py --quick    # smoke test
    python examples/char_lm.py --wandb    # offline W&B run under --out
"""

from __future__ import annotations

import argparse
import json
import os
import sys
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

CONTEXT = 32


def corpus() -> tuple[torch.Tensor, int]:
    """The ``.py`` files of the stdlib ``json`` package as character ids, and the vocabulary size."""
    root = Path(json.__file__).parent
    text = "\n".join(p.read_text(encoding="utf-8", errors="replace") for p in sorted(root.glob("*.py")))
    chars = sorted(set(text))
    lookup = {c: i for i, c in enumerate(chars)}
    return torch.tensor([lookup[c] for c in text]), len(chars)


def windows(ids: torch.Tensor, stride: int, limit: int | None = None) -> TensorDataset:
    starts = torch.arange(0, len(ids) - CONTEXT - 1, stride)[:limit]
    seq = ids[starts[:, None] + torch.arange(CONTEXT + 1)]
    return TensorDataset(seq[:, :-1].contiguous(), seq[:, 1:].contiguous())


class CharLM(pl.LightningModule):
    def __init__(self, lr: float = 3e-3, weight_decay: float = 0.01, d: int = 64, layers: int = 2):
        super().__init__()
        self.save_hyperparameters()
        ids, vocab = corpus()
        cut = int(0.9 * len(ids))
        self.train_set, self.val_set = windows(ids[:cut], CONTEXT // 2), windows(ids[cut:], CONTEXT, limit=256)
        self.tok = nn.Embedding(vocab, d)
        self.pos = nn.Parameter(torch.zeros(CONTEXT, d))
        layer = nn.TransformerEncoderLayer(d, 4, 4 * d, dropout=0.0, batch_first=True, norm_first=True)
        self.blocks = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.head = nn.Linear(d, vocab)
        self.register_buffer("mask", nn.Transformer.generate_square_subsequent_mask(CONTEXT), persistent=False)

    def forward(self, x):
        h = self.tok(x) + self.pos[: x.shape[1]]
        return self.head(self.blocks(h, mask=self.mask[: x.shape[1], : x.shape[1]], is_causal=True))

    def _loss(self, batch):
        x, y = batch
        return nn.functional.cross_entropy(self(x).flatten(0, 1), y.flatten())

    def training_step(self, batch, batch_idx):
        loss = self._loss(batch)
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch, batch_idx):
        self.log("val_loss", self._loss(batch))

    def configure_optimizers(self):
        opt = torch.optim.AdamW(self.parameters(), lr=self.hparams.lr, weight_decay=self.hparams.weight_decay)
        cosine = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=self.trainer.max_steps)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": cosine, "interval": "step"}}

    def train_dataloader(self):
        return DataLoader(self.train_set, batch_size=32, shuffle=True)

    def val_dataloader(self):
        return DataLoader(self.val_set, batch_size=128)


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
    parser.add_argument("--steps", type=int, default=600, help="optimizer steps (the cosine schedule spans them)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="tiny budget, for a smoke test")
    parser.add_argument("--wandb", action="store_true", help="also log to an offline W&B run under --out")
    parser.add_argument("--out", default="runs/char_lm")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    steps = 40 if args.quick else args.steps
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    pl.seed_everything(args.seed, verbose=False)
    gfm = GFMCallback(
        fit_steps=10 if args.quick else 100,  # fit the field online by flow matching (off by default)
        eval_batches=2,  # the whole 256-window validation split
        overhead=None if args.quick else 0.03,  # a 40-step smoke run cannot afford an attempt within 3 %
    )
    trainer = pl.Trainer(
        max_steps=steps,
        callbacks=[gfm],
        logger=wandb_offline(out, "lightning-gfm-char-lm") if args.wandb else False,
        default_root_dir=out,
        accelerator="cpu",
        val_check_interval=min(steps, 100),
        check_val_every_n_epoch=None,
        enable_checkpointing=False,
        enable_model_summary=False,
    )
    trainer.fit(CharLM())
    if args.wandb:
        import wandb

        wandb.finish()
    for j in gfm.jumps:
        print(f"step {j.step:4d}: {j.outcome:11s} +{j.horizon:<4d} val {j.metric_before:.4f} -> {j.metric_after:.4f}")
    summary = {
        "val_loss": float(trainer.callback_metrics["val_loss"]),
        "jumps": len(gfm.jumps),
        "accepted": sum(j.accepted for j in gfm.jumps),
    }
    print(summary)
    return summary


if __name__ == "__main__":
    main()
