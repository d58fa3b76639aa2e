"""The shape of `dtm_jax`, read from its files with `ast`: a one-way import graph, no hidden imports, no TensorFlow,
and one list of modes that every shipped config names."""
import ast
import importlib
import pathlib

import pytest

from dtm_jax import registry

PACKAGE = pathlib.Path(__file__).resolve().parent.parent / "dtm_jax"
CONFIGS = PACKAGE.parent / "configs"


def module_name(path: pathlib.Path) -> str:
  parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
  return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, pathlib.Path]:
  return {module_name(path): path for path in PACKAGE.rglob("*.py")}


def imports(path: pathlib.Path, known: dict[str, pathlib.Path]):
  """(imported dtm_jax module, line, at module level?) of every import statement in the file."""
  tree = ast.parse(path.read_text())
  top_level = {id(node) for node in tree.body}
  found = []
  for node in ast.walk(tree):
    names = []
    if isinstance(node, ast.Import):
      names = [alias.name for alias in node.names]
    elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
      names = [f"{node.module}.{alias.name}" if f"{node.module}.{alias.name}" in known else node.module
               for alias in node.names]
    for name in names:
      if name.split(".")[0] in ("dtm_jax", "tensorflow", "input_pipeline"):
        found.append((name, node.lineno, id(node) in top_level))
  return found


def test_every_module_is_found():
  found = modules()
  assert {"dtm_jax.registry", "dtm_jax.program", "dtm_jax.runner.loop", "dtm_jax.modes.pretrain"} <= set(found)


def test_the_import_graph_has_no_cycle():
  known = modules()
  graph = {name: {imported for imported, _, _ in imports(path, known) if imported in known and imported != name}
           for name, path in known.items()}
  state, cycles = {}, []

  def visit(node, stack):
    state[node] = "open"
    for nxt in sorted(graph[node]):
      if state.get(nxt) == "open":
        cycles.append(stack[stack.index(nxt):] + [nxt])
      elif nxt not in state:
        visit(nxt, stack + [nxt])
    state[node] = "done"

  for name in sorted(graph):
    if name not in state:
      visit(name, [name])
  assert not cycles, "import cycles: " + "; ".join(" → ".join(cycle) for cycle in cycles)


def test_no_project_module_is_imported_inside_a_function():
  """A function-level import of a dtm_jax module is how a cycle hides; only input_pipeline (TensorFlow) is imported
  lazily, so that dtm_jax runs where TensorFlow is absent."""
  known = modules()
  lazy = [f"{path.relative_to(PACKAGE.parent)}:{line} imports {name}" for path in known.values()
          for name, line, top in imports(path, known) if not top and name.startswith("dtm_jax")]
  assert not lazy, "\n".join(lazy)


def test_dtm_jax_never_imports_tensorflow_and_input_pipeline_only_lazily():
  known = modules()
  found = [f"{path.relative_to(PACKAGE.parent)}:{line} imports {name}" for path in known.values()
           for name, line, top in imports(path, known)
           if name.startswith("tensorflow") or (name.startswith("input_pipeline") and top)]
  assert not found, "\n".join(found)


def test_compile_is_imported_by_nothing_in_the_package():
  """MaxText's one-way dependency: compile (dtm_jax.aot) imports the modes; no mode or library module imports it."""
  known = modules()
  importers = [name for name, path in known.items() if any(i == "dtm_jax.aot" for i, _, _ in imports(path, known))]
  assert importers == []


@pytest.mark.parametrize("config_file", sorted(p.name for p in CONFIGS.glob("*.py")
                                                if p.name not in ("__init__.py", "common.py")))
def test_every_shipped_config_names_a_registered_mode(config_file):
  config = importlib.import_module(f"configs.{config_file[:-3]}").get_config()
  assert config.mode in registry.MODES
  assert registry.mode_of(config) == config.mode


def test_every_mode_declares_its_checks_and_run_and_compiles_or_says_why_not():
  for name, mode in registry.MODES.items():
    assert mode.name == name and callable(mode.check) and callable(mode.run) and mode.summary
    assert callable(mode.programs) or mode.not_compilable, name


def test_a_config_for_another_mode_is_refused():
  config = importlib.import_module("configs.finetune_demo").get_config()
  with pytest.raises(ValueError, match="for --mode=finetune"):
    registry.mode_of(config, "pretrain")


def test_make_test_fast_runs_the_tests_not_marked_slow_and_make_test_runs_all():
  makefile = (PACKAGE.parent / "Makefile").read_text()
  fast = makefile.split("\ntest-fast:", 1)[1].split("\n\n", 1)[0]
  full = makefile.split("\ntest:", 1)[1].split("\n\n", 1)[0]
  assert '-m "not slow" tests' in fast
  assert "-m pytest" in full and "-m \"" not in full and full.rstrip().endswith(" tests")
