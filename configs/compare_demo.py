"""What the demo's pretraining bought: the demo student beside itself at initialisation and raw pixels.

`make demo` ends with this (configs/demo.py `then_evaluate`). Standalone, after `make demo`:
  python main.py --mode=compare --config=configs/compare_demo.py --workdir=workdirs/demo/compare \
      --config.pretrained.workdir=workdirs/demo
kNN as configs/knn_demo.py (bank = the first 20,000 train images, queries = the 10,000 test images, k=20, T=0.07);
the linear probe trains on the bank's features and is scored on the test images' features. The untrained student
(the demo's architecture initialised with the pretraining run's seed) is computed on every run, not cached.
Expected result for the step-500 checkpoint of `make demo` (2026-12-07, Python 3.11.7, jax/jaxlib 0.10.2, flax
0.12.8, numpy 2.4.6, 2 cores of an AMD EPYC VM; code with the exact evaluation crop, input_pipeline.transforms
.center_crop):
  features                 kNN top-1   linear probe top-1
  pretrained student           58.9%                71.5%
  untrained student            54.0%                50.0%
  raw pixels                   82.0%                79.3%
Pretraining buys +21 points of probe accuracy and +5 of kNN over the same student untrained; raw pixels still beat
this 500-step student on both. How the probe's recipe was chosen, and earlier figures: docs/RESULTS.md.
"""
import ml_collections
from ml_collections import config_dict

from configs import knn_demo


def get_config(arg: str = ""):
  del arg
  knn = knn_demo.get_config()
  c = ml_collections.ConfigDict()
  c.mode = "compare"  # what main.py runs (dtm_jax/registry.py)
  c.seed = 0  # The probe's; the untrained student takes the pretraining run's seed from the checkpoint.
  c.pretrained = dict(workdir="workdirs/demo", step=config_dict.placeholder(int))  # step: None = latest.
  c.model = {}  # Overrides of the pretrained student's ViTConfig.
  c.input = knn.input  # Bank and probe training set from input.train_split, queries from input.eval_split.
  c.num_classes = 10
  c.features = knn.features
  c.knn = dict(k=knn.knn.k, temperature=knn.knn.temperature)
  # The slices (0 = the whole split), decoded once for every row; batch_size: decoding and encoding.
  c.compare = dict(batch_size=1000, num_train_examples=knn.knn.num_train_examples, num_eval_examples=0)
  # The probe of every row: SGD at lr 1.0 converges on these features within a few dozen epochs.
  c.probe = dict(epochs=30, warmup_epochs=3, batch_size=256, bn_momentum=0.9,
                 optimizer=dict(name="sgd", base_lr=1.0, lr_reference_batch=256, momentum=0.9, weight_decay=0.0,
                                min_lr=0.0))
  c.mesh = dict(data=-1, fsdp=1, min_fsdp_size=2 ** 18)
  return c
