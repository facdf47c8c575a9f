"""A hostile check on the real Docker Engine: it forks, burns CPU, fills the disk, tries the
network and outlives its deadline; each attempt is contained (issue #24, item 7).

The containers are driven through ``tasks.checks`` without Prefect (the box is the
container, not the task), so the whole file takes about 20 seconds.
"""

from __future__ import annotations

import contextlib
import re
import tempfile
import time
from pathlib import Path

import docker
import pytest

from sandbox.procs import wait_until
from tasks.checks import (
    DEADLINE_LABEL,
    CheckLimits,
    create_check_container,
    reap_expired,
    run_command_sync,
    tar_checkout,
)

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]

IMAGE = "robotics-cd/check-runner:latest"
LIMITS = CheckLimits(cpus=0.5, memory_mb=128, workspace_mb=32, tmp_mb=8, pids=64)
BURN_SECONDS = 3

HOSTILE = f"""#!/bin/sh
cpu_usec() {{  # the cgroup's own CPU account (v2, or v1's cpuacct in ns)
  if [ -r /sys/fs/cgroup/cpu.stat ]; then
    while read -r key value; do [ "$key" = usage_usec ] && echo "$value"; done \
      < /sys/fs/cgroup/cpu.stat
  else
    read -r ns < /sys/fs/cgroup/cpuacct/cpuacct.usage && echo $((ns / 1000))
  fi
}}
set -- /proc/[0-9]*
before=$#

# 1. fork: 500 sleepers against a limit of {LIMITS.pids} processes
# (a fork the kernel refuses ends the subshell; its sleepers stay until killed below)
( n=0; while [ $n -lt 500 ]; do sleep 30 & n=$((n+1)); done ) 2>/dev/null
set -- /proc/[0-9]*
echo "processes: $#"
# Kill the sleepers until they are gone, with builtins only: a forked child may not have
# exec'd `sleep` yet when a pass runs (a throttled CPU makes that likely), and the killed
# ones are orphans that the container's init reaps in its own time; until then they
# still count against the pids limit and the next fork fails.
i=0
while set -- /proc/[0-9]*; [ $# -gt $((before + 2)) ] && [ $i -lt 5000 ]; do
  for p in "$@"; do
    read -r comm < "$p/comm" 2>/dev/null && [ "$comm" = sleep ] && kill "${{p#/proc/}}" 2>/dev/null
  done
  i=$((i+1))
done
echo "processes after the kill: $# (before the fork: $before; $i passes)"

# 2. burn CPU: two busy loops for {BURN_SECONDS}s; the CPU they got, from the cgroup
start=$(cpu_usec)
timeout {BURN_SECONDS} sh -c 'while :; do :; done' &
timeout {BURN_SECONDS} sh -c 'while :; do :; done' &
wait
echo "cpu_usec: $(( $(cpu_usec) - start ))"

# 3. fill the disk: the workspace, then the root filesystem
dd if=/dev/zero of=/workspace/fill bs=1M count=200 2>&1 | grep -o 'No space left on device'
echo "workspace_kb: $(du -k /workspace/fill | cut -f1)"
rm -f /workspace/fill
echo x 2>&1 >/root-fill || true
touch /usr/fill 2>&1 | grep -o 'Read-only file system'

# 4. the network
echo "interfaces: $(ls /sys/class/net | tr '\\n' ' ')"
nc -w 2 1.1.1.1 80 </dev/null 2>&1 | head -1
nc -w 2 172.17.0.1 2375 </dev/null 2>&1 | head -1
echo done
"""


@pytest.fixture
def client(base_images: list[str]) -> docker.DockerClient:
    c = docker.from_env()
    yield c
    c.close()


def test_a_hostile_check_is_contained(client: docker.DockerClient, tmp_path: Path) -> None:
    lines: list[str] = []
    (tmp_path / "hostile.sh").write_text(HOSTILE)
    with tempfile.TemporaryFile() as archive:
        tar_checkout(tmp_path, archive)
        started = time.monotonic()
        code, _tail = run_command_sync(
            client,
            stage="unit",
            command="sh hostile.sh",
            archive=archive,
            image=IMAGE,
            network=False,
            timeout=90,
            log=lines.append,
            limits=LIMITS,
            name_prefix="robotics-cd-check-box",
        )
        wall = time.monotonic() - started
    out = "\n".join(lines)
    assert code == 0, out
    assert "done" in lines, out

    # forks: stopped at the pids limit, not at 500
    processes = int(re.search(r"processes: (\d+)", out).group(1))  # type: ignore[union-attr]
    assert processes <= LIMITS.pids, out

    # CPU: two busy loops for 3 s got at most the 0.5 cores of the limit (plus slack for
    # the CFS period and the timeouts' start), not the 2 x 3 s they asked for
    cpu = int(re.search(r"cpu_usec: (\d+)", out).group(1)) / 1e6  # type: ignore[union-attr]
    assert cpu <= LIMITS.cpus * (BURN_SECONDS + 2) + 0.5, (cpu, wall, out)

    # disk: the workspace is full at its size, the root filesystem is read-only
    assert "No space left on device" in out
    written_kb = int(re.search(r"workspace_kb: (\d+)", out).group(1))  # type: ignore[union-attr]
    assert written_kb <= LIMITS.workspace_mb * 1024
    assert "Read-only file system" in out

    # network: loopback only, nothing reaches out
    assert "interfaces: lo " in out
    assert not re.search(r"interfaces: .*eth", out)
    reached = re.findall(r"nc: can't connect to remote host \(([\d.]+)\): (.*)", out)
    assert reached == [
        ("1.1.1.1", "Network is unreachable"),
        ("172.17.0.1", "Network is unreachable"),
    ], out


def test_the_container_dies_at_its_deadline_without_its_client(
    client: docker.DockerClient,
) -> None:
    """The worker that started a check can die: the container still ends at the deadline."""
    container = create_check_container(
        client,
        stage="unit",
        command="sleep 600",
        image=IMAGE,
        network=False,
        timeout=3,
        limits=LIMITS,
        name_prefix="robotics-cd-check-box",
    )
    try:
        # Started and abandoned: nobody waits on it, nobody kills it, nobody feeds stdin
        # (so it is still inside tar when the deadline comes: tar counts too).
        container.start()
        started = time.monotonic()
        wait_until(
            lambda: (container.reload(), container.status == "exited")[1],
            timeout=30,
            what="the check container to end at its deadline",
        )
        assert time.monotonic() - started < 15
        assert container.attrs["State"]["ExitCode"] == 137
    finally:
        container.remove(force=True)


def test_a_container_past_its_deadline_is_swept(client: docker.DockerClient) -> None:
    """A check created but never started (its worker died in between) is removed by the
    next stage's sweep."""
    stale = create_check_container(
        client,
        stage="unit",
        command="true",
        image=IMAGE,
        network=False,
        timeout=-120,  # its deadline passed two minutes ago
        limits=LIMITS,
        name_prefix="robotics-cd-check-box",
    )
    fresh = create_check_container(
        client,
        stage="unit",
        command="true",
        image=IMAGE,
        network=False,
        timeout=600,
        limits=LIMITS,
        name_prefix="robotics-cd-check-box",
    )
    try:
        assert float(stale.labels[DEADLINE_LABEL]) < time.time()
        reaped = reap_expired(client)
        assert stale.name in reaped and fresh.name not in reaped
        names = {c.name for c in client.containers.list(all=True)}
        assert stale.name not in names and fresh.name in names
    finally:
        for c in (stale, fresh):
            with contextlib.suppress(docker.errors.NotFound):
                c.remove(force=True)
