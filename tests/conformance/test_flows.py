"""The conformance matrix: every flow on tiny real architectures and tokenizer layouts, each case
checked against an independent computation (see `tests.conformance.harness`).

The case list, with every invariant, is the table in docs/real_models.md.
"""

from __future__ import annotations

import shutil

import pytest
import torch
from transformers import AutoModelForCausalLM

from tests.conformance import harness as h
from tests.conformance.fixtures import stop_ids
from trd_lightning import Sampling
from trd_lightning.callbacks import TrajectoryRevision
from trd_lightning.revision import PrefixSpliceReviser, RewriteReviser
from trd_lightning.models import load_tokenizer

BUDGET = h.SMALL_SAMPLING["max_new_tokens"]


def stop_set(parts, pair) -> set[int]:
    tok = load_tokenizer(parts[pair]["student"])
    return set(stop_ids(tok, parts[pair]["layout"])) | {tok.eos_token_id}


@pytest.mark.parametrize(
    "pair, loss, kwargs",
    [
        ("llama-qwen2", "reverse_kl", {}),
        ("gemma-gemma", "forward_kl", {}),
        ("gpt2-llama", "forward_kl", {"clip": 0.5}),
    ],
    ids=["opd_reverse_kl", "opd_gemma", "opd_gpt2_nopad_dropout"],
)
def test_opd(parts, pair, loss, kwargs):
    module, dm = h.build(parts, pair, loss=loss, loss_kwargs=kwargs)
    rec = h.fit(module, dm)
    h.check_loss(rec, kwargs)
    h.check_teacher_logits(rec)
    h.check_mask_is_response(rec)
    h.check_stops(rec, stop_set(parts, pair), BUDGET)  # gemma: <eos> and <end_of_turn>
    assert rec.update_modes and all(rec.update_modes)  # the student trains in train mode (dropout on for GPT-2)


def test_rewrite_opd_refinement_context_holds_the_problem(parts):
    module, dm = h.build(parts, "qwen3-mistral")
    rec = h.fit(module, dm, TrajectoryRevision(RewriteReviser()))
    for rollout in rec.rollouts:
        for p, ctx in zip(rollout.problems, h.decoded_teacher_contexts(module.tokenizer, rollout)):
            assert p.problem in ctx and "Attempted solution" in ctx and p.solution not in ctx
    h.check_loss(rec)
    h.check_teacher_logits(rec)
    h.check_mask_is_response(rec)


@pytest.mark.slow
def test_opsd_trd_rewrite_context_holds_problem_and_reference(parts):
    module, dm = h.build(parts, "llama-qwen2", mode="opsd", loss="forward_kl")
    rec = h.fit(module, dm, TrajectoryRevision(RewriteReviser()))
    for rollout in rec.rollouts:
        for p, ctx in zip(rollout.problems, h.decoded_teacher_contexts(module.tokenizer, rollout)):
            assert p.problem in ctx and p.solution in ctx and "Attempted solution" in ctx
    h.check_loss(rec)
    h.check_teacher_logits(rec)


@pytest.mark.parametrize("pair, fused", [("llama-qwen2", True), ("gemma-gemma", False)], ids=["splice_fused", "splice_two_pass"])
def test_splice(parts, pair, fused):
    module, dm = h.build(parts, pair)
    rec = h.fit(module, dm, TrajectoryRevision(PrefixSpliceReviser(fused=fused, threshold=0.2)))
    assert any(bool((r.info.get("t_star_rows", torch.tensor([-1])) >= 0).any()) for r in rec.rollouts)  # something was revised
    h.check_loss(rec)
    h.check_teacher_logits(rec)  # the decode's own teacher logits equal a fresh forward
    h.check_mask_is_response(rec)
    h.check_stops(rec, stop_set(parts, pair), BUDGET)


@pytest.mark.parametrize("opsd_teacher", ["frozen", pytest.param("live", marks=pytest.mark.slow), "ema"])
def test_opsd(parts, opsd_teacher):
    module, dm = h.build(parts, "qwen3-mistral", mode="opsd", opsd_teacher=opsd_teacher, loss="forward_kl",
                         loss_kwargs={"clip": 1.0}, ema_decay=0.5)
    initial = [p.detach().clone() for p in module.student.parameters()]
    rec = h.fit(module, dm)
    for rollout in rec.rollouts:
        for p, ctx in zip(rollout.problems, h.decoded_teacher_contexts(module.tokenizer, rollout)):
            assert p.problem in ctx and p.solution in ctx
    h.check_loss(rec, {"clip": 1.0})
    h.check_teacher_logits(rec)  # computed with the teacher weights of each step (live/EMA move)
    teacher = module.model_for("teacher")
    moved = any(not torch.equal(a, b) for a, b in zip(initial, teacher.parameters()))
    assert moved == (opsd_teacher != "frozen")


