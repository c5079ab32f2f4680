"""Parameter and module names: prefix matching for ``ignore=`` and repeated-block indices."""

from __future__ import annotations

import re
from typing import Iterable, Sequence

_BLOCK_RE = re.compile(r"^(.*?\.\d+)(?:\.|$)")
_INDEX_RE = re.compile(r"^(.*?)(\d+)$")


def matches_prefix(name: str, prefixes: Iterable[str]) -> bool:
    """Prefix match on module boundaries: ``model.layers.1`` matches layer 1, not layer 10.

    A prefix ending in ``.`` matches anything below it; the empty prefix matches nothing.
    """
    for p in prefixes:
        if not p:
            continue
        if name == p or (name.startswith(p) and (p.endswith(".") or name[len(p)] == ".")):
            return True
    return False


def block_of_name(name: str) -> str | None:
    """The first repeated-block path in ``name``: ``model.layers.3`` for ``model.layers.3.mlp.up.weight``."""
    match = _BLOCK_RE.match(name)
    return match.group(1) if match else None


def common_block(names: Iterable[str]) -> str | None:
    """The block all ``names`` live in, or None when they span several (or none)."""
    blocks = {block_of_name(n) for n in names}
    return blocks.pop() if len(blocks) == 1 else None


def split_block(block: str | None) -> tuple[str, int] | None:
    """``("model.layers.", 3)`` for ``model.layers.3``; None when there is no trailing index."""
    match = _INDEX_RE.match(block) if block else None
    return (match.group(1), int(match.group(2))) if match else None


def block_index(block: str | None) -> int:
    """The trailing index of a block path, -1 when it has none."""
    parts = split_block(block)
    return parts[1] if parts else -1


def module_of(name: str) -> str:
    """The module path of a parameter FQN (``a.b`` for ``a.b.weight``)."""
    return name.rsplit(".", 1)[0] if "." in name else name


def edge_blocks(blocks: Sequence[str | None], first: int, last: int) -> set[str]:
    """Blocks among the first/last N of their family (``model.layers.<i>``), by numeric index."""
    if first <= 0 and last <= 0:
        return set()
    families: dict[str, set[tuple[int, str]]] = {}
    for b in blocks:
        parts = split_block(b)
        if parts:
            families.setdefault(parts[0], set()).add((parts[1], b))
    kept: set[str] = set()
    for members in families.values():
        ordered = [b for _, b in sorted(members)]
        kept.update(ordered[: max(first, 0)])
        if last > 0:
            kept.update(ordered[len(ordered) - last:])
    return kept
