"""`AtomicCheckpointIO`: every checkpoint is whole or absent, and a bad one is named in one line.

Lightning's `TorchCheckpointIO` serialises into memory and lets fsspec write the file through a
transaction whose temporary file lives in the system's temporary folder; committing it moves the
file across filesystems, which is a copy: a disk that fills during that copy leaves a truncated
``epoch=...ckpt`` under its final name (and leaks the temporary file). This plugin writes a
temporary file *in the destination folder*, fsyncs it, renames it over the final name (atomic on
one filesystem) and fsyncs the folder. On any failure the temporary file is removed and the error
says where the newest checkpoint that still loads is. Being a `CheckpointIO` plugin it serves every
writer that goes through ``trainer.save_checkpoint``: `ModelCheckpoint`, `PreemptionCheckpoint`
and a user's own call.

Loading goes through `load_checkpoint_file`, which turns torch's pickling errors (``EOFError``,
``UnpicklingError`` suggesting ``weights_only=False``, a missing ``pytorch-lightning_version``)
into one line naming the file, the problem and the fix.
"""

from __future__ import annotations

import errno
import os
import pickle
import zipfile
from pathlib import Path
from typing import Any, Callable

import torch
from lightning.fabric.utilities.cloud_io import get_filesystem
from lightning.pytorch.plugins.io import TorchCheckpointIO
from typing_extensions import override

_TMP_SUFFIX = ".tmp"


class CheckpointError(ValueError):
    """A checkpoint that cannot be read (missing, truncated, not a Lightning checkpoint)."""


def _is_local(path) -> bool:
    from fsspec.implementations.local import LocalFileSystem

    return isinstance(get_filesystem(path), LocalFileSystem)


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # not every platform can open a directory
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _is_temporary(path: Path) -> bool:
    return path.name.startswith(".") and path.name.endswith(_TMP_SUFFIX)


def newest_loadable_checkpoint(folder: str | Path, exclude: str | Path | None = None) -> Path | None:
    """The most recently written ``*.ckpt`` in ``folder`` that loads, or None."""
    folder = Path(folder)
    if not folder.is_dir():
        return None
    candidates = [p for p in folder.glob("*.ckpt") if p.is_file() and not _is_temporary(p) and p != exclude]
    for path in sorted(candidates, key=lambda p: p.stat().st_mtime, reverse=True):
        try:
            load_checkpoint_file(path)
        except CheckpointError:
            continue
        return path
    return None


def load_checkpoint_file(path: str | Path, map_location: Any = "cpu", weights_only: bool | None = True) -> dict:
    """``torch.load`` of a Lightning checkpoint, with one readable line for each way it can be bad."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint {str(path)!r} does not exist; pass the path of a .ckpt written by trd fit")
    if path.is_dir():
        if (path / "meta.pt").is_file():
            # A sharded FSDP2 checkpoint: tensor shards (torch.distributed.checkpoint) plus Lightning's
            # meta.pt with everything else (config, loops, callbacks); what a pre-check reads is there.
            ckpt = load_checkpoint_file(path / "meta.pt", map_location, weights_only)
            return {"state_dict": {}, **ckpt}
        raise CheckpointError(f"checkpoint {str(path)!r} is a folder; pass the path of a .ckpt file inside it")
    if path.stat().st_size == 0:
        raise CheckpointError(f"checkpoint {str(path)!r} is empty (0 bytes; an interrupted copy?); use another checkpoint")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=weights_only)
    except (EOFError, RuntimeError, zipfile.BadZipFile, pickle.UnpicklingError, ValueError, OSError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        if "Weights only load failed" in str(e) or isinstance(e, pickle.UnpicklingError):
            problem = "holds objects that a safe load refuses (not a checkpoint written by trd fit?)"
        else:
            problem = f"is truncated or corrupt ({type(e).__name__}: {first[:160]})"
        raise CheckpointError(
            f"checkpoint {str(path)!r} {problem}; use another checkpoint"
            + _others_hint(path)
        ) from e
    if not isinstance(ckpt, dict) or "pytorch-lightning_version" not in ckpt or ("state_dict" not in ckpt and path.name != "meta.pt"):
        raise CheckpointError(
            f"checkpoint {str(path)!r} is not a Lightning checkpoint (no 'pytorch-lightning_version' / 'state_dict'; "
            "a Hugging Face or plain torch.save file?); pass a .ckpt written by trd fit" + _others_hint(path)
        )
    return ckpt


def _others_hint(path: Path) -> str:
    others = sorted(p.name for p in path.parent.glob("*.ckpt") if p != path and not _is_temporary(p))
    return f" (others in {str(path.parent)!r}: {', '.join(others)})" if others else ""


def _os_error_in(error: BaseException) -> OSError | None:
    seen = 0
    while error is not None and seen < 10:
        if isinstance(error, OSError):
            return error
        error, seen = error.__cause__ or error.__context__, seen + 1
    return None


class AtomicCheckpointIO(TorchCheckpointIO):
    """`TorchCheckpointIO` with a same-folder temporary file, fsync and rename (see the module doc)."""

    @override
    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        if storage_options is not None or not _is_local(path):
            return super().save_checkpoint(checkpoint, path, storage_options)  # remote stores: Lightning's path
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.parent / f".{path.name}.{os.getpid()}{_TMP_SUFFIX}"
        try:
            with open(tmp, "wb") as f:
                torch.save(checkpoint, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
            _fsync_dir(path.parent)
        except BaseException as error:
            tmp.unlink(missing_ok=True)
            e = _os_error_in(error)  # torch's zip writer re-raises ENOSPC as a RuntimeError
            if e is None:
                raise
            good = newest_loadable_checkpoint(path.parent, exclude=path)
            where = (
                f"the newest checkpoint that loads is {str(good)!r}"
                if good is not None
                else f"no loadable checkpoint is in {str(path.parent)!r}"
            )
            reason = "the disk is full" if e.errno == errno.ENOSPC else (e.strerror or str(e))
            raise OSError(
                e.errno,
                f"could not write checkpoint {str(path)!r}: {reason}; nothing was left under that name and {where}; "
                "free space (or point the checkpoint folder elsewhere) and resume with --ckpt_path",
            ) from error

    @override
    def load_checkpoint(self, path, map_location: Callable | None = lambda storage, loc: storage, weights_only: bool | None = None) -> dict:
        if not _is_local(path):
            return super().load_checkpoint(path, map_location, weights_only)
        return load_checkpoint_file(path, map_location=map_location, weights_only=weights_only)
