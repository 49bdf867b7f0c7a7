"""NVIDIA attention kernels (Triton) over the paged KV layout of kernels/reference.py.

Importing this package needs triton; the launchers run on CUDA tensors, or on CPU tensors under
TRITON_INTERPRET=1 (how CI tests them). See docs/kernels.md.
"""
from kernels.triton.decode import paged_decode, split_k_decode
from kernels.triton.extend import extend_attention
from kernels.triton.layer_ops import add_rms_norm, rms_norm, rotary_store, silu_mul
from kernels.triton.selection import select_pages
from kernels.triton.sparse import quest_scores, sparse_decode
from kernels.triton.summaries import update_page_summaries, write_kv_and_summaries

__all__ = [
    "add_rms_norm",
    "extend_attention",
    "paged_decode",
    "quest_scores",
    "rms_norm",
    "rotary_store",
    "select_pages",
    "silu_mul",
    "sparse_decode",
    "split_k_decode",
    "update_page_summaries",
    "write_kv_and_summaries",
]
