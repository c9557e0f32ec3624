"""DistillationModule: frozen teacher, student-only optimizer and checkpoints, fresh rollouts,
response-only losses, OPSD contexts, and errors on bad input before any compute."""

from __future__ import annotations

import pytest
import torch
from lightning.pytorch import Callback

from tests.helpers import cpu_trainer, save_tiny
from trd_lightning import DistillationModule, PromptDataModule, Sampling
from trd_lightning.losses import reverse_kl
from trd_lightning.rollout import build_context, response_logits

SAMPLING = Sampling(temperature=1.0, max_new_tokens=12)


def make_module(tiny_paths, task, **kwargs):
    kwargs.setdefault("sampling", SAMPLING)
    return DistillationModule(student=tiny_paths["student"], teacher=tiny_paths["teacher"], task=task, **kwargs)


def params_of(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_fit_keeps_teacher_frozen_and_out_of_optimizer_and_checkpoint(tiny_paths, task, tmp_path):
    module = make_module(tiny_paths, task, optimizer=lambda p: torch.optim.AdamW(p, lr=1e-2))
    teacher_before, student_before = params_of(module.teacher), params_of(module.student)
    trainer = cpu_trainer(max_steps=3, limit_val_batches=0)
    trainer.fit(module, PromptDataModule(task, batch_size=4))

    assert not module.teacher.training and not any(p.requires_grad for p in module.teacher.parameters())
    for name, value in params_of(module.teacher).items():
        assert torch.equal(value, teacher_before[name]), f"teacher weight {name} changed"
    assert any(not torch.equal(v, student_before[k]) for k, v in params_of(module.student).items())

    optimized = {id(p) for group in trainer.optimizers[0].param_groups for p in group["params"]}
    assert optimized == {id(p) for p in module.student.parameters()}
    assert optimized.isdisjoint(id(p) for p in module.teacher.parameters())

    ckpt = tmp_path / "m.ckpt"
    trainer.save_checkpoint(ckpt)
    state = torch.load(ckpt, weights_only=False)["state_dict"]
    assert state and all(k.startswith("student.") for k in state)
    # The checkpoint reloads into a fresh module (its teacher comes from the teacher path).
    fresh = make_module(tiny_paths, task)
    fresh.load_state_dict(state)
    for k, v in module.student.state_dict().items():
        assert torch.equal(fresh.student.state_dict()[k], v)


def test_rollout_of_step_t_comes_from_weights_after_update_t_minus_1(tiny_paths, task):
    module = make_module(tiny_paths, task, optimizer=lambda p: torch.optim.SGD(p, lr=0.5))
    fingerprint = lambda: float(sum(p.detach().double().sum() for p in module.student.parameters()))  # noqa: E731
    at_rollout, after_update = [], []
    make_rollout = module.make_rollout

    def recording_make_rollout(problems):
        at_rollout.append(fingerprint())
        return make_rollout(problems)

    module.make_rollout = recording_make_rollout

    class AfterUpdate(Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            after_update.append(fingerprint())

    cpu_trainer(max_steps=4, limit_val_batches=0, callbacks=[AfterUpdate()]).fit(module, PromptDataModule(task, batch_size=4))
    assert len(at_rollout) == 4 and len(after_update) == 4
    assert len(set(after_update)) == 4, "every update must change the weights for this test to mean anything"
    assert at_rollout[1:] == after_update[:-1]


def test_loss_counts_response_positions_only(tiny_paths, task):
    module = make_module(tiny_paths, task)
    problems = list(task.problems("test"))[:3]
    rollout = module.make_rollout(problems)
    loss = module.distillation_loss(rollout)

    # Brute force: one unpadded sequence per row, logits at the positions that predict response tokens.
    values = []
    for i, p in enumerate(problems):
        n = int(rollout.response_mask[i].sum())
        resp = rollout.response_ids[i, :n]
        s_prompt = torch.tensor(module.tokenizer(task.student_prompt(p))["input_ids"])
        t_prompt = torch.tensor(module.tokenizer(module.teacher_prompt(p))["input_ids"])
        with torch.no_grad():
            s = module.student(torch.cat([s_prompt, resp])[None]).logits[0, len(s_prompt) - 1 : -1]
            t = module.teacher(torch.cat([t_prompt, resp])[None]).logits[0, len(t_prompt) - 1 : -1]
        ps, pt = s.log_softmax(-1), t.log_softmax(-1)
        values.append((ps.exp() * (ps - pt)).sum(-1))
    expected = torch.cat(values).mean()
    torch.testing.assert_close(loss.detach(), expected, atol=1e-5, rtol=1e-5)


def test_padding_width_does_not_change_logits(tiny_paths, task):
    module = make_module(tiny_paths, task)
    p = task.problems("test")[0]
    rollout = module.make_rollout([p])
    n = int(rollout.response_mask[0].sum())
    prompts = [task.student_prompt(p), "Q" + "1+2" * 10 + "S"]  # a longer neighbour forces left padding
    resp = torch.cat([rollout.response_ids, torch.full_like(rollout.response_ids, module.tokenizer.pad_token_id)])
    mask = torch.cat([rollout.response_mask, torch.zeros_like(rollout.response_mask)])
    padded = build_context(module.tokenizer, prompts, resp, mask)
    with torch.no_grad():
        alone = response_logits(module.student, rollout.student)[0, :n]
        in_batch = response_logits(module.student, padded)[0, :n]
    assert padded.prompt_width > rollout.student.prompt_width
    torch.testing.assert_close(alone, in_batch, atol=1e-5, rtol=1e-4)
    # And the loss is blind to whatever sits at padded positions.
    s, t = torch.randn(2, 5, 7), torch.randn(2, 5, 7)
    m = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 0, 0, 0]], dtype=torch.bool)
    s2 = s.clone()
    s2[~m] = 1e3
    torch.testing.assert_close(reverse_kl(s, t, m), reverse_kl(s2, t, m))


