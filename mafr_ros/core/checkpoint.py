"""The MAFR checkpoint: one safetensors file holding the trained heads and, in its header, the JSON
metadata needed to rebuild exactly the same detector (extractors and the hash of their weights,
grid, preprocessing, losses, scoring, thresholds, training files, metrics).

safetensors is used because it cannot execute code on load (unlike pickle-based .pth files) and
its header is readable without loading the tensors.
"""
from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from ..errors import CheckpointError

FORMAT = "mafr_ros.checkpoint"
FORMAT_VERSION = 1
_META_KEY = "mafr_ros"


def save_checkpoint(path, state_dict: dict, metadata: dict) -> Path:
    """Write heads weights + metadata atomically (a crash never leaves a half-written file)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = dict(metadata)
    meta["format"] = FORMAT
    meta["format_version"] = FORMAT_VERSION
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in state_dict.items()}
    tmp = path.with_name(path.name + ".tmp")
    try:
        save_file(tensors, str(tmp), metadata={_META_KEY: json.dumps(meta, sort_keys=True)})
        os.replace(tmp, path)
    except (OSError, SafetensorError) as exc:
        if tmp.is_file():
            tmp.unlink()
        raise CheckpointError(f"checkpoint {path}: cannot write it ({exc}); check that its folder "
                              "is writable and has space (the previous file, if any, is "
                              "unchanged)") from None
    return path


def update_metadata(path, updates: Mapping) -> dict:
    """Replace top-level metadata entries of an existing checkpoint (e.g. ``metrics`` after an
    evaluation), atomically; the weights are written back unchanged, so the model id stays.
    Returns the new metadata."""
    state, meta = load_checkpoint(path)
    meta.update(updates)
    save_checkpoint(path, state, meta)
    return meta


def read_metadata(path) -> dict:
    """Only the JSON metadata (cheap: reads the header, not the tensors)."""
    path = _existing(path)
    try:
        with open(path, "rb") as handle:
            header_len = int.from_bytes(handle.read(8), "little")
            if header_len <= 0 or header_len > 100_000_000:
                raise ValueError("bad header length")
            header = json.loads(handle.read(header_len))
    except (ValueError, OSError, UnicodeDecodeError) as exc:
        raise CheckpointError(
            f"checkpoint {path}: cannot read the safetensors header ({exc}); the file is corrupt or "
            "not a mafr_ros checkpoint - retrain it or point the configuration at the right file"
        ) from None
    return _parse_meta(path, header.get("__metadata__") or {})


def load_checkpoint(path, map_location="cpu") -> tuple[dict, dict]:
    """(state_dict, metadata) of a checkpoint, with every failure as a CheckpointError."""
    path = _existing(path)
    metadata = read_metadata(path)
    try:
        state = load_file(str(path), device=str(map_location))
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise CheckpointError(
            f"checkpoint {path}: the weights cannot be read ({exc}); the file is truncated or "
            "corrupt - copy it again or retrain"
        ) from None
    return state, metadata


def _existing(path) -> Path:
    path = Path(path).expanduser()
    if not path.exists():
        raise CheckpointError(f"checkpoint {path} does not exist: train one with `mafr train` or "
                              "use the embedded default (models/)")
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} is not a file")
    if path.stat().st_size < 16:
        raise CheckpointError(f"checkpoint {path} is empty or truncated ({path.stat().st_size} bytes)")
    return path


def _parse_meta(path, raw: dict) -> dict:
    if _META_KEY not in raw:
        raise CheckpointError(
            f"checkpoint {path}: no mafr_ros metadata in the file - it is a safetensors file but not "
            "a MAFR checkpoint written by `mafr train`")
    try:
        meta = json.loads(raw[_META_KEY])
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"checkpoint {path}: metadata is not valid JSON ({exc})") from None
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"checkpoint {path}: unknown format {meta.get('format')!r}")
    version = meta.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise CheckpointError(
            f"checkpoint {path}: format version {version} is newer than this mafr_ros understands "
            f"({FORMAT_VERSION}); update mafr_ros")
    for key in ("profile", "extractors", "heads", "preprocess", "scoring", "thresholds"):
        if key not in meta:
            raise CheckpointError(f"checkpoint {path}: metadata lacks {key!r}; the file is incomplete")
    return meta


_MAX_LISTED = 12  # key names listed per category in error messages


def _listing(names) -> str:
    names = sorted(names)
    more = f", ... ({len(names) - _MAX_LISTED} more)" if len(names) > _MAX_LISTED else ""
    return ", ".join(names[:_MAX_LISTED]) + more


def _shape_or_type(value) -> str:
    return str(tuple(value.shape)) if isinstance(value, torch.Tensor) else type(value).__name__


def check_state_dict(expected: Mapping[str, torch.Tensor], found: Mapping, path: Path | str,
                     what: str, download_hint: str, ignored: Mapping | None = None) -> None:
    """Refuse a state dict whose keys or tensor shapes differ from the model's.

    ``ignored`` entries (known keys that the extractor does not need) are not reported.
    """
    found_keys = {k for k in found if not (ignored and k in ignored)}
    missing = expected.keys() - found_keys
    unexpected = found_keys - expected.keys()
    misshaped = [f"{k} {_shape_or_type(found[k])} (expected {tuple(expected[k].shape)})"
                 for k in sorted(expected.keys() & found_keys)
                 if not isinstance(found[k], torch.Tensor) or found[k].shape != expected[k].shape]
    if missing or unexpected or misshaped:
        problems = []
        if missing:
            problems.append(f"{len(missing)} missing keys: {_listing(missing)}")
        if unexpected:
            problems.append(f"{len(unexpected)} unexpected keys: {_listing(unexpected)}")
        if misshaped:
            problems.append(f"{len(misshaped)} tensors of the wrong shape: {_listing(misshaped)}")
        raise CheckpointError(f"weight file {path} is not a {what} checkpoint: {'; '.join(problems)}. "
                              f"Use the right file: {download_hint}")
