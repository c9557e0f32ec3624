"""A bitsandbytes-quantized teacher (8-bit, 4-bit NF4) from YAML keys, on CPU; clear errors when
bitsandbytes is missing or cannot run."""

from __future__ import annotations

import types

import pytest
import torch

from tests.helpers import cpu_trainer, save_tiny
from trd_lightning import DistillationModule, PromptDataModule, Sampling
from trd_lightning import quantization
from trd_lightning.models import load_causal_lm
from trd_lightning.quantization import bitsandbytes_config


@pytest.mark.parametrize(
    "config, layer, tolerance",
    [({"load_in_8bit": True}, "Linear8bitLt", 0.05), ({"load_in_4bit": True}, "Linear4bit", 0.5)],
    ids=["8bit", "nf4"],
)
def test_quantized_teacher_scores_close_to_full_precision_and_trains(tiny_paths, task, tokenizer, tmp_path, config, layer, tolerance):
    # bitsandbytes' CPU 4-bit kernel needs layer widths divisible by 32 (real models' are).
    teacher_path = save_tiny(tmp_path / "teacher", tokenizer, seed=1, hidden_size=64)
    module = DistillationModule(
        student=tiny_paths["student"], teacher=teacher_path, task=task,
        sampling=Sampling(max_new_tokens=6), teacher_quantization=config,
    )
    teacher = module.teacher
    assert type(teacher.model.layers[0].mlp.up_proj).__name__ == layer
    # The LM head stays in full precision: its logits are the distillation target.
    assert type(teacher.lm_head) is torch.nn.Linear
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    full = load_causal_lm(teacher_path, trainable=False)
    ids = torch.randint(3, 24, (2, 12))
    with torch.no_grad():
        diff = (teacher(ids).logits.float() - full(ids).logits).abs().max().item()
    assert 0 < diff < tolerance  # quantized (not identical), yet close

    cpu_trainer(max_steps=1, limit_val_batches=0).fit(module, PromptDataModule(task, batch_size=2))
    assert torch.isfinite(module.trainer.logged_metrics["train/loss"])


def test_missing_bitsandbytes_is_a_clear_error(monkeypatch):
    def missing():
        raise ImportError("No module named 'bitsandbytes'")

    monkeypatch.setattr(quantization, "_import_bitsandbytes", missing)
    with pytest.raises(ImportError, match=r"4-bit teacher needs bitsandbytes.*pip install bitsandbytes"):
        bitsandbytes_config(load_in_4bit=True)


def test_bitsandbytes_without_a_backend_here_is_a_clear_error(monkeypatch, tiny_paths):
    def no_backend(*args, **kwargs):
        raise RuntimeError("no kernel registered for device 'cpu'")

    fake = types.SimpleNamespace(
        __version__="0.42.0",
        functional=types.SimpleNamespace(quantize_4bit=no_backend, int8_vectorwise_quant=no_backend),
    )
    monkeypatch.setattr(quantization, "_import_bitsandbytes", lambda: fake)
    with pytest.raises(RuntimeError, match=r"bitsandbytes 0\.42\.0 cannot run 8-bit quantization on cpu"):
        bitsandbytes_config(load_in_8bit=True)
    # Through the module's YAML key, before the teacher's weights are read.
    with pytest.raises(RuntimeError, match="cannot run 4-bit quantization"):
        DistillationModule(student=tiny_paths["student"], teacher=tiny_paths["teacher"], teacher_quantization={"load_in_4bit": True})


def test_bad_quantization_settings_are_refused(tiny_paths):
    with pytest.raises(ValueError, match="exactly one of load_in_8bit"):
        bitsandbytes_config(load_in_8bit=True, load_in_4bit=True)
    with pytest.raises(ValueError, match="bnb_4bit_quant_type"):
        bitsandbytes_config(load_in_4bit=True, bnb_4bit_quant_type="int3")
    with pytest.raises(TypeError, match="load_in_3bit"):
        bitsandbytes_config(load_in_3bit=True)
    with pytest.raises(ValueError, match="in OPSD the teacher is the student"):
        DistillationModule(student=tiny_paths["student"], teacher=None, mode="opsd", teacher_quantization={"load_in_4bit": True})
