"""Launch a SLURMCluster from a script and build a dataset on it.

    python jobqueue/launch_slurm.py CONFIG [--profile jobqueue/slurm.yaml] [--jobs 20]
                                           [--minimum-jobs 1] [--set KEY=VALUE ...]

The same thing `hepdask build-dataset CONFIG --cluster slurm` does, written out so that you
can change any step: the config's cluster section, with the flags given on top, and its
profile (dask-jobqueue's own YAML) become a SLURMCluster, which scales
adaptively between --minimum-jobs and --jobs jobs; a Client connects; the dashboard link is
printed; hepdask builds on that Client. Run it on a login node; the workers run in jobs.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import hepdask
from hepdask.build import slurm_log_directory
from hepdask.cluster import check_submission, slurm_cluster, wait_for_workers
from hepdask.config import Override

HERE = Path(__file__).resolve().parent


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config", help="hepdask build config (YAML)")
    parser.add_argument("--profile", help="dask-jobqueue SLURM profile (default: cluster.profile, else "
                                          "jobqueue/slurm.yaml)")
    parser.add_argument("--jobs", type=int, help="most SLURM jobs (cluster.jobs)")
    parser.add_argument("--minimum-jobs", type=int, help="fewest SLURM jobs (cluster.minimum_jobs)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args(argv)
    try:
        return build(args)
    except hepdask.HepdaskError as err:
        print(f"launch_slurm: error: {err}", file=sys.stderr)
        return 2


def build(args: argparse.Namespace) -> int:
    from distributed import Client

    # The config's cluster section, with the flags given on top (as `hepdask build-dataset` does).
    flags = [Override("cluster.kind=slurm", "launch_slurm.py")]
    if args.profile or not hepdask.load_config(args.config, args.overrides).cluster.profile:
        profile = str(Path(args.profile or HERE / "slurm.yaml").resolve())
        flags.append(Override(f"cluster.profile={json.dumps(profile)}", f"--profile {profile}"))
    if args.jobs is not None:
        flags.append(Override(f"cluster.jobs={args.jobs}", f"--jobs {args.jobs}"))
    if args.minimum_jobs is not None:
        flags.append(Override(f"cluster.minimum_jobs={args.minimum_jobs}", f"--minimum-jobs {args.minimum_jobs}"))
    config = hepdask.load_config(args.config, [*args.overrides, *flags])
    spec, logs = config.cluster, slurm_log_directory(config)

    cluster = slurm_cluster(spec, log_directory=logs)  # the profile (and cluster.tls) -> a SLURMCluster
    with cluster:
        check_submission(cluster.job_script())  # SLURM's refusal now, not a silent wait
        cluster.adapt(minimum_jobs=spec.minimum_jobs, maximum_jobs=spec.jobs)
        with Client(cluster) as client:
            print(f"Dask dashboard: {client.dashboard_link}", flush=True)
            per_job = cluster._dummy_job.worker_processes
            wait_for_workers(client, cluster, max(1, spec.minimum_jobs) * per_job, spec.worker_timeout,
                             say=lambda text: print(text, flush=True), log_directory=logs)
            report = hepdask.build_dataset(config, client=client)
    print(f"wrote {report.events_written:,} events to {report.path} in {report.wall_seconds:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
