"""Wire protocol of the hfsoftmax parameter server (version 2), documented in docs/protocol.md.

Every message (request or reply) is one ZeroMQ multipart message:

    frame 0      : UTF-8 JSON object, the header
    frames 1..N  : raw array bytes, C order, little-endian, described by header["arrays"][i]

Transport: the server binds a ROUTER socket; clients use DEALER (or REQ) sockets. The ROUTER's
identity frame(s) (and a REQ client's empty delimiter) are transport envelope, not part of this
protocol. Array frames are sent without copying (``copy=False``) and read with ``np.frombuffer``.

Request header fields:
    v          int, protocol version, must be 2 (a JSON integer: true or 2.0 are refused; a peer
               speaking another version gets an error naming both versions)
    op         "info" | "register" | "pull" | "push" | "set_rows" | "query" | "score" | "snapshot" |
               "restore" | "stats" | "ping" | "shutdown" | "set_rebuild_every"
    id         any JSON value, echoed in the reply (lets a DEALER client match replies)
    arrays     list of {"dtype": str, "shape": [int, ...]}, one per array frame (may be omitted when
               there are none); dtype is a numpy type string from DTYPES ("<f4", "<i8", ...)
    token      str, the shared secret, required when the server was started with one
    matrix     "W" (default) or "momentum" (pull / set_rows)
    step       int (push; optional for pull, query and score: wait until the store has applied steps < step)
    wire_dtype "bf16" (pull: rows come back as bfloat16 bit patterns, dtype <u2)
    lr         float (push)
    client_id  int in [0, R) (push / register)
    timeout    float seconds (pull, query, score with step: longest wait; the server also caps it)
    n          int (query: candidates per feature)
    k, scale   int, float (score: top scores per feature; scale present: scale * cos, else F @ W^T)
    path       str (snapshot / restore: a directory on the server's machine)

Arrays per op (request -> reply):
    pull      [ids int32|int64 [n]]                     -> [rows dtype [n, d]]
    push      [ids [n], grads dtype [n, d]]             -> []  (reply has "applied": bool, "step", and
              "refused": "overflow" when the update this push completed was refused)
              grads may be <u2 [n, d]: bfloat16 bit patterns, widened to the store dtype
    set_rows  [ids [n], rows dtype [n, d]]              -> []
    query     [features float32|float64 [B, d]]         -> [ids int64 [B, n], scores float32 [B, n]]
              or [features, labels int32|int64 [B]] (the batch's global class ids; the graph index
              needs them, the other indexes ignore them); NaN/Inf features and labels outside [0, K)
              are refused
    score     [features [B, d]] or [features, ids [n]]  -> [lse float64 [B], scores float64 [B, k'],
              ids int64 [B, k']] (this shard's rows, or its rows among ids)
    others    []                                        -> []

Reply header: {"v": 2, "id": <echo>, "ok": true, "arrays": [...], ...op fields} or
{"v": 2, "id": <echo or null>, "ok": false, "error": "<reason>", "kind": <one of ERROR_KINDS>} (the id is
echoed whenever the header parsed). Every request gets exactly one reply (but a frame over twice the
message limit, which ZeroMQ drops); a malformed one gets an error reply and changes nothing.
"""
from __future__ import annotations

import hmac
import json
import logging
from typing import Any, Optional, Sequence

import numpy as np

logger = logging.getLogger(__name__)

PROTOCOL_VERSION = 2
OPS = ("info", "register", "pull", "push", "set_rows", "query", "score", "snapshot", "restore", "stats",
       "ping", "shutdown", "set_rebuild_every")
# Array dtypes accepted on the wire (little-endian only, so any client can produce them).
# "<u2" carries bfloat16 bit patterns (numpy has no bfloat16): see to_bf16 / from_bf16.
DTYPES = {"<f4": np.float32, "<f8": np.float64, "<i4": np.int32, "<i8": np.int64,
          "<u4": np.uint32, "<u8": np.uint64, "<u2": np.uint16}
