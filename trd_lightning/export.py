"""``trd export``: a trained student as a Hugging Face folder that ``from_pretrained`` loads.

``trd export -c CONFIG --ckpt_path CKPT --output_dir DIR`` builds the module from the config (as
``trd test`` does), loads the checkpoint's student weights and writes DIR with the weights
(safetensors), ``config.json``, ``generation_config.json`` and the student's tokenizer files:

* LoRA students are merged into their base weights (``merge_and_unload``) by default, so DIR is a
  plain model; ``--adapter_only true`` writes the peft adapter alone (``adapter_config.json`` +
  ``adapter_model.safetensors``, loaded on top of the student's base path);
* sharded FSDP2 checkpoints (a folder of ``torch.distributed.checkpoint`` shards plus Lightning's
  ``meta.pt``) are consolidated in memory first; ``full`` checkpoints are single files.

Nothing already written is lost: a non-empty DIR is refused unless ``--overwrite true``, and the
folder is written next to DIR under a temporary name and renamed into place only when complete.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from lightning.pytorch.utilities import rank_zero_info

from trd_lightning.lora import is_lora
from trd_lightning.models import resolve_model_path

#: Written next to the weights: where the export came from.
EXPORT_INFO = "trd_export.json"


def check_output_dir(output_dir: str | Path, overwrite: bool) -> Path:
    """Refuse, before any compute, a destination that holds files (unless ``overwrite``)."""
    out = Path(output_dir).expanduser()
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"--output_dir {str(out)!r} is a file; pass a folder path (it is created)")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise FileExistsError(
            f"--output_dir {str(out)!r} is not empty; choose a new folder or pass --overwrite true to replace it"
        )
    return out


def is_sharded_checkpoint(path: Path) -> bool:
    """A Lightning FSDP2/ModelParallel ``sharded`` checkpoint: a folder with ``meta.pt`` and shards."""
    from lightning.fabric.utilities.load import _METADATA_FILENAME

    return path.is_dir() and (path / _METADATA_FILENAME).is_file()


def load_student_weights(module, ckpt_path: str | Path) -> dict:
    """Load a ``trd fit`` checkpoint (file or sharded folder) into ``module``; returns its metadata."""
    path = Path(ckpt_path).expanduser()
    if is_sharded_checkpoint(path):
        # Lightning's own consolidation (what `python -m lightning.fabric.utilities.consolidate_checkpoint`
        # runs): the shards of every rank read into one full state dict, in this single process.
        from lightning.fabric.utilities.load import _load_distributed_checkpoint

        ckpt = _load_distributed_checkpoint(path)
        state = ckpt.get("state_dict")
        if not isinstance(state, dict):
            raise ValueError(f"sharded checkpoint {path} holds no state_dict; is it a checkpoint of `trd fit`?")
        from trd_lightning.audit import load_state_into

        load_state_into(module, state, path)
        return {k: ckpt.get(k) for k in ("epoch", "global_step")}
    if path.is_dir():
        raise FileNotFoundError(
            f"checkpoint {path} is a folder without Lightning's meta.pt, so not a sharded checkpoint; pass the "
            ".ckpt file (or the sharded checkpoint folder) written by `trd fit`"
        )
    from trd_lightning.audit import load_checkpoint  # one loader for .ckpt files (clear mismatch errors)

    load_checkpoint(module, path)
    meta = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    return {k: meta.get(k) for k in ("epoch", "global_step")}


def export_student(
    module,
    ckpt_path: str | Path | None,
    output_dir: str | Path,
    *,
    adapter_only: bool = False,
    overwrite: bool = False,
) -> Path:
    """Write ``module``'s student, with the weights of ``ckpt_path``, as a Hugging Face folder.

    Args:
        module: a `DistillationModule` built from the checkpoint's config.
        ckpt_path: the ``.ckpt`` file or sharded checkpoint folder of ``trd fit``; ``None`` exports
            the student as the config builds it (its initial weights).
        output_dir: the folder to write (created; refused if it holds files, unless ``overwrite``).
        adapter_only: with a LoRA student, write the adapter alone instead of merged weights.
        overwrite: replace a non-empty ``output_dir``.

    Returns:
        The folder written.

    Raises:
        FileExistsError: ``output_dir`` holds files and ``overwrite`` is off (checked first).
        ValueError: ``adapter_only`` for a student without LoRA, or a module without a student.
    """
    out = check_output_dir(output_dir, overwrite)
    student = getattr(module, "student", None)
    if student is None:
        raise ValueError(f"{type(module).__name__} has no `student` to export; trd export works with DistillationModule")
    if adapter_only and not is_lora(student):
        raise ValueError("--adapter_only true needs a LoRA student (model.init_args.student_lora); this student has no adapter")
    meta = load_student_weights(module, ckpt_path) if ckpt_path is not None else {}

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".partial", dir=out.parent))
    try:
        if adapter_only:
            student.save_pretrained(tmp)  # peft: adapter_config.json + adapter_model.safetensors
            model = student.get_base_model()
        else:
            # merge_and_unload folds the adapters into the base weights in place: no second copy
            # of a large student in memory; the module's student is the merged model afterwards.
            model = student.merge_and_unload() if is_lora(student) else student
            model.save_pretrained(tmp)
            if is_lora(student):
                module.student = model
        _save_tokenizer(module, tmp)
        if adapter_only:
            model.generation_config.save_pretrained(tmp)
        info = {
            "ckpt_path": str(ckpt_path) if ckpt_path is not None else None,
            "student": getattr(module, "hparams", {}).get("student"),
            "format": "peft_adapter" if adapter_only else ("merged_lora" if is_lora(student) else "full"),
            **meta,
        }
        (tmp / EXPORT_INFO).write_text(json.dumps(info, indent=2) + "\n")
        _move_into_place(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    rank_zero_info(f"trd export: wrote the student ({info['format']}) to {out}")
    return out


def _save_tokenizer(module, folder: Path) -> None:
    """The student's tokenizer files as the user saved them.

    The module's tokenizer is adjusted for training (left padding, EOS as pad when there is none),
    so the original files are re-read from the student's path instead of saving those changes.
    """
    path = getattr(module, "hparams", {}).get("student")
    if path is not None:
        from transformers import AutoTokenizer

        AutoTokenizer.from_pretrained(resolve_model_path(path)).save_pretrained(folder)
    else:
        module.tokenizer.save_pretrained(folder)


def _move_into_place(tmp: Path, out: Path) -> None:
    """``tmp`` becomes ``out``: a rename, so readers never see a half-written folder; an old
    ``out`` (``overwrite``) is moved aside first and deleted only once the new one is in place."""
    old = None
    if out.exists():
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        out.rename(old)
    try:
        tmp.rename(out)
    except BaseException:
        if old is not None:
            old.rename(out)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
