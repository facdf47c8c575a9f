"""The reconciler sees a holder's process from the same host: alive, gone, or a zombie."""

from __future__ import annotations

import os
import socket
import subprocess
import sys

from flows.reconcile import process_alive
from sandbox.procs import wait_until

HOST = socket.gethostname()


def test_this_process_is_alive_and_other_hosts_cannot_be_seen() -> None:
    assert process_alive(HOST, os.getpid()) is True
    assert process_alive("another-host", os.getpid()) is None
    assert process_alive(None, os.getpid()) is None
    assert process_alive(HOST, None) is None


def test_a_killed_process_is_dead_before_and_after_it_is_reaped() -> None:
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        assert process_alive(HOST, child.pid) is True
        child.kill()
        # Not reaped yet (no wait()): a zombie, which the reconciler counts as dead.
        wait_until(
            lambda: not process_alive(HOST, child.pid), timeout=10, what="the child a zombie"
        )
    finally:
        child.kill()
        child.wait(timeout=10)
    assert process_alive(HOST, child.pid) is False
