"""What an exact resume needs beyond Lightning's defaults: the random streams and the data position.

Lightning checkpoints the weights, the optimizer, the schedulers and the loop counters. It does not
checkpoint the global random state (rollouts are *sampled* from it) nor where the training data
loader was inside its epoch (unless the loader is stateful). A run resumed from a mid-epoch
checkpoint would therefore train on other problems with other samples than the run it replaces.
Three pieces close the gap:

* `rng_states` / `set_rng_states`: torch (CPU and CUDA), Python and NumPy global states, stored in
  the checkpoint by `DistillationModule` and put back right before the first resumed step;
* `EpochShuffleSampler`: the shuffled order is a function of ``(seed, epoch)`` only, so it can be
  recomputed after a restart (a plain `RandomSampler` draws its order from the global RNG);
* `ResumableDataLoader`: Lightning asks it for ``state_dict()`` when checkpointing and hands it back
  with ``load_state_dict()`` on resume (its `_Stateful` protocol); it then skips the batches the
  interrupted run had already trained on.

Every loader also gets its own ``generator``: a torch `DataLoader` otherwise draws one number from
the global RNG each time it is iterated, and a resumed run iterates at other moments than the run
it replaces, which would shift every later rollout.
"""

from __future__ import annotations

import os
import random
from typing import Any

import torch
from torch.utils.data import DataLoader, RandomSampler


def global_seed() -> int:
    """The seed given to ``seed_everything`` (``trd fit --seed_everything``), 0 if none."""
    return int(os.environ.get("PL_GLOBAL_SEED", 0))


def rng_states() -> dict[str, Any]:
    """The global random states, in types that ``torch.load(weights_only=True)`` accepts."""
    states: dict[str, Any] = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["cuda"] = torch.cuda.get_rng_state_all()
    try:
        import numpy as np

        kind, keys, pos, has_gauss, gauss = np.random.get_state()
        states["numpy"] = (kind, torch.from_numpy(keys.astype("int64")), pos, has_gauss, gauss)
    except ImportError:  # numpy is optional
        pass
    return states


def set_rng_states(states: dict[str, Any]) -> None:
    torch.set_rng_state(states["torch"])
    random.setstate(_as_tuple(states["python"]))
    if "cuda" in states and torch.cuda.is_available():
        # A run resumed on fewer devices restores the streams it has; extra ones keep their seed.
        for i, state in enumerate(states["cuda"][: torch.cuda.device_count()]):
            torch.cuda.set_rng_state(state, i)
    if "numpy" in states:
        import numpy as np

        kind, keys, pos, has_gauss, gauss = states["numpy"]
        np.random.set_state((kind, keys.numpy().astype("uint32"), pos, has_gauss, gauss))


def _as_tuple(value):
    # torch.save keeps tuples, but a state that went through JSON/YAML comes back as lists.
    return tuple(_as_tuple(v) for v in value) if isinstance(value, (list, tuple)) else value


class EpochShuffleSampler(RandomSampler):
    """A shuffled order that depends only on ``(seed, epoch)``.

    Lightning calls ``set_epoch`` at the start of every epoch (as for a `DistributedSampler`). It
    subclasses `RandomSampler` so that under DDP Lightning still swaps it for its own
    `DistributedSampler`, which is seeded the same way (``seed + epoch``).

    Args:
        seed: the base seed; ``None`` reads the ``seed_everything`` seed when iterated.
    """

    def __init__(self, data_source, seed: int | None = None):
        super().__init__(data_source)
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        seed = global_seed() if self.seed is None else self.seed
        generator = torch.Generator().manual_seed(seed * 1_000_003 + self.epoch)
        yield from torch.randperm(len(self.data_source), generator=generator).tolist()


class ResumableDataLoader(DataLoader):
    """A `DataLoader` that resumes mid-epoch: its state is ``{"epoch", "batches_consumed"}``.

    Lightning pre-fetches one batch ahead, so the loader cannot count what was *trained on* by
    itself: the data module calls `mark_consumed` when a batch is about to be used (see
    `PromptDataModule.on_after_batch_transfer`). On resume the first iteration re-reads and drops
    that many batches of the same ``(seed, epoch)`` order, then continues; a checkpoint written at
    the end of an epoch resumes at the start of the next one.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.batches_consumed = 0
        self._skip = 0

    def __iter__(self):
        skip, self._skip = self._skip, 0
        self.batches_consumed = skip
        iterator = super().__iter__()
        for _ in range(skip):
            next(iterator)  # trained on before the interruption
        return iterator

    def mark_consumed(self) -> None:
        self.batches_consumed += 1

    def _sampler_epoch(self) -> int:
        return int(getattr(self.sampler, "epoch", 0))

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self._sampler_epoch(), "batches_consumed": self.batches_consumed}

    def load_state_dict(self, state_dict: dict[str, int]) -> None:
        epoch, consumed = int(state_dict["epoch"]), int(state_dict["batches_consumed"])
        if consumed >= len(self):  # written after the epoch's last batch: resume with the next epoch
            epoch, consumed = epoch + 1, 0
        self.set_epoch(epoch)
        self._skip = consumed

    def set_epoch(self, epoch: int) -> None:
        # Lightning sets the epoch only after it has pre-fetched the first batch of a (resumed)
        # run; whoever knows it earlier sets it here.
        set_epoch = getattr(self.sampler, "set_epoch", None)
        if callable(set_epoch):
            set_epoch(epoch)
