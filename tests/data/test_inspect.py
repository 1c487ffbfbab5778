"""``mm data inspect``: counts, caption statistics, contact sheet; broken shards are counted."""

import io
import json
import tarfile

import numpy as np
import pytest
from PIL import Image

from mm.cli import main
from mm.data.inspect import inspect_shards
from mm.data.shards import ShardWriter
from mm.errors import MMError


def png(color, size=(16, 16)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="PNG")
    return buf.getvalue()


def noisy_png(seed: int) -> bytes:  # incompressible, so shards are big enough to cut in a member
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (48, 48, 3), dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


CAPTIONS = ["a red circle", "two blue squares above a green triangle", "one", "a big  yellow\nstar"]


@pytest.fixture
def good_set(tmp_path):
    out = tmp_path / "good"
    with ShardWriter(out, samples_per_shard=3) as w:
        for i, caption in enumerate(CAPTIONS):
            qa = [{"question": "what colour?", "answers": ["red"] * 10, "answer_type": "other"}] * (i % 2)
            w.write({"__key__": f"{i:06d}", "png": png((60 * i, 0, 0)), "txt": caption,
                     "json": {"caption": caption, "qa": qa}})
    return out


def test_inspect_good_set(good_set, tmp_path, capsys):
    report = inspect_shards(str(good_set), num=3, grid=tmp_path / "sheets" / "grid.png")
    assert report["shards"] == 2 and report["samples"] == 4 and report["sizes_json_samples"] == 4
    assert report["good_samples"] == 4 and report["problems"] == {} and report["broken_shards"] == {}
    assert report["caption_words"] == {"min": 1, "mean": 3.75, "max": 7}
    assert report["examples"] == ["a red circle", "two blue squares above a green triangle", "one"]
    assert report["image_sizes"] == {"16x16": 4} and report["qa_questions"] == 2
    assert report["ingest_skipped"] is None
    (good_set / "ingest_summary.json").write_text(json.dumps({"skipped": {"not_an_image": 3}}))

    sheet = Image.open(tmp_path / "sheets" / "grid.png")
    assert sheet.mode == "RGB" and sheet.width == 2 * (128 + 12)  # 3 cells -> 2 columns, 2 rows
    a = np.asarray(sheet)
    assert (a[6 + 64, 6 + 64] == [0, 0, 0]).all()  # first thumbnail: colour (0, 0, 0)
    assert (a[6 + 64, 140 + 6 + 64] == [60, 0, 0]).all()  # second thumbnail
    caption_band = a[6 + 128 + 2: 6 + 128 + 14, 6: 6 + 128]
    assert (caption_band < 128).any()  # text was drawn under the first image

    assert main(["data", "inspect", str(good_set / "shards-{000000..000001}.tar"), "--num", "2"]) == 0
    out = capsys.readouterr().out
    assert "samples  4" in out and "caption words  min 1  mean 3.75  max 7" in out
    assert "  a red circle" in out and "one" not in out.split("examples:")[1]
    assert "skipped at ingest: not_an_image 3" in out


def test_inspect_counts_truncated_shard_and_bad_samples(tmp_path, capsys):
    out = tmp_path / "bad"
    with ShardWriter(out, samples_per_shard=4) as w:
        for i in range(12):
            sample = {"__key__": f"{i:06d}", "png": noisy_png(i), "txt": f"caption {i}"}
            if i == 1:
                del sample["txt"]  # missing caption
            if i == 2:
                sample["png"] = b"not a png"  # unreadable image
            if i == 3:
                sample["png"] = sample["png"][:100]  # truncated image
            w.write(sample)
    middle = out / "shards-000001.tar"
    data = middle.read_bytes()
    middle.write_bytes(data[: len(data) // 2 + 100])  # cut inside a member

    report = inspect_shards(str(out), num=16)
    assert report["shards"] == 3 and report["sizes_json_samples"] == 12
    assert list(report["broken_shards"]) == ["shards-000001.tar"]
    assert report["samples_per_shard"]["shards-000000.tar"] == 4
    assert report["samples_per_shard"]["shards-000002.tar"] == 4
    assert report["samples_per_shard"]["shards-000001.tar"] < 4
    assert report["problems"]["missing_caption"] == 1
    assert report["problems"]["unreadable_image"] >= 2
    # The shards after the broken one are still read.
    assert "caption 11" in report["examples"]

    assert main(["data", "inspect", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "broken shard shards-000001.tar" in printed and "sizes.json says 12" in printed


def test_inspect_finds_a_shard_cut_at_a_member_boundary_without_sizes_json(tmp_path):
    out = tmp_path / "cut"
    with ShardWriter(out, samples_per_shard=2) as w:
        for i in range(4):
            w.write({"__key__": f"{i:06d}", "png": png((i, i, i)), "txt": f"caption {i}"})
    (out / "sizes.json").unlink()
    first = out / "shards-000000.tar"
    data = first.read_bytes()
    with tarfile.open(first) as tar:
        members = [m.offset_data + ((m.size + 511) // 512) * 512 for m in tar.getmembers()]
    first.write_bytes(data[: members[1]])  # the first sample's png + txt, nothing after
    report = inspect_shards(str(out))
    assert report["samples"] == 3 and report["problems"] == {} and report["sizes_json_samples"] is None
    assert list(report["broken_shards"]) == ["shards-000000.tar"]


def test_inspect_errors(tmp_path, capsys):
    assert main(["data", "inspect", str(tmp_path / "missing-{000..001}.tar")]) == 2
    assert "shards not found" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert main(["data", "inspect", str(tmp_path / "empty")]) == 2
    out = tmp_path / "nocap"
    with ShardWriter(out) as w:
        w.write({"__key__": "0", "png": png((0, 0, 0))})
    with pytest.raises(MMError, match="no readable samples"):
        inspect_shards(str(out), grid=tmp_path / "g.png")
    assert json.loads((out / "sizes.json").read_text()) == {"shards-000000.tar": 1}
