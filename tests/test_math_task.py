"""MathTask: local jsonl/parquet through `datasets`, errors naming the field and line, math-verify
answers, chat-template prompts and the paper's refinement contexts; a fit on it with tiny chat
models; and the pre-flight tokenizer check (special tokens, chat template)."""

from __future__ import annotations

import json

import pytest
import torch

from tests.helpers import CHAT_TEMPLATE, ROWS, build_chat_tokenizer, cpu_trainer, save_chat_model, save_chat_setup, write_jsonl
from trd_lightning import DistillationModule, PromptDataModule, Sampling
from trd_lightning.callbacks import TrajectoryRevision
from trd_lightning.models import check_compatible
from trd_lightning.revision import RewriteReviser
from trd_lightning.tasks import MathTask, Task
from trd_lightning.tasks.math import last_boxed


@pytest.fixture(scope="module")
def chat_paths(tmp_path_factory):
    return save_chat_setup(tmp_path_factory.mktemp("chat"))


# --- reading ----------------------------------------------------------------------------------
def test_reads_jsonl_and_parquet_through_datasets(tmp_path):
    from datasets import Dataset

    jsonl = write_jsonl(tmp_path / "a.jsonl", ROWS, blank_after=2)  # a blank line is skipped
    Dataset.from_list(ROWS).to_parquet(str(tmp_path / "a.parquet"))
    task = MathTask(train_file=jsonl, test_file=str(tmp_path / "a.parquet"))
    assert isinstance(task, Task)
    train, test = task.problems("train"), task.problems("test")
    assert [p.problem for p in train] == [p.problem for p in test] == [r["problem"] for r in ROWS]
    assert [p.answer for p in train] == [r["answer"] for r in ROWS]
    assert train[2].source.endswith("a.jsonl, line 4") and test[2].source.endswith("a.parquet, row 3")
    assert task.problems("val") == []
    # Other field names, and the answer taken from the solution's last \boxed{}.
    renamed = [{"question": r["problem"], "worked": r["solution"]} for r in ROWS]
    task = MathTask(train_file=write_jsonl(tmp_path / "b.jsonl", renamed), problem_key="question", solution_key="worked", answer_key=None, max_problems=2)
    assert [p.answer for p in task.problems("train")] == ["5", "\\frac{1}{2}"]


def test_bad_data_files_name_the_field_and_the_line(tmp_path):
    rows = [dict(r) for r in ROWS]
    del rows[2]["answer"]
    with pytest.raises(ValueError, match=r"c\.jsonl, line 3: no field 'answer'.*answer_key"):
        MathTask(train_file=write_jsonl(tmp_path / "c.jsonl", rows)).problems("train")
    rows = [dict(r) for r in ROWS]
    rows[1]["solution"] = "  "
    with pytest.raises(ValueError, match=r"d\.jsonl, line 2: field 'solution' is empty"):
        MathTask(train_file=write_jsonl(tmp_path / "d.jsonl", rows)).problems("train")
    (tmp_path / "e.jsonl").write_text(json.dumps(ROWS[0]) + "\n" + json.dumps(ROWS[1]) + "\n{\"problem\": oops}\n")
    with pytest.raises(ValueError, match=r"e\.jsonl, line 3: not valid JSON"):
        MathTask(train_file=str(tmp_path / "e.jsonl")).problems("train")

    from datasets import Dataset

    Dataset.from_list([{"problem": r["problem"], "solution": r["solution"]} for r in ROWS]).to_parquet(str(tmp_path / "f.parquet"))
    with pytest.raises(ValueError, match=r"f\.parquet: no column 'answer'.*columns: \['problem', 'solution'\]"):
        MathTask(train_file=str(tmp_path / "f.parquet")).problems("train")
    with pytest.raises(FileNotFoundError, match="val_file.*does not exist"):
        MathTask(val_file=str(tmp_path / "nope.jsonl"))
    (tmp_path / "g.csv").write_text("problem,solution,answer\n")
    with pytest.raises(ValueError, match="use .jsonl"):
        MathTask(train_file=str(tmp_path / "g.csv")).problems("train")


# --- answers ----------------------------------------------------------------------------------
def test_verify_compares_the_last_boxed_answer_mathematically(tmp_path):
    task = MathTask(train_file=write_jsonl(tmp_path / "a.jsonl", ROWS))
    five, half = task.problems("train")[:2]
    assert task.verify(five, "2+3 is \\boxed{5}")
    assert task.verify(five, "first \\boxed{4}, no wait: \\boxed{5.0}")  # the last box counts
    assert not task.verify(five, "\\boxed{5} ... actually \\boxed{6}")
    assert not task.verify(five, "the answer is 5")  # no box, no credit
    assert task.verify(half, "\\boxed{0.5}") and task.verify(half, "\\boxed{1/2}") and not task.verify(half, "\\boxed{2}")
    assert last_boxed("x \\boxed{\\frac{a}{b}} y") == "\\frac{a}{b}"
    assert last_boxed("unfinished \\boxed{\\frac{1}{") is None


