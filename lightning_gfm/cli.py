"""A LightningCLI where Gradient Flow Matching is one flag: ``--gfm true`` on the command line, ``gfm: true`` in YAML.

:class:`GFMLightningCLI` is a :class:`~lightning.pytorch.cli.LightningCLI` with two more settings:

* ``gfm`` (bool, default ``false``): append a :class:`~lightning_gfm.GFMCallback` to the trainer's callbacks.
* ``gfm_callback.*``: every argument of :class:`~lightning_gfm.GFMCallback`, typed from its signature and
  documented from its docstring (``--help`` lists them), e.g. ``--gfm_callback.jump_every 100``.

Use it in place of ``LightningCLI`` in your own script, or run any importable model through the console script::

    lightning-gfm-cli fit --model my_package.MyModel --data my_package.MyData --gfm true

Without this class, a plain ``LightningCLI`` takes the callback from YAML (``trainer.callbacks`` with
``class_path: lightning_gfm.GFMCallback`` and ``init_args``); jsonargparse checks every argument's type.
"""

from __future__ import annotations

from typing import Any

from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from lightning_gfm.callback import GFMCallback

__all__ = ["GFMLightningCLI", "main"]


class GFMLightningCLI(LightningCLI):
    """LightningCLI with ``--gfm`` (switch) and ``--gfm_callback.*`` (every :class:`GFMCallback` argument).

    Takes exactly :class:`~lightning.pytorch.cli.LightningCLI`'s arguments.
    """

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        """Add ``--gfm`` and the ``gfm_callback`` group; subclasses overriding this must call ``super()``."""
        parser.add_argument(
            "--gfm",
            type=bool,
            default=False,
            help="Accelerate training with Gradient Flow Matching: add a GFMCallback configured by gfm_callback.*",
        )
        parser.add_class_arguments(GFMCallback, "gfm_callback", fail_untyped=False, sub_configs=True)

    def before_instantiate_classes(self) -> None:
        """Register the callback with the trainer when ``gfm`` is true."""
        config = self.config.get(str(self.subcommand), self.config) if self.subcommand else self.config
        parser = self._parser(self.subcommand)
        if config.get("gfm") and "gfm_callback" not in parser.callback_keys:
            parser.callback_keys.append("gfm_callback")

    def instantiate_trainer(self, **kwargs: Any):
        """The trainer, refusing two GFM callbacks (``--gfm true`` and one in ``trainer.callbacks``)."""
        listed = self._get(self.config_init, "trainer", default={}).get("callbacks") or []
        listed = listed if isinstance(listed, list) else [listed]
        if "gfm_callback" in self._parser(self.subcommand).callback_keys and any(
            isinstance(c, GFMCallback) for c in listed
        ):
            raise ValueError(
                "Two GFMCallbacks are configured: `gfm: true` adds one and `trainer.callbacks` lists another. "
                "Keep one: drop `gfm: true` or remove GFMCallback from `trainer.callbacks`."
            )
        return super().instantiate_trainer(**kwargs)


def main(args: list[str] | None = None) -> GFMLightningCLI:
    """Console entry point ``lightning-gfm-cli``: any importable LightningModule and LightningDataModule.

    Args:
        args: command line (default ``sys.argv[1:]``), e.g.
            ``["fit", "--model", "pkg.Model", "--data", "pkg.Data", "--gfm", "true"]``.

    Returns:
        The CLI object (``.trainer``, ``.model``, ``.datamodule``).
    """
    return GFMLightningCLI(subclass_mode_model=True, subclass_mode_data=True, args=args)


if __name__ == "__main__":  # pragma: no cover
    main()
