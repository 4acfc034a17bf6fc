"""Strategies for hostile input: any JSON value, and mutations of a valid document
(a value replaced, deleted, or added where the parser expects something else)."""

from __future__ import annotations

import copy
from typing import Any

from hypothesis import strategies as st

scalars = (
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20)
    | st.sampled_from(["", "0", "-1", "true", "null", "1e400", "NaN", " ", "a,b=c", "x" * 300])
)


def json_values(keys: st.SearchStrategy[str] | None = None, max_leaves: int = 20
                ) -> st.SearchStrategy[Any]:
    """Any value `json.loads` or a YAML load can give, objects keyed by `keys` or any text."""
    key = st.text(max_size=12) if keys is None else keys | st.text(max_size=12)
    return st.recursive(
        scalars,
        lambda children: st.lists(children, max_size=4)
        | st.dictionaries(key, children, max_size=5),
        max_leaves=max_leaves,
    )


def _containers(value: Any, path: tuple = ()) -> list[tuple]:
    found = [path] if isinstance(value, dict | list) else []
    children = value.items() if isinstance(value, dict) else enumerate(value) \
        if isinstance(value, list) else ()
    for key, child in children:
        found.extend(_containers(child, (*path, key)))
    return found


@st.composite
def mutations(draw: st.DrawFn, valid: Any, keys: st.SearchStrategy[str] | None = None,
              max_changes: int = 3) -> Any:
    """`valid` with one to `max_changes` values replaced by any JSON value, deleted, or added."""
    value = copy.deepcopy(valid)
    for _ in range(draw(st.integers(1, max_changes))):
        containers = _containers(value)
        if not containers:
            return draw(json_values(keys))
        path = draw(st.sampled_from(containers))
        node = value
        for step in path:
            node = node[step]
        action = draw(st.sampled_from(["replace", "delete", "add"]))
        if action == "add" or not node:
            new = draw(json_values(keys, max_leaves=6))
            if isinstance(node, dict):
                node[draw(st.text(max_size=12) if keys is None else keys | st.text(max_size=12))] = new
            else:
                node.append(new)
            continue
        slot = draw(st.sampled_from(sorted(node) if isinstance(node, dict) else range(len(node))))
        if action == "delete":
            del node[slot]
        else:
            node[slot] = draw(json_values(keys, max_leaves=6))
    return value