@pytest.mark.slow
def test_lora_student_trains_only_adapters(parts):
    lora = {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"]}
    module, dm = h.build(parts, "llama-qwen2", student_lora=lora)
    before = {n: p.detach().clone() for n, p in module.student.named_parameters()}
    rec = h.fit(module, dm)
    h.check_loss(rec)
    h.check_teacher_logits(rec)
    changed = {n for n, p in module.student.named_parameters() if not torch.equal(p, before[n])}
    assert changed and all("lora_" in n for n in changed)


def test_other_vocabulary_teacher_is_refused_before_compute(parts):
    with pytest.raises(ValueError, match="tokenizers differ.*same model family"):
        h.build(parts, "llama-qwen2", teacher=parts["other_vocab_teacher"])


# --- issue 12: the cases of its fixes (items 1, 2, 7, 9) ---------------------------------------
def test_rewrite_budget_keeps_problem_and_reference_and_counts_the_cut(parts):
    """Item 1: a c_r over the budget keeps the whole problem and reference; only the attempt's end
    goes, and the count logged is what an independent re-tokenisation finds."""
    module, dm = h.build(parts, "llama-qwen2", mode="opsd", loss="forward_kl")
    task, tok = dm.task, module.tokenizer
    length = lambda text: len(tok(text, add_special_tokens=False)["input_ids"])  # noqa: E731
    bare = max(length(task.refinement_prompt(p, "", privileged=True)) for p in task.problems("train"))
    limit = bare + 3  # every problem fits, almost no attempt does
    rec = h.fit(module, dm, TrajectoryRevision(RewriteReviser(max_context_tokens=limit)))
    cut_rows = 0
    for rollout in rec.rollouts:
        for i, (p, ctx) in enumerate(zip(rollout.problems, h.decoded_teacher_contexts(tok, rollout))):
            assert p.problem in ctx and p.solution in ctx and length(ctx) <= limit
        cut_rows += rollout.info["attempts_cut"]
    assert cut_rows > 0
    with pytest.raises(ValueError, match="does not fit.*max_context_tokens"):
        module2, dm2 = h.build(parts, "llama-qwen2", mode="opsd", loss="forward_kl")
        h.fit(module2, dm2, TrajectoryRevision(RewriteReviser(max_context_tokens=bare - 1)))


def turn_end_model(parts, tmp_path, pair: str = "qwen2-qwen3-multi") -> dict:
    """The pair's student with ``<|im_end|>``'s output row swapped with the token greedy decoding
    emits third, so greedy rollouts reach the turn end early (the random weights alone rarely do)."""
    src = parts[pair]
    tok = load_tokenizer(src["student"])
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    model = AutoModelForCausalLM.from_pretrained(src["student"])
    task = h.math_task(parts, pair)
    ids = torch.tensor([tok(task.student_prompt(task.problems("train")[0]), add_special_tokens=False)["input_ids"]])
    out = model.generate(ids, do_sample=False, max_new_tokens=6, eos_token_id=None, pad_token_id=tok.pad_token_id)[0, ids.shape[1]:]
    tau = next(int(t) for t in out[2:] if int(t) not in tok.all_special_ids)
    with torch.no_grad():
        w = model.lm_head.weight
        w[[tau, im_end]] = w[[im_end, tau]]
    dst = tmp_path / "turn_end_student"
    model.save_pretrained(dst)
    shutil.copytree(src["student"], dst, dirs_exist_ok=True, ignore=shutil.ignore_patterns("*.safetensors", "config.json", "generation_config.json"))
    return {"student": str(dst), "im_end": im_end}


def run_to_turn_end(parts, tmp_path, pair):
    made = turn_end_model(parts, tmp_path, pair)
    module, dm = h.build(parts, pair, sampling=Sampling(temperature=0.0, max_new_tokens=BUDGET))
    module.student.load_state_dict(AutoModelForCausalLM.from_pretrained(made["student"]).state_dict())
    dm.shuffle = False
    rec = h.fit(module, dm, steps=1)
    rows = [ids[m].tolist() for r in rec.rollouts for ids, m in zip(r.response_ids, r.response_mask)]
    assert any(made["im_end"] in row for row in rows)  # the case exercises the turn end
    h.check_stops(rec, stop_set(parts, pair), BUDGET)
    h.check_mask_is_response(rec)
    h.check_loss(rec)


def test_rollouts_end_at_the_tokenizer_eos(parts, tmp_path):
    """ChatML with EOS = ``<|im_end|>``: greedy rollouts that reach it end there, masks included."""
    run_to_turn_end(parts, tmp_path, "llama-qwen2")


def test_multi_eos_rollouts_end_at_the_first_stop_id(parts, tmp_path):
    run_to_turn_end(parts, tmp_path, "qwen2-qwen3-multi")


@pytest.mark.parametrize("reviser", [None, pytest.param("fused", marks=pytest.mark.slow)], ids=["generate", "splice_fused"])
def test_student_samples_in_eval_mode_and_updates_in_train_mode(parts, reviser):
    module, dm = h.build(parts, "gpt2-llama")  # GPT-2 with dropout 0.1: the mode changes the samples
    callbacks = [TrajectoryRevision(PrefixSpliceReviser(fused=True))] if reviser else []
    rec = h.fit(module, dm, *callbacks)
    assert rec.update_modes and all(rec.update_modes)
    assert rec.sampling_modes and not any(rec.sampling_modes)


def test_gpt2_lora_on_c_attn(parts):
    module, dm = h.build(parts, "gpt2-llama", student_lora={"r": 4, "lora_alpha": 8, "target_modules": ["c_attn"]})
    rec = h.fit(module, dm)
    h.check_loss(rec)
    changed = [n for n, p in module.student.named_parameters() if p.requires_grad]
    assert changed and all("lora_" in n for n in changed)
