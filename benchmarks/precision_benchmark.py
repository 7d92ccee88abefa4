"""EfficientAD: float32 vs bfloat16 convolutions (``model.net.precision``), timed in one process.

Times what a slot does most: one training step's network passes (student on 2 crops of 128 px,
teacher on them, autoencoder on 2 whole 256 px tiles, forward + backward) and one inference tile
(teacher, student and autoencoder on a 256 px tile). The two precisions alternate, so machine load
affects both alike; prints the median of ``--repeats`` and the ratio.

    OMP_NUM_THREADS=2 python benchmarks/precision_benchmark.py --threads 2
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from tiled_hydra.models.efficient_ad.torch_model import EfficientAdModel


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--size", default="small")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = EfficientAdModel(args.size, (256, 256)).to(memory_format=torch.channels_last)
    crops = torch.rand(2, 3, 128, 128).contiguous(memory_format=torch.channels_last)
    tiles = torch.rand(2, 3, 256, 256).contiguous(memory_format=torch.channels_last)

    def train_step() -> None:
        loss = model.student_half(crops, 0).pow(2).mean() + model.teacher_features(crops).mean()
        loss = loss + model.reconstruct(tiles).pow(2).mean()
        loss.backward()

    @torch.no_grad()
    def infer_tile() -> None:
        model.raw_maps(tiles[:1])

    print(f"| part | float32 s | bf16 s | speed-up | ({args.threads} threads, {torch.backends.cpu.get_cpu_capability()}) |")
    print("|---|---|---|---|---|")
    for name, work in (("training step (2 tiles)", train_step), ("inference (1 tile of 256 px)", infer_tile)):
        times: dict[str, list[float]] = {"32": [], "bf16": []}
        for _ in range(args.repeats + 1):  # the first round warms up
            for precision in times:
                model.precision = precision
                model.zero_grad(set_to_none=True)
                start = time.perf_counter()
                work()
                times[precision].append(time.perf_counter() - start)
        full, low = (statistics.median(times[p][1:]) for p in ("32", "bf16"))
        print(f"| {name} | {full:.3f} | {low:.3f} | {full / low:.2f}x | |")


if __name__ == "__main__":
    main()
