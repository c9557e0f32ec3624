"""The audit end to end on tiny random models: the report folder holds what it promises (PNGs that
open), raw vs revised side by side, bad input (checkpoint, onset strings) fails before sampling,
the PrefixAudit callback logs and writes traces only when due, and ``trd audit`` runs from YAML."""

from __future__ import annotations

import json
import sys
from types import SimpleNamespace

import pytest
import torch
from lightning.pytorch.loggers import Logger
from PIL import Image

from tests.helpers import cpu_trainer, save_tiny
from trd_lightning import DistillationModule, PromptDataModule, Sampling
from trd_lightning.audit import run_audit
from trd_lightning.audit_report import PLOTS
from trd_lightning.callbacks import PrefixAudit, TrajectoryRevision
from trd_lightning.cli import main
from trd_lightning.revision import Reviser
from trd_lightning.rollout import Rollout, build_context

SAMPLING = Sampling(temperature=1.0, max_new_tokens=12)


@pytest.fixture
def module(tiny_paths, task):
    return DistillationModule(student=tiny_paths["student"], teacher=tiny_paths["teacher"], task=task, sampling=SAMPLING)


class ReferenceReviser:
    """Revises every rollout into the reference solution: revised trajectories are all correct."""

    def __init__(self):
        self.calls = 0

    def revise(self, module, rollout: Rollout) -> Rollout:
        self.calls += 1
        tok, task = module.tokenizer, module.task
        rows = [tok(task.reference_solution(p), add_special_tokens=False)["input_ids"] + [tok.eos_token_id] for p in rollout.problems]
        width = max(map(len, rows))
        ids = torch.full((len(rows), width), tok.pad_token_id)
        mask = torch.zeros((len(rows), width), dtype=torch.bool)
        for i, r in enumerate(rows):
            ids[i, : len(r)], mask[i, : len(r)] = torch.tensor(r), True
        student = build_context(tok, [task.student_prompt(p) for p in rollout.problems], ids, mask)
        teacher = build_context(tok, [module.teacher_prompt(p) for p in rollout.problems], ids, mask)
        return Rollout(rollout.problems, ids, mask, student, teacher)


def count_calls(module, name: str) -> list:
    calls, original = [], getattr(module, name)

    def wrapper(*args, **kwargs):
        calls.append(kwargs.get("role"))
        return original(*args, **kwargs)

    setattr(module, name, wrapper)
    return calls


def test_report_folder_holds_the_promised_files(module, task, tmp_path):
    reviser = ReferenceReviser()
    out = tmp_path / "report"
    # batch_size 4 over 6 problems: two batches of different response widths are stitched together.
    summary = run_audit(module, PromptDataModule(task), num_problems=6, batch_size=4, output_dir=out, reviser=reviser, verbose=False)
    for name in ("report.md", "summary.json", "traces.jsonl", *PLOTS, "raw_vs_revised.png"):
        assert (out / name).is_file(), name
    for png in out.glob("*.png"):
        with Image.open(png) as img:
            assert img.format == "PNG" and img.size[0] > 100
            img.load()
    on_disk = json.loads((out / "summary.json").read_text())
    assert on_disk["num_rollouts"] == 6 and on_disk["aligned_on"] == "verifier"
    traces = [json.loads(line) for line in (out / "traces.jsonl").read_text().splitlines()]
    raw = [t for t in traces if t["trajectory"] == "raw"]
    assert len(raw) == 6 and len(traces) == 12 and reviser.calls == 2
    # The summary's token-weighted mean equals the mean over the traces' per-position values.
    values = [v for t in raw for v in t["onset_mass"]]
    assert summary["mean"]["onset_mass"] == pytest.approx(sum(values) / len(values), abs=1e-4)
    assert all(len(t["tokens"]) == len(t["onset_mass"]) == len(t["teacher_top"]) for t in traces)
    # Revised = reference solutions: all verified, no first error; raw random rollouts all fail.
    assert summary["revised"]["accuracy"] == 1.0 and summary["revised"]["rows_with_first_error"] == 0
    assert summary["accuracy"] == 0.0 and summary["rows_with_first_error"] == 6
    report = (out / "report.md").read_text()
    assert all(f"]({p})" in report for p in PLOTS) and "Raw vs revised" in report and "Worked example" in report
    assert module.student.training and not module.teacher.training, "each submodule's mode is restored"


