"""Revision without recomputation: the fused splice (sample and revise in one decode) gives the
two-pass splice's trajectories, the teacher logits a reviser hands to the loss equal a fresh
teacher forward, and the hand-driven proposals follow generate's sampling rules."""

from __future__ import annotations

import pytest
import torch

from tests.helpers import cpu_trainer
from trd_lightning import DistillationModule, PromptDataModule, Sampling
from trd_lightning.callbacks import TrajectoryRevision
from trd_lightning.decoding import Proposer, top_p_support
from trd_lightning.revision import PrefixSpliceReviser, RewriteReviser, rows
from trd_lightning.splice_decode import SpliceDecode
from trd_lightning.tasks import ArithmeticTask

GREEDY = Sampling(temperature=0.0, max_new_tokens=12)


@pytest.fixture
def task():
    # Test-split problems only: building the (large) train split costs seconds.
    return ArithmeticTask(val_size=8, test_size=16)


def make_module(tiny_paths, task, sampling=GREEDY, **kw):
    return DistillationModule(student=tiny_paths["student"], teacher=tiny_paths["teacher"], task=task, sampling=sampling, **kw)


def masked_max_diff(a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor) -> float:
    return (a - b).abs().amax(-1)[mask.bool()].max().item()


def test_fused_splice_equals_two_pass_when_every_draw_is_deterministic(tiny_paths, task):
    # Greedy student and a near-zero reviser temperature make both forms deterministic, so the
    # one-decode form must reproduce the two-pass trajectories token for token.
    module = make_module(tiny_paths, task)
    problems = list(task.problems("test"))[:16]
    original = module.make_rollout(problems)
    # A threshold between the rows' lowest teacher probabilities: some rows are revised, some not.
    probs = module.score(original.teacher, role="teacher").float().softmax(-1)
    token_probs = probs.gather(-1, original.response_ids.unsqueeze(-1)).squeeze(-1).masked_fill(~original.response_mask, 1.0)
    reviser = PrefixSpliceReviser(threshold=token_probs.amin(-1).median().item(), temperature=1e-6)
    two_pass = reviser.revise(module, original)
    fused = reviser.sample_revised(module, problems)
    t_star = two_pass.info["t_star_rows"]
    assert (t_star > 0).any() and (t_star == -1).any(), "want rows revised mid-way and rows left alone"
    assert torch.equal(fused.info["t_star_rows"], t_star)
    assert [r.tolist() for r in rows(fused)] == [r.tolist() for r in rows(two_pass)]
    assert fused.info["accuracy_after"] == pytest.approx(two_pass.info["accuracy_after"])
    # Rows the teacher never disowned are the greedy rollout itself.
    kept = (t_star == -1).nonzero().flatten().tolist()
    assert all(torch.equal(rows(fused)[i], rows(original)[i]) for i in kept)


