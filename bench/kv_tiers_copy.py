"""Page copies of the KV tiers (backends/cuda/kv_store.py): L2 -> L1 load and L1 -> L2 write-back
bandwidth, against a plain pinned host -> device copy and a device -> device copy of the same bytes,
in one run. Checks first that pages come back bit-exact (K, V and key summaries).

Shapes default to Llama-3-8B (32 layers, 8 KV heads, head_dim 128, bf16, 16-token pages: 2 MiB a
page). On CUDA it times with CUDA events and also runs the loads on the store's side stream under a
matmul loop on the compute stream (how much of the copy hides behind compute). On CPU it runs small
and times with the wall clock (a check that the program works, not a figure).

    python bench/kv_tiers_copy.py                      # CUDA
    python bench/kv_tiers_copy.py --device cpu --pages 64 --host-pages 64 --batch 16
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from backends.cuda.kv_cache import PagedKVCache  # noqa: E402
from backends.cuda.kv_store import TorchKVStore  # noqa: E402
from backends.kv_store import KVLayout, Tier  # noqa: E402


def make_store(args, device) -> tuple[PagedKVCache, TorchKVStore]:
    cache = PagedKVCache(args.layers, args.pages, args.page_size, args.kv_heads, args.head_dim, torch.bfloat16,
                         device, args.summary_tokens)
    page_bytes = TorchKVStore.bytes_per_page(cache)
    layout = KVLayout(model="bench", weights="bfloat16", kv_dtype="bfloat16", device=device.type,
                      attention="bench", page_size=args.page_size, num_layers=args.layers, kv_heads=args.kv_heads,
                      head_dim=args.head_dim, summary_tokens=args.summary_tokens, page_bytes=page_bytes)
    return cache, TorchKVStore(cache, args.host_pages, layout)


def check_round_trip(cache: PagedKVCache, store: TorchKVStore) -> None:
    tensors = [t for t in (cache.k, cache.v, cache.kmin, cache.kmax, cache.pmin, cache.pmax) if t is not None]
    for t in tensors:
        t.copy_(torch.randn(t.shape, device=t.device).to(t.dtype))
    src, slots, dst = [1, 5, 6, 7], [3, 0, 1, 2], [9, 2, 3, 11]
    before = [t[:, src].clone() for t in tensors]
    store.copy_pages(Tier.DEVICE, Tier.HOST, src, slots).wait()
    store.copy_pages(Tier.HOST, Tier.DEVICE, slots, dst).wait()
    assert all(torch.equal(b, t[:, dst]) for b, t in zip(before, tensors, strict=True)), "pages changed in transit"
    print(f"round trip L1 -> L2 -> L1 of {len(src)} pages: bit-exact ({len(tensors)} tensors per page)")


class Timer:
    def __init__(self, device):
        self.cuda = device.type == "cuda"

    def __call__(self, fn, repeat: int) -> float:
        """Seconds per call (median of `repeat`)."""
        fn()
        times = []
        for _ in range(repeat):
            if self.cuda:
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                torch.cuda.synchronize()
                start.record()
                fn()
                end.record()
                end.synchronize()
                times.append(start.elapsed_time(end) / 1e3)
            else:
                started = time.perf_counter()
                fn()
                times.append(time.perf_counter() - started)
        return sorted(times)[len(times) // 2]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--kv-heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--page-size", type=int, default=16)
    parser.add_argument("--summary-tokens", type=int, default=None, help="store key summaries too (sparse on)")
    parser.add_argument("--pages", type=int, default=2048, help="L1 pages")
    parser.add_argument("--host-pages", type=int, default=1024, help="L2 pages (pinned on CUDA)")
    parser.add_argument("--batch", type=int, default=256, help="pages per copy_pages call")
    parser.add_argument("--repeat", type=int, default=10)
    args = parser.parse_args()
    device = torch.device(args.device)
    cache, store = make_store(args, device)
    check_round_trip(cache, store)
    timer = Timer(device)
    n = min(args.batch, args.host_pages, args.pages)
    nbytes = n * store.page_bytes
    generator = torch.Generator().manual_seed(0)
    dst = torch.randperm(args.pages, generator=generator)[:n].tolist()         # scattered device pages
    slots = list(range(n))                                                     # one run of host pages

    load = timer(lambda: store.copy_pages(Tier.HOST, Tier.DEVICE, slots, dst).wait(), args.repeat)
    write = timer(lambda: store.copy_pages(Tier.DEVICE, Tier.HOST, dst, slots).wait(), args.repeat)
    host = store.host[:n]
    target = torch.empty_like(host, device=device)
    plain_h2d = timer(lambda: target.copy_(host, non_blocking=True), args.repeat)
    flat = torch.randint(0, 255, (nbytes,), dtype=torch.uint8, device=device)
    other = torch.empty_like(flat)
    d2d = timer(lambda: other.copy_(flat), args.repeat)

    rows = [("L2 -> L1 load (copy_pages)", load), ("L1 -> L2 write-back (copy_pages)", write),
            ("plain pinned host -> device copy", plain_h2d), ("device -> device copy (read + write)", d2d)]
    if device.type == "cuda":
        a = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)

        def compute():
            for _ in range(8):
                a @ a

        alone = timer(compute, args.repeat)

        def both():
            copy = store.copy_pages(Tier.HOST, Tier.DEVICE, slots, dst)
            compute()
            copy.wait()

        together = timer(both, args.repeat)
        rows.append(("matmuls alone", alone))
        rows.append(("matmuls + a load on the side stream", together))
    print(f"\n{device}: {n} pages of {store.page_bytes / 2**20:.2f} MiB = {nbytes / 2**30:.2f} GiB per copy")
    print("what | ms | GB/s moved | share of plain H2D | share of D2D copy")
    for name, seconds in rows:
        if name.startswith("matmuls"):
            print(f"{name} | {seconds * 1e3:.2f} | | |")
            continue
        print(f"{name} | {seconds * 1e3:.2f} | {nbytes / seconds / 1e9:.1f} | {plain_h2d / seconds:.0%} | "
              f"{d2d / seconds:.1%}")
    print(f"(the D2D copy reads and writes: {2 * nbytes / d2d / 1e9:.0f} GB/s of traffic, the figure docs quote)")
    if device.type == "cuda":
        hidden = 1 - (together - alone) / load
        print(f"load hidden behind compute: {hidden:.0%} (1 - (together - matmuls alone) / load alone)")


if __name__ == "__main__":
    main()
