"""The demo's report pieces without the whole demo: the T2I ceiling in generate_held_out and report.md."""

import json
from types import SimpleNamespace

from mm.train.report import GOALS, generate_held_out, markdown
from tests.generation.conftest import bundle_dir  # noqa: F401  (the tiny exported model fixture)


def test_generate_held_out_reports_the_t2i_ceiling(bundle_dir, tmp_path):  # noqa: F811
    gen = generate_held_out(bundle_dir, tmp_path, per_prompt=1, stride=30, guidance=2.0, top_k=0)
    assert gen["images"] == 2 and (tmp_path / "scores.json").is_file()
    # The ceiling covers all 60 held-out prompts (2 renders each), whatever the stride.
    assert gen["ceiling_images"] == 120 and 0.0 <= gen["ceiling"] <= 100.0
    assert 0.0 <= gen["ceiling_raw"] <= 100.0
    assert set(gen["ceiling_per_tag"]) == {"single", "two", "count", "position", "relation"}
    assert set(gen["ceiling_per_attribute"]) == {"color", "shape", "count", "position"}
    json.dumps(gen)  # the stage record is JSON


def test_report_md_shows_the_ceiling_against_its_goal(tmp_path):
    r = {"mode": "fast", "minutes": 1.0, "cpu_minutes": 2.0, "torch_threads": 2,
         "stage_minutes": {"generate": 0.5}, "stage_cpu_minutes": {"generate": 1.0},
         "t2i_compositional_accuracy": 12.5, "t2i_ceiling": 97.5, "t2i_ceiling_raw": 100.0,
         "t2i_ceiling_per_tag": {"single": 100.0, "count": 90.0}}
    gen = {"images": 2, "prompts": 2, "guidance": 2.0, "per_tag": {}, "per_attribute": {},
           "grid": str(tmp_path / "generate" / "grid.png")}
    md = markdown(SimpleNamespace(out=tmp_path), r, gen, [], {})
    assert GOALS["t2i_ceiling"] == 98.0
    assert "| t2i_ceiling | 97.5% | ≥ 98% |" in md
    assert "T2I ceiling 97.5% (goal ≥ 98%)" in md and "score 100.0%" in md and "count 90.0%" in md
    # A report of an older demo folder (no ceiling recorded) still renders.
    old = {k: v for k, v in r.items() if not k.startswith("t2i_ceiling")}
    assert "| t2i_ceiling | n/a% | ≥ 98% |" in markdown(SimpleNamespace(out=tmp_path), old, gen, [], {})
