"""Strict YAML loading shared by the config file and the API key file.

Owns `load_strict`: `yaml.safe_load` semantics, except that a duplicate key in a
mapping is an error (plain YAML silently keeps the last one), and every syntax error
comes back as one located message ("line L, column C: YAML syntax error: ...").
"""

from __future__ import annotations

from typing import Any

import yaml


class YamlSyntaxError(ValueError):
    """`str(exc)` is the located message."""


class _StrictLoader(yaml.SafeLoader):
    """`yaml.SafeLoader` that refuses duplicate mapping keys instead of keeping the last."""


def _construct_mapping(loader: _StrictLoader, node: yaml.MappingNode, deep: bool = False) -> dict:
    seen: dict[Any, int] = {}
    for key_node, _ in node.value:
        if key_node.tag == "tag:yaml.org,2002:merge":
            continue
        key = loader.construct_object(key_node, deep=True)
        try:
            first = seen.get(key)
        except TypeError:  # unhashable key: construct_mapping reports it
            continue
        if first is not None:
            raise yaml.constructor.ConstructorError(
                None, None, f"duplicate key {key!r} (first defined on line {first + 1})",
                key_node.start_mark,
            )
        seen[key] = key_node.start_mark.line
    return yaml.SafeLoader.construct_mapping(loader, node, deep=deep)


_StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def load_strict(text: str) -> Any:
    try:
        return yaml.load(text, Loader=_StrictLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark else "(yaml)"
        what = exc.problem or "invalid YAML"
        if exc.context and not what.startswith("duplicate key"):
            what = f"{what} ({exc.context})"
        raise YamlSyntaxError(f"{where}: YAML syntax error: {what}") from None
    except yaml.YAMLError as exc:
        raise YamlSyntaxError(f"(yaml): YAML syntax error: {exc}") from None


def line_index(text: str) -> dict[tuple[Any, ...], int]:
    """Path into the document -> 1-based line where that key or item starts. Best
    effort: empty for text that does not compose (the syntax error is reported then)."""
    try:
        root = yaml.compose(text, Loader=_StrictLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError:
        return {}
    out: dict[tuple[Any, ...], int] = {}

    def walk(node: Any, path: tuple[Any, ...]) -> None:
        if isinstance(node, yaml.MappingNode):
            for key_node, value_node in node.value:
                if isinstance(key_node, yaml.ScalarNode):
                    key = (path + (key_node.value,))
                    out[key] = key_node.start_mark.line + 1
                    walk(value_node, key)
        elif isinstance(node, yaml.SequenceNode):
            for i, item in enumerate(node.value):
                out[path + (i,)] = item.start_mark.line + 1
                walk(item, path + (i,))

    if root is not None:
        walk(root, ())
    return out
