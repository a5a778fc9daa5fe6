"""RecordIO framing, image headers and InsightFace layout, without MXNet."""
from __future__ import annotations

import struct

import numpy as np
import pytest

from hfsoftmax.data.recordio import (MAGIC, IRHeader, RecordIOError, RecordIOReader, RecordIOWriter, class_of,
                                     pack, read_insightface_layout, unpack, write_insightface_rec)

M = struct.pack("<I", MAGIC)


def test_framing_bytes_by_hand(tmp_path):
    rec = tmp_path / "a.rec"
    with RecordIOWriter(str(rec)) as w:
        w.write(b"abcde")
    raw = rec.read_bytes()
    # magic, length 5 with cflag 0, payload, 3 zero bytes of padding
    assert raw == M + struct.pack("<I", 5) + b"abcde" + b"\x00\x00\x00"


def test_continuation_flag_bytes_by_hand(tmp_path):
    rec = tmp_path / "a.rec"
    payload = b"1234" + M + b"xy"  # magic at aligned offset 4 forces a split
    with RecordIOWriter(str(rec)) as w:
        w.write(payload)
    raw = rec.read_bytes()
    expect = (M + struct.pack("<I", (1 << 29) | 4) + b"1234"
              + M + struct.pack("<I", (3 << 29) | 2) + b"xy\x00\x00")
    assert raw == expect
    assert list(RecordIOReader(str(rec), "")) == [payload]


def test_round_trip_random_access_and_sequential(tmp_path):
    rng = np.random.default_rng(0)
    records = [bytes(rng.integers(0, 256, n, dtype=np.uint8)) for n in (0, 1, 3, 4, 7, 100)]
    # three splits: first, middle and last parts; plus magic at an unaligned offset (no split)
    records.append(M + b"abcd" + M + M + b"tail!")
    records.append(b"x" + M + b"yyy")
    headers = [IRHeader(0, 3.0, 11, 0), IRHeader(3, np.array([5.0, 0.5, -2.0], np.float32), 12, 7)]
    records += [pack(headers[0], b"jpeg-ish"), pack(headers[1], M + b"img")]
    rec, idx = tmp_path / "t.rec", tmp_path / "t.idx"
    with RecordIOWriter(str(rec), str(idx)) as w:
        for i, r in enumerate(records):
            w.write_idx(i, r)
    reader = RecordIOReader(str(rec))
    assert reader.keys == list(range(len(records)))
    for i in reversed(range(len(records))):
        assert reader.read_idx(i) == records[i]
    assert list(RecordIOReader(str(rec), "")) == records  # sequential, no .idx
    h0, p0 = unpack(reader.read_idx(len(records) - 2))
    assert (h0.flag, h0.label, h0.id, p0) == (0, 3.0, 11, b"jpeg-ish")
    h1, p1 = unpack(reader.read_idx(len(records) - 1))
    assert h1.flag == 3 and h1.id == 12 and h1.id2 == 7 and p1 == M + b"img"
    np.testing.assert_array_equal(h1.label, [5.0, 0.5, -2.0])
    assert class_of(h1.label, "x") == 5


def test_header_layout_matches_struct():
    # the exact MXNet layout: <IfQQ then label floats then payload
    r = pack(IRHeader(2, np.array([1.0, 2.0], np.float32), 9, 1), b"P")
    assert r == struct.pack("<IfQQ", 2, 0.0, 9, 1) + struct.pack("<2f", 1.0, 2.0) + b"P"
    assert pack(IRHeader(0, 7, 1, 0), b"") == struct.pack("<IfQQ", 0, 7.0, 1, 0)


def test_insightface_layout(tmp_path):
    imgs = [(b"a", 0), (b"b", 0), (b"c", 1), (b"d", 2), (b"e", 2), (b"f", 2)]
    write_insightface_rec(str(tmp_path), imgs, label_as_array=True)
    reader = RecordIOReader(str(tmp_path / "train.rec"))
    lay = read_insightface_layout(reader)
    assert lay.image_keys == [1, 2, 3, 4, 5, 6]
    assert lay.identity_ranges == [(1, 3), (3, 4), (4, 7)]
    for key, (payload, label) in zip(lay.image_keys, imgs):
        h, p = unpack(reader.read_idx(key))
        assert p == payload and class_of(h.label, "x") == label
    assert (tmp_path / "property").read_text().strip() == "3,112,112"


def test_non_integer_label_is_an_error():
    with pytest.raises(RecordIOError, match="rec: record 4.*2.5"):
        class_of(2.5, "rec: record 4")


def _write(tmp_path, records):
    rec, idx = tmp_path / "b.rec", tmp_path / "b.idx"
    with RecordIOWriter(str(rec), str(idx)) as w:
        for i, r in enumerate(records):
            w.write_idx(i, r)
    return rec, idx


def test_truncated_file_names_file_and_record(tmp_path):
    rec, idx = _write(tmp_path, [b"a" * 16, b"b" * 40])
    rec.write_bytes(rec.read_bytes()[:-10])
    reader = RecordIOReader(str(rec))
    assert reader.read_idx(0) == b"a" * 16
    with pytest.raises(RecordIOError, match=r"b\.rec: record 1 is truncated"):
        reader.read_idx(1)
    with pytest.raises(RecordIOError, match=r"b\.rec: record #1 \(sequential\) is truncated"):
        list(RecordIOReader(str(rec), ""))


