"""Tensor parallelism over the devices of one host: the process group, the follower processes and
their loop.

Rank 0 is the runner the engine talks to. At its construction it starts one follower process per
further rank (`python -m backends.cuda.follower`, its settings pickled on stdin), and every rank
joins one torch.distributed group (NCCL on CUDA, gloo on CPU) for the model's collectives plus a
gloo group for the step messages (backends/cuda/step_channel.py). Each rank loads only its shard
(backends/cuda/shard.py) and owns its KV heads of every page, so the page tables, the radix cache
and the scheduler stay single: each step rank 0 sends the batch, every rank runs the same forward
(graphs included, their collectives captured with them), and rank 0 alone samples, then broadcasts
the drawn ids into every rank's next_tokens (where the next step's PENDING_TOKEN chunks read them).
Why rank 0 samples: the sampling inputs (penalty histories, grammar masks, logit biases) are host
objects that would have to be sent every step; the drawn ids are one small device tensor.

Followers are subprocesses rather than multiprocessing children because the engine process is
itself a daemonic multiprocessing child (which may not have children); a follower also exits when
its stdin closes, so followers never outlive rank 0. NVLink multicast stays off
(NCCL_NVLS_ENABLE=0 unless the environment says otherwise).
"""
from __future__ import annotations

import logging
import os
import pickle
import socket
import subprocess
import sys
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

from backends.base import RunnerSettings
from backends.cuda.collectives import SingleRank, TorchCollectives
from backends.cuda.shard import ShardPlan
from backends.cuda.step_channel import StepSender

log = logging.getLogger("radixgate.parallel")
ROOT = Path(__file__).resolve().parents[2]          # the directory that holds backends/
JOIN_TIMEOUT = timedelta(minutes=10)                # loading a large shard comes before the first collective
STOP_WAIT_S = 30.0
# "nccl": every all-reduce through NCCL, not the peer-to-peer kernel (a diagnosis switch, read at start-up)
ALL_REDUCE_ENV = "RADIXGATE_ALL_REDUCE"


def rank_device(settings: RunnerSettings, rank: int) -> torch.device:
    """Rank r runs on the r-th GPU after the configured one (cuda -> cuda:r), or on the CPU."""
    device = torch.device(settings.device)
    if device.type == "cuda":
        return torch.device("cuda", (device.index or 0) + rank)
    return device


