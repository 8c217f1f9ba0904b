"""Images/s and peak memory of ``hepdask.tfdata.tf_dataset`` against two baselines.

Synthetic stores of about ``--sizes-gb`` GB of (18, 100) KM3NeT z-t-like images (sparse
Poisson counts plus a track-like band; labels int32) are written straight into the hepdask
layout (``store.prepare`` + whole chunks + ``store.finalize``, so they carry the completion
marker), chunked as a build chunks them (``AUTO_CHUNK_BYTES`` = 4 MiB), one ``train`` split.
``--dtype`` is the image dtype: ``uint8`` by default, what both hepdask
(``configs/km3net-mu-vs-nu.yaml``) and OrcaSong (``histogramdd(...).astype(uint8)``) write for
these count images; ``float32`` gives the 4x larger images of energy-weighted builds.
``--compressor`` gives the ``output.compressor.name`` of the stores, level 1, as a build
writes them: by default one store of each size with ``blosc-lz4`` (bit-shuffled LZ4, what
a build's default ``auto`` picks for these noisy uint8 images: its trial finds LZ4 1.13x
zstd's size) and one with ``zstd`` (what ``auto`` picks for clustered count images and for
other dtypes); (a) reads each. Existing stores are
reused.

Measurements, each in a fresh subprocess (independent RSS and TensorFlow state), every one
warmed up by one batch that is not timed, then timed for at least ``--seconds`` seconds and at
least one full pass over the split (the pipelines repeat, so several passes may be timed):

(a) ``hepdask.tfdata.tf_dataset(store, "train", batch_size=B, shuffle=True, epochs=None)``,
    on every store size and compressor; it delivers float32 images (its default ``cast``).
    Every batch of (a), (b) and (c) is taken with ``np.asarray`` (the tensor's memory, as a
    training step takes it; ``.numpy()`` would add a copy of each batch).
(b) the same images already in memory (read from the smallest store, not timed):
    ``from_tensor_slices((x, y)).shuffle(buf).repeat().batch(B)``, cast to float32 as (a)
    delivers them, ``.prefetch(AUTOTUNE)``, with the same shuffle buffer as (a) (two chunks);
    the upper bound.
(c) a ``keras.utils.PyDataset`` that reads one batch per ``__getitem__`` with h5py from an
    HDF5 file holding the smallest store's images (dataset chunked by batch, (B, 18, 100)),
    batch order shuffled every epoch, images cast to float32; once uncompressed, once gzip
    level 1, and once in the layout of the training files OrcaSong writes (32-event chunks,
    gzip level 1 with the shuffle filter; ``HDF5_LAYOUTS``). Each layout is measured twice:
    indexed directly in the measuring thread (``seq[i]``: numpy batches that nothing has
    handed to TensorFlow yet, the most a generator can give), and as ``model.fit`` receives
    it under the TensorFlow backend (Keras 3's ``PyDatasetAdapter.get_tf_dataset()``, with 1
    and with 2 PyDataset workers; the faster counts). A training step can only consume the
    second: it is the figure (a) is compared with.

Every measurement runs with the glibc malloc tuning that ``tf_dataset`` applies
(``hepdask.malloc.tune``), so (b) and (c) get the same allocator as (a).

Peak RSS: a psutil thread samples the process every 10 ms (and ``ru_maxrss`` at the end);
"base" is the RSS after the dataset is built, before the first batch.

``--profile`` adds a breakdown of (a): raw chunk reads in Python (1 and 2 threads), the
chunk-read ``map`` alone, + ``rebatch``, + ``unbatch``/``batch``, + ``shuffle``, and
``tf_dataset`` with ``shuffle=False`` and several ``parallel_reads``.

    python benchmarks/bench_tfdata.py [--sizes-gb 1 4] [--work-dir benchmarks/_work/tfdata]
        [--batch-size 256] [--seconds 30] [--profile]
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import resource
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
SHAPE = (18, 100)
MiB = 2**20


def image_bytes(dtype: str) -> int:
    return int(np.prod(SHAPE)) * np.dtype(dtype).itemsize


# --------------------------------------------------------------------------------------------
# the synthetic inputs


def chunk_events(dtype: str) -> int:
    from hepdask.config import AUTO_CHUNK_BYTES

    return max(1, AUTO_CHUNK_BYTES // image_bytes(dtype))


def synthetic_chunk(rng: np.random.Generator, n: int, dtype: str = "float32") -> tuple[np.ndarray, np.ndarray]:
    """*n* sparse z-t-like images: Poisson noise (mean 0.15) plus a track-like band of hits."""
    labels = rng.integers(0, 2, n).astype(np.int32)
    lam = np.full((n, *SHAPE), 0.15, np.float32)
    t0 = rng.integers(10, 80, n)
    slope = rng.uniform(-1.5, 1.5, n)
    z = np.arange(SHAPE[0])
    t = np.clip(np.rint(t0[:, None] + slope[:, None] * z[None, :]), 0, SHAPE[1] - 1).astype(np.int64)
    lam[np.arange(n)[:, None], z[None, :], t] += rng.uniform(1, 4, (n, 1)).astype(np.float32)
    return rng.poisson(lam).astype(dtype), labels


def store_path(work_dir: Path, size_gb: float, dtype: str, compressor: str) -> Path:
    return work_dir / f"images-{size_gb:g}GB-{dtype}-{compressor}.zarr"


def zarr_chunks(path: Path, name: str) -> int:
    import zarr

    return zarr.open_group(str(path), mode="r", zarr_format=3)["train"][name].chunks[0]


def write_store(path: Path, n_events: int, per_chunk: int, dtype: str, compressor: str) -> float:
    """Write a complete hepdask store of *n_events* synthetic events; seconds taken."""
    import zarr

    from hepdask import store

    started = time.perf_counter()
    coords = [store.Coordinate("z", np.arange(SHAPE[0], dtype=np.float64) + 0.5, {"units": "bin"}),
              store.Coordinate("t", np.arange(SHAPE[1], dtype=np.float64) + 0.5, {"units": "bin"})]
    arrays = {"image": store.ArraySpec(dtype, SHAPE), "label": store.ArraySpec("int32")}
    store.prepare(
        path, {"train": n_events}, arrays, {"image": ("z", "t"), "label": ()}, coords,
        chunk_events=store.array_chunk_events(arrays, ["image"], per_chunk),  # as a build chunks them
        compressor=(compressor, 1), attrs={store.PREFIX + "building": True},
    )
    group = zarr.open_group(str(path), mode="r+", zarr_format=3)["train"]
    rng = np.random.default_rng(12345)
    labels = np.empty(n_events, np.int32)
    for start, stop in store.chunk_ranges(n_events, per_chunk):
        images, labels[start:stop] = synthetic_chunk(rng, stop - start, dtype)
        group["image"][start:stop] = images
    group["label"][:] = labels
    store.finalize(path, {
        store.PREFIX + "splits": ["train"],
        store.PREFIX + "statistics": {"splits": {"train": {"events": n_events}}},
        store.PREFIX + "building": False,
        store.PREFIX + "version": "bench_tfdata",
    })
    return time.perf_counter() - started


#: The HDF5 layouts (c) reads: chunked by batch, uncompressed or gzip-1; and the layout of
#: the training files OrcaSong writes (its concatenate/h5shuffle2 output, inspected with
#: h5py: ``x`` chunked by 32 events, gzip level 1 with the shuffle filter).
HDF5_LAYOUTS = {
    "none": {"label": "uncompressed", "chunk": None, "opts": {}},
    "gzip": {"label": "gzip-1", "chunk": None, "opts": {"compression": "gzip", "compression_opts": 1}},
    "orcasong": {"label": "OrcaSong layout: 32-ev chunks, gzip-1+shuffle", "chunk": 32,
                 "opts": {"compression": "gzip", "compression_opts": 1, "shuffle": True}},
}


def write_hdf5(path: Path, zarr_store: Path, batch_size: int, layout: str) -> float:
    """The images and labels of *zarr_store*'s train split in HDF5, in one of ``HDF5_LAYOUTS``
    (chunked by batch unless the layout says otherwise)."""
    import h5py
    import zarr

    started = time.perf_counter()
    group = zarr.open_group(str(zarr_store), mode="r", zarr_format=3)["train"]
    n, per_chunk, dtype = group["image"].shape[0], group["image"].chunks[0], group["image"].dtype
    tmp = path.with_suffix(".tmp.h5")
    opts = HDF5_LAYOUTS[layout]["opts"]
    rows = HDF5_LAYOUTS[layout]["chunk"] or batch_size
    with h5py.File(tmp, "w") as f:
        x = f.create_dataset("x", (n, *SHAPE), dtype, chunks=(rows, *SHAPE), **opts)
        y = f.create_dataset("y", (n,), "int32", chunks=(rows,), **opts)
        for start in range(0, n, per_chunk):
            stop = min(start + per_chunk, n)
            x[start:stop] = group["image"][start:stop]
            y[start:stop] = group["label"][start:stop]
    tmp.rename(path)
    return time.perf_counter() - started


def du(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


# --------------------------------------------------------------------------------------------
# one measurement (runs in its own subprocess)


class RSSSampler(threading.Thread):
    """Peak resident set size of this process, sampled every *interval* seconds."""

    def __init__(self, interval: float = 0.01) -> None:
        import psutil

        super().__init__(daemon=True)
        self.process, self.interval, self.peak = psutil.Process(), interval, 0
        self._stop_event = threading.Event()

    def rss(self) -> int:
        return self.process.memory_info().rss

    def run(self) -> None:
        while not self._stop_event.is_set():
            self.peak = max(self.peak, self.rss())
            time.sleep(self.interval)

    def stop(self) -> int:
        self._stop_event.set()
        self.join()
        return max(self.peak, self.rss(), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)


def timed(batches, sampler: RSSSampler, *, seconds: float, min_images: int) -> dict:
    """Pull batches (the first one untimed) until both *seconds* and *min_images* are reached,
    or the batches end. Each batch is taken with ``np.asarray``, a view of the tensor's own
    memory, as a training step takes it: ``.numpy()`` copies every batch (TensorFlow hands out
    a writable copy), which cost the measuring thread a seventh of the CPU at ~800k images/s."""
    iterator = iter(batches)
    x, _ = next(iterator)
    np.asarray(x)
    images, n_batches = 0, 0
    started = time.perf_counter()
    while True:
        try:
            x, _ = next(iterator)
        except StopIteration:
            break
        images += np.asarray(x).shape[0]
        n_batches += 1
        elapsed = time.perf_counter() - started
        if elapsed >= seconds and images >= min_images:
            break
    return {"images": images, "batches": n_batches, "seconds": elapsed, "images_per_s": images / elapsed}


def measure(kind: str, args: argparse.Namespace) -> dict:
    """Build the pipeline *kind*, time it, and return its figures."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    path = Path(args.store)
    n_events, per_chunk = stored_images(path)
    buffer = args.shuffle_buffer or 2 * per_chunk
    B = args.batch_size
    # tf_dataset tunes glibc's malloc for chunk-sized buffers (hepdask.malloc.tune); every
    # measurement runs with the same tuning, so the baselines are like for like.
    from hepdask import malloc

    malloc.tune()
    if kind.startswith("python-read"):
        return measure_python_reads(path, int(kind.rsplit("-", 1)[1]), args)

    import tensorflow as tf

    if kind == "tf_dataset":
        from hepdask.tfdata import tf_dataset

        ds = tf_dataset(path, "train", batch_size=B, shuffle=not args.no_shuffle, epochs=None,
                        shuffle_buffer=args.shuffle_buffer, parallel_reads=args.parallel_reads)
    elif kind == "in-memory":
        import zarr

        group = zarr.open_group(str(path), mode="r", zarr_format=3)["train"]
        x, y = group["image"][:], group["label"][:]
        # The same images, delivered as (a) delivers them: batches cast to float32.
        ds = (tf.data.Dataset.from_tensor_slices((x, y)).shuffle(buffer, seed=0).repeat()
              .batch(B).map(lambda x, y: (tf.cast(x, tf.float32), y), num_parallel_calls=tf.data.AUTOTUNE)
              .prefetch(tf.data.AUTOTUNE))
    elif kind.startswith("pydataset-fit"):
        # "pydataset-fit-W-LAYOUT": what Keras' fit iterates, W PyDataset workers.
        ds = pydataset_fit_batches(Path(args.hdf5), B, workers=int(kind.split("-")[2]))
    elif kind.startswith("pydataset"):
        ds = pydataset_batches(Path(args.hdf5), B)
    elif kind.startswith("stages:"):
        ds = stage_pipeline(tf, path, kind.split(":", 1)[1], B, buffer, args.parallel_reads)
    else:
        msg = f"unknown measurement {kind!r}"
        raise ValueError(msg)
    sampler = RSSSampler()
    base = sampler.rss()
    sampler.start()
    result = timed(ds, sampler, seconds=args.seconds, min_images=n_events)
    result.update(rss_base=base, rss_peak=sampler.stop(), events=n_events)
    return result


