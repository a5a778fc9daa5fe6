"""HF-softmax end to end: scripts/train_hf.sh with its own server, Ctrl-C, a server lost mid-run."""
import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest
import torch

from hfsoftmax.config import load_config
from hfsoftmax.train import TrainingError, train
from servers import launch_server

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["data.num_classes=40", "data.samples_per_class=4", "data.image_size=16", "data.val_identities=10",
        "data.val_pairs=20", "model.feature_dim=16", "train.progress=false", "train.log_every=2", "train.batch_size=8",
        "head.num_active=20", "head.candidates=8", "head.rebuild_every=2", "head.cpk_every=2", "optim.lr=0.05"]


def _env():
    env = dict(os.environ, PYTHONPATH=ROOT, PYTHON=sys.executable, NPROC="1")
    env.pop("HFSOFTMAX_DEBUG", None)
    return env


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie still answers kill(0); it is gone for our purposes
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split()[2] != "Z"
    except FileNotFoundError:
        return False


def _server_pid(text: str) -> int:
    m = re.search(r"parameter server started at (tcp://\S+) \(pid (\d+)", text)
    assert m, text
    return int(m.group(2))


def test_train_hf_sh_end_to_end_leaves_no_server(tmp_path):
    r = subprocess.run(["sh", "scripts/train_hf.sh", *TINY, "train.steps=4", f"train.out_dir={tmp_path}"],
                       cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=240)
    assert r.returncode == 0, r.stderr[-3000:]
    pid = _server_pid(r.stdout)
    time.sleep(0.2)
    assert not _alive(pid), "train_hf.sh left its parameter server running"
    assert "heldout" in r.stdout                       # the verification table
    ck = torch.load(tmp_path / "ckpt_last.pt", weights_only=False)
    assert ck["step"] == 4 and ck["store_snapshot"] and (tmp_path / ck["store_snapshot"]).is_dir()
    # the server's random token reached the trainer through the environment, never a run artifact
    assert ck["config"]["store"]["token"] == "" and "token: ''" in (tmp_path / "config.yaml").read_text()
    metrics = (tmp_path / "metrics.jsonl").read_text()
    assert '"cpk_exact"' in metrics and '"index_builds"' in metrics


def test_demo_sh_runs_hf_then_random_and_prints_both(tmp_path):
    """make train's script: the HF run, the random-sampling run at the same M, then one table."""
    out = tmp_path / "demo"
    r = subprocess.run(["sh", "scripts/demo.sh", *TINY, "train.steps=4", "data.val_samples=30",
                        f"train.out_dir={out}"], cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=400)
    assert r.returncode == 0, r.stderr[-3000:]
    rows = [ln for ln in r.stdout.splitlines() if ln.startswith(f"| {out}")]
    assert [row.split(" | ")[1] for row in rows] == ["hf", "random"], r.stdout[-2000:]
    for run, row in zip((out, tmp_path / "demo_random"), rows):
        cfg = (run / "config.yaml").read_text()
        assert "num_active: 20" in cfg and "steps: 4" in cfg
        ev = [ln for ln in (run / "metrics.jsonl").read_text().splitlines() if '"eval"' in ln][-1]
        top1 = json.loads(ev)["heldout_top1"]
        assert row.split(" | ")[4] == f"{100 * top1:.2f}"          # the table shows what the run logged
    assert "index: random" in (tmp_path / "demo_random" / "config.yaml").read_text()
    for m in re.finditer(r"\(pid (\d+)", r.stdout):
        assert not _alive(int(m.group(1)))


