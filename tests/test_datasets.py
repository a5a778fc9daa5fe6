"""Record and list datasets: labels, pixels, workers, bad input."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from hfsoftmax.data.binset import encode_jpeg
from hfsoftmax.data.datasets import ImageListDataset, RecordDataset, dataset_from_path
from hfsoftmax.data.recordio import IRHeader, RecordIOError, RecordIOWriter, pack, write_insightface_rec

S = 16


def solid(value: int) -> np.ndarray:
    """A flat [S, S, 3] image: JPEG keeps flat colours (almost) exactly."""
    img = np.zeros((S, S, 3), np.uint8)
    img[..., 0], img[..., 1], img[..., 2] = value, 255 - value, 128
    return img


def make_rec(folder, labels=(0, 0, 1, 2, 2, 2), label_as_array=False):
    items = [(encode_jpeg(solid((20 * i) % 250)), lbl) for i, lbl in enumerate(labels)]
    write_insightface_rec(str(folder), items, image_size=S, label_as_array=label_as_array)
    return items


@pytest.mark.parametrize("as_array", [False, True])
def test_record_dataset_labels_and_pixels(tmp_path, as_array):
    make_rec(tmp_path, label_as_array=as_array)
    ds = dataset_from_path(str(tmp_path), image_size=S, train=False)
    assert isinstance(ds, RecordDataset) and len(ds) == 6 and ds.num_classes == 3
    for i, lbl in enumerate((0, 0, 1, 2, 2, 2)):
        img, label = ds[i]
        assert label == lbl and img.shape == (3, S, S) and img.dtype == torch.float32
        expect = (torch.tensor([20 * i, 255 - 20 * i, 128]) / 255.0 - 0.5) / 0.5
        torch.testing.assert_close(img.mean(dim=(1, 2)), expect.float(), atol=0.03, rtol=0)


def test_record_dataset_resizes_and_flips(tmp_path):
    img = np.zeros((S, S, 3), np.uint8)
    img[:, : S // 2] = 255  # left half white
    write_insightface_rec(str(tmp_path), [(encode_jpeg(img), 0)], image_size=S)
    ds = RecordDataset(str(tmp_path / "train.rec"), image_size=8, train=True)
    torch.manual_seed(0)
    seen = {bool(ds[0][0][0, 4, 0] > 0) for _ in range(20)}
    assert ds[0][0].shape == (3, 8, 8) and seen == {True, False}  # both orientations occur


def test_workers_each_read_correct_labels(tmp_path):
    labels = [k // 3 for k in range(24)]
    make_rec(tmp_path, labels=labels)
    ds = dataset_from_path(str(tmp_path), image_size=S, train=False)
    ds[0]  # open the handle in the parent first: workers must not share it
    got = []
    for _, y in DataLoader(ds, batch_size=5, num_workers=2, shuffle=False):
        got += y.tolist()
    assert got == labels


def test_bad_payload_names_file_and_record_or_is_skipped(tmp_path):
    rec, idx = tmp_path / "train.rec", tmp_path / "train.idx"
    good = encode_jpeg(solid(50))
    with RecordIOWriter(str(rec), str(idx)) as w:
        w.write_idx(0, pack(IRHeader(2, np.array([4, 6], np.float32), 0, 0), b""))
        w.write_idx(1, pack(IRHeader(0, 0.0, 1, 0), good))
        w.write_idx(2, pack(IRHeader(0, 1.0, 2, 0), b"definitely not a jpeg"))
        w.write_idx(3, pack(IRHeader(0, 1.0, 3, 0), good))
        w.write_idx(4, pack(IRHeader(2, np.array([1, 2], np.float32), 4, 0), b""))
        w.write_idx(5, pack(IRHeader(2, np.array([2, 4], np.float32), 5, 0), b""))
    ds = RecordDataset(str(rec), S, train=False)
    with pytest.raises(ValueError, match=r"train\.rec: record 2.*not a decodable image"):
        ds[1]
    ds = RecordDataset(str(rec), S, train=False, skip_bad=True)
    img, label = ds[1]
    assert label == 1 and ds.skipped == 1  # record 3's own label, never record 2's
    assert ds[0][1] == 0


def test_label_outside_identities_is_an_error(tmp_path):
    rec, idx = tmp_path / "train.rec", tmp_path / "train.idx"
    with RecordIOWriter(str(rec), str(idx)) as w:
        w.write_idx(0, pack(IRHeader(2, np.array([2, 3], np.float32), 0, 0), b""))
        w.write_idx(1, pack(IRHeader(0, 5.0, 1, 0), encode_jpeg(solid(0))))
        w.write_idx(2, pack(IRHeader(2, np.array([1, 2], np.float32), 2, 0), b""))
    with pytest.raises(ValueError, match=r"record 1: label 5 outside 0\.\.0"):
        RecordDataset(str(rec), S)[0]


def test_image_list_dataset(tmp_path):
    from PIL import Image
    (tmp_path / "images" / "3").mkdir(parents=True)
    Image.fromarray(solid(10)).save(tmp_path / "images" / "3" / "0.jpg")
    Image.fromarray(solid(200)).save(tmp_path / "images" / "3" / "1.jpg")
    (tmp_path / "train_list.txt").write_text("images/3/0.jpg 3\nimages/3/1.jpg 3\nimages/3/9.jpg 3\n")
    ds = dataset_from_path(str(tmp_path), S, train=False)
    assert isinstance(ds, ImageListDataset) and ds.num_classes == 4 and len(ds) == 3
    assert ds[1][1] == 3 and ds[1][0][0].mean() > 0.4
    with pytest.raises(OSError, match=r"train_list\.txt: line 3"):
        ds[2]
    (tmp_path / "bad.txt").write_text("images/3/0.jpg 3\nimages/3/1.jpg three\n")
    with pytest.raises(ValueError, match=r"bad\.txt: line 2"):
        dataset_from_path(str(tmp_path / "bad.txt"), S)


def test_missing_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        dataset_from_path(str(tmp_path / "nowhere"), S)
    with pytest.raises(FileNotFoundError, match="neither train.rec"):
        dataset_from_path(str(tmp_path), S)


def test_record_dataset_without_idx_scans(tmp_path):
    make_rec(tmp_path, labels=(0, 1, 1, 2))
    idx_text = (tmp_path / "train.idx").read_text()
    (tmp_path / "train.idx").unlink()
    ds = dataset_from_path(str(tmp_path), image_size=S, train=False)
    assert [ds[i][1] for i in range(len(ds))] == [0, 1, 1, 2] and ds.num_classes == 3
    # the scanned offsets are exactly what the writer put in the .idx
    assert ds.reader.index == {int(k): int(v) for k, v in (ln.split("\t") for ln in idx_text.splitlines())}


def test_workers_spawn_and_persistent_each_open_their_own_handle(tmp_path):
    """spawn pickles the dataset (no file handle may travel); persistent workers keep theirs."""
    labels = [k // 2 for k in range(10)]
    make_rec(tmp_path, labels=labels)
    ds = dataset_from_path(str(tmp_path), image_size=S, train=False)
    ds[3]  # the parent holds an open handle
    loader = DataLoader(ds, batch_size=4, num_workers=1, shuffle=False, multiprocessing_context="spawn",
                        persistent_workers=True)
    for _ in range(2):  # the second epoch reuses the persistent worker and its handle
        assert [y for _, ys in loader for y in ys.tolist()] == labels
    assert ds[3][1] == labels[3]  # the parent's handle still reads the right record


def test_random_flip_is_reproducible_from_the_torch_seed(tmp_path):
    img = np.zeros((S, S, 3), np.uint8)
    img[:, : S // 2] = 255
    write_insightface_rec(str(tmp_path), [(encode_jpeg(img), 0)] * 4, image_size=S)
    ds = RecordDataset(str(tmp_path / "train.rec"), image_size=S, train=True)

    def flips(seed: int, workers: int) -> list[bool]:
        torch.manual_seed(seed)
        loader = DataLoader(ds, batch_size=2, num_workers=workers, shuffle=False)
        return [bool(x[0, 0, 0] < 0) for xs, _ in loader for x in xs]  # left column dark -> flipped

    for workers in (0, 2):
        a = flips(0, workers) + flips(1, workers) + flips(2, workers)
        assert a == flips(0, workers) + flips(1, workers) + flips(2, workers)
        assert len(set(a)) == 2  # both orientations occur over the seeds


def test_explicit_idx_path_that_does_not_exist_is_an_error(tmp_path):
    make_rec(tmp_path)
    with pytest.raises(FileNotFoundError, match=r"RecordIO index not found: .*other\.idx"):
        RecordDataset(str(tmp_path / "train.rec"), S, idx_path=str(tmp_path / "other.idx"))


def _flip_label_bit(folder, key: int) -> None:
    """Flip bit 22 of record ``key``'s label float (2.0 <-> 3.0), as a bad disk or copy would."""
    offsets = {int(k): int(v) for k, v in (line.split("\t") for line in open(folder / "train.idx"))}
    pos = offsets[key] + 8 + 4          # magic, length word; then the IfQQ header's flag, label
    with open(folder / "train.rec", "r+b") as f:
        f.seek(pos)
        label = np.frombuffer(f.read(4), np.float32)[0]
        f.seek(pos)
        f.write(np.array(label, np.float32).view(np.uint32).__xor__(np.uint32(1 << 22)).tobytes())