def test_wrong_magic(tmp_path):
    rec, idx = _write(tmp_path, [b"a" * 16, b"b" * 8])
    raw = bytearray(rec.read_bytes())
    raw[24:28] = b"\x00\x11\x22\x33"  # second record's magic (first record: 8 + 16 bytes)
    rec.write_bytes(bytes(raw))
    with pytest.raises(RecordIOError, match=r"b\.rec: record 1 has wrong magic"):
        RecordIOReader(str(rec)).read_idx(1)


def test_idx_past_end(tmp_path):
    rec, idx = _write(tmp_path, [b"a" * 16])
    idx.write_text("0\t0\n1\t4096\n")
    with pytest.raises(RecordIOError, match=r"b\.idx: record 1 points to offset 4096, past the end"):
        RecordIOReader(str(rec))


def test_bad_idx_line(tmp_path):
    rec, idx = _write(tmp_path, [b"a"])
    idx.write_text("0\t0\nnonsense\n")
    with pytest.raises(RecordIOError, match=r"b\.idx: line 2"):
        RecordIOReader(str(rec))


def test_label_float32_cannot_hold_is_refused_on_write():
    # 2^24 + 1 would be stored as 2^24 and read back as a neighbouring class: refuse it
    with pytest.raises(ValueError, match="16777217.*not exactly representable as float32"):
        pack(IRHeader(0, 2 ** 24 + 1, 5, 0), b"x")
    with pytest.raises(ValueError, match="record id 6: label 16777219"):
        pack(IRHeader(2, np.array([1, 2 ** 24 + 3], np.int64), 6, 0), b"")
    h, _ = unpack(pack(IRHeader(0, 2 ** 24, 5, 0), b"x"))  # exactly representable: fine
    assert class_of(h.label, "x") == 2 ** 24


def test_empty_label_array_names_the_record():
    with pytest.raises(RecordIOError, match="rec: record 9: empty label array"):
        class_of(np.zeros(0, np.float32), "rec: record 9")


def test_idx_with_one_key_at_two_offsets_is_an_error(tmp_path):
    rec, idx = _write(tmp_path, [b"a" * 16, b"b" * 8])
    idx.write_text("0\t0\n1\t24\n1\t0\n")
    with pytest.raises(RecordIOError, match=r"b\.idx: line 3 lists record 1 again at offset 0 \(first at 24\)"):
        RecordIOReader(str(rec))


def test_identity_range_outside_images_is_an_error(tmp_path):
    rec, idx = tmp_path / "train.rec", tmp_path / "train.idx"
    with RecordIOWriter(str(rec), str(idx)) as w:
        w.write_idx(0, pack(IRHeader(2, np.array([3, 4], np.float32), 0, 0), b""))
        w.write_idx(1, pack(IRHeader(0, 0.0, 1, 0), b"i"))
        w.write_idx(2, pack(IRHeader(0, 0.0, 2, 0), b"j"))
        w.write_idx(3, pack(IRHeader(2, np.array([1, 9], np.float32), 3, 0), b""))
    with pytest.raises(RecordIOError, match=r"train\.rec: identity record 3 range \(1, 9\) is not inside"):
        read_insightface_layout(RecordIOReader(str(rec)))


def test_split_record_at_every_aligned_magic_round_trips_through_idx(tmp_path):
    # a JPEG-like payload behind a 24-byte header: magic words at aligned offsets inside the payload
    # (including back to back and at the very end) must be split on write and rejoined on read
    payload = b"\xff\xd8" + b"ab" + M + M + b"xxxx" + M
    record = pack(IRHeader(0, 4.0, 1, 0), payload)
    assert record.count(M) == 3 and all(record.find(M, i) % 4 == 0 for i in (0, 29, 33))
    rec, idx = _write(tmp_path, [b"first", record, b"last"])
    raw = rec.read_bytes()
    assert raw.count(M) == 3 + 3  # one magic per part: 1 + 4 + 1 parts (3 magics dropped from the data)
    reader = RecordIOReader(str(rec))
    assert reader.read_idx(1) == record and reader.read_idx(2) == b"last"
    h, p = unpack(reader.read_idx(1))
    assert class_of(h.label, "x") == 4 and p == payload
    assert list(RecordIOReader(str(rec), "")) == [b"first", record, b"last"]


def test_record0_without_header_is_an_image_when_it_has_a_payload(tmp_path):
    # packs without the (a, b) header: every key is an image, as arcface_torch reads them
    rec, idx = _write(tmp_path, [pack(IRHeader(0, 7.0, 0, 0), b"img0"), pack(IRHeader(0, 8.0, 1, 0), b"img1")])
    assert read_insightface_layout(RecordIOReader(str(rec))).image_keys == [0, 1]
    rec, idx = _write(tmp_path, [pack(IRHeader(0, 0.0, 0, 0), b""), pack(IRHeader(0, 8.0, 1, 0), b"img1")])
    assert read_insightface_layout(RecordIOReader(str(rec))).image_keys == [1]
