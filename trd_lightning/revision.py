"""Revisers: turn a batch of student rollouts ``y_o`` into revised trajectories ``y_r``.

Two ways to correct a trajectory before distilling on it (see ../shared/PAPER.md):

* `RewriteReviser` (the paper's TRD): the refiner rewrites the whole attempt, conditioned on the
  refinement context ``c_r = (x, y_o)`` (OPD) or ``(x, y*, y_o)`` (OPSD). The teacher then scores
  ``y_r`` under ``c_r``; the student sees ``x`` alone. Support is kept only softly, through ``y_o``.
* `PrefixSpliceReviser` (token level, ours): find the first failed prefix position ``t*`` from the
  teacher's statistics, keep ``y_o[:t*]`` token for token, and continue by sampling from the teacher
  restricted to the student's own top-p set, so every new token is one the student could have
  produced. The teacher keeps its ordinary context ``c``.

A reviser only uses the `RolloutModel` protocol (``task``, ``tokenizer``, ``sample``, ``score``,
``teacher_prompt``, ``model_for`` for splicing), so it works with modules other than ours.
"""

from __future__ import annotations

import time
import warnings
from abc import ABC, abstractmethod
from typing import Literal

import torch

from trd_lightning.decoding import Proposer
from trd_lightning.diagnostics import disowned
from trd_lightning.models import check_compatible, load_causal_lm, load_tokenizer, position_limit
from trd_lightning.protocol import RolloutModel
from trd_lightning.rollout import (
    Context,
    Rollout,
    Sampling,
    encode_prompts,
    left_pad,
    make_rollout_from_rows,
    decode_and_verify,
)
from trd_lightning.splice_decode import SpliceDecode

Refine = Literal["all", "failed"]


class Reviser(ABC):
    """Maps a rollout to a revised one. ``revise`` must not change ``rollout`` in place.

    Args:
        (none here: the subclasses' own, e.g. `PrefixSpliceReviser`, `RewriteReviser`)
    """

    refine: Refine = "all"
    #: Revises while sampling (implements `trd_lightning.protocol.FusedReviser`): `TrajectoryRevision`
    #: then plugs it into the module's ``make_rollout`` instead of calling ``revise``.
    fused: bool = False

    def setup(self, module) -> None:
        """Called once before training (load extra models, check compatibility)."""

    @abstractmethod
    def revise(self, module, rollout: Rollout) -> Rollout: ...


def assemble_rollout(
    module: RolloutModel,
    problems: list,
    responses: list[torch.Tensor],
    teacher_prompts: list[str],
    stats: dict[str, float] | None = None,
    **fields,
) -> Rollout:
    """A rollout of ``module``'s task from per-row responses (1-D, EOS included) and per-row
    teacher contexts (see `make_rollout_from_rows`); ``stats`` and ``fields``: its typed fields."""
    return make_rollout_from_rows(
        module.tokenizer, problems, responses, [module.task.student_prompt(p) for p in problems], teacher_prompts,
        max_prompt_length=module.max_prompt_length, device=module.device, stats=dict(stats or {}), **fields,
    )


def rows(rollout: Rollout) -> list[torch.Tensor]:
    return [ids[m] for ids, m in zip(rollout.response_ids, rollout.response_mask)]


def _first_difference(a: list[torch.Tensor], b: list[torch.Tensor]) -> torch.Tensor:
    """Per row, the first position where two token sequences differ (``-1`` if identical)."""
    out = []
    for x, y in zip(a, b):
        n = min(len(x), len(y))
        diff = (x[:n] != y[:n]).nonzero()
        out.append(int(diff[0]) if len(diff) else (n if len(x) != len(y) else -1))
    return torch.tensor(out)


