"""The shipped Qwen3 math configs build what they say (LoRA r=64 alpha=128, bf16, lr 5e-6, cosine,
the math task, TRD where named) and run, with the placeholder paths pointed at tiny local models."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.helpers import save_chat_setup
from trd_lightning.callbacks import PassAtKEvaluation, TrajectoryRevision
from trd_lightning.cli import build_cli
from trd_lightning.revision import RewriteReviser
from trd_lightning.tasks import MathTask

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "qwen3"


@pytest.fixture(scope="module")
def paths(tmp_path_factory):
    return save_chat_setup(tmp_path_factory.mktemp("qwen3_stand_in"))


def build(name, paths, *extra):
    args = [
        "-c", str(CONFIGS / f"{name}.yaml"),
        f"--model.init_args.student={paths['student']}",
        "--model.init_args.sampling.max_new_tokens=8", "--model.init_args.max_prompt_length=512",
        *(f"--data.init_args.task.init_args.{k}_file={paths[k]}" for k in ("train", "val", "test")),
        f"--data.init_args.task.init_args.tokenizer={paths['student']}",
        "--data.init_args.batch_size=2",
        "--trainer.accelerator=cpu", "--trainer.devices=1",
        "--trainer.max_steps=1", "--trainer.limit_val_batches=0", "--trainer.enable_progress_bar=false",
        *extra,
    ]
    if "opsd" not in name:
        args.append(f"--model.init_args.teacher={paths['teacher']}")
    return build_cli(args, run=False)


@pytest.mark.parametrize("name", ["opd", "trd", "opsd", "opsd_trd"])
def test_qwen3_config_builds_the_paper_setting(name, paths, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the configs' checkpoint and log folders are relative
    cli = build(name, paths)
    module = cli.model
    assert module.mode == ("opsd" if "opsd" in name else "opd")
    assert module.loss_name == ("reverse_kl" if name == "opd" else "forward_kl")
    lora = module.student.peft_config["default"]
    assert (lora.r, lora.lora_alpha) == (64, 128)
    assert set(lora.target_modules) == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    assert module.student.get_base_model().model.embed_tokens.weight.dtype == torch.bfloat16
    opt = module.configure_optimizers()
    assert opt["optimizer"].param_groups[0]["lr"] == 5e-6
    assert type(opt["lr_scheduler"]["scheduler"]).__name__ == "CosineAnnealingLR"
    assert isinstance(cli.datamodule.task, MathTask) and cli.datamodule.task.tokenizer_path == paths["student"]
    assert cli.trainer.precision == "bf16-mixed"
    revisers = [c.reviser for c in cli.trainer.callbacks if isinstance(c, TrajectoryRevision)]
    assert [type(r) for r in revisers] == ([RewriteReviser] if "trd" in name else [])
    passk = next(c for c in cli.trainer.callbacks if isinstance(c, PassAtKEvaluation))
    assert (passk.n, passk.sampling.temperature, passk.sampling.top_p) == (16, 0.6, 0.95)


def test_qwen3_trd_config_fits_a_step_on_cpu(paths, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cli = build("trd", paths)
    cli.trainer.fit(cli.model, cli.datamodule)
    assert torch.isfinite(cli.trainer.logged_metrics["train/loss"])
    assert any(k.startswith("revision/") for k in cli.trainer.logged_metrics), "the TRD callback ran"
