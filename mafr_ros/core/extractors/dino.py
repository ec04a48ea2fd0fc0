"""Frozen DINO ViT-B/8 RGB extractor (MAFR's 2D backbone) and checked loading of weight files.

The weights are never downloaded: the user fetches them once on a machine with internet and points
the configuration at the file. Two layouts load (see docs/checkpoints.md): the original DINO release
``dino_vitbase8_pretrain.pth`` (plain state dict) and timm's ``vit_base_patch8_224.dino``
safetensors file; both use timm's key names. Loading is strict: the published MAFR/CFM/M3DM code
loads with strict=False and silently runs with random weights when the file is wrong.
"""
from __future__ import annotations

import pickle
import zipfile
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from ...errors import CheckpointError, InputError
from ..align import upsample_patch_features
from ..checkpoint import check_state_dict
from .base import FeatureExtractor, register

DINO_DOWNLOAD_HINT = (
    "download dino_vitbase8_pretrain.pth "
    "(https://dl.fbaipublicfiles.com/dino/dino_vitbase8_pretrain/dino_vitbase8_pretrain.pth) or timm's "
    "vit_base_patch8_224.dino model.safetensors (https://huggingface.co/timm/vit_base_patch8_224.dino) "
    "on a machine with internet and point the configuration's dino_vitb8 weights at the file")

def _numpy_scalar_globals() -> list:
    """NumPy scalar and dtype constructors, allowed on top of weights_only's tensor-only default.

    Training scripts often store metrics as NumPy scalars next to the weights (Point-MAE's release
    file keeps an accuracy entry); rebuilding a scalar runs no arbitrary code. The pickle names the
    constructor under NumPy 1's path or NumPy 2's, so both are listed.
    """
    import numpy as np

    core = np._core if hasattr(np, "_core") else np.core
    scalar = core.multiarray.scalar
    allowed: list = [np.dtype, (scalar, "numpy.core.multiarray.scalar"),
                     (scalar, "numpy._core.multiarray.scalar")]
    dtypes = getattr(np, "dtypes", None)  # NumPy >= 1.25 pickles dtypes as numpy.dtypes.*DType
    if dtypes is not None:
        allowed += [getattr(dtypes, name) for name in dir(dtypes) if name.endswith("DType")]
    return allowed


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    first = text.splitlines()[0] if text else ""
    first = first.split(". ")[0]  # torch appends paragraphs of generic advice
    return f"{type(error).__name__}: {first}" if first else type(error).__name__


