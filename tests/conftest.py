"""Shared fixtures: tiny models built from config and saved with save_pretrained (nothing downloaded)."""

from __future__ import annotations

import pytest
import torch
from lightning.pytorch import Trainer

from trd_lightning.models import build_tiny_causal_lm
from trd_lightning.tasks import ArithmeticTask
from trd_lightning.tasks.arithmetic_tokenizer import build_arithmetic_tokenizer

torch.set_num_threads(2)

#: A `trd fit -c configs/arith/opd.yaml` small enough for an end-to-end test (3 steps, 16 test problems).
SMALL_ARITH_RUN = [
    "--trainer.max_steps=3",
    "--trainer.val_check_interval=3",
    "--trainer.enable_progress_bar=false",
    "--data.init_args.batch_size=8",
    "--data.init_args.eval_batch_size=16",
    "--data.init_args.task.init_args.val_size=16",
    "--data.init_args.task.init_args.test_size=16",
]
#: What PassAtKEvaluation(n=16, ks=[1, 8]) logs on the arithmetic test split (with derivation coverage).
ARITH_TEST_KEYS = {"test/avg@16", "test/pass@1", "test/pass@8", "test/derivations", "test/derivation_coverage", "test/derivations_available"}


def save_tiny(path, tokenizer, seed: int, hidden_size: int = 32, num_layers: int = 2):
    model = build_tiny_causal_lm(tokenizer, hidden_size=hidden_size, num_layers=num_layers, num_heads=2, seed=seed)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="session")
def tokenizer():
    return build_arithmetic_tokenizer()


@pytest.fixture(scope="session")
def tiny_paths(tmp_path_factory, tokenizer):
    """``{"student": dir, "teacher": dir}``: random tiny Llamas saved like real checkpoints."""
    root = tmp_path_factory.mktemp("tiny")
    return {
        "student": save_tiny(root / "student", tokenizer, seed=0),
        "teacher": save_tiny(root / "teacher", tokenizer, seed=1, hidden_size=48),
    }


@pytest.fixture
def task():
    return ArithmeticTask(val_size=8, test_size=8)


def cpu_trainer(**kwargs) -> Trainer:
    defaults = dict(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )
    defaults.update(kwargs)
    return Trainer(**defaults)
