"""LoRA for the student through peft, from YAML: ``student_lora: {r: 64, lora_alpha: 128, ...}``.

The keys are `peft.LoraConfig` arguments. With LoRA only the adapter weights train, so only they
go to the optimizer and into checkpoints (the base weights are reloaded from the student's path);
see `DistillationModule.state_dict`.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch


def _linear_leaf_names(model: torch.nn.Module) -> list[str]:
    """Short names of the model's linear layers: what ``target_modules`` can name."""
    return sorted({name.rsplit(".", 1)[-1] for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)})


def apply_lora(model: torch.nn.Module, config: dict[str, Any]) -> torch.nn.Module:
    """Wrap ``model`` in a peft LoRA model; base weights frozen, adapters trainable.

    The result is a ``PeftModel``: ``student.save_pretrained(dir)`` exports the adapter alone.
    """
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError as err:
        raise ImportError(
            f"student_lora needs peft, which is not installed ({err}); "
            "install it with `pip install peft` (or `pip install -e '.[scale]'`), or drop student_lora"
        ) from None
    config = dict(config)
    config.setdefault("task_type", "CAUSAL_LM")
    fields = {f.name for f in dataclasses.fields(LoraConfig)}
    unknown = sorted(set(config) - fields)
    if unknown:
        raise ValueError(
            f"unknown student_lora keys {unknown}; they must be peft.LoraConfig arguments, "
            "e.g. r, lora_alpha, lora_dropout, target_modules"
        )
    target = config.get("target_modules")
    if target is not None and target != "all-linear":
        names = [target] if isinstance(target, str) else list(target)
        available = _linear_leaf_names(model)
        missing = [n for n in names if n not in available]
        if missing:
            raise ValueError(
                f"student_lora target_modules {missing} are not layers of the student "
                f"({type(model).__name__}); its linear layers are {available}, or use 'all-linear'"
            )
    return get_peft_model(model, LoraConfig(**config))


def trainable_parameter_names(model: torch.nn.Module) -> set[str]:
    """Names of trainable parameters as they appear in ``state_dict`` (wrapper prefixes removed)."""
    return {_state_dict_name(n) for n, p in model.named_parameters() if p.requires_grad}


def _state_dict_name(name: str) -> str:
    # Activation-checkpoint wrappers hide themselves from state_dict keys but not from
    # named_parameters; match what the checkpoint holds.
    return name.replace("_checkpoint_wrapped_module.", "")


def is_lora(model: torch.nn.Module | None) -> bool:
    return model is not None and hasattr(model, "peft_config")
