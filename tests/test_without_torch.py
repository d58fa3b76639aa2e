"""Without torch (an `import torch` that fails), collection keeps every test and every test not marked `torch` runs.

The subprocesses see torch, transformers and timm through a `sitecustomize` put first on PYTHONPATH: it installs an
import finder that refuses those names, as if they were not installed. CI is removed from their environment, since
there a missing torch is an error (tests/conftest.py), not a skip.
"""
import os
import re
import subprocess
import sys
import textwrap

import pytest

_TESTS = os.path.dirname(os.path.abspath(__file__))
_ROOT = os.path.dirname(_TESTS)
_TORCH_MISSING = "torch is not installed (pip install -r requirements-test.txt)"  # tests/conftest.py's reason
_QUICK_FILE = "tests/models/test_position_resize.py"  # few torch tests, cheap to run

_BLOCKER = textwrap.dedent('''
    """Makes torch, transformers and timm fail to import (tests/test_without_torch.py)."""
    import sys

    _BLOCKED = ("torch", "transformers", "timm")


    class _Blocker:

      def find_spec(self, name, path=None, target=None):
        del path, target
        if name.partition(".")[0] in _BLOCKED:
          raise ModuleNotFoundError(f"No module named {name!r} (blocked by test_without_torch)", name=name)
        return None


    sys.meta_path.insert(0, _Blocker())
''')


def _env(block_dir=None, **extra):
  env = dict(os.environ, **extra)
  if "CI" not in extra:
    env.pop("CI", None)
  if block_dir is not None:
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(block_dir), env.get("PYTHONPATH")) if p)
  return env


def _start(args, env):
  return subprocess.Popen([sys.executable, *args], cwd=_ROOT, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True)


def _finish(process, timeout=300):
  out, _ = process.communicate(timeout=timeout)
  return process.returncode, out


def _pytest(*args):
  return ["-m", "pytest", "-p", "no:cacheprovider", *args]


def _collected(out):
  """Node ids listed by `--collect-only -q`, checked against the count in its summary line."""
  ids = [line.strip() for line in out.splitlines() if "::" in line and not line.startswith(("ERROR", "FAILED"))]
  summary = re.search(r"^(\d+)(?:/\d+)? tests? collected.*$", out, re.MULTILINE)  # "4/13 tests collected" with -m
  assert summary, out[-3000:]
  assert int(summary.group(1)) == len(ids), out[-3000:]
  assert "error" not in summary.group(0), out[-3000:]
  return ids


@pytest.mark.slow
def test_collection_and_a_run_without_torch(tmp_path):
  (tmp_path / "sitecustomize.py").write_text(_BLOCKER)
  normal, blocked = _env(), _env(tmp_path)

  check = subprocess.run([sys.executable, "-c", "import torch"], cwd=_ROOT, env=blocked, capture_output=True,
                         text=True, timeout=60)
  assert check.returncode != 0 and "blocked by test_without_torch" in check.stderr, check.stderr

  # Independent subprocesses, started together.
  jobs = {
      "normal": _start(_pytest("--collect-only", "-q", "tests"), normal),
      "blocked": _start(_pytest("--collect-only", "-q", "tests"), blocked),
      "marked": _start(_pytest("--collect-only", "-q", "-m", "torch", _QUICK_FILE), normal),
      "run": _start(_pytest("-v", "-rs", _QUICK_FILE), blocked),
      "ci": _start(_pytest("--collect-only", "-q", _QUICK_FILE), _env(tmp_path, CI="true")),
  }
  results = {name: _finish(process) for name, process in jobs.items()}

  # Collection without torch: no error, and the same tests as with torch (the torch ones are skipped, not dropped).
  rc, out = results["normal"]
  assert rc == 0, out[-5000:]
  normal_ids = _collected(out)
  rc, out = results["blocked"]
  assert rc == 0, out[-5000:]
  assert "ERROR" not in out, out[-5000:]
  blocked_ids = _collected(out)
  assert blocked_ids == normal_ids
  assert any(i.startswith(_QUICK_FILE + "::") for i in blocked_ids)

  # A run without torch: exactly the tests marked `torch` are skipped, with the reason; all others pass.
  rc, out = results["marked"]
  assert rc == 0, out[-5000:]
  marked = set(_collected(out))
  assert marked
  rc, out = results["run"]
  assert rc == 0, out[-5000:]
  outcomes = dict(re.findall(r"^(tests/\S+::\S+) (PASSED|SKIPPED|FAILED|ERROR|XFAIL|XPASS)\b", out, re.MULTILINE))
  assert set(outcomes) == {i for i in normal_ids if i.startswith(_QUICK_FILE + "::")}, out[-5000:]
  assert {i for i, outcome in outcomes.items() if outcome == "SKIPPED"} == marked, out[-5000:]
  assert {i for i, outcome in outcomes.items() if outcome != "SKIPPED"} == set(outcomes) - marked, out[-5000:]
  assert set(outcomes.values()) == {"PASSED", "SKIPPED"}, out[-5000:]
  skip_lines = [line for line in out.splitlines() if line.startswith("SKIPPED [")]
  assert skip_lines and all(line.endswith(_TORCH_MISSING) for line in skip_lines), out[-5000:]
  assert re.search(rf"\b{len(outcomes) - len(marked)} passed, {len(marked)} skipped\b", out), out[-5000:]

  # In CI (CI set) a missing torch is an error, not silent skips.
  rc, out = results["ci"]
  assert rc != 0 and "CI is set but torch cannot be imported" in out, out[-5000:]
