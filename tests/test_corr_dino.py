"""The DINO / DINOv2 ViT (models/vit.py) and Corr-DINO (models/corr_dino.py).

ViT parity: small PyTorch restatements, written here, of the official blocks (DINO's
`vision_transformer.py`; DINOv2's `Block` / `Attention` / `Mlp` / `LayerScale` /
`PatchEmbed`) and of both repositories' `interpolate_pos_encoding`, with random weights, are
converted strictly with their own state_dict and compared in float32 (< 1e-4) on non-native,
non-square patch grids (up- and downsampled position tables) and on the native grid.

Importer: files the test writes with the official key names (tiny dims) convert strictly;
an unknown, missing or mis-shaped tensor is a one-line error naming the file and the key; the
ViT-S/14 tree has exactly the DINOv2 hub checkpoint's keys and shapes; the parameter counts are
those derived by hand in the test.

Corr-DINO: forward shapes on non-square inputs, a frozen backbone that stays bit-identical
through training steps while the decoder moves, and a tiny model that trains, checkpoints and
evaluates through `miml-jax train` / `eval`.
"""

import json
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from miml_jax import cli, models
from miml_jax.errors import UserInputError
from miml_jax.models import convert, naming, vit
from test_tasks import coco_root  # noqa: F401  (the fixture: a generated COCO tree)

torch = pytest.importorskip("torch")
tnn = torch.nn
F = torch.nn.functional

EXPERIMENTS = os.path.join(os.path.dirname(__file__), "..", "experiments")
TOL = 1e-4


@pytest.fixture(scope="module", autouse=True)
def _float32_highest_precision():
  old_threads = torch.get_num_threads()
  torch.set_num_threads(1)
  with jax.default_matmul_precision("highest"):
    yield
  torch.set_num_threads(old_threads)


