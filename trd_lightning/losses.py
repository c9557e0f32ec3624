"""Per-position distillation losses for on-policy distillation.

All losses take ``student_logits`` and ``teacher_logits`` of shape [B, T, V] that are
already aligned (position t of both predicts the same next token) and a ``mask`` [B, T]
selecting the response positions that count. Each returns the mean over masked positions
of a per-position value.

These are per-token surrogates: the gradient of the sequence-level reverse KL
KL(p_student(y_1..T) || q_teacher(y_1..T)) on student samples also contains "future"
score-function terms (each token's log-prob times the KL of everything after it).
On-policy distillation, like GKD and OPSD, drops those terms and treats every position
as an independent distribution-matching (or REINFORCE) problem at its sampled prefix.
"""
from __future__ import annotations

import inspect
import math
from typing import Callable, Literal, get_args

import torch
import torch.nn.functional as F


def _check_shapes(student_logits, teacher_logits, mask, tokens=None) -> None:
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"student_logits shape {tuple(student_logits.shape)} != teacher_logits shape "
            f"{tuple(teacher_logits.shape)}; teacher and student must share a vocabulary "
            "and be aligned to the same [B, T] positions"
        )
    if student_logits.dim() != 3:
        raise ValueError(f"logits must be [B, T, V], got shape {tuple(student_logits.shape)}")
    if tuple(mask.shape) != tuple(student_logits.shape[:2]):
        raise ValueError(
            f"mask shape {tuple(mask.shape)} != logits.shape[:2] {tuple(student_logits.shape[:2])}"
        )
    if tokens is not None and tuple(tokens.shape) != tuple(student_logits.shape[:2]):
        raise ValueError(
            f"tokens shape {tuple(tokens.shape)} != logits.shape[:2] {tuple(student_logits.shape[:2])}"
        )


def upcast(x: torch.Tensor) -> torch.Tensor:
    """Logits in at least float32 before a log-softmax (the diagnostics use it too)."""
    # bf16/fp16 log_softmax loses too much precision in KL differences; keep float64 as is
    return x.to(torch.promote_types(x.dtype, torch.float32))


def _log_probs(student_logits, teacher_logits, mask, temperature):
    """Validated float32 log-probs; masked-out rows are zeroed *before* softmax so that
    garbage there cannot produce inf/NaN that would survive into the backward pass."""
    _check_shapes(student_logits, teacher_logits, mask)
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    keep = mask.bool().unsqueeze(-1)
    s = torch.where(keep, upcast(student_logits), 0.0) / temperature
    t = torch.where(keep, upcast(teacher_logits), 0.0) / temperature
    return F.log_softmax(s, dim=-1), F.log_softmax(t, dim=-1)


def _masked_mean(per_pos: torch.Tensor, mask: torch.Tensor, clip: float | None = None):
    if clip is not None:
        # clamp (not a soft clip) so positions above the threshold get zero gradient
        per_pos = per_pos.clamp(max=clip)
    m = mask.bool()
    return torch.where(m, per_pos, 0.0).sum() / m.sum().clamp(min=1)


def kl_per_position(logp_a: torch.Tensor, logp_b: torch.Tensor) -> torch.Tensor:
    """KL(a || b) over the last dim, from log-probabilities (every position; the losses mask it)."""
    return (logp_a.exp() * (logp_a - logp_b)).sum(-1)


def forward_kl(student_logits, teacher_logits, mask, *, temperature=1.0, clip=None):
    """Mean over masked positions of KL(q_teacher || p_student) (mode-covering)."""
    logp, logq = _log_probs(student_logits, teacher_logits, mask, temperature)
    return _masked_mean(kl_per_position(logq, logp), mask, clip)


def reverse_kl(student_logits, teacher_logits, mask, *, temperature=1.0, clip=None):
    """Mean over masked positions of KL(p_student || q_teacher) (mode-seeking)."""
    logp, logq = _log_probs(student_logits, teacher_logits, mask, temperature)
    return _masked_mean(kl_per_position(logp, logq), mask, clip)


def generalized_jsd(student_logits, teacher_logits, mask, *, beta=0.5, temperature=1.0, clip=None):
    """Generalised JSD as in GKD / TRL.

    beta == 0 -> KL(Q||P) (forward), beta == 1 -> KL(P||Q) (reverse); otherwise with
    M = (1-beta) P + beta Q the value is beta KL(Q||M) + (1-beta) KL(P||M). The endpoints
    are special-cased because the interior formula degenerates to 0 there (M -> P or Q).
    """
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"beta must be in [0, 1], got {beta}")
    logp, logq = _log_probs(student_logits, teacher_logits, mask, temperature)
    if beta == 0.0:
        per_pos = kl_per_position(logq, logp)
    elif beta == 1.0:
        per_pos = kl_per_position(logp, logq)
    else:
        # mixture in log space: avoids log(0) underflow for tokens one model never predicts
        logm = torch.logsumexp(
            torch.stack([logp + math.log(1.0 - beta), logq + math.log(beta)]), dim=0
        )
        per_pos = beta * kl_per_position(logq, logm) + (1.0 - beta) * kl_per_position(logp, logm)
    return _masked_mean(per_pos, mask, clip)


def topk_reverse_kl(student_logits, teacher_logits, mask, *, k=32, temperature=1.0, clip=None):
    """Reverse KL restricted to the teacher's top-k tokens at each position, both
    distributions renormalised over those k ids (cheap when V is large; k is clamped to V)."""
    _check_shapes(student_logits, teacher_logits, mask)
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    keep = mask.bool().unsqueeze(-1)
    s = torch.where(keep, upcast(student_logits), 0.0) / temperature
    t = torch.where(keep, upcast(teacher_logits), 0.0) / temperature
    ids = t.topk(min(k, t.shape[-1]), dim=-1).indices
    logp = F.log_softmax(s.gather(-1, ids), dim=-1)
    logq = F.log_softmax(t.gather(-1, ids), dim=-1)
    return _masked_mean(kl_per_position(logp, logq), mask, clip)


