"""The one-launch centroid sparse decode on Hopper clusters (cluster_decode.cu): build, load, launch.

The kernel is plain CUDA C++ with no torch headers, built once per source by `nvcc` into a shared
library kept under the user's cache directory (seconds, not torch extension minutes) and called
through ctypes on torch's current stream, so it is captured into CUDA graphs like any kernel.
`available()` says whether it can run here (an sm_90 GPU and nvcc; RADIXGATE_CUDA_KERNELS=0 turns it
off). The engine does not call it: bench/cluster_decode.py measures it against the Triton launcher
(kernels/triton/centroids.centroid_sparse_decode), which follows the same rule
(kernels/centroid_reference.py) and was faster at every batch and context measured (docs/sparse.md).
"""
from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import shutil
import subprocess
from pathlib import Path

import torch

SOURCE = Path(__file__).with_name("cluster_decode.cu")
ARCH = "-gencode=arch=compute_90a,code=sm_90a"
SMEM_LIMIT = 227 * 1024          # an H100/H200 block's shared memory, opted in
# (head_dim, q heads a KV head, centroids a group, cluster size, dtype) built into the library
INSTANCES = {(128, 4, 8, 8, torch.bfloat16), (128, 4, 8, 16, torch.bfloat16), (128, 4, 8, 8, torch.float16),
             (128, 4, 8, 16, torch.float16), (64, 3, 8, 8, torch.bfloat16), (64, 3, 8, 8, torch.float16)}
log = logging.getLogger("radixgate.kernels.cuda")


class Params(ctypes.Structure):
    """cluster_decode.cu's Params, field for field."""
    _fields_ = [(name, ctypes.c_int64) for name in (
        "q", "k", "v", "cents", "stats", "table", "lens", "out",
        "s_qb", "s_qh", "s_kp", "s_ks", "s_kh", "s_vp", "s_vs", "s_vh", "s_cp", "s_ch", "s_sp", "s_sh", "s_tb",
        "s_ob", "s_oh", "width", "page_size", "group_pages", "budget", "sink", "recent", "chunk", "stop", "stamps")] + [
        ("scale", ctypes.c_double)]


def _nvcc() -> str | None:
    found = shutil.which("nvcc")
    if found:
        return found
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH") or "/usr/local/cuda"
    candidate = Path(home) / "bin" / "nvcc"
    return str(candidate) if candidate.exists() else None


def _cache_dir() -> Path:
    root = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return root / "radixgate" / "cuda"


@functools.lru_cache(maxsize=1)
def library() -> ctypes.CDLL | None:
    """The built library, or None (with the reason logged) where it cannot be built or loaded."""
    if os.environ.get("RADIXGATE_CUDA_KERNELS", "1") == "0":
        return None
    nvcc = _nvcc()
    if nvcc is None:
        log.info("cluster decode: no nvcc, the Triton path serves")
        return None
    digest = hashlib.sha1(SOURCE.read_bytes() + ARCH.encode()).hexdigest()[:12]
    target = _cache_dir() / f"cluster_decode_{digest}.so"
    if not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        partial = target.with_suffix(f".{os.getpid()}.tmp")
        cmd = [nvcc, "-O3", "-std=c++17", ARCH, "--shared", "-Xcompiler", "-fPIC", "-lineinfo", "-o", str(partial),
               str(SOURCE)]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            log.warning("cluster decode: nvcc failed, the Triton path serves:\n%s", done.stderr[-2000:])
            return None
        os.replace(partial, target)     # atomic: a concurrent builder never loads half a file
    lib = ctypes.CDLL(str(target))
    lib.rg_cluster_decode.restype = ctypes.c_int
    lib.rg_cluster_decode.argtypes = [ctypes.POINTER(Params)] + [ctypes.c_int] * 7 + [
        ctypes.c_void_p, ctypes.POINTER(ctypes.c_int), ctypes.c_int]
    lib.rg_error_string.restype = ctypes.c_char_p
    lib.rg_error_string.argtypes = [ctypes.c_int]
    return lib


def available(device: torch.device) -> bool:
    """Whether the cluster kernel can serve on this device (Hopper and a built library)."""
    return (device.type == "cuda" and torch.cuda.get_device_capability(device) == (9, 0)
            and library() is not None)


def supports(q: torch.Tensor, k_cache: torch.Tensor, cents: torch.Tensor, cluster: int) -> bool:
    """Whether the library holds an instance for these shapes and dtypes (8-bit centroids, K/V rows
    contiguous in q's dtype)."""
    head_dim, group = q.shape[2], q.shape[1] // k_cache.shape[2]
    return (cents.dtype == torch.float8_e4m3fn and k_cache.dtype == q.dtype
            and (head_dim, group, cents.shape[2], cluster, q.dtype) in INSTANCES)


