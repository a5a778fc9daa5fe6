"""eval.sh end to end on a tiny .bin, the .bin format itself, MegaFace-style metrics."""
from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from hfsoftmax.backbones import get_backbone
from hfsoftmax.data.binset import encode_jpeg, load_bin, read_bin, write_bin
from hfsoftmax.eval.extract import extract_features
from hfsoftmax.eval.megaface import megaface_evaluate, load_features
from hfsoftmax.eval.verification import evaluate

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
S, D = 16, 16


def blocky(rng: np.random.Generator) -> np.ndarray:
    """A 16x16 image of 4x4 flat blocks: JPEG keeps it close, a random CNN tells them apart."""
    return np.kron(rng.integers(0, 256, (4, 4, 3)), np.ones((4, 4, 1))).astype(np.uint8)


def make_bin(path, pairs=40, seed=0) -> list[bool]:
    """Same pairs repeat one image (distance ~0); different pairs use two random images."""
    rng = np.random.default_rng(seed)
    imgs, same = [], []
    for i in range(pairs):
        a = encode_jpeg(blocky(rng))
        s = i % 2 == 0
        imgs += [a, a if s else encode_jpeg(blocky(rng))]
        same.append(s)
    write_bin(str(path), imgs, same)
    return same


def make_checkpoint(path, images: torch.Tensor, prefix: str = "module.") -> torch.nn.Module:
    """A training-style checkpoint of a random tiny backbone whose BN statistics are set from
    ``images`` (so features spread out as a trained net's do)."""
    torch.manual_seed(0)
    model = get_backbone("tiny", D, S)
    for m in model.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.momentum = None  # cumulative average: one pass sets exact batch statistics
            m.reset_running_stats()
    model.train()
    with torch.no_grad():
        model(images)
    model.eval()
    state = {prefix + k: v for k, v in model.state_dict().items()}
    cfg = {"model": {"backbone": "tiny", "feature_dim": D}, "data": {"image_size": S}}
    torch.save({"model": state, "head": {}, "optimizer": {}, "step": 7, "config": cfg}, path)
    return model