WIRE_DTYPES = ("native", "bf16")
MAX_HEADER_BYTES = 1 << 20
MAX_NDIM = 4


class ProtocolError(ValueError):
    """A message that does not follow this protocol (the reason is sent back to the peer)."""


def dtype_code(dtype: Any) -> str:
    """numpy dtype -> wire string ("<f4" ...); raises ProtocolError for unsupported types."""
    code = np.dtype(dtype).str
    if code not in DTYPES:
        raise ProtocolError(f"dtype {np.dtype(dtype)} is not sent on the wire; allowed: {sorted(DTYPES)}")
    return code


def encode(header: dict, arrays: Sequence[np.ndarray] = ()) -> list:
    """Header dict + arrays -> list of frames; arrays are passed as buffers (no copy when contiguous)."""
    descs = []
    bufs = []
    for a in arrays:
        a = np.ascontiguousarray(a)
        descs.append({"dtype": dtype_code(a.dtype), "shape": list(a.shape)})
        bufs.append(a if a.size else b"")
    h = dict(header)
    h["v"] = PROTOCOL_VERSION
    h["arrays"] = descs
    return [json.dumps(h, separators=(",", ":"), allow_nan=False).encode("utf-8")] + bufs


def to_bf16(x: np.ndarray) -> np.ndarray:
    """float32 [...] -> uint16 [...] bfloat16 bit patterns, rounded to nearest even (NaN stays NaN)."""
    u = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    rounded = ((u + (np.uint32(0x7FFF) + ((u >> np.uint32(16)) & np.uint32(1)))) >> np.uint32(16)).astype(np.uint16)
    nan = np.isnan(x)
    if nan.any():
        rounded[nan] = np.uint16(0x7FC0)
    return rounded


def from_bf16(b: np.ndarray, dtype: Any = np.float32) -> np.ndarray:
    """uint16 bfloat16 bit patterns [...] -> float array [...] (exact: bf16 is float32's top half)."""
    out = (np.asarray(b, dtype=np.uint16).astype(np.uint32) << np.uint32(16)).view(np.float32)
    return out if np.dtype(dtype) == np.float32 else out.astype(dtype)


def _reject_constant(name: str) -> Any:
    raise ProtocolError(f"{name} is not valid JSON")


def _frame_buffer(frame: Any) -> memoryview:
    buf = getattr(frame, "buffer", None)  # zmq.Frame received with copy=False: no copy
    if buf is not None:
        return buf
    return memoryview(frame).cast("B") if isinstance(frame, np.ndarray) else memoryview(frame)


