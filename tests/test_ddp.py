"""Two-process DDP on CPU (gloo): every rank makes the same jump decisions and ends with identical weights."""

import pathlib

import lightning.pytorch as pl
import torch
import torch.multiprocessing as mp
from models import DigitsModule, tiny_trainer

from lightning_gfm import GFMCallback

FAST = dict(record_every=2, jump_every=20, window=10, fit_steps=10, fit_batch=512, eval_batches=2)


class _DumpRank(pl.Callback):
    """Runs inside each spawned worker: writes what that rank ended with to ``out_dir/rank{r}.pt``."""

    def __init__(self, out_dir):
        self.out_dir = str(out_dir)

    def setup(self, trainer, pl_module, stage):
        # the default "file_descriptor" strategy can fail to share tensors back to the parent in small sandboxes
        mp.set_sharing_strategy("file_system")

    def on_fit_end(self, trainer, pl_module):
        gfm = next(c for c in trainer.callbacks if isinstance(c, GFMCallback))
        torch.save(
            {
                "rank": trainer.global_rank,
                "world_size": trainer.world_size,
                "strategy": type(trainer.strategy).__name__,
                "weights": torch.cat([p.detach().reshape(-1) for p in pl_module.parameters()]).clone(),
                "decisions": [(j.step, j.accepted, j.horizon) for j in gfm.jumps],
                "metrics": [(j.metric_before, j.metric_after) for j in gfm.jumps],
                "buffer_steps": gfm.buffer.steps,
            },
            pathlib.Path(self.out_dir) / f"rank{trainer.global_rank}.pt",
        )


def test_ddp_ranks_agree(tmp_path):
    previous = mp.get_sharing_strategy()
    mp.set_sharing_strategy("file_system")
    try:
        pl.seed_everything(0, verbose=False)
        trainer = tiny_trainer(
            tmp_path,
            [GFMCallback(**FAST), _DumpRank(tmp_path)],
            max_steps=50,
            strategy="ddp_spawn",
            devices=2,
            accelerator="cpu",
        )
        trainer.fit(DigitsModule())
    finally:
        mp.set_sharing_strategy(previous)

    r0 = torch.load(tmp_path / "rank0.pt", weights_only=True)
    r1 = torch.load(tmp_path / "rank1.pt", weights_only=True)
    assert (r0["rank"], r1["rank"]) == (0, 1)
    assert r0["world_size"] == r1["world_size"] == 2
    assert r0["strategy"] == "DDPStrategy"
    assert r0["decisions"] == r1["decisions"]
    assert [d[0] for d in r0["decisions"]] == [20, 40], r0["decisions"]
    assert r0["metrics"] == r1["metrics"]  # the candidates' metric is reduced over ranks
    assert r0["buffer_steps"] == r1["buffer_steps"]
    assert torch.equal(r0["weights"], r1["weights"])
