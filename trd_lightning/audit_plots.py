"""The PNG plots of the prefix-failure audit report (matplotlib, Agg: no display needed)."""

from __future__ import annotations

import math
from pathlib import Path

# Figure objects, not pyplot: no global backend switch (a notebook keeps its inline plots) and no
# display needed (the audit runs on servers and in tests); savefig renders PNG with Agg.
from matplotlib.figure import Figure
import numpy as np  # noqa: E402


def plot_all(out: Path, summary: dict, raw, revised, tokenizer) -> list[str]:
    """Write every plot into ``out``; returns the file names in report order."""
    names = [
        _mass_around_error(out / "mass_around_error.png", summary),
        _kl_by_position(out / "kl_by_position.png", summary),
        _t_star_distribution(out / "t_star.png", summary, raw),
        _worked_example(out / "worked_example.png", raw, tokenizer),
    ]
    if revised is not None:
        names.append(_raw_vs_revised(out / "raw_vs_revised.png", summary))
    return [n for n in names if n]


def _save(fig, path: Path) -> str:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return path.name


def _nan(xs) -> np.ndarray:
    return np.array([math.nan if x is None else x for x in xs], dtype=float)


def _mass_around_error(path: Path, summary: dict) -> str:
    al = summary["aligned"]
    x = np.array(al["offsets"])
    fig = Figure(figsize=(7, 4))
    ax = fig.subplots()
    ax.plot(x, _nan(al["onset_mass"]), "o-", color="tab:red", label="correcting: mass on correction onsets")
    ax.plot(x, _nan(al["continue_mass"]), "s-", color="tab:blue", label="continuing: q(student's token)")
    ax.plot(x, _nan(al["bimodality"]), "^--", color="tab:purple", label="bimodality 2·p2")
    if "revised" in summary:
        ax.axhline(summary["revised"]["mean"]["onset_mass"], color="tab:green", ls=":", label="revised: mean correction mass")
    ax.axhline(summary["mean"]["onset_mass"], color="tab:red", ls=":", alpha=0.5, label="raw: mean correction mass")
    ax.axvline(0, color="grey", lw=0.8)
    ax.set_xlim(x[0] - 0.5, x[-1] + 0.5)
    ax.set_xlabel(f"offset from the first error ({summary['aligned_on']}); 0 = the wrong token")
    ax.set_ylabel("teacher probability")
    ax.set_ylim(-0.02, 1.02)
    ax.set_title(f"Teacher around the first error ({summary['rows_with_first_error']} rollouts)")
    ax.legend(fontsize=7, loc="upper left")
    return _save(fig, path)


def _kl_by_position(path: Path, summary: dict) -> str:
    kl, al = summary["kl_by_position"], summary["aligned"]
    fig = Figure(figsize=(10, 3.8))
    a, b = fig.subplots(1, 2)
    t = np.arange(len(kl["forward_kl"]))
    a.plot(t, _nan(kl["forward_kl"]), label="forward KL(q‖p)")
    a.plot(t, _nan(kl["reverse_kl"]), label="reverse KL(p‖q)")
    a.set_xlabel("response position t")
    a.set_ylabel("nats (mean over rollouts)")
    a.set_title("KL by position")
    a.legend(fontsize=8)
    x = np.array(al["offsets"])
    b.plot(x, _nan(al["forward_kl"]), "o-", label="forward KL")
    b.plot(x, _nan(al["reverse_kl"]), "s-", label="reverse KL")
    b.axvline(0, color="grey", lw=0.8)
    b.set_xlabel("offset from the first error")
    b.set_title("KL around the first error")
    b.legend(fontsize=8)
    return _save(fig, path)


