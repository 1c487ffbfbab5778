"""``mm data ingest``: every source kind, every kind of bad file, dedup, workers, errors."""

import csv
import io
import json
import struct
import tarfile
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mm.cli import main
from mm.data.images import load_rgb
from mm.data.ingest import ingest
from mm.errors import MMError

# ----------------------------------------------------------------------------- helpers

def png_bytes(im: Image.Image, **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format="PNG", **kw)
    return buf.getvalue()


def solid(color, size=(8, 6), mode="RGB") -> Image.Image:
    return Image.new(mode, size, color)


def noise(size=64, seed=0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8))


def png_header_bomb(width: int, height: int) -> bytes:
    """A tiny valid-looking PNG that claims width x height pixels (a decompression bomb)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64))
            + chunk(b"IEND", b""))


def read_shards(out: Path) -> list[dict]:
    """All samples of a shard folder in order, via plain tarfile (independent of our reader)."""
    samples: dict[str, dict] = {}
    for shard in sorted(out.glob("*.tar")):
        with tarfile.open(shard) as tar:
            for m in tar.getmembers():
                key, ext = m.name.split(".", 1)
                samples.setdefault(key, {"__key__": key})[ext] = tar.extractfile(m).read()
    return [samples[k] for k in sorted(samples)]


def image_of(sample: dict) -> Image.Image:
    ext = next(e for e in ("png", "jpg", "webp") if e in sample)
    return Image.open(io.BytesIO(sample[ext]))


def by_source(samples):
    return {json.loads(s["json"])["source"]: s for s in samples}


def write(path: Path, data: bytes | str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data.encode() if isinstance(data, str) else data)


# ----------------------------------------------------------------------------- the bad folder

def make_planted_folder(root: Path) -> None:
    """One good file per tricky mode, and one file per skip reason."""
    def pair(name, data, caption="a caption"):
        write(root / name, data)
        write(root / Path(name).with_suffix(".txt"), caption)

    pair("good.png", png_bytes(solid((255, 0, 0))), "a red square")
    pair("gray.png", png_bytes(solid(100, mode="L")))
    la = Image.new("LA", (4, 4), (0, 0))  # black, fully transparent -> white
    pair("la.png", png_bytes(la))
    p = Image.new("P", (4, 4), 1)
    p.putpalette([0, 0, 255] + [0, 255, 0] + [0] * 762)
    p.putpixel((0, 0), 0)
    pair("p_trans.png", png_bytes(p, transparency=1))  # green is transparent, (0,0) blue
    pair("rgba.png", png_bytes(solid((255, 0, 0, 128), mode="RGBA")))
    cmyk = Image.new("CMYK", (4, 2), (0, 0, 0, 0))
    cmyk.putpixel((0, 0), (255, 0, 0, 0))  # pure cyan
    buf = io.BytesIO()
    cmyk.save(buf, format="TIFF")
    pair("cmyk.tif", buf.getvalue())
    i16 = Image.fromarray(np.array([[0, 65535, 32896]], dtype=np.uint16))
    assert i16.mode.startswith("I;16")
    pair("i16.png", png_bytes(i16))
    exif = Image.Exif()
    exif[0x0112] = 6  # stored 8x4, displayed rotated 90 degrees: 4 wide, 8 tall
    buf = io.BytesIO()
    solid((0, 200, 0), size=(8, 4)).save(buf, format="JPEG", exif=exif.tobytes())
    pair("exif.jpg", buf.getvalue())
    buf = io.BytesIO()
    frames = [solid((255, 0, 0)), solid((0, 0, 255))]
    frames[0].save(buf, format="GIF", save_all=True, append_images=frames[1:], duration=100)
    pair("anim.gif", buf.getvalue())
    pair("tiny.png", png_bytes(solid((1, 2, 3), size=(1, 1))))

    pair("bomb.png", png_header_bomb(100_000, 100_000))
    pair("empty.jpg", b"")
    good = png_bytes(noise())
    pair("trunc.png", good[: len(good) * 6 // 10])
    buf = io.BytesIO()
    noise(seed=1).save(buf, format="JPEG", quality=90)
    pair("trunc.jpg", buf.getvalue()[: len(buf.getvalue()) // 2])
    pair("html.jpg", b"<html><body>404 not found</body></html>")
    write(root / "nocaption.png", png_bytes(solid((9, 9, 9))))
    pair("emptycap.png", png_bytes(solid((8, 8, 8))), " \n\t ")
    pair("latin1.png", png_bytes(solid((7, 7, 7))), "caf\xe9 au lait".encode("latin-1"))
    write(root / "README.md", "not data")


EXPECTED_SKIPS = {"decompression_bomb": 1, "empty_file": 1, "truncated_or_corrupt": 2,
                  "not_an_image": 1, "missing_caption": 1, "empty_caption": 1, "caption_not_utf8": 1}
KEPT = {"good.png", "gray.png", "la.png", "p_trans.png", "rgba.png", "cmyk.tif", "i16.png",
        "exif.jpg", "anim.gif", "tiny.png"}


def test_planted_folder_counts_and_conversions(tmp_path):
    src, out = tmp_path / "src", tmp_path / "out"
    make_planted_folder(src)
    summary = ingest(src, out, samples_per_shard=4)

    assert summary["kind"] == "folder"
    assert summary["ingested"] == len(KEPT)
    assert summary["skipped"] == EXPECTED_SKIPS
    assert summary["ignored_files"] == 1  # README.md
    assert summary["skipped_examples"]["caption_not_utf8"] == ["latin1.png"]
    assert json.loads((out / "ingest_summary.json").read_text()) == summary
    assert json.loads((out / "sizes.json").read_text()) == {
        "shards-000000.tar": 4, "shards-000001.tar": 4, "shards-000002.tar": 2}

    samples = read_shards(out)
    assert [s["__key__"] for s in samples] == [f"{i:09d}" for i in range(len(KEPT))]
    got = by_source(samples)
    assert set(got) == KEPT
    px = {name: np.asarray(image_of(s)) for name, s in got.items()}
    assert all(image_of(s).mode == "RGB" for s in samples)

    assert got["good.png"]["txt"] == b"a red square"
    assert json.loads(got["good.png"]["json"])["caption"] == "a red square"
    assert (px["good.png"] == [255, 0, 0]).all()
    assert (px["gray.png"] == 100).all()
    assert (px["la.png"] == 255).all()  # transparent black on white is white
    assert px["p_trans.png"][0, 0].tolist() == [0, 0, 255]
    assert (px["p_trans.png"][1:] == 255).all()  # the transparent palette entry is white
    # 50% red over white: R stays 255, G/B are halfway.
    assert px["rgba.png"][0, 0, 0] == 255 and abs(int(px["rgba.png"][0, 0, 1]) - 127) <= 1
    assert px["cmyk.tif"][0, 0].tolist() == [0, 255, 255] and px["cmyk.tif"][1, 1].tolist() == [255, 255, 255]
    assert px["i16.png"][0, :, 0].tolist() == [0, 255, 128]  # scaled from 16 bits, not clipped
    assert px["exif.jpg"].shape == (8, 4, 3)  # (H, W): the displayed orientation
    meta = json.loads(got["exif.jpg"]["json"])
    assert (meta["width"], meta["height"]) == (4, 8)
    assert (px["anim.gif"] == [255, 0, 0]).all()  # the first frame
    assert px["tiny.png"].tolist() == [[[1, 2, 3]]]


def test_cli_resize_jpg_and_workers_are_deterministic(tmp_path, capsys):
    src = tmp_path / "src"
    make_planted_folder(src)
    outs = []
    for workers in (1, 2):
        out = tmp_path / f"out{workers}"
        rc = main(["data", "ingest", str(src), "--out", str(out), "--resize", "6", "--format", "jpg",
                   "--quality", "90", "--workers", str(workers), "--samples-per-shard", "3"])
        assert rc == 0
        outs.append(out)
    printed = capsys.readouterr().out
    assert "ingested 10 samples" in printed and "caption_not_utf8" in printed
    shards = sorted(p.name for p in outs[0].glob("*.tar"))
    assert shards == sorted(p.name for p in outs[1].glob("*.tar")) and len(shards) == 4
    for name in shards:  # byte-identical output for any number of workers
        assert (outs[0] / name).read_bytes() == (outs[1] / name).read_bytes()
    samples = read_shards(outs[0])
    assert all(image_of(s).size == (6, 6) and image_of(s).format == "JPEG" for s in samples)
    assert all("jpg" in s for s in samples)


def test_max_pixels_covers_pil_warning_and_error(tmp_path):
    src = tmp_path / "src"
    for name, side in (("ok", 20), ("warn", 40), ("error", 50)):  # 400, 1600 (PIL warns), 2500 (PIL raises)
        write(src / f"{name}.png", png_bytes(noise(side)))
        write(src / f"{name}.txt", name)
    summary = ingest(src, tmp_path / "out", max_pixels=1000)
    assert summary["ingested"] == 1 and summary["skipped"] == {"decompression_bomb": 2}
    assert Image.MAX_IMAGE_PIXELS == 89_478_485  # the global limit is restored


def test_resize_short_side_then_centre_crop():
    im = Image.new("RGB", (40, 20), (0, 0, 0))
    im.paste((255, 255, 255), (10, 0, 30, 20))  # a white centre band 20 wide
    out, size = load_rgb(png_bytes(im), max_pixels=10**6, resize=10)
    assert size == (40, 20) and out.size == (10, 10)
    assert (np.asarray(out)[:, 2:8] > 200).all()  # the centre survives the crop


def test_dedup_keeps_first_occurrence(tmp_path):
    src = tmp_path / "src"
    red = solid((255, 0, 0))
    write(src / "a.png", png_bytes(red))
    write(src / "b.png", png_bytes(red, compress_level=1))  # same pixels, different bytes
    write(src / "c.png", png_bytes(solid((0, 0, 255))))
    for n in "abc":
        write(src / f"{n}.txt", f"caption {n}")
    summary = ingest(src, tmp_path / "dedup", dedup=True)
    assert summary["ingested"] == 2 and summary["skipped"] == {"duplicate": 1}
    assert [s["txt"] for s in read_shards(tmp_path / "dedup")] == [b"caption a", b"caption c"]
    assert ingest(src, tmp_path / "all")["ingested"] == 3


def test_hf_imagefolder_jsonl_and_csv(tmp_path):
    root = tmp_path / "hf"
    for split, color in (("train", (255, 0, 0)), ("test", (0, 255, 0))):
        write(root / split / "img" / "x.png", png_bytes(solid(color)))
        write(root / split / "y.png", png_bytes(solid(color)))
        write(root / split / "unlisted.png", png_bytes(solid(color)))
    write(root / "train" / "metadata.jsonl",
          json.dumps({"file_name": "img/x.png", "text": "red x", "split_note": "a"}) + "\n"
          + "{broken json\n" + json.dumps({"file_name": "y.png", "text": ""}) + "\n"
          + json.dumps({"file_name": "gone.png", "text": "no file"}) + "\n")
    with open(root / "test" / "metadata.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerows([["file_name", "text"], ["img/x.png", "green x"], ["y.png", "green y"]])
    summary = ingest(root, tmp_path / "out")
    assert summary["kind"] == "imagefolder"
    assert summary["ingested"] == 3
    assert summary["skipped"] == {"bad_metadata_row": 1, "empty_caption": 1, "missing_image": 1,
                                  "missing_caption": 2}
    got = by_source(read_shards(tmp_path / "out"))
    assert set(got) == {"test/img/x.png", "test/y.png", "train/img/x.png"}
    assert json.loads(got["train/img/x.png"]["json"])["split_note"] == "a"
    assert got["test/y.png"]["txt"] == b"green y"


def test_csv_and_jsonl_tables_with_custom_columns(tmp_path):
    write(tmp_path / "imgs" / "a.png", png_bytes(solid((1, 1, 1))))
    write(tmp_path / "imgs" / "b.png", png_bytes(solid((2, 2, 2))))
    table = tmp_path / "lists" / "data.csv"
    table.parent.mkdir()
    table.write_bytes(b"path,desc,score\n../imgs/a.png,first  image\n,0.5\n"
                      b"../imgs/b.png,caf\xe9,1\nhttp://x.org/c.jpg,remote,2\n"
                      + f"{tmp_path / 'imgs' / 'b.png'},absolute path,3\n".encode())
    summary = ingest(table, tmp_path / "csv", image_column="path", caption_column="desc")
    assert summary["kind"] == "csv" and summary["ingested"] == 2
    assert summary["skipped"] == {"bad_metadata_row": 1, "caption_not_utf8": 1, "image_is_url": 1}
    samples = read_shards(tmp_path / "csv")
    assert [s["txt"] for s in samples] == [b"first image", b"absolute path"]
    assert json.loads(samples[1]["json"])["score"] == "3"

    jl = tmp_path / "lists" / "data.jsonl"
    jl.write_text("\n".join(json.dumps(r) for r in [
        {"img": "../imgs/a.png", "cap": ["first of two", "second"]}, {"img": "../imgs/b.png"},
        {"img": "../imgs/b.png", "cap": None}, {"img": "../imgs/b.png", "cap": "ok b"}]))
    summary = ingest(jl, tmp_path / "jl", image_column="img", caption_column="cap")
    assert summary["ingested"] == 2 and summary["skipped"] == {"missing_caption": 2}
    assert [s["txt"] for s in read_shards(tmp_path / "jl")] == [b"first of two", b"ok b"]


def test_user_errors_are_one_line(tmp_path, capsys):
    write(tmp_path / "t.csv", "image,caption\na.png,x\n")
    write(tmp_path / "t.parquet", "x")
    write(tmp_path / "empty" / "notes.md", "x")
    cases = [
        (["data", "ingest", str(tmp_path / "nope"), "--out", str(tmp_path / "o1")], "not found"),
        (["data", "ingest", str(tmp_path / "t.parquet"), "--out", str(tmp_path / "o2")], "unknown source format"),
        (["data", "ingest", str(tmp_path / "t.csv"), "--out", str(tmp_path / "o3"), "--caption-column", "text"],
         "column 'text' not in t.csv"),
        (["data", "ingest", str(tmp_path / "empty"), "--out", str(tmp_path / "o4")], "no images"),
        (["data", "ingest", str(tmp_path / "t.csv"), "--out", str(tmp_path / "o5")], "no samples ingested"),
        (["data", "ingest", str(tmp_path / "t.csv"), "--out", str(tmp_path / "o6"), "--quality", "0"], "--quality"),
    ]
    for argv, message in cases:
        assert main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("mm: error: ") and message in err and "\n" not in err, err
    (tmp_path / "o7").mkdir()
    (tmp_path / "o7" / "shards-000000.tar").write_bytes(b"")
    with pytest.raises(MMError, match="already holds shards"):
        ingest(tmp_path / "t.csv", tmp_path / "o7")
