"""Independent PyTorch references for parity tests: Hugging Face BEiT and CLIP at random initialisation.

timm cannot be imported here (PyPI's torchvision wheel does not load next to the CPU torch build), so Hugging Face's
`BeitModel` stands in for it; `beit_to_unilm` renames its weights into the unilm/timm layout that BEiT v2 and DTM
release files use, which is what our converter reads. `clip_to_openai` does the same for OpenAI's CLIP layout.

It imports torch and transformers, so only tests marked `torch` import it, inside the test or a fixture after
`pytest.importorskip("torch")`: collecting the test files must not need torch (tests/test_without_torch.py).
"""
import numpy as np
import torch
import transformers

TINY_BEIT = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128, image_size=32,
                 patch_size=8, layer_norm_eps=1e-6, hidden_act="gelu", layer_scale_init_value=0.1,
                 use_relative_position_bias=True, use_shared_relative_position_bias=True,
                 use_absolute_position_embeddings=False)
TINY_CLIP = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=32,
                 patch_size=8, projection_dim=16)


def randomize_(module, seed=0):
  """Replaces every parameter by random values, so no zero-initialised table or unit norm hides a wrong mapping.

  Matrices get std 1/√fan_in so attention is far from uniform and a wrong head split shows in the output.
  """
  generator = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in module.named_parameters():
      noise = torch.randn(p.shape, generator=generator)
      if "norm" in name and name.endswith("weight") or "lambda" in name:
        p.copy_(1.0 + 0.2 * noise)  # LayerNorm scales and layer scales: around one, but distinct.
      elif "relative_position_bias_table" in name:
        p.copy_(noise)  # Strong enough to move the attention pattern.
      elif p.ndim >= 2:
        p.copy_(noise / p[0].numel() ** 0.5)
      else:
        p.copy_(0.1 * noise)
  return module.eval()


def images(batch, size, seed=0):
  """NHWC float32 numpy images and the matching NCHW torch tensor."""
  x = np.random.default_rng(seed).normal(size=(batch, size, size, 3)).astype(np.float32)
  return x, torch.from_numpy(x).permute(0, 3, 1, 2)


def numpy_state(module):
  return {k: v.detach().float().numpy() for k, v in module.state_dict().items()}


def hf_beit(seed=0, **overrides):
  config = transformers.BeitConfig(**{**TINY_BEIT, "use_mask_token": True, "use_mean_pooling": False, **overrides},
                                   attn_implementation="eager")
  model = transformers.BeitModel(config, add_pooling_layer=False)
  return randomize_(model, seed)


def hf_beit_classifier(seed=0, num_labels=5, **overrides):
  config = transformers.BeitConfig(**{**TINY_BEIT, "use_mean_pooling": True, "num_labels": num_labels, **overrides},
                                   attn_implementation="eager")
  model = transformers.BeitForImageClassification(config)
  return randomize_(model, seed)


def beit_to_unilm(state):
  """Hugging Face BEiT names → unilm/timm names (q/k/v packed into qkv, q/v biases separate, gamma_1/2)."""
  state = {k.removeprefix("beit."): v for k, v in state.items()}
  out = {}
  for key, value in state.items():
    name = (key.replace("embeddings.patch_embeddings.projection", "patch_embed.proj")
            .replace("embeddings.position_embeddings", "pos_embed").replace("embeddings.", "")
            .replace("shared_position_bias.", "rel_pos_bias.").replace("pooler.layernorm", "fc_norm")
            .replace("classifier.", "head.").replace("layers.", "blocks.").replace("layernorm_before", "norm1")
            .replace("layernorm_after", "norm2").replace("lambda_", "gamma_").replace("attention.o_proj", "attn.proj")
            .replace("relative_position_bias.relative_position_bias_table", "attn.relative_position_bias_table"))
    if name == "layernorm.weight" or name == "layernorm.bias":
      name = name.replace("layernorm", "norm")
    if ".attention." in name:
      continue  # q/k/v are packed below.
    out[name] = value
  depth = len({k.split(".")[1] for k in out if k.startswith("blocks.")})
  for i in range(depth):
    attn = f"layers.{i}.attention"
    out[f"blocks.{i}.attn.qkv.weight"] = np.concatenate([state[f"{attn}.{x}_proj.weight"] for x in "qkv"])
    out[f"blocks.{i}.attn.q_bias"] = state[f"{attn}.q_proj.bias"]
    out[f"blocks.{i}.attn.v_bias"] = state[f"{attn}.v_proj.bias"]
    if f"blocks.{i}.attn.relative_position_bias_table" in out:  # unilm files carry this buffer; it is ignored.
      out[f"blocks.{i}.attn.relative_position_index"] = np.zeros((4, 4), np.int64)
  return out


def hf_clip(seed=0, **overrides):
  config = transformers.CLIPVisionConfig(**{**TINY_CLIP, **overrides}, attn_implementation="eager")
  model = transformers.CLIPVisionModelWithProjection(config)
  return randomize_(model, seed)


def hf_clip_patch_tokens(model, pixels, **kwargs):
  """Projected patch tokens after post_layernorm on every token (HF's forward normalises only the CLS)."""
  with torch.no_grad():
    hidden = model.vision_model(pixel_values=pixels, **kwargs).last_hidden_state
    return model.visual_projection(model.vision_model.post_layernorm(hidden))[:, 1:].numpy()


def clip_to_openai(state):
  """Hugging Face CLIP vision names → OpenAI's `visual.*` layout (packed in_proj, proj as [width, proj_dim])."""
  pre = "vision_model."
  out = {"visual.conv1.weight": state[pre + "embeddings.patch_embedding.weight"],
         "visual.class_embedding": state[pre + "embeddings.class_embedding"],
         "visual.positional_embedding": state[pre + "embeddings.position_embedding.weight"],
         "visual.proj": state["visual_projection.weight"].T}
  for ours, theirs in (("ln_pre", "pre_layrnorm"), ("ln_post", "post_layernorm")):
    for p in ("weight", "bias"):
      out[f"visual.{ours}.{p}"] = state[f"{pre}{theirs}.{p}"]
  depth = len({k.split(".")[3] for k in state if k.startswith(pre + "encoder.layers.")})
  for i in range(depth):
    hf, oa = f"{pre}encoder.layers.{i}.", f"visual.transformer.resblocks.{i}."
    for p in ("weight", "bias"):
      out[f"{oa}attn.in_proj_{p}"] = np.concatenate([state[f"{hf}self_attn.{x}_proj.{p}"] for x in "qkv"])
      for ours, theirs in (("attn.out_proj", "self_attn.out_proj"), ("ln_1", "layer_norm1"), ("ln_2", "layer_norm2"),
                           ("mlp.c_fc", "mlp.fc1"), ("mlp.c_proj", "mlp.fc2")):
        out[f"{oa}{ours}.{p}"] = state[f"{hf}{theirs}.{p}"]
  return out
