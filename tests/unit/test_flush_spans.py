"""How a worker groups the page spans of a batch's chunks for the msync at its end."""

from __future__ import annotations

import itertools
import random

import pytest

from memmap_pool._worker import _merge_spans


@pytest.mark.parametrize(
    ("spans", "merged"),
    [
        ([], []),
        ([(0, 4096)], [(0, 4096)]),
        ([(0, 4096), (4096, 4096)], [(0, 8192)]),  # touching
        ([(0, 8192), (4096, 8192)], [(0, 12288)]),  # overlapping (chunks sharing a page)
        ([(8192, 4096), (0, 4096)], [(0, 4096), (8192, 4096)]),  # a gap, out of order
        ([(0, 16384), (4096, 4096)], [(0, 16384)]),  # one inside another
    ],
)
def test_spans_are_joined_where_they_touch_or_overlap(spans, merged):
    assert _merge_spans(spans) == merged


def test_merged_spans_cover_exactly_the_pages_of_the_chunks():
    """Random spans: the merged ones cover the same bytes, in order, without touching."""
    rng = random.Random(7)
    for _ in range(200):
        spans = [(rng.randrange(0, 64) * 4096, rng.randrange(1, 8) * 4096) for _ in range(12)]
        merged = _merge_spans(spans)
        covered = {b for s, n in spans for b in range(s // 4096, (s + n) // 4096)}
        got = {b for s, n in merged for b in range(s // 4096, (s + n) // 4096)}
        assert got == covered
        assert all(a[0] + a[1] < b[0] for a, b in itertools.pairwise(merged))
