"""Rollouts: sampling responses with the KV cache, and laying them out for scoring.

Layout: every context is ``[left-padded prompt | response block]``. Because prompts are left-padded
to a common width, the response block starts at the same column in every row, so the logits that
predict the response are one slice ``[:, P-1 : P+N-1]`` for the student and the teacher alike, even
though their prompts differ (``x`` versus ``c``). No gather, no per-row Python loop.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from types import MappingProxyType
from typing import Any

import torch
from transformers import PreTrainedTokenizerBase


@dataclass
class Sampling:
    """How rollouts are sampled (temperature 0 means greedy).

    Args:
        temperature: softmax temperature of every draw; 0 samples greedily.
        top_p: nucleus sampling: draw from the smallest set holding this much probability (1: off).
        top_k: draw from the ``top_k`` most likely tokens (0: off).
        max_new_tokens: the response budget: a response without EOS is cut here (and masked as is).
        min_new_tokens: EOS is not drawn before this many tokens (0: off); it binds a revision's
            restricted draws too, counted from the response's start.
    """

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    max_new_tokens: int = 48
    min_new_tokens: int = 0

    def __post_init__(self):
        if self.max_new_tokens <= 0:
            raise ValueError(f"max_new_tokens must be > 0, got {self.max_new_tokens}")
        if not 0 <= self.min_new_tokens <= self.max_new_tokens:
            raise ValueError(
                f"min_new_tokens must be in [0, max_new_tokens={self.max_new_tokens}], got {self.min_new_tokens}"
            )
        if not math.isfinite(self.temperature):
            raise ValueError(f"temperature must be a finite number >= 0 (0 is greedy), got {self.temperature}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 disables it), got {self.top_k}")

    def generate_kwargs(self) -> dict[str, Any]:
        # min_new_tokens only when set: generate then runs exactly as without the field.
        minimum = {"min_new_tokens": self.min_new_tokens} if self.min_new_tokens else {}
        if self.temperature == 0:
            return {"do_sample": False, "max_new_tokens": self.max_new_tokens, **minimum}
        return {
            "do_sample": True,
            "temperature": self.temperature,
            "top_p": self.top_p,
            "top_k": self.top_k or None,
            "max_new_tokens": self.max_new_tokens,
            **minimum,
        }


@dataclass
class Context:
    """One role's view of a batch: ``input_ids = [left-padded prompt (width P) | response block]``."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    prompt_width: int

    @classmethod
    def joined(cls, prompt_ids, prompt_mask, response_ids, response_mask) -> Context:
        """``[prompt | response]``, with the prompt's width recorded."""
        return cls(
            input_ids=torch.cat([prompt_ids, response_ids], 1),
            attention_mask=torch.cat([prompt_mask, response_mask.long()], 1),
            prompt_width=prompt_ids.shape[1],
        )

    @property
    def position_ids(self) -> torch.Tensor:
        return positions_from_mask(self.attention_mask)


def positions_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Position ids that count real tokens only, so left padding never shifts a token's position."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


