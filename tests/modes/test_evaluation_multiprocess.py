"""Two processes on localhost: the kNN bank and the accuracy loop count every example exactly once."""
import json
import os
import subprocess
import sys

import eval_testing
import numpy as np
import pytest
from train_testing import REPO, free_port

TESTS = os.path.join(REPO, "tests")  # eval_testing's folder


@pytest.mark.slow
def test_two_processes_count_every_example_once():
  port = free_port()
  env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=2", "JAX_PLATFORMS": "cpu",
         "PYTHONPATH": os.pathsep.join([REPO, TESTS])}
  code = f"import eval_testing; eval_testing.multiprocess_eval_worker({port}, {{}}, 2)"
  procs = [subprocess.Popen([sys.executable, "-c", code.format(i)], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True) for i in range(2)]
  outs = [p.communicate(timeout=240)[0] for p in procs]
  for p, out in zip(procs, outs):
    assert p.returncode == 0, out
  results = [json.loads(out.strip().splitlines()[-1]) for out in outs]
  assert results[0] == results[1]

  bank, bank_labels, queries, query_labels = eval_testing.toy_knn_problem()
  normalize = lambda x: x / np.linalg.norm(x, axis=1, keepdims=True)
  similarity = normalize(queries) @ normalize(bank).T
  votes = np.zeros((len(queries), 3))
  for q in range(len(queries)):
    for j in np.argsort(-similarity[q])[:5]:
      votes[q, bank_labels[j]] += np.exp(similarity[q, j] / 0.07)
  result = results[0]
  assert result["bank_size"] == 37
  assert result["knn"]["num_examples"] == 19
  assert result["knn"]["top1"] == pytest.approx(100.0 * np.mean(np.argmax(votes, axis=1) == query_labels))
  assert result["accuracy"]["num_examples"] == 19
  assert result["accuracy"]["top1"] == pytest.approx(100.0 * np.mean(np.argmax(queries[:, :3], axis=1) == query_labels))
