"""A real Lightning fit on a real data set (scikit-learn's digits): jumps are accepted and do not hurt."""

import lightning.pytorch as pl
import pytest
from models import DigitsModule, tiny_trainer

from lightning_gfm import GFMCallback


def _fit(tmp_path, callbacks, **module_kwargs):
    pl.seed_everything(0, verbose=False)
    model = DigitsModule(**module_kwargs)
    trainer = tiny_trainer(tmp_path, callbacks, max_steps=400)
    trainer.fit(model)
    return trainer.validate(model, verbose=False)[0]["val_loss"]


@pytest.mark.parametrize(
    "module_kwargs",
    [dict(optimizer="adam", lr=1e-3), dict(optimizer="momentum", lr=0.01, schedule="cosine")],
    ids=["adam", "momentum-cosine"],
)
def test_jumps_are_accepted_and_final_validation_is_no_worse(tmp_path, module_kwargs):
    baseline = _fit(tmp_path, [], **module_kwargs)
    cb = GFMCallback(overhead=None, record_every=5, jump_every=50, fit_steps=50)
    with_gfm = _fit(tmp_path, [cb], **module_kwargs)
    accepted = [j for j in cb.jumps if j.accepted]
    assert accepted, [j.outcome for j in cb.jumps]
    assert all(j.metric_after < j.metric_before for j in accepted)
    assert with_gfm <= baseline, (with_gfm, baseline)
