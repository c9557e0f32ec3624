"""Prefix-failure diagnostics: what the teacher's next-token distribution looks like along rollouts.

Pure, vectorised functions over one batch of rollouts. Inputs are aligned on the response block
(see `trd_lightning.rollout`): ``student_logits`` and ``teacher_logits`` ``[B, N, V]`` (position t
predicts response token t), ``response_ids [B, N]`` and ``mask [B, N]`` (True on response tokens).

Definitions (q = teacher, p = student, y_t = the sampled token at position t):

* ``teacher_entropy`` / ``student_entropy``: ``-sum_v q(v) log q(v)`` (nats).
* ``teacher_logprob``: ``log q(y_t)``.
* ``forward_kl``: ``KL(q || p)``; ``reverse_kl``: ``KL(p || q)`` (the same per-position values whose
  masked means `trd_lightning.losses` optimises).
* ``top1_prob`` / ``top2_prob``: the teacher's two largest next-token probabilities ``p1 >= p2``;
  the top-2 tokens stand in for the two modes "carry on" and "correct" (for a real LM each mode
  spans several tokens, so this is a lower bound on how split the teacher is).
* ``bimodality = 2 * p2``. Since ``p2 <= min(p1, 1 - p1) <= 1/2`` it lies in [0, 1]; it is 1 only
  when two tokens share all the mass evenly, 0 for a point mass, and ``2/V`` for a uniform
  distribution over V tokens (about 0 for a real vocabulary). ``p2 / p1`` would score a uniform
  distribution 1, i.e. mistake "no idea" for "two clear options", which is why it is not used.
* ``onset_mass``: ``sum_{o in onsets} q(o)``, the teacher's probability of starting a correction
  here ("!", "Wait", ...); an onset of several tokens counts the probability of the whole sequence.
* ``continue_mass``: ``q(y_t)`` if the rollout does not itself start an onset at t, else 0: the
  teacher's mass on carrying on exactly as the rollout did.
* ``t_star``: the first failed position of a row, ``-1`` when none: criterion ``"prob"`` flags the
  first t with ``q(y_t) < threshold``; criterion ``"top_p"`` the first t whose token lies outside the
  teacher's top-p set (the smallest set of most likely tokens with mass >= top_p; ``y_t`` is in it
  iff the mass of tokens strictly more likely than ``y_t`` is < top_p).

Alignment: a row's *first error* is the index of its first wrong token (from the task's verifier,
or ``t_star``; ``-1`` = none). Offset 0 is the wrong token itself, offset +1 the first position whose
prefix contains it: that is where a teacher that carries on or corrects shows its split.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F

from trd_lightning.losses import kl_per_position, upcast

CRITERIA = ("prob", "top_p")
#: The t* criteria under both spellings: `PrefixSpliceReviser` (YAML) says ``teacher_prob`` /
#: ``teacher_top_p``, the diagnostics and the audit ``prob`` / ``top_p``; one rule each (`disowned`).
T_STAR_RULES = {"teacher_prob": "prob", "prob": "prob", "teacher_top_p": "top_p", "top_p": "top_p"}


def disowned(teacher_logp: torch.Tensor, tokens: torch.Tensor, criterion: str, threshold: float, top_p: float) -> torch.Tensor:
    """The t* rule: whether the teacher disowns each token (``teacher_logp``: float log-probs
    ``[..., V]``, ``tokens``: ``[...]``). ``prob``: the token's probability is below ``threshold``;
    ``top_p``: the token lies outside the teacher's top-p set, i.e. the tokens strictly more likely
    than it already hold ``top_p`` of the mass (no sort, and ties are treated alike)."""
    token_logp = teacher_logp.gather(-1, tokens.long().unsqueeze(-1)).squeeze(-1)
    if T_STAR_RULES[criterion] == "prob":
        return token_logp.exp() < threshold
    probs = teacher_logp.exp()
    mass_above = torch.where(probs > token_logp.exp().unsqueeze(-1), probs, 0.0).sum(-1)
    return mass_above >= top_p


# --- per-position statistics (no mask: every position is computed) -----------------------------
def log_probs(logits: torch.Tensor) -> torch.Tensor:
    # bf16 log-softmax is too coarse for KL differences of small probabilities (the losses' upcast).
    return F.log_softmax(upcast(logits), dim=-1)


def token_logprob(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    return log_probs(logits).gather(-1, tokens.long().unsqueeze(-1)).squeeze(-1)


def top2(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(p1, p2, id1, id2)``: the two largest probabilities and their token ids."""
    if logits.shape[-1] < 2:
        raise ValueError(f"top-2 statistics need a vocabulary of >= 2 tokens, got {logits.shape[-1]}")
    probs, ids = log_probs(logits).exp().topk(2, dim=-1)
    return probs[..., 0], probs[..., 1], ids[..., 0], ids[..., 1]


