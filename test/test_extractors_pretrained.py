"""DINO ViT-B/8 and Point-MAE extractors loaded from files of the official layouts.

The real weights cannot be downloaded here, so the files are built with random values from the
layouts written down in docs/checkpoints.md (not from our own modules' state dicts, so a naming or
shape slip in the modules fails these tests) and go through ``build_extractor``, the users' path.
DINO forward passes cost seconds on CPU: the whole file runs two of them.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import save_file

from mafr_ros.core.align import feature_valid_mask
from mafr_ros.core.extractors import build_extractor
from mafr_ros.errors import CheckpointError, InputError

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "mvtec3d" / "cable_gland"
GRID = 224


# ----------------------------------------------------------------------------------------------
# Layouts transcribed from docs/checkpoints.md
# ----------------------------------------------------------------------------------------------
def dino_vitb8_layout() -> dict[str, tuple[int, ...]]:
    """The 150 tensors of timm's vit_base_patch8_224.dino / DINO's dino_vitbase8_pretrain.pth."""
    layout = {"cls_token": (1, 1, 768), "pos_embed": (1, 785, 768),
              "patch_embed.proj.weight": (768, 3, 8, 8), "patch_embed.proj.bias": (768,)}
    for i in range(12):
        p = f"blocks.{i}."
        layout.update({
            p + "norm1.weight": (768,), p + "norm1.bias": (768,),
            p + "attn.qkv.weight": (2304, 768), p + "attn.qkv.bias": (2304,),
            p + "attn.proj.weight": (768, 768), p + "attn.proj.bias": (768,),
            p + "norm2.weight": (768,), p + "norm2.bias": (768,),
            p + "mlp.fc1.weight": (3072, 768), p + "mlp.fc1.bias": (3072,),
            p + "mlp.fc2.weight": (768, 3072), p + "mlp.fc2.bias": (768,)})
    layout.update({"norm.weight": (768,), "norm.bias": (768,)})
    assert len(layout) == 150
    return layout


def pointmae_encoder_layout() -> dict[str, tuple[int, ...]]:
    """The 156 encoder tensors of Point-MAE's pretrain.pth after stripping module./MAE_encoder."""
    layout: dict[str, tuple[int, ...]] = {}

    def batch_norm(prefix: str, n: int):
        layout.update({prefix + "weight": (n,), prefix + "bias": (n,), prefix + "running_mean": (n,),
                       prefix + "running_var": (n,), prefix + "num_batches_tracked": ()})

    layout.update({"encoder.first_conv.0.weight": (128, 3, 1), "encoder.first_conv.0.bias": (128,)})
    batch_norm("encoder.first_conv.1.", 128)
    layout.update({"encoder.first_conv.3.weight": (256, 128, 1), "encoder.first_conv.3.bias": (256,),
                   "encoder.second_conv.0.weight": (512, 512, 1), "encoder.second_conv.0.bias": (512,)})
    batch_norm("encoder.second_conv.1.", 512)
    layout.update({"encoder.second_conv.3.weight": (384, 512, 1), "encoder.second_conv.3.bias": (384,),
                   "pos_embed.0.weight": (128, 3), "pos_embed.0.bias": (128,),
                   "pos_embed.2.weight": (384, 128), "pos_embed.2.bias": (384,)})
    for i in range(12):
        p = f"blocks.blocks.{i}."
        layout.update({
            p + "norm1.weight": (384,), p + "norm1.bias": (384,), p + "attn.qkv.weight": (1152, 384),
            p + "attn.proj.weight": (384, 384), p + "attn.proj.bias": (384,),
            p + "norm2.weight": (384,), p + "norm2.bias": (384,),
            p + "mlp.fc1.weight": (1536, 384), p + "mlp.fc1.bias": (1536,),
            p + "mlp.fc2.weight": (384, 1536), p + "mlp.fc2.bias": (384,)})
    layout.update({"norm.weight": (384,), "norm.bias": (384,)})
    assert len(layout) == 156
    return layout


