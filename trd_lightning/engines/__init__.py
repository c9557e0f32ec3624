"""Rollout engines, chosen in YAML with ``model.init_args.rollout_engine`` (see `RolloutEngine`).

| name | what samples | notes |
|---|---|---|
| ``hf`` (default) | ``model.generate`` | also returns the logits along the response |
| ``hf_continuous`` | transformers' continuous batching (``generate_batch``) | same law, own random stream |
| ``vllm`` | a colocated ``vllm.LLM``, weights synced before each rollout after an update | optional extra |
"""

from __future__ import annotations

from typing import Any

from trd_lightning.engines.base import RolloutEngine
from trd_lightning.engines.hf import HFContinuousEngine, HFEngine
from trd_lightning.engines.vllm import VLLMEngine

ENGINES: dict[str, type[RolloutEngine]] = {cls.name: cls for cls in (HFEngine, HFContinuousEngine, VLLMEngine)}


def make_engine(name: str | RolloutEngine, kwargs: dict[str, Any] | None = None) -> RolloutEngine:
    """An engine by its YAML name (``hf``, ``hf_continuous``, ``vllm``) with its arguments."""
    if isinstance(name, RolloutEngine):
        return name
    if name not in ENGINES:
        raise ValueError(f"unknown rollout_engine {name!r}; choose one of: {', '.join(ENGINES)}")
    try:
        return ENGINES[name](**dict(kwargs or {}))
    except TypeError as err:
        raise ValueError(f"bad rollout_engine_kwargs {kwargs} for rollout_engine={name!r}: {err}") from None


__all__ = ["ENGINES", "HFContinuousEngine", "HFEngine", "RolloutEngine", "VLLMEngine", "make_engine"]
