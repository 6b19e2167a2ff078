"""The generic typed loader: YAML trees → dataclasses, with dotted command-line overrides.

It knows nothing of towerrec's sections: any dataclass whose fields are typed with ``int``,
``float``, ``bool``, ``str``, ``Literal``, ``X | None``, ``list[...]``, ``dict[str, ...]`` or
another such dataclass is built from a tree, rejecting unknown keys and wrong types with the
dotted key (``trainer.max_epochs: expected an integer, got 'three'``); a section's ``check()``
method adds its own rules and names the field. ``towerrec.trainer.config`` declares the sections.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path
from typing import Any, Literal, Union

import yaml

from towerrec.trainer.errors import ConfigError


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp))


def _build(tp: Any, value: Any, key: str) -> Any:
    origin = typing.get_origin(tp)
    if origin is Literal:
        choices = typing.get_args(tp)
        if value not in choices or isinstance(value, bool) != isinstance(choices[0], bool):
            raise ConfigError(f"{key}: {value!r} is not one of {', '.join(map(str, choices))}")
        return value
    if origin in (Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None:
            return None
        errors = []
        for alternative in args:  # the first alternative the value fits
            try:
                return _build(alternative, value, key)
            except ConfigError as err:
                errors.append(err)
        raise (
            errors[0]
            if len(errors) == 1
            else ConfigError(f"{key}: expected {' or '.join(_type_name(a) for a in args)}, got {value!r}")
        )
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return build_dataclass(tp, value, key)
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        (item_type,) = typing.get_args(tp)
        return [_build(item_type, item, f"{key}[{i}]") for i, item in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        _, value_type = typing.get_args(tp)
        return {str(k): _build(value_type, v, f"{key}.{k}") for k, v in value.items()}
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads 1e-3 (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true or false, got {value!r}")
        return value
    if tp is Any:  # free-form (a logger's own options): YAML values as they are
        return value
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return value
    raise AssertionError(f"unsupported config type {tp} at {key}")


def build_dataclass(cls: type, values: dict, prefix: str) -> Any:
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    for name in values:
        if name not in known:
            where = f"{prefix}.{name}" if prefix else name
            raise ConfigError(f"{where}: unknown key (allowed: {', '.join(sorted(known))})")
    kwargs = {}
    for f in dataclasses.fields(cls):
        key = f"{prefix}.{f.name}" if prefix else f.name
        if f.name in values:
            kwargs[f.name] = _build(hints[f.name], values[f.name], key)
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ConfigError(f"{key}: required")
    section = cls(**kwargs)
    check = getattr(section, "check", None)
    if check is not None:  # the section's own rules; ValueError("field: problem") names the field
        try:
            check()
        except ValueError as err:
            raise ConfigError(f"{prefix}.{err}" if prefix else str(err)) from err
    return section


def set_dotted(tree: dict, dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = tree
    for part in parts[:-1]:
        if isinstance(node, list):
            node = node[int(part)]
            continue
        node = node.setdefault(part, {})
        if not isinstance(node, (dict, list)):
            raise ConfigError(f"{dotted}: {part} is not a mapping")
    last = parts[-1]
    if isinstance(node, list):
        node[int(last)] = value
    else:
        node[last] = value


def parse_overrides(overrides: list[str]) -> list[tuple[str, Any]]:
    """``["trainer.max_epochs=3", ...]`` → [(key, YAML-parsed value), ...]."""
    parsed = []
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r}: expected KEY=VALUE (e.g. trainer.max_epochs=3)")
        key, raw = item.split("=", 1)
        parsed.append((key.strip().removeprefix("--"), load_yaml(raw, f"override {key}") if raw else None))
    return parsed


def deep_merge(base: dict, override: dict) -> dict:
    merged = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML's safe loader, refusing a key given twice in one mapping (YAML keeps the last value
    silently: a second ``trainer:`` section would replace the first whole)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        first_line: dict = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            line = key_node.start_mark.line + 1
            try:
                if key in first_line:
                    raise ConfigError(
                        f"{self.name}: line {line}: key {key!r} is given twice (first on line {first_line[key]}); "
                        "keep one"
                    )
                first_line[key] = line
            except TypeError:  # an unhashable key: YAML's own error follows
                pass
        return super().construct_mapping(node, deep=deep)


def load_yaml(text: str, name: str = "<string>"):
    """``yaml.safe_load`` that refuses duplicate keys (``ConfigError`` naming the key and lines)."""
    loader = _UniqueKeyLoader(text)
    loader.name = name
    try:
        return loader.get_single_data()
    finally:
        loader.dispose()


def _yaml_problem(err: yaml.YAMLError, text: str) -> str:
    """A YAML error in one line: where, then what."""
    mark = getattr(err, "problem_mark", None)
    where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
    if isinstance(err, yaml.reader.ReaderError):
        where = f"line {text[: err.position].count(chr(10)) + 1}: "
        problem = f"character {chr(err.character)!r} is not allowed in YAML (is it the file you meant?)"
    else:
        problem = getattr(err, "problem", None) or str(err).strip().splitlines()[0]
    return f"{where}not valid YAML ({problem})"


def read_config_tree(path: Path, seen: tuple[Path, ...] = ()) -> dict:
    """Reads a config file; a top-level ``base: other.yaml`` (relative to this file) is loaded first
    and deep-merged under this file's values (lists are replaced, not merged)."""
    if not path.exists():
        raise ConfigError(f"--config: {path} does not exist")
    if not path.is_file():
        raise ConfigError(f"--config: {path} is a folder, not a YAML file")
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as err:
        line = path.read_bytes()[: err.start].count(b"\n") + 1
        raise ConfigError(
            f"{path}: line {line}: byte 0x{err.object[err.start]:02x} is not UTF-8 text (a YAML config is "
            "UTF-8: save it as UTF-8, or is it the file you meant?)"
        ) from err
    except OSError as err:
        raise ConfigError(f"--config: {path} cannot be read ({err.strerror or err})") from err
    try:
        tree = load_yaml(text, str(path)) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: {_yaml_problem(err, text)}") from err
    if not isinstance(tree, dict):
        raise ConfigError(f"{path}: the top level must be a mapping")
    base = tree.pop("base", None)
    if base is None:
        return tree
    base_path = (path.parent / base).resolve()
    if base_path in seen:
        raise ConfigError(f"{path}: base: {base} includes itself")
    return deep_merge(read_config_tree(base_path, seen + (path.resolve(),)), tree)
