"""The prefix-splice reviser's decode: student and teacher together, batched and speculative.

Token-level revision needs the teacher's verdict on each token before the row goes on. Asking
the teacher one token at a time costs one teacher step per token; here the student drafts
``lookahead`` tokens per row (KV-cache steps) and the teacher scores them all in one forward.
Per row, in order:

* while the row is *proposing* (fused form, before ``t*``), a draft is kept while the teacher
  does not disown it; the first disowned one is replaced by a draw from ``p`` and the row starts
  revising (that position is ``t*``);
* while the row is *revising*, ``p`` is the teacher restricted to the student's top-p set and a
  draft, drawn from ``q`` (the student restricted to that set), is kept with probability
  ``min(1, p/q)``; the first rejected one is replaced by a draw from ``max(0, p - q)``. This is
  speculative sampling (Leviathan et al., 2023): every token has exactly the law of a direct
  draw from ``p``.

After a rejection the row's remaining drafts are dropped. Their cache slots stay in both KV
caches but are masked out, so rows advance at their own rate, each with its own positions,
and the caches need no surgery. Once a quarter of the batch has finished, those rows leave the
batch and both caches (the forwards get cheaper as rollouts end).

Under FSDP2 every forward is a collective. With the weights gathered once for the decode
(`trd_lightning.sharding.rollout_weights`, ``rollout_gather: once`` / ``auto``) forwards are
local and each rank decodes on its own. Otherwise the ranks run rank-synchronised rounds, as
generate's ``synced_gpus`` does: once per round they agree (one all-reduce) on the round's
draft length (the largest over ranks; 0: every rank is done); a rank that drafts fewer, or has
finished, runs the missing forwards of each sharded model on a one-token dummy row without a
cache, so its own rows, caches and random draws are exactly those of a single-process decode.
"""

from __future__ import annotations

import dataclasses

import torch

from trd_lightning.decoding import Proposer, model_step, top_p_support
from trd_lightning.rollout import eval_mode, positions_from_mask
from trd_lightning.sharding import is_sharded, rollout_weights


def _no_grad(*models):
    """``inference_mode``, or ``no_grad`` where a model is FSDP-sharded."""
    if any(is_sharded(m) for m in models):
        return torch.no_grad()
    return torch.inference_mode()


@dataclasses.dataclass
class _Rows:
    """Per-row state of the rows still in the batch."""

    orig: torch.Tensor  # the output row each one writes to
    s_mask: torch.Tensor  # attention masks over [prompt but its last token | slots]
    t_mask: torch.Tensor
    s_pos: torch.Tensor  # position of the pending token (the next input; neither cache has it)
    t_pos: torch.Tensor
    s_pending: torch.Tensor
    t_pending: torch.Tensor
    length: torch.Tensor  # tokens emitted
    remaining: torch.Tensor  # token budget
    minimum: torch.Tensor  # tokens before EOS is allowed
    t_star: torch.Tensor
    revising: torch.Tensor
    done: torch.Tensor

    def select(self, keep: torch.Tensor) -> _Rows:
        return _Rows(**{f.name: getattr(self, f.name)[keep] for f in dataclasses.fields(self)})


