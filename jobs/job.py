"""Export, simulate, POC-run or submit the NVFlare job of a method (`python jobs/job.py export|simulate|poc|submit`).

python jobs/job.py export                                   # jobs/med_duallora/ (the committed CPU demo job)
python jobs/job.py export --method fedit                    # jobs/fedit/
python jobs/job.py export --real --out runs/real_jobs       # CineMA-base, weights from $MED_DUALLORA_WEIGHTS
MED_DUALLORA_DATA=PREPARED python jobs/job.py simulate --workspace runs/sim
MED_DUALLORA_DATA=PREPARED python jobs/job.py poc --rounds 2               # on a loopback POC network
python jobs/job.py submit --startup-kit WS/prod_00/admin@nvidia.com
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from jobs.poc import run_job
from jobs.recipe import REPO, SITES, FederationConfig, export_job, real_config, staged_recipe
from jobs.simulate import run_simulator

DEFAULT_OUT = REPO / "jobs"


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("action", choices=("export", "simulate", "poc", "submit"))
    parser.add_argument("--method", default="med_duallora", help="sharing policy; the job is named after it")
    parser.add_argument("--name", default=None, help="job name (default: the method)")
    parser.add_argument("--share-head", choices=("default", "yes", "no"), default="default")
    parser.add_argument("--rounds", type=int, default=FederationConfig.rounds)
    parser.add_argument("--local-epochs", type=int, default=FederationConfig.local_epochs)
    parser.add_argument("--backbone", default=None, help="ConvViT preset for --weights random or a bare checkpoint")
    parser.add_argument("--real", action="store_true", help="CineMA-base with pretrained weights at every site")
    parser.add_argument(
        "--weights",
        default=None,
        help="standin (default; the committed stand-in), random (a random backbone, said loudly), or a site-local "
        ".safetensors path ($VARS expanded at the site)",
    )
    parser.add_argument("--cinema-config", default=None, help="CineMA config.yaml of --weights, at the site")
    parser.add_argument("--blocks", default=None, help="comma-separated adapted blocks (default: the last two)")
    parser.add_argument("--global-r", type=int, default=FederationConfig.global_r)
    parser.add_argument("--local-r", type=int, default=FederationConfig.local_r)
    parser.add_argument("--lr", type=float, default=FederationConfig.lr)
    parser.add_argument("--batch-size", type=int, default=FederationConfig.batch_size)
    parser.add_argument("--seed", type=int, default=FederationConfig.seed)
    parser.add_argument("--site-threads", type=int, default=None, help="torch threads per site (0 = torch default)")
    parser.add_argument("--min-clients", type=int, default=FederationConfig.min_clients)
    parser.add_argument("--proximal-mu", type=float, default=0.0, help="FedProx term on the shared keys (0 = off)")
    parser.add_argument("--sites", default=",".join(SITES))
    parser.add_argument("--start-round", type=int, default=0, help="with --resume-from: the first round to run")
    parser.add_argument("--resume-from", default=None, help="FL_global_model.pt of the run to resume")
    parser.add_argument("--byoc", action="store_true", help="ship our packages in the job's custom/ folder")
    parser.add_argument("--out", default=str(DEFAULT_OUT), help="export: the folder receiving <job name>/")
    parser.add_argument("--workspace", default=None, help="simulate / poc: workspace (default runs/<action>)")
    parser.add_argument("--threads", type=int, default=2, help="simulate: sites running at once")
    parser.add_argument("--startup-kit", default=None, help="submit: the admin startup kit folder")
    parser.add_argument("--username", default="admin@nvidia.com", help="submit: the admin identity of the kit")
    return parser.parse_args(argv)


def config_from_args(args: argparse.Namespace) -> FederationConfig:
    share_head = {"default": None, "yes": True, "no": False}[args.share_head]
    blocks = [int(b) for b in args.blocks.split(",")] if args.blocks else None
    options = {
        "method": args.method,
        "name": args.name,
        "share_head": share_head,
        "rounds": args.rounds,
        "local_epochs": args.local_epochs,
        "blocks": blocks,
        "global_r": args.global_r,
        "local_r": args.local_r,
        "lr": args.lr,
        "batch_size": args.batch_size,
        "seed": args.seed,
        "min_clients": args.min_clients,
        "proximal_mu": args.proximal_mu,
        "sites": tuple(args.sites.split(",")),
        "start_round": args.start_round,
        "resume_from": args.resume_from,
    }
    if args.site_threads is not None:
        options["threads"] = args.site_threads
    if args.real:
        weights = {"weights": args.weights} if args.weights else {}
        return real_config(**weights, cinema_config=args.cinema_config, **options)
    if args.weights:
        options["weights"] = args.weights
    return FederationConfig(backbone=args.backbone, cinema_config=args.cinema_config, **options)


def simulate(config: FederationConfig, workspace: str, threads: int, byoc: bool) -> int:
    """Export to `<workspace>/jobs/`, run `nvflare simulator` in `<workspace>/ws/`, judge it by its artifacts."""
    root = Path(workspace).resolve()
    job_dir = export_job(config, root / "jobs", byoc=byoc)
    print(f"simulating {job_dir} in {root / 'ws'} ...", flush=True)
    run = run_simulator(job_dir, root / "ws", config.sites, threads, log_file=root / "simulator.log")
    problems = run.problems()
    for problem in problems:
        print("problem:", problem)
    print(f"{'completed' if not problems else 'FAILED'} in {run.seconds:.0f} s; server run folder {run.server_dir}")
    return 1 if problems else 0


def poc(config: FederationConfig, workspace: str, byoc: bool) -> int:
    """Export to `<workspace>/jobs/` and run the job on a fresh loopback POC network in `<workspace>/network/`."""
    data_root = os.environ.get("MED_DUALLORA_DATA")
    if not data_root:
        raise SystemExit("poc needs MED_DUALLORA_DATA: the prepared data root the POC sites read")
    job_dir = export_job(config, Path(workspace).resolve() / "jobs", byoc=byoc)
    result = run_job(job_dir, Path(workspace) / "network", data_root)
    print(json.dumps(result, indent=2))
    return 0 if result["status"] == "FINISHED:COMPLETED" else 1


def submit(config: FederationConfig, startup_kit: str, username: str, byoc: bool) -> str:
    """Submit to a provisioned network through the admin startup kit (NVFlare's ProdEnv / Session API)."""
    from nvflare.recipe import ProdEnv

    with staged_recipe(config, byoc) as recipe:
        run = recipe.run(ProdEnv(startup_kit_location=os.path.abspath(startup_kit), username=username))
    print(f"submitted job {run.get_job_id()}")
    return run.get_job_id()


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    config = config_from_args(args)
    if args.action == "export":
        print(export_job(config, args.out, byoc=args.byoc))
        return 0
    workspace = args.workspace or f"runs/{args.action}"
    if args.action == "simulate":
        return simulate(config, workspace, args.threads, args.byoc)
    if args.action == "poc":
        return poc(config, workspace, args.byoc)
    if not args.startup_kit:
        raise SystemExit("submit needs --startup-kit: the admin startup kit of the provisioned project")
    submit(config, args.startup_kit, args.username, args.byoc)
    return 0


if __name__ == "__main__":
    sys.exit(main())
