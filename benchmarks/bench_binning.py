"""Hits per second of hepdask's ``bin_events`` against the usual ways to make per-event images.

One run measures, on the same synthetic KM3NeT-like z-t data (2 axes, 18 x 100 bins):

(a) ``hepdask.binning.bin_events``: uint16 counts and float32 weighted images (after a warm-up
    call, so numba's compile time is not timed);
(b) a per-event ``numpy.histogramdd`` loop, what OrcaSong does (timed on a subset of events);
(c) boost-histogram: a per-event fill loop with ``reset``, and one fill of a 3-D histogram whose
    first axis is the event number (the fastest way we know to get per-event images from it);
(d) plain numba scatter-adds of PRECOMPUTED flat bin indices (the "practical limit"): serial
    into one L1-sized image, and ``prange`` over events into per-event images (int32 indices
    into uint16 images; int64 indices or uint32 images were about 1.5x slower here).

It checks that hepdask's images equal ``histogramdd``'s on the subset of (b), then prints a table
and the ratios hepdask / numpy loop (target >= 40) and hepdask / scatter-add limit (>= 0.5).

    PYTHONPATH=. python benchmarks/bench_binning.py [--events 1000] [--hits 10000]
"""

from __future__ import annotations

import argparse
import os
import platform
import time

import numba
import numpy as np

from hepdask.binning import BinAxis, bin_events, histogram_layout

Z_RANGE = (0.0, 200.0)
T_RANGE = (-250.0, 500.0)


def make_events(n_events: int, mean_hits: int, seed: int, dtype) -> tuple[np.ndarray, np.ndarray]:
    """KM3NeT-like hits: z from a skewed distribution over [0, 200] m; t mostly a signal bump
    inside [-250, 500] ns on a flat background over [-300, 560] ns (a few % outside)."""
    rng = np.random.default_rng(seed)
    counts = rng.poisson(mean_hits, n_events)
    offsets = np.zeros(n_events + 1, np.int64)
    np.cumsum(counts, out=offsets[1:])
    n = int(offsets[-1])
    z = Z_RANGE[1] * rng.beta(1.3, 1.1, n)
    background = rng.random(n) < 0.15
    t = np.where(background, rng.uniform(-300.0, 560.0, n), rng.normal(100.0, 120.0, n))
    return np.stack([z, t]).astype(dtype), offsets


def best_time(fn, repeat: int) -> float:
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


@numba.njit(nogil=True, cache=True)
def scatter_serial(idx, img):
    """One image, L1-sized: ``img[idx[h]] += 1`` for every hit (the serial limit)."""
    for h in range(idx.size):
        img[idx[h]] += 1


