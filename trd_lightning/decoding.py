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
    MinNewTokensLengthLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)
from transformers.modeling_outputs import CausalLMOutputWithPast

# transformers 5 renamed the KV-cache argument of `forward` from past_key_values to cache.
CACHE_KW = "cache" if "cache" in {f.name for f in dataclasses.fields(CausalLMOutputWithPast)} else "past_key_values"

# The generate keywords a hand-driven proposal honours; anything else is refused, not ignored.
_HANDLED = {"do_sample", "temperature", "top_p", "top_k", "max_new_tokens", "min_new_tokens"}


def model_step(model, ids: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor, cache):
    """One forward with the KV cache; returns the last position's logits (model dtype) and the cache."""
    out = model(
        input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True, logits_to_keep=1, **{CACHE_KW: cache}
    )
    return out.logits[:, -1], getattr(out, CACHE_KW)


class Proposer:
    """Draws a next token from raw logits as ``generate(**generate_kwargs)`` would.

    Same processors, in generate's order: ``min_new_tokens`` (EOS masked), then temperature,
    top-k, top-p; greedy when ``do_sample`` is false.
    """

    def __init__(self, generate_kwargs: dict, prompt_width: int, eos_token_id, device):
        unknown = set(generate_kwargs) - _HANDLED
        if unknown:
            raise ValueError(
                f"token-level revision samples the student's proposals itself and does not implement the generate "
                f"options {sorted(unknown)}; drop them from the sampling settings, or use the two-pass reviser (fused=False)"
            )
        self.greedy = not generate_kwargs.get("do_sample", False)
        processors = LogitsProcessorList()
        if generate_kwargs.get("min_new_tokens"):
            processors.append(
                MinNewTokensLengthLogitsProcessor(prompt_width, generate_kwargs["min_new_tokens"], eos_token_id, device=device)
            )
        if not self.greedy:
            if generate_kwargs.get("temperature", 1.0) != 1.0:
                processors.append(TemperatureLogitsWarper(generate_kwargs["temperature"]))
            if generate_kwargs.get("top_k"):
                processors.append(TopKLogitsWarper(generate_kwargs["top_k"]))
            if generate_kwargs.get("top_p", 1.0) < 1.0:
                processors.append(TopPLogitsWarper(generate_kwargs["top_p"]))
        self.processors = processors

    def __call__(self, ids_so_far: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        """``ids_so_far``: [B, prompt width + tokens drawn so far] (only its length is read)."""
        scores = self.processors(ids_so_far, logits.float())
        if self.greedy:
            return scores.argmax(-1)
        return torch.multinomial(scores.softmax(-1), 1).squeeze(-1)