class SpliceDecode:
    """One decode of a batch for `PrefixSpliceReviser` (the module docstring says how).

    ``propose``: draw the student's proposals (fused form); ``None``: every row revises from its
    first token (the two-pass continuation). ``remaining``: each row's token budget; ``minimum``:
    how many tokens each row draws before EOS is allowed (the rollout's ``min_new_tokens``, which
    binds the restricted draws as it binds generate).

    Args:
        reviser: the `PrefixSpliceReviser` whose rules (t*, restricted target, lookahead) apply.
        module: the `RolloutModel` whose student and teacher decode.
        s_ids / s_mask / t_ids / t_mask: the left-padded student and teacher prompts.
        remaining / minimum: per row, the token budget and the tokens before EOS is allowed.
        propose: the student's proposals (fused form) or ``None`` (two-pass continuation).
    """

    # Finished rows leave the batch once this share of it has finished.
    COMPACT_AT = 0.25

    def __init__(self, reviser, module, s_ids, s_mask, t_ids, t_mask, remaining, minimum, propose: Proposer | None):
        self.reviser, self.propose, self.module = reviser, propose, module
        self.tok = module.tokenizer
        self.stop_ids = torch.tensor(module.stop_ids, device=s_ids.device)  # every id that ends a row
        self.student, self.teacher = module.model_for("student"), module.model_for("teacher")
        self.prompts = s_ids, s_mask, t_ids, t_mask
        self.remaining, self.minimum = remaining, minimum
        self.device = s_ids.device
        self.n, self.budget, self.k_max = len(remaining), int(remaining.max()), reviser.lookahead
        self.arange_k = torch.arange(self.k_max, device=self.device)
        self.stats = {"rounds": 0, "drafted": 0, "accepted": 0}

    # --- the loop ---------------------------------------------------------------------------
    def run(self):
        """Returns the block (pad after each row's end), its mask, the teacher logits before each
        token, ``t*`` per row (``-1``: never revised), where the restricted set was empty, and
        decode statistics; all normal tensors."""
        # inference_mode skips autograd's bookkeeping on every small op; the outputs leave it
        # through out-of-place ops, which give normal tensors. Not with sharded models: FSDP would
        # allocate the gathered weights as inference tensors, which training then cannot refill.
        with (
            rollout_weights(self.module, ("student", "teacher")) as local,
            _no_grad(self.student, self.teacher),
            eval_mode(self.student, self.teacher),
        ):
            self._synced_with(local)
            self._start()
            live = True
            while True:
                k = min(self.k_max, self.left) if live else 0
                k_all = self._agree(k)
                if k_all == 0:
                    break
                if k == 0:  # this rank is done, others are not: keep their forwards company
                    self._idle_round(k_all)
                    continue
                self._set_slots(k, (~self.rows.done).long().unsqueeze(1))
                early = self._early(k) if self.any_early else None
                drafts, q_w = self._draft(k, early)
                self._idle_forwards(self.student, k_all - k)
                t_logits = self._score(drafts, k)
                out, first, emit, empty, switched = self._judge(drafts, q_w, t_logits, k, early)
                drafted, kept = self._commit(out, first, emit, empty, switched, t_logits, k)
                live = not self._sync(drafted, kept)
                if live:
                    self._compact()
            self.length_out[self.rows.orig], self.t_star_out[self.rows.orig] = self.rows.length, self.rows.t_star
        width = int(self.length_out.max())
        mask = torch.arange(width, device=self.device) < self.length_out.unsqueeze(1)
        block = self.ids[:, :width].masked_fill(~mask, self.tok.pad_token_id)
        return block, mask, self.teacher_logits[:, :width], self.t_star_out.clone(), self.empties[:, :width], self.stats

    @classmethod
    def join(cls, reviser, module) -> None:
        """Take part in the other ranks' decode with no rows of one's own (the two-pass form on a
        rank where no rollout failed): the same gathers, or the same forwards on dummy rows."""
        self = cls.__new__(cls)
        self.module, self.k_max = module, reviser.lookahead
        self.student, self.teacher = module.model_for("student"), module.model_for("teacher")
        self.device = module.device
        self.stats = {"rounds": 0, "drafted": 0, "accepted": 0}
        with (
            rollout_weights(module, ("student", "teacher")) as local,
            _no_grad(self.student, self.teacher),
            eval_mode(self.student, self.teacher),
        ):
            self._synced_with(local)
            if not self.synced:
                return
            self._idle_forwards(self.student, 1)  # the prefills
            self._idle_forwards(self.teacher, 1)
            while (k_all := self._agree(0)) > 0:
                self._idle_round(k_all)

    # --- keeping sharded ranks in step ------------------------------------------------------
    def _synced_with(self, local: bool) -> None:
        """Whether rounds must be agreed over ranks: some model is sharded and gathers per forward."""
        import torch.distributed as dist

        distributed = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
        self.sharded = {id(m): is_sharded(m) for m in (self.student, self.teacher)}
        self.synced = distributed and not local and any(self.sharded.values())
        self.stats["synced_rounds"] = 0

    def _agree(self, k: int) -> int:
        """The round's draft length over all ranks (the largest; 0: all done). One all-reduce."""
        if not self.synced:
            return k
        import torch.distributed as dist

        t = torch.tensor([k], device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        self.stats["synced_rounds"] += 1
        return int(t.item())

    def _idle_forwards(self, model, count: int) -> None:
        """``count`` forwards of ``model`` on a one-token dummy row, with no cache: only their
        collectives matter (they pair with another rank's real forwards). Unsharded models skip."""
        if count <= 0 or not self.synced or not self.sharded[id(model)]:
            return
        one = torch.ones(1, 1, dtype=torch.long, device=self.device)
        for _ in range(count):
            model_step(model, one, one, one - 1, None)

    def _idle_round(self, k_all: int) -> None:
        self._idle_forwards(self.student, k_all)
        self._idle_forwards(self.teacher, 1)

    def _start(self) -> None:
        """Prefill both caches and lay out the state. The last prompt token is not prefilled: it
        is the first input of round one, so every round starts the same way."""
        s_ids, s_mask, t_ids, t_mask = self.prompts
        n, device = self.n, self.device
        self.s_cache = self.t_cache = None
        if s_ids.shape[1] > 1:
            _, self.s_cache = model_step(self.student, s_ids[:, :-1], s_mask[:, :-1], positions_from_mask(s_mask[:, :-1]), None)
        else:  # another rank may prefill: its gathers need a partner
            self._idle_forwards(self.student, 1)
        if t_ids.shape[1] > 1:
            _, self.t_cache = model_step(self.teacher, t_ids[:, :-1], t_mask[:, :-1], positions_from_mask(t_mask[:, :-1]), None)
        else:
            self._idle_forwards(self.teacher, 1)
        # Cache slots after the prompt, preallocated: every round adds k per row, and a live row
        # emits at least one token per round, so budget * k slots always suffice.
        slots = s_mask.new_zeros(n, self.budget * self.k_max)
        self.s_width, self.t_width, self.used = s_ids.shape[1] - 1, t_ids.shape[1] - 1, 0
        revising = self.propose is None
        self.rows = _Rows(
            orig=torch.arange(n, device=device),
            s_mask=torch.cat([s_mask[:, :-1], slots], 1),
            t_mask=torch.cat([t_mask[:, :-1], slots], 1),
            s_pos=positions_from_mask(s_mask)[:, -1],
            t_pos=positions_from_mask(t_mask)[:, -1],
            s_pending=s_ids[:, -1],
            t_pending=t_ids[:, -1],
            length=torch.zeros(n, dtype=torch.long, device=device),
            remaining=self.remaining,
            minimum=self.minimum,
            t_star=torch.full((n,), 0 if revising else -1, dtype=torch.long, device=device),
            revising=torch.full((n,), revising, dtype=torch.bool, device=device),
            done=torch.zeros(n, dtype=torch.bool, device=device),
        )
        # Outputs, written at each row's own offset; k spare columns take the drafts a round
        # writes past a row's end. Zeros, not empty: positions past a row's end stay finite.
        self.ids = s_ids.new_full((n, self.budget + self.k_max), self.tok.pad_token_id)
        self.empties = torch.zeros((n, self.budget + self.k_max), dtype=torch.bool, device=device)
        self.teacher_logits = None  # [n, budget + k, V], made at the first teacher forward
        self.length_out = torch.zeros(n, dtype=torch.long, device=device)
        self.t_star_out = self.rows.t_star.clone()
        self.eos_vocab = None  # [V] bool, made once V is known
        # Host-side flags, refreshed by one sync per round.
        self.any_proposing, self.any_revising, self.left = not revising, revising, self.budget
        self.any_early = bool((self.minimum > 0).any())

    # --- one round --------------------------------------------------------------------------
    def _set_slots(self, k: int, values: torch.Tensor) -> None:
        rows, used = self.rows, self.used
        rows.s_mask[:, self.s_width + used : self.s_width + used + k] = values
        rows.t_mask[:, self.t_width + used : self.t_width + used + k] = values

    def _early(self, k: int) -> torch.Tensor:
        """[rows, k]: the draft positions where a row has not drawn its minimum yet (no EOS there)."""
        rows = self.rows
        return (rows.length.unsqueeze(1) + self.arange_k[:k]) < rows.minimum.unsqueeze(1)

    def _student_q(self, logits: torch.Tensor, early_eos: torch.Tensor | None) -> torch.Tensor:
        """``q``, unnormalised: the student restricted to its top-p set. As generate's
        min_new_tokens: EOS goes first, then the top-p set is taken."""
        logits = logits.float()
        if early_eos is not None:
            logits = logits.masked_fill(early_eos, float("-inf"))
        student_p = logits.softmax(-1)
        return student_p * top_p_support(student_p, self.reviser.student_top_p)

    def _draft(self, k: int, early: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """The student's k drafts per row ([rows, k]) and ``q`` at each ([rows, k, V])."""
        rows = self.rows
        drafts, logits_seen, weights_seen = [], [], []
        token = rows.s_pending
        for j in range(k):
            logits, self.s_cache = model_step(
                self.student,
                token.unsqueeze(1),
                rows.s_mask[:, : self.s_width + self.used + j + 1],
                (rows.s_pos + j).unsqueeze(1),
                self.s_cache,
            )
            logits = logits[:, -1]
            if self.eos_vocab is None:
                self.eos_vocab = torch.zeros(logits.shape[-1], dtype=torch.bool, device=self.device)
                self.eos_vocab[self.stop_ids] = True
            if self.any_revising:
                weights_seen.append(self._student_q(logits, None if early is None else early[:, j, None] & self.eos_vocab))
                token = torch.multinomial(weights_seen[-1], 1).squeeze(-1)
            if self.any_proposing:
                proposal = self.propose(logits, rows.length + j)
                token = torch.where(rows.revising, token, proposal) if self.any_revising else proposal
            drafts.append(token)
            logits_seen.append(logits)
        if weights_seen:
            q_w = torch.stack(weights_seen, 1)
        else:  # no row was revising: q only bounds a switching row's replacement, built once
            q_w = self._student_q(torch.stack(logits_seen, 1), None if early is None else early.unsqueeze(-1) & self.eos_vocab)
        return torch.stack(drafts, 1), q_w

    def _score(self, drafts: torch.Tensor, k: int) -> torch.Tensor:
        """The teacher's logits before each draft ([rows, k, V]): one forward over k tokens."""
        rows = self.rows
        t_logits, self.t_cache = model_step(
            self.teacher,
            torch.cat([rows.t_pending.unsqueeze(1), drafts[:, :-1]], 1),
            rows.t_mask[:, : self.t_width + self.used + k],
            rows.t_pos.unsqueeze(1) + self.arange_k[:k],
            self.t_cache,
            keep=k,
        )
        if self.teacher_logits is None:
            with torch.inference_mode(False):  # a normal tensor: the loss reads it
                shape = (self.n, self.budget + self.k_max, t_logits.shape[-1])
                self.teacher_logits = torch.zeros(shape, dtype=t_logits.dtype, device=self.device)
        return t_logits

    def _judge(self, drafts, q_w, t_logits, k, early):
        """Which drafts each row keeps, and the token that replaces the first one it does not.

        Returns the row's tokens this round (drafts, the replacement at the first rejection),
        the index of that rejection (``k``: none), how many tokens the row emits (cut at EOS and
        at its budget; 0 for finished rows), where the restricted set was empty, and which rows
        started revising.
        """
        rows, reviser = self.rows, self.reviser
        row_idx = torch.arange(len(rows.done), device=self.device)
        t_logp = t_logits.float().log_softmax(-1)
        early_eos = None if early is None else early.unsqueeze(-1) & self.eos_vocab
        p_w, empty = reviser.restricted_target(t_logits, t_logp, q_w > 0, q_w, early_eos)
        if self.any_revising:  # P(keep) = min(1, p/q), without normalising [rows, k, V]
            p_d, q_d = p_w.gather(-1, drafts.unsqueeze(-1)).squeeze(-1), q_w.gather(-1, drafts.unsqueeze(-1)).squeeze(-1)
            accepted = torch.rand_like(q_d) * q_d * p_w.sum(-1) < p_d * q_w.sum(-1)
        if self.any_proposing:
            undisowned = ~reviser.disowned(t_logp, drafts)
        if self.any_revising and self.any_proposing:
            kept = torch.where(rows.revising.unsqueeze(1), accepted, undisowned)
        else:
            kept = accepted if self.any_revising else undisowned
        rejected = ~kept
        first = torch.where(rejected.any(1), rejected.int().argmax(1), torch.full_like(rows.length, k))
        at = first.clamp(max=k - 1)
        # A disowned proposal is redrawn from p; a rejected draft from the residual max(0, p - q)
        # (p itself where that is empty).
        p_at = p_w[row_idx, at]
        weights = p_at
        if self.any_revising:
            q_at = q_w[row_idx, at]
            residual = (p_at / p_at.sum(-1, keepdim=True) - q_at / q_at.sum(-1, keepdim=True)).clamp(min=0)
            weights = torch.where((rows.revising & (residual.sum(-1) > 0)).unsqueeze(1), residual, p_at)
        replaced = torch.multinomial(weights, 1).squeeze(-1)
        out = drafts.scatter(1, at.unsqueeze(1), torch.where(first < k, replaced, drafts[row_idx, at]).unsqueeze(1))
        emit = torch.where(first < k, first + 1, first)
        eos_hit = torch.isin(out, self.stop_ids) & (self.arange_k[:k] < emit.unsqueeze(1))
        emit = torch.where(eos_hit.any(1), eos_hit.int().argmax(1) + 1, emit)
        emit = torch.minimum(emit, rows.remaining - rows.length).masked_fill(rows.done, 0)
        switched = ~rows.revising & ~rows.done & (first < emit)
        return out, first, emit, empty, switched

    def _commit(self, out, first, emit, empty, switched, t_logits, k) -> tuple[torch.Tensor, torch.Tensor]:
        """Write the emitted tokens and their teacher logits, mask the dropped drafts' slots out
        of both caches, and move every row on. Returns the drafts made and kept (device scalars)."""
        rows = self.rows
        rows.t_star = torch.where(switched, rows.length + first, rows.t_star)
        # A draw from p happened at every position of a revising row and at a switching row's
        # replacement (only emitted positions are read later).
        drew = (rows.revising & ~rows.done).unsqueeze(1) | (switched.unsqueeze(1) & (self.arange_k[:k] == first.unsqueeze(1)))
        where, out_rows = rows.length.unsqueeze(1) + self.arange_k[:k], rows.orig.unsqueeze(1)
        self.ids[out_rows, where] = out
        self.empties[out_rows, where] = empty & drew
        self.teacher_logits[out_rows, where] = t_logits
        self._set_slots(k, (self.arange_k[:k] < emit.unsqueeze(1)).long())
        last = out.gather(1, (emit - 1).clamp(min=0).unsqueeze(1)).squeeze(1)
        rows.s_pending = rows.t_pending = last
        rows.s_pos, rows.t_pos = rows.s_pos + emit, rows.t_pos + emit
        self.used += k
        kept = torch.minimum(first, emit).masked_fill(rows.done, 0).sum()
        drafted = (~rows.done).sum() * k
        rows.length = rows.length + emit
        ended = (emit > 0) & torch.isin(last, self.stop_ids)
        rows.done = rows.done | ended | (rows.length >= rows.remaining)
        rows.revising = rows.revising | switched
        return drafted, kept

    def _sync(self, drafted: torch.Tensor, kept: torch.Tensor) -> bool:
        """The round's one host sync: refresh the flags; True when every row has finished."""
        rows = self.rows
        live = ~rows.done
        state = torch.stack([
            live.any(),
            (live & ~rows.revising).any(),
            (live & rows.revising).any(),
            (rows.remaining - rows.length).masked_fill(rows.done, 0).max(),
            drafted,
            kept,
            (live & (rows.length < rows.minimum)).any(),
            live.sum(),
        ]).tolist()
        any_live, self.any_proposing, self.any_revising = bool(state[0]), bool(state[1]), bool(state[2])
        self.left, self.any_early, self.live_rows = int(state[3]), bool(state[6]), int(state[7])
        self.stats["rounds"] += 1
        self.stats["drafted"] += int(state[4])
        self.stats["accepted"] += int(state[5])
        return not any_live

    def _compact(self) -> None:
        """Drop the finished rows from the batch and both caches once enough have finished."""
        rows = self.rows
        if self.live_rows > (1 - self.COMPACT_AT) * len(rows.done):
            return
        if not all(hasattr(cache, "batch_select_indices") for cache in (self.s_cache, self.t_cache)):
            return  # a cache type that cannot select rows: keep them all
        keep = (~rows.done).nonzero().squeeze(1)
        self.length_out[rows.orig], self.t_star_out[rows.orig] = rows.length, rows.t_star
        self.s_cache.batch_select_indices(keep)
        self.t_cache.batch_select_indices(keep)
        self.rows = rows.select(keep)