# ---- PyTorch restatements of the official ViT pieces ------------------------------------------
class TAttention(tnn.Module):
  def __init__(self, dim, heads):
    super().__init__()
    self.heads = heads
    self.qkv = tnn.Linear(dim, 3 * dim)
    self.proj = tnn.Linear(dim, dim)

  def forward(self, x):
    b, n, c = x.shape
    q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
    attn = ((q @ k.transpose(-2, -1)) * (c // self.heads) ** -0.5).softmax(-1)
    return self.proj((attn @ v).transpose(1, 2).reshape(b, n, c))


class TMlp(tnn.Module):
  def __init__(self, dim, hidden):
    super().__init__()
    self.fc1 = tnn.Linear(dim, hidden)
    self.act = tnn.GELU()
    self.fc2 = tnn.Linear(hidden, dim)

  def forward(self, x):
    return self.fc2(self.act(self.fc1(x)))


class TLayerScale(tnn.Module):
  def __init__(self, dim):
    super().__init__()
    self.gamma = tnn.Parameter(torch.empty(dim).uniform_(-1.0, 1.0))

  def forward(self, x):
    return x * self.gamma


class TBlock(tnn.Module):
  """DINO's Block (layer_scale=False) or DINOv2's (ls1 / ls2 LayerScales)."""

  def __init__(self, dim, heads, layer_scale):
    super().__init__()
    self.norm1 = tnn.LayerNorm(dim, eps=1e-6)
    self.attn = TAttention(dim, heads)
    self.norm2 = tnn.LayerNorm(dim, eps=1e-6)
    self.mlp = TMlp(dim, 4 * dim)
    identity = tnn.Identity
    self.ls1 = TLayerScale(dim) if layer_scale else identity()
    self.ls2 = TLayerScale(dim) if layer_scale else identity()

  def forward(self, x):
    x = x + self.ls1(self.attn(self.norm1(x)))
    return x + self.ls2(self.mlp(self.norm2(x)))


class TPatchEmbed(tnn.Module):
  def __init__(self, dim, patch):
    super().__init__()
    self.proj = tnn.Conv2d(3, dim, patch, stride=patch)

  def forward(self, x):
    return self.proj(x).flatten(2).transpose(1, 2)


class TViT(tnn.Module):
  """The two repositories' ViT with their get_intermediate_layers(n=layers, norm=True)."""

  def __init__(self, dim, depth, heads, patch, img_size, v2, offset=0.1):
    super().__init__()
    self.patch, self.v2, self.offset = patch, v2, offset
    self.patch_embed = TPatchEmbed(dim, patch)
    grid = img_size // patch
    self.cls_token = tnn.Parameter(torch.randn(1, 1, dim))
    self.pos_embed = tnn.Parameter(torch.randn(1, 1 + grid * grid, dim))
    self.blocks = tnn.ModuleList(TBlock(dim, heads, v2) for _ in range(depth))
    self.norm = tnn.LayerNorm(dim, eps=1e-6)
    if v2:
      self.mask_token = tnn.Parameter(torch.zeros(1, dim))
    with torch.no_grad():
      for m in self.modules():
        if isinstance(m, tnn.LayerNorm):
          m.weight.uniform_(0.5, 1.5)
          m.bias.normal_(0.0, 0.2)

  def interpolate_pos_encoding(self, x, w, h):
    # `w` is the input's height and `h` its width, as the official (B, nc, w, h) unpacking.
    npatch, n = x.shape[1] - 1, self.pos_embed.shape[1] - 1
    if npatch == n and w == h:
      return self.pos_embed
    dim, m = x.shape[-1], int(math.sqrt(n))
    w0, h0 = w // self.patch, h // self.patch
    table = self.pos_embed[:, 1:].reshape(1, m, m, dim).permute(0, 3, 1, 2)
    if not self.v2:  # DINO: always the offset and scale factors.
      kw = dict(scale_factor=((w0 + 0.1) / math.sqrt(n), (h0 + 0.1) / math.sqrt(n)))
    elif self.offset:  # DINOv2 with interpolate_offset.
      kw = dict(scale_factor=((w0 + self.offset) / m, (h0 + self.offset) / m))
    else:  # DINOv2 with interpolate_offset=0: to the size.
      kw = dict(size=(w0, h0))
    table = F.interpolate(table, mode="bicubic", antialias=False, **kw)
    assert table.shape[-2:] == (w0, h0)
    table = table.permute(0, 2, 3, 1).reshape(1, -1, dim)
    return torch.cat((self.pos_embed[:, :1], table), dim=1)

  def forward(self, x, layers):
    _, _, w, h = x.shape
    x = self.patch_embed(x)
    x = torch.cat((self.cls_token.expand(x.shape[0], -1, -1), x), dim=1)
    x = x + self.interpolate_pos_encoding(x, w, h)
    outs = {}
    for i, blk in enumerate(self.blocks):
      x = blk(x)
      if i in layers:
        outs[i] = self.norm(x)
    return [
      outs[i][:, 1:].reshape(x.shape[0], w // self.patch, h // self.patch, -1) for i in layers
    ]


def _state_dict(module):
  return {k: v.detach().numpy() for k, v in module.state_dict().items()}


def _target(module, shape):
  return jax.eval_shape(lambda: module.init(jax.random.PRNGKey(0), jnp.zeros(shape)))


def _tiny(family, **overrides):
  base = dict(family=family, embed_dim=32, depth=3, num_heads=4, patch_size=8, img_size=32)
  return vit.ViTConfig.from_dict({**base, **overrides})


@pytest.mark.parametrize(
  "family, offset, hw",
  [
    ("dino", 0.1, (40, 56)),  # 5x7 grid from 4x4: upsampled, non-square
    ("dinov2", 0.1, (24, 48)),  # 3x6: one axis down, one up
    ("dinov2", 0.0, (24, 48)),  # interpolate_offset=0: resized to the size
    ("dino", 0.1, (32, 32)),  # the native grid, square: the table as is
    ("dino", 0.1, (32, 39)),  # native grid (remainder dropped), non-square: interpolated anyway
  ],
)
def test_vit_matches_the_official_blocks_and_position_interpolation(family, offset, hw):
  torch.manual_seed(0)
  cfg = _tiny(family, interpolate_offset=offset)
  ref = TViT(32, 3, 4, 8, 32, v2=family == "dinov2", offset=offset).eval()
  model = vit.VisionTransformer(cfg, layers=(2, 0))
  x = np.random.default_rng(1).normal(size=(2, *hw, 3)).astype(np.float32)
  variables, report = convert.state_dict_to_variables(
    _state_dict(ref), _target(model, x.shape), strict=True, source="ref"
  )
  assert report.converted == len(ref.state_dict())
  with torch.no_grad():
    want = ref(torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2))), (2, 0))
  got = jax.jit(model.apply)(variables, x)
  for a, b in zip(want, got, strict=True):
    a = a.numpy()
    assert a.shape == b.shape == (2, hw[0] // 8, hw[1] // 8, 32)
    assert np.std(a) > 1e-2
    err = float(np.max(np.abs(a - np.asarray(b))))
    assert err < TOL, err


def test_bicubic_matrix_is_torchs_interpolate():
  rng = np.random.default_rng(0)
  for n, out, scale in [(4, 7, 7.1 / 4), (6, 3, 3.1 / 6), (5, 9, None), (14, 32, 32.1 / 14)]:
    x = rng.normal(size=(n,)).astype(np.float32)
    t = torch.from_numpy(x)[None, None, :, None].repeat(1, 1, 1, 4)
    kw = dict(scale_factor=(scale, 1.0)) if scale else dict(size=(out, 4))
    want = F.interpolate(t, mode="bicubic", align_corners=False, **kw)[0, 0, :, 0].numpy()
    got = vit.bicubic_matrix(n, out, scale) @ x
    np.testing.assert_allclose(got, want, atol=1e-5)


# ---- importer ---------------------------------------------------------------------------------
def _official_vit_keys(dim, depth, patch, grid, v2):
  """The key -> shape list of the official hub checkpoints (dino_vit*_pretrain.pth,
  dinov2_vit*14_pretrain.pth), written out from the two repositories' module trees."""
  keys = {
    "cls_token": (1, 1, dim),
    "pos_embed": (1, 1 + grid * grid, dim),
    "patch_embed.proj.weight": (dim, 3, patch, patch),
    "patch_embed.proj.bias": (dim,),
    "norm.weight": (dim,),
    "norm.bias": (dim,),
  }
  if v2:
    keys["mask_token"] = (1, dim)
  for i in range(depth):
    b = f"blocks.{i}."
    keys.update(
      {
        b + "norm1.weight": (dim,),
        b + "norm1.bias": (dim,),
        b + "attn.qkv.weight": (3 * dim, dim),
        b + "attn.qkv.bias": (3 * dim,),
        b + "attn.proj.weight": (dim, dim),
        b + "attn.proj.bias": (dim,),
        b + "norm2.weight": (dim,),
        b + "norm2.bias": (dim,),
        b + "mlp.fc1.weight": (4 * dim, dim),
        b + "mlp.fc1.bias": (4 * dim,),
        b + "mlp.fc2.weight": (dim, 4 * dim),
        b + "mlp.fc2.bias": (dim,),
      }
    )
    if v2:
      keys[b + "ls1.gamma"] = (dim,)
      keys[b + "ls2.gamma"] = (dim,)
  return keys


def _vit_tree(cfg):
  model = vit.VisionTransformer(cfg, layers=(cfg.depth - 1,))
  return _target(model, (1, cfg.img_size, cfg.img_size, 3))


def test_vit_s14_has_the_dinov2_checkpoints_keys_and_shapes():
  cfg = vit.ViTConfig.from_dict(dict(family="dinov2", size="small"))
  tree = _vit_tree(cfg)
  got = {k: shape for k, (_, _, shape) in naming.flax_tree_to_torch_keys(tree).items()}
  assert got == _official_vit_keys(384, 12, 14, 37, v2=True)  # 518 px / 14 = 37


@pytest.mark.parametrize(
  "family, size, count",
  [
    # ViT-S/16: patch 3*256*384 + 384, cls 384, pos 197*384, 12 blocks of 1,774,464 (LN 768,
    # qkv 443,520, proj 147,840, LN 768, fc1 591,360, fc2 590,208), final LN 768.
    ("dino", "small", 21_665_664),
    # ViT-B/16: patch 590,592, cls 768, pos 151,296, 12 blocks of 7,087,872, final LN 1,536.
    ("dino", "base", 85_798_656),
    # ViT-S/14 (DINOv2): patch 226,176, cls 384, pos 1370*384, mask token 384, 12 blocks of
    # 1,774,464 + 2*384 LayerScale, final LN 768.
    ("dinov2", "small", 22_056_576),
  ],
)
def test_vit_parameter_counts(family, size, count):
  tree = _vit_tree(vit.ViTConfig.from_dict(dict(family=family, size=size)))
  assert models.count_params(tree) == count


def _write_official(path, keys, seed=0):
  rng = np.random.default_rng(seed)
  state = {k: torch.from_numpy(rng.normal(size=s).astype(np.float32)) for k, s in keys.items()}
  torch.save(state, str(path))


@pytest.mark.parametrize("family", ["dino", "dinov2"])
def test_official_layout_files_convert_strictly_and_errors_name_the_key(family, tmp_path):
  cfg = _tiny(family)
  tree = _vit_tree(cfg)
  keys = _official_vit_keys(32, 3, 8, 4, v2=family == "dinov2")
  path = tmp_path / "vit.pth"
  _write_official(path, keys)
  state = convert.read_state_dict(str(path))
  variables, report = convert.state_dict_to_variables(state, tree, source=str(path))
  assert report.converted == len(keys) and not report.unmapped and not report.missing
  np.testing.assert_array_equal(
    variables["params"]["blocks_1"]["attn"]["qkv"]["kernel"], state["blocks.1.attn.qkv.weight"].T
  )
  np.testing.assert_array_equal(variables["params"]["pos_embed"], state["pos_embed"])
  cases = [
    (dict(keys, register_tokens=(1, 4, 32)), r"1 unmapped \(register_tokens\)"),
    ({k: v for k, v in keys.items() if k != "blocks.2.mlp.fc2.bias"}, r"1 missing.*fc2\.bias"),
    (dict(keys, pos_embed=(1, 26, 32)), r"mismatched \(pos_embed: \(1, 26, 32\) vs \(1, 17, 32\)"),
  ]
  for bad, message in cases:
    _write_official(path, bad)
    with pytest.raises(UserInputError, match=str(path).replace(".", r"\.") + ".*" + message) as e:
      convert.state_dict_to_variables(convert.read_state_dict(str(path)), tree, source=str(path))
    assert "\n" not in str(e.value)


def test_bad_vit_settings_are_one_line_errors():
  with pytest.raises(UserInputError, match="model.backbone.family: 'clip'"):
    vit.ViTConfig.from_dict(dict(family="clip"))
  with pytest.raises(UserInputError, match="unknown key.*'heads'"):
    vit.ViTConfig.from_dict(dict(heads=3))
  with pytest.raises(UserInputError, match="not a multiple of num_heads"):
    vit.ViTConfig.from_dict(dict(embed_dim=30, num_heads=4))
  model = vit.VisionTransformer(_tiny("dino"), layers=(3,))
  with pytest.raises(UserInputError, match=r"block indices must lie in 0\.\.2"):
    model.init(jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3)))
  with pytest.raises(UserInputError, match="at least the patch size 8"):
    vit.VisionTransformer(_tiny("dino")).init(jax.random.PRNGKey(0), jnp.zeros((1, 6, 32, 3)))


