"""Ends a local Ray instance when the process that started it ends, even by kill -9.

Run as `python -I ray_watchdog.py TEMP_DIR` with stdin a pipe that only the starting process
writes (standard library only, no package import). Ray's daemons (GCS, raylet, monitors) name
TEMP_DIR on their command lines; their descendants (agents, workers) are found through them while
they are alive, because once a parent dies its orphans are re-parented and the link is lost. When
stdin reaches EOF (the starter exited, or shut Ray down and closed it), every process found is
killed and TEMP_DIR removed.
"""
import os
import select
import shutil
import signal
import sys

SCAN_INTERVAL_S = 1.0


def _processes() -> dict[int, tuple[int, str, bytes]]:
    """pid -> (parent pid, start time, command line) of every live process."""
    procs = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            with open(f"/proc/{name}/cmdline", "rb") as f:
                cmdline = f.read()
        except OSError:
            continue
        if fields[0] != "Z":   # not an exited, unreaped one
            procs[int(name)] = (int(fields[1]), fields[19], cmdline)
    return procs


def _session(temp_dir: bytes) -> dict[int, str]:
    """pid -> start time of the instance's processes: those naming temp_dir, and their descendants."""
    procs = _processes()
    found = {pid for pid, (_, _, cmd) in procs.items() if temp_dir in cmd and pid != os.getpid()}
    children: dict[int, list[int]] = {}
    for pid, (ppid, _, _) in procs.items():
        children.setdefault(ppid, []).append(pid)
    todo = list(found)
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in found:
                found.add(child)
                todo.append(child)
    return {pid: procs[pid][1] for pid in found}


def _start_time(pid: int) -> str | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[19]
    except OSError:
        return None


def main(temp_dir: str) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)   # a Ctrl-C is for the starter, which shuts Ray down
    key = os.fsencode(temp_dir)
    seen: dict[int, str] = {}
    while True:
        readable, _, _ = select.select([sys.stdin.buffer], [], [], SCAN_INTERVAL_S)
        seen |= _session(key)
        if readable and not os.read(sys.stdin.fileno(), 1 << 16):
            break   # EOF: the starter is gone or done with Ray
    for pid, started in seen.items():
        if _start_time(pid) == started:   # the same process, not a new one given its pid
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    shutil.rmtree(temp_dir, ignore_errors=True)


if __name__ == "__main__":
    main(sys.argv[1])
