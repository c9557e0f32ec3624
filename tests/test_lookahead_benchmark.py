"""benchmarks.lookahead counts what the decode did (no timings are asserted)."""

from __future__ import annotations

import torch

from benchmarks import lookahead


def test_lookahead_rows_report_teacher_forwards_and_kept_drafts(tmp_path, capsys):
    torch.manual_seed(0)
    out = tmp_path / "lookahead.md"
    rows = lookahead.main(
        ["--pairs", "random", "--lookahead", "1", "2", "--rounds", "1", "--batch-size", "4", "--out", str(out)]
    )
    by_run = {r["run"]: r for r in rows}
    one, two = by_run["fused splice, lookahead 1"], by_run["fused splice, lookahead 2"]
    # Forced 32-token rollouts: lookahead 1 runs the teacher once per position; 2 at least halves it.
    assert one["teacher_forwards"] == 32
    assert 16 <= two["teacher_forwards"] < 32
    assert 0 < two["acceptance"] <= 1 and by_run["OPD rollout + teacher forward"]["teacher_forwards"] is None
    assert "| random | fused splice, lookahead 2 |" in out.read_text()

    lookahead.main(["--split", "--pairs", "random", "--lookahead", "3", "--rounds", "1", "--batch-size", "4"])
    split = capsys.readouterr().out
    assert "| teacher forward, 3 token(s) |" in split and "| student prefill | 1.0 |" in split
