"""The prefix-failure audit: where do the student's rollouts go wrong, and what does the teacher
say there? `run_audit` samples rollouts, computes `trd_lightning.diagnostics` along them and hands the
numbers to `trd_lightning.audit_report`, which prints the table and writes the report folder;
``trd audit`` (see `trd_lightning.cli`) and the notebooks call it. The per-rollout pieces
(`sample_rollout`, `diagnose`, `first_errors`, `rollout_traces`, `summarize`) are shared with the
`PrefixAudit` callback.

Only the `RolloutModel` protocol (``task``, ``tokenizer``, ``sample``, ``score``, ``teacher_prompt``)
and the tokenizer are used, so any Hugging Face causal-LM pair works. What the report shows and how
each number is defined: docs/audit.md.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import torch

from trd_lightning.diagnostics import (
    RolloutDiagnostics,
    align_on_error,
    at_offset_and_elsewhere,
    check_criterion,
    onset_token_ids,
    split_onsets,
    rollout_diagnostics,
)
from trd_lightning.revision import Reviser
from trd_lightning.rollout import Context, Rollout, Sampling, build_context, decode_and_verify, left_pad

_ALIGN_ON = ("auto", "verifier", "t_star")
#: statistics in the summary table and the JSON (in this order)
SUMMARY_STATS = (
    "onset_mass", "continue_mass", "bimodality", "teacher_entropy", "teacher_logprob",
    "forward_kl", "reverse_kl", "student_entropy",
)  # fmt: skip
#: offset from the first error where the teacher's split shows: the first position whose prefix
#: contains the wrong token (offset 0 is the wrong token itself)
AFTER_ERROR = 1


@dataclass
class AuditOptions:
    """Options of ``trd audit`` (``--audit.<name>``); the arguments of `run_audit` of the same name."""

    num_problems: int = 64
    split: str = "test"
    output_dir: str = "reports/audit"
    batch_size: int = 32
    sampling: Sampling | None = None
    correction_onsets: list[str] | None = None
    criterion: str = "prob"
    threshold: float = 0.05
    top_p: float = 0.9
    window: int = 4
    align_on: str = "auto"
    seed: int = 0
    #: a reviser whose trajectories are audited side by side (e.g.
    #: ``--audit.reviser trd_lightning.revision.RewriteReviser``); default: the one of a
    #: `TrajectoryRevision` callback in the config, if any
    reviser: Reviser | None = None
    #: set False to ignore the config's `TrajectoryRevision` callback
    compare_revised: bool = True

    def kwargs(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name != "compare_revised"}


def audit_with_trainer(trainer, model, datamodule=None, ckpt_path: str | None = None, options: AuditOptions | None = None) -> dict:
    """`run_audit` as ``trd audit`` runs it: on the trainer's device, rank zero only, with the
    reviser of the config's `TrajectoryRevision` callback unless one is given."""
    options = options or AuditOptions()
    kwargs = options.kwargs()
    if kwargs["reviser"] is None and options.compare_revised:
        kwargs["reviser"] = next((cb.reviser for cb in trainer.callbacks if isinstance(getattr(cb, "reviser", None), Reviser)), None)
    if not trainer.is_global_zero:
        return {}
    return run_audit(model, datamodule, ckpt_path=ckpt_path, device=trainer.strategy.root_device, **kwargs)


# --- rollouts and their diagnostics (shared with the PrefixAudit callback) -----------------------
def sample_rollout(module, problems: list, sampling: Sampling | None = None) -> Rollout:
    """Sample ``y_o`` from the student for ``problems`` and lay out both roles' contexts."""
    task, tok = module.task, module.tokenizer
    prompts = [task.student_prompt(p) for p in problems]
    ids, mask = module.sample(prompts, role="student", sampling=sampling)
    limit = module.max_prompt_length
    student = build_context(tok, prompts, ids, mask, limit)
    teacher = build_context(tok, [module.teacher_prompt(p) for p in problems], ids, mask, limit)
    return Rollout(list(problems), ids, mask, student, teacher)