def revision_stats(module, original: Rollout, revised_rows: torch.Tensor, t_star: torch.Tensor, new: list[torch.Tensor]) -> dict:
    """What the callback logs: how much was revised and whether revision fixed or broke answers."""
    before = decode_and_verify(module.task, module.tokenizer, original.problems, original)[1]
    after = decode_and_verify(module.task, module.tokenizer, original.problems, new)[1]
    before_t, after_t = torch.tensor(before, dtype=torch.float), torch.tensor(after, dtype=torch.float)
    revised = revised_rows.float()
    return {
        "fraction_revised": revised.mean().item(),
        "t_star": t_star[t_star >= 0].float().mean().item() if (t_star >= 0).any() else float("nan"),
        "fail_to_pass": ((1 - before_t) * after_t).mean().item(),
        "pass_to_fail": (before_t * (1 - after_t)).mean().item(),
        "accuracy_before": before_t.mean().item(),
        "accuracy_after": after_t.mean().item(),
        "length_before": original.response_mask.sum(-1).float().mean().item(),
        "length_after": sum(len(r) for r in new) / max(len(new), 1),
    }


def _refinement_contexts(task, tokenizer, problems: list, attempts: list[torch.Tensor], privileged: bool, limit: int | None):
    """The refinement contexts ``c_r`` of ``problems``, each within ``limit`` tokens.

    ``c_r`` always holds the whole problem (and, when privileged, the reference): only the attempt
    is shortened, by one stated rule: its last tokens go, as few as needed (the refiner keeps the
    attempt's start, its structure and first steps). Returns the contexts and what was cut
    (``{"rows": ..., "tokens": ...}``, logged as ``revision/attempts_cut`` and
    ``revision/attempt_tokens_cut``). A problem whose context does not fit even with an empty
    attempt is an error.
    """
    def render(problem, ids) -> str:
        text = tokenizer.decode(ids.tolist(), skip_special_tokens=True)
        return task.refinement_prompt(problem, text, privileged=privileged)

    def length(text: str) -> int:
        return len(tokenizer(text, add_special_tokens=False)["input_ids"])

    contexts, cut = [], {"rows": 0, "tokens": 0}
    for problem, attempt in zip(problems, attempts):
        context = render(problem, attempt)
        if limit is not None and length(context) > limit:
            if length(render(problem, attempt[:0])) > limit:
                raise ValueError(
                    f"the refinement context of a problem does not fit {limit} tokens even without the attempt "
                    f"({'problem + reference' if privileged else 'problem'} + instructions take "
                    f"{length(render(problem, attempt[:0]))}); c_r must hold the whole problem, so raise the limit "
                    "(RewriteReviser(max_context_tokens=...), within the refiner's and teacher's positions minus "
                    "max_new_tokens), lower the refiner's max_new_tokens, or remove that problem from the data"
                )
            low, high = 0, len(attempt) - 1  # the longest prefix of the attempt that fits: binary search
            while low < high:
                mid = (low + high + 1) // 2
                low, high = (mid, high) if length(render(problem, attempt[:mid])) <= limit else (low, mid - 1)
            context = render(problem, attempt[:low])
            cut["rows"] += 1
            cut["tokens"] += len(attempt) - low
        contexts.append(context)
    return contexts, cut


