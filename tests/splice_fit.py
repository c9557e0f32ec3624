"""Multi-process `trd fit` runs of the shipped splice config, checked rank by rank against one process.

`RolloutCheck` is a callback the tests add through a YAML overlay. On every training step, on
each rank, it re-makes the step's rollout (and, for the two-pass reviser, the revision) with an
unsharded copy of the current weights in this process, from the random state the real one started
from: a single-process decode of the same rows with the same seed. It records whether the tokens
and ``t*`` are equal and how far apart the teacher logits are, the step's loss, and what the
strategy decided about gathering, in ``OUT/rank{r}.json``.

`launch_cli` runs ``python -m trd_lightning.cli fit -c ... `` in its own process group with a
timeout (Lightning re-launches it per rank), so a hang fails the test instead of blocking CI.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from lightning.pytorch import Callback

from tests.helpers import ROOT, run_isolated  # noqa: F401  (ROOT: imported from here by the scale tests)



def launch_cli(cwd: Path, *configs: str, timeout: float = 420) -> str:
    """``trd fit`` with these configs (from this checkout), run in ``cwd``; returns its stderr."""
    command = [sys.executable, "-m", "trd_lightning.cli", "fit", *[a for c in configs for a in ("-c", str(c))]]
    return run_isolated(command, cwd, timeout, "the multi-process fit")


def _full(t):
    return t.full_tensor() if hasattr(t, "full_tensor") else t


class RolloutCheck(Callback):
    """See the module docstring. ``out``: the folder for ``rank{r}.json``."""

    def __init__(self, out: str):
        self.out = out
        self.records: list[dict] = []
        self.losses: list[float] = []

    # --- the single-process twin ------------------------------------------------------------
    def on_train_start(self, trainer, pl_module):
        from trd_lightning import DistillationModule
        from trd_lightning.callbacks import TrajectoryRevision

        self.module = pl_module
        hparams = {k: v for k, v in pl_module.hparams.items() if not k.startswith("_")}  # LightningCLI adds _instantiator
        hparams["sampling"] = pl_module.sampling  # hparams hold it as the parsed dict
        self.ref = DistillationModule(task=pl_module.task, **hparams).to(pl_module.device)
        self.ref.eval()
        # The sharded run computes in these dtypes: the teacher's storage dtype (TeacherSharding),
        # the student's FSDP mixed-precision dtype when set (params cast, buffers left as FSDP does).
        self.teacher_dtype = next(pl_module.teacher.parameters()).dtype
        plan = getattr(trainer.strategy, "plan", None)
        self.student_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(getattr(plan, "mixed_precision", None))
        revision = next(c for c in trainer.callbacks if isinstance(c, TrajectoryRevision))
        self.reviser = revision.reviser
        real_rollout, real_revise = pl_module.make_rollout, self.reviser.revise
        ref_revise = type(self.reviser).revise.__get__(self.reviser)

        def make_rollout(problems):
            if not trainer.training:
                return real_rollout(problems)
            expected = (lambda: self.reviser.sample_revised(self.ref, problems)) if pl_module.rollout_reviser else (lambda: self.ref.make_rollout(problems))
            return self._checked("rollout", lambda: real_rollout(problems), expected)

        def revise(module, rollout):
            return self._checked("revise", lambda: real_revise(module, rollout), lambda: ref_revise(self.ref, rollout))

        pl_module.make_rollout = make_rollout
        self.reviser.revise = revise
        # After a resume this is the restored state: compared with the saving run's final one.
        self.start_checksum = self._checksum(pl_module)
        self.start_step = trainer.global_step

    @staticmethod
    def _checksum(pl_module) -> float:
        return sum(float(_full(v).double().sum()) for v in pl_module.student.state_dict().values())

    def _load_current_weights(self) -> None:
        # full_tensor() all-gathers: every rank calls this at the same points, in the same order.
        for name in ("student", "teacher"):
            state = {k.replace("_checkpoint_wrapped_module.", ""): _full(v).detach() for k, v in getattr(self.module, name).state_dict().items()}
            model = getattr(self.ref, name)
            model.load_state_dict(state)
            if name == "teacher":  # TeacherSharding casts the whole module, buffers included
                model.to(self.teacher_dtype)
            elif self.student_dtype is not None:  # FSDP mixed precision casts parameters only
                for p in model.parameters():
                    p.data = p.data.to(self.student_dtype)

    @staticmethod
    def _rng():
        return torch.get_rng_state(), torch.cuda.get_rng_state() if torch.cuda.is_available() else None

    @staticmethod
    def _set_rng(state) -> None:
        torch.set_rng_state(state[0])
        if state[1] is not None:
            torch.cuda.set_rng_state(state[1])

    def _checked(self, kind, real, expected):
        start = self._rng()
        got = real()
        after = self._rng()
        self._load_current_weights()
        self._set_rng(start)
        with torch.no_grad():
            want = expected()
        self._set_rng(after)
        record = {
            "kind": kind,
            "rows": int(got.response_ids.shape[0]),
            "lengths": got.lengths.tolist(),
            "tokens_equal": torch.equal(got.response_ids, want.response_ids) and torch.equal(got.response_mask, want.response_mask),
        }
        if "t_star_rows" in got.info:
            record["t_star"] = got.info["t_star_rows"].tolist()
            record["t_star_equal"] = torch.equal(got.info["t_star_rows"].cpu(), want.info["t_star_rows"].cpu())
        if got.teacher_logits is not None and want.teacher_logits is not None and record["tokens_equal"]:
            m = got.response_mask
            diff = (got.teacher_logits.float() - want.teacher_logits.float()).abs()[m]
            record["logits_max_diff"] = float(diff.max()) if diff.numel() else 0.0
            record["logits_scale"] = float(want.teacher_logits.float().abs()[m].max())
        self.records.append(record)
        return got

    # --- what the tests read ----------------------------------------------------------------
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.losses.append(float(outputs["loss"]))

    def on_fit_end(self, trainer, pl_module):
        from trd_lightning.sharding import is_sharded

        strategy = trainer.strategy
        mesh = getattr(strategy, "hsdp_mesh", None)
        result = {
            "world_size": trainer.world_size,
            "strategy": type(strategy).__name__,
            "global_step": trainer.global_step,
            "student_sharded": is_sharded(pl_module.student),
            "teacher_sharded": is_sharded(pl_module.teacher),
            "mesh": list(mesh.mesh_dim_names) + list(mesh.shape) if mesh is not None else None,
            "gather_decisions": {"|".join(k): v for k, v in getattr(strategy, "_gather_decisions", {}).items()},
            "records": self.records,
            "losses": self.losses,
            "start_step": self.start_step,
            "start_checksum": self.start_checksum,
            "checksum": self._checksum(pl_module),
        }
        (Path(self.out) / f"rank{trainer.global_rank}.json").write_text(json.dumps(result))
