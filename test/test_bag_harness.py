"""The bag harness tears everything down when a test fails: an inner pytest run whose test starts
a node and a player (`mafr bag play --loop`) and then fails leaves none of their processes behind."""
import os
import time
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import psutil
import pytest

pytestmark = [pytest.mark.ros]

TEST_DIR = Path(__file__).resolve().parent


def test_failed_test_leaves_no_process_behind(synthetic_bags, tmp_path):
    bag = synthetic_bags("harness_small", n_test_good=1, n_test_per_defect=1, size=128,
                         inputs="depth")
    inner = tmp_path / "test_inner.py"
    inner.write_text(textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {str(TEST_DIR)!r})
        from bag_harness import processes  # noqa: F401  (the fixture under test)

        def test_fails_while_processes_run(processes):
            node = processes.node("/harness_inner_{os.getpid()}", {{"device": "cpu"}})
            player = processes.player({str(bag.path)!r}, "--loop", "--wait-for-subscribers", "600")
            print("PIDS", node.pid, player.pid, flush=True)
            assert node.alive() and player.alive()
            assert False, "deliberate failure"
    """))
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-s", "-p", "no:cacheprovider",
                           "--rootdir", str(tmp_path), str(inner)],
                          capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert "1 failed" in done.stdout and "deliberate failure" in done.stdout, done.stdout[-3000:]
    assert "error" not in done.stdout.splitlines()[-1], done.stdout[-3000:]  # teardown was clean
    pids = [int(p) for p in re.search(r"PIDS (\d+) (\d+)", done.stdout).groups()]
    for pid in pids:
        alive = psutil.pid_exists(pid) and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
        assert not alive, f"process {pid} survived the failed test"
        # the group's kill is asynchronous: members still exiting (or zombies awaiting their
        # reaper) get a few seconds; a process that keeps running after that is a leak
        deadline = time.monotonic() + 5.0
        while True:
            group = [p.pid for p in psutil.process_iter(["status"]) if _pgid(p.pid) == pid
                     and p.info["status"] != psutil.STATUS_ZOMBIE]
            if not group or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        assert not group, f"processes of group {pid} survived: {group}"


def _pgid(pid):
    try:
        return os.getpgid(pid)
    except (ProcessLookupError, PermissionError):
        return None
