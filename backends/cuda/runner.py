"""TorchRunner: the Backend of backends/base.py on PyTorch (CPU now, CUDA later)."""
from __future__ import annotations

import logging
import os

import numpy as np
import torch

from backends.base import BackendInfo, ForwardBatch, ForwardResult, RunnerSettings
from backends.cuda.attention import PagedKVCache, build_metadata
from backends.cuda.linear import kernel_available
from backends.cuda.loader import load_model
from backends.cuda.model import LlamaModel
from backends.cuda.sparse_attention import check_sparse_settings
from kernels.cpu import build as cpu_kernels

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16,
          "int8": torch.bfloat16,      # int8 / int4: weight-only matmuls, bfloat16 activations and KV
          "int4": torch.bfloat16}
MAX_SEQUENCES = 64          # the page pool never holds more than this many full contexts
AUTO_CPU = "int4"           # what auto picks on CPU (when its kernel exists; else int8, else float32)
QUANT_MIN_HIDDEN = 256      # quantised weights only from this hidden size up (below, overhead rules)
log = logging.getLogger("radixgate.runner")


def pick_dtype(name: str, device: torch.device, hidden_size: int | None = None) -> str:
    """The serving mode for config's dtype: float32 | bfloat16 | float16 | int8 | int4.

    auto: GPUs want bf16. On CPU auto is int4 (AUTO_CPU): weight-only int4 in groups of 32, which
    holds a GGUF Q4_0/Q4_1 file's weights on their own grid, decodes about 2.5x faster than
    float32 (a sixth of the bytes; docs/cpu.md) and meets the logit tolerance of
    tests/test_cpu_fast_path.py; the head stays int8. Its kernel depends on the number of rows
    (int4pack up to 8, oneDNN bf16 above), so a greedy stream may break a near tie differently
    when batched with more than 8 (as on vLLM or SGLang without their deterministic modes); dtype: float32 is
    batch-invariant to far below any logit gap, and tests/test_scheduler.py checks both.
    """
    if name == "auto":
        if device.type == "cuda":
            return "bfloat16"
        if hidden_size is None or hidden_size < QUANT_MIN_HIDDEN:
            return "float32"
        for mode in (AUTO_CPU, "int8"):
            if kernel_available(mode):
                return mode
        return "float32"
    if name not in DTYPES:
        raise ValueError(f"dtype {name!r} is not supported by the torch backend "
                         f"(auto, {', '.join(DTYPES)})")
    if name in ("int8", "int4") and device.type != "cpu":
        raise ValueError(f"dtype {name} (weight-only) is implemented for the CPU backend only")
    return name


def default_threads() -> int:
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


