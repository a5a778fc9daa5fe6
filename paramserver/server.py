"""ZeroMQ ROUTER loop serving one WeightStore shard (HF-softmax's parameter server, Zhang et al. 2018).

One thread, one ROUTER socket, the wire protocol of ``paramserver/protocol.py`` (docs/protocol.md).
Every request gets exactly one reply: ``ok`` or an error with its reason. A ``pull`` for a step the
store has not reached yet is parked (ROUTER may answer later) and answered when the step's update
is applied, or with a timeout error naming the clients that have not pushed; other clients are
served meanwhile. Bad requests are refused before the store is touched.

Security: binding anything but a loopback/ipc/inproc address requires a shared secret ``token``;
when a token is set, every request must carry it (``header["token"]``), else it is refused.
"""
from __future__ import annotations

import json
import logging
import os
import re
import threading
import time
from typing import Any, Callable, Optional

import numpy as np
import zmq

from paramserver.protocol import (MAX_HEADER_BYTES, OPS, WIRE_DTYPES, ProtocolError, decode, error_reply, expect_arrays,
                                  from_bf16, get_field, ok_reply, PROTOCOL_VERSION, to_bf16, token_ok)
from paramserver import snapshot as snap
from paramserver.snapshot import resolve_snapshot   # also paramserver.py's, for --restore
from paramserver.store import BadRequestError, StaleStepError, StoreError, WeightStore

logger = logging.getLogger(__name__)

LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1", "[::1]")
# Ops that read or write the rows: parked while a deferred init draws them (ping, info, register,
# stats and shutdown are answered at once).
ROW_OPS = frozenset({"pull", "push", "set_rows", "query", "snapshot", "restore"})
# A restore reads straight into the live W above this size (a second 10 GB matrix at 10M classes
# would not fit); files, sizes and checksums are checked before any byte of W is written.
RESTORE_IN_PLACE_BYTES = 1 << 30
# ZeroMQ drops (no reply possible) a frame above this many times --max-message-mb; a request up to
# there is received and refused with an error naming the limit.
SOCKET_LIMIT_FACTOR = 2


def is_local_address(address: str) -> bool:
    """True for ipc://, inproc:// and tcp:// on a loopback host (no token needed there)."""
    if address.startswith(("ipc://", "inproc://")):
        return True
    m = re.match(r"^tcp://(.+):([^:]+)$", address)
    if not m:
        raise ValueError(f"bind address {address!r} is not of the form tcp://HOST:PORT, ipc://PATH or inproc://NAME")
    host = m.group(1)
    return host in LOOPBACK_HOSTS or host.startswith("127.")


def normalize_bind(address: str) -> str:
    """``tcp://host:0`` -> ``tcp://host:*`` (ZeroMQ's spelling of "any free port")."""
    return re.sub(r":0$", ":*", address) if address.startswith("tcp://") else address


def read_token_file(path: str) -> str:
    """The token in ``path`` (stripped); refused when the file is readable by group or others."""
    try:
        st = os.stat(path)
        with open(path, encoding="utf-8") as f:
            token = f.read().strip()
    except OSError as e:
        raise ValueError(f"token file {path}: {e.strerror}") from None
    if st.st_mode & 0o077:
        raise ValueError(f"token file {path} is readable by others (mode {st.st_mode & 0o777:o}); chmod 600 it")
    if not token:
        raise ValueError(f"token file {path} is empty")
    return token


class _Parked:
    """A pull or query waiting for its step: ``answer()`` builds the reply frames once the step is
    reached; it is sent later through the ROUTER envelope."""

    __slots__ = ("envelope", "req_id", "answer", "step", "deadline", "waited", "op")

    def __init__(self, envelope: list, req_id: Any, answer: Callable[[], list], step: int, wait: float,
                 op: str) -> None:
        self.envelope, self.req_id, self.answer, self.step, self.op = envelope, req_id, answer, step, op
        self.deadline = time.monotonic() + wait
        self.waited = wait