def _starts_onset(tokens: torch.Tensor, mask: torch.Tensor, single_ids: torch.Tensor, multi) -> torch.Tensor:
    """[B, N]: where the rollout itself starts a correction (an onset token, or a whole sequence)."""
    hit = torch.isin(tokens, single_ids)
    for sequence in multi:
        hit = hit | _starts_sequence(tokens, mask, sequence)
    return hit


def bimodality(logits: torch.Tensor) -> torch.Tensor:
    """``2 * p2`` (see the module docstring for why this and not ``p2 / p1``)."""
    return 2 * top2(logits)[1]


def _onset_tensor(onset_ids: Sequence[int] | torch.Tensor, vocab: int, device) -> torch.Tensor:
    ids = torch.as_tensor(list(onset_ids) if not torch.is_tensor(onset_ids) else onset_ids, dtype=torch.long, device=device)
    ids = ids.unique()
    bad = ids[(ids < 0) | (ids >= vocab)].tolist()
    if bad:
        raise ValueError(f"correction-onset token ids {bad} are outside the vocabulary [0, {vocab})")
    return ids


def onset_mass(logits: torch.Tensor, onset_ids: Sequence[int] | torch.Tensor) -> torch.Tensor:
    """Teacher mass on the correction-onset tokens (each id counted once)."""
    ids = _onset_tensor(onset_ids, logits.shape[-1], logits.device)
    return log_probs(logits).exp().index_select(-1, ids).sum(-1)


def continue_mass(logits: torch.Tensor, tokens: torch.Tensor, onset_ids: Sequence[int] | torch.Tensor) -> torch.Tensor:
    """``q(y_t)`` where ``y_t`` is not an onset token, else 0 (the rollout itself corrected)."""
    ids = _onset_tensor(onset_ids, logits.shape[-1], logits.device)
    prob = token_logprob(logits, tokens).exp()
    return torch.where(torch.isin(tokens, ids), 0.0, prob)


def first_failure(
    teacher_logits: torch.Tensor,
    response_ids: torch.Tensor,
    mask: torch.Tensor,
    *,
    criterion: str = "prob",
    threshold: float = 0.05,
    top_p: float = 0.9,
) -> torch.Tensor:
    """``t*`` per row ``[B]`` (long): the first masked position the teacher rejects, ``-1`` if none."""
    check_criterion(criterion, threshold, top_p)
    return _first_true(disowned(log_probs(teacher_logits), response_ids, criterion, threshold, top_p) & mask.bool())


def _first_true(flags: torch.Tensor) -> torch.Tensor:
    """Index of the first True of each row, ``-1`` for rows without one."""
    if flags.shape[-1] == 0:
        return torch.full(flags.shape[:-1], -1, dtype=torch.long, device=flags.device)
    first = flags.long().argmax(-1)  # argmax returns the first maximal index
    return torch.where(flags.any(-1), first, -1)


