"""`miml-jax demo`: a local web page where a person uploads an image and sees what each loaded
model (Web-IML, APSC-Net, or any model this library trains) thinks was manipulated.

    miml-jax demo --model webiml=workdirs/quickstart --model apsc=W/best [--port 7860]

The page shows, one column per model side by side: the heatmap, the overlay on the image, the
task's own pictures of its prediction (BusterNet's source / target map), the binary mask at the
threshold of a slider (with a PNG download of it) and, for models with an image head, the
image-level score. Baselines sit beside Web-IML as any other model:

    miml-jax demo --model webiml=W1 --model mantranet=W2 --model busternet=W3

Moving the slider re-thresholds the probability maps cached for the upload: it never runs a
model again. Uploads that are not images, are truncated, or have more than --max-pixels pixels
get a message in the page instead of results.

Why Gradio rather than Streamlit:
- models loaded once, in the CLI process: a Gradio app is a Python object whose callbacks close
  over the loaded predictors, and `launch()` serves it from the process that loaded them. A
  Streamlit page is a script that its own server re-executes on every interaction, so the
  models would have to be handed over through its resource cache, and its server wants to be
  started by `streamlit run`, not by our entry point;
- launching from `miml-jax demo`: `Blocks.launch(server_name, server_port)` is one call;
- testability: each interaction is an ordinary function of (inputs) -> (outputs), tested
  without a server, and the page has stable element ids for a browser test;
- dependency weight: both pull in a web stack (Gradio: FastAPI, uvicorn, pandas, Pillow;
  Streamlit: Tornado, pyarrow, pandas, Pillow), so neither is light; Gradio is an optional
  extra (`pip install "miml-jax[demo]"`), never needed by training or evaluation.
"""

import dataclasses
import os
import shutil
import signal
import tempfile
import uuid

import numpy as np

from miml_jax import io, predict, visualize
from miml_jax.errors import UserInputError

# Refuses uploads beyond 4096 x 4096 pixels: a model runs at the image's own size, and the
# activations of a larger photo would take more memory than a CPU demo machine should give.
DEFAULT_MAX_PIXELS = 4096 * 4096
DEFAULT_PORT = 7860
IMAGE_HEIGHT = 280  # CSS pixels per output picture, so a model's column fits on a screen.


@dataclasses.dataclass(frozen=True)
class DemoModel:
  """One loaded model: its name on the page, where it came from, and a ready Predictor."""

  name: str
  source: str
  model_name: str
  step: int | None
  predictor: predict.Predictor


@dataclasses.dataclass(frozen=True)
class Upload:
  """A decoded upload and every model's (probability map, image score or nan, pictures).

  This is the per-upload cache the threshold slider works from.
  """

  name: str
  image: np.ndarray
  results: list[tuple[np.ndarray, float, list[np.ndarray]]]
  directory: str  # where this upload's mask downloads are written


def require_gradio():
  """Imports gradio, or says how to install it (it is an optional extra)."""
  # A local demo never phones home (Blocks(analytics_enabled=False) covers the page only).
  os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
  try:
    import gradio
  except ModuleNotFoundError as e:
    if e.name != "gradio":
      raise
    raise UserInputError('miml-jax demo needs gradio: pip install "miml-jax[demo]"') from None
  return gradio


def parse_named_path(flag: str, spec: str, default_name: str | None = None) -> tuple[str, str]:
  """'NAME=PATH' -> (NAME, PATH); a bare PATH takes default_name (or is an error without one)."""
  name, separator, path = spec.partition("=")
  if not separator:
    if default_name is None:
      raise UserInputError(f"{flag} {spec}: expected NAME=PATH, e.g. {flag} webiml=workdirs/w")
    name, path = default_name, spec
  name, path = name.strip(), path.strip()
  if not name or not path:
    raise UserInputError(f"{flag} {spec}: expected NAME=PATH with both parts non-empty")
  return name, path


