"""The contenders of the throughput benchmark: ours (`Trainer.fit` on `DistillationModule`, OPD and
the TRD revisers), the shipped arithmetic configs, TRL's trainers and a bare PyTorch loop. Each
``run_*`` builds its training loop in the worker process and returns the call that trains; it
reports every step's work to the harness's pacer. `RUNNERS` maps the ``--contenders`` names to them.
"""

from __future__ import annotations

import tempfile
from functools import partial

from benchmarks.throughput.harness import ROOT, FixedLengthSampling, Setup, load_models, task_for, train_prompts

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


def _pace_callback(pacer, revising: bool):
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


def _bench_trainer(setup: Setup, callbacks: list):
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


def _run_config(setup: Setup, pacer, name: str):
    """A shipped arithmetic config as `trd fit` would build it (no logger, no validation, no checkpoints)."""

    from trd_lightning.callbacks import TrajectoryRevision
    from trd_lightning.cli import build_cli

    config, two_pass = CONFIGS[name]
    path = ROOT / "configs" / "arith" / f"{config}.yaml"
    cli = build_cli(["fit", "-c", str(path), "--trainer.logger=false", f"--seed_everything={setup.seed}"], run=False)
    revision = [cb for cb in cli.trainer.callbacks if isinstance(cb, TrajectoryRevision)]
    if two_pass:
        revision[0].reviser.fused = False
    trainer = _bench_trainer(setup, revision + [_pace_callback(pacer, bool(revision))])
    return lambda: trainer.fit(cli.model, datamodule=cli.datamodule)


def _run_ours(setup: Setup, pacer, reviser: str | None):
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
        optimizer=partial(torch.optim.AdamW, lr=setup.lr, weight_decay=0.0),
    )
    data = PromptDataModule(task, batch_size=setup.batch_size, shuffle=True)

    callbacks = []
    if reviser is not None:
        from trd_lightning.callbacks import TrajectoryRevision
        from trd_lightning.revision import PrefixSpliceReviser, RewriteReviser

        revise = RewriteReviser() if reviser == "rewrite" else PrefixSpliceReviser(fused=reviser == "splice")
        callbacks.append(TrajectoryRevision(revise))
    callbacks.append(_pace_callback(pacer, reviser is not None))  # last: after TrajectoryRevision's logging
    trainer = _bench_trainer(setup, callbacks)
    return lambda: trainer.fit(module, data)



# --- bare PyTorch -----------------------------------------------------------------------------


def _run_bare(setup: Setup, pacer):
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


def _trl_common_args(setup: Setup, output_dir: str) -> dict:
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


def _trl_pace_callback(pacer, trainer_ref: dict):
    from transformers import TrainerCallback

    class Pace(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            pacer.step_done(dict(trainer_ref["trainer"].last_work))

    return Pace()


def _run_trl_distillation(setup: Setup, pacer, trl_defaults: bool = False):
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
    common = _trl_common_args(setup, tempfile.mkdtemp(prefix="trl_distill_"))
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
        callbacks=[_trl_pace_callback(pacer, ref)],
    )
    ref["trainer"] = trainer
    return trainer.train


def _run_trl_gkd(setup: Setup, pacer):
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
    common = _trl_common_args(setup, tempfile.mkdtemp(prefix="trl_gkd_"))
    args = GKDConfig(**common, lmbda=1.0, max_new_tokens=n, disable_dropout=True)
    ref: dict = {}
    trainer = CountingGKDTrainer(
        model=student,
        teacher_model=teacher,
        args=args,
        data_collator=collate,
        train_dataset=Dataset.from_dict({"prompt": train_prompts(setup)}),
        processing_class=tok,
        callbacks=[_trl_pace_callback(pacer, ref)],
    )
    # GKD builds its GenerationConfig itself (no generation_kwargs argument): force the length there.
    trainer.generation_config.min_new_tokens = n
    trainer.generation_config.eos_token_id = tok.eos_token_id
    ref["trainer"] = trainer
    return trainer.train




# name -> runner(setup, pacer); partials of module-level functions, so that they pickle into the
# spawned worker processes.
RUNNERS = {
    "ours_opd": partial(_run_ours, reviser=None),
    "ours_trd_rewrite": partial(_run_ours, reviser="rewrite"),
    "ours_trd_splice": partial(_run_ours, reviser="splice"),
    "ours_trd_splice_two_pass": partial(_run_ours, reviser="splice_two_pass"),
    "trl_distillation": _run_trl_distillation,
    "trl_distillation_defaults": partial(_run_trl_distillation, trl_defaults=True),
    "trl_gkd": _run_trl_gkd,
    "bare": _run_bare,
    **{name: partial(_run_config, name=name) for name in CONFIGS},
}


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