# --- one batch of rollouts -------------------------------------------------------------------
@dataclass
class RolloutDiagnostics:
    """Per-position statistics of a batch, ``[B, N]`` floats with NaN outside the response mask.

    ``t_star`` is ``[B]`` (``-1`` = none); ``topk_ids``/``topk_probs`` ``[B, N, k]`` are the teacher's
    most likely tokens (for worked examples); ``mask`` is the response mask.
    """

    teacher_entropy: torch.Tensor
    student_entropy: torch.Tensor
    teacher_logprob: torch.Tensor
    forward_kl: torch.Tensor
    reverse_kl: torch.Tensor
    top1_prob: torch.Tensor
    top2_prob: torch.Tensor
    bimodality: torch.Tensor
    onset_mass: torch.Tensor
    continue_mass: torch.Tensor
    t_star: torch.Tensor
    topk_ids: torch.Tensor
    topk_probs: torch.Tensor
    mask: torch.Tensor

    #: the [B, N] statistics (what gets aligned, averaged and plotted)
    POSITION_STATS = (
        "teacher_entropy", "student_entropy", "teacher_logprob", "forward_kl", "reverse_kl",
        "top1_prob", "top2_prob", "bimodality", "onset_mass", "continue_mass",
    )  # fmt: skip

    def mean(self, name: str) -> float:
        """Token-weighted mean of a statistic over all response positions (NaN if there are none)."""
        return float(getattr(self, name).nanmean())

    @staticmethod
    def concat(parts: Sequence[RolloutDiagnostics]) -> RolloutDiagnostics:
        """Stack batches of different response widths (padding is NaN / False / -1)."""
        if not parts:
            raise ValueError("nothing to concatenate: no diagnostics batches")
        width = max(p.mask.shape[1] for p in parts)
        pad_value = {"mask": False, "topk_ids": -1}
        out = {}
        for f in fields(RolloutDiagnostics):
            tensors = []
            for p in parts:
                t = getattr(p, f.name)
                if f.name != "t_star" and t.shape[1] < width:
                    extra = list(t.shape)
                    extra[1] = width - t.shape[1]
                    fill = pad_value.get(f.name, float("nan"))
                    t = torch.cat([t, torch.full(extra, fill, dtype=t.dtype, device=t.device)], 1)
                tensors.append(t)
            out[f.name] = torch.cat(tensors, 0)
        return RolloutDiagnostics(**out)


def _check_inputs(student_logits: torch.Tensor, teacher_logits: torch.Tensor, response_ids: torch.Tensor, mask: torch.Tensor) -> None:
    if teacher_logits.dim() != 3:
        raise ValueError(f"logits must be [B, N, V], got teacher shape {tuple(teacher_logits.shape)}")
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"student logits {tuple(student_logits.shape)} and teacher logits {tuple(teacher_logits.shape)} differ; "
            "both must be aligned on the same response block and share one vocabulary"
        )
    for name, t in (("response_ids", response_ids), ("mask", mask)):
        if tuple(t.shape) != tuple(teacher_logits.shape[:2]):
            raise ValueError(f"{name} shape {tuple(t.shape)} != logits.shape[:2] {tuple(teacher_logits.shape[:2])}")
    if teacher_logits.shape[0] == 0 or not mask.bool().any():
        raise ValueError(
            "empty rollout: no response tokens to diagnose (zero rows or an all-False response mask); "
            "check that sampling produced responses (max_new_tokens > 0, prompts not empty)"
        )
    in_mask = response_ids[mask.bool()]
    if in_mask.numel() and (int(in_mask.min()) < 0 or int(in_mask.max()) >= teacher_logits.shape[-1]):
        raise ValueError(f"response_ids outside the vocabulary [0, {teacher_logits.shape[-1]}) at masked positions")


def check_criterion(criterion: str, threshold: float, top_p: float) -> None:
    """Raise on a bad ``t*`` setting."""
    if criterion not in T_STAR_RULES:
        raise ValueError(f"unknown t* criterion {criterion!r}; choose one of {CRITERIA}")
    if not 0 < threshold < 1:
        raise ValueError(f"threshold must be in (0, 1), got {threshold}")
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")


