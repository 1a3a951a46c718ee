"""`miml-jax demo` end to end: tiny trained Web-IML, ManTraNet and BusterNet checkpoints served
side by side by the real command in a subprocess, driven by headless Chromium (upload, heatmaps,
BusterNet's source / target map, threshold slider, mask download, bad uploads), plus the upload
checks and model loading without a browser."""

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request

import cv2
import numpy as np
import pytest

from miml_jax import cli, io
from miml_jax.errors import UserInputError
from test_tasks import coco_root  # noqa: F401 (a fixture)
from tiny_run import QUICKSTART, TINY  # The model of test_end_to_end.py.

pytest.importorskip("gradio", reason="the demo extra (gradio) is not installed")

MAX_PIXELS = 200_000  # The CASIA samples (384x256) pass; the test's 500x500 image does not.
CHROMIUM = "/usr/bin/chromium"
# Headless Chromium on a machine without internet: no background connections, no sandbox as root.
CHROMIUM_ARGS = [
  "--no-sandbox",
  "--disable-gpu",
  "--disable-quic",
  "--no-first-run",
  "--disable-background-networking",
  "--disable-component-update",
  "--disable-sync",
]


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory):
  """A 4-step tiny Web-IML workdir (it has an image head)."""
  workdir = tmp_path_factory.mktemp("demo_run") / "w"
  assert (
    cli.main(
      [
        "train",
        "--config",
        QUICKSTART,
        "--workdir",
        str(workdir),
        "--json",
        *TINY,
        "--config.train.steps=4",
      ]
    )
    == 0
  )
  return workdir


EXPERIMENTS = os.path.join(os.path.dirname(__file__), "..", "experiments")


@pytest.fixture(scope="module")
def baselines(tmp_path_factory, coco_root):  # noqa: F811
  """Tiny ManTraNet and BusterNet workdirs, trained as test_mantranet.py and test_busternet.py
  train them (the same flags, so their XLA programs come from the session's cache)."""
  root = tmp_path_factory.mktemp("baselines")
  runs = {
    "mantranet": [f"{EXPERIMENTS}/mantranet.py:tiny"],
    "busternet": [
      f"{EXPERIMENTS}/busternet.py:branches:tiny",
      f"--config.data.train=coco_copymove:{coco_root}",
      f"--config.data.validation=coco_copymove:{coco_root}",
      "--config.train.steps=2",
      "--config.train.eval_every=0",
    ],
  }
  for name, (config, *flags) in runs.items():
    command = ["train", "--config", config, "--workdir", str(root / name), "--json", *flags]
    assert cli.main(command) == 0, name
  return {name: root / name for name in runs}


@pytest.fixture(scope="session")
def chromium():
  """/usr/bin/chromium, installed from Debian when missing and we may; else the test skips."""
  if not os.path.exists(CHROMIUM):
    if os.geteuid() != 0 or not shutil.which("apt-get"):
      pytest.skip(f"{CHROMIUM} is missing and we cannot apt-get install chromium (not root)")
    environment = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    for command in (["apt-get", "update", "-qq"], ["apt-get", "install", "-y", "-qq", "chromium"]):
      done = subprocess.run(command, env=environment, capture_output=True, text=True, timeout=600)
      if done.returncode != 0:
        pytest.skip(f"{' '.join(command)} failed: {done.stderr.strip()[-300:]}")
  if not os.path.exists(CHROMIUM):
    pytest.skip(f"{CHROMIUM} is still missing after apt-get install chromium")
  return CHROMIUM


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _models(checkpoint, baselines) -> dict:
  """The page's models, in column order: Web-IML from its step-4 folder, and the baselines."""
  return {"webiml": checkpoint / "checkpoints" / "4", **baselines}


