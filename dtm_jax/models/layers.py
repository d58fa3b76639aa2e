"""Transformer pieces shared by the student ViT and the CLIP vision tower.

Both are pre-LN ViTs; they differ only in options (q/v vs full qkv bias, relative position bias, layer scale,
activation, LayerNorm epsilon), so one `Block` serves both and the converters map onto one parameter layout.
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

ATTENTION_IMPLS = (None, "xla", "cudnn")
ACTIVATIONS = ("gelu", "quick_gelu")
QKV_BIASES = ("qkv", "qv")


def trunc_normal(std=0.02):
  """N(0, std²) restricted to [-std, std], without re-scaling: BEiT's own `trunc_normal_(a=-std, b=std)`.

  Flax's `truncated_normal` re-scales the samples back to `std`, which would not reproduce BEiT's initialisation.
  """
  def init(key, shape, dtype=jnp.float32):
    return std * jax.random.truncated_normal(key, -1.0, 1.0, shape, dtype)
  return init


def activation_fn(name):
  """Exact (erf) GELU for the student; QuickGELU `x·σ(1.702x)` for OpenAI-trained CLIP."""
  if name == "gelu":
    return functools.partial(jax.nn.gelu, approximate=False)
  if name == "quick_gelu":
    return lambda x: x * jax.nn.sigmoid(1.702 * x)
  raise ValueError(f"Unknown activation {name!r}; choose one of {ACTIVATIONS}.")


def check_attention_impl(name):
  if name not in ATTENTION_IMPLS:
    raise ValueError(f"attention_impl={name!r} is not one of {ATTENTION_IMPLS} (None lets JAX choose).")


def num_relative_positions(grid_size):
  """Rows of a BEiT relative-position table: (2W−1)² offsets plus cls→token, token→cls and cls→cls."""
  return (2 * grid_size - 1) ** 2 + 3


@functools.lru_cache(maxsize=16)
def relative_position_index(grid_size):
  """BEiT's static index [1+N, 1+N] into the relative-position table of a square W×W patch grid (CLS first)."""
  rows, cols = np.meshgrid(np.arange(grid_size), np.arange(grid_size), indexing="ij")
  coords = np.stack([rows.ravel(), cols.ravel()])  # [2, N], row-major patch order.
  offsets = coords[:, :, None] - coords[:, None, :] + (grid_size - 1)  # [2, N, N], shifted to start at 0.
  num_rows = num_relative_positions(grid_size)
  n = grid_size * grid_size
  index = np.zeros((n + 1, n + 1), np.int32)
  index[1:, 1:] = offsets[0] * (2 * grid_size - 1) + offsets[1]
  index[0, :] = num_rows - 3  # cls → token
  index[:, 0] = num_rows - 2  # token → cls
  index[0, 0] = num_rows - 1  # cls → cls
  return index


def relative_position_bias(table, grid_size):
  """Additive attention bias [1, heads, 1+N, 1+N] looked up from a table [rows, heads]."""
  index = relative_position_index(grid_size)
  bias = jnp.take(table, index.reshape(-1), axis=0).reshape(*index.shape, table.shape[-1])
  return jnp.transpose(bias, (2, 0, 1))[None]


def drop_path(x, rate, rng):
  """Stochastic depth: zero a sample's residual branch with probability `rate`, rescale the survivors."""
  if rng is None or rate == 0.0:
    return x
  keep = jax.random.bernoulli(rng, 1.0 - rate, (x.shape[0],) + (1,) * (x.ndim - 1))
  return jnp.where(keep, x / (1.0 - rate), jnp.zeros_like(x))


def attention(q, k, v, bias=None, implementation=None):
  """softmax(q·kᵀ/√d + bias)·v for q, k, v [B, T, heads, d] and bias broadcastable to [B, heads, T, T].

  `jax.nn.dot_product_attention` with the implementation asked for (cuDNN's fused kernels on GPUs when None). On
  CPUs, where XLA's batched matmuls over the [B, T, heads, d] layout run at half speed, the default is the same
  computation with the heads moved ahead of the tokens first (2× faster forward and backward on XLA:CPU), with
  the logits and softmax in float32 as in `jax.nn.dot_product_attention`.
  """
  if implementation is not None or jax.default_backend() != "cpu":
    return jax.nn.dot_product_attention(q, k, v, bias=bias, implementation=implementation)
  q, k, v = (jnp.swapaxes(x, 1, 2) for x in (q, k, v))  # [B, heads, T, d]
  logits = jnp.einsum("bhqd,bhkd->bhqk", q, k, preferred_element_type=jnp.float32) * (q.shape[-1] ** -0.5)
  if bias is not None:
    logits = logits + bias.astype(jnp.float32)
  probabilities = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
  return jnp.swapaxes(jnp.einsum("bhqk,bhkd->bhqd", probabilities, v), 1, 2)


