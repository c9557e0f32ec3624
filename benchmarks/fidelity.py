"""Why does the paper's rewrite reviser collapse here? Per-step curves of one TRD-rewrite run.

One run = one (seed, variant) of `configs/arith/trd_rewrite.yaml`, trained exactly as
`benchmarks/reproduce.py` trains it (same CLI parse, same Trainer arguments, no validation loop),
with diagnostic callbacks that do not touch the training RNG:

* `TrajectoryRevision`'s statistics every step (fail->pass, pass->fail, accuracy of y_o and y_r);
* `CollapseGuard` (alert only): the student's rollout length, repetition and entropy along y_o,
  and the Pass@16 - Pass@1 gap of the learning curve;
* `PrefixAudit` every ``--audit-every`` steps: teacher bimodality and correction mass along y_o
  and along y_r (under the context the loss uses);
* `LearningCurve`: Avg@16 / Pass@k on ``--curve-problems`` validation problems every
  ``--curve-every`` steps (forked RNG).

Then the final test (128 problems x 16 samples, Pass@k for k = 1..16, derivation coverage).

    python benchmarks/fidelity.py --seed 2                      # the paper's reviser, the collapsing seed
    python benchmarks/fidelity.py --seed 2 --variant verified   # options: verified, target_x, temp=<T>
    python benchmarks/fidelity.py --plot                        # figures from every saved run

Writes ``benchmarks/results/fidelity/<config>_<variant>_seed<seed>.json`` and, with --plot, PNGs
under ``docs/img/``.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "benchmarks" / "results" / "fidelity"
IMG = ROOT / "docs" / "img"


def configure_reviser(reviser, variant: str) -> None:
    """The options of the fidelity study, applied to the config's RewriteReviser."""
    from trd_lightning.rollout import Sampling

    if variant == "paper":
        return
    if variant == "verified":
        reviser.verified = True
    elif variant == "target_x":
        reviser.target_context = "problem"
    elif variant.startswith("temp="):
        base = reviser.sampling or Sampling()
        reviser.sampling = Sampling(temperature=float(variant[5:]), top_p=base.top_p, max_new_tokens=base.max_new_tokens)
    else:
        raise SystemExit(f"unknown variant {variant!r}; choose paper, verified, target_x or temp=<T>")


def run(args) -> dict:
    import torch
    from lightning.pytorch import Callback, Trainer

    from trd_lightning.callbacks import CollapseGuard, LearningCurve, PassAtKEvaluation, PrefixAudit, TrajectoryRevision
    from trd_lightning.cli import build_cli
    from trd_lightning.rollout import decode_responses

    torch.set_num_threads(1)
    name = f"{args.config}_{args.variant.replace('=', '')}_seed{args.seed}" + ("" if args.guard_action == "alert" else f"_{args.guard_action}")
    cli = build_cli(
        ["fit", "-c", str(ROOT / "configs" / "arith" / f"{args.config}.yaml"), f"--seed_everything={args.seed}",
         "--trainer.logger=false", f"--data.init_args.task.init_args.test_size={args.test_size}"],
        run=False,
    )  # fmt: skip
    revision = [cb for cb in cli.trainer.callbacks if isinstance(cb, TrajectoryRevision)]
    if revision:
        configure_reviser(revision[0].reviser, args.variant)
    audit = PrefixAudit(every_n_steps=args.audit_every, max_rollouts_logged=0, histograms=False)
    audits: list[dict] = []

    examples: list[dict] = []

    class KeepAudit(Callback):  # PrefixAudit keeps only its latest statistics; and a few failed rewrites
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if audit._last_step == trainer.global_step:
                audits.append({"step": trainer.global_step, **audit.last})
            rollout = batch["rollout"]
            original = rollout.info.get("original")
            if original is None or trainer.global_step % 10:
                return
            tok, task = pl_module.tokenizer, pl_module.task
            y_o = decode_responses(tok, original.response_ids, original.response_mask)
            y_r = decode_responses(tok, rollout.response_ids, rollout.response_mask)
            failed = [(p, o, r) for p, o, r in zip(rollout.problems, y_o, y_r) if not task.verify(p, r)]
            examples.extend({"step": trainer.global_step, "problem": p.expression, "y_o": o, "y_r": r,
                             "y_o_correct": task.verify(p, o), "first_error_y_r": task.first_error_char(p, r)}
                            for p, o, r in failed[:4])  # fmt: skip

    curve = LearningCurve(every_n_steps=args.curve_every, n=16, ks=(1, 16), num_problems=args.curve_problems)
    guard = CollapseGuard(gap_metrics=("curve/pass@16", "curve/pass@1"), action=args.guard_action,
                          checkpoint_dir=str(OUT / "runs" / f"{args.config}_{args.variant}_seed{args.seed}_guard"),
                          drops={"revision/accuracy_after": 0.3, "curve/avg@16": 0.1})  # fmt: skip
    run_dir = OUT / "runs" / name
    trainer = Trainer(
        max_steps=args.steps, limit_val_batches=0, callbacks=[*revision, audit, KeepAudit(), curve, guard],
        accelerator="cpu", devices=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, default_root_dir=str(run_dir),
    )  # fmt: skip
    start = time.perf_counter()
    trainer.fit(cli.model, datamodule=cli.datamodule)
    fit_seconds = time.perf_counter() - start
    evaluation = PassAtKEvaluation(n=16, all_k=True)
    tester = Trainer(callbacks=[evaluation], accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                     enable_progress_bar=False, enable_model_summary=False)  # fmt: skip
    tester.test(cli.model, datamodule=cli.datamodule, verbose=False)
    result = {
        "config": args.config, "variant": args.variant, "seed": args.seed, "steps": args.steps,
        "fit_seconds": fit_seconds, "test": evaluation.last, "guard_action": args.guard_action,
        "rollbacks": guard.rollbacks, "last_good_step": guard.last_good_step, "stopped_at": trainer.global_step,
        "revision": revision[0].history if revision else [], "audit": audits,
        "curve": curve.history, "guard": guard.history, "examples": examples, "alerts": guard.alerts, "guard_reference": guard.reference,
    }  # fmt: skip
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / f"{name}.json").write_text(json.dumps(result, default=float))
    return result