@pytest.fixture
def server(checkpoint, baselines, tmp_path):
  """`python -m miml_jax.cli demo` with three models (Web-IML, ManTraNet, BusterNet) on a free
  port; yields its URL once it answers, and always stops it."""
  port = _free_port()
  log_path = tmp_path / "server.log"
  log = open(log_path, "w")
  command = [
    sys.executable,
    "-m",
    "miml_jax.cli",
    "demo",
    *[f"--model={name}={path}" for name, path in _models(checkpoint, baselines).items()],
    "--port",
    str(port),
    "--max-pixels",
    str(MAX_PIXELS),
  ]
  environment = dict(
    os.environ,
    GRADIO_ANALYTICS_ENABLED="False",
    JAX_PLATFORMS="cpu",
    XLA_FLAGS="--xla_force_host_platform_device_count=1",
  )
  process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=environment)
  url = f"http://127.0.0.1:{port}/"
  try:
    deadline = time.monotonic() + 120
    while True:
      if process.poll() is not None:
        pytest.fail(f"the demo exited with {process.returncode}:\n{log_path.read_text()}")
      try:
        with urllib.request.urlopen(url, timeout=2) as response:
          if response.status == 200:
            break
      except OSError:
        pass
      if time.monotonic() > deadline:
        pytest.fail(f"the demo did not answer at {url}:\n{log_path.read_text()}")
      time.sleep(0.5)
    yield url
  finally:
    process.send_signal(signal.SIGTERM)
    try:
      process.wait(timeout=15)
    except subprocess.TimeoutExpired:
      process.kill()
      process.wait()
    log.close()
  # SIGTERM stops the demo as Ctrl+C does: a clean exit, no traceback.
  assert process.returncode == 0, log_path.read_text()
  assert "Traceback" not in log_path.read_text()


def _image_of(page, elem_id: str, url: str) -> np.ndarray:
  """The picture an output image element of the page shows, fetched as the browser did."""
  source = page.locator(f"#{elem_id} img").first.get_attribute("src")
  if source.startswith("/"):
    source = url.rstrip("/") + source
  with urllib.request.urlopen(source, timeout=10) as response:
    data = response.read()
  return io.decode_image(data, source)


def _mask_of(page, elem_id: str, url: str) -> np.ndarray:
  return _image_of(page, elem_id, url)[:, :, 0]


def _test_image(shared_data_dir: str | None, tmp_path) -> str:
  """A real CASIA forgery if shared data is there, else a textured PNG written here."""
  if shared_data_dir:
    folder = os.path.join(shared_data_dir, "casia1_samples", "tampered")
    names = sorted(os.listdir(folder)) if os.path.isdir(folder) else []
    if names:
      return os.path.join(folder, names[0])
  rng = np.random.default_rng(0)
  image = cv2.GaussianBlur(rng.integers(0, 256, (96, 128, 3), dtype=np.uint8), (5, 5), 0)
  image[30:60, 40:90] = rng.integers(0, 256, (30, 50, 3), dtype=np.uint8)  # a noisier patch
  path = str(tmp_path / "upload.png")
  io.write_image(path, image)
  return path


@pytest.fixture
def upload_image(request, tmp_path):
  """The image the browser uploads: shared data when present (shared_data skips otherwise, so
  the fixture asks for it lazily and falls back to a generated PNG)."""
  try:
    shared = request.getfixturevalue("shared_data")
  except pytest.skip.Exception:
    shared = None
  return _test_image(shared, tmp_path)


def _expected(models: dict, image: np.ndarray, name: str):
  """Each model's (probability map, image score, pictures) the page should show, computed here."""
  from miml_jax import demo

  loaded = demo.load_models([f"{k}={v}" for k, v in models.items()], None, None, [])
  return demo.run_models(loaded, image, name)


def _assert_close_images(shown: np.ndarray, expected: np.ndarray, what: str):
  """Equal but for the rare pixel whose probability rounds the other way across processes."""
  assert shown.shape == expected.shape, what
  differs = np.any(shown != expected, axis=-1) if shown.ndim == 3 else shown != expected
  assert differs.mean() < 0.002, f"{what}: {differs.mean():.4f} of pixels differ"


