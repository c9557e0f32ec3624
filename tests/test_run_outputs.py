"""What a user sees on a run (issue 12 items 13–15): `trd predict` writes its predictions, the test
table repeats between runs, and the progress bar and warnings say what matters."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch
from lightning.pytorch.loggers import CSVLogger

from tests.helpers import cpu_trainer
from trd_lightning import DistillationModule, PromptDataModule, Sampling
from trd_lightning.cli import main
from trd_lightning.progress import DistillationRichProgressBar, DistillationTQDMProgressBar


def test_trd_predict_writes_predictions_to_the_run_folder(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    main([
        "predict", "-c", str(Path(__file__).parents[1] / "configs/arith/opd.yaml"),
        "--trainer.default_root_dir", str(tmp_path / "run"), "--trainer.logger", "false",
        "--trainer.enable_progress_bar", "false",
        "--data.init_args.task.init_args.test_size", "6", "--data.init_args.eval_batch_size", "4",
        "--model.init_args.sampling.max_new_tokens", "8",
    ])
    path = tmp_path / "run" / "predictions.jsonl"
    records = [json.loads(line) for line in path.read_text().splitlines()]
    assert len(records) == 6
    assert set(records[0]) == {"problem", "prompt", "response", "verified"}
    assert all(isinstance(r["verified"], bool) and r["prompt"].startswith("Q") for r in records)
    assert records[0]["problem"]["operands"]  # the task's problem record, not a repr


def test_test_loss_and_rollout_accuracy_repeat_between_runs(tiny_paths, task):
    module = DistillationModule(student=tiny_paths["student"], teacher=tiny_paths["teacher"], task=task,
                                sampling=Sampling(temperature=1.0, max_new_tokens=8))
    dm = PromptDataModule(task=task, batch_size=4, eval_batch_size=4)
    first = cpu_trainer().test(module, datamodule=dm, verbose=False)[0]
    torch.manual_seed(123)  # whatever the global RNG holds, evaluation samples its own seeded stream
    second = cpu_trainer().test(module, datamodule=dm, verbose=False)[0]
    assert first["test/loss"] == second["test/loss"] and first["test/rollout_accuracy"] == second["test/rollout_accuracy"]


def test_progress_bar_drops_v_num_and_the_negative_epoch_total(tiny_paths, task, tmp_path):
    module = DistillationModule(student=tiny_paths["student"], teacher=tiny_paths["teacher"], task=task,
                                sampling=Sampling(temperature=1.0, max_new_tokens=8))
    bar = DistillationTQDMProgressBar()
    trainer = cpu_trainer(max_steps=2, limit_val_batches=0, callbacks=[bar], enable_progress_bar=True,
                          logger=CSVLogger(str(tmp_path)))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(module, datamodule=PromptDataModule(task=task, batch_size=4))
    # The frozen teacher's modules are in eval mode by design: Lightning's warning is explained, not shown.
    assert not [w for w in caught if "in eval mode at the start of training" in str(w.message)]
    metrics = bar.get_metrics(trainer, module)
    assert "v_num" not in metrics and "train/rollout_tokens_per_s" in metrics and "train/loss" in metrics
    rich = DistillationRichProgressBar()
    rich._trainer = trainer
    assert trainer.max_epochs == -1 and rich._get_train_description(0).strip() == "Epoch 0"


def test_eval_mode_warning_stays_for_modules_other_than_the_teacher(tiny_paths, task):
    module = DistillationModule(student=tiny_paths["student"], teacher=tiny_paths["teacher"], task=task,
                                sampling=Sampling(temperature=1.0, max_new_tokens=4))
    module.student.model.layers[0].eval()  # a user's module left in eval mode: Lightning must still say so
    with pytest.warns(UserWarning, match="in eval mode at the start of training"):
        cpu_trainer(max_steps=1, limit_val_batches=0).fit(module, datamodule=PromptDataModule(task=task, batch_size=2))
