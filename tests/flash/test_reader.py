"""Read planning (page alignment, merging) and cold reads in both I/O modes."""

from __future__ import annotations

import os
import threading

import numpy as np
import pytest

from edge_node.flash.reader import COLD_CACHE, O_DIRECT, ColdReader, Extent, plan_reads


def test_docstring_example():
    offsets = np.array([0, 4096, 12288])
    merged = plan_reads(offsets, 3072, page=4096, max_bytes=1 << 20, merge=True)
    assert merged == [Extent(0, 8192, 0, 2), Extent(12288, 4096, 2, 3)]
    unmerged = plan_reads(offsets, 3072, page=4096, max_bytes=1 << 20, merge=False)
    assert [(e.offset, e.length) for e in unmerged] == [(0, 4096), (4096, 4096), (12288, 4096)]
    gapped = plan_reads(offsets, 3072, page=4096, max_bytes=1 << 20, merge=True, gap=4096)
    assert gapped == [Extent(0, 16384, 0, 3)]


def test_pieces_sharing_a_page_merge_and_reads_respect_max_bytes():
    offsets = np.arange(0, 16 * 1024, 1024)  # 16 pieces of 1 KiB, four to a page
    extents = plan_reads(offsets, 1024, page=4096, max_bytes=8192, merge=True)
    assert [(e.offset, e.length, e.first, e.last) for e in extents] == [
        (0, 8192, 0, 8),
        (8192, 8192, 8, 16),
    ]
    # Unmerged, each piece pays for its whole page.
    unmerged = plan_reads(offsets, 1024, page=4096, max_bytes=8192, merge=False)
    assert len(unmerged) == 16 and all(e.length == 4096 for e in unmerged)


def test_unaligned_piece_covers_every_page_it_touches():
    [extent] = plan_reads(np.array([4000]), 200, page=4096, max_bytes=1 << 16, merge=True)
    assert (extent.offset, extent.length) == (0, 8192)
    with pytest.raises(ValueError, match="max_bytes"):
        plan_reads(np.array([4000]), 200, page=4096, max_bytes=4096, merge=True)


@pytest.mark.parametrize("direct", [None, False])
def test_reads_deliver_the_file_bytes(tmp_path, direct):
    data = np.random.default_rng(0).integers(0, 256, 64 * 4096, dtype=np.uint8)
    path = tmp_path / "blob.bin"
    path.write_bytes(data.tobytes())
    reader = ColdReader(path, threads=3, buffer_bytes=4 * 4096, direct=direct)
    # O_DIRECT wherever the filesystem takes it (ext4 here; tmpfs would fall back).
    assert reader.mode == COLD_CACHE if direct is False else reader.mode in (O_DIRECT, COLD_CACHE)
    offsets = np.array([5, 9000, 9001, 70000, 200000])
    got = {}

    def deliver(extent, view):
        for i in range(extent.first, extent.last):
            start = offsets[i] - extent.offset
            got[i] = bytes(view[start : start + 100])

    extents = plan_reads(offsets, 100, page=4096, max_bytes=4 * 4096, merge=True)
    reader.read([(e, deliver) for e in extents])
    reader.close()
    assert got == {i: data[o : o + 100].tobytes() for i, o in enumerate(offsets)}


def test_short_read_names_the_file(tmp_path):
    path = tmp_path / "short.bin"
    path.write_bytes(os.urandom(4096))
    reader = ColdReader(path, threads=1, buffer_bytes=8192, direct=False)
    with pytest.raises(OSError, match="short.bin: short read"):
        reader.read([(Extent(0, 8192, 0, 1), lambda extent, view: None)])
    reader.close()


def test_submit_returns_while_reads_are_in_flight_and_wait_delivers(tmp_path):
    """The store multiplies resident neurons between `submit` and `wait`: submit must not
    block on delivery, and wait must return only once every piece is in place."""
    path = tmp_path / "blob.bin"
    path.write_bytes(os.urandom(8 * 4096))
    reader = ColdReader(path, threads=2, buffer_bytes=4096, direct=False)
    release, delivered = threading.Event(), []

    def deliver(extent, view):
        release.wait(timeout=10)
        delivered.append(extent.first)

    pending = reader.submit([(Extent(i * 4096, 4096, i, i + 1), deliver) for i in range(4)])
    assert delivered == []  # both lanes are held in deliver: submit did not wait for them
    release.set()
    assert pending.wait() > 0 and sorted(delivered) == [0, 1, 2, 3]
    beyond = Extent(8 * 4096, 4096, 1, 2)  # past the end of the file
    failing = reader.submit([(Extent(0, 4096, 0, 1), deliver), (beyond, deliver)])
    with pytest.raises(OSError, match="short read at 32768"):
        failing.wait()
    reader.close()


def test_submits_in_flight_together_never_share_a_buffer(tmp_path):
    """Two submits in flight at once, which `submit`'s contract allows. A lane must own
    its buffer until it is done; sharing one hands a deliver another read's bytes (this
    failed so while buffers went by lane number)."""
    data = np.random.default_rng(1).integers(0, 256, 64 * 4096, dtype=np.uint8)
    path = tmp_path / "blob.bin"
    path.write_bytes(data.tobytes())
    reader = ColdReader(path, threads=4, buffer_bytes=4096, direct=False)
    got, lock = {}, threading.Lock()

    def deliver(extent, view, pause=0.0):
        seen = bytes(view)  # what the buffer holds now...
        threading.Event().wait(pause)  # ...and after the other submit's lanes ran
        with lock:
            got[extent.offset] = (seen, bytes(view))

    def slow(extent, view):
        deliver(extent, view, pause=0.2)

    pages = [Extent(i * 4096, 4096, 0, 1) for i in range(64)]
    # Two slow lanes, then four more lanes while two workers are still free.
    first = reader.submit([(e, slow) for e in pages[:2]])
    second = reader.submit([(e, deliver) for e in pages[2:]])
    first.wait(), second.wait()
    reader.close()
    expected = {e.offset: data[e.offset : e.offset + 4096].tobytes() for e in pages}
    assert {offset: seen for offset, (seen, _) in got.items()} == expected
    assert {offset: later for offset, (_, later) in got.items()} == expected
