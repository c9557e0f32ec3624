"""The `trd` commands on real parts: `fit` then `test --ckpt_path`, `predict`, `audit`, and what
happens to explicit arguments and to inputs that must be refused before compute.

Several cases are the issue-12 fixes (items 3, 4, 5, 6, 10, 12, 13), each failing on the code
before its fix.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from tests.conformance import harness as h
from tests.conformance.fixtures import save_model
from trd_lightning import DistillationModule, Sampling
from trd_lightning.callbacks import PassAtKEvaluation
from trd_lightning.cli import build_cli
from trd_lightning.lora import is_lora

LORA = {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"], "init_lora_weights": False}
PASS_AT_K = {"class_path": "trd_lightning.callbacks.PassAtKEvaluation",
             "init_args": {"n": 2, "ks": [1, 2], "sampling": {"temperature": 1.0, "max_new_tokens": 8}}}


def pass_at_k(cli) -> dict:
    return next(cb for cb in cli.trainer.callbacks if isinstance(cb, PassAtKEvaluation)).last


@pytest.fixture(scope="module")
def fitted(parts, tmp_path_factory):
    """`trd fit` of a LoRA Llama student on the Qwen2 teacher, with the test split evaluated after fit."""
    root = tmp_path_factory.mktemp("cli")
    config = h.write_config(root / "cfg.yaml", parts, "llama-qwen2", model={"student_lora": LORA}, callbacks=[PASS_AT_K])
    cli = build_cli(["fit", "-c", config, "--test_after_fit=true"])
    return {"root": root, "config": config, "ckpt": root / "ckpt" / "last.ckpt", "logged": pass_at_k(cli),
            "test_loss": float(cli.trainer.callback_metrics["test/loss"])}


@pytest.mark.slow
def test_test_from_checkpoint_repeats_the_numbers_fit_logged(fitted):
    assert set(fitted["logged"]) == {"test/avg@2", "test/pass@1", "test/pass@2"}
    again = build_cli(["test", "-c", fitted["config"], f"--ckpt_path={fitted['ckpt']}"])
    assert pass_at_k(again) == fitted["logged"]
    assert float(again.trainer.callback_metrics["test/loss"]) == fitted["test_loss"]  # eval rollouts are seeded
    assert is_lora(again.model.student)


@pytest.mark.slow
def test_predict_writes_predictions_jsonl(fitted):
    build_cli(["predict", "-c", fitted["config"], f"--ckpt_path={fitted['ckpt']}"])
    found = [p for p in fitted["root"].rglob("*.jsonl") if "audit" not in p.relative_to(fitted["root"]).parts]
    assert found, "no predictions file under the run folder"
    records = [json.loads(line) for p in found for line in p.read_text().splitlines() if line.strip()]
    assert len(records) == 3 and {"problem", "prompt", "response", "verified"} <= set(records[0])


@pytest.mark.slow
def test_audit_on_math_task_with_its_default_onsets(fitted):
    out = fitted["root"] / "audit"
    build_cli(["audit", "-c", fitted["config"], f"--ckpt_path={fitted['ckpt']}", "--audit.num_problems=3",
               "--audit.batch_size=3", f"--audit.output_dir={out}"])
    assert any(out.rglob("*.json")) or any(out.rglob("*.md"))


def honoured_or_refused(run, key: str, honoured) -> None:
    """An explicit argument next to ``--ckpt_path`` either wins or stops the run naming ``key``."""
    try:
        cli = run()
    except Exception as err:  # noqa: BLE001 - the message is what is checked
        message = str(err)
        assert key in message and ("ckpt" in message or "hyperparameter" in message), message
        return
    honoured(cli)


@pytest.mark.slow
def test_explicit_lora_null_next_to_ckpt_path(fitted):
    def honoured(cli):
        assert cli.model.hparams.student_lora is None and not is_lora(cli.model.student)

    honoured_or_refused(
        lambda: build_cli(["test", "-c", fitted["config"], f"--ckpt_path={fitted['ckpt']}", "--model.init_args.student_lora=null"]),
        "student_lora", honoured,
    )


@pytest.mark.slow
def test_moved_student_can_be_repointed_next_to_ckpt_path(parts, tmp_path):
    student = shutil.copytree(parts["llama-qwen2"]["student"], tmp_path / "student")
    config = h.write_config(tmp_path / "cfg.yaml", parts, "llama-qwen2", model={"student": str(student)})
    build_cli(["fit", "-c", config])
    moved = student.rename(tmp_path / "moved_student")

    def honoured(cli):
        assert cli.model.hparams.student == str(moved)

    honoured_or_refused(
        lambda: build_cli(["test", "-c", config, f"--ckpt_path={tmp_path / 'ckpt' / 'last.ckpt'}", f"--model.init_args.student={moved}"]),
        "student", honoured,
    )


def test_cli_null_system_prompt_is_none(parts, tmp_path):
    config = h.write_config(tmp_path / "cfg.yaml", parts, "llama-qwen2", task={"system_prompt": "Be brief."})
    cli = build_cli(["fit", "-c", config, "--data.init_args.task.init_args.system_prompt=null"], run=False)
    task = cli.datamodule.task
    assert task.system_prompt is None
    assert "system" not in task.student_prompt(task.problems("train")[0])


def test_student_without_tokenizer_files_is_named(parts, tmp_path):
    bare = save_model(tmp_path / "bare_student", "llama", "chatml", seed=0, with_tokenizer=False)
    with pytest.raises((ValueError, FileNotFoundError, OSError)) as err:
        DistillationModule(student=bare, teacher=parts["llama-qwen2"]["teacher"])
    message = str(err.value)
    assert "tokenizer" in message and bare in message and "vocabular" not in message, message


def test_prompt_longer_than_gpt2_positions_is_refused_before_compute(parts, tmp_path):
    """Item 12: GPT-2's absolute positions are capped; a prompt past them is an error naming the limit,
    not an IndexError inside generate."""
    short = save_model(tmp_path / "gpt2_short", "gpt2", "chatml_nopad", seed=0, positions=40)
    module, dm = h.build(parts, "gpt2-llama", sampling=Sampling(max_new_tokens=12))
    task = dm.task
    longest = max(len(module.tokenizer(task.student_prompt(p), add_special_tokens=False)["input_ids"]) for p in task.problems("train"))
    assert longest + 12 > 40  # the case holds a too-long prompt
    calls = []
    with pytest.raises(ValueError, match="40"):
        short_module = DistillationModule(student=short, teacher=parts["gpt2-llama"]["teacher"], sampling=Sampling(max_new_tokens=12))
        short_module.student.register_forward_pre_hook(lambda *a: calls.append(1))
        h.fit(short_module, dm, steps=1)
    assert not calls  # refused before any forward pass


def four_bit_case(parts, tmp_path, width: int):
    teacher = save_model(tmp_path / f"teacher_{width}", "llama", "chatml", seed=1, width=width)
    shutil.copy(parts["llama-qwen2"]["teacher"] + "/tokenizer.json", teacher)
    return h.build(parts, "llama-qwen2", teacher=teacher, teacher_quantization={"load_in_4bit": True, "bnb_4bit_compute_dtype": "float32"})


@pytest.mark.slow
def test_four_bit_teacher_on_cpu(parts, tmp_path):
    pytest.importorskip("bitsandbytes")
    module, dm = four_bit_case(parts, tmp_path, 64)
    assert "4bit" in type(module.teacher.model.layers[0].self_attn.q_proj).__name__.lower() or \
        type(module.teacher.model.layers[0].self_attn.q_proj).__module__.startswith("bitsandbytes")
    rec = h.fit(module, dm)
    h.check_loss(rec)
    h.check_teacher_logits(rec, atol=1e-4)  # the quantized teacher's own fresh forward


@pytest.mark.slow
def test_four_bit_teacher_width_96_works_or_is_refused_before_compute(parts, tmp_path):
    """Item 6: width 96 passed the probe and failed inside the first step; now it must train or be
    refused when the module is built, naming the layers and the rule."""
    pytest.importorskip("bitsandbytes")
    try:
        module, dm = four_bit_case(parts, tmp_path, 96)
    except (ValueError, RuntimeError) as err:  # a refusal at construction, stating the rule, is right too
        assert "in_features 96" in str(err) and "multiple of 64" in str(err), str(err)
        return
    rec = h.fit(module, dm, steps=1)
    h.check_loss(rec)
