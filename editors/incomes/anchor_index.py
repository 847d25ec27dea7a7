"""Which pool rows a token sequence mentions, in time linear in the sequence: a trie over the rows' anchors.

The mention gate asks, per forward, which rows' anchors (their subject as token ids) occur contiguously in a
sequence. Testing every anchor of every row costs what the pool holds; walking a trie from each position
of the sequence costs what the sequence holds (times the longest anchor), whatever the pool's size.
Rows are added and removed one at a time, so the index follows an append-only pool without a rebuild.
"""
from __future__ import annotations

from collections.abc import Hashable, Iterable, Sequence

_ROWS = -1  # the key of a trie node's row set: never a token id


class AnchorIndex:
    def __init__(self):
        self._root: dict = {}
        self._anchors: dict[Hashable, list[tuple[int, ...]]] = {}  # row -> its anchors (for removal)
        self.longest = 0  # tokens in the longest anchor ever added (a decoding step rescans this far back)

    def __len__(self) -> int:
        return len(self._anchors)

    def __contains__(self, row) -> bool:
        return row in self._anchors

    def add(self, row: Hashable, anchors: Iterable[Sequence[int]]) -> None:
        """Index `row` under each anchor (a row without anchors is not indexed: the gate shows it to all)."""
        forms = [tuple(int(t) for t in a) for a in anchors if len(a)]
        if row in self._anchors:
            self.remove(row)
        if not forms:
            return
        self._anchors[row] = forms
        for form in forms:
            node = self._root
            for token in form:
                node = node.setdefault(token, {})
            node.setdefault(_ROWS, set()).add(row)
            self.longest = max(self.longest, len(form))

    def remove(self, row: Hashable) -> None:
        for form in self._anchors.pop(row, ()):
            path = [self._root]
            for token in form:
                path.append(path[-1][token])
            rows = path[-1][_ROWS]
            rows.discard(row)
            if not rows:
                del path[-1][_ROWS]
            for parent, token, node in zip(reversed(path[:-1]), reversed(form), reversed(path[1:])):
                if node:  # still on another anchor's path
                    break
                del parent[token]

    def mentioned(self, tokens: Sequence[int], start: int = 0) -> set:
        """The rows one of whose anchors occurs in `tokens` beginning at position `start` or later."""
        found: set = set()
        n = len(tokens)
        for i in range(max(0, start), n):
            node = self._root.get(tokens[i])
            j = i + 1
            while node is not None:
                rows = node.get(_ROWS)
                if rows:
                    found |= rows
                if j == n:
                    break
                node = node.get(tokens[j])
                j += 1
        return found
