"""The fidelity study's pieces: derivation coverage, the baselines' losses against brute force on
real (tiny, saved) models, the rewrite reviser's options, and the CollapseGuard on synthetic runs."""

from __future__ import annotations

import itertools
import math
from types import SimpleNamespace

import pytest
import torch
from lightning.pytorch import Callback, LightningModule

from tests.helpers import cpu_trainer
from trd_lightning import DistillationModule, Sampling
from trd_lightning.baselines import SpliceFromStartReviser, TeacherSampleReviser
from trd_lightning.callbacks import CollapseGuard, LearningCurve, PassAtKEvaluation
from trd_lightning.callbacks.collapse_guard import repetition_rate
from trd_lightning.losses import cross_entropy
from trd_lightning.metrics import DerivationCoverage, distinct_derivations
from trd_lightning.revision import RewriteReviser, assemble_rollout, rows
from trd_lightning.rollout import Context, Rollout, decode_responses
from trd_lightning.tasks.arithmetic import ArithmeticProblem, ArithmeticTask

SAMPLING = Sampling(temperature=1.0, max_new_tokens=12)


# ---- coverage ------------------------------------------------------------------------------
def test_valid_derivations_enumerate_every_operand_order():
    task = ArithmeticTask()
    p = ArithmeticProblem((3, 4, 2, 5), ("+", "*", "-"))  # 3+4=7 | 7*2=4 | 4-5=9
    got = task.valid_derivations(p)
    # Independently: every swap pattern through step_text, de-duplicated by text.
    brute = {"|".join(p.step_text(i, swap=s) for i, s in enumerate(sw)) + "#9" for sw in itertools.product([False, True], repeat=3)}
    assert sorted(got) == sorted(brute) and len(got) == 4  # '-' has one written form
    assert all(task.verify(p, d) for d in got)
    assert len({task.derivation(p, d) for d in got}) == 4
    same = ArithmeticProblem((3, 3), ("*",))  # equal operands: one derivation
    assert task.valid_derivations(same) == ["3*3=9#9"]


def test_coverage_count_on_hand_made_samples():
    task = ArithmeticTask()
    p = ArithmeticProblem((3, 4, 2, 5), ("+", "*", "-"))
    samples = [
        "3+4=7|7*2=4|4-5=9#9",  # derivation A
        "4+3=7|7*2=4|4-5=9#9",  # B
        "3+4=7|2*7=4|4-5=9#9",  # C
        "3+4=7|7*2=4|4-5=9#9",  # A again
        "3+4=8!4+3=7|7*2=4|4-5=9#9",  # self-corrected, ends in B
        "3+4=7|7*2=4|4-5=8#8",  # wrong answer
        "3+4=8|8*2=6|6-5=9#9",  # right answer, wrong steps: no valid derivation
        "#9",  # answer only
        "3+4=7|7*2=4|5-4=9#9",  # '-' swapped is not valid
    ]
    assert distinct_derivations(task, p, samples) == (3, 4)
    assert task.derivation(p, samples[4]) == (True, False, False)
    assert all(task.derivation(p, s) is None for s in samples[5:])
    assert distinct_derivations(SimpleNamespace(verify=task.verify), p, samples) is None  # a task without the hook

    metric = DerivationCoverage()
    metric.update(torch.tensor([3, 1, 3]), torch.tensor([4, 2, 4]), torch.tensor([7, 8, 7]))  # id 7 repeated: counts once
    out = metric.compute()
    assert out["derivations"].item() == pytest.approx(2.0)
    assert out["derivation_coverage"].item() == pytest.approx((3 / 4 + 1 / 2) / 2)
    with pytest.raises(ValueError):
        metric.update(torch.tensor([5]), torch.tensor([4]))


class FixedSampler(LightningModule):
    """A module whose samples are hand-written texts (cycled), for the evaluation callbacks."""

    def __init__(self, tokenizer, task, texts):
        super().__init__()
        self._tok, self._task, self.texts = tokenizer, task, texts
        self.logged = {}

    @property
    def tokenizer(self):
        return self._tok

    @property
    def task(self):
        return self._task

    def sample(self, prompts, *, role="student", sampling=None, num_return_sequences=1):
        texts = [self.texts[i % len(self.texts)] for i in range(len(prompts) * num_return_sequences)]
        enc = [self._tok(t)["input_ids"] + [self._tok.eos_token_id] for t in texts]
        width = max(map(len, enc))
        ids = torch.tensor([e + [self._tok.pad_token_id] * (width - len(e)) for e in enc])
        return ids, torch.tensor([[j < len(e) for j in range(width)] for e in enc])

    def log(self, name, value, **kwargs):
        self.logged[name] = value


