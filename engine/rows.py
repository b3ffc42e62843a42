"""Rows keyed by speaker id, held in fixed-size blocks of float32, written and removed in place.

The in-memory tables of the 1:N index (:class:`~voiceprint.engine.gallery.Gallery`, the
search rows of :class:`~voiceprint.engine.index.CentroidIndex`) change a few rows at a
time while holding up to a million: a write lands in its row, a removal moves the last row
into the gap. Growing never copies what is held: past one block of ``BLOCK`` rows a
column gains another block, so an enrollment that needs more room costs one block's
allocation, not a copy of every column (a gigabyte at a million speakers, which held
answers back for a second). The first block starts small and doubles up to ``BLOCK``, so
a small gallery takes little memory. Not thread-safe: the owner locks.

>>> import numpy as np
>>> rows = Rows(mean=(2,))
>>> rows.put([7, 9], ["bo", "al"], mean=np.eye(2))
[0, 1]
>>> rows.remove([7])
>>> rows.ids, rows.names, rows.array("mean").tolist()
([9], ['al'], [[0.0, 1.0]])
>>> rows.take("mean", [0]).tolist(), [b.shape for b in rows.blocks("mean")]
([[0.0, 1.0]], [(1, 2)])
>>> _ = rows.put([4, 5], ["cy", "di"], mean=np.ones((2, 2))); rows.nbytes  # room for 16 rows
128
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

BLOCK = 1 << 16  # rows per block: 64 MiB of 256-dimensional float32


class Rows:
    """Speaker ids, names and float32 columns (``shapes``: each row's shape), by row."""

    def __init__(self, **shapes: tuple[int, ...]) -> None:
        self.ids: list[int] = []
        self.names: list[str] = []
        self.at: dict[int, int] = {}  # speaker id -> row
        self._shapes = {name: tuple(shape) for name, shape in shapes.items()}
        self._blocks: dict[str, list[np.ndarray]] = {name: [] for name in shapes}

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def nbytes(self) -> int:
        """Memory of the columns (allocated rows, not only the used ones)."""
        return sum(b.nbytes for blocks in self._blocks.values() for b in blocks)

    def shape(self, name: str) -> tuple[int, ...]:
        """One row's shape in column ``name``."""
        return self._shapes[name]

    def reshape(self, name: str, shape: tuple[int, ...]) -> None:
        """Give an empty table's column its row shape (a dimension learnt from the data)."""
        assert not self.ids, "only an empty table changes shape"
        self._shapes[name], self._blocks[name] = tuple(shape), []

    def blocks(self, name: str) -> Iterator[np.ndarray]:
        """The used rows of a column, block by block in row order: views, valid until the
        next change. Products with every row go block by block, without a copy."""
        left = len(self.ids)
        for block in self._blocks[name]:
            if left <= 0:
                return
            yield block[:left]
            left -= len(block)

    def array(self, name: str) -> np.ndarray:
        """A copy of the used rows of a column, as one array ``[len(self), *shape]``."""
        parts = list(self.blocks(name))
        return np.concatenate(parts) if parts else np.zeros((0, *self._shapes[name]), dtype=np.float32)

    def take(self, name: str, rows) -> np.ndarray:
        """The rows ``rows`` of a column, in that order (a copy)."""
        rows, blocks = np.asarray(rows, dtype=np.int64), self._blocks[name]
        if len(blocks) == 1:
            return blocks[0][rows]
        out = np.empty((len(rows), *self._shapes[name]), dtype=np.float32)
        if len(rows) <= 64:  # a search's candidates: a row at a time beats grouping them by block
            for i, row in enumerate(rows.tolist()):
                out[i] = blocks[row // BLOCK][row % BLOCK]
            return out
        for block, (where, offsets) in self._by_block(rows):
            out[where] = blocks[block][offsets]
        return out

    def put(self, ids, names, **values) -> list[int]:
        """Write rows for ``ids`` (new ids are appended); the rows written, in order."""
        ids = [int(i) for i in ids]
        # Counted against the dict, not as a set difference with its keys: that builds a
        # set of every id (40 ms at a million rows) for each change.
        self._reserve(len(self.ids) + sum(1 for i in set(ids) if i not in self.at))
        rows = []
        for speaker_id, name in zip(ids, names):
            row = self.at.get(speaker_id)
            if row is None:
                row = len(self.ids)
                self.at[speaker_id] = row
                self.ids.append(speaker_id)
                self.names.append(name)
            self.names[row] = name  # an id can come back under another name (a reused id)
            rows.append(row)
        for name, column in values.items():
            column = np.asarray(column, dtype=np.float32)
            for block, (where, offsets) in self._by_block(np.asarray(rows, dtype=np.int64)):
                self._blocks[name][block][offsets] = column[where]
        return rows

    def remove(self, ids) -> None:
        """Drop the rows of ``ids`` (unknown ids are ignored)."""
        for speaker_id in ids:
            row = self.at.pop(int(speaker_id), None)
            if row is None:
                continue
            last = len(self.ids) - 1
            if row != last:  # the last row takes the removed one's place
                moved = self.ids[last]
                self.ids[row], self.names[row] = moved, self.names[last]
                for blocks in self._blocks.values():
                    blocks[row // BLOCK][row % BLOCK] = blocks[last // BLOCK][last % BLOCK]
                self.at[moved] = row
            self.ids.pop()
            self.names.pop()

    def _by_block(self, rows: np.ndarray):
        """``rows`` grouped by block: (block, (positions in ``rows``, offsets in the block))."""
        block_of = rows // BLOCK
        for block in np.unique(block_of):
            where = np.flatnonzero(block_of == block)
            yield int(block), (where, rows[where] % BLOCK)

    def _reserve(self, rows: int) -> None:
        """Room for ``rows`` rows: the first block doubles up to ``BLOCK`` (copying at most
        one block), then whole blocks are added."""
        for name, blocks in self._blocks.items():
            shape = self._shapes[name]
            if len(blocks) == 1 and len(blocks[0]) < BLOCK and rows > len(blocks[0]):
                grown = np.zeros((min(BLOCK, max(rows, 2 * len(blocks[0]))), *shape), dtype=np.float32)
                grown[: len(blocks[0])] = blocks[0]
                blocks[0] = grown
            while sum(len(b) for b in blocks) < rows:
                # calloc'd zeros: the pages cost memory only once rows are written into them
                blocks.append(np.zeros((BLOCK if blocks else min(BLOCK, max(rows, 16)), *shape), dtype=np.float32))
