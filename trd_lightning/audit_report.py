"""The report of the prefix-failure audit: the summary table (printed by ``trd audit`` and
`run_audit`), ``report.md``, ``summary.json`` and ``traces.jsonl``; the plots are `audit_plots`.

The numbers come from `trd_lightning.audit` (the computation); this module only formats and
writes them. What each number means: docs/audit.md.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from trd_lightning.audit import AFTER_ERROR, SUMMARY_STATS, AuditResult

_LABELS = {
    "onset_mass": "teacher correction-onset mass",
    "continue_mass": "teacher continuing mass q(y_t)",
    "bimodality": "bimodality 2*p2",
    "teacher_entropy": "teacher entropy (nats)",
    "teacher_logprob": "teacher log q(y_t)",
    "forward_kl": "forward KL(q||p)",
    "reverse_kl": "reverse KL(p||q)",
    "student_entropy": "student entropy (nats)",
}


def _fmt(x) -> str:
    return "nan" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.4f}"


def summary_rows(summary: dict) -> list[list[str]]:
    header = ["statistic", f"after first error (+{AFTER_ERROR})", "elsewhere", "correct rollouts", "all positions"]
    rows = [header]
    for name in SUMMARY_STATS:
        rows.append([_LABELS[name], *(_fmt(summary[k][name]) for k in ("after_error", "elsewhere", "correct_rows", "mean"))])
    if "revised" in summary:
        rev = summary["revised"]
        for name in ("onset_mass", "bimodality"):
            rows.append([f"REVISED {_LABELS[name]}", *(_fmt(rev[k][name]) for k in ("after_error", "elsewhere")), "", _fmt(rev["mean"][name])])
    return rows


def format_summary(summary: dict) -> str:
    rows = summary_rows(summary)
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    t = summary["t_star"]
    head = (
        f"prefix audit: {summary['num_rollouts']} rollouts ({summary['split']}), accuracy {summary['accuracy']:.3f}, "
        f"first error from {summary['aligned_on']} in {summary['rows_with_first_error']} rows; "
        f"t* ({summary['criterion']}) found in {t['fraction_failed']:.3f} of rows, mean {_fmt(t['mean'])}"
    )
    if "revised" in summary:
        rev = summary["revised"]
        head += f"\nrevised: accuracy {rev['accuracy']:.3f}, correction-onset mass {_fmt(rev['mean']['onset_mass'])} vs raw {_fmt(summary['mean']['onset_mass'])}"
    return head + "\n" + "\n".join(lines)


def json_safe(x):
    if isinstance(x, float):
        return None if math.isnan(x) or math.isinf(x) else x
    if isinstance(x, dict):
        return {k: json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [json_safe(v) for v in x]
    return x


PLOTS = ("mass_around_error.png", "kl_by_position.png", "t_star.png", "worked_example.png")


def write_report(out: Path, summary: dict, raw: AuditResult, revised: AuditResult | None, tokenizer, *, plots: bool = True) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "summary.json").write_text(json.dumps(json_safe(summary), indent=1))
    with open(out / "traces.jsonl", "w") as f:
        for rec in raw.traces:
            f.write(json.dumps(json_safe({"trajectory": "raw", **rec})) + "\n")
        for rec in revised.traces if revised is not None else []:
            f.write(json.dumps(json_safe({"trajectory": "revised", **rec})) + "\n")
    images = []
    if plots:
        from trd_lightning import audit_plots

        images = audit_plots.plot_all(out, summary, raw, revised, tokenizer)
    (out / "report.md").write_text(render_markdown(summary, images, raw))


def render_markdown(summary: dict, images: list[str], raw: AuditResult) -> str:
    rows = summary_rows(summary)
    table = ["| " + " | ".join(rows[0]) + " |", "|" + "---|" * len(rows[0])] + ["| " + " | ".join(r) + " |" for r in rows[1:]]
    al = summary["aligned"]
    aligned = ["| offset | rows | " + " | ".join(_LABELS[n] for n in ("onset_mass", "continue_mass", "bimodality", "teacher_entropy")) + " |", "|---" * 6 + "|"]
    for i, o in enumerate(al["offsets"]):
        aligned.append(f"| {o:+d} | {al['count'][i]} | " + " | ".join(_fmt(al[n][i]) for n in ("onset_mass", "continue_mass", "bimodality", "teacher_entropy")) + " |")
    t = summary["t_star"]
    parts = [
        "# Prefix-failure audit",
        "",
        f"{summary['num_rollouts']} student rollouts on the `{summary['split']}` split; verifier accuracy "
        f"{summary['accuracy']:.3f}. First error located by the **{summary['aligned_on']}** in "
        f"{summary['rows_with_first_error']} rollouts. Correction-onset tokens: "
        + ", ".join(f"`{s}`" for s in summary["correction_onsets"])
        + f". t* criterion `{summary['criterion']}` (threshold {summary['threshold']}, top-p {summary['top_p']}): "
        f"found in {t['fraction_failed']:.3f} of rollouts, mean position {_fmt(t['mean'])}.",
        "",
        f"\"After first error\" is offset +{AFTER_ERROR}: the first position whose prefix contains the wrong token, "
        "where a teacher that carries on or corrects shows its split. Definitions: docs/audit.md.",
        "",
        "## Summary",
        "",
        *table,
        "",
        "## Around the first error",
        "",
        *aligned,
        "",
    ]
    if "revised" in summary:
        rev = summary["revised"]
        parts += [
            "## Raw vs revised trajectories",
            "",
            "| | raw | revised |",
            "|---|---|---|",
            f"| verifier accuracy | {summary['accuracy']:.4f} | {rev['accuracy']:.4f} |",
            f"| correction-onset mass, all positions | {_fmt(summary['mean']['onset_mass'])} | {_fmt(rev['mean']['onset_mass'])} |",
            f"| correction-onset mass after first error | {_fmt(summary['after_error']['onset_mass'])} | {_fmt(rev['after_error']['onset_mass'])} |",
            f"| bimodality, all positions | {_fmt(summary['mean']['bimodality'])} | {_fmt(rev['mean']['bimodality'])} |",
            f"| rollouts with a first error | {summary['rows_with_first_error']} | {rev['rows_with_first_error']} |",
            "",
        ]
    for img in images:
        parts += [f"![{img}]({img})", ""]
    example = next((r for r in raw.traces if not r["correct"] and r["first_error"] >= 0), None)
    if example is not None:
        fe = example["first_error"]
        parts += ["## Worked example", "", f"Response `{example['response']}`, first error at token {fe}.", "",
                  "| t | token | q(token) | correction mass | bimodality | teacher top tokens |", "|---|---|---|---|---|---|"]  # fmt: skip
        for i in range(max(0, fe - 3), min(len(example["tokens"]), fe + 5)):
            top = ", ".join(f"`{s}` {p:.2f}" for s, p in example["teacher_top"][i])
            mark = " **(first error)**" if i == fe else ""
            parts.append(
                f"| {i}{mark} | `{example['tokens'][i]}` | {math.exp(example['teacher_logprob'][i]):.3f} | "
                f"{example['onset_mass'][i]:.3f} | {example['bimodality'][i]:.3f} | {top} |"
            )
        parts.append("")
    return "\n".join(parts)
