"""One entry point for every dataset layout the package reads: MVTec 3D-AD (also written by
``mafr synth``) and Eyecandies. Both give the same ``Sample`` objects, so training and evaluation
do not care which one they read."""
from __future__ import annotations

from pathlib import Path

from ..errors import DatasetError
from .eyecandies import EyecandiesDataset, is_eyecandies_category
from .mvtec import MVTecDataset

FORMATS = ("auto", "mvtec", "eyecandies")


def detect_format(root, category: str) -> str:
    """'eyecandies' when ROOT/<category> has <split>/data folders, else 'mvtec'."""
    category_dir = Path(root).expanduser() / category
    return "eyecandies" if is_eyecandies_category(category_dir) else "mvtec"


def open_dataset(root, category: str, split: str, shots: int | None = None, seed: int = 0,
                 format: str = "auto"):
    """The dataset of one category and split in the given (or detected) layout."""
    if format not in FORMATS:
        raise DatasetError(f"unknown dataset format {format!r}; choose one of {', '.join(FORMATS)}")
    if format == "auto":
        format = detect_format(root, category)
    cls = EyecandiesDataset if format == "eyecandies" else MVTecDataset
    return cls(root, category, split, shots=shots, seed=seed)
