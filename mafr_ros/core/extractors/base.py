"""The contract every frozen feature extractor fulfils, and the registry that builds them by name."""
from __future__ import annotations

import abc
import hashlib
from typing import Callable

import torch
from torch import nn

from ...errors import CheckpointError


class FeatureExtractor(nn.Module, abc.ABC):
    """A frozen extractor that puts features of one modality on the model's pixel grid.

    Subclasses set ``name``, ``modality`` ("rgb" or "xyz") and ``out_dim`` and implement
    ``extract``. Inputs are batches on the grid produced by the shared preprocessing:

    - rgb: (B, 3, S, S) float, ImageNet-normalised (mean 0.485/0.456/0.406, std 0.229/0.224/0.225);
    - xyz: (B, 3, S, S) float, metres, invalid pixels exactly 0 (all three coordinates).

    ``extract`` returns (B, out_dim, S, S) float32 features on the same grid. For xyz extractors,
    pixels without a valid point may carry spread-out or zero features; the valid mask is derived
    by the caller from the xyz input (``valid_mask_from_xyz``).

    Extractors are always frozen and in eval mode (no dropout, no DropPath, BatchNorm running
    statistics): ``train()`` is a no-op so that an enclosing module cannot switch them back.
    """

    name: str = ""
    modality: str = ""
    out_dim: int = 0

    def __init__(self):
        super().__init__()
        self._weights_source = "none"

    def train(self, mode: bool = True):  # noqa: D401 - frozen on purpose
        return super().train(False)

    def freeze(self):
        for p in self.parameters():
            p.requires_grad_(False)
        for b in self.buffers():
            b.requires_grad_(False)
        super().train(False)
        return self

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 4 or x.shape[1] != 3:
            raise ValueError(f"{self.name}: expected a (B, 3, S, S) batch, got {tuple(x.shape)}")
        return self.extract(x)

    @abc.abstractmethod
    def extract(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) input batch -> (B, out_dim, S, S) features on the grid."""

    def weights_hash(self) -> str:
        """Short SHA-256 of the parameters and buffers (identifies the weights in checkpoints)."""
        digest = hashlib.sha256()
        for key, tensor in sorted(self.state_dict().items()):
            digest.update(key.encode())
            digest.update(tensor.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
        return digest.hexdigest()[:16]

    def describe(self) -> dict:
        """Metadata recorded in checkpoints."""
        return {"name": self.name, "modality": self.modality, "out_dim": self.out_dim,
                "weights": self._weights_source, "weights_hash": self.weights_hash()}


def valid_mask_from_xyz(xyz: torch.Tensor) -> torch.Tensor:
    """(B, S, S) bool mask of pixels with a point (not exactly (0, 0, 0))."""
    return (xyz != 0).any(dim=1)


_REGISTRY: dict[str, Callable[..., FeatureExtractor]] = {}


def register(name: str):
    """Class or function decorator adding an extractor constructor to the registry."""
    def wrap(factory):
        if name in _REGISTRY:
            raise ValueError(f"extractor {name!r} registered twice")
        _REGISTRY[name] = factory
        return factory
    return wrap


def available() -> list[str]:
    return sorted(_REGISTRY)


def extractor_options(name: str) -> set[str]:
    """The keyword options of extractor ``name`` besides ``weights`` and ``grid``."""
    import inspect

    if name not in _REGISTRY:
        raise CheckpointError(f"unknown feature extractor {name!r}; available: {', '.join(available())}")
    return set(inspect.signature(_REGISTRY[name]).parameters) - {"self", "weights", "grid"}


def build_extractor(name: str, weights: str | None = None, **kwargs) -> FeatureExtractor:
    """Build a frozen, eval-mode extractor by registry name.

    weights: path of a weight file for extractors that need one (dino_vitb8, pointmae); a missing,
    truncated or mismatched file raises CheckpointError naming the file and the problem.
    """
    if name not in _REGISTRY:
        raise CheckpointError(f"unknown feature extractor {name!r}; available: {', '.join(available())}")
    extractor = _REGISTRY[name](weights=weights, **kwargs)
    return extractor.freeze()
