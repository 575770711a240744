"""Strict YAML loading shared by the config file and the API key file.

Owns `load_strict`: `yaml.safe_load` semantics, except that a duplicate key in a
mapping is an error (plain YAML silently keeps the last one), and every syntax error
comes back as one located message ("line L, column C: YAML syntax error: ...", the
position also as `YamlSyntaxError.line`/`.column`). `load_indexed` returns the same
data with a `DocIndex` built from the same parse: where each path of the document is
spelled (1-based line and column), and which string values are plain (unquoted)
scalars, which `config.envsubst` retypes after substitution.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import yaml

Path = tuple[Any, ...]


class YamlSyntaxError(ValueError):
    """`str(exc)` is the located message; `line`/`column` (1-based) where known."""

    def __init__(self, message: str, line: int | None = None, column: int | None = None) -> None:
        super().__init__(message)
        self.line = line
        self.column = column


@dataclass
class DocIndex:
    """Where a parsed document spells each path. `positions`: path -> (line, column),
    1-based, of the key (a mapping entry) or of the item (a list entry); `plain`: the
    paths of string values written as plain (unquoted) scalars."""

    positions: dict[Path, tuple[int, int]] = field(default_factory=dict)
    plain: set[Path] = field(default_factory=set)


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
    return load_indexed(text)[0]


def load_indexed(text: str) -> tuple[Any, DocIndex]:
    """The document's data and its `DocIndex`, from one parse; raises `YamlSyntaxError`."""
    loader = None
    try:
        loader = _StrictLoader(text)  # the reader refuses control characters already here
        node = loader.get_single_node()
        index = _index(node)  # before construction, which flattens `<<` merges in place
        data = loader.construct_document(node) if node is not None else None
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark else "(yaml)"
        what = exc.problem or "invalid YAML"
        if exc.context and not what.startswith("duplicate key"):
            what = f"{what} ({exc.context})"
        raise YamlSyntaxError(f"{where}: YAML syntax error: {what}",
                              mark.line + 1 if mark else None, mark.column + 1 if mark else None) from None
    except yaml.YAMLError as exc:
        raise YamlSyntaxError(f"(yaml): YAML syntax error: {exc}") from None
    finally:
        if loader is not None:
            loader.dispose()
    return data, index


def line_index(text: str) -> dict[Path, int]:
    """Path into the document -> 1-based line where that key or item starts. Best
    effort: empty for text that does not compose (the syntax error is reported then)."""
    try:
        root = yaml.compose(text, Loader=_StrictLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError:
        return {}
    return {path: line for path, (line, _) in _index(root).positions.items()}


_STR_TAG = "tag:yaml.org,2002:str"
_MERGE_TAG = "tag:yaml.org,2002:merge"


def _index(root: Any) -> DocIndex:
    index = DocIndex()
    active: set[int] = set()  # the collections being walked: a recursive alias stops here

    def walk(node: Any, path: Path) -> None:
        if isinstance(node, yaml.ScalarNode):
            if node.style is None and node.tag == _STR_TAG:
                index.plain.add(path)
            return
        if id(node) in active:
            return
        active.add(id(node))
        # An alias repeats its anchor's node: the paths under the alias point where the
        # anchor spells them.
        if isinstance(node, yaml.MappingNode):
            mapping(node, path, set())
        elif isinstance(node, yaml.SequenceNode):
            for i, item in enumerate(node.value):
                mark = item.start_mark
                index.positions.setdefault(path + (i,), (mark.line + 1, mark.column + 1))
                walk(item, path + (i,))
        active.discard(id(node))

    def mapping(node: yaml.MappingNode, path: Path, taken: set[str]) -> None:
        """A mapping's keys at `path`; then the keys its `<<` merges bring that neither
        it nor an earlier mapping set (YAML's merge order: the mapping's own keys win)."""
        merges: list[Any] = []
        own = [(k, v) for k, v in node.value if isinstance(k, yaml.ScalarNode)
               and k.tag != _MERGE_TAG and k.value not in taken]
        for key_node, value_node in node.value:
            if key_node.tag == _MERGE_TAG:
                merges.extend(value_node.value if isinstance(value_node, yaml.SequenceNode) else [value_node])
        for key_node, value_node in own:
            key = path + (key_node.value,)
            mark = key_node.start_mark
            index.positions.setdefault(key, (mark.line + 1, mark.column + 1))
            walk(value_node, key)
        taken = taken | {k.value for k, _ in own}
        for merged in merges:
            if isinstance(merged, yaml.MappingNode) and id(merged) not in active:
                active.add(id(merged))
                mapping(merged, path, taken)
                active.discard(id(merged))
                taken = taken | {k.value for k, _ in merged.value if isinstance(k, yaml.ScalarNode)}

    if root is not None:
        walk(root, ())
    return index
