"""Issue 22 item 4, the first hour on a user's own images: data.flip, compare_runs on list-dataset
runs, the Ctrl-C message, the pip remedies of optional extras, train.threads."""
from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from hfsoftmax.data.binset import encode_jpeg
from hfsoftmax.data.datasets import ImageFolderDataset, ImageListDataset, RecordDataset, dataset_from_path
from hfsoftmax.data.recordio import write_insightface_rec

S = 16


def _asymmetric() -> np.ndarray:
    img = np.zeros((S, S, 3), np.uint8)
    img[:, : S // 2] = 255          # left half white: a flip moves it right
    return img


def _write_all_layouts(tmp_path) -> dict[str, str]:
    """One asymmetric image as a .rec folder, an image list and a folder of class folders."""
    data = encode_jpeg(_asymmetric())
    rec = tmp_path / "rec"
    rec.mkdir()
    write_insightface_rec(str(rec), [(data, 0)] * 4, image_size=S)
    lst = tmp_path / "lst"
    (lst / "a").mkdir(parents=True)
    for i in range(4):
        (lst / "a" / f"{i}.jpg").write_bytes(data)
    (lst / "train_list.txt").write_text("".join(f"a/{i}.jpg 0\n" for i in range(4)))
    fold = tmp_path / "fold"
    (fold / "cls").mkdir(parents=True)
    for i in range(4):
        (fold / "cls" / f"{i}.jpg").write_bytes(data)
    return {"rec": str(rec), "list": str(lst), "folder": str(fold)}


@pytest.mark.parametrize("kind,cls", [("rec", RecordDataset), ("list", ImageListDataset),
                                      ("folder", ImageFolderDataset)])
def test_flip_false_gives_the_same_tensor_at_every_epoch(tmp_path, kind, cls):
    path = _write_all_layouts(tmp_path)[kind]
    ds = dataset_from_path(path, S, train=True, flip=False)
    assert isinstance(ds, cls) and ds.flip is False
    plain = dataset_from_path(path, S, train=False)[0][0]
    for epoch in range(8):
        ds.set_epoch(0, epoch)
        for i in range(len(ds)):
            assert torch.equal(ds[i][0], plain)
    ds.flip_key = None               # unkeyed (torch RNG) flips are off too
    assert all(torch.equal(ds[0][0], plain) for _ in range(8))


@pytest.mark.parametrize("kind", ["rec", "list", "folder"])
def test_flip_true_keeps_the_keyed_flips(tmp_path, kind):
    path = _write_all_layouts(tmp_path)[kind]
    ds = dataset_from_path(path, S, train=True)            # the default: flip=True
    plain = dataset_from_path(path, S, train=False)[0][0]
    seen, again = [], []
    for epoch in range(8):
        ds.set_epoch(3, epoch)
        seen.append([torch.equal(ds[i][0], plain) for i in range(len(ds))])
        again.append([torch.equal(ds[i][0], plain) for i in range(len(ds))])
    flat = [x for row in seen for x in row]
    assert True in flat and False in flat                  # both orientations occur
    assert seen == again                                   # a pure function of (seed, epoch, index)


def test_data_flip_reaches_the_training_set(tmp_path):
    from hfsoftmax.config import load_config
    from hfsoftmax.train import build_datasets

    path = _write_all_layouts(tmp_path)["folder"]
    cfg = load_config(None, [f"data.path={path}", f"data.image_size={S}", "data.flip=false"])
    train_set, k, _ = build_datasets(cfg, None)
    assert k == 1 and train_set.flip is False
    cfg = load_config(None, [f"data.path={path}", f"data.image_size={S}"])
    assert build_datasets(cfg, None)[0].flip is True


def _compare_runs():
    import os
    import sys
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tools"))
    import compare_runs
    return compare_runs


def _write_run(folder, recs, head="full"):
    import json
    folder.mkdir()
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    (folder / "config.yaml").write_text(f"head:\n  name: {head}\n")
    return str(folder)


def test_compare_runs_accepts_a_list_dataset_run_without_eval(tmp_path, capsys):
    cr = _compare_runs()
    done = {"event": "done", "steps": 40, "wall_s": 12.0, "samples_per_s": 210.0, "num_classes": 7}
    plain = _write_run(tmp_path / "plain", [{"event": "train", "step": 40, "loss": 1.0}, done])
    assert cr.main([plain]) == 0
    out = capsys.readouterr().out
    assert "top-1" not in out and "verif." not in out and "| all / 7 |" in out and "| 40 | 12 | 210 |" in out
    # another run with data.val_path: its val columns show, the first run's cells are "-"
    val = _write_run(tmp_path / "val", [{"event": "eval", "step": 40, "val_top1": 0.5, "val_top5": 0.75,
                                         "val_samples": 8}, done])
    assert cr.main([plain, val]) == 0
    out = capsys.readouterr().out
    assert "val top-1 (%)" in out and "val top-5 (%)" in out and "| top-1 (%)" not in out
    assert "| - | - |" in out and "| 50.00 | 75.00 |" in out
    # a synthetic run's verification and identification columns still show
    syn = _write_run(tmp_path / "syn", [{"event": "eval", "step": 40, "heldout_acc": 0.9, "heldout_top1": 0.3,
                                         "heldout_top5": 0.6}, done], head="hf")
    assert cr.main([syn]) == 0
    out = capsys.readouterr().out
    assert "heldout verif. (%)" in out and "| 90.00 | 30.00 | 60.00 |" in out and "val top-1" not in out
    # no done record: still refused, naming the file
    _write_run(tmp_path / "cut", [{"event": "eval", "step": 0, "heldout_acc": 0.5}])
    assert cr.main([str(tmp_path / "cut")]) == 2
    assert "cut/metrics.jsonl: the run has not finished (no final 'done' record)" in capsys.readouterr().err


def test_ctrl_c_message_names_the_checkpoint_or_says_there_is_none(tmp_path):
    from hfsoftmax.checkpoint import atomic_torch_save
    from hfsoftmax.train import interrupted_message

    run = tmp_path / "run"
    msg = interrupted_message(str(run))                    # the run dir does not exist yet
    assert f"no checkpoint in {run} to continue from" in msg and "train.overwrite=true" in msg
    assert "resume=auto" not in msg
    run.mkdir()
    (run / "metrics.jsonl").write_text('{"event": "train", "step": 5}\n')
    assert "no checkpoint in" in interrupted_message(str(run))     # train.ckpt_every=0: nothing yet
    atomic_torch_save({"step": 10}, str(run / "ckpt_10.pt"))
    msg = interrupted_message(str(run))
    assert msg == f"interrupted (Ctrl-C); continue from {run / 'ckpt_10.pt'} with train.resume=auto"
    assert "no checkpoint to continue from" in interrupted_message(None)   # Ctrl-C before the config was read


def test_export_onnx_without_onnx_says_which_extra_to_install(tmp_path, monkeypatch, capsys):
    import builtins
    import os
    import sys
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from tools import export_onnx

    real_import = builtins.__import__

    def no_onnx(name, *args, **kwargs):
        if name == "onnx" or name.startswith("onnx.") or name == "onnxruntime":
            raise ModuleNotFoundError(f"No module named '{name}'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_onnx)
    monkeypatch.delitem(sys.modules, "onnx", raising=False)
    # refused before the checkpoint is read: the remedy comes first, whatever the checkpoint
    rc = export_onnx.main(["--checkpoint", str(tmp_path / "none.pt"), "--out", str(tmp_path / "m.onnx")])
    err = capsys.readouterr().err
    assert rc == 2 and "error: ONNX export needs the onnx package: pip install -e '.[export]'" in err
    assert not (tmp_path / "m.onnx").exists()


def test_train_threads_reaches_torch_and_is_restored(tmp_path, monkeypatch):
    import os
    from hfsoftmax import train as htrain
    from hfsoftmax.config import ConfigError, load_config

    seen = []
    monkeypatch.setattr(htrain, "_train", lambda cfg, info: seen.append(torch.get_num_threads()) or {})
    before = torch.get_num_threads()
    want = 3 if before != 3 else 2
    cfg = load_config(None, [f"train.out_dir={tmp_path / 'run'}", "train.device=cpu", f"train.threads={want}"])
    htrain.train(cfg)
    assert seen == [want] and torch.get_num_threads() == before
    # 0: the cores this process may use, divided among the local ranks, at least 1
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    assert htrain.resolve_threads(0) == max(1, cores // 2)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "10000")
    assert htrain.resolve_threads(0) == 1 and htrain.resolve_threads(5) == 5
    with pytest.raises(ConfigError, match="train.threads"):
        htrain.resolve_threads(-1)
    # restored when the run fails, too
    monkeypatch.setattr(htrain, "_train", lambda cfg, info: (_ for _ in ()).throw(RuntimeError("boom")))
    with pytest.raises(RuntimeError, match="boom"):
        htrain.train(cfg)
    assert torch.get_num_threads() == before


def test_a_malformed_list_line_is_one_line_naming_the_file_and_line(tmp_path):
    """data.path and data.val_path alike: no traceback, the file, the line number and the line."""
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    img = tmp_path / "a.jpg"
    from PIL import Image
    Image.fromarray(np.zeros((16, 16, 3), dtype=np.uint8)).save(img)
    good = tmp_path / "good.txt"
    good.write_text("a.jpg 0\na.jpg 1\n")
    bad = tmp_path / "bad.txt"
    bad.write_text("a.jpg 0\nno-label-here\n")
    for key, extra in (("data.path", [f"data.path={bad}"]), ("data.val_path", [f"data.path={good}",
                                                                                f"data.val_path={bad}"])):
        r = subprocess.run([sys.executable, "-m", "hfsoftmax.train", *extra, "data.image_size=16", "train.steps=1",
                            f"train.out_dir={tmp_path / key}", "train.progress=false"], cwd=root,
                           capture_output=True, text=True, timeout=300)
        last = r.stderr.strip().splitlines()[-1]
        assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-1500:]
        assert last.startswith(f"error: {key}: ") and "bad.txt: line 2" in last and "no-label-here" in last