@torch.no_grad()
def onset_continuation_logprob(module, rollout: Rollout, sequence: tuple[int, ...], max_tokens: int = 32768) -> torch.Tensor:
    """[B, N]: at every response position t, the teacher's ``log q(o_2..o_m | c, y_<t, o_1)`` of a
    multi-token onset ``o`` (NaN outside the response).

    Each position needs its own forward (the onset is inserted after ``y_<t``), batched over
    positions in chunks of about ``max_tokens`` tokens: about N times a teacher forward per
    multi-token onset, which is why single-token onsets (" Wait" in a real vocabulary) are cheaper.
    """
    ctx, mask = rollout.teacher, rollout.response_mask.bool()
    b_idx, t_idx = mask.nonzero(as_tuple=True)
    out = torch.full(mask.shape, float("nan"), device=mask.device)
    onset = torch.tensor(sequence, device=ctx.input_ids.device)
    pad = module.tokenizer.pad_token_id
    per_chunk = max(1, max_tokens // (ctx.input_ids.shape[1] + len(sequence)))
    for start in range(0, len(b_idx), per_chunk):
        rows, ts = b_idx[start : start + per_chunk], t_idx[start : start + per_chunk]
        prefixes = [ctx.input_ids[b, : ctx.prompt_width + t][ctx.attention_mask[b, : ctx.prompt_width + t].bool()] for b, t in zip(rows.tolist(), ts.tolist())]
        ids, prefix_mask = left_pad(prefixes, pad, ctx.input_ids.device)
        block = onset.expand(len(prefixes), -1)
        logits = module.score(Context.joined(ids, prefix_mask, block, torch.ones_like(block, dtype=torch.bool)), role="teacher")
        logp = logits[:, 1:].float().log_softmax(-1).gather(-1, block[:, 1:].unsqueeze(-1)).squeeze(-1).sum(-1)
        out[rows, ts] = logp
    return out


@torch.no_grad()
def diagnose(module, rollout: Rollout, onset_ids, **kwargs) -> RolloutDiagnostics:
    """Score ``rollout`` with both roles (no grad) and compute every statistic, on the CPU."""
    teacher_logits = module.score(rollout.teacher, role="teacher")
    student_logits = module.score(rollout.student, role="student")
    _, multi = split_onsets(onset_ids)
    continuations = {s: onset_continuation_logprob(module, rollout, s) for s in multi}
    d = rollout_diagnostics(
        student_logits, teacher_logits, rollout.response_ids, rollout.response_mask, onset_ids,
        onset_continuations=continuations, **kwargs,
    )
    return RolloutDiagnostics(**{f.name: getattr(d, f.name).cpu() for f in fields(d)})


def _char_to_token_index(tokenizer, ids: Sequence[int], char_index: int) -> int:
    """The response token that holds character ``char_index`` of the decoded response.

    Counts the tokens that decode to non-empty text ending at or before ``char_index``; an index
    one past the text maps to the token after the last visible one (the EOS, if the row has it).
    """
    ids = list(ids)
    if not ids:
        return 0
    ends = [len(s) for s in tokenizer.batch_decode([ids[: i + 1] for i in range(len(ids))], skip_special_tokens=True)]
    starts = [0, *ends[:-1]]
    return sum(1 for s, e in zip(starts, ends) if e > s and e <= char_index)


def _verifier_first_errors(task, tokenizer, rollout: Rollout, texts: list[str]) -> torch.Tensor | None:
    """Per-row token index of the task's first error (``-1``: none); ``None`` if the task has no
    ``first_error_char`` hook."""
    hook = getattr(task, "first_error_char", None)
    if hook is None:
        return None
    out = []
    for problem, text, ids, m in zip(rollout.problems, texts, rollout.response_ids, rollout.response_mask):
        c = hook(problem, text)
        out.append(-1 if c is None else _char_to_token_index(tokenizer, ids[m].tolist(), c))
    return torch.tensor(out, dtype=torch.long)


def first_errors(task, tokenizer, rollout: Rollout, texts: list[str], d: RolloutDiagnostics, align_on: str) -> tuple[torch.Tensor, str]:
    """The first error of each row and where it came from (``verifier`` or ``t_star``)."""
    if align_on not in _ALIGN_ON:
        raise ValueError(f"unknown align_on {align_on!r}; choose one of {_ALIGN_ON}")
    if align_on in ("auto", "verifier"):
        found = _verifier_first_errors(task, tokenizer, rollout, texts)
        if found is not None:
            return found, "verifier"
        if align_on == "verifier":
            raise ValueError(
                f"align_on='verifier' needs a task with first_error_char(problem, response); "
                f"{type(task).__name__} has none: use align_on='t_star'"
            )
    return d.t_star.clone(), "t_star"


def rollout_traces(task, tokenizer, rollout: Rollout, d: RolloutDiagnostics, texts, correct, first_error, *, top: int = 3, limit: int | None = None, **extra) -> list[dict]:
    """One JSON-able record per rollout: the response, its tokens and every per-position statistic."""
    records = []
    n_rows = len(texts) if limit is None else min(limit, len(texts))
    vocab_cache: dict[int, str] = {}

    def tok_str(i: int) -> str:
        if i not in vocab_cache:
            vocab_cache[i] = tokenizer.decode([i]) if i >= 0 else ""
        return vocab_cache[i]

    for b in range(n_rows):
        m = d.mask[b]
        ids = rollout.response_ids[b][m.to(rollout.response_ids.device)].tolist()
        rec = {
            **extra,
            "problem_id": task.problem_id(rollout.problems[b]),
            "response": texts[b],
            "correct": bool(correct[b]),
            "first_error": int(first_error[b]),
            "t_star": int(d.t_star[b]),
            "tokens": [tok_str(i) for i in ids],
        }
        for name in RolloutDiagnostics.POSITION_STATS:
            rec[name] = [round(float(v), 5) for v in getattr(d, name)[b][m]]
        rec["teacher_top"] = [
            [[tok_str(int(i)), round(float(p), 4)] for i, p in zip(ti[:top], tp[:top])]
            for ti, tp in zip(d.topk_ids[b][m], d.topk_probs[b][m])
        ]
        records.append(rec)
    return records


def summarize(d: RolloutDiagnostics, first_error: torch.Tensor, correct: torch.Tensor, window: int) -> dict:
    """The numbers of the report: at the first error's next position vs elsewhere, aligned curves,
    ``t*`` statistics and KL by position."""
    correct = correct.bool()
    has_error = first_error >= 0
    out: dict[str, Any] = {
        "num_rollouts": int(d.mask.shape[0]),
        "accuracy": float(correct.float().mean()),
        "rows_with_first_error": int(has_error.sum()),
        "after_error_offset": AFTER_ERROR,
        "mean": {}, "after_error": {}, "elsewhere": {}, "correct_rows": {},
    }  # fmt: skip
    for name in SUMMARY_STATS:
        values = getattr(d, name)
        out["mean"][name] = d.mean(name)
        at, elsewhere = at_offset_and_elsewhere(values, first_error, AFTER_ERROR)
        out["after_error"][name], out["elsewhere"][name] = at, elsewhere
        out["correct_rows"][name] = float(values[correct].nanmean()) if correct.any() else math.nan
    aligned = {"offsets": list(range(-window, window + 1))}
    for name in SUMMARY_STATS:
        a = align_on_error(getattr(d, name), first_error, window)
        aligned[name] = a.mean.tolist()
        aligned["count"] = a.count.tolist()
    out["aligned"] = aligned
    t_star = d.t_star
    failed = t_star >= 0
    out["t_star"] = {
        "fraction_failed": float(failed.float().mean()),
        "mean": float(t_star[failed].float().mean()) if failed.any() else math.nan,
        "values": t_star.tolist(),
    }
    out["kl_by_position"] = {
        "forward_kl": d.forward_kl.nanmean(0).tolist(),
        "reverse_kl": d.reverse_kl.nanmean(0).tolist(),
        "count": d.mask.sum(0).tolist(),
    }
    return out


# --- the audit ---------------------------------------------------------------------------------
def load_checkpoint(module, ckpt_path: str | Path) -> None:
    """Load a Lightning checkpoint's (student) weights into ``module``; a clear error on mismatch."""
    path = Path(ckpt_path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist; pass the .ckpt file written by `trd fit`")
    from trd_lightning.checkpoint_io import load_checkpoint_file  # one line for each way a file can be bad

    load_state_into(module, load_checkpoint_file(path)["state_dict"], path)


def load_state_into(module, state: dict, path) -> None:
    """``module.load_state_dict(state)``, naming the checkpoint and the likely cause on a mismatch."""
    try:
        module.load_state_dict(state)
    except RuntimeError as err:
        raise RuntimeError(
            f"checkpoint {path} does not match the configured model ({type(module).__name__}); use the config "
            f"the checkpoint was trained with (same student, LoRA on/off). Details: {err}"
        ) from None


def _revise_fn(reviser, module) -> Callable[[Rollout], Rollout] | None:
    if reviser is None:
        return None
    if hasattr(reviser, "revise"):
        setup = getattr(reviser, "setup", None)
        if callable(setup):
            setup(module)
        return lambda rollout: reviser.revise(module, rollout)
    if callable(reviser):
        return reviser
    raise TypeError(f"reviser must have revise(module, rollout) or be a callable Rollout -> Rollout, got {type(reviser).__name__}")


def _attach_task(module, task) -> Any:
    # DistillationModule finds its task through trainer.datamodule during fit; outside fit (the
    # audit, a notebook) hand it the data module's task so `teacher_prompt` & co. work.
    if task is not None and getattr(module, "_task", "absent") is None:
        module._task = task
    return task if task is not None else module.task


def run_audit(
    module,
    datamodule=None,
    num_problems: int = 64,
    output_dir: str | Path | None = "reports/audit",
    split: str = "test",
    sampling: Sampling | None = None,
    *,
    reviser: Any = None,
    correction_onsets: Sequence[str] | None = None,
    criterion: str = "prob",
    threshold: float = 0.05,
    top_p: float = 0.9,
    window: int = 4,
    align_on: str = "auto",
    batch_size: int = 32,
    seed: int = 0,
    ckpt_path: str | Path | None = None,
    device: torch.device | str | None = None,
    task=None,
    plots: bool = True,
    verbose: bool = True,
) -> dict:
    """Audit ``num_problems`` student rollouts of ``split``; returns the summary dict.

    Args:
        module: a `RolloutModel` (e.g. `DistillationModule`).
        datamodule: supplies the task (``datamodule.task``) unless ``task`` is given.
        output_dir: the report folder (``report.md``, ``summary.json``, ``traces.jsonl``, PNGs);
            ``None`` writes nothing.
        sampling: how the student samples; default: the module's own (what training sees).
        reviser: optional, a `trd_lightning.revision.Reviser` (``revise(module, rollout)``) or a
            callable ``Rollout -> Rollout``: its trajectories are diagnosed too, side by side.
        correction_onsets: strings whose teacher mass is "correcting" (default:
            ``task.correction_onsets``); each must be a single token.
        criterion / threshold / top_p: how ``t*`` is found (see `trd_lightning.diagnostics`).
        window: offsets ``-window..window`` around the first error.
        align_on: ``verifier`` (the task's ``first_error_char``), ``t_star``, or ``auto`` (verifier
            when the task has the hook).
        ckpt_path: a Lightning checkpoint to load first (its student weights).
        device: move the module there first (default: leave it where it is).
    """
    # Validate everything before sampling a token.
    task = _attach_task(module, task if task is not None else getattr(datamodule, "task", None))
    if num_problems < 1:
        raise ValueError(f"num_problems must be >= 1, got {num_problems}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if window < 0:
        raise ValueError(f"window must be >= 0, got {window}")
    if align_on not in _ALIGN_ON:
        raise ValueError(f"unknown align_on {align_on!r}; choose one of {_ALIGN_ON}")
    tokenizer = module.tokenizer
    onsets = list(correction_onsets if correction_onsets is not None else task.correction_onsets)
    onset_ids = onset_token_ids(tokenizer, onsets)
    diag_kwargs = dict(criterion=criterion, threshold=threshold, top_p=top_p)
    check_criterion(criterion, threshold, top_p)
    all_problems = task.problems(split)
    if len(all_problems) == 0:
        raise ValueError(f"the task has no {split} problems to audit")
    if len(all_problems) < num_problems:
        warnings.warn(f"the {split} split has {len(all_problems)} problems; auditing all of them, not {num_problems}", stacklevel=2)
    problems = [all_problems[i] for i in range(min(num_problems, len(all_problems)))]
    if ckpt_path is not None:
        load_checkpoint(module, ckpt_path)
    if device is not None:
        module.to(device)
    revise = _revise_fn(reviser, module)

    # Restore each submodule's own mode afterwards: a frozen teacher stays in eval mode.
    modes = [(m, m.training) for m in module.modules()]
    module.eval()
    raw_parts, rev_parts = _Collected(), _Collected()
    devices = [module.device] if getattr(module, "device", torch.device("cpu")).type == "cuda" else []
    try:
        with torch.random.fork_rng(devices=devices), torch.no_grad():
            torch.manual_seed(seed)
            for start in range(0, len(problems), batch_size):
                rollout = sample_rollout(module, problems[start : start + batch_size], sampling)
                raw_parts.add(module, task, rollout, onset_ids, diag_kwargs, align_on)
                if revise is not None:
                    rev_parts.add(module, task, revise(rollout), onset_ids, diag_kwargs, align_on)
    finally:
        for m, training in modes:
            m.training = training

    raw = raw_parts.finish(window)
    summary = {
        "split": split,
        "criterion": criterion,
        "threshold": threshold,
        "top_p": top_p,
        "window": window,
        "aligned_on": raw.source,
        "correction_onsets": onsets,
        "correction_onset_ids": onset_ids,
        **raw.summary,
    }
    revised = None
    if revise is not None:
        revised = rev_parts.finish(window)
        summary["revised"] = {k: revised.summary[k] for k in ("num_rollouts", "accuracy", "rows_with_first_error", "mean", "after_error", "elsewhere")}
    # The report depends on these statistics, not the reverse: imported here, not at module load.
    from trd_lightning.audit_report import format_summary, write_report

    if verbose:
        print(format_summary(summary))
    if output_dir is not None:
        write_report(Path(output_dir), summary, raw, revised, tokenizer, plots=plots)
        summary["output_dir"] = str(output_dir)
    return summary


@dataclass
class AuditResult:
    """One trajectory kind's audit (raw or revised): its diagnostics, first errors, traces and summary."""

    d: RolloutDiagnostics
    first_error: torch.Tensor
    correct: torch.Tensor
    source: str
    traces: list[dict]
    summary: dict


class _Collected:
    """Accumulates per-batch diagnostics (on the CPU) and traces."""

    def __init__(self):
        self.parts, self.errors, self.correct, self.traces, self.source = [], [], [], [], None

    def add(self, module, task, rollout: Rollout, onset_ids, diag_kwargs, align_on) -> None:
        d = diagnose(module, rollout, onset_ids, **diag_kwargs)
        texts, verdicts = decode_and_verify(task, module.tokenizer, rollout.problems, rollout)
        correct = torch.tensor(verdicts)
        first, self.source = first_errors(task, module.tokenizer, rollout, texts, d, align_on)
        self.traces += rollout_traces(task, module.tokenizer, rollout, d, texts, correct, first)
        self.parts.append(d)
        self.errors.append(first)
        self.correct.append(correct)

    def finish(self, window: int) -> AuditResult:
        d = RolloutDiagnostics.concat(self.parts)
        first, correct = torch.cat(self.errors), torch.cat(self.correct)
        return AuditResult(d, first, correct, self.source, self.traces, summarize(d, first, correct, window))


# The report (tables, markdown, JSON files, plots) lives in `trd_lightning.audit_report`, which
# imports this module's statistics; its public names stay importable from here (as before the split),
# resolved on first use so that neither module imports the other at load time.
_REPORT_NAMES = frozenset({"PLOTS", "format_summary", "json_safe", "write_report"})


def __getattr__(name: str):
    if name in _REPORT_NAMES:
        from trd_lightning import audit_report

        return getattr(audit_report, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
