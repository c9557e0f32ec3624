"""Two processes (``ddp_spawn`` on gloo, CPU): prompts sharded per rank with equal batch counts,
rollouts made per rank from the rank's own prompts, the teacher kept out of DDP, and Pass@k
synchronised so that it equals a single-process evaluation of the same problems."""

from __future__ import annotations

import json
import zlib
from collections import Counter
from pathlib import Path

import pytest
from lightning.pytorch import Callback, seed_everything

from tests.helpers import cpu_trainer
from trd_lightning import DistillationModule, PromptDataModule, Sampling
from trd_lightning.callbacks import PassAtKEvaluation, TeacherSharding
from trd_lightning.tasks import ArithmeticTask

GREEDY = Sampling(temperature=0.0, max_new_tokens=6)


class HashTask(ArithmeticTask):
    """Random tiny models are never right on arithmetic; a verdict that hashes the response makes
    outcomes differ between problems (and stay deterministic under greedy decoding)."""

    def verify(self, problem, response: str) -> bool:
        return zlib.crc32(f"{problem.expression}|{response}".encode()) % 2 == 0


class Recorder(Callback):
    """Writes what each rank saw to ``out/rank{r}.json`` (spawned processes share no memory)."""

    def __init__(self, out: str, task):
        self.out, self.task = out, task
        self.train, self.val, self.rollouts, self.teacher_ignored = [], [], [], None

    def on_fit_start(self, trainer, pl_module):
        ignored = getattr(trainer.strategy.model, "parameters_to_ignore", set())
        names = [f"teacher.{n}" for n, _ in pl_module.teacher.named_parameters()]
        self.teacher_ignored = bool(names) and all(n in ignored for n in names)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        ids = [self.task.problem_id(p) for p in batch["problems"]]
        rollout = batch["rollout"]
        self.train.append(ids)
        self.rollouts.append({
            "ids": [self.task.problem_id(p) for p in rollout.problems],
            "rows": int(rollout.response_ids.shape[0]),
        })

    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0):
        self.val.append([self.task.problem_id(p) for p in batch["problems"]])

    def on_fit_end(self, trainer, pl_module):
        passk = next(c for c in trainer.callbacks if isinstance(c, PassAtKEvaluation))
        record = {"train": self.train, "val": self.val, "rollouts": self.rollouts, "metrics": passk.last,
                  "teacher_ignored": self.teacher_ignored, "world_size": trainer.world_size}
        (Path(self.out) / f"rank{trainer.global_rank}.json").write_text(json.dumps(record))


