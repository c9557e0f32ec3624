"""A sharded fit run as its own program (Lightning's FSDP2 launcher re-runs the command per rank).

    python -m tests.fsdp_fit OUT STUDENT TEACHER [--accelerator cpu|gpu] [--devices N]
        [--state-dict full|sharded] [--lora] [--activation-checkpointing] [--teacher-4bit]

``--teacher-4bit`` loads the teacher in bitsandbytes NF4 and keeps it replicated (a quantized
teacher cannot be FSDP-sharded); its first-step loss is then not compared (no unquantized twin).

Each rank writes ``OUT/rank{r}.json`` with what the tests assert: both models sharded, the teacher
in bf16 and unchanged, the student changed, the first step's loss against an unsharded
recomputation, and which keys the checkpoint holds.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from lightning.pytorch import Callback, Trainer
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import CheckpointWrapper

from tests.helpers import ROOT, run_isolated
from trd_lightning import DistillationModule, PromptDataModule, Sampling
from trd_lightning.callbacks import TeacherSharding
from trd_lightning.losses import reverse_kl
from trd_lightning.models import load_causal_lm
from trd_lightning.rollout import response_logits
from trd_lightning.sharding import FSDP2Strategy, is_sharded
from trd_lightning.tasks import ArithmeticTask


def launch(out, student, teacher, *options, world_size: int, accelerator: str = "cpu", timeout: float = 240) -> list[dict]:
    """Run this program (Lightning re-runs it per rank) in its own process group, so a hang is
    killed whole, every rank included; return each rank's record."""
    command = [sys.executable, "-m", "tests.fsdp_fit", str(out), str(student), str(teacher),
               "--accelerator", accelerator, "--devices", str(world_size), *options]
    run_isolated(command, ROOT, timeout, f"the {world_size}-process fit", tail=4000)
    return [json.loads((Path(out) / f"rank{r}.json").read_text()) for r in range(world_size)]