def test_mismatched_checkpoint_is_a_clear_error(module, task, tiny_paths, tokenizer, tmp_path):
    other_student = save_tiny(tmp_path / "other", tokenizer, seed=3, hidden_size=16)
    other = DistillationModule(student=other_student, teacher=tiny_paths["teacher"], task=task)
    torch.save({"state_dict": other.state_dict(), "pytorch-lightning_version": "2.6.6"}, tmp_path / "other.ckpt")
    sampled = count_calls(module, "sample")
    with pytest.raises(RuntimeError, match="other.ckpt does not match the configured model"):
        run_audit(module, num_problems=2, output_dir=None, ckpt_path=tmp_path / "other.ckpt", verbose=False)
    assert sampled == []
    with pytest.raises(FileNotFoundError, match="missing.ckpt does not exist"):
        run_audit(module, num_problems=2, output_dir=None, ckpt_path=tmp_path / "missing.ckpt", verbose=False)

    # A matching checkpoint is loaded before sampling.
    key = next(k for k in module.state_dict() if k.endswith("q_proj.weight"))
    state = {k: v + 1 if k == key else v for k, v in module.state_dict().items()}
    torch.save({"state_dict": state, "pytorch-lightning_version": "2.6.6"}, tmp_path / "same.ckpt")
    run_audit(module, num_problems=1, output_dir=None, ckpt_path=tmp_path / "same.ckpt", verbose=False)
    assert torch.equal(module.state_dict()[key], state[key])


def test_bad_onset_strings_and_options_fail_before_sampling(module):
    sampled = count_calls(module, "sample")
    with pytest.raises(ValueError, match="'Wait' -> the unknown token"):
        run_audit(module, num_problems=2, output_dir=None, correction_onsets=["!", "Wait"], verbose=False)
    with pytest.raises(ValueError, match="unknown t\\* criterion"):
        run_audit(module, num_problems=2, output_dir=None, criterion="nope", verbose=False)
    with pytest.raises(ValueError, match="num_problems must be >= 1"):
        run_audit(module, num_problems=0, output_dir=None, verbose=False)
    assert sampled == []


def test_multi_token_onset_mass_is_the_sequence_probability(module, task):
    """Issue 12 item 10: an onset of several tokens counts the teacher's probability of the whole
    sequence, checked position by position against direct teacher forwards."""
    from trd_lightning.audit import diagnose, sample_rollout
    from trd_lightning.diagnostics import onset_token_ids

    torch.manual_seed(0)
    module.eval()
    rollout = sample_rollout(module, list(task.problems("val"))[:3])
    onsets = onset_token_ids(module.tokenizer, ["!", "1+"])
    d = diagnose(module, rollout, onsets)
    ((bang,),) = [o for o in onsets if len(o) == 1]
    ((one, plus),) = [o for o in onsets if len(o) == 2]
    teacher, ctx = module.teacher, rollout.teacher
    for b in range(len(rollout.problems)):
        for t in range(int(rollout.response_mask[b].sum())):
            prefix = ctx.input_ids[b, : ctx.prompt_width + t][ctx.attention_mask[b, : ctx.prompt_width + t].bool()]
            with torch.no_grad():
                q = teacher(prefix.unsqueeze(0)).logits[0, -1].softmax(-1)
                q_next = teacher(torch.cat([prefix, torch.tensor([one])]).unsqueeze(0)).logits[0, -1].softmax(-1)
            expected = q[bang] + q[one] * q_next[plus]
            assert float(d.onset_mass[b, t]) == pytest.approx(float(expected), rel=1e-4, abs=1e-6)


