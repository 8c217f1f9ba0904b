"""How zstd and bit-shuffled Blosc-LZ4 store and decode uint8 count images, and what
``output.compressor: auto`` picks for them (``store.compressor_name``).

Synthetic images, seeded: per event, hits drawn around one centre (a shower; clustered) or
at random over the whole image (noisy), at several occupancies; 4 MiB chunks encoded and
decoded single-threaded, each codec as a build writes it (level 1; Blosc with typesize 2).

    python benchmarks/bench_codecs.py [--occupancy 0.005 0.01 ...] [--events 4096] [--side 64]
"""

from __future__ import annotations

import argparse
import time

import numpy as np

#: Spread of a clustered event's hits around its centre, in pixels.
CLUSTER_SIGMA = 6.0
#: Decoding passes over the chunks; the fastest counts.
DECODE_ROUNDS = 3


def images(n: int, side: int, occupancy: float, *, clustered: bool, rng) -> np.ndarray:
    out = np.zeros((n, side, side), np.uint8)
    hits = max(1, round(occupancy * side * side))
    if not clustered:
        return rng.binomial(1, occupancy, out.shape).astype(np.uint8)
    for image in out:
        centre = rng.uniform(side / 4, 3 * side / 4, 2)
        xy = np.clip(np.round(rng.normal(centre, CLUSTER_SIGMA, (hits, 2))).astype(int), 0, side - 1)
        np.add.at(image, (xy[:, 0], xy[:, 1]), rng.integers(1, 5, hits).astype(np.uint8))
    return out


def measure(codec, chunks: list[np.ndarray]) -> tuple[float, float]:
    """(compression ratio, decoding GB/s of uncompressed bytes)."""
    encoded = [codec.encode(c) for c in chunks]
    best = np.inf
    for _ in range(DECODE_ROUNDS):
        t0 = time.perf_counter()
        for e in encoded:
            codec.decode(e)
        best = min(best, time.perf_counter() - t0)
    raw = sum(c.nbytes for c in chunks)
    return raw / sum(map(len, encoded)), raw / best / 1e9


def main(argv=None) -> None:
    import numcodecs.blosc
    from numcodecs import Zstd

    from hepdask import store

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--occupancy", type=float, nargs="+", default=[0.005, 0.01, 0.02, 0.045, 0.08, 0.14])
    parser.add_argument("--events", type=int, default=4096)
    parser.add_argument("--side", type=int, default=64)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args(argv)
    numcodecs.blosc.use_threads = False
    zstd = Zstd(level=1)
    blosc = store._numcodecs_blosc(store.compressors("blosc-lz4", 1, "uint8"))  # what a build writes
    per_chunk = max(1, 4 * 2**20 // (args.side * args.side))
    print(f"{'images':<10} {'occupancy':>9} {'zstd ratio':>10} {'GB/s':>6} {'blosc ratio':>11} {'GB/s':>6} "
          f"{'size blosc/zstd':>15} {'speed blosc/zstd':>16}  auto")
    for clustered in (True, False):
        for occupancy in args.occupancy:
            rng = np.random.default_rng(args.seed)
            data = images(args.events, args.side, occupancy, clustered=clustered, rng=rng)
            chunks = [data[i : i + per_chunk] for i in range(0, len(data), per_chunk)]
            (zr, zs), (br, bs) = measure(zstd, chunks), measure(blosc, chunks)
            occ = np.count_nonzero(data) / data.size
            print(f"{'clustered' if clustered else 'noisy':<10} {occ:>9.3f} {zr:>10.1f} {zs:>6.2f} {br:>11.1f} {bs:>6.2f} "
                  f"{zr / br:>15.2f} {bs / zs:>16.2f}  {store.compressor_name('auto', 'uint8', chunks[0])}")


if __name__ == "__main__":
    main()
