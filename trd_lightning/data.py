"""`PromptDataModule`: batches of problems from a `Task`; rollouts attached on the fly.

Rollouts are made in `on_after_batch_transfer`, i.e. when the batch is about to be used, by
``trainer.lightning_module.make_rollout(problems)`` (the one declared rollout path, see
`trd_lightning.protocol`), from the weights as they are at that moment. A DataLoader worker or prefetch never sees
the model, so the rollout of step t always comes from the weights after update t-1.
"""

from __future__ import annotations

from collections.abc import Sequence

from lightning.fabric.utilities.apply_func import move_data_to_device
import torch
from lightning.pytorch import LightningDataModule
from torch.utils.data import DataLoader, Dataset

from trd_lightning.resume import EpochShuffleSampler, ResumableDataLoader, global_seed
from trd_lightning.tasks.base import Task


class ProblemDataset(Dataset):
    """A map-style dataset over a task's problem records.

    Args:
        problems: the records, indexed as given.
    """

    def __init__(self, problems: Sequence):
        self.problems = problems

    def __len__(self) -> int:
        return len(self.problems)

    def __getitem__(self, index):
        return self.problems[index]


def collate_problems(problems: list) -> dict:
    return {"problems": list(problems)}


def move_batch_to_device(batch: dict, device) -> dict:
    """Move tensors only: problems are task records (possibly frozen dataclasses), left as they are."""
    return {k: v if k == "problems" else move_data_to_device(v, device) for k, v in batch.items()}


class PromptDataModule(LightningDataModule):
    """Prompt batches of a task's train / val / test problems.

    Map-style datasets, so Lightning's `DistributedSampler` shards them by rank and gives every
    rank the same number of batches (it pads by repeating problems; `PassAtK` de-duplicates them).

    Args:
        task: the problem source (the embedded `ArithmeticTask` by default).
        batch_size: problems per training step (one rollout each).
        eval_batch_size: problems per validation/test batch (each sampled n times by Pass@k).
        shuffle: shuffle the training problems (seeded by ``seed_everything``).
        num_workers: DataLoader worker processes (the rollouts are made in the main process).
    """

    def __init__(
        self,
        task: Task | None = None,
        batch_size: int = 32,
        eval_batch_size: int | None = None,
        shuffle: bool = True,
        num_workers: int = 0,
    ):
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if eval_batch_size is not None and eval_batch_size < 1:
            raise ValueError(f"eval_batch_size must be >= 1 (or null to use batch_size), got {eval_batch_size}")
        if task is None:
            from trd_lightning.tasks import ArithmeticTask

            task = ArithmeticTask()
        self.task = task
        self.batch_size = batch_size
        self.eval_batch_size = batch_size if eval_batch_size is None else eval_batch_size
        self.shuffle, self.num_workers = shuffle, num_workers

    def _problems(self, split: str) -> Sequence:
        problems = self.task.problems(split)
        if len(problems) == 0:
            raise ValueError(f"the task has no {split} problems; check its data file or size settings")
        return problems

    def setup(self, stage: str) -> None:
        # An empty split fails here, before any compute: Lightning builds the val loader only at
        # the first validation, i.e. after training steps have been paid for.
        splits = {"fit": ("train", "val"), "validate": ("val",), "test": ("test",), "predict": ("test",)}.get(stage, ())
        trainer = self.trainer
        if stage == "fit" and trainer is not None and trainer.limit_val_batches == 0:
            splits = ("train",)
        for split in splits:
            self._problems(split)

    def _loader(self, split: str, batch_size: int, shuffle: bool) -> DataLoader:
        problems = self._problems(split)
        dataset = ProblemDataset(problems)
        # Resumable mid-epoch (see trd_lightning.resume); the generator keeps the loader off the
        # global RNG, which the rollouts sample from.
        return ResumableDataLoader(
            dataset,
            batch_size=batch_size,
            sampler=EpochShuffleSampler(dataset) if shuffle else None,
            drop_last=split == "train" and len(problems) >= batch_size,
            collate_fn=collate_problems,
            num_workers=self.num_workers,
            generator=torch.Generator().manual_seed(global_seed()),
        )

    def train_dataloader(self) -> DataLoader:
        loader = self._loader("train", self.batch_size, self.shuffle)
        # The epoch Lightning is about to run (it sets it on the sampler only after pre-fetching
        # the first batch, which matters when a run resumes at an epoch boundary).
        trainer = self.trainer
        if trainer is not None and getattr(trainer, "fit_loop", None) is not None:
            loader.set_epoch(trainer.fit_loop.epoch_progress.current.processed)
        return loader

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", self.eval_batch_size, False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", self.eval_batch_size, False)

    def predict_dataloader(self) -> DataLoader:
        return self._loader("test", self.eval_batch_size, False)

    def transfer_batch_to_device(self, batch: dict, device, dataloader_idx: int) -> dict:
        return move_batch_to_device(batch, device)

    def on_after_batch_transfer(self, batch: dict, dataloader_idx: int) -> dict:
        trainer = self.trainer
        if trainer is not None and trainer.training:
            # Counted when used, not when fetched (Lightning pre-fetches): what a resume skips.
            loader = trainer.train_dataloader
            if isinstance(loader, ResumableDataLoader):
                loader.mark_consumed()
            # The one rollout path (trd_lightning.protocol.RolloutModel.make_rollout): y_o, or with
            # a fused reviser plugged in by TrajectoryRevision, y_r sampled already revised.
            # A module without it fails here with AttributeError naming make_rollout.
            batch["rollout"] = trainer.lightning_module.make_rollout(batch["problems"])
        return batch