def decode(frames: Sequence[Any]) -> tuple[dict, list[np.ndarray]]:
    """List of frames -> (header, arrays). Arrays are views of the frames (zero copy).

    A frame received with ``copy=False`` is the receiver's own memory and its array is writable;
    over inproc:// that memory is the sender's buffer, so a sender must not reuse what it sent.

    Raises ProtocolError naming the field at fault for any malformed message.
    """
    if len(frames) == 0:
        raise ProtocolError("empty message: expected a JSON header frame")
    raw = _frame_buffer(frames[0])
    if raw.nbytes > MAX_HEADER_BYTES:
        raise ProtocolError(f"header frame of {raw.nbytes} bytes exceeds {MAX_HEADER_BYTES}")
    try:
        header = json.loads(bytes(raw).decode("utf-8"), parse_constant=_reject_constant)
    except (UnicodeDecodeError, json.JSONDecodeError, ProtocolError) as e:
        raise ProtocolError(f"header frame is not valid UTF-8 JSON ({e})") from None
    if not isinstance(header, dict):
        raise ProtocolError(f"header must be a JSON object, got {type(header).__name__}")
    v = header.get("v")
    if type(v) is not int:  # true == 1 and 1.0 == 1 in Python: neither is a version
        raise ProtocolError(f"header field 'v' must be the integer {PROTOCOL_VERSION}, got {v!r}")
    if v != PROTOCOL_VERSION:
        raise ProtocolError(f"protocol version mismatch: the message speaks version {v}, this side speaks "
                            f"version {PROTOCOL_VERSION}; upgrade the older of client and server")
    descs = header.get("arrays", [])
    if not isinstance(descs, list):
        raise ProtocolError("header field 'arrays' must be a list")
    if len(descs) != len(frames) - 1:
        raise ProtocolError(f"wrong frame count: header describes {len(descs)} arrays, message has "
                            f"{len(frames) - 1} array frames")
    arrays = []
    for i, desc in enumerate(descs):
        if not isinstance(desc, dict):
            raise ProtocolError(f"arrays[{i}] must be an object with dtype and shape")
        code, shape = desc.get("dtype"), desc.get("shape")
        if code not in DTYPES:
            raise ProtocolError(f"arrays[{i}].dtype {code!r} not supported; allowed: {sorted(DTYPES)}")
        if (not isinstance(shape, list) or len(shape) > MAX_NDIM
                or any(not isinstance(s, int) or isinstance(s, bool) or s < 0 for s in shape)):
            raise ProtocolError(f"arrays[{i}].shape must be a list of at most {MAX_NDIM} non-negative ints, got {shape!r}")
        dt = np.dtype(DTYPES[code])
        buf = _frame_buffer(frames[i + 1])
        want = int(np.prod(shape, dtype=np.int64)) * dt.itemsize if shape else dt.itemsize
        if buf.nbytes != want:
            raise ProtocolError(f"arrays[{i}]: frame has {buf.nbytes} bytes, {code}{shape} needs {want}")
        arrays.append(np.frombuffer(buf, dtype=dt).reshape(shape) if want else np.empty(shape, dtype=dt))
    return header, arrays


ERROR_KINDS = ("protocol", "bad_request", "stale_step", "sync_timeout", "unauthorized", "internal")


def error_reply(req_id: Any, message: str, kind: str = "bad_request") -> list:
    """Frames of an error reply; ``kind`` (one of ERROR_KINDS) lets a client pick an exception class."""
    return encode({"id": req_id, "ok": False, "error": message, "kind": kind})


def ok_reply(req_id: Any, arrays: Sequence[np.ndarray] = (), **fields: Any) -> list:
    """Frames of a success reply carrying ``arrays`` and extra header ``fields``."""
    return encode({"id": req_id, "ok": True, **fields}, arrays)


def get_field(header: dict, name: str, kind: type | tuple, default: Any = ..., optional: bool = False) -> Any:
    """A typed header field; raises ProtocolError naming it when missing or of the wrong type."""
    if name not in header or header[name] is None:
        if default is not ...:
            return default
        if optional:
            return None
        raise ProtocolError(f"header field {name!r} is required")
    val = header[name]
    kinds = kind if isinstance(kind, tuple) else (kind,)
    if isinstance(val, bool) and bool not in kinds:
        raise ProtocolError(f"header field {name!r} must be {' or '.join(k.__name__ for k in kinds)}, got bool")
    if float in kinds and isinstance(val, int) and not isinstance(val, bool):
        val = float(val)
    if not isinstance(val, kinds):
        raise ProtocolError(f"header field {name!r} must be {' or '.join(k.__name__ for k in kinds)}, "
                            f"got {type(val).__name__}")
    return val


def expect_arrays(header: dict, arrays: list, count: int) -> None:
    if len(arrays) != count:
        raise ProtocolError(f"op {header.get('op')!r} takes {count} array frame(s), got {len(arrays)}")


def token_ok(header: dict, token: Optional[str]) -> bool:
    """True if no token is required or the header carries the right one (constant-time compare)."""
    if token is None:
        return True
    got = header.get("token")
    return isinstance(got, str) and hmac.compare_digest(got.encode("utf-8"), token.encode("utf-8"))