def _t_star_distribution(path: Path, summary: dict, raw) -> str:
    t = np.array(summary["t_star"]["values"])
    fe = raw.first_error.numpy()
    fig = Figure(figsize=(7, 3.8))
    ax = fig.subplots()
    top = int(max(t.max(initial=0), fe.max(initial=0))) + 2
    bins = np.arange(-0.5, top + 0.5, 1)
    ax.hist(t[t >= 0], bins=bins, alpha=0.6, label=f"t* ({summary['criterion']}), {int((t >= 0).sum())} rollouts")
    if summary["aligned_on"] == "verifier":
        ax.hist(fe[fe >= 0], bins=bins, histtype="step", lw=1.5, label=f"verifier's first error, {int((fe >= 0).sum())} rollouts")
    ax.set_xlabel("response position")
    ax.set_ylabel("rollouts")
    ax.set_title(f"First failed position (none in {int((t < 0).sum())} of {len(t)} rollouts)")
    ax.legend(fontsize=8)
    return _save(fig, path)


def _pick_example(raw) -> int | None:
    """A failed rollout whose first error has a next position (where the split shows)."""
    lengths = raw.d.mask.sum(1)
    for b in range(len(raw.first_error)):
        if not raw.correct[b] and 0 <= raw.first_error[b] < lengths[b] - 1:
            return b
    for b in range(len(raw.first_error)):
        if not raw.correct[b]:
            return b
    return None


def _worked_example(path: Path, raw, tokenizer, before: int = 6, after: int = 9) -> str:
    b = _pick_example(raw)
    fig = Figure(figsize=(11, 3.6))
    ax = fig.subplots()
    if b is None:
        ax.text(0.5, 0.5, "no failed rollout to show", ha="center", va="center")
        ax.axis("off")
        return _save(fig, path)
    d, fe = raw.d, int(raw.first_error[b])
    n = int(d.mask[b].sum())
    centre = fe if fe >= 0 else 0
    lo, hi = max(0, centre - before), min(n, centre + after + 1)
    probs = d.topk_probs[b, lo:hi].T.numpy()  # [k, T]
    ids = d.topk_ids[b, lo:hi].T.tolist()
    sampled = raw.traces[b]["tokens"][lo:hi]
    ax.imshow(probs, aspect="auto", cmap="Blues", vmin=0, vmax=1)
    for r, row in enumerate(ids):
        for c, i in enumerate(row):
            label = repr(tokenizer.decode([i]))[1:-1][:6]
            ax.text(c, r, f"{label}\n{probs[r, c]:.2f}", ha="center", va="center", fontsize=7, color="white" if probs[r, c] > 0.6 else "black")
    ax.set_xticks(range(hi - lo))
    ax.set_xticklabels([f"{t}\n{repr(s)[1:-1][:6]}" for t, s in zip(range(lo, hi), sampled)], fontsize=7)
    ax.set_yticks(range(probs.shape[0]))
    ax.set_yticklabels([f"top {r + 1}" for r in range(probs.shape[0])])
    if fe >= 0 and lo <= fe < hi:
        ax.axvline(fe - lo - 0.5, color="tab:red", lw=2)
        ax.axvline(fe - lo + 0.5, color="tab:red", lw=2)
    ax.set_xlabel("position and the student's sampled token")
    ax.set_title(f"Worked example: {raw.traces[b]['response'][:60]!r}; first error at {fe} (red), teacher's top tokens per position")
    return _save(fig, path)


def _raw_vs_revised(path: Path, summary: dict) -> str:
    rev = summary["revised"]
    groups = ["all positions", "after first error"]
    raw_vals = [summary["mean"]["onset_mass"], summary["after_error"]["onset_mass"]]
    rev_vals = [rev["mean"]["onset_mass"], rev["after_error"]["onset_mass"]]
    x = np.arange(len(groups))
    fig = Figure(figsize=(6, 3.8))
    ax = fig.subplots()
    ax.bar(x - 0.2, _nan(raw_vals), 0.4, label="raw rollouts")
    ax.bar(x + 0.2, _nan(rev_vals), 0.4, label="revised")
    ax.set_xticks(x)
    ax.set_xticklabels(groups)
    ax.set_ylabel("teacher correction-onset mass")
    ax.set_title("Correction-onset mass: raw vs revised")
    ax.legend(fontsize=8)
    return _save(fig, path)