class TensorParallel:
    """This process's place in its tensor-parallel group; world 1 is a plain single-device runner."""

    def __init__(self, rank: int, world: int, device: torch.device, group=None, channel=None,
                 followers: list[subprocess.Popen] | None = None):
        self.rank, self.world, self.device = rank, world, device
        self.group, self.channel = group, channel
        self.followers = followers or []
        self.sender: StepSender | None = None
        self.comm = None            # the model's collectives, once chosen

    @classmethod
    def start(cls, settings: RunnerSettings) -> TensorParallel:
        """Rank 0: start the followers and join the group with them."""
        world = settings.tensor_parallel_size
        device = rank_device(settings, 0)
        if world == 1:
            return cls(0, 1, device)
        if device.type == "cuda" and torch.cuda.device_count() < (device.index or 0) + world:
            raise ValueError(f"tensor_parallel_size {world} needs {world} GPUs from {device}; "
                             f"{torch.cuda.device_count()} visible")
        if device.type not in ("cuda", "cpu"):
            raise ValueError(f"tensor parallelism runs on cuda (NCCL) or cpu (gloo), not {device.type}")
        port = _free_port()
        followers = [_spawn_follower(settings, rank, port) for rank in range(1, world)]
        try:
            tp = cls.join(settings, 0, port)
        except BaseException:
            for process in followers:
                process.kill()
            raise
        tp.followers = followers
        return tp

    @classmethod
    def join(cls, settings: RunnerSettings, rank: int, port: int) -> TensorParallel:
        """Join the group of rank 0 listening on `port` as `rank`."""
        if dist.is_initialized():
            raise RuntimeError("this process already belongs to a tensor-parallel group")
        os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
        world, device = settings.tensor_parallel_size, rank_device(settings, rank)
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                                init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                                timeout=JOIN_TIMEOUT, device_id=device if device.type == "cuda" else None)
        channel = dist.new_group(backend="gloo")
        return cls(rank, world, device, dist.group.WORLD, channel)

    # -- model set-up -----------------------------------------------------------------------

    def shard_plan(self, config) -> ShardPlan | None:
        return ShardPlan(config, self.rank, self.world) if self.world > 1 else None

    def collectives(self, config, ops):
        """The model's collectives for this group and the layer ops `ops`, chosen once, here: on two
        GPUs the peer-to-peer one-shot kernels when their self-test passes on both, else
        torch.distributed (NCCL, gloo)."""
        if self.world == 1:
            return SingleRank(ops)
        plan = ShardPlan(config, self.rank, self.world)
        args = plan.vocab_start, plan.vocab_shard, config.vocab_size, ops
        self.comm = None
        if self.device.type == "cuda" and self.world == 2 and os.environ.get(ALL_REDUCE_ENV) != "nccl":
            from backends.cuda.peer_all_reduce import create_peer_collectives  # imports triton
            self.comm = create_peer_collectives(self.group, self.channel, self.rank, self.device, *args,
                                                config.hidden_size)
        self.comm = self.comm or TorchCollectives(self.group, self.world, *args)
        return self.comm

    def agree_min(self, value: int) -> int:
        """The smallest of every rank's value (e.g. KV pages: every rank must hold the same pages)."""
        if self.world == 1:
            return value
        tensor = torch.tensor([value], dtype=torch.int64)
        dist.all_reduce(tensor, op=dist.ReduceOp.MIN, group=self.channel)
        return int(tensor.item())

    def describe(self, config) -> str:
        if self.world == 1:
            return "tensor parallel off"
        return (f"tensor parallel {self.world} ranks on {self.device.type}, collectives "
                f"{type(self.comm).__name__}; {ShardPlan(config, self.rank, self.world).describe()}")

    # -- each step ----------------------------------------------------------------------------

    def start_sending(self, max_sequences: int, page_size: int) -> None:
        if self.world > 1 and self.rank == 0:
            self.sender = StepSender(self.channel, max_sequences, page_size)

    def publish(self, chunks) -> None:
        """Rank 0: send this step to the followers (after checking they are alive)."""
        if self.sender is None:
            return
        for process in self.followers:
            if process.poll() is not None:
                raise RuntimeError(f"a tensor-parallel follower exited (code {process.returncode})")
        self.sender.send(chunks)

    def share_draws(self, next_tokens: torch.Tensor) -> None:
        """Every rank's next_tokens := rank 0's (queued on the device stream, by the collectives)."""
        if self.world > 1:
            self.comm.share_from_first(next_tokens)

    def close(self) -> None:
        """Rank 0: stop the followers. The gloo group is destroyed; an NCCL one is left to the
        process's exit (destroying it has hung there once the peers were gone)."""
        if self.sender is None:
            return
        self.sender.stop()
        self.sender = None
        for process in self.followers:
            try:
                process.wait(STOP_WAIT_S)
            except subprocess.TimeoutExpired:
                process.kill()
            if process.stdin:
                process.stdin.close()
        if self.device.type == "cpu":
            dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _spawn_follower(settings: RunnerSettings, rank: int, port: int) -> subprocess.Popen:
    env = dict(os.environ)
    env.setdefault("NCCL_NVLS_ENABLE", "0")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    process = subprocess.Popen([sys.executable, "-m", "backends.cuda.follower"], stdin=subprocess.PIPE,
                               env=env, cwd=str(ROOT))
    level = logging.getLogger("radixgate").getEffectiveLevel()
    process.stdin.write(pickle.dumps((settings, rank, port, level)))
    process.stdin.flush()         # stdin stays open: its end tells the follower that rank 0 is gone
    return process