@pytest.mark.parametrize("how", ["ctrl-c", "kill"])
def test_train_hf_sh_ctrl_c_or_kill_stops_server(tmp_path, how):
    """Ctrl-C (SIGINT to the group) or a plain `kill` of the script alone (SIGTERM to its pid):
    the script exits at once and leaves neither the server nor the trainer running."""
    # A terminal's shell starts with SIGINT at its default; a test run from a background job inherits
    # it ignored, and a shell started with SIGINT ignored may not trap it: restore the default.
    p = subprocess.Popen(["sh", "scripts/train_hf.sh", *TINY, "train.steps=100000", f"train.out_dir={tmp_path}"],
                         cwd=ROOT, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                         start_new_session=True, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        out = ""
        deadline = time.time() + 120
        while "parameter server started" not in out and time.time() < deadline:
            out += p.stdout.readline()
        pid = _server_pid(out)
        import threading   # keep draining the pipe: a full pipe would block the trainer's writes
        threading.Thread(target=p.stdout.read, daemon=True).start()
        time.sleep(3)                                   # let training start
        if how == "ctrl-c":
            os.killpg(p.pid, signal.SIGINT)             # what Ctrl-C in a terminal does
        else:
            os.kill(p.pid, signal.SIGTERM)              # `kill <pid of train_hf.sh>`
        p.wait(timeout=60)
        time.sleep(0.5)
        assert not _alive(pid), f"{how} left the parameter server running"
        left = subprocess.run(["pgrep", "-f", f"train.out_dir={tmp_path}"], capture_output=True, text=True).stdout
        assert not left.strip(), f"{how} left the trainer running: {left}"
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()


def test_local_store_without_server(tmp_path):
    r = subprocess.run(["sh", "scripts/train_hf.sh", *TINY, "train.steps=2", "store.kind=local",
                        f"train.out_dir={tmp_path}"], cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=240)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "in-process" in r.stdout and "parameter server started" not in r.stdout


def _server_args() -> list[str]:
    """The server arguments train_hf.sh would pass for the TINY config."""
    return subprocess.run([sys.executable, "-m", "hfsoftmax.launch", "server-args", *TINY], cwd=ROOT, env=_env(),
                          capture_output=True, text=True, check=True).stdout.split()


def test_server_lost_mid_training_then_resume(tmp_path, monkeypatch):
    from hfsoftmax.heads import selective

    # Exact selection with M = K makes the run deterministic, so resume can be compared bitwise.
    common = TINY + ["head.name=hf", "head.margin=cosface", "head.scale=8", "head.num_active=40", "train.steps=6", "train.ckpt_every=2", "store.kind=remote",
                     "store.timeout=5"]
    args = ["--no-final-snapshot", *_server_args()]
    with launch_server(tmp_path, *args, name="ref") as (_, ref_addr):
        train(load_config(None, common + [f"store.address={ref_addr}", f"train.out_dir={tmp_path / 'ref'}"]))

    run = tmp_path / "run"
    real_begin = selective.SelectiveSoftmax.begin_step
    with launch_server(tmp_path, *args, name="a") as (server, addr):
        def begin_and_maybe_kill(self, step, lr, **kw):
            if step == 3:
                server.kill()
                server.wait()
            return real_begin(self, step, lr, **kw)
        monkeypatch.setattr(selective.SelectiveSoftmax, "begin_step", begin_and_maybe_kill)
        with pytest.raises(TrainingError) as e:
            train(load_config(None, common + [f"store.address={addr}", f"train.out_dir={run}"]))
    msg = str(e.value)
    assert addr in msg and "ckpt_last.pt" in msg and "resume=auto" in msg

    monkeypatch.setattr(selective.SelectiveSoftmax, "begin_step", real_begin)
    with launch_server(tmp_path, *args, name="b") as (_, addr2):
        r = train(load_config(None, common + [f"store.address={addr2}", f"train.out_dir={run}", "train.resume=auto"]))
    assert r["start_step"] == 2
    ref = torch.load(tmp_path / "ref" / "ckpt_last.pt", weights_only=False)
    got = torch.load(run / "ckpt_last.pt", weights_only=False)
    for k in ref["model"]:
        assert torch.equal(ref["model"][k], got["model"][k]), k
    import numpy as np
    from paramserver.store import WeightStore
    w_ref = WeightStore.from_snapshot(str(tmp_path / "ref" / ref["store_snapshot"])).pull(np.arange(40))
    w_got = WeightStore.from_snapshot(str(run / got["store_snapshot"])).pull(np.arange(40))
    assert np.array_equal(w_ref, w_got)


@pytest.mark.parametrize("amp", ["bf16", "fp16"])
def test_mixed_precision_trains_on_cpu(tmp_path, amp):
    """train.amp: autocast backbone, fp32 head logits, no dtype error in the push; the loss falls
    and ps_wait_ms (the exposed store wait) is logged."""
    import json
    cfg = load_config(None, TINY + ["head.name=hf", "store.kind=local", "train.steps=24", "train.log_every=4", "head.cpk_every=0",
                                    "optim.lr=0.1", f"train.amp={amp}", f"train.out_dir={tmp_path}"])
    train(cfg)
    recs = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in recs if r.get("event") == "train"]
    assert len(losses) == 6 and all(map(lambda x: x == x, losses))
    assert losses[-1] < losses[0], losses
    assert all(r["ps_wait_ms"] >= 0 for r in recs if r.get("event") == "train")


