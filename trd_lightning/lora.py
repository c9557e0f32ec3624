"""LoRA for the student through peft, from YAML: ``student_lora: {r: 64, lora_alpha: 128, ...}``.

The keys are `peft.LoraConfig` arguments. With LoRA only the adapter weights train, so only they
go to the optimizer and into checkpoints (the base weights are reloaded from the student's path);
see `DistillationModule.state_dict`.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch


def _adaptable_layer_types() -> tuple[type, ...]:
    # What peft's LoRA wraps: linear layers and GPT-2's Conv1D (a transposed linear; peft sets
    # fan_in_fan_out for it), plus embeddings and convolutions.
    from transformers.pytorch_utils import Conv1D

    return (torch.nn.Linear, Conv1D, torch.nn.Embedding, torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d)


def _linear_leaf_names(model: torch.nn.Module) -> list[str]:
    """Short names of the layers LoRA can adapt: what ``target_modules`` can name."""
    types = _adaptable_layer_types()
    return sorted({name.rsplit(".", 1)[-1] for name, m in model.named_modules() if isinstance(m, types)})


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
                f"({type(model).__name__}); the layers LoRA can adapt are {available}, or use 'all-linear'"
            )
    if "fan_in_fan_out" not in config and _targets_conv1d(model, target):
        # GPT-2's Conv1D stores its weight transposed; peft would flip the flag itself, with a warning.
        config["fan_in_fan_out"] = True
    return get_peft_model(model, LoraConfig(**config))


def _targets_conv1d(model: torch.nn.Module, target) -> bool:
    from transformers.pytorch_utils import Conv1D

    if target is None or target == "all-linear":
        return False
    names = {target} if isinstance(target, str) else set(target)
    return any(isinstance(m, Conv1D) and name.rsplit(".", 1)[-1] in names for name, m in model.named_modules())


def trainable_parameter_names(model: torch.nn.Module) -> set[str]:
    """Names of trainable parameters as they appear in ``state_dict`` (wrapper prefixes removed)."""
    return {_state_dict_name(n) for n, p in model.named_parameters() if p.requires_grad}


def _state_dict_name(name: str) -> str:
    # Activation-checkpoint wrappers hide themselves from state_dict keys but not from
    # named_parameters; match what the checkpoint holds.
    return name.replace("_checkpoint_wrapped_module.", "")


def is_lora(model: torch.nn.Module | None) -> bool:
    return model is not None and hasattr(model, "peft_config")
