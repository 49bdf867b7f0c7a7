"""L3 files (gateway/engine/disk_store.py) that must not be trusted: corrupt bytes, a corrupt or
truncated header, another model's file, a directory that cannot be written, a disk that fills up.
Each is skipped or turns L3 off with a warning; the tree stays exact and serving goes on."""
from __future__ import annotations

import dataclasses
import logging
import resource
import signal

from gateway.engine.disk_store import DiskStore
from tests.test_kv_tiers import check_pages, make_tiered, put, seq


def filled_dir(tmp_path, count=4):
    """A directory of page files written by a first cache (write_through: every page reaches L3)."""
    backend, cache = make_tiered(page_size=2, l1=8, l2=16, disk_dir=tmp_path)
    seqs = [seq(i, 8) for i in range(count)]
    for s in seqs:
        put(backend, cache, s)
    files = sorted(cache.disk.dir.glob("*.kv"))
    assert len(files) == 4 * count
    return seqs, files, cache.disk.dir


def test_corrupt_data_is_skipped_when_loaded_and_recomputed(tmp_path, caplog):
    seqs, files, folder = filled_dir(tmp_path)
    backend, cache = make_tiered(page_size=2, l1=8, l2=16, disk_dir=tmp_path)
    assert cache.tier_stats()["l3_pages"] == 16
    target = cache.root.children[tuple(seqs[0][:2])]
    bad = folder / f"{target.hashes[0].hex()}.kv"
    raw = bytearray(bad.read_bytes())
    raw[-3] ^= 0xFF                                  # one bit pattern of the KV bytes changed
    bad.write_bytes(bytes(raw))
    with caplog.at_level(logging.WARNING, logger="radixgate.cache"):
        m = cache.match_prefix(seqs[0])
    assert m.num_tokens == 0                         # never loaded: the prompt is computed again
    assert "corrupt (data checksum)" in caplog.text
    assert not bad.exists()
    cache.check_invariants()
    assert put(backend, cache, seqs[0]) is not None  # and cached again, correctly
    m = cache.match_prefix(seqs[0])
    assert m.num_tokens == 8
    check_pages(backend, seqs[0], m.pages)
    for s in seqs[1:]:                               # the other files still load
        check_pages(backend, s, cache.match_prefix(s).pages)
    cache.check_invariants()


def test_corrupt_or_truncated_header_is_skipped_at_start_up(tmp_path, caplog):
    seqs, files, folder = filled_dir(tmp_path)
    raw = bytearray(files[0].read_bytes())
    raw[20] ^= 0x01                                  # inside the header
    files[0].write_bytes(bytes(raw))
    files[1].write_bytes(files[1].read_bytes()[:-10])
    with caplog.at_level(logging.WARNING, logger="radixgate.cache"):
        backend, cache = make_tiered(page_size=2, l1=8, l2=16, disk_dir=tmp_path)
    assert "corrupt (header checksum)" in caplog.text and "truncated" in caplog.text
    cache.check_invariants()
    assert cache.tier_stats()["l3_pages"] < 16       # the two files and what hung below them
    for s in seqs:
        m = cache.match_prefix(s)
        check_pages(backend, s, m.pages)
    cache.check_invariants()


def test_a_file_of_another_model_is_never_loaded(tmp_path, caplog):
    seqs, files, folder = filled_dir(tmp_path)
    backend, cache = make_tiered(page_size=2, l1=8, l2=16)
    foreign = dataclasses.replace(cache.kv_store.layout, model="another-model")
    other = DiskStore(tmp_path, foreign, 1 << 20)
    assert other.dir != folder                       # keyed by model + layout: its own folder
    for f in files:                                  # and even when its files are copied in
        (other.dir / f.name).write_bytes(f.read_bytes())
    with caplog.at_level(logging.WARNING, logger="radixgate.cache"):
        found = other.scan()
    assert found == [] and other.skipped == len(files)
    assert "written for another model or layout" in caplog.text


def test_unwritable_directory_turns_l3_off_and_serving_goes_on(tmp_path, caplog):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    with caplog.at_level(logging.WARNING, logger="radixgate.cache"):
        backend, cache = make_tiered(page_size=2, l1=8, l2=8, disk_dir=blocker / "cache")
    assert not cache.l3_on and "L3) off" in caplog.text
    for i in range(6):
        put(backend, cache, seq(i, 8))
        cache.check_invariants()
    m = cache.match_prefix(seq(5, 8))
    assert m.num_tokens == 8
    check_pages(backend, seq(5, 8), m.pages)


def test_a_full_disk_turns_l3_off_mid_run_and_the_tree_stays_exact(tmp_path, caplog):
    """RLIMIT_FSIZE makes the kernel refuse writes past a size (EFBIG), as a full disk does (ENOSPC)."""
    backend, cache = make_tiered(page_size=2, l1=8, l2=8, disk_dir=tmp_path, policy="write_back")
    for i in range(3):
        put(backend, cache, seq(i, 8))
    assert cache.l3_on
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    previous = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    try:
        resource.setrlimit(resource.RLIMIT_FSIZE, (16, hard))
        with caplog.at_level(logging.WARNING, logger="radixgate.cache"):
            for i in range(3, 8):
                put(backend, cache, seq(i, 8))
                cache.check_invariants()
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, previous)
    assert not cache.l3_on and "L3) off" in caplog.text
    assert cache.tier_stats()["l3_pages"] == 0
    m = cache.match_prefix(seq(7, 8))
    assert m.num_tokens == 8
    check_pages(backend, seq(7, 8), m.pages)
    cache.check_invariants()