def test_pass_at_k_evaluation_logs_every_k_and_derivations(tokenizer):
    task = ArithmeticTask()
    p = ArithmeticProblem((3, 4, 2, 5), ("+", "*", "-"))
    texts = ["3+4=7|7*2=4|4-5=9#9", "4+3=7|7*2=4|4-5=9#9", "3+4=7|7*2=4|4-5=8#8", "4+3=7|7*2=4|4-5=9#9"]
    module = FixedSampler(tokenizer, task, texts)
    evaluation = PassAtKEvaluation(n=4, all_k=True)
    trainer = SimpleNamespace(sanity_checking=False)
    evaluation._on_batch_end(trainer, module, {"problems": [p]}, 0)
    evaluation._on_epoch_end(trainer, module, "test")
    assert module.logged["test/avg@4"] == pytest.approx(0.75)
    assert [k for k in module.logged if k.startswith("test/pass@")] == [f"test/pass@{k}" for k in range(1, 5)]
    assert module.logged["test/pass@4"] == 1.0
    assert module.logged["test/derivations"] == 2.0  # A and B among the three correct samples
    assert module.logged["test/derivation_coverage"] == pytest.approx(0.5)


# ---- baselines: losses against brute force on real (tiny, saved) models ---------------------
@pytest.fixture
def module(tiny_paths, task):
    return DistillationModule(student=tiny_paths["student"], teacher=tiny_paths["teacher"], task=task, sampling=SAMPLING)


def row_logprobs(model, tokenizer, prompt: str, response: torch.Tensor) -> list[list[float]]:
    """Per response position, the model's log-probabilities: one unpadded sequence, a full forward."""
    ids = torch.tensor([tokenizer(prompt, add_special_tokens=False)["input_ids"] + response.tolist()])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0].double()
    start = ids.shape[1] - len(response) - 1
    return logits[start : start + len(response)].log_softmax(-1).tolist()


def brute_nll(module, rollout: Rollout) -> float:
    total, count = 0.0, 0
    for p, r in zip(rollout.problems, rows(rollout)):
        lp = row_logprobs(module.student, module.tokenizer, module.task.student_prompt(p), r)
        total += -sum(lp[t][int(tok)] for t, tok in enumerate(r))
        count += len(r)
    return total / count


def brute_jsd(module, rollout: Rollout, teacher_prompts: list[str], beta: float) -> float:
    total, count = 0.0, 0
    for p, r, c in zip(rollout.problems, rows(rollout), teacher_prompts):
        lp = row_logprobs(module.student, module.tokenizer, module.task.student_prompt(p), r)
        lq = row_logprobs(module.teacher, module.tokenizer, c, r)
        for a, b in zip(lp, lq):
            P, Q = [math.exp(x) for x in a], [math.exp(x) for x in b]
            M = [(1 - beta) * x + beta * y for x, y in zip(P, Q)]
            kl = lambda X: sum(x * math.log(x / m) for x, m in zip(X, M) if x > 0)  # noqa: E731
            total += beta * kl(Q) + (1 - beta) * kl(P) if 0 < beta < 1 else (kl(Q) if beta == 0 else kl(P))
            count += 1
    return total / count


def test_cross_entropy_against_brute_force():
    g = torch.Generator().manual_seed(0)
    s, mask = torch.randn(3, 5, 7, generator=g), torch.rand(3, 5, generator=g) > 0.3
    tokens = torch.randint(0, 7, (3, 5), generator=g)
    lp = s.double().log_softmax(-1)
    picked = [-float(lp[b, t, tokens[b, t]]) for b in range(3) for t in range(5) if mask[b, t]]
    assert float(cross_entropy(s, torch.zeros_like(s), tokens, mask)) == pytest.approx(sum(picked) / len(picked), rel=1e-6)


