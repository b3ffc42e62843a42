"""Rows held in blocks: every sequence of writes and removals reads back as a plain dict of
rows would, across block boundaries, and growing never moves what is held."""

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from voiceprint.engine import rows as rows_module
from voiceprint.engine.index import CentroidIndex
from voiceprint.engine.rows import Rows

SMALL_BLOCK = 4  # a few rows per block, so short sequences cross many boundaries

changes = st.lists(
    st.one_of(
        st.tuples(st.just("put"), st.lists(st.integers(0, 30), min_size=1, max_size=9)),
        st.tuples(st.just("remove"), st.lists(st.integers(0, 30), min_size=1, max_size=5)),
    ),
    max_size=25,
)


@pytest.fixture
def small_blocks(monkeypatch):
    monkeypatch.setattr(rows_module, "BLOCK", SMALL_BLOCK)


@settings(max_examples=150, deadline=None)
@given(changes)
def test_rows_read_back_as_a_dict_would(changes):
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(rows_module, "BLOCK", SMALL_BLOCK)
        table, expected, step = Rows(vec=(3,), score=()), {}, 0
        for kind, ids in changes:
            step += 1
            if kind == "put":
                vectors = np.array([[i, step, -i] for i in ids], dtype=np.float32)
                written = table.put(ids, [f"s{i}" for i in ids], vec=vectors, score=np.full(len(ids), step))
                assert [table.ids[r] for r in written] == ids
                for i, v in zip(ids, vectors):
                    expected[i] = (v, step)
            else:
                table.remove(ids)
                for i in ids:
                    expected.pop(i, None)
            assert sorted(table.ids) == sorted(expected) and len(table) == len(expected)
            assert table.names == [f"s{i}" for i in table.ids]
            assert {i: r for r, i in enumerate(table.ids)} == table.at
            vec, score = table.array("vec"), table.array("score")
            assert vec.shape == (len(expected), 3) and score.shape == (len(expected),)
            for r, i in enumerate(table.ids):
                np.testing.assert_array_equal(vec[r], expected[i][0])
                assert score[r] == expected[i][1]
            if table.ids:
                order = np.random.default_rng(step).permutation(len(table))
                np.testing.assert_array_equal(table.take("vec", order), vec[order])
            assert sum(len(b) for b in table.blocks("vec")) == len(table)


def test_growth_past_a_block_adds_blocks_and_leaves_the_held_ones_in_place(small_blocks):
    table = Rows(vec=(2,))
    table.put(range(3), ["a", "b", "c"], vec=np.ones((3, 2)))
    first = table._blocks["vec"][0]
    assert len(first) == SMALL_BLOCK  # a first block is never larger than BLOCK
    table.put(range(3, 11), list("defghijk"), vec=np.full((8, 2), 2.0))
    assert table._blocks["vec"][0] is first  # the full block was not copied
    assert [len(b) for b in table.blocks("vec")] == [4, 4, 3]
    assert table.nbytes == 3 * SMALL_BLOCK * 2 * 4
    table.put(range(11, 111), [str(i) for i in range(11, 111)], vec=np.arange(200.0).reshape(100, 2))
    order = np.random.default_rng(0).permutation(len(table))
    for rows in (order, order[:40]):  # grouped by block, and a row at a time
        np.testing.assert_array_equal(table.take("vec", rows), table.array("vec")[rows])


def test_a_first_block_doubles_from_sixteen_rows_before_blocks_are_added():
    table = Rows(vec=(2,))
    table.put([1], ["a"], vec=np.ones((1, 2)))
    assert table.nbytes == 16 * 2 * 4
    table.put(range(2, 40), [str(i) for i in range(2, 40)], vec=np.ones((38, 2)))
    assert table.nbytes == 39 * 2 * 4  # doubled, or enough for the write when that is more
    table.put([40], ["x"], vec=np.ones((1, 2)))
    assert table.nbytes == 78 * 2 * 4


def test_an_index_over_many_blocks_searches_as_over_one(small_blocks):
    rng = np.random.default_rng(3)
    vectors = rng.standard_normal((23, 8))
    names = [f"s{i}" for i in range(23)]
    blocked = CentroidIndex(names[:10], vectors[:10])
    blocked.put(range(10, 23), names[10:], vectors[10:])
    blocked.remove([4, 17])
    approximate = CentroidIndex(names, vectors, approximate=True)  # FAISS fed block by block
    approximate.remove([4, 17])
    assert approximate.kind == "approximate"
    keep = [i for i in range(23) if i not in (4, 17)]
    unit = vectors[keep] / np.linalg.norm(vectors[keep], axis=1, keepdims=True)
    for probe in rng.standard_normal((10, 8)):
        cosines = unit @ (probe / np.linalg.norm(probe))
        want = [names[keep[i]] for i in np.argsort(-cosines)[:5]]
        got = blocked.search(probe, k=5)
        assert [h.speaker for h in got] == want
        np.testing.assert_allclose([h.score for h in got], np.sort(cosines)[::-1][:5], rtol=1e-5)
        assert [h.speaker for h in approximate.search(probe, k=5)] == want  # one list: an exhaustive scan
        assert sorted(blocked.scores(probe)[0]) == pytest.approx(sorted(cosines), rel=1e-5)
