"""The stored ``hu`` encodings side by side: write and read time per slice and size, on the same slices.

    python benchmarks/bench_hu_encoding.py [--scans 3] [--repeats 3]

Contestants, each a Parquet file of one slice per row group, zstd level 1 (ingest's settings):

- ``int16``: format 1, the little-endian int16 bytes in a binary column;
- ``planes``: format 2, the same bytes as two planes (:func:`blendsign.ingest.encode_hu`) in a binary column;
- ``bss``: a ``list<int16>`` column with Parquet's ``BYTE_STREAM_SPLIT`` encoding (Arrow ≥ 16).

Slices: every file of a synthetic cohort at 512², in HU. Reading is one row group's ``hu`` column and its decode
to an int16 array, as ``blendsign.data.read_slice_hu`` does. The last line is
``ratio=<int16 write time / planes write time>``.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pydicom

from blendsign.config import SynthConfig
from blendsign.ingest import decode_hu, encode_hu
from blendsign.synth import synthesize


def column(kind: str, hu: np.ndarray) -> pa.Array:
    if kind == "int16":
        return pa.array([hu.astype("<i2").tobytes()], pa.binary())
    if kind == "planes":
        return pa.array([encode_hu(hu)], pa.binary())
    return pa.ListArray.from_arrays(pa.array([0, hu.size], pa.int32()), pa.array(hu.ravel()))


def decode(kind: str, col: pa.ChunkedArray, rows: int, cols: int) -> np.ndarray:
    if kind == "int16":
        return np.frombuffer(col[0].as_buffer(), dtype="<i2").reshape(rows, cols)
    if kind == "planes":
        return decode_hu(col[0].as_buffer(), rows, cols)
    return col.chunk(0).values.to_numpy().reshape(rows, cols)


def write(kind: str, slices: list[np.ndarray], path: Path) -> None:
    schema = pa.schema([("hu", pa.list_(pa.int16()) if kind == "bss" else pa.binary())])
    extra = {"use_byte_stream_split": ["hu.list.element"]} if kind == "bss" else {}
    with pq.ParquetWriter(path, schema, compression="zstd", compression_level=1, use_dictionary=False,
                          **extra) as writer:
        for hu in slices:
            writer.write_table(pa.table({"hu": column(kind, hu)}, schema=schema), row_group_size=1)


def read(kind: str, slices: list[np.ndarray], path: Path) -> list[np.ndarray]:
    pf = pq.ParquetFile(path)
    return [decode(kind, pf.read_row_group(i, columns=["hu"]).column(0), *hu.shape) for i, hu in enumerate(slices)]


def timed(fn: Callable[[], object]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scans", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=3, help="best of N")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench_hu_") as tmp:
        work = Path(tmp)
        synthesize(work / "cohort", replace(SynthConfig(), scans=args.scans, size=512), progress=False)
        slices = []
        for f in sorted(p for p in (work / "cohort" / "dicom").rglob("*") if p.is_file()):
            ds = pydicom.dcmread(f)
            hu = ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
            slices.append(np.rint(hu).astype(np.int16))
        print(f"{len(slices)} slices of 512×512, zstd level 1, one slice per row group, best of {args.repeats}")
        print(f"{'encoding':10}{'write ms/slice':>16}{'read ms/slice':>15}{'KiB/slice':>11}{'vs raw':>8}")
        best: dict[str, float] = {}
        for kind in ("int16", "planes", "bss"):
            path = work / f"{kind}.parquet"
            w = min(timed(lambda kind=kind, path=path: write(kind, slices, path)) for _ in range(args.repeats))
            r = min(timed(lambda kind=kind, path=path: read(kind, slices, path)) for _ in range(args.repeats))
            assert all(np.array_equal(a, b) for a, b in zip(read(kind, slices, path), slices, strict=True))
            size = path.stat().st_size / len(slices)
            best[kind] = w
            print(f"{kind:10}{w / len(slices) * 1e3:16.2f}{r / len(slices) * 1e3:15.2f}{size / 1024:11.0f}"
                  f"{512 * 512 * 2 / size:7.2f}×")
        print(f"ratio={best['int16'] / best['planes']:.2f}")


if __name__ == "__main__":
    main()
