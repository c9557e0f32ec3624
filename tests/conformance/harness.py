"""What the conformance cases share: building a module on a fixture pair, a short fit, a recorder
of what the loss was given, and the invariants, each computed independently of the framework."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import yaml
from lightning.pytorch import Callback

from tests.conftest import cpu_trainer
from trd_lightning import DistillationModule, PromptDataModule, Sampling
from trd_lightning.tasks import MathTask

SMALL_SAMPLING = {"temperature": 1.0, "max_new_tokens": 12}


def math_task(parts: dict, pair: str, **kwargs) -> MathTask:
    data = parts["data"]
    return MathTask(train_file=data["train"], val_file=data["val"], test_file=data["test"],
                    tokenizer=parts[pair]["student"], **kwargs)


def build(parts: dict, pair: str, **kwargs) -> tuple[DistillationModule, PromptDataModule]:
    """A module on fixture pair ``pair`` and a data module on the math jsonl (batch 4)."""
    kwargs.setdefault("sampling", Sampling(**SMALL_SAMPLING))
    kwargs.setdefault("optimizer", lambda p: torch.optim.AdamW(p, lr=1e-3))
    task_kwargs = kwargs.pop("task_kwargs", {})
    teacher = kwargs.pop("teacher", parts[pair]["teacher"])
    module = DistillationModule(student=parts[pair]["student"], teacher=teacher, **kwargs)
    return module, PromptDataModule(task=math_task(parts, pair, **task_kwargs), batch_size=4, eval_batch_size=4)


class Recorder(Callback):
    """Records, per training step, the rollout the loss is computed on and what the loss was given
    (student and teacher logits, mask) and returned, plus the mode of every sampling forward.

    A sampling forward is one that runs with the KV cache (``generate`` and the splice decode);
    scoring forwards run with ``use_cache=False``.
    """

    def __init__(self, fresh_teacher: bool = True):
        self.fresh_teacher = fresh_teacher
        self.fresh: list[list[torch.Tensor]] = []  # per step: per-row fresh teacher logits
        self.rollouts: list = []
        self.loss_inputs: list[dict] = []
        self.sampling_modes: list[bool] = []  # student.training at each sampling forward in training
        self.update_modes: list[bool] = []  # student.training at each grad-enabled forward
        self._handles = []

    def on_fit_start(self, trainer, pl_module) -> None:
        def hook(model, args, kwargs):
            if not trainer.training:
                return
            if kwargs.get("use_cache"):
                self.sampling_modes.append(model.training)
            elif torch.is_grad_enabled():
                self.update_modes.append(model.training)

        student = pl_module.student.get_base_model() if hasattr(pl_module.student, "peft_config") else pl_module.student
        self._handles.append(student.register_forward_pre_hook(hook, with_kwargs=True))
        original = pl_module.distillation_loss
        recorder = self

        import trd_lightning.module as module_file

        compute = module_file.compute_loss

        def spy(name, student_logits, teacher_logits, mask, **kw):
            loss = compute(name, student_logits, teacher_logits, mask, **kw)
            recorder.loss_inputs.append({"student": student_logits.detach().clone(), "teacher": teacher_logits.detach().clone(),
                                         "mask": mask.clone(), "loss": loss.detach().clone(), "name": name, "kw": kw})
            return loss

        def distillation_loss(rollout):
            module_file.compute_loss = spy
            try:
                return original(rollout)
            finally:
                module_file.compute_loss = compute

        pl_module.distillation_loss = distillation_loss

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        rollout = batch["rollout"]
        self.rollouts.append(rollout)
        if self.fresh_teacher:
            # Now, with the weights the loss will use (a live or EMA teacher changes every step).
            self.fresh.append(fresh_response_logits(pl_module.model_for("teacher"), rollout.teacher, rollout.response_ids, rollout.response_mask))

    def on_fit_end(self, trainer, pl_module) -> None:
        for h in self._handles:
            h.remove()
        del pl_module.distillation_loss


def fit(module, datamodule, *callbacks, steps: int = 2, **trainer_kwargs) -> Recorder:
    recorder = Recorder()
    trainer = cpu_trainer(max_steps=steps, limit_val_batches=0, callbacks=[*callbacks, recorder], **trainer_kwargs)
    trainer.fit(module, datamodule=datamodule)
    assert len(recorder.rollouts) == steps and len(recorder.loss_inputs) == steps
    return recorder


# --- invariants, computed without the framework's layout code --------------------------------
def row_tokens(context, i: int) -> torch.Tensor:
    """Row ``i`` of a context without its padding: ``[prompt | response]`` token ids."""
    return context.input_ids[i][context.attention_mask[i].bool()]


@torch.no_grad()
def fresh_response_logits(model, context, response_ids, response_mask) -> list[torch.Tensor]:
    """Per row, one unpadded forward of ``[prompt | response]``: the logits predicting each response token."""
    out = []
    for i in range(len(response_ids)):
        n = int(response_mask[i].sum())
        ids = row_tokens(context, i)
        logits = model(input_ids=ids[None], use_cache=False).logits[0].float()
        out.append(logits[len(ids) - n - 1 : len(ids) - 1])
    return out


def brute_force_divergence(name: str, student: torch.Tensor, teacher: torch.Tensor, mask: torch.Tensor, **kw) -> torch.Tensor:
    """The loss written out token by token: mean over response tokens of the per-token divergence."""
    total, count = 0.0, 0
    for b in range(mask.shape[0]):
        for t in range(mask.shape[1]):
            if not mask[b, t]:
                continue
            log_ps = torch.log_softmax(student[b, t].double(), -1)
            log_pt = torch.log_softmax(teacher[b, t].double(), -1)
            if name == "reverse_kl":
                d = (log_ps.exp() * (log_ps - log_pt)).sum()
            elif name == "forward_kl":
                d = (log_pt.exp() * (log_pt - log_ps)).sum()
                if kw.get("clip") is not None:
                    d = d.clamp(max=kw["clip"])
            else:
                raise NotImplementedError(name)
            total, count = total + d, count + 1
    return total / max(count, 1)


def check_loss(recorder: Recorder, loss_kwargs: dict | None = None) -> None:
    for rec in recorder.loss_inputs:
        expected = brute_force_divergence(rec["name"], rec["student"], rec["teacher"], rec["mask"], **(loss_kwargs or {}))
        torch.testing.assert_close(rec["loss"].double(), expected, atol=1e-5, rtol=1e-4)


def check_teacher_logits(recorder: Recorder, atol: float = 2e-4) -> None:
    """The teacher logits the loss got equal a fresh, unpadded forward under the rollout's teacher context."""
    assert len(recorder.fresh) == len(recorder.loss_inputs)
    for fresh, rec in zip(recorder.fresh, recorder.loss_inputs):
        for i, f in enumerate(fresh):
            torch.testing.assert_close(rec["teacher"][i, : len(f)].float(), f, atol=atol, rtol=1e-4)


