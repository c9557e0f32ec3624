"""The contract between a LightningModule and the callbacks and revisers that plug into it.

`RolloutModel` lists every member that `PassAtKEvaluation`, `TrajectoryRevision` (and its
revisers), `PrefixAudit`, `CollapseGuard`, `LearningCurve`, `TeacherSharding`,
`PromptDataModule` and the sharding helpers read or write on a module, besides the members
every `LightningModule` has (``device``, ``log``, ``trainer``, ``global_rank``, ``training``,
``train``/``eval``, ``state_dict``/``load_state_dict``). They read them as plain attributes,
never through ``getattr(module, name, default)``: a module that lacks one fails with an
``AttributeError`` naming it. `DistillationModule` is one implementation;
``tests/test_contract.py`` writes another from scratch, implementing exactly these members,
runs every callback and reviser on it, and checks that this list names every attribute the
callbacks and revisers touch.

The rollout path (see the README, "How a training step runs"): `PromptDataModule` asks the
module for each training batch's rollout with ``make_rollout(problems)``. A reviser that
revises while sampling (`FusedReviser`, e.g. a fused `PrefixSpliceReviser`) is plugged in by
`TrajectoryRevision` through ``set_rollout_reviser``; ``make_rollout`` then returns
``rollout_reviser.sample_revised(module, problems)`` in training. A two-pass reviser instead
revises the finished rollout in `TrajectoryRevision.on_train_batch_start`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal, Protocol, runtime_checkable

import torch
from transformers import PreTrainedTokenizerBase

from trd_lightning.rollout import Context, Rollout, Sampling
from trd_lightning.tasks.base import Task

if TYPE_CHECKING:
    from trd_lightning.engines.base import RolloutEngine

#: "student": the weights being trained; "teacher": the supervising model (for OPSD, the model
#: whose context holds the privileged solution); "refiner": the model that writes TRD revisions.
Role = Literal["student", "teacher", "refiner"]


@runtime_checkable
class FusedReviser(Protocol):
    """A reviser that revises while the rollout is sampled (one decode for both)."""

    def sample_revised(self, module: RolloutModel, problems: list) -> Rollout:
        """The revised rollout ``y_r`` of ``problems``, sampled from the current student."""
        ...


@runtime_checkable
class RolloutModel(Protocol):
    """What a module offers the callbacks and revisers (besides `LightningModule`'s own members)."""

    # --- what the module samples, and how -----------------------------------------------------
    @property
    def task(self) -> Task:
        """The problems' task (prompts, verifier)."""
        ...

    @property
    def tokenizer(self) -> PreTrainedTokenizerBase: ...

    @property
    def max_prompt_length(self) -> int | None:
        """Token budget of the student's prompt ``x`` (``None``: the models' positions); prompts
        over it are refused, never cut (see `trd_lightning.rollout.encode_prompts`)."""
        ...

    @property
    def stop_ids(self) -> list[int]:
        """Every token id that ends a response (see `trd_lightning.rollout.stop_token_ids`)."""
        ...

    @property
    def sampling(self) -> Sampling:
        """How rollouts are sampled (a reviser's default, too)."""
        ...

    @property
    def mode(self) -> Literal["opd", "opsd"]:
        """``opd``: a separate teacher; ``opsd``: the teacher is the student with the reference in context."""
        ...

    @property
    def engine(self) -> RolloutEngine:
        """The rollout engine (`trd_lightning.engines`); a rewrite reviser writes ``y_r`` with it too."""
        ...

    @property
    def teacher(self) -> torch.nn.Module | None:
        """The separate teacher weights (``None``: the student itself plays the teacher, live OPSD)."""
        ...

    @property
    def teacher_is_training_state(self) -> bool:
        """Whether the teacher's weights are training state (an EMA of the student): then they
        are checkpointed, updated each step and sharded like the student."""
        ...

    def model_for(self, role: Role) -> torch.nn.Module:
        """The weights that play ``role``."""
        ...

    def synced_gpus(self) -> bool:
        """Whether every rank must join each generate call (sharded multi-process training)."""
        ...

    # --- the calls ----------------------------------------------------------------------------
    def sample(
        self, prompts: list[str], *, role: Role = "student", sampling: Sampling | None = None, num_return_sequences: int = 1
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Response ids ``[B*num_return_sequences, N]`` and mask, sampled under ``no_grad``."""
        ...

    def score(self, context: Context, *, role: Role) -> torch.Tensor:
        """Logits ``[B, N, V]`` that predict the response block of ``context``."""
        ...

    def teacher_prompt(self, problem) -> str:
        """The teacher's context ``c`` for a problem (plain for OPD, privileged for OPSD)."""
        ...

    def make_rollout(self, problems: list) -> Rollout:
        """The rollout of ``problems`` from the current weights (`PromptDataModule` calls it for
        every training batch). In training with a `rollout_reviser` set, it is that reviser's
        ``sample_revised``: the rollout comes out revised, with ``teacher_logits``, which the loss
        should use instead of a teacher forward."""
        ...

    # --- the one hook a revising callback plugs into -------------------------------------------
    @property
    def rollout_reviser(self) -> FusedReviser | None:
        """The fused reviser training rollouts come from (``None``: plain sampling)."""
        ...

    def set_rollout_reviser(self, reviser: FusedReviser | None) -> None:
        """Plug a fused reviser into `make_rollout` (``None`` unplugs it)."""
        ...