def test_prefix_audit_is_free_when_not_due():
    class Untouchable:
        def __getattr__(self, name):
            raise AssertionError(f"PrefixAudit touched module.{name} on a step that is not due")

    callback = PrefixAudit(every_n_steps=5)
    for step in (1, 4, 6, 9):
        callback.on_train_batch_start(SimpleNamespace(global_step=step), Untouchable(), {"problems": []}, 0)


class HistogramLogger(Logger):
    """A logger whose experiment has ``add_histogram`` (as TensorBoard's does)."""

    def __init__(self):
        super().__init__()
        self.histograms = []
        self.experiment = SimpleNamespace(add_histogram=lambda name, values, global_step: self.histograms.append((name, global_step)))

    name, version = "hist", 0

    def log_metrics(self, metrics, step=None):
        pass

    def log_hyperparams(self, params, *args, **kwargs):
        pass


class CopyReviser(Reviser):
    def revise(self, module, rollout):
        return rollout.replace(stats={})


def test_prefix_audit_logs_and_writes_traces_when_due(module, task, tmp_path):
    calls = count_calls(module, "score")
    logger = HistogramLogger()
    audit = PrefixAudit(every_n_steps=2, max_rollouts_logged=2)
    # After TrajectoryRevision: the audit sees the revised rollout and the raw one in info["original"].
    trainer = cpu_trainer(
        max_steps=3, limit_val_batches=0, logger=logger, default_root_dir=tmp_path,
        callbacks=[TrajectoryRevision(CopyReviser()), audit],
    )  # fmt: skip
    trainer.fit(module, PromptDataModule(task, batch_size=4))
    # 3 training steps x (teacher + student) + 2 due steps (0 and 2) x (raw + revised) x 2 roles.
    assert len(calls) == 3 * 2 + 2 * 2 * 2
    logged = trainer.logged_metrics
    for key in ("teacher_entropy", "correction_mass", "bimodality", "fraction_failed", "accuracy", "reverse_kl"):
        assert f"audit/{key}" in logged and f"audit/revised/{key}" in logged
    assert float(logged["audit/correction_mass"]) == pytest.approx(float(logged["audit/revised/correction_mass"]))
    assert audit.last["audit/teacher_entropy"] > 0
    traces = [json.loads(line) for line in (tmp_path / "audit" / "traces.jsonl").read_text().splitlines()]
    assert len(traces) == 2 * 2 * 2 and {t["step"] for t in traces} == {0, 2}
    assert {t["trajectory"] for t in traces} == {"raw", "revised"} and traces[0]["first_error_source"] == "verifier"
    assert ("audit/teacher_entropy", 0) in logger.histograms and ("audit/revised/bimodality", 2) in logger.histograms


def test_prefix_audit_checks_onsets_at_setup(module, task):
    trainer = cpu_trainer(max_steps=1, limit_val_batches=0, callbacks=[PrefixAudit(correction_onsets=["Actually"])])
    with pytest.raises(ValueError, match="'Actually'"):
        trainer.fit(module, PromptDataModule(task, batch_size=2))


def test_trd_audit_cli_end_to_end(tiny_paths, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["trd"])  # pytest's own arguments are not the CLI's
    cfg = tmp_path / "audit.yaml"
    cfg.write_text(
        f"""
seed_everything: 0
trainer: {{accelerator: cpu, devices: 1, logger: false}}
model:
  class_path: trd_lightning.DistillationModule
  init_args:
    student: {tiny_paths["student"]}
    teacher: {tiny_paths["teacher"]}
    sampling: {{max_new_tokens: 10}}
data:
  class_path: trd_lightning.PromptDataModule
"""
    )
    out = tmp_path / "reports"
    args = ["audit", "-c", str(cfg), "--audit.num_problems", "3", "--audit.output_dir", str(out)]
    with pytest.raises(SystemExit) as exit_:
        main([*args, "--print_config"])
    assert exit_.value.code == 0 and "num_problems: 3" in capsys.readouterr().out
    main(args)
    assert "prefix audit: 3 rollouts" in capsys.readouterr().out
    assert json.loads((out / "summary.json").read_text())["num_rollouts"] == 3
    for name in ("report.md", "traces.jsonl", *PLOTS):
        assert (out / name).is_file(), name