class RewriteReviser(Reviser):
    """The paper's reviser: the refiner rewrites the attempt under ``c_r`` in one pass.

    Args:
        refine: ``all`` (the paper's default: correct rollouts too, which exposes the student to
            alternative valid derivations) or ``failed`` (only rollouts the task's verifier fails).
        privileged: put the reference solution into ``c_r``; ``None`` means "when the module runs
            OPSD" (``module.mode == "opsd"``).
        sampling: how the refiner samples; default: the module's rollout sampling.
        refiner: a separate refiner model path; default: the module's ``refiner`` role (the OPD
            teacher, or the frozen initial student in OPSD).
        max_context_tokens: longest refinement context allowed; default: the refiner's and the
            teacher's position limit minus ``max_new_tokens``. A longer ``c_r`` keeps the whole
            problem (and reference) and drops the attempt's last tokens, as few as needed, counted
            in ``revision/attempts_cut`` and ``revision/attempt_tokens_cut``; a problem that does
            not fit even without its attempt is an error (see `_refinement_contexts`).
        verified: replace each rewrite that the task's verifier fails by the rollout ``y_o``
            itself, scored by the teacher under its ordinary context (``x``; ``(x, y*)`` in OPSD),
            so a broken rewrite is never a target. Unlike ``refine="failed"`` (which the paper
            found worse) every rollout is still rewritten; only failed rewrites are dropped. Logged
            per batch: ``rewrite_accuracy`` (of the rewrites as sampled), ``rejected_rewrites``
            (fraction replaced); ``accuracy_after`` is then the accuracy of what is trained on.
        target_context: the teacher's context when it scores ``y_r``: ``refinement`` (``c_r``, the
            paper) or ``problem`` (its ordinary context ``x``, as for a plain rollout), to test
            whether the target under ``c_r`` (which has seen ``y_o``) is what misleads the student.
        The refiner's temperature is ``sampling.temperature`` (the third option the fidelity
        study varies).
    """

    def __init__(
        self,
        refine: Refine = "all",
        privileged: bool | None = None,
        sampling: Sampling | None = None,
        refiner: str | None = None,
        max_context_tokens: int | None = None,
        verified: bool = False,
        target_context: Literal["refinement", "problem"] = "refinement",
    ):
        if refine not in ("all", "failed"):
            raise ValueError(f"unknown refine mode {refine!r}; choose 'all' or 'failed'")
        if target_context not in ("refinement", "problem"):
            raise ValueError(f"unknown target_context {target_context!r}; choose 'refinement' (c_r, the paper) or 'problem' (x)")
        self.verified, self.target_context = bool(verified), target_context
        self.refine, self.privileged, self.sampling = refine, privileged, sampling
        self.refiner_path, self.max_context_tokens = refiner, max_context_tokens
        self._refiner = None
        self._warned_cut = False

    def setup(self, module) -> None:
        if self.refiner_path is not None and self._refiner is None:
            check_compatible(module.tokenizer, load_tokenizer(self.refiner_path))
            self._refiner = load_causal_lm(self.refiner_path, trainable=False).to(module.device)

    def _privileged(self, module) -> bool:
        return self.privileged if self.privileged is not None else module.mode == "opsd"

    def _limit(self, module, sampling: Sampling) -> int | None:
        """Tokens ``c_r`` may take: the refiner writes ``y_r`` after it and the teacher scores
        ``c_r + y_r``, so both models' positions bound it."""
        if self.max_context_tokens is not None:
            return self.max_context_tokens
        models = [self._refiner if self._refiner is not None else module.model_for("refiner"), module.model_for("teacher")]
        limits = [n for n in map(position_limit, models) if n is not None]
        return min(limits) - sampling.max_new_tokens if limits else None

    def revise(self, module, rollout: Rollout) -> Rollout:
        task, tok = module.task, module.tokenizer
        originals = rows(rollout)
        selected = [self.refine == "all" or not ok for ok in decode_and_verify(task, tok, rollout.problems, originals)[1]]
        privileged = self._privileged(module)
        sampling = self.sampling or module.sampling
        new, teacher_prompts = list(originals), [module.teacher_prompt(p) for p in rollout.problems]
        picked = [i for i, s in enumerate(selected) if s]
        synced = module.synced_gpus()
        # Under sharding every rank must join each generate call: a rank with nothing to refine
        # refines its first rollout anyway and throws the result away.
        dummy = not picked and synced and bool(originals)
        if picked or dummy:
            if dummy:
                picked = [0]
            limit = self._limit(module, sampling)
            prompts, cut = _refinement_contexts(
                task, tok, [rollout.problems[i] for i in picked], [originals[i] for i in picked], privileged, limit
            )
            if cut["rows"] and not self._warned_cut:
                self._warned_cut = True
                warnings.warn(
                    f"{cut['rows']} of {len(prompts)} refinement contexts exceeded {limit} tokens: their attempts lost "
                    f"{cut['tokens']} tokens at the end (the problem{' and the reference stay' if privileged else ' stays'} whole); "
                    "later cuts are counted in revision/attempts_cut and revision/attempt_tokens_cut",
                    stacklevel=2,
                )
            refiner_logits = None
            engine = module.engine  # the module's rollout engine writes y_r too
            if self._refiner is not None:
                ids, mask = encode_prompts(tok, prompts, module.device)
                out, out_mask = engine.generate(self._refiner, tok, ids, mask, sampling, stop_ids=module.stop_ids)
            elif engine.returns_logits and self._refiner_is_teacher(module) and len(picked) == len(originals):
                # The teacher scores y_r under c_r, which is what the refiner (the same model)
                # just generated from: keep generate's logits instead of a second forward.
                ids, mask = encode_prompts(tok, prompts, module.device)  # c_r has its own budget (limit above)
                out, out_mask, refiner_logits = engine.generate(
                    module.model_for("refiner"), tok, ids, mask, sampling, synced_gpus=synced, return_logits=True,
                    stop_ids=module.stop_ids,
                )
            else:
                out, out_mask = module.sample(prompts, role="refiner", sampling=sampling)
            for j, i in enumerate([] if dummy else picked):
                new[i] = out[j][out_mask[j]]
                teacher_prompts[i] = prompts[j]  # the teacher scores y_r under c_r
        revised_rows = torch.tensor(selected)
        t_star = _first_difference(originals, new)
        t_star[~revised_rows] = -1
        stats = revision_stats(module, rollout, revised_rows, t_star, new)
        stats["revision_tokens"] = int(out.numel()) if picked and not dummy else 0  # what the refiner decoded
        # The stated rule for a c_r over budget: the attempt's last tokens go (counted here).
        stats["attempts_cut"] = 0 if dummy or not picked else cut["rows"]
        stats["attempt_tokens_cut"] = 0 if dummy or not picked else cut["tokens"]
        revised = assemble_rollout(module, rollout.problems, new, teacher_prompts, stats)
        if picked and not dummy and refiner_logits is not None:
            revised = revised.replace(teacher_logits=refiner_logits)
        return self._apply_options(module, rollout, revised, selected, teacher_prompts)

    def _apply_options(self, module, rollout: Rollout, revised: Rollout, selected: list[bool], teacher_prompts: list[str]) -> Rollout:
        """``verified`` and ``target_context``: which rows are trained on, under which teacher context.
        ``selected``: the rows `revise` rewrote; ``teacher_prompts``: their ``c_r`` (others: ``x``)."""
        if not self.verified and self.target_context == "refinement":
            return revised
        originals, new = rows(rollout), rows(revised)
        plain = [module.teacher_prompt(p) for p in rollout.problems]
        prompts = list(teacher_prompts) if self.target_context == "refinement" else list(plain)
        ok = decode_and_verify(module.task, module.tokenizer, rollout.problems, new)[1]
        rejected = [sel and not good for sel, good in zip(selected, ok)] if self.verified else [False] * len(new)
        for i, bad in enumerate(rejected):
            if bad:  # the failed rewrite is dropped: train on y_o under the teacher's ordinary context
                new[i], prompts[i] = originals[i], plain[i]
        revised_rows = torch.tensor([sel and not bad for sel, bad in zip(selected, rejected)])
        t_star = _first_difference(originals, new)
        t_star[~revised_rows] = -1
        stats = revision_stats(module, rollout, revised_rows, t_star, new)
        n_selected = max(sum(selected), 1)
        stats["rewrite_accuracy"] = sum(g for g, sel in zip(ok, selected) if sel) / n_selected
        stats["rejected_rewrites"] = sum(rejected) / max(len(rejected), 1)
        for key in ("revision_tokens", "attempts_cut", "attempt_tokens_cut"):
            stats[key] = revised.stats.get(key, 0)
        # The refiner's logits belonged to c_r and to the rewrites: the loss scores afresh.
        return assemble_rollout(module, rollout.problems, new, prompts, stats)

    @staticmethod
    def _refiner_is_teacher(module) -> bool:
        return module.model_for("refiner") is module.model_for("teacher")


