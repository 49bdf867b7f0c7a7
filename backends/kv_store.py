"""The hierarchical KV cache's part of the backend contract.

A backend that keeps a host tier owns a KVStore: page copies between its device pool (L1) and a
host pool (L2) it allocates, and the bytes of one host page for the engine's disk tier (L3). The
engine decides what moves where (gateway/engine/tiers.py); the store only copies. A page moves with
everything that belongs to it: K, V and, with sparse attention, its key summaries.
"""
from __future__ import annotations

import enum
import hashlib
import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Protocol


class Tier(enum.Enum):
    DEVICE = "device"     # L1: the KV pool the model reads
    HOST = "host"         # L2: the store's host pages (pinned on CUDA)


# The revision of the arithmetic that produces K/V (matmul kernels, prefill attention): bumped by
# any change that alters K/V bits for the same weights, so L3 files of older kernels are foreign.
KV_ARITHMETIC = 2


@dataclass(frozen=True)
class KVLayout:
    """What a page's bytes mean. L3 files carry it and are loaded only under an equal layout: the
    same weights served the same way produce bit-equal K/V, anything else must not be mixed in."""

    model: str                  # model_fingerprint() of the weights
    weights: str                # the serving mode (int4, bfloat16, ...): it changes the K/V values
    kv_dtype: str
    device: str                 # cpu | cuda | mlx: kernels differ in their last bits
    attention: str              # the attention backend (it computes the layers' inputs)
    page_size: int
    num_layers: int
    kv_heads: int
    head_dim: int
    summary_tokens: int | None  # None: no key summaries stored
    page_bytes: int
    arithmetic: int = KV_ARITHMETIC
    centroids: str | None = None    # "CxN": the centroid selector's summaries (C per N pages); None: none

    def key(self) -> str:
        fields = asdict(self)
        if fields["centroids"] is None:     # so that the layouts of pages without them keep their key
            del fields["centroids"]
        return json.dumps(fields, sort_keys=True)

    def digest(self) -> str:
        return hashlib.blake2b(self.key().encode(), digest_size=8).hexdigest()


class PageCopy(Protocol):
    """A queued copy between tiers (immediate on the CPU, on a side stream on CUDA)."""

    def done(self) -> bool: ...

    def wait(self) -> None: ...


class KVStore(Protocol):
    layout: KVLayout
    num_host_pages: int

    def copy_pages(self, src: Tier, dst: Tier, src_pages: Sequence[int], dst_pages: Sequence[int]) -> PageCopy:
        """Copy whole pages src_pages[i] -> dst_pages[i] (K, V and summaries). Copies are ordered
        among themselves and after the device work queued before them."""
        ...

    def read_host_page(self, page: int) -> memoryview:
        """One host page's bytes, once every queued copy has landed (valid until the next copy)."""
        ...

    def write_host_page(self, page: int, data: bytes) -> None:
        """Fill one host page from bytes read_host_page gave (e.g. from an L3 file)."""
        ...


class CopyDone:
    """A copy that has already happened (CPU backends)."""

    def done(self) -> bool:
        return True

    def wait(self) -> None:
        pass


COPY_DONE = CopyDone()


def runs(pages: Sequence[int]) -> list[tuple[int, int, int]]:
    """(index in pages, first page, count) of each run of consecutive page ids: one bulk copy each."""
    out: list[tuple[int, int, int]] = []
    for i, page in enumerate(pages):
        if out and out[-1][1] + out[-1][2] == page:
            start, first, count = out[-1]
            out[-1] = (start, first, count + 1)
        else:
            out.append((i, page, 1))
    return out


def model_fingerprint(kind: str, path: str) -> str:
    """A cheap, stable identity of a model's weights: file names and sizes plus a hash of the first
    and last MiB of each weight file (hashing whole multi-GB files would slow every start-up)."""
    root = Path(path)
    if not root.exists():                 # e.g. random weights named by their shapes
        return f"{kind}:{path}"
    files = [root] if root.is_file() else sorted([root / "config.json", *root.glob("*.safetensors")])
    digest = hashlib.blake2b(kind.encode(), digest_size=16)
    for file in files:
        size = file.stat().st_size
        digest.update(f"{file.name}:{size}".encode())
        with open(file, "rb") as handle:
            digest.update(handle.read(1 << 20))
            if size > 2 << 20:
                handle.seek(size - (1 << 20))
                digest.update(handle.read(1 << 20))
    return digest.hexdigest()


def host_tier_layout(settings, page_bytes: int, weights: str, attention: str, **cache_shape) -> tuple[int, KVLayout]:
    """What every backend's create_kv_store computes the same way: how many pages of page_bytes the
    host tier holds (settings.host_cache_bytes, which must hold one at least) and the layout key of
    the backend's pages (cache_shape: kv_dtype, device, page_size, num_layers, kv_heads, head_dim,
    summary_tokens and, with centroid summaries, centroids)."""
    num_host_pages = settings.host_cache_bytes // page_bytes
    if num_host_pages < 1:
        raise ValueError(f"host cache of {settings.host_cache_bytes} bytes holds no KV page ({page_bytes} bytes each)")
    layout = KVLayout(model=model_fingerprint(settings.source_kind, settings.source_path), weights=weights,
                      attention=attention, page_bytes=page_bytes, **cache_shape)
    return num_host_pages, layout
