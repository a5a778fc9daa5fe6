"""RemoteStore: the WeightStore API over ZeroMQ, fanned out to S range shards (HF-softmax's PS client).

Shard i of S (the i-th address) holds class ids ``shard_ranges(K, S)[i]``. A call splits its ids by
shard, sends all requests at once (one DEALER socket per shard), waits for every reply with one
poll loop, and merges them in id order. Every call has a deadline; a shard that does not answer in
time raises ``TimeoutError`` naming its address, and its socket is rebuilt (stale replies can never
be mistaken for new ones, and ZeroMQ reconnects by itself when a server comes back). Server errors
are raised as the same exception classes the in-process store raises (BadRequestError,
StaleStepError, SyncTimeoutError), prefixed with the server address.

A RemoteStore is not thread-safe (ZeroMQ sockets are not); calls are serialised with a lock. Use one
per trainer process.
"""
from __future__ import annotations

import itertools
import logging
import os
import threading
import time
from typing import Any, Optional, Sequence

import numpy as np
import zmq

from paramserver.protocol import WIRE_DTYPES, ProtocolError, decode, encode, from_bf16, to_bf16
from paramserver.api import BadRequestError, StaleStepError, StoreError, SyncTimeoutError
from paramserver.snapshot import shard_dir, shard_level
from paramserver.store import shard_ranges

logger = logging.getLogger(__name__)


class RemoteError(StoreError):
    """An error reply from a server that maps to no more specific class."""


class AuthError(RemoteError, PermissionError):
    """The server refused the request's token."""


_KIND_TO_EXC = {"bad_request": BadRequestError, "stale_step": StaleStepError, "sync_timeout": SyncTimeoutError,
                "unauthorized": AuthError, "protocol": RemoteError, "internal": RemoteError}


