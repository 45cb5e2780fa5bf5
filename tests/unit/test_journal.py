"""The resume journal: what is marked and synced is what a later load reads, a torn tail
reads as not done, a journal another job replaced is left alone, and a journal of another
plan is refused with the keys that differ."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from memmap_pool._chunks import PAGE_SIZE, plan_chunks
from memmap_pool._resume import Journal, journal_path
from memmap_pool.errors import JournalMismatchError

SETTINGS = settings(max_examples=25, deadline=None, database=None)


def fingerprint(count: int) -> dict:
    return plan_chunks((count,), np.dtype(np.float32), "C", 1).fingerprint()


@st.composite
def marked_journals(draw) -> tuple[int, list[list[int]]]:
    """A chunk count and rounds of chunk indices to mark, one sync after each round."""
    count = draw(st.integers(1, 3 * PAGE_SIZE))
    index = st.integers(0, count - 1)
    rounds = draw(st.lists(st.lists(index, max_size=40), max_size=4))
    return count, rounds


def done_set(journal: Journal) -> set[int]:
    return set(np.flatnonzero(journal.done).tolist())


@SETTINGS
@given(marked_journals())
def test_chunks_marked_and_synced_are_the_ones_a_load_finds_done(case):
    """create, mark random subsets with a sync after each, load: the same done set."""
    count, rounds = case
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "out.npy.journal")
        journal = Journal.create(path, fingerprint(count))
        for indices in rounds:
            journal.mark(indices)
            journal.sync()
        journal.close()
        loaded = Journal.load(path)
        expected = {i for indices in rounds for i in indices}
        assert done_set(loaded) == expected
        assert loaded.done_count == len(expected)
        assert loaded.fingerprint == fingerprint(count)


@SETTINGS
@given(marked_journals())
def test_chunks_marked_but_not_synced_are_not_on_disk(case):
    """Marks after the last sync are not in the file."""
    count, rounds = case
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "out.npy.journal")
        journal = Journal.create(path, fingerprint(count))
        synced: set[int] = set()
        for k, indices in enumerate(rounds):
            journal.mark(indices)
            if k < len(rounds) - 1:
                journal.sync()
                synced |= set(indices)
        journal.close()
        assert done_set(Journal.load(path)) == synced


@SETTINGS
@given(marked_journals(), st.data())
def test_a_torn_tail_reads_as_not_done(case, data):
    """A journal cut short after k flags reads its first k flags and no more."""
    count, rounds = case
    kept = data.draw(st.integers(0, count), label="flags kept")
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "out.npy.journal")
        journal = Journal.create(path, fingerprint(count))
        for indices in rounds:
            journal.mark(indices)
        journal.sync()
        journal.close()
        os.truncate(path, PAGE_SIZE + kept)
        loaded = Journal.load(path)
        assert len(loaded.done) == count
        expected = {i for indices in rounds for i in indices if i < kept}
        assert done_set(loaded) == expected


def test_a_new_journal_has_every_flag_written_out(tmp_path):
    """create writes one zero byte per chunk after the header page: no hole to fill later."""
    path = tmp_path / "out.npy.journal"
    Journal.create(str(path), fingerprint(100))
    data = path.read_bytes()
    assert len(data) == PAGE_SIZE + 100
    assert data[PAGE_SIZE:] == bytes(100)


def _replace_with_another_job(path: Path) -> bytes:
    """Another job given the same output writes its own journal over ``path``."""
    other = Journal.create(str(path), fingerprint(10))
    other.close()
    return path.read_bytes()


def test_a_journal_replaced_before_its_first_sync_is_not_written(tmp_path, caplog):
    """sync() on a journal another file was renamed over leaves that file as it is."""
    path = tmp_path / "out.npy.journal"
    journal = Journal.create(str(path), fingerprint(10))
    theirs = _replace_with_another_job(path)
    journal.mark([1, 2, 3])
    journal.sync()
    assert path.read_bytes() == theirs
    assert "replaced" in caplog.text
    journal.mark([4])
    journal.sync()
    assert path.read_bytes() == theirs


def test_a_journal_replaced_after_a_sync_is_not_written(tmp_path):
    """A journal replaced while this one holds it open: later syncs leave the new file alone."""
    path = tmp_path / "out.npy.journal"
    journal = Journal.create(str(path), fingerprint(10))
    journal.mark([0])
    journal.sync()
    theirs = _replace_with_another_job(path)
    journal.mark([5, 6])
    journal.sync()
    journal.close()
    assert path.read_bytes() == theirs


@pytest.mark.parametrize("synced", [False, True])
def test_removing_a_replaced_journal_leaves_the_other_jobs_file(tmp_path, synced):
    """remove() does not unlink a journal that another job renamed over this one."""
    path = tmp_path / "out.npy.journal"
    journal = Journal.create(str(path), fingerprint(10))
    if synced:
        journal.mark([0])
        journal.sync()
    theirs = _replace_with_another_job(path)
    journal.remove()
    assert path.read_bytes() == theirs


def test_removing_its_own_journal_unlinks_it(tmp_path):
    """remove() unlinks the journal this object created, and again is a no-op."""
    path = tmp_path / "out.npy.journal"
    journal = Journal.create(str(path), fingerprint(10))
    journal.mark([1])
    journal.sync()
    journal.remove()
    assert not path.exists()
    journal.remove()


def test_a_removed_journal_is_not_created_again_by_sync(tmp_path):
    """sync() after the journal file was removed does not bring it back."""
    path = tmp_path / "out.npy.journal"
    journal = Journal.create(str(path), fingerprint(10))
    path.unlink()
    journal.mark([1])
    journal.sync()
    assert not path.exists()


def test_a_loaded_journal_keeps_writing_to_its_own_file(tmp_path):
    """A journal loaded for a resume marks and syncs into the same file."""
    path = tmp_path / "out.npy.journal"
    first = Journal.create(str(path), fingerprint(10))
    first.mark([0, 1])
    first.sync()
    first.close()
    resumed = Journal.load(str(path))
    resumed.mark([9])
    resumed.sync()
    resumed.close()
    assert done_set(Journal.load(str(path))) == {0, 1, 9}


# -- plans that differ ---------------------------------------------------------------------------


@st.composite
def fingerprints(draw) -> dict:
    ndim = draw(st.integers(1, 3))
    shape = tuple(draw(st.integers(1, 40)) for _ in range(ndim))
    itemsize = draw(st.sampled_from((1, 2, 4, 8)))
    order = draw(st.sampled_from("CF"))
    block = tuple(draw(st.integers(1, n)) for n in shape)
    return plan_chunks(shape, np.dtype(f"V{itemsize}"), order, block).fingerprint()


@SETTINGS
@given(fingerprints(), fingerprints())
def test_check_matches_names_every_key_that_differs_and_only_those(recorded, asked):
    """JournalMismatchError lists each differing key with both values; same plans pass."""
    with tempfile.TemporaryDirectory() as tmp:
        journal = Journal.create(os.path.join(tmp, "j"), recorded)
        journal.check_matches(recorded)
        differing = {k for k in recorded if recorded[k] != asked[k]}
        if not differing:
            journal.check_matches(asked)
            return
        with pytest.raises(JournalMismatchError) as info:
            journal.check_matches(asked)
        msg = str(info.value)
        for key in recorded:
            fragment = f"{key} {recorded[key]!r} -> {asked[key]!r}"
            assert (fragment in msg) == (key in differing)


def test_check_matches_names_a_key_only_one_side_has(tmp_path):
    """A key missing from the recorded plan is named with None on that side."""
    journal = Journal.create(str(tmp_path / "j"), {"count": 3})
    with pytest.raises(JournalMismatchError, match=r"extra None -> 1"):
        journal.check_matches({"count": 3, "extra": 1})


@pytest.mark.parametrize(
    "content",
    [b"not json at all", b'{"magic": "something else", "version": 1}', b"\xff\xfe"],
)
def test_a_file_that_is_not_a_journal_is_refused(tmp_path, content):
    """load() of a file without the journal's header raises JournalMismatchError."""
    path = tmp_path / "out.npy.journal"
    path.write_bytes(content.ljust(PAGE_SIZE, b" "))
    with pytest.raises(JournalMismatchError):
        Journal.load(str(path))


def test_a_journal_of_another_version_is_refused(tmp_path):
    """load() of a journal whose version is not this one's raises JournalMismatchError."""
    path = tmp_path / "out.npy.journal"
    Journal.create(str(path), fingerprint(4))
    data = path.read_bytes().replace(b'"version": 1', b'"version": 9')
    path.write_bytes(data)
    with pytest.raises(JournalMismatchError, match="version"):
        Journal.load(str(path))


def test_the_journal_lives_beside_its_output():
    """The journal of out.npy is out.npy.journal."""
    assert journal_path("/data/out.npy") == "/data/out.npy.journal"
