"""`PassAtKEvaluation`: n samples per validation/test problem -> avg@n and unbiased pass@k."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from lightning.pytorch import Callback, LightningModule, Trainer

from trd_lightning.metrics import DerivationCoverage, PassAtK, distinct_derivations
from trd_lightning.rollout import Sampling, decode_and_verify


class PassAtKEvaluation(Callback):
    """Samples ``n`` completions per problem of each val/test batch, verifies them with the task
    and logs ``{stage}/avg@{n}`` and ``{stage}/pass@{k}``.

    Works with any LightningModule that implements `trd_lightning.protocol.RolloutModel`
    (``task``, ``tokenizer``, ``sample``). Sampling is seeded per batch inside a forked RNG, so the
    numbers are reproducible (``trd test --ckpt_path`` repeats what fit logged) and the training RNG
    stream is left untouched. Samples go through ``module.sample``, so they come from the module's
    rollout engine (``rollout_engine: vllm`` evaluates with vLLM; its request seeds are drawn from
    the same seeded generator).

    Args:
        n: samples per problem (paper: 16).
        ks: the k of each pass@k; every k must be <= n.
        sampling: paper: temperature 0.6, top-p 0.95.
        context: ``student`` (the problem alone) or ``privileged`` (with the reference solution:
            evaluates an OPSD teacher role).
        role: which model samples (``student`` or ``teacher``).
        seed: base seed of the evaluation samples.
        prefix: put before the metric names (``val/{prefix}avg@16``), to run several evaluations.
        all_k: log pass@k for every k = 1..n (the Pass@k curve), not only ``ks``.
        coverage: with a task that knows its valid derivations (``ArithmeticTask``), also log
            ``{stage}/derivations``: per problem, the distinct valid derivations among its correct
            samples, averaged over problems (and ``derivation_coverage``: that count over the
            derivations the problem has). Other tasks log nothing extra.
    """

    def __init__(
        self,
        n: int = 16,
        ks: Sequence[int] = (1, 8),
        sampling: Sampling | None = None,
        context: str = "student",
        role: str = "student",
        seed: int = 1234,
        skip_sanity_check: bool = True,
        prefix: str = "",
        all_k: bool = False,
        coverage: bool = True,
    ):
        if n < 1:
            raise ValueError(f"n must be >= 1, got {n}")
        ks = range(1, n + 1) if all_k else ks
        bad = [k for k in ks if k > n]
        if bad:
            raise ValueError(f"pass@k needs k <= n: got k={bad} with n={n} samples; raise n or drop those k")
        if role not in ("student", "teacher", "refiner"):
            raise ValueError(f"role must be 'student', 'teacher' or 'refiner', got {role!r}")
        if context not in ("student", "privileged"):
            raise ValueError(f"context must be 'student' or 'privileged', got {context!r}")
        self.n, self.ks, self.context, self.role, self.seed = n, tuple(ks), context, role, seed
        self.sampling = sampling or Sampling(temperature=0.6, top_p=0.95)
        self.skip_sanity_check = skip_sanity_check
        self.prefix = prefix
        self.coverage = coverage
        self.metric = PassAtK(ks=self.ks, num_samples=n)
        self.coverage_metric = DerivationCoverage()
        self._coverage_rows: list[tuple[int, int]] = []
        self.last: dict[str, float] = {}

    @property
    def state_key(self) -> str:
        # Several instances (student and privileged context, say) may sit in one Trainer.
        return self._generate_state_key(prefix=self.prefix, context=self.context, role=self.role, n=self.n)

    def _prompt(self, module, problem) -> str:
        task = module.task
        return task.privileged_prompt(problem) if self.context == "privileged" else task.student_prompt(problem)

    @torch.no_grad()
    def evaluate_batch(self, module: LightningModule, problems: list, batch_idx: int) -> torch.Tensor:
        """Correct-sample counts ``[B]`` for one batch of problems."""
        prompts = [self._prompt(module, p) for p in problems]
        rank = module.global_rank  # LightningModule's: 0 without a trainer
        devices = [module.device] if module.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(self.seed + 100_003 * batch_idx + 7919 * rank)
            ids, mask = module.sample(prompts, role=self.role, sampling=self.sampling, num_return_sequences=self.n)
        repeated = [problems[i // self.n] for i in range(len(ids))]
        texts, verdicts = decode_and_verify(module.task, module.tokenizer, repeated, (ids, mask))
        correct = torch.tensor(verdicts)
        self._record_coverage(module.task, problems, texts)
        return correct.view(len(problems), self.n).sum(-1)

    def _record_coverage(self, task, problems: list, texts: list[str]) -> None:
        """Distinct valid derivations per problem among its samples (picked up by `_on_batch_end`)."""
        self._coverage_rows = []
        if self.coverage:
            counts = [distinct_derivations(task, p, texts[i * self.n : (i + 1) * self.n]) for i, p in enumerate(problems)]
            self._coverage_rows = [] if None in counts else counts

    def _skip(self, trainer: Trainer) -> bool:
        return self.skip_sanity_check and trainer.sanity_checking

    def _on_batch_end(self, trainer, module, batch, batch_idx):
        if self._skip(trainer):
            return
        problems = batch["problems"]
        correct = self.evaluate_batch(module, problems, batch_idx)
        ids = torch.tensor([module.task.problem_id(p) for p in problems], dtype=torch.long)
        self.metric.to(module.device)
        self.metric.update(correct.to(module.device), self.n, ids.to(module.device))
        if self._coverage_rows:
            distinct, available = torch.tensor(self._coverage_rows).T
            self.coverage_metric.to(module.device)
            self.coverage_metric.update(distinct.to(module.device), available.to(module.device), ids.to(module.device))

    def _on_epoch_end(self, trainer, module, stage):
        if self._skip(trainer):
            return
        values = self.metric.compute()
        self.metric.reset()
        if self.coverage_metric.update_count:
            values.update(self.coverage_metric.compute())
            self.coverage_metric.reset()
        self.last = {f"{stage}/{self.prefix}{k}": float(v) for k, v in values.items()}
        for name, value in self.last.items():
            # Already synchronised across ranks by the metric: log the same value everywhere.
            module.log(name, value, prog_bar=name.endswith(f"avg@{self.n}"))

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
        self._on_batch_end(trainer, pl_module, batch, batch_idx)

    def on_validation_epoch_end(self, trainer, pl_module):
        self._on_epoch_end(trainer, pl_module, "val")

    def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
        self._on_batch_end(trainer, pl_module, batch, batch_idx)

    def on_test_epoch_end(self, trainer, pl_module):
        self._on_epoch_end(trainer, pl_module, "test")
