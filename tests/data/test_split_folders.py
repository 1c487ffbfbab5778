"""A data set root (train/ val/ test/ as `mm data shapes --out DIR` writes it) given as --data:
evaluation takes its test split (else val) and says so; other commands name the split folders."""

import json
import shutil

import pytest

from mm.cli import main
from mm.data.shards import eval_split, expand_shards, split_folders
from mm.errors import MMError


def test_split_folders_of_a_shapes_root(shapes_shards):
    assert list(split_folders(shapes_shards)) == ["train", "val", "test"]
    assert split_folders(shapes_shards / "train") == {}


def test_expand_shards_on_a_root_names_the_split_folders(shapes_shards):
    with pytest.raises(MMError, match=r"holds split folders train/, val/, test/: pass one of them, e\.g\. .*train"):
        expand_shards(str(shapes_shards))
    assert len(expand_shards(str(shapes_shards / "test"))) == 2  # a split folder is a shard folder


def test_eval_split_prefers_test_then_val_and_says_which(shapes_shards, tmp_path, capsys):
    assert eval_split(str(shapes_shards)) == str(shapes_shards / "test")
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "test split" in err and str(shapes_shards / "test") in err

    root = tmp_path / "no_test"
    for split in ("train", "val"):
        shutil.copytree(shapes_shards / split, root / split)
    assert eval_split(str(root)) == str(root / "val")
    assert "val split" in capsys.readouterr().err

    only_train = tmp_path / "only_train"
    shutil.copytree(shapes_shards / "train", only_train / "train")
    assert eval_split(str(only_train)) == str(only_train)  # nothing to evaluate on: left as given
    with pytest.raises(MMError, match="split folders train/"):
        expand_shards(str(only_train))

    for spec in (str(shapes_shards / "val"), str(shapes_shards / "val" / "*.tar"), "pipe:cat x.tar"):
        assert eval_split(spec) == spec  # shard folders and patterns are untouched, silently
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize("argv", [["data", "inspect", "{root}"],
                                  ["data", "tokenizer", "--data", "{root}", "--out", "{tmp}/tok"]])
def test_other_commands_name_the_split_folders(shapes_shards, tmp_path, capsys, argv):
    argv = [a.format(root=shapes_shards, tmp=tmp_path) for a in argv]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "split folders train/, val/, test/" in err and "write some" not in err


def test_eval_vqa_on_a_root_uses_its_test_split(shapes_shards, tmp_path, monkeypatch, capsys):
    import mm.generation.vqa

    monkeypatch.setattr(mm.generation.vqa, "load_vqa_answerer",
                        lambda model_dir: lambda images, questions: ["yes"] * len(questions))
    (tmp_path / "model").mkdir()
    out = tmp_path / "vqa.json"
    assert main(["eval", "vqa", "--model", str(tmp_path / "model"), "--data", str(shapes_shards),
                 "--out", str(out)]) == 0
    assert "evaluating on its test split" in capsys.readouterr().err
    from mm.eval.vqa import iter_vqa_shards

    results = json.loads((tmp_path / "vqa_results.json").read_text())
    assert len(results) == len(list(iter_vqa_shards(str(shapes_shards / "test")))) > 0
