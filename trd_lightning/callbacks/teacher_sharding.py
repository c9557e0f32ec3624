"""`TeacherSharding`: prepares the frozen teacher for the run's strategy.

The teacher never trains, so it needs neither gradient hooks nor a place in checkpoints, and it
can be stored in bf16. What "prepared" means depends on the strategy:

* FSDP2 (`trd_lightning.sharding.FSDP2Strategy`, any ``ModelParallelStrategy``): ``shard`` gives
  the teacher its own ``fully_shard`` root per decoder layer (bf16 storage, each rank holds 1/N of
  it, gathered layer by layer in forward); ``replicate`` keeps a full copy per rank (no
  communication in the teacher's forward: faster when it fits, and the only choice for a
  bitsandbytes-quantized teacher).
* DDP: the teacher is replicated; its parameters and buffers are excluded from DDP's start-up
  broadcast and gradient hooks (``_ddp_params_and_buffers_to_ignore``).
* one device: only the dtype applies.

Checkpoints: `DistillationModule.state_dict` leaves the frozen teacher out, and every strategy
(FSDP2's distributed state dict included) goes through it.

Generation under sharding: with FSDP2 every forward is a collective, so every rank must run the
same number of forward passes, unless the rollout gathered the weights once
(`FSDP2Strategy(rollout_gather=...)`, `trd_lightning.sharding.rollout_weights`): then forwards are
local. Otherwise `DistillationModule` passes ``synced_gpus`` to ``generate`` and the splice decode
runs rank-synchronised rounds (`trd_lightning.splice_decode`).
"""

from __future__ import annotations

from typing import Literal

import torch
from lightning.pytorch import Callback
from lightning.pytorch.strategies import DDPStrategy, ModelParallelStrategy

from trd_lightning.sharding import DTYPES, ShardingPlan, _data_parallel_mesh, is_sharded, shard_model


def _is_quantized(model: torch.nn.Module) -> bool:
    return bool(getattr(model, "is_quantized", False) or getattr(model, "is_loaded_in_4bit", False) or getattr(model, "is_loaded_in_8bit", False))


class TeacherSharding(Callback):
    """Shards (or replicates) the frozen teacher in its own dtype; see the module docstring.

    Args:
        placement: ``shard`` (own FSDP2 root per decoder layer) or ``replicate`` (a full copy per
            rank). Only FSDP2 shards; under DDP or one device the teacher is always replicated.
        dtype: storage dtype of the teacher (``bf16`` halves its memory; ``null`` keeps the
            loaded dtype). Ignored for a quantized teacher.
        decoder_layers: class names of the teacher's decoder layer; default: the strategy's
            ``decoder_layers`` when the teacher has them, else the teacher's Hugging Face default.
    """

    def __init__(
        self,
        placement: Literal["shard", "replicate"] = "shard",
        dtype: Literal["bf16", "fp16", "fp32"] | None = "bf16",
        decoder_layers: list[str] | None = None,
    ):
        if placement not in ("shard", "replicate"):
            raise ValueError(f"placement must be 'shard' or 'replicate', got {placement!r}")
        if dtype is not None and dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {sorted(DTYPES)} or null, got {dtype!r}")
        self.placement, self.dtype, self.decoder_layers = placement, dtype, decoder_layers

    def setup(self, trainer, pl_module, stage: str) -> None:
        teacher = pl_module.teacher
        if teacher is None:
            return  # live OPSD: the student itself plays the teacher, nothing separate to prepare
        strategy = trainer.strategy
        if pl_module.teacher_is_training_state:
            # The EMA update pairs teacher and student parameters one to one: the student's
            # sharding (configure_sharding) and dtype apply to it, nothing here.
            if self.placement == "replicate" and isinstance(strategy, ModelParallelStrategy):
                raise ValueError(
                    "an EMA teacher is updated from the sharded student, so it must be sharded like it: "
                    "set TeacherSharding(placement='shard') or use opsd_teacher: frozen"
                )
            return
        if any(p.requires_grad for p in teacher.parameters()):
            raise RuntimeError("the teacher has trainable parameters; a frozen teacher must be built with trainable=False")
        teacher.eval()
        quantized = _is_quantized(teacher)
        if self.dtype is not None and not quantized and not is_sharded(teacher):
            teacher.to(DTYPES[self.dtype])

        if isinstance(strategy, ModelParallelStrategy):
            if self.placement == "shard" and not is_sharded(teacher):
                if quantized:
                    raise ValueError(
                        "a bitsandbytes-quantized teacher cannot be FSDP-sharded; set "
                        "TeacherSharding(placement='replicate') (a 4-bit teacher is small enough to replicate)"
                    )
                plan = ShardingPlan(decoder_layers=self._layer_names(strategy, teacher))
                shard_model(teacher, plan, _data_parallel_mesh(strategy), role="teacher")
        elif isinstance(strategy, DDPStrategy):
            names = [f"teacher.{n}" for n, _ in teacher.named_parameters()]
            names += [f"teacher.{n}" for n, _ in teacher.named_buffers()]
            ignored = set(getattr(pl_module, "_ddp_params_and_buffers_to_ignore", ()))
            pl_module._ddp_params_and_buffers_to_ignore = sorted(ignored | set(names))

    def _layer_names(self, strategy, teacher) -> list[str] | None:
        if self.decoder_layers is not None:
            return self.decoder_layers
        names = getattr(getattr(strategy, "plan", None), "decoder_layers", None)
        present = {type(m).__name__ for m in teacher.modules()}
        # Student and teacher usually share an architecture; if not, fall back to the teacher's own.
        return names if names and all(n in present for n in names) else None
