"""`LearningCurve`: Avg@n and Pass@k on held-out problems every N training steps."""

from __future__ import annotations

from collections.abc import Sequence

from lightning.pytorch import Callback

from trd_lightning.callbacks.pass_at_k import PassAtKEvaluation
from trd_lightning.rollout import Sampling


class LearningCurve(Callback):
    """Evaluates the student every ``every_n_steps`` optimizer steps (and before the first) with a
    `PassAtKEvaluation` on the first ``num_problems`` problems of ``split``, inside training.

    Lightning's validation loop with `PassAtKEvaluation` and ``val_check_interval`` does the same
    for the whole validation set (and also runs the module's validation step); this callback
    evaluates a subset, at step 0 too, and keeps the curve in ``history``. It samples in a forked
    RNG (seeded per batch), so a run with the curve trains exactly as a run without it. Logs ``curve/avg@{n}``, ``curve/pass@{k}`` and, for a task that
    knows its derivations, ``curve/derivations``; ``history`` keeps ``{"step": ..., **values}``
    and ``last`` the latest values (read by `CollapseGuard`'s ``gap_metrics``, e.g.
    ``["curve/pass@16", "curve/pass@1"]``).

    Args:
        every_n_steps: evaluate when ``global_step % every_n_steps == 0``.
        n / ks / sampling / all_k / seed: as `PassAtKEvaluation` (paper: 16, temperature 0.6, top-p 0.95).
        split / num_problems: which problems (``None``: the whole split).
        batch_size: problems per sampling call.
    """

    def __init__(
        self,
        every_n_steps: int = 10,
        n: int = 16,
        ks: Sequence[int] = (1, 16),
        sampling: Sampling | None = None,
        all_k: bool = False,
        split: str = "val",
        num_problems: int | None = None,
        batch_size: int = 64,
        seed: int = 1234,
    ):
        if every_n_steps < 1:
            raise ValueError(f"every_n_steps must be >= 1, got {every_n_steps}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.every_n_steps, self.split, self.num_problems, self.batch_size = every_n_steps, split, num_problems, batch_size
        self.evaluation = PassAtKEvaluation(n=n, ks=ks, sampling=sampling, all_k=all_k, seed=seed, skip_sanity_check=False)
        self.history: list[dict] = []
        self.last: dict[str, float] = {}
        self._done_step = -1

    def evaluate(self, trainer, module) -> dict[str, float]:
        problems = list(module.task.problems(self.split))
        problems = problems[: self.num_problems] if self.num_problems is not None else problems
        was_training = module.training
        module.eval()  # as Lightning's validation loop would
        try:
            for idx in range(0, len(problems), self.batch_size):
                self.evaluation._on_batch_end(trainer, module, {"problems": problems[idx : idx + self.batch_size]}, idx // self.batch_size)
            values = self.evaluation.metric.compute()
            self.evaluation.metric.reset()
            if self.evaluation.coverage_metric.update_count:
                values.update(self.evaluation.coverage_metric.compute())
                self.evaluation.coverage_metric.reset()
        finally:
            module.train(was_training)
        self.last = {f"curve/{k}": float(v) for k, v in values.items()}
        self.history.append({"step": trainer.global_step, **self.last})
        self._done_step = trainer.global_step
        return self.last

    def _due(self, trainer) -> bool:
        return trainer.global_step % self.every_n_steps == 0 and trainer.global_step != self._done_step

    def on_train_start(self, trainer, pl_module) -> None:
        if self._due(trainer):
            self.evaluate(trainer, pl_module)  # the starting point of the curve (not logged: no step yet)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self._due(trainer):
            for name, value in self.evaluate(trainer, pl_module).items():
                pl_module.log(name, value, batch_size=1)