def random_tensors(layout: dict[str, tuple[int, ...]], seed: int) -> dict[str, torch.Tensor]:
    """Random values with sane magnitudes (norm scales ~1, positive BatchNorm variances)."""
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for key, shape in layout.items():
        if key.endswith("num_batches_tracked"):
            out[key] = torch.tensor(123456, dtype=torch.long)
        elif key.endswith("running_var"):
            out[key] = torch.rand(shape, generator=gen) + 0.5
        elif ("norm" in key or key.endswith(".1.weight")) and key.endswith("weight") and len(shape) == 1:
            out[key] = 1.0 + 0.1 * torch.randn(shape, generator=gen)
        else:
            out[key] = 0.02 * torch.randn(shape, generator=gen)
    return out


def pointmae_release(encoder: dict[str, torch.Tensor]) -> dict:
    """A pretrain.pth-shaped dict: DDP prefixes, encoder and some pre-training decoder entries."""
    base = {f"module.MAE_encoder.{k}": v for k, v in encoder.items()}
    base.update({"module.mask_token": torch.zeros(1, 1, 384),
                 "module.decoder_pos_embed.0.weight": torch.zeros(128, 3),
                 "module.MAE_decoder.blocks.0.norm1.weight": torch.ones(384),
                 "module.MAE_decoder.norm.bias": torch.zeros(384),
                 "module.increase_dim.0.weight": torch.zeros(96, 384, 1)})
    # The release keeps training metadata next to the weights, metrics as NumPy scalars.
    return {"base_model": base, "epoch": 300, "metrics": {"acc": np.float64(91.7)}}


# ----------------------------------------------------------------------------------------------
# Real inputs and weight files
# ----------------------------------------------------------------------------------------------
def nearest_resized_xyz(name: str, size: int) -> torch.Tensor:
    """(1, 3, size, size) organised cloud; nearest neighbour so no invalid zeros get blended in."""
    xyz = tifffile.imread(DATA / "train" / "good" / "xyz" / name)
    pick = (np.arange(size) * xyz.shape[0]) // size
    return torch.from_numpy(np.ascontiguousarray(xyz[pick][:, pick].transpose(2, 0, 1)))[None]


@pytest.fixture(scope="module")
def rgb() -> torch.Tensor:
    image = Image.open(DATA / "train" / "good" / "rgb" / "000.png").convert("RGB")
    array = np.asarray(image.resize((GRID, GRID), Image.BILINEAR), dtype=np.float32) / 255.0
    array = (array - np.array([0.485, 0.456, 0.406])) / np.array([0.229, 0.224, 0.225])
    return torch.from_numpy(array.transpose(2, 0, 1).astype(np.float32))[None]


@pytest.fixture(scope="module")
def dino_state() -> dict[str, torch.Tensor]:
    return random_tensors(dino_vitb8_layout(), seed=8)


@pytest.fixture(scope="module")
def dino_files(tmp_path_factory, dino_state):
    folder = tmp_path_factory.mktemp("dino")
    files = {"safetensors": folder / "model.safetensors", "pth": folder / "dino_vitbase8_pretrain.pth"}
    save_file(dino_state, str(files["safetensors"]))
    torch.save(dino_state, files["pth"])
    yield files
    for path in folder.iterdir():  # ~350 MB each: do not leave them in pytest's kept tmp dirs
        path.unlink()


@pytest.fixture(scope="module")
def pointmae_state() -> dict[str, torch.Tensor]:
    return random_tensors(pointmae_encoder_layout(), seed=3)


@pytest.fixture(scope="module")
def pointmae_file(tmp_path_factory, pointmae_state):
    path = tmp_path_factory.mktemp("pointmae") / "pretrain.pth"
    torch.save(pointmae_release(pointmae_state), path)
    yield path
    path.unlink()


@pytest.fixture(scope="module")
def pointmae(pointmae_file):
    return build_extractor("pointmae", weights=str(pointmae_file))


def assert_frozen_eval(extractor):
    extractor.train()  # an enclosing module switching to training must not reach the backbone
    assert not any(module.training for module in extractor.modules())
    assert not any(p.requires_grad for p in extractor.parameters())