@pytest.mark.parametrize("form", ["fused", "two_pass", "rewrite"])
def test_reused_teacher_logits_equal_a_fresh_teacher_forward(tiny_paths, task, form):
    torch.manual_seed(0)
    module = make_module(tiny_paths, task, sampling=Sampling(temperature=1.0, max_new_tokens=12))
    problems = list(task.problems("test"))[:8]
    if form == "fused":
        revised = PrefixSpliceReviser(threshold=0.2).sample_revised(module, problems)
    elif form == "two_pass":
        revised = PrefixSpliceReviser(threshold=0.2, fused=False).revise(module, module.make_rollout(problems))
    else:
        revised = RewriteReviser().revise(module, module.make_rollout(problems))
    assert revised.teacher_logits is not None, "the reviser computed these logits and must hand them on"
    assert revised.teacher_logits.shape[:2] == revised.response_ids.shape
    fresh = module.score(revised.teacher, role="teacher")
    assert masked_max_diff(revised.teacher_logits, fresh, revised.response_mask) < 1e-4
    # ... so the loss is the same as with the teacher forward it skips.
    reused = module.distillation_loss(revised)
    recomputed = module.distillation_loss(revised.replace(teacher_logits=None))
    torch.testing.assert_close(reused, recomputed, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("opsd_teacher", ["frozen", "live"])
def test_fused_splice_in_opsd_scores_under_the_privileged_context(tiny_paths, task, opsd_teacher):
    # OPSD: the teacher role reads the reference solution, so its prompt (and prompt width)
    # differs from the student's; the decode must keep the two contexts apart.
    torch.manual_seed(0)
    module = DistillationModule(
        student=tiny_paths["student"], teacher=None, mode="opsd", opsd_teacher=opsd_teacher, task=task,
        sampling=Sampling(temperature=1.0, max_new_tokens=10),
    )  # fmt: skip
    problems = list(task.problems("test"))[:6]
    revised = PrefixSpliceReviser(threshold=0.035).sample_revised(module, problems)
    assert revised.teacher.prompt_width > revised.student.prompt_width
    assert torch.equal(revised.teacher.input_ids[:, revised.teacher.prompt_width:], revised.response_ids)
    fresh = module.score(revised.teacher, role="teacher")
    assert masked_max_diff(revised.teacher_logits, fresh, revised.response_mask) < 1e-4


def test_fused_splice_revises_at_the_first_disowned_token_and_stays_in_support(tiny_paths, task):
    torch.manual_seed(1)
    module = make_module(tiny_paths, task, sampling=Sampling(temperature=1.0, max_new_tokens=12))
    reviser = PrefixSpliceReviser(threshold=0.035, student_top_p=0.6, fallback="student")
    problems = list(task.problems("test"))[:16]
    fused = reviser.sample_revised(module, problems)
    # Checked against fresh full forwards of both models over the finished trajectories.
    teacher_logp = module.score(fused.teacher, role="teacher").float().log_softmax(-1)
    disowned = reviser.disowned(teacher_logp, fused.response_ids) & fused.response_mask
    student_logp = module.score(fused.student, role="student").detach().float().log_softmax(-1)
    support = top_p_support(student_logp.exp(), 0.6 + 1e-3)  # a hair of slack for KV-cache vs full-forward rounding
    t_star = fused.info["t_star_rows"].tolist()
    assert any(t > 0 for t in t_star) and any(t == -1 for t in t_star), "want kept prefixes and untouched rows"
    for i, t in enumerate(t_star):
        n = int(fused.response_mask[i].sum())
        end = n if t < 0 else t
        assert not disowned[i, :end].any(), f"row {i}: a kept student token the teacher disowns"
        if t >= 0:
            chosen = fused.response_ids[i, t:n]
            assert support[i, torch.arange(t, n), chosen].all(), f"row {i}: a revised token left the student's top-p set"
    assert fused.info["fraction_revised"] == pytest.approx(sum(t >= 0 for t in t_star) / len(t_star))


def test_fused_splice_in_training_and_not_in_evaluation(tiny_paths, task):
    module = make_module(tiny_paths, task, sampling=Sampling(temperature=1.0, max_new_tokens=10))
    reviser = PrefixSpliceReviser(threshold=0.2)
    callback = TrajectoryRevision(reviser)
    seen = []

    class Record(TrajectoryRevision.__mro__[1]):  # a plain Callback
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            seen.append((pl_module.rollout_reviser is reviser, batch["rollout"].info.get("fused", False)))

    trainer = cpu_trainer(max_steps=2, limit_val_batches=0, callbacks=[callback, Record()])
    trainer.fit(module, PromptDataModule(task, batch_size=4))
    assert seen == [(True, True)] * 2, "training rollouts come from the fused reviser"
    assert module.rollout_reviser is None, "unhooked after fit"
    assert "fused" not in module.make_rollout(list(task.problems("test"))[:2]).info
    history = callback.history[-1]
    assert {"revision/fraction_revised", "revision/rollout_seconds", "revision/rest_seconds"} <= history.keys()
    assert "revision/fail_to_pass" not in history, "y_o is never finished in the fused form"
    assert "revision/fraction_revised" in trainer.logged_metrics


def test_refine_failed_needs_two_pass_and_the_default_picks_it():
    assert PrefixSpliceReviser().fused and not PrefixSpliceReviser(refine="failed").fused
    with pytest.raises(ValueError, match="cannot verify y_o for refine='failed'; use fused=False"):
        PrefixSpliceReviser(refine="failed", fused=True)


def test_unsupported_sampling_option_is_refused_before_training(tiny_paths, task):
    class Penalised(Sampling):
        def generate_kwargs(self):
            return {**super().generate_kwargs(), "repetition_penalty": 1.3}

    module = make_module(tiny_paths, task, sampling=Penalised(max_new_tokens=4))
    with pytest.raises(ValueError, match=r"does not implement the generate options \['repetition_penalty'\]"):
        PrefixSpliceReviser().setup(module)


def test_proposer_follows_generate_sampling_rules():
    torch.manual_seed(0)
    logits = torch.randn(3, 24)
    eos = 2
    generated = torch.tensor([2, 3, 4])  # rows advance at their own rate; min_new_tokens=4 is per row
    proposer = Proposer({"do_sample": True, "temperature": 0.7, "top_k": 6, "top_p": 0.8, "min_new_tokens": 4}, eos)
    probs = proposer.scores(logits, generated).softmax(-1)
    # Brute force: EOS banned while a row has drawn fewer than 4 tokens, p ~ exp(l / T), keep the
    # top 6, then the smallest set reaching 0.8 of what is left.
    expected = torch.zeros_like(probs)
    for r in range(3):
        scaled = logits[r].clone() / 0.7
        if generated[r] < 4:
            scaled[eos] = float("-inf")
        top = scaled.topk(6)
        p = top.values.softmax(-1)
        keep = (p.cumsum(-1) - p) < 0.8
        expected[r, top.indices[keep]] = p[keep] / p[keep].sum()
    torch.testing.assert_close(probs, expected, atol=1e-6, rtol=1e-5)
    assert (Proposer({"do_sample": False}, eos)(logits, generated) == logits.argmax(-1)).all()


def test_replacing_the_tokens_drops_stale_teacher_logits(tiny_paths, task):
    module = make_module(tiny_paths, task)
    revised = PrefixSpliceReviser(threshold=0.2).sample_revised(module, list(task.problems("test"))[:2])
    assert revised.replace(stats={}).teacher_logits is not None
    assert revised.replace(response_ids=revised.response_ids.clone()).teacher_logits is None


def test_prefix_audit_reports_a_fused_rollout_as_revised_only(tiny_paths, task, tmp_path):
    from trd_lightning.callbacks import PrefixAudit

    module = make_module(tiny_paths, task, sampling=Sampling(temperature=1.0, max_new_tokens=8))
    audit = PrefixAudit(every_n_steps=1, max_rollouts_logged=1)
    trainer = cpu_trainer(
        max_steps=1, limit_val_batches=0, default_root_dir=tmp_path,
        callbacks=[TrajectoryRevision(PrefixSpliceReviser(threshold=0.035)), audit],
    )  # fmt: skip
    trainer.fit(module, PromptDataModule(task, batch_size=4))
    assert audit.last and all(key.startswith("audit/revised/") for key in audit.last), "no raw rollout exists to audit"
    assert "audit/revised/accuracy" in trainer.logged_metrics and "audit/accuracy" not in trainer.logged_metrics


def restricted_target(reviser, teacher_logits, student_logits):
    """Brute force of the splice's target: teacher at the reviser's temperature, restricted to the
    student's top-p set and renormalised (the tests pick settings where that set is never empty)."""
    student_p = student_logits.float().softmax(-1)
    order = student_p.argsort(-1, descending=True)
    ranked = student_p.gather(-1, order)
    support = torch.zeros_like(student_p).scatter(-1, order, ((ranked.cumsum(-1) - ranked) < reviser.student_top_p).float())
    w = (teacher_logits.float() / reviser.temperature).softmax(-1) * support
    return w / w.sum(-1, keepdim=True), student_p * support / (student_p * support).sum(-1, keepdim=True)


@pytest.mark.parametrize("lookahead", [1, 4])
def test_speculative_decode_draws_exactly_from_the_restricted_teacher(tiny_paths, task, lookahead):
    """The first two revised tokens of many copies of one prompt, against the exact distribution
    from full forwards of both models over every first token."""
    torch.manual_seed(0)
    module = make_module(tiny_paths, task)
    reviser = PrefixSpliceReviser(temperature=0.25, student_top_p=0.9, min_mass=0.0, lookahead=lookahead)
    tok, vocab = module.tokenizer, len(module.tokenizer)
    prompt = tok(task.student_prompt(next(iter(task.problems("test")))), return_tensors="pt").input_ids[0]
    n = 4000
    ids, mask = prompt.repeat(n, 1), torch.ones(n, len(prompt), dtype=torch.long)
    decode = SpliceDecode(reviser, module, ids, mask, ids, mask, torch.full((n,), 2), torch.zeros(n, dtype=torch.long), None)
    block, out_mask, *_ = decode.run()

    # Exact: p0 at the prompt; p1 after every possible first token (one batched forward each).
    with torch.no_grad():
        first = module.model_for("teacher")(prompt[None]).logits[0, -1], module.model_for("student")(prompt[None]).logits[0, -1]
        p0, q0 = restricted_target(reviser, *first)
        both = torch.cat([prompt.repeat(vocab, 1), torch.arange(vocab)[:, None]], 1)
        p1, q1 = restricted_target(
            reviser, module.model_for("teacher")(both).logits[:, -1], module.model_for("student")(both).logits[:, -1]
        )
    eos = tok.eos_token_id

    def second_token_law(a0, a1):  # law of the second token, with a last cell for "the row ended at EOS"
        law = torch.cat([(a0.unsqueeze(1) * a1).sum(0), a0[eos : eos + 1]])
        law[:vocab] -= a0[eos] * a1[eos]
        return law

    exact = second_token_law(p0, p1)
    drafts_kept = second_token_law(q0, q1)  # what always keeping the student's draft would give
    x0 = block[:, 0]
    x1 = torch.where(out_mask[:, 1], block[:, 1], torch.full_like(x0, vocab))

    def tv(a, b):  # total variation distance
        return 0.5 * (a - b).abs().sum().item()

    assert tv(drafts_kept, exact) > 0.2, "the setting must tell drafts from exact draws apart"
    assert tv(torch.bincount(x0, minlength=vocab).float() / n, p0) < 0.05
    assert tv(torch.bincount(x1, minlength=vocab + 1).float() / n, exact) < 0.06


def test_lookahead_trades_teacher_forwards_for_drafts(tiny_paths, task):
    torch.manual_seed(0)
    module = make_module(tiny_paths, task, sampling=Sampling(temperature=1.0, max_new_tokens=12))
    problems = list(task.problems("test"))[:16]
    one = PrefixSpliceReviser(threshold=0.035, lookahead=1).sample_revised(module, problems).info
    # One token per live row per round: the teacher runs once per decoded position, and a draft
    # is dropped only when the teacher disowns or rejects it.
    assert one["teacher_forwards"] == one["decode_steps"]
    three = PrefixSpliceReviser(threshold=0.035, lookahead=3).sample_revised(module, problems).info
    assert -(-three["decode_steps"] // 3) <= three["teacher_forwards"] < three["decode_steps"]
    assert 0 < three["lookahead_acceptance"] <= 1
    with pytest.raises(ValueError, match="lookahead must be an integer >= 1"):
        PrefixSpliceReviser(lookahead=0)


@pytest.mark.parametrize("fused", [True, False])
def test_min_new_tokens_binds_the_restricted_draws_too(tiny_paths, task, fused):
    torch.manual_seed(0)
    module = make_module(tiny_paths, task, sampling=Sampling(temperature=1.0, max_new_tokens=10, min_new_tokens=9))
    problems = list(task.problems("test"))[:16]
    reviser = PrefixSpliceReviser(threshold=0.2, fused=fused)  # disowns often: most tokens are restricted draws
    revised = reviser.sample_revised(module, problems) if fused else reviser.revise(module, module.make_rollout(problems))
    t_star = revised.info["t_star_rows"]
    assert (t_star >= 0).float().mean() > 0.5, "want most rows revised"
    lengths = revised.response_mask.sum(-1)
    eos = module.tokenizer.eos_token_id
    assert (lengths >= 9).all(), f"rows ended before min_new_tokens: {lengths.tolist()}"
    assert not (revised.response_ids[:, :8] == eos).any(), "EOS drawn before the minimum"


def test_finished_rows_leave_the_decode_and_the_rest_is_unchanged(tiny_paths, task, monkeypatch):
    from transformers import DynamicCache

    kept_sizes = []
    select = DynamicCache.batch_select_indices
    monkeypatch.setattr(
        DynamicCache, "batch_select_indices", lambda self, idx: (kept_sizes.append(len(idx)), select(self, idx))[1]
    )
    torch.manual_seed(3)
    module = make_module(tiny_paths, task, sampling=Sampling(temperature=1.0, max_new_tokens=16))
    problems = list(task.problems("test"))[:16]
    revised = PrefixSpliceReviser(threshold=0.2).sample_revised(module, problems)
    lengths = revised.response_mask.sum(-1)
    assert kept_sizes and min(kept_sizes) < len(problems), "want rows dropped from the batch mid-decode"
    assert lengths.min() < lengths.max(), "want rows of different lengths"
    # Every row, dropped early or not, is a whole trajectory: EOS only at its end, the teacher's
    # logits at each of its positions those of a fresh forward over the finished rollout.
    eos = module.tokenizer.eos_token_id
    for row, n in zip(revised.response_ids, lengths.tolist()):
        assert not (row[: n - 1] == eos).any() and (n == 16 or row[n - 1] == eos)
    fresh = module.score(revised.teacher, role="teacher")
    assert masked_max_diff(revised.teacher_logits, fresh, revised.response_mask) < 1e-4


def test_min_new_tokens_is_a_checked_sampling_field():
    assert Sampling(max_new_tokens=8, min_new_tokens=3).generate_kwargs()["min_new_tokens"] == 3
    assert "min_new_tokens" not in Sampling().generate_kwargs(), "unset: generate runs as before the field existed"
    with pytest.raises(ValueError, match=r"min_new_tokens must be in \[0, max_new_tokens=4\]"):
        Sampling(max_new_tokens=4, min_new_tokens=5)
