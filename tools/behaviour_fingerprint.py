"""Behaviour fingerprint: what a refactor must leave bit for bit unchanged.

With seed 0, on a fixed batch of the embedded arithmetic task and the shipped student/teacher of
configs/arith/trd_splice.yaml, runs the fused and the two-pass `PrefixSpliceReviser` and the
`RewriteReviser`, and saves their tokens, t*, teacher logits and masks to ``OUT/revision.pt``.
With ``--main-job`` it also runs ``trd fit -c configs/arith/trd_splice.yaml`` (logger in a tmp
dir) and saves its test metrics to ``OUT/main_job.json``. ``--compare BASE`` compares OUT with an
earlier fingerprint (tokens, t*, masks exact; logits max abs diff; metrics exact).

    python tools/behaviour_fingerprint.py --out /tmp/fingerprint_base [--main-job]
    python tools/behaviour_fingerprint.py --out /tmp/fingerprint_new --compare /tmp/fingerprint_base
"""

from __future__ import annotations

import argparse
import csv
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent


def _rollout_record(rollout) -> dict:
    return {
        "response_ids": rollout.response_ids.cpu(),
        "response_mask": rollout.response_mask.cpu(),
        "teacher_logits": None if rollout.teacher_logits is None else rollout.teacher_logits.float().cpu(),
        "student_ids": rollout.student.input_ids.cpu(),
        "teacher_ids": rollout.teacher.input_ids.cpu(),
    }


def _t_star(rollout):
    """t* per row: before the refactor in ``info["t_star_rows"]``, after it in a typed field
    (the rewrite reviser logs only its mean, kept in `_stats`)."""
    stats = getattr(rollout, "revision", None)
    if stats is not None and getattr(stats, "t_star_rows", None) is not None:
        return stats.t_star_rows.cpu()
    info = getattr(rollout, "info", None) or {}
    return info["t_star_rows"].cpu() if "t_star_rows" in info else torch.tensor([])


_TIMINGS = {"seconds", "revise_seconds"}


def _stats(rollout) -> dict:
    """The logged revision statistics (timings aside), by name."""
    stats = getattr(rollout, "revision", None)
    items = stats.logged().items() if stats is not None and hasattr(stats, "logged") else (rollout.info or {}).items()
    pairs = sorted((k, float(v)) for k, v in items if isinstance(v, (int, float)) and not isinstance(v, bool) and k not in _TIMINGS)
    return dict(pairs)


def revision_fingerprint() -> dict:
    from lightning.pytorch import seed_everything

    from trd_lightning import DistillationModule, Sampling
    from trd_lightning.revision import PrefixSpliceReviser, RewriteReviser
    from trd_lightning.tasks import ArithmeticTask

    seed_everything(0)
    task = ArithmeticTask(min_steps=3, max_steps=5, val_size=64, test_size=128)
    module = DistillationModule(
        student="builtin:arith/student", teacher="builtin:arith/teacher", loss="forward_kl",
        sampling=Sampling(temperature=1.0, max_new_tokens=48), task=task,
    )
    problems = list(task.problems("test"))[:16]
    out = {}
    splice = dict(criterion="teacher_prob", threshold=0.05, student_top_p=0.95, fallback="teacher")
    torch.manual_seed(0)
    fused = PrefixSpliceReviser(**splice)
    fused.setup(module)
    r = fused.sample_revised(module, problems)
    out["fused"] = {**_rollout_record(r), "t_star": _t_star(r), "stats": _stats(r)}
    torch.manual_seed(0)
    original = module.make_rollout(problems)
    out["original"] = _rollout_record(original)
    two_pass = PrefixSpliceReviser(**splice, fused=False)
    two_pass.setup(module)
    torch.manual_seed(1)
    r = two_pass.revise(module, original)
    out["two_pass"] = {**_rollout_record(r), "t_star": _t_star(r), "stats": _stats(r)}
    rewrite = RewriteReviser()
    rewrite.setup(module)
    torch.manual_seed(2)
    r = rewrite.revise(module, original)
    out["rewrite"] = {**_rollout_record(r), "t_star": _t_star(r), "stats": _stats(r)}
    return out


#: ``--short``: the main job cut to a few steps and one val/test batch (the full one takes ~40
#: minutes on a loaded 2-core machine); same config, same code path, same seed.
SHORT = ["--trainer.max_steps=6", "--trainer.val_check_interval=3", "--trainer.limit_val_batches=1", "--trainer.limit_test_batches=1"]


def main_job_metrics(short: bool = False) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [
            sys.executable, "-m", "trd_lightning.cli", "fit", "-c", str(ROOT / "configs/arith/trd_splice.yaml"),
            f"--trainer.logger.init_args.save_dir={tmp}",
            f"--trainer.default_root_dir={tmp}",
            *(SHORT if short else []),
        ]
        subprocess.run(cmd, check=True, cwd=tmp)
        files = sorted(Path(tmp).rglob("metrics.csv"))
        assert files, f"no metrics.csv under {tmp}"
        metrics = {}
        with open(files[-1]) as f:
            for row in csv.DictReader(f):
                for k, v in row.items():
                    if k.startswith("test") and v not in ("", None):
                        metrics[k] = float(v)
        return metrics


def compare(new: Path, base: Path) -> bool:
    ok = True
    a, b = torch.load(new / "revision.pt"), torch.load(base / "revision.pt")
    for form in b:
        for key, ref in b[form].items():
            got = a[form][key]
            if ref is None or got is None:
                same = ref is None and got is None
                print(f"{form}.{key}: {'both None' if same else 'MISMATCH (None)'}")
                ok &= same
            elif key == "stats":
                same = {k: v for k, v in got.items() if v == v} == {k: v for k, v in ref.items() if v == v}
                same &= {k for k, v in got.items() if v != v} == {k for k, v in ref.items() if v != v}
                print(f"{form}.{key}: {'identical' if same else f'MISMATCH {got} vs {ref}'}")
                ok &= same
            elif key == "teacher_logits":
                same_shape = got.shape == ref.shape
                diff = (got - ref).abs().max().item() if same_shape else float("inf")
                print(f"{form}.{key}: max abs diff {diff:.3g}")
                ok &= diff == 0.0
            else:
                same = torch.equal(got, ref) if key != "stats" else torch.equal(got.nan_to_num(-7.0), ref.nan_to_num(-7.0))
                print(f"{form}.{key}: {'identical' if same else 'MISMATCH'}")
                ok &= same
    if (base / "main_job.json").exists() and (new / "main_job.json").exists():
        ma, mb = json.loads((new / "main_job.json").read_text()), json.loads((base / "main_job.json").read_text())
        diffs = {k: (mb.get(k), ma.get(k)) for k in set(ma) | set(mb) if ma.get(k) != mb.get(k)}
        print(f"main job test metrics: {len(mb)} keys, {'identical' if not diffs else f'DIFFER: {diffs}'}")
        ok &= not diffs
    return ok


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--main-job", action="store_true", help="also run the main job and save its test metrics")
    parser.add_argument("--short", action="store_true", help="with --main-job: a few steps only (see SHORT)")
    parser.add_argument("--skip-revision", action="store_true")
    parser.add_argument("--compare", type=Path, default=None, help="an earlier --out to compare with")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    if not args.skip_revision:
        torch.save(revision_fingerprint(), args.out / "revision.pt")
    if args.main_job:
        (args.out / "main_job.json").write_text(json.dumps(main_job_metrics(args.short), indent=1, sort_keys=True))
    if args.compare is not None:
        sys.exit(0 if compare(args.out, args.compare) else 1)


if __name__ == "__main__":
    main()