class _FirstStepCheck(Callback):
    """Recomputes step 0's loss with unsharded copies of the initial models, on the same rollout."""

    def __init__(self, student: str, teacher: str):
        self.paths = (student, teacher)
        self.expected = self.lengths = None
        self.losses: list[float] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        rollout = batch["rollout"]
        if batch_idx == 0 and self.paths[1] is not None:
            device = rollout.response_ids.device
            student = load_causal_lm(self.paths[0], trainable=False).to(device)
            teacher = load_causal_lm(self.paths[1], trainable=False).to(device=device, dtype=torch.bfloat16)
            with torch.no_grad():
                s = response_logits(student, rollout.student)
                t = response_logits(teacher, rollout.teacher)
            self.expected = float(reverse_kl(s, t, rollout.response_mask))
        self.lengths = (self.lengths or []) + [int(rollout.lengths.max())]

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.losses.append(float(outputs["loss"]))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out")
    parser.add_argument("student")
    parser.add_argument("teacher")
    parser.add_argument("--accelerator", default="cpu")
    parser.add_argument("--devices", type=int, default=2)
    parser.add_argument("--state-dict", default="full", choices=["full", "sharded"])
    parser.add_argument("--lora", action="store_true")
    parser.add_argument("--activation-checkpointing", action="store_true")
    parser.add_argument("--teacher-4bit", action="store_true")
    args = parser.parse_args()
    out = Path(args.out)
    torch.manual_seed(0)

    task = ArithmeticTask(val_size=4, test_size=4)
    module = DistillationModule(
        student=args.student, teacher=args.teacher, task=task,
        sampling=Sampling(temperature=1.0, max_new_tokens=8),
        # AdamW: Lightning's full-checkpoint FSDP2 loader fails on an empty optimizer state (plain SGD).
        optimizer=lambda p: torch.optim.AdamW(p, lr=1e-2),
        student_lora={"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"]} if args.lora else None,
        teacher_quantization={"load_in_4bit": True} if args.teacher_4bit else None,
    )
    teacher_before = {k: v.to(torch.bfloat16).clone() for k, v in module.teacher.state_dict().items()}
    # A 4-bit teacher's storage is repacked by bitsandbytes' CPU kernel when the module moves:
    # compare its outputs instead of its state.
    probe = torch.randint(3, 20, (2, 8), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        probe_before = module.teacher(probe.to(module.teacher.device)).logits.float().cpu() if args.teacher_4bit else None
    student_before = {k: v.clone() for k, v in module.student.state_dict().items()}
    check = _FirstStepCheck(args.student, None if args.teacher_4bit else args.teacher)
    trainer = Trainer(
        accelerator=args.accelerator, devices=args.devices,
        strategy=FSDP2Strategy(
            decoder_layers=["LlamaDecoderLayer"], state_dict_type=args.state_dict,
            activation_checkpointing=args.activation_checkpointing,
        ),
        callbacks=[
            TeacherSharding(placement="replicate", dtype=None) if args.teacher_4bit else TeacherSharding(placement="shard", dtype="bf16"),
            check,
        ],
        max_steps=3, limit_val_batches=0, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False,
    )
    trainer.fit(module, PromptDataModule(task, batch_size=4))

    def full(t):
        return t.full_tensor() if hasattr(t, "full_tensor") else t

    teacher_after = {k: full(v).cpu() for k, v in module.teacher.state_dict().items()}
    if args.teacher_4bit:
        with torch.no_grad():
            probe_after = module.teacher(probe.to(module.teacher.device)).logits.float().cpu()
        # bf16 compute, and bitsandbytes' CPU kernel repacks the weights when Lightning moves the
        # module, which reorders sums: equal up to bf16 rounding (a trained teacher moves far more).
        unchanged = torch.allclose(probe_after, probe_before, atol=1e-2, rtol=1e-2)
    else:
        unchanged = all(torch.equal(teacher_after[k].cpu(), teacher_before[k].cpu()) for k in teacher_before)
    student_after = {k: full(v).cpu() for k, v in module.student.state_dict().items()}
    weight = module.teacher.model.layers[0].mlp.up_proj.weight
    wrapped = sum(isinstance(m, CheckpointWrapper) for m in module.student.modules())
    ckpt = out / "model.ckpt"
    trainer.save_checkpoint(ckpt)
    trainer.strategy.barrier()
    if ckpt.is_dir():
        from torch.distributed.checkpoint import FileSystemReader

        keys = list(FileSystemReader(str(ckpt)).read_metadata().state_dict_metadata)
    else:
        keys = [f"state_dict.{k}" for k in torch.load(ckpt, weights_only=False, map_location="cpu")["state_dict"]]
    # Reload through the strategy (what a resume does) after wiping the trainable weights: they
    # must come back, while the teacher and the frozen base weights are not expected in the file.
    with torch.no_grad():
        for p in module.student.parameters():
            if p.requires_grad:
                p.zero_()
    trainer.strategy.load_checkpoint(ckpt)
    reloaded = {k: full(v).cpu() for k, v in module.student.state_dict().items()}
    result = {
        "world_size": trainer.world_size,
        "student_sharded": is_sharded(module.student),
        "teacher_sharded": is_sharded(module.teacher),
        "teacher_dtype": str(weight.dtype),
        "checkpoint_wrapped_layers": wrapped,
        "teacher_layer": type(module.teacher.model.layers[0].mlp.up_proj).__name__,
        "teacher_device": str(weight.device),
        "teacher_local_rows": int(weight.to_local().shape[0]) if hasattr(weight, "to_local") else int(weight.shape[0]),
        "teacher_rows": int(weight.shape[0]),
        "teacher_requires_grad": any(p.requires_grad for p in module.teacher.parameters()),
        "optimizer_has_teacher": bool(
            {id(p) for p in module.teacher.parameters()}
            & {id(p) for g in trainer.optimizers[0].param_groups for p in g["params"]}
        ),
        "teacher_unchanged": unchanged,
        "student_changed": any(not torch.equal(student_after[k], student_before[k].cpu()) for k in student_before),
        "reloaded": all(torch.equal(reloaded[k], student_after[k]) for k in student_after),
        "losses": check.losses,
        "expected_first_loss": check.expected,
        "max_lengths": check.lengths,
        "checkpoint_keys": keys,
    }
    (out / f"rank{trainer.global_rank}.json").write_text(json.dumps(result))


if __name__ == "__main__":
    main()
