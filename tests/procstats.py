"""What a process tree holds, read from /proc: its worker PIDs, open fds, RSS, and TCP connections to a port.

Used by the fault matrix (resources return to their baseline) and the soak benchmark (peaks stay bounded).
Linux only, like the rest of the test stack.
"""

from __future__ import annotations

import os
from pathlib import Path


def children(pid: int) -> list[int]:
    """The direct child processes of `pid` (uvicorn's workers, for the master)."""
    kids: list[int] = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            kids += [int(k) for k in (task / "children").read_text().split()]
        except OSError:
            continue
    return sorted(kids)


def tree(pid: int) -> list[int]:
    """`pid` and its direct children."""
    return [pid, *children(pid)]


def fd_count(pid: int) -> int:
    """Open file descriptors of one process (0 if it is gone)."""
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return 0


def fd_targets(pid: int) -> list[str]:
    """What each open fd of one process points at (`socket:[inode]`, `pipe:[...]`, a path...)."""
    out = []
    try:
        for fd in os.listdir(f"/proc/{pid}/fd"):
            try:
                out.append(os.readlink(f"/proc/{pid}/fd/{fd}"))
            except OSError:
                continue
    except OSError:
        pass
    return out


def rss_bytes(pid: int) -> int:
    """Resident set size of one process (VmRSS; 0 if it is gone)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def peak_rss_bytes(pid: int) -> int:
    """Peak resident set size of one process so far (VmHWM; 0 if it is gone)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def _socket_inodes(pid: int) -> set[int]:
    inodes = set()
    try:
        for fd in os.listdir(f"/proc/{pid}/fd"):
            try:
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            if target.startswith("socket:["):
                inodes.add(int(target[8:-1]))
    except OSError:
        pass
    return inodes


def connections_to(pids: list[int], port: int) -> dict[int, int]:
    """For each pid, how many ESTABLISHED TCP connections it holds to 127.0.0.1:`port` (or [::1])."""
    established: set[int] = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            f = line.split()
            remote_port = int(f[2].rsplit(":", 1)[1], 16)
            if remote_port == port and f[3] == "01":  # 01: ESTABLISHED
                established.add(int(f[9]))
    return {pid: len(_socket_inodes(pid) & established) for pid in pids}
