"""Ingest throughput against a decode-only loop over the same files, 1 and 2 workers, in one run.

    python benchmarks/bench_ingest.py [--scans 30] [--size 512] [--repeats 2] [--syntax native|j2k|each]

Both contestants go over the same files: every file of the source (localizers, contrast series and
reformats included), all 512×512. Decode-only = ``pydicom.dcmread`` + ``pixel_array`` of each, nothing
else. Ingest = the whole stage (headers, series selection, exclusions, HU, ordering, pseudonyms, zstd
Parquet writes, reports) into a fresh folder. Both see a warm page cache. ``--syntax j2k`` first
re-encodes every file as JPEG 2000 lossless, as many PACS exports are. Rates are files per second. It
then times the Parquet codec alone on the ``hu`` values ingestion wrote, which bounds the ratio from above
(the ratio if everything else were free). The last line is ``ratio=<ingest rate / decode-only rate, 1 worker>``.
``--syntax each`` instead re-encodes the cohort into every transfer syntax an archive uses
(``blendsign.codecs.transcode``) and prints a row per syntax: size, decode-only and ingest files/s, their ratio.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import replace
from pathlib import Path

import pyarrow as pa
import pyarrow.dataset as ds
import pydicom
from pydicom.uid import JPEG2000Lossless

from blendsign import codecs
from blendsign.config import IngestConfig, SynthConfig
from blendsign.deid import Pseudonymizer
from blendsign.ingest import ingest, plan_ingest, read_clinical, read_headers
from blendsign.synth import synthesize


def to_j2k(path: str) -> None:
    ds = pydicom.dcmread(path)
    if ds.file_meta.TransferSyntaxUID.is_compressed:  # the RLE ones: back to native first
        ds.decompress(generate_instance_uid=False)
    if ds.file_meta.TransferSyntaxUID != JPEG2000Lossless:
        ds.compress(JPEG2000Lossless, encoding_plugin="pylibjpeg", generate_instance_uid=False)
        ds.save_as(path, enforce_file_format=True)


def to_native(path: str) -> None:
    ds = pydicom.dcmread(path)
    if ds.file_meta.TransferSyntaxUID.is_compressed:
        ds.decompress(generate_instance_uid=False)
        ds.save_as(path, enforce_file_format=True)


SYNTAXES = {u.name: u for u in codecs.ENCODABLE}


def per_syntax(source: Path, clinical: Path, work: Path, repeats: int) -> None:
    """One row per transfer syntax: the cohort re-encoded into it, ingest against decode-only, 1 worker."""
    native = work / "native"
    shutil.copytree(source, native)
    files = sorted(p for p in native.rglob("*") if p.is_file())
    for f in files:
        to_native(str(f))
    print(f"\nper transfer syntax ({len(files)} files each, 1 worker, best of {repeats}):")
    print(f"{'transfer syntax':72}{'MB':>8}{'decode/s':>10}{'ingest/s':>10}{'ratio':>8}")
    for name, syntax in SYNTAXES.items():
        src = work / f"src-{syntax}"
        try:
            for f in files:
                dst = src / f.relative_to(native)
                dst.parent.mkdir(parents=True, exist_ok=True)
                codecs.transcode(f, dst, syntax)
        except Exception as exc:  # e.g. 12-bit JPEG of 16-bit data
            print(f"{name:72}  not encodable here ({type(exc).__name__}: {str(exc)[:60]})")
            shutil.rmtree(src, ignore_errors=True)
            continue
        paths = sorted(str(p) for p in src.rglob("*") if p.is_file())
        size = sum(Path(p).stat().st_size for p in paths) / 1e6
        for p in paths:
            Path(p).read_bytes()
        dec = len(paths) / min(decode_only(paths, 1) for _ in range(repeats))
        ing = len(paths) / min(run_ingest(src, clinical, work, 1)[0] for _ in range(repeats))
        print(f"{name:72}{size:8.1f}{dec:10.1f}{ing:10.1f}{ing / dec:8.2f}")
        shutil.rmtree(src, ignore_errors=True)


def decode(paths: list[str]) -> int:
    for p in paths:
        _ = pydicom.dcmread(p).pixel_array
    return len(paths)


def decode_only(paths: list[str], workers: int) -> float:
    t0 = time.perf_counter()
    if workers == 1:
        decode(paths)
    else:
        chunks = [paths[i::workers] for i in range(workers)]
        with ProcessPoolExecutor(workers) as pool:
            sum(pool.map(decode, chunks))
    return time.perf_counter() - t0


def run_ingest(source: Path, clinical: Path, work: Path, workers: int) -> tuple[float, int]:
    out = work / f"ingest-{workers}"
    shutil.rmtree(out, ignore_errors=True)
    t0 = time.perf_counter()
    report = ingest(source, out, replace(IngestConfig(), workers=workers), clinical_csv=clinical, progress=False).report
    return time.perf_counter() - t0, report["slices_written"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scans", type=int, default=30)
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--repeats", type=int, default=2, help="best of N for every measurement")
    ap.add_argument("--syntax", choices=["native", "j2k", "each"], default="native",
                    help="transfer syntax of the cohort's files (native: as synthesised, a few RLE); each: "
                         "a row per transfer syntax an archive uses, instead of the worker comparison")
    args = ap.parse_args()
    os.environ.setdefault("BLENDSIGN_PSEUDONYM_KEY", "benchmark-key-not-secret-0123456789")

    with tempfile.TemporaryDirectory(prefix="bench_ingest_") as tmp:
        work = Path(tmp)
        t0 = time.perf_counter()
        synthesize(work / "cohort", replace(SynthConfig(), scans=args.scans, size=args.size), progress=False)
        source, clinical = work / "cohort" / "dicom", work / "cohort" / "clinical.csv"
        files = sorted(str(p) for p in source.rglob("*") if p.is_file())
        if args.syntax == "j2k":
            t0 = time.perf_counter()
            for f in files:
                to_j2k(f)
            print(f"re-encoded {len(files)} files as JPEG 2000 lossless in {time.perf_counter() - t0:.1f} s")
        print(f"cohort: {args.scans} scans at {args.size}x{args.size}, {len(files)} files "
              f"(synthesised in {time.perf_counter() - t0:.1f} s)")
        if args.syntax == "each":
            per_syntax(source, clinical, work, args.repeats)
            return
        for f in files:  # warm the page cache for both contestants
            Path(f).read_bytes()
        # the slices ingestion writes, found the way ingestion finds them (not timed)
        headers, _ = read_headers(files)
        plan = plan_ingest(headers, read_clinical(clinical), IngestConfig(),
                           Pseudonymizer(os.environ["BLENDSIGN_PSEUDONYM_KEY"].encode()), work / "x")
        slices = [s.path for t in plan.tasks for s in t.slices]

        rates: dict[tuple[str, int], float] = {}
        for workers in (1, 2):
            best_dec = min(decode_only(files, workers) for _ in range(args.repeats))
            runs = [run_ingest(source, clinical, work, workers) for _ in range(args.repeats)]
            best_ing, written = min(runs)
            assert written == len(slices), (written, len(slices))
            rates["decode", workers] = len(files) / best_dec
            rates["ingest", workers] = len(files) / best_ing

        print(f"{len(slices)} of the {len(files)} files are slices of the scans ingestion keeps")
        print(f"{'':14}{'1 worker':>12}{'2 workers':>12}{'scaling':>10}")
        for name in ("decode", "ingest"):
            r1, r2 = rates[name, 1], rates[name, 2]
            print(f"{name + ' files/s':14}{r1:12.1f}{r2:12.1f}{r2 / r1:9.2f}x")
        print(f"ingest/decode ratio: 1 worker {rates['ingest', 1] / rates['decode', 1]:.3f}, "
              f"2 workers {rates['ingest', 2] / rates['decode', 2]:.3f}")
        # the codec alone: zstd of every written `hu` value, one after another, nothing else
        cfg = IngestConfig()
        hu = [v.as_py() for v in ds.dataset(work / "ingest-1" / "slices").to_table(columns=["hu"])["hu"]]
        codec = pa.Codec(cfg.compression, cfg.compression_level)
        t_codec = min(_timed(lambda: [codec.compress(h) for h in hu]) for _ in range(args.repeats))
        t_decode = len(files) / rates["decode", 1]
        print(f"{cfg.compression} level {cfg.compression_level} of the {len(hu)} written hu values alone: "
              f"{t_codec:.2f} s, {t_codec * rates['ingest', 1] / len(files):.0%} of 1-worker ingest; "
              f"ceiling ratio with everything else free: {t_decode / t_codec:.2f}")
        print(f"ratio={rates['ingest', 1] / rates['decode', 1]:.3f}")


def _timed(fn: Callable[[], object]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


if __name__ == "__main__":
    main()
