"""What ``trd`` checks about a run before any model is loaded, and what ``--ckpt_path`` may change.

Resume policy (`check_resume`). Every checkpoint of ``trd`` holds the run's configuration (the
``config.yaml`` text) and a fingerprint of the model weights it started from. A new run with
``--ckpt_path`` is compared with it key by key:

* ``fit`` refuses any change that alters what is trained: the models (unless a path moved and
  the fingerprint shows the same weights), mode, loss and its arguments, sampling, LoRA, dtypes,
  optimizer and scheduler, the revision callback, batch size and the training data, seed,
  gradient accumulation/clipping, precision and devices. A changed batch size is refused because
  the saved data position counts batches: another size would skip other problems.
* ``fit`` honours (and logs) the rest: the budget (``max_steps``, ``max_epochs``, ``max_time``),
  evaluation settings (validation interval and limits, ``eval_batch_size``, val/test sizes and
  files, Pass@k callbacks), logging, progress bars, ``nonfinite``.
* ``test`` / ``validate`` / ``predict`` / ``audit`` load only the student's weights: they refuse a
  student with other weights or another LoRA layout, and honour everything else.

The config given now is always the one that runs (LightningCLI would re-parse the checkpoint's
hyperparameters over it); refused keys are listed with both values.
"""

from __future__ import annotations

import copy
import errno
import fnmatch
import math
import os
import re
import tempfile
from pathlib import Path
from typing import Any

import yaml
from lightning.pytorch.utilities.rank_zero import rank_zero_info

CONFIG_KEY = "trd_config"
FINGERPRINT_KEY = "trd_model_fingerprints"

# fit: keys whose change keeps the run's meaning (fnmatch patterns over dotted keys).
_FIT_SAFE = (
    "trainer.max_steps", "trainer.max_epochs", "trainer.min_steps", "trainer.min_epochs", "trainer.max_time",
    "trainer.val_check_interval", "trainer.check_val_every_n_epoch", "trainer.num_sanity_val_steps",
    "trainer.limit_val_batches", "trainer.limit_test_batches", "trainer.limit_predict_batches",
    "trainer.log_every_n_steps", "trainer.enable_*", "trainer.logger", "trainer.logger.*", "trainer.default_root_dir",
    "trainer.profiler*", "trainer.plugins*", "trainer.callbacks.*", "trainer.accelerator", "trainer.benchmark",
    "data.init_args.eval_batch_size", "data.init_args.num_workers",
    "data.init_args.task.init_args.val_*", "data.init_args.task.init_args.test_*",
    "model.init_args.nonfinite",
    # How sharded weights are gathered for a rollout: the same rollouts either way (tested).
    "trainer.strategy.init_args.rollout_gather",
    "test_after_fit", "ckpt_path", "config", "__path__", "audit.*",
)
# ... except these callbacks, which change the training signal.
_FIT_MEANINGFUL_CALLBACKS = ("trainer.callbacks.*TrajectoryRevision*",)
# test / validate / predict / audit: only what shapes the student's weights matters.
_EVAL_REFUSED = ("model.class_path", "model.init_args.student", "model.init_args.student_lora*")


# --- fingerprints -----------------------------------------------------------------------------
def model_fingerprints(cfg) -> dict[str, str]:
    model = _as_dict(cfg).get("model") or {}
    args = model.get("init_args") or {}
    out = {}
    for role in ("student", "teacher"):
        if isinstance(args.get(role), str):
            fp = _fingerprint_or_none(args[role])
            if fp is not None:
                out[role] = fp
    return out


def _fingerprint_or_none(name: str) -> str | None:
    from trd_lightning.models import weights_fingerprint

    try:
        return weights_fingerprint(name)
    except (OSError, ValueError):
        return None


# --- flattening -------------------------------------------------------------------------------
def _as_dict(cfg) -> dict:
    if cfg is None:
        return {}
    if hasattr(cfg, "as_dict"):
        return cfg.as_dict()
    return dict(cfg)


