"""Revisers and the TrajectoryRevision callback: splice keeps the prefix and stays in the
student's support, contexts align, refine-all vs refine-failed, and the callback plugs into a
module written here from the protocol alone."""

from __future__ import annotations

import pytest
import torch

from trd_lightning.decoding import top_p_support
from lightning.pytorch import LightningModule

from tests.helpers import cpu_trainer, save_tiny
from trd_lightning import DistillationModule, PromptDataModule, Sampling
from trd_lightning.callbacks import TrajectoryRevision
from trd_lightning.losses import forward_kl
from trd_lightning.rollout import (
    encode_prompts,
    response_logits,
    sample_responses,
    stop_token_ids,
)
from trd_lightning.revision import PrefixSpliceReviser, RewriteReviser, assemble_rollout, rows

SAMPLING = Sampling(temperature=1.0, max_new_tokens=12)


@pytest.fixture
def module(tiny_paths, task):
    return DistillationModule(student=tiny_paths["student"], teacher=tiny_paths["teacher"], task=task, sampling=SAMPLING)


def hand_rollout(module, task, correct: list[bool]):
    """Rollouts whose correctness we control: the reference solution, or one with a wrong answer."""
    problems = list(task.problems("test"))[: len(correct)]
    tok = module.tokenizer
    texts = [p.reference if ok else p.reference[:-1] + str((p.answer + 1) % 10) for p, ok in zip(problems, correct)]
    responses = [torch.tensor(tok(t)["input_ids"] + [tok.eos_token_id]) for t in texts]
    return assemble_rollout(module, problems, responses, [module.teacher_prompt(p) for p in problems])


def test_top_p_mask_matches_definition():
    logp = torch.tensor([0.5, 0.3, 0.15, 0.05]).log()
    assert top_p_support(logp.exp(), 0.45).tolist() == [True, False, False, False]
    assert top_p_support(logp.exp(), 0.6).tolist() == [True, True, False, False]
    assert top_p_support(logp.exp(), 0.9).tolist() == [True, True, True, False]
    assert top_p_support(logp.exp(), 0.97).tolist() == [True, True, True, True]


def test_first_failure_criteria_on_hand_made_distributions():
    # Position 0: the token has prob 0.7; position 1: 0.02 (fails both criteria); position 2: 0.2.
    probs = torch.tensor([[[0.7, 0.2, 0.1], [0.9, 0.08, 0.02], [0.6, 0.2, 0.2]]])
    logits, tokens = probs.log(), torch.tensor([[0, 2, 1]])
    mask = torch.ones(1, 3, dtype=torch.bool)
    assert PrefixSpliceReviser(threshold=0.05).first_failure(logits, tokens, mask).tolist() == [1]
    assert PrefixSpliceReviser(threshold=0.01).first_failure(logits, tokens, mask).tolist() == [-1]
    # top-p 0.85: position 0 keeps {0, 1} (token 0 in), position 1 keeps {0} (token 2 out).
    assert PrefixSpliceReviser(criterion="teacher_top_p", teacher_top_p=0.85).first_failure(logits, tokens, mask).tolist() == [1]
    # A masked-out position never counts as the failure.
    assert PrefixSpliceReviser(threshold=0.05).first_failure(logits, tokens, torch.tensor([[True, False, True]])).tolist() == [-1]


def test_splice_keeps_prefix_and_samples_inside_student_top_p(module, task):
    torch.manual_seed(0)
    rollout = module.make_rollout(list(task.problems("test"))[:6])
    reviser = PrefixSpliceReviser(threshold=0.2, student_top_p=0.5, fallback="student")
    revised = reviser.revise(module, rollout)
    t_star = reviser.first_failure(module.score(rollout.teacher, role="teacher"), rollout.response_ids, rollout.response_mask)
    assert (t_star >= 0).any(), "random tiny models should fail somewhere at threshold 0.2"
    student_logp = response_logits(module.student, revised.student).float().log_softmax(-1)
    support = top_p_support(student_logp.exp(), 0.5 + 1e-3)  # a hair of slack for KV-cache vs full-forward rounding
    for i, (old, new) in enumerate(zip(rows(rollout), rows(revised))):
        t = int(t_star[i])
        if t < 0:
            assert torch.equal(old, new)
            continue
        assert torch.equal(new[:t], old[:t]), "the prefix before t* must be kept token for token"
        n = int(revised.response_mask[i].sum())
        chosen = revised.response_ids[i, t:n]
        assert support[i, torch.arange(t, n), chosen].all(), "a spliced token left the student's top-p set"
    assert revised.info["fallback_rate"] == 0.0 or reviser.fallback == "student"


def test_rewrite_contexts_align_and_teacher_sees_refinement_context(module, task):
    rollout = hand_rollout(module, task, [True, False, False])
    revised = RewriteReviser().revise(module, rollout)
    tok = module.tokenizer
    n = revised.response_ids.shape[1]
    for i, p in enumerate(rollout.problems):
        assert torch.equal(revised.student.input_ids[i, -n:], revised.teacher.input_ids[i, -n:])
        assert torch.equal(revised.student.input_ids[i, -n:], revised.response_ids[i])
        teacher_prompt = tok.decode(revised.teacher.input_ids[i, : revised.teacher.prompt_width], skip_special_tokens=True)
        student_prompt = tok.decode(revised.student.input_ids[i, : revised.student.prompt_width], skip_special_tokens=True)
        assert student_prompt == task.student_prompt(p)
        assert teacher_prompt.startswith(f"Q{p.expression}A") and teacher_prompt.endswith("S")
        assert "R" not in teacher_prompt  # OPD: no privileged reference in c_r


