"""The benchmark runs end to end at tiny sizes and prints its table (no timing assertions)."""

from __future__ import annotations

import math

import pytest
import torch

from harness import bench


def test_quick_bench_measures_every_selected_item_and_prints_the_table(tmp_path, capsys):
    threads = torch.get_num_threads()
    markdown = tmp_path / "bench.md"
    results = bench.main(["--quick", "--only", "a,c,d", "--markdown", str(markdown)])
    out = capsys.readouterr().out

    assert torch.get_num_threads() == threads  # restored
    assert [r.name[0] for r in results] == ["a"] * 4 + ["c"] * 2 + ["d"]
    for r in results:
        assert isinstance(r, bench.Result)
        assert math.isfinite(r.ratio) and r.ratio > 0, r
        assert r.target > 0 and r.peer_text and r.details
        assert r.name in out
    assert "machine:" in out and f"torch {torch.__version__}" in out
    header, *rows = [line for line in out.splitlines() if line.startswith(("item ", "a. ", "c. ", "d. "))]
    assert header.split()[:4] == ["item", "ratio", "target", "result"]
    assert len(rows) == len(results)
    assert all(("pass" in row) != ("FAIL" in row) for row in rows)
    text = markdown.read_text()
    assert "| item | ratio | target | result |" in text
    table = [line.split(" | ") for line in text.splitlines() if line.startswith(("| a. ", "| c. ", "| d. "))]
    assert [cells[0].removeprefix("| ") for cells in table] == [r.name for r in results]
    for cells, r in zip(table, results, strict=True):  # the row shows what was measured, and judges it
        shown, target = float(cells[1]), float(cells[2].removeprefix("<= "))
        assert shown == pytest.approx(r.ratio, abs=5e-4) and target == r.target
        assert cells[3] == ("pass" if shown <= target else "**FAIL**")


def test_interleave_rotates_the_order_and_respects_every():
    calls: list[str] = []

    def arm(name: str):
        def run() -> float:
            calls.append(name)
            return 1.0

        return run

    times = bench.interleave({"a": arm("a"), "b": arm("b"), "c": arm("c")}, budget_s=60, min_repeats=4,
                             max_repeats=4, every={"c": 2})
    # c only in repeats 0 and 2; the order rotates over the arms of each repeat
    assert calls == ["a", "b", "c", "a", "b", "b", "c", "a", "b", "a"]
    assert [len(times[k]) for k in "abc"] == [4, 4, 2]


def test_rounds_interleave_step_by_step_and_keep_the_fastest():
    calls: list[str] = []
    clock = iter(range(100))

    def arm(name: str):
        def run() -> float:
            calls.append(name)
            return float(next(clock))

        return run

    times = bench.interleave({"a": arm("a"), "b": arm("b"), "u": arm("u")}, budget_s=60, min_repeats=2,
                             max_repeats=2, every={"u": 2}, rounds=2)
    # u once, in the first round of repeat 0; repeat 1 is the first of its set of arms: no shift yet
    assert calls == ["a", "b", "u", "a", "b", "a", "b", "a", "b"]
    assert times == {"a": [0.0, 5.0], "b": [1.0, 6.0], "u": [2.0]}


def test_a_ratio_pairs_the_arms_of_the_same_repeat():
    """Each repeat's ratio comes from both arms' timings in that repeat (they shared its interference);
    the median of ratios differs from the ratio of medians on these timings."""
    ours, dense = [1.0, 10.0, 3.0], [1.0, 5.0, 6.0]  # per repeat: 1.0, 2.0, 0.5
    assert bench.median_ratio(ours, dense) == 1.0
    with pytest.raises(ValueError):
        bench.median_ratio(ours, dense[:2])  # a repeat without its pair is a bug, not a sample


@pytest.mark.parametrize(("ratio", "target", "passed", "shown"), [
    (1.0499, 1.05, True, "1.050"),
    (1.0504, 1.05, False, "1.0504"),  # a miss is never rounded onto its target
    (float("nan"), 1.05, False, "nan"),  # nothing measured is not a pass
])
def test_a_result_passes_only_on_a_measured_ratio_within_its_target(ratio, target, passed, shown):
    r = bench.result("x. item", ratio, target, "peer", "details")
    assert (r.passed, r.ratio_text) == (passed, shown)
    row = bench.format_markdown([r], "head").splitlines()[6]
    assert row.startswith(f"| x. item | {shown} | <= {target:g} | {'pass' if passed else '**FAIL**'} |")


def test_unknown_items_are_rejected():
    with pytest.raises(SystemExit):
        bench.main(["--only", "a,z"])


def test_quick_export_items_measure_the_exports_of_engine_pruned_models():
    """g, h, i at tiny sizes: the exported models compute what the masked ones do, the compressed
    checkpoint loads back bit-exact, and each line carries its peer."""
    results = bench.main(["--quick", "--only", "g,h,i", "--threads", "2"])
    assert [r.name[0] for r in results] == ["g", "g", "h", "h", "i", "i"]
    assert results[2].name.endswith("1 thread") and results[3].name.endswith("2 threads")
    for r in results:
        assert math.isfinite(r.ratio) and r.ratio > 0, r
    for r in results[:4]:
        difference = float(r.details.split("largest output difference to the masked model ")[1].split(";")[0])
        assert difference < 1e-4, r.details
    assert "torch.sparse CSR" in results[0].peer_text and "masked, not removed" in results[2].peer_text
    for r in results[4:]:
        assert "loads back bit-exact: yes" in r.details
        assert r.ratio < 0.5  # 90% and 95% sparse: far below the dense file