def run_eval_sh(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHON=sys.executable)
    return subprocess.run(["sh", os.path.join(ROOT, "scripts", "eval.sh"), *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)


def test_eval_sh_end_to_end(tmp_path):
    data = tmp_path / "faces"
    data.mkdir()
    same = make_bin(data / "lfw.bin", pairs=40, seed=0)
    make_bin(data / "agedb_30.bin", pairs=20, seed=1)
    images, issame = load_bin(str(data / "lfw.bin"), S)
    assert issame.tolist() == same and images.shape == (80, 3, S, S)
    model = make_checkpoint(tmp_path / "ckpt.pt", images)
    out = tmp_path / "out"
    proc = run_eval_sh("auto", str(tmp_path / "ckpt.pt"), str(data), str(out))
    assert proc.returncode == 0, proc.stderr
    res = json.loads((out / "results.json").read_text())
    assert list(res) == ["lfw", "agedb_30"]  # known sets in the standard order
    # known answer: same pairs are identical images, different pairs far apart -> perfect
    assert res["lfw"]["accuracy"] == 1.0 and res["lfw"]["num_pairs"] == 40
    assert res["agedb_30"]["num_pairs"] == 20
    # parity: the CLI's features and metrics equal an in-process run on the same weights
    feats = extract_features(model, images, progress=False)
    np.testing.assert_allclose(np.load(out / "features_lfw.npy"), feats, atol=1e-5)
    ref = evaluate(feats, issame)
    assert res["lfw"]["threshold"] == pytest.approx(ref["threshold"])
    md = (out / "results.md").read_text()
    assert "| lfw | 40 | 100.00 +- 0.00" in md and "agedb_30" in md and "100.00 +- 0.00" in proc.stdout
    for name in ("lfw", "agedb_30"):
        with Image.open(out / f"roc_{name}.png") as im:
            assert im.format == "PNG" and im.size[0] > 100


def test_eval_sh_missing_files_fail_in_one_line(tmp_path):
    proc = run_eval_sh("auto", str(tmp_path / "nope.pt"), str(tmp_path), str(tmp_path / "o"))
    assert proc.returncode != 0 and "nope.pt" in proc.stderr and "Traceback" not in proc.stderr
    torch.save({"model": {}, "config": {}}, tmp_path / "c.pt")
    proc = run_eval_sh("auto", str(tmp_path / "c.pt"), str(tmp_path), str(tmp_path / "o"))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and "error:" in proc.stderr


def test_bin_flags_must_match_images(tmp_path):
    p = tmp_path / "bad.bin"
    with open(p, "wb") as f:
        pickle.dump(([b"x"] * 5, [True, False]), f, protocol=2)
    with pytest.raises(ValueError, match=r"bad\.bin: 5 images but 2 issame flags"):
        read_bin(str(p))
    with pytest.raises(ValueError, match="cannot form"):
        write_bin(str(p), [b"x"] * 3, [True, False])


def test_bin_bad_image_names_file_and_index(tmp_path):
    rng = np.random.default_rng(0)
    good = encode_jpeg(blocky(rng))
    write_bin(str(tmp_path / "x.bin"), [good, good, good, b"garbage"], [True, False])
    with pytest.raises(ValueError, match=r"x\.bin: image 3: .*not a decodable image"):
        load_bin(str(tmp_path / "x.bin"), S)


def test_python2_pickle_is_read(tmp_path):
    """A .bin as Python 2 writes it: protocol 2, images as py2 str (SHORT_BINSTRING)."""
    rng = np.random.default_rng(0)
    jpegs = [encode_jpeg(blocky(rng)) for _ in range(2)]
    assert all(len(j) < 256 * 4 for j in jpegs)

    def py2_str(b: bytes) -> bytes:  # BINSTRING opcode: 'T' + int32 length + raw bytes
        return b"T" + len(b).to_bytes(4, "little") + b

    raw = (b"\x80\x02" + b"](" + b"".join(py2_str(j) for j in jpegs) + b"e"
           + b"](" + b"\x88" + b"e" + b"\x86" + b".")
    (tmp_path / "py2.bin").write_bytes(raw)
    images, flags = read_bin(str(tmp_path / "py2.bin"))
    assert images == jpegs and flags.tolist() == [True]
    x, _ = load_bin(str(tmp_path / "py2.bin"), S)
    assert x.shape == (2, 3, S, S)


def test_megaface_known_answer(tmp_path):
    # 2-d unit features: identity 0 at -1 and 1 deg; identity 1 at 90, 100 and 150 deg;
    # distractors at 45 and 170 deg (scaled: features are normalised inside).
    ang = np.deg2rad
    probe = np.array([[np.cos(a), np.sin(a)] for a in ang([-1, 1, 90, 100, 150])])
    labels = np.array([0, 0, 1, 1, 1])
    dis = np.array([[np.cos(a), np.sin(a)] for a in ang([45, 170])]) * 3.0
    r = megaface_evaluate(probe, labels, dis, far=1e-6, chunk=1)
    # best distractor per probe: 0,1 -> cos46/44 (.69/.72); 90deg -> cos45 (.71); 100deg -> cos55 (.57);
    # 150deg -> cos20 (.94). Ordered mate pairs: (0,1) (1,0) hit (cos2); (2,3) cos10 hit; (2,4) cos60 miss;
    # (3,2) cos10 hit; (3,4) cos50=.64 > .57 hit; (4,2) (4,3) miss -> 5 / 8
    assert r["num_pairs"] == 8 and r["rank1"] == pytest.approx(5 / 8)
    # 10 impostor scores < 1/FAR = 1e6: no threshold realises FAR 1e-6, so TAR is not reported
    assert r["tar"] is None and r["threshold"] is None and r["far_achieved"] is None
    assert "needs at least 1,000,000 impostor pairs" in r["tar_note"] and "there are 10 (5 x 2)" in r["tar_note"]
    assert r["max_impostor"] == pytest.approx(np.cos(ang(20)), abs=1e-6)
    # FAR = 0.1 of 10 impostors: one may pass, so the threshold is the 2nd largest impostor, cos(44deg)
    # (impostor angles: 46 171 44 169 45 80 55 70 105 20); genuine (unordered): cos2, cos10, cos60,
    # cos50 -> two above cos44
    r = megaface_evaluate(probe, labels, dis, far=0.1, chunk=1)
    assert r["threshold"] == pytest.approx(np.cos(ang(44)), abs=1e-6)
    assert r["tar"] == pytest.approx(0.5) and r["far_achieved"] == pytest.approx(0.1) and r["tar_note"] == ""
    # same answer with the default chunking
    assert megaface_evaluate(probe, labels, dis, far=0.1)["threshold"] == pytest.approx(r["threshold"])
    np.save(tmp_path / "p.npy", probe)
    feats, lab = load_features(str(tmp_path / "p.npy"))
    assert feats.shape == (5, 2) and lab is None


def test_extract_features_flip_sum_parity():
    torch.manual_seed(0)
    model = get_backbone("tiny", D, S)
    model.train()
    x = torch.randn(5, 3, S, S)
    feats = extract_features(model, x, batch_size=2, flip=True, progress=False)
    assert model.training  # mode restored
    model.eval()
    with torch.no_grad():
        ref = model(x) + model(torch.flip(x, dims=[3]))
        ref = ref / ref.norm(dim=1, keepdim=True)
    np.testing.assert_allclose(feats, ref.numpy(), atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(feats, axis=1), 1.0, atol=1e-5)
    plain = extract_features(model, x, batch_size=5, flip=False, progress=False)
    assert not np.allclose(plain, feats, atol=1e-3)


def test_cli_explicit_arch_and_unprefixed_checkpoint(tmp_path):
    make_bin(tmp_path / "cfp_fp.bin", pairs=10, seed=3)
    images, _ = load_bin(str(tmp_path / "cfp_fp.bin"), S)
    make_checkpoint(tmp_path / "c.pt", images, prefix="")
    from hfsoftmax.eval.cli import main
    assert main(["verify", "--arch", "tiny", "--model", str(tmp_path / "c.pt"), "--data",
                 str(tmp_path / "cfp_fp.bin"), "--out", str(tmp_path / "o"), "--no-flip"]) == 0
    res = json.loads((tmp_path / "o" / "results.json").read_text())
    assert list(res) == ["cfp_fp"] and res["cfp_fp"]["flip"] is False and res["cfp_fp"]["num_pairs"] == 10
    # a wrong architecture is a one-line error, not a crash
    assert main(["verify", "--arch", "hynet", "--model", str(tmp_path / "c.pt"), "--data",
                 str(tmp_path), "--out", str(tmp_path / "o2")]) == 2


def test_checkpoint_of_a_groupnorm_tiny_model_loads(tmp_path):
    """train.py with model.norm=group writes GroupNorm/LayerNorm weights: eval must rebuild that net."""
    from hfsoftmax.config import Config
    from hfsoftmax.eval.cli import load_model
    cfg = Config()
    cfg.model.backbone, cfg.model.feature_dim, cfg.model.norm, cfg.data.image_size = "tiny", D, "group", S
    torch.manual_seed(0)
    net = get_backbone("tiny", D, S, norm="group").eval()
    torch.save({"model": net.state_dict(), "config": cfg.to_dict(), "step": 1}, tmp_path / "g.pt")
    model, size, _ = load_model(str(tmp_path / "g.pt"))
    assert size == S and any(isinstance(m, torch.nn.GroupNorm) for m in model.modules())
    x = torch.randn(3, 3, S, S)
    with torch.no_grad():
        torch.testing.assert_close(model(x), net(x))


def test_megaface_cli_says_tar_is_not_reported_with_too_few_impostors(tmp_path, capsys):
    from hfsoftmax.eval.cli import main
    rng = np.random.default_rng(0)
    np.save(tmp_path / "p.npy", rng.normal(size=(6, 8)))
    np.save(tmp_path / "l.npy", np.array([0, 0, 1, 1, 2, 2]))
    np.save(tmp_path / "d.npy", rng.normal(size=(20, 8)))
    assert main(["megaface", "--probe", str(tmp_path / "p.npy"), "--probe-labels", str(tmp_path / "l.npy"),
                 "--distractors", str(tmp_path / "d.npy"), "--out", str(tmp_path / "o")]) == 0
    md = (tmp_path / "o" / "megaface.md").read_text()
    assert "| n/a @ 1e-06 | n/a |" in md and "there are 120 (6 x 20): not reported" in md
    assert json.loads((tmp_path / "o" / "megaface.json").read_text())["tar"] is None


def test_bin_naming_other_code_is_refused_and_not_run(tmp_path):
    marker = tmp_path / "ran"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    (tmp_path / "evil.bin").write_bytes(pickle.dumps(([Evil(), b"x"], [True]), protocol=2))
    with pytest.raises(ValueError, match=r"evil\.bin: the pickle names (posix|os|nt)\.system.*refused"):
        read_bin(str(tmp_path / "evil.bin"))
    assert not marker.exists()


def test_bin_flags_and_images_in_other_python_types(tmp_path):
    rng = np.random.default_rng(0)
    jpegs = [encode_jpeg(blocky(rng)) for _ in range(4)]
    # images as bytearray / uint8 arrays, flags as numpy bools and 0/1 ints, empty bytes allowed by pickle
    obj = ([bytearray(jpegs[0]), np.frombuffer(jpegs[1], np.uint8), jpegs[2], jpegs[3]], [np.bool_(True), 0])
    (tmp_path / "t.bin").write_bytes(pickle.dumps(obj, protocol=2))
    images, flags = read_bin(str(tmp_path / "t.bin"))
    assert images == jpegs and flags.tolist() == [True, False]
    # a flag that is neither a bool nor 0/1 (here the string "0", truthy) is an error, not True
    (tmp_path / "s.bin").write_bytes(pickle.dumps((jpegs[:2], ["0"]), protocol=2))
    with pytest.raises(ValueError, match=r"s\.bin: issame flag 0 is '0' \(str\)"):
        read_bin(str(tmp_path / "s.bin"))
    (tmp_path / "n.bin").write_bytes(b"not a pickle at all")
    with pytest.raises(ValueError, match=r"n\.bin: not a readable \.bin pickle"):
        read_bin(str(tmp_path / "n.bin"))


def test_make_bin_tool_keeps_jpegs_and_reencodes_other_images(tmp_path):
    sys.path.insert(0, os.path.join(ROOT, "tools"))
    import make_bin as tool
    rng = np.random.default_rng(0)
    a, b = blocky(rng), blocky(rng)
    jpeg = encode_jpeg(a)
    (tmp_path / "a.jpg").write_bytes(jpeg)
    Image.fromarray(b).save(tmp_path / "b.png")
    (tmp_path / "pairs.txt").write_text("a.jpg b.png 0\na.jpg a.jpg true\n")
    assert tool.main(["--pairs", str(tmp_path / "pairs.txt"), "--out", str(tmp_path / "o.bin")]) == 0
    images, flags = read_bin(str(tmp_path / "o.bin"))
    assert flags.tolist() == [False, True] and images[0] == jpeg and images[2:] == [jpeg, jpeg]
    assert images[1][:3] == b"\xff\xd8\xff"  # the PNG became a JPEG
    (tmp_path / "bad.txt").write_text("a.jpg b.png maybe\n")
    assert tool.main(["--pairs", str(tmp_path / "bad.txt"), "--out", str(tmp_path / "x.bin")]) == 2
    assert not (tmp_path / "x.bin").exists()
