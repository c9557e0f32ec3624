"""Shared fixtures: tiny models built from config and saved with save_pretrained (nothing downloaded).
The helpers they use, and that tests import, are in tests/helpers.py."""

from __future__ import annotations

import pytest
import torch

from tests.helpers import cpu_trainer, save_tiny  # noqa: F401  (cpu_trainer: tests/conformance imports it from here)
from trd_lightning.tasks import ArithmeticTask
from trd_lightning.tasks.arithmetic_tokenizer import build_arithmetic_tokenizer

torch.set_num_threads(2)


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
