"""One flag: GFMLightningCLI's --gfm / gfm_callback.*, the documented YAML in a plain LightningCLI app."""

import importlib.util
import pathlib

import pytest
import torch

pytest.importorskip("jsonargparse")
from lightning.pytorch.cli import LightningCLI  # noqa: E402

from lightning_gfm import GFMCallback  # noqa: E402
from lightning_gfm.cli import GFMLightningCLI  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parents[1]
CONFIG = ROOT / "examples" / "config.yaml"


def _app():
    spec = importlib.util.spec_from_file_location("cli_app", ROOT / "examples" / "cli_app.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


app = _app()
QUIET = [
    "--trainer.logger",
    "false",
    "--trainer.enable_progress_bar",
    "false",
    "--trainer.enable_checkpointing",
    "false",
]


def _gfm(cli):
    return [c for c in cli.trainer.callbacks if isinstance(c, GFMCallback)]


def test_gfm_is_off_by_default_and_on_with_one_flag(tmp_path):
    root = ["--trainer.default_root_dir", str(tmp_path)]
    assert _gfm(app.main([*root, *QUIET], run=False)) == []
    (cb,) = _gfm(app.main([*root, *QUIET, "--gfm", "true", "--gfm_callback.jump_every", "7"], run=False))
    assert cb.jump_every == 7 and cb.record_every == 1  # the rest keeps GFMCallback's defaults (derived)


def test_gfm_true_in_yaml_with_options(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("gfm: true\ngfm_callback:\n  record_every: 3\n  horizon: end\n  buffer_dtype: torch.bfloat16\n")
    (cb,) = _gfm(app.main(["--config", str(cfg), "--trainer.default_root_dir", str(tmp_path), *QUIET], run=False))
    assert (cb.record_every, cb.horizon, cb.buffer_dtype) == (3, "end", torch.bfloat16)


def test_wrong_type_is_refused_before_training(tmp_path, capsys):
    with pytest.raises(SystemExit):
        app.main(["--gfm", "true", "--gfm_callback.window", "many", *QUIET], run=False)
    assert "window" in capsys.readouterr().err


def test_two_gfm_callbacks_are_refused(tmp_path):
    with pytest.raises(ValueError, match="Two GFMCallbacks are configured"):
        app.main(
            ["--config", str(CONFIG), "--gfm", "true", "--trainer.default_root_dir", str(tmp_path), *QUIET], run=False
        )


def test_documented_yaml_sets_every_argument_in_a_plain_lightning_cli(tmp_path):
    cli = LightningCLI(
        app.MLP,
        app.DigitsData,
        args=["--config", str(CONFIG), "--trainer.default_root_dir", str(tmp_path), *QUIET],
        run=False,
    )
    (cb,) = _gfm(cli)
    assert (cb.record_every, cb.jump_every, cb.window, cb.eval_batches) == (5, 100, 24, 2)
    assert cb.buffer_dtype is torch.float32 and cb.horizon is None and cb.field_path is None
    # the YAML documents every argument of GFMCallback, at its default unless it says otherwise
    import inspect

    import yaml

    (listed,) = yaml.safe_load(CONFIG.read_text())["trainer"]["callbacks"]
    init_args = listed["init_args"]
    params = {  # the catch-all for removed arguments (it raises, naming why) is not an argument
        n: p for n, p in inspect.signature(GFMCallback).parameters.items() if p.kind is not p.VAR_KEYWORD
    }
    assert set(init_args) == set(params)
    changed = {n for n, p in params.items() if init_args[n] != p.default and str(p.default) != init_args[n]}
    assert changed == {"record_every", "jump_every", "eval_batches"}


def test_fit_with_gfm_flag_jumps(tmp_path):
    cli = app.main(
        [
            "fit",
            "--gfm",
            "true",
            *("--gfm_callback.record_every", "2", "--gfm_callback.jump_every", "20", "--gfm_callback.window", "12"),
            *("--gfm_callback.trend", "4"),
            *("--gfm_callback.fit_steps", "10", "--gfm_callback.eval_batches", "1"),
            *("--gfm_callback.overhead", "null"),  # 30 steps: too short for the default budget to afford an attempt
            *("--trainer.max_steps", "30", "--trainer.default_root_dir", str(tmp_path)),
            *QUIET,
        ]
    )
    (cb,) = _gfm(cli)
    assert cli.trainer.global_step == 30 and [j.step for j in cb.jumps] == [20]


def test_console_entry_point_takes_any_importable_model(tmp_path):
    from lightning_gfm.cli import main

    cli = main(
        [
            "fit",
            *("--model", "models.DigitsModule", "--gfm", "true", "--gfm_callback.jump_every", "1000"),
            *(
                "--trainer.max_steps",
                "3",
                "--trainer.limit_val_batches",
                "0",
                "--trainer.default_root_dir",
                str(tmp_path),
            ),
            *QUIET,
        ]
    )
    assert isinstance(cli, GFMLightningCLI) and cli.trainer.global_step == 3 and len(_gfm(cli)) == 1
