"""Baselines that separate TRD's causes: "more teacher-written text" versus "revision".

Both are `Reviser` subclasses, so they plug into `TrajectoryRevision` and every config,
metric and log of the TRD rows applies to them unchanged (same budget: steps x rollouts).

* `TeacherSampleReviser`: replaces rollouts by the teacher's own samples under its ordinary
  context. With ``on_policy=0`` and ``loss: cross_entropy`` it is sequence-level KD (SFT on teacher
  samples for the same prompts); with ``on_policy=0.5`` and ``loss: generalized_jsd`` it is GKD's
  mixed on/off-policy data (Agarwal et al. 2024: a fraction lambda of the batch is student-sampled).
* `SpliceFromStartReviser`: the prefix splice with ``t*`` forced to the first position of every
  row: the teacher restricted to the student's top-p set writes the whole response and nothing of
  the student's prefix is kept. It separates "keep the student's correct prefix" (TRD's idea)
  from "sample from the teacher inside the student's support".
"""

from __future__ import annotations

import torch

from trd_lightning.revision import PrefixSpliceReviser, Reviser, assemble_rollout, revision_stats, rows
from trd_lightning.rollout import Rollout, Sampling


class TeacherSampleReviser(Reviser):
    """Replace ``round((1 - on_policy) * B)`` rollouts per batch by teacher samples.

    Args:
        on_policy: GKD's lambda, the fraction of rows that keep the student's own rollout
            (``0``: sequence-level KD, every row a teacher sample). The rows replaced are drawn
            uniformly per batch. TRL's GKD flips one coin per batch instead; a fixed count per
            batch has the same expected mix and no all-off-policy steps.
        sampling: how the teacher samples; default: the module's rollout sampling.

    The teacher scores every row under its ordinary context (its samples are on its own policy
    there), so the loss needs nothing beyond a plain rollout. Logged: ``teacher_rows`` (fraction
    replaced) and the accuracies before and after replacement.
    """

    def __init__(self, on_policy: float = 0.0, sampling: Sampling | None = None):
        if not 0.0 <= on_policy < 1.0:
            raise ValueError(
                f"on_policy must be in [0, 1) (the fraction of rows kept from the student), got {on_policy}; "
                "on_policy=1 replaces nothing: drop the reviser for plain on-policy distillation"
            )
        self.on_policy, self.sampling = float(on_policy), sampling

    def revise(self, module, rollout: Rollout) -> Rollout:
        n = len(rollout.problems)
        count = round((1.0 - self.on_policy) * n)
        picked = sorted(torch.randperm(n)[:count].tolist()) if count < n else list(range(n))
        new = rows(rollout)
        if picked:
            prompts = [module.teacher_prompt(rollout.problems[i]) for i in picked]
            sampling = self.sampling or module.sampling
            out, out_mask = module.sample(prompts, role="teacher", sampling=sampling)
            for j, i in enumerate(picked):
                new[i] = out[j][out_mask[j]].to(rollout.response_ids.device)
        replaced = torch.zeros(n, dtype=torch.bool)
        replaced[picked] = True
        t_star = torch.where(replaced, 0, -1)
        stats = revision_stats(module, rollout, replaced, t_star, new)
        stats["teacher_rows"] = replaced.float().mean().item()
        stats["revision_tokens"] = sum(len(new[i]) for i in picked)
        return assemble_rollout(module, rollout.problems, new, [module.teacher_prompt(p) for p in rollout.problems], stats)


class SpliceFromStartReviser(PrefixSpliceReviser):
    """`PrefixSpliceReviser` whose teacher disowns every token, so ``t* = 0`` in every row.

    Every token of ``y_r`` is then drawn from the teacher restricted to the student's
    top-``student_top_p`` set (same fused decode, fallback and budget as the splice).

    Args:
        (those of `PrefixSpliceReviser`; ``criterion``, ``threshold`` and ``teacher_top_p`` are unused)
    """

    def disowned(self, teacher_logp: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        return torch.ones(tokens.shape, dtype=torch.bool, device=tokens.device)
