"""The report of the throughput benchmark: the same-work check (a contender whose work differs
from the reference's gets no ratio), the table of medians, the targets and the markdown text."""

from __future__ import annotations

import datetime
import os
import platform
import statistics

from benchmarks.throughput.contenders import CONFIG_INTRO, CONFIG_REFERENCE, CONFIGS, HOW, LABELS, OPT_IN, REFERENCE, SAME_WORK
from benchmarks.throughput.harness import Result, Setup


def check_same_work(results: dict[str, Result]) -> dict[str, str | None]:
    """Per contender: None if its work matches the reference's exactly, else what differs."""
    ref = results.get(REFERENCE)
    ref_work = None
    if ref is not None and ref.works and not ref.error:
        ref_work = {(w["generated"], w["loss_positions"]) for w in ref.works}
    verdict = {}
    for name, r in results.items():
        if r.error or not r.works:
            verdict[name] = "did not run"
            continue
        if name in CONFIGS:
            verdict[name] = None  # natural lengths: the work is reported per step, not forced equal
            continue
        gen = {w["generated"] for w in r.works}
        pos = {w["loss_positions"] for w in r.works}
        if ref_work is None:
            verdict[name] = f"no reference ({REFERENCE}) to compare with"
        elif name in SAME_WORK or name in OPT_IN:
            mine = {(w["generated"], w["loss_positions"]) for w in r.works}
            verdict[name] = None if mine == ref_work and len(mine) == 1 else (
                f"work differs: generated {sorted(gen)}, loss positions {sorted(pos)} vs "
                f"{sorted(ref_work)} (generated, loss positions) for {REFERENCE}"
            )
        else:  # TRD: the same student rollout as OPD, plus a revision
            ref_gen = {g for g, _ in ref_work}
            verdict[name] = None if gen == ref_gen and len(gen) == 1 else (
                f"student rollout differs: generated {sorted(gen)} vs {sorted(ref_gen)} for {REFERENCE}"
            )
    return verdict


