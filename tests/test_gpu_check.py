"""tools/gpu_check.py: its degraded CPU mode passes here, and a check that raises is one FAIL line."""
from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from types import ModuleType

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "tools", "gpu_check.py")
CUDA_ONLY = ("resume_rng", "syncs", "multirank_nccl")


def load_tool() -> ModuleType:
    """tools/ is not a package: load the script as a module (registered first: its dataclasses look
    their module up in sys.modules)."""
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    sys.modules["gpu_check"] = mod
    spec.loader.exec_module(mod)
    return mod


def test_cpu_quick_run_passes_and_skips_cuda_only_checks():
    # One OpenMP thread: beside other test processes on 2 cores, two 2-thread OpenMP pools spin
    # against each other and the tiny runs take ~8x longer (measured: 55 s vs 7 s).
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop("HFSOFTMAX_DEBUG", None)
    r = subprocess.run([sys.executable, SCRIPT, "--device", "cpu", "--quick"], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=300)
    lines = r.stdout.strip().splitlines()
    assert r.returncode == 0, r.stdout + r.stderr[-3000:]
    assert lines[-1].startswith("RESULT ") and " fail=0 " in lines[-1] and lines[-1].endswith("device=cpu"), lines[-1]
    mod = load_tool()
    assert len(lines) == len(mod.CHECKS) + 1                  # one line per check, then RESULT
    why = "this machine has none" if not torch.cuda.is_available() else "running with --device cpu"
    for name in CUDA_ONLY:
        assert f"SKIP {name}: needs CUDA ({why})" in lines, r.stdout
    for c in mod.CHECKS:
        if not c.cuda_only:
            assert any(ln.startswith(f"OK {c.name}: ") for ln in lines), r.stdout


def test_a_raising_check_is_a_fail_line_and_exit_status_1(capsys):
    mod = load_tool()

    def boom(ctx) -> str:
        raise RuntimeError("kaboom\nsecond line is dropped")

    def fine(ctx) -> str:
        return "all good"

    def cuda(ctx) -> str:
        raise AssertionError("a CUDA-only check must not run on the CPU")

    checks = [mod.Check("boom", boom), mod.Check("fine", fine), mod.Check("gpu", cuda, cuda_only=True)]
    assert mod.main(["--device", "cpu"], checks=checks) == 1
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 4
    assert out[0].startswith("FAIL boom: RuntimeError: kaboom [") and "second line" not in out[0]
    assert out[1].startswith("OK fine: all good [")            # the run went on after the failure
    assert out[2].startswith("SKIP gpu: needs CUDA (")
    assert out[3] == "RESULT ok=1 fail=1 skip=1 device=cpu"
    # a check's own verdict (CheckFailed) is its message alone
    ctx = mod.Ctx(device=torch.device("cpu"), quick=True, tmp=".")
    verdict = mod.run_check(mod.Check("v", lambda ctx: mod.expect(False, "W differs")), ctx)
    assert verdict.status == "FAIL" and verdict.detail.startswith("W differs [")
    # no failure: exit status 0; --only runs the subset
    assert mod.main(["--device", "cpu", "--only", "fine,gpu"], checks=checks) == 0
    out = capsys.readouterr().out.splitlines()
    assert [ln.split(":")[0] for ln in out] == ["OK fine", "SKIP gpu", "RESULT ok=1 fail=0 skip=1 device=cpu"]
    with pytest.raises(SystemExit):
        mod.main(["--device", "cpu", "--only", "nosuch"], checks=checks)
