"""`mm generate` and `mm caption` through the real command line entry point."""

import pytest
from PIL import Image

from mm.cli import main


def run(capsys, argv):
    code = main(argv)
    out = capsys.readouterr()
    return code, out.out, out.err


def test_generate_grid_and_single_images(bundle_dir, tmp_path, capsys):
    grid, single = tmp_path / "grid.png", tmp_path / "single"
    code, out, err = run(capsys, ["generate", "--model", str(bundle_dir), "--prompt", "a red circle",
                                  "--prompt", "", "--num-images", "3", "--guidance", "2", "--top-k", "8",
                                  "--seed", "1", "--out", str(grid), "--out-dir", str(single)])
    assert code == 0, err
    im = Image.open(grid)
    assert im.width >= 3 * 128 and im.height >= 2 * 128
    files = sorted(p.name for p in single.iterdir())
    assert len(files) == 6 and files[0].startswith("000_a_red_circle") and "unconditional" in files[3]
    assert "warning: empty prompt" in out
    # the grid shows the images it wrote
    first = Image.open(single / files[0]).resize((128, 128), Image.Resampling.NEAREST)
    assert im.crop((6, 6, 134, 134)).tobytes() == first.convert("RGB").tobytes()


def test_generate_is_reproducible(bundle_dir, tmp_path, capsys):
    outs = []
    for name in ("a.png", "b.png"):
        code, _, err = run(capsys, ["generate", "--model", str(bundle_dir), "--prompt", "two blue squares",
                                    "--num-images", "2", "--seed", "5", "--out", str(tmp_path / name)])
        assert code == 0, err
        outs.append(Image.open(tmp_path / name).tobytes())
    assert outs[0] == outs[1]


@pytest.mark.parametrize("extra,msg", [
    (["--num-images", "0"], "--num-images"),
    (["--num-images", "5000"], "--num-images"),
    (["--guidance", "-1"], "--guidance"),
    (["--top-p", "0"], "top-p"),
    (["--top-p", "1.5"], "top-p"),
    (["--top-k", "-3"], "top-k"),
    (["--temperature", "0"], "temperature"),
    (["--out", "grid.jpg"], ".png"),
])
def test_generate_bad_input_is_one_line_error(bundle_dir, tmp_path, capsys, extra, msg):
    argv = ["generate", "--model", str(bundle_dir), "--prompt", "a red circle", "--out", str(tmp_path / "g.png")]
    code, _, err = run(capsys, argv + extra)
    assert code == 2
    assert err.startswith("mm: error:") and msg in err and len(err.strip().splitlines()) == 1
    assert "Traceback" not in err


def test_generate_unknown_model_folder(tmp_path, capsys):
    code, _, err = run(capsys, ["generate", "--model", str(tmp_path / "nope"), "--prompt", "x",
                                "--out", str(tmp_path / "g.png")])
    assert code == 2 and "not an exported mm model" in err and len(err.strip().splitlines()) == 1


def test_caption_methods(bundle_dir, tmp_path, capsys):
    paths = []
    for i, colour in enumerate(["red", "blue"]):
        p = tmp_path / f"{i}.png"
        Image.new("RGB", (40, 30), colour).save(p)
        paths.append(str(p))
    for method in ("greedy", "beam", "top-p"):
        code, out, err = run(capsys, ["caption", "--model", str(bundle_dir), "--image", *paths,
                                      "--method", method, "--beams", "2"])
        assert code == 0, err
        lines = out.strip().splitlines()
        assert len(lines) == 2 and lines[0].startswith(paths[0] + "\t")


def test_caption_bad_image(bundle_dir, tmp_path, capsys):
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not an image")
    for path, msg in ((bad, "cannot read image"), (tmp_path / "missing.png", "not found")):
        code, _, err = run(capsys, ["caption", "--model", str(bundle_dir), "--image", str(path)])
        assert code == 2 and msg in err and "Traceback" not in err
