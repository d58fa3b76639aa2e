"""The PyTorch counterpart of the CPU train-step table, for a side-by-side ratio on the same machine.

  python benchmarks/train_step.py --table=cpu --torch     # JAX rows, then this one, in one process

The authors' CPU figure (~1.38 s per step) was taken on their machine; this rebuilds the same step from independent
PyTorch code so that both run on one machine: a Hugging Face `BeitModel` student (ViT-Tiny, per-block + shared
relative position bias, layer scale, mask token, drop path 0.1, a linear head to the teacher's width), a frozen
Hugging Face `CLIPVisionModelWithProjection` teacher of the same size (projected patch tokens), the released code's
morphing and loss (`benchmarks/morphing.py:torch_step`, two schedules per step, DTM on) or the token-wise loss (off),
and AdamW with clipping. Needs `torch` and `transformers` (requirements-test.txt).
"""
from __future__ import annotations

import os
import statistics
import sys
import time

import numpy as np
import torch
import transformers

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import morphing as morphing_benchmark  # pylint: disable=g-import-not-at-top


def _student(image_size: int, patch_size: int, out_dim: int) -> tuple[torch.nn.Module, torch.nn.Module]:
  config = transformers.BeitConfig(
      hidden_size=192, num_hidden_layers=12, num_attention_heads=3, intermediate_size=768, image_size=image_size,
      patch_size=patch_size, layer_norm_eps=1e-6, layer_scale_init_value=0.1, drop_path_rate=0.1,
      use_relative_position_bias=True, use_shared_relative_position_bias=True,
      use_absolute_position_embeddings=False, use_mask_token=True, use_mean_pooling=False,
      attn_implementation="sdpa")
  return transformers.BeitModel(config, add_pooling_layer=False).train(), torch.nn.Linear(192, out_dim)


def _teacher(image_size: int, patch_size: int, out_dim: int) -> torch.nn.Module:
  config = transformers.CLIPVisionConfig(hidden_size=192, intermediate_size=768, num_hidden_layers=12,
                                         num_attention_heads=3, image_size=image_size, patch_size=patch_size,
                                         projection_dim=out_dim, attn_implementation="sdpa")
  return transformers.CLIPVisionModelWithProjection(config).eval().requires_grad_(False)


def measure_torch(*, batch: int, image_size: int, dtm: bool, steps: int, threads: int | None = None,
                  patch_size: int = 16, out_dim: int = 512, max_iters: int = 14, seed: int = 0) -> dict:
  """Median step time of the PyTorch step (float32) after 2 warm-up steps; the schedules are drawn per step.

  `threads` defaults to the CPUs this process may run on (2 on the project's machines, 1 under `taskset -c 0`).
  """
  threads = threads or len(os.sched_getaffinity(0))  # as many threads as the process may use, like XLA
  torch.set_num_threads(threads)
  torch.manual_seed(seed)
  rng = np.random.default_rng(seed)
  encoder, head = _student(image_size, patch_size, out_dim)
  teacher = _teacher(image_size, patch_size, out_dim)
  params = list(encoder.parameters()) + list(head.parameters())
  optimizer = torch.optim.AdamW(params, lr=1e-4, betas=(0.9, 0.98), weight_decay=0.05)
  tokens = (image_size // patch_size) ** 2
  images = torch.randn(batch, 3, image_size, image_size)
  masks = torch.from_numpy(rng.random((batch, tokens)).argsort(axis=1) < int(round(tokens * 75 / 196)))

  def step():
    with torch.no_grad():
      hidden = teacher.vision_model(pixel_values=images).last_hidden_state
      target = teacher.visual_projection(teacher.vision_model.post_layernorm(hidden))[:, 1:]
    student = head(encoder(pixel_values=images, bool_masked_pos=masks).last_hidden_state[:, 1:])
    if dtm:
      schedules = [(int(rng.integers(0, tokens + 1)), int(rng.integers(1, max_iters + 1))) for _ in range(2)]
      loss = morphing_benchmark.torch_step(student, target, schedules)
    else:
      loss = torch.nn.functional.smooth_l1_loss(student, target, beta=2.0)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 3.0)
    optimizer.step()
    return float(loss.detach())

  for _ in range(2):
    step()
  times = []
  for _ in range(steps):
    start = time.perf_counter()
    step()
    times.append(time.perf_counter() - start)
  return {"step_ms": 1e3 * statistics.median(times), "threads": threads, "torch": torch.__version__,
          "transformers": transformers.__version__}
