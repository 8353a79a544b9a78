"""Save and load fitted fields as safetensors files: tensors plus JSON metadata, never executable code."""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path

import torch

from lightning_gfm.flow.field import FieldConfig, GradientField
from lightning_gfm.flow.meta import MetaConfig, MetaField

FORMAT = "lightning-gfm-field"
VERSION = 1

__all__ = [
    "FORMAT",
    "PRETRAINED",
    "VERSION",
    "field_info",
    "load_field",
    "pretrained_path",
    "resolve_field",
    "save_field",
]

_PRETRAINED_DIR = Path(__file__).resolve().parent / "pretrained"

#: fields shipped with the package: name -> file under ``lightning_gfm/fields/pretrained/``.
#: ``GFMCallback(field="pretrained")`` loads ``default``; ``field="pretrained:<name>"`` loads another.
PRETRAINED: dict[str, str] = {"default": "default.safetensors", "meta": "meta.safetensors"}

#: the two kinds of field a file may hold (its ``kind`` metadata; files without one hold a ``gradient`` field):
#: a :class:`~lightning_gfm.flow.field.GradientField` (fitted on one window, or meta-trained with ``pretrain``) or
#: a :class:`~lightning_gfm.flow.meta.MetaField` (meta-trained on a corpus by ``lightning-gfm meta-train``).
KINDS: dict[str, tuple[type, type]] = {"gradient": (GradientField, FieldConfig), "meta": (MetaField, MetaConfig)}


def pretrained_path(name: str = "default") -> Path:
    """Path of the shipped field ``name`` (a key of :data:`PRETRAINED`).

    Raises:
        ValueError: unknown name (the message lists the shipped ones).
        FileNotFoundError: the name is registered but its file is missing from this installation.
    """
    if name not in PRETRAINED:
        raise ValueError(
            f"Unknown pretrained field {name!r}; shipped: {sorted(PRETRAINED)} (use 'pretrained' or "
            f"'pretrained:<name>')."
        )
    path = _PRETRAINED_DIR / PRETRAINED[name]
    if not path.is_file():
        raise FileNotFoundError(f"pretrained field {name!r} is not installed: {str(path)!r} is missing.")
    return path


def resolve_field(field: str | os.PathLike) -> str:
    """Map ``"pretrained"`` / ``"pretrained:<name>"`` to the shipped file; any other value is returned as a path."""
    text = os.fspath(field)
    if text == "pretrained":
        return str(pretrained_path("default"))
    if text.startswith("pretrained:"):
        return str(pretrained_path(text.split(":", 1)[1]))
    return text


def field_info(path: str | os.PathLike) -> dict:
    """Metadata of a saved field without building it.

    Returns:
        ``format``, ``version``, ``config`` and ``trained_on``, the last two parsed when they are JSON.
    """
    from safetensors import safe_open

    with safe_open(os.fspath(resolve_field(path)), framework="pt", device="cpu") as f:
        meta = dict(f.metadata() or {})
    for key in ("config", "trained_on"):
        with contextlib.suppress(KeyError, ValueError):
            meta[key] = json.loads(meta[key])
    return meta


def save_field(field: GradientField | MetaField, path: str | os.PathLike, trained_on: str = "") -> Path:
    """Write ``field`` to ``path`` (safetensors) with its format version, shape and provenance.

    Args:
        field: the field to save.
        path: destination file.
        trained_on: free text saying what the field was fitted on.

    Returns:
        The path written.
    """
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().cpu().contiguous() for k, v in field.state_dict().items()}
    meta = {
        "format": FORMAT,
        "version": str(VERSION),
        "kind": "meta" if isinstance(field, MetaField) else "gradient",
        "config": json.dumps(field.config.to_dict()),
        "trained_on": trained_on,
    }
    save_file(tensors, str(path), metadata=meta)
    return path


def load_field(path: str | os.PathLike, device: str | torch.device = "cpu") -> GradientField | MetaField:
    """Load a field saved by :func:`save_field`. Only tensors and JSON are read; nothing is unpickled.

    Raises:
        FileNotFoundError: no such file.
        ValueError: the file is not a lightning-gfm field (a pickle, another safetensors file, a newer format).
    """
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"`field` file not found: {str(path)!r}.")
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - safe_open has no iterator
    except Exception as err:
        raise ValueError(
            f"`field` must be a safetensors file written by lightning-gfm; {str(path)!r} is not readable as "
            f"safetensors ({type(err).__name__}). Pickled checkpoints are refused: loading them could run code."
        ) from err
    if meta.get("format") != FORMAT:
        raise ValueError(
            f"{str(path)!r} is a safetensors file but not a lightning-gfm field (format={meta.get('format')!r})."
        )
    if int(meta.get("version", "0")) > VERSION:
        raise ValueError(
            f"{str(path)!r} has field format version {meta['version']}; this lightning-gfm reads up to {VERSION}. "
            "Upgrade lightning-gfm."
        )
    kind = meta.get("kind", "gradient")
    if kind not in KINDS:
        raise ValueError(f"{str(path)!r} holds a field of kind {kind!r}; this lightning-gfm reads {sorted(KINDS)}.")
    cls, config_cls = KINDS[kind]
    config = config_cls(**json.loads(meta["config"]))
    field = cls(config)
    try:
        field.load_state_dict(tensors)
    except RuntimeError as err:
        raise ValueError(f"{str(path)!r} does not match its own config {config}: {err}") from err
    return field.to(device)