def load_models(
  model_specs: list[str],
  init_spec: str | None,
  config_spec: str | None,
  overrides: list[str],
  resize: str = "none",
) -> list[DemoModel]:
  """Loads every model once (before any server starts); a failure names the model and path.

  model_specs: 'NAME=WORKDIR_OR_CHECKPOINT' strings; init_spec: '[NAME=]FILE' of `miml-jax
  convert`, built from config_spec. overrides (`--config.a.b=v`) apply to every model's config.
  """
  from miml_jax import checkpoint

  if init_spec and not config_spec:
    raise UserInputError("--init needs --config CFG (the experiment config of its model)")
  if config_spec and not init_spec:
    raise UserInputError(
      "--config goes with --init FILE; a --model checkpoint brings its own config"
    )
  named = [("--model",) + parse_named_path("--model", spec) for spec in model_specs]
  if init_spec:
    stem = os.path.splitext(os.path.basename(init_spec.partition("=")[2] or init_spec))[0]
    named.append(("--init",) + parse_named_path("--init", init_spec, default_name=stem))
  if not named:
    raise UserInputError("give at least one --model NAME=WORKDIR (or --init FILE --config CFG)")
  names = [name for _, name, _ in named]
  for name in names:
    if names.count(name) > 1:
      raise UserInputError(f"two models are named '{name}': give each --model its own NAME")

  loaded = []
  for flag, name, path in named:
    try:
      # A workdir, W/best or one step's folder (W/checkpoints/4); or an init file.
      config, model, variables, step = (
        checkpoint.load_for_inference(path, overrides=overrides)
        if flag == "--model"
        else checkpoint.load_for_inference(
          None, init=path, config_spec=config_spec, overrides=overrides
        )
      )
      predictor = predict.Predictor(model, variables, config, batch_size=1, resize=resize)
      if not predictor.task.single_image:
        raise UserInputError(
          f"task '{predictor.task.name}' takes image pairs; the demo shows single-image models"
        )
    except UserInputError as e:
      raise UserInputError(f"{flag} {name}={path}: cannot load the model: {e}") from e
    except Exception as e:  # Any other failure at startup is still this model's, said so.
      raise UserInputError(
        f"{flag} {name}={path}: cannot load the model: {type(e).__name__}: {e}"
      ) from e
    loaded.append(
      DemoModel(
        name=name,
        source=os.path.abspath(path),
        model_name=config.model.name,
        step=step,
        predictor=predictor,
      )
    )
  return loaded


def read_upload(path: str | None, max_pixels: int) -> tuple[np.ndarray, str, bool]:
  """(RGB uint8 image, file name, is_jpeg) of an uploaded file; UserInputError says what is
  wrong with it. The size is read from the header first, so an oversized image (or a
  decompression bomb) is refused before it is decoded."""
  if not path:
    raise UserInputError("no file was uploaded")
  name = os.path.basename(path)
  data = io.read_bytes(path)
  header_size = io.header_size(data, name, max_pixels, hint=UPLOAD_HINT)
  if header_size is not None:
    _check_pixels(name, *header_size, max_pixels)
  image = io.decode_image(data, name)
  _check_pixels(name, image.shape[1], image.shape[0], max_pixels)
  return image, name, data[:3] == b"\xff\xd8\xff"


UPLOAD_HINT = "upload a smaller image (the demo's limit is --max-pixels)"


def _check_pixels(name: str, width: int, height: int, max_pixels: int):
  if width * height > max_pixels:
    raise UserInputError(
      f"{name}: {width}x{height} is {width * height:,} pixels, over this demo's limit of "
      f"{max_pixels:,} (--max-pixels); upload a smaller image"
    )


def run_models(
  models: list[DemoModel], image: np.ndarray, name: str, is_jpeg: bool = False
) -> list[tuple[np.ndarray, float, list[np.ndarray]]]:
  """Each model's (probability map (H, W) float32, image score or nan, the task's pictures of
  the prediction: one uint8 RGB image per `task.picture_names`) for one image."""
  sample = {"image": image, "id": name, "is_jpeg": is_jpeg}
  results = []
  for model in models:
    ((_, prediction),) = list(model.predictor.predict([sample]))
    pictures = model.predictor.task.prediction_pictures(prediction)
    results.append((prediction["prob"], prediction["image_score"], pictures))
  return results