def test_sequence_kd_trains_on_teacher_samples_without_a_teacher_forward(tiny_paths, task):
    module = DistillationModule(student=tiny_paths["student"], teacher=tiny_paths["teacher"], task=task,
                                sampling=SAMPLING, loss="cross_entropy")  # fmt: skip
    torch.manual_seed(0)
    rollout = module.make_rollout(list(task.problems("test"))[:4])
    torch.manual_seed(1)
    revised = TeacherSampleReviser(on_policy=0.0).revise(module, rollout)
    # Independently: the teacher's samples for the same prompts under the same seed.
    torch.manual_seed(1)
    ids, mask = module.sample([task.student_prompt(p) for p in rollout.problems], role="teacher")
    assert [r.tolist() for r in rows(revised)] == [i[m].tolist() for i, m in zip(ids, mask)]
    assert revised.info["teacher_rows"] == 1.0
    calls = []
    handle = module.teacher.register_forward_hook(lambda *a: calls.append(1))
    loss = module.distillation_loss(revised)
    handle.remove()
    assert not calls, "cross entropy reads only the student: no teacher forward"
    assert float(loss) == pytest.approx(brute_nll(module, revised), rel=1e-4)


def test_gkd_mixes_half_and_its_loss_is_the_jsd(tiny_paths, task):
    module = DistillationModule(student=tiny_paths["student"], teacher=tiny_paths["teacher"], task=task,
                                sampling=SAMPLING, loss="generalized_jsd", loss_kwargs={"beta": 0.5})  # fmt: skip
    torch.manual_seed(0)
    rollout = module.make_rollout(list(task.problems("test"))[:6])
    revised = TeacherSampleReviser(on_policy=0.5).revise(module, rollout)
    kept = sum(torch.equal(a, b) for a, b in zip(rows(rollout), rows(revised)))
    assert revised.info["teacher_rows"] == 0.5 and kept >= 3  # 3 rows are the student's (a teacher sample may coincide)
    plain = [task.student_prompt(p) for p in revised.problems]
    assert float(module.distillation_loss(revised)) == pytest.approx(brute_jsd(module, revised, plain, 0.5), rel=1e-4)
    with pytest.raises(ValueError, match="on_policy"):
        TeacherSampleReviser(on_policy=1.0)


def test_sft_on_rewrites_is_cross_entropy_along_y_r(tiny_paths, task):
    module = DistillationModule(student=tiny_paths["student"], teacher=tiny_paths["teacher"], task=task,
                                sampling=SAMPLING, loss="cross_entropy")  # fmt: skip
    torch.manual_seed(0)
    revised = RewriteReviser(sampling=SAMPLING).revise(module, module.make_rollout(list(task.problems("test"))[:4]))
    assert float(module.distillation_loss(revised)) == pytest.approx(brute_nll(module, revised), rel=1e-4)


@pytest.mark.parametrize("fused", [True, False])
def test_splice_from_start_revises_every_row_from_position_zero_inside_student_support(module, task, fused):
    reviser = SpliceFromStartReviser(student_top_p=0.5, fallback="student", fused=fused)
    torch.manual_seed(0)
    problems = list(task.problems("test"))[:5]
    revised = reviser.sample_revised(module, problems) if fused else reviser.revise(module, module.make_rollout(problems))
    assert revised.info["fraction_revised"] == 1.0
    assert revised.info["t_star_rows"].tolist() == [0] * len(problems)
    for p, r in zip(problems, rows(revised)):  # every token in the student's top-p set (independent forward)
        lp = torch.tensor(row_logprobs(module.student, module.tokenizer, task.student_prompt(p), r))
        for t, tok in enumerate(r):
            order = lp[t].exp().sort(descending=True)
            cum = order.values.cumsum(0) - order.values  # mass strictly before each token
            allowed = set(order.indices[cum < 0.5 + 1e-4].tolist())
            assert int(tok) in allowed
    # the loss: forward KL along y_r with the teacher under x
    module.loss_name = "forward_kl"
    assert float(module.distillation_loss(revised)) == pytest.approx(
        brute_jsd(module, revised, [task.student_prompt(p) for p in problems], 0.0), rel=1e-4
    )


# ---- the rewrite reviser's options ----------------------------------------------------------
def hand_rollout(module, task, texts):
    problems = list(task.problems("test"))[: len(texts)]
    tok = module.tokenizer
    responses = [torch.tensor(tok(t)["input_ids"] + [tok.eos_token_id]) for t in texts]
    return assemble_rollout(module, problems, responses, [module.teacher_prompt(p) for p in problems])


def teacher_prompts(module, rollout):
    t = rollout.teacher
    return [module.tokenizer.decode(t.input_ids[i, : t.prompt_width], skip_special_tokens=True) for i in range(len(rollout.problems))]


