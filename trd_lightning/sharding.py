"""FSDP2 sharding of the student (and of an EMA teacher) through Lightning's `ModelParallelStrategy`.

Why FSDP2 (``torch.distributed.fsdp.fully_shard``) and not Lightning's ``FSDPStrategy`` (FSDP1):
FSDP1 wraps the whole LightningModule, so the frozen teacher would land in the student's flat
parameters, gradient hooks and checkpoints. FSDP2 is applied per model inside
``LightningModule.configure_model``, so the student and the teacher get separate sharding roots
and separate settings (see `trd_lightning.callbacks.TeacherSharding`). FSDP2 also runs on CPU
(gloo), so the sharded path is the one the CPU tests exercise, and the same code runs on GPUs.

YAML (``configs/fsdp.yaml``)::

    trainer:
      strategy:
        class_path: trd_lightning.sharding.FSDP2Strategy
        init_args: {decoder_layers: [Qwen3DecoderLayer], activation_checkpointing: true,
                    mixed_precision: bf16, sharding_strategy: FULL_SHARD, state_dict_type: sharded}

Decoder-layer classes are given by name and resolved against the model at ``configure_model``
(before any compute); a name the model does not have is an error listing the model's classes.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta
from functools import partial
from pathlib import Path
from typing import Literal

import torch
from lightning.pytorch.strategies import ModelParallelStrategy

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
#: FSDP1 names mapped onto FSDP2's one knob: free the gathered weights after forward or keep them
#: until backward (FSDP2 has no NO_SHARD; use DDP for that).
SHARDING_STRATEGIES = {"FULL_SHARD": True, "SHARD_GRAD_OP": False}


# --- resolving decoder layers ---------------------------------------------------------------
def inner_model(model: torch.nn.Module) -> torch.nn.Module:
    """The module whose ``__call__`` both ``forward`` and ``generate`` go through.

    A peft ``PeftModel`` forwards through its base model, but ``generate`` bypasses the wrapper's
    ``__call__``; FSDP's root hooks must sit on the base model so both paths gather the weights.
    """
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


def module_class_names(model: torch.nn.Module) -> list[str]:
    return sorted({type(m).__name__ for m in model.modules()})


def default_layer_names(model: torch.nn.Module) -> list[str]:
    """A Hugging Face model names its transformer block in ``_no_split_modules``."""
    names = list(getattr(inner_model(model), "_no_split_modules", None) or [])
    present = set(module_class_names(model))
    return [n for n in names if n in present]


def resolve_layer_classes(model: torch.nn.Module, names: list[str] | None, role: str = "student") -> tuple[type, ...]:
    """Module classes of ``model`` called ``names`` (default: its Hugging Face decoder layer)."""
    if names is None:
        names = default_layer_names(model)
        if not names:
            raise ValueError(
                f"cannot tell the decoder layer of the {role} ({type(model).__name__}); set "
                f"decoder_layers to one of its module classes: {module_class_names(model)}"
            )
    if isinstance(names, str):
        names = [names]
    by_name = {type(m).__name__: type(m) for m in model.modules()}
    missing = [n for n in names if n not in by_name]
    if missing:
        raise ValueError(
            f"decoder_layers {missing} not found in the {role} ({type(model).__name__}); its module classes are "
            f"{module_class_names(model)}. Name the class of one transformer block (e.g. Qwen3DecoderLayer)"
        )
    return tuple(by_name[n] for n in names)


# --- the plan and applying it ---------------------------------------------------------------
@dataclass
class ShardingPlan:
    """How one model is sharded (the YAML keys of `FSDP2Strategy`)."""

    decoder_layers: list[str] | None = None
    activation_checkpointing: bool = False
    mixed_precision: str | None = None
    sharding_strategy: str = "FULL_SHARD"
    cpu_offload: bool = False

    def __post_init__(self):
        if self.mixed_precision is not None and self.mixed_precision not in DTYPES:
            raise ValueError(f"mixed_precision must be one of {sorted(DTYPES)} or null, got {self.mixed_precision!r}")
        if self.sharding_strategy not in SHARDING_STRATEGIES:
            raise ValueError(
                f"sharding_strategy must be one of {sorted(SHARDING_STRATEGIES)} with FSDP2, got "
                f"{self.sharding_strategy!r} (for no sharding use strategy: ddp)"
            )


def is_sharded(model: torch.nn.Module | None) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return model is not None and isinstance(inner_model(model), FSDPModule)


def _apply_activation_checkpointing(model: torch.nn.Module, classes: tuple[type, ...]) -> None:
    # Non-reentrant torch checkpointing rather than Hugging Face's gradient_checkpointing_enable:
    # the latter turns the KV cache off whenever the model is in train mode, and rollouts are
    # generated from the student in train mode.
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import (
        CheckpointImpl,
        apply_activation_checkpointing,
        checkpoint_wrapper,
    )

    apply_activation_checkpointing(
        model,
        checkpoint_wrapper_fn=partial(checkpoint_wrapper, checkpoint_impl=CheckpointImpl.NO_REENTRANT),
        check_fn=lambda m: isinstance(m, classes),
    )


def _blocks(model: torch.nn.Module, classes: tuple[type, ...]) -> list[torch.nn.Module]:
    """The decoder layers, or their checkpoint wrappers when activation checkpointing is on."""
    blocks = []
    for m in model.modules():
        wrapped = getattr(m, "_checkpoint_wrapped_module", None)
        if wrapped is not None and isinstance(wrapped, classes):
            blocks.append(m)
        elif isinstance(m, classes) and not any(getattr(b, "_checkpoint_wrapped_module", None) is m for b in blocks):
            blocks.append(m)
    return blocks


def shard_model(model: torch.nn.Module, plan: ShardingPlan, mesh, *, role: str = "student") -> torch.nn.Module:
    """``fully_shard`` each decoder layer, then the model (the root holds embeddings and head)."""
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard

    root = inner_model(model)
    classes = resolve_layer_classes(root, plan.decoder_layers, role)
    if plan.activation_checkpointing:
        _apply_activation_checkpointing(root, classes)
    dtype = DTYPES[plan.mixed_precision] if plan.mixed_precision else None
    # Gradients are reduced in fp32 whatever the compute dtype: bf16 sums over ranks lose bits.
    mp = MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32 if dtype is not None else None)
    kwargs = dict(
        mesh=mesh,
        reshard_after_forward=SHARDING_STRATEGIES[plan.sharding_strategy],
        mp_policy=mp,
        offload_policy=CPUOffloadPolicy() if plan.cpu_offload else OffloadPolicy(),
    )
    blocks = _blocks(root, classes)
    for block in blocks:
        fully_shard(block, **kwargs)
    fully_shard(root, **kwargs)
    return model


def _data_parallel_mesh(strategy: ModelParallelStrategy):
    mesh = strategy.device_mesh
    if mesh["tensor_parallel"].size() > 1:
        raise NotImplementedError(
            f"tensor parallelism (tensor_parallel_size={mesh['tensor_parallel'].size()}) is not implemented for "
            "distillation; use trd_lightning.sharding.FSDP2Strategy (data-parallel FSDP2 only)"
        )
    return mesh["data_parallel"]


def configure_sharding(module) -> None:
    """Called from ``DistillationModule.configure_model``: shard under a ModelParallelStrategy.

    Idempotent (Lightning calls ``configure_model`` again for ``test`` after ``fit``). The frozen
    teacher is left to `TeacherSharding` (own bf16 shards, or replicated); an EMA teacher is
    sharded exactly like the student because the EMA update pairs their local shards.
    """
    from lightning.pytorch.strategies import FSDPStrategy

    strategy = module.trainer.strategy
    if isinstance(strategy, FSDPStrategy):
        raise ValueError(
            "strategy 'fsdp' (FSDP1) would wrap the frozen teacher together with the student; use "
            "trd_lightning.sharding.FSDP2Strategy instead (trd fit -c <run>.yaml -c configs/fsdp.yaml)"
        )
    if not isinstance(strategy, ModelParallelStrategy):
        return
    plan = strategy.plan if isinstance(strategy, FSDP2Strategy) else ShardingPlan()
    mesh = _data_parallel_mesh(strategy)
    if not is_sharded(module.student):
        shard_model(module.student, plan, mesh)
    teacher = getattr(module, "teacher", None)
    ema = getattr(module, "mode", None) == "opsd" and getattr(module, "opsd_teacher", None) == "ema"
    if ema and teacher is not None and not is_sharded(teacher):
        shard_model(teacher, ShardingPlan(plan.decoder_layers, False, plan.mixed_precision, plan.sharding_strategy), mesh, role="teacher")


# --- the strategy ---------------------------------------------------------------------------
class FSDP2Strategy(ModelParallelStrategy):
    """Lightning's `ModelParallelStrategy` as pure data-parallel FSDP2, configured from YAML.

    Args:
        decoder_layers: class names of the transformer block to shard (and checkpoint) one by one;
            default: the model's Hugging Face ``_no_split_modules``.
        activation_checkpointing: recompute each decoder layer's activations in backward.
        mixed_precision: ``bf16`` / ``fp16``: the dtype the gathered weights compute in (the
            sharded master weights stay in their load dtype; gradients reduce in fp32).
        sharding_strategy: ``FULL_SHARD`` (free gathered weights after forward) or
            ``SHARD_GRAD_OP`` (keep them until backward: faster, more memory).
        state_dict_type: ``sharded`` (one file per rank, a folder) or ``full`` (gathered on rank 0
            into one file). Either way only the student's trainable weights are saved.
        cpu_offload: keep the sharded parameters and optimizer state in CPU memory.
        data_parallel_size: ``auto`` = every process.
    """

    def __init__(
        self,
        decoder_layers: list[str] | None = None,
        activation_checkpointing: bool = False,
        mixed_precision: Literal["bf16", "fp16", "fp32"] | None = None,
        sharding_strategy: Literal["FULL_SHARD", "SHARD_GRAD_OP"] = "FULL_SHARD",
        state_dict_type: Literal["full", "sharded"] = "sharded",
        cpu_offload: bool = False,
        data_parallel_size: Literal["auto"] | int = "auto",
        process_group_backend: str | None = None,
        timeout: timedelta | None = timedelta(minutes=30),
    ) -> None:
        if state_dict_type not in ("full", "sharded"):
            raise ValueError(f"state_dict_type must be 'full' or 'sharded', got {state_dict_type!r}")
        self.plan = ShardingPlan(decoder_layers, activation_checkpointing, mixed_precision, sharding_strategy, cpu_offload)
        self.state_dict_type = state_dict_type
        super().__init__(
            data_parallel_size=data_parallel_size,
            tensor_parallel_size=1,
            save_distributed_checkpoint=state_dict_type == "sharded",
            process_group_backend=process_group_backend,
            timeout=timeout,
        )

    def load_checkpoint(self, checkpoint_path, weights_only: bool | None = None):
        """Resume from a ``full`` (single-file) checkpoint that leaves out what is rebuilt from paths.

        Lightning's FSDP2 loader checks every model parameter against the file, but the module's
        checkpoints leave out the frozen teacher (and, with LoRA, the frozen base). Check the keys
        the module says it saves, then load without Lightning's all-parameters check. Sharded
        checkpoints need nothing: they are loaded through the module's own state_dict.
        """
        path = Path(self.broadcast(checkpoint_path))
        module = self.lightning_module
        if not path.is_file() or not module.strict_loading:
            return super().load_checkpoint(checkpoint_path, weights_only)
        expected = set(module.state_dict())
        saved = set(torch.load(path, mmap=True, map_location="cpu", weights_only=False)["state_dict"])
        if expected != saved:
            missing, unexpected = sorted(expected - saved), sorted(saved - expected)
            raise RuntimeError(
                f"checkpoint {str(path)!r} does not match the model: missing {missing[:5]}, unexpected "
                f"{unexpected[:5]}; was it written for a different student or config (LoRA on/off)?"
            )
        module.strict_loading = False
        try:
            return super().load_checkpoint(checkpoint_path, weights_only)
        finally:
            module.strict_loading = True

    def setup_environment(self) -> None:
        # ModelParallelStrategy's "auto" means one data-parallel group per node (tensor parallel
        # inside); pure FSDP wants every process in the data-parallel group.
        if self._data_parallel_size == "auto":
            self._data_parallel_size = self.num_processes * self.num_nodes
        super().setup_environment()
