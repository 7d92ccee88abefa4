"""Time to select a 10% greedy k-center coreset of a 100,000 x 384 memory bank.

    python benchmarks/coreset_speed.py [--n 100000] [--dim 384] [--ratio 0.1] [--projection 128] [--device cpu] [--threads 2]

Each greedy step streams the whole projected bank once (N x projection x 4 bytes), so the
time is bound by memory bandwidth: expect it to grow with N x ratio x N x projection.
On a CPU shared with other jobs, one thread can beat two (OpenMP barriers stall).
"""

from __future__ import annotations

import argparse
import time

import torch

from tiled_hydra.models.patchcore.coreset import coreset_size, greedy_coreset


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=100_000)
    parser.add_argument("--dim", type=int, default=384)
    parser.add_argument("--ratio", type=float, default=0.1)
    parser.add_argument("--projection", type=int, default=128, help="random projection dim (0 = none)")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch CPU threads")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    bank = torch.randn(args.n, args.dim, device=args.device)
    k = coreset_size(args.n, args.ratio)
    greedy_coreset(bank[:2000], 20, args.projection)  # warm-up
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()
    start = time.perf_counter()
    selected = greedy_coreset(bank, k, args.projection)
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    print(
        f"greedy k-center coreset: {k} of {args.n} x {args.dim} (projection {args.projection}) "
        f"on {args.device} with {torch.get_num_threads()} threads: {seconds:.1f} s "
        f"({1e3 * seconds / k:.2f} ms per selected point, {selected.unique().numel()} unique)"
    )


if __name__ == "__main__":
    main()
