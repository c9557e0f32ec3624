"""Seconds per on-policy distillation step: ours (Lightning), TRL, and a bare PyTorch loop.

    python benchmarks/throughput.py                      # all contenders, ~3 minutes on 2 CPU cores
    python benchmarks/throughput.py --steps 5 --warmup 1 --contenders ours_opd bare   # a quick look
    python benchmarks/throughput.py --profile ours_opd   # cProfile of one contender's steps, alone

Every contender does the same work per step: the same tiny student and teacher (random Llamas built
from config with the arithmetic tokenizer and saved with ``save_pretrained``), a batch of the same
``ArithmeticTask`` train prompts, a rollout of exactly ``--new-tokens`` tokens per prompt sampled
with the KV cache (EOS suppressed with ``min_new_tokens``, so no contender gets shorter rollouts by
luck), one teacher forward without grad, one student forward and backward, reverse KL averaged over
the response positions, one AdamW step (same lr, no weight decay, no gradient clipping).

Each contender runs its real training loop (``Trainer.fit``, ``DistillationTrainer.train``, ...) in
its own process. The processes take turns one step at a time (round-robin, the order rotated every
round): a contender's step is timed from the moment it is let go to the end of its step (everything
its loop does between two steps is inside: fetching the batch, the rollout, scoring, the update,
logging), while the others wait on a pipe and use no CPU. Warm-up steps are dropped; the table gives
medians. Before a ratio is printed, the counts of generated tokens and loss positions that each
contender reported for each step are compared: a contender whose work differs gets no ratio.

The ``arith_*`` contenders measure TRD where it is used instead: the shipped configs
(``configs/arith/{opd,trd_splice,trd_rewrite}.yaml``) with the trained student and teacher, natural
rollout lengths and the configs' own losses, interleaved the same way; their ratio is to the OPD
config, and their work is reported per step rather than forced equal.

Peak memory is each process's maximum resident set size (``getrusage``), so it includes the Python
runtime and the imported libraries (TRL imports more); "+train" is its growth once training started.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import multiprocessing as mp
import os
import platform
import resource
import statistics
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

from trd_lightning.rollout import Sampling

ROOT = Path(__file__).resolve().parents[1]

LABELS = {
    "ours_opd": "ours: OPD (`DistillationModule`, `Trainer.fit`)",
    "ours_trd_rewrite": "ours: TRD, `RewriteReviser`",
    "ours_trd_splice": "ours: TRD, `PrefixSpliceReviser` (fused, the default)",
    "ours_trd_splice_two_pass": "ours: TRD, `PrefixSpliceReviser(fused=False)`",
    "trl_distillation": "TRL `DistillationTrainer`",
    "trl_gkd": "TRL `GKDTrainer` (experimental, lmbda=1)",
    "trl_distillation_defaults": "TRL `DistillationTrainer`, its defaults (grad. checkpointing, bf16, clipping)",
    "bare": "bare PyTorch loop (the floor)",
    "arith_opd": "`configs/arith/opd.yaml` (OPD)",
    "arith_trd_splice": "`configs/arith/trd_splice.yaml` (TRD splice, fused)",
    "arith_trd_splice_two_pass": "`configs/arith/trd_splice.yaml`, `fused: false`",
    "arith_trd_rewrite": "`configs/arith/trd_rewrite.yaml` (TRD rewrite)",
}
# The shipped training configs as they are (trained pair, natural lengths): TRD's cost where it is
# used, compared with the OPD config. Their work is not forced equal, so it is reported, not checked.
CONFIGS = {
    "arith_opd": ("opd", False),
    "arith_trd_splice": ("trd_splice", False),
    "arith_trd_splice_two_pass": ("trd_splice", True),
    "arith_trd_rewrite": ("trd_rewrite", False),
}
CONFIG_REFERENCE = "arith_opd"
# Contenders that do exactly the OPD work; the TRD rows do it plus a revision (more work by design).
SAME_WORK = ("ours_opd", "trl_distillation", "trl_gkd", "bare")
REFERENCE = "ours_opd"
# Not run unless asked for (--contenders): TRL as configured out of the box does more compute per step.
OPT_IN = ("trl_distillation_defaults",)


@dataclass
class Setup:
    student: str
    teacher: str
    batch_size: int = 32
    new_tokens: int = 32
    lr: float = 1e-4
    steps: int = 30  # measured steps per contender
    warmup: int = 3  # dropped
    threads: int = 1
    train_size: int = 4096
    seed: int = 0
    accelerator: str = "cpu"  # "gpu": ours and the bare loop on CUDA (TRL rows are CPU-only here)
    student_size: tuple[int, int] = (64, 2)  # hidden size, layers
    teacher_size: tuple[int, int] = (128, 3)

    @property
    def total(self) -> int:
        return self.steps + self.warmup


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kB on Linux


# --- pacing: one step at a time, timed from "go" to the end of the step ------------------------


def _wait_for_gpu() -> None:
    """A step ends when its kernels have run, not when they are queued."""
    import torch

    if torch.cuda.is_initialized():
        torch.cuda.synchronize()


class Pacer:
    """The worker side of the round-robin: blocks between steps, times each step from its release."""

    def __init__(self, conn, on_measured=None):
        self.conn, self.t0, self.count = conn, None, 0
        self.on_measured = on_measured

    def wait(self) -> None:
        msg = self.conn.recv()
        if msg not in ("go", "finish"):
            raise RuntimeError(f"unexpected message {msg!r}")
        self.t0 = time.perf_counter()

    def step_done(self, work: dict) -> None:
        _wait_for_gpu()
        seconds = time.perf_counter() - self.t0
        self.count += 1
        self.conn.send(("step", seconds, work))
        self.wait()


class SoloPacer:
    """For --profile: no other process; records step times, starts the profiler after warm-up."""

    def __init__(self, warmup: int, profiler):
        self.warmup, self.profiler, self.times, self.works = warmup, profiler, [], []
        self.t0, self.count = None, 0

    def wait(self) -> None:
        self.t0 = time.perf_counter()

    def step_done(self, work: dict) -> None:
        _wait_for_gpu()
        self.times.append(time.perf_counter() - self.t0)
        self.works.append(work)
        self.count += 1
        if self.count == self.warmup:
            self.profiler.start()
        self.wait()


# --- shared pieces ----------------------------------------------------------------------------


def task_for(setup: Setup):
    from trd_lightning.tasks import ArithmeticTask

    return ArithmeticTask(train_size=setup.train_size, val_size=8, test_size=8, seed=setup.seed)


def train_prompts(setup: Setup) -> list[str]:
    task = task_for(setup)
    return [task.student_prompt(p) for p in task.problems("train")]


def load_models(setup: Setup):
    from transformers import AutoModelForCausalLM

    student = AutoModelForCausalLM.from_pretrained(setup.student)
    teacher = AutoModelForCausalLM.from_pretrained(setup.teacher)
    student.train()  # from_pretrained returns eval mode
    teacher.eval().requires_grad_(False)
    return student, teacher


# --- ours -------------------------------------------------------------------------------------


@dataclass
class FixedLengthSampling(Sampling):
    """Exactly ``max_new_tokens`` per rollout (EOS suppressed until then): equal work per step."""

    def __post_init__(self):
        self.min_new_tokens = self.max_new_tokens  # the Sampling field, so every sampler honours it
        super().__post_init__()


def pace_callback(pacer, revising: bool):
    """Reports each step's work to the pacer (and waits for the next "go") at the end of the step."""
    from lightning.pytorch import Callback

    class Pace(Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            rollout = batch["rollout"]
            original = rollout.info.get("original", rollout)
            if rollout.info.get("fused"):
                # One decode over the rollout's positions (rows that end early ride along to the
                # longest row's end): the student's proposals up to t*, restricted draws after
                # (the revision tokens). Drafts the speculative decode dropped are not counted.
                generated = len(rollout.problems) * rollout.info["decode_steps"]
            else:
                generated = int(original.response_mask.sum())  # what the student's generate produced
            work = {"generated": generated, "loss_positions": int(rollout.response_mask.sum())}
            if revising:
                work["revision_tokens"] = int(rollout.info["revision_tokens"])
                work["fraction_revised"] = float(rollout.info["fraction_revised"])
                work["t_star"] = float(rollout.info["t_star"])
            pacer.step_done(work)

    return Pace()


def bench_trainer(setup: Setup, callbacks: list):
    """A CPU Trainer that only trains: no logger, checkpoints, progress bar, summary or validation."""
    from lightning.pytorch import Trainer

    return Trainer(
        accelerator=setup.accelerator,
        devices=1,
        max_steps=setup.total,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        callbacks=callbacks,
    )


def run_config(setup: Setup, pacer, name: str):
    """A shipped arithmetic config as `trd fit` would build it (no logger, no validation, no checkpoints)."""

    from trd_lightning.callbacks import TrajectoryRevision
    from trd_lightning.cli import build_cli

    config, two_pass = CONFIGS[name]
    path = ROOT / "configs" / "arith" / f"{config}.yaml"
    cli = build_cli(["fit", "-c", str(path), "--trainer.logger=false", f"--seed_everything={setup.seed}"], run=False)
    revision = [cb for cb in cli.trainer.callbacks if isinstance(cb, TrajectoryRevision)]
    if two_pass:
        revision[0].reviser.fused = False
    trainer = bench_trainer(setup, revision + [pace_callback(pacer, bool(revision))])
    return lambda: trainer.fit(cli.model, datamodule=cli.datamodule)


def run_ours(setup: Setup, pacer, reviser: str | None):
    import functools

    import torch

    from trd_lightning.data import PromptDataModule
    from trd_lightning.module import DistillationModule

    task = task_for(setup)
    module = DistillationModule(
        student=setup.student,
        teacher=setup.teacher,
        mode="opd",
        loss="reverse_kl",
        sampling=FixedLengthSampling(temperature=1.0, top_p=1.0, top_k=0, max_new_tokens=setup.new_tokens),
        task=task,
        optimizer=functools.partial(torch.optim.AdamW, lr=setup.lr, weight_decay=0.0),
    )
    data = PromptDataModule(task, batch_size=setup.batch_size, shuffle=True)

    callbacks = []
    if reviser is not None:
        from trd_lightning.callbacks import TrajectoryRevision
        from trd_lightning.revision import PrefixSpliceReviser, RewriteReviser

        revise = RewriteReviser() if reviser == "rewrite" else PrefixSpliceReviser(fused=reviser == "splice")
        callbacks.append(TrajectoryRevision(revise))
    callbacks.append(pace_callback(pacer, reviser is not None))  # last: after TrajectoryRevision's logging
    trainer = bench_trainer(setup, callbacks)
    return lambda: trainer.fit(module, data)


# --- bare PyTorch -----------------------------------------------------------------------------


def run_bare(setup: Setup, pacer):
    import torch

    from trd_lightning.tasks.arithmetic_tokenizer import build_arithmetic_tokenizer

    tok = build_arithmetic_tokenizer()
    device = "cuda" if setup.accelerator == "gpu" else "cpu"
    student, teacher = (m.to(device) for m in load_models(setup))
    optimizer = torch.optim.AdamW(student.parameters(), lr=setup.lr, weight_decay=0.0)
    prompts = train_prompts(setup)
    order = torch.randperm(len(prompts), generator=torch.Generator().manual_seed(setup.seed)).tolist()
    n = setup.new_tokens

    def run():
        for step in range(setup.total):
            idx = [order[(step * setup.batch_size + i) % len(order)] for i in range(setup.batch_size)]
            enc = tok([prompts[i] for i in idx], padding=True, add_special_tokens=False, return_tensors="pt").to(device)
            with torch.no_grad():
                out = student.generate(
                    **enc, do_sample=True, temperature=1.0, top_k=0, top_p=1.0, max_new_tokens=n, min_new_tokens=n,
                    pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
                )
            response = out[:, enc.input_ids.shape[1]:]
            is_eos = (response == tok.eos_token_id).long()
            mask = (is_eos.cumsum(-1) - is_eos) == 0  # up to and including the first EOS
            attention = torch.cat([enc.attention_mask, mask.long()], 1)
            position_ids = (attention.cumsum(-1) - 1).clamp(min=0)
            keep = response.shape[1] + 1
            with torch.no_grad():
                t = teacher(input_ids=out, attention_mask=attention, position_ids=position_ids, logits_to_keep=keep).logits[:, :-1]
            s = student(input_ids=out, attention_mask=attention, position_ids=position_ids, logits_to_keep=keep).logits[:, :-1]
            s_logp, t_logp = s.float().log_softmax(-1), t.float().log_softmax(-1)
            kl = (s_logp.exp() * (s_logp - t_logp)).sum(-1)
            loss = (kl * mask).sum() / mask.sum()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            pacer.step_done({"generated": int(response.numel()), "loss_positions": int(mask.sum())})

    return run


# --- TRL --------------------------------------------------------------------------------------


def trl_common_args(setup: Setup, output_dir: str) -> dict:
    return dict(
        output_dir=output_dir,
        per_device_train_batch_size=setup.batch_size,
        gradient_accumulation_steps=1,
        max_steps=setup.total,
        learning_rate=setup.lr,
        lr_scheduler_type="constant",
        warmup_steps=0,
        weight_decay=0.0,
        max_grad_norm=0.0,  # no clipping (ours clips nothing by default)
        bf16=False,
        fp16=False,
        gradient_checkpointing=False,
        use_cpu=True,
        report_to="none",
        logging_steps=10**9,
        save_strategy="no",
        eval_strategy="no",
        disable_tqdm=True,
        dataloader_num_workers=0,
        seed=setup.seed,
        beta=1.0,  # reverse KL
        temperature=1.0,
    )


def trl_pace_callback(pacer, trainer_ref: dict):
    from transformers import TrainerCallback

    class Pace(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            pacer.step_done(dict(trainer_ref["trainer"].last_work))

    return Pace()


def run_trl_distillation(setup: Setup, pacer, trl_defaults: bool = False):
    from datasets import Dataset
    from trl import DistillationConfig, DistillationTrainer

    from trd_lightning.tasks.arithmetic_tokenizer import build_arithmetic_tokenizer

    class CountingDistillationTrainer(DistillationTrainer):
        """Only records how much work a step did; the training path is TRL's own."""

        def _generate_and_score_completions(self, inputs):
            out = super()._generate_and_score_completions(inputs)
            self.last_work = {
                "generated": int(out["completion_ids"].numel()),
                "loss_positions": int(out["completion_mask"].sum()),
            }
            return out

    tok = build_arithmetic_tokenizer()
    student, teacher = load_models(setup)
    common = trl_common_args(setup, tempfile.mkdtemp(prefix="trl_distill_"))
    if trl_defaults:
        # Out of the box: gradient checkpointing on, bf16 autocast, gradient clipping at 1.0.
        for key in ("bf16", "fp16", "gradient_checkpointing", "max_grad_norm"):
            common.pop(key)
    args = DistillationConfig(
        **common,
        max_completion_length=setup.new_tokens,
        top_p=1.0,
        top_k=0,
        generation_kwargs={"min_new_tokens": setup.new_tokens},
        log_completions=False,
        shuffle_dataset=True,
    )
    ref: dict = {}
    trainer = CountingDistillationTrainer(
        model=student,
        teacher_model=teacher,
        args=args,
        train_dataset=Dataset.from_dict({"prompt": train_prompts(setup)}),
        processing_class=tok,
        callbacks=[trl_pace_callback(pacer, ref)],
    )
    ref["trainer"] = trainer
    return trainer.train


def run_trl_gkd(setup: Setup, pacer):
    import torch
    from datasets import Dataset
    from trl.experimental.gkd import GKDConfig, GKDTrainer

    from trd_lightning.tasks.arithmetic_tokenizer import build_arithmetic_tokenizer

    class CountingGKDTrainer(GKDTrainer):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            generated = inputs["input_ids"].shape[1] - inputs["prompts"].shape[1]
            self.last_work = {
                "generated": int(generated * inputs["input_ids"].shape[0]),
                "loss_positions": int((inputs["labels"][:, 1:] != -100).sum()),
            }
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)

    tok = build_arithmetic_tokenizer()
    n = setup.new_tokens

    def collate(examples):
        # GKD's default collator wants chat "messages"; this one gives the prompt fields its on-policy
        # branch reads. The placeholder completion (replaced by the rollout before the loss) only makes
        # the Trainer's label count, which GKD divides the summed KL by, equal to the response positions.
        enc = tok([e["prompt"] for e in examples], padding=True, add_special_tokens=False, return_tensors="pt")
        b, p = enc.input_ids.shape
        labels = torch.cat([torch.full((b, p), -100), torch.full((b, n), tok.pad_token_id)], 1)
        return {
            "prompts": enc.input_ids,
            "prompt_attention_mask": enc.attention_mask,
            "input_ids": torch.cat([enc.input_ids, torch.full((b, n), tok.pad_token_id)], 1),
            "attention_mask": torch.cat([enc.attention_mask, torch.ones(b, n, dtype=torch.long)], 1),
            "labels": labels,
        }

    student, teacher = load_models(setup)
    common = trl_common_args(setup, tempfile.mkdtemp(prefix="trl_gkd_"))
    args = GKDConfig(**common, lmbda=1.0, max_new_tokens=n, disable_dropout=True)
    ref: dict = {}
    trainer = CountingGKDTrainer(
        model=student,
        teacher_model=teacher,
        args=args,
        data_collator=collate,
        train_dataset=Dataset.from_dict({"prompt": train_prompts(setup)}),
        processing_class=tok,
        callbacks=[trl_pace_callback(pacer, ref)],
    )
    # GKD builds its GenerationConfig itself (no generation_kwargs argument): force the length there.
    trainer.generation_config.min_new_tokens = n
    trainer.generation_config.eos_token_id = tok.eos_token_id
    ref["trainer"] = trainer
    return trainer.train


RUNNERS = {
    "ours_opd": lambda s, p: run_ours(s, p, None),
    "ours_trd_rewrite": lambda s, p: run_ours(s, p, "rewrite"),
    "ours_trd_splice": lambda s, p: run_ours(s, p, "splice"),
    "ours_trd_splice_two_pass": lambda s, p: run_ours(s, p, "splice_two_pass"),
    "trl_distillation": run_trl_distillation,
    "trl_distillation_defaults": lambda s, p: run_trl_distillation(s, p, trl_defaults=True),
    "trl_gkd": run_trl_gkd,
    "bare": run_bare,
    **{name: (lambda s, p, name=name: run_config(s, p, name)) for name in CONFIGS},
}


def worker(name: str, setup: Setup, conn) -> None:
    import warnings

    warnings.filterwarnings("ignore")
    import torch

    torch.set_num_threads(setup.threads)
    torch.manual_seed(setup.seed)
    try:
        pacer = Pacer(conn)
        run = RUNNERS[name](setup, pacer)
        conn.send(("ready", peak_rss_mb()))
        pacer.wait()
        run()
        conn.send(("done", peak_rss_mb()))
    except Exception:
        conn.send(("error", traceback.format_exc()))


# --- the run ----------------------------------------------------------------------------------


def build_models(root: Path, seed: int, student_size=(64, 2), teacher_size=(128, 3)) -> tuple[str, str]:
    """Random student and teacher ((hidden, layers) each; default 64 x 2 and 128 x 3), saved like checkpoints."""
    from trd_lightning.models import build_tiny_causal_lm
    from trd_lightning.tasks.arithmetic_tokenizer import build_arithmetic_tokenizer

    tok = build_arithmetic_tokenizer()
    paths = []
    for name, (hidden, layers), s in (("student", student_size, seed), ("teacher", teacher_size, seed + 1)):
        model = build_tiny_causal_lm(tok, hidden_size=hidden, num_layers=layers, num_heads=max(4, hidden // 64), seed=s)
        model.save_pretrained(root / name)
        tok.save_pretrained(root / name)
        paths.append(str(root / name))
    return paths[0], paths[1]


@dataclass
class Result:
    name: str
    times: list[float] = dataclasses.field(default_factory=list)
    works: list[dict] = dataclasses.field(default_factory=list)
    rss_ready: float | None = None
    rss_peak: float | None = None
    error: str | None = None


def run_interleaved(names: list[str], setup: Setup, log=print) -> dict[str, Result]:
    ctx = mp.get_context("spawn")
    results = {n: Result(n) for n in names}
    conns, procs = {}, {}
    for n in names:
        parent, child = ctx.Pipe()
        p = ctx.Process(target=worker, args=(n, setup, child), daemon=True)
        p.start()
        conns[n], procs[n] = parent, p
    live = []
    for n in names:  # set-up happens in parallel, before any timing
        kind, payload = conns[n].recv()
        if kind == "error":
            results[n].error = payload
            log(f"[{n}] failed to set up:\n{payload}")
        else:
            results[n].rss_ready = payload
            live.append(n)
    log(f"set up: {', '.join(live)}; {setup.warmup} warm-up + {setup.steps} measured steps each, round-robin")
    for step in range(setup.total):
        k = step % max(len(live), 1)
        for n in live[k:] + live[:k]:  # rotated so that no contender always follows the same one
            if results[n].error:
                continue
            conns[n].send("go")
            kind, *payload = conns[n].recv()
            if kind == "error":
                results[n].error = payload[0]
                log(f"[{n}] failed:\n{payload[0]}")
                continue
            seconds, work = payload
            if step >= setup.warmup:
                results[n].times.append(seconds)
                results[n].works.append(work)
        if (step + 1) % 10 == 0:
            log(f"  round {step + 1}/{setup.total}")
    for n in live:
        if results[n].error:
            continue
        conns[n].send("finish")  # releases the last step; the loop has reached max_steps and ends
        kind, payload = conns[n].recv()
        if kind == "error":
            results[n].error = payload
        else:
            results[n].rss_peak = payload
    for p in procs.values():
        p.join(timeout=60)
        if p.is_alive():
            p.terminate()
    return results


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


CONFIG_INTRO = (
    "TRD where it is used: the shipped configs as `trd fit` builds them (trained 128 × 4 student and teacher from "
    "`trd_lightning/assets/arith`, batch 32, temperature 1, up to 48 tokens, EOS allowed, forward KL for TRD). "
    "Lengths are natural, so the work is reported, not forced equal; the ratio is to the OPD config."
)

HOW = """How each contender was made to do the same work:

- ours: `DistillationModule(mode="opd", loss="reverse_kl")` + `PromptDataModule(batch_size)`, `Trainer.fit` with
  no logger, progress bar or checkpointing; rollouts sample exactly `--new-tokens` tokens (`min_new_tokens`).
  The TRD rows add `TrajectoryRevision(RewriteReviser())`, `TrajectoryRevision(PrefixSpliceReviser())` (fused: the
  student proposes each of the 32 tokens, the teacher checks it and replaces it from the first disowned one on) or
  `PrefixSpliceReviser(fused=False)` (the 32-token rollout, then the revision), same loss: more work by design.
  For the fused row, "generated" counts rows × decode steps (a proposal or a replacement for every row at every step).
- TRL `DistillationTrainer`: `beta=1` (reverse KL), `max_completion_length` and `generation_kwargs.min_new_tokens`
  = `--new-tokens`, temperature 1, top-p 1, top-k 0, `gradient_checkpointing=False`, `bf16=False`,
  `max_grad_norm=0`, constant lr, `report_to="none"`, no eval, no saving, logging only past the last step.
- TRL `GKDTrainer`: `lmbda=1` (every step on-policy), `beta=1`, `max_new_tokens` and its `GenerationConfig.min_new_tokens`
  = `--new-tokens`, the same flags; a collator that gives its on-policy branch the prompt fields (its default one
  wants chat messages) and placeholder labels that make it divide the summed KL by the response positions (a mean).
- bare loop: `student.generate` (KV cache) → teacher forward under `no_grad` → student forward → reverse KL over
  the response positions → `backward` → `AdamW.step`.
- All: the same saved student/teacher, the same prompts, AdamW with the same lr and no weight decay, fp32,
  no gradient clipping. "rollout tok/s" = student-generated tokens per second of the whole step."""


def versions() -> str:
    import importlib.metadata as md

    parts = []
    for pkg in ("torch", "lightning", "transformers", "trl"):
        try:
            parts.append(f"{pkg} {md.version(pkg)}")
        except md.PackageNotFoundError:
            parts.append(f"{pkg} not installed")
    return ", ".join(parts)


def profile(name: str, setup: Setup, kind: str, top: int) -> None:
    """Run one contender alone (no pacing processes) and print where its measured steps go."""
    import cProfile
    import pstats

    import torch

    torch.set_num_threads(setup.threads)
    torch.manual_seed(setup.seed)
    if kind == "torch":
        from torch.profiler import ProfilerActivity, profile as torch_profile

        prof = torch_profile(activities=[ProfilerActivity.CPU])

        class P:
            def start(self):
                prof.__enter__()

            def stop(self):
                prof.__exit__(None, None, None)
                print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=top))
    else:
        cp = cProfile.Profile()

        class P:
            def start(self):
                cp.enable()

            def stop(self):
                cp.disable()
                stats = pstats.Stats(cp).strip_dirs()
                stats.sort_stats("cumulative").print_stats(top)
                stats.sort_stats("tottime").print_stats(top)

    p = P()
    pacer = SoloPacer(setup.warmup, p)
    run = RUNNERS[name](setup, pacer)
    pacer.wait()
    run()
    p.stop()
    measured = pacer.times[setup.warmup:]
    print(f"{name}: median {statistics.median(measured):.3f} s/step over {len(measured)} profiled steps "
          f"(profiler overhead included); work {pacer.works[-1]}")


def main(argv: list[str] | None = None) -> dict[str, Result]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--contenders", nargs="+", default=[n for n in RUNNERS if n not in OPT_IN], choices=list(RUNNERS),
        help=f"default: all but {', '.join(OPT_IN)}",
    )
    parser.add_argument("--steps", type=int, default=30, help="measured steps per contender")
    parser.add_argument("--warmup", type=int, default=3, help="dropped steps per contender")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=32, help="rollout length (forced)")
    parser.add_argument(
        "--threads", type=int, default=1,
        help="torch threads per contender (1: on a shared machine, 2 OpenMP threads on 2 busy cores stall each other)",
    )
    parser.add_argument("--accelerator", choices=["cpu", "gpu"], default="cpu", help="gpu: ours and the bare loop on CUDA")
    parser.add_argument("--student-size", type=int, nargs=2, default=[64, 2], metavar=("HIDDEN", "LAYERS"))
    parser.add_argument("--teacher-size", type=int, nargs=2, default=[128, 3], metavar=("HIDDEN", "LAYERS"))
    parser.add_argument("--out", default=str(ROOT / "benchmarks/results/throughput.md"), help="markdown output ('' for none)")
    parser.add_argument("--profile", choices=list(RUNNERS), help="profile one contender alone instead")
    parser.add_argument("--profiler", choices=["cprofile", "torch"], default="cprofile")
    parser.add_argument("--top", type=int, default=30)
    args = parser.parse_args(argv)
    if args.steps < 1 or args.warmup < 0:
        parser.error("--steps must be >= 1 and --warmup >= 0")
    if args.accelerator == "gpu":
        cpu_only = [n for n in args.contenders if n.startswith("trl")]
        if cpu_only:
            parser.error(f"{cpu_only} run on the CPU only; leave them out with --accelerator gpu")
        import torch

        if not torch.cuda.is_available():
            parser.error("--accelerator gpu needs CUDA, and torch.cuda.is_available() is False here")

    with tempfile.TemporaryDirectory(prefix="trd_throughput_") as tmp:
        student_size, teacher_size = tuple(args.student_size), tuple(args.teacher_size)
        student, teacher = build_models(Path(tmp), seed=0, student_size=student_size, teacher_size=teacher_size)
        setup = Setup(
            student, teacher, batch_size=args.batch_size, new_tokens=args.new_tokens, steps=args.steps,
            warmup=args.warmup, threads=args.threads,
            train_size=max(4096, args.batch_size * (args.steps + args.warmup)),
            accelerator=args.accelerator, student_size=student_size, teacher_size=teacher_size,
        )
        if args.profile:
            profile(args.profile, setup, args.profiler, args.top)
            return {}
        load_before = os.getloadavg()
        started = time.perf_counter()
        results = run_interleaved(args.contenders, setup)
        wall = time.perf_counter() - started
        load_after = os.getloadavg()

    verdict = check_same_work(results)
    forced = {n: r for n, r in results.items() if n not in CONFIGS}
    configs = {n: r for n, r in results.items() if n in CONFIGS}
    rows, notes = table(forced, setup, verdict) if forced else ("", [])
    if configs:
        config_rows, config_notes = table(configs, setup, verdict, CONFIG_REFERENCE)
        rows = "\n\n".join(part for part in (rows, CONFIG_INTRO + "\n\n" + config_rows) if part)
        notes += config_notes
    command = "python benchmarks/throughput.py " + " ".join(argv if argv is not None else sys.argv[1:])
    header = [
        f"Measured {datetime.datetime.now().isoformat(timespec='minutes')} on {platform.processor() or platform.machine()} "
        f"({os.cpu_count()} CPU cores, {args.threads} torch thread(s) per contender, see --threads), {versions()}.",
        f"Load average (1/5/15 min) before: {load_before[0]:.2f}/{load_before[1]:.2f}/{load_before[2]:.2f}, after: "
        f"{load_after[0]:.2f}/{load_after[1]:.2f}/{load_after[2]:.2f} (the machine is shared; the run took {wall:.0f} s).",
        f"Student hidden {student_size[0]} × {student_size[1]} layers, teacher {teacher_size[0]} × {teacher_size[1]} "
        f"(random, from config), on {'the GPU' if args.accelerator == 'gpu' else 'the CPU'}, batch {args.batch_size}, exactly "
        f"{args.new_tokens} new tokens per rollout, reverse KL, AdamW; {args.warmup} warm-up steps dropped, "
        f"median of {args.steps} interleaved steps per contender.",
    ]
    check = ["ratio to ours OPD = contender's s/step ÷ ours. Same-work check: "
             + ("passed for every contender that ran." if not any(verdict.values()) else "see the notes.")]
    lines = header + ["", rows, ""] + check + [f"- {n}" for n in notes] + [""] + [f"- {t}" for t in targets(results, verdict)]
    text = "\n".join(lines)
    print()
    print(text)
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(f"# Throughput of one on-policy distillation step\n\nCommand: `{command.strip()}`\n\n{text}\n\n{HOW}\n")
        print(f"\nwritten to {out}")
    return results


if __name__ == "__main__":
    main()
