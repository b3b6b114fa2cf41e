"""bench_train.py at the paper's scale on a GPU: ResNet-50 at 512×512, batch 16, AMP and channels_last.

    python benchmarks/bench_train_gpu.py [--iters 30] [--workers 8]

Prints images/s of the real Parquet data path and of in-memory tensors, and their ratio (last line).
"""

from __future__ import annotations

import sys

import bench_train

if __name__ == "__main__":
    defaults = ["--preset", "paper", "--device", "cuda", "--backbone", "resnet50", "--size", "512",
                "--batch-size", "16", "--workers", "8", "--scans", "40", "--iters", "30"]
    sys.argv[1:1] = defaults  # explicit arguments after these win
    bench_train.main()
