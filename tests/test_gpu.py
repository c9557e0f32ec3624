"""GPU checks of the scale-out path (skipped without CUDA): FSDP2 on GPUs (NCCL), and 4-bit / 8-bit
bitsandbytes teachers. Run on a GPU machine with ``bash benchmarks/gpu_check.sh``."""

from __future__ import annotations

import pytest
import torch
from lightning.pytorch import Callback

from tests.helpers import save_tiny
from tests.fsdp_fit import launch
from trd_lightning import DistillationModule, PromptDataModule, Sampling
from trd_lightning.models import load_causal_lm

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.fixture(scope="module")
def gpu_paths(tmp_path_factory, tokenizer):
    root = tmp_path_factory.mktemp("gpu")
    return {
        "student": save_tiny(root / "student", tokenizer, seed=0, hidden_size=64),
        "teacher": save_tiny(root / "teacher", tokenizer, seed=1, hidden_size=64),
    }


def run_fsdp(paths, out, *options):
    devices = min(2, torch.cuda.device_count())
    return devices, launch(out, paths["student"], paths["teacher"], *options, world_size=devices, accelerator="gpu", timeout=500)


@pytest.mark.parametrize(
    "options", [["--state-dict", "full"], ["--state-dict", "sharded", "--lora", "--activation-checkpointing"]],
    ids=["full-state-dict", "sharded-lora-ac"],
)
def test_fsdp2_fit_on_gpus(gpu_paths, tmp_path, options):
    devices, ranks = run_fsdp(gpu_paths, tmp_path, *options)
    for r in ranks:
        assert r["world_size"] == devices and r["student_sharded"] and r["teacher_sharded"]
        assert r["teacher_device"].startswith("cuda") and r["teacher_dtype"] == "torch.bfloat16"
        assert r["teacher_local_rows"] * devices == r["teacher_rows"]
        assert not r["teacher_requires_grad"] and not r["optimizer_has_teacher"] and r["teacher_unchanged"]
        assert r["student_changed"] and all(map(torch.isfinite, torch.tensor(r["losses"])))
        assert r["losses"][0] == pytest.approx(r["expected_first_loss"], abs=1e-3)
        weights = [k for k in r["checkpoint_keys"] if k.startswith("state_dict.")]
        assert weights and all(k.startswith("state_dict.student.") for k in weights)
        assert r["reloaded"], "the checkpoint must restore the trained weights through the strategy"


def test_fsdp2_student_with_replicated_4bit_teacher_on_gpus(gpu_paths, tmp_path):
    devices, ranks = run_fsdp(gpu_paths, tmp_path, "--teacher-4bit")
    for r in ranks:
        assert r["student_sharded"] and not r["teacher_sharded"]
        assert r["teacher_layer"] == "Linear4bit" and r["teacher_device"].startswith("cuda")
        assert r["teacher_unchanged"] and r["student_changed"]


@pytest.mark.parametrize(
    # Tolerances relative to the logits' scale: NF4 keeps 4 bits per weight, int8 8 bits.
    "config, layer, tolerance", [({"load_in_4bit": True}, "Linear4bit", 0.25), ({"load_in_8bit": True}, "Linear8bitLt", 0.05)],
    ids=["nf4", "8bit"],
)
def test_quantized_teacher_on_gpu(gpu_paths, task, config, layer, tolerance):
    from lightning.pytorch import Trainer

    module = DistillationModule(
        student=gpu_paths["student"], teacher=gpu_paths["teacher"], task=task,
        sampling=Sampling(max_new_tokens=8), teacher_quantization=config,
    )
    quantized = module.teacher.model.layers[0].mlp.up_proj
    assert type(quantized).__name__ == layer and quantized.weight.device.type == "cuda"
    full = load_causal_lm(gpu_paths["teacher"], trainable=False).cuda()
    ids = torch.randint(3, 24, (2, 12), device="cuda")
    with torch.no_grad():
        reference = full(ids).logits.float()
        diff = (module.teacher(ids).logits.float() - reference).abs().max().item()
    relative = diff / reference.abs().max().item()
    print(f"{layer}: max |logit difference| {diff:.4f}, relative to max |logit| {relative:.4f}")
    assert 0 < relative < tolerance
    devices = []

    class RecordDevices(Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            devices.append((pl_module.student.device.type, batch["rollout"].response_ids.device.type))

    trainer = Trainer(accelerator="gpu", devices=1, max_steps=2, limit_val_batches=0, logger=False,
                      enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                      callbacks=[RecordDevices()])
    trainer.fit(module, PromptDataModule(task, batch_size=4))
    assert torch.isfinite(trainer.logged_metrics["train/loss"])
    # Checked during training: Lightning's teardown moves the module back to the CPU after fit.
    assert devices == [("cuda", "cuda")] * 2
