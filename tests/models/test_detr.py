"""The DETR head: denoising queries are invisible to the matching queries, save/load round trip."""

import torch

from mm.models.detr import Detector, DETRConfig, grid_anchors, sine_embed
from mm.models.presets import create_model


def _detector(**kw) -> Detector:
    torch.manual_seed(0)
    mm = create_model("debug", image_size=32)
    return Detector(mm, DETRConfig(class_names=["a", "b", "c"], num_queries=5, depth=2, **kw)).eval()


def _targets():
    return [{"labels": torch.tensor([0, 2]), "boxes": torch.tensor([[0.3, 0.3, 0.2, 0.2], [0.7, 0.6, 0.1, 0.3]])},
            {"labels": torch.tensor([1]), "boxes": torch.tensor([[0.5, 0.5, 0.4, 0.4]])},
            {"labels": torch.zeros(0, dtype=torch.long), "boxes": torch.zeros(0, 4)}]


def test_denoising_queries_do_not_change_the_matching_outputs():
    det = _detector()
    x = torch.randn(3, 3, 32, 32)
    plain = det(x)
    dn = det.head.denoising(_targets(), groups=3, box_noise=0.4, label_noise=0.2)
    outputs, dn_outputs = det(x, dn)
    for (l0, b0), (l1, b1) in zip(plain, outputs):
        assert torch.allclose(l0, l1, atol=1e-5) and torch.allclose(b0, b1, atol=1e-6)
    assert dn_outputs[-1][0].shape == (3, 3 * 2, 4) and dn_outputs[-1][1].shape == (3, 6, 4)
    assert dn.valid.tolist() == [[True, True] * 3, [True, False] * 3, [False, False] * 3]


def test_denoising_mask_separates_groups():
    det = _detector()
    dn = det.head.denoising(_targets(), groups=2, box_noise=0.4, label_noise=0.0)
    m = dn.mask[0]  # image 0: Q = 5 matching queries, then 2 groups of M = 2
    assert m[:5, :5].all() and not m[:5, 5:].any()  # matching queries see only themselves
    assert m[5:7, :7].all() and not m[5:7, 7:].any()  # group 0 sees matching + itself
    assert m[7:, :5].all() and m[7:, 7:].all() and not m[7:, 5:7].any()
    assert torch.equal(dn.labels[0], torch.tensor([0, 2, 0, 2]))
    noise = (dn.boxes - dn.targets).abs()[dn.valid]
    assert (noise[:, :2] <= 0.4 * dn.targets[dn.valid][:, 2:] / 2 + 1e-6).all()


def test_save_and_load_round_trip(tmp_path):
    det = _detector()
    det.save_pretrained(tmp_path)
    again = Detector.from_pretrained(tmp_path)
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(det(x)[-1][1], again(x)[-1][1])
    assert again.class_names == ["a", "b", "c"]
    found = again.detect(x, min_score=0.0)
    assert found[0]["boxes"].shape == (5, 4) and (found[0]["scores"].diff() <= 0).all()


def test_anchor_grid_and_sine_embedding():
    a = grid_anchors(4, 0.2)
    assert a[:, :2].tolist() == [[0.25, 0.25], [0.75, 0.25], [0.25, 0.75], [0.75, 0.75]]
    e = sine_embed(torch.tensor([[0.5, 0.25]]), 16)
    assert e.shape == (1, 32)
