import subprocess
import sys

import pytest

from mm.cli import build_parser, main


@pytest.mark.parametrize("argv", [["-m", "mm", "--help"], ["-m", "mm", "train", "--help"]])
def test_help_works(argv):
    out = subprocess.run([sys.executable, *argv], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and "usage: mm" in out.stdout


def test_console_script_help():
    import shutil

    exe = shutil.which("mm") or str(__import__("pathlib").Path(sys.executable).parent / "mm")
    out = subprocess.run([exe, "--help"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and "generate" in out.stdout and "demo" in out.stdout


def test_every_command_resolves_to_a_function():
    """Each declared command names an importable function (the CLI contract is wired)."""
    import importlib

    parser = build_parser()
    targets = set()
    for action in parser._subparsers._group_actions:
        for name, sub in action.choices.items():
            if sub._subparsers is None:
                targets.add(sub.get_default("func"))
            else:
                for inner in sub._subparsers._group_actions:
                    for sub2 in inner.choices.values():
                        targets.add(sub2.get_default("func"))
    for target in targets:
        module, func = target.split(":")
        assert callable(getattr(importlib.import_module(module), func)), target


def test_user_error_is_one_line_exit_2(tmp_path, capsys):
    rc = main(["train", str(tmp_path / "missing.yaml")])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("mm: error:") and err.count("\n") == 1


def test_bad_override_is_one_line(tmp_path, capsys):
    rc = main(["train", "configs/vq/shapes.yaml", "train.lrr=1"])
    err = capsys.readouterr().err
    assert rc == 2 and "did you mean 'train.lr'" in err and "Traceback" not in err
