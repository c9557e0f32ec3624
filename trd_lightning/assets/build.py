"""The maintainer tool that builds the shipped assets: supervised fine-tuning inside the framework,
how the embedded task's tiny teacher and initial student in ``trd_lightning/assets/arith`` are made.
Rebuild them (this overwrites the shipped weights) with::

    trd fit -c configs/arith/teacher_sft.yaml   # writes trd_lightning/assets/arith/teacher
    trd fit -c configs/arith/student_sft.yaml   # writes trd_lightning/assets/arith/student

Not part of the package's top-level names: distillation users load the assets, they do not build them.

The loss is on response tokens only: with the loss on random prompt digits a tiny model stays near
chance, with it on the answer only it learns the task in minutes (measured on this machine).
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from lightning.pytorch import LightningDataModule, LightningModule
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch.utils.data import DataLoader, Dataset

from trd_lightning.data import ProblemDataset, collate_problems, move_batch_to_device
from trd_lightning.models import build_tiny_causal_lm, load_causal_lm, load_tokenizer
from trd_lightning.rollout import Context, Sampling, encode_prompts, response_logits, sample_responses, stop_token_ids
from trd_lightning.tasks.arithmetic import ArithmeticTask, sft_example
from trd_lightning.tasks.arithmetic_tokenizer import build_arithmetic_tokenizer
from trd_lightning.tasks.base import Task


@dataclass
class TinyArchitecture:
    hidden_size: int = 128
    num_layers: int = 4
    num_heads: int = 4
    max_position_embeddings: int = 256


class SFTModule(LightningModule):
    """Trains a causal LM on a task's supervised mixture and exports it with ``save_pretrained``.

    Args:
        init_from: a model path to continue from; ``None`` builds a fresh model from ``architecture``.
        tokenizer: a tokenizer path; ``None`` builds the arithmetic task's tokenizer in code.
        export_dir: where the final model and tokenizer are written (rank 0, at the end of fit).
        export_snapshots: also write ``{export_dir}_snapshots/step_{N}`` after every validation, to
            pick a training length from the validation curve (then set ``max_steps`` to it).
    """

    def __init__(
        self,
        init_from: str | None = None,
        tokenizer: str | None = None,
        architecture: TinyArchitecture | None = None,
        export_dir: str | None = None,
        export_snapshots: bool = False,
        sampling: Sampling | None = None,
        seed: int = 0,
        task: Task | None = None,
        optimizer: OptimizerCallable = torch.optim.AdamW,
        lr_scheduler: LRSchedulerCallable | None = None,
    ):
        super().__init__()
        self.save_hyperparameters(ignore=["task", "optimizer", "lr_scheduler"])
        self._tokenizer = load_tokenizer(tokenizer) if tokenizer else build_arithmetic_tokenizer()
        arch = architecture or TinyArchitecture()
        if init_from:
            self.model = load_causal_lm(init_from, trainable=True)
        else:
            self.model = build_tiny_causal_lm(
                self._tokenizer,
                hidden_size=arch.hidden_size,
                num_layers=arch.num_layers,
                num_heads=arch.num_heads,
                max_position_embeddings=arch.max_position_embeddings,
                seed=seed,
            )
            self.model.train()
        self.export_dir, self.export_snapshots = export_dir, export_snapshots
        self.sampling = sampling or Sampling(temperature=0.6, top_p=0.95)
        self._task = task
        self.optimizer_factory, self.scheduler_factory = optimizer, lr_scheduler

    # protocol used by the evaluation callbacks (student == teacher == refiner here)
    @property
    def tokenizer(self):
        return self._tokenizer

    @property
    def task(self) -> Task:
        return self._task or self.trainer.datamodule.task

    @property
    def stop_ids(self) -> list[int]:
        return stop_token_ids(self.model, self.tokenizer)

    def teacher_prompt(self, problem) -> str:
        return self.task.student_prompt(problem)

    def sample(self, prompts, *, role="student", sampling=None, num_return_sequences=1):
        ids, mask = encode_prompts(self.tokenizer, prompts, self.device)
        return sample_responses(self.model, self.tokenizer, ids, mask, sampling or self.sampling, num_return_sequences=num_return_sequences)

    def score(self, context: Context, *, role: str) -> torch.Tensor:
        return response_logits(self.model, context)

    def training_step(self, batch, batch_idx):
        logits = self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), batch["labels"][:, 1:].flatten(), ignore_index=-100)
        self.log("train/loss", loss, prog_bar=True, batch_size=batch["input_ids"].shape[0])
        return loss

    def validation_step(self, batch, batch_idx):
        pass  # evaluation is PassAtKEvaluation's job; this hook only has to exist for the val loop

    test_step = validation_step

    def configure_optimizers(self):
        optimizer = self.optimizer_factory(self.model.parameters())
        if self.scheduler_factory is None:
            return optimizer
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": self.scheduler_factory(optimizer), "interval": "step"}}

    def _export(self, path: Path) -> None:
        if self.trainer.is_global_zero:
            path.mkdir(parents=True, exist_ok=True)
            self.model.save_pretrained(path)
            self.tokenizer.save_pretrained(path)

    def on_validation_epoch_end(self) -> None:
        if self.export_dir and self.export_snapshots and not self.trainer.sanity_checking:
            self._export(Path(f"{self.export_dir}_snapshots") / f"step_{self.global_step}")

    def on_fit_end(self) -> None:
        if self.export_dir:
            self._export(Path(self.export_dir))


class _SFTDataset(Dataset):
    """Deterministic virtual stream of examples: item i depends only on ``(seed, i)``."""

    def __init__(self, task, tokenizer, mixture: dict[str, float], size: int, seed: int, error_prob: float):
        self.task, self.tokenizer, self.size, self.seed, self.error_prob = task, tokenizer, size, seed, error_prob
        self.formats, self.weights = list(mixture), list(mixture.values())
        self.problems = task.problems("train")

    def __len__(self):
        return self.size

    def __getitem__(self, i):
        rng = random.Random(f"sft:{self.seed}:{i}")
        fmt = rng.choices(self.formats, self.weights)[0]
        problem = self.problems[rng.randrange(len(self.problems))]
        prompt, response, char_mask = sft_example(self.task, problem, rng, fmt, self.error_prob)
        p_ids = self.tokenizer(prompt, add_special_tokens=False)["input_ids"]
        enc = self.tokenizer(response, add_special_tokens=False, return_offsets_mapping=True)
        r_ids = enc["input_ids"] + [self.tokenizer.eos_token_id]
        # A token is trained on only if every character it covers is (wrong digits are not).
        r_train = [all(char_mask[a:b]) for a, b in enc["offset_mapping"]] + [True]
        labels = [-100] * len(p_ids) + [t if keep else -100 for t, keep in zip(r_ids, r_train)]
        return p_ids + r_ids, labels


class SFTDataModule(LightningDataModule):
    """Supervised mixture of the arithmetic task's formats (see `sft_example`).

    Args:
        mixture: format -> weight, e.g. ``{noisy: 0.5, refine: 0.5}`` for the teacher.
        steps: examples per epoch = ``steps * batch_size`` (use ``trainer.max_steps`` to stop).
        error_prob: chance that a step of ``noisy`` text is wrong.
    """

    def __init__(
        self,
        task: ArithmeticTask | None = None,
        mixture: dict[str, float] | None = None,
        batch_size: int = 64,
        steps: int = 100_000,
        error_prob: float = 0.15,
        seed: int = 0,
        tokenizer: str | None = None,
    ):
        super().__init__()
        self.task = task or ArithmeticTask()
        self.mixture = mixture or {"clean": 1.0}
        self.batch_size, self.steps, self.error_prob, self.seed = batch_size, steps, error_prob, seed
        self.tokenizer = load_tokenizer(tokenizer) if tokenizer else build_arithmetic_tokenizer()

    def _collate(self, items):
        width = max(len(ids) for ids, _ in items)
        pad = self.tokenizer.pad_token_id
        ids = torch.full((len(items), width), pad)
        labels = torch.full((len(items), width), -100)
        mask = torch.zeros((len(items), width), dtype=torch.long)
        for i, (row, lab) in enumerate(items):  # right padding: positions stay 0..len-1
            ids[i, : len(row)], labels[i, : len(row)], mask[i, : len(row)] = torch.tensor(row), torch.tensor(lab), 1
        return {"input_ids": ids, "labels": labels, "attention_mask": mask}

    def train_dataloader(self):
        ds = _SFTDataset(self.task, self.tokenizer, self.mixture, self.steps * self.batch_size, self.seed, self.error_prob)
        return DataLoader(ds, batch_size=self.batch_size, collate_fn=self._collate, shuffle=False)

    def transfer_batch_to_device(self, batch, device, dataloader_idx):
        return move_batch_to_device(batch, device)

    def _eval_loader(self, split):
        return DataLoader(ProblemDataset(self.task.problems(split)), batch_size=64, collate_fn=collate_problems)

    def val_dataloader(self):
        return self._eval_loader("val")

    def test_dataloader(self):
        return self._eval_loader("test")
