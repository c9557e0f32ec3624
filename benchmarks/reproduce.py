"""Miniature reproduction of the paper's comparison on the embedded arithmetic task.

Trains every method of configs/arith/ for several seeds at the same budget, evaluates each on the
held-out test problems (16 samples per problem, temperature 0.6, top-p 0.95) and writes a markdown
table, a PNG plot and the raw JSON:

    python benchmarks/reproduce.py --mode quick   # <= 15 minutes on 2 CPU cores (the original rows, 3 seeds)
    python benchmarks/reproduce.py --mode full    # every row incl. the baselines, 5 seeds, learning curves (hours)

Every row reports mean ± std over seeds and a bootstrap 95 % interval of the mean (seeds resampled),
Pass@k for k = 1..16 and the coverage of valid derivations (per problem, the distinct valid
derivations among its correct samples out of 16). Full mode also draws learning curves (Avg@16 on
64 validation problems every 10 steps, sampled in a forked RNG so the training run is unchanged).

Runs go through the same YAML configs and CLI parser as `trd fit`, two at a time (one thread
each), so step times are comparable across methods but not with a run that has the machine alone.
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing as mp
import statistics
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
METHODS = {
    "OPD": ["opd", "fkl", "fkl_clip", "rkl_topk", "seqkd", "gkd", "trd_rewrite", "trd_rewrite_verified",
            "trd_rewrite_sft", "trd_splice", "splice_t0"],
    "OPSD": ["opsd", "opsd_trd", "opsd_splice"],
}
# Quick mode keeps its time budget: the rows it had before the baselines were added.
QUICK_METHODS = ["opd", "fkl", "fkl_clip", "rkl_topk", "trd_rewrite", "trd_splice", "opsd", "opsd_trd"]
LABELS = {
    "opd": "OPD (reverse KL)",
    "fkl": "forward KL",
    "fkl_clip": "forward KL + clip",
    "rkl_topk": "reverse KL top-k",
    "trd_rewrite": "TRD rewrite (paper)",
    "trd_splice": "TRD prefix splice (ours)",
    "seqkd": "sequence-level KD (SFT on teacher samples)",
    "gkd": "GKD (λ = 0.5 on-policy, JSD β = 0.5)",
    "trd_rewrite_verified": "TRD rewrite, verified rewrites",
    "trd_rewrite_sft": "SFT on y_r (rewrite, cross entropy)",
    "splice_t0": "splice with t* = 0 (teacher in student's top-p)",
    "opsd_splice": "OPSD + TRD prefix splice",
    "opsd": "OPSD (fwd KL + clip)",
    "opsd_trd": "OPSD + TRD rewrite",
    "initial": "initial student",
}
# The method whose step time the others are compared with, per setting.
BASELINE = {**{m: "opd" for m in METHODS["OPD"]}, **{m: "opsd" for m in METHODS["OPSD"]}}
MODES = {
    "quick": {"steps": 40, "test_size": 64, "batch_size": 32, "seeds": [0, 1, 2], "curve_every": 0},
    "full": {"steps": 100, "test_size": 128, "batch_size": 32, "seeds": [0, 1, 2, 3, 4], "curve_every": 10},  # the configs' own budget
}
KS = (1, 8, 16)  # the table's Pass@k columns (every k = 1..16 is in the JSON and the plot)


def run_one(job: dict) -> dict:
    """One (method, seed): fit at the shared budget, then test. Runs in a worker process."""
    import torch
    from lightning.pytorch import Trainer

    from trd_lightning.callbacks import LearningCurve, PassAtKEvaluation, TrajectoryRevision
    from trd_lightning.cli import build_cli

    torch.set_num_threads(1)
    method, seed = job["method"], job["seed"]
    mode = {**MODES[job["mode"]], "steps": job["steps"]}  # spawned workers do not see main()'s override
    config = ROOT / "configs" / "arith" / f"{'opd' if method == 'initial' else method}.yaml"
    cli = build_cli(
        [
            "fit",
            "-c",
            str(config),
            f"--seed_everything={seed}",
            "--trainer.logger=false",
            f"--data.init_args.task.init_args.test_size={mode['test_size']}",
            f"--data.init_args.batch_size={mode['batch_size']}",
        ],
        run=False,
    )
    revision = [cb for cb in cli.trainer.callbacks if isinstance(cb, TrajectoryRevision)]
    evaluation = PassAtKEvaluation(n=16, all_k=True)
    common = dict(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    result = {"method": method, "seed": seed, "steps": mode["steps"], "curve_every": job.get("curve_every", 0), "commit": _commit()}
    if method != "initial":
        curve = [LearningCurve(every_n_steps=job["curve_every"], num_problems=64)] if job.get("curve_every") else []
        trainer = Trainer(max_steps=mode["steps"], limit_val_batches=0, callbacks=revision + curve, **common)
        start = time.perf_counter()
        trainer.fit(cli.model, datamodule=cli.datamodule)
        result["step_seconds"] = (time.perf_counter() - start) / mode["steps"]  # includes the curve's evaluations
        if curve:
            result["curve"] = curve[0].history
        if revision:
            history = revision[0].history
            # A fused reviser revises while sampling: no separate revision time, no unrevised y_o
            # (those entries stay NaN; its cost shows in s / step against the baseline's).
            for key in ("seconds", "rest_seconds", "fraction_revised", "fail_to_pass", "pass_to_fail", "length_before", "length_after"):
                values = [h[f"revision/{key}"] for h in history if f"revision/{key}" in h]
                result[key if key != "seconds" else "revision_seconds"] = statistics.mean(values) if values else float("nan")
    tester = Trainer(callbacks=[evaluation], **common)
    tester.test(cli.model, datamodule=cli.datamodule, verbose=False)
    result.update({k.split("/", 1)[1]: v for k, v in evaluation.last.items()})
    return result


def _commit() -> str:
    import subprocess

    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=True)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "trd_lightning", "configs"],
                               cwd=ROOT, capture_output=True, text=True).stdout.strip()
        return out.stdout.strip() + ("+changes" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def run_file(run: dict) -> str:
    return f"{run['method']}_seed{run['seed']}.json"


def write_atomic(path: Path, text: str) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)


def cached_runs(cache: Path, jobs: list[dict]) -> list[dict]:
    """The runs of ``jobs`` already finished under ``cache`` at the same steps and curve interval."""
    runs = []
    for job in jobs:
        path = cache / run_file(job)
        if not path.exists():
            continue
        run = json.loads(path.read_text())
        if run.get("steps") == job["steps"] and run.get("curve_every", 0) == job.get("curve_every", 0):
            runs.append(run)
        else:
            print(f"ignoring {path}: made with steps={run.get('steps')} curve_every={run.get('curve_every')}", flush=True)
    return runs


def mean_std(values: list[float]) -> tuple[float, float]:
    values = [v for v in values if v is not None and not math.isnan(v)]
    if not values:
        return float("nan"), float("nan")
    return statistics.mean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def bootstrap_ci(values: list[float], resamples: int = 10_000, seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap 95 % interval of the mean over seeds (seeds resampled with replacement)."""
    import random

    values = [v for v in values if v is not None and not math.isnan(v)]
    if len(values) < 2:
        return float("nan"), float("nan")
    rng = random.Random(seed)
    means = sorted(statistics.fmean(rng.choices(values, k=len(values))) for _ in range(resamples))
    return means[int(0.025 * resamples)], means[int(0.975 * resamples) - 1]


