"""GPU checks of the sharded splice reviser, gather-once rollouts and HSDP (skipped without CUDA).
Run on a GPU machine with ``bash benchmarks/gpu_check.sh``. One GPU: one-process FSDP2 (the
single-GPU paths); two or more: multi-process FSDP2 on NCCL; four or more: HSDP 2 x 2 (two: 2 x 1).
The same checks run on CPU processes in tests/test_splice_scale.py and tests/test_sharded_rollout.py."""

from __future__ import annotations

import pytest
import torch
import yaml

from benchmarks import sharded_rollout
from tests.helpers import ROOT
from tests.splice_fit import launch_cli
from tests.test_splice_scale import assert_single_process_rollouts, ranks

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
CONFIGS = ROOT / "configs"
ASSETS = ROOT / "trd_lightning" / "assets" / "arith"


def gpus() -> int:
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


@pytest.mark.parametrize("gather", ["per_layer", "once"])
def test_sharded_splice_fit_on_gpus(tmp_path, gather):
    devices = min(2, gpus())
    out = tmp_path / "run"
    out.mkdir()
    overlay = tmp_path / "gpu.yaml"
    overlay.write_text(yaml.safe_dump({
        "test_after_fit": False,
        "trainer": {
            "accelerator": "gpu", "devices": devices, "max_steps": 3, "limit_val_batches": 0, "logger": False,
            "enable_progress_bar": False,
            "strategy": {"class_path": "trd_lightning.sharding.FSDP2Strategy", "init_args": {"rollout_gather": gather}},
            "callbacks+": [{"class_path": "tests.splice_fit.RolloutCheck", "init_args": {"out": str(out)}}],
        },
        "data": {"init_args": {"batch_size": 8}},
    }))  # fmt: skip
    launch_cli(tmp_path, CONFIGS / "arith" / "trd_splice.yaml", CONFIGS / "fsdp.yaml", overlay, timeout=500)
    for r in ranks(out, devices):
        assert r["world_size"] == devices and r["student_sharded"] and r["teacher_sharded"]
        assert r["gather_decisions"] == {"student|teacher": gather == "once"}
        assert_single_process_rollouts(r["records"])
        assert all(torch.isfinite(torch.tensor(r["losses"])))


@pytest.mark.parametrize("hsdp", [False, True], ids=["fsdp", "hsdp"])
def test_gather_once_rollouts_equal_per_layer_on_gpus(hsdp):
    n = gpus()
    if hsdp and n < 2:
        pytest.skip("HSDP needs at least 2 GPUs (2 x 1); 4 for 2 x 2")
    processes = min(4, n) if hsdp else min(2, n)
    config = dict(
        processes=processes, replicate=2 if hsdp else 1, accelerator="gpu", threads=2, pair="random",
        student_size=[256, 4], teacher_size=[512, 4], batch_size=16, max_new_tokens=32, rollouts=2,
        lookahead=3, threshold=0.05, atol=1e-3, student=None, teacher=None, timeout=500,
    )  # fmt: skip
    results = sharded_rollout.run(config)
    print("\n" + sharded_rollout.table(results, config))
    groups = 4 + 1  # decoder layers + root, per model
    for (method, gather), entry in results.items():
        for rank in entry["ranks"]:
            assert all(rank["equal"]), f"{method} / {gather} differs from the 1-process decode"
            if gather == "once" and method != "two-pass splice" and processes > 1:
                assert rank["gathers"] == [groups * (1 if method == "OPD" else 2)] * 2