def check_mask_is_response(recorder: Recorder) -> None:
    """The loss averages over exactly the response tokens (the rollout's mask)."""
    for rollout, rec in zip(recorder.rollouts, recorder.loss_inputs):
        assert torch.equal(rec["mask"].bool(), rollout.response_mask.bool())


def check_stops(recorder: Recorder, stop: set[int], budget: int) -> None:
    """Each response ends at its first stop id, or runs the whole budget without one."""
    for rollout in recorder.rollouts:
        for ids, m in zip(rollout.response_ids, rollout.response_mask):
            row = ids[m.bool()].tolist()
            hits = [k for k, t in enumerate(row) if t in stop]
            if hits:
                assert hits[0] == len(row) - 1, f"response runs past stop id {row[hits[0]]} at {hits[0]}: {row}"
            else:
                assert len(row) == budget, f"response ends at {len(row)} < {budget} tokens without a stop id: {row}"


def decoded_teacher_contexts(tokenizer, rollout) -> list[str]:
    """Each row's teacher prompt (``c`` or ``c_r``) as text, padding dropped."""
    ctx, width = rollout.teacher, rollout.teacher.prompt_width
    return [tokenizer.decode(ctx.input_ids[i, :width][ctx.attention_mask[i, :width].bool()].tolist()) for i in range(len(rollout.problems))]


def write_config(path: Path, parts: dict, pair: str, *, model: dict | None = None, trainer: dict | None = None,
                 callbacks: list | None = None, task: dict | None = None) -> str:
    """A `trd` YAML config on fixture pair ``pair`` and the math jsonl (CPU, tiny budget)."""
    data = parts["data"]
    cfg: dict[str, Any] = {
        "seed_everything": 0,
        "trainer": {"accelerator": "cpu", "devices": 1, "max_steps": 2, "limit_val_batches": 0, "num_sanity_val_steps": 0,
                    "enable_progress_bar": False, "enable_model_summary": False, "logger": False,
                    "default_root_dir": str(path.parent / "run"),
                    "callbacks": [{"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                                   "init_args": {"dirpath": str(path.parent / "ckpt"), "save_last": True}}, *(callbacks or [])],
                    **(trainer or {})},
        "model": {"class_path": "trd_lightning.DistillationModule",
                  "init_args": {"student": parts[pair]["student"], "teacher": parts[pair]["teacher"],
                                "sampling": SMALL_SAMPLING, **(model or {})}},
        "data": {"class_path": "trd_lightning.PromptDataModule",
                 "init_args": {"batch_size": 4, "eval_batch_size": 4,
                               "task": {"class_path": "trd_lightning.tasks.MathTask",
                                        "init_args": {"train_file": data["train"], "val_file": data["val"], "test_file": data["test"],
                                                      "tokenizer": parts[pair]["student"], **(task or {})}}}},
    }
    path.write_text(yaml.safe_dump(cfg))
    return str(path)
