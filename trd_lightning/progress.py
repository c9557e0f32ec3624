"""The progress bar of ``trd`` runs: Lightning's own bar, with what a distillation run needs on it.

Lightning's bar reads ``Epoch 0/-2`` when a run is bounded by ``max_steps`` (``max_epochs`` is -1
then) and shows the logger's ``v_num``, which says nothing about training. This bar says
``Epoch 0`` in that case and leaves ``v_num`` out; the metrics on it are what the module and the
callbacks log with ``prog_bar=True``: the loss, rollout tokens per second, the revision rate
(TRD) and Pass@k / Avg@n after each validation.
"""

from __future__ import annotations

from lightning.pytorch.callbacks import RichProgressBar, TQDMProgressBar
from lightning.pytorch.utilities.imports import _RICH_AVAILABLE


class _DistillationBar:
    def get_metrics(self, trainer, pl_module):
        items = super().get_metrics(trainer, pl_module)
        items.pop("v_num", None)
        return items


class DistillationRichProgressBar(_DistillationBar, RichProgressBar):
    """`RichProgressBar` without ``v_num`` and without the ``/-2`` of a step-bounded run."""

    def _get_train_description(self, current_epoch: int) -> str:
        description = super()._get_train_description(current_epoch)
        max_epochs = self.trainer.max_epochs
        if max_epochs is not None and max_epochs < 1:  # bounded by max_steps: no epoch total
            description = description.replace(f"/{max_epochs - 1}", "")
        return description


class DistillationTQDMProgressBar(_DistillationBar, TQDMProgressBar):
    """`TQDMProgressBar` without ``v_num`` (used where ``rich`` is not installed)."""


def default_progress_bar():
    """The bar Lightning would pick (rich when installed, else tqdm), in its distillation form."""
    return DistillationRichProgressBar() if _RICH_AVAILABLE else DistillationTQDMProgressBar()
