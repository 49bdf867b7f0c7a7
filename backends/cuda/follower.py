"""A tensor-parallel follower rank's process (`python -m backends.cuda.follower`, started by
backends/cuda/parallel.py): build this rank's runner, then run every step rank 0 sends."""
from __future__ import annotations

import logging
import os
import pickle
import sys
import threading

import torch

from backends.cuda.parallel import TensorParallel
from backends.cuda.runner import TorchRunner
from backends.cuda.step_channel import StepReceiver

log = logging.getLogger("radixgate.parallel")


def follow(runner) -> None:
    """A follower's loop: run every step rank 0 sends until it stops the group."""
    tp = runner.tp
    receiver = StepReceiver(tp.channel, runner.max_sequences)
    with torch.inference_mode():
        while (chunks := receiver.receive()) is not None:
            runner.run_model(chunks)
            if any(chunk.sample is not None for chunk in chunks):
                tp.share_draws(runner.next_tokens)
        if runner.device.type == "cuda":
            torch.cuda.synchronize(runner.device)


def _exit_when_orphaned() -> None:
    sys.stdin.buffer.read()           # returns at EOF: rank 0's process has ended
    os._exit(0)


def follower_main() -> None:
    settings, rank, port, level = pickle.load(sys.stdin.buffer)
    logging.basicConfig(level=level, format=f"%(asctime)s rank {rank} %(name)s %(levelname)s %(message)s")
    threading.Thread(target=_exit_when_orphaned, daemon=True).start()
    try:
        runner = TorchRunner(settings, TensorParallel.join(settings, rank, port))
        follow(runner)
    except BaseException:
        log.exception("tensor-parallel rank %d failed", rank)
        sys.stderr.flush()
        os._exit(1)
    os._exit(0)     # skips the process group's teardown, which can hang once rank 0 is gone


if __name__ == "__main__":
    follower_main()
