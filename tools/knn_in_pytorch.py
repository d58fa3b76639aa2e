"""The demo's kNN accuracy computed in PyTorch alone, from a `python -m dtm_jax.export --format=hf` folder.

  python tools/knn_in_pytorch.py --model=/tmp/demo_hf [--data_dir=/usr/share/datasets/fashion-mnist]

Only torch, transformers and numpy: the Fashion-MNIST IDX files are read with gzip + numpy, images are prepared by
the exported `BeitImageProcessor` (grey as RGB, as input_pipeline feeds them) and encoded by `BeitModel`. The
protocol is configs/knn_demo.py's (dtm_jax/evaluators/knn.py): features = mean of the final-LayerNorm patch tokens,
L2-normalised; bank = the first 20,000 training images, queries = the 10,000 test images; the k = 20 most
cosine-similar bank entries vote for their label with weight exp(similarity / 0.07).
"""
import argparse
import gzip
import os

import numpy as np
import torch
import transformers


def read_idx(path):
  """An IDX file (big-endian header: magic with the number of dimensions, the sizes, then uint8 data)."""
  with (gzip.open if path.endswith(".gz") else open)(path, "rb") as f:
    data = f.read()
  ndim = data[3]
  shape = tuple(int.from_bytes(data[4 + 4 * i:8 + 4 * i], "big") for i in range(ndim))
  return np.frombuffer(data, np.uint8, offset=4 + 4 * ndim).reshape(shape)


def load_split(data_dir, prefix, limit=None):
  def path(name):
    return next(p for p in (os.path.join(data_dir, name + ".gz"), os.path.join(data_dir, name)) if os.path.exists(p))
  images = read_idx(path(f"{prefix}-images-idx3-ubyte"))[:limit]
  labels = read_idx(path(f"{prefix}-labels-idx1-ubyte"))[:limit]
  return np.repeat(images[..., None], 3, axis=-1), labels.astype(np.int64)  # grey fed as RGB


@torch.no_grad()
def features(model, processor, images, batch_size, pooling):
  out = []
  for start in range(0, len(images), batch_size):
    pixels = processor(list(images[start:start + batch_size]), return_tensors="pt")["pixel_values"]
    tokens = model(pixels).last_hidden_state
    out.append(tokens[:, 1:].mean(1) if pooling == "mean" else tokens[:, 0])
  return torch.nn.functional.normalize(torch.cat(out), dim=-1)


@torch.no_grad()
def knn_accuracy(bank, bank_labels, queries, query_labels, *, k, temperature, num_classes, batch_size=1000):
  """Top-1 and top-5 accuracy (%) of weighted kNN votes (DINO's protocol, dtm_jax/evaluators/knn.py)."""
  correct1 = correct5 = 0
  for start in range(0, len(queries), batch_size):
    sims, index = (queries[start:start + batch_size] @ bank.T).topk(k, dim=1)
    votes = torch.zeros(len(sims), num_classes).scatter_add_(1, bank_labels[index], (sims / temperature).exp())
    top5 = votes.topk(5, dim=1).indices
    truth = query_labels[start:start + batch_size, None]
    correct1 += (top5[:, :1] == truth).sum().item()
    correct5 += (top5 == truth).any(dim=1).sum().item()
  return 100.0 * correct1 / len(queries), 100.0 * correct5 / len(queries)


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--model", required=True, help="a --format=hf export of the demo student")
  parser.add_argument("--data_dir", default="/usr/share/datasets/fashion-mnist")
  parser.add_argument("--bank_size", type=int, default=20_000)
  parser.add_argument("--k", type=int, default=20)
  parser.add_argument("--temperature", type=float, default=0.07)
  parser.add_argument("--pooling", default="mean", choices=("mean", "cls"))
  parser.add_argument("--batch_size", type=int, default=1000)
  args = parser.parse_args()
  processor = transformers.AutoImageProcessor.from_pretrained(args.model)
  model = transformers.BeitModel.from_pretrained(args.model).eval()
  bank_images, bank_labels = load_split(args.data_dir, "train", args.bank_size)
  query_images, query_labels = load_split(args.data_dir, "t10k")
  bank = features(model, processor, bank_images, args.batch_size, args.pooling)
  queries = features(model, processor, query_images, args.batch_size, args.pooling)
  top1, top5 = knn_accuracy(bank, torch.from_numpy(bank_labels), queries, torch.from_numpy(query_labels), k=args.k,
                            temperature=args.temperature, num_classes=int(bank_labels.max()) + 1)
  print(f"kNN (k={args.k}, T={args.temperature}, bank {len(bank)}, {len(queries)} queries) in PyTorch: "
        f"top-1 {top1:.2f}%, top-5 {top5:.2f}% (torch {torch.__version__}, transformers {transformers.__version__})")


if __name__ == "__main__":
  main()
