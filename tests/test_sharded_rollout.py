"""Rollouts of FSDP2-sharded models on 2 CPU processes (gloo), through benchmarks.sharded_rollout:
per-forward gathers (rank-synchronised splice rounds, generate's synced_gpus) and gather-once give
the tokens, t* and teacher logits of a single-process decode of the same rows and seed, and
gather-once all-gathers each FSDP group exactly once per rollout. No times are asserted."""

from __future__ import annotations

from pathlib import Path

import pytest
from transformers import AutoConfig

from benchmarks import sharded_rollout

ROOT = Path(__file__).resolve().parents[1]

ASSETS = ROOT / "trd_lightning" / "assets" / "arith"


@pytest.mark.slow
def test_sharded_rollouts_equal_one_process_and_gather_once_gathers_each_layer_once():
    config = dict(
        processes=2, replicate=1, accelerator="cpu", threads=1, pair="trained", student_size=[64, 2], teacher_size=[128, 3],
        batch_size=4, max_new_tokens=12, rollouts=1, lookahead=3, threshold=0.05, atol=1e-4,
        student=str(ASSETS / "student"), teacher=str(ASSETS / "teacher"), timeout=400,
        idle_rank=1,  # its two-pass reviser revises nothing: it only joins rank 0's decode
    )  # fmt: skip
    results = sharded_rollout.run(config)
    # One FSDP group per decoder layer plus the root (embeddings, norm, head), per model.
    groups = {role: AutoConfig.from_pretrained(ASSETS / role).num_hidden_layers + 1 for role in ("student", "teacher")}
    for (method, gather), entry in results.items():
        for rank in entry["ranks"]:
            assert all(rank["equal"]), f"{method} / {gather}: a sharded rollout differs from the 1-process decode"
            assert rank["tokens"] > 0
    for gather in sharded_rollout.GATHERS:
        two_pass = results[("two-pass splice", gather)]["ranks"]
        assert two_pass[0]["revised_rows"] > 0 and two_pass[1]["revised_rows"] == 0
    for rank in range(2):
        get = lambda method, gather: results[(method, gather)]["ranks"][rank]  # noqa: E731
        # Gather-once: each group once; the forwards are local, so no per-token/per-round agreement.
        assert get("OPD", "once")["gathers"] == [groups["student"]]
        assert get("fused splice", "once")["gathers"] == [groups["student"] + groups["teacher"]]
        # Two-pass: the teacher's scoring forward (per layer, outside the decode), then the decode's gathers.
        assert get("two-pass splice", "once")["gathers"] == [2 * groups["teacher"] + groups["student"]]
        # The idle rank runs as many gathers as the decoding one (it keeps it company).
        assert results[("two-pass splice", "per_layer")]["ranks"][1]["gathers"] == results[("two-pass splice", "per_layer")]["ranks"][0]["gathers"]
        assert all(get(m, "once")["all_reduces"] == [0] for m in sharded_rollout.METHODS)
        # Per forward: every forward gathers every group; ranks agree once per token / round.
        opd = get("OPD", "per_layer")
        assert opd["gathers"][0] % groups["student"] == 0 and opd["gathers"][0] >= 2 * groups["student"]
        fused = get("fused splice", "per_layer")
        assert fused["gathers"][0] > 2 * (groups["student"] + groups["teacher"]) and fused["all_reduces"][0] >= 2
