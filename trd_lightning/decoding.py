"""Hand-driven KV-cache decoding, for loops where two models take turns token by token.

`generate` drives one model. Token-level revision needs the student's *and* the teacher's
next-token distribution at every step (the teacher decides whether a token is disowned and what
replaces it, the student's top-p set bounds the replacement), so it steps both models itself. The
student's own proposals are still drawn with transformers' logits processors, built from the same
`Sampling.generate_kwargs()` that `generate` receives, so a proposal is distributed exactly as a
`generate` sample would be.
"""

from __future__ import annotations

import dataclasses

import torch
from transformers import (
    LogitsProcessorList,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)
from transformers.modeling_outputs import CausalLMOutputWithPast

# transformers 5 renamed the KV-cache argument of `forward` from past_key_values to cache.
_CACHE_KW = "cache" if "cache" in {f.name for f in dataclasses.fields(CausalLMOutputWithPast)} else "past_key_values"

# The generate keywords a hand-driven proposal honours; anything else is refused, not ignored.
_HANDLED = {"do_sample", "temperature", "top_p", "top_k", "max_new_tokens", "min_new_tokens"}


def model_step(model, ids: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor, cache, keep: int = 1):
    """One forward of ``ids`` [B, n] with the KV cache; returns the logits of the last ``keep``
    positions ([B, keep, V], model dtype) and the cache."""
    out = model(
        input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True, logits_to_keep=keep, **{_CACHE_KW: cache}
    )
    return out.logits[:, -keep:], getattr(out, _CACHE_KW)


class Proposer:
    """Draws a next token from raw logits as ``generate(**generate_kwargs)`` would.

    Same rules, in generate's order: ``min_new_tokens`` (EOS masked), then temperature, top-k,
    top-p (transformers' own warpers); greedy when ``do_sample`` is false. ``min_new_tokens`` is
    counted per row, because rows of a speculative decode advance at different rates.

    Args:
        generate_kwargs: `Sampling.generate_kwargs` (options it does not implement are refused).
        eos_token_id: the id, or ids, that end a response.
    """

    def __init__(self, generate_kwargs: dict, eos_token_id):
        unknown = set(generate_kwargs) - _HANDLED
        if unknown:
            raise ValueError(
                f"token-level revision samples the student's proposals itself and does not implement the generate "
                f"options {sorted(unknown)}; drop them from the sampling settings, or use the two-pass reviser (fused=False)"
            )
        self.greedy = not generate_kwargs.get("do_sample", False)
        self.min_new_tokens = generate_kwargs.get("min_new_tokens") or 0
        self.eos = [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id or [])
        self._eos_mask: torch.Tensor | None = None  # [V] bool, built on first use (V is known then)
        warpers = LogitsProcessorList()
        if not self.greedy:
            if generate_kwargs.get("temperature", 1.0) != 1.0:
                warpers.append(TemperatureLogitsWarper(generate_kwargs["temperature"]))
            if generate_kwargs.get("top_k"):
                warpers.append(TopKLogitsWarper(generate_kwargs["top_k"]))
            if generate_kwargs.get("top_p", 1.0) < 1.0:
                warpers.append(TopPLogitsWarper(generate_kwargs["top_p"]))
        self.warpers = warpers

    def scores(self, logits: torch.Tensor, generated: torch.Tensor) -> torch.Tensor:
        """Processed scores [B, V]; ``generated``: tokens each row has drawn so far [B]."""
        scores = logits.float()
        if self.min_new_tokens and self.eos:
            if self._eos_mask is None or self._eos_mask.shape[0] != scores.shape[-1]:
                self._eos_mask = torch.zeros(scores.shape[-1], dtype=torch.bool, device=scores.device)
                self._eos_mask[self.eos] = True
            early = (generated < self.min_new_tokens).unsqueeze(-1)
            scores = scores.masked_fill(early & self._eos_mask, float("-inf"))
        # The warpers read only the scores; generate would pass the ids so far.
        return self.warpers(None, scores) if self.warpers else scores

    def __call__(self, logits: torch.Tensor, generated: torch.Tensor) -> torch.Tensor:
        scores = self.scores(logits, generated)
        if self.greedy:
            return scores.argmax(-1)
        return torch.multinomial(scores.softmax(-1), 1).squeeze(-1)


def top_p_support(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """Boolean mask of the smallest set of most likely tokens whose mass reaches ``top_p`` (at
    least one), from probabilities: the student's support of a restricted draw."""
    sorted_p, order = probs.sort(-1, descending=True)
    # Keep a token while the mass *before* it is below top_p: the first token always (0 < top_p).
    keep_sorted = (sorted_p.cumsum(-1) - sorted_p) < top_p
    return torch.empty_like(keep_sorted).scatter_(-1, order, keep_sorted)