# ----------------------------------------------------------------------------------------------
# DINO ViT-B/8
# ----------------------------------------------------------------------------------------------
def test_dino_timm_safetensors_loads_and_runs_deterministically(dino_files, dino_state, rgb):
    extractor = build_extractor("dino_vitb8", weights=str(dino_files["safetensors"]))
    loaded = extractor.vit.state_dict()
    assert loaded.keys() == dino_state.keys()
    assert all(torch.equal(loaded[k], dino_state[k]) for k in dino_state)
    assert extractor.describe()["weights"] == str(dino_files["safetensors"])

    first = extractor(rgb)
    assert first.shape == (1, 768, GRID, GRID) and first.dtype == torch.float32
    assert torch.isfinite(first).all() and first.abs().amax() > 0
    assert_frozen_eval(extractor)
    assert torch.equal(extractor(rgb), first)


def test_dino_original_pth_loads(dino_files, dino_state):
    extractor = build_extractor("dino_vitb8", weights=str(dino_files["pth"]))
    loaded = extractor.vit.state_dict()
    assert all(torch.equal(loaded[k], dino_state[k]) for k in dino_state)
    with pytest.raises(InputError, match="224"):
        extractor(torch.zeros(1, 3, 112, 112))  # refused before any compute


def _truncated_copy(source: Path, target: Path) -> Path:
    data = source.read_bytes()
    target.write_bytes(data[: len(data) // 2])
    return target


@pytest.mark.parametrize("case, expected", [
    ("missing", "does not exist"),
    ("truncated_pth", "truncated or not a PyTorch/safetensors file"),
    ("truncated_safetensors", "truncated or not a PyTorch/safetensors file"),
    ("not_a_checkpoint", "truncated or not a PyTorch/safetensors file"),
    ("wrong_shape", r"pos_embed \(1, 197, 768\) \(expected \(1, 785, 768\)\)"),
    ("missing_key", r"1 missing keys: blocks\.11\.mlp\.fc2\.bias"),
])
def test_dino_bad_weight_files_fail_loudly(case, expected, dino_files, dino_state, tmp_path):
    path = tmp_path / f"{case}.pth"
    if case == "truncated_pth":
        _truncated_copy(dino_files["pth"], path)
    elif case == "truncated_safetensors":
        path = _truncated_copy(dino_files["safetensors"], tmp_path / "model.safetensors")
    elif case == "not_a_checkpoint":
        path.write_bytes(np.random.default_rng(0).bytes(4096))
    elif case == "wrong_shape":  # e.g. a ViT-B/16 file: 14 x 14 patches + CLS
        torch.save({**dino_state, "pos_embed": torch.zeros(1, 197, 768)}, path)
    elif case == "missing_key":
        torch.save({k: v for k, v in dino_state.items() if k != "blocks.11.mlp.fc2.bias"}, path)
    with pytest.raises(CheckpointError, match=expected) as error:
        build_extractor("dino_vitb8", weights=str(path))
    assert str(path) in str(error.value)
    path.unlink(missing_ok=True)


def test_extractors_need_a_file_or_explicit_random_init():
    for name in ("dino_vitb8", "pointmae"):
        with pytest.raises(CheckpointError, match="download .*random_init=True"):
            build_extractor(name)
        with pytest.raises(CheckpointError, match="choose one"):
            build_extractor(name, weights="/nonexistent.pth", random_init=True)
    untrained = build_extractor("pointmae", random_init=True)
    assert untrained.describe()["weights"].startswith("random-init")
    # Reproducible untrained weights (benchmarks compare runs), and the global RNG left alone.
    state = torch.random.get_rng_state()
    assert untrained.weights_hash() == build_extractor("pointmae", random_init=True).weights_hash()
    assert torch.equal(torch.random.get_rng_state(), state)


# ----------------------------------------------------------------------------------------------
# Point-MAE
# ----------------------------------------------------------------------------------------------
def test_pointmae_release_file_loads_and_runs(pointmae, pointmae_file, pointmae_state):
    loaded = pointmae.state_dict()
    assert loaded.keys() == pointmae_state.keys()
    assert all(torch.equal(loaded[k], pointmae_state[k]) for k in pointmae_state)
    assert pointmae.describe()["weights"] == str(pointmae_file)

    xyz = nearest_resized_xyz("000.tiff", GRID)
    first = pointmae(xyz)
    assert first.shape == (1, 1152, GRID, GRID) and first.dtype == torch.float32
    assert torch.isfinite(first).all()
    # Features exactly on the valid pixels and their 8-neighbours (the centred 3x3 mean), nowhere
    # else: any shift of the grid against the input would break this equality.
    valid = (xyz != 0).any(dim=1, keepdim=True).float()
    reach = F.max_pool2d(valid, 3, stride=1, padding=1)[:, 0] > 0
    assert torch.equal(feature_valid_mask(first), reach)


def test_pointmae_group_encoder_matches_release_formulation(pointmae):
    groups = 0.01 * torch.randn(40, 128, 3, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        torch.testing.assert_close(pointmae.encoder(groups), pointmae.encoder.forward_reference(groups),
                                   rtol=1e-5, atol=1e-5)


def test_pointmae_deterministic_and_batch_with_padding_matches_single_clouds(pointmae_file):
    # 64 groups of 16: the same network and code path as 1024 x 128, at a fraction of the cost.
    small = build_extractor("pointmae", weights=str(pointmae_file), n_groups=64, group_size=16)
    a = nearest_resized_xyz("000.tiff", 48)
    b = nearest_resized_xyz("001.tiff", 48)
    b[..., :10] = 0  # fewer valid points: this item is padded in the batch
    assert (a != 0).any(dim=1).sum() > (b != 0).any(dim=1).sum()
    single_a = small(a)
    assert_frozen_eval(small)
    assert torch.equal(small(a), single_a)  # eval BatchNorm, no DropPath: bit-identical
    batched = small(torch.cat([a, b]))
    torch.testing.assert_close(batched[:1], single_a, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(batched[1:], small(b), rtol=1e-4, atol=1e-5)


def test_pointmae_needs_1024_finite_valid_points():
    extractor = build_extractor("pointmae", random_init=True)
    xyz = nearest_resized_xyz("000.tiff", GRID)
    keep = torch.zeros(GRID * GRID, dtype=torch.bool)
    keep[(xyz != 0).any(dim=1).flatten().nonzero()[:1000, 0]] = True
    xyz *= keep.view(1, 1, GRID, GRID)
    with pytest.raises(InputError, match="only 1000 valid 3D points.*at least 1024: check the depth/ROI"):
        extractor(xyz)
    xyz[0, 2, 0, 0] = float("nan")
    with pytest.raises(InputError, match="NaN"):
        extractor(xyz)


@pytest.mark.parametrize("case, expected", [
    ("missing", "does not exist"),
    ("truncated", "truncated or not a PyTorch/safetensors file"),
    ("not_a_checkpoint", "truncated or not a PyTorch/safetensors file"),
    ("plain_state_dict", "no 'base_model'"),
    ("wrong_shape", r"encoder\.second_conv\.3\.weight \(256, 512, 1\) \(expected \(384, 512, 1\)\)"),
    ("missing_key", r"1 missing keys: blocks\.blocks\.11\.mlp\.fc2\.bias"),
    ("unexpected_key", r"1 unexpected keys: cls_token"),
    ("python_objects", r"holds Python objects besides tensors .*argparse\.Namespace"),
])
def test_pointmae_bad_weight_files_fail_loudly(case, expected, pointmae_file, pointmae_state, tmp_path):
    path = tmp_path / f"{case}.pth"
    state = dict(pointmae_state)
    if case == "truncated":
        _truncated_copy(pointmae_file, path)
    elif case == "not_a_checkpoint":
        path.write_text("this is a README, not weights\n" * 100)
    elif case == "plain_state_dict":
        torch.save(state, path)
    elif case == "python_objects":  # loading would have to unpickle arbitrary classes
        torch.save({**pointmae_release(state), "args": argparse.Namespace(npoints=1024)}, path)
    elif case in ("wrong_shape", "missing_key", "unexpected_key"):
        if case == "wrong_shape":
            state["encoder.second_conv.3.weight"] = torch.zeros(256, 512, 1)
        elif case == "missing_key":
            del state["blocks.blocks.11.mlp.fc2.bias"]
        else:  # a fine-tuned classification file carries a CLS token
            state["cls_token"] = torch.zeros(1, 1, 384)
        torch.save(pointmae_release(state), path)
    with pytest.raises(CheckpointError, match=expected) as error:
        build_extractor("pointmae", weights=str(path))
    assert str(path) in str(error.value)
    path.unlink(missing_ok=True)
