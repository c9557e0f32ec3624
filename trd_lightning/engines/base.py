"""`RolloutEngine`: what samples responses for rollouts, rewrites and Pass@k.

An engine turns left-padded prompt ids into a response block laid out as `sample_responses` lays
it out (``[B * n, N]`` ids, pad after each response's first stop id, and the boolean mask up to and
including that stop id), so everything downstream (contexts, scoring, losses) is the same whoever
sampled. Engines differ only in *how* they decode: Hugging Face ``generate`` (`HFEngine`, the
default), transformers' continuous batching (`HFContinuousEngine`), or vLLM (`VLLMEngine`).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, ClassVar

import torch
from transformers import PreTrainedTokenizerBase

from trd_lightning.rollout import Sampling, response_mask_from_ids


class RolloutEngine(ABC):
    """Samples ``num_return_sequences`` responses per prompt from ``model``'s *current* weights.

    Subclasses register under ``name`` (the YAML value of ``model.init_args.rollout_engine``).
    ``check`` runs in the module's ``__init__`` (before any compute) and refuses what the engine
    cannot do; ``generate`` has `trd_lightning.rollout.sample_responses`'s signature and returns
    ``(ids, mask)``, or ``(ids, mask, logprobs)`` with ``return_logprobs``: the model's raw
    (untempered) log-probability of each sampled token, 0 at padding.
    """

    name: ClassVar[str]
    #: ``generate(..., return_logits=True)`` gives the full logits along the response (only
    #: ``generate`` computes them anyway; other engines would need a second forward).
    returns_logits: ClassVar[bool] = False

    def check(self, model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, sampling: Sampling) -> None:
        """Refuse, before compute, a model or sampling this engine cannot serve."""

    @abstractmethod
    def generate(
        self,
        model: torch.nn.Module,
        tokenizer: PreTrainedTokenizerBase,
        prompt_ids: torch.Tensor,
        prompt_mask: torch.Tensor,
        sampling: Sampling,
        *,
        num_return_sequences: int = 1,
        synced_gpus: bool = False,
        stop_ids: list[int] | None = None,
        return_logprobs: bool = False,
        **extra: Any,
    ) -> tuple[torch.Tensor, ...]: ...

    def close(self) -> None:
        """Free what the engine holds (a vLLM engine and its KV cache)."""


def prompt_rows(prompt_ids: torch.Tensor, prompt_mask: torch.Tensor) -> list[list[int]]:
    """Left-padded prompts back to unpadded token lists (what request-based engines take)."""
    return [ids[m.bool()].tolist() for ids, m in zip(prompt_ids, prompt_mask)]


def response_block(
    rows: list[list[int]],
    pad_token_id: int,
    stop_ids: list[int],
    device: torch.device | str,
    logprobs: list[list[float]] | None = None,
) -> tuple[torch.Tensor, ...]:
    """Token lists to the response block `sample_responses` returns: right-padded, masked up to
    and including the first stop id, trimmed to the longest response (at least one column)."""
    width = max(1, max((len(r) for r in rows), default=0))
    ids = torch.full((len(rows), width), pad_token_id, dtype=torch.long)
    lp = torch.zeros((len(rows), width))
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r, dtype=torch.long)
        if logprobs is not None:
            lp[i, : len(r)] = torch.tensor(logprobs[i][: len(r)], dtype=torch.float)
    lengths = torch.tensor([len(r) for r in rows])
    mask = response_mask_from_ids(ids, stop_ids) & (torch.arange(width) < lengths.unsqueeze(1))
    keep = int(mask.sum(-1).max().clamp(min=1)) if len(rows) else 1
    ids, mask, lp = ids[:, :keep], mask[:, :keep], lp[:, :keep]
    ids = ids.masked_fill(~mask, pad_token_id).to(device)
    mask = mask.to(device)
    return (ids, mask, lp.masked_fill(~mask.cpu(), 0.0).to(device)) if logprobs is not None else (ids, mask)


def sampling_law(logits: torch.Tensor, sampling: Sampling) -> torch.Tensor:
    """The distribution a correct sampler draws from, from raw logits ``[..., V]``: softmax at the
    temperature, then top-k, then the smallest top-p set (ties broken as sorted), renormalised.

    Written out by hand, independently of ``generate``'s processors and of any engine, so the
    tests and `benchmarks/rollout_engines.py` can check each engine's empirical law against it.
    """
    if sampling.temperature == 0:
        return torch.nn.functional.one_hot(logits.argmax(-1), logits.shape[-1]).float()
    probs = (logits.float() / sampling.temperature).softmax(-1)
    sorted_p, order = probs.sort(-1, descending=True)
    keep = torch.ones_like(sorted_p, dtype=torch.bool)
    if sampling.top_k:
        keep[..., sampling.top_k:] = False
    renorm = sorted_p * keep
    renorm = renorm / renorm.sum(-1, keepdim=True)
    before = renorm.cumsum(-1) - renorm  # mass strictly above each token
    keep &= before < sampling.top_p
    law = torch.zeros_like(probs).scatter(-1, order, sorted_p * keep)
    return law / law.sum(-1, keepdim=True)
