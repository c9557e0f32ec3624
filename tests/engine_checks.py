"""Checks shared by the engine tests (`test_engines.py`, and `test_engines_vllm.py` in the vLLM venv)."""

from __future__ import annotations

import torch

from trd_lightning.engines.base import sampling_law
from trd_lightning.rollout import Sampling, encode_prompts


def first_token_law_gap(engine, model, tokenizer, prompt: str, sampling: Sampling, n: int, seed: int = 0) -> tuple[float, float]:
    """Total variation between the engine's empirical first-token distribution (``n`` samples of one
    prompt) and `sampling_law` of the model's logits; and the gap a correct sampler would show
    at this ``n`` (about sqrt(V / n), the bound the caller compares with)."""
    ids, mask = encode_prompts(tokenizer, [prompt], "cpu")
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask).logits[0, -1]
    law = sampling_law(logits, sampling)
    torch.manual_seed(seed)
    out, _ = engine.generate(model, tokenizer, ids, mask, Sampling(**{**vars(sampling), "max_new_tokens": 1}), num_return_sequences=n)
    counts = torch.bincount(out[:, 0], minlength=law.numel()).float()
    tv = 0.5 * (counts / n - law).abs().sum().item()
    support = int((law > 0).sum())
    return tv, (support / n) ** 0.5


def hf_continuation_logprobs(model, sequences: list[list[int]], start: int) -> torch.Tensor:
    """Hugging Face's log-probability of each token of ``sequences[i][start:]`` (one length)."""
    ids = torch.tensor(sequences)
    with torch.no_grad():
        logp = model(input_ids=ids).logits[:, :-1].float().log_softmax(-1)
    return logp.gather(-1, ids[:, 1:].unsqueeze(-1)).squeeze(-1)[:, start - 1:]