SUMMARISED = ("avg@16", *[f"pass@{k}" for k in range(1, 17)], "derivations", "derivation_coverage", "step_seconds",
              "revision_seconds", "rest_seconds", "fail_to_pass", "length_before", "length_after")  # fmt: skip


def summarise(results: list[dict], methods: list[str]) -> list[dict]:
    rows = []
    for method in methods:
        runs = [r for r in results if r["method"] == method]
        if not runs:
            continue
        row = {"method": method, "seeds": len(runs)}
        for key in SUMMARISED:
            row[key] = mean_std([r.get(key) for r in runs])
        for key in ("avg@16", "pass@16", "derivations"):
            row[f"{key}_ci"] = bootstrap_ci([r.get(key) for r in runs])
        rows.append(row)
    return rows


def fmt_ci(ci: tuple[float, float]) -> str:
    return "–" if math.isnan(ci[0]) else f"[{ci[0]:.3f}, {ci[1]:.3f}]"


def fmt(ms: tuple[float, float], digits: int = 3) -> str:
    m, s = ms
    return "–" if m is None or math.isnan(m) else f"{m:.{digits}f} ± {s:.{digits}f}"


def markdown(rows: list[dict], mode: str, seeds: list[int], minutes: float, earlier: list[str] = (), commits: list[str] = ()) -> str:
    kept = f" Rows from an earlier run, merged with --update: {', '.join(earlier)}." if earlier else ""
    kept += f" Runs made at commit(s) {', '.join(commits)}." if commits else ""
    lines = [
        f"Mode `{mode}` ({MODES[mode]['steps']} steps × batch {MODES[mode]['batch_size']}, "
        f"{MODES[mode]['test_size']} test problems × 16 samples, seeds {seeds}; {minutes:.1f} min wall clock in the last sitting).{kept}",
        "",
        "| setting | method | seeds | Avg@16 | Avg@16 95 % CI | Pass@1 | Pass@8 | Pass@16 | Pass@16 95 % CI | derivations / problem | "
        "s / step | step ÷ baseline step | revision s / step |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    setting = {m: s for s, ms in METHODS.items() for m in ms}
    step = {row["method"]: row["step_seconds"][0] for row in rows}
    for row in rows:
        base = BASELINE.get(row["method"])
        ratio = f"{step[row['method']] / step[base]:.2f}×" if base in step and not math.isnan(step[row["method"]]) else "–"
        lines.append(
            f"| {setting.get(row['method'], '–')} | {LABELS[row['method']]} | {row['seeds']} | {fmt(row['avg@16'])} | "
            f"{fmt_ci(row['avg@16_ci'])} | {fmt(row['pass@1'])} | {fmt(row['pass@8'])} | {fmt(row['pass@16'])} | "
            f"{fmt_ci(row['pass@16_ci'])} | {fmt(row['derivations'], 2)} | {fmt(row['step_seconds'], 2)} | {ratio} | "
            f"{fmt(row['revision_seconds'], 2)} |"
        )
    lines += [
        "",
        "s / step: wall clock of training steps (two runs share the 2 cores), baseline: OPD (reverse KL) in the "
        "OPD setting, OPSD in the OPSD setting. revision s / step: time spent in a two-pass reviser; the fused "
        "splice reviser revises while it samples, so its cost is only visible in s / step. 95 % CI: percentile "
        "bootstrap of the mean over seeds. derivations / problem: distinct valid derivations (operand orders) among "
        "the correct samples of a problem, out of 16 samples, averaged over problems.",
    ]
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], path: Path, results: list[dict] = ()) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curves = [r for r in results if r.get("curve")]
    fig, axes = plt.subplots(2, 2, figsize=(14, 9 + 0.15 * len(rows)))
    names = [LABELS[r["method"]] for r in rows]
    for ax, key in zip(axes[0], ("avg@16", "pass@16")):
        means = [r[key][0] for r in rows]
        stds = [r[key][1] for r in rows]
        colors = ["#c44e52" if "trd" in r["method"] or "splice" in r["method"] else ("#8172b2" if r["method"] == "initial" else "#4c72b0") for r in rows]
        ax.barh(names, means, xerr=stds, color=colors, capsize=3)
        ax.set_xlabel(key.replace("avg", "Avg").replace("pass", "Pass") + " (mean ± std over seeds)")
        ax.set_xlim(0, 1)
        ax.invert_yaxis()
        ax.grid(axis="x", alpha=0.3)
    axes[0][1].set_yticklabels([])
    ax = axes[1][0]
    for r in rows:
        ks = [k for k in range(1, 17) if not math.isnan(r[f"pass@{k}"][0])]
        if ks:
            ax.plot(ks, [r[f"pass@{k}"][0] for k in ks], marker=".", label=LABELS[r["method"]])
    ax.set_xlabel("k")
    ax.set_ylabel("Pass@k (mean over seeds)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    ax = axes[1][1]
    for r in rows:
        runs = [c for c in curves if c["method"] == r["method"]]
        if not runs:
            continue
        steps = [h["step"] for h in runs[0]["curve"]]
        mean = [statistics.fmean(c["curve"][i]["curve/avg@16"] for c in runs if i < len(c["curve"])) for i in range(len(steps))]
        (line,) = ax.plot(steps, mean, label=LABELS[r["method"]])
        for c in runs:  # one thin line per seed: a collapsing seed shows
            ax.plot([h["step"] for h in c["curve"]], [h["curve/avg@16"] for h in c["curve"]], lw=0.5, alpha=0.35, color=line.get_color())
    ax.set_xlabel("training step")
    ax.set_ylabel("Avg@16, 64 val problems (mean over seeds)")
    ax.grid(alpha=0.3)
    if not curves:
        ax.text(0.5, 0.5, "learning curves: full mode", ha="center", transform=ax.transAxes)
    fig.suptitle("Embedded arithmetic task: test accuracy after distillation")
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mode", choices=MODES, default="quick")
    parser.add_argument("--seeds", type=int, nargs="+", default=None, help="default: quick 0 1 2, full 0..4")
    parser.add_argument("--methods", nargs="+", default=None, help="default: quick the original 8 rows, full every row")
    parser.add_argument("--curve-every", type=int, default=None, help="learning-curve interval in steps (0: off); default: quick 0, full 10")
    parser.add_argument("--steps", type=int, default=None, help="override the mode's training steps")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    parser.add_argument(
        "--update", action="store_true",
        help="merge into the existing results of this mode: re-run --methods, keep the other methods' runs",
    )
    parser.add_argument("--fresh", action="store_true", help="re-run every job, ignoring the finished runs kept under runs_<mode>/")
    parser.add_argument(
        "--table-only", action="store_true",
        help="run nothing: write the table from the finished runs under runs_<mode>/ (a partial table names its missing runs)",
    )
    args = parser.parse_args()
    if args.steps is not None:
        MODES[args.mode]["steps"] = args.steps
    args.seeds = args.seeds or MODES[args.mode]["seeds"]
    args.methods = args.methods or (QUICK_METHODS if args.mode == "quick" else [m for ms in METHODS.values() for m in ms])
    curve_every = MODES[args.mode]["curve_every"] if args.curve_every is None else args.curve_every
    unknown = [m for m in args.methods if m not in LABELS]
    if unknown:
        parser.error(f"unknown method(s) {unknown}; choose from {sorted(LABELS)}")

    jobs = [{"method": "initial", "seed": args.seeds[0], "mode": args.mode, "steps": MODES[args.mode]["steps"]}]
    jobs += [{"method": m, "seed": s, "mode": args.mode, "steps": MODES[args.mode]["steps"], "curve_every": curve_every}
             for s in args.seeds for m in args.methods]  # fmt: skip
    # Every finished run is kept in its own file under runs_<mode>/, so a long full-mode table can
    # be built over several sittings: a run whose file exists (same steps and curve interval) is
    # not repeated unless --fresh is given.
    cache = args.out / f"runs_{args.mode}"
    cache.mkdir(parents=True, exist_ok=True)
    results = [] if args.fresh else cached_runs(cache, jobs)
    done = {(r["method"], r["seed"]) for r in results}
    todo = [j for j in jobs if (j["method"], j["seed"]) not in done]
    print(f"{len(jobs)} runs: {len(results)} from {cache}, {len(todo)} to run", flush=True)
    missing = [f"{j['method']} seed {j['seed']}" for j in todo] if args.table_only else []
    todo = [] if args.table_only else todo
    start = time.perf_counter()
    with mp.get_context("spawn").Pool(args.workers, maxtasksperchild=1) as pool:
        for result in pool.imap_unordered(run_one, todo):
            results.append(result)
            write_atomic(cache / run_file(result), json.dumps(result, indent=1))
            print(f"[{time.perf_counter() - start:6.0f}s] {result['method']:>12} seed {result['seed']}: "
                  f"avg@16 {result['avg@16']:.3f} pass@8 {result['pass@8']:.3f}", flush=True)
    minutes = (time.perf_counter() - start) / 60
    methods, earlier = list(args.methods), []
    previous = args.out / f"reproduction_{args.mode}.json"
    if args.update and previous.exists():
        rerun = {"initial", *args.methods}
        kept = [r for r in json.loads(previous.read_text())["runs"] if r["method"] not in rerun]
        results += kept
        earlier = sorted({r["method"] for r in kept})
        methods = [m for ms in METHODS.values() for m in ms if m in {r["method"] for r in results}]
    rows = summarise(results, ["initial", *methods])
    args.out.mkdir(parents=True, exist_ok=True)
    table = markdown(rows, args.mode, args.seeds, minutes, earlier, sorted({r.get("commit", "unknown") for r in results}))
    if missing:
        table += f"\n**Partial table**: {len(missing)} of {len(jobs)} runs not made yet: {', '.join(missing)}.\n"
    (args.out / f"reproduction_{args.mode}.md").write_text(table)
    (args.out / f"reproduction_{args.mode}.json").write_text(json.dumps({"mode": args.mode, "runs": results}, indent=1))
    plot(rows, args.out / f"reproduction_{args.mode}.png", results)
    print(table)


if __name__ == "__main__":
    main()
