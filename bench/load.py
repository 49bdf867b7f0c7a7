"""Load over HTTP against real servers on loopback, in one of two modes:

    python bench/load.py soak [--help]        every kind of request, good and bad, for a set time; then
                                              the books: errors, cut streams, pages, RSS (and the same
                                              load against llama.cpp's and mlx-lm's servers)
    python bench/load.py admission [--help]   short chats behind long documents, scheduler.policy fcfs
                                              vs fair
"""
from __future__ import annotations

import importlib
import sys
from pathlib import Path

# the repository root in place of bench/, whose mlx.py would shadow the mlx package for mlx-lm
sys.path[0] = str(Path(__file__).resolve().parent.parent)

MODES = {"soak": "bench.load_soak", "admission": "bench.load_admission"}


def main() -> None:
    if len(sys.argv) < 2 or sys.argv[1] not in MODES:
        sys.exit(__doc__)
    mode = sys.argv.pop(1)
    sys.argv[0] = f"{sys.argv[0]} {mode}"
    importlib.import_module(MODES[mode]).main()


if __name__ == "__main__":
    main()
