"""Shared helpers of the training and reliability tests."""
import os
import socket

from configs import test_tiny
from dtm_jax import metrics

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))


def tiny_config(**overrides):
  config = test_tiny.get_config()
  with config.unlocked():
    for key, value in overrides.items():
      node = config
      *parents, leaf = key.split(".")
      for p in parents:
        node = node[p]
      node[leaf] = value
  return config


def losses_by_step(workdir):
  """Loss per logged step; a step logged twice (recomputed after a kill) keeps its last value."""
  rows = metrics.read_jsonl(os.path.join(workdir, "metrics.jsonl"))
  return {r["step"]: r["loss"] for r in rows if "loss" in r}


def free_port():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


