"""What a user sees: the per-layer picture (curves.png, logged with every pruned run) and summary.html,
with the verdict coloured, the picture first and the numbers formatted for people."""

from __future__ import annotations

import re
import struct
from pathlib import Path

from mlflow.tracking import MlflowClient

from harness import report, runner
from harness.config import GoalConfig, GoalCriterion
from harness.goal import Verdict
from harness.pruning import MaskUpdate, TensorSparsity
from harness.training import EpochResult

from .conftest import FAST, compose_config

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def png_size(path: Path) -> tuple[int, int]:
    """Width and height from the PNG header, after checking it is one."""
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE and data[12:16] == b"IHDR", path
    return struct.unpack(">II", data[16:24])


def without_images(page: str) -> str:
    return re.sub(r"data:image/png;base64,[A-Za-z0-9+/=]+", "data:image/png;base64,", page)


def test_formatting_helpers_write_numbers_for_people():
    assert report.format_count(85_123_456) == "85.1 M"
    assert report.format_count(17_000_000) == "17.0 M"
    assert report.format_count(1_234_000_000) == "1.23 G"
    assert report.format_count(123_456_789) == "123 M"
    assert report.format_count(512) == "512"
    assert report.format_bytes(610_000) == "0.61 MB"
    assert report.format_bytes(12_345) == "12.3 kB"
    assert report.format_bytes(2_500_000_000) == "2.50 GB"
    assert report.format_bytes(100) == "100 B"
    assert report.format_metric("macs/nonzero", 85_123_456) == "85.1 M"
    assert report.format_metric("size/compressed_bytes", 610_000) == "0.61 MB"
    assert report.format_metric("best/confirmed/size/dense_bytes", 610_000) == "0.61 MB"
    assert report.format_metric("latency/pruned_ms", 4.18612) == "4.186 ms"
    assert report.format_metric("speedup", 1.234) == "1.23x"
    assert report.format_metric("final/accuracy", 0.876543) == "0.8765"
    assert report.format_metric("best/baseline/test_accuracy", 0.9) == "0.9000"
    assert report.format_metric("final/sparsity", 0.8) == "80.00%"
    assert report.format_metric("goal/met", 1.0) == "yes" and report.format_metric("goal/met", 0.0) == "no"
    assert report.format_metric("goal/accuracy_drop", 0.0338) == "+3.38%"
    assert "e+" not in report.format_metric("something/unknown", 123_456_789.0)


def test_a_pruned_run_logs_the_per_layer_picture_and_shows_it_first(tmp_path):
    cfg = compose_config([*FAST, f"outputs_dir={tmp_path}", "prune.scope=global"])
    result = runner.run(cfg, tmp_path / "run")
    out = tmp_path / "run"
    picture = out / "curves.png"
    width, height = png_size(picture)
    assert width >= 1000 and height >= 800
    assert 20_000 < picture.stat().st_size < 2_000_000
    artifacts = {a.path for a in MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
                 .list_artifacts(result.run_id)}
    assert {"curves.png", "summary.html"} <= artifacts

    page = (out / "summary.html").read_text()
    image = page.index("data:image/png;base64,")
    assert image < page.index("<table") and image < page.index("<h2>Accuracy</h2>")
    assert page.index('class="verdict ') < image
    assert re.search(r'<p class="verdict (met|missed)">goal (MET|MISSED)', page)
    assert ".verdict.met{color:#fff;background:#1a7f37}" in page  # green
    assert ".verdict.missed{color:#fff;background:#c62828}" in page  # red
    text = without_images(page)
    assert "e+0" not in text and "e+1" not in text
    assert re.search(r"<td>macs/dense</td><td>\d+(\.\d+)? [kMG]</td>", text)
    assert re.search(r"<td>size/dense_bytes</td><td>\d+\.\d\d MB</td>", text)
    assert re.search(r"<td>final/accuracy</td><td>0\.\d{4}</td>", text)
    assert re.search(r"<td>final/sparsity</td><td>\d+\.\d\d%</td>", text)


def test_summary_colours_both_verdicts_and_the_picture_draws_the_goal_threshold(tmp_path):
    names = ["a.weight", "b.weight"]
    updates = [MaskUpdate(global_step=10 * i, epoch=i // 2, step=10 * (i % 2), target=0.2 * i,
                          sparsity={names[0]: 0.25 * i, names[1]: 0.15 * i}, overall=0.2 * i) for i in range(5)]
    history = [EpochResult(epoch=e, train_loss=1.0 / (e + 1), val_accuracy=0.9 - 0.01 * e, global_step=20 * (e + 1))
               for e in range(3)]
    picture = tmp_path / "curves.png"
    report.plot_curves(updates, history, picture, dense_accuracy=0.91,
                       goal=GoalConfig(criterion=GoalCriterion.absolute, max_drop=0.02))
    assert png_size(picture)[0] >= 1000
    rows = [TensorSparsity("a.weight", (8, 4), 32, 24), TensorSparsity("b.weight", (4, 4), 16, 8)]
    metrics = {"baseline/accuracy": 0.91, "baseline/test_accuracy": 0.9, "final/accuracy": 0.88,
               "final/test_accuracy": 0.87, "macs/dense": 85_123_456.0, "macs/nonzero": 17_024_691.0,
               "size/dense_bytes": 608_723.0, "size/compressed_bytes": 145_503.0}
    for met, word, colour in ((True, "MET", "met"), (False, "MISSED", "missed")):
        page_path = tmp_path / f"{colour}.html"
        verdict = Verdict(met, 0.03, GoalCriterion.absolute, 0.02 if not met else 0.05)
        report.write_summary_html(page_path, "run", rows, metrics, verdict, [], "seed: 0\n", picture)
        page = page_path.read_text()
        assert f'<p class="verdict {colour}">goal {word}' in page
        assert page.index("data:image/png;base64,") < page.index("<table")
        text = without_images(page)
        assert "85.1 M" in text and "17.0 M" in text and "0.61 MB" in text and "0.15 MB" in text
        assert "e+0" not in text
