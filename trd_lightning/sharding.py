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

HSDP: ``replicate_size: R`` (or ``nodes``) shards within groups of ``world_size / R`` processes and
replicates across groups (a 2-D mesh for ``fully_shard``). Rollouts: ``rollout_gather`` says
whether a rollout gathers the sharded weights once (`rollout_weights`) or per forward.

Decoder-layer classes are given by name and resolved against the model at ``configure_model``
(before any compute); a name the model does not have is an error listing the model's classes.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from datetime import timedelta
from functools import partial
from pathlib import Path
from typing import Literal

import torch
from lightning.pytorch.strategies import ModelParallelStrategy
from lightning.pytorch.utilities import rank_zero_info

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
#: FSDP1 names mapped onto FSDP2's one knob: free the gathered weights after forward or keep them
#: until backward (FSDP2 has no NO_SHARD; use DDP for that).
SHARDING_STRATEGIES = {"FULL_SHARD": True, "SHARD_GRAD_OP": False}
#: How a rollout gathers sharded weights: ``once`` unshards every layer before the rollout and
#: reshards after it; ``per_layer`` lets FSDP gather each layer in every forward (each token);
#: ``auto`` = ``once`` when the gathered weights take at most ``AUTO_GATHER_SHARE`` of free memory.
ROLLOUT_GATHER = ("auto", "once", "per_layer")
AUTO_GATHER_SHARE = 0.5


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
    """The mesh ``fully_shard`` gets: 1-D (FSDP), or ``replicate`` x ``shard`` (HSDP)."""
    hsdp = getattr(strategy, "hsdp_mesh", None)
    if hsdp is not None:
        return hsdp
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
    teacher = module.teacher
    if module.teacher_is_training_state and teacher is not None and not is_sharded(teacher):
        shard_model(teacher, ShardingPlan(plan.decoder_layers, False, plan.mixed_precision, plan.sharding_strategy), mesh, role="teacher")


# --- gathering the weights once per rollout ---------------------------------------------------
def _fsdp_modules(models) -> list:
    from torch.distributed.fsdp import FSDPModule

    roots, seen = [], set()
    for model in models:
        root = inner_model(model)
        if is_sharded(root) and id(root) not in seen:
            seen.add(id(root))
            roots.append(root)
    # modules() is the same order on every rank, so the all-gathers below pair up across ranks.
    return [m for root in roots for m in root.modules() if isinstance(m, FSDPModule)]


def gathered_bytes(models, compute_dtype: torch.dtype | None = None) -> int:
    """Bytes the unsharded weights of ``models`` take (``compute_dtype``: the dtype FSDP gathers
    in under mixed precision; default: each parameter's own)."""
    total, seen = 0, set()
    for model in models:
        for p in inner_model(model).parameters():
            if id(p) in seen:
                continue
            seen.add(id(p))
            dtype = compute_dtype if compute_dtype is not None and p.is_floating_point() else p.dtype
            total += p.numel() * dtype.itemsize  # a DTensor's numel() is the global one
    return total


