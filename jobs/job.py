"""Export, simulate, POC-run or submit the NVFlare job of a method (`python jobs/job.py export|simulate|poc|submit`).

python jobs/job.py export                                   # jobs/med_duallora/ (the committed CPU demo job)
python jobs/job.py export --method fedit                    # jobs/fedit/
python jobs/job.py export --real --out runs/real_jobs       # CineMA-base, weights from $MED_DUALLORA_WEIGHTS
MED_DUALLORA_DATA=PREPARED python jobs/job.py simulate --workspace runs/sim
MED_DUALLORA_DATA=PREPARED python jobs/job.py poc --rounds 2               # on a loopback POC network
python jobs/job.py submit --real --site-installed --startup-kit KIT --username admin@coordinator.example.org
    # KIT: the admin's startup kit, e.g. PROV/med_duallora/prod_00/admin@coordinator.example.org
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

from nvflare.fuel.flare_api.api_spec import AuthenticationError, AuthorizationError

from app.site_config import add_site_arguments, site_config_from_arguments
from custom.codec import CODECS
from jobs.poc import CONNECT_TIMEOUT_S, AdminKit, run_job, submit_folder
from jobs.recipe import (
    REAL_ROUNDS,
    REAL_TRAINING,
    REPO,
    TRACKING_PACKAGES,
    FederationConfig,
    TrackingUnavailable,
    export_job,
    real_site_settings,
)
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
        "--compress",
        choices=CODECS,
        default=None,
        help="compressed transport of the training rounds' weights, both ways: fp16, or blockwise int8 (default: "
        "fp32)",
    )
    federation.add_argument(
        "--secure-aggregation",
        action="store_true",
        help="homomorphic encryption of the shared keys: the server sums ciphertexts, only the sites decrypt "
        "(poc and submit only; the network must be provisioned with NVFlare's HEBuilder, and tenseal installed)",
    )
    federation.add_argument(
        "--process-per-round",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="each round in a fresh site process, so a site whose process is killed rejoins the next round "
        "(default: on with --real, off for the micro demo)",
    )
    federation.add_argument(
        "--tracking",
        choices=sorted(TRACKING_PACKAGES),
        default=FederationConfig.tracking,
        help="the server's experiment tracking (default: %(default)s; mlflow needs `pip install mlflow` on the "
        "server and where the job is exported)",
    )
    configuration = federation.add_mutually_exclusive_group()
    configuration.add_argument(
        "--real",
        action="store_true",
        help=f"CineMA-base with pretrained weights at every site (--weights default ${WEIGHTS_ENV}; torch's threads)",
    )
    configuration.add_argument(
        "--demo",
        action="store_true",
        help="the micro CPU demo job (the default of export, simulate and poc; submit needs --real or --demo)",
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
        "--username",
        default=None,
        help="submit (required): the admin identity of the kit, e.g. admin@coordinator.example.org; checked "
        "against the kit before anything is exported",
    )
    actions.add_argument(
        "--connect-timeout-s",
        type=float,
        default=CONNECT_TIMEOUT_S,
        help="submit: how long to try to reach the FL server (default: %(default)s)",
    )
    wants_real, _ = parser.parse_known_args(argv)
    if wants_real.real:  # the real job's own defaults; an option given on the command line still wins
        parser.set_defaults(rounds=REAL_ROUNDS, **REAL_TRAINING)
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
        "compression": args.compress,
        "secure_aggregation": args.secure_aggregation,
        "round_timeout_s": args.round_timeout_s,
        "straggler_wait_s": args.straggler_wait_s,
        "process_per_round": args.real if args.process_per_round is None else args.process_per_round,
        "tracking": args.tracking,
    }
    if args.real:
        weights = args.weights if args.weights != STANDIN else f"${WEIGHTS_ENV}"
        real = real_site_settings(weights, args.cinema_config, args.backbone)
        backbone = {name: real[name] for name in ("weights", "cinema_config", "backbone")}
        return FederationConfig(site=site_config_from_arguments(args, **backbone), **federation)
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


def submit(
    config: FederationConfig, kit: AdminKit, username: str, export_options: dict[str, bool], timeout: float
) -> str:
    """Export the job and submit the folder to a provisioned network through the admin startup kit; a server that
    cannot be reached, or that refuses the admin, is one line and exit status 1."""
    with tempfile.TemporaryDirectory(prefix="med_duallora_submit.") as out:
        job_dir = export_job(config, out, **export_options)
        try:
            job_id = submit_folder(job_dir, kit.folder, username, timeout)
        except ConnectionError as error:  # NVFlare's NoConnection
            raise SystemExit(
                f"error: cannot reach the FL server at {kit.server} from startup kit {kit.folder}: {error}"
            ) from None
        except (AuthenticationError, AuthorizationError) as error:
            raise SystemExit(
                f"error: the FL server at {kit.server} refused {username} of startup kit {kit.folder}: {error}"
            ) from None
    print(f"submitted job {job_id}")
    return job_id


def admin_kit(args: argparse.Namespace) -> AdminKit:
    """The startup kit of a submission, checked before anything is exported: a kit, its admin named (--username)
    and matching it, and the job chosen on purpose (--real or --demo)."""
    if not args.startup_kit:
        raise SystemExit("error: submit needs --startup-kit: the admin startup kit of the provisioned project")
    if not args.username:
        raise SystemExit("error: submit needs --username: the admin identity of the startup kit")
    if not (args.real or args.demo):
        raise SystemExit("error: submit needs --real (the CineMA job) or --demo (the micro CPU demo job, on purpose)")
    try:
        kit = AdminKit.read(args.startup_kit)
        kit.check_user(args.username)
    except (OSError, ValueError) as error:
        raise SystemExit(f"error: {error}") from None
    return kit


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    kit = admin_kit(args) if args.action == "submit" else None
    config = config_from_args(args)
    export_options = {"byoc": args.byoc, "site_installed": args.site_installed}
    workspace = args.workspace or f"runs/{args.action}"
    try:
        if args.action == "export":
            print(export_job(config, args.out, **export_options))
            return 0
        if args.action == "simulate":
            if config.secure_aggregation:
                raise SystemExit(
                    "error: --secure-aggregation needs the CKKS contexts provisioning puts in each startup kit, which "
                    "the simulator does not load (NVFlare issue #1959): run it with poc or submit"
                )
            return simulate(config, workspace, args.simulator_threads, export_options)
        if args.action == "poc":
            return poc(config, workspace, export_options)
        submit(config, kit, args.username, export_options, args.connect_timeout_s)
        return 0
    except TrackingUnavailable as error:
        raise SystemExit(f"error: {error}") from None


if __name__ == "__main__":
    sys.exit(main())
