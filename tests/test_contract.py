"""The callback contract is real: a LightningModule written from `trd_lightning.protocol.RolloutModel`
alone (exactly its members, nothing of `DistillationModule`) runs every callback and reviser,
and the protocol names every attribute the callbacks and revisers touch on a module."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch
from lightning.pytorch import LightningModule
from transformers import AutoModelForCausalLM, AutoTokenizer

import trd_lightning
from tests.conftest import cpu_trainer
from trd_lightning import PromptDataModule, Sampling
from trd_lightning.baselines import SpliceFromStartReviser, TeacherSampleReviser
from trd_lightning.callbacks import CollapseGuard, LearningCurve, PassAtKEvaluation, PrefixAudit, TrajectoryRevision
from trd_lightning.engines import HFEngine
from trd_lightning.losses import forward_kl
from trd_lightning.protocol import RolloutModel
from trd_lightning.revision import PrefixSpliceReviser, RewriteReviser
from trd_lightning.rollout import make_rollout_from_rows, response_logits, stop_token_ids

SAMPLING = Sampling(temperature=1.0, max_new_tokens=10)


class ContractModule(LightningModule):
    """Exactly the members `RolloutModel` declares (plus a training step)."""

    def __init__(self, student_path, teacher_path, task):
        super().__init__()
        self.task = task
        self.tokenizer = AutoTokenizer.from_pretrained(student_path)
        self.student = AutoModelForCausalLM.from_pretrained(student_path).train()
        self.teacher = AutoModelForCausalLM.from_pretrained(teacher_path).eval().requires_grad_(False)
        self.max_prompt_length = None
        self.stop_ids = stop_token_ids(self.student, self.tokenizer)
        self.sampling = SAMPLING
        self.mode = "opd"
        self.engine = HFEngine()
        self.teacher_is_training_state = False
        self.rollout_reviser = None
        self.rollouts_seen = []

    def model_for(self, role):
        return self.student if role == "student" else self.teacher

    def synced_gpus(self):
        return False

    def teacher_prompt(self, problem):
        return self.task.student_prompt(problem)

    def sample(self, prompts, *, role="student", sampling=None, num_return_sequences=1):
        from trd_lightning.rollout import encode_prompts

        ids, mask = encode_prompts(self.tokenizer, prompts, self.device)
        return self.engine.generate(
            self.model_for(role), self.tokenizer, ids, mask, sampling or self.sampling,
            num_return_sequences=num_return_sequences, stop_ids=self.stop_ids,
        )

    def score(self, context, *, role):
        return response_logits(self.model_for(role), context)

    def make_rollout(self, problems):
        if self.rollout_reviser is not None and self.trainer.training:
            return self.rollout_reviser.sample_revised(self, problems)
        prompts = [self.task.student_prompt(p) for p in problems]
        ids, mask = self.sample(prompts)
        return make_rollout_from_rows(
            self.tokenizer, problems, [r[m] for r, m in zip(ids, mask)], prompts, [self.teacher_prompt(p) for p in problems],
            device=self.device,
        )

    def set_rollout_reviser(self, reviser):
        self.rollout_reviser = reviser

    # --- not part of the contract: what any module that trains has ---------------------------
    def training_step(self, batch, batch_idx):
        rollout = batch["rollout"]
        self.rollouts_seen.append(rollout)
        teacher = rollout.teacher_logits
        if teacher is None:
            with torch.no_grad():
                teacher = self.score(rollout.teacher, role="teacher")
        return forward_kl(self.score(rollout.student, role="student"), teacher, rollout.response_mask)

    def validation_step(self, batch, batch_idx):
        return None

    def configure_optimizers(self):
        return torch.optim.SGD(self.student.parameters(), lr=0.01)


def _declared() -> set[str]:
    return {name for name in vars(RolloutModel) if not name.startswith("_")}


def _lightning_members() -> set[str]:
    """What every LightningModule has (class members and the instance attributes it sets)."""
    return set(dir(LightningModule)) | set(vars(LightningModule()))


def test_the_module_implements_exactly_the_declared_members(tiny_paths, task):
    module = ContractModule(tiny_paths["student"], tiny_paths["teacher"], task)
    assert isinstance(module, RolloutModel)
    missing = {n for n in _declared() if not hasattr(module, n)}
    assert not missing, missing
    own = {n for n in set(vars(module)) | set(vars(ContractModule)) if not n.startswith("_")}
    extra = own - _declared() - _lightning_members() - {"student", "rollouts_seen"}
    assert not extra, f"the test module must not offer more than the protocol: {extra}"


REVISERS = {
    "fused_splice": lambda: PrefixSpliceReviser(threshold=0.2),
    "two_pass_splice": lambda: PrefixSpliceReviser(threshold=0.2, fused=False),
    "failed_only_splice": lambda: PrefixSpliceReviser(threshold=0.2, refine="failed"),
    "rewrite": lambda: RewriteReviser(sampling=SAMPLING),
    "teacher_samples": lambda: TeacherSampleReviser(on_policy=0.5),
    "splice_from_start": lambda: SpliceFromStartReviser(),
}


@pytest.mark.parametrize("name", list(REVISERS))
def test_every_callback_and_reviser_runs_on_a_protocol_only_module(tiny_paths, task, tmp_path, name):
    torch.manual_seed(0)
    module = ContractModule(tiny_paths["student"], tiny_paths["teacher"], task)
    reviser = REVISERS[name]()
    revision = TrajectoryRevision(reviser)
    audit = PrefixAudit(every_n_steps=1, histograms=False)  # after the revision: audits y_r (and y_o when two-pass)
    callbacks = [revision, audit, PassAtKEvaluation(n=2, ks=[1, 2], sampling=SAMPLING), CollapseGuard(warmup_steps=100),
                 LearningCurve(every_n_steps=1, n=2, ks=[1], num_problems=2, sampling=SAMPLING)]  # fmt: skip
    trainer = cpu_trainer(max_steps=2, limit_val_batches=1, val_check_interval=2, callbacks=callbacks, default_root_dir=tmp_path)
    trainer.fit(module, PromptDataModule(task, batch_size=4, eval_batch_size=4))
    assert len(module.rollouts_seen) == 2
    assert all(r.fused == reviser.fused for r in module.rollouts_seen)
    assert all((r.original is None) == reviser.fused for r in module.rollouts_seen), "training_step sees y_r"
    assert module.rollout_reviser is None, "unplugged after fit"
    logged = trainer.logged_metrics
    assert "revision/fraction_revised" in logged and "revision/rest_seconds" in logged
    assert ("revision/rollout_seconds" if reviser.fused else "revision/overhead") in logged
    assert "val/pass@2" in logged and "audit/revised/teacher_entropy" in logged
    assert len(revision.history) == 2


def _attributes_read_on_modules(path: Path) -> set[str]:
    """``module.X`` / ``pl_module.X`` / ``getattr(module, "X", ...)`` in a source file."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in ("module", "pl_module"):
            names.add(node.attr)
        if (
            isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in ("getattr", "hasattr")
            and isinstance(node.args[0], ast.Name) and node.args[0].id in ("module", "pl_module")
        ):
            names.add(f"getattr:{node.args[1].value}")
    return names


