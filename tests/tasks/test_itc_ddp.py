"""ITC over 2 processes (torchrun, gloo) equals ITC of one process on the concatenated batch:
the same loss and, after DDP's gradient averaging, the same gradients. ITM's negatives come from
the global batch (the other rank's samples too) and never share the positive's caption."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from mm.tasks import objectives as obj

ROOT = Path(__file__).resolve().parents[2]
GLOBAL_BATCH, WORLD = 8, 2

WORKER = textwrap.dedent('''
    import json, os, sys
    import torch
    import torch.distributed as dist
    import torch.nn.functional as F
    from safetensors.torch import save_file
    from mm.tasks import objectives as obj

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    sys.path.insert(0, os.environ["TEST_DIR"])
    from test_itc_ddp import make_data, make_towers, embed

    towers = make_towers()
    x, y, ids = make_data()
    per = x.shape[0] // world
    part = slice(rank * per, (rank + 1) * per)
    img, txt = embed(towers, x[part], y[part])
    loss, metrics, logits_i2t, logits_t2i = obj.itc_loss(img, txt, towers["scale"].exp())
    assert logits_i2t.shape == (per, per * world)
    loss.backward()
    grads = {}
    for name, p in towers.items():  # what DDP does: average the gradients over ranks
        g = p.grad.clone()
        dist.all_reduce(g)
        grads[name] = g / world
    mean_loss = loss.detach().clone()
    dist.all_reduce(mean_loss)

    # ITM pairs from the global batch: images/states carry their global sample id.
    gid = torch.arange(part.start, part.stop, dtype=torch.float)
    images = gid.view(-1, 1, 1, 1).expand(per, 3, 2, 2).contiguous()
    states = gid.view(-1, 1, 1).expand(per, ids.shape[1], 4).contiguous().requires_grad_(True)
    mask = torch.ones_like(ids[part], dtype=torch.bool)
    negatives, cross_rank = [], 0
    for _ in range(10):
        imgs, sts, _, labels = obj.itm_pairs(images, states, mask, ids[part], mask, logits_i2t, logits_t2i)
        i_id, t_id = imgs[:, 0, 0, 0].long(), sts[:, 0, 0].long()
        negatives += [[int(a), int(b)] for a, b in zip(i_id[per:], t_id[per:])]
        cross_rank += int(((i_id[per:] // per) != rank).sum() + ((t_id[per:] // per) != rank).sum())
        assert labels[:per].eq(1).all() and labels[per:].eq(0).all()
        sts.sum().backward()  # gradients of gathered states flow back to their owners
    if rank == 0:
        out = os.environ["OUT_DIR"]
        save_file(grads, os.path.join(out, "grads.safetensors"))
    result = {"loss": float(mean_loss) / world, "itc_acc": metrics["itc_acc"], "negatives": negatives,
              "cross_rank": cross_rank, "state_grad": float(states.grad.sum())}
    all_results = [None] * world
    dist.all_gather_object(all_results, result)
    if rank == 0:
        with open(os.path.join(os.environ["OUT_DIR"], "result.json"), "w") as f:
            json.dump(all_results, f)
    dist.destroy_process_group()
''')


def make_towers() -> dict:
    g = torch.Generator().manual_seed(0)
    return {"img_w": torch.randn(4, 6, generator=g).requires_grad_(True),
            "txt_w": torch.randn(4, 5, generator=g).requires_grad_(True),
            "scale": torch.tensor(2.0).requires_grad_(True)}


def make_data():
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(GLOBAL_BATCH, 6, generator=g), torch.randn(GLOBAL_BATCH, 5, generator=g)
    captions = torch.tensor([0, 1, 2, 1, 3, 4, 1, 5])  # caption 1 on both ranks: never a negative of itself
    ids = captions.view(-1, 1).repeat(1, 3) + 10
    return x, y, ids


def embed(towers, x, y):
    return F.normalize(x @ towers["img_w"].t(), dim=-1), F.normalize(y @ towers["txt_w"].t(), dim=-1)


def test_gathered_itc_on_two_ranks_equals_one_rank_on_the_whole_batch(tmp_path):
    env = dict(os.environ, OUT_DIR=str(tmp_path), TEST_DIR=str(Path(__file__).parent), OMP_NUM_THREADS="1",
               PYTHONPATH=str(ROOT))
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(WORLD),
                           "--standalone", str(script)],
                          check=False, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((tmp_path / "result.json").read_text())
    grads = load_file(str(tmp_path / "grads.safetensors"))

    towers = make_towers()
    x, y, ids = make_data()
    img, txt = embed(towers, x, y)
    loss, _, _, _ = obj.itc_loss(img, txt, towers["scale"].exp())
    loss.backward()
    assert abs(results[0]["loss"] - float(loss.detach())) < 1e-6
    for name, p in towers.items():
        assert torch.allclose(grads[name], p.grad, atol=1e-6), name

    captions = (ids[:, 0] - 10).tolist()
    per = GLOBAL_BATCH // WORLD
    all_negatives = [pair for r in results for pair in r["negatives"]]
    for rank, r in enumerate(results):
        for i_id, t_id in r["negatives"]:
            assert captions[i_id] != captions[t_id]  # never the positive, never an identical caption
        assert r["cross_rank"] > 0  # negatives come from the other rank's samples too
        # Each pair row adds d(sum)/d(states) = 1 per element (L=3, D=4) to the text it uses: this
        # rank's 10 x per positives plus every negative row, on ANY rank, that uses one of its texts.
        mine = sum(rank * per <= t_id < (rank + 1) * per for _, t_id in all_negatives)
        assert r["state_grad"] == 12 * (10 * per + mine)