def binary_mask(prob: np.ndarray, threshold: float) -> np.ndarray:
  """uint8 (H, W): 255 where the probability exceeds the threshold (as `predict` writes)."""
  return ((prob > threshold) * 255).astype(np.uint8)


def write_mask(upload: Upload, model_name: str, mask: np.ndarray, threshold: float) -> str:
  """Writes the mask as the PNG the download button serves; returns its path."""
  stem = os.path.splitext(upload.name)[0]
  safe_model = "".join(c if c.isalnum() or c in "-_" else "_" for c in model_name)
  path = os.path.join(upload.directory, f"{stem}_{safe_model}_mask_t{threshold:.2f}.png")
  visualize.save(path, mask)
  return path


def describe_score(image_prob: float, mask: np.ndarray, threshold: float) -> str:
  """The text under a model's name: its image-level score (if any) and the masked share."""
  if np.isnan(image_prob):
    score = "image-level score: none (this model has no image head)"
  else:
    score = f"image-level score: **{image_prob:.3f}** (probability that the image was edited)"
  return f"{score}  \n**{100 * float((mask > 0).mean()):.1f}%** of pixels above {threshold:.2f}"


def build_app(
  models: list[DemoModel],
  *,
  max_pixels: int = DEFAULT_MAX_PIXELS,
  threshold: float = 0.5,
  work_dir: str | None = None,
):
  """The Gradio Blocks of the page; its callbacks use the already loaded `models`."""
  gr = require_gradio()
  work_dir = work_dir or tempfile.mkdtemp(prefix="miml_jax_demo_")
  picture_names = [model.predictor.task.picture_names for model in models]
  # Per model: heatmap, overlay, the task's pictures, mask, download, score text.
  num_outputs = sum(5 + len(names) for names in picture_names)

  def empty_outputs():
    return [None] * num_outputs

  def on_upload(path, threshold):
    try:
      image, name, is_jpeg = read_upload(path, max_pixels)
    except UserInputError as e:
      return [f"**Cannot use this upload.** {e}", None, None] + empty_outputs()
    results = run_models(models, image, name, is_jpeg)
    upload = Upload(
      name=name,
      image=image,
      results=results,
      directory=tempfile.mkdtemp(prefix=uuid.uuid4().hex[:8], dir=work_dir),
    )
    outputs = []
    for model, (prob, image_prob, pictures) in zip(models, results):
      mask = binary_mask(prob, threshold)
      outputs += [
        visualize.heatmap(prob),
        visualize.overlay(image, prob),
        *pictures,
        mask,
        gr.DownloadButton(value=write_mask(upload, model.name, mask, threshold), interactive=True),
        describe_score(image_prob, mask, threshold),
      ]
    status = f"{name}: {image.shape[1]}x{image.shape[0]}, {len(models)} model(s) run"
    return [status, upload, image] + outputs

  def on_threshold(upload, threshold):
    if upload is None:  # Nothing uploaded yet (or the last upload was refused).
      return [gr.skip()] * (3 * len(models))
    outputs = []
    for model, (prob, image_prob, _) in zip(models, upload.results):
      mask = binary_mask(prob, threshold)
      outputs += [
        mask,
        gr.DownloadButton(value=write_mask(upload, model.name, mask, threshold), interactive=True),
        describe_score(image_prob, mask, threshold),
      ]
    return outputs

  with gr.Blocks(title="miml-jax demo", analytics_enabled=False, delete_cache=(3600, 3600)) as app:
    gr.Markdown(
      "## miml-jax: which pixels were edited?\nUpload an image; each model below "
      "shows its heatmap (blue: authentic, red: edited), the heatmap over the image, "
      "and the binary mask at the threshold. Moving the threshold re-uses the "
      "computed maps."
    )
    with gr.Row():
      upload_box = gr.File(
        label="image (PNG, JPEG, TIFF, BMP, WebP)",
        file_count="single",
        type="filepath",
        elem_id="demo-upload",
      )
      with gr.Column():
        slider = gr.Slider(
          0.0, 1.0, value=threshold, step=0.01, label="threshold", elem_id="demo-threshold"
        )
        status = gr.Markdown("Upload an image to start.", elem_id="demo-status")
      shown = gr.Image(
        label="uploaded image", format="png", interactive=False, elem_id="demo-input"
      )
    state = gr.State(None)
    per_model_outputs, threshold_outputs = [], []
    with gr.Row():
      for index, model in enumerate(models):
        with gr.Column():
          step = f", step {model.step}" if model.step is not None else ""
          gr.Markdown(f"### {model.name}\n`{model.model_name}{step}`")
          score = gr.Markdown("", elem_id=f"demo-score-{index}")
          heatmap = gr.Image(
            label="heatmap",
            format="png",
            interactive=False,
            height=IMAGE_HEIGHT,
            elem_id=f"demo-heatmap-{index}",
          )
          overlay = gr.Image(
            label="overlay",
            format="png",
            interactive=False,
            height=IMAGE_HEIGHT,
            elem_id=f"demo-overlay-{index}",
          )
          pictures = [
            gr.Image(
              label=picture_name,
              format="png",
              interactive=False,
              height=IMAGE_HEIGHT,
              elem_id=f"demo-picture-{index}-{picture_index}",
            )
            for picture_index, picture_name in enumerate(picture_names[index])
          ]
          mask = gr.Image(
            label="mask",
            format="png",
            interactive=False,
            height=IMAGE_HEIGHT,
            elem_id=f"demo-mask-{index}",
          )
          download = gr.DownloadButton(
            "download mask (PNG)", interactive=False, elem_id=f"demo-download-{index}"
          )
          per_model_outputs += [heatmap, overlay, *pictures, mask, download, score]
          threshold_outputs += [mask, download, score]
    upload_box.upload(
      on_upload, inputs=[upload_box, slider], outputs=[status, state, shown] + per_model_outputs
    )
    slider.change(on_threshold, inputs=[state, slider], outputs=threshold_outputs)
  return app


