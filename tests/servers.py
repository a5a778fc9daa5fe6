"""Test helpers: free loopback ports and parameter servers started (and always stopped) by a test."""
from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
from typing import Iterator

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(REPO, "paramserver", "paramserver.py")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def launch_server(tmp_path, *args: str, bind: str = "tcp://127.0.0.1:0", name: str = "ps",
                  ready_timeout: float = 30.0) -> Iterator[tuple[subprocess.Popen, str]]:
    """Start ``paramserver/paramserver.py *args``; yield (process, bound address); always killed.

    The server writes its address to a ready file once it listens; its output goes to
    ``tmp_path/<name>.log``, quoted in the error if it exits during start-up.
    """
    ready = tmp_path / f"{name}.ready"
    if ready.exists():
        ready.unlink()
    log = open(tmp_path / f"{name}.log", "ab")
    proc = subprocess.Popen([sys.executable, SCRIPT, "--bind", bind, "--ready-file", str(ready), *args],
                            cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + ready_timeout
        while not (ready.exists() and ready.read_text().strip()):
            if proc.poll() is not None:
                raise RuntimeError(f"server exited with {proc.returncode}: "
                                   f"{(tmp_path / f'{name}.log').read_text()[-2000:]}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"parameter server did not become ready in {ready_timeout:.0f} s")
            time.sleep(0.02)
        yield proc, ready.read_text().strip()
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=10)
        log.close()
