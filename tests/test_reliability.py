"""Reliability: every bad input gets a clear error (naming the problem and the fix) before compute,
non-finite losses never update the weights silently, and nothing the user gave us is written.

Each bad-input test pins the message the user sees; docs/reliability.md lists them, row by row.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import sys
import warnings
from pathlib import Path

import pytest
import torch
from lightning.pytorch import Callback

from tests.helpers import cpu_trainer, save_tiny
from trd_lightning import DistillationModule, PromptDataModule, Sampling
from trd_lightning.callbacks import PassAtKEvaluation
from trd_lightning.cli import build_cli
from trd_lightning.losses import get_loss
from trd_lightning.metrics import pass_at_k
from trd_lightning.models import load_tokenizer
from trd_lightning.tasks import ArithmeticTask
from trd_lightning.tasks.arithmetic import ArithmeticProblem
from trd_lightning.tasks.arithmetic_tokenizer import build_arithmetic_tokenizer

SAMPLING = Sampling(temperature=1.0, max_new_tokens=12)


def make_module(tiny_paths, task, **kwargs):
    kwargs.setdefault("sampling", SAMPLING)
    return DistillationModule(student=tiny_paths["student"], teacher=tiny_paths["teacher"], task=task, **kwargs)


def params_of(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


# --- 1. bad inputs ---------------------------------------------------------------------------
def test_model_path_missing_or_without_weights(tiny_paths, tmp_path):
    with pytest.raises(FileNotFoundError, match=r"model path '.*nope' does not exist; pass a directory written by save_pretrained"):
        DistillationModule(student=str(tmp_path / "nope"), teacher=tiny_paths["teacher"])
    (tmp_path / "no_config").mkdir()
    with pytest.raises(FileNotFoundError, match="has no config.json; is it a save_pretrained directory"):
        DistillationModule(student=tiny_paths["student"], teacher=str(tmp_path / "no_config"))
    (tmp_path / "no_weights").mkdir()
    (tmp_path / "no_weights" / "config.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match=r"holds no weights \(looked for model.safetensors.*save the model with save_pretrained"):
        DistillationModule(student=tiny_paths["student"], teacher=str(tmp_path / "no_weights"))
    with pytest.raises(FileNotFoundError, match="unknown built-in model 'builtin:arith/nope'; available:"):
        DistillationModule(student="builtin:arith/nope", teacher=tiny_paths["teacher"])


def test_tokenizer_without_pad_token_pads_with_eos_and_says_so(tmp_path, task):
    no_pad = build_arithmetic_tokenizer()
    no_pad.pad_token = None
    paths = {role: save_tiny(tmp_path / role, no_pad, seed=seed) for role, seed in (("student", 0), ("teacher", 1))}
    with pytest.warns(UserWarning, match=r"has no pad token: padding with its EOS token '.*' \(padded positions are masked out"):
        tok = load_tokenizer(paths["student"])
    assert tok.pad_token_id == tok.eos_token_id is not None
    # And the whole path works: a module builds and samples a left-padded batch.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        module = DistillationModule(student=paths["student"], teacher=paths["teacher"], task=task, sampling=SAMPLING)
    rollout = module.make_rollout(list(task.problems("test"))[:3])
    assert rollout.response_mask.any(-1).all()


def test_student_teacher_vocabulary_mismatch(tiny_paths, tokenizer, tmp_path):
    other = tokenizer.__class__.from_pretrained(tiny_paths["teacher"])
    other.add_tokens(["%"])
    save_tiny(tmp_path / "other", other, seed=3)
    with pytest.raises(ValueError, match=r"student and teacher tokenizers differ: .*only in teacher \['%'\].*use a teacher from the same model family"):
        DistillationModule(student=tiny_paths["student"], teacher=str(tmp_path / "other"))


def test_max_new_tokens_not_positive():
    for bad in (0, -5):
        with pytest.raises(ValueError, match=f"max_new_tokens must be > 0, got {bad}"):
            Sampling(max_new_tokens=bad)


def test_prompt_longer_than_context(tiny_paths, task, monkeypatch):
    # Rule 1: a prompt over max_prompt_length is refused, never cut (issue 12 item 1: cutting from the
    # left removed the problem statement from c_r); the run refuses before compute (setup), and
    # encode_prompts refuses any prompt that check did not see.
    import trd_lightning.rollout as rollout_module

    module = make_module(tiny_paths, task, max_prompt_length=8)
    long_prompt = "Q1+2*3-4+5*6-7+8S"
    with pytest.raises(rollout_module.PromptTooLongError, match=r"1 of 2 prompts in this batch exceed max_prompt_length=8 tokens \(longest 17\)"):
        rollout_module.encode_prompts(module.tokenizer, [long_prompt, "Q1+2S"], "cpu", 8)
    ids, mask = rollout_module.encode_prompts(module.tokenizer, ["Q1+2*3S", "Q1+2S"], "cpu", 8)
    assert ids.shape[1] == 7 and mask[1].sum() == 5
    # Rule 2: prompt budget + response budget must fit the models' positions (256 here).
    with pytest.raises(
        ValueError,
        match=r"max_prompt_length \+ sampling.max_new_tokens = 250 \+ 12 = 262 exceeds the student's "
        r"max_position_embeddings \(256\); lower max_prompt_length or sampling.max_new_tokens",
    ):
        make_module(tiny_paths, task, max_prompt_length=250)
    make_module(tiny_paths, task, max_prompt_length=244)  # exactly 256: fine


def test_empty_data_set_fails_before_any_training_step(tiny_paths):
    module = make_module(tiny_paths, None)
    calls = []
    module.make_rollout = lambda problems: calls.append(problems)
    for sizes, split in (({"train_size": 0}, "train"), ({"val_size": 0}, "val")):
        task = ArithmeticTask(**{"val_size": 4, "test_size": 4, **sizes})
        with pytest.raises(ValueError, match=f"the task has no {split} problems; check its data file or size settings"):
            cpu_trainer(max_steps=2, val_check_interval=1, check_val_every_n_epoch=None).fit(module, PromptDataModule(task, batch_size=2))
    assert calls == [] and module.global_step == 0
    # With validation off an empty val split is fine.
    ok = PromptDataModule(ArithmeticTask(val_size=0, test_size=4), batch_size=2)
    ok.trainer = cpu_trainer(limit_val_batches=0)
    ok.setup("fit")


def test_malformed_jsonl_line_names_its_line(tmp_path):
    math_task = pytest.importorskip("trd_lightning.tasks.math", reason="trd_lightning/tasks/math.py not present")
    path = tmp_path / "train.jsonl"
    path.write_text('{"problem": "1+1", "solution": "2", "answer": "2"}\n{"problem": "2+2", "solution": \n')
    with pytest.raises(ValueError, match=r"train.jsonl, line 2: not valid JSON \(.* at column \d+\)"):
        math_task.MathTask(train_file=str(path)).problems("train")
    path.write_text('{"problem": "1+1", "solution": "2"}\n')
    with pytest.raises(ValueError, match=r"line 1: no field 'answer' \(fields: \['problem', 'solution'\]\)"):
        math_task.MathTask(train_file=str(path)).problems("train")


def test_k_larger_than_n_for_pass_at_k():
    with pytest.raises(ValueError, match=r"pass@k needs k <= n: got k=\[8\] with n=4 samples; raise n or drop those k"):
        PassAtKEvaluation(n=4, ks=(1, 8))
    with pytest.raises(ValueError, match="k=8 is larger than the number of samples n=4; sample at least k completions"):
        pass_at_k(4, 2, 8)


def test_unknown_loss_name(tiny_paths, task):
    with pytest.raises(ValueError, match="unknown loss 'revers_kl'; choose one of: forward_kl, reverse_kl"):
        make_module(tiny_paths, task, loss="revers_kl")
    with pytest.raises(ValueError, match="unknown loss 'kl'; choose one of"):
        get_loss("kl")
    with pytest.raises(ValueError, match=r"bad loss_kwargs \{'beta': 0.5\} for loss 'reverse_kl'"):
        make_module(tiny_paths, task, loss_kwargs={"beta": 0.5})
    with pytest.raises(ValueError, match="nonfinite must be 'skip' or 'raise', got 'ignore'"):
        make_module(tiny_paths, task, nonfinite="ignore")


def test_unknown_reviser_or_criterion_name():
    revision = pytest.importorskip("trd_lightning.revision", reason="trd_lightning/revision.py not present")
    with pytest.raises(ValueError, match="unknown criterion 'teacher_prb'; choose 'teacher_prob' or 'teacher_top_p'"):
        revision.PrefixSpliceReviser(criterion="teacher_prb")
    with pytest.raises(ValueError, match="unknown refine mode 'some'; choose 'all' or 'failed'"):
        revision.RewriteReviser(refine="some")
    from trd_lightning.callbacks import TrajectoryRevision

    with pytest.raises(TypeError, match="reviser must be a trd_lightning.revision.Reviser, got str"):
        TrajectoryRevision("PrefixSpliceReviser")


def _cli_error(args: list[str], capsys, monkeypatch) -> str:
    monkeypatch.setattr(sys, "argv", ["trd"])  # as `trd <args>` would see it, not pytest's argv
    with pytest.raises(SystemExit) as exit_info:
        build_cli(args, run=False)
    assert exit_info.value.code == 2
    return capsys.readouterr().err


@pytest.fixture
def cli_config(tiny_paths, tmp_path) -> Path:
    config = {
        "trainer": {"accelerator": "cpu", "max_steps": 1, "logger": False},
        "model": {"class_path": "trd_lightning.DistillationModule", "init_args": {"student": tiny_paths["student"], "teacher": tiny_paths["teacher"]}},
        "data": {"class_path": "trd_lightning.PromptDataModule", "init_args": {"batch_size": 2}},
    }
    path = tmp_path / "config.yaml"
    path.write_text(json.dumps(config))  # JSON is YAML
    return path


def test_yaml_key_that_does_not_exist_gets_a_suggestion(cli_config, tmp_path, capsys, monkeypatch):
    err = _cli_error(["-c", str(cli_config), "--model.init_args.lossx=forward_kl"], capsys, monkeypatch)
    assert "Option 'lossx' is not accepted" in err
    assert "hint: 'lossx' is not an argument of trd_lightning.DistillationModule; did you mean 'loss'?" in err
    err = _cli_error(["-c", str(cli_config), "--trainer.max_stepz=3"], capsys, monkeypatch)
    assert "hint: 'trainer.max_stepz' is not a known key; did you mean 'trainer.max_steps'" in err
    (tmp_path / "typo.yaml").write_text("modle:\n  init_args: {loss: forward_kl}\n")
    err = _cli_error(["-c", str(cli_config), "-c", str(tmp_path / "typo.yaml")], capsys, monkeypatch)
    assert "hint: 'modle.init_args.loss' is not a known key; did you mean 'model.init_args.loss'?" in err
    (tmp_path / "data_typo.yaml").write_text("data:\n  init_args: {batch_sise: 4}\n")
    err = _cli_error(["-c", str(cli_config), "-c", str(tmp_path / "data_typo.yaml")], capsys, monkeypatch)
    assert "'batch_sise' is not an argument of trd_lightning.PromptDataModule; did you mean 'batch_size'" in err


def test_cli_names_bad_loss_reviser_and_criterion_values(cli_config, tmp_path, capsys, monkeypatch):
    err = _cli_error(["-c", str(cli_config), "--model.init_args.loss=revers_kl"], capsys, monkeypatch)
    assert "Expected a typing.Literal['reverse_kl', 'forward_kl'" in err and "Got value: revers_kl" in err
    pytest.importorskip("trd_lightning.revision", reason="trd_lightning/revision.py not present")
    reviser = {"class_path": "trd_lightning.revision.SpliceReviser"}
    callbacks = {"trainer": {"callbacks": [{"class_path": "trd_lightning.callbacks.TrajectoryRevision", "init_args": {"reviser": reviser}}]}}
    (tmp_path / "reviser.yaml").write_text(json.dumps(callbacks))
    err = _cli_error(["-c", str(cli_config), "-c", str(tmp_path / "reviser.yaml")], capsys, monkeypatch)
    assert "trd_lightning.revision has no 'SpliceReviser'; did you mean 'trd_lightning.revision.PrefixSpliceReviser'" in err
    reviser.update(class_path="trd_lightning.revision.PrefixSpliceReviser", init_args={"criterion": "teacher_prb"})
    (tmp_path / "reviser.yaml").write_text(json.dumps(callbacks))
    err = _cli_error(["-c", str(cli_config), "-c", str(tmp_path / "reviser.yaml")], capsys, monkeypatch)
    assert "Expected a typing.Literal['teacher_prob', 'teacher_top_p']. Got value: teacher_prb" in err


# --- 2. non-finite losses ---------------------------------------------------------------------
class WeightsPerStep(Callback):
    def __init__(self):
        self.weights: list[dict[str, torch.Tensor]] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.weights.append(params_of(pl_module.student))


def poison_teacher_at(module, call_index: int, kind: str):
    """Corrupt the teacher's logits of the ``call_index``-th training step: all NaN, or one token
    at -inf (probability 0 under the teacher, > 0 under the student: reverse KL = +inf)."""
    score, calls = module.score, []

    def poisoned(context, *, role):
        logits = score(context, role=role)
        if role == "teacher" and module.trainer.training:
            calls.append(1)
            if len(calls) == call_index:
                if kind == "nan":
                    return torch.full_like(logits, float("nan"))
                logits = logits.clone()
                logits[..., 3] = float("-inf")
        return logits

    module.score = poisoned


@pytest.mark.parametrize("kind", ["nan", "inf"])
def test_nonfinite_loss_skips_the_update_and_counts_it(tiny_paths, task, kind):
    module = make_module(tiny_paths, task, optimizer=lambda p: torch.optim.AdamW(p, lr=1e-2))
    poison_teacher_at(module, 2, kind)
    losses = []
    is_nonfinite = module._is_nonfinite
    module._is_nonfinite = lambda loss: losses.append(float(loss.detach())) or is_nonfinite(loss)
    record = WeightsPerStep()
    trainer = cpu_trainer(max_steps=3, limit_val_batches=0, callbacks=[record])
    with pytest.warns(UserWarning, match="non-finite training loss at step 1: its update is skipped"):
        trainer.fit(module, PromptDataModule(task, batch_size=2))
    first, skipped, third = record.weights
    assert all(torch.equal(first[k], skipped[k]) for k in first), "a non-finite step changed the weights"
    assert any(not torch.equal(skipped[k], third[k]) for k in first), "training must go on after the skip"
    assert all(torch.isfinite(v).all() for v in third.values())
    assert math.isinf(losses[1]) if kind == "inf" else math.isnan(losses[1])  # the injection did its job
    assert float(trainer.logged_metrics["train/skipped_nonfinite"]) == 1.0 and module.skipped_nonfinite == 1
    # AdamW advanced its step count for the two real updates only (no decay, no moments for the skip).
    steps = {int(s["step"]) for s in trainer.optimizers[0].state.values()}
    assert steps == {2} and trainer.global_step == 3


def test_nonfinite_loss_raise_saves_the_batch(tiny_paths, task, tmp_path):
    module = make_module(tiny_paths, task, nonfinite="raise")
    poison_teacher_at(module, 2, "nan")
    record = WeightsPerStep()
    trainer = cpu_trainer(max_steps=3, limit_val_batches=0, callbacks=[record], default_root_dir=tmp_path)
    seen = []
    make_rollout = module.make_rollout
    module.make_rollout = lambda problems: seen.append(list(problems)) or make_rollout(problems)
    saved = tmp_path / "nonfinite_step1_rank0.pt"
    with pytest.raises(FloatingPointError, match=rf"non-finite training loss \(nan\) at step 1; .* saved to {re.escape(str(saved))}"):
        trainer.fit(module, PromptDataModule(task, batch_size=2))
    batch = torch.load(saved, weights_only=False)
    assert batch["problems"] == seen[1] and len(batch["responses"]) == 2 and batch["step"] == 1
    assert batch["response_ids"].shape == batch["response_mask"].shape
    assert len(record.weights) == 1  # stopped at the bad step, before any update from it
    assert all(torch.equal(v, record.weights[0][k]) for k, v in params_of(module.student).items())


# --- 4. integrity -----------------------------------------------------------------------------
class JsonlArithmeticTask(ArithmeticTask):
    """The arithmetic task with its training problems read from a user's jsonl file."""

    def __init__(self, train_file: str, **kwargs):
        super().__init__(**kwargs)
        self.train_file = train_file

    def problems(self, split):
        if split != "train":
            return super().problems(split)
        rows = [json.loads(line) for line in Path(self.train_file).read_text().splitlines()]
        return [ArithmeticProblem(tuple(r["operands"]), tuple(r["ops"])) for r in rows]