class RemoteStore:
    """Client of S ``paramserver.py`` shards: a :class:`paramserver.api.Store`, as
    :class:`paramserver.store.WeightStore` is.

    Args:
        addresses: one ZeroMQ address per shard, in shard order (a single string is one shard).
        num_classes: K of the whole matrix.
        dim: d.
        timeout: seconds any call may take before TimeoutError (a pull waiting for a step asks the
            server to give up a little earlier so its error, naming the missing clients, arrives first).
        token: shared secret, sent with every request when set.
        client_id: this trainer's id in [0, R) for synchronous pushes.
        check: on construction, ask every shard for its ``info`` and check K, d and its class range
            (catches a wrong address order or a server started with other sizes).
        context: ZeroMQ context (default: the global instance).
        wire_dtype: "native" (the store dtype) or "bf16": pulled rows and pushed gradients travel as
            bfloat16 (half the bytes; the server keeps and updates W in its own dtype).
    """

    def __init__(self, addresses: Sequence[str] | str, num_classes: int, dim: int, timeout: float = 30.0,
                 token: Optional[str] = None, client_id: int = 0, check: bool = True,
                 context: Optional[zmq.Context] = None, wire_dtype: str = "native") -> None:
        if isinstance(addresses, str):
            addresses = [addresses]
        if not addresses:
            raise ValueError("RemoteStore: at least one address is required")
        if timeout <= 0:
            raise ValueError(f"RemoteStore: timeout must be > 0, got {timeout}")
        if wire_dtype not in WIRE_DTYPES:
            raise ValueError(f"RemoteStore: wire_dtype must be one of {list(WIRE_DTYPES)}, got {wire_dtype!r}")
        self.wire_dtype = wire_dtype
        self.addresses = list(addresses)
        self._K, self._d = int(num_classes), int(dim)
        self.ranges = shard_ranges(self._K, len(self.addresses))
        self._bounds = np.array([hi for _, hi in self.ranges], dtype=np.int64)  # [S] exclusive upper ends
        self.timeout = float(timeout)
        self.token = token
        self.client_id = int(client_id)
        self._ctx = context or zmq.Context.instance()
        self._socks: list[Optional[zmq.Socket]] = [None] * len(self.addresses)
        self._ids = itertools.count(1)
        self._lock = threading.Lock()
        self._dtype: Optional[np.dtype] = None
        self._closed = False
        if check:
            for i, inf in enumerate(self.info()):
                want = {"num_classes": self._K, "dim": self._d, "class_range": list(self.ranges[i])}
                for key, val in want.items():
                    if inf.get(key) != val:
                        self.close()
                        raise ValueError(f"RemoteStore: server {self.addresses[i]} (shard {i} of {len(self.addresses)}) "
                                         f"reports {key}={inf.get(key)!r}, expected {val!r}")
                self._dtype = np.dtype(inf["dtype"])

    # ------------------------------------------------------------------ transport
    def _sock(self, i: int) -> zmq.Socket:
        s = self._socks[i]
        if s is None:
            s = self._ctx.socket(zmq.DEALER)
            s.setsockopt(zmq.LINGER, 0)
            s.setsockopt(zmq.RECONNECT_IVL, 100)
            s.setsockopt(zmq.RECONNECT_IVL_MAX, 1000)
            s.connect(self.addresses[i])
            self._socks[i] = s
        return s

    def _reset(self, i: int) -> None:
        """Drop shard i's socket (and anything queued or late on it); the next call reconnects."""
        s = self._socks[i]
        if s is not None:
            s.close(linger=0)
            self._socks[i] = None

    def _call(self, requests: dict[int, tuple[dict, Sequence[np.ndarray]]],
              timeout: Optional[float] = None) -> dict[int, tuple[dict, list[np.ndarray]]]:
        """Send one request per shard (shard -> (header, arrays)), wait for all replies, raise on errors."""
        if self._closed:
            raise RuntimeError("RemoteStore is closed")
        limit = self.timeout if timeout is None else timeout
        with self._lock:
            deadline = time.monotonic() + limit
            want: dict[int, int] = {}
            for i, (header, arrays) in requests.items():
                rid = next(self._ids)
                h = dict(header, id=rid)
                if self.token is not None:
                    h["token"] = self.token
                try:
                    self._sock(i).send_multipart(encode(h, arrays), copy=False, flags=zmq.NOBLOCK)
                except zmq.Again:
                    self._reset(i)
                    raise TimeoutError(f"paramserver {self.addresses[i]}: send queue full (server down?)") from None
                want[i] = rid
            replies: dict[int, tuple[dict, list[np.ndarray]]] = {}
            poller = zmq.Poller()
            for i in want:
                poller.register(self._socks[i], zmq.POLLIN)
            by_sock = {self._socks[i]: i for i in want}
            while len(replies) < len(want):
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                for sock, _ in poller.poll(int(left * 1000) + 1):
                    i = by_sock[sock]
                    while i not in replies:
                        try:
                            frames = sock.recv_multipart(zmq.NOBLOCK, copy=False)
                        except zmq.Again:
                            break
                        try:
                            header, arrays = decode(frames)
                        except ProtocolError as e:
                            raise RemoteError(f"paramserver {self.addresses[i]}: malformed reply ({e})") from None
                        if header.get("id") != want[i]:
                            continue  # a late reply to an earlier, abandoned request
                        replies[i] = (header, arrays)
                        poller.unregister(sock)
            missing = [i for i in want if i not in replies]
            for i in missing:
                self._reset(i)
            if missing:
                op = requests[missing[0]][0].get("op")
                raise TimeoutError(f"paramserver {', '.join(self.addresses[i] for i in missing)}: no reply to "
                                   f"'{op}' within {limit:.1f}s (server down or unreachable?)")
        for i, (header, _) in replies.items():
            if not header.get("ok"):
                exc = _KIND_TO_EXC.get(header.get("kind"), RemoteError)
                raise exc(f"paramserver {self.addresses[i]}: {header.get('error')}")
        return replies

    def _all(self, header: dict, timeout: Optional[float] = None) -> list[dict]:
        reps = self._call({i: (header, ()) for i in range(len(self.addresses))}, timeout)
        return [reps[i][0] for i in range(len(self.addresses))]

    def _split(self, ids: Any) -> tuple[np.ndarray, list[np.ndarray]]:
        """ids -> (int64 ids, per-shard position arrays); raises BadRequestError for bad ids."""
        arr = np.asarray(ids)
        if arr.ndim != 1:
            raise BadRequestError(f"ids: expected a 1-D array of row ids, got shape {list(arr.shape)}")
        if arr.dtype.kind not in "iu":
            if arr.size:
                raise BadRequestError(f"ids: row ids must be integers, got dtype {arr.dtype}")
        arr = arr.astype(np.int64, copy=False)
        if arr.size and (arr.min() < 0 or arr.max() >= self._K):
            bad = int(np.flatnonzero((arr < 0) | (arr >= self._K))[0])
            raise BadRequestError(f"ids: row id {int(arr[bad])} at position {bad} is out of range [0, {self._K})")
        if len(self.addresses) == 1:
            return arr, [np.arange(len(arr))]
        shard = np.searchsorted(self._bounds, arr, side="right")  # [n] shard of each id
        return arr, [np.flatnonzero(shard == i) for i in range(len(self.addresses))]

    # ------------------------------------------------------------------ WeightStore API
    @property
    def num_classes(self) -> int:
        return self._K

    @property
    def dim(self) -> int:
        return self._d

    @property
    def step(self) -> int:
        """The smallest step over the shards (they move together under synchronous pushes)."""
        return min(int(h["step"]) for h in self._all({"op": "ping"}))

    def info(self) -> list[dict]:
        """Per-shard info: num_classes, rows, class_range, dim, dtype, step, num_clients, shard, optimizer."""
        return [{k: v for k, v in h.items() if k not in ("v", "id", "ok", "arrays")} for h in self._all({"op": "info"})]

    def register(self) -> None:
        """Announce this client's id to every shard (logged by the servers)."""
        self._all({"op": "register", "client_id": self.client_id})

    def _step_fields(self, header: dict, step: Optional[int], limit: float) -> dict:
        if step is not None:
            header["step"] = int(step)
            header["timeout"] = max(limit * 0.9 - 0.05, 0.0)  # the server's error names the missing clients
        return header

    def pull(self, ids: Any, step: Optional[int] = None, timeout: Optional[float] = None,
             matrix: str = "W") -> np.ndarray:
        """Rows ``ids`` [n, d]; with ``step``, the servers first wait until that step is reached.

        With ``wire_dtype="bf16"`` (constructor) the rows travel as bfloat16 and come back as
        float32 rounded to bfloat16 (half the bytes)."""
        arr, parts = self._split(ids)
        limit = self.timeout if timeout is None else float(timeout)
        header: dict[str, Any] = {"op": "pull", "matrix": matrix}
        if self.wire_dtype != "native":
            header["wire_dtype"] = self.wire_dtype
        self._step_fields(header, step, limit)
        reqs = {i: (header, [arr[p]] if len(parts) > 1 else [arr]) for i, p in enumerate(parts)
                if len(p) or (step is not None)}
        if not reqs:  # no ids and no step to wait for
            return np.empty((0, self._d), dtype=self._dtype or np.float32)
        reps = self._call(reqs, limit)
        if self.wire_dtype == "bf16":
            for i in reps:
                reps[i][1][0] = from_bf16(reps[i][1][0])
        if len(parts) == 1:
            rows = reps[0][1][0]
            # The received frame is this process's own memory (writable, kept alive by the array): no
            # copy. The server sends a fresh array per pull, so even over inproc nothing else holds it.
            return rows if rows.flags.writeable else np.array(rows)
        first = next(iter(reps.values()))[1][0]
        out = np.empty((len(arr), self._d), dtype=first.dtype)
        for i, p in enumerate(parts):
            if len(p):
                out[p] = reps[i][1][0]
        return out

    def push(self, ids: Any, grads: np.ndarray, step: int, lr: float, client_id: Optional[int] = None) -> bool:
        """Push row gradients for ``step``; every shard gets a push (possibly empty) so all of them
        complete the step. Returns True if every shard applied its update with this push (False
        also where a shard refused the step's update for overflow: reply ``refused``, logged)."""
        arr, parts = self._split(ids)
        grads = np.asarray(grads)
        if grads.ndim != 2 or grads.shape[0] != len(arr):
            raise BadRequestError(f"push grads: shape {list(grads.shape)} does not match [{len(arr)}, {self._d}]")
        header = {"op": "push", "step": int(step), "lr": float(lr),
                  "client_id": self.client_id if client_id is None else int(client_id)}
        if self.wire_dtype == "bf16" and grads.dtype != np.uint16:
            grads = to_bf16(grads)  # the server widens them back to its dtype
        if len(parts) == 1:
            reqs = {0: (header, [arr, grads])}
        else:
            reqs = {i: (header, [arr[p], grads[p]]) for i, p in enumerate(parts)}
        reps = self._call(reqs)
        refused = [f"{self.addresses[i]} ({h['refused']})" for i, (h, _) in reps.items() if h.get("refused")]
        if refused:   # the step is done (the store moved on) but W was left unchanged there
            logger.warning("push of step %d: the update was refused by %s; W unchanged there (stats: "
                           "refused_updates)", int(step), ", ".join(refused))
        return all(bool(h.get("applied")) for h, _ in reps.values())

    def set_rows(self, ids: Any, rows: np.ndarray, matrix: str = "W") -> None:
        """Overwrite rows ``ids`` of ``matrix`` on their shards."""
        arr, parts = self._split(ids)
        rows = np.asarray(rows)
        if rows.ndim != 2 or rows.shape[0] != len(arr):
            raise BadRequestError(f"set_rows rows: shape {list(rows.shape)} does not match [{len(arr)}, {self._d}]")
        header = {"op": "set_rows", "matrix": matrix}
        self._call({i: (header, [arr[p], rows[p]]) for i, p in enumerate(parts) if len(p)})

    def query(self, features: np.ndarray, n: int, labels: Optional[np.ndarray] = None, step: Optional[int] = None,
              timeout: Optional[float] = None) -> tuple[np.ndarray, np.ndarray]:
        """Top-``n`` classes per feature over all shards: (ids int64 [B, n], scores float32 [B, n]).

        Each shard answers from its own index; candidates are concatenated along axis 1 and the n
        best by score are kept per row (stable, so ties keep shard order). With ``step`` each shard
        answers once it has applied the updates of the steps before it (as :meth:`pull`).
        """
        arrays = [np.ascontiguousarray(features)]
        if labels is not None:
            arrays.append(np.ascontiguousarray(labels, dtype=np.int64))
        limit = self.timeout if timeout is None else float(timeout)
        header = self._step_fields({"op": "query", "n": int(n)}, step, limit)
        reps = self._call({i: (header, arrays) for i in range(len(self.addresses))}, limit)
        ids = np.concatenate([reps[i][1][0] for i in range(len(self.addresses))], axis=1)
        scores = np.concatenate([reps[i][1][1] for i in range(len(self.addresses))], axis=1)
        if len(self.addresses) == 1:
            return np.array(ids), np.array(scores)
        top = np.argsort(-scores, axis=1, kind="stable")[:, :n]  # [B, n]
        return np.take_along_axis(ids, top, axis=1), np.take_along_axis(scores, top, axis=1)

    def score(self, features: np.ndarray, k: int, ids: Any = None, scale: Optional[float] = None,
              step: Optional[int] = None, timeout: Optional[float] = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """:meth:`paramserver.store.WeightStore.score` over all shards: each scores its own rows (of
        ``ids``, or all), the log-sum-exps add up and the top-``k`` lists merge by score."""
        feats = np.ascontiguousarray(features)
        limit = self.timeout if timeout is None else float(timeout)
        header = {"op": "score", "k": int(k)}
        if scale is not None:
            header["scale"] = float(scale)
        header = self._step_fields(header, step, limit)
        if ids is None:
            reqs = {i: (header, [feats]) for i in range(len(self.addresses))}
        else:
            arr, parts = self._split(ids)
            reqs = {i: (header, [feats, np.ascontiguousarray(arr[pos])]) for i, pos in enumerate(parts) if pos.size}
        if not reqs:                                   # no ids at all: nothing scored
            B = feats.shape[0]
            return np.full(B, -np.inf), np.empty((B, 0)), np.empty((B, 0), dtype=np.int64)
        reps = self._call(reqs, limit)
        lse = np.logaddexp.reduce(np.stack([reps[i][1][0] for i in reqs]), axis=0)
        scores = np.concatenate([reps[i][1][1] for i in reqs], axis=1)
        top_ids = np.concatenate([reps[i][1][2] for i in reqs], axis=1)
        if len(reqs) == 1:
            return np.array(lse), np.array(scores), np.array(top_ids)
        top = np.argsort(-scores, axis=1, kind="stable")[:, :k]
        return lse, np.take_along_axis(scores, top, axis=1), np.take_along_axis(top_ids, top, axis=1)

    def snapshot(self, path: str, prune_keep: Optional[Sequence[str]] = None) -> list[dict]:
        """Every shard writes its snapshot on its own machine: ``path`` (S = 1) or
        ``path/shard-III-of-SSS``. Returns the per-shard replies (path, step). ``prune_keep``: each
        server then removes, on its machine, the older ``store_NNNNNNNN`` siblings of ``path``
        except these names (the trainer's run directory may live on another machine)."""
        def header(i: int) -> dict:
            h: dict[str, Any] = {"op": "snapshot", "path": shard_dir(path, i, len(self.addresses))}
            if prune_keep is not None:
                h["prune_keep"] = sorted({os.path.basename(path), *prune_keep})
                h["prune_level"] = shard_level(len(self.addresses))
            return h

        reps = self._call({i: (header(i), ()) for i in range(len(self.addresses))})
        return [{"path": reps[i][0]["path"], "step": reps[i][0]["step"]} for i in range(len(self.addresses))]

    def restore(self, path: str) -> list[dict]:
        """Every shard loads its part of a snapshot written by :meth:`snapshot` (paths as there)."""
        reps = self._call({i: ({"op": "restore", "path": shard_dir(path, i, len(self.addresses))}, ())
                           for i in range(len(self.addresses))})
        return [{"path": reps[i][0]["path"], "step": reps[i][0]["step"]} for i in range(len(self.addresses))]

    def clone(self) -> "RemoteStore":
        """Another client of the same shards with its own sockets (for a second thread, e.g. a
        background pusher: a RemoteStore serialises its calls, so one blocked in a waiting pull
        would otherwise hold up the push that pull is waiting for)."""
        c = RemoteStore(self.addresses, self._K, self._d, timeout=self.timeout, token=self.token,
                        client_id=self.client_id, check=False, context=self._ctx, wire_dtype=self.wire_dtype)
        c._dtype = self._dtype
        return c

    @property
    def name(self) -> str:
        return ", ".join(self.addresses)

    def stats(self) -> dict:
        """Summed rows/bytes/pushes/pulls over the shards, min step, the per-shard dicts, and the first
        shard's class index stats as ``index`` (every shard rebuilds on the same steps)."""
        shards = [h["stats"] for h in self._all({"op": "stats"})]
        out: dict[str, Any] = {"step": min(s["step"] for s in shards), "shards": shards}
        if isinstance(shards[0].get("index"), dict):
            out["index"] = shards[0]["index"]
        for key in ("rows", "bytes", "pushes", "pulls", "rows_pushed", "rows_pulled"):
            out[key] = sum(s[key] for s in shards)
        return out

    def set_rebuild_every(self, steps: int) -> None:
        """Set every shard's index rebuild period T (minimum steps between builds)."""
        self._all({"op": "set_rebuild_every", "steps": int(steps)})

    def shutdown(self) -> None:
        """Ask every shard to stop (final snapshot if it was started with one)."""
        self._all({"op": "shutdown"})

    def close(self) -> None:
        for i in range(len(self._socks)):
            self._reset(i)
        self._closed = True

    def __enter__(self) -> "RemoteStore":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
