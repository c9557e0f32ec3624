"""The small protocol that callbacks use, so they plug into modules other than ours.

A LightningModule that offers these members works with `PassAtKEvaluation`, `TrajectoryRevision`
and `PrefixAudit`. `DistillationModule` is one; a test implements another from scratch.
"""

from __future__ import annotations

from typing import Literal, Protocol, runtime_checkable

import torch
from transformers import PreTrainedTokenizerBase

from trd_lightning.rollout import Context, Sampling
from trd_lightning.tasks.base import Task

#: "student": the weights being trained; "teacher": the supervising model (for OPSD, the model
#: whose context holds the privileged solution); "refiner": the model that writes TRD revisions.
Role = Literal["student", "teacher", "refiner"]


@runtime_checkable
class RolloutModel(Protocol):
    @property
    def task(self) -> Task: ...

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


# Optional, for the fused splice reviser (see `PrefixSpliceReviser`): a module with an attribute
# ``fused_reviser`` (``None`` by default) whose training rollouts come from
# ``fused_reviser.sample_revised(module, problems)`` whenever it is set. `TrajectoryRevision` sets
# it in ``setup`` and clears it in ``teardown``; a module without it gets the two-pass reviser.
# The rollouts it returns carry ``teacher_logits``, which the loss should use instead of a
# teacher forward.
