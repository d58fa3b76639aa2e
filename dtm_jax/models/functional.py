"""A pure-function view of Flax NNX modules for jitted steps.

The training step is a pure function of plain nested dicts of arrays (what optax, Orbax and sharding rules handle
best). `split_module` turns a module into (`FunctionalModule`, params); `FunctionalModule.apply(params, ...)` rebuilds
the module from those params inside the trace (free at run time) and calls it.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
from flax import nnx

PyTree = Any


@dataclasses.dataclass(frozen=True)
class FunctionalModule:
  graphdef: Any
  template: Any  # nnx.State with the structure (and metadata) of the parameters

  def bind(self, params: PyTree) -> nnx.Module:
    """The module with `params` in place (params may be tracers)."""
    state = jax.tree.map(lambda v: v, self.template)
    nnx.replace_by_pure_dict(state, params)
    return nnx.merge(self.graphdef, state)

  def apply(self, params: PyTree, *args, method: str | None = None, **kwargs):
    module = self.bind(params)
    fn: Callable = getattr(module, method) if method else module
    return fn(*args, **kwargs)


def split_module(module: nnx.Module) -> tuple[FunctionalModule, PyTree]:
  """(functional view, params as a nested dict of arrays). The module must hold only nnx.Param state."""
  graphdef, state, rest = nnx.split(module, nnx.Param, ...)
  if jax.tree.leaves(rest):
    raise ValueError("Module holds non-parameter state; only nnx.Param is supported in the functional view.")
  return FunctionalModule(graphdef, state), nnx.to_pure_dict(state)


def abstract_split(constructor: Callable[[], nnx.Module]) -> tuple[FunctionalModule, PyTree]:
  """Like split_module, without allocating: params are ShapeDtypeStructs (for sharded init and restore)."""
  return split_module(nnx.eval_shape(constructor))


@dataclasses.dataclass(frozen=True)
class StatefulModule:
  """Like FunctionalModule, for modules that also hold `nnx.BatchStat` state (BatchNorm's running statistics).

  `apply(params, batch_stats, ...)` returns (output, new batch_stats): the statistics a training-mode call updated,
  so a jitted step carries them in its state beside the parameters.
  """
  graphdef: Any
  params_template: Any
  stats_template: Any

  def bind(self, params: PyTree, batch_stats: PyTree) -> nnx.Module:
    params_state = jax.tree.map(lambda v: v, self.params_template)
    stats_state = jax.tree.map(lambda v: v, self.stats_template)
    nnx.replace_by_pure_dict(params_state, params)
    nnx.replace_by_pure_dict(stats_state, batch_stats)
    return nnx.merge(self.graphdef, params_state, stats_state)

  def apply(self, params: PyTree, batch_stats: PyTree, *args, method: str | None = None, **kwargs):
    module = self.bind(params, batch_stats)
    fn: Callable = getattr(module, method) if method else module
    out = fn(*args, **kwargs)
    return out, nnx.to_pure_dict(nnx.state(module, nnx.BatchStat))


def split_stateful(module: nnx.Module) -> tuple[StatefulModule, PyTree, PyTree]:
  """(functional view, params, batch_stats) as nested dicts. The module must hold only Param and BatchStat state."""
  graphdef, params, stats, rest = nnx.split(module, nnx.Param, nnx.BatchStat, ...)
  if jax.tree.leaves(rest):
    raise ValueError("Module holds state other than nnx.Param and nnx.BatchStat; the functional view supports only "
                     "those.")
  return StatefulModule(graphdef, params, stats), nnx.to_pure_dict(params), nnx.to_pure_dict(stats)


def abstract_split_stateful(constructor: Callable[[], nnx.Module]) -> tuple[StatefulModule, PyTree, PyTree]:
  """Like split_stateful, without allocating: params and batch_stats are ShapeDtypeStructs."""
  return split_stateful(nnx.eval_shape(constructor))