class Attention(nnx.Module):
  """Multi-head self-attention through `jax.nn.dot_product_attention`, so GPUs can use fused kernels.

  `qkv_bias="qv"` is BEiT's layout (q and v biases, none on k); `"qkv"` is CLIP's packed in-projection bias.
  `rel_pos_grid` adds a per-block BEiT relative-position table for that patch grid.
  """

  def __init__(self, width, num_heads, *, qkv_bias, rel_pos_grid=None, out_init_std=0.02, dtype=jnp.float32,
               attention_impl=None, rngs):
    if width % num_heads:
      raise ValueError(f"width {width} is not divisible by num_heads {num_heads}.")
    if qkv_bias not in QKV_BIASES:
      raise ValueError(f"qkv_bias={qkv_bias!r} is not one of {QKV_BIASES}.")
    check_attention_impl(attention_impl)
    self.num_heads = num_heads
    self.dtype = dtype
    self.attention_impl = attention_impl
    self.rel_pos_grid = rel_pos_grid
    linear = functools.partial(nnx.Linear, kernel_init=trunc_normal(), dtype=dtype, rngs=rngs)
    self.qkv = linear(width, 3 * width, use_bias=qkv_bias == "qkv")
    self.q_bias = nnx.Param(jnp.zeros((width,))) if qkv_bias == "qv" else None
    self.v_bias = nnx.Param(jnp.zeros((width,))) if qkv_bias == "qv" else None
    self.rel_pos_bias = (nnx.Param(jnp.zeros((num_relative_positions(rel_pos_grid), num_heads)))
                         if rel_pos_grid else None)
    self.proj = linear(width, width, kernel_init=trunc_normal(out_init_std))

  def __call__(self, x, bias=None):
    batch, tokens, width = x.shape
    qkv = self.qkv(x)
    if self.q_bias is not None:
      qkv_bias = jnp.concatenate([self.q_bias[...], jnp.zeros_like(self.q_bias[...]), self.v_bias[...]])
      qkv = qkv + qkv_bias.astype(qkv.dtype)
    q, k, v = jnp.split(qkv.reshape(batch, tokens, 3 * self.num_heads, -1), 3, axis=2)
    if self.rel_pos_bias is not None:
      own_bias = relative_position_bias(self.rel_pos_bias[...], self.rel_pos_grid)
      bias = own_bias if bias is None else bias + own_bias
    out = attention(q, k, v, bias, self.attention_impl)
    return self.proj(out.reshape(batch, tokens, width))


class Mlp(nnx.Module):

  def __init__(self, width, hidden, *, activation, out_init_std=0.02, dtype=jnp.float32, rngs):
    self.fc1 = nnx.Linear(width, hidden, kernel_init=trunc_normal(), dtype=dtype, rngs=rngs)
    self.fc2 = nnx.Linear(hidden, width, kernel_init=trunc_normal(out_init_std), dtype=dtype, rngs=rngs)
    self.activation = activation
    activation_fn(activation)  # Fail at construction, not at the first call.

  def __call__(self, x):
    return self.fc2(activation_fn(self.activation)(self.fc1(x)))


class Block(nnx.Module):
  """Pre-LN transformer block: x + γ₁·drop(attn(ln(x))), then x + γ₂·drop(mlp(ln(x))).

  Layer scale γ exists only when `layer_scale_init` is set (non-zero). `out_init_std` sets the initial std (and ±1σ
  cut) of the two residual output projections. Drop path takes an explicit key, so the module holds nothing but
  parameters and the training step stays a pure function of the split state.
  """

  def __init__(self, width, num_heads, mlp_dim, *, qkv_bias, activation, layer_norm_eps, layer_scale_init=None,
               rel_pos_grid=None, out_init_std=0.02, drop_path_rate=0.0, dtype=jnp.float32, attention_impl=None,
               rngs):
    norm = functools.partial(nnx.LayerNorm, width, epsilon=layer_norm_eps, dtype=dtype, rngs=rngs)
    self.norm1 = norm()
    self.attn = Attention(width, num_heads, qkv_bias=qkv_bias, rel_pos_grid=rel_pos_grid, out_init_std=out_init_std,
                          dtype=dtype, attention_impl=attention_impl, rngs=rngs)
    self.norm2 = norm()
    self.mlp = Mlp(width, mlp_dim, activation=activation, out_init_std=out_init_std, dtype=dtype, rngs=rngs)
    if layer_scale_init:
      self.attn_layer_scale = nnx.Param(jnp.full((width,), layer_scale_init, jnp.float32))
      self.mlp_layer_scale = nnx.Param(jnp.full((width,), layer_scale_init, jnp.float32))
    else:
      self.attn_layer_scale = self.mlp_layer_scale = None
    self.drop_path_rate = float(drop_path_rate)

  def __call__(self, x, attn_bias=None, dropout_rng=None):
    attn_rng = mlp_rng = None
    if dropout_rng is not None:
      attn_rng, mlp_rng = jax.random.split(dropout_rng)
    x = x + drop_path(self._scale(self.attn(self.norm1(x), attn_bias), self.attn_layer_scale),
                      self.drop_path_rate, attn_rng)
    x = x + drop_path(self._scale(self.mlp(self.norm2(x)), self.mlp_layer_scale), self.drop_path_rate, mlp_rng)
    return x

  @staticmethod
  def _scale(x, gamma):
    return x if gamma is None else x * gamma[...].astype(x.dtype)