# ---- Corr-DINO --------------------------------------------------------------------------------
TINY_BACKBONE = dict(family="dino", embed_dim=32, depth=2, num_heads=4, patch_size=8, img_size=32)


def _corr_dino(**overrides):
  cfg = dict(
    name="corr_dino",
    image_size=32,
    backbone=TINY_BACKBONE,
    layers=(0, 1),
    decoder_channels=(8, 8),
    num_learned=4,
  )
  return models.build_model({**cfg, **overrides})


@pytest.fixture(scope="module")
def tiny_corr_dino():
  model = _corr_dino(corr_channels=8, context_channels=4)
  inputs = {k: jnp.zeros(v.shape, v.dtype) for k, v in model.example_inputs().items()}
  variables = jax.jit(lambda r: model.init({"params": r}, **inputs, train=False))(
    jax.random.PRNGKey(0)
  )
  return model, variables


def test_corr_dino_outputs_are_at_the_inputs_size(tiny_corr_dino):
  """Non-square inputs (resized to the ViT's 32x32 and the logits back) give maps at their own
  size; each image gets its own prior, so swapping the pair swaps the maps."""
  model, variables = tiny_corr_dino
  rng = np.random.default_rng(0)
  a, f = (rng.normal(size=(2, 40, 72, 3)).astype(np.float32) for _ in range(2))
  apply = jax.jit(lambda v, a, f: model.apply(v, a, f, train=False))
  out = apply(variables, a, f)
  assert set(out) == {"forged_logits", "authentic_logits", "forged_aux", "authentic_aux"}
  for value in out.values():
    assert value.shape == (2, 40, 72, 2) and bool(jnp.all(jnp.isfinite(value)))
  swapped = apply(variables, f, a)
  np.testing.assert_allclose(swapped["forged_logits"], out["authentic_logits"], atol=1e-5)
  assert float(jnp.max(jnp.abs(out["forged_logits"] - out["authentic_logits"]))) > 1e-4