def serve(
  models: list[DemoModel],
  *,
  host: str = "127.0.0.1",
  port: int = DEFAULT_PORT,
  max_pixels: int = DEFAULT_MAX_PIXELS,
  threshold: float = 0.5,
):
  """Serves the page until Ctrl+C or SIGTERM; the mask files it wrote are removed after."""
  gr = require_gradio()
  if max_pixels < 1:
    raise UserInputError(f"--max-pixels {max_pixels}: must be at least 1")
  if not 0.0 <= threshold <= 1.0:
    raise UserInputError(f"--threshold {threshold}: must lie in [0, 1]")
  work_dir = tempfile.mkdtemp(prefix="miml_jax_demo_")
  # SIGTERM stops the server as Ctrl+C does, so the cleanup below runs.
  previous = signal.signal(signal.SIGTERM, _raise_keyboard_interrupt)
  try:
    app = build_app(models, max_pixels=max_pixels, threshold=threshold, work_dir=work_dir)
    # The system font stack: the default theme's web fonts would be fetched from the internet.
    theme = gr.themes.Default(
      font=["ui-sans-serif", "system-ui", "sans-serif"], font_mono=["ui-monospace", "monospace"]
    )
    try:
      app.launch(
        server_name=host,
        server_port=port,
        share=False,
        inbrowser=False,
        ssr_mode=False,
        theme=theme,
        allowed_paths=[work_dir],
      )
    except OSError as e:
      raise UserInputError(f"--host {host} --port {port}: cannot serve there: {e}") from e
  except KeyboardInterrupt:
    pass
  finally:
    signal.signal(signal.SIGTERM, previous)
    shutil.rmtree(work_dir, ignore_errors=True)


def _raise_keyboard_interrupt(signum, frame):
  del signum, frame
  raise KeyboardInterrupt
