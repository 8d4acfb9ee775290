"""The YAML reader of study specs and ``--set`` values: plain data, bounded, unambiguous.

``yaml.safe_load`` builds no objects, but it still expands aliases (a 1 KB "billion laughs"
document becomes gigabytes when stored or copied), lets a repeated key silently replace the
first, and turns ``2024-01-01`` into a date that JSON cannot store. :func:`load_yaml`:

* refuses aliases (``*name``) and merge keys (``<<``): write the value out;
* refuses a key given twice in one mapping, naming the key and both lines;
* refuses nesting deeper than :data:`~prunelab.experiments.limits.MAX_DEPTH` and a number
  written with more than :data:`~prunelab.experiments.limits.MAX_NUMBER_CHARS` characters;
* builds only null, booleans, ints, floats, strings, lists and mappings (a date stays the
  string it was written as; ``!!binary``, ``!!set``, ``!!omap``, ``!!pairs`` are refused).

Every refusal is a :class:`SpecYAMLError` (a ``yaml.YAMLError``) whose message names the line.
"""

from __future__ import annotations

import yaml

from prunelab.experiments.limits import MAX_DEPTH, MAX_NUMBER_CHARS


class SpecYAMLError(yaml.YAMLError):
    """A YAML document a spec may not be written as; the message names the line."""


def _line(node_or_event) -> int:
    return node_or_event.start_mark.line + 1


class _StrictLoader(yaml.SafeLoader):
    def __init__(self, stream):
        super().__init__(stream)
        self._depth = 0

    def compose_node(self, parent, index):
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            raise SpecYAMLError(
                f"line {_line(event)}: YAML aliases (*{event.anchor}) are not allowed in a "
                f"spec; write the value out where it is used"
            )
        self._depth += 1
        try:
            if self._depth > MAX_DEPTH:
                raise SpecYAMLError(
                    f"line {_line(self.peek_event())}: nested more than {MAX_DEPTH} levels deep (the limit of a spec)"
                )
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1

    def construct_mapping(self, node, deep=False):
        if not isinstance(node, yaml.MappingNode):
            return super().construct_mapping(node, deep=deep)
        seen: dict = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                raise SpecYAMLError(
                    f"line {_line(key_node)}: YAML merge keys (<<) are not allowed in a spec; write the keys out"
                )
            key = self.construct_object(key_node, deep=True)
            try:
                hash(key)
            except TypeError:
                raise SpecYAMLError(
                    f"line {_line(key_node)}: a mapping key must be a name or a number; got a {type(key).__name__}"
                ) from None
            if key in seen:
                raise SpecYAMLError(
                    f"line {_line(key_node)}: duplicate key {key!r} (first given at line "
                    f"{seen[key]}); each key may appear once in a mapping"
                )
            seen[key] = _line(key_node)
        return super().construct_mapping(node, deep=deep)

    def construct_yaml_int(self, node):
        return _bounded_number(self, node, yaml.SafeLoader.construct_yaml_int)

    def construct_yaml_float(self, node):
        return _bounded_number(self, node, yaml.SafeLoader.construct_yaml_float)

    def construct_as_text(self, node):
        return str(node.value)

    def refuse(self, node):
        raise SpecYAMLError(
            f"line {_line(node)}: the YAML tag {node.tag!r} is not allowed in a spec "
            f"(plain values, lists and mappings only)"
        )


def _bounded_number(loader, node, construct):
    if len(str(node.value)) > MAX_NUMBER_CHARS:
        raise SpecYAMLError(
            f"line {_line(node)}: a number written with {len(str(node.value))} characters (at most {MAX_NUMBER_CHARS})"
        )
    try:
        return construct(loader, node)
    except (ValueError, OverflowError) as err:
        raise SpecYAMLError(f"line {_line(node)}: not a number: {str(node.value)[:40]!r} ({err})") from None


_StrictLoader.add_constructor("tag:yaml.org,2002:int", _StrictLoader.construct_yaml_int)
_StrictLoader.add_constructor("tag:yaml.org,2002:float", _StrictLoader.construct_yaml_float)
_StrictLoader.add_constructor("tag:yaml.org,2002:timestamp", _StrictLoader.construct_as_text)
for _tag in ("binary", "set", "omap", "pairs"):
    _StrictLoader.add_constructor(f"tag:yaml.org,2002:{_tag}", _StrictLoader.refuse)
_StrictLoader.add_constructor(None, _StrictLoader.refuse)


def load_yaml(text: str):
    """Parse ``text`` as plain YAML data (see the module docstring); raise ``yaml.YAMLError``."""
    loader = _StrictLoader(text)
    try:
        return loader.get_single_data()
    except RecursionError:
        raise SpecYAMLError(f"nested more than {MAX_DEPTH} levels deep (the limit of a spec)") from None
    finally:
        loader.dispose()