def test_opsd_rewrite_context_holds_reference_and_student_context_never(tiny_paths, task):
    module = DistillationModule(student=tiny_paths["student"], teacher=None, mode="opsd", task=task, sampling=SAMPLING)
    revised = RewriteReviser().revise(module, module.make_rollout(list(task.problems("test"))[:3]))
    tok = module.tokenizer
    for i, p in enumerate(revised.problems):
        teacher_prompt = tok.decode(revised.teacher.input_ids[i, : revised.teacher.prompt_width], skip_special_tokens=True)
        student_prompt = tok.decode(revised.student.input_ids[i, : revised.student.prompt_width], skip_special_tokens=True)
        assert teacher_prompt.startswith(f"R{p.reference}Q{p.expression}A")
        assert p.reference not in student_prompt and "R" not in student_prompt


def test_refine_all_versus_refine_failed(module, task):
    correct = [True, False, True, False]
    rollout = hand_rollout(module, task, correct)
    tok = module.tokenizer
    failed_only = RewriteReviser(refine="failed").revise(module, rollout)
    everything = RewriteReviser(refine="all").revise(module, rollout)
    assert failed_only.info["fraction_revised"] == 0.5 and everything.info["fraction_revised"] == 1.0
    for i, ok in enumerate(correct):
        t_failed = tok.decode(failed_only.teacher.input_ids[i, : failed_only.teacher.prompt_width], skip_special_tokens=True)
        t_all = tok.decode(everything.teacher.input_ids[i, : everything.teacher.prompt_width], skip_special_tokens=True)
        assert ("A" in t_all)  # every row scored under its refinement context
        if ok:  # kept as it was, under the ordinary teacher context
            assert torch.equal(rows(failed_only)[i], rows(rollout)[i]) and "A" not in t_failed
        else:
            assert "A" in t_failed
    # Splice with refine="failed" never touches a correct rollout either.
    splice = PrefixSpliceReviser(threshold=0.5, refine="failed").revise(module, rollout)
    for i, ok in enumerate(correct):
        if ok:
            assert torch.equal(rows(splice)[i], rows(rollout)[i])


def test_revision_stats_count_fail_to_pass(module, task):
    rollout = hand_rollout(module, task, [False, True])

    class Oracle(RewriteReviser):  # a perfect refiner: writes the reference solution
        def revise(self, module, rollout):
            from trd_lightning.revision import revision_stats

            tok = module.tokenizer
            new = [torch.tensor(tok(p.reference)["input_ids"] + [tok.eos_token_id]) for p in rollout.problems]
            info = revision_stats(module, rollout, torch.tensor([True, True]), torch.tensor([0, -1]), new)
            return assemble_rollout(module, rollout.problems, new, [module.teacher_prompt(p) for p in rollout.problems], info)

    info = Oracle().revise(module, rollout).info
    assert info["fail_to_pass"] == 0.5 and info["pass_to_fail"] == 0.0
    assert info["accuracy_before"] == 0.5 and info["accuracy_after"] == 1.0


def test_trd_fit_with_distillation_module(module, task):
    callback = TrajectoryRevision(RewriteReviser())
    cpu_trainer(max_steps=2, limit_val_batches=0, callbacks=[callback]).fit(module, PromptDataModule(task, batch_size=4))
    assert 0 <= callback.history[-1]["revision/fraction_revised"] <= 1


def test_bad_reviser_inputs(module, task, tiny_paths, tmp_path, tokenizer):
    with pytest.raises(ValueError, match="unknown criterion 'entropy'"):
        PrefixSpliceReviser(criterion="entropy")
    with pytest.raises(ValueError, match="unknown refine mode"):
        RewriteReviser(refine="some")
    with pytest.raises(TypeError, match="must be a trd_lightning.revision.Reviser"):
        TrajectoryRevision(reviser="rewrite")
    other = tokenizer.__class__.from_pretrained(tiny_paths["teacher"])
    other.add_tokens(["%"])
    bad = RewriteReviser(refiner=save_tiny(tmp_path / "other", other, seed=3))
    with pytest.raises(ValueError, match="tokenizers differ"):
        bad.setup(module)
    rollout = hand_rollout(module, task, [False])
    with pytest.raises(ValueError, match="does not fit 5 tokens even without the attempt"):
        RewriteReviser(max_context_tokens=5).revise(module, rollout)


def test_unknown_reviser_in_yaml_is_refused(tmp_path, capsys):
    from trd_lightning.cli import build_cli

    cfg = tmp_path / "c.yaml"
    cfg.write_text(
        "trainer:\n  callbacks:\n    - class_path: trd_lightning.callbacks.TrajectoryRevision\n"
        "      init_args:\n        reviser: {class_path: trd_lightning.revision.RewriteReviserX}\n"
        "model: {class_path: trd_lightning.DistillationModule}\ndata: {class_path: trd_lightning.PromptDataModule}\n"
    )
    with pytest.raises(SystemExit):
        build_cli(["fit", "-c", str(cfg), "--print_config"], run=False)
    assert "RewriteReviserX" in capsys.readouterr().err