def test_verified_rewrites_replace_failed_ones_by_y_o_under_x(module, task):
    problems = list(task.problems("test"))[:6]
    rollout = hand_rollout(module, task, [p.reference if i % 2 else "1+1=2#2" for i, p in enumerate(problems)])
    torch.manual_seed(0)
    plain = RewriteReviser(sampling=SAMPLING).revise(module, rollout)
    torch.manual_seed(0)
    verified = RewriteReviser(sampling=SAMPLING, verified=True).revise(module, rollout)
    ok = [task.verify(p, t) for p, t in zip(problems, decode_responses(module.tokenizer, plain.response_ids, plain.response_mask))]
    assert not all(ok), "random tiny refiners should fail some rewrites"
    prompts = teacher_prompts(module, verified)
    for i, p in enumerate(problems):
        if ok[i]:  # a passing rewrite is kept, scored under c_r
            assert torch.equal(rows(verified)[i], rows(plain)[i]) and prompts[i].startswith(f"Q{p.expression}A")
        else:  # a failed one is dropped: y_o under x
            assert torch.equal(rows(verified)[i], rows(rollout)[i]) and prompts[i] == task.student_prompt(p)
    assert verified.info["rejected_rewrites"] == pytest.approx(1 - sum(ok) / len(ok))
    assert verified.info["rewrite_accuracy"] == pytest.approx(sum(ok) / len(ok))
    assert verified.teacher_logits is None  # the refiner's logits belonged to c_r and the dropped rewrites


def test_target_under_x_keeps_the_rewrite_and_changes_only_the_teacher_context(module, task):
    problems = list(task.problems("test"))[:4]
    rollout = hand_rollout(module, task, ["1+1=2#2"] * 4)
    torch.manual_seed(0)
    paper = RewriteReviser(sampling=SAMPLING).revise(module, rollout)
    torch.manual_seed(0)
    under_x = RewriteReviser(sampling=SAMPLING, target_context="problem").revise(module, rollout)
    assert [r.tolist() for r in rows(paper)] == [r.tolist() for r in rows(under_x)]
    assert teacher_prompts(module, under_x) == [task.student_prompt(p) for p in problems]
    assert all(t.startswith("Q") and "A" in t for t in teacher_prompts(module, paper))
    module.loss_name = "forward_kl"
    assert float(module.distillation_loss(under_x)) == pytest.approx(
        brute_jsd(module, under_x, [task.student_prompt(p) for p in problems], 0.0), rel=1e-4
    )
    with pytest.raises(ValueError, match="target_context"):
        RewriteReviser(target_context="x")