def stored_images(path: Path) -> tuple[int, int]:
    """(events, events per chunk) of the store's train images."""
    import zarr

    image = zarr.open_group(str(path), mode="r", zarr_format=3)["train"]["image"]
    return int(image.shape[0]), int(image.chunks[0])


def h5_pydataset(path: Path, batch_size: int, workers: int = 1):
    """An h5py-backed ``keras.utils.PyDataset``: one HDF5 slice of *batch_size* events per
    item, in a batch order shuffled every epoch; images cast to float32, as (a) delivers them."""
    import h5py
    import keras

    class H5Batches(keras.utils.PyDataset):
        """One HDF5 slice of *batch_size* events per item, in a shuffled batch order."""

        def __init__(self, path, batch_size, seed=0, **kwargs):
            super().__init__(**kwargs)
            self.file = h5py.File(path, "r")
            self.x, self.y = self.file["x"], self.file["y"]
            self.batch_size = batch_size
            self.rng = np.random.default_rng(seed)
            self.order = self.rng.permutation(len(self))

        def __len__(self):
            return int(-(-self.x.shape[0] // self.batch_size))

        def __getitem__(self, index):
            start = int(self.order[index]) * self.batch_size
            stop = start + self.batch_size
            return self.x[start:stop].astype(np.float32, copy=False), self.y[start:stop]

        def on_epoch_end(self):
            self.order = self.rng.permutation(len(self))

    return H5Batches(path, batch_size, workers=workers)


def pydataset_batches(path: Path, batch_size: int):
    """Endless (x, y) batches of ``h5_pydataset``, indexed directly in this thread, epoch by
    epoch: the most a generator can give, before anything hands its batches to TensorFlow."""
    seq = h5_pydataset(path, batch_size)

    def batches():
        while True:
            for i in range(len(seq)):
                yield seq[i]
            seq.on_epoch_end()

    return batches()


def pydataset_fit_batches(path: Path, batch_size: int, workers: int):
    """One epoch of ``h5_pydataset`` batches as ``model.fit`` receives them under the TensorFlow
    backend: Keras 3 wraps a PyDataset in ``PyDatasetAdapter`` and iterates its
    ``get_tf_dataset()`` (``Dataset.from_generator`` over the items, fed by an enqueuer of
    *workers* threads when workers > 1). One epoch only: with 2 workers, Keras 3.15's
    enqueuer hung at 0 % CPU in one run that went on into a second epoch."""
    from keras.src.trainers.data_adapters.py_dataset_adapter import PyDatasetAdapter

    adapter = PyDatasetAdapter(h5_pydataset(path, batch_size, workers=workers), shuffle=False)
    dataset = adapter.get_tf_dataset()
    adapter.on_epoch_begin()
    return iter(dataset)


def stage_pipeline(tf, path: Path, stages: str, batch_size: int, buffer: int, parallel_reads):
    """``tf_dataset``'s pipeline cut at a stage: ``map`` (whole chunks), ``rebatch``,
    ``unbatch`` (unbatch + batch), ``shuffle`` (unbatch + shuffle + batch)."""
    from hepdask.tfdata import EpochPlan, SplitSource

    source = SplitSource.open(path, "train", ("image", "label"))
    plan = EpochPlan(source.n_events, source.chunk_events, 0, True)
    read = source.reader()
    types = (tf.as_dtype(source.dtypes["image"]), tf.int32)

    def read_chunk(index):
        x, y = tf.numpy_function(read, [index], types, stateful=False)
        return tf.ensure_shape(x, (None, *SHAPE)), tf.ensure_shape(y, (None,))

    # Chunk indices one epoch at a time, as tf_dataset makes them (a from_generator per
    # chunk index would cost more than the stages measured here).
    epochs = iter(range(2**62))

    def chunks_of_next_epoch(_):
        order = tf.numpy_function(lambda _: plan.chunks(next(epochs)).astype(np.int64), [_], tf.int64,
                                  stateful=True)
        return tf.data.Dataset.from_tensor_slices(tf.ensure_shape(order, (None,)))

    ds = tf.data.Dataset.range(1).repeat().flat_map(chunks_of_next_epoch)
    ds = ds.map(read_chunk, num_parallel_calls=parallel_reads or tf.data.AUTOTUNE, deterministic=True)
    if stages == "rebatch":
        ds = ds.rebatch(batch_size)
    elif stages in ("unbatch", "shuffle"):
        ds = ds.unbatch()
        if stages == "shuffle":
            ds = ds.shuffle(buffer, seed=0)
        ds = ds.batch(batch_size, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    elif stages != "map":
        msg = f"unknown stages {stages!r}"
        raise ValueError(msg)
    return ds.prefetch(tf.data.AUTOTUNE)


def measure_python_reads(path: Path, threads: int, args: argparse.Namespace) -> dict:
    """Whole-chunk reads through ``SplitSource.reader`` in plain Python (no TensorFlow)."""
    from concurrent.futures import ThreadPoolExecutor

    from hepdask.tfdata import EpochPlan, SplitSource

    source = SplitSource.open(path, "train", ("image", "label"))
    plan = EpochPlan(source.n_events, source.chunk_events, 0, True)
    read = source.reader()
    read(0)
    sampler = RSSSampler()
    base = sampler.rss()
    sampler.start()
    images, started = 0, time.perf_counter()
    with ThreadPoolExecutor(threads) as pool:
        for epoch in range(1000):
            for x, _ in pool.map(read, plan.chunks(epoch)):
                images += x.shape[0]
            elapsed = time.perf_counter() - started
            if elapsed >= args.seconds:
                break
    return {"images": images, "batches": 0, "seconds": elapsed, "images_per_s": images / elapsed,
            "rss_base": base, "rss_peak": sampler.stop(), "events": source.n_events}


# --------------------------------------------------------------------------------------------
# the driver


def run_child(kind: str, store: Path, args: argparse.Namespace, *, seconds: float, hdf5: Path | None = None,
              **options) -> dict:  # fmt: skip
    """Run one measurement in a fresh interpreter and return its JSON result."""
    command = [sys.executable, __file__, "--_measure", kind, "--store", str(store),
               "--batch-size", str(args.batch_size), "--seconds", str(seconds)]
    if hdf5 is not None:
        command += ["--hdf5", str(hdf5)]
    if args.shuffle_buffer:
        command += ["--shuffle-buffer", str(args.shuffle_buffer)]
    if options.get("parallel_reads"):
        command += ["--parallel-reads", str(options["parallel_reads"])]
    if options.get("no_shuffle"):
        command += ["--no-shuffle"]
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "PYTHONWARNINGS": "ignore"}
    started = time.perf_counter()
    proc = subprocess.run(command, capture_output=True, text=True, env=env, check=False)
    if proc.returncode != 0:
        sys.stderr.write(proc.stderr[-4000:])
        msg = f"measurement {kind} failed (exit {proc.returncode})"
        raise RuntimeError(msg)
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    result["wall"] = time.perf_counter() - started
    return result


def fmt_row(label: str, store: str, r: dict) -> str:
    return (f"| {label:<46} | {store:>6} | {r['images']:>10,} | {r['seconds']:>6.1f} | "
            f"{r['images_per_s']:>10,.0f} | {r['rss_base'] / MiB:>8,.0f} | {r['rss_peak'] / MiB:>8,.0f} |")


HEADER = ("| measurement                                    |  store | images     |      s |   images/s | "
          "base MiB | peak MiB |\n"
          "|------------------------------------------------|-------:|-----------:|-------:|-----------:|"
          "---------:|---------:|")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes-gb", type=float, nargs="+", default=[1, 4])
    parser.add_argument("--work-dir", type=Path, default=HERE / "_work" / "tfdata")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--dtype", choices=["uint8", "float32"], default="uint8", help="image dtype")
    parser.add_argument("--compressor", choices=["zstd", "blosc-lz4", "none"], nargs="+",
                        default=["blosc-lz4", "zstd"], help="output.compressor.name of the stores: (a) reads each")
    parser.add_argument("--seconds", type=float, default=30.0, help="minimum timed seconds per measurement")
    parser.add_argument("--profile", action="store_true", help="also break (a) down by stage")
    parser.add_argument("--profile-seconds", type=float, default=12.0)
    parser.add_argument("--shuffle-buffer", type=int, default=None, help="events (default: two chunks)")
    parser.add_argument("--json", type=Path, default=None, help="write all results here")
    # the subprocess side
    parser.add_argument("--_measure", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--store", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--hdf5", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--parallel-reads", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--no-shuffle", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args._measure:
        print(json.dumps(measure(args._measure, args)))
        return

    args.work_dir.mkdir(parents=True, exist_ok=True)
    per_chunk = chunk_events(args.dtype)
    B = args.batch_size
    print(f"python {platform.python_version()}, {os.cpu_count()} cores; {args.dtype} images, "
          f"compressors {' '.join(args.compressor)}; chunk {per_chunk} events; batch {B}")

    stores = {}
    for size, compressor in itertools.product(args.sizes_gb, args.compressor):
        path = store_path(args.work_dir, size, args.dtype, compressor)
        n = round(size * 1e9 / image_bytes(args.dtype) / per_chunk) * per_chunk
        from hepdask import store as hstore

        if (hstore.is_complete(path) and stored_images(path)[0] == n
                and zarr_chunks(path, "label") == hstore.array_chunk_events(
                    {"label": hstore.ArraySpec("int32")}, [], per_chunk)["label"]):
            print(f"reusing {path} ({n:,} events, {du(path) / MiB:,.0f} MiB on disk)")
        else:
            seconds = write_store(path, n, per_chunk, args.dtype, compressor)
            print(f"wrote {path}: {n:,} events, {n * image_bytes(args.dtype) / 1e9:.2f} GB raw, "
                  f"{du(path) / MiB:,.0f} MiB on disk, {seconds:.1f} s")
        stores[size, compressor] = path
    small = min(args.sizes_gb)
    # (b) and (c) read the images of the first compressor's smallest store: every store holds
    # the same images (one seed), so they are the same for all.
    reference = stores[small, args.compressor[0]]
    h5 = {}
    for compression in HDF5_LAYOUTS:
        path = args.work_dir / f"images-{small:g}GB-{args.dtype}-{compression}-b{B}.h5"
        if not path.exists():
            seconds = write_hdf5(path, reference, B, compression)
            print(f"wrote {path}: {du(path) / MiB:,.0f} MiB, {seconds:.1f} s")
        h5[compression] = path

    rows: list[tuple[str, str, dict]] = []

    def record(label, size, result):
        rows.append((label, f"{size:g} GB", result))
        print(fmt_row(label, f"{size:g} GB", result), flush=True)

    print(HEADER)
    a = {}
    for (size, compressor), path in stores.items():
        a[size, compressor] = run_child("tf_dataset", path, args, seconds=args.seconds)
        record(f"(a) hepdask tf_dataset, shuffle=True, {compressor}", size, a[size, compressor])
    b = run_child("in-memory", reference, args, seconds=args.seconds)
    record("(b) in-memory from_tensor_slices + shuffle", small, b)
    c, c_fit = {}, {}
    for compression, path in h5.items():
        label = HDF5_LAYOUTS[compression]["label"]
        c[compression] = run_child(f"pydataset-{compression}", reference, args, seconds=args.seconds, hdf5=path)
        record(f"(c) h5py PyDataset, {label}, indexed directly", small, c[compression])
        fits = []
        for workers in (1, 2):
            fits.append(run_child(f"pydataset-fit-{workers}-{compression}", reference, args,
                                  seconds=args.seconds, hdf5=path))
            record(f"(c) h5py PyDataset, {label}, as fit gets it, {workers} worker(s)", small, fits[-1])
        c_fit[compression] = max(fits, key=lambda r: r["images_per_s"])

    if args.profile:
        seconds = args.profile_seconds
        for kind, label, opts in [
            ("python-read-1", "profile: Python chunk reads, 1 thread", {}),
            ("python-read-2", "profile: Python chunk reads, 2 threads", {}),
            ("stages:map", "profile: map(read_chunk) only (whole chunks)", {}),
            ("stages:rebatch", "profile: map + rebatch(B)", {}),
            ("stages:unbatch", "profile: map + unbatch + batch", {}),
            ("stages:shuffle", "profile: map + unbatch + shuffle + batch", {}),
            ("tf_dataset", "profile: tf_dataset shuffle=False", {"no_shuffle": True}),
            ("tf_dataset", "profile: tf_dataset parallel_reads=1", {"parallel_reads": 1}),
            ("tf_dataset", "profile: tf_dataset parallel_reads=2", {"parallel_reads": 2}),
            ("tf_dataset", "profile: tf_dataset parallel_reads=4", {"parallel_reads": 4}),
        ]:
            record(label, small, run_child(kind, reference, args, seconds=seconds, **opts))

    print()
    for compressor in args.compressor:
        ours = a[small, compressor]["images_per_s"]
        print(f"(a) {compressor} store: (a)/(b) on {small:g} GB = {ours / b['images_per_s']:.2f}  (target >= 0.8)")
        for compression in c:
            direct, fit = (ours / r[compression]["images_per_s"] for r in (c, c_fit))
            print(f"  (a)/(c {compression}) on {small:g} GB = {fit:.2f} as fit gets (c) (faster worker count), "
                  f"{direct:.2f} against (c) indexed directly  (target >= 5)")
        for size in args.sizes_gb:
            r = a[size, compressor]
            print(f"  (a) peak RSS on {size:g} GB: {r['rss_peak'] / MiB:,.0f} MiB "
                  f"(+{(r['rss_peak'] - r['rss_base']) / MiB:,.0f} MiB over the built dataset)")
    out = args.json or args.work_dir / "results.json"
    out.write_text(json.dumps([{"label": lab, "store": s, **r} for lab, s, r in rows], indent=1))
    print(f"results: {out}")


if __name__ == "__main__":
    main()