def test_corr_dino_settings_are_checked():
  with pytest.raises(UserInputError, match="model.image_size: 36 is not a multiple of the ViT's"):
    _corr_dino(image_size=36)
  with pytest.raises(UserInputError, match=r"model.layers: \[2\] past the ViT's last block 1"):
    _corr_dino(layers=(2,))
  with pytest.raises(UserInputError, match="model.decoder_width"):
    _corr_dino(decoder_width=8)
  model = _corr_dino(donor=False, aux=False)
  inputs = model.example_inputs()
  shapes = jax.eval_shape(lambda i: model.init(jax.random.PRNGKey(0), **i, train=False), inputs)
  out = jax.eval_shape(lambda v, i: model.apply(v, **i, train=False), shapes, inputs)
  assert set(out) == {"forged_logits", "authentic_logits"}
  assert "aux_head" not in shapes["params"]


def _loss(model, variables, a, f, mask):
  out, updates = model.apply(variables, a, f, train=True, mutable=["batch_stats"])
  logp = jax.nn.log_softmax(out["forged_logits"])
  return -jnp.mean(jnp.take_along_axis(logp, mask[..., None], -1)), updates


@pytest.mark.parametrize("frozen_backbone", [True, False])
def test_a_frozen_backbone_gets_no_gradient(tiny_corr_dino, frozen_backbone):
  model, variables = tiny_corr_dino
  model = model.clone(settings=dataclasses_replace(model.settings, frozen_backbone=frozen_backbone))
  rng = np.random.default_rng(1)
  a, f = (rng.normal(size=(2, 32, 32, 3)).astype(np.float32) for _ in range(2))
  mask = (rng.random((2, 32, 32)) < 0.3).astype(np.int32)

  def loss(params):
    return _loss(model, {**variables, "params": params}, a, f, mask)[0]

  grads = jax.jit(jax.grad(loss))(variables["params"])
  backbone = max(float(jnp.max(jnp.abs(g))) for g in jax.tree_util.tree_leaves(grads["backbone"]))
  decoder = max(float(jnp.max(jnp.abs(g))) for g in jax.tree_util.tree_leaves(grads["decoder"]))
  assert decoder > 0
  assert (backbone == 0.0) if frozen_backbone else (backbone > 0)


