"""Hugging Face engines: ``generate`` (the default) and transformers' continuous batching."""

from __future__ import annotations

from typing import Any

import torch
from transformers import ContinuousBatchingConfig, GenerationConfig, PreTrainedTokenizerBase

from trd_lightning.engines.base import RolloutEngine, prompt_rows, response_block
from trd_lightning.rollout import Sampling, eval_mode, sample_responses, stop_token_ids


def _token_logprobs(logits: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Raw log-probability of each token of a response block (0 at padding)."""
    lp = logits.float().log_softmax(-1).gather(-1, ids.unsqueeze(-1)).squeeze(-1)
    return lp.masked_fill(~mask, 0.0)


class HFEngine(RolloutEngine):
    """``model.generate`` with the KV cache: `trd_lightning.rollout.sample_responses`, unchanged.

    The default, and the only engine that also hands back the logits along the response
    (``return_logits=True``), which the rewrite reviser reuses as the teacher's logits.

    Args:
        (none: the sampling settings come with each ``generate`` call)
    """

    name = "hf"
    returns_logits = True

    def generate(self, model, tokenizer, prompt_ids, prompt_mask, sampling, *, num_return_sequences=1,
                 synced_gpus=False, stop_ids=None, return_logprobs=False, return_logits=False, **extra):
        out = sample_responses(
            model, tokenizer, prompt_ids, prompt_mask, sampling, num_return_sequences=num_return_sequences,
            synced_gpus=synced_gpus, return_logits=return_logits or return_logprobs, stop_ids=stop_ids, **extra,
        )
        if not return_logprobs:
            return out if return_logits else out[:2]
        ids, mask, logits = out
        lp = _token_logprobs(logits, ids, mask)
        return (ids, mask, lp, logits) if return_logits else (ids, mask, lp)


class HFContinuousEngine(RolloutEngine):
    """transformers' continuous batching (``model.generate_batch``, `ContinuousBatchingManager`).

    Requests are scheduled by tokens, finished ones leave the batch and new ones join, with a
    paged KV cache. Its sampler is the same law as ``generate``'s (temperature, then top-k, then
    top-p, then a multinomial draw; checked against the softmax in `benchmarks/rollout_engines.py`
    and the tests) but a different random stream: it reseeds torch's global generator from a draw
    of it, so runs are reproducible under ``torch.manual_seed`` but do not repeat ``hf``'s samples.
    Measured on this 2-core CPU it is much slower than ``generate`` (docs/performance.md); it is
    here for GPUs, where it is built to pay off, and it is exercised by the same tests.

    Args:
        config: `transformers.ContinuousBatchingConfig` arguments (``max_batch_tokens``,
            ``num_blocks``, ``page_size``...).
    """

    name = "hf_continuous"

    def __init__(self, config: dict[str, Any] | None = None):
        self.config = dict(config or {})

    def check(self, model, tokenizer, sampling: Sampling) -> None:
        if not hasattr(model, "generate_batch"):
            raise ValueError(
                f"rollout_engine='hf_continuous' needs transformers' continuous batching (model.generate_batch, "
                f"transformers >= 5); {type(model).__name__} has none: upgrade transformers or use rollout_engine='hf'"
            )
        unsupported = sorted(set(sampling.generate_kwargs()) - {"do_sample", "temperature", "top_p", "top_k", "max_new_tokens"})
        if unsupported:
            raise ValueError(
                f"rollout_engine='hf_continuous' cannot honour sampling options {unsupported} "
                "(continuous batching applies temperature, top-k and top-p only); use rollout_engine='hf'"
            )
        ContinuousBatchingConfig(**self.config)  # a misspelled key fails here, not at the first rollout

    @staticmethod
    def _sized(rows: list[list[int]], n: int, sampling: Sampling) -> dict[str, int]:
        """A paged cache sized for this call's requests. Left to itself the manager sizes the
        cache from free memory (gigabytes on a CPU host), and allocating it took longer than the
        decode here (26 s against 2.4 s for 64 rows); ``config`` overrides these."""
        longest = max(len(r) for r in rows) + sampling.max_new_tokens
        page = min(256, 1 << (longest - 1).bit_length())  # one page per request when it fits
        return {
            "page_size": page,
            "num_blocks": len(rows) * n * -(-longest // page) + 1,
            "max_batch_tokens": min(max(sum(len(r) for r in rows) * n, 256), 2048),  # its buffers grow with it
        }

    def generate(self, model, tokenizer, prompt_ids, prompt_mask, sampling, *, num_return_sequences=1,
                 synced_gpus=False, stop_ids=None, return_logprobs=False, **extra):
        if synced_gpus:
            raise NotImplementedError("rollout_engine='hf_continuous' does not run sharded (synced_gpus); use 'hf' or 'vllm'")
        if extra:
            raise TypeError(f"rollout_engine='hf_continuous' does not take {sorted(extra)}")
        stop_ids = stop_token_ids(model, tokenizer) if stop_ids is None else stop_ids
        rows = prompt_rows(prompt_ids, prompt_mask)
        kwargs = sampling.generate_kwargs()
        if return_logprobs and kwargs["do_sample"] and (sampling.temperature != 1 or sampling.top_p < 1 or sampling.top_k):
            # Its logprobs are those of the tempered, truncated distribution, not the model's.
            raise ValueError(
                "rollout_engine='hf_continuous' returns log-probabilities after temperature/top-k/top-p, not the "
                "model's raw ones the other engines return; sample at temperature 1 without truncation, or use 'hf'"
            )
        if not kwargs["do_sample"]:
            # As in sample_responses: several greedy samples per prompt are the same sample repeated.
            rows = [r for r in rows for _ in range(num_return_sequences)]
            num_return_sequences = 1
        kwargs = {k: v for k, v in kwargs.items() if v is not None}
        config = GenerationConfig(
            **kwargs, num_return_sequences=num_return_sequences, eos_token_id=list(stop_ids),
            pad_token_id=tokenizer.pad_token_id,
        )
        cb_config = ContinuousBatchingConfig(**{"return_logprobs": return_logprobs, **self._sized(rows, num_return_sequences, sampling), **self.config})
        # Sampled with dropout off, like generate; the worker thread takes the caller's inference mode.
        with torch.inference_mode(), eval_mode(model):
            results = model.generate_batch(
                rows, generation_config=config, continuous_batching_config=cb_config, progress_bar=False, warmup=False
            )
        outputs = list(results.values())
        if len(outputs) != len(rows) * num_return_sequences or any(o.error is not None for o in outputs):
            errors = sorted({str(o.error) for o in outputs if o.error is not None})
            raise RuntimeError(
                f"continuous batching returned {len(outputs)} of {len(rows) * num_return_sequences} responses"
                + (f" (errors: {errors})" if errors else "") + "; use rollout_engine='hf'"
            )
        tokens = [list(o.generated_tokens) for o in outputs]
        logprobs = [list(o.logprobs) for o in outputs] if return_logprobs else None
        return response_block(tokens, tokenizer.pad_token_id, stop_ids, prompt_ids.device, logprobs)
