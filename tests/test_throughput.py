"""The throughput benchmark's same-work check (benchmarks.throughput): no timings are asserted."""

from __future__ import annotations

import pytest

from benchmarks.throughput import cli, contenders, harness, report


def result(name, works, times=(0.1, 0.1)):
    return harness.Result(name, times=list(times), works=list(works), rss_ready=100.0, rss_peak=120.0)


def test_ratio_is_refused_when_a_contender_did_different_work():
    same = {"generated": 1024, "loss_positions": 1024}
    results = {
        "ours_opd": result("ours_opd", [same, same]),
        "bare": result("bare", [same, same]),
        # Stopped at EOS: fewer loss positions than the reference in one step.
        "trl_gkd": result("trl_gkd", [same, {"generated": 1024, "loss_positions": 990}]),
        # TRD: the same student rollout plus a revision is the expected shape of its work.
        "ours_trd_rewrite": result(
            "ours_trd_rewrite",
            [{**same, "revision_tokens": 1024, "fraction_revised": 1.0, "t_star": 0.0}] * 2,
        ),
        # A TRD row whose student rollout differs is refused too.
        "ours_trd_splice": result(
            "ours_trd_splice",
            [{"generated": 512, "loss_positions": 700, "revision_tokens": 400, "fraction_revised": 1.0, "t_star": 1.0}] * 2,
        ),
    }
    verdict = report.check_same_work(results)
    assert verdict["ours_opd"] is None and verdict["bare"] is None and verdict["ours_trd_rewrite"] is None
    assert "990" in verdict["trl_gkd"]
    assert "512" in verdict["ours_trd_splice"]
    rows, notes = report.table(results, None, verdict)
    by_name = {line.split("|")[1].strip(): line for line in rows.splitlines()[2:]}
    assert by_name[contenders.LABELS["trl_gkd"]].rstrip(" |").endswith("refused")
    assert by_name[contenders.LABELS["ours_trd_splice"]].rstrip(" |").endswith("refused")
    assert "1.00×" in by_name[contenders.LABELS["bare"]]
    assert any(n.startswith("trl_gkd: work differs") for n in notes)
    # Targets are only computed from contenders whose work was checked.
    assert not any("trl_gkd" in t for t in report.targets(results, verdict))


def test_no_reference_means_no_ratio():
    same = {"generated": 64, "loss_positions": 64}
    results = {"bare": result("bare", [same])}
    verdict = report.check_same_work(results)
    assert "no reference" in verdict["bare"]


@pytest.mark.slow
def test_one_interleaved_step_per_contender_does_the_same_work(tmp_path):
    out = tmp_path / "throughput.md"
    results = cli.main(
        ["--contenders", "ours_opd", "bare", "ours_trd_rewrite", "--steps", "1", "--warmup", "0",
         "--batch-size", "4", "--new-tokens", "4", "--out", str(out)]
    )
    assert all(r.error is None for r in results.values()), {n: r.error for n, r in results.items()}
    for name in ("ours_opd", "bare", "ours_trd_rewrite"):
        assert results[name].works[0]["generated"] == 16  # 4 prompts x exactly 4 tokens, EOS suppressed
        assert results[name].works[0]["loss_positions"] == 16
    assert results["ours_trd_rewrite"].works[0]["revision_tokens"] == 16  # the refiner rewrote every row
    assert report.check_same_work(results) == {n: None for n in results}
    text = out.read_text()
    assert "ratio to ours OPD" in text and "refused" not in text
