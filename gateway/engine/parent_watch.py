"""The engine process never outlives the gateway that started it, however the gateway ends.

A clean stop sends ("stop",) down the pipe; a crash or SIGKILL of the gateway sends nothing. On
Linux the kernel then delivers SIGKILL to the engine at once (PR_SET_PDEATHSIG), even while a long
kernel holds the GIL. The kernel ties that signal to the *thread* that forked the child, so it is
only armed when the gateway started the engine from its main thread (a worker thread that ends
would kill a healthy engine). Everywhere, a daemon thread also checks the parent pid twice a second
(macOS, or an engine started from another thread); a pid that changed means the gateway is gone.
"""
from __future__ import annotations

import ctypes
import logging
import os
import signal
import sys
import threading
import time

log = logging.getLogger("radixgate.engine")

PR_SET_PDEATHSIG = 1          # <linux/prctl.h>
POLL_S = 0.5


def exit_with_parent(parent_pid: int, parent_is_main_thread: bool) -> None:
    """Arrange for this process to end when `parent_pid` does; call first thing in the child."""
    if sys.platform.startswith("linux") and parent_is_main_thread:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
            log.warning("prctl(PR_SET_PDEATHSIG) failed (errno %d): the parent-pid watch alone applies",
                        ctypes.get_errno())
    if os.getppid() != parent_pid:        # the gateway died before the signal was armed
        os._exit(1)
    threading.Thread(target=_watch, args=(parent_pid,), name="parent-watch", daemon=True).start()


def _watch(parent_pid: int) -> None:
    while os.getppid() == parent_pid:
        time.sleep(POLL_S)
    log.error("the gateway process %d is gone: the engine exits", parent_pid)
    os._exit(1)
