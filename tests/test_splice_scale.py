"""The prefix-splice reviser (the shipped `configs/arith/trd_splice.yaml`) in every multi-process
strategy, through `trd fit` on CPU processes (gloo): FSDP2 with rank-synchronised rounds, DDP, and
HSDP (2 x 2) with the two-pass form, a saved checkpoint and a resume. On every step each rank's
rollout is checked against a single-process decode of the same rows with the same seed
(`tests/splice_fit.RolloutCheck`). One device: tests/test_fused_revision.py and test_revision.py."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from tests.splice_fit import ROOT, launch_cli

CONFIGS = ROOT / "configs"


def overlay(tmp: Path, name: str, *, devices: int, steps: int, strategy=None, extra_callbacks: list | None = None,
            ckpt_path: str | None = None) -> Path:  # fmt: skip
    """A YAML overlay on trd_splice.yaml: few steps, small batches, no validation or test, checked rollouts."""
    out = tmp / name
    out.mkdir()
    config = {
        "test_after_fit": False,
        "trainer": {
            "devices": devices, "max_steps": steps, "limit_val_batches": 0, "logger": False, "enable_progress_bar": False,
            "callbacks+": [*(extra_callbacks or []), {"class_path": "tests.splice_fit.RolloutCheck", "init_args": {"out": str(out)}}],
        },
        "model": {"init_args": {"sampling": {"temperature": 1.0, "max_new_tokens": 24}}},
        "data": {"init_args": {"batch_size": 2 if devices > 2 else 3}},
    }  # fmt: skip
    if strategy is not None:
        config["trainer"]["strategy"] = strategy
    if ckpt_path is not None:
        config["ckpt_path"] = ckpt_path
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def ranks(folder: Path, n: int) -> list[dict]:
    return [json.loads((folder / f"rank{r}.json").read_text()) for r in range(n)]


def assert_single_process_rollouts(records: list[dict]) -> None:
    assert records, "no rollout was checked"
    for r in records:
        assert r["tokens_equal"], r
        if "t_star_equal" in r:
            assert r["t_star_equal"], r
        if "logits_max_diff" in r:
            assert r["logits_max_diff"] <= 1e-3 * max(r["logits_scale"], 1.0), r


@pytest.mark.slow
def test_fsdp2_splice_fit_rolls_out_as_one_process_and_matches_ddp(tmp_path):
    fsdp = overlay(tmp_path, "fsdp", devices=2, steps=3, strategy={
        "class_path": "trd_lightning.sharding.FSDP2Strategy",
        # fp32 student (no mixed precision), so the DDP run below computes the same numbers;
        # per_layer: FSDP gathers in every forward, so the decode runs rank-synchronised rounds.
        "init_args": {"mixed_precision": None, "rollout_gather": "per_layer", "state_dict_type": "full"},
    })  # fmt: skip
    launch_cli(tmp_path, CONFIGS / "arith" / "trd_splice.yaml", CONFIGS / "fsdp.yaml", fsdp)
    sharded = ranks(tmp_path / "fsdp", 2)
    ddp = overlay(tmp_path, "ddp", devices=2, steps=3, strategy="ddp", extra_callbacks=[
        {"class_path": "trd_lightning.callbacks.TeacherSharding", "init_args": {"dtype": "bf16"}},  # the same bf16 teacher
    ])  # fmt: skip
    launch_cli(tmp_path, CONFIGS / "arith" / "trd_splice.yaml", ddp)
    replicated = ranks(tmp_path / "ddp", 2)

    for r in sharded:
        assert r["strategy"] == "FSDP2Strategy" and r["world_size"] == 2 and r["student_sharded"] and r["teacher_sharded"]
        assert r["gather_decisions"] == {"student|teacher": False}
        assert [x["kind"] for x in r["records"]] == ["rollout"] * 3  # fused: one decode per step
        assert_single_process_rollouts(r["records"])
    for r in replicated:
        assert r["strategy"] == "DDPStrategy" and not r["student_sharded"]
        assert_single_process_rollouts(r["records"])
    # Something was revised, and the ranks decoded different rows (else the check is weak).
    assert any(t >= 0 for r in sharded for x in r["records"] for t in x["t_star"])
    assert sharded[0]["records"][0]["lengths"] != sharded[1]["records"][0]["lengths"]
    # Same data, same seeds: the same rollouts and losses as DDP, rank by rank and step by step.
    for s, d in zip(sharded, replicated):
        assert [x["lengths"] for x in s["records"]] == [x["lengths"] for x in d["records"]]
        assert s["losses"] == pytest.approx(d["losses"], rel=1e-4, abs=1e-6)
        assert s["checksum"] == pytest.approx(d["checksum"], rel=1e-5)


@pytest.mark.slow
def test_hsdp_two_pass_splice_fit_saves_and_resumes_on_4_processes(tmp_path):
    splice = CONFIGS / "arith" / "trd_splice.yaml"
    strategy = lambda gather: {  # noqa: E731
        "class_path": "trd_lightning.sharding.FSDP2Strategy",
        "init_args": {"replicate_size": 2, "rollout_gather": gather, "state_dict_type": "sharded"},
    }
    first = overlay(tmp_path, "hsdp", devices=4, steps=2, strategy=strategy("per_layer"))
    fused_off = tmp_path / "two_pass.yaml"
    fused_off.write_text(yaml.safe_dump({"trainer": {"callbacks": _splice_callbacks(fused=False)}}))
    launch_cli(tmp_path, splice, fused_off, CONFIGS / "fsdp.yaml", first, timeout=600)
    saved = ranks(tmp_path / "hsdp", 4)
    found = sorted(tmp_path.rglob("last.ckpt"))  # the run's own runs/<name>/version_N/checkpoints/
    assert len(found) == 1 and found[0].is_dir(), f"a sharded checkpoint (one file per rank) was saved: {found}"
    ckpt = found[0]
    resumed_cfg = overlay(tmp_path, "resumed", devices=4, steps=3, strategy=strategy("auto"), ckpt_path=str(ckpt))
    launch_cli(tmp_path, splice, fused_off, CONFIGS / "fsdp.yaml", resumed_cfg, timeout=600)
    resumed = ranks(tmp_path / "resumed", 4)

    for r in saved + resumed:
        assert r["world_size"] == 4 and r["mesh"] == ["replicate", "shard", 2, 2]
        assert r["student_sharded"] and r["teacher_sharded"]
        kinds = [x["kind"] for x in r["records"]]
        assert set(kinds) == {"rollout", "revise"}  # two-pass: generate, then the reviser's decode
        assert_single_process_rollouts(r["records"])
    assert all(r["gather_decisions"] == {} or not any(r["gather_decisions"].values()) for r in saved)
    # auto on CPU: the tiny models fit, so rollouts and the splice decode gather once.
    assert all(r["gather_decisions"] == {"student": True, "student|teacher": True} for r in resumed)
    for s, r in zip(saved, resumed):
        assert s["global_step"] == 2 and r["start_step"] == 2 and r["global_step"] == 3
        assert r["start_checksum"] == pytest.approx(s["checksum"], rel=1e-6), "the resume restored the saved student"
    # Replicas of a shard group train on different data but hold the same (replicated) weights.
    assert len({round(r["checksum"], 6) for r in resumed}) == 1


def _splice_callbacks(fused: bool) -> list:
    """trd_splice.yaml's callbacks (its base's, then its reviser fragment's) with the reviser's ``fused`` set."""
    base = yaml.safe_load((CONFIGS / "arith" / "base.yaml").read_text())
    fragment = yaml.safe_load((ROOT / "callbacks" / "trd_splice.yaml").read_text())
    callbacks = base["trainer"]["callbacks"] + fragment["trainer"]["callbacks+"]
    for c in callbacks:
        if c["class_path"].endswith("TrajectoryRevision"):
            c["init_args"]["reviser"]["init_args"]["fused"] = fused
    return callbacks


@pytest.mark.slow
def test_fsdp2_splice_fit_with_a_replicated_teacher_rolls_out_as_one_process(tmp_path):
    """A sharded student with a teacher copied whole on every rank (`TeacherSharding(placement:
    replicate)`, the only choice for a quantized teacher): the fused decode's teacher forwards are
    local, the student's gather per layer in rank-synchronised rounds; rollouts = 1 process."""
    fit = overlay(tmp_path, "fsdp_replicated_teacher", devices=2, steps=2, strategy={
        "class_path": "trd_lightning.sharding.FSDP2Strategy",
        "init_args": {"mixed_precision": None, "rollout_gather": "per_layer", "state_dict_type": "full"},
    }, extra_callbacks=[
        {"class_path": "trd_lightning.callbacks.TeacherSharding", "init_args": {"placement": "replicate", "dtype": "bf16"}},
    ])  # fmt: skip
    launch_cli(tmp_path, CONFIGS / "arith" / "trd_splice.yaml", fit)
    for r in ranks(tmp_path / "fsdp_replicated_teacher", 2):
        assert r["strategy"] == "FSDP2Strategy" and r["world_size"] == 2
        assert r["student_sharded"] and not r["teacher_sharded"], r
        assert [x["kind"] for x in r["records"]] == ["rollout"] * 2
        assert_single_process_rollouts(r["records"])