def _flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(value, dict):
        out = {}
        for k, v in value.items():
            out.update(_flatten(v, f"{prefix}.{k}" if prefix else str(k)))
        return out or {prefix: {}}
    if isinstance(value, list) and prefix.endswith("callbacks"):
        # keyed by class, not position: adding an evaluation callback does not shift the others
        out = {}
        for i, item in enumerate(value):
            name = item.get("class_path", str(i)) if isinstance(item, dict) else str(i)
            out.update(_flatten(item.get("init_args", {}) if isinstance(item, dict) else item, f"{prefix}.{name}"))
            out.setdefault(f"{prefix}.{name}", "present")
        return out
    return {prefix: value}


def _config_of(text: str) -> dict:
    return yaml.safe_load(text) or {}


def _normalise(flat: dict[str, Any]) -> dict[str, Any]:
    # YAML round trips turn tuples into lists
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in flat.items()}


# --- the resume check ------------------------------------------------------------------------
def check_resume(subcommand: str, ckpt: dict, ckpt_path: str, parser, cfg) -> None:
    now = _normalise(_flatten(yaml.safe_load(parser.dump(cfg, skip_none=False)) or {}))
    if CONFIG_KEY in ckpt:
        then = _normalise(_flatten(_config_of(ckpt[CONFIG_KEY])))
    else:  # written before the configuration was saved: compare the model's hyperparameters
        hp = dict(ckpt.get("hyper_parameters") or {})
        hp.pop("_instantiator", None)
        class_path = hp.pop("_class_path", None)
        then = _normalise(_flatten({"model": {"init_args": hp}}))
        if class_path:
            then["model.class_path"] = class_path
        now = {k: v for k, v in now.items() if k in then}
    keys = sorted(set(now) | set(then))
    changed = [k for k in keys if now.get(k, _MISSING) != then.get(k, _MISSING) and not _ignored(k)]
    fingerprints = ckpt.get(FINGERPRINT_KEY) or {}
    refused, honoured = [], []
    for key in changed:
        role = key.rsplit(".", 1)[-1] if key in ("model.init_args.student", "model.init_args.teacher") else None
        if role is not None and _same_weights(role, then.get(key), now.get(key), fingerprints):
            honoured.append(f"{key}: {then.get(key)!r} -> {now.get(key)!r} (same weights)")
            continue
        if _refused(subcommand, key):
            refused.append(f"{key}: {_show(then.get(key, _MISSING))} in the checkpoint, {_show(now.get(key, _MISSING))} now")
        else:
            honoured.append(f"{key}: {_show(then.get(key, _MISSING))} -> {_show(now.get(key, _MISSING))}")
    if refused:
        what = "resumed run would train something else" if subcommand == "fit" else "student weights would not fit the model"
        raise ValueError(
            f"--ckpt_path {ckpt_path!r} was written with another configuration, and the {what}; "
            f"differing keys: {'; '.join(refused)}. Use the checkpoint's values (its config.yaml is in the run "
            "folder) or start a new run without --ckpt_path"
        )
    if honoured:
        rank_zero_info(f"--ckpt_path {ckpt_path}: using the new values of {'; '.join(honoured)}")


class _Missing:
    def __repr__(self):
        return "(unset)"


_MISSING = _Missing()


def _show(value) -> str:
    return repr(value)


def _ignored(key: str) -> bool:
    return any(fnmatch.fnmatchcase(key, p) for p in ("ckpt_path", "config", "__path__", "*.__path__", "print_config"))


def _refused(subcommand: str, key: str) -> bool:
    if subcommand == "fit":
        if any(fnmatch.fnmatchcase(key, p) for p in _FIT_MEANINGFUL_CALLBACKS):
            return True
        return not any(fnmatch.fnmatchcase(key, p) for p in _FIT_SAFE)
    return any(fnmatch.fnmatchcase(key, p) for p in _EVAL_REFUSED)


def _same_weights(role: str, old, new, fingerprints: dict) -> bool:
    if not isinstance(new, str):
        return False
    new_fp = _fingerprint_or_none(new)
    old_fp = fingerprints.get(role) or (_fingerprint_or_none(old) if isinstance(old, str) else None)
    return new_fp is not None and new_fp == old_fp


_LAST = re.compile(r"^last(-\d+)?\.ckpt$")  # Lightning's ModelCheckpoint._find_last_checkpoints pattern


