"""Nested "pure dicts" of arrays (as `nnx.to_pure_dict` gives) <-> flat dicts keyed by dotted paths."""

from __future__ import annotations


def _key(part: str):
    return int(part) if part.isdigit() else part


def unflatten(flat: dict[str, object]) -> dict:
    """{'a.0.b': x} -> {'a': {0: {'b': x}}} (digit parts become int keys, as nnx pure dicts have)."""
    tree: dict = {}
    for path, value in flat.items():
        node = tree
        *parents, leaf = [_key(p) for p in path.split(".")]
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return tree


def flatten(tree: dict, prefix: str = "") -> dict[str, object]:
    """Inverse of `unflatten`."""
    out = {}
    for k, v in tree.items():
        path = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, path + "."))
        else:
            out[path] = v
    return out