def read_weight_file(path: str | Path, download_hint: str) -> Mapping:
    """Read a PyTorch (.pth/.pt, zip or legacy) or safetensors file into a mapping, on the CPU.

    PyTorch files are read with weights_only=True: a weight file never needs to run code on load.
    Every failure becomes a CheckpointError naming the file; ``download_hint`` says where to get a
    good one.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise CheckpointError(f"weight file {path} does not exist: {download_hint}")
    with path.open("rb") as handle:
        head = handle.read(9)
    unreadable = (f"cannot read weight file {path}: truncated or not a PyTorch/safetensors file; "
                  f"{download_hint}")
    # torch.save writes a zip archive (legacy files start with a pickle opcode 0x80); safetensors
    # starts with an 8-byte little-endian header length followed by a JSON object.
    if head[:4] == b"PK\x03\x04" or head[:1] == b"\x80":
        try:
            with torch.serialization.safe_globals(_numpy_scalar_globals()):
                return torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as error:
            # torch wraps every unpickling failure as "Weights only load failed"; only an
            # "Unsupported global" means a readable file that holds more than tensors.
            detail = [line for line in str(error).splitlines() if "Unsupported global" in line]
            if detail:
                reason = detail[0].strip().split(". ")[0]
                raise CheckpointError(
                    f"weight file {path} holds Python objects besides tensors and is not loaded with "
                    f"weights_only=True ({reason}): load it once in a trusted session and re-save "
                    f"only its tensors with torch.save, or {download_hint}") from error
            raise CheckpointError(f"{unreadable} ({_first_line(error)})") from error
        except (RuntimeError, EOFError, OSError, zipfile.BadZipFile, ValueError) as error:
            raise CheckpointError(f"{unreadable} ({_first_line(error)})") from error
    if len(head) == 9 and head[8:9] == b"{":
        from safetensors import SafetensorError
        from safetensors.torch import load_file
        try:
            return load_file(str(path), device="cpu")
        except (SafetensorError, OSError, ValueError, RuntimeError) as error:
            raise CheckpointError(f"{unreadable} ({_first_line(error)})") from error
    raise CheckpointError(unreadable)


def load_vit_weights(model: nn.Module, path: str | Path) -> None:
    """Load a DINO ViT-B/8 weight file (DINO .pth or timm safetensors) into a timm ViT, strictly.

    Missing, unexpected or mis-shaped tensors, unreadable and absent files all raise CheckpointError
    naming the file; nothing is copied unless the whole file matches.
    """
    state = read_weight_file(path, DINO_DOWNLOAD_HINT)
    if not isinstance(state, Mapping):
        raise CheckpointError(f"weight file {path} holds a {type(state).__name__}, not a state dict: "
                              f"{DINO_DOWNLOAD_HINT}")
    check_state_dict(model.state_dict(), state, path, "DINO ViT-B/8", DINO_DOWNLOAD_HINT)
    load_checked_state(model, state)


def load_checked_state(model: nn.Module, state: Mapping[str, torch.Tensor]) -> None:
    """Load an already checked state dict, cast to the model's dtypes.

    A model built on the meta device (no memory, no random initialisation: the file replaces every
    tensor anyway) takes the file's tensors as its own (assign=True) instead of copying into them.
    """
    expected = model.state_dict()
    state = {k: v.to(dtype=expected[k].dtype) for k, v in state.items()}
    assign = any(t.is_meta for t in expected.values())
    model.load_state_dict(state, strict=True, assign=assign)


@register("dino_vitb8")
class DinoViTB8Extractor(FeatureExtractor):
    """DINO ViT-B/8 patch tokens on the pixel grid: (B, 3, S, S) RGB -> (B, 768, S, S).

    The ViT sees 224 x 224 (its positional embedding is learnt for 28 x 28 patches): a grid of another
    size is resized to 224 on the way in and the 28 x 28 tokens are upsampled to the grid on the way
    out. Weights: ``weights`` (a file), or ``random_init=True`` for an untrained network with the same
    compute (benchmarks, tests); one of the two is required.
    """

    name = "dino_vitb8"
    modality = "rgb"
    out_dim = 768
    input_size = 224

    def __init__(self, weights: str | Path | None = None, grid: int = 224, random_init: bool = False):
        super().__init__()
        import timm  # deferred: only this extractor needs timm

        if weights is None and not random_init:
            raise CheckpointError(f"dino_vitb8 needs a weight file and none is configured: "
                                  f"{DINO_DOWNLOAD_HINT} (or pass random_init=True for untrained "
                                  f"weights, for benchmarks only)")
        if weights is not None and random_init:
            raise CheckpointError("dino_vitb8: both a weight file and random_init=True were given; "
                                  "choose one")
        self.grid = int(grid)
        if weights is not None:
            with torch.device("meta"):  # every tensor comes from the file: skip 86 M random draws
                self.vit = timm.create_model("vit_base_patch8_224.dino", pretrained=False, num_classes=0)
            load_vit_weights(self.vit, weights)
            self._weights_source = str(Path(weights).expanduser())
        else:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(0)  # reproducible untrained weights, caller's RNG untouched
                self.vit = timm.create_model("vit_base_patch8_224.dino", pretrained=False, num_classes=0)
            self._weights_source = "random-init (seed 0)"
        self.freeze()

    def extract(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-2:] != (self.grid, self.grid):
            raise InputError(f"dino_vitb8: expected an RGB batch of {self.grid} x {self.grid} (the "
                             f"configured grid), got {tuple(x.shape)}: resize in preprocessing or "
                             f"set the extractor's grid")
        x = x.to(self.vit.cls_token.dtype)
        if self.grid != self.input_size:
            x = torch.nn.functional.interpolate(x, size=(self.input_size, self.input_size),
                                                mode="bilinear", align_corners=False, antialias=True)
        tokens = self.vit.forward_features(x)[:, self.vit.num_prefix_tokens:]  # drop CLS
        side = self.input_size // self.vit.patch_embed.patch_size[0]
        patch_map = tokens.transpose(1, 2).reshape(x.shape[0], tokens.shape[2], side, side)
        return upsample_patch_features(patch_map, self.grid).float()
