"""`miml-jax annotate` (CAAA): routing, the flip test-time augmentation and QES in one jitted
step, bad pairs recorded and never fatal, forged files stored unchanged, restart without redoing
a recorded pair, the report, and the dataset `mimlv2/annotations` builds from the output; on
data the tests generate, with tiny models trained here for a few steps."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from miml_jax import annotate, cli, io, qes
from test_tasks import EXPERIMENTS, coco_root, noise  # noqa: F401 (a fixture)


def run(capsys, *argv):
  code = cli.main([str(a) for a in argv])
  out, err = capsys.readouterr()
  return code, out, err


def _train(tmp_path_factory, name, config, *data):
  workdir = tmp_path_factory.mktemp(name) / "w"
  code = cli.main(
    [
      "train",
      "--config",
      os.path.join(EXPERIMENTS, config),
      "--workdir",
      str(workdir),
      "--json",
      *data,
      "--config.train.steps=2",
      "--config.train.eval_every=0",
      "--config.train.checkpoint_every=2",
    ]
  )
  assert code == 0
  return workdir


@pytest.fixture(scope="module")
def spg_model(coco_root, tmp_path_factory):  # noqa: F811
  return _train(
    tmp_path_factory,
    "spg",
    "pair_segmentation.py:tiny",
    f"--config.data.train=coco_spg:{coco_root}",
    f"--config.data.validation=coco_spg:{coco_root}",
  )


@pytest.fixture(scope="module")
def classifier(tmp_path_factory):
  photos = tmp_path_factory.mktemp("photos")
  for k in range(12):
    io.write_image(str(photos / f"{k:02d}.png"), noise(72, 88, 100 + k, 30, 220))
  return _train(
    tmp_path_factory,
    "cls",
    "pair_classification.py:tiny",
    f"--config.data.train=pair_synth:{photos}",
    f"--config.data.validation=pair_synth:{photos}",
    "--config.data.pair_synth.holdout=0.25",
  )


@pytest.fixture()
def web_pairs(tmp_path):
  """CAAA-layout pairs: good ones (PNG and JPEG forgeries, greyscale and RGBA files) and bad
  ones (an unreadable file, a tiny image, a panorama)."""
  root = tmp_path / "pairs"
  rng = np.random.default_rng(0)

  def pair(name, authentic, forged, forged_ext=".png"):
    folder = root / name
    folder.mkdir(parents=True)
    io.write_image(str(folder / "0.png"), authentic)
    io.write_image(str(folder / f"1{forged_ext}"), forged)

  for k in range(3):
    authentic = rng.integers(0, 256, (70, 90, 3), dtype=np.uint8)
    forged = authentic.copy()
    forged[10:40, 20:50] = 255
    pair(f"good{k}", authentic, forged, ".jpg" if k == 1 else ".png")
  grey = rng.integers(0, 256, (64, 64), dtype=np.uint8)
  pair("grey", grey, grey)
  rgba = rng.integers(0, 256, (64, 64, 4), dtype=np.uint8)
  pair("rgba", rgba[..., :3], rgba)
  pair("tiny", rng.integers(0, 256, (20, 20, 3), dtype=np.uint8), np.zeros((20, 20, 3), np.uint8))
  pair("panorama", np.zeros((40, 400, 3), np.uint8), np.zeros((40, 400, 3), np.uint8))
  (root / "broken").mkdir()
  io.write_image(str(root / "broken" / "0.png"), np.zeros((64, 64, 3), np.uint8))
  (root / "broken" / "1.jpg").write_bytes(b"\xff\xd8\xff not really a jpeg")
  return root


SMALL = ["--classifier-size", "64", "--spg-size", "64", "--sdg-size", "64", "--batch-size", "2"]


def _records(out):
  return {r["index"]: r for r in annotate.read_records(str(out))}


def test_annotate_routes_writes_resumes_and_builds(
  web_pairs, classifier, spg_model, tmp_path, capsys
):
  out = tmp_path / "annotated"
  argv = [
    "annotate",
    "--pairs",
    f"pairs:{web_pairs}",
    "--out",
    out,
    "--classifier",
    classifier,
    "--spg",
    spg_model,
    "--qes-threshold",
    "0.0",
    *SMALL,
  ]
  # A first run stopped after three pairs, then resumed: nothing recorded is redone.
  code, _, err = run(capsys, *argv, "--limit", "3")
  assert code == 0, err
  first = (out / "annotations-00000-of-00001.jsonl").read_text().splitlines()
  assert len(first) == 3
  code, out_text, err = run(capsys, *argv, "--json")
  assert code == 0, err
  assert "resuming" in err and "pairs/s" in err
  lines = (out / "annotations-00000-of-00001.jsonl").read_text().splitlines()
  assert lines[:3] == first and len(lines) == 8
  records = _records(out)
  assert sorted(records) == list(range(8))
  by_id = {r.get("id"): r for r in records.values()}
  # Bad pairs are recorded with their reason, and the run went on.
  assert by_id["tiny"]["status"] == "skipped" and "min_side" in by_id["tiny"]["reason"]
  assert by_id["panorama"]["status"] == "skipped" and "max_aspect" in by_id["panorama"]["reason"]
  broken = [r for r in records.values() if r["status"] == "error"]
  assert len(broken) == 1 and "broken" in broken[0]["reason"]
  # Greyscale and RGBA files are read as RGB and annotated like the others.
  routed = [r for r in records.values() if "route" in r]
  assert {r["id"] for r in routed} == {"good0", "good1", "good2", "grey", "rgba"}
  for r in routed:
    assert r["route"] in annotate.ROUTES and 0 <= r["same_source"] <= 1
    # The classifier trained two steps: any route. No --sdg model was given, and a cropped
    # pair whose predicted box is degenerate cannot be aligned.
    if r["route"] == "sdg":
      assert r["status"] == "unannotated"
      continue
    if r["status"] == "skipped":
      assert r["route"] == "spg_unaligned" and "crop box" in r["reason"]
      continue
    assert (r["status"] == "kept") == (r["qes"] > 0.0)
    folder = "masks" if r["status"] == "kept" else "rejected"
    mask = io.read_mask(str(out / folder / f"{r['name']}.png"))
    forged_file = next((web_pairs / r["id"]).glob("1.*"))
    assert mask.shape == io.read_image(str(forged_file)).shape[:2]
    if r["status"] == "kept":  # The forged file's bytes, unchanged, under its own format.
      stored = out / "imgs" / (r["name"] + forged_file.suffix)
      assert stored.read_bytes() == forged_file.read_bytes()
  summary = json.loads(out_text)["summary"]
  assert summary["pairs"] == 8 and sum(summary["by_status"].values()) == 8
  for name in ("report.md", "qes_histogram.png", "summary.json"):
    assert (out / "report" / name).is_file()
  assert not list(out.glob("**/.tmp-*"))

  # The dataset of the kept annotations.
  kept = sorted(r["name"] for r in records.values() if r["status"] == "kept")
  if kept:
    data_dir = tmp_path / "tfds"
    code, _, err = run(
      capsys,
      "data",
      "build",
      "mimlv2",
      "--config",
      "annotations",
      "--manual-dir",
      out,
      "--data-dir",
      data_dir,
    )
    assert code == 0, err
    from miml_jax.input import sources

    built = sources.make_source(f"tfds:{data_dir}/mimlv2/annotations", "train")
    assert len(built) == len(kept)

  # Resuming with other settings, or into a folder that is not an annotate output, is refused.
  code, _, err = run(capsys, *argv[: -len(SMALL)], "--spg-size", "96")
  assert code == 2 and "other settings" in err
  other = tmp_path / "other"
  other.mkdir()
  (other / "mine.txt").write_text("keep me")
  code, _, err = run(capsys, *argv[:4], other, *argv[5:])
  assert code == 2 and "not an annotate output" in err
  assert (other / "mine.txt").read_text() == "keep me"


def test_a_line_cut_short_by_a_kill_is_redone(web_pairs, spg_model, tmp_path, capsys):
  out = tmp_path / "annotated"
  argv = ["annotate", "--pairs", f"pairs:{web_pairs}", "--out", out, "--route", "spg"]
  argv += ["--spg", spg_model, *SMALL]
  assert run(capsys, *argv, "--limit", "2")[0] == 0
  ledger = out / "annotations-00000-of-00001.jsonl"
  text = ledger.read_text()
  ledger.write_text(text[: len(text) - 7])  # The second record, cut short.
  assert run(capsys, *argv)[0] == 0
  lines = ledger.read_text().splitlines()
  assert len(lines) == 8 and all(json.loads(line) for line in lines)
  assert sorted(_records(out)) == list(range(8))
  assert all(r["route"] == "spg" for r in _records(out).values() if "route" in r)


def test_processes_split_the_pairs(web_pairs, spg_model, tmp_path, capsys):
  out = tmp_path / "annotated"
  argv = ["annotate", "--pairs", f"pairs:{web_pairs}", "--out", out, "--route", "spg"]
  argv += ["--spg", spg_model, *SMALL, "--process-count", "2"]
  assert run(capsys, *argv, "--process-index", "1")[0] == 0
  assert not (out / "report").exists()  # Process 0 has not run yet.
  assert run(capsys, *argv, "--process-index", "0")[0] == 0
  assert (out / "report" / "report.md").is_file()
  for k in range(2):
    records = [
      json.loads(line)
      for line in (out / f"annotations-0000{k}-of-00002.jsonl").read_text().splitlines()
    ]
    assert sorted(r["index"] for r in records) == list(range(k, 8, 2))


def test_synthetic_pairs_are_scored_against_their_masks(coco_root, spg_model, tmp_path, capsys):  # noqa: F811
  out = tmp_path / "annotated"
  code, text, err = run(
    capsys,
    "annotate",
    "--pairs",
    f"coco_spg:{coco_root}",
    "--split",
    "validation",
    "--image-size",
    "64",
    "--out",
    out,
    "--route",
    "spg",
    "--spg",
    spg_model,
    *SMALL,
    "--json",
  )
  assert code == 0, err
  summary = json.loads(text)["summary"]
  truth = summary["against_known_masks"]["spg"]
  assert truth["pairs"] == 2 and 0 <= truth["iou_all"] <= 1 and 0 <= truth["trivial_iou_all"] <= 1
  assert summary["route_accuracy"] == 1.0  # --route spg, and coco_spg pairs are SPG.
  assert "Against the known masks" in (out / "report" / "report.md").read_text()


def test_the_jitted_step_is_the_official_tta_then_qes(spg_model):
  """Soft mask = sigmoid(combined un-flipped logits), flipping both images (SPG), and QES of it
  in the same step, against the model applied flip by flip."""
  model = annotate.load_model(str(spg_model), None, "spg", ("pair_segmentation",))
  rng = np.random.default_rng(1)
  batch = {k: rng.integers(0, 256, (2, 64, 64, 3), dtype=np.uint8) for k in ("authentic", "forged")}
  task = model.task

  def logit(view):
    outputs = model.module.apply(model.variables, **task.model_inputs(view), train=False)
    return np.asarray(task.prediction_logits(outputs, view))

  views = [batch] + [{k: np.flip(v, axis) for k, v in batch.items()} for axis in (1, 2)]
  logits = [logit(v) for v in views]
  logits = [logits[0], np.flip(logits[1], 1), np.flip(logits[2], 2)]
  for reduce, combined in (("mean", np.mean(logits, 0)), ("sum", np.sum(logits, 0))):
    step = jax.jit(annotate.annotate_fn(model, flip_authentic=True, reduce=reduce, tta=True))
    out = step(model.variables, {k: jnp.asarray(v) for k, v in batch.items()})
    expected = 1 / (1 + np.exp(-combined))
    np.testing.assert_allclose(out["soft"], expected, atol=1e-5)
    np.testing.assert_allclose(out["qes"], [qes.qes(m) for m in np.asarray(out["soft"])])
  # SDG flips the forged image only: the authentic image the model sees is never flipped.
  views = [batch] + [dict(batch, forged=np.flip(batch["forged"], axis)) for axis in (1, 2)]
  logits = [logit(v) for v in views]
  combined = logits[0] + np.flip(logits[1], 1) + np.flip(logits[2], 2)
  step = jax.jit(annotate.annotate_fn(model, flip_authentic=False, reduce="sum", tta=True))
  out = step(model.variables, {k: jnp.asarray(v) for k, v in batch.items()})
  np.testing.assert_allclose(out["soft"], 1 / (1 + np.exp(-combined)), atol=1e-5)


def test_unaligned_pairs_are_aligned_by_the_box_either_way():
  rng = np.random.default_rng(2)
  big = rng.integers(0, 256, (120, 160, 3), dtype=np.uint8)
  crop = big[30:90, 40:120].copy()
  box = [40 / 160, 30 / 120, 120 / 160, 90 / 120]

  def pair(authentic, forged):
    return annotate._Pair(0, "p", authentic, forged, forged.shape[:2], b"", ".png", None, None, {})

  how, authentic, forged, where = annotate.align_unaligned(pair(big, crop), box, 64)
  assert how == "authentic_cropped" and where is None
  np.testing.assert_allclose(authentic.astype(float), forged.astype(float), atol=40)
  how, authentic, forged, where = annotate.align_unaligned(pair(crop, big), box, 64)
  assert how == "forged_cropped" and where == box
  # The annotation of a cropped-out forged image lies in the box, zero outside.
  frame = annotate._mask_in_frame(np.ones((64, 64), np.float32), (120, 160), box)
  assert frame[30:90, 40:120].min() == 1 and frame.sum() == 60 * 80
  assert annotate.align_unaligned(pair(big, crop), [0.5, 0.5, 0.51, 0.9], 64) is None