def table(results: dict[str, Result], setup: Setup, verdict: dict, reference: str = REFERENCE) -> tuple[str, list[str]]:
    ref = results.get(reference)
    ref_median = statistics.median(ref.times) if ref and ref.times and not ref.error else None
    rows = [
        f"| contender | s/step (median) | IQR | rollout tok/s | generated tok/step | loss positions/step | peak RSS MB (+train) | ratio to {LABELS[reference].split(' (')[0]} |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    notes = []
    for name, r in results.items():
        if r.error or not r.times:
            reason = (r.error or "no steps").strip().splitlines()[-1]
            rows.append(f"| {LABELS[name]} | failed | | | | | | |")
            notes.append(f"{name}: {reason}")
            continue
        med = statistics.median(r.times)
        q = statistics.quantiles(r.times, n=4) if len(r.times) >= 2 else [med, med, med]
        gen = statistics.median(w["generated"] for w in r.works)
        pos = statistics.median(w["loss_positions"] for w in r.works)
        pos_text = f"{pos:.0f}" if len({w['loss_positions'] for w in r.works}) == 1 else (
            f"{pos:.0f} (median; {min(w['loss_positions'] for w in r.works)}–{max(w['loss_positions'] for w in r.works)})"
        )
        gen_text = f"{gen:.0f}"
        if "revision_tokens" in r.works[0]:
            rev = statistics.median(w["revision_tokens"] for w in r.works)
            gen_text += f" + {rev:.0f} revision"
            frac = statistics.mean(w["fraction_revised"] for w in r.works)
            stars = [w["t_star"] for w in r.works if w["t_star"] == w["t_star"]]
            notes.append(
                f"{name}: revised {frac:.0%} of the rows (mean t* {statistics.mean(stars) if stars else float('nan'):.1f}); "
                f"the revision sampled a median {rev:.0f} tokens per step"
            )
        rss = f"{r.rss_peak:.0f} (+{r.rss_peak - r.rss_ready:.0f})" if r.rss_peak and r.rss_ready else "?"
        if verdict.get(name):
            ratio = "refused"
            notes.append(f"{name}: {verdict[name]}")
        elif ref_median is None:
            ratio = "?"
        else:
            ratio = f"{med / ref_median:.2f}×"
            if name in OPT_IN:
                ratio += " (same tokens, more compute)"
            elif name not in SAME_WORK and name != reference:
                ratio += " (TRD: + revision)"
        rows.append(
            f"| {LABELS[name]} | {med:.3f} | {q[0]:.3f}–{q[2]:.3f} | {gen / med:.0f} | {gen_text} | {pos_text} | {rss} | {ratio} |"
        )
    return "\n".join(rows), notes


def targets(results: dict[str, Result], verdict: dict) -> list[str]:
    med = {n: statistics.median(r.times) for n, r in results.items() if r.times and not r.error and not verdict.get(n)}
    out = []
    if "ours_opd" in med and "bare" in med:
        x = med["ours_opd"] / med["bare"]
        out.append(f"ours OPD / bare loop = {x:.2f} (target <= 1.15: {'met' if x <= 1.15 else 'MISSED'})")
    for trl in ("trl_distillation", "trl_gkd"):
        if "ours_opd" in med and trl in med:
            x = med[trl] / med["ours_opd"]
            out.append(f"{trl} / ours OPD = {x:.2f} (target >= 1.5: {'met' if x >= 1.5 else 'MISSED'})")
    for reference, trds in (
        ("ours_opd", ("ours_trd_rewrite", "ours_trd_splice", "ours_trd_splice_two_pass")),
        (CONFIG_REFERENCE, ("arith_trd_rewrite", "arith_trd_splice", "arith_trd_splice_two_pass")),
    ):
        for trd in trds:
            if reference in med and trd in med:
                x = med[trd] / med[reference]
                out.append(f"{trd} / {reference} = {x:.2f} (target <= 1.5: {'met' if x <= 1.5 else 'MISSED'})")
    return out



def _versions() -> str:
    import importlib.metadata as md

    parts = []
    for pkg in ("torch", "lightning", "transformers", "trl"):
        try:
            parts.append(f"{pkg} {md.version(pkg)}")
        except md.PackageNotFoundError:
            parts.append(f"{pkg} not installed")
    return ", ".join(parts)



def render(results: dict[str, Result], setup: Setup, load_before, load_after, wall: float) -> str:
    """The text printed after a run: how it was measured, the tables, the same-work notes, the targets."""
    verdict = check_same_work(results)
    forced = {n: r for n, r in results.items() if n not in CONFIGS}
    configs = {n: r for n, r in results.items() if n in CONFIGS}
    rows, notes = table(forced, setup, verdict) if forced else ("", [])
    if configs:
        config_rows, config_notes = table(configs, setup, verdict, CONFIG_REFERENCE)
        rows = "\n\n".join(part for part in (rows, CONFIG_INTRO + "\n\n" + config_rows) if part)
        notes += config_notes
    (student_hidden, student_layers), (teacher_hidden, teacher_layers) = setup.student_size, setup.teacher_size
    header = [
        f"Measured {datetime.datetime.now().isoformat(timespec='minutes')} on {platform.processor() or platform.machine()} "
        f"({os.cpu_count()} CPU cores, {setup.threads} torch thread(s) per contender, see --threads), {_versions()}.",
        f"Load average (1/5/15 min) before: {load_before[0]:.2f}/{load_before[1]:.2f}/{load_before[2]:.2f}, after: "
        f"{load_after[0]:.2f}/{load_after[1]:.2f}/{load_after[2]:.2f} (the machine is shared; the run took {wall:.0f} s).",
        f"Student hidden {student_hidden} × {student_layers} layers, teacher {teacher_hidden} × {teacher_layers} "
        f"(random, from config), on {'the GPU' if setup.accelerator == 'gpu' else 'the CPU'}, batch {setup.batch_size}, exactly "
        f"{setup.new_tokens} new tokens per rollout, reverse KL, AdamW; {setup.warmup} warm-up steps dropped, "
        f"median of {setup.steps} interleaved steps per contender.",
    ]
    check = ["ratio to ours OPD = contender's s/step ÷ ours. Same-work check: "
             + ("passed for every contender that ran." if not any(verdict.values()) else "see the notes.")]
    lines = header + ["", rows, ""] + check + [f"- {n}" for n in notes] + [""] + [f"- {t}" for t in targets(results, verdict)]
    return "\n".join(lines)


def markdown(command: str, text: str) -> str:
    """The ``--out`` file: the command that made it, the run's text, and how the work was made equal."""
    return f"# Throughput of one on-policy distillation step\n\nCommand: `{command.strip()}`\n\n{text}\n\n{HOW}\n"
