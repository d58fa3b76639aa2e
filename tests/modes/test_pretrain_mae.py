"""The MAE-style pretraining step: its loss is the reference DTM loss on the decoder's outputs (all positions or the
hidden ones), and its config checks. The shared loop tests (sharding, accumulation, one compilation, resume) run
for both students in test_pretrain.py."""
import jax
import jax.numpy as jnp
import morphing_reference as reference
import numpy as np
import pytest
from flax import nnx
from train_testing import tiny_config

from dtm_jax import config_checks, images, targets
from dtm_jax.models import functional, mae
from dtm_jax.modes import pretrain as train

SCHEDULE = (6, 3)  # (num_merge, num_iters), fixed so that the reference needs no schedule draw


def _reference_loss(config, params, target, batch, step):
  """The loss from first principles: the masks the step key draws, the student's predictions, the loop reference."""
  model_cfg = train.student_config(config)
  student, _ = functional.abstract_split(lambda: mae.MAEStudent(model_cfg, rngs=nnx.Rngs(0)))
  x = images.to_model_input(jnp.asarray(batch["image"]), config.input.mean, config.input.std)
  rng = jax.random.fold_in(jax.random.key(config.seed), step)
  ids_keep, ids_restore, mask = mae.random_masking(jax.random.fold_in(rng, train.MASKING_STREAM), x.shape[0],
                                                   model_cfg.num_patches, model_cfg.num_visible)
  pred = np.asarray(student.apply(params, x, ids_keep, ids_restore), np.float64)
  tokens = np.asarray(target.tokens(target.params, x), np.float64)
  scored = np.asarray(mask).tolist() if config.dtm.loss_positions == "masked" else None
  if config.dtm.enabled:
    groups = [[reference.morph(tokens[b], *SCHEDULE)[0] for b in range(len(tokens))]] * config.dtm.num_schedules
  else:
    groups = [[list(range(tokens.shape[1]))] * len(tokens)]
  return reference.dtm_loss(pred, tokens, groups, kind=config.dtm.loss, beta=config.dtm.beta, scored=scored)


@pytest.mark.parametrize("enabled", [True, False])
@pytest.mark.parametrize("positions", ["all", "masked"])
def test_loss_is_the_reference_dtm_loss_on_the_decoder_outputs(enabled, positions):
  config = tiny_config("mae", **{"dtm.fixed_schedule": SCHEDULE, "dtm.enabled": enabled,
                                 "dtm.loss_positions": positions})
  model_cfg = train.student_config(config)
  student, _ = functional.abstract_split(lambda: mae.MAEStudent(model_cfg, rngs=nnx.Rngs(0)))
  _, params = functional.split_module(mae.MAEStudent(model_cfg, rngs=nnx.Rngs(config.seed)))
  target = targets.build_target(config.target, image_size=model_cfg.image_size, patch_size=model_cfg.patch_size)
  loss_and_grads = train.make_loss_and_grads(student=student, target=target, config=config,
                                             tokens=model_cfg.num_patches)
  rng = np.random.default_rng(0)
  batch = {"image": rng.integers(0, 256, (8, 16, 16, 3), dtype=np.uint8), "mask": np.zeros((8, 16), bool)}
  for step in (0, 7):
    loss, _, grads = jax.jit(loss_and_grads)(params, target.params, batch, jnp.int32(step))
    np.testing.assert_allclose(float(loss), _reference_loss(config, params, target, batch, step), rtol=2e-5)
    assert not np.any(grads["pos_embed"]) and np.any(grads["decoder_blocks"][0]["attn"]["qkv"]["kernel"])


def test_program_counts_the_cheaper_encoder():
  """The analytic FLOPs of the MAE-style student at ViT-B/16 (one image): the encoder on 50 tokens (~8.6 GFLOPs)
  plus the 8 decoder blocks of width 512 and the head on 197 tokens (~10.7) are ~55% of the BEiT-style student (~35)."""
  from configs import dtm_mae_vit_b16_in1k, dtm_vit_b16_in1k  # pylint: disable=g-import-not-at-top
  from dtm_jax import flops  # pylint: disable=g-import-not-at-top
  mae_cfg = train.student_config(dtm_mae_vit_b16_in1k.get_config())
  beit_cfg = train.student_config(dtm_vit_b16_in1k.get_config())
  assert (mae_cfg.num_visible, mae_cfg.decoder_width, mae_cfg.decoder_depth) == (49, 512, 8)
  ratio = flops.mae_student_flops(mae_cfg) / flops.transformer_flops(beit_cfg, beit_cfg.out_dim)
  assert 0.5 < ratio < 0.6, ratio


@pytest.mark.parametrize("overrides, field", [
    ({"model.kind": "vit"}, "model.kind"),
    ({"model.mask_ratio": 1.0}, "model.mask_ratio"),
    ({"model.decoder_width": 30}, "model.decoder_width"),
    ({"model.decoder_num_heads": 3}, "model.decoder_num_heads"),
    ({"model.block_rel_pos_bias": True}, "model.block_rel_pos_bias"),
    ({"model.layer_scale_init": 0.1}, "model.layer_scale_init"),
    ({"dtm.loss_positions": "visible"}, "dtm.loss_positions"),
    ({"target.kind": "ema"}, "target.kind"),
])
def test_bad_mae_fields_are_named(overrides, field):
  c = config_checks.Checker(tiny_config("mae", **overrides))
  train.check_config(c, num_devices=8, check_paths=False)
  assert any(p.startswith(f"config.{field}=") for p in c.problems), c.problems


def test_decoder_fields_are_refused_for_the_beit_style_student():
  c = config_checks.Checker(tiny_config(**{"model.mask_ratio": 0.75}))
  train.check_config(c, num_devices=8, check_paths=False)
  assert any("model.mask_ratio" in p and "kind='mae' only" in p for p in c.problems), c.problems
  c = config_checks.Checker(tiny_config("mae"))
  train.check_config(c, num_devices=8, check_paths=False)
  assert not c.problems
