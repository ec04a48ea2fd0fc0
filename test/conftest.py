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


@pytest.fixture(scope="session")
def synthetic_dataset(tmp_path_factory):
    """``make(seed=..., n_train=..., ...) -> ROOT``: a synthetic MVTec 3D-AD dataset
    (``mafr_ros.data.synthetic.generate_dataset``, one ``gland`` category unless ``categories``
    says otherwise), generated once per distinct set of arguments in this test session and shared
    by the tests that ask for the same one. Tests read it only (the preprocessing cache and all
    outputs live elsewhere)."""
    from mafr_ros.data.synthetic import generate_dataset

    made: dict = {}

    def make(*, seed: int, n_train: int, n_validation: int, n_test_good: int,
             n_test_per_defect: int, size: int, categories=("gland",)) -> Path:
        key = (seed, n_train, n_validation, n_test_good, n_test_per_defect, size, tuple(categories))
        if key not in made:
            root = tmp_path_factory.mktemp("synthetic_" + "_".join(map(str, key[:6])))
            generate_dataset(root, seed=seed, categories=list(categories), n_train=n_train,
                             n_validation=n_validation, n_test_good=n_test_good,
                             n_test_per_defect=n_test_per_defect, size=size)
            made[key] = root
        return made[key]

    return make


# The bag/node harness (test/bag_harness.py): fixtures `processes` and `synthetic_bags`.
from bag_harness import processes, synthetic_bags  # noqa: E402,F401
