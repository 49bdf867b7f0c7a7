"""L3 of the KV cache: one file per page under <disk_cache_dir>/<layout digest>/, kept across restarts.

A page's KV depends on every token before it, so a page is named by a hash chained over its whole
prefix: hash(parent page's hash, its own tokens). The file holds that name, the parent's, the
page's tokens (enough to rebuild the radix tree at start-up), the layout key (backends/kv_store.py)
and a checksum of the bytes. A file whose header or bytes do not check out, or whose layout is not
ours, is skipped with a warning and never loaded. Any error writing (a full disk, a directory that
cannot be written) turns L3 off with a warning: serving goes on from L1 and L2.

Which pages stay is the radix tree's decision (gateway/engine/tiers.py, LRU); this file only
stores, reads and deletes, and counts the pages it holds against capacity_pages.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from backends.kv_store import KVLayout

log = logging.getLogger("radixgate.cache")

MAGIC = b"RGKVPAGE"
ROOT_HASH = bytes(16)           # the "parent" of a first page
HEADER_RESERVE_BYTES = 4096     # a file's size beyond its page bytes, counted against the disk bound


def page_hash(parent: bytes, tokens) -> bytes:
    return hashlib.blake2b(parent + np.asarray(tokens, dtype=np.int64).tobytes(), digest_size=16).digest()


def checksum(data) -> str:
    return hashlib.blake2b(data, digest_size=16).hexdigest()


@dataclass(frozen=True)
class PageFile:
    """What a file says about its page (its bytes are read only when the page is loaded)."""

    page_hash: bytes
    parent_hash: bytes
    tokens: tuple[int, ...]


class DiskStore:
    """Page files of one layout under one directory, at most capacity_pages of them."""

    def __init__(self, root: str | Path, layout: KVLayout, capacity_bytes: int):
        self.layout_key = layout.key()
        self.page_bytes = layout.page_bytes
        self.dir = Path(root) / layout.digest()
        self.capacity_pages = capacity_bytes // (layout.page_bytes + HEADER_RESERVE_BYTES)
        self.pages: set[bytes] = set()      # hashes of the files this store holds (and the tree knows)
        self.enabled = True
        self.writes = self.reads = self.skipped = 0
        if self.capacity_pages < 1:
            self._disable(f"disk_cache_gb holds no page of {layout.page_bytes} bytes")
            return
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
            probe = self.dir / ".probe"
            probe.write_bytes(b"ok")
            probe.unlink()
        except OSError as error:
            self._disable(f"cannot write to {self.dir}: {error}")

    def _disable(self, why: str) -> None:
        log.warning("KV disk tier (L3) off: %s; serving goes on without it", why)
        self.enabled = False
        self.pages.clear()

    def _path(self, page: bytes) -> Path:
        return self.dir / f"{page.hex()}.kv"

    # ---- start-up ------------------------------------------------------------------------
    def scan(self) -> list[PageFile]:
        """Every page file of this directory whose header checks out (the others are skipped with a
        warning); the caller adopts the ones it can place in the tree (adopt) and drops the rest."""
        if not self.enabled:
            return []
        found = []
        for path in sorted(self.dir.glob("*.kv")):
            try:
                with open(path, "rb") as handle:
                    header = self._read_header(handle, path)
                    size = os.fstat(handle.fileno()).st_size
            except OSError as error:
                log.warning("KV disk tier: cannot read %s (%s); skipped", path.name, error)
                continue
            if header is None:
                continue
            if size != header["_data_offset"] + header["data_bytes"]:
                self._skip(path, "truncated")
                continue
            found.append(PageFile(bytes.fromhex(header["hash"]), bytes.fromhex(header["parent"]),
                                  tuple(header["tokens"])))
        return found

    def adopt(self, page: bytes) -> None:
        self.pages.add(page)

    def _skip(self, path: Path, why: str) -> None:
        self.skipped += 1
        log.warning("KV disk tier: %s is %s; skipped, not loaded", path.name, why)

    def _read_header(self, handle, path: Path) -> dict | None:
        """The header of an open page file, or None (warned) when it is not a valid one of ours."""
        head = handle.read(len(MAGIC) + 4)
        if len(head) < len(MAGIC) + 4 or head[:len(MAGIC)] != MAGIC:
            self._skip(path, "not a page file")
            return None
        (length,) = struct.unpack("<I", head[len(MAGIC):])
        raw = handle.read(length + 16)
        if len(raw) != length + 16 or hashlib.blake2b(raw[:length], digest_size=16).digest() != raw[length:]:
            self._skip(path, "corrupt (header checksum)")
            return None
        try:
            header = json.loads(raw[:length])
        except ValueError:
            self._skip(path, "corrupt (header)")
            return None
        if header.get("layout") != self.layout_key:
            self._skip(path, "written for another model or layout")
            return None
        if path.name != f"{header['hash']}.kv" or header["data_bytes"] != self.page_bytes:
            self._skip(path, "inconsistent (name or size)")
            return None
        header["_data_offset"] = len(MAGIC) + 4 + length + 16
        return header

    # ---- pages ---------------------------------------------------------------------------
    def write(self, page: PageFile, data) -> bool:
        """Store one page's bytes; False when L3 is (now) off. Written to a temporary name and
        renamed, so a crash never leaves a half-written file under a page's name."""
        if not self.enabled:
            return False
        assert page.page_hash not in self.pages, page.page_hash.hex()
        assert len(data) == self.page_bytes, (len(data), self.page_bytes)
        header = json.dumps({"layout": self.layout_key, "hash": page.page_hash.hex(),
                             "parent": page.parent_hash.hex(), "tokens": list(page.tokens),
                             "data_bytes": len(data), "data_checksum": checksum(data)}).encode()
        path = self._path(page.page_hash)
        temporary = path.with_suffix(".tmp")
        try:
            with open(temporary, "wb") as handle:
                handle.write(MAGIC + struct.pack("<I", len(header)) + header
                             + hashlib.blake2b(header, digest_size=16).digest())
                handle.write(data)
            os.replace(temporary, path)
        except OSError as error:
            temporary.unlink(missing_ok=True)
            self._disable(f"writing {path.name} failed: {error}")
            return False
        self.pages.add(page.page_hash)
        self.writes += 1
        return True

    def read(self, page: bytes) -> bytes | None:
        """A page's bytes, or None (warned, file removed) when its file is gone or fails its checks."""
        assert page in self.pages, page.hex()
        path = self._path(page)
        try:
            with open(path, "rb") as handle:
                header = self._read_header(handle, path)
                data = handle.read() if header is not None else b""
        except OSError as error:
            log.warning("KV disk tier: cannot read %s (%s); skipped", path.name, error)
            header = None
        if header is not None and (len(data) != header["data_bytes"] or checksum(data) != header["data_checksum"]):
            self._skip(path, "corrupt (data checksum)")
            header = None
        if header is None:
            self.delete(page)
            return None
        self.reads += 1
        return data

    def delete(self, page: bytes) -> None:
        self.pages.discard(page)
        try:
            self._path(page).unlink(missing_ok=True)
        except OSError as error:
            log.warning("KV disk tier: cannot delete %s: %s", self._path(page).name, error)

    def clear(self) -> None:
        """Delete every page file of this layout, known or not (leftovers of a crash included)."""
        self.pages.clear()
        if not self.dir.is_dir():
            return
        for path in [*self.dir.glob("*.kv"), *self.dir.glob("*.tmp")]:
            try:
                path.unlink(missing_ok=True)
            except OSError as error:
                log.warning("KV disk tier: cannot delete %s: %s", path.name, error)
