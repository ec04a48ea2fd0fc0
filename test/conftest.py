"""Shared test set-up: keep every ROS process on loopback, in a domain of its own."""
import os
import sys
from pathlib import Path

# Set before anything creates a DDS participant; child processes inherit them.
os.environ.setdefault("ROS_AUTOMATIC_DISCOVERY_RANGE", "LOCALHOST")
os.environ.setdefault("ROS_DOMAIN_ID", str(os.getpid() % 90 + 10))
# ament_index lookups need a prefix; the venv is laid out as one.
os.environ.setdefault("AMENT_PREFIX_PATH", sys.prefix)
# Tests run the model in this process and in node processes beside it: one intra-op thread each
# avoids oversubscribing the cores (small matrix products were 100x slower with 2 threads under load).
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")

import pytest  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        raise RuntimeError(f"the project's shared data folder is missing: {SHARED_DATA}")
    return SHARED_DATA


@pytest.fixture(scope="session")
def cable_gland(shared_data) -> Path:
    return shared_data / "mvtec3d" / "cable_gland"


@pytest.fixture(scope="session")
def kinect_dir(shared_data) -> Path:
    return shared_data / "kinect_rgbd"


# The bag/node harness (test/bag_harness.py): fixtures `processes` and `synthetic_bags`.
from bag_harness import processes, synthetic_bags  # noqa: E402,F401
