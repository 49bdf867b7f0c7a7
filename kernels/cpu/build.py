"""Build (once per machine) and load the fused CPU kernels (fused.cpp: the small ops and attention;
quant_linear.cpp: the batch-invariant int4/int8 matmul) as torch.ops.radixgate_cpu.

    python -m kernels.cpu.build        # build now (make serve / make test do this), print the verdict

The library is compiled for the host's own instruction set (-march=native), so its build
directory is keyed by the CPU's feature flags as well as by the source (torch rebuilds on a
source change). A host without a compiler, or with RADIXGATE_CPU_KERNELS=0, runs the plain torch
path instead: the same model, slower (docs/cpu.md).
"""
from __future__ import annotations

import hashlib
import logging
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

SOURCES = [Path(__file__).with_name("fused.cpp"), Path(__file__).with_name("quant_linear.cpp")]
# -fopenmp: at::parallel_for runs its tasks on torch's OpenMP threads only when the caller is built
# with OpenMP (ATen/ParallelOpenMP.h is guarded by _OPENMP); without it every op ran on one thread.
FLAGS = ["-O3", "-march=native", "-mprefer-vector-width=512", "-fopenmp", "-fno-math-errno"]
OPS = ("rms_norm", "add_rms_norm", "rotary_store", "paged_decode_attention", "paged_prefill_attention", "silu_mul",
       "quest_page_scores", "quant_linear", "quant_linear_available")
log = logging.getLogger("radixgate.kernels.cpu")


@dataclass(frozen=True)
class KernelStatus:
    available: bool
    detail: str             # why not, or where from and how long the load took


_status: KernelStatus | None = None


def _cpu_key() -> str:
    """A short hash of the CPU's feature flags: a -march=native build only runs where they match."""
    flags = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                flags = line
                break
    except OSError:
        pass
    return hashlib.sha1(f"{flags}|{torch.__version__}".encode()).hexdigest()[:10]


def load() -> KernelStatus:
    """Build if needed and load; never raises: a failure is a status with the reason."""
    global _status
    if _status is not None:
        return _status
    if os.environ.get("RADIXGATE_CPU_KERNELS", "1") == "0":
        _status = KernelStatus(False, "disabled by RADIXGATE_CPU_KERNELS=0")
        return _status
    if hasattr(torch.ops, "radixgate_cpu") and all(hasattr(torch.ops.radixgate_cpu, op) for op in OPS):
        _status = KernelStatus(True, "already loaded")
        return _status
    started = time.perf_counter()
    # torch runs `ninja` by name: the one pip put next to this interpreter (a venv not activated)
    bindir = os.path.dirname(sys.executable)
    if bindir not in os.environ.get("PATH", "").split(os.pathsep):
        os.environ["PATH"] = bindir + os.pathsep + os.environ.get("PATH", "")
    try:
        from torch.utils import cpp_extension

        cpp_extension.load(name=f"radixgate_cpu_{_cpu_key()}", sources=[str(source) for source in SOURCES],
                           extra_cflags=FLAGS, extra_ldflags=["-fopenmp"], is_python_module=False, verbose=False)
        missing = [op for op in OPS if not hasattr(torch.ops.radixgate_cpu, op)]
        if missing:
            raise RuntimeError(f"library loaded without ops {missing}")
        _status = KernelStatus(True, f"loaded in {time.perf_counter() - started:.1f} s")
    except Exception as exc:        # no compiler, no ninja, a failed build: the torch path still runs
        first_line = (str(exc).strip().splitlines() or [""])[0]
        _status = KernelStatus(False, f"build failed: {type(exc).__name__}: {first_line[:300]}")
        log.warning("fused CPU kernels unavailable (%s); decode runs the plain torch path", _status.detail)
    return _status


if __name__ == "__main__":
    status = load()
    print(f"fused CPU kernels: {'available' if status.available else 'NOT available'} ({status.detail})")
    raise SystemExit(0 if status.available else 1)
