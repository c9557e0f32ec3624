"""A misspelled config key gets a "did you mean" from the ``trd`` command.

jsonargparse names the key it rejects (``Option 'lossx' is not accepted``, ``Subcommand 'fit' does
not accept option 'trainer.max_stepz'``) but not the one the user meant. `SuggestingArgumentParser`
appends the closest known keys to that message; nothing else about parsing changes.
"""

from __future__ import annotations

import difflib
import importlib
import inspect
import re

from lightning.pytorch.cli import LightningArgumentParser

_CLASS_OPTION = re.compile(r"Problem with given class_path '(?P<cls>[\w.]+)':\s*Option '(?P<key>[^']+)' is not accepted")
_KEY = re.compile(r"(?:does not accept option|Key|Option) ['\"](?P<key>[\w.\-]+)['\"]")
_UNRECOGNIZED = re.compile(r"unrecognized arguments: (?P<args>.*)")
_NO_ATTRIBUTE = re.compile(r"module '(?P<module>[\w.]+)' has no attribute '(?P<name>\w+)'")  # a class_path typo


def _known_keys(parser) -> set[str]:
    keys = set()
    for action in parser._actions:
        if action.dest and action.dest != "help" and not action.dest.endswith(".help"):
            keys.add(action.dest)
        for sub in getattr(action, "_name_parser_map", {}).values():  # subcommands (fit, test, ...)
            keys |= _known_keys(sub)
    return keys


def suggest_key(bad: str, known: set[str]) -> list[str]:
    """Fix the first segment of a dotted key that no known key has at that place."""
    parts = bad.split(".")
    split_known = [k.split(".") for k in known]
    for i, part in enumerate(parts):
        children = {k[i] for k in split_known if len(k) > i and k[:i] == parts[:i]}
        if not children:
            return []
        if part not in children:
            return [".".join([*parts[:i], m, *parts[i + 1:]]) for m in difflib.get_close_matches(part, children, n=3, cutoff=0.6)]
    return []


def _init_parameters(class_path: str) -> list[str]:
    module, _, name = class_path.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module), name)
        params = inspect.signature(cls.__init__).parameters.values()
    except (ImportError, AttributeError, ValueError, TypeError):
        return []
    return [p.name for p in params if p.name != "self" and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]


def unknown_key_hints(parser, message: str) -> list[str]:
    hints: list[str] = []
    class_options = set()
    for m in _CLASS_OPTION.finditer(message):
        cls, key = m["cls"], m["key"]
        class_options.add(key)
        params = _init_parameters(cls)
        close = difflib.get_close_matches(key, params, n=3, cutoff=0.6)
        hint = f"'{key}' is not an argument of {cls}; " + (
            f"did you mean {' or '.join(repr(c) for c in close)}?" if close else f"its arguments are: {', '.join(params)}"
        )
        if hint not in hints:
            hints.append(hint)
    for m in _NO_ATTRIBUTE.finditer(message):
        try:
            names = [n for n in dir(importlib.import_module(m["module"])) if not n.startswith("_")]
        except ImportError:
            continue
        close = difflib.get_close_matches(m["name"], names, n=3, cutoff=0.6)
        if close:
            module = m["module"]
            hint = f"{module} has no {m['name']!r}; did you mean {' or '.join(repr(f'{module}.{c}') for c in close)}?"
            if hint not in hints:
                hints.append(hint)
    bad_keys = [m["key"] for m in _KEY.finditer(message) if m["key"] not in class_options]
    for m in _UNRECOGNIZED.finditer(message):
        bad_keys += [a[2:].split("=", 1)[0] for a in m["args"].split() if a.startswith("--")]
    if bad_keys:
        known = _known_keys(parser)
        for key in dict.fromkeys(bad_keys):
            close = suggest_key(key, known)
            if close:
                hints.append(f"'{key}' is not a known key; did you mean {' or '.join(repr(c) for c in close)}?")
    return hints


class SuggestingArgumentParser(LightningArgumentParser):
    def error(self, message: str, ex: Exception | None = None):
        # Nested parsers raise first and their message (hint included) ends up inside this one.
        hints = [h for h in unknown_key_hints(self, message) if h not in message]
        if hints:
            message = message.rstrip() + "\n" + "\n".join(f"hint: {h}" for h in hints)
        return super().error(message, ex)


_UNION = "Does not validate against any of the Union subtypes"


def unwrap_union_error(error: BaseException) -> BaseException:
    """The constructor's own exception inside jsonargparse's "Does not validate against any of the
    Union subtypes ... Given value: Namespace(...)" wrapper (which chains the first subtype's error
    as its cause), so the user reads the real message first, with its type."""
    seen = set()
    while _UNION in str(error) and isinstance(error.__cause__, BaseException) and id(error) not in seen:
        seen.add(id(error))
        error = error.__cause__
    return error


def check_config_files(args: list[str]) -> None:
    """The YAML files given with ``-c``/``--config``, read strictly before jsonargparse does: an
    empty file ("Unexpected config:"), a syntax error (reported for ``<unicode string>``) and a
    duplicate key (YAML keeps the last one silently) are named with the file and line."""
    import yaml

    class StrictLoader(yaml.SafeLoader):
        pass

    def mapping(loader, node, deep=False):
        seen = {}
        for key_node, _ in node.value:
            key = loader.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"key {key!r} appears twice (first at line {seen[key] + 1}); YAML would keep the last one silently: remove one", key_node.start_mark
                )
            seen[key] = key_node.start_mark.line
        return loader.construct_mapping(node, deep=deep)

    StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, mapping)
    files = [args[i + 1] for i, a in enumerate(args[:-1]) if a in ("-c", "--config")]
    files += [a.split("=", 1)[1] for a in args if a.startswith(("--config=", "-c="))]
    for name in files:
        try:
            text = open(name, encoding="utf-8").read()
        except OSError:
            continue  # jsonargparse names a missing file itself
        except UnicodeDecodeError as e:
            raise ValueError(f"config file {name!r} is not UTF-8 text (byte {e.start}); save it as UTF-8") from None
        try:
            data = yaml.load(text, Loader=StrictLoader)
        except yaml.MarkedYAMLError as e:
            mark = e.problem_mark or e.context_mark
            where = f", line {mark.line + 1}, column {mark.column + 1}" if mark else ""
            raise ValueError(f"config file {name!r}{where}: {e.problem or e.context}; fix the YAML") from None
        if data is None:
            raise ValueError(f"config file {name!r} is empty (or only comments); give it the config's keys (trd fit --print_config shows them)")
        if not isinstance(data, dict):
            raise ValueError(f"config file {name!r} holds a {type(data).__name__}, not a mapping of keys; write it as `key: value` lines")
