"""`mafr eval --bag`: direct (read -> detector -> metrics) and live (bag -> node process ->
results -> metrics) evaluation of a bag written by `mafr bag make` from the test split of a small
synthetic dataset, against `mafr eval` on the dataset itself, with the embedded lite model."""
import json
import subprocess
import sys

import numpy as np
import pytest

from mafr_ros.core.detector import default_model_path
from mafr_ros.errors import InputError

METRICS = ("i_auroc", "p_auroc", "aupro")


@pytest.fixture(scope="module")
def bag(synthetic_bags):
    return synthetic_bags("eval_both", n_test_good=4, n_test_per_defect=2, inputs="both")


@pytest.fixture(scope="module")
def dataset_summary(bag, tmp_path_factory):
    from mafr_ros.evaluate import evaluate
    return evaluate(default_model_path(), bag.dataset, bag.category, device="cpu", progress=False,
                    cache_dir=tmp_path_factory.mktemp("cache"))


@pytest.fixture(scope="module")
def direct(bag, tmp_path_factory):
    """`mafr eval --bag` through the command line (direct evaluation)."""
    out = tmp_path_factory.mktemp("direct")
    done = subprocess.run([sys.executable, "-m", "mafr_ros.cli", "eval", "--bag", str(bag.path),
                           "--checkpoint", str(default_model_path()), "--device", "cpu",
                           "--json", str(out / "m.json")],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert '"mode": "direct"' in done.stdout
    return json.loads((out / "m.json").read_text())


@pytest.mark.slow
def test_direct_bag_evaluation_equals_dataset_evaluation(bag, direct, dataset_summary):
    assert direct["mode"] == "direct" and direct["n_frames"] == bag.frames == 14
    assert direct["category"] == bag.category
    assert (direct["n_good"], direct["n_defect"]) == (dataset_summary["n_good"],
                                                      dataset_summary["n_defect"]) == (4, 10)
    # The bag holds the dataset's own pixels and points (NaN instead of (0,0,0) where invalid):
    # the detector sees the same input, so every metric is the same number.
    for key in METRICS:
        assert direct[key] == pytest.approx(dataset_summary[key], abs=1e-9), key
    assert direct["grid"]["p_auroc"] == pytest.approx(dataset_summary["grid"]["p_auroc"], abs=1e-9)
    names = [f["name"] for f in direct["frames"]]
    assert len(set(names)) == 14 and all(n.startswith("test/") for n in names)
    assert sorted(f["label"] for f in direct["frames"]) == [0] * 4 + [1] * 10


@pytest.mark.ros
@pytest.mark.slow
def test_live_bag_evaluation_equals_direct(bag, direct, processes, tmp_path):
    """The node, fed the bag in lockstep, answers every frame with the direct raw score and a
    heatmap whose metrics are the direct ones (the normalised map is a monotone function of the
    raw map: ranks, hence AUROC and AUPRO, are kept up to float32 rounding)."""
    from mafr_ros.bag.evaluate import evaluate_bag_live
    from mafr_ros.bag.reader import read_messages

    report = tmp_path / "live"
    live = evaluate_bag_live(bag.path, default_model_path(), out_dir=report,
                             json_path=report / "m.json", device="cpu", progress=False,
                             namespace="/eval_live")
    assert live["mode"] == "live" and live["n_missing"] == 0, live["missing"]
    assert live["n_frames"] == 14
    direct_scores = {f["stamp_ns"]: f["score"] for f in direct["frames"]}
    live_scores = {f["stamp_ns"]: f["score"] for f in live["frames"]}
    assert live_scores.keys() == direct_scores.keys()
    for stamp, score in direct_scores.items():
        assert live_scores[stamp] == pytest.approx(score, rel=1e-5, abs=1e-6), stamp
    for key in METRICS:
        assert live[key] == pytest.approx(direct[key], abs=1e-6), key
    for limit, value in direct["aupro_limits"].items():
        assert live["aupro_limits"][limit] == pytest.approx(value, abs=1e-6), limit

    # The report of the live run, and the node's results recorded as a bag beside it.
    for name in ("report.md", "report.json", "roc.png", "pro.png", "node.log"):
        assert (report / name).is_file(), name
    assert len(list((report / "overlays").glob("*.png"))) == 12
    assert "I-AUROC" in (report / "report.md").read_text()
    from rclpy.serialization import deserialize_message

    from mafr_ros.bag.types import message_class
    recorded = list(read_messages(report / "node_results"))
    assert [m.msgtype for m in recorded] == ["mafr_ros/msg/AnomalyResult"] * 14
    results = [deserialize_message(m.data, message_class(m.msgtype)) for m in recorded]
    by_stamp = {r.header.stamp.sec * 10 ** 9 + r.header.stamp.nanosec: r for r in results}
    assert sorted(by_stamp) == sorted(direct_scores)
    for stamp, result in by_stamp.items():
        assert result.score == pytest.approx(live_scores[stamp], rel=1e-12)


@pytest.mark.ros
@pytest.mark.slow
def test_live_evaluation_reports_frames_the_node_did_not_answer(synthetic_bags, processes,
                                                               tmp_path):
    """A frame whose cloud is all NaN fails in the node (too_few_points): `mafr eval --live`
    names it as missing with the node's reason, scores the others and exits with status 1."""
    from corrupt_bags import rewrite_bag

    good = synthetic_bags("eval_small", n_test_good=2, n_test_per_defect=1, inputs="points")
    bad = tmp_path / "nan_cloud_bag"

    def blank_cloud(index, message, msg):
        if index == 1 and message.topic == good.topics.points:
            msg.data = np.full(len(msg.data) // 4, np.nan, dtype=np.float32).tobytes()
            return msg
        return None

    rewrite_bag(good.path, bad, blank_cloud)
    done = subprocess.run([sys.executable, "-m", "mafr_ros.cli", "eval", "--bag", str(bad),
                           "--live", "--checkpoint", str(default_model_path()), "--device", "cpu",
                           "--json", str(tmp_path / "m.json"), "--frame-timeout", "60"],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 1, (done.stdout, done.stderr[-3000:])
    assert (tmp_path / "m.json").is_file(), done.stderr[-3000:]
    summary = json.loads((tmp_path / "m.json").read_text())
    assert summary["n_frames"] == 7 and summary["n_missing"] == 1
    (missing,) = summary["missing"]
    assert missing["index"] == 1 and missing["reason"].startswith("too_few_points"), missing
    assert "1 of 7 frames got no result" in done.stderr and missing["name"] in done.stderr
    assert [f["score"] is None for f in summary["frames"]] == [i == 1 for i in range(7)]
    assert summary["n_good"] + summary["n_defect"] == 6


def test_bag_without_ground_truth_is_refused_clearly(synthetic_bags, tmp_path):
    from corrupt_bags import rewrite_bag
    from mafr_ros.bag.evaluate import evaluate_bag

    good = synthetic_bags("eval_small", n_test_good=2, n_test_per_defect=1, inputs="points")
    no_gt = tmp_path / "no_gt"
    rewrite_bag(good.path, no_gt, lambda i, m, msg: None, drop_topics={good.topics.gt_mask})
    with pytest.raises(InputError, match="gt/mask"):
        evaluate_bag(no_gt, default_model_path(), device="cpu", progress=False)


def test_eval_command_checks_its_arguments(tmp_path):
    from mafr_ros.cli import main
    assert main(["eval", "--live", "--dataset", str(tmp_path), "--checkpoint", "x"]) == 1
    assert main(["eval", "--dataset", str(tmp_path), "--checkpoint", "x"]) == 1  # no --category
    assert main(["eval", "--bag", str(tmp_path / "none"), "--checkpoint",
                 str(default_model_path())]) == 1
