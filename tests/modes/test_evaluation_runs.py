"""Each evaluation end to end as `main.py --mode=...` runs it: restore, the real input pipeline (an image folder),
results.json and metrics."""
import json

import eval_testing
import pytest

from configs import common as config_common
from configs import finetune_demo, knn_demo, linear_probe_demo
from dtm_jax.runner import run as runner
from dtm_jax.runtime import metrics


@pytest.fixture(scope="module", params=["beit", "mae"])
def setup(tmp_path_factory, request):
  """A BEiT-style or MAE-style pretraining run (every evaluation takes the MAE-style encoder as its trunk)."""
  root = tmp_path_factory.mktemp("eval_run")
  student_config = (eval_testing.tiny_mae_config(depth=1) if request.param == "mae" else
                    eval_testing.tiny_student_config(depth=1))
  eval_testing.save_pretraining_checkpoints(root / "pretrain", steps=(3, 6), config=student_config)
  images = eval_testing.write_image_folder(root / "images", per_class={"train": 16, "test": 6})
  input_config = config_common.input_config(source="folder", data_dir=str(images), train_split="train",
                                            eval_split="test", num_parallel_calls=2)
  return root, input_config


def configure(config, root, input_config, **fields):
  config.pretrained.update(workdir=str(root / "pretrain"), step=3)
  config.input = input_config
  config.update(fields)
  return config


def read_results(workdir):
  return json.loads((workdir / "results.json").read_text())


def test_knn_run(setup):
  root, input_config = setup
  config = configure(knn_demo.get_config(), root, input_config)
  config.knn.update(batch_size=16, num_train_examples=48, num_eval_examples=0)
  result = runner.run("knn", config, str(root / "knn"))
  saved = read_results(root / "knn")
  assert saved == json.loads(json.dumps(result))
  assert saved["checkpoint"].endswith("checkpoints/3") and saved["step"] == 3
  assert saved["knn_bank_size"] == 48 and saved["knn_num_queries"] == 24  # a slice of train, all of test
  assert saved["knn_top1"] > 50.0  # colours are trivially separable, even for a random student
  assert "knn_top1" in metrics.read_jsonl(root / "knn" / "metrics.jsonl")[0]
  assert list((root / "knn" / "tensorboard").iterdir())


def test_linear_probe_run(setup):
  root, input_config = setup
  config = configure(linear_probe_demo.get_config(), root, input_config, num_classes=eval_testing.NUM_CLASSES,
                     batch_size=16, eval_batch_size=8, epochs=4, warmup_epochs=1, eval_every_epochs=2)
  config.optimizer.update(name="sgd", base_lr=1.0)
  result = runner.run("linear_probe", config, str(root / "probe"))
  saved = read_results(root / "probe")
  assert saved["mode"] == "linear_probe" and saved["step"] == 3
  assert saved["top1"] == result["top1"] > 50.0 and saved["steps"] == 4 * 4
  assert [r["step"] for r in metrics.read_jsonl(root / "probe" / "metrics.jsonl") if "top1" in r] == [8, 16]


@pytest.mark.slow
def test_finetune_run(setup):
  root, input_config = setup
  config = configure(finetune_demo.get_config(), root, input_config, num_classes=eval_testing.NUM_CLASSES,
                     num_train_examples=64, batch_size=16, eval_batch_size=8, epochs=1, warmup_epochs=0)
  config.mix.prob = 0.0  # Beta sampling compiles slowly; mixup has its own tests.
  result = runner.run("finetune", config, str(root / "finetune"))
  saved = read_results(root / "finetune")
  assert saved["mode"] == "finetune" and saved["checkpoint"].endswith("checkpoints/3")
  assert saved["best_top1"] == result["best_top1"] and saved["last_top1"] == result["top1"]
  assert saved["steps"] == 4
  with pytest.raises(ValueError, match="must differ"):
    runner.run("finetune", config, str(root / "pretrain"))


@pytest.mark.slow
def test_finetune_run_at_a_larger_image_size(setup):
  """A student pretrained at 16² fine-tunes at 24² (`config.model.image_size`): restored at its own size, its
  position tables resized for the classifier, the input pipeline cropping 24² images."""
  root, input_config = setup
  config = configure(finetune_demo.get_config(), root, input_config, num_classes=eval_testing.NUM_CLASSES,
                     num_train_examples=64, batch_size=16, eval_batch_size=8, epochs=1, warmup_epochs=0)
  config.mix.prob = 0.0
  config.model.image_size = 24
  result = runner.run("finetune", config, str(root / "finetune_24"))
  assert result["steps"] == 4 and result["checkpoint"].endswith("checkpoints/3")
  model_config = json.loads((root / "finetune_24" / "checkpoints" / "4" / "metadata" / "metadata").read_text())
  assert model_config["model_config"]["image_size"] == 24