def _params(q, k_cache, v_cache, cents, stats, page_tables, seq_lens, out, group_pages, force, scale, chunk,
            stop=0, stamps=0):
    return Params(
        q.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr(), cents.data_ptr(), stats.data_ptr(),
        page_tables.data_ptr(), seq_lens.data_ptr(), out.data_ptr(),
        q.stride(0), q.stride(1), *k_cache.stride()[:3], *v_cache.stride()[:3], cents.stride(0), cents.stride(1),
        stats.stride(0), stats.stride(1), page_tables.stride(0), out.stride(0), out.stride(1),
        page_tables.shape[1], k_cache.shape[1], group_pages, *force, chunk, stop, stamps, scale)


@functools.lru_cache(maxsize=64)
def _chunk(shape: tuple, cluster: int) -> int:
    """The most groups a block's centroid buffer holds within SMEM_LIMIT (at most its slice)."""
    head_dim, group, clusters, dtype_code, width, page_size, group_pages, budget = shape
    lib = library()
    smem = ctypes.c_int(0)
    slice_groups = -(-(width // group_pages) // cluster)
    chunk = slice_groups
    while chunk >= 1:
        p = Params(width=width, page_size=page_size, group_pages=group_pages, budget=budget, chunk=chunk)
        lib.rg_cluster_decode(ctypes.byref(p), 1, 1, head_dim, group, clusters, cluster, dtype_code, None,
                              ctypes.byref(smem), 1)
        if smem.value <= SMEM_LIMIT:
            return chunk
        chunk -= 1
    raise ValueError(f"no centroid chunk fits {SMEM_LIMIT} bytes of shared memory for {shape}")


def cluster_sparse_decode(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, cents: torch.Tensor,
                          stats: torch.Tensor, page_tables: torch.Tensor, seq_lens: torch.Tensor, span: int,
                          force: tuple[int, int, int], scale: float, cluster: int = 8,
                          out: torch.Tensor | None = None, stop: int = 0,
                          stamps: torch.Tensor | None = None) -> torch.Tensor:
    """centroid_reference.centroid_select_pages (one stage) + attend_pages for every row, in one launch
    of a cluster of `cluster` blocks per (sequence, KV head). q [batch, q_heads, d]; caches [num_pages,
    page_size, kv_heads, d]; cents fp8 [num_pages, kv_heads, C, d], stats fp32 [num_pages, kv_heads,
    C, 2] at each complete group's last page; page_tables int32 [batch, width] (width whole groups);
    force (budget, sink, recent) in groups of span tokens -> out [batch, q_heads, d]."""
    batch, q_heads, head_dim = q.shape
    page_size, kv_heads = k_cache.shape[1:3]
    group_pages = span // page_size
    assert supports(q, k_cache, cents, cluster), "no instance for these shapes"
    assert q.stride(2) == 1 and k_cache.stride(3) == 1 and v_cache.stride(3) == 1 and k_cache.stride(2) == head_dim
    assert v_cache.stride(2) == head_dim and cents.stride(2) == head_dim and cents.stride(3) == 1
    assert stats.dtype == torch.float32 and stats.stride(2) == 2 and stats.stride(3) == 1
    assert page_tables.dtype == seq_lens.dtype == torch.int32 and page_tables.stride(1) == 1
    assert page_tables.shape[1] % 4 == 0 and page_tables.stride(0) % 4 == 0, "table rows in 16-byte copies"
    assert page_tables.shape[1] % group_pages == 0, "whole groups"
    budget = force[0]
    assert (budget * span) % cluster == 0 and (budget * span // cluster) & (budget * span // cluster - 1) == 0, \
        "a block's share of the kept keys is a power of two"
    out = torch.empty_like(q) if out is None else out
    assert out.stride(2) == 1 and out.dtype == q.dtype
    dtype_code = 0 if q.dtype == torch.bfloat16 else 1
    shape = (head_dim, q_heads // kv_heads, cents.shape[2], dtype_code, page_tables.shape[1], page_size, group_pages,
             budget)
    chunk = _chunk(shape, cluster)
    params = _params(q, k_cache, v_cache, cents, stats, page_tables, seq_lens, out, group_pages, force, scale, chunk,
                     stop, 0 if stamps is None else stamps.data_ptr())
    smem = ctypes.c_int(0)
    stream = torch.cuda.current_stream(q.device).cuda_stream
    err = library().rg_cluster_decode(ctypes.byref(params), batch, kv_heads, head_dim, q_heads // kv_heads,
                                      cents.shape[2], cluster, dtype_code, ctypes.c_void_p(stream),
                                      ctypes.byref(smem), 0)
    if err != 0:
        reason = "no instance" if err < 0 else library().rg_error_string(err).decode()
        raise RuntimeError(f"cluster decode launch failed: {reason} (shared memory {smem.value} bytes)")
    return out