def free_memory(device: torch.device) -> int:
    """Bytes free on ``device`` now (CUDA: the driver's count; CPU: the OS's available memory)."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    try:
        import psutil

        return int(psutil.virtual_memory().available)
    except ImportError:
        return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))


def _param_device(models) -> torch.device:
    for model in models:
        for p in model.parameters():
            return p.device
    return torch.device("cpu")


def agree_all(flag: bool, device: torch.device) -> bool:
    """True when ``flag`` is true on every rank (one all-reduce; ``flag`` as is outside a process group)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return flag
    t = torch.tensor([int(flag)], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return bool(t.item())


def _rollout_policy(module) -> tuple[str, torch.dtype | None, dict]:
    """The run's ``rollout_gather`` policy, the student's gather dtype, and where to remember the decision."""
    try:
        trainer = module.trainer
    except RuntimeError:  # LightningModule.trainer raises when the module is not attached to one
        trainer = None
    strategy = getattr(trainer, "strategy", None) if trainer is not None else None
    if strategy is not None and hasattr(strategy, "rollout_gather"):
        plan = getattr(strategy, "plan", None)
        dtype = DTYPES[plan.mixed_precision] if plan is not None and plan.mixed_precision else None
        return strategy.rollout_gather, dtype, strategy.__dict__.setdefault("_gather_decisions", {})
    # Modules outside an FSDP2Strategy (a hand-rolled loop) may set it on themselves.
    return getattr(module, "rollout_gather", "per_layer"), None, module.__dict__.setdefault("_gather_decisions", {})


@contextlib.contextmanager
def rollout_weights(module, roles=("student",)):
    """Gather the sharded weights of ``module``'s ``roles`` once around a rollout, if the policy says so.

    Yields whether forwards of these models are now local (no collective): True when none is
    sharded or all were gathered; then ranks may run different numbers of forwards (no
    ``synced_gpus``, no rank-synchronised rounds). False: FSDP gathers per forward.

    Under FSDP2 each forward all-gathers every layer and frees it again (``reshard_after_forward``),
    so a 48-token rollout gathers every layer 48 times. ``once`` all-gathers each layer one time,
    keeps the full weights for the rollout (``set_reshard_after_forward(False)``) and reshards
    after it, at the cost of holding the full (compute-dtype) weights on every rank meanwhile:
    the estimate is logged at the first rollout. The decision is agreed over ranks (all must
    gather or none) and kept for the run.
    """
    models = []
    for role in roles:
        model = module.model_for(role)
        if all(model is not m for m in models):
            models.append(model)
    fsdp = _fsdp_modules(models)
    if not fsdp:
        yield not any(is_sharded(m) for m in models)
        return
    policy, student_dtype, decisions = _rollout_policy(module)
    if policy not in ROLLOUT_GATHER:
        raise ValueError(f"rollout_gather must be one of {ROLLOUT_GATHER}, got {policy!r}")
    key = tuple(roles)
    if key not in decisions:
        decisions[key] = _decide(module, models, policy, student_dtype)
    if not decisions[key]:
        yield False
        return
    # Restored exactly afterwards: FSDP keeps the root's setting apart from the layers' (private
    # state, read because the public setter cannot report the current value).
    saved = [(m, [g.post_forward_mesh_info for g in m._get_fsdp_state()._fsdp_param_groups]) for m in fsdp]
    try:
        for m in fsdp:
            m.set_reshard_after_forward(False, recurse=False)
            m.unshard()
        yield True
    finally:
        for m, infos in saved:
            for g, info in zip(m._get_fsdp_state()._fsdp_param_groups, infos):
                g.post_forward_mesh_info = info
            m.reshard()


def _decide(module, models, policy: str, student_dtype) -> bool:
    device = _param_device(models)
    sizes = {}
    for role in ("student", "teacher"):
        model = module.model_for(role) if hasattr(module, "model_for") else None
        if model is not None and any(model is m for m in models) and is_sharded(model):
            sizes[role] = gathered_bytes([model], student_dtype if role == "student" else None)
    need = sum(sizes.values())
    free = free_memory(device)
    fits = need <= AUTO_GATHER_SHARE * free
    once = agree_all(policy == "once" or (policy == "auto" and fits), device)
    parts = ", ".join(f"{r} {b / 2**20:.1f} MiB" for r, b in sizes.items())
    how = "gather the sharded weights once" if once else "gather each layer in every forward"
    message = (
        f"rollout_gather={policy}: rollouts {how}; gathered once, the full weights take {need / 2**20:.1f} MiB per rank "
        f"({parts}), free on {device.type}: {free / 2**20:.0f} MiB"
        + (f" (auto gathers once up to {AUTO_GATHER_SHARE:.0%} of it)" if policy == "auto" else "")
    )
    if policy == "once" and not fits:
        message += " -- more than the auto limit: an out-of-memory error here means set rollout_gather: per_layer"
    rank_zero_info(message)
    return once


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
        replicate_size: HSDP: ``R`` replica groups, each sharding the models over
            ``world_size / R`` processes (a 2-D ``replicate`` x ``shard`` mesh given to
            ``fully_shard`` for the student and the teacher: gathers stay inside a group, e.g. a
            node, and only gradients cross groups); ``nodes`` = one group per node; ``1`` = FSDP.
        rollout_gather: ``auto`` (default): rollouts (generate and the splice decode) gather the
            sharded weights once and reshard after, when the full weights take at most half of
            the free memory (the estimate is logged at the first rollout); ``once``: always;
            ``per_layer``: FSDP gathers each layer in every forward (least memory).
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
        replicate_size: Literal["nodes"] | int = 1,
        rollout_gather: Literal["auto", "once", "per_layer"] = "auto",
        process_group_backend: str | None = None,
        timeout: timedelta | None = timedelta(minutes=30),
    ) -> None:
        if state_dict_type not in ("full", "sharded"):
            raise ValueError(f"state_dict_type must be 'full' or 'sharded', got {state_dict_type!r}")
        if rollout_gather not in ROLLOUT_GATHER:
            raise ValueError(f"rollout_gather must be one of {ROLLOUT_GATHER}, got {rollout_gather!r}")
        if replicate_size != "nodes" and (isinstance(replicate_size, bool) or not isinstance(replicate_size, int) or replicate_size < 1):
            raise ValueError(f"replicate_size must be an integer >= 1 or 'nodes', got {replicate_size!r}")
        self.replicate_size, self.rollout_gather = replicate_size, rollout_gather
        self.hsdp_mesh = None
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
        world = self.num_processes * self.num_nodes
        if self._data_parallel_size == "auto":
            self._data_parallel_size = world
        replicas = self.num_nodes if self.replicate_size == "nodes" else self.replicate_size
        if replicas > 1 and world % replicas:
            raise ValueError(
                f"replicate_size={self.replicate_size} ({replicas} replica groups) does not divide the {world} processes; "
                "choose a divisor of num_nodes x devices"
            )
        super().setup_environment()
        if replicas > 1:
            from torch.distributed.device_mesh import init_device_mesh

            # Ranks are laid out node by node, so a shard group is a node's processes when
            # replicas = num_nodes.
            self.hsdp_mesh = init_device_mesh(
                self.root_device.type, (replicas, world // replicas), mesh_dim_names=("replicate", "shard")
            )
