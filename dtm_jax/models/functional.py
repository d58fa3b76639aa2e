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
