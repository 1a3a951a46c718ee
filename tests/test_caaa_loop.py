"""experiments/caaa_loop.py --tiny: the whole MIMLv2 loop (three CAAA models trained on
synthetic pairs, held-out and web pairs annotated, the dataset built from the annotations, a
Web-IML trained on it) end to end, on data the tests generate; rerunning it redoes nothing."""

import json
import os
import sys

import numpy as np
import pytest

from miml_jax import io
from test_tasks import EXPERIMENTS, coco_root  # noqa: F401 (a fixture)

sys.path.insert(0, EXPERIMENTS)
import caaa_loop


@pytest.mark.slow
def test_the_tiny_loop_runs_end_to_end_and_resumes(coco_root, tmp_path, capsys):  # noqa: F811
  web = tmp_path / "web"
  rng = np.random.default_rng(0)
  for k in range(3):
    authentic = rng.integers(0, 256, (64, 80, 3), dtype=np.uint8)
    forged = authentic.copy()
    forged[10:30, 20:44] = 255
    (web / f"w{k}").mkdir(parents=True)
    io.write_image(str(web / f"w{k}" / "0.png"), authentic)
    io.write_image(str(web / f"w{k}" / "1.jpg"), forged)
  workdir = tmp_path / "loop"
  argv = ["--workdir", str(workdir), "--tiny", "--coco", str(coco_root), "--web", str(web)]
  assert caaa_loop.main(argv + ["--casia", ""]) == 0
  held_out = json.loads((workdir / "held_out" / "report" / "summary.json").read_text())
  # coco_spg + coco_sdg edits of the two held-out photos, scored against their known masks.
  assert held_out["pairs"] == 4 and held_out["routed_pairs"] == 4
  assert set(held_out["against_known_masks"]) <= {"spg", "spg_unaligned", "sdg"}
  web_summary = json.loads((workdir / "web" / "report" / "summary.json").read_text())
  assert web_summary["pairs"] == 3
  assert (workdir / "tfds" / "mimlv2" / "annotations").is_dir()
  metrics = json.loads((workdir / "web_iml" / "metrics.json").read_text())
  assert metrics["step"] == 2
  capsys.readouterr()
  # A second run finds every stage done.
  assert caaa_loop.main(argv + ["--casia", ""]) == 0
  assert capsys.readouterr().err.count("done already") == 7


def test_every_stage_config_loads():
  from miml_jax import config as config_lib

  for stage in caaa_loop.STAGES:
    for variant in ("", ",tiny"):
      config = config_lib.load_config(os.path.join(EXPERIMENTS, f"caaa_loop.py:{stage}{variant}"))
      assert config.model.name
  with pytest.raises(ValueError, match="unknown variant"):
    config_lib.load_config(os.path.join(EXPERIMENTS, "caaa_loop.py:huge"))


def test_the_qes_ablation_and_seeds_add_their_own_branch():
  steps = caaa_loop.commands(
    "W", tiny=False, coco="C", web=None, casia="L.json", ablate_qes=True, seeds=2
  )
  outputs = [output for _, output in steps]
  assert len(outputs) == len(set(outputs))  # No stage overwrites another's output.
  by_out = {output.split(os.sep)[1]: command for command, output in steps}
  filtered, unfiltered = by_out["held_out"], by_out["held_out_unfiltered"]
  assert "--qes-routes" not in filtered
  assert unfiltered[unfiltered.index("--qes-routes") + 1] == ""
  # Everything else about the two annotations is the same.
  strip = lambda argv: [a for a in argv if "held_out" not in a and a not in ("--qes-routes", "")]
  assert strip(filtered) == strip(unfiltered)
  for name in ("web_iml", "web_iml_seed1", "web_iml_unfiltered", "web_iml_unfiltered_seed1"):
    assert name in by_out and f"{name}_eval" in by_out
  assert "--config.seed=1" in by_out["web_iml_unfiltered_seed1"]
  assert any("tfds_unfiltered" in a for a in by_out["web_iml_unfiltered_seed1"])
  assert "--sdg" in filtered and filtered[filtered.index("--sdg") + 1] == os.path.join(
    "W", "corr_dino"
  )
  with pytest.raises(ValueError, match="--sdg"):
    caaa_loop.commands("W", tiny=False, coco="C", web=None, casia=None, sdg="dmac")