class PrefixSpliceReviser(Reviser):
    """Token-level revision: keep ``y_o[:t*]`` exactly, resample from ``t*`` inside the student's support.

    ``t*`` is the first response position where the teacher (under its ordinary context ``c``)
    disowns the student's token:

    * ``teacher_prob``: the teacher's probability of the sampled token is below ``threshold``;
    * ``teacher_top_p``: the sampled token lies outside the teacher's top-``teacher_top_p`` set.

    From ``t*`` on, each token is drawn from the teacher's distribution restricted to the student's
    top-``student_top_p`` set (renormalised). If the teacher puts less than ``min_mass`` on that set
    (the intersection is empty in effect), the token is drawn by ``fallback``: ``teacher`` (its
    unrestricted distribution: correctness first) or ``student`` (the student's top-p set:
    support first). How often that happened is logged as ``fallback_rate``. ``y_r`` has the same
    length budget as a rollout (``max_new_tokens``, default: the module's sampling budget): the
    continuation fills what ``t*`` left. The rollout's ``min_new_tokens`` binds the restricted
    draws as it binds generate: EOS is taken out of both distributions until a row has drawn that
    many tokens.

    Two ways to run it, with the same distribution of ``y_r``:

    * **fused** (``fused=True``; the default when ``refine="all"``): the revision happens while the
      rollout is sampled. Each student token is checked by the teacher before the row goes on,
      and the first disowned one is replaced and starts the restricted continuation. A row is
      therefore decoded once, not sampled to the end and then partly decoded again, and the
      teacher logits the loss needs were computed along the way (no separate teacher forward). ``y_o`` past ``t*`` never exists, so the statistics that compare
      it with ``y_r`` (fail->pass, accuracy and length before) are not logged. Needs a module
      whose ``make_rollout`` honours ``set_rollout_reviser`` (the protocol; `TrajectoryRevision` plugs
      it).
    * **two-pass** (``fused=False``, required by ``refine="failed"``, which must verify the
      finished ``y_o``): ``revise`` takes a finished rollout, scores it with the teacher for
      ``t*`` and decodes the continuations of the failed rows (batched, both KV caches). The
      teacher logits of the kept prefixes and of the continuations are reused for the loss.

    Both decode speculatively: the student drafts ``lookahead`` tokens, the teacher checks them in
    one forward, and a restricted draw is made by accepting the student's draft or redrawing
    from the residual (speculative sampling), so each token has exactly the distribution above
    while the teacher runs once per ``lookahead`` tokens instead of once per token.
    ``lookahead=1`` checks every token as it is drawn. The share of drafts kept is logged as
    ``lookahead_acceptance``: when it is low, a smaller ``lookahead`` wastes fewer drafts. Rows
    that have finished leave the batch (and both KV caches) once a quarter of it has, so the
    forwards shrink as the rollouts end.

    Args:
        criterion: how ``t*`` is found: ``teacher_prob`` (the teacher's probability of the
            student's token is below ``threshold``) or ``teacher_top_p`` (the token lies outside
            the teacher's top-``teacher_top_p`` set).
        threshold: the probability under which the teacher disowns a token (``teacher_prob``).
        teacher_top_p: the teacher's nucleus mass (``teacher_top_p``).
        student_top_p: from ``t*`` on, tokens are drawn from the teacher restricted to the
            student's top-``student_top_p`` set (renormalised): the student's support.
        temperature: the teacher's temperature in the restricted draws.
        max_new_tokens: the length budget of ``y_r``; default: the module's sampling budget.
        fallback: who draws when the restricted set holds under ``min_mass`` of the teacher's
            mass: ``teacher`` (its unrestricted distribution) or ``student`` (its top-p set).
        min_mass: the teacher mass on the student's set under which the fallback draws.
        refine: ``all`` (every rollout can be spliced) or ``failed`` (only rollouts the task's
            verifier fails; needs ``fused: false``).
        fused: revise while sampling, in one decode (default: when ``refine`` is ``all``); false:
            two-pass, which also logs the fail->pass statistics of the finished ``y_o``.
        lookahead: tokens the student drafts per teacher forward (speculative; 1: every token).
    """

    def __init__(
        self,
        criterion: Literal["teacher_prob", "teacher_top_p"] = "teacher_prob",
        threshold: float = 0.05,
        teacher_top_p: float = 0.9,
        student_top_p: float = 0.95,
        temperature: float = 1.0,
        max_new_tokens: int | None = None,
        fallback: Literal["teacher", "student"] = "teacher",
        min_mass: float = 1e-4,
        refine: Refine = "all",
        fused: bool | None = None,
        lookahead: int = 3,
    ):
        if criterion not in ("teacher_prob", "teacher_top_p"):
            raise ValueError(f"unknown criterion {criterion!r}; choose 'teacher_prob' or 'teacher_top_p'")
        if fallback not in ("teacher", "student"):
            raise ValueError(f"unknown fallback {fallback!r}; choose 'teacher' or 'student'")
        if refine not in ("all", "failed"):
            raise ValueError(f"unknown refine mode {refine!r}; choose 'all' or 'failed'")
        for name, value in (("threshold", threshold), ("teacher_top_p", teacher_top_p), ("student_top_p", student_top_p)):
            if not 0 < value <= 1:
                raise ValueError(f"{name} must be in (0, 1], got {value}")
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        if max_new_tokens is not None and max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1 (or null for the module's sampling budget), got {max_new_tokens}")
        if not 0 <= min_mass <= 1:
            raise ValueError(f"min_mass is a probability mass and must be in [0, 1], got {min_mass}")
        if not isinstance(lookahead, int) or lookahead < 1:
            raise ValueError(f"lookahead must be an integer >= 1 (tokens drafted per teacher forward), got {lookahead!r}")
        if fused and refine == "failed":
            raise ValueError(
                "fused=True revises while the rollout is sampled, before y_o is finished, so it cannot verify y_o "
                "for refine='failed'; use fused=False (two-pass) with refine='failed', or refine='all'"
            )
        self.criterion, self.threshold = criterion, threshold
        self.teacher_top_p, self.student_top_p = teacher_top_p, student_top_p
        self.temperature, self.max_new_tokens = temperature, max_new_tokens
        self.fallback, self.min_mass, self.refine = fallback, min_mass, refine
        self.fused = refine == "all" if fused is None else fused
        self.lookahead = lookahead

    def setup(self, module) -> None:
        # Sharded multi-process training (FSDP2, HSDP) needs no check here: the decode gathers the
        # weights once or runs rank-synchronised rounds (trd_lightning.splice_decode).
        if self.fused:
            Proposer(module.sampling.generate_kwargs(), module.stop_ids)  # refuses what it cannot honour

    # --- the two decisions, shared by both forms ------------------------------------------------
    def disowned(self, teacher_logp: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """Whether the teacher disowns each token: the t* rule (`trd_lightning.diagnostics.disowned`)."""
        return disowned(teacher_logp, tokens, self.criterion, self.threshold, self.teacher_top_p)

    def first_failure(self, teacher_logits: torch.Tensor, tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """``t*`` per row (``-1`` where no position fails), vectorised over the batch."""
        failed = self.disowned(teacher_logits.float().log_softmax(-1), tokens) & mask.bool()
        first = failed.float().argmax(-1)
        return torch.where(failed.any(-1), first, torch.full_like(first, -1))

    def _budget(self, module) -> int:
        return self.max_new_tokens or module.sampling.max_new_tokens

    # --- fused: sample and revise in one decode -------------------------------------------------
    def sample_revised(self, module, problems: list) -> Rollout:
        """Sample ``y_r`` directly from the current student, revising each row at its ``t*``."""
        start = time.perf_counter()
        task, tok, device = module.task, module.tokenizer, module.device
        limit, sampling = module.max_prompt_length, module.sampling
        student_prompts = [task.student_prompt(p) for p in problems]
        teacher_prompts = [module.teacher_prompt(p) for p in problems]
        s_ids, s_mask = encode_prompts(tok, student_prompts, device, limit)
        same_prompt = teacher_prompts == student_prompts
        t_ids, t_mask = (s_ids, s_mask) if same_prompt else encode_prompts(tok, teacher_prompts, device, limit)
        propose = Proposer(sampling.generate_kwargs(), module.stop_ids)
        remaining = torch.full((len(problems),), self._budget(module), device=device)
        minimum = torch.full_like(remaining, propose.min_new_tokens)
        decode = SpliceDecode(self, module, s_ids, s_mask, t_ids, t_mask, remaining, minimum, propose)
        block, mask, teacher_logits, t_star, empty, stats = decode.run()
        student_ctx = Context.joined(s_ids, s_mask, block, mask)
        teacher_ctx = student_ctx if same_prompt else Context.joined(t_ids, t_mask, block, mask)
        lengths = mask.sum(-1)
        revised = t_star >= 0
        # Positions drawn from the restricted distribution: t* and after, up to each row's end.
        revised_positions = (torch.arange(block.shape[1], device=device) >= t_star.unsqueeze(1)) & revised.unsqueeze(1) & mask
        correct = torch.tensor(decode_and_verify(task, tok, problems, (block, mask))[1], dtype=torch.float)
        logged = {
            "fraction_revised": revised.float().mean().item(),
            "t_star": t_star[revised].float().mean().item() if bool(revised.any()) else float("nan"),
            "accuracy_after": correct.mean().item(),
            "length_after": lengths.float().mean().item(),
            "fallback_rate": _fallback_rate(empty, revised_positions),
            "teacher_forwards": stats["rounds"],
            "lookahead_acceptance": stats["accepted"] / max(stats["drafted"], 1),
            "revision_tokens": int((lengths - t_star).clamp(min=0)[revised].sum()),
        }
        return Rollout(
            list(problems), block, mask, student_ctx, teacher_ctx, teacher_logits=teacher_logits, fused=True,
            t_star=t_star.cpu(), stats=logged, decode_steps=block.shape[1], seconds=time.perf_counter() - start,
        )

    def restricted_target(self, t_logits, t_logp, support, student_w, early_eos=None):
        """The restricted target ``p`` (unnormalised) and where its set was empty (the fallback drew
        instead). ``early_eos``: where EOS is not allowed yet; the teacher's distribution is taken
        without it (``support`` and ``student_w`` come without it already)."""
        if self.temperature == 1.0 and early_eos is None:
            q_teacher = t_logp.exp()
        else:
            scaled = t_logits.float() / self.temperature
            q_teacher = (scaled if early_eos is None else scaled.masked_fill(early_eos, float("-inf"))).softmax(-1)
        restricted = q_teacher * support
        empty = restricted.sum(-1) < self.min_mass
        fallback = q_teacher if self.fallback == "teacher" else student_w
        return torch.where(empty.unsqueeze(-1), fallback, restricted), empty

    # --- two-pass: revise a finished rollout ----------------------------------------------------
    def revise(self, module, rollout: Rollout) -> Rollout:
        task, tok = module.task, module.tokenizer
        teacher_logits = module.score(rollout.teacher, role="teacher")
        t_star = self.first_failure(teacher_logits, rollout.response_ids, rollout.response_mask)
        originals = rows(rollout)
        if self.refine == "failed":
            ok = torch.tensor(decode_and_verify(task, tok, rollout.problems, originals)[1], device=t_star.device)
            t_star = torch.where(ok, torch.full_like(t_star, -1), t_star)
        new = list(originals)
        # The loss needs the teacher's logits along y_r: the kept prefix's come from the scoring
        # above, the continuation's from the decode below (same context c, same positions).
        logit_rows = [teacher_logits[i, : len(r)] for i, r in enumerate(originals)]
        picked = (t_star >= 0).nonzero().flatten().tolist()
        fallback_rate = 0.0
        if picked:
            idx = torch.tensor(picked, device=rollout.response_ids.device)
            keep = [originals[i][: int(t_star[i])] for i in picked]
            # y_r gets the same length budget as a rollout: the continuation fills what t* left.
            remaining = self._budget(module) - t_star[idx]
            # min_new_tokens counts from the response's start: the kept prefix has drawn t* of them.
            minimum = (module.sampling.min_new_tokens - t_star[idx]).clamp(min=0)
            cont, cont_logits, fallback_rate = self._continue(module, rollout, idx, keep, remaining, minimum)
            for j, i in enumerate(picked):
                t = int(t_star[i])
                new[i] = torch.cat([keep[j], cont[j]])
                logit_rows[i] = torch.cat([teacher_logits[i, :t], cont_logits[j, : len(cont[j])]])
        else:  # nothing to continue here; sharded ranks that have something need this one's gathers
            SpliceDecode.join(self, module)
        revised_rows = (t_star >= 0).cpu()
        stats = revision_stats(module, rollout, revised_rows, t_star.cpu(), new)
        stats["fallback_rate"] = fallback_rate
        stats["revision_tokens"] = sum(len(new[i]) - int(t_star[i]) for i in picked)
        revised = assemble_rollout(
            module, rollout.problems, new, [module.teacher_prompt(p) for p in rollout.problems], stats, t_star=t_star.cpu()
        )
        return revised.replace(teacher_logits=_right_pad_rows(logit_rows, revised.response_ids.shape[1]))

    def _continue(
        self, module, rollout: Rollout, idx: torch.Tensor, keep: list[torch.Tensor], remaining: torch.Tensor, minimum: torch.Tensor
    ):
        """Decode the continuations of the selected rows (both models, batched), from their kept prefixes.

        ``remaining``, ``minimum``: each row's token budget and its tokens before EOS. Returns the
        continuations (EOS included where one was drawn within budget), the teacher's logits
        before each of their tokens ([rows, steps, V]) and the fallback rate.
        """
        pad = module.tokenizer.pad_token_id
        t_ctx = _prefix_context(rollout.teacher, idx, keep, pad)
        s_ctx = _prefix_context(rollout.student, idx, keep, pad)
        decode = SpliceDecode(
            self, module, s_ctx.input_ids, s_ctx.attention_mask, t_ctx.input_ids, t_ctx.attention_mask, remaining, minimum, None
        )
        block, mask, teacher_logits, _, empty, _ = decode.run()
        return [r[m] for r, m in zip(block, mask)], teacher_logits, _fallback_rate(empty, mask)


def _prefix_context(ctx: Context, idx: torch.Tensor, keep: list[torch.Tensor], pad: int) -> Context:
    """Rows ``idx`` of ``ctx`` cut to ``[prompt | kept prefix]``, re-left-padded to one width."""
    seqs = []
    for j, i in enumerate(idx.tolist()):
        prompt = ctx.input_ids[i, : ctx.prompt_width][ctx.attention_mask[i, : ctx.prompt_width].bool()]
        seqs.append(torch.cat([prompt, keep[j]]))
    ids, mask = left_pad(seqs, pad, ctx.input_ids.device)
    return Context(ids, mask, ids.shape[1])


def _fallback_rate(empty: torch.Tensor, revised_positions: torch.Tensor) -> float:
    """Share of the restricted draws whose support was empty (drawn by the fallback instead)."""
    return float((empty & revised_positions).sum()) / max(float(revised_positions.sum()), 1.0)


def _right_pad_rows(rows: list[torch.Tensor], width: int) -> torch.Tensor:
    """Per-row ``[n_i, V]`` tensors stacked to ``[B, width, V]`` (zeros after each row's end)."""
    first = rows[0]
    out = first.new_zeros((len(rows), width, first.shape[-1]))
    for i, r in enumerate(rows):
        out[i, : len(r)] = r
    return out