PACKAGE = Path(trd_lightning.__file__).parent
# Everything that plugs into a module from outside it.
PLUGGED_IN = [*sorted((PACKAGE / "callbacks").glob("*.py")), *(PACKAGE / f for f in ("revision.py", "splice_decode.py", "baselines.py", "data.py"))]
# torch's own DDP convention (DistributedDataParallel reads it from any nn.Module), which
# TeacherSharding extends: not a member a module provides.
TORCH_CONVENTIONS = {"_ddp_params_and_buffers_to_ignore"}


@pytest.mark.parametrize("path", PLUGGED_IN, ids=lambda p: p.name)
def test_the_protocol_lists_every_attribute_callbacks_and_revisers_touch(path):
    touched = _attributes_read_on_modules(path)
    dynamic = {n for n in touched if n.startswith("getattr:")}
    assert not dynamic - {f"getattr:{n}" for n in TORCH_CONVENTIONS}, f"getattr/hasattr with a default on a module: {dynamic}"
    undeclared = {n for n in touched if not n.startswith("getattr:")} - _declared() - _lightning_members() - TORCH_CONVENTIONS
    assert not undeclared, f"{path.name} touches module members RolloutModel does not declare: {sorted(undeclared)}"
    private = {n for n in touched if n.startswith("_") and not n.startswith("getattr:")} - TORCH_CONVENTIONS
    assert not private, f"{path.name} reads private attributes of the module: {sorted(private)}"
