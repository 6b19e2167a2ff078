"""Every config key, its type, default and meaning, read from the config dataclasses themselves
(the docstring under each field): ``towerrec config [PREFIX]`` prints them and
``configs/REFERENCE.md`` holds the Markdown table (``towerrec config --markdown``; a test keeps
the file current).
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import textwrap
import typing
from typing import Any

from towerrec.trainer.config import Config


def _field_docs(cls: type) -> dict[str, str]:
    """The string literal right after each field of a dataclass (its attribute docstring)."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    body = tree.body[0].body
    docs = {}
    for node, following in zip(body, body[1:]):
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            if isinstance(following, ast.Expr) and isinstance(following.value, ast.Constant):
                docs[node.target.id] = " ".join(str(following.value.value).split())
    return docs


def _type_text(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is typing.Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if origin in (typing.Union, __import__("types").UnionType):
        return " | ".join(_type_text(a) for a in typing.get_args(tp))
    if origin is list:
        return f"list[{_type_text(typing.get_args(tp)[0])}]"
    if origin is dict:
        key, value = typing.get_args(tp)
        return f"dict[{_type_text(key)}, {_type_text(value)}]"
    if tp is type(None):
        return "null"
    return getattr(tp, "__name__", str(tp))


def _default_text(f: dataclasses.Field) -> str:
    if f.default is not dataclasses.MISSING:
        value = f.default
    elif f.default_factory is not dataclasses.MISSING:
        value = f.default_factory()
        if dataclasses.is_dataclass(value):
            return "(section)"
    else:
        return "required"
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    return repr(value) if isinstance(value, str) else str(value)


def _dataclass_of(tp: Any) -> type | None:
    for candidate in (tp, *typing.get_args(tp)):
        if dataclasses.is_dataclass(candidate):
            return candidate
        for inner in typing.get_args(candidate):
            if dataclasses.is_dataclass(inner):
                return inner
    return None


def entries(cls: type = Config, prefix: str = "") -> list[tuple[str, str, str, str]]:
    """(key, type, default, meaning) of every field, sections recursively; list items as ``key[]``."""
    hints = typing.get_type_hints(cls)
    docs = _field_docs(cls)
    out = []
    for f in dataclasses.fields(cls):
        key = f"{prefix}{f.name}"
        tp = hints[f.name]
        inner = _dataclass_of(tp)
        is_list = typing.get_origin(tp) is list or any(
            typing.get_origin(a) is list for a in typing.get_args(tp)
        )
        if inner is not None and not is_list:
            out.append((key, "section", _default_text(f), docs.get(f.name, "")))
            out += entries(inner, f"{key}.")
        elif inner is not None:
            out.append((key, f"list of {inner.__name__}", _default_text(f), docs.get(f.name, "")))
            out += entries(inner, f"{key}[].")
        else:
            out.append((key, _type_text(tp), _default_text(f), docs.get(f.name, "")))
    return out


def markdown() -> str:
    lines = [
        "# Config reference",
        "",
        "Every key of a towerrec config: YAML files in `configs/`, overrides after a command's flags",
        "(`--trainer.max_epochs 3` or `trainer.max_epochs=3`). Generated from the config dataclasses by",
        "`towerrec config --markdown > configs/REFERENCE.md`; a test keeps this file current.",
        "`key[]` is a field of each item of a list (e.g. `data.sparse[].embedding_dim`).",
        "",
        "| key | type | default | meaning |",
        "|---|---|---|---|",
    ]
    for key, tp, default, doc in entries():
        cells = (f"`{key}`", tp.replace("|", "\\|"), f"`{default}`", doc.replace("|", "\\|"))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def run_config(cfg, args) -> int:
    """``towerrec config [PREFIX] [--markdown]``."""
    if args.markdown:
        print(markdown(), end="")
        return 0
    for key, tp, default, doc in entries():
        if key.startswith(args.prefix):
            print(
                f"{key}  ({tp}; default {default})\n    {doc}" if doc else f"{key}  ({tp}; default {default})"
            )
    return 0