def resolve_named_checkpoint(subcommand: str, name: str, cfg) -> str | None:
    """The file that ``--ckpt_path last`` / ``best`` means for this config, or ``None`` for names
    Lightning resolves itself (``hpc``, ``registry``).

    Lightning looks for ``last`` only in the *current* run's folder, and every run gets a new
    ``version_N`` folder, so it never finds one and silently trains or tests the initial weights.
    So ``last`` is the newest ``last*.ckpt`` (by modification time, Lightning's own tie-break) in a
    fixed ``ModelCheckpoint.dirpath`` or in any ``<save_dir>/<name>/version_*/checkpoints/``; ``best``
    is the ``best_model_path`` that the run's ModelCheckpoint recorded in that newest last checkpoint
    (Lightning's ``best`` exists only in the process that ran ``fit``). None found: refused."""
    if name in ("hpc", "registry"):
        return None
    d = _as_dict(cfg)
    found = sorted(
        (p for folder in _checkpoint_folders(d) if folder.is_dir() for p in folder.iterdir() if _LAST.match(p.name)),
        key=lambda p: p.stat().st_mtime,
    )
    if found and name == "last":
        chosen = str(found[-1])
    elif found and name == "best":
        chosen = _best_recorded_in(found[-1])
    else:
        chosen = None
    if chosen is None:
        root = _checkpoint_folders(d)[-1] if _checkpoint_folders(d) else Path("<run folder>/checkpoints")
        raise FileNotFoundError(
            f"--ckpt_path {name}: no {name} checkpoint under {root} (nothing to {subcommand}: Lightning would "
            f"use the initial weights); run `trd fit` with this config first (its ModelCheckpoint needs "
            f"save_last: true), or pass the file, e.g. --ckpt_path {_latest_checkpoint_example(d)}"
        )
    rank_zero_info(f"--ckpt_path {name}: using {chosen} (the newest run's {name} checkpoint)")
    return chosen


def _checkpoint_folders(d: dict) -> list[Path]:
    """Where this config's runs write checkpoints: fixed ``dirpath``s, else the logger's version folders."""
    trainer = d.get("trainer") or {}
    callbacks = trainer.get("callbacks") or []
    fixed = [
        Path(str(cb["init_args"]["dirpath"]))
        for cb in (callbacks if isinstance(callbacks, list) else [callbacks])
        if isinstance(cb, dict) and str(cb.get("class_path", "")).endswith("ModelCheckpoint")
        and (cb.get("init_args") or {}).get("dirpath")
    ]
    root = _logger_root(d)
    versions = sorted(root.glob("version_*/checkpoints")) if root is not None else []
    return fixed + versions


def _logger_root(d: dict) -> Path | None:
    trainer = d.get("trainer") or {}
    logger = trainer.get("logger")
    if isinstance(logger, list):
        logger = logger[0] if logger else None
    if isinstance(logger, dict):
        args = logger.get("init_args") or {}
        return Path(str(args.get("save_dir") or trainer.get("default_root_dir") or ".")) / str(args.get("name", "lightning_logs"))
    if logger is False:
        return None
    return Path(str(trainer.get("default_root_dir") or ".")) / "lightning_logs"  # Lightning's default logger


def _best_recorded_in(last: Path) -> str | None:
    from trd_lightning.checkpoint_io import load_checkpoint_file

    states = (load_checkpoint_file(str(last)).get("callbacks") or {}).items()
    best = [s.get("best_model_path") for k, s in states if k.startswith("ModelCheckpoint") and isinstance(s, dict)]
    best = [b for b in best if b and Path(b).exists()]
    return best[0] if best else None


def _latest_checkpoint_example(d: dict) -> str:
    root = _logger_root(d)
    if root is not None:
        return str(root / "version_<N>" / "checkpoints" / "last.ckpt")
    return "<run folder>/checkpoints/last.ckpt"


# --- cheap checks on the parsed configuration -----------------------------------------------
_DTYPES = ("float32", "float16", "bfloat16", "float64", "auto")


def _fail(key: str, problem: str, fix: str):
    raise ValueError(f"{key}: {problem}; {fix}")