@torch.no_grad()
def rollout_diagnostics(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    response_ids: torch.Tensor,
    mask: torch.Tensor,
    onset_ids,
    *,
    onset_continuations: dict[tuple[int, ...], torch.Tensor] | None = None,
    criterion: str = "prob",
    threshold: float = 0.05,
    top_p: float = 0.9,
    top_k: int = 5,
) -> RolloutDiagnostics:
    """Every statistic of the module docstring for one batch; raises on an empty rollout.

    ``onset_ids``: onset token ids, or token sequences (`onset_token_ids`). A multi-token onset's
    mass at t is ``q(o_1 | ..) * q(o_2 | .., o_1) * ...``: the first factor comes from
    ``teacher_logits``, the rest from ``onset_continuations[sequence]`` ([B, N] log-probabilities,
    `trd_lightning.audit.onset_continuation_logprob`), which need more teacher forwards.
    """
    _check_inputs(student_logits, teacher_logits, response_ids, mask)
    check_criterion(criterion, threshold, top_p)
    vocab = teacher_logits.shape[-1]
    single, multi = split_onsets(torch.as_tensor(onset_ids).tolist() if torch.is_tensor(onset_ids) else onset_ids)
    missing = [s for s in multi if s not in (onset_continuations or {})]
    if missing:
        raise ValueError(
            f"multi-token correction onsets {missing} need their continuation log-probabilities "
            "(onset_continuations; trd_lightning.audit.diagnose computes them with the teacher)"
        )
    ids = _onset_tensor(single + [s[0] for s in multi], vocab, teacher_logits.device)
    single_ids = _onset_tensor(single, vocab, teacher_logits.device) if single else ids[:0]
    mask = mask.bool()
    # Pad ids can be anything after the end; clamp so gathers stay in range (masked out below).
    tokens = torch.where(mask, response_ids, 0).long()

    logq, logp = log_probs(teacher_logits), log_probs(student_logits)
    q, p = logq.exp(), logp.exp()
    q_tok = logq.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    top_probs, top_ids = q.topk(min(max(top_k, 2), vocab), dim=-1)
    failed = disowned(logq, tokens, criterion, threshold, top_p)

    def masked(x: torch.Tensor) -> torch.Tensor:
        return torch.where(mask, x, float("nan"))

    return RolloutDiagnostics(
        teacher_entropy=masked(-(q * logq).sum(-1)),
        student_entropy=masked(-(p * logp).sum(-1)),
        teacher_logprob=masked(q_tok),
        forward_kl=masked(kl_per_position(logq, logp)),
        reverse_kl=masked(kl_per_position(logp, logq)),
        top1_prob=masked(top_probs[..., 0]),
        top2_prob=masked(top_probs[..., 1]),
        bimodality=masked(2 * top_probs[..., 1]),
        onset_mass=masked(
            q.index_select(-1, single_ids).sum(-1)
            + sum((q[..., s[0]] * onset_continuations[s].to(q.device).exp() for s in multi), torch.zeros_like(q_tok))
        ),
        continue_mass=masked(torch.where(_starts_onset(tokens, mask, single_ids, multi), 0.0, q_tok.exp())),
        t_star=_first_true(failed & mask),
        topk_ids=top_ids[..., :top_k],
        topk_probs=top_probs[..., :top_k],
        mask=mask,
    )


# --- aggregates aligned on the first error ------------------------------------------------------
@dataclass
class Aligned:
    """A statistic around each row's first error: ``values [B, 2k+1]`` (NaN where no data),
    ``mean``/``count`` per offset over rows with data (mean is NaN where count is 0)."""

    offsets: torch.Tensor
    values: torch.Tensor
    mean: torch.Tensor
    count: torch.Tensor


def align_on_error(values: torch.Tensor, first_error: torch.Tensor, window: int) -> Aligned:
    """Gather ``values[b, first_error[b] + o]`` for ``o in -window..window``.

    ``values`` must carry NaN outside the response (as `RolloutDiagnostics` does); rows with
    ``first_error < 0`` and offsets outside ``[0, N)`` contribute nothing.
    """
    if window < 0:
        raise ValueError(f"window must be >= 0, got {window}")
    if values.dim() != 2 or first_error.shape != values.shape[:1]:
        raise ValueError(f"need values [B, N] and first_error [B], got {tuple(values.shape)} and {tuple(first_error.shape)}")
    b, n = values.shape
    offsets = torch.arange(-window, window + 1, device=values.device)
    first_error = first_error.to(values.device).long()
    idx = first_error.unsqueeze(1) + offsets.unsqueeze(0)
    valid = (first_error.unsqueeze(1) >= 0) & (idx >= 0) & (idx < n)
    gathered = values.float().gather(1, idx.clamp(0, max(n - 1, 0))) if n else torch.full(idx.shape, float("nan"))
    aligned = torch.where(valid, gathered, float("nan"))
    count = (~aligned.isnan()).sum(0)
    mean = torch.where(count > 0, torch.nan_to_num(aligned, nan=0.0).sum(0) / count.clamp(min=1), float("nan"))
    return Aligned(offsets, aligned, mean, count)


