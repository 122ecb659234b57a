"""Export, simulate, POC-run or submit the NVFlare job of a method (`python jobs/job.py export|simulate|poc|submit`).

python jobs/job.py export                                   # jobs/med_duallora/ (the committed CPU demo job)
python jobs/job.py export --method fedit                    # jobs/fedit/
python jobs/job.py export --real --out runs/real_jobs       # CineMA-base, weights from $MED_DUALLORA_WEIGHTS
MED_DUALLORA_DATA=PREPARED python jobs/job.py simulate --workspace runs/sim
MED_DUALLORA_DATA=PREPARED python jobs/job.py poc --rounds 2               # on a loopback POC network
python jobs/job.py submit --real --site-installed --startup-kit PROV/med_duallora/prod_00/admin@coordinator.example.org
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

from app.site_config import add_site_arguments, site_config_from_arguments
from jobs.poc import run_job, submit_folder
from jobs.recipe import REPO, FederationConfig, export_job, real_site_settings
from jobs.simulate import run_simulator
from models.protocol import DATA_ENV, SITES, WEIGHTS_ENV
from models.standin import STANDIN

DEFAULT_OUT = REPO / "jobs"


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("action", choices=("export", "simulate", "poc", "submit"))
    federation = parser.add_argument_group("federation")
    federation.add_argument("--name", default=None, help="job name (default: the method)")
    federation.add_argument("--rounds", type=int, default=FederationConfig.rounds)
    federation.add_argument("--min-clients", type=int, default=FederationConfig.min_clients)
    federation.add_argument("--sites", default=",".join(SITES))
    federation.add_argument("--start-round", type=int, default=0, help="with --resume-from: the first round to run")
    federation.add_argument("--resume-from", default=None, help="FL_global_model.pt of the run to resume")
    federation.add_argument(
        "--max-samples-per-site",
        type=int,
        default=FederationConfig.max_samples_per_site,
        help="the largest training-sample count a site may claim; more is rejected, not clipped",
    )
    federation.add_argument(
        "--round-timeout-s",
        type=int,
        default=FederationConfig.round_timeout_s,
        help="a round ends after this many seconds with whoever answered (default: %(default)s)",
    )
    federation.add_argument(
        "--straggler-wait-s",
        type=int,
        default=FederationConfig.straggler_wait_s,
        help="once the minimum answered, how long a round still waits for the others (default: %(default)s)",
    )
    federation.add_argument(
        "--clip-update-norm",
        type=float,
        default=None,
        help="robust aggregation: scale each site's update down to this L2 norm when longer (default: off)",
    )
    federation.add_argument(
        "--process-per-round",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="each round in a fresh site process, so a site whose process is killed rejoins the next round "
        "(default: on with --real, off for the micro demo)",
    )
    federation.add_argument(
        "--real",
        action="store_true",
        help=f"CineMA-base with pretrained weights at every site (--weights default ${WEIGHTS_ENV}; torch's threads)",
    )
    add_site_arguments(parser)
    actions = parser.add_argument_group("actions")
    packaging = actions.add_mutually_exclusive_group()
    packaging.add_argument("--byoc", action="store_true", help="ship our packages in the job's custom/ folder")
    packaging.add_argument(
        "--site-installed",
        action="store_true",
        help="the sites' app carries no code and runs the med-duallora each site installed (for sites whose "
        "authorization keeps custom code to their own staff, jobs/README.md)",
    )
    actions.add_argument("--out", default=str(DEFAULT_OUT), help="export: the folder receiving <job name>/")
    actions.add_argument("--workspace", default=None, help="simulate / poc: workspace (default runs/<action>)")
    actions.add_argument("--simulator-threads", type=int, default=2, help="simulate: sites running at once")
    actions.add_argument("--startup-kit", default=None, help="submit: the admin startup kit folder")
    actions.add_argument(
        "--username", default=None, help="submit: the admin identity of the kit (default: the kit folder's name)"
    )
    return parser.parse_args(argv)


def config_from_args(args: argparse.Namespace) -> FederationConfig:
    """The run the options describe; its policy is built here, once."""
    federation = {
        "rounds": args.rounds,
        "min_clients": args.min_clients,
        "sites": tuple(args.sites.split(",")),
        "start_round": args.start_round,
        "resume_from": args.resume_from,
        "name": args.name,
        "max_samples_per_site": args.max_samples_per_site,
        "clip_update_norm": args.clip_update_norm,
        "round_timeout_s": args.round_timeout_s,
        "straggler_wait_s": args.straggler_wait_s,
        "process_per_round": args.real if args.process_per_round is None else args.process_per_round,
    }
    if args.real:
        weights = args.weights if args.weights != STANDIN else f"${WEIGHTS_ENV}"
        real = real_site_settings(weights, args.cinema_config, args.backbone)
        return FederationConfig(site=site_config_from_arguments(args, **real), **federation)
    return FederationConfig(site=site_config_from_arguments(args), **federation)


def simulate(config: FederationConfig, workspace: str, threads: int, export_options: dict[str, bool]) -> int:
    """Export to `<workspace>/jobs/`, run `nvflare simulator` in `<workspace>/ws/`, judge it by its artifacts."""
    root = Path(workspace).resolve()
    job_dir = export_job(config, root / "jobs", **export_options)
    print(f"simulating {job_dir} in {root / 'ws'} ...", flush=True)
    run = run_simulator(job_dir, root / "ws", config.sites, threads, log_file=root / "simulator.log", progress=_say)
    problems = run.problems()
    for problem in problems:
        print("problem:", problem)
    print(f"{'completed' if not problems else 'FAILED'} in {run.seconds:.0f} s; server run folder {run.server_dir}")
    return 1 if problems else 0


def _say(line: str) -> None:
    print(f"  {line}", flush=True)


def poc(config: FederationConfig, workspace: str, export_options: dict[str, bool]) -> int:
    """Export to `<workspace>/jobs/` and run the job on a fresh loopback POC network in `<workspace>/network/`."""
    data_root = os.environ.get(DATA_ENV)
    if not data_root:
        raise SystemExit(f"poc needs {DATA_ENV}: the prepared data root the POC sites read")
    job_dir = export_job(config, Path(workspace).resolve() / "jobs", **export_options)
    result = run_job(job_dir, Path(workspace) / "network", data_root)
    print(json.dumps(result, indent=2))
    return 0 if result["status"] == "FINISHED:COMPLETED" else 1


def submit(config: FederationConfig, startup_kit: str, username: str, export_options: dict[str, bool]) -> str:
    """Export the job and submit the folder to a provisioned network through the admin startup kit."""
    with tempfile.TemporaryDirectory(prefix="med_duallora_submit.") as out:
        job_id = submit_folder(export_job(config, out, **export_options), os.path.abspath(startup_kit), username)
    print(f"submitted job {job_id}")
    return job_id


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    config = config_from_args(args)
    export_options = {"byoc": args.byoc, "site_installed": args.site_installed}
    if args.action == "export":
        print(export_job(config, args.out, **export_options))
        return 0
    workspace = args.workspace or f"runs/{args.action}"
    if args.action == "simulate":
        return simulate(config, workspace, args.simulator_threads, export_options)
    if args.action == "poc":
        return poc(config, workspace, export_options)
    if not args.startup_kit:
        raise SystemExit("submit needs --startup-kit: the admin startup kit of the provisioned project")
    submit(config, args.startup_kit, args.username or Path(args.startup_kit).resolve().name, export_options)
    return 0


if __name__ == "__main__":
    sys.exit(main())