def summary_line(r: dict) -> str:
    t = r["test"]
    first = r["alerts"][0] if r["alerts"] else None
    alert = f"first alert step {first['step']} ({first['signal']})" if first else "no alert"
    return (f"{r['config']} {r['variant']} seed {r['seed']}: test avg@16 {t['test/avg@16']:.3f} pass@1 {t['test/pass@1']:.3f} "
            f"pass@16 {t['test/pass@16']:.3f} derivations {t.get('test/derivations', float('nan')):.2f}; "
            f"fit {r['fit_seconds']:.0f}s; {alert}")  # fmt: skip


def smooth(values, width=5):
    out = []
    for i in range(len(values)):
        window = [v for v in values[max(0, i - width + 1) : i + 1] if v == v]
        out.append(sum(window) / len(window) if window else math.nan)
    return out


def plot() -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = [json.loads(p.read_text()) for p in sorted(OUT.glob("*.json"))]
    runs = [r for r in runs if r.get("guard_action", "alert") == "alert"]
    if not runs:
        raise SystemExit(f"no runs under {OUT}")
    IMG.mkdir(parents=True, exist_ok=True)
    label = lambda r: f"{r['variant']} seed {r['seed']}"  # noqa: E731
    style = lambda r: {"ls": "-" if r["seed"] == 2 else "--"}  # noqa: E731
    panels = [
        ("curve", "curve/avg@16", "Avg@16 (64 val problems)"),
        ("curve", "curve/pass@16", "Pass@16 (64 val problems)"),
        ("revision", "revision/accuracy_before", "accuracy of y_o (train batch)"),
        ("revision", "revision/accuracy_after", "accuracy of y_r (what is trained on)"),
        ("revision", "revision/fail_to_pass", "fail→pass per batch"),
        ("revision", "revision/pass_to_fail", "pass→fail per batch"),
        ("guard", "length", "rollout length (y_o, 10-step mean)"),
        ("guard", "entropy", "student entropy along y_o (nats)"),
        ("guard", "repetition", "repeated 4-grams in y_o"),
        ("audit", "audit/bimodality", "teacher bimodality along y_o"),
        ("audit", "audit/revised/bimodality", "teacher bimodality along y_r"),
        ("audit", "audit/revised/correction_mass", "teacher mass on '!' along y_r"),
    ]
    for group, tag in (("paper", "fidelity_paper"), ("all", "fidelity_variants")):
        chosen = [r for r in runs if (r["variant"] == "paper") == (group == "paper") or group == "all"]
        fig, axes = plt.subplots(4, 3, figsize=(15, 14))
        for ax, (source, key, title) in zip(axes.flat, panels):
            for r in chosen:
                series = r[source]
                if source == "revision":
                    steps, values = list(range(len(series))), smooth([s.get(key, math.nan) for s in series])
                else:
                    steps, values = [s["step"] for s in series], [s.get(key, math.nan) for s in series]
                    if source == "audit":
                        values = smooth(values, 3)
                ax.plot(steps, values, label=label(r), **style(r))
            ax.set_title(title, fontsize=10)
            ax.grid(alpha=0.3)
            ax.set_xlabel("step")
        axes.flat[0].legend(fontsize=7)
        fig.suptitle("TRD rewrite on the arithmetic task: seed 2 (solid) collapses in reproduce.py; dashed = seed 0"
                     + ("" if group == "paper" else "; reviser options"))  # fmt: skip
        fig.tight_layout()
        fig.savefig(IMG / f"{tag}.png", dpi=80)
        plt.close(fig)
    print("\n".join(summary_line(r) for r in runs))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="trd_rewrite")
    parser.add_argument("--seed", type=int, default=2)
    parser.add_argument("--variant", default="paper", help="paper | verified | target_x | temp=<T>")
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--test-size", type=int, default=128)
    parser.add_argument("--curve-every", type=int, default=10)
    parser.add_argument("--curve-problems", type=int, default=64)
    parser.add_argument("--audit-every", type=int, default=5)
    parser.add_argument("--guard-action", default="alert", choices=["alert", "stop", "rollback"])
    parser.add_argument("--plot", action="store_true", help="only draw the figures from the saved runs")
    args = parser.parse_args()
    if args.plot:
        plot()
        return
    print(summary_line(run(args)), flush=True)


if __name__ == "__main__":
    main()
