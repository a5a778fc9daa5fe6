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


def train_steps(net, head, opt, rank: int, world: int, batch_of, lrs) -> list:
    """The synchronous steps hfsoftmax.train runs (lr set, begin_step, forward of this rank's share
    r, r+R, ... of the global batch ``batch_of(step)``, the next step's labels to head.prefetch,
    backward, SGD, end_step); returns each step's active ids."""
    actives = []
    for step, lr in enumerate(lrs):
        images, labels = batch_of(step)
        for g in opt.param_groups:
            g["lr"] = lr
        head.begin_step(step, lr)
        loss = net(images[rank::world], labels[rank::world])
        if step + 1 < len(lrs):
            head.prefetch(step + 1, batch_of(step + 1)[1][rank::world])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        head.end_step(step)
        actives.append(head.last_active.copy())
    return actives


@contextlib.contextmanager
def thread_server(*args: str) -> Iterator[str]:
    """A parameter server built exactly as ``paramserver.py *args`` builds it (store, index), served
    from a thread of this process on a free loopback port (no interpreter start-up); yields its
    address; always stopped."""
    import threading

    from paramserver.paramserver import build_parser, open_from_args
    from paramserver.server import ParamServer

    ns = build_parser().parse_args(["--bind", "tcp://127.0.0.1:0", "--log-every", "0", *args])
    store = open_from_args(ns)
    server = ParamServer(store, bind=ns.bind, log_every=0)
    address = server.bind()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield address
    finally:
        server.stop()
        thread.join(timeout=10)
        store.close()
