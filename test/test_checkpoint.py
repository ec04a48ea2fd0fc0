"""The checkpoint file: one safetensors file, metadata in its header, every failure named."""
import json

import pytest
import torch

from mafr_ros.core.checkpoint import (FORMAT_VERSION, check_state_dict, load_checkpoint,
                                      read_metadata, save_checkpoint)
from mafr_ros.errors import CheckpointError

META = {"profile": "lite", "extractors": {}, "heads": {}, "preprocess": {}, "scoring": {},
        "thresholds": {"image": 1.0}, "model_id": "unit"}


@pytest.fixture()
def saved(tmp_path):
    module = torch.nn.Linear(4, 3)
    path = save_checkpoint(tmp_path / "m.safetensors", module.state_dict(), META)
    return module, path


def test_round_trip_and_metadata(saved):
    module, path = saved
    state, meta = load_checkpoint(path)
    assert meta["model_id"] == "unit" and meta["format_version"] == FORMAT_VERSION
    assert read_metadata(path) == meta
    for key, value in module.state_dict().items():
        assert torch.equal(state[key], value)
    check_state_dict(module.state_dict(), state, path, "unit", "retrain")
    assert not list(path.parent.glob("*.tmp"))  # written atomically


def test_missing_file(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "nope.safetensors")


def test_truncated_file(saved):
    _, path = saved
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 20])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        load_checkpoint(path)


def test_not_a_checkpoint(tmp_path):
    path = tmp_path / "random.safetensors"
    path.write_bytes(b"\x00\x01garbage" * 100)
    with pytest.raises(CheckpointError, match=str(path.name)):
        load_checkpoint(path)


def test_foreign_safetensors_without_metadata(tmp_path):
    from safetensors.torch import save_file
    path = tmp_path / "foreign.safetensors"
    save_file({"w": torch.zeros(2)}, str(path))
    with pytest.raises(CheckpointError, match="not a MAFR checkpoint"):
        load_checkpoint(path)


def test_newer_format_is_refused(tmp_path):
    from safetensors.torch import save_file
    path = tmp_path / "future.safetensors"
    meta = dict(META, format="mafr_ros.checkpoint", format_version=FORMAT_VERSION + 1)
    save_file({"w": torch.zeros(2)}, str(path), metadata={"mafr_ros": json.dumps(meta)})
    with pytest.raises(CheckpointError, match="newer than this mafr_ros"):
        read_metadata(path)


def test_state_dict_mismatches_are_named(saved):
    module, path = saved
    state, _ = load_checkpoint(path)
    expected = module.state_dict()
    with pytest.raises(CheckpointError, match="1 missing keys: bias"):
        check_state_dict(expected, {"weight": state["weight"]}, path, "unit", "retrain")
    with pytest.raises(CheckpointError, match=r"wrong shape: weight \(2, 2\) \(expected \(3, 4\)\)"):
        check_state_dict(expected, {"weight": torch.zeros(2, 2), "bias": state["bias"]}, path, "unit",
                         "retrain")
    with pytest.raises(CheckpointError, match="1 unexpected keys: extra"):
        check_state_dict(expected, dict(state, extra=torch.zeros(1)), path, "unit", "retrain")
