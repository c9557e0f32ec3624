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
import warnings
from pathlib import Path
from typing import Any, Literal

import torch
from lightning.pytorch import LightningModule
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from trd_lightning.engines import make_engine
from trd_lightning.lora import apply_lora, is_lora, trainable_parameter_names
from trd_lightning.losses import LOSSES, TEACHER_FREE, LossName, compute_loss
from trd_lightning.models import (
    check_compatible,
    check_model_matches_tokenizer,
    check_same_rendering,
    check_same_stop_ids,
    freeze,
    load_causal_lm,
    load_tokenizer,
    position_limit,
)
from trd_lightning.rollout import (
    Context,
    Rollout,
    Sampling,
    build_context,
    decode_responses,
    decode_and_verify,
    encode_prompts,
    eval_mode,
    response_logits,
    stop_token_ids,
)
from trd_lightning.divergence import check_finite_before_greedy, diverged_weights_error
from trd_lightning.resume import rng_states, set_rng_states
from trd_lightning.sharding import configure_sharding, rollout_weights
from trd_lightning.tasks.base import Task, problem_record

# `sampling` is a hyperparameter, so it is pickled into every checkpoint, and Lightning resumes
# with torch.load(weights_only=True): without this, `trd fit --ckpt_path` cannot read its own file.
torch.serialization.add_safe_globals([Sampling])

_HALF_DTYPES = ("bfloat16", "float16")