def at_offset_and_elsewhere(values: torch.Tensor, first_error: torch.Tensor, offset: int = 1) -> tuple[float, float]:
    """Mean of a statistic at ``first_error + offset`` (rows with an error) and over every other
    response position of every row (token-weighted). NaN where there is no such position."""
    b, n = values.shape
    idx = first_error.to(values.device).long() + offset
    hit = (first_error.to(values.device) >= 0) & (idx >= 0) & (idx < n)
    at = torch.zeros_like(values, dtype=torch.bool)
    at[hit.nonzero().squeeze(-1), idx[hit]] = True
    data = ~values.isnan()
    return float(values[at & data].mean()) if (at & data).any() else float("nan"), (
        float(values[~at & data].mean()) if (~at & data).any() else float("nan")
    )


# --- correction-onset strings -> token ids ------------------------------------------------------
def onset_token_ids(tokenizer, strings: Sequence[str]) -> list[tuple[int, ...]]:
    """The token sequence of each correction-onset string (``("!",)``, or ``"Wait"`` as the
    several tokens a small BPE vocabulary splits it into); raises naming every string that encodes
    to nothing or to the unknown token.

    A sequence that extends another onset (``" Wait"`` then ``" Wait,"``) is dropped: starting the
    longer one is part of starting the shorter, and counting both would count its mass twice.
    """
    if isinstance(strings, str):
        strings = [strings]
    if not strings:
        raise ValueError("no correction-onset strings: give at least one (e.g. task.correction_onsets)")
    seqs, bad = set(), []
    unk = getattr(tokenizer, "unk_token_id", None)
    for s in strings:
        enc = tuple(tokenizer.encode(s, add_special_tokens=False))
        if not enc:
            bad.append(f"{s!r} -> no tokens")
        elif unk in enc and s != getattr(tokenizer, "unk_token", None):
            bad.append(f"{s!r} -> the unknown token")
        else:
            seqs.add(enc)
    if bad:
        raise ValueError(
            "correction-onset strings must encode to known tokens; these do not: " + "; ".join(bad) + ". Drop them or "
            "use the form that appears mid-text (for BPE vocabularies often with a leading space, e.g. ' Wait')."
        )
    return sorted(q for q in seqs if not any(len(o) < len(q) and q[: len(o)] == o for o in seqs))


def split_onsets(onsets) -> tuple[list[int], list[tuple[int, ...]]]:
    """Single-token onsets (ints or 1-tuples) as ids, and the multi-token sequences."""
    single, multi = [], []
    for o in onsets:
        o = (int(o),) if not isinstance(o, (tuple, list)) else tuple(int(t) for t in o)
        (single.append(o[0]) if len(o) == 1 else multi.append(o))
    return single, multi


def _starts_sequence(tokens: torch.Tensor, mask: torch.Tensor, sequence: tuple[int, ...]) -> torch.Tensor:
    """[B, N]: where the response itself continues with ``sequence`` (all of it inside the response)."""
    b, n = tokens.shape
    m = len(sequence)
    hit = torch.zeros(b, n, dtype=torch.bool, device=tokens.device)
    if m > n:
        return hit
    window = tokens.unfold(1, m, 1)  # [B, N - m + 1, m]
    inside = mask.unfold(1, m, 1).all(-1)
    hit[:, : n - m + 1] = (window == torch.tensor(sequence, device=tokens.device)).all(-1) & inside
    return hit
