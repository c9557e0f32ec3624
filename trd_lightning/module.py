"""`DistillationModule`: on-policy distillation of a student from a frozen teacher (OPD) or from
itself under privileged context (OPSD), one LightningModule for both.

A training step (the data module has already attached ``batch["rollout"]``, sampled from the
current student; callbacks such as `TrajectoryRevision` may have replaced it):

1. teacher logits along the response under the teacher's context, no grad;
2. student logits along the same response under the student's context ``x``;
3. a per-position divergence, averaged over response tokens only.
"""

from __future__ import annotations

import copy
import time
from typing import Any, Literal

import torch
from lightning.pytorch import LightningModule
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from lightning.pytorch.utilities import rank_zero_warn

from trd_lightning.lora import apply_lora, is_lora, trainable_parameter_names
from trd_lightning.losses import LOSSES, compute_loss
from trd_lightning.models import (
    check_compatible,
    check_model_matches_tokenizer,
    freeze,
    load_causal_lm,
    load_tokenizer,
)
from trd_lightning.rollout import (
    Context,
    Rollout,
    Sampling,
    build_context,
    decode_responses,
    encode_prompts,
    response_logits,
    sample_responses,
)
from trd_lightning.resume import rng_states, set_rng_states
from trd_lightning.sharding import configure_sharding
from trd_lightning.tasks.base import Task

# `sampling` is a hyperparameter, so it is pickled into every checkpoint, and Lightning resumes
# with torch.load(weights_only=True): without this, `trd fit --ckpt_path` cannot read its own file.
torch.serialization.add_safe_globals([Sampling])

LossName = Literal["reverse_kl", "forward_kl", "generalized_jsd", "topk_reverse_kl", "k1", "k3"]