def _half_precision_weights_message(setting: str) -> str:
    """Why the student's trained weights must stay in float32, and the fix."""
    return (
        f"{setting} trains the student's weights themselves in half precision: an update smaller than the "
        "weight's rounding step is lost (measured: with lr 5e-6 only 6.7 % of bf16 weights changed after 3 steps, "
        "87.9 % in float32). Keep float32 master weights and compute in bf16: leave student_dtype unset (or "
        "float32) and set trainer.precision: bf16-mixed; or train LoRA adapters (student_lora), whose weights "
        "peft keeps in float32 over a half-precision base"
    )


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
        rollout_engine: what samples rollouts, rewrites and Pass@k (`trd_lightning.engines`):
            ``hf`` (``generate``), ``hf_continuous`` (transformers' continuous batching) or
            ``vllm`` (optional extra; weights synced from the student before each rollout).
        rollout_engine_kwargs: that engine's arguments (vllm: ``{kwargs: {gpu_memory_utilization: 0.3}}``).
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
        rollout_engine: Literal["hf", "hf_continuous", "vllm"] = "hf",
        rollout_engine_kwargs: dict[str, Any] | None = None,
    ):
        super().__init__()
        self.save_hyperparameters(ignore=["task", "optimizer", "lr_scheduler"])
        if loss not in LOSSES:
            raise ValueError(f"unknown loss {loss!r}; choose one of: {', '.join(LOSSES)}")
        if mode == "opd" and teacher is None:
            raise ValueError("mode='opd' needs a teacher path; for self-distillation set mode='opsd'")
        if nonfinite not in ("skip", "raise"):
            raise ValueError(f"nonfinite must be 'skip' or 'raise', got {nonfinite!r}")
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

        if student_dtype in _HALF_DTYPES and not student_lora:
            raise ValueError(_half_precision_weights_message(f"student_dtype: {student_dtype}"))
        # Everything that can fail on bad input runs here, before a single forward pass.
        self._tokenizer = load_tokenizer(student, role="student")
        self._check_loss_kwargs()
        self.student = load_causal_lm(student, dtype=student_dtype, trainable=True, role="student")
        if student_lora:
            # Before the OPSD teacher copy below, so an EMA teacher pairs with the student 1:1.
            self.student = apply_lora(self.student, student_lora)
        check_model_matches_tokenizer(self.student, self._tokenizer, "student")
        if mode == "opd":
            self._teacher_tokenizer = load_tokenizer(teacher, role="teacher")
            check_compatible(self._tokenizer, self._teacher_tokenizer)
            self.teacher = load_causal_lm(teacher, dtype=teacher_dtype, quantization=teacher_quantization, trainable=False, role="teacher")
            check_model_matches_tokenizer(self.teacher, self._tokenizer, "teacher")
            self._check_same_logit_width()
        elif opsd_teacher in ("frozen", "ema"):
            self.teacher = freeze(copy.deepcopy(self.student))
        else:
            self.teacher = None  # live: the student itself plays the teacher under no_grad
        self._check_context_length()
        # Every id that ends a response (generation_config's EOS list and the tokenizer's EOS):
        # rollouts, revisions and response masks stop at the first of them, as generate does.
        self.stop_ids = stop_token_ids(self.student, self._tokenizer)
        if mode == "opd":
            check_same_stop_ids(self.stop_ids, stop_token_ids(self.teacher, self._tokenizer))
        self.engine = make_engine(rollout_engine, rollout_engine_kwargs)
        self.engine.check(self.student, self._tokenizer, self.sampling)  # vLLM missing or the architecture unsupported: now
        self.nonfinite = nonfinite
        self.skipped_nonfinite = 0  # training state: checkpointed
        self._discard_grads = False
        self._rng_to_restore: dict | None = None
        # Plugged in by TrajectoryRevision (set_rollout_reviser) for a reviser that revises while
        # sampling (a fused PrefixSpliceReviser): training rollouts then come from it.
        self._rollout_reviser = None

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

    @property
    def teacher_is_training_state(self) -> bool:
        # An EMA teacher is training state (checkpointed, updated each step, sharded like the
        # student); a frozen teacher is rebuilt from its path.
        return self.mode == "opsd" and self.opsd_teacher == "ema"

    @property
    def rollout_reviser(self):
        return self._rollout_reviser

    def set_rollout_reviser(self, reviser) -> None:
        self._rollout_reviser = reviser

    def synced_gpus(self) -> bool:
        # Sharded generation: every rank must keep stepping until all ranks finish.
        return self._trainer is not None and self.trainer.world_size > 1

    def model_for(self, role: str) -> torch.nn.Module:
        if role == "student":
            return self.student
        if role in ("teacher", "refiner"):
            return self.teacher if self.teacher is not None else self.student
        raise ValueError(f"unknown role {role!r}; choose student, teacher or refiner")

    def teacher_prompt(self, problem) -> str:
        return self.task.privileged_prompt(problem) if self.mode == "opsd" else self.task.student_prompt(problem)

    def sample(self, prompts, *, role="student", sampling=None, num_return_sequences=1):
        # max_prompt_length bounds x and c; a refinement context c_r has the reviser's own budget.
        limit = None if role == "refiner" else self.max_prompt_length
        ids, mask = encode_prompts(self.tokenizer, prompts, self.device, limit)
        check_finite_before_greedy(self.model_for(role), sampling or self.sampling, self.global_step, role)
        with rollout_weights(self, (role,)) as local:  # FSDP2: gather once, if the strategy says so
            return self.engine.generate(
                self.model_for(role),
                self.tokenizer,
                ids,
                mask,
                sampling or self.sampling,
                num_return_sequences=num_return_sequences,
                synced_gpus=self.synced_gpus() and not local,
                stop_ids=self.stop_ids,
            )

    def score(self, context: Context, *, role: str) -> torch.Tensor:
        if role == "student":
            return response_logits(self.student, context)
        model = self.model_for(role)
        # A live OPSD teacher is the student itself, in train mode for the update: its targets
        # are computed with dropout off (a frozen teacher is in eval mode already).
        with torch.no_grad(), eval_mode(model):
            return response_logits(model, context)

    # --- rollouts ---------------------------------------------------------------------------
    def make_rollout(self, problems: list) -> Rollout:
        """Sample ``y_o`` from the current student and lay out the student and teacher contexts.

        In training with a `rollout_reviser` plugged in, the rollout is sampled and revised in one decode.
        """
        if self._rollout_reviser is not None and self._trainer is not None and self.trainer.training:
            return self._rollout_reviser.sample_revised(self, problems)
        start = time.perf_counter()
        student_prompts = [self.task.student_prompt(p) for p in problems]
        prompt_ids, prompt_mask = encode_prompts(self.tokenizer, student_prompts, self.device, self.max_prompt_length)
        check_finite_before_greedy(self.student, self.sampling, self.global_step)  # greedy argmax(NaN) fails silently
        try:
            with rollout_weights(self, ("student",)) as local:  # FSDP2: gather once, if the strategy says so
                response, mask = self.engine.generate(
                    self.student, self.tokenizer, prompt_ids, prompt_mask, self.sampling,
                    synced_gpus=self.synced_gpus() and not local, stop_ids=self.stop_ids,
                )
        except RuntimeError as err:
            # Diverged weights give a finite loss one step and NaN logits the next: the raw
            # error is torch.multinomial's, which names neither the cause nor the fix.
            if "probability tensor contains" not in str(err):
                raise
            raise diverged_weights_error(self.student, self.global_step) from None
        student = Context.joined(prompt_ids, prompt_mask, response, mask)
        teacher_prompts = [self.teacher_prompt(p) for p in problems]
        # OPD: the teacher reads the student's own context, so it is not tokenized and laid out twice.
        teacher = student if teacher_prompts == student_prompts else build_context(
            self.tokenizer, teacher_prompts, response, mask, self.max_prompt_length
        )
        return Rollout(list(problems), response, mask, student, teacher, seconds=time.perf_counter() - start)

    def rollout_correct(self, rollout: Rollout) -> torch.Tensor:
        return torch.tensor(decode_and_verify(self.task, self.tokenizer, rollout.problems, rollout)[1], dtype=torch.float)

    # --- steps ------------------------------------------------------------------------------
    def distillation_loss(self, rollout: Rollout) -> torch.Tensor:
        teacher_logits = rollout.teacher_logits
        if teacher_logits is None and self.loss_name not in TEACHER_FREE:
            teacher_logits = self.score(rollout.teacher, role="teacher")
        student_logits = self.score(rollout.student, role="student")
        return compute_loss(
            self.loss_name,
            student_logits,
            student_logits.detach() if teacher_logits is None else teacher_logits,  # unread by TEACHER_FREE losses
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
        sampled = rollout.original or rollout  # a two-pass reviser's y_o holds the sampling time
        if sampled.seconds:
            tokens = float(sampled.lengths.sum())
            self.log("train/rollout_tokens_per_s", tokens / sampled.seconds, prog_bar=True, batch_size=bs)
        return loss

    #: Base seed of evaluation rollouts (see `_eval_step`).
    EVAL_SEED = 4321

    def _eval_step(self, batch: dict, stage: str, batch_idx: int) -> torch.Tensor:
        # Evaluation rollouts draw from their own seeded RNG, forked off the global one: the
        # numbers repeat between fit's final test and `trd test --ckpt_path`, and a validation in
        # the middle of training leaves the training rollouts' random state untouched.
        devices = [self.device] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(self.EVAL_SEED + 100_003 * batch_idx + 7919 * self.global_rank)
            rollout = self.make_rollout(batch["problems"])
        loss = self.distillation_loss(rollout)
        bs = len(rollout.problems)
        self.log(f"{stage}/loss", loss, batch_size=bs, sync_dist=True)
        self.log(f"{stage}/rollout_accuracy", self.rollout_correct(rollout).mean(), batch_size=bs, sync_dist=True)
        return loss

    def validation_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        return self._eval_step(batch, "val", batch_idx)

    def test_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        return self._eval_step(batch, "test", batch_idx)

    def predict_step(self, batch: dict, batch_idx: int) -> list[dict]:
        prompts = [self.task.student_prompt(p) for p in batch["problems"]]
        ids, mask = self.sample(prompts)
        texts, verdicts = decode_and_verify(self.task, self.tokenizer, batch["problems"], (ids, mask))
        return [
            # A plain record, not the task's object: Lightning walks (and rebuilds) what predict returns.
            {"problem": problem_record(p), "prompt": q, "response": r, "verified": ok}
            for p, q, r, ok in zip(batch["problems"], prompts, texts, verdicts)
        ]

    def on_train_batch_end(self, outputs, batch, batch_idx) -> None:
        if self.teacher_is_training_state:
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

    def _checkpoint_filter(self):
        """Which state_dict keys are saved: what is rebuilt from a path (a frozen teacher, the
        frozen base weights under LoRA) is left out; with LoRA only the adapters are kept."""
        adapters = trainable_parameter_names(self.student) if is_lora(self.student) else None

        def keep(key: str) -> bool:
            role, _, name = key.partition(".")
            if role == "teacher" and not self.teacher_is_training_state:
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

    def on_fit_start(self) -> None:
        # Lightning warns about every module in eval mode at the start of training; the frozen
        # teacher is in eval mode by design. Say so once, and silence the warning only when the
        # teacher is all it would count (any other module in eval mode still warns).
        eval_modules = [name for name, m in self.named_modules() if not m.training]
        if eval_modules and all(name.startswith("teacher") for name in eval_modules):
            warnings.filterwarnings("ignore", message=rf"Found {len(eval_modules)} module\(s\) in eval mode at the start of training")
            rank_zero_info(f"the frozen teacher ({len(eval_modules)} modules) is in eval mode by design (no dropout, no grad)")

    def configure_model(self) -> None:
        # Under a ModelParallelStrategy (FSDP2) the student is sharded here, before the optimizer
        # is built; a no-op otherwise. The frozen teacher is prepared by TeacherSharding.
        configure_sharding(self)

    # --- non-finite losses and exact resume ---------------------------------------------------
    def _is_nonfinite(self, loss: torch.Tensor) -> bool:
        bad = not bool(torch.isfinite(loss.detach()).all())
        if self._trainer is None:
            return bad
        # Every rank must take the same branch: DDP reduces the gradients of one common step.
        return bool(self.trainer.strategy.reduce_boolean_decision(bad, all=False))

    def _nonfinite_step(self, loss: torch.Tensor, rollout: Rollout) -> torch.Tensor:
        """Never a silent update: skip the step (counted) or stop with the batch saved."""
        if self.nonfinite == "raise":
            path = self._save_nonfinite_batch(loss, rollout)
            raise FloatingPointError(
                f"non-finite training loss ({loss.detach().float().item()}) at step {self.global_step}; the batch "
                f"(problems, responses, rollout tensors) is saved to {path}: inspect it with "
                "torch.load(path, weights_only=False), or set nonfinite='skip' to skip such steps"
            )
        self.skipped_nonfinite += 1
        if self.skipped_nonfinite == 1:
            rank_zero_warn(
                f"non-finite training loss at step {self.global_step}: its update is skipped; "
                "further skips are counted in train/skipped_nonfinite"
            )
        self.log("train/skipped_nonfinite", float(self.skipped_nonfinite), batch_size=len(rollout.problems))
        # Returning None would skip the update too, but Lightning refuses it under DDP. A zero that
        # touches every trainable parameter keeps every rank on the normal path (DDP wants a
        # gradient for each); `on_before_optimizer_step` then drops the gradients, and optimizers
        # skip parameters without one (AdamW: no decay, no moment or step-count update).
        self._discard_grads = True
        return sum(p.sum() for p in self.student.parameters() if p.requires_grad) * 0.0

    def _save_nonfinite_batch(self, loss: torch.Tensor, rollout: Rollout) -> Path:
        folder = Path(self.trainer.log_dir or self.trainer.default_root_dir) if self._trainer is not None else Path.cwd()
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"nonfinite_step{self.global_step}_rank{self.global_rank}.pt"
        context = lambda c: {"input_ids": c.input_ids.cpu(), "attention_mask": c.attention_mask.cpu(), "prompt_width": c.prompt_width}  # noqa: E731
        torch.save(
            {
                "step": self.global_step,
                "loss": loss.detach().cpu(),
                "problems": rollout.problems,
                "responses": decode_responses(self.tokenizer, rollout.response_ids, rollout.response_mask),
                "response_ids": rollout.response_ids.cpu(),
                "response_mask": rollout.response_mask.cpu(),
                "student_context": context(rollout.student),
                "teacher_context": context(rollout.teacher),
            },
            path,
        )
        return path

    def on_before_optimizer_step(self, optimizer) -> None:
        if self._discard_grads:
            for p in self.student.parameters():
                p.grad = None
            self._discard_grads = False

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        # Lightning does not save the global random state; rollouts are sampled from it.
        checkpoint["trd_resume"] = {"rng": rng_states(), "skipped_nonfinite": self.skipped_nonfinite}

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        state = checkpoint.get("trd_resume")
        if state:
            self.skipped_nonfinite = int(state["skipped_nonfinite"])
            # Put back in on_train_start, right before the first resumed rollout (after setup and
            # data loading); loading weights for evaluation leaves the random state alone.
            self._rng_to_restore = state["rng"]

    def on_train_start(self) -> None:
        if self._rng_to_restore is not None:
            set_rng_states(self._rng_to_restore)
            self._rng_to_restore = None

    # --- helpers ----------------------------------------------------------------------------
    def _check_context_length(self) -> None:
        """A rollout (prompt + response) must fit the positions every model was built for."""
        if self.max_prompt_length is None:
            return
        if self.max_prompt_length < 1:
            raise ValueError(f"max_prompt_length must be >= 1 (or None for no limit), got {self.max_prompt_length}")
        self._check_fits(self.max_prompt_length, "max_prompt_length", "lower max_prompt_length or sampling.max_new_tokens")

    def _check_fits(self, prompt_tokens: int, what: str, fix: str) -> None:
        need = prompt_tokens + self.sampling.max_new_tokens
        for role, model in (("student", self.student), ("teacher", self.teacher)):
            limit = position_limit(model)
            if limit is not None and need > limit:
                raise ValueError(
                    f"{what} + sampling.max_new_tokens = {prompt_tokens} + {self.sampling.max_new_tokens} = {need} "
                    f"exceeds the {role}'s max_position_embeddings ({limit}); {fix} so they sum to at most {limit}"
                )

    #: Splits longer than this (tasks generated on the fly) are checked on their first problems
    #: here and batch by batch afterwards (`encode_prompts` refuses an over-long prompt).
    PREFLIGHT_PROBLEMS = 100_000

    def setup(self, stage: str) -> None:
        precision = str(getattr(self._trainer, "precision", "")) if self._trainer is not None else ""
        if stage == "fit" and precision in ("bf16-true", "16-true", "bf16", "16") and not is_lora(self.student):
            raise ValueError(_half_precision_weights_message(f"trainer.precision: {precision}"))
        # Before any compute: every prompt the run will encode must fit its budget, since prompts
        # are never cut (see `encode_prompts`), and a prompt past the positions would crash inside
        # generate (absolute positions) or run past what the model was trained for.
        splits = {"fit": ("train", "val"), "validate": ("val",), "test": ("test",), "predict": ("test",)}.get(stage, ())
        try:
            task = self.task
        except RuntimeError:
            return  # no task yet: a module driven by hand checks nothing here
        for split in splits:
            self.check_prompt_lengths(task, split)
            self._check_teacher_reads_the_prompts(task, split)

    def _check_teacher_reads_the_prompts(self, task: Task, split: str) -> None:
        """The task renders each prompt once, with the student's chat template, and the teacher
        reads that text: check the teacher's template renders the task's own conversations alike."""
        chat_messages = getattr(task, "chat_messages", None)
        teacher_tokenizer = getattr(self, "_teacher_tokenizer", None)
        problems = task.problems(split)
        if self.mode != "opd" or chat_messages is None or teacher_tokenizer is None or not len(problems):
            return
        messages = chat_messages(problems[0])
        if messages is not None and getattr(teacher_tokenizer, "chat_template", None):
            check_same_rendering(self.tokenizer, teacher_tokenizer, messages, f"the task's {split} prompts")

    def check_prompt_lengths(self, task: Task, split: str) -> None:
        """Refuse a split whose student or teacher prompts exceed ``max_prompt_length`` or, with the
        response budget, the models' positions; the message counts them and names the longest."""
        problems = task.problems(split)
        problems = [problems[i] for i in range(min(len(problems), self.PREFLIGHT_PROBLEMS))]
        if not problems:
            return
        views = {"student prompt": [task.student_prompt(p) for p in problems]}
        if self.mode == "opsd":
            views["teacher prompt (with the reference)"] = [self.teacher_prompt(p) for p in problems]
        for what, prompts in views.items():
            lengths = [len(ids) for ids in self.tokenizer(prompts, add_special_tokens=False)["input_ids"]]
            longest = max(range(len(lengths)), key=lengths.__getitem__)
            where = f"the {split} split's longest {what} ({lengths[longest]} tokens, problem {longest}" + (
                f", {problems[longest].source})" if hasattr(problems[longest], "source") else ")"
            )
            if self.max_prompt_length is not None:
                over = sum(n > self.max_prompt_length for n in lengths)
                if over:
                    raise ValueError(
                        f"{over} of {len(lengths)} {what}s of the {split} split exceed max_prompt_length="
                        f"{self.max_prompt_length} tokens; {where}. Prompts are never cut (that would remove the problem "
                        "or the reference): raise max_prompt_length (within the models' positions) or remove those "
                        "problems from the data"
                    )
            else:
                self._check_fits(lengths[longest], where, "set max_prompt_length and remove longer problems, or lower sampling.max_new_tokens,")

    def _check_loss_kwargs(self) -> None:
        """Fail on a misspelled loss argument now, not after the first rollout."""
        clip = self.loss_kwargs.get("clip")
        if clip is not None and not clip > 0:
            # clamp(max=clip) with clip <= 0 makes every position a constant: nothing is learned
            raise ValueError(f"loss_kwargs.clip must be > 0 (a per-token divergence cap), got {clip}; or null for no clip")
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