@dataclass
class Rollout:
    """Responses to a batch of problems and the contexts under which each role scores them.

    Args:
        problems: the task's problem records, one per row.
        response_ids: ``[B, N]`` response tokens, pad after the end of each response.
        response_mask: ``[B, N]`` bool: response tokens up to and including the stop token.
        student: the student's context ``[x | response]``.
        teacher: the teacher's context ``[c | response]`` (``c_r`` for a rewrite).
        teacher_logits: ``[B, N, V]`` teacher logits along the response block, when whoever built
            the rollout already computed them (a reviser's decode); the loss then skips its own
            teacher forward. `replace` drops them whenever the tokens or the teacher context change.
        seconds: wall-clock seconds spent sampling it (fused: sampling and revising together).
        fused: sampled and revised in one decode (`PrefixSpliceReviser.sample_revised`).
        original: the unrevised rollout ``y_o`` this one revises (two-pass revision only).
        t_star: per row, where the revision starts (``-1``: row not revised).
        stats: the revision statistics `TrajectoryRevision` logs under ``revision/`` (numbers only).
        decode_steps: positions the fused decode ran over (rows that ended early ride along).
    """

    problems: list
    response_ids: torch.Tensor
    response_mask: torch.Tensor
    student: Context
    teacher: Context
    teacher_logits: torch.Tensor | None = None
    seconds: float | None = None
    fused: bool = False
    original: Rollout | None = None
    t_star: torch.Tensor | None = None
    stats: dict[str, float] = field(default_factory=dict)
    decode_steps: int | None = None

    @property
    def lengths(self) -> torch.Tensor:
        return self.response_mask.sum(-1)

    @property
    def info(self) -> Mapping[str, Any]:
        """Read-only view of the typed fields under their former ``info`` keys (``stats`` flattened
        in), for readers written against the old side channel; write to the fields instead."""
        view: dict[str, Any] = dict(self.stats)
        for key, value in (("seconds", self.seconds), ("original", self.original), ("t_star_rows", self.t_star), ("decode_steps", self.decode_steps)):
            if value is not None:
                view[key] = value
        if self.fused:
            view["fused"] = True
        return MappingProxyType(view)

    def replace(self, **changes) -> Rollout:
        if {"response_ids", "response_mask", "teacher"} & changes.keys() and "teacher_logits" not in changes:
            changes["teacher_logits"] = None  # stale: they belong to the old tokens or context
        return replace(self, **changes)


def make_rollout_from_rows(
    tokenizer: PreTrainedTokenizerBase,
    problems: list,
    responses: list[torch.Tensor],
    student_prompts: list[str],
    teacher_prompts: list[str],
    *,
    max_prompt_length: int | None = None,
    device: torch.device | str = "cpu",
    **fields: Any,
) -> Rollout:
    """A `Rollout` from per-row responses (1-D, EOS included) and per-row prompts.

    The one place a rollout is laid out from rows (revisers, baselines, audits). ``max_prompt_length``
    bounds the student's prompts; the teacher's are checked where they are made (``c_r`` against
    the reviser's budget, the plain ones against ``max_prompt_length`` before the run).
    ``fields``: the typed fields of `Rollout` (``stats``, ``t_star``, ``teacher_logits``, ...).
    """
    width = max(1, max((len(r) for r in responses), default=0))
    device = responses[0].device if responses else device
    lengths = torch.tensor([len(r) for r in responses], device=device)
    # One masked write (True cells enumerate row by row, as the rows are concatenated).
    mask = torch.arange(width, device=device) < lengths.unsqueeze(1)
    ids = torch.full((len(responses), width), tokenizer.pad_token_id, dtype=torch.long, device=device)
    if responses and int(lengths.sum()):
        ids[mask] = torch.cat(responses).to(device=device, dtype=torch.long)
    student = build_context(tokenizer, student_prompts, ids, mask, max_prompt_length)
    teacher = build_context(tokenizer, teacher_prompts, ids, mask)
    return Rollout(list(problems), ids, mask, student, teacher, **fields)


class PromptTooLongError(ValueError):
    """A prompt does not fit its token budget. Prompts are never cut: cutting from the left removes
    the problem statement (or, in a teacher's context, the reference); cutting from the right removes
    the answer marker the response must follow."""


