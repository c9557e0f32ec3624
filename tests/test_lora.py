"""LoRA students: only adapters train, only adapters are checkpointed, and the checkpoint reloads."""

from __future__ import annotations

import pytest
import torch

from tests.helpers import cpu_trainer
from trd_lightning import DistillationModule, PromptDataModule, Sampling

LORA = {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"]}


def make(tiny_paths, task, **kwargs):
    return DistillationModule(
        student=tiny_paths["student"], teacher=tiny_paths["teacher"], task=task,
        sampling=Sampling(max_new_tokens=8), **kwargs,
    )


def test_lora_trains_adapters_only_and_checkpoints_only_them(tiny_paths, task, tmp_path):
    module = make(tiny_paths, task, student_lora=LORA, optimizer=lambda p: torch.optim.AdamW(p, lr=1e-2))
    before = {k: v.clone() for k, v in module.student.state_dict().items()}
    adapters = {n for n, p in module.student.named_parameters() if p.requires_grad}
    # 2 layers x (q_proj, v_proj) x (lora_A, lora_B)
    assert len(adapters) == 8 and all(".lora_" in n for n in adapters)
    trainer = cpu_trainer(max_steps=2, limit_val_batches=0)
    trainer.fit(module, PromptDataModule(task, batch_size=4))

    optimized = {id(p) for g in trainer.optimizers[0].param_groups for p in g["params"]}
    assert optimized == {id(p) for n, p in module.student.named_parameters() if n in adapters}
    after = module.student.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(".lora_" in k for k in changed), "base weights must stay frozen"

    ckpt = tmp_path / "lora.ckpt"
    trainer.save_checkpoint(ckpt)
    state = torch.load(ckpt, weights_only=False)["state_dict"]
    assert {k.removeprefix("student.") for k in state} == adapters

    # Same run without LoRA: its checkpoint holds every student weight, so it is much larger.
    full = make(tiny_paths, task)
    full_trainer = cpu_trainer(max_steps=1, limit_val_batches=0)
    full_trainer.fit(full, PromptDataModule(task, batch_size=4))
    full_trainer.save_checkpoint(tmp_path / "full.ckpt")
    full_state = torch.load(tmp_path / "full.ckpt", weights_only=False)["state_dict"]
    adapter_numel = sum(v.numel() for v in state.values())
    assert adapter_numel * 5 < sum(v.numel() for v in full_state.values())

    # A fresh LoRA module (base weights from the path) + the adapter checkpoint = the trained student.
    fresh = make(tiny_paths, task, student_lora=LORA)
    fresh.load_state_dict(state)
    ids = torch.randint(3, 24, (2, 10))
    module.student.eval(), fresh.student.eval()
    with torch.no_grad():
        torch.testing.assert_close(fresh.student(ids).logits, module.student(ids).logits)
    # ... but not into a student without LoRA: the error says what does not match.
    with pytest.raises(RuntimeError, match="checkpoint does not match the model"):
        make(tiny_paths, task).load_state_dict(state)


def test_ema_teacher_with_lora_checkpoints_its_adapters_too(tiny_paths, task):
    module = DistillationModule(student=tiny_paths["student"], teacher=None, mode="opsd", opsd_teacher="ema", task=task, student_lora=LORA)
    keys = list(module.state_dict())
    assert len(keys) == 16 and all(".lora_" in k for k in keys)
    assert sum(k.startswith("teacher.") for k in keys) == 8


def test_bad_lora_settings_name_the_problem(tiny_paths, task):
    with pytest.raises(ValueError, match=r"unknown student_lora keys \['rank'\].*LoraConfig"):
        make(tiny_paths, task, student_lora={"rank": 4})
    with pytest.raises(ValueError, match=r"target_modules \['qkv'\] are not layers.*'down_proj'.*'q_proj'"):
        make(tiny_paths, task, student_lora={"r": 4, "target_modules": ["qkv"]})
