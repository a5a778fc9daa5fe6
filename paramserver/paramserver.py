"""Command line entry of the HF-softmax parameter server: serve one shard of the class matrix.

    python paramserver/paramserver.py --bind tcp://127.0.0.1:5570 --num-classes K --dim d \\
        --num-clients R [--shard i/S] [--snapshot-dir DIR] [--restore PATH] [--snapshot-every N] \\
        [--token T] [--momentum M --weight-decay WD --nesterov] [--seed S] [--ready-file PATH] \\
        [--index forest|ivf|graph|hnsw|exact|random --metric angular|dot --rebuild-every T --ntrees 50 ...]

Prints ``paramserver listening on tcp://...`` (the actual address, also for port 0 / ``*``) when
ready, and writes that address to ``--ready-file`` atomically. SIGINT/SIGTERM stop it cleanly, with
a final snapshot into ``--snapshot-dir`` unless ``--no-final-snapshot``. Wire protocol:
docs/protocol.md.
"""
from __future__ import annotations

import os
import sys

# This script is named like its package and sits inside it: drop the script's own directory from
# sys.path (so `import paramserver` does not import this file) and put the repository root first.
_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.getcwd()) != _HERE]
sys.path.insert(0, os.path.dirname(_HERE))

import argparse  # noqa: E402
import logging  # noqa: E402
import signal  # noqa: E402
from typing import Optional, Sequence  # noqa: E402

from paramserver.open import INDEX_NAMES, IndexSpec, StoreSpec, defaults, open_store  # noqa: E402
from paramserver.server import ParamServer, read_token_file, resolve_snapshot  # noqa: E402
from paramserver.store import WeightStore  # noqa: E402

STORE, INDEX = defaults(StoreSpec), defaults(IndexSpec)     # the one place defaults are declared

logger = logging.getLogger("paramserver")