@pytest.mark.slow
def test_demo_in_chromium(server, chromium, checkpoint, baselines, upload_image, tmp_path):
  playwright_api = pytest.importorskip(
    "playwright.sync_api", reason="playwright (test extra) is not installed"
  )
  from miml_jax import visualize
  from miml_jax.tasks import copy_move

  image = io.read_image(upload_image)
  expected = _expected(_models(checkpoint, baselines), image, os.path.basename(upload_image))
  columns = range(len(expected))
  # Web-IML has an image head and no extra pictures; BusterNet (the last) has its class map.
  assert np.isfinite(expected[0][1]) and all(np.isnan(score) for _, score, _ in expected[1:])
  assert [len(pictures) for _, _, pictures in expected] == [0, 0, 1]

  with playwright_api.sync_playwright() as playwright:
    browser = playwright.chromium.launch(
      executable_path=chromium, headless=True, args=CHROMIUM_ARGS
    )
    try:
      page = browser.new_page(viewport={"width": 1500, "height": 1600})
      page.set_default_timeout(60_000)
      page.goto(server)
      page.wait_for_selector("#demo-status")
      empty = tmp_path / "empty.png"
      page.screenshot(path=str(empty), full_page=True)

      # A real image: every model's heatmap, overlay and mask appear, BusterNet's map too.
      page.set_input_files("#demo-upload input[type=file]", upload_image)
      for index in columns:
        page.wait_for_selector(f"#demo-mask-{index} img")
      page.wait_for_selector("#demo-picture-2-0 img")
      page.wait_for_selector("#demo-score-0 :text('image-level score')")
      screenshot = tmp_path / "demo.png"
      page.screenshot(path=str(screenshot), full_page=True)
      before, after = io.read_image(str(empty)), io.read_image(str(screenshot))
      assert before.shape != after.shape or np.any(before != after)
      assert page.locator("#demo-picture-0-0, #demo-picture-1-0").count() == 0

      for index, (prob, score, pictures) in zip(columns, expected):
        _assert_close_images(
          _image_of(page, f"demo-heatmap-{index}", server),
          visualize.heatmap(prob),
          f"heatmap {index}",
        )
        _assert_close_images(
          _image_of(page, f"demo-overlay-{index}", server),
          visualize.overlay(image, prob),
          f"overlay {index}",
        )
        _assert_close_images(
          _mask_of(page, f"demo-mask-{index}", server),
          ((prob > 0.5) * 255).astype(np.uint8),
          f"mask {index}",
        )
        for number, picture in enumerate(pictures):
          _assert_close_images(
            _image_of(page, f"demo-picture-{index}-{number}", server), picture, "class map"
          )
        score_text = page.locator(f"#demo-score-{index}").inner_text()
        wanted = "no image head" if np.isnan(score) else f"{score:.3f}"
        assert wanted in score_text, score_text
      classes = _image_of(page, "demo-picture-2-0", server).reshape(-1, 3)
      assert {tuple(c) for c in np.unique(classes, axis=0)} <= set(
        map(tuple, copy_move.CLASS_COLOURS.tolist())
      )
      assert np.any(_image_of(page, "demo-overlay-0", server) != image)

      # The slider re-thresholds the cached maps: at 0 every pixel is tampered, at 1 none is.
      slider = page.locator("#demo-threshold input[type=range]")
      masks = {0.5: _mask_of(page, "demo-mask-0", server)}
      for key, threshold in (("Home", 0.0), ("End", 1.0)):
        slider.focus()
        slider.press(key)
        page.wait_for_function(
          "([text]) => document.querySelector('#demo-score-2').innerText.includes(text)",
          arg=[f"above {threshold:.2f}"],
        )
        page.wait_for_timeout(300)  # Let the mask images load their new sources.
        for index, (prob, _, _) in zip(columns, expected):
          mask = _mask_of(page, f"demo-mask-{index}", server)
          assert np.array_equal(mask, ((prob > threshold) * 255).astype(np.uint8)), index
          assert np.all(mask == (255 if threshold == 0.0 else 0)), (key, index)
        masks[threshold] = _mask_of(page, "demo-mask-0", server)
        # The download serves the mask on the page as a PNG.
        with page.expect_download() as download_info:
          page.locator("#demo-download-0").click()
        downloaded = download_info.value
        assert downloaded.suggested_filename.endswith(".png")
        assert np.array_equal(io.read_mask(downloaded.path()), masks[threshold])
      assert not np.array_equal(masks[0.0], masks[1.0])

      # Bad uploads get a message in the page, not a traceback.
      not_image = tmp_path / "notes.txt"
      not_image.write_text("this is not an image\n")
      too_big = tmp_path / "big.png"
      io.write_image(str(too_big), np.zeros((500, 500, 3), np.uint8))
      for path, message in (
        (not_image, "not a readable image"),
        (too_big, "over this demo's limit"),
      ):
        page.locator("#demo-upload button[aria-label='Clear']").click()  # as a person would
        page.set_input_files("#demo-upload input[type=file]", str(path))
        page.wait_for_function(
          "([name, message]) => { const t = document.querySelector('#demo-status').innerText;"
          " return t.includes(name) && t.includes(message); }",
          arg=[path.name, message],
        )
        assert "Traceback" not in page.content()
      assert page.locator("#demo-mask-0 img").count() == 0  # No stale results remain.
    finally:
      browser.close()