def test_opsd_teacher_context_has_reference_and_student_context_never(tiny_paths, task):
    module = DistillationModule(student=tiny_paths["student"], teacher=None, mode="opsd", task=task, sampling=SAMPLING)
    problems = list(task.problems("test"))[:4]
    rollout = module.make_rollout(problems)
    tok = module.tokenizer
    for i, p in enumerate(problems):
        student_text = tok.decode(rollout.student.input_ids[i, : rollout.student.prompt_width], skip_special_tokens=True)
        teacher_text = tok.decode(rollout.teacher.input_ids[i, : rollout.teacher.prompt_width], skip_special_tokens=True)
        assert p.reference in teacher_text and "R" in teacher_text
        assert "R" not in student_text and student_text == task.student_prompt(p)
        # Same response tokens follow both contexts.
        n = rollout.student.input_ids.shape[1] - rollout.student.prompt_width
        assert torch.equal(rollout.student.input_ids[i, -n:], rollout.teacher.input_ids[i, -n:])
    # The frozen OPSD teacher is a copy of the initial student, not the live weights.
    assert module.teacher is not module.student
    for a, b in zip(module.teacher.parameters(), module.student.parameters()):
        assert torch.equal(a, b) and not a.requires_grad


def test_opsd_live_teacher_shares_weights_and_ema_teacher_moves(tiny_paths, task):
    live = DistillationModule(student=tiny_paths["student"], teacher=None, mode="opsd", opsd_teacher="live", task=task)
    assert live.model_for("teacher") is live.student
    ema = DistillationModule(
        student=tiny_paths["student"], teacher=None, mode="opsd", opsd_teacher="ema", ema_decay=0.5, task=task,
        sampling=SAMPLING, optimizer=lambda p: torch.optim.SGD(p, lr=0.5),
    )
    before = params_of(ema.teacher)
    cpu_trainer(max_steps=2, limit_val_batches=0).fit(ema, PromptDataModule(task, batch_size=4))
    after = params_of(ema.teacher)
    assert any(not torch.equal(before[k], after[k]) for k in before)
    assert any(not torch.equal(after[k], v) for k, v in params_of(ema.student).items())


@pytest.mark.parametrize("loss", ["forward_kl", "generalized_jsd", "topk_reverse_kl", "k1", "k3"])
def test_every_loss_trains(tiny_paths, task, loss):
    module = make_module(tiny_paths, task, loss=loss)
    cpu_trainer(max_steps=1, limit_val_batches=0).fit(module, PromptDataModule(task, batch_size=2))
    assert torch.isfinite(module.trainer.logged_metrics["train/loss"])


def test_bad_inputs_fail_before_compute(tiny_paths, task, tmp_path, tokenizer):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        DistillationModule(student=str(tmp_path / "nope"), teacher=tiny_paths["teacher"])
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "config.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match="holds no weights"):
        DistillationModule(student=tiny_paths["student"], teacher=str(tmp_path / "empty"))
    with pytest.raises(ValueError, match="unknown loss 'revers_kl'"):
        DistillationModule(student=tiny_paths["student"], teacher=tiny_paths["teacher"], loss="revers_kl")
    with pytest.raises(ValueError, match="loss_kwargs"):
        DistillationModule(student=tiny_paths["student"], teacher=tiny_paths["teacher"], loss_kwargs={"beta": 0.5})
    with pytest.raises(ValueError, match="max_new_tokens"):
        Sampling(max_new_tokens=0)

    # A teacher with another vocabulary (one extra token) is refused, naming the difference.
    other = tokenizer.__class__.from_pretrained(tiny_paths["teacher"])
    other.add_tokens(["%"])
    save_tiny(tmp_path / "other", other, seed=3)
    with pytest.raises(ValueError, match="tokenizers differ.*only in teacher \\['%'\\]"):
        DistillationModule(student=tiny_paths["student"], teacher=str(tmp_path / "other"))