class TorchRunner:
    """Owns the model and its paged KV cache; runs one ForwardBatch at a time."""

    def __init__(self, settings: RunnerSettings):
        self.settings = settings
        self.device = torch.device(settings.device)
        if self.device.type == "cpu":
            torch.set_num_threads(settings.threads or default_threads())
        # Convert tensor by tensor while loading: peak memory stays near one copy in the load dtype.
        # int8 / int4 (and auto, which may pick them) quantise from the float32 weights.
        load_dtype = (torch.float32 if settings.dtype in ("auto", "int8", "int4") and self.device.type == "cpu"
                      else DTYPES.get(pick_dtype(settings.dtype, self.device), torch.float32))
        config, weights = load_model(settings.source_kind, settings.source_path, load_dtype)
        self.config = config
        self.mode = pick_dtype(settings.dtype, self.device, config.hidden_size)
        self.dtype = DTYPES[self.mode]          # activations and KV cache
        self.model = LlamaModel.from_weights(config, weights, self.device, self.dtype, self.mode)
        del weights
        check_sparse_settings(settings.sparse, settings.page_size, config.num_layers)

        self.page_size = settings.page_size
        self.context_length = settings.context_length or config.context_length
        # Key summaries only when sparse decode will read them.
        summary_tokens = settings.sparse.summary_tokens if settings.sparse.enabled else None
        per_page = PagedKVCache.bytes_per_page(config.num_layers, self.page_size, config.num_kv_heads,
                                               config.head_dim, self.dtype.itemsize, summary_tokens)
        cap = -(-self.context_length // self.page_size) * MAX_SEQUENCES
        self.num_pages = settings.num_pages or min(settings.kv_memory_bytes // per_page, cap)
        if self.num_pages < 1:
            raise ValueError(f"kv_memory_bytes {settings.kv_memory_bytes} holds no page "
                             f"({per_page} bytes each)")
        self.cache = PagedKVCache(config.num_layers, self.num_pages, self.page_size,
                                  config.num_kv_heads, config.head_dim, self.dtype, self.device, summary_tokens)
        if self.device.type == "cuda":
            device_name = torch.cuda.get_device_name(self.device)
        else:
            device_name = f"cpu ({torch.get_num_threads()} threads)"
        self.info = BackendInfo(
            model_name=settings.model_name, backend=self.device.type, device=device_name,
            dtype=self.mode, num_pages=self.num_pages,
            page_size=self.page_size, context_length=self.context_length,
            vocab_size=config.vocab_size)

        log.info("torch runner: dtype %s (config %s; %s), %s", self.mode, settings.dtype,
                 f"weight-only {self.mode} matmuls, bfloat16 activations and KV" if self.mode in ("int8", "int4")
                 else f"{self.mode} weights, activations and KV", device_name)
        if self.device.type == "cpu":
            status = cpu_kernels.load()
            log.info("fused CPU kernels: %s (%s)", "in use" if self.model.fused else "not in use", status.detail)

    def _validate(self, batch: ForwardBatch) -> None:
        slots = []
        for seq in batch.sequences:
            end = seq.end_position
            assert seq.token_ids, "a sequence chunk must carry at least one new token"
            assert seq.start_position >= 0
            assert end <= self.context_length, f"positions up to {end} exceed {self.context_length}"
            assert len(seq.page_table) >= -(-end // self.page_size), "page table too short"
            used = seq.page_table[:-(-end // self.page_size)]
            assert 0 <= min(used) and max(used) < self.num_pages, "page id out of range"
            assert 0 <= min(seq.token_ids) and max(seq.token_ids) < self.config.vocab_size
            pages = np.asarray(used)[np.arange(seq.start_position, end) // self.page_size]
            slots.append(pages * self.page_size + np.arange(seq.start_position, end) % self.page_size)
        if len(batch.sequences) > 1:
            flat = np.concatenate(slots)
            assert len(np.unique(flat)) == len(flat), "two sequences write the same KV slot"

    def forward(self, batch: ForwardBatch) -> ForwardResult:
        """Run every chunk's new tokens, write their K/V, return last-token logits where wanted."""
        self._validate(batch)
        rows, offset, token_ids, positions, chunks = [], 0, [], [], []
        for seq in batch.sequences:
            n = len(seq.token_ids)
            token_ids.extend(seq.token_ids)
            positions.extend(range(seq.start_position, seq.end_position))
            chunks.append((seq.start_position, n, list(seq.page_table)))
            offset += n
            if seq.want_logits:
                rows.append(offset - 1)
        if not token_ids:
            return ForwardResult(np.zeros((0, self.config.vocab_size), dtype=np.float32))
        device = self.device
        sparse = self.settings.sparse if self.settings.sparse.enabled else None
        meta = build_metadata(chunks, self.page_size, device, sparse)
        with torch.inference_mode():
            logits = self.model(torch.tensor(token_ids, dtype=torch.long, device=device),
                                torch.tensor(positions, dtype=torch.long, device=device),
                                self.cache, meta, torch.tensor(rows, dtype=torch.long, device=device),
                                max(seq.end_position for seq in batch.sequences) - 1)
        return ForwardResult(logits.cpu().numpy(), meta.stats)