class ParamServer:
    """Serve ``store`` on a ROUTER socket.

    Args:
        store: the shard served.
        bind: ZeroMQ address; ``tcp://127.0.0.1:*`` (or ``:0``) picks a free port.
        token: shared secret; required when ``bind`` is not a loopback address.
        snapshot_dir: where ``--snapshot-every`` and the final snapshot go (``step-NNNNNNNNN`` + ``latest``).
        snapshot_every: write a snapshot every N applied steps (0: never).
        final_snapshot: write one on shutdown when ``snapshot_dir`` is set.
        keep_snapshots: periodic snapshots kept (oldest removed).
        log_every: seconds between throughput log lines.
        shard: (i, S), for logs and ``info``.
        max_wait: upper bound on how long a parked pull may wait (default: store.sync_timeout).
        max_message_bytes: the largest request the socket accepts (ZeroMQ drops the connection of a
            peer sending more) and the largest reply a pull or query may ask for (refused with an
            error naming the limit, before any work: one huge pull must not stall every client).
        context: ZeroMQ context (default: the global instance).
    """

    def __init__(self, store: WeightStore, bind: str = "tcp://127.0.0.1:5570", token: Optional[str] = None,
                 snapshot_dir: Optional[str] = None, snapshot_every: int = 0, final_snapshot: bool = True,
                 keep_snapshots: int = 2, log_every: float = 30.0, shard: tuple[int, int] = (0, 1),
                 max_wait: Optional[float] = None, context: Optional[zmq.Context] = None,
                 max_message_bytes: int = 2 << 30) -> None:
        if not is_local_address(bind) and not token:
            raise ValueError(f"binding {bind} (not loopback) requires a shared secret token (--token); "
                             "unauthenticated access is only allowed on 127.0.0.1/ipc/inproc")
        if snapshot_every < 0 or keep_snapshots < 1:
            raise ValueError("snapshot_every must be >= 0 and keep_snapshots >= 1")
        if snapshot_every and not snapshot_dir:
            raise ValueError("snapshot_every needs a snapshot_dir")
        self.store = store
        self.bind_address = normalize_bind(bind)
        self.token = token or None
        self.snapshot_dir = snapshot_dir
        self.snapshot_every = int(snapshot_every)
        self.final_snapshot = bool(final_snapshot)
        self.keep_snapshots = int(keep_snapshots)
        self.log_every = float(log_every)
        self.shard = shard
        self.max_wait = float(max_wait) if max_wait is not None else store.sync_timeout
        if max_message_bytes < 1 << 20:
            raise ValueError(f"max_message_bytes must be >= 1 MiB, got {max_message_bytes}")
        self.max_message_bytes = int(max_message_bytes)
        self._ctx = context or zmq.Context.instance()
        self._sock: Optional[zmq.Socket] = None
        self._monitor: Optional[zmq.Socket] = None
        self._stop = threading.Event()
        self._parked: list[_Parked] = []
        self._init_parked: list[tuple[list, float]] = []   # (frames, deadline) waiting for the rows
        # after the reply: "apply" the completed step, or it was "applied" before the reply (push)
        self._update_due: Optional[str] = None
        self.address: Optional[str] = None
        # busy_s / cpu_s: wall and CPU time of this thread handling requests and applying updates
        # (what R ranks cost the server; cpu_s is not inflated by other processes on the cores).
        self._counts = {"requests": 0, "errors": 0, "bytes_in": 0, "bytes_out": 0, "busy_s": 0.0, "cpu_s": 0.0}
        self._peers = 0

    # ------------------------------------------------------------------ lifecycle
    def bind(self) -> str:
        """Create and bind the ROUTER socket; returns the bound address (actual port)."""
        sock = self._ctx.socket(zmq.ROUTER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.SNDHWM, 10000)
        sock.setsockopt(zmq.RCVHWM, 10000)
        # above the op limit, so an oversized request is received and answered (refused by _handle_request)
        sock.setsockopt(zmq.MAXMSGSIZE, SOCKET_LIMIT_FACTOR * self.max_message_bytes + MAX_HEADER_BYTES)
        sock.bind(self.bind_address)
        self.address = sock.getsockopt_string(zmq.LAST_ENDPOINT)
        self._sock = sock
        try:
            self._monitor = sock.get_monitor_socket(zmq.EVENT_ACCEPTED | zmq.EVENT_DISCONNECTED)
        except zmq.ZMQError as e:  # monitoring is optional (e.g. not on inproc with old libzmq)
            logger.warning("socket monitor unavailable (%s): no connect/disconnect lines", e)
        lo, hi = self.store.class_range
        logger.info("paramserver listening on %s (shard %d/%d, classes [%d, %d), dim %d, %s, %d clients, step %d%s)",
                    self.address, self.shard[0], self.shard[1], lo, hi, self.store.dim, self.store.dtype,
                    self.store.num_clients, self.store.step, ", token required" if self.token else "")
        return self.address

    def stop(self) -> None:
        """Ask the loop to exit (thread- and signal-safe)."""
        self._stop.set()

    def serve_forever(self, ready: Optional[Callable[[str], None]] = None) -> None:
        """Run until :meth:`stop` or a ``shutdown`` request; then final snapshot (if set) and close."""
        if self._sock is None:
            self.bind()
        if ready is not None:
            ready(self.address)
        poller = zmq.Poller()
        poller.register(self._sock, zmq.POLLIN)
        if self._monitor is not None:
            poller.register(self._monitor, zmq.POLLIN)
        t_log = time.monotonic()
        last = dict(self._counts, **{k: self.store.stats()[k] for k in ("pulls", "pushes", "updates")})
        try:
            while not self._stop.is_set():
                events = dict(poller.poll(self._poll_ms()))
                if self._sock in events:
                    for _ in range(256):  # drain a burst, then look at timers again
                        try:
                            frames = self._sock.recv_multipart(zmq.NOBLOCK, copy=False)
                        except zmq.Again:
                            break
                        self._handle(frames)
                        if self._stop.is_set():
                            break
                if self._monitor is not None and self._monitor in events:
                    self._on_monitor()
                if self._init_parked:
                    self._serve_init_parked()
                self._expire_parked()
                now = time.monotonic()
                if self.log_every > 0 and now - t_log >= self.log_every:
                    last = self._log_throughput(now - t_log, last)
                    t_log = now
        finally:
            self._shutdown()

    def _shutdown(self) -> None:
        for p in self._parked:
            self._send(p.envelope, error_reply(p.req_id, "server shutting down", "internal"))
        self._parked.clear()
        self._init_parked.clear()
        if self.snapshot_dir and self.final_snapshot:
            try:
                self.periodic_snapshot()
            except Exception:  # the final snapshot must not hide the shutdown
                logger.exception("final snapshot failed")
        if self._monitor is not None:
            try:
                self._sock.disable_monitor()
            except zmq.ZMQError:
                pass
            self._monitor.close(linger=0)
            self._monitor = None
        if self._sock is not None:
            self._sock.close(linger=0)
            self._sock = None
        logger.info("paramserver on %s stopped at step %d", self.address, self.store.step)

    # ------------------------------------------------------------------ loop helpers
    def _poll_ms(self) -> int:
        wait = 0.1  # also how fast stop() is noticed
        if self._parked:
            wait = min(wait, max(0.0, min(p.deadline for p in self._parked) - time.monotonic()))
        return int(wait * 1000) + 1

    def _on_monitor(self) -> None:
        from zmq.utils.monitor import recv_monitor_message
        while True:
            try:
                ev = recv_monitor_message(self._monitor, zmq.NOBLOCK)
            except zmq.Again:
                return
            if ev["event"] == zmq.EVENT_ACCEPTED:
                self._peers += 1
                logger.info("client connected (fd %s, %d connected)", ev["value"], self._peers)
            elif ev["event"] == zmq.EVENT_DISCONNECTED:
                self._peers = max(0, self._peers - 1)
                logger.info("client disconnected (fd %s, %d connected)", ev["value"], self._peers)

    def _log_throughput(self, dt: float, last: dict) -> dict:
        st = self.store.stats()
        now = dict(self._counts, pulls=st["pulls"], pushes=st["pushes"], updates=st["updates"])
        r = {k: (now[k] - last[k]) / dt for k in now}
        if now["requests"] == last["requests"]:
            return now  # idle: no line
        logger.info("throughput: %.1f pulls/s %.1f pushes/s %.2f steps/s %.1f MB/s in %.1f MB/s out, step %d, %d connected",
                    r["pulls"], r["pushes"], r["updates"], r["bytes_in"] / 1e6, r["bytes_out"] / 1e6,
                    st["step"], self._peers)
        return now

    def _send(self, envelope: list, frames: list) -> None:
        try:
            self._sock.send_multipart(envelope + frames, copy=False)
        except zmq.ZMQError as e:  # peer gone or queue full: nothing more we can do for it
            logger.warning("reply not sent: %s", e)
            return
        self._counts["bytes_out"] += sum(getattr(f, "nbytes", None) or len(f) for f in frames)

    def _handle(self, frames: list) -> None:
        """One request: frames = ROUTER envelope + protocol frames."""
        t0, c0 = time.perf_counter(), time.thread_time()
        try:
            self._handle_request(frames)
        finally:
            self._counts["busy_s"] += time.perf_counter() - t0
            self._counts["cpu_s"] += time.thread_time() - c0

    def _handle_request(self, frames: list) -> None:
        self._counts["requests"] += 1
        if len(frames) < 2:  # only an identity frame: nothing to answer
            self._counts["errors"] += 1
            self._send(frames[:1], error_reply(None, "empty message: expected a JSON header frame", "protocol"))
            return
        envelope, body = _split_envelope(frames)
        nbytes = sum(len(f) for f in body)
        self._counts["bytes_in"] += nbytes
        req_id = _peek_id(body)   # echoed also when the rest of the message is malformed
        try:
            if nbytes - len(body[0]) > self.max_message_bytes:
                raise BadRequestError(f"request of {nbytes / 2**20:.1f} MiB exceeds this server's limit of "
                                      f"{self.max_message_bytes / 2**20:.0f} MiB per message (--max-message-mb); "
                                      f"send it in smaller blocks")
            header, arrays = decode(body)
            if not token_ok(header, self.token):
                raise PermissionError("unauthorized: missing or wrong token")
            op = header.get("op")
            if op not in OPS:
                raise ProtocolError(f"unknown op {op!r}; known: {list(OPS)}")
            if op in ROW_OPS and not self.store.rows_ready:
                self._init_parked.append((frames, time.monotonic() + self.max_wait))
                return
            reply = getattr(self, f"_op_{op}")(envelope, header, arrays)
        except (ProtocolError, StoreError, PermissionError) as e:
            self._counts["errors"] += 1
            reply = error_reply(_safe_id(req_id), str(e), _kind(e))
        except Exception as e:  # a bug must not take the server down; the client still gets a reply
            self._counts["errors"] += 1
            logger.exception("internal error on request")
            reply = error_reply(_safe_id(req_id), f"internal error: {type(e).__name__}: {e}", "internal")
        if reply is not None:
            self._send(envelope, reply)
        if self._update_due:
            due, self._update_due = self._update_due, None
            if due == "applied" or self._apply_pending():
                self._after_update()

    def _apply_pending(self) -> bool:
        """Apply the complete steps; True if any was. A failure is logged, not raised."""
        try:
            return self.store.apply_pending()
        except Exception:  # the step's pushes stay pending; their clients time out with a message
            self._counts["errors"] += 1
            logger.exception("applying the update of step %d failed", self.store.step)
            return False

    # ------------------------------------------------------------------ ops
    def info(self) -> dict:
        lo, hi = self.store.class_range
        return {"protocol": PROTOCOL_VERSION, "num_classes": self.store.total_classes, "rows": self.store.num_classes,
                "class_range": [lo, hi], "dim": self.store.dim, "dtype": str(self.store.dtype),
                "step": self.store.step, "num_clients": self.store.num_clients, "shard": list(self.shard),
                "optimizer": self.store.opt.to_dict(), "index": self.store.index is not None,
                "rows_ready": self.store.rows_ready, "sync_timeout": self.max_wait}

    def _op_ping(self, env: list, h: dict, arrays: list) -> list:
        return ok_reply(h.get("id"), step=self.store.step)

    def _op_info(self, env: list, h: dict, arrays: list) -> list:
        expect_arrays(h, arrays, 0)
        return ok_reply(h.get("id"), **self.info())

    def _op_register(self, env: list, h: dict, arrays: list) -> list:
        expect_arrays(h, arrays, 0)
        cid = get_field(h, "client_id", int)
        if not 0 <= cid < self.store.num_clients:
            raise BadRequestError(f"register: client_id {cid} not in [0, {self.store.num_clients})")
        dropped = self.store.forget_client(cid)
        if dropped:
            logger.warning("client %d registered again (peer %s): %d pending push(es) of its previous process "
                           "dropped", cid, env[0].bytes.hex(), dropped)
        else:
            logger.info("client %d registered (peer %s)", cid, env[0].bytes.hex())
        return ok_reply(h.get("id"), **self.info())

    def _op_stats(self, env: list, h: dict, arrays: list) -> list:
        expect_arrays(h, arrays, 0)
        return ok_reply(h.get("id"), stats=self.store.stats(), server=dict(self._counts, parked=len(self._parked),
                                                                              connected=self._peers))

    def _op_pull(self, env: list, h: dict, arrays: list) -> Optional[list]:
        expect_arrays(h, arrays, 1)
        matrix = get_field(h, "matrix", str, default="W")
        wire = get_field(h, "wire_dtype", str, default="native")
        if wire not in WIRE_DTYPES:
            raise BadRequestError(f"pull: wire_dtype must be one of {list(WIRE_DTYPES)}, got {wire!r}")
        ids = arrays[0]
        self._check_reply_size("pull", ids.size * self.store.dim * self.store.dtype.itemsize, f"{ids.size} rows")
        # Validate now so a bad pull fails at once rather than after waiting.
        self.store.check_matrix_held(matrix, "pull")
        self.store._local_ids(ids)

        def answer() -> list:
            rows = self.store.pull(ids, matrix=matrix)  # a fresh array: zmq sends it without a copy
            return ok_reply(h.get("id"), [to_bf16(rows) if wire == "bf16" else rows], step=self.store.step)

        return self._park_or_answer(env, h, answer)

    def _check_reply_size(self, op: str, nbytes: int, what: str) -> None:
        if nbytes > self.max_message_bytes:
            raise BadRequestError(f"{op}: the reply ({what}, {nbytes / 2**20:.0f} MiB) exceeds this server's limit of "
                                  f"{self.max_message_bytes / 2**20:.0f} MiB per message (--max-message-mb); ask in "
                                  f"smaller blocks")

    def _park_or_answer(self, env: list, h: dict, answer: Callable[[], list]) -> Optional[list]:
        """Answer now, or park until the store reaches the request's ``step`` (pull and query)."""
        step = get_field(h, "step", int, optional=True)
        if step is not None and step < 0:
            raise BadRequestError(f"{h.get('op')}: step must be >= 0, got {step}")
        if step is not None and self.store.step < step:
            wait = get_field(h, "timeout", float, default=self.max_wait)
            wait = min(max(wait, 0.0), self.max_wait)
            self._parked.append(_Parked(env, h.get("id"), answer, step, wait, str(h.get("op"))))
            return None
        return answer()

    def _op_push(self, env: list, h: dict, arrays: list) -> list:
        expect_arrays(h, arrays, 2)
        step = get_field(h, "step", int)
        lr = get_field(h, "lr", float)
        cid = get_field(h, "client_id", int, default=0)
        grads = arrays[1]
        if grads.dtype == np.uint16:  # bfloat16 bit patterns (store.wire_dtype=bf16): widen to the store's dtype
            grads = from_bf16(grads, self.store.dtype)
        # copy=False: the frame's buffer is immutable and stays alive with the array view.
        # apply=False: answer first, then update (in _handle), so the reply travels while we compute;
        # no other request is served before the update, so nobody can observe the difference.
        complete = self.store.push(arrays[0], grads, step, lr, client_id=cid, copy=False, apply=False)
        if not complete:
            return ok_reply(h.get("id"), applied=False, step=self.store.step)
        if self.store.pending_update_fits():   # surely accepted: answer now, update after the reply
            self._update_due = "apply"
            return ok_reply(h.get("id"), applied=True, step=self.store.step + 1)
        # The overflow guard may refuse this update: apply it first, so that the reply can say so
        # (the parked pulls are answered after this reply).
        if not self._apply_pending():
            return ok_reply(h.get("id"), applied=False, step=self.store.step)
        self._update_due = "applied"
        if self.store.update_refused(step):
            return ok_reply(h.get("id"), applied=False, refused="overflow", step=self.store.step)
        return ok_reply(h.get("id"), applied=True, step=self.store.step)

    def _op_set_rows(self, env: list, h: dict, arrays: list) -> list:
        expect_arrays(h, arrays, 2)
        self.store.set_rows(arrays[0], arrays[1], matrix=get_field(h, "matrix", str, default="W"))
        return ok_reply(h.get("id"), step=self.store.step)

    def _op_query(self, env: list, h: dict, arrays: list) -> list:
        if len(arrays) != 2:
            expect_arrays(h, arrays, 1)
        n = get_field(h, "n", int)
        # features finite float [B, d], n >= 1, labels in [0, K): refused now, not after a wait
        feats, labels = self.store.check_query(arrays[0], n, arrays[1] if len(arrays) == 2 else None)
        self._check_reply_size("query", feats.shape[0] * n * 12 if feats.ndim else 0,
                               f"{feats.shape[0] if feats.ndim else 0} x {n} candidates")

        def answer() -> list:
            # a writable copy (B x d, small): index libraries may not accept read-only frame views
            ids, scores = self.store.query(np.array(feats), n, labels=labels)
            return ok_reply(h.get("id"), [ids, scores], step=self.store.step)

        # with "step": answered once that step's update (and its index update) is applied
        return self._park_or_answer(env, h, answer)

    def _op_score(self, env: list, h: dict, arrays: list) -> Optional[list]:
        """Features [B, d] (and optionally ids [n]) -> (lse f8 [B], top-k scores f8 [B, k'], ids i8 [B, k'])
        over this shard's rows (WeightStore.score); parked like a pull when the header has a step."""
        if len(arrays) != 2:
            expect_arrays(h, arrays, 1)
        k = get_field(h, "k", int)
        scale = get_field(h, "scale", float, optional=True)
        feats = arrays[0]
        ids = arrays[1] if len(arrays) == 2 else None
        if feats.ndim != 2:
            raise BadRequestError(f"score: features must be [B, d], got shape {list(feats.shape)}")
        self._check_reply_size("score", feats.shape[0] * (8 + 16 * max(k, 0)), f"{feats.shape[0]} x {k} scores")
        if ids is not None:
            self.store._local_ids(ids, "score ids")      # validate now, not after a wait

        def answer() -> list:
            lse, top, top_ids = self.store.score(np.array(feats), k, ids=ids, scale=scale)
            return ok_reply(h.get("id"), [lse, top, top_ids], step=self.store.step)

        return self._park_or_answer(env, h, answer)

    def _op_snapshot(self, env: list, h: dict, arrays: list) -> list:
        expect_arrays(h, arrays, 0)
        path = get_field(h, "path", str, optional=True)
        if path is None:
            if not self.snapshot_dir:
                raise BadRequestError("snapshot: no path given and the server has no --snapshot-dir")
            path = self.periodic_snapshot()
        else:
            self.store.snapshot(path)
            keep = h.get("prune_keep")
            if keep is not None:
                if not (isinstance(keep, list) and all(isinstance(k, str) for k in keep)):
                    raise BadRequestError("snapshot: field 'prune_keep' must be a list of names")
                removed = snap.prune_snapshots(path, set(keep), get_field(h, "prune_level", int, default=0),
                                               keep_previous=True)
                if removed:
                    logger.info("snapshot %s: pruned %d older run snapshot(s)", path, removed)
        return ok_reply(h.get("id"), path=os.path.abspath(path), step=self.store.step)

    def _op_restore(self, env: list, h: dict, arrays: list) -> list:
        expect_arrays(h, arrays, 0)
        path = get_field(h, "path", str)
        try:
            path = resolve_snapshot(path)
        except FileNotFoundError as e:
            raise BadRequestError(str(e)) from None
        # Above 1 GiB the files are read straight into the live arrays (a second 10 GB matrix at 10M
        # classes would not fit); the manifest and the files' headers are checked before any byte is read.
        self.store.restore(path, in_place=self.store.rows_view().nbytes > RESTORE_IN_PLACE_BYTES)
        self._after_update()
        return ok_reply(h.get("id"), path=os.path.abspath(path), step=self.store.step)

    def _op_set_rebuild_every(self, env: list, h: dict, arrays: list) -> list:
        expect_arrays(h, arrays, 0)
        self.store.set_rebuild_every(get_field(h, "steps", int))
        return ok_reply(h.get("id"), step=self.store.step)

    def _op_shutdown(self, env: list, h: dict, arrays: list) -> list:
        logger.info("shutdown requested by peer %s", env[0].bytes.hex())
        self._stop.set()
        return ok_reply(h.get("id"), step=self.store.step)

    # ------------------------------------------------------------------ waiting pulls, snapshots
    def _after_update(self) -> None:
        """Answer the parked pulls whose step is reached; periodic snapshot."""
        if self._parked:
            still = []
            for p in self._parked:
                if self.store.step >= p.step:
                    try:
                        self._send(p.envelope, p.answer())
                    except StoreError as e:
                        self._send(p.envelope, error_reply(p.req_id, str(e), _kind(e)))
                    except Exception as e:  # a bug must not take the server down
                        logger.exception("internal error answering a parked %s", "request")
                        self._send(p.envelope, error_reply(_safe_id(p.req_id), f"internal error: {type(e).__name__}: {e}",
                                                           "internal"))
                else:
                    still.append(p)
            self._parked = still
        if self.snapshot_every and self.store.step % self.snapshot_every == 0:
            self.periodic_snapshot()

    def _serve_init_parked(self) -> None:
        """Requests that arrived while the rows were drawn: served in arrival order once they exist,
        refused (naming the reason) after max_wait."""
        if self.store.rows_ready:
            parked, self._init_parked = self._init_parked, []
            for frames, _ in parked:
                self._handle(frames)
            return
        now = time.monotonic()
        still = []
        for frames, deadline in self._init_parked:
            if now < deadline:
                still.append((frames, deadline))
                continue
            envelope, body = _split_envelope(frames)
            self._counts["errors"] += 1
            req_id = _peek_id(body)
            self._send(envelope, error_reply(_safe_id(req_id), "the server is still initialising its rows "
                                                       f"after {self.max_wait:.0f}s", "sync_timeout"))
        self._init_parked = still

    def _expire_parked(self) -> None:
        if not self._parked:
            return
        now = time.monotonic()
        still = []
        for p in self._parked:
            if now >= p.deadline:
                msg = self.store.timeout_message(p.step, p.waited, p.op)
                self._counts["errors"] += 1
                self._send(p.envelope, error_reply(p.req_id, msg, "sync_timeout"))
            else:
                still.append(p)
        self._parked = still

    def periodic_snapshot(self) -> str:
        """Snapshot into ``snapshot_dir/step-NNNNNNNNN``, point ``latest`` at it, prune old ones
        (:func:`paramserver.snapshot.write_periodic`)."""
        assert self.snapshot_dir
        t0 = time.monotonic()
        path = snap.write_periodic(self.snapshot_dir, self.store.step, self.store.snapshot, keep=self.keep_snapshots)
        logger.info("snapshot step %d -> %s in %.2fs", self.store.step, path, time.monotonic() - t0)
        return path