def digest(paths: list[Path]) -> dict[str, tuple[str, int]]:
    return {str(p): (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns) for p in paths}


def test_teacher_and_data_are_never_written_and_checkpoints_hold_the_student_only(tokenizer, tmp_path):
    # A teacher much larger than the student makes the checkpoint's content visible in its size.
    student = save_tiny(tmp_path / "student", tokenizer, seed=0)
    teacher = tmp_path / "teacher"
    save_tiny(teacher, tokenizer, seed=1, hidden_size=128, num_layers=4)
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps({"operands": [i % 10, 3, 4], "ops": ["+", "*"]}) + "\n" for i in range(8)))
    protected = [*sorted(teacher.iterdir()), *sorted(Path(student).iterdir()), data]
    before = digest(protected)
    for p in protected:  # read-only (root ignores this; the hashes and mtimes below are the proof)
        p.chmod(0o444)
    try:
        task = JsonlArithmeticTask(str(data), val_size=4, test_size=4)
        module = DistillationModule(student=student, teacher=str(teacher), task=task, sampling=SAMPLING)
        trainer = cpu_trainer(max_steps=2, limit_val_batches=0, default_root_dir=tmp_path / "run")
        trainer.fit(module, PromptDataModule(task, batch_size=4))
        ckpt = tmp_path / "run" / "student.ckpt"
        trainer.save_checkpoint(ckpt)
        resumed = DistillationModule(student=student, teacher=str(teacher), task=task, sampling=SAMPLING)
        cpu_trainer(max_steps=3, limit_val_batches=0).fit(resumed, PromptDataModule(task, batch_size=4), ckpt_path=ckpt)
    finally:
        for p in protected:
            p.chmod(0o644)
    assert digest(protected) == before, "a teacher, student or data file was modified"

    state = torch.load(ckpt, weights_only=False)["state_dict"]
    assert state and all(k.startswith("student.") for k in state)
    numel = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731  (tied weights once)
    student_bytes, teacher_bytes = 4 * numel(module.student), 4 * numel(module.teacher)
    size = ckpt.stat().st_size
    # weights + AdamW's two moments = 3x the student, plus loop/RNG/hparams bookkeeping (< 64 KiB).
    assert 3 * student_bytes <= size <= 3 * student_bytes + 64 * 1024, (size, student_bytes)
    assert size < teacher_bytes / 4, (size, teacher_bytes)


def test_lora_checkpoint_holds_the_adapter_only(tiny_paths, task, tmp_path):
    pytest.importorskip("trd_lightning.lora", reason="trd_lightning/lora.py not present")
    pytest.importorskip("peft")
    module = make_module(tiny_paths, task, student_lora={"r": 2, "lora_alpha": 4, "target_modules": ["q_proj", "v_proj"]})
    trainer = cpu_trainer(max_steps=1, limit_val_batches=0)
    trainer.fit(module, PromptDataModule(task, batch_size=2))
    ckpt = tmp_path / "lora.ckpt"
    trainer.save_checkpoint(ckpt)
    state = torch.load(ckpt, weights_only=False)["state_dict"]
    trainable = {n for n, p in module.student.named_parameters() if p.requires_grad}
    assert state and all("lora_" in k for k in state) and len(state) == len(trainable)
    adapter_bytes = sum(4 * p.numel() for p in module.student.parameters() if p.requires_grad)
    base_bytes = sum(4 * p.numel() for p in module.student.parameters())
    assert adapter_bytes < base_bytes / 10
    assert ckpt.stat().st_size <= 3 * adapter_bytes + 64 * 1024 < 3 * base_bytes