# --- prompts ----------------------------------------------------------------------------------
def test_prompts_render_with_the_chat_template_and_the_paper_contexts(chat_paths, tmp_path):
    task = MathTask(train_file=chat_paths["train"], tokenizer=chat_paths["student"], system_prompt="Be brief.")
    tok = build_chat_tokenizer()
    p = task.problems("train")[0]
    expected = tok.apply_chat_template(
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": f"{p.problem}\n\n{task.instruction}"}],
        add_generation_prompt=True, tokenize=False,
    )
    assert task.student_prompt(p) == expected and expected.endswith("<|im_start|>assistant\n")
    assert p.solution not in task.student_prompt(p)
    privileged = task.privileged_prompt(p)
    assert p.problem in privileged and p.solution in privileged and privileged.endswith("<|im_start|>assistant\n")

    attempt = "2+3=6, so \\boxed{6}"
    opd = task.refinement_prompt(p, attempt)
    assert p.problem in opd and attempt in opd and p.solution not in opd
    assert "Keep its structure and every step that is correct" in opd
    opsd = task.refinement_prompt(p, attempt, privileged=True)
    assert p.problem in opsd and attempt in opsd and p.solution in opsd and "consistent with the reference" in opsd
    # Long attempts keep their start.
    short = MathTask(train_file=chat_paths["train"], tokenizer=chat_paths["student"], max_attempt_chars=5)
    assert "2+3=6" in short.refinement_prompt(p, attempt) and "boxed{6}" not in short.refinement_prompt(p, attempt)
    # Template variables pass through (Qwen3's enable_thinking works this way).
    flavoured = build_chat_tokenizer(CHAT_TEMPLATE + "{% if enable_thinking is defined and not enable_thinking %}<think></think>{% endif %}")
    flavoured.save_pretrained(tmp_path / "tok")
    nothink = MathTask(train_file=chat_paths["train"], tokenizer=str(tmp_path / "tok"), chat_template_kwargs={"enable_thinking": False})
    assert nothink.student_prompt(p).endswith("assistant\n<think></think>")
    # Without a tokenizer: plain text, still ending where the response starts.
    assert MathTask(train_file=chat_paths["train"]).student_prompt(p).endswith("Solution: ")
    with pytest.raises(FileNotFoundError, match="tokenizer.*not a directory"):
        MathTask(tokenizer=str(tmp_path / "missing"))


# --- training on it ---------------------------------------------------------------------------
def test_distillation_and_trd_fit_on_math_files_with_chat_models(chat_paths):
    task = MathTask(train_file=chat_paths["train"], val_file=chat_paths["val"], tokenizer=chat_paths["student"], instruction="Box it.")
    module = DistillationModule(
        student=chat_paths["student"], teacher=chat_paths["teacher"], task=task, loss="forward_kl",
        sampling=Sampling(max_new_tokens=8), student_lora={"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"]},
    )
    revision = TrajectoryRevision(RewriteReviser(refine="all"))
    seen = []
    original = module.distillation_loss
    module.distillation_loss = lambda rollout: seen.append(rollout) or original(rollout)
    trainer = cpu_trainer(max_steps=2, limit_val_batches=1, val_check_interval=2, callbacks=[revision])
    trainer.fit(module, PromptDataModule(task, batch_size=2, eval_batch_size=2))
    assert torch.isfinite(trainer.logged_metrics["train/loss"]) and "val/loss" in trainer.logged_metrics
    # The teacher scored the rewrite under c_r: a chat-rendered refinement context with the attempt.
    ctx = seen[0].teacher
    for ids, mask in zip(ctx.input_ids[:, : ctx.prompt_width], ctx.attention_mask[:, : ctx.prompt_width]):
        text = module.tokenizer.decode(ids[mask.bool()])
        assert text.startswith("<|im_start|>user\nHere is a math problem and an attempted solution.")
        assert "Attempted solution:" in text and text.endswith("<|im_start|>assistant\n")


# --- pre-flight compatibility -----------------------------------------------------------------
def test_preflight_refuses_other_special_tokens_or_chat_template(chat_paths, tmp_path):
    student = build_chat_tokenizer()
    check_compatible(student, build_chat_tokenizer())  # identical: fine
    other_template = build_chat_tokenizer(CHAT_TEMPLATE.replace("<|im_start|>assistant\n", "<|im_start|>model\n"))
    with pytest.raises(ValueError, match=r"chat templates render a sample conversation differently.*im_start\|>model"):
        check_compatible(student, other_template)
    other_special = build_chat_tokenizer()
    other_special.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "#"]})  # '#' is already in the vocab
    assert other_special.get_vocab() == student.get_vocab()
    with pytest.raises(ValueError, match=r"different special tokens: only in student \[\], only in teacher \['#'\]"):
        check_compatible(student, other_special)
    # At construction, before any training: a teacher saved with another template is refused.
    teacher = save_chat_model(tmp_path / "teacher", other_template, seed=1)
    with pytest.raises(ValueError, match="chat templates render"):
        DistillationModule(student=chat_paths["student"], teacher=teacher)
