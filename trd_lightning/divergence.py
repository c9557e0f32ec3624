"""Diverged weights (inf/NaN after a huge lr) named before they turn into silent garbage.

Sampling fails by itself on NaN probabilities (torch.multinomial's raw error, rewritten by
`diverged_weights_error`). Greedy decoding does not fail at all: the argmax of NaN logits is a
valid token id, so every rollout is garbage and the run goes on. `check_finite_before_greedy`
closes that gap with one pass over the weights per greedy rollout (no per-token cost)."""

from __future__ import annotations

import torch
import torch.distributed as dist


def _local(p: torch.Tensor) -> torch.Tensor:
    return p.to_local() if hasattr(p, "to_local") else p  # FSDP2: this rank's shard of a DTensor


def nonfinite_weights(model: torch.nn.Module) -> list[str]:
    """Names of the weight tensors holding inf/NaN (this rank's shards under FSDP2)."""
    return [n for n, p in model.named_parameters() if p.is_floating_point() and not torch.isfinite(_local(p.detach())).all()]


def diverged_weights_error(model: torch.nn.Module, step: int, role: str = "student") -> FloatingPointError:
    bad = nonfinite_weights(model)
    return FloatingPointError(
        f"sampling after step {step} failed: the {role}'s next-token probabilities are not finite "
        f"({len(bad)} weight tensors hold inf/NaN, e.g. {bad[:3]}); the weights diverged: lower the lr or set "
        "trainer.gradient_clip_val, and resume from an earlier checkpoint"
    )


def check_finite_before_greedy(model: torch.nn.Module, sampling, step: int, role: str = "student") -> None:
    """Raise `diverged_weights_error` before a greedy (temperature 0) decode with inf/NaN weights.

    One fused reduction and one host sync per rollout; under a sharded strategy the ranks agree
    (an all-reduce) so that all of them raise, none waits in the next collective."""
    if sampling is None or getattr(sampling, "temperature", 1.0) != 0:
        return
    params = [_local(p.detach()) for p in model.parameters() if p.is_floating_point()]
    params = [p for p in params if p.numel() and p.device.type != "meta"]
    if not params:
        return
    device = params[0].device
    bad = torch.stack([(~torch.isfinite(p)).any().to(device) for p in params]).any().to(torch.int32)
    if dist.is_available() and dist.is_initialized() and any(hasattr(p, "to_local") for p in model.parameters()):
        dist.all_reduce(bad, op=dist.ReduceOp.MAX)
    if bad.item():
        raise diverged_weights_error(model, step, role)