def test_unknown_amp_mode_is_a_one_line_error(tmp_path):
    cfg = load_config(None, TINY + ["store.kind=local", "train.steps=2", "train.amp=fp8", f"train.out_dir={tmp_path}"])
    from hfsoftmax.config import ConfigError
    with pytest.raises(ConfigError, match="train.amp.*fp8.*off, bf16, fp16"):
        train(cfg)


def test_token_never_reaches_run_artifacts_or_help(tmp_path, monkeypatch):
    from hfsoftmax.config import Config, save_config
    from hfsoftmax.heads.selective import resolve_token
    from paramserver.server import read_token_file

    cfg = Config()
    cfg.store.token = "s3cret-token"
    save_config(cfg, str(tmp_path / "c.yaml"))
    assert "s3cret" not in (tmp_path / "c.yaml").read_text() and "s3cret" not in str(cfg.to_dict())
    assert resolve_token(cfg.store.token, "") == "s3cret-token"
    monkeypatch.setenv("PARAMSERVER_TOKEN", "from-env")
    assert resolve_token("", "") == "from-env"
    f = tmp_path / "tok"
    f.write_text("from-file\n")
    f.chmod(0o644)
    with pytest.raises(ValueError, match="readable by others.*chmod 600"):
        read_token_file(str(f))
    f.chmod(0o600)
    assert resolve_token("", str(f)) == "from-file"
    out = subprocess.run([sys.executable, "paramserver/paramserver.py", "--help"], cwd=ROOT, capture_output=True,
                         text=True, timeout=60, env=dict(os.environ, PARAMSERVER_TOKEN="from-env"))
    assert out.returncode == 0 and "from-env" not in out.stdout


def test_dead_client_state_is_not_reused_and_a_moved_server_is_refused(tmp_path):
    """A restarted client re-registers and its dead predecessor's pending push is dropped; a run
    starting at step 0 on a server another run already moved is refused in one line."""
    import numpy as np

    from paramserver.client import RemoteStore
    from servers import thread_server

    K, d = 40, 16
    with thread_server("--num-classes", str(K), "--dim", str(d), "--num-clients", "2") as addr:
        dead = RemoteStore([addr], K, d, timeout=5, client_id=1)
        dead.push([3], np.full((1, d), 100.0, np.float32), 0, 0.1)      # then the process dies
        dead.close()
        new = RemoteStore([addr], K, d, timeout=5, client_id=1)
        new.register()
        new.push([4], np.ones((1, d), np.float32), 0, 0.1)              # accepted: not "already pushed"
        other = RemoteStore([addr], K, d, timeout=5, client_id=0)
        before3 = other.pull([3])
        other.push([5], np.ones((1, d), np.float32), 0, 0.1)
        np.testing.assert_array_equal(other.pull([3], step=1), before3)  # the dead gradient never landed
        cfg = load_config(None, TINY + ["head.name=hf", "store.kind=remote", f"store.address={addr}",
                                        "head.index=exact", "head.num_active=40", "train.steps=2",
                                        f"train.out_dir={tmp_path}"])
        with pytest.raises(TrainingError, match=r"is at step 1, but this run starts at step 0.*allow_step_offset"):
            train(cfg)
        for c in (new, other):
            c.close()