def test_read_upload_refuses_bad_files(tmp_path):
  image = np.random.default_rng(1).integers(0, 256, (40, 50, 3), dtype=np.uint8)
  good = tmp_path / "good.png"
  io.write_image(str(good), image)
  from miml_jax import demo

  decoded, name, is_jpeg = demo.read_upload(str(good), max_pixels=2000)
  assert name == "good.png" and not is_jpeg and np.array_equal(decoded, image)
  with pytest.raises(UserInputError, match=r"good.png: 50x40 is 2,000 pixels, over .* 1,999"):
    demo.read_upload(str(good), max_pixels=1999)
  truncated = tmp_path / "cut.png"
  truncated.write_bytes(good.read_bytes()[:200])
  with pytest.raises(UserInputError, match="cut.png: not a readable image"):
    demo.read_upload(str(truncated), max_pixels=2000)
  text = tmp_path / "notes.txt"
  text.write_text("hello")
  with pytest.raises(UserInputError, match="notes.txt: not a readable image"):
    demo.read_upload(str(text), max_pixels=2000)


def test_models_that_cannot_load_stop_startup(checkpoint, tmp_path, capsys):
  """Bad --model values end the command with one line naming the model, before serving."""
  cases = [
    (["--model", f"ghost={tmp_path / 'nowhere'}"], "--model ghost="),
    (["--model", str(checkpoint)], "expected NAME=PATH"),
    (["--model", f"a={checkpoint}", "--model", f"a={checkpoint}"], "two models"),
    (["--init", str(tmp_path / "x.msgpack")], "--init needs --config"),
    ([], "at least one --model"),
  ]
  for flags, message in cases:
    code = cli.main(["demo", "--port", str(_free_port()), *flags])
    _, err = capsys.readouterr()
    assert code == cli.EXIT_USER_ERROR and message in err, (flags, err)
    assert "Traceback" not in err


def test_init_file_model_matches_its_checkpoint(checkpoint, tmp_path):
  """--init FILE --config CFG (how converted APSC-Net weights are shown) loads the same model
  as the checkpoint the file was written from: the same maps and image score, named as asked."""
  from miml_jax import checkpoint as checkpoint_lib
  from miml_jax import demo
  from miml_jax.models import convert

  config, _, variables, _ = checkpoint_lib.load_model(str(checkpoint))
  init_file = str(tmp_path / "weights.msgpack")
  convert.save_init_file(init_file, variables, config.model)
  overrides = [flag[len("--config.") :] for flag in TINY]
  from_checkpoint, from_init = demo.load_models(
    [f"trained={checkpoint}"], f"converted={init_file}", QUICKSTART, overrides
  )
  assert (from_checkpoint.name, from_init.name) == ("trained", "converted")
  assert from_checkpoint.step == 4 and from_init.step is None
  image = np.random.default_rng(2).integers(0, 256, (40, 72, 3), dtype=np.uint8)
  (prob_a, score_a, _), (prob_b, score_b, _) = demo.run_models(
    [from_checkpoint, from_init], image, "x"
  )
  assert prob_a.shape == (40, 72) and prob_a.dtype == np.float32
  np.testing.assert_allclose(prob_a, prob_b, atol=1e-6)
  assert np.isfinite(score_a) and score_a == pytest.approx(score_b, abs=1e-6)
  # A bare FILE is named after it; an init file without --config is refused.
  (bare,) = demo.load_models([], init_file, QUICKSTART, overrides)
  assert bare.name == "weights"
  with pytest.raises(UserInputError, match="--init needs --config"):
    demo.load_models([], init_file, None, overrides)