def check_before_models(cfg, subcommand: str | None) -> None:
    """Everything that can be checked from the config alone, in milliseconds."""
    from trd_lightning.models import check_tokenizer_files, resolve_model_path

    d = _as_dict(cfg)
    model = d.get("model") or {}
    args = model.get("init_args") or {}
    trainer = d.get("trainer") or {}
    for role in ("student", "teacher"):
        path = args.get(role)
        if not isinstance(path, str) or (role == "teacher" and args.get("mode", "opd") != "opd"):
            continue
        resolve_model_path(path)
        check_tokenizer_files(path, role)
        dtype = args.get(f"{role}_dtype")
        if dtype is not None and dtype not in _DTYPES:
            import difflib

            close = difflib.get_close_matches(str(dtype), _DTYPES, n=1)
            _fail(f"model.init_args.{role}_dtype", f"unknown dtype {dtype!r}",
                  f"use one of {', '.join(_DTYPES[:-1])}" + (f" (did you mean {close[0]!r}?)" if close else ""))
    if args.get("mode", "opd") == "opd" and isinstance(args.get("student"), str) and isinstance(args.get("teacher"), str):
        if resolve_model_path(args["student"]).resolve() == resolve_model_path(args["teacher"]).resolve():
            _fail("model.init_args.teacher", f"is the student itself ({args['teacher']!r}): the loss would be 0 at every step",
                  "use a stronger teacher, or mode: opsd for self-distillation")
    optimizer = args.get("optimizer")
    if isinstance(optimizer, dict):
        lr = (optimizer.get("init_args") or {}).get("lr")
        if isinstance(lr, (int, float)) and not (math.isfinite(lr) and lr > 0):
            _fail("model.init_args.optimizer.init_args.lr", f"must be a finite number > 0, got {lr}",
                  "an lr of 0 trains nothing (use trd test to evaluate without training)")
    scheduler = args.get("lr_scheduler")
    if isinstance(scheduler, dict):
        for key, value in (scheduler.get("init_args") or {}).items():
            if key in ("T_max", "total_iters", "step_size", "T_0", "total_steps") and isinstance(value, (int, float)) and value <= 0:
                _fail(f"model.init_args.lr_scheduler.init_args.{key}", f"must be > 0, got {value}",
                      "set it to the number of scheduler steps (e.g. trainer.max_steps)")
    vci = trainer.get("val_check_interval")
    if isinstance(vci, (int, float)) and not isinstance(vci, bool) and vci <= 0:
        _fail("trainer.val_check_interval", f"must be > 0, got {vci}",
              "give a number of training steps (int) or a fraction of an epoch in (0, 1]; to skip validation set trainer.limit_val_batches: 0")
    if subcommand in (None, "fit"):
        for what, folder in _configured_folders(trainer):
            _check_writable(what, folder)
    data_args = (d.get("data") or {}).get("init_args") or {}
    ebs = data_args.get("eval_batch_size")
    if isinstance(ebs, int) and ebs < 1:
        _fail("data.init_args.eval_batch_size", f"must be >= 1, got {ebs}", "or null to use batch_size")


def _configured_folders(trainer: dict) -> list[tuple[str, Path]]:
    """The folders a fit writes to, read from the config (before any object exists)."""
    folders = []
    loggers = trainer.get("logger")
    for logger in loggers if isinstance(loggers, list) else [loggers]:
        if isinstance(logger, dict):
            args = logger.get("init_args") or {}
            if args.get("save_dir"):
                folders.append(("the logger's save_dir", Path(str(args["save_dir"]))))
    for cb in trainer.get("callbacks") or []:
        if isinstance(cb, dict) and (cb.get("init_args") or {}).get("dirpath"):
            folders.append((f"{str(cb.get('class_path')).rsplit('.', 1)[-1]} dirpath", Path(str(cb["init_args"]["dirpath"]))))
    if trainer.get("default_root_dir"):
        folders.append(("trainer.default_root_dir", Path(str(trainer["default_root_dir"]))))
    return folders


