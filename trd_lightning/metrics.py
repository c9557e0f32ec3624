"""Sampling-based evaluation metrics: unbiased pass@k and avg@n."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor
from torchmetrics import Metric
from torchmetrics.utilities import dim_zero_cat

__all__ = ["pass_at_k", "avg_at_n", "PassAtK", "distinct_derivations", "DerivationCoverage"]


def _check_k(k: int) -> None:
    # bool is an int subclass; pass@True is almost certainly a bug.
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"k must be an int >= 1, got {k!r}")


def _k_too_large(k: int, n) -> ValueError:
    return ValueError(
        f"k={k} is larger than the number of samples n={n}; "
        "sample at least k completions per problem or lower k"
    )


def _as_counts(num_samples, num_correct) -> tuple[Tensor, Tensor]:
    n = torch.as_tensor(num_samples)
    c = torch.as_tensor(num_correct, device=n.device)
    n, c = torch.broadcast_tensors(n.to(torch.float64), c.to(torch.float64))
    if bool((c < 0).any()) or bool((c > n).any()):
        raise ValueError("num_correct must satisfy 0 <= c <= n for every entry")
    return n, c


def pass_at_k(num_samples: Tensor | int, num_correct: Tensor | int, k: int) -> Tensor:
    """Unbiased pass@k = 1 - C(n-c, k) / C(n, k) (Chen et al. 2021), elementwise, float64."""
    _check_k(k)
    n, c = _as_counts(num_samples, num_correct)
    if bool((n < k).any()):
        raise _k_too_large(k, int(n.min().item()))
    # C(n, k) overflows float64 for n beyond ~1000 and loses precision long before
    # that, so take the ratio in log space; expm1 keeps tiny pass@k values accurate.
    fail = n - c
    all_pass = fail < k
    # lgamma has poles at non-positive integers; those entries are replaced by 1.0 anyway.
    rest = torch.where(all_pass, torch.ones_like(fail), fail - k + 1)
    log_ratio = torch.lgamma(fail + 1) - torch.lgamma(rest) - torch.lgamma(n + 1) + torch.lgamma(n - k + 1)
    est = torch.where(all_pass, torch.ones_like(n), -torch.expm1(log_ratio))
    # lgamma rounding can leave ~1e-16 where nothing was correct; 0 must stay exactly 0.
    return torch.where(c == 0, torch.zeros_like(est), est)


def avg_at_n(num_samples: Tensor | int, num_correct: Tensor | int) -> Tensor:
    """Mean per-sample accuracy c / n, float64."""
    n, c = _as_counts(num_samples, num_correct)
    return c / n


class PassAtK(Metric):
    """Dataset-level ``avg@n`` and unbiased ``pass@k`` over problems.

    Each row of ``update`` is one problem: ``num_correct`` of ``num_samples`` sampled
    completions were correct. Rows sharing a non-negative ``problem_id`` are counted
    once (first occurrence, in gather order) so that DistributedSampler's padding by
    repetition does not bias the synchronised result; rows with id -1 are always distinct.
    Returns ``{"avg@{n}" | "avg": ..., "pass@{k}": ...}`` as float64 scalars; with no
    updates every value is NaN.

    Args:
        ks: the k of each pass@k.
        num_samples: samples per problem, if fixed (names the metric ``avg@{n}``; else ``avg``).
        kwargs: torchmetrics' own ``Metric`` arguments (e.g. ``dist_sync_on_step``).
    """

    higher_is_better = True
    full_state_update = False
    is_differentiable = False

    def __init__(self, ks: Sequence[int] = (1,), num_samples: int | None = None, **kwargs) -> None:
        super().__init__(**kwargs)
        self.ks = tuple(ks)
        if not self.ks:
            raise ValueError("ks must contain at least one k")
        for k in self.ks:
            _check_k(k)
            # Fail at construction rather than after a full (expensive) generation pass.
            if num_samples is not None and k > num_samples:
                raise _k_too_large(k, num_samples)
        self.fixed_num_samples = num_samples
        # List states with cat reduction so every rank's rows (with ids) survive sync
        # and de-duplication can happen on the gathered whole.
        self.add_state("problem_ids", default=[], dist_reduce_fx="cat")
        self.add_state("num_correct", default=[], dist_reduce_fx="cat")
        self.add_state("num_samples", default=[], dist_reduce_fx="cat")

    def update(self, num_correct: Tensor, num_samples: Tensor | int, problem_ids: Tensor | None = None) -> None:
        c = torch.as_tensor(num_correct, device=self.device).reshape(-1).to(torch.int64)
        n = torch.as_tensor(num_samples, device=self.device).to(torch.int64).expand_as(c).clone()
        if problem_ids is None:
            # Per-process running ids would collide across ranks, so treat rows as distinct.
            ids = torch.full_like(c, -1)
        else:
            ids = torch.as_tensor(problem_ids, device=self.device).reshape(-1).to(torch.int64)
            if ids.shape != c.shape:
                raise ValueError(f"problem_ids has shape {tuple(ids.shape)}, expected {tuple(c.shape)}")
        if bool((c < 0).any()) or bool((c > n).any()):
            raise ValueError("num_correct must satisfy 0 <= c <= n for every entry")
        self.problem_ids.append(ids)
        self.num_correct.append(c)
        self.num_samples.append(n)

    def _keys(self, n: Tensor | None) -> list[str]:
        if n is not None and n.numel() and bool((n == n[0]).all()):
            avg = f"avg@{int(n[0])}"
        elif n is None and self.fixed_num_samples is not None:
            avg = f"avg@{self.fixed_num_samples}"
        else:
            avg = "avg"
        return [avg] + [f"pass@{k}" for k in self.ks]

    def compute(self) -> dict[str, Tensor]:
        # After sync the states may already be tensors; before any update they are empty lists.
        if isinstance(self.num_correct, list) and not self.num_correct:
            nan = torch.tensor(float("nan"), dtype=torch.float64, device=self.device)
            return {key: nan.clone() for key in self._keys(None)}
        ids = dim_zero_cat(self.problem_ids)
        c = dim_zero_cat(self.num_correct)
        n = dim_zero_cat(self.num_samples)

        keep = _first_occurrence(ids)
        c, n = c[keep], n[keep]

        keys = self._keys(n)
        out = {keys[0]: avg_at_n(n, c).mean()}
        for key, k in zip(keys[1:], self.ks):
            out[key] = pass_at_k(n, c, k).mean()
        return out


def _first_occurrence(ids: Tensor) -> Tensor:
    """Rows to keep: the first row of each non-negative id (min row index per id via scatter),
    and every row with id -1."""
    uniq, inverse = torch.unique(ids, return_inverse=True)
    pos = torch.arange(ids.numel(), device=ids.device)
    first = torch.full_like(uniq, ids.numel()).scatter_reduce(0, inverse, pos, reduce="amin")
    return (ids < 0) | (first[inverse] == pos)


def distinct_derivations(task, problem, responses: Sequence[str]) -> tuple[int, int] | None:
    """``(distinct valid derivations among the correct responses, derivations the problem has)``.

    Needs a task that knows its derivations (``derivation`` and ``valid_derivations``, as
    `ArithmeticTask` does); ``None`` for any other task. Correct responses that follow no valid
    derivation (``task.derivation`` is ``None``) are not counted.
    """
    if not (hasattr(task, "derivation") and hasattr(task, "valid_derivations")):
        return None
    found = {task.derivation(problem, r) for r in responses} - {None}
    return len(found), len(task.valid_derivations(problem))


class DerivationCoverage(Metric):
    """Per problem, how many distinct valid derivations its correct samples follow.

    ``update(distinct, available, problem_ids)``: one row per problem (see `distinct_derivations`);
    rows sharing a non-negative id count once, as in `PassAtK`. ``compute`` returns
    ``derivations`` (mean distinct derivations per problem), ``derivation_coverage`` (mean of
    distinct / available) and ``derivations_available`` (mean available), float64.

    Args:
        kwargs: torchmetrics' own ``Metric`` arguments (e.g. ``dist_sync_on_step``).
    """

    higher_is_better = True
    full_state_update = False
    is_differentiable = False

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.add_state("problem_ids", default=[], dist_reduce_fx="cat")
        self.add_state("distinct", default=[], dist_reduce_fx="cat")
        self.add_state("available", default=[], dist_reduce_fx="cat")

    def update(self, distinct: Tensor, available: Tensor, problem_ids: Tensor | None = None) -> None:
        d = torch.as_tensor(distinct, device=self.device).reshape(-1).to(torch.int64)
        a = torch.as_tensor(available, device=self.device).reshape(-1).to(torch.int64)
        if d.shape != a.shape or bool((d < 0).any()) or bool((d > a).any()) or bool((a < 1).any()):
            raise ValueError("need 0 <= distinct <= available and available >= 1, one entry per problem")
        ids = torch.full_like(d, -1) if problem_ids is None else torch.as_tensor(problem_ids, device=self.device).reshape(-1).to(torch.int64)
        self.problem_ids.append(ids)
        self.distinct.append(d)
        self.available.append(a)

    def compute(self) -> dict[str, Tensor]:
        names = ("derivations", "derivation_coverage", "derivations_available")
        if isinstance(self.distinct, list) and not self.distinct:
            return {k: torch.tensor(float("nan"), dtype=torch.float64, device=self.device) for k in names}
        keep = _first_occurrence(dim_zero_cat(self.problem_ids))
        d = dim_zero_cat(self.distinct)[keep].to(torch.float64)
        a = dim_zero_cat(self.available)[keep].to(torch.float64)
        return dict(zip(names, (d.mean(), (d / a).mean(), a.mean())))
