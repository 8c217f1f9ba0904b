"""Launch a SLURMCluster from a script and build a dataset on it.

    python jobqueue/launch_slurm.py CONFIG [--profile jobqueue/slurm.yaml] [--jobs 20]
                                           [--minimum-jobs 1] [--set KEY=VALUE ...]

The same thing `hepdask build-dataset CONFIG --cluster slurm` does, written out so that you
can change any step: the profile (dask-jobqueue's own YAML) becomes a SLURMCluster, which scales
adaptively between --minimum-jobs and --jobs jobs; a Client connects; the dashboard link is
printed; hepdask builds on that Client. Run it on a login node; the workers run in jobs.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import hepdask
from hepdask.cluster import check_submission, slurm_cluster, wait_for_workers
from hepdask.config import Cluster

HERE = Path(__file__).resolve().parent


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config", help="hepdask build config (YAML)")
    parser.add_argument("--profile", default=str(HERE / "slurm.yaml"), help="dask-jobqueue SLURM profile")
    parser.add_argument("--jobs", type=int, default=4, help="most SLURM jobs")
    parser.add_argument("--minimum-jobs", type=int, default=1, help="fewest SLURM jobs")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args(argv)

    from distributed import Client

    config = hepdask.load_config(args.config, args.overrides)
    spec = Cluster(kind="slurm", profile=args.profile, jobs=args.jobs, minimum_jobs=args.minimum_jobs)
    logs = config.output.path + ".slurm-logs"

    cluster = slurm_cluster(spec, log_directory=logs)
    check_submission(cluster.job_script())  # SLURM's refusal now, not a silent wait
    cluster.adapt(minimum_jobs=args.minimum_jobs, maximum_jobs=args.jobs)
    with cluster, Client(cluster) as client:
        print(f"Dask dashboard: {client.dashboard_link}", flush=True)
        wait_for_workers(client, cluster, max(1, args.minimum_jobs), spec.worker_timeout,
                         say=lambda text: print(text, flush=True), log_directory=logs)
        report = hepdask.build_dataset(config, client=client)
    print(f"wrote {report.events_written:,} events to {report.path} in {report.wall_seconds:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
