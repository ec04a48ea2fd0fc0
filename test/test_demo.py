"""`mafr demo` end to end on a reduced test split: synthetic parts -> embedded model -> bag -> the
node process fed by the player -> report files with sane metrics and the line saying where to look."""
import json
import math
import os
import subprocess
import sys
import time

import psutil
import pytest

from mafr_ros.bag.reader import bag_info

pytestmark = [pytest.mark.ros]


def _demo_nodes(since: float) -> list:
    """Node processes of a demo started after ``since`` in this test's ROS domain."""
    found = []
    for proc in psutil.process_iter(["cmdline", "create_time"]):
        try:
            cmdline = " ".join(proc.info["cmdline"] or [])
            if ("mafr_ros.ros.node" in cmdline and "__ns:=/mafr_demo" in cmdline
                    and proc.info["create_time"] >= since
                    and proc.environ().get("ROS_DOMAIN_ID") == os.environ["ROS_DOMAIN_ID"]):
                found.append(proc)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return found


def test_demo_writes_the_report_of_the_live_node(tmp_path, processes):
    out = tmp_path / "demo"
    started = time.time() - 1
    done = subprocess.run([sys.executable, "-m", "mafr_ros.cli", "demo", "--out", str(out),
                           "--test-good", "2", "--test-per-defect", "1", "--device", "cpu"],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, (done.stdout[-2000:], done.stderr[-3000:])
    assert not _demo_nodes(started), "the demo left its node process running"
    report = out / "report"
    last = done.stdout.strip().splitlines()[-1]
    assert last.startswith("done in ") and str(report / "report.md") in last
    assert str(report / "overlays") in last

    # The bag: 2 good + 5 defect types x 1, every frame answered by the node.
    info = bag_info(out / "bag")
    assert info.topic("/camera/rgb/image_rect_color").count == 7
    metrics = json.loads((report / "metrics.json").read_text())
    assert metrics["mode"] == "live" and metrics["n_frames"] == 7 and metrics["n_missing"] == 0
    assert (metrics["n_good"], metrics["n_defect"]) == (2, 5)
    for key in ("i_auroc", "p_auroc", "aupro"):
        assert math.isfinite(metrics[key]) and 0.0 <= metrics[key] <= 1.0, key
    # The lite model finds the synthetic defects' pixels far better than chance.
    assert metrics["p_auroc"] > 0.7
    assert all(f["score"] is not None and f["score"] > 0 for f in metrics["frames"])

    text = (report / "report.md").read_text()
    assert "I-AUROC" in text and "AUPRO" in text and "live" in text
    for name in ("roc.png", "pro.png", "report.json", "node.log"):
        assert (report / name).stat().st_size > 0, name
    overlays = sorted((report / "overlays").glob("*.png"))
    assert len(overlays) == 7 and all(p.stat().st_size > 10_000 for p in overlays)
    recorded = bag_info(report / "node_results")
    assert recorded.topic("/mafr_demo/mafr/anomaly").count == 7