# ---- CollapseGuard -------------------------------------------------------------------------
def synthetic_rollout(lengths: list[int], loop: bool, vocab: int = 10, seed: int = 0) -> Rollout:
    g = torch.Generator().manual_seed(seed)
    width = max(lengths)
    ids = torch.randint(0, vocab, (len(lengths), width), generator=g)
    if loop:  # the same 3 tokens over and over
        ids = torch.tensor([1, 2, 3]).repeat(width // 3 + 1)[:width].expand(len(lengths), width).clone()
    mask = torch.arange(width) < torch.tensor(lengths).unsqueeze(1)
    ctx = Context(ids, mask.long(), 0)
    return Rollout([None] * len(lengths), ids, mask, ctx, ctx)


class EntropyStub(LightningModule):
    """``score`` returns logits whose entropy the test sets (``sharp``: scale of a one-hot bump)."""

    def __init__(self):
        super().__init__()
        self.sharp = 0.0

    def score(self, context, *, role):
        b, n = context.input_ids.shape
        logits = torch.zeros(b, n, 10)
        logits[..., 0] = self.sharp
        return logits

    def log(self, *args, **kwargs):
        pass


class Evaluator:
    def __init__(self):
        self.last = {}


def drive(guard: CollapseGuard, steps: int, schedule) -> tuple[list[int], SimpleNamespace]:
    """Run the guard's hooks by hand; ``schedule(step)`` -> (lengths, loop, sharpness, gap or None)."""
    module, evaluator = EntropyStub(), Evaluator()
    trainer = SimpleNamespace(global_step=0, callbacks=[evaluator], should_stop=False,
                              strategy=SimpleNamespace(reduce_boolean_decision=lambda d, all=True: d))  # fmt: skip
    fired = []
    for step in range(steps):
        trainer.global_step = step
        lengths, loop, sharp, gap = schedule(step)
        module.sharp = sharp
        if gap is not None:
            evaluator.last = {"val/pass@8": 0.5 + gap, "val/pass@1": 0.5}
        batch = {"rollout": synthetic_rollout(lengths, loop, seed=step)}
        guard.on_train_batch_start(trainer, module, batch, step)
        before = len(guard.alerts)
        guard.on_train_batch_end(trainer, module, None, batch, step)
        fired += [a["signal"] for a in guard.alerts[before:]]
    return fired, trainer


def healthy(step):
    g = torch.Generator().manual_seed(step)
    return [int(x) for x in torch.randint(18, 23, (8,), generator=g)], False, 1.0 + 0.3 * math.sin(step), (0.1 if step % 10 == 0 else None)


def test_guard_stays_quiet_on_a_healthy_run():
    guard = CollapseGuard()
    fired, trainer = drive(guard, 120, healthy)
    assert fired == [] and not trainer.should_stop
    assert set(guard.reference) == {"length", "repetition", "entropy", "gap"}
    assert len(guard.history) == 120


def test_guard_fires_on_each_synthetic_collapse_and_says_when():
    def collapse(step):
        lengths, loop, sharp, gap = healthy(step)
        if step >= 40:  # lengths inflate, rows loop, the student's entropy falls
            return [44] * 8, True, 8.0, gap
        return lengths, loop, sharp, gap

    guard = CollapseGuard(window=5, patience=2, action="stop")
    fired, trainer = drive(guard, 60, collapse)
    assert {"length", "repetition", "entropy"} <= set(fired)
    first = min(a["step"] for a in guard.alerts)
    assert 40 < first <= 46, first  # smoothed over 5 steps, held for 2 checks
    assert trainer.should_stop
    alert = next(a for a in guard.alerts if a["signal"] == "length")
    assert alert["value"] > 1.5 * alert["reference"] == pytest.approx(alert["threshold"])

    def widening(step):  # only the Pass@k - Pass@1 gap moves
        lengths, loop, sharp, _ = healthy(step)
        return lengths, loop, sharp, (0.1 if step < 30 else 0.4) if step % 10 == 0 else None

    guard = CollapseGuard(patience=1)
    fired, _ = drive(guard, 50, widening)
    assert fired == ["gap"] and guard.alerts[0]["step"] == 30


def test_guard_rejects_bad_thresholds():
    with pytest.raises(ValueError, match="action"):
        CollapseGuard(action="restart")
    with pytest.raises(ValueError, match="length_ratio"):
        CollapseGuard(length_ratio=0.5)
    with pytest.raises(ValueError, match="entropy_ratio"):
        CollapseGuard(entropy_ratio=1.5)


def test_repetition_rate_counts_repeated_ngrams():
    ids = torch.tensor([[1, 2, 3, 1, 2, 3, 1, 2], [1, 2, 3, 4, 5, 6, 7, 8]])
    mask = torch.ones_like(ids, dtype=torch.bool)
    # row 0: 5 4-grams, distinct (1,2,3,1) (2,3,1,2) (3,1,2,3): 1 - 3/5; row 1: all distinct
    assert repetition_rate(ids, mask, 4) == pytest.approx((1 - 3 / 5 + 0) / 2)


class LoopingModule(LightningModule):
    """A real Lightning fit whose 'rollouts' inflate after step 12: the guard must roll back."""

    def __init__(self):
        super().__init__()
        self.layer = torch.nn.Linear(4, 1)

    def training_step(self, batch, batch_idx):
        return self.layer(torch.ones(1, 4)).sum() ** 2

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)

    def on_after_batch_transfer(self, batch, dataloader_idx):
        n = 40 if self._trainer is not None and self.trainer.global_step >= 12 else 20
        return {"rollout": synthetic_rollout([n] * 4, loop=False, seed=self.trainer.global_step)}