def check_data(cfg, subcommand: str | None) -> None:
    """Build a throw-away copy of the data module and read the splits this subcommand uses: bad
    files, empty splits and bad task settings then fail before the models load."""
    from jsonargparse import ArgumentParser
    from lightning.pytorch import LightningDataModule

    from trd_lightning.cli_errors import unwrap_union_error

    d = _as_dict(cfg)
    data_cfg = d.get("data")
    if not isinstance(data_cfg, dict) or "class_path" not in data_cfg:
        return
    parser = ArgumentParser(exit_on_error=False)
    parser.add_subclass_arguments(LightningDataModule, "data", fail_untyped=False)
    try:
        datamodule = parser.instantiate(parser.parse_object({"data": data_cfg})).data
    except Exception as e:  # noqa: BLE001 - the constructor's own message, unwrapped
        raise unwrap_union_error(e) from None
    problems = getattr(datamodule, "_problems", None)
    if not callable(problems):
        return
    trainer = d.get("trainer") or {}
    splits = {"fit": ("train", "val"), "validate": ("val",), "test": ("test",), "predict": ("test",), "audit": ("test",)}
    wanted = list(splits.get(subcommand or "fit", ()))
    if subcommand == "fit" and trainer.get("limit_val_batches") == 0:
        wanted.remove("val")
    if subcommand == "fit" and d.get("test_after_fit"):
        wanted.append("test")
    for split in wanted:
        problems(split)
    _check_tokenizers_read_the_task(d, getattr(datamodule, "task", None), wanted)


def _check_tokenizers_read_the_task(d: dict, task, splits: list[str]) -> None:
    """A task that can tell (``check_tokenizer_reads``: the math task) refuses a student or teacher
    whose tokenizer cannot read its prompts, e.g. the arithmetic one; only tokenizers load here."""
    check = getattr(task, "check_tokenizer_reads", None)
    args = ((d.get("model") or {}).get("init_args")) or {}
    if check is None or not splits:
        return
    from trd_lightning.models import load_tokenizer

    for role in ("student", "teacher"):
        if isinstance(args.get(role), str) and (role == "student" or args.get("mode", "opd") == "opd"):
            check(load_tokenizer(args[role], role), splits[0], role)


# --- run folders -------------------------------------------------------------------------------
def _is_rank_zero() -> bool:
    return all(int(os.environ.get(v, 0)) == 0 for v in ("LOCAL_RANK", "NODE_RANK", "RANK"))


def reserve_logger_versions(loggers) -> None:
    """Lightning picks ``version_<N+1>`` by listing the folder, so two runs started together take
    the same one; an exclusive ``mkdir`` makes the choice atomic. Only the launching process
    reserves: Lightning broadcasts rank 0's folder to the other ranks."""
    if loggers is None or loggers is False or not _is_rank_zero():
        return
    for logger in loggers if isinstance(loggers, (list, tuple)) else [loggers]:
        if getattr(logger, "_version", 0) is not None or not hasattr(logger, "_get_next_version"):
            continue
        root = Path(logger.root_dir)
        _check_writable("the logger's folder", root)
        for _ in range(1000):
            version = logger._get_next_version()
            try:
                (root / f"version_{version}").mkdir()
            except FileExistsError:
                continue
            logger._version = version
            break


def check_writable_folders(trainer, subcommand: str | None) -> None:
    """A read-only checkpoint or run folder is found here, not at the first save after training."""
    if subcommand not in (None, "fit"):
        return
    from lightning.pytorch.callbacks import ModelCheckpoint

    from trd_lightning.callbacks.preemption import PreemptionCheckpoint

    folders: list[tuple[str, Path]] = []
    for cb in trainer.callbacks:
        if isinstance(cb, ModelCheckpoint) and cb.dirpath is not None:
            folders.append(("ModelCheckpoint dirpath", Path(cb.dirpath)))
        if isinstance(cb, PreemptionCheckpoint) and cb.dirpath is not None:
            folders.append(("PreemptionCheckpoint dirpath", Path(cb.dirpath)))
    for logger in trainer.loggers:
        log_dir = getattr(logger, "log_dir", None)
        if log_dir:
            folders.append(("the logger's run folder", Path(log_dir)))
    if not trainer.loggers:
        folders.append(("trainer.default_root_dir", Path(trainer.default_root_dir)))
    for what, folder in folders:
        _check_writable(what, folder)


def _check_writable(what: str, folder: Path) -> None:
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".trd-write-check-"):
            pass
    except OSError as e:
        reason = "it is read-only" if e.errno in (errno.EROFS, errno.EACCES, errno.EPERM) else (e.strerror or str(e))
        raise PermissionError(
            f"{what} {str(folder)!r} cannot be written ({reason}); checkpoints would be lost at the first save: "
            "point it (or trainer.default_root_dir / the logger's save_dir) to a writable folder"
        ) from e
