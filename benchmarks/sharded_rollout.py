"""Rollouts under FSDP2: FSDP's per-forward gathers against gathering the weights once per rollout.

    python -m benchmarks.sharded_rollout                          # 2 CPU processes (gloo), ~2 minutes on 2 cores
    python -m benchmarks.sharded_rollout --rollouts 5 --out benchmarks/results/sharded_rollout_cpu.md
    python -m benchmarks.sharded_rollout --accelerator gpu --processes 1 --pair random --student-size 1024 8 --teacher-size 2048 16

Each process shards a student and a teacher with ``fully_shard`` (both FSDP2, per decoder layer
and root, as `FSDP2Strategy` does; ``--replicate R``: HSDP, an ``R x N/R`` mesh) and makes
rollouts of its own prompts, for every method x ``rollout_gather``:

* ``OPD``: `generate` (``synced_gpus`` when the weights are gathered per forward);
* ``fused splice``: `PrefixSpliceReviser.sample_revised` (rank-synchronised rounds per forward);
* ``two-pass splice``: `PrefixSpliceReviser.revise` of a fixed OPD rollout (the continuation decode).

``per_layer`` leaves FSDP to all-gather every layer in every forward; ``once`` gathers each
layer once around the rollout (`trd_lightning.sharding.rollout_weights`). Every rollout is
seeded, and its tokens, ``t*`` and teacher logits are compared with the same rollout made by an
unsharded copy of the same weights in the same process (a single-process decode): the column
``= 1 process``. All-gathers and all-reduces are counted by wrapping ``torch.distributed``'s
functions (FSDP2 calls ``all_gather_single``); times are medians over rollouts after one warm-up,
the slowest rank's median (every rank waits for it).

`run` is what ``tests/test_sharded_rollout.py`` calls with tiny sizes (it asserts the equalities
and counts, no times).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import socket
import statistics
import tempfile
import time
from pathlib import Path


METHODS = ("OPD", "fused splice", "two-pass splice")
GATHERS = ("per_layer", "once")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _Counter:
    """Counts calls of ``torch.distributed`` collectives (FSDP2 calls them through the module)."""

    def __init__(self, names=("all_gather_single", "all_reduce")):
        import torch.distributed as dist

        self.counts = dict.fromkeys(names, 0)
        for name in names:
            original = getattr(dist, name)

            def wrapped(*args, _original=original, _name=name, **kwargs):
                self.counts[_name] += 1
                return _original(*args, **kwargs)

            setattr(dist, name, wrapped)

    def snapshot(self) -> dict:
        return dict(self.counts)


def _same(a, b, atol: float) -> bool:
    import torch

    if a is None or b is None:
        return a is b
    if a.shape != b.shape:
        return False
    if a.is_floating_point():
        return bool(torch.allclose(a.float(), b.float(), atol=atol, rtol=0))
    return bool(torch.equal(a, b))


def _worker(rank: int, world: int, port: int, config: dict, out: str) -> None:
    import torch
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    from trd_lightning import DistillationModule, Sampling
    from trd_lightning.revision import PrefixSpliceReviser
    from trd_lightning.rollout import Context, Rollout, encode_prompts, sample_responses
    from trd_lightning.sharding import ShardingPlan, rollout_weights, shard_model
    from trd_lightning.tasks import ArithmeticTask

    torch.set_num_threads(config["threads"])
    gpu = config["accelerator"] == "gpu"
    if gpu:
        torch.cuda.set_device(rank)
    device = torch.device(f"cuda:{rank}" if gpu else "cpu")
    dist.init_process_group("nccl" if gpu else "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    counter = _Counter()
    try:
        task = ArithmeticTask(train_size=world * config["batch_size"], val_size=2, test_size=2, seed=0)
        problems = list(task.problems("train"))[rank * config["batch_size"] : (rank + 1) * config["batch_size"]]
        sampling = Sampling(temperature=1.0, max_new_tokens=config["max_new_tokens"])

        def build():
            m = DistillationModule(student=config["student"], teacher=config["teacher"], task=task, sampling=sampling)
            return m.to(device)

        module, reference = build(), build()  # same weights (same checkpoints): sharded, and a single-process copy
        replicas = config["replicate"]
        mesh = (
            init_device_mesh(device.type, (replicas, world // replicas), mesh_dim_names=("replicate", "shard"))
            if replicas > 1 else init_device_mesh(device.type, (world,))
        )  # fmt: skip
        shard_model(module.student, ShardingPlan(), mesh)
        shard_model(module.teacher, ShardingPlan(), mesh, role="teacher")
        reviser = PrefixSpliceReviser(threshold=config["threshold"], lookahead=config["lookahead"])
        # idle_rank: a rank whose two-pass reviser finds no failed row (threshold ~0), so it decodes
        # nothing itself and only joins the others' gathers or rounds (`SpliceDecode.join`).
        idle = config.get("idle_rank") == rank
        two_pass = PrefixSpliceReviser(threshold=1e-30 if idle else config["threshold"], lookahead=config["lookahead"], fused=False)

        # The two-pass form revises a fixed rollout: y_o from the single-process copy.
        torch.manual_seed(10_000 + rank)
        ids, mask = encode_prompts(module.tokenizer, [task.student_prompt(p) for p in problems], device)
        y_o, y_mask = sample_responses(reference.student, module.tokenizer, ids, mask, sampling, stop_ids=reference.stop_ids)
        base = Rollout(list(problems), y_o, y_mask, Context.joined(ids, mask, y_o, y_mask), Context.joined(ids, mask, y_o, y_mask))

        def rollout(m, method: str) -> dict:
            if method == "OPD":
                with rollout_weights(m, ("student",)) as local:
                    block, bmask = sample_responses(
                        m.student, m.tokenizer, ids, mask, sampling, synced_gpus=world > 1 and not local, stop_ids=m.stop_ids
                    )
                return {"ids": block, "mask": bmask}
            r = reviser.sample_revised(m, problems) if method == "fused splice" else two_pass.revise(m, base)
            t_star = r.info["t_star_rows"]
            return {"ids": r.response_ids, "mask": r.response_mask, "t_star": t_star, "logits": r.teacher_logits}

        result = {}
        for method in METHODS:
            expected = {}
            for gather in GATHERS:
                module.rollout_gather = gather
                module.__dict__.pop("_gather_decisions", None)
                seconds, gathers, reduces, equal, peak = [], [], [], [], []
                for i in range(config["rollouts"] + 1):  # the first is a warm-up
                    seed = 1000 * i + rank
                    if i not in expected:
                        torch.manual_seed(seed)
                        expected[i] = rollout(reference, method)
                    torch.manual_seed(seed)
                    before = counter.snapshot()
                    if gpu:
                        torch.cuda.synchronize()
                        torch.cuda.reset_peak_memory_stats()
                    start = time.perf_counter()
                    got = rollout(module, method)
                    if gpu:
                        torch.cuda.synchronize()
                    elapsed = time.perf_counter() - start
                    after = counter.snapshot()
                    same = all(_same(got.get(k), expected[i].get(k), config["atol"]) for k in ("ids", "mask", "t_star", "logits"))
                    if i == 0:
                        continue
                    seconds.append(elapsed)
                    gathers.append(after["all_gather_single"] - before["all_gather_single"])
                    reduces.append(after["all_reduce"] - before["all_reduce"])
                    equal.append(same)
                    peak.append(torch.cuda.max_memory_allocated() / 2**20 if gpu else None)
                result[f"{method}|{gather}"] = {
                    "seconds": statistics.median(seconds), "gathers": gathers, "all_reduces": reduces,
                    "equal": equal, "peak_mib": max(peak) if gpu else None,
                    "tokens": int(got["mask"].sum()),
                    "revised_rows": int((got["t_star"] >= 0).sum()) if "t_star" in got else None,
                }  # fmt: skip
        (Path(out) / f"rank{rank}.json").write_text(json.dumps(result))
    finally:
        dist.destroy_process_group()


def run(config: dict) -> dict:
    """Runs the workers; returns ``{(method, gather): {"ranks": [per-rank dicts]}}``."""
    import torch.multiprocessing as mp

    world = config["processes"]
    if world % config["replicate"]:
        raise ValueError(f"--replicate {config['replicate']} does not divide --processes {world}")
    with tempfile.TemporaryDirectory() as tmp:
        if config["pair"] == "random":
            from benchmarks.throughput.harness import build_models

            config = {**config}
            config["student"], config["teacher"] = build_models(
                Path(tmp), seed=0, student_size=tuple(config["student_size"]), teacher_size=tuple(config["teacher_size"])
            )
        os.environ.setdefault("OMP_NUM_THREADS", str(config["threads"]))
        context = mp.spawn(_worker, args=(world, _free_port(), config, tmp), nprocs=world, join=False)
        deadline = time.monotonic() + config.get("timeout", 1800)
        while not context.join(timeout=5):  # a rank that fails raises here; a hang is stopped below
            if time.monotonic() > deadline:
                for proc in context.processes:
                    proc.kill()
                raise TimeoutError(f"the {world} rollout processes did not finish in {config.get('timeout', 1800)} s (a hang)")
        ranks = [json.loads((Path(tmp) / f"rank{r}.json").read_text()) for r in range(world)]
    return {tuple(key.split("|")): {"ranks": [r[key] for r in ranks]} for key in ranks[0]}


def table(results: dict, config: dict) -> str:
    gpu = config["accelerator"] == "gpu"
    lines = [
        "| method | rollout_gather | s / rollout | ÷ per_layer | all-gathers / rollout | all-reduces / rollout | = 1 process |"
        + (" peak MiB |" if gpu else ""),
        "|---|---|---|---|---|---|---|" + ("---|" if gpu else ""),
    ]
    for method in METHODS:
        base = max(r["seconds"] for r in results[(method, "per_layer")]["ranks"])
        for gather in GATHERS:
            ranks = results[(method, gather)]["ranks"]
            s = max(r["seconds"] for r in ranks)
            g = statistics.median(x for r in ranks for x in r["gathers"])
            a = statistics.median(x for r in ranks for x in r["all_reduces"])
            eq = "yes" if all(all(r["equal"]) for r in ranks) else "NO"
            row = f"| {method} | {gather} | {s:.3f} | {s / base:.2f}× | {g:.0f} | {a:.0f} | {eq} |"
            if gpu:
                row += f" {max(r['peak_mib'] for r in ranks):.0f} |"
            lines.append(row)
    return "\n".join(lines)


def main(argv=None) -> dict:
    import trd_lightning

    assets = Path(trd_lightning.__file__).parent / "assets" / "arith"
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--processes", type=int, default=2)
    p.add_argument("--replicate", type=int, default=1, help="HSDP: replica groups (1 = FSDP)")
    p.add_argument("--accelerator", choices=["cpu", "gpu"], default="cpu")
    p.add_argument("--threads", type=int, default=1, help="torch threads per process")
    p.add_argument("--pair", choices=["trained", "random"], default="trained",
                   help="trained: the shipped arithmetic pair; random: random Llamas of --student-size / --teacher-size")
    p.add_argument("--student-size", type=int, nargs=2, default=[64, 2], metavar=("HIDDEN", "LAYERS"))
    p.add_argument("--teacher-size", type=int, nargs=2, default=[128, 3], metavar=("HIDDEN", "LAYERS"))
    p.add_argument("--batch-size", type=int, default=16, help="rows per process")
    p.add_argument("--max-new-tokens", type=int, default=48)
    p.add_argument("--rollouts", type=int, default=3, help="timed rollouts per mode (after one warm-up)")
    p.add_argument("--lookahead", type=int, default=3)
    p.add_argument("--threshold", type=float, default=0.05)
    p.add_argument("--atol", type=float, default=1e-4, help="teacher logits: largest difference allowed from the 1-process decode")
    p.add_argument("--idle-rank", type=int, default=None, help="this rank's two-pass reviser revises nothing (it only joins)")
    p.add_argument("--out", default=None, help="also write the table (markdown) here")
    args = p.parse_args(argv)
    config = {k: v for k, v in vars(args).items() if k != "out"}
    config.update(student=str(assets / "student"), teacher=str(assets / "teacher"))
    start = time.perf_counter()
    results = run(config)
    text = table(results, config)
    mesh = f"{args.replicate} x {args.processes // args.replicate} (HSDP)" if args.replicate > 1 else f"{args.processes} (FSDP)"
    sizes = "shipped arithmetic pair" if args.pair == "trained" else f"random student {args.student_size}, teacher {args.teacher_size}"
    header = (
        f"Sharded rollouts, {args.accelerator}, {args.processes} process(es), mesh {mesh}, {sizes}, "
        f"{args.batch_size} rows per process, up to {args.max_new_tokens} tokens, lookahead {args.lookahead}, "
        f"{args.rollouts} rollouts per mode; {datetime.date.today()}, {time.perf_counter() - start:.0f} s wall clock."
    )
    print(header + "\n\n" + text)
    if args.out:
        Path(args.out).write_text(header + "\n\n" + text + "\n")
    return results


if __name__ == "__main__":
    main()