def test_guard_rolls_back_to_the_last_good_checkpoint_then_stops(tmp_path):
    guard = CollapseGuard(warmup_steps=5, window=2, patience=1, entropy_ratio=None, gap_delta=None,
                          action="rollback", save_every_n_steps=5, checkpoint_dir=str(tmp_path))  # fmt: skip
    restored = {}

    class AfterRollback(Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if guard.rollbacks and "weights" not in restored:
                restored["weights"] = pl_module.layer.weight.detach().clone()

    module = LoopingModule()
    data = torch.utils.data.DataLoader(list(range(100)), batch_size=1)
    cpu_trainer(max_steps=40, callbacks=[guard, AfterRollback()]).fit(module, data)
    assert guard.rollbacks == 1 and guard.last_good_step == 10
    saved = torch.load(tmp_path / "last_good.ckpt", weights_only=False)["state_dict"]["layer.weight"]
    assert torch.equal(restored["weights"], saved)
    assert len(guard.alerts) == 2  # the second alert (inflation persists) stops the run
    assert guard.history[-1]["step"] < 39


# ---- learning curve ---------------------------------------------------------------------------
@pytest.mark.slow  # two fits with generation (~15-35 s on a shared 2-core machine)
def test_learning_curve_does_not_change_the_training_run(tiny_paths, task):
    from trd_lightning.data import PromptDataModule

    def fit(extra):
        torch.manual_seed(0)
        module = DistillationModule(student=tiny_paths["student"], teacher=tiny_paths["teacher"], sampling=SAMPLING)
        cpu_trainer(max_steps=2, limit_val_batches=0, callbacks=extra).fit(module, datamodule=PromptDataModule(task=task, batch_size=4))
        return module.student.state_dict()

    curve = LearningCurve(every_n_steps=2, n=2, ks=(1, 2), num_problems=4)
    with_curve, without = fit([curve]), fit([])
    assert all(torch.equal(with_curve[k], without[k]) for k in without)
    assert [h["step"] for h in curve.history] == [0, 2]
    assert {"curve/avg@2", "curve/pass@2", "curve/derivations"} <= set(curve.history[0])


# ---- the new configs run end to end on the shipped models, with the guard watching ------------
NEW_CONFIGS = ["seqkd", "gkd", "trd_rewrite_sft", "trd_rewrite_verified", "trd_rewrite_target_x", "splice_t0", "opsd_splice"]


@pytest.mark.slow  # seven short fits of the shipped 1.1M-parameter models
def test_new_configs_fit_with_the_collapse_guard(tmp_path, monkeypatch):
    from pathlib import Path

    from trd_lightning.callbacks import TrajectoryRevision
    from trd_lightning.cli import build_cli

    monkeypatch.chdir(tmp_path)
    root = Path(__file__).resolve().parents[1] / "configs" / "arith"
    for name in NEW_CONFIGS:
        cli = build_cli(["fit", "-c", str(root / f"{name}.yaml"), "--trainer.logger=false", "--data.init_args.batch_size=4"], run=False)
        revision = [cb for cb in cli.trainer.callbacks if isinstance(cb, TrajectoryRevision)]
        guard = CollapseGuard(warmup_steps=1)
        trainer = cpu_trainer(max_steps=2, limit_val_batches=0, callbacks=[*revision, guard])
        trainer.fit(cli.model, datamodule=cli.datamodule)
        assert torch.isfinite(trainer.callback_metrics["train/loss"]), name
        assert [h["step"] for h in guard.history] == [0, 1] and guard.history[0]["entropy"] > 0, name
        assert revision[0].history and "revision/accuracy_after" in revision[0].history[-1], name


def test_guard_drop_signal_follows_a_published_metric():
    class Revision:  # publishes like TrajectoryRevision: one history entry per step
        def __init__(self):
            self.history = []

    guard = CollapseGuard(window=3, patience=2, drops={"revision/accuracy_after": 0.3}, entropy_ratio=None)
    revision = Revision()
    module = EntropyStub()
    trainer = SimpleNamespace(global_step=0, callbacks=[revision, guard], should_stop=False,
                              strategy=SimpleNamespace(reduce_boolean_decision=lambda d, all=True: d))  # fmt: skip
    accuracy = [0.9 + 0.05 * ((s * 7) % 3 - 1) for s in range(60)] + [0.4] * 10  # rewrites stop being correct at 60
    for step, acc in enumerate(accuracy):
        trainer.global_step = step
        batch = {"rollout": synthetic_rollout([20] * 4, False, seed=step)}
        guard.on_train_batch_start(trainer, module, batch, step)
        revision.history.append({"revision/accuracy_after": acc})
        guard.on_train_batch_end(trainer, module, None, batch, step)
    assert [a["signal"] for a in guard.alerts] == ["revision/accuracy_after"]
    assert guard.alerts[0]["step"] == 62  # the 3-step mean is below best - 0.3 from step 61 on; patience 2
    with pytest.raises(ValueError, match="drops"):
        CollapseGuard(drops={"x": 0.0})