def dataclasses_replace(obj, **changes):
  import dataclasses

  return dataclasses.replace(obj, **changes)


# ---- through the public commands --------------------------------------------------------------
TINY = os.path.join(EXPERIMENTS, "caaa_corr_dino.py:tiny")


def _leaves(tree):
  from flax import traverse_util

  return {"/".join(k): np.asarray(v) for k, v in traverse_util.flatten_dict(tree).items()}


@pytest.mark.slow
def test_tiny_corr_dino_converts_dino_weights_trains_frozen_and_evaluates(
  coco_root,  # noqa: F811  (the fixture imported above)
  tmp_path,
  capsys,
):
  """An official-layout DINO file (the tiny ViT's dims) converts into Corr-DINO with --partial
  (every tensor used, only the decoder missing), initialises `miml-jax train`, and stays
  bit-identical through the training steps (optim.frozen + stop_gradient) while the decoder
  moves; the checkpoint evaluates with the forged and donor scores."""
  weights = tmp_path / "dino_tiny_pretrain.pth"
  keys = _official_vit_keys(48, 2, 8, 8, v2=False)
  _write_official(weights, keys, seed=3)
  init = tmp_path / "init.msgpack"
  code = cli.main(
    ["convert", str(weights), "--config", TINY, "--partial", "--out", str(init), "--json"]
  )
  out, err = capsys.readouterr()
  assert code == 0, err
  report = json.loads(out)
  assert report["converted"] == len(keys) and report["unmapped"] == []
  assert report["prefix"] == "add 'backbone.'"
  assert report["missing"] and not any(k.startswith("backbone.") for k in report["missing"])

  workdir = tmp_path / "w"
  data = [
    f"--config.data.train=coco_sdg:{coco_root}",
    f"--config.data.validation=coco_sdg:{coco_root}",
    "--config.input.batch_size=2",
    "--config.eval.batch_size=2",
  ]
  code = cli.main(
    ["train", "--config", TINY, "--workdir", str(workdir), "--init", str(init), "--json", *data]
  )
  out, err = capsys.readouterr()
  assert code == 0, err[-3000:]
  assert f"initialised {len(keys)} of" in err
  from miml_jax import checkpoint

  loaded = _leaves(convert.load_init_file(str(init))[0]["params"])
  at = {s: _leaves(checkpoint.load_model(str(workdir), s)[2]["params"]) for s in (2, 3)}
  for path, value in loaded.items():
    assert path.startswith("backbone/")
    np.testing.assert_array_equal(at[3][path], value, err_msg=path)
  decoder = [p for p in at[3] if p.startswith("decoder/")]
  assert decoder and any(not np.array_equal(at[2][p], at[3][p]) for p in decoder)

  code = cli.main(["eval", "--checkpoint", str(workdir), "--json"])
  out, err = capsys.readouterr()
  assert code == 0, err[-3000:]
  summary = json.loads(out)["summary"]
  assert summary["num_images"] > 0 and 0.0 <= summary["iou"] <= 1.0
  assert 0.0 <= summary["donor_iou"] <= 1.0
