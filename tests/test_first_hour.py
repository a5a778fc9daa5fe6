"""What a new user types in the first hour: floats written as 1e-3, arcface_torch backbone names,
a head from its one config line, and mistakes that are one-line errors, not tracebacks."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

from hfsoftmax.config import load_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMALL = ["data.num_classes=20", "data.samples_per_class=4", "data.image_size=16", "data.val_identities=10",
         "data.val_pairs=20", "model.feature_dim=16", "train.progress=false", "train.batch_size=8"]


def test_floats_without_a_dot_are_floats(tmp_path):
    cfg = load_config(None, ["optim.lr=1e-3", "optim.weight_decay=5e-4"])
    assert cfg.optim.lr == 1e-3 and cfg.optim.weight_decay == 5e-4
    (tmp_path / "c.yaml").write_text("optim:\n  lr: 1e-3\n")          # YAML 1.1 reads this as a string
    assert load_config(str(tmp_path / "c.yaml"), []).optim.lr == 1e-3
    with pytest.raises(ValueError, match="optim.lr.*expects a float"):
        load_config(None, ["optim.lr=fast"])


def _cli(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=ROOT)
    env.pop("HFSOFTMAX_DEBUG", None)
    return subprocess.run([sys.executable, "-m", "hfsoftmax.train", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("override,message", [
    ("model.backbone=r51", "unknown backbone 'r51'"),
    ("train.device=cuda:0", "CUDA is not available"),
    ("train.amp=fp8", "train.amp"),
    ("model.backbone=r18 data.image_size=100", "image_size divisible by 16"),
])
def test_bad_input_is_one_line(tmp_path, override, message):
    if override.startswith("train.device") and __import__("torch").cuda.is_available():
        pytest.skip("CUDA is available here")
    r = _cli(*SMALL, "train.steps=1", f"train.out_dir={tmp_path}", *override.split())
    assert r.returncode == 2
    assert "Traceback" not in r.stderr and message in r.stderr.strip().splitlines()[-1], r.stderr[-2000:]


@pytest.mark.parametrize("head", ["mach", "rp"])
def test_each_head_trains_from_its_one_line_on_the_default_config(tmp_path, head):
    """configs/synthetic_hf.yaml uses CosFace; MACH and RP take no margin and train plainly."""
    r = subprocess.run([sys.executable, "-m", "hfsoftmax.train", "--config", "configs/synthetic_hf.yaml", *SMALL,
                        "train.steps=2", "data.num_classes=100", "head.rp.proj_dim=8", f"head.name={head}", f"train.out_dir={tmp_path}"], cwd=ROOT,
                       env=dict(os.environ, PYTHONPATH=ROOT), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "does not apply to head.name=" + head in r.stderr
    if head == "rp":
        out = subprocess.run([sys.executable, "tools/rp_recover.py", "--checkpoint", str(tmp_path / "ckpt_last.pt"),
                              "--out", str(tmp_path / "W.npy")], cwd=ROOT, env=dict(os.environ, PYTHONPATH=ROOT),
                             capture_output=True, text=True, timeout=300)
        assert out.returncode == 0 and (tmp_path / "W.npy").exists(), out.stderr[-2000:]


def test_scripts_find_the_project_environment_from_a_fresh_shell():
    """No activated venv, no PYTHON: scripts/test_distributed.sh still runs (or says FAIL and why)."""
    env = {"PATH": "/usr/bin:/bin", "HOME": os.environ.get("HOME", "/tmp"), "NPROC": "2"}
    r = subprocess.run(["sh", "scripts/test_distributed.sh"], cwd=ROOT, env=env, capture_output=True, text=True,
                       timeout=300)
    last = (r.stdout.strip().splitlines() or [""])[-1]
    if os.path.exists(os.path.join(ROOT, ".venv", "bin", "python")):
        assert r.returncode == 0 and last.startswith("PASS"), r.stdout + r.stderr
    else:
        assert last.startswith("FAIL")


def test_a_rank_error_under_torchrun_is_the_last_line(tmp_path):
    env = dict(os.environ, PYTHONPATH=ROOT, PYTHON=sys.executable, NPROC="2")
    r = subprocess.run(["sh", "scripts/train.sh", *SMALL, "train.steps=1", "model.backbone=r51",
                        f"train.out_dir={tmp_path}"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode != 0
    last = r.stderr.strip().splitlines()[-1]
    assert "error: unknown backbone 'r51'" in last and last.startswith("[rank "), r.stderr[-1500:]


def test_run_directory_rules(tmp_path):
    """A finished run's out_dir is not silently reused; resume=auto refuses another dataset; a
    resume with another global batch needs train.allow_batch_change."""
    from hfsoftmax.train import CheckpointError, TrainingError, train

    base = SMALL + ["train.steps=2", f"train.out_dir={tmp_path}"]
    train(load_config(None, base))
    with pytest.raises(TrainingError, match=r"already holds a run.*train.resume=auto.*train.overwrite=true"):
        train(load_config(None, base))
    train(load_config(None, base + ["train.overwrite=true"]))          # allowed, starts afresh
    other = tmp_path / "other.txt"
    other.write_text("images/0/0.jpg 0\n")
    with pytest.raises(CheckpointError, match=r"data.path=\(synthetic\), this run has data.path=.*other.txt"):
        from hfsoftmax.train import load_checkpoint
        cfg = load_config(None, base + ["train.resume=auto", f"data.path={other}"])
        load_checkpoint(str(tmp_path / "ckpt_last.pt"), cfg, 20, auto=True)
    with pytest.raises(CheckpointError, match=r"global batch of 8 .*this run has 16 \(16 x 1 ranks\).*allow_batch_change"):
        train(load_config(None, SMALL + ["train.steps=4", "train.batch_size=16", f"train.out_dir={tmp_path}",
                                         "train.resume=auto"]))
    r = train(load_config(None, SMALL + ["train.steps=4", "train.batch_size=16", f"train.out_dir={tmp_path}",
                                         "train.resume=auto", "train.allow_batch_change=true"]))
    assert r["start_step"] == 2


def test_a_server_with_another_sgd_is_refused():
    import torch

    from hfsoftmax.config import ConfigError
    from hfsoftmax.dist import DistInfo
    from hfsoftmax.heads.selective import make_store
    from servers import thread_server

    with thread_server("--num-classes", "20", "--dim", "16", "--momentum", "0.5") as addr:
        cfg = load_config(None, SMALL + ["head.name=random", "store.kind=remote", f"store.address={addr}"])
        with pytest.raises(ConfigError, match=r"runs SGD with momentum=0.5.*optim.momentum=0.9.*allow_optimizer_mismatch"):
            make_store(cfg, 20, DistInfo(0, 1, 0, torch.device("cpu")))
        cfg.store.allow_optimizer_mismatch = True
        make_store(cfg, 20, DistInfo(0, 1, 0, torch.device("cpu"))).close()


def test_progress_in_a_log_file_is_one_line_per_log_every(tmp_path):
    r = _cli(*SMALL, "train.progress=true", "train.steps=6", "train.log_every=2", f"train.out_dir={tmp_path}")
    assert r.returncode == 0, r.stderr[-2000:]
    lines = [ln for ln in r.stdout.splitlines() if ln.startswith("train step ")]
    assert [ln.split()[2] for ln in lines] == ["2/6", "4/6", "6/6"] and "\r" not in r.stdout


def test_a_checkpoint_of_another_backbone_layout_is_one_line(tmp_path):
    r = _cli(*SMALL, "train.steps=2", f"train.out_dir={tmp_path}", "model.norm=group")
    assert r.returncode == 0, r.stderr[-2000:]
    r = _cli(*SMALL, "train.steps=4", f"train.out_dir={tmp_path}", "model.norm=batch", "train.resume=auto")
    last = r.stderr.strip().splitlines()[-1]
    assert r.returncode == 2 and "Traceback" not in r.stderr and "does not fit this run's backbone" in last, last


def test_plot_metrics_draws_what_the_run_logged(tmp_path, capsys):
    import json

    from PIL import Image

    sys.path.insert(0, ROOT)
    from tools import plot_metrics

    recs = [{"event": "eval", "step": 0, "heldout_acc": 0.5}]
    recs += [{"event": "train", "step": s, "loss": 5.0 / s, "lr": 0.1, "samples_per_s": 400 + s, "ps_wait_ms": 2.0,
              "cpk_exact": 0.5, "cpk_active": 0.4} for s in range(10, 60, 10)]
    recs += [{"event": "eval", "step": 50, "heldout_acc": 0.9}, {"event": "done", "steps": 50}]
    (tmp_path / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in recs) + "\n")
    assert plot_metrics.main([str(tmp_path)]) == 0
    names = sorted(os.path.basename(p) for p in capsys.readouterr().out.split())
    assert names == ["cpk.png", "loss.png", "lr.png", "ps_wait_ms.png", "samples_per_s.png", "verification.png"]
    assert Image.open(tmp_path / "plots" / "loss.png").size == (560, 360)
    (tmp_path / "metrics.jsonl").write_text("{bad\n")
    assert plot_metrics.main([str(tmp_path)]) == 2 and "line 1 is not JSON" in capsys.readouterr().err


def test_compare_runs_names_a_run_that_has_not_finished(tmp_path, capsys):
    sys.path.insert(0, os.path.join(ROOT, "tools"))
    import compare_runs

    (tmp_path / "metrics.jsonl").write_text('{"event": "train", "step": 2, "loss": 1.0}\n')
    assert compare_runs.main([str(tmp_path)]) == 2
    assert f"{tmp_path / 'metrics.jsonl'}: the run has not finished" in capsys.readouterr().err
    assert compare_runs.main([str(tmp_path / "nowhere")]) == 2
    assert "nowhere/metrics.jsonl: not found" in capsys.readouterr().err


def test_tensorboard_scalars_are_the_logged_metrics(tmp_path):
    """train.tensorboard=true: every number of the train/eval records, at its step, in TensorBoard."""
    pytest.importorskip("tensorboard")   # make test installs it (requirements-test.txt)
    import json

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from hfsoftmax.train import train
    out = tmp_path / "run"
    train(load_config(None, SMALL + ["train.steps=4", "train.log_every=2", "train.tensorboard=true",
                                     f"train.out_dir={out}"]))
    ea = EventAccumulator(str(out / "tensorboard"))
    ea.Reload()
    recs = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]
    train_recs = [r for r in recs if r["event"] == "train"]
    assert [r["step"] for r in train_recs] == [2, 4]
    for key in ("loss", "lr", "samples_per_s"):
        got = [(e.step, e.value) for e in ea.Scalars(f"train/{key}")]
        assert got == [(r["step"], pytest.approx(r[key], rel=1e-6)) for r in train_recs], key
    evals = [r for r in recs if r["event"] == "eval"]
    assert [(e.step, e.value) for e in ea.Scalars("eval/heldout_acc")] == \
        [(r["step"], pytest.approx(r["heldout_acc"], rel=1e-6)) for r in evals]
    # overwrite removes the old event files with the rest of the run
    train(load_config(None, SMALL + ["train.steps=2", "train.tensorboard=true", "train.overwrite=true",
                                     f"train.out_dir={out}"]))
    ea = EventAccumulator(str(out / "tensorboard"))
    ea.Reload()
    assert [e.step for e in ea.Scalars("train/loss")] == [2]


def test_tensorboard_without_the_package_is_one_line(monkeypatch):
    from hfsoftmax.config import ConfigError
    from hfsoftmax.train import require_tensorboard

    monkeypatch.setitem(sys.modules, "tensorboard", None)     # import tensorboard -> ImportError
    with pytest.raises(ConfigError, match=r"train.tensorboard=true needs the tensorboard package: pip install"):
        require_tensorboard()


def test_combined_margin_trains_from_its_config_line(tmp_path):
    """head.margin=combined head.m1/m2/m3 (InsightFace's combined margin) is a valid config, full and HF."""
    from hfsoftmax.train import train
    for head in ("full", "hf"):
        r = train(load_config(None, SMALL + ["train.steps=2", "head.margin=combined", "head.m1=1.0", "head.m2=0.3",
                                             "head.m3=0.2", "head.scale=16", f"head.name={head}", "head.num_active=10",
                                             "store.kind=local", f"train.out_dir={tmp_path / head}"]))
        assert r["steps"] == 2 and 0.0 <= r["verification"]["heldout"]["accuracy"] <= 1.0
