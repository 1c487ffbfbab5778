"""Shared test setup: offline, no wandb, small thread count, fixed seeds."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

# Tiny tensors: one thread avoids oversubscription on the 2-core CI machine (much faster here).
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed():
    import torch

    torch.manual_seed(0)
    yield


@pytest.fixture(scope="session")
def shapes_shards(tmp_path_factory):
    """A small built-in shapes set, written once per session by `mm data shapes`.

    Returns the root Path holding train/ (64 samples, 4 shards), val/ and test/ (32 samples,
    2 shards each) of 32 px samples with sizes.json, and prompts.json (held-out T2I prompts).
    """
    from mm.cli import main

    root = tmp_path_factory.mktemp("shapes")
    code = main(["data", "shapes", "--out", str(root), "--num-samples", "64", "--val-samples", "32",
                 "--image-size", "32", "--seed", "0", "--samples-per-shard", "16"])
    assert code == 0
    return root


@pytest.fixture(scope="session")
def shapes_cache(tmp_path_factory):
    """An empty folder for `data.shapes_cache`: the first tiny run writes the built-in shapes there
    and every later run of the session (tests/train, tests/reliability) reuses them."""
    return tmp_path_factory.mktemp("shapes_cache")
