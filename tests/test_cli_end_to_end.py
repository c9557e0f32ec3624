"""`trd fit` then `trd test --ckpt_path`: the test numbers logged at the end of training come back."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.helpers import ARITH_TEST_KEYS, SMALL_ARITH_RUN
from trd_lightning.callbacks import PassAtKEvaluation
from trd_lightning.cli import build_cli

OPD = str(Path(__file__).resolve().parents[1] / "configs" / "arith" / "opd.yaml")


@pytest.mark.slow
def test_fit_then_test_from_checkpoint_reproduces_logged_numbers(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the config writes runs/ and checkpoints/ relative to here
    small = SMALL_ARITH_RUN
    fit = build_cli(["fit", "-c", OPD, *small])
    logged = next(cb for cb in fit.trainer.callbacks if isinstance(cb, PassAtKEvaluation)).last
    assert set(logged) == ARITH_TEST_KEYS
    ckpt = tmp_path / "runs" / "opd" / "version_0" / "checkpoints" / "last.ckpt"  # each run: its own folder
    assert ckpt.exists()
    again = build_cli(["test", "-c", OPD, *small, f"--ckpt_path={ckpt}"])
    repeated = next(cb for cb in again.trainer.callbacks if isinstance(cb, PassAtKEvaluation)).last
    assert repeated == logged
