"""One strict YAML reader for the files people write by hand: the inventory, plans and playbooks.

Each of them reports every problem at once, one line per problem naming the
file, the line or field, and what is allowed; this module holds what they
share: the reader (libyaml, a key given twice is an error), the error class,
and the wording of pydantic's errors.

It imports no other part of the project, so ``playbooks`` may use it too.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel
from pydantic_core import ErrorDetails

__all__ = [
    "InputError",
    "closest",
    "did_you_mean",
    "field_path",
    "problem_text",
    "read_mapping",
    "read_yaml",
    "relative_to",
    "shown",
]

_SafeLoader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # libyaml when present
_MERGE_TAG = "tag:yaml.org,2002:merge"
_SHOWN_CHARS = 60


class InputError(ValueError):
    """A file (or parameter) that cannot be used, with every problem found: one line each in ``errors``.

    Each line names the file (or ``plan``, an import…), the entry and the
    field, and says what is allowed, so whoever edits it can fix all of them
    in one go.
    """

    def __init__(self, errors: list[str]):
        self.errors = errors
        super().__init__("\n".join(errors))


class _StrictLoader(_SafeLoader):  # type: ignore[misc, valid-type]
    """The safe loader, except that a key given twice in one mapping is an error.

    Plain YAML keeps the last value silently, which would hide a pasted
    ``ssh_port`` line that was meant to replace the one above it.
    """

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        pairs = list(node.value)  # before merge keys ('<<: *defaults') are flattened into node.value
        mapping = super().construct_mapping(node, deep=deep)
        if len(mapping) < len(pairs):  # rare: only then look for the culprit
            seen: set[Any] = set()
            for key_node, _ in pairs:
                if key_node.tag == _MERGE_TAG:
                    continue  # keys merged in from an anchor may be overridden; that is the point of them
                key = self.construct_object(key_node)
                if key in seen:
                    raise yaml.constructor.ConstructorError(
                        None, None, f"key {key!r} appears twice in this mapping", key_node.start_mark
                    )
                seen.add(key)
        return mapping


def read_yaml(path: Path, name: str, *, missing: str = "no such file") -> Any:
    """The YAML document in ``path``; InputError naming ``name`` (and the line) when it cannot be read.

    ``missing`` is what to say when the file does not exist.
    """
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise InputError([f"{name}: {missing}"]) from None
    except UnicodeDecodeError as e:
        raise InputError([f"{name}: not UTF-8 text (byte {e.start})"]) from None
    except OSError as e:
        raise InputError([f"{name}: cannot read: {e.strerror}"]) from None
    try:
        return yaml.load(text, Loader=_StrictLoader)  # noqa: S506 - a safe loader
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        raise InputError([f"{name}: {where}not valid YAML: {e.problem or e.context}"]) from None
    except yaml.YAMLError as e:
        raise InputError([f"{name}: not valid YAML: {e}"]) from None


def read_mapping(path: Path, name: str, *, expected: str, missing: str = "no such file") -> dict[Any, Any]:
    """:func:`read_yaml` for a file whose top level must be a mapping; ``expected`` says of what."""
    doc = read_yaml(path, name, missing=missing)
    if not isinstance(doc, dict):
        got = "an empty file" if doc is None else f"a {type(doc).__name__}"
        raise InputError([f"{name}: the top level must be {expected}; got {got}"])
    return doc


def relative_to(path: Path, base: Path) -> Path:
    """A path written in a file, taken relative to the file's directory ``base`` (not to wherever the CLI runs)."""
    path = path.expanduser()
    return path if path.is_absolute() else base / path


# ----------------------------------------------------------------------------- wording


def closest(word: str, choices: Iterable[str]) -> str | None:
    """The choice ``word`` was most likely meant to be, if any is close."""
    close = difflib.get_close_matches(word, list(choices), n=1)
    return close[0] if close else None


def did_you_mean(word: str, choices: Iterable[str]) -> str:
    """``"; did you mean 'devices'?"``, or nothing when no choice is close."""
    close = closest(word, choices)
    return f"; did you mean {close!r}?" if close is not None else ""


def shown(value: Any) -> str:
    """A value as the user wrote it, cut to a readable length."""
    text = repr(value)
    return text if len(text) <= _SHOWN_CHARS else text[: _SHOWN_CHARS - 3] + "..."


def field_path(loc: Sequence[int | str]) -> str:
    """('waves', 1, 'size') -> 'waves[1].size'; pydantic's '[key]' marker says the mapping key itself is wrong."""
    path = ""
    for part in loc:
        if part == "[key]":
            path += " (the name)"
        else:
            path += f"[{part}]" if isinstance(part, int) else (f".{part}" if path else str(part))
    return path


def problem_text(error: ErrorDetails, model: type[BaseModel] | None = None) -> str:
    """One pydantic error in words: what is wrong and what is allowed, with what was given.

    ``model`` is the model the error is in: an unknown field's message lists its fields.
    """
    kind = error["type"]
    if kind == "missing":
        return "required field is missing"
    if kind == "extra_forbidden":
        if model is None:
            return "unknown field"
        fields = list(model.model_fields)
        return f"unknown field{did_you_mean(str(error['loc'][-1]), fields)} (allowed: {', '.join(fields)})"
    if kind == "too_short" and not error["input"]:
        return "must not be empty"
    if kind == "string_type":  # e.g. "branch: 01" is the number 1 to YAML
        return f"must be text (quote it in YAML), got {shown(error['input'])}"
    if kind == "model_type":
        return f"must be a mapping of fields (key: value), got {shown(error['input'])}"
    if kind in ("value_error", "assertion_error"):
        return str(error["ctx"]["error"])
    return f"{error['msg'].replace('Input should be', 'must be', 1)}, got {shown(error['input'])}"