@numba.njit(parallel=True, nogil=True, cache=True)
def scatter_prange(idx, offsets, out):
    """Per-event images, events spread over numba's threads (the parallel limit)."""
    for ev in numba.prange(offsets.size - 1):
        img = out[ev]
        for h in range(offsets[ev], offsets[ev + 1]):
            img[idx[h]] += 1


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--events", type=int, default=1000, help="events (default 1000)")
    parser.add_argument("--hits", type=int, default=10_000, help="mean hits per event (default 10000)")
    parser.add_argument("--z-bins", type=int, default=18)
    parser.add_argument("--t-bins", type=int, default=100)
    parser.add_argument("--numpy-events", type=int, default=100,
                        help="events timed for the histogramdd loop and checked against it (default 100)")
    parser.add_argument("--boost-events", type=int, default=200,
                        help="events timed for the boost-histogram per-event loop (default 200)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float64"],
                        help="dtype of the coordinates (default float32, as in ROOT files)")
    parser.add_argument("--repeat", type=int, default=7, help="best of N timings (default 7)")
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args(argv)

    coords, offsets = make_events(args.events, args.hits, args.seed, np.dtype(args.dtype))
    n_hits = coords.shape[1]
    axes = [BinAxis.uniform("z", args.z_bins, *Z_RANGE, "m"),
            BinAxis.uniform("t", args.t_bins, *T_RANGE, "ns")]
    layout = histogram_layout(axes)
    weights = np.random.default_rng(args.seed + 1).exponential(1.0, n_hits).astype(np.float32)
    edges = [a.edges for a in axes]
    results: list[tuple[str, int, float]] = []  # (label, hits timed, seconds)

    # (a) hepdask
    bin_events(coords[:, :1000], np.array([0, 1000]), layout, dtype="uint16")  # compile/load
    bin_events(coords[:, :1000], np.array([0, 1000]), layout, weights=weights[:1000], dtype="float32")
    t = best_time(lambda: bin_events(coords, offsets, layout, dtype="uint16"), args.repeat)
    images, stats = bin_events(coords, offsets, layout, dtype="uint16")
    results.append(("hepdask bin_events, uint16 counts", n_hits, t))
    t = best_time(lambda: bin_events(coords, offsets, layout, weights=weights, dtype="float32"),
                  args.repeat)
    results.append(("hepdask bin_events, float32 weighted", n_hits, t))

    # (b) per-event numpy.histogramdd loop, on a subset; hepdask must agree bit for bit
    n_np = min(args.numpy_events, args.events)
    sub = coords[:, : offsets[n_np]]

    def numpy_loop():
        out = np.empty((n_np, *layout.shape))
        for e in range(n_np):
            out[e] = np.histogramdd(sub[:, offsets[e] : offsets[e + 1]].T, bins=edges)[0]
        return out

    t = best_time(numpy_loop, max(1, args.repeat // 2))
    results.append((f"numpy.histogramdd per event ({n_np} ev)", int(offsets[n_np]), t))
    expected = numpy_loop()
    assert np.array_equal(images[:n_np], expected), "hepdask differs from histogramdd"
    wimages, _ = bin_events(sub, offsets[: n_np + 1], layout, weights=weights[: sub.shape[1]],
                            dtype="float32")
    wexpected = np.array([
        np.histogramdd(sub[:, offsets[e] : offsets[e + 1]].T, bins=edges,
                       weights=weights[offsets[e] : offsets[e + 1]])[0] for e in range(n_np)
    ]).astype(np.float32)
    assert np.array_equal(wimages, wexpected), "hepdask weighted differs from histogramdd"

    # (c) boost-histogram
    try:
        import boost_histogram as bh
    except ImportError:
        bh = None
    if bh is not None:
        n_bh = min(args.boost_events, args.events)
        hist = bh.Histogram(*(bh.axis.Regular(a.nbins, a.edges[0], a.edges[-1]) for a in axes),
                            storage=bh.storage.Int64())

        def boost_loop():
            out = np.empty((n_bh, *layout.shape), np.uint16)
            for e in range(n_bh):
                hist.reset()
                hist.fill(*coords[:, offsets[e] : offsets[e + 1]])
                out[e] = hist.view()
            return out

        t = best_time(boost_loop, max(1, args.repeat // 2))
        results.append((f"boost-histogram fill+reset per event ({n_bh} ev)", int(offsets[n_bh]), t))
        threads = numba.get_num_threads()

        def boost_event_axis():
            ev = np.repeat(np.arange(args.events), np.diff(offsets))
            h3 = bh.Histogram(bh.axis.Integer(0, args.events, underflow=False, overflow=False),
                              *(bh.axis.Regular(a.nbins, a.edges[0], a.edges[-1]) for a in axes),
                              storage=bh.storage.Int64())
            h3.fill(ev, *coords, threads=threads)
            return h3.view().astype(np.uint16)

        t = best_time(boost_event_axis, max(1, args.repeat // 2))
        results.append((f"boost-histogram 3-D with event axis, threads={threads}", n_hits, t))

    # (d) the practical limit: scatter-add of precomputed flat bin indices
    flat = np.ravel_multi_index(
        tuple(np.clip(np.searchsorted(e, c, side="right") - 1, 0, e.size - 2)
              for e, c in zip(edges, coords.astype(np.float64))),
        layout.shape,
    ).astype(np.int32)  # int32 indices, uint16 images: the fastest plain variant we measured
    img = np.zeros(layout.size, np.uint16)
    scatter_serial(flat[:10], img)
    t = best_time(lambda: scatter_serial(flat, img), args.repeat)
    results.append(("numba scatter-add, serial, one L1 image", n_hits, t))
    out = np.zeros((args.events, layout.size), np.uint16)
    scatter_prange(flat[:10], np.array([0, 10]), out[:1])
    t = best_time(lambda: scatter_prange(flat, offsets, np.zeros_like(out)), args.repeat)
    results.append(("numba scatter-add, prange per-event images", n_hits, t))

    # report
    cores = os.cpu_count()
    affinity = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else cores
    print(f"machine: {platform.processor() or platform.machine()}, os.cpu_count()={cores}, "
          f"usable cores={affinity}, numba threads={numba.get_num_threads()} "
          f"({numba.threading_layer()}), numba {numba.__version__}, numpy {np.__version__}")
    outside = n_hits - stats.in_image
    print(f"data: {args.events} events, {n_hits:,} hits ({args.dtype}), image "
          f"{'x'.join(map(str, layout.shape))}; {outside / n_hits:.1%} of hits outside the range "
          f"(underflow {dict(zip(stats.axis_names, stats.underflow.tolist()))}, "
          f"overflow {dict(zip(stats.axis_names, stats.overflow.tolist()))}); "
          f"best of {args.repeat}")
    print(f"check: hepdask == numpy.histogramdd on {n_np} events (counts and weighted): OK\n")
    width = max(len(r[0]) for r in results)
    print(f"| {'method':<{width}} | {'hits timed':>11} | {'seconds':>8} | {'Mhits/s':>8} |")
    print(f"|{'-' * (width + 2)}|{'-' * 12}:|{'-' * 9}:|{'-' * 9}:|")
    rate = {}
    for label, n, secs in results:
        rate[label] = n / secs / 1e6
        print(f"| {label:<{width}} | {n:>11,} | {secs:>8.4f} | {rate[label]:>8.1f} |")
    ours = rate["hepdask bin_events, uint16 counts"]
    np_rate = rate[f"numpy.histogramdd per event ({n_np} ev)"]
    serial = rate["numba scatter-add, serial, one L1 image"]
    par = rate["numba scatter-add, prange per-event images"]
    print()
    print(f"hepdask / numpy.histogramdd loop      = {ours / np_rate:6.1f}  (target >= 40)")
    print(f"hepdask / scatter-add serial (1 image) = {ours / serial:6.2f}  (target >= 0.5)")
    print(f"hepdask / scatter-add prange (images)  = {ours / par:6.2f}  (target >= 0.5)")


if __name__ == "__main__":
    main()
