"""pytest harness for tests that run the node on bags: start node processes, play bags (in this
process through a replay participant, or with `mafr bag play` as a process of its own), collect
the node's outputs, and tear everything down even when a test fails.

Fixtures (imported into test/conftest.py):

* ``processes`` (module scope): a :class:`ProcessGuard` that starts node and player processes,
  each in a process group of its own, and at the end of the module stops them (SIGINT, then
  SIGKILL to the group) and checks with psutil that none of them, and nothing they started, is
  left running.
* ``synthetic_bags`` (session scope): ``synthetic_bags(name, **options)`` writes (once per set of
  options) a small synthetic dataset and its bag with `mafr bag make`, returns a :class:`MadeBag`.

Every process inherits ROS_DOMAIN_ID and ROS_AUTOMATIC_DISCOVERY_RANGE=LOCALHOST from conftest.
MAFR_TEST_CHECKPOINT, when set, replaces the embedded model in the nodes started here.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest

REPO = Path(__file__).resolve().parents[1]


def _group_members(pgid: int) -> list[psutil.Process]:
    """Live processes of process group ``pgid`` (zombies excluded: they are only awaiting reaping)."""
    members = []
    for proc in psutil.process_iter(["pid", "status"]):
        try:
            if os.getpgid(proc.pid) == pgid and proc.info["status"] != psutil.STATUS_ZOMBIE:
                members.append(proc)
        except (ProcessLookupError, psutil.NoSuchProcess, PermissionError):
            continue
    return members


def _running(proc: psutil.Process) -> bool:
    try:
        return proc.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


class PlayerProcess:
    """`mafr bag play BAG ...` in a process group of its own, output to ``log_path``."""

    def __init__(self, bag, args=(), log_path=None):
        self.args = [sys.executable, "-m", "mafr_ros.cli", "bag", "play", str(bag), *map(str, args)]
        self.log_path = Path(log_path)
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(self.args, stdout=self._log, stderr=subprocess.STDOUT,
                                     start_new_session=True, cwd=REPO)
        self.pid = self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def log(self) -> str:
        self._log.flush()
        return self.log_path.read_text(errors="replace")

    def kill(self) -> int:
        """SIGKILL the player's whole group (a crash, as far as the graph can tell)."""
        try:
            os.killpg(self.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        return self.proc.wait(10)

    def stop(self, timeout: float = 10.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                pass
        self.kill()
        if not self._log.closed:
            self._log.close()
        return self.proc.returncode


class ProcessGuard:
    """Starts node / player processes and guarantees their teardown (see the module docstring)."""

    def __init__(self, log_dir: Path):
        self.log_dir = Path(log_dir)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.started: list = []
        self.replays: list = []
        self._count = 0

    def _log(self, stem: str) -> Path:
        self._count += 1
        return self.log_dir / f"{self._count:02d}_{stem}.log"

    def node(self, namespace: str, params: dict | None = None, params_file=None):
        """A node process (mafr_ros.bag.live.NodeProcess) with the test checkpoint, if any."""
        from mafr_ros.bag.live import NodeProcess

        params = dict(params or {})
        checkpoint = os.environ.get("MAFR_TEST_CHECKPOINT")
        if checkpoint and "checkpoint" not in params:
            params["checkpoint"] = checkpoint
        node = NodeProcess(namespace, params, self._log(namespace.strip("/").replace("/", "_")),
                           params_file=params_file)
        self.started.append(node)
        return node

    def player(self, bag, *args):
        player = PlayerProcess(bag, args, self._log("player"))
        self.started.append(player)
        return player

    def replay(self, bag, node_name: str, **options):
        """A LiveReplay participant in this process (closed at teardown)."""
        from mafr_ros.bag.live import LiveReplay

        replay = LiveReplay(bag, node_name, **options)
        self.replays.append(replay)
        return replay

    def teardown(self) -> list[str]:
        """Stop everything; returns a description of every process that had to be found and
        killed after its own stop (should be empty)."""
        for replay in reversed(self.replays):
            replay.close()
        leftovers = []
        for proc in reversed(self.started):
            proc.stop()
        for proc in self.started:
            for member in _group_members(proc.pid):
                leftovers.append(f"{member.pid} {member.name()} (group of {proc.args[:4]})")
                member.kill()
        return leftovers


@pytest.fixture(scope="module")
def processes(tmp_path_factory):
    guard = ProcessGuard(tmp_path_factory.mktemp("procs"))
    children_before = {p.pid for p in psutil.Process().children(recursive=True)}
    try:
        yield guard
    finally:
        leftovers = guard.teardown()
        deadline = time.monotonic() + 10
        while True:  # the node's exit may take a moment to be reaped by the kernel
            orphans = [p for p in psutil.Process().children(recursive=True)
                       if p.pid not in children_before and _running(p)]
            if not orphans or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        assert not leftovers, f"processes survived their stop: {leftovers}"
        assert not orphans, f"child processes left running: {[(p.pid, p.cmdline()[:4]) for p in orphans]}"


@dataclass(frozen=True)
class MadeBag:
    path: Path
    dataset: Path
    category: str
    frames: int
    topics: object  # mafr_ros.bag.layout.BagTopics


@pytest.fixture(scope="session")
def synthetic_bags(tmp_path_factory):
    """``make(name, n_test_good=4, n_test_per_defect=2, size=256, rate=10.0, inputs='both',
    limit=None, seed=12345, namespace='/camera', start_s=1.7e9)`` -> MadeBag (synthetic parts
    of the embedded model's category; frame 0 stamped ``start_s``). Bags are made once per name."""
    from mafr_ros.bag.make import make_bag
    from mafr_ros.core.checkpoint import read_metadata
    from mafr_ros.core.detector import default_model_path
    from mafr_ros.data.synthetic import generate_dataset

    root = tmp_path_factory.mktemp("synthetic_bags")
    made: dict = {}
    checkpoint = os.environ.get("MAFR_TEST_CHECKPOINT") or default_model_path()
    category = read_metadata(checkpoint)["category"]

    def make(name: str, *, n_test_good: int = 4, n_test_per_defect: int = 2, size: int = 256,
             rate: float = 10.0, inputs: str = "both", limit: int | None = None,
             seed: int = 12345, namespace: str = "/camera",
             start_s: int = 1_700_000_000) -> MadeBag:
        key = (n_test_good, n_test_per_defect, size, seed)
        dataset = root / "data_{}_{}_{}_{}".format(*key)
        if key not in made:
            generate_dataset(dataset, seed=seed, categories=[category], n_train=1,
                             n_validation=1, n_test_good=n_test_good,
                             n_test_per_defect=n_test_per_defect, size=size)
            made[key] = True
        out = root / name
        if not out.exists():
            make_bag(dataset, category, out, rate=rate, inputs=inputs, limit=limit,
                     namespace=namespace, start_ns=int(start_s) * 10 ** 9, progress=False)
        from mafr_ros.bag.evaluate import inspect_bag
        bag_layout = inspect_bag(out)
        return MadeBag(out, dataset, category, bag_layout.frames, bag_layout.topics)

    return make