def encode_prompts(
    tokenizer: PreTrainedTokenizerBase, prompts: list[str], device: torch.device | str, max_length: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded prompt ids; a prompt over ``max_length`` tokens is refused, never cut.

    `DistillationModule` checks every prompt of the run's splits against its budget before any
    compute (``setup``); this is the safety net for prompts that check did not see.
    """
    enc = tokenizer(prompts, add_special_tokens=False)["input_ids"]
    if not all(enc):
        raise ValueError("empty prompt: every prompt must encode to at least one token")
    if max_length is not None:
        over = [len(ids) for ids in enc if len(ids) > max_length]
        if over:
            raise PromptTooLongError(
                f"{len(over)} of {len(enc)} prompts in this batch exceed max_prompt_length={max_length} tokens "
                f"(longest {max(over)}); prompts are never cut, since that would remove the problem or the reference: "
                "raise max_prompt_length (within the models' positions) or remove the longest problems from the data"
            )
    # One tensor for the whole batch (a tensor per row costs more than the tokenizer here).
    return left_pad([torch.tensor([t for row in enc for t in row])], tokenizer.pad_token_id, device, [len(r) for r in enc])


def left_pad(
    rows: list[torch.Tensor], pad: int, device: torch.device | str, lengths: list[int] | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack 1-D token rows right-aligned (left padding), with their attention mask.

    ``lengths`` says that ``rows`` is already concatenated (one tensor holding every row in order).
    One masked write fills the batch: a boolean mask enumerates its True cells row by row, left to
    right, which is the order of the concatenated rows.
    """
    lengths = [len(r) for r in rows] if lengths is None else lengths
    width = max(lengths)
    n = torch.tensor(lengths, device=device)
    mask = torch.arange(width, device=device) >= (width - n).unsqueeze(1)
    ids = torch.full((len(lengths), width), pad, dtype=torch.long, device=device)
    if sum(lengths):
        ids[mask] = torch.cat(list(rows)).to(device=device, dtype=torch.long)
    return ids, mask.long()


def stop_token_ids(model: torch.nn.Module | None, tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """Every id that ends a response: the model's ``generation_config.eos_token_id`` (one id or a
    list) and the tokenizer's EOS.

    Real checkpoints often ship a tokenizer whose EOS is ``<|endoftext|>`` while chat turns end in
    ``<|im_end|>``, with both listed in ``generation_config``: plain ``generate`` stops at either, so
    rollouts, the splice decode and the response masks must too, or the text after the end of the
    turn is sampled and trained on.
    """
    ids: list[int] = []
    config = getattr(model, "generation_config", None)
    configured = getattr(config, "eos_token_id", None)
    for value in ([configured] if isinstance(configured, int) else list(configured or [])) + [tokenizer.eos_token_id]:
        if value is not None and int(value) not in ids:
            ids.append(int(value))
    if not ids:
        raise ValueError(
            "neither the model's generation_config nor its tokenizer names an EOS token, so a response could never end; "
            "set generation_config.eos_token_id (or the tokenizer's eos_token) and save the model again"
        )
    return ids


def response_mask_from_ids(response_ids: torch.Tensor, eos_token_id: int | list[int]) -> torch.Tensor:
    """True up to and including the first stop token of each row (the whole row if none)."""
    eos = torch.tensor(eos_token_id if isinstance(eos_token_id, list) else [eos_token_id], device=response_ids.device)
    is_eos = torch.isin(response_ids, eos).long()
    ended_before = is_eos.cumsum(-1) - is_eos  # EOS tokens strictly before each position
    return ended_before == 0


@contextmanager
def eval_mode(*models: torch.nn.Module | None) -> Iterator[None]:
    """Every given model in eval mode inside the block, each submodule's own mode restored after.

    Rollouts are sampled, and a teacher role scores, with dropout off: the policy that samples is
    the one that is evaluated, and a target is not noised. The training forward that follows runs
    in the mode the caller had set (train mode for the update).
    """
    saved = [(m, m.training) for model in models if model is not None for m in model.modules()]
    for model in models:
        if model is not None:
            model.eval()
    try:
        yield
    finally:
        for m, training in saved:
            m.training = training


@torch.no_grad()
def sample_responses(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    prompt_ids: torch.Tensor,
    prompt_mask: torch.Tensor,
    sampling: Sampling,
    *,
    num_return_sequences: int = 1,
    synced_gpus: bool = False,
    return_logits: bool = False,
    stop_ids: list[int] | None = None,
    **extra: Any,
) -> tuple[torch.Tensor, ...]:
    """Sample with ``generate`` (KV cache on); returns the response block and its mask, trimmed.

    ``stop_ids``: the ids that end a response (default: `stop_token_ids` of ``model``); generate
    stops at any of them and the mask ends at the first one.

    ``return_logits``: also return the model's raw logits before each response token ([B, N, V],
    aligned with the block), which generate computes anyway: a caller that would score the
    response with the same model under the same prompt gets them without another forward.
    """
    if num_return_sequences > 1 and sampling.temperature == 0:
        # generate refuses several greedy sequences per prompt; repeating the prompts gives the
        # same (identical) samples, row-aligned as num_return_sequences would be.
        prompt_ids = prompt_ids.repeat_interleave(num_return_sequences, 0)
        prompt_mask = prompt_mask.repeat_interleave(num_return_sequences, 0)
        num_return_sequences = 1
    stop_ids = stop_token_ids(model, tokenizer) if stop_ids is None else stop_ids
    # inference_mode (cheaper per op than no_grad) except under multi-process training, where
    # sharded parameters are gathered inside generate. The student's training forward takes the
    # sampled ids as input, so what is returned must be normal tensors: the out-of-place ops below
    # run outside inference mode and make them (no clone needed).
    with torch.inference_mode(not synced_gpus), eval_mode(model):
        out = model.generate(
            input_ids=prompt_ids,
            attention_mask=prompt_mask,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=stop_ids,
            use_cache=True,
            num_return_sequences=num_return_sequences,
            synced_gpus=synced_gpus,
            **({"return_dict_in_generate": True, "output_logits": True} if return_logits else {}),
            **sampling.generate_kwargs(),
            **extra,
        )
    sequences = out.sequences if return_logits else out
    response = sequences[:, prompt_ids.shape[1]:]
    mask = response_mask_from_ids(response, stop_ids)
    width = int(mask.sum(-1).max().clamp(min=1))
    response, mask = response[:, :width], mask[:, :width]
    response = response.masked_fill(~mask, tokenizer.pad_token_id)
    if return_logits:
        return response, mask, torch.stack(out.logits, 1)[:, :width]
    return response, mask


def build_context(
    tokenizer: PreTrainedTokenizerBase,
    prompts: list[str],
    response_ids: torch.Tensor,
    response_mask: torch.Tensor,
    max_prompt_length: int | None = None,
) -> Context:
    prompt_ids, prompt_mask = encode_prompts(tokenizer, prompts, response_ids.device, max_prompt_length)
    return Context.joined(prompt_ids, prompt_mask, response_ids, response_mask)


def response_logits(model: torch.nn.Module, context: Context) -> torch.Tensor:
    """Logits predicting each response token: ``[B, N, V]``, aligned with the response block.

    ``logits_to_keep`` skips the LM head on prompt positions (a long teacher context costs no
    vocabulary projection).
    """
    n = context.input_ids.shape[1] - context.prompt_width
    out = model(
        input_ids=context.input_ids,
        attention_mask=context.attention_mask,
        position_ids=context.position_ids,
        logits_to_keep=n + 1,
        use_cache=False,
    )
    return out.logits[:, :-1]


def decode_responses(tokenizer: PreTrainedTokenizerBase, response_ids: torch.Tensor, response_mask: torch.Tensor) -> list[str]:
    rows = [ids[m].tolist() for ids, m in zip(response_ids, response_mask)]
    return tokenizer.batch_decode(rows, skip_special_tokens=True)


def decode_and_verify(task, tokenizer: PreTrainedTokenizerBase, problems: list, responses) -> tuple[list[str], list[bool]]:
    """Each response's text (special tokens dropped) and the task's verdict on it (``task.verify``).

    ``responses``: a `Rollout`, an ``(ids, mask)`` pair of ``[B, N]`` tensors, or per-row 1-D
    token tensors (EOS included, no padding).
    """
    if isinstance(responses, Rollout):
        texts = decode_responses(tokenizer, responses.response_ids, responses.response_mask)
    elif isinstance(responses, tuple):
        texts = decode_responses(tokenizer, *responses)
    else:
        texts = tokenizer.batch_decode([r.tolist() for r in responses], skip_special_tokens=True)
    return texts, [bool(task.verify(p, t)) for p, t in zip(problems, texts)]