@pytest.mark.slow
def test_two_process_fit_and_validation_match_one_process(tiny_paths, tmp_path):
    seed_everything(0)
    task = HashTask(train_size=12, val_size=7, test_size=4)
    train_ids = [task.problem_id(p) for p in task.problems("train")]
    val_ids = [task.problem_id(p) for p in task.problems("val")]
    assert len(set(train_ids)) == 12 and len(set(val_ids)) == 7, "the test needs distinct problems"

    module = DistillationModule(
        student=tiny_paths["student"], teacher=tiny_paths["teacher"], task=task, sampling=Sampling(max_new_tokens=6)
    )
    # Greedy, so outcomes depend on the problem only (sampled evaluation is seeded per rank and
    # batch). n=1: transformers refuses greedy generation with num_return_sequences > 1.
    passk = PassAtKEvaluation(n=1, ks=(1,), sampling=GREEDY)
    trainer = cpu_trainer(
        strategy="ddp_spawn", devices=2, max_epochs=1,
        callbacks=[passk, TeacherSharding(dtype=None), Recorder(str(tmp_path), task)],
    )
    trainer.fit(module, PromptDataModule(task, batch_size=2, eval_batch_size=1))
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["world_size"] for r in ranks] == [2, 2]

    # Training prompts: each rank a disjoint half (12 problems, no padding needed), same batch count.
    per_rank = [[i for batch in r["train"] for i in batch] for r in ranks]
    assert len(ranks[0]["train"]) == len(ranks[1]["train"]) == 3
    assert set(per_rank[0]).isdisjoint(per_rank[1])
    assert Counter(per_rank[0] + per_rank[1]) == Counter(train_ids)
    # Rollouts: made on each rank from that rank's own batch, one row per problem.
    for r in ranks:
        assert [x["ids"] for x in r["rollouts"]] == r["train"]
        assert all(x["rows"] == len(b) for x, b in zip(r["rollouts"], r["train"]))
    # Validation: 7 problems padded to 8 by the sampler (one repeat), 4 batches per rank.
    val = [[i for batch in r["val"] for i in batch] for r in ranks]
    assert len(ranks[0]["val"]) == len(ranks[1]["val"]) == 4
    assert set(val[0]) | set(val[1]) == set(val_ids)
    assert len(set(val[0]) & set(val[1])) == 1
    # The frozen teacher stays out of DDP's broadcast and gradient hooks.
    assert all(r["teacher_ignored"] for r in ranks)

    # Pass@k: both ranks log the synchronised value, and it equals a one-process evaluation of
    # the same 7 problems with the trained weights (ddp_spawn hands them back to this process).
    assert ranks[0]["metrics"] == ranks[1]["metrics"]
    single = PassAtKEvaluation(n=1, ks=(1,), sampling=GREEDY)
    cpu_trainer(callbacks=[single]).validate(module, PromptDataModule(task, batch_size=2, eval_batch_size=1))
    assert set(single.last) == {"val/avg@1", "val/pass@1", "val/derivations", "val/derivation_coverage", "val/derivations_available"}
    for name, value in single.last.items():
        assert ranks[0]["metrics"][name] == pytest.approx(value, abs=1e-12), name
    assert 0 < single.last["val/pass@1"] < 1, "outcomes must differ between problems for this test to mean anything"


class FusedRecorder(Callback):
    """Per rank: whether each training rollout came from the fused splice, and the final weights' checksum."""

    def __init__(self, out: str):
        self.out, self.fused = out, []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        rollout = batch["rollout"]
        self.fused.append(bool(rollout.info.get("fused")) and rollout.teacher_logits is not None)

    def on_fit_end(self, trainer, pl_module):
        checksum = sum(float(p.double().sum()) for p in pl_module.student.parameters())
        record = {"fused": self.fused, "checksum": checksum, "hooked_during_fit": pl_module.rollout_reviser is not None}
        (Path(self.out) / f"fused_rank{trainer.global_rank}.json").write_text(json.dumps(record))


@pytest.mark.slow
def test_fused_splice_under_ddp_keeps_ranks_in_step(tiny_paths, tmp_path):
    # The fused decode runs a data-dependent number of steps on each rank with no collective inside
    # it; DDP only meets the ranks in backward, so replicated training stays in step.
    from trd_lightning.callbacks import TrajectoryRevision
    from trd_lightning.revision import PrefixSpliceReviser

    seed_everything(0)
    task = ArithmeticTask(train_size=8, val_size=2, test_size=2)
    module = DistillationModule(
        student=tiny_paths["student"], teacher=tiny_paths["teacher"], task=task,
        sampling=Sampling(temperature=1.0, max_new_tokens=6), loss="forward_kl",
    )  # fmt: skip
    trainer = cpu_trainer(
        strategy="ddp_spawn", devices=2, max_steps=2, limit_val_batches=0,
        callbacks=[TrajectoryRevision(PrefixSpliceReviser(threshold=0.04)), FusedRecorder(str(tmp_path))],
    )  # fmt: skip
    trainer.fit(module, PromptDataModule(task, batch_size=2))
    ranks = [json.loads((tmp_path / f"fused_rank{r}.json").read_text()) for r in (0, 1)]
    assert all(r["fused"] == [True, True] for r in ranks), "every training rollout came from the fused decode"
    assert all(r["hooked_during_fit"] for r in ranks)
    assert ranks[0]["checksum"] == ranks[1]["checksum"], "replicas diverged"
