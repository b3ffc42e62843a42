"""Rows keyed by speaker id, held in growable numpy columns, written and removed in place.

The in-memory tables of the 1:N index (:class:`~voiceprint.engine.gallery.Gallery`, the
search rows of :class:`~voiceprint.engine.index.CentroidIndex`) change a few rows at a
time while holding up to a million: a write lands in its row, a removal moves the last row
into the gap, and the columns grow by a quarter (doubling would cost another GiB at a
million rows; a first fill allocates once). Not thread-safe: the owner locks.

>>> import numpy as np
>>> rows = Rows(mean=(2,))
>>> rows.put([7, 9], ["bo", "al"], mean=np.eye(2))
[0, 1]
>>> rows.remove([7])
>>> rows.ids, rows.names, rows.column("mean").tolist()
([9], ['al'], [[0.0, 1.0]])
>>> _ = rows.put([4, 5], ["cy", "di"], mean=np.ones((2, 2))); rows.nbytes  # room for 16 rows now, not 3
128
"""

from __future__ import annotations

import numpy as np


class Rows:
    """Speaker ids, names and one float32 array per column (``shapes``: each row's shape)."""

    def __init__(self, **shapes: tuple[int, ...]) -> None:
        self.ids: list[int] = []
        self.names: list[str] = []
        self.at: dict[int, int] = {}  # speaker id -> row
        self._columns = {name: np.zeros((0, *shape), dtype=np.float32) for name, shape in shapes.items()}

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def nbytes(self) -> int:
        """Memory of the columns (allocated rows, not only the used ones)."""
        return sum(c.nbytes for c in self._columns.values())

    def column(self, name: str) -> np.ndarray:
        """The used rows of a column: a view, valid until the next change."""
        return self._columns[name][: len(self.ids)]

    def reshape(self, name: str, shape: tuple[int, ...]) -> None:
        """Give an empty table's column its row shape (a dimension learnt from the data)."""
        assert not self.ids, "only an empty table changes shape"
        self._columns[name] = np.zeros((0, *shape), dtype=np.float32)

    def put(self, ids, names, **values) -> list[int]:
        """Write rows for ``ids`` (new ids are appended); the rows written, in order."""
        ids = [int(i) for i in ids]
        needed = len(self.ids) + len(set(ids) - self.at.keys())
        if needed > self._capacity:
            # A first fill allocates exactly; later growth is by a quarter at least, or each
            # new speaker would copy every column (2 GiB at a million speakers).
            self.reserve(needed if not self.ids else max(needed, self._capacity + self._capacity // 4, 16))
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
            if len(rows):
                self._columns[name][rows] = column
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
                for column in self._columns.values():
                    column[row] = column[last]
                self.at[moved] = row
            self.ids.pop()
            self.names.pop()

    @property
    def _capacity(self) -> int:
        return len(next(iter(self._columns.values()))) if self._columns else 0

    def reserve(self, rows: int) -> None:
        if rows > self._capacity:
            for name, column in self._columns.items():
                grown = np.zeros((rows, *column.shape[1:]), dtype=np.float32)
                grown[: len(self.ids)] = column[: len(self.ids)]
                self._columns[name] = grown
