"""Miniature reproduction of the paper's comparison on the embedded arithmetic task.

Trains every method of configs/arith/ for several seeds at the same budget, evaluates each on the
held-out test problems (16 samples per problem, temperature 0.6, top-p 0.95) and writes a markdown
table, a PNG plot and the raw JSON:

    python benchmarks/reproduce.py --mode quick   # <= 15 minutes on 2 CPU cores
    python benchmarks/reproduce.py --mode full    # <= 90 minutes on 2 CPU cores

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
    "OPD": ["opd", "fkl", "fkl_clip", "rkl_topk", "trd_rewrite", "trd_splice"],
    "OPSD": ["opsd", "opsd_trd"],
}
LABELS = {
    "opd": "OPD (reverse KL)",
    "fkl": "forward KL",
    "fkl_clip": "forward KL + clip",
    "rkl_topk": "reverse KL top-k",
    "trd_rewrite": "TRD rewrite (paper)",
    "trd_splice": "TRD prefix splice (ours)",
    "opsd": "OPSD (fwd KL + clip)",
    "opsd_trd": "OPSD + TRD rewrite",
    "initial": "initial student",
}
# The method whose step time the others are compared with, per setting.
BASELINE = {**{m: "opd" for m in METHODS["OPD"]}, **{m: "opsd" for m in METHODS["OPSD"]}}
MODES = {
    "quick": {"steps": 40, "test_size": 64, "batch_size": 32},
    "full": {"steps": 100, "test_size": 128, "batch_size": 32},  # the configs' own budget
}


def run_one(job: dict) -> dict:
    """One (method, seed): fit at the shared budget, then test. Runs in a worker process."""
    import torch
    from lightning.pytorch import Trainer

    from trd_lightning.callbacks import PassAtKEvaluation, TrajectoryRevision
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
    evaluation = PassAtKEvaluation(n=16, ks=(1, 8))
    common = dict(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    result = {"method": method, "seed": seed}
    if method != "initial":
        trainer = Trainer(max_steps=mode["steps"], limit_val_batches=0, callbacks=revision, **common)
        start = time.perf_counter()
        trainer.fit(cli.model, datamodule=cli.datamodule)
        result["step_seconds"] = (time.perf_counter() - start) / mode["steps"]
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


def mean_std(values: list[float]) -> tuple[float, float]:
    values = [v for v in values if v is not None and not math.isnan(v)]
    if not values:
        return float("nan"), float("nan")
    return statistics.mean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def summarise(results: list[dict], methods: list[str]) -> list[dict]:
    rows = []
    for method in methods:
        runs = [r for r in results if r["method"] == method]
        if not runs:
            continue
        row = {"method": method, "seeds": len(runs)}
        for key in ("avg@16", "pass@1", "pass@8", "step_seconds", "revision_seconds", "rest_seconds", "fail_to_pass", "length_before", "length_after"):
            row[key] = mean_std([r.get(key) for r in runs])
        rows.append(row)
    return rows


def fmt(ms: tuple[float, float], digits: int = 3) -> str:
    m, s = ms
    return "–" if math.isnan(m) else f"{m:.{digits}f} ± {s:.{digits}f}"


def markdown(rows: list[dict], mode: str, seeds: list[int], minutes: float, earlier: list[str] = ()) -> str:
    kept = f" Rows from an earlier run, merged with --update: {', '.join(earlier)}." if earlier else ""
    lines = [
        f"Mode `{mode}` ({MODES[mode]['steps']} steps × batch {MODES[mode]['batch_size']}, "
        f"{MODES[mode]['test_size']} test problems × 16 samples, seeds {seeds}; {minutes:.1f} min wall clock).{kept}",
        "",
        "| setting | method | Avg@16 | Pass@1 | Pass@8 | s / step | step ÷ baseline step | revision s / step |",
        "|---|---|---|---|---|---|---|---|",
    ]
    setting = {m: s for s, ms in METHODS.items() for m in ms}
    step = {row["method"]: row["step_seconds"][0] for row in rows}
    for row in rows:
        base = BASELINE.get(row["method"])
        ratio = f"{step[row['method']] / step[base]:.2f}×" if base in step and not math.isnan(step[row["method"]]) else "–"
        lines.append(
            f"| {setting.get(row['method'], '–')} | {LABELS[row['method']]} | {fmt(row['avg@16'])} | {fmt(row['pass@1'])} | "
            f"{fmt(row['pass@8'])} | {fmt(row['step_seconds'], 2)} | {ratio} | {fmt(row['revision_seconds'], 2)} |"
        )
    lines += [
        "",
        "s / step: wall clock of training steps (two runs share the 2 cores), baseline: OPD (reverse KL) in the "
        "OPD setting, OPSD in the OPSD setting. revision s / step: time spent in a two-pass reviser; the fused "
        "splice reviser revises while it samples, so its cost is only visible in s / step.",
    ]
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    names = [LABELS[r["method"]] for r in rows]
    for ax, key in zip(axes, ("avg@16", "pass@8")):
        means = [r[key][0] for r in rows]
        stds = [r[key][1] for r in rows]
        colors = ["#c44e52" if "trd" in r["method"] else ("#8172b2" if r["method"] == "initial" else "#4c72b0") for r in rows]
        ax.barh(names, means, xerr=stds, color=colors, capsize=3)
        ax.set_xlabel(key.replace("avg", "Avg").replace("pass", "Pass"))
        ax.set_xlim(0, 1)
        ax.invert_yaxis()
        ax.grid(axis="x", alpha=0.3)
    fig.suptitle("Embedded arithmetic task: test accuracy after distillation (mean ± std over seeds)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mode", choices=MODES, default="quick")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--methods", nargs="+", default=[m for ms in METHODS.values() for m in ms])
    parser.add_argument("--steps", type=int, default=None, help="override the mode's training steps")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    parser.add_argument(
        "--update", action="store_true",
        help="merge into the existing results of this mode: re-run --methods, keep the other methods' runs",
    )
    args = parser.parse_args()
    if args.steps is not None:
        MODES[args.mode]["steps"] = args.steps
    unknown = [m for m in args.methods if m not in LABELS]
    if unknown:
        parser.error(f"unknown method(s) {unknown}; choose from {sorted(LABELS)}")

    jobs = [{"method": "initial", "seed": args.seeds[0], "mode": args.mode, "steps": MODES[args.mode]["steps"]}]
    jobs += [{"method": m, "seed": s, "mode": args.mode, "steps": MODES[args.mode]["steps"]} for s in args.seeds for m in args.methods]
    start = time.perf_counter()
    with mp.get_context("spawn").Pool(args.workers, maxtasksperchild=1) as pool:
        results = []
        for result in pool.imap_unordered(run_one, jobs):
            results.append(result)
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
    table = markdown(rows, args.mode, args.seeds, minutes, earlier)
    (args.out / f"reproduction_{args.mode}.md").write_text(table)
    (args.out / f"reproduction_{args.mode}.json").write_text(json.dumps({"mode": args.mode, "runs": results}, indent=1))
    plot(rows, args.out / f"reproduction_{args.mode}.png")
    print(table)


if __name__ == "__main__":
    main()
