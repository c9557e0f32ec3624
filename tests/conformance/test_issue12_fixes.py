"""One test per silent wrong of issue 12 that the lead fixed, on the conformance fixtures (real
architectures, byte-level BPE tokenizers, chat templates). Each fails on the code before its fix."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from tests.conformance.fixtures import ROWS, save_model, write_jsonl
from tests.conformance.harness import build, math_task
from tests.conftest import cpu_trainer
from trd_lightning import DistillationModule, PromptDataModule, Sampling
from trd_lightning.revision import PrefixSpliceReviser, RewriteReviser, assemble_rollout


def _long_attempt(tok, repeat: int = 40) -> torch.Tensor:
    text = " ".join(["We add: 2+3=5."] * repeat)
    return torch.tensor(tok(text, add_special_tokens=False)["input_ids"] + [tok.eos_token_id])


def _n_tokens(tok, text: str) -> int:
    return len(tok(text, add_special_tokens=False)["input_ids"])


# --- item 1: c_r always holds the whole problem ----------------------------------------------
def test_refinement_context_keeps_the_problem_and_cuts_only_the_attempt_by_a_counted_rule(parts):
    module, dm = build(parts, "llama-qwen2", max_prompt_length=64)
    task = dm.task
    module._task = task
    tok = module.tokenizer
    problems = list(task.problems("train"))[:3]
    attempts = [_long_attempt(tok, 40 + 10 * i) for i in range(3)]
    rollout = assemble_rollout(module, problems, attempts, [module.teacher_prompt(p) for p in problems])
    limit = 200
    revised = RewriteReviser(max_context_tokens=limit, sampling=Sampling(temperature=1.0, max_new_tokens=8)).revise(module, rollout)
    cut_tokens = 0
    for i, p in enumerate(problems):
        prompt_ids = revised.teacher.input_ids[i, : revised.teacher.prompt_width][revised.teacher.attention_mask[i, : revised.teacher.prompt_width].bool()]
        c_r = tok.decode(prompt_ids.tolist())
        # The whole problem and the instruction are there, and the context is within its budget
        # (before the fix the teacher context was cut from the left to max_prompt_length = 64).
        assert p.problem in c_r and "Rewrite the attempted solution" in c_r, c_r[:200]
        assert len(prompt_ids) <= limit
        # Independently: the kept attempt is the longest prefix of y_o that fits.
        attempt = attempts[i]
        kept = next(k for k in range(len(attempt), -1, -1)
                    if _n_tokens(tok, task.refinement_prompt(p, tok.decode(attempt[:k].tolist(), skip_special_tokens=True))) <= limit)
        assert _n_tokens(tok, task.refinement_prompt(p, tok.decode(attempt[:kept].tolist(), skip_special_tokens=True))) == len(prompt_ids)
        cut_tokens += len(attempt) - kept
    assert revised.info["attempts_cut"] == 3 and revised.info["attempt_tokens_cut"] == cut_tokens > 0
    with pytest.raises(ValueError, match="does not fit 10 tokens even without the attempt"):
        RewriteReviser(max_context_tokens=10).revise(module, rollout)


# --- item 2: rollouts end at the model's full set of stop ids ---------------------------------
def _check_ends_at_first_stop(ids, mask, stop, budget):
    ended_early = 0
    for row, m in zip(ids, mask):
        toks = row[m.bool()].tolist()
        hits = [k for k, t in enumerate(toks) if t in stop]
        if hits:
            assert hits[0] == len(toks) - 1, f"runs past stop id {toks[hits[0]]}: {toks}"
            ended_early += len(toks) < budget
        else:
            assert len(toks) == budget
    return ended_early


def test_rollouts_and_the_splice_decode_stop_at_every_generation_config_eos(parts):
    pair = parts["qwen2-qwen3-multi"]
    config = json.load(open(f"{pair['student']}/generation_config.json"))
    stop = set(config["eos_token_id"])
    module, dm = build(parts, "qwen2-qwen3-multi", sampling=Sampling(temperature=1.0, max_new_tokens=32))
    module._task = dm.task
    tok = module.tokenizer
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    assert tok.eos_token == "<|endoftext|>" and im_end in stop and set(module.stop_ids) == stop
    problems = list(dm.task.problems("train")) * 8
    torch.manual_seed(0)
    rollout = module.make_rollout(problems)
    assert _check_ends_at_first_stop(rollout.response_ids, rollout.response_mask, stop, 32) > 0
    ended_at_im_end = sum(int(r[m.bool()][-1]) == im_end for r, m in zip(rollout.response_ids, rollout.response_mask))
    assert ended_at_im_end > 0  # the case the old code missed: turns ending in <|im_end|>
    torch.manual_seed(0)
    fused = PrefixSpliceReviser(max_new_tokens=32).sample_revised(module, problems)
    assert _check_ends_at_first_stop(fused.response_ids, fused.response_mask, stop, 32) > 0


def test_student_and_teacher_must_agree_on_stop_ids(parts, tmp_path):
    teacher = tmp_path / "teacher"
    shutil.copytree(parts["qwen2-qwen3-multi"]["teacher"], teacher)
    config = json.load(open(teacher / "generation_config.json"))
    from transformers import AutoTokenizer

    # The teacher stops at <|endoftext|> only (turn ends in <|im_end|> would not end its responses).
    config["eos_token_id"] = [AutoTokenizer.from_pretrained(teacher).convert_tokens_to_ids("<|endoftext|>")]
    (teacher / "generation_config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="end responses at different tokens.*generation_config"):
        build(parts, "qwen2-qwen3-multi", teacher=str(teacher))


# --- item 9: sampling in eval mode ------------------------------------------------------------
def test_sampling_runs_with_dropout_off_and_the_update_mode_is_restored(parts):
    module, dm = build(parts, "gpt2-llama")  # GPT-2 student with dropout 0.1
    module._task = dm.task
    assert module.student.config.resid_pdrop > 0 and module.student.training
    modes = []
    handle = module.student.register_forward_pre_hook(lambda m, a: modes.append(m.training))
    problems = list(dm.task.problems("train"))[:4]
    module.make_rollout(problems)
    PrefixSpliceReviser(max_new_tokens=8).sample_revised(module, problems)
    handle.remove()
    assert modes and not any(modes)
    assert module.student.training and all(m.training for m in module.student.modules())


# --- item 12: prompts past the positions are refused before compute -------------------------
def test_prompt_longer_than_the_positions_is_refused_before_compute(parts, tmp_path):
    pair = parts["gpt2-llama"]
    long_rows = [{**ROWS[0], "problem": " ".join(["What is 2+3?"] * 120)}, *ROWS[1:]]
    train = write_jsonl(tmp_path / "train.jsonl", long_rows)
    module = DistillationModule(student=pair["student"], teacher=pair["teacher"], sampling=Sampling(max_new_tokens=8))
    generated = []
    module.student.generate = lambda *a, **k: generated.append(1)
    from trd_lightning.tasks import MathTask

    dm = PromptDataModule(task=MathTask(train_file=train, tokenizer=pair["student"]), batch_size=2)
    with pytest.raises(ValueError, match=r"train split's longest student prompt \(\d+ tokens, problem 0.*exceeds the student's max_position_embeddings \(512\)"):
        cpu_trainer(max_steps=1, limit_val_batches=0).fit(module, datamodule=dm)
    assert generated == []


# --- item 6: the CPU 4-bit teacher is probed with its real layer shapes ----------------------
def _bnb_4bit_linear_runs(in_features: int) -> bool:
    """Whether this bitsandbytes build's CPU 4-bit kernel runs a bare layer of this input width
    (independent of the module: decides which behaviour the test below must see)."""
    import bitsandbytes as bnb

    layer = bnb.nn.Linear4bit(in_features, 64, bias=False, compute_dtype=torch.float32, quant_type="nf4")
    layer.weight = bnb.nn.Params4bit(torch.randn(64, in_features), requires_grad=False, quant_type="nf4")
    try:
        return bool(torch.isfinite(layer.to("cpu")(torch.randn(2, in_features))).all())
    except Exception:
        return False


@pytest.mark.parametrize("width", [96, 64])
def test_4bit_teacher_with_unsupported_layer_widths_fails_at_construction(parts, tmp_path, width):
    """The kernel's width rule depends on the bitsandbytes build (0.50.2 runs width 96 on CPU,
    earlier builds measured here did not): a width the kernel cannot run is refused when the module
    is built, naming the layers and the rule; a width it runs builds a working teacher."""
    pytest.importorskip("bitsandbytes")
    teacher = save_model(tmp_path / "teacher", "llama", "chatml", seed=3, width=width)
    kwargs = dict(student=parts["llama-qwen2"]["student"], teacher=teacher, teacher_quantization={"load_in_4bit": True})
    if _bnb_4bit_linear_runs(width):
        module = DistillationModule(**kwargs)
        logits = module.teacher(input_ids=torch.tensor([[1, 2, 3]])).logits
        assert torch.isfinite(logits).all()
        return
    with pytest.raises(RuntimeError, match=rf"input width to be a multiple of 64.*in_features {width}.*skip_modules"):
        DistillationModule(**kwargs)


# --- item 7: LoRA on GPT-2's Conv1D ----------------------------------------------------------
def test_gpt2_lora_on_c_attn(parts):
    module, _ = build(parts, "gpt2-llama", student_lora={"r": 4, "lora_alpha": 8, "target_modules": ["c_attn"]})
    trainable = [n for n, p in module.student.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n and "c_attn" in n for n in trainable)
    ids = torch.tensor([[1, 2, 3]])
    assert module.student(input_ids=ids).logits.shape[:2] == (1, 3)


# --- item 8: half-precision master weights ---------------------------------------------------
def test_bf16_student_weights_without_lora_are_refused_with_the_fix(parts):
    with pytest.raises(ValueError, match=r"student_dtype: bfloat16 trains the student's weights.*bf16-mixed"):
        build(parts, "llama-qwen2", student_dtype="bfloat16")
    module, _ = build(parts, "llama-qwen2", student_dtype="bfloat16", student_lora={"r": 4, "target_modules": ["q_proj"]})
    assert {p.dtype for p in module.student.parameters() if p.requires_grad} == {torch.float32}
    module, dm = build(parts, "llama-qwen2")
    with pytest.raises(ValueError, match="trainer.precision: bf16-true"):
        cpu_trainer(max_steps=1, precision="bf16-true", limit_val_batches=0).fit(module, datamodule=dm)


# --- item 11: a teacher template that adds a default system turn -----------------------------
def test_teacher_template_with_a_default_system_turn_is_refused(parts, tmp_path):
    from transformers import AutoTokenizer

    teacher = tmp_path / "teacher"
    shutil.copytree(parts["llama-qwen2"]["teacher"], teacher)
    tok = AutoTokenizer.from_pretrained(teacher)
    tok.chat_template = (
        "{%- if messages[0]['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
        + tok.chat_template
    )
    tok.save_pretrained(teacher)
    with pytest.raises(ValueError, match="render a sample conversation without a system turn differently"):
        build(parts, "llama-qwen2", teacher=str(teacher))
    # The task's own conversations are checked too (here a template that differs only there).
    module, dm = build(parts, "llama-qwen2")
    module._teacher_tokenizer.chat_template = module._teacher_tokenizer.chat_template.replace("\n{% endfor %}", "\n\n{% endfor %}")
    with pytest.raises(ValueError, match="render the task's train prompts differently"):
        cpu_trainer(max_steps=1, limit_val_batches=0).fit(module, datamodule=dm)
