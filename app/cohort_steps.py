"""Cohort steps shared by the benchmark and pretraining CLIs: run a data_prep module, prepare a split once."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable, Sequence
from pathlib import Path


def run_module(arguments: Sequence[str], log: Callable[[str], None]) -> None:
    """Run `python -m <arguments>` with this interpreter, logging the command line first; failures raise."""
    command = [sys.executable, "-m", *arguments]
    log("+ " + " ".join(command))
    subprocess.run(command, check=True)


def synthesize(
    raw_dir: Path,
    seed: int,
    subjects_per_vendor: int,
    log: Callable[[str], None],
    vendors: Sequence[str] = (),
    render_profile: str | None = None,
) -> None:
    """Write a synthetic cohort (fixed by its seed) into raw_dir with `data_prep.synthesize`, on 2 processes;
    `vendors` restricts it (default: every vendor), `render_profile` renders it with one vendor's profile."""
    options = ["--vendors", *vendors] if vendors else []
    options += ["--render-profile", render_profile] if render_profile else []
    run_module(
        [
            "data_prep.synthesize",
            "--out",
            str(raw_dir),
            "--seed",
            str(seed),
            "--subjects-per-vendor",
            str(subjects_per_vendor),
            "--workers",
            "2",
            *options,
        ],
        log,
    )


def prepare_split(
    raw_dir: Path, prepared: Path, seed: int, options: Sequence[str], log: Callable[[str], None]
) -> Path:
    """The prepared root of one seed's split (manifest.csv, written last by data_prep.prepare, marks it finished)."""
    if not (prepared / "manifest.csv").exists():
        run_module(
            [
                "data_prep.prepare",
                "--raw",
                str(raw_dir),
                "--out",
                str(prepared),
                "--seed",
                str(seed),
                "--workers",
                "1",
                *options,
            ],
            log,
        )
    return prepared