class DistillationModule(LightningModule):
    """Student + teacher (OPD) or one shared-weight model with privileged context (OPSD).

    Args:
        student: path of a ``save_pretrained`` directory or ``builtin:arith/student``.
        teacher: the same for the teacher (OPD). Ignored in OPSD mode.
        mode: ``opd`` (separate teacher, teacher context = student context) or ``opsd`` (the
            teacher role is the student model conditioned on the reference solution).
        opsd_teacher: in OPSD, which weights play the teacher: a ``frozen`` copy of the initial
            student (the paper's choice), the ``live`` weights, or an ``ema`` of them.
        loss: the per-position divergence (see `trd_lightning.losses`).
        loss_kwargs: extra arguments of that loss (``clip``, ``beta``, ``k``, ``temperature``).
        sampling: how training rollouts are sampled.
        max_prompt_length: prompts longer than this keep their last tokens (see `encode_prompts`).
        optimizer / lr_scheduler: built from the student's trainable parameters only.
        student_lora: `peft.LoraConfig` arguments (``{r: 64, lora_alpha: 128}``); only the adapters
            train and only they are checkpointed (see `trd_lightning.lora`).
        teacher_quantization: bitsandbytes settings for the OPD teacher (``{load_in_4bit: true}``;
            see `trd_lightning.quantization.bitsandbytes_config`).
        student_dtype / teacher_dtype: load dtype (``bfloat16``, ``float16``, ``float32``).
        nonfinite: what a NaN/inf training loss does: ``skip`` the update (counted in
            ``train/skipped_nonfinite``) or ``raise``, after saving the batch to the run folder.
    """

    def __init__(
        self,
        student: str = "builtin:arith/student",
        teacher: str | None = "builtin:arith/teacher",
        mode: Literal["opd", "opsd"] = "opd",
        opsd_teacher: Literal["frozen", "live", "ema"] = "frozen",
        ema_decay: float = 0.99,
        loss: LossName = "reverse_kl",
        loss_kwargs: dict[str, Any] | None = None,
        sampling: Sampling | None = None,
        max_prompt_length: int | None = None,
        task: Task | None = None,
        optimizer: OptimizerCallable = torch.optim.AdamW,
        lr_scheduler: LRSchedulerCallable | None = None,
        student_lora: dict[str, Any] | None = None,
        teacher_quantization: dict[str, Any] | None = None,
        student_dtype: str | None = None,
        teacher_dtype: str | None = None,
        nonfinite: Literal["skip", "raise"] = "skip",
    ):
        super().__init__()
        self.save_hyperparameters(ignore=["task", "optimizer", "lr_scheduler"])
        if loss not in LOSSES:
            raise ValueError(f"unknown loss {loss!r}; choose one of: {', '.join(LOSSES)}")
        if mode == "opd" and teacher is None:
            raise ValueError("mode='opd' needs a teacher path; for self-distillation set mode='opsd'")
        if not 0 < ema_decay < 1:
            raise ValueError(f"ema_decay must be in (0, 1), got {ema_decay}")
        if teacher_quantization and mode != "opd":
            raise ValueError("teacher_quantization applies to a separate OPD teacher; in OPSD the teacher is the student")
        self.mode, self.opsd_teacher, self.ema_decay = mode, opsd_teacher, ema_decay
        self.loss_name, self.loss_kwargs = loss, dict(loss_kwargs or {})
        self.sampling = sampling or Sampling()
        self.max_prompt_length = max_prompt_length
        self._task = task
        self.optimizer_factory, self.scheduler_factory = optimizer, lr_scheduler

        # Everything that can fail on bad input runs here, before a single forward pass.
        self._tokenizer = load_tokenizer(student)
        self._check_loss_kwargs()
        self.student = load_causal_lm(student, dtype=student_dtype, trainable=True)
        if student_lora:
            # Before the OPSD teacher copy below, so an EMA teacher pairs with the student 1:1.
            self.student = apply_lora(self.student, student_lora)
        check_model_matches_tokenizer(self.student, self._tokenizer, "student")
        if mode == "opd":
            check_compatible(self._tokenizer, load_tokenizer(teacher))
            self.teacher = load_causal_lm(teacher, dtype=teacher_dtype, quantization=teacher_quantization, trainable=False)
            check_model_matches_tokenizer(self.teacher, self._tokenizer, "teacher")
            self._check_same_logit_width()
        self._check_context_length()
        elif opsd_teacher in ("frozen", "ema"):
            self.teacher = freeze(copy.deepcopy(self.student))
        else:
            self.teacher = None  # live: the student itself plays the teacher under no_grad
        if nonfinite not in ("skip", "raise"):
            raise ValueError(f"nonfinite must be 'skip' or 'raise', got {nonfinite!r}")
        self.nonfinite = nonfinite
        self.skipped_nonfinite = 0  # training state: checkpointed
        self._discard_grads = False
        self._rng_to_restore: dict | None = None

    # --- protocol (see trd_lightning.protocol) --------------------------------------------------
    @property
    def tokenizer(self):
        return self._tokenizer

    @property
    def task(self) -> Task:
        if self._task is None:
            dm = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
            if dm is None or getattr(dm, "task", None) is None:
                raise RuntimeError("no task: pass task= to the module or fit with a PromptDataModule")
            self._task = dm.task
        return self._task

    def model_for(self, role: str) -> torch.nn.Module:
        if role == "student":
            return self.student
        if role in ("teacher", "refiner"):
            return self.teacher if self.teacher is not None else self.student
        raise ValueError(f"unknown role {role!r}; choose student, teacher or refiner")

    def teacher_prompt(self, problem) -> str:
        return self.task.privileged_prompt(problem) if self.mode == "opsd" else self.task.student_prompt(problem)

    def sample(self, prompts, *, role="student", sampling=None, num_return_sequences=1):
        ids, mask = encode_prompts(self.tokenizer, prompts, self.device, self.max_prompt_length)
        return sample_responses(
            self.model_for(role),
            self.tokenizer,
            ids,
            mask,
            sampling or self.sampling,
            num_return_sequences=num_return_sequences,
            synced_gpus=self._synced_gpus(),
        )

    def score(self, context: Context, *, role: str) -> torch.Tensor:
        if role == "student":
            return response_logits(self.student, context)
        with torch.no_grad():
            return response_logits(self.model_for(role), context)

    # --- rollouts ---------------------------------------------------------------------------
    def make_rollout(self, problems: list) -> Rollout:
        """Sample ``y_o`` from the current student and lay out the student and teacher contexts."""
        start = time.perf_counter()
        student_prompts = [self.task.student_prompt(p) for p in problems]
        prompt_ids, prompt_mask = encode_prompts(self.tokenizer, student_prompts, self.device, self.max_prompt_length)
        response, mask = sample_responses(
            self.student, self.tokenizer, prompt_ids, prompt_mask, self.sampling, synced_gpus=self._synced_gpus()
        )
        student = Context(torch.cat([prompt_ids, response], 1), torch.cat([prompt_mask, mask.long()], 1), prompt_ids.shape[1])
        teacher = build_context(self.tokenizer, [self.teacher_prompt(p) for p in problems], response, mask, self.max_prompt_length)
        return Rollout(list(problems), response, mask, student, teacher, {"seconds": time.perf_counter() - start})

    def rollout_correct(self, rollout: Rollout) -> torch.Tensor:
        texts = decode_responses(self.tokenizer, rollout.response_ids, rollout.response_mask)
        return torch.tensor([self.task.verify(p, t) for p, t in zip(rollout.problems, texts)], dtype=torch.float)

    # --- steps ------------------------------------------------------------------------------
    def distillation_loss(self, rollout: Rollout) -> torch.Tensor:
        teacher_logits = self.score(rollout.teacher, role="teacher")
        student_logits = self.score(rollout.student, role="student")
        return compute_loss(
            self.loss_name,
            student_logits,
            teacher_logits,
            rollout.response_mask,
            tokens=rollout.response_ids,
            **self.loss_kwargs,
        )

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        rollout: Rollout = batch.get("rollout") or self.make_rollout(batch["problems"])
        loss = self.distillation_loss(rollout)
        bs = len(rollout.problems)
        if self._is_nonfinite(loss):
            return self._nonfinite_step(loss, rollout)
        self.log("train/skipped_nonfinite", float(self.skipped_nonfinite), batch_size=bs)
        self.log("train/loss", loss, prog_bar=True, batch_size=bs)
        self.log("train/response_tokens", rollout.lengths.float().mean(), batch_size=bs)
        return loss

    def _eval_step(self, batch: dict, stage: str) -> torch.Tensor:
        rollout = self.make_rollout(batch["problems"])
        loss = self.distillation_loss(rollout)
        bs = len(rollout.problems)
        self.log(f"{stage}/loss", loss, batch_size=bs, sync_dist=True)
        self.log(f"{stage}/rollout_accuracy", self.rollout_correct(rollout).mean(), batch_size=bs, sync_dist=True)
        return loss

    def validation_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        return self._eval_step(batch, "val")

    def test_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        return self._eval_step(batch, "test")

    def predict_step(self, batch: dict, batch_idx: int) -> list[dict]:
        prompts = [self.task.student_prompt(p) for p in batch["problems"]]
        ids, mask = self.sample(prompts)
        texts = decode_responses(self.tokenizer, ids, mask)
        return [
            {"prompt": q, "response": r, "correct": self.task.verify(p, r)}
            for p, q, r in zip(batch["problems"], prompts, texts)
        ]

    def on_train_batch_end(self, outputs, batch, batch_idx) -> None:
        if self.mode == "opsd" and self.opsd_teacher == "ema":
            with torch.no_grad():
                t = [p for p in self.teacher.parameters()]
                s = [p.detach() for p in self.student.parameters()]
                torch._foreach_lerp_(t, s, 1 - self.ema_decay)

    # --- optimisation and checkpoints -------------------------------------------------------
    def configure_optimizers(self):
        params = [p for p in self.student.parameters() if p.requires_grad]
        optimizer = self.optimizer_factory(params)
        if self.scheduler_factory is None:
            return optimizer
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": self.scheduler_factory(optimizer), "interval": "step"}}

    def _teacher_in_checkpoint(self) -> bool:
        # An EMA teacher is training state (needed to resume); a frozen teacher is rebuilt from its path.
        return self.mode == "opsd" and self.opsd_teacher == "ema"

    def _checkpoint_filter(self):
        """Which state_dict keys are saved: what is rebuilt from a path (a frozen teacher, the
        frozen base weights under LoRA) is left out; with LoRA only the adapters are kept."""
        adapters = trainable_parameter_names(self.student) if is_lora(self.student) else None

        def keep(key: str) -> bool:
            role, _, name = key.partition(".")
            if role == "teacher" and not self._teacher_in_checkpoint():
                return False
            if role in ("student", "teacher") and adapters is not None:
                return name in adapters
            return True

        return keep

    def state_dict(self, *args, **kwargs):
        state = super().state_dict(*args, **kwargs)
        prefix = kwargs.get("prefix", args[1] if len(args) > 1 else "")
        keep = self._checkpoint_filter()
        return type(state)((k, v) for k, v in state.items() if keep(k[len(prefix):]))

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        result = super().load_state_dict(state_dict, strict=False, assign=assign)
        keep = self._checkpoint_filter()
        missing = [k for k in result.missing_keys if keep(k)]
        if strict and (missing or result.unexpected_keys):
            raise RuntimeError(
                "checkpoint does not match the model: "
                f"missing {missing[:5]}{'...' if len(missing) > 5 else ''}, "
                f"unexpected {result.unexpected_keys[:5]}{'...' if len(result.unexpected_keys) > 5 else ''}; "
                "was it written for a different student or config?"
            )
        return result

    def configure_model(self) -> None:
        # Under a ModelParallelStrategy (FSDP2) the student is sharded here, before the optimizer
        # is built; a no-op otherwise. The frozen teacher is prepared by TeacherSharding.
        configure_sharding(self)

    # --- helpers ----------------------------------------------------------------------------
    def _synced_gpus(self) -> bool:
        # Sharded generation: every rank must keep stepping until all ranks finish.
        return self._trainer is not None and self.trainer.world_size > 1

    def _check_loss_kwargs(self) -> None:
        """Fail on a misspelled loss argument now, not after the first rollout."""
        logits = torch.zeros(1, 1, 2)
        try:
            compute_loss(self.loss_name, logits, logits, torch.ones(1, 1, dtype=torch.bool), tokens=torch.zeros(1, 1, dtype=torch.long), **self.loss_kwargs)
        except TypeError as err:
            raise ValueError(f"bad loss_kwargs {self.loss_kwargs} for loss {self.loss_name!r}: {err}") from None

    def _check_same_logit_width(self) -> None:
        s = self.student.get_output_embeddings().weight.shape[0]
        t = self.teacher.get_output_embeddings().weight.shape[0]
        if s != t:
            raise ValueError(
                f"student and teacher output vocabularies differ ({s} vs {t} logits); per-token distillation "
                "compares distributions index by index, so both must share one vocabulary"
            )