def parse_shard(text: str) -> tuple[int, int]:
    try:
        i, s = (int(x) for x in text.split("/"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--shard must be i/S (e.g. 0/2), got {text!r}") from None
    if not (s >= 1 and 0 <= i < s):
        raise argparse.ArgumentTypeError(f"--shard {text}: need 0 <= i < S")
    return i, s


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="paramserver/paramserver.py", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--bind", default="tcp://127.0.0.1:5570",
                   help="ZeroMQ address; port 0 or * picks a free one; non-loopback needs --token")
    p.add_argument("--num-classes", type=int, help="K of the whole matrix (not needed with --restore)")
    p.add_argument("--dim", type=int, help="feature dimension d (not needed with --restore)")
    p.add_argument("--num-clients", type=int, default=STORE["num_clients"], help="R: clients whose pushes make one synchronous step")
    p.add_argument("--shard", type=parse_shard, default=STORE["shard"], help="serve shard i of S (ids split by range)")
    p.add_argument("--dtype", default=STORE["dtype"], choices=["float32", "float64"])
    p.add_argument("--init", default=STORE["init"], choices=["normal", "uniform", "zeros"])
    p.add_argument("--init-std", type=float, default=STORE["init_std"])
    p.add_argument("--seed", type=int, default=STORE["seed"])
    p.add_argument("--momentum", type=float, default=STORE["momentum"])
    p.add_argument("--weight-decay", type=float, default=STORE["weight_decay"])
    p.add_argument("--nesterov", action="store_true")
    p.add_argument("--sparse-momentum", default=STORE["sparse_momentum"], choices=["lazy", "unrolled"],
                   help="momentum of rows touched on few steps: unrolled = each push moves its rows by the "
                        "whole series lr/(1-m) at once (default; see paramserver/optim.py), lazy = torch.optim.SGD "
                        "on the touched rows")
    p.add_argument("--exact-rounding", action="store_true",
                   help="round like torch's fused CPU kernels (bit-identical to torch.optim.SGD, slower)")
    p.add_argument("--sync-timeout", type=float, default=STORE["sync_timeout"], help="longest wait of a pull for its step (s)")
    p.add_argument("--snapshot-dir", help="directory of step-NNNNNNNNN snapshots (+ 'latest')")
    p.add_argument("--snapshot-every", type=int, default=0, help="snapshot every N applied steps (0: never)")
    p.add_argument("--no-final-snapshot", action="store_true", help="no snapshot on SIGINT/SIGTERM/shutdown")
    p.add_argument("--restore", help="snapshot directory (or a --snapshot-dir: its newest) to start from")
    p.add_argument("--token", default=None,
                   help="shared secret required in every request (visible in ps: prefer $PARAMSERVER_TOKEN "
                        "or --token-file)")
    p.add_argument("--token-file", default=None, help="file (mode 0600) holding the shared secret")
    p.add_argument("--max-message-mb", type=int, default=2048,
                   help="largest request accepted and reply sent, in MiB (a bigger pull is refused by name)")
    p.add_argument("--index", default=INDEX["name"], choices=list(INDEX_NAMES),
                   help="class index for HF-softmax's query op (paramserver/index/), built over this "
                        "shard's rows at start and rebuilt in the background; none: no query op")
    p.add_argument("--metric", default=INDEX["metric"], choices=["angular", "dot"],
                   help="index metric: angular for CosFace/ArcFace heads, dot for a plain linear head")
    p.add_argument("--rebuild-every", type=int, default=INDEX["rebuild_every"], help="T: minimum applied steps between index builds")
    p.add_argument("--deterministic", default=INDEX["deterministic"], choices=["auto", "on", "off"],
                   help="index swaps at multiples of T from a copy of W taken at the build's start (bitwise "
                        "reproducible runs; every client waits for a build that outlasts T steps); auto: on "
                        "up to 64 MiB of W; off: builds go live when done")
    p.add_argument("--ntrees", type=int, default=INDEX["ntrees"], help="forest: Annoy trees")
    p.add_argument("--search-k", type=int, default=INDEX["search_k"], help="forest: Annoy search_k (-1: ntrees * n)")
    p.add_argument("--nlist", type=int, default=INDEX["nlist"], help="ivf, graph: k-means lists (0: about sqrt(rows))")
    p.add_argument("--degree", type=int, default=INDEX["degree"], help="graph: neighbours kept per class")
    p.add_argument("--nprobe", type=int, default=INDEX["nprobe"],
                   help="ivf: lists probed per query; graph: per sample whose label row is still cold")
    p.add_argument("--ready-file", help="write the bound address here (atomically) once listening")
    p.add_argument("--log-every", type=float, default=30.0, help="seconds between throughput lines")
    p.add_argument("--log-level", default="INFO")
    return p


def specs(args: argparse.Namespace) -> tuple[StoreSpec, IndexSpec]:
    """The command line as the specs every store is opened from (paramserver/open.py)."""
    store = StoreSpec(**{f: getattr(args, f) for f in STORE if f not in ("num_classes", "dim")},
                      num_classes=args.num_classes or 0, dim=args.dim or 0)
    index = IndexSpec(**{f: getattr(args, f) for f in INDEX if f != "name"}, name=args.index)
    return store, index


def open_from_args(args: argparse.Namespace) -> WeightStore:
    """The shard's store with its index attached (first build started), as ``main`` serves it; bad
    input is a one-line SystemExit naming the flag or the snapshot."""
    store_spec, index_spec = specs(args)
    if not args.restore and (args.num_classes is None or args.dim is None):
        raise SystemExit("--num-classes and --dim are required unless --restore is given")
    try:
        # defer_init: the server binds and answers at once while the rows are drawn (parked meanwhile)
        return open_store(store_spec, index_spec, restore=resolve_snapshot(args.restore) if args.restore else None,
                          defer_init=True, init_threads=os.cpu_count() or 1)
    except ValueError as e:
        raise SystemExit(f"--{'restore' if args.restore else 'index ' + args.index}: {e}") from None


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    # A background index build holds the GIL between its numpy calls; with the default 5 ms switch
    # interval every request waited up to that long for it, a large share of an M-row round trip
    # (docs/benchmarks.md, bench_scale).
    sys.setswitchinterval(0.0005)
    logging.basicConfig(level=args.log_level.upper(), stream=sys.stdout,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        token = args.token or (read_token_file(args.token_file) if args.token_file else None) \
            or os.environ.get("PARAMSERVER_TOKEN") or None
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None
    store = open_from_args(args)
    server = ParamServer(store, bind=args.bind, token=token, snapshot_dir=args.snapshot_dir,
                         snapshot_every=args.snapshot_every, final_snapshot=not args.no_final_snapshot,
                         log_every=args.log_every, shard=args.shard, max_message_bytes=args.max_message_mb << 20)

    def on_signal(signum: int, frame: object) -> None:
        logger.info("signal %d: shutting down", signum)
        server.stop()

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)

    def ready(address: str) -> None:
        if args.ready_file:
            tmp = f"{args.ready_file}.tmp.{os.getpid()}"
            with open(tmp, "w", encoding="utf-8") as f:
                f.write(address + "\n")
            os.replace(tmp, args.ready_file)
        sys.stdout.flush()

    server.serve_forever(ready=ready)
    return 0


if __name__ == "__main__":
    sys.exit(main())
