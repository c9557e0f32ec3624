"""``_base_:`` in a config file: the files it is written on top of (configs as deltas).

``configs/arith/trd_splice.yaml`` starts with ``_base_: [base.yaml, ../../callbacks/trd_splice.yaml]``
and then states only what differs from the shared budget (its loss, its logger name), so
``trd fit -c configs/arith/trd_splice.yaml`` reads exactly as
``trd fit -c configs/arith/base.yaml -c callbacks/trd_splice.yaml -c configs/arith/trd_splice.yaml``:
`expand_bases` rewrites the argument list into LightningCLI's own multiple ``-c`` (each later file
merges into the earlier ones; ``trainer.callbacks+:`` appends to the list), before jsonargparse
parses anything. The resolved config (``--print_config``, the run folder's ``config.yaml``) is the
full, composed one.

Rules: ``_base_`` is a path or a list of paths, relative to the file that names them, read in
order before the file itself (recursively: a base may name its own bases). A file is read once
per command: one already read (given with ``-c`` or named as a base) is not read again, which is
logged, so a fragment's ``callbacks+:`` never appends twice. A missing base, a cycle, or a delta file
given without any base is refused before compute, naming the file and the fix.

Why hand-written: jsonargparse 4.53 does apply a ``config: base.yaml`` key inside a config file,
but the keys after it replace the base's instead of merging into them (measured: ``model:
{init_args: {loss: forward_kl}}`` loses the base's ``class_path``, and ``trainer.callbacks+:``
replaces the base's list instead of appending). Multiple ``-c`` merges and appends correctly, so
this only turns one file into that list (like detectron2's ``_BASE_`` / mmengine's ``_base_``).
"""

from __future__ import annotations

import json
from pathlib import Path

import yaml
from lightning.pytorch.utilities import rank_zero_info

BASE_KEY = "_base_"
_CONFIG_FLAGS = ("-c", "--config")


def expand_bases(args: list) -> list:
    """``args`` with every ``-c FILE`` whose FILE names ``_base_`` replaced by ``-c BASE ... -c FILE'``
    (FILE' the file's keys without ``_base_``, passed as a JSON string). Other arguments pass as given."""
    from trd_lightning.cli_errors import check_config_files

    out: list = []
    seen: set[Path] = set()
    classes: set[str] = set()  # top-level keys (model, data) a file read so far gave a class_path for
    i = 0
    while i < len(args):
        arg = args[i]
        if isinstance(arg, str) and arg in _CONFIG_FLAGS and i + 1 < len(args) and isinstance(args[i + 1], str):
            out += _expand(args[i + 1], None, seen, classes, (), check_config_files)
            i += 2
            continue
        if isinstance(arg, str) and arg.startswith(tuple(f"{f}=" for f in _CONFIG_FLAGS)):
            out += _expand(arg.split("=", 1)[1], None, seen, classes, (), check_config_files)
        else:
            out.append(arg)
        i += 1
    return out


def _read(path: Path):
    try:
        return yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return None  # not a readable YAML file: jsonargparse (or check_config_files) names the problem


def _is_file(path: Path) -> bool:
    try:
        return path.is_file()
    except (OSError, ValueError):  # e.g. a config given inline as a string: too long a "file name"
        return False


def _expand(name: str, named_by: Path | None, seen: set[Path], classes: set[str], chain: tuple[Path, ...], check) -> list:
    path = Path(name) if named_by is None else named_by.parent / name
    if named_by is None and not _is_file(path):
        # Not a file: a config given inline (LightningCLI accepts a YAML/JSON string after -c; a
        # DDP child process is re-launched with the already expanded arguments, which hold such
        # strings) or a missing file, which check_config_files / jsonargparse name.
        return ["-c", name]
    resolved = path.resolve()
    if named_by is not None:
        if resolved in chain:
            loop = " -> ".join(str(p) for p in (*chain, resolved))
            raise ValueError(f"config file {str(named_by)!r}: `{BASE_KEY}:` makes a cycle ({loop}); remove one of these bases")
        if not resolved.is_file():
            raise ValueError(
                f"config file {str(named_by)!r} names {name!r} under `{BASE_KEY}:`, but {str(path)!r} is not a file; "
                f"fix the path (it is relative to {str(named_by.parent)!r})"
            )
        check(["-c", str(path)])  # the strict YAML checks the user's own -c files get
    if resolved in seen:
        # Read already (a diamond of bases, or given with -c and named as a base): a second read
        # would append its `callbacks+:` twice.
        rank_zero_info(f"config file {str(path)!r} is read once: it was read already in this command")
        return []
    seen.add(resolved)
    data = _read(path)  # a file: a top-level non-file returned above, a missing base was refused
    if not isinstance(data, dict):
        return ["-c", name if named_by is None else str(path)]
    bases = data.get(BASE_KEY, [])
    bases = [bases] if isinstance(bases, str) else bases
    if not isinstance(bases, list) or not all(isinstance(b, str) for b in bases):
        raise ValueError(f"config file {str(path)!r}: `{BASE_KEY}:` must be a path or a list of paths, got {bases!r}")
    out: list = []
    for base in bases:
        out += _expand(base, path, seen, classes, (*chain, resolved), check)
    _check_has_base(path, data, classes)
    if BASE_KEY not in data:
        return out + ["-c", name if named_by is None else str(path)]
    rest = {k: v for k, v in data.items() if k != BASE_KEY}
    return out + (["-c", json.dumps(rest)] if rest else [])


def _check_has_base(path: Path, data: dict, classes: set[str]) -> None:
    """A delta (``model: {init_args: ...}`` without ``class_path``) read before any file that names
    the class has lost its base; jsonargparse would say "'loss' is not an argument of LightningModule"."""
    for key in ("model", "data"):
        value = data.get(key)
        if not isinstance(value, dict):
            continue
        if "class_path" in value:
            classes.add(key)
        elif key not in classes and "init_args" in value:
            raise ValueError(
                f"config file {str(path)!r} changes {key}.init_args but no config before it names {key}.class_path: "
                f"it is a delta written on top of a base; add `{BASE_KEY}: base.yaml` to it, or give the base first "
                f"(-c configs/arith/base.yaml -c {path})"
            )