def _token_log_probs(student_logits, teacher_logits, tokens, mask, estimator):
    if estimator not in ("k1", "k3"):
        raise ValueError(f"unknown estimator {estimator!r}; choose one of: k1, k3")
    _check_shapes(student_logits, teacher_logits, mask, tokens)
    logp, logq = _log_probs(student_logits, teacher_logits, mask, 1.0)
    # padding positions often hold -100 or similar; any valid id will do since they're masked
    idx = torch.where(mask.bool(), tokens.long(), 0).unsqueeze(-1)
    logp_tok, logq_tok = logp.gather(-1, idx).squeeze(-1), logq.gather(-1, idx).squeeze(-1)
    if estimator == "k1":
        est = logp_tok - logq_tok
    else:
        r = logq_tok - logp_tok
        est = torch.expm1(r) - r
    return logp_tok, est


def sampled_kl_estimate(student_logits, teacher_logits, tokens, mask, *, estimator="k1"):
    """Monte-Carlo estimate of KL(p||q) from the sampled tokens (tokens ~ p_student).

    k1 = log p - log q (unbiased, can be negative); k3 = exp(r) - 1 - r with
    r = log q - log p (unbiased, always >= 0, lower variance)."""
    _, est = _token_log_probs(student_logits, teacher_logits, tokens, mask, estimator)
    return _masked_mean(est, mask)


def sampled_kl_surrogate(student_logits, teacher_logits, tokens, mask, *, estimator="k1"):
    """REINFORCE-style surrogate mean(stopgrad(estimator) * log p(token)).

    For k1 its gradient is the per-token score-function estimate of the reverse-KL
    gradient: grad E_p[log p - log q] = E_p[(log p - log q) grad log p] (the extra
    E_p[grad log p] term is zero), with the future-token terms of the sequence-level
    gradient dropped. For k3, stopgrad(k3) is used as the advantage the same way: a
    biased but lower-variance variant. The loss *value* is not a KL; log it via
    ``sampled_kl_estimate``."""
    logp_tok, est = _token_log_probs(student_logits, teacher_logits, tokens, mask, estimator)
    return _masked_mean(est.detach() * logp_tok, mask)


def k1_surrogate(student_logits, teacher_logits, tokens, mask):
    return sampled_kl_surrogate(student_logits, teacher_logits, tokens, mask, estimator="k1")


def k3_surrogate(student_logits, teacher_logits, tokens, mask):
    return sampled_kl_surrogate(student_logits, teacher_logits, tokens, mask, estimator="k3")


def cross_entropy(student_logits, teacher_logits, tokens, mask):
    """Mean over masked positions of ``-log p_student(token)``: supervised fine-tuning on the
    response tokens (sequence-level KD on teacher samples, SFT on revised trajectories). The
    teacher's logits are not used; `DistillationModule` skips the teacher forward for this loss."""
    _check_shapes(student_logits, teacher_logits, mask, tokens)
    keep = mask.bool()
    logp = F.log_softmax(torch.where(keep.unsqueeze(-1), upcast(student_logits), 0.0), dim=-1)
    idx = torch.where(keep, tokens.long(), 0).unsqueeze(-1)
    return _masked_mean(-logp.gather(-1, idx).squeeze(-1), mask)


#: The loss names (YAML ``model.init_args.loss``); jsonargparse lists them in ``--help``.
LossName = Literal["reverse_kl", "forward_kl", "generalized_jsd", "topk_reverse_kl", "k1", "k3", "cross_entropy"]

LOSSES: dict[str, Callable] = {
    "forward_kl": forward_kl,
    "reverse_kl": reverse_kl,
    "generalized_jsd": generalized_jsd,
    "topk_reverse_kl": topk_reverse_kl,
    "k1": k1_surrogate,
    "k3": k3_surrogate,
    "cross_entropy": cross_entropy,
}
assert set(LOSSES) == set(get_args(LossName)), "LossName and LOSSES must name the same losses"
_NEEDS_TOKENS = {"k1", "k3", "cross_entropy"}
# Losses that read only the student: the training step need not run the teacher for them.
TEACHER_FREE = {"cross_entropy"}


def get_loss(name: str) -> Callable:
    if name not in LOSSES:
        raise ValueError(f"unknown loss {name!r}; choose one of: {', '.join(LOSSES)}")
    return LOSSES[name]


def compute_loss(name, student_logits, teacher_logits, mask, *, tokens=None, **kwargs):
    """Dispatch by name. ``tokens`` is passed only to losses that need it (k1/k3), so a
    training loop can always supply it; other kwargs must be accepted by the chosen loss."""
    fn = get_loss(name)
    accepted = {
        p.name for p in inspect.signature(fn).parameters.values() if p.kind is p.KEYWORD_ONLY
    }
    unknown = sorted(set(kwargs) - accepted)
    if unknown:
        raise TypeError(
            f"loss {name!r} got unexpected keyword argument(s) {unknown}; "
            f"accepted: {sorted(accepted) or 'none'}"
        )
    if name in _NEEDS_TOKENS:
        if tokens is None:
            raise ValueError(f"loss {name!r} needs the sampled `tokens` [B, T]; got None")
        return fn(student_logits, teacher_logits, tokens, mask, **kwargs)
    return fn(student_logits, teacher_logits, mask, **kwargs)