def test_a_flipped_label_bit_is_refused_not_read_as_another_class(tmp_path, capsys):
    """Record 0's identity ranges say which class every record holds: a label that disagrees
    (2.0 -> 3.0 by one bit) is an error naming the file and record, in RecordDataset and rec2img."""
    import tools.rec2img as rec2img

    make_rec(tmp_path, labels=(0, 0, 1, 2, 2, 3))
    _flip_label_bit(tmp_path, 4)                  # the first 2 of the two
    ds = RecordDataset(str(tmp_path / "train.rec"), image_size=S, train=False)
    assert ds[0][1] == 0 and ds[2][1] == 1
    with pytest.raises(RecordIOError, match=r"train.rec: record 4: label 3, but record 0's identity ranges put "
                                            r"record 4 in class 2"):
        ds[3]
    rc = rec2img.main(["--in-folder", str(tmp_path), "--out-folder", str(tmp_path / "out")])
    assert rc != 0 and "record 4: label 3" in capsys.readouterr().err


@pytest.mark.parametrize("kind", ["rec", "list"])
def test_uint8_images_normalise_to_exactly_the_float_images(tmp_path, kind):
    """What workers hand over (uint8, flipped as the epoch says) becomes, on the device, the very
    float32 image the float path returns; resizing included (stored at S, read at S // 2)."""
    from hfsoftmax.data.transforms import normalize_images

    rng = np.random.default_rng(3)
    items = [(encode_jpeg(rng.integers(0, 255, (S, S, 3), dtype=np.uint8)), i // 2) for i in range(6)]
    write_insightface_rec(str(tmp_path), items, image_size=S)
    if kind == "list":
        (tmp_path / "imgs").mkdir()
        for i, (jpeg, _) in enumerate(items):
            (tmp_path / "imgs" / f"{i}.jpg").write_bytes(jpeg)
        (tmp_path / "list.txt").write_text("".join(f"imgs/{i}.jpg {lbl}\n" for i, (_, lbl) in enumerate(items)))
        path = str(tmp_path / "list.txt")
    else:
        path = str(tmp_path)
    for size in (S, S // 2):
        f32 = dataset_from_path(path, size, train=True)
        u8 = dataset_from_path(path, size, train=True, uint8=True)
        flipped = 0
        for epoch in range(3):
            f32.set_epoch(7, epoch)
            u8.set_epoch(7, epoch)
            for i in range(len(items)):
                (a, la), (b, lb) = f32[i], u8[i]
                assert b.dtype == torch.uint8 and b.shape == (3, size, size) and la == lb
                assert torch.equal(normalize_images(b), a)
                flipped += not torch.equal(a, dataset_from_path(path, size, train=False)[i][0])
        assert flipped > 0     # the flips were exercised
    assert normalize_images(a) is a   # float input passes through
    every = torch.arange(256, dtype=torch.uint8)
    assert torch.equal(normalize_images(every), (every.float() / 255.0 - 0.5) / 0.5)   # the contract, bitwise
