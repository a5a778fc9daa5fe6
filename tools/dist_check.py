"""All-reduce check across the ranks torchrun started: each rank contributes rank + 1 (and a
1M-element tensor, so real bandwidth is exercised); rank 0 prints PASS/FAIL and the verdict is the
exit code of every rank."""
from __future__ import annotations

import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from hfsoftmax.dist import cleanup, init_distributed  # noqa: E402


def main() -> int:
    info = init_distributed("auto", timeout_s=60)
    world = info.world_size
    x = torch.full((1 << 20,), float(info.rank + 1), device=info.device)
    t = time.time()
    if dist.is_initialized():
        dist.all_reduce(x)
    if info.device.type == "cuda":
        torch.cuda.synchronize()
    dt = time.time() - t
    want = world * (world + 1) / 2
    ok = bool(torch.all(x == want))
    backend = dist.get_backend() if dist.is_initialized() else "none"
    if info.is_main:
        verdict = "PASS" if ok else "FAIL"
        print(f"{verdict}: all_reduce over {world} ranks ({backend}, {info.device.type}): "
              f"got {x[0].item():g}, expected {want:g}; 4 MB in {dt * 1e3:.1f} ms")
    cleanup()
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