def _split_envelope(frames: list) -> tuple[list, list]:
    """ROUTER frames -> (envelope, protocol frames). DEALER: [identity, header, ...]; REQ: [identity,
    b"", header, ...]."""
    cut = 2 if frames[1].bytes == b"" and len(frames) > 2 else 1
    return list(frames[:cut]), list(frames[cut:])


def _peek_id(body: list) -> Any:
    """The ``id`` of a request whose header frame is a JSON object (whatever else is wrong with the
    message), so that every error reply a DEALER client gets can be matched; None otherwise."""
    if not body or len(body[0]) > MAX_HEADER_BYTES:
        return None
    try:
        header = json.loads(body[0].bytes.decode("utf-8"), parse_constant=lambda c: None)
    except (UnicodeDecodeError, ValueError, RecursionError):
        return None
    return _safe_id(header.get("id")) if isinstance(header, dict) else None


def _safe_id(req_id: Any) -> Any:
    """Echo the request id only if it can be encoded again (strict JSON)."""
    try:
        json.dumps(req_id, allow_nan=False)
        return req_id
    except (TypeError, ValueError):
        return None


def _kind(exc: BaseException) -> str:
    """The error 'kind' of a reply, so clients can raise the matching exception class."""
    if isinstance(exc, TimeoutError):
        return "sync_timeout"
    if isinstance(exc, StaleStepError):
        return "stale_step"
    if isinstance(exc, PermissionError):
        return "unauthorized"
    if isinstance(exc, StoreError):
        return "bad_request"
    if isinstance(exc, ProtocolError):
        return "protocol"
    return "internal"
