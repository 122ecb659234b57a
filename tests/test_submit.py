"""`python jobs/job.py submit` is safe by default: the admin is named and checked against a real provisioned
startup kit before anything is exported, the job is chosen on purpose (--real or --demo), and a server that cannot
be reached is one line and exit status 1, within the connection timeout."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from jobs import job
from jobs.job import main, parse_args
from jobs.poc import ADMIN, PROJECT_NAME, SERVER_HOST, AdminKit, free_port, loopback_project
from jobs.recipe import REPO
from models.protocol import SITES

OTHER_ADMIN = "lead@coordinator.example.org"


@pytest.fixture(scope="module")
def kit(tmp_path_factory: pytest.TempPathFactory) -> AdminKit:
    """The admin kit of a freshly provisioned loopback project whose server is not running."""
    root = tmp_path_factory.mktemp("provisioned")
    project = root / "project.yml"
    project.write_text(yaml.safe_dump(loopback_project(SITES[:1], free_port()), sort_keys=False))
    env = {**os.environ, "HOME": str(root / "home"), "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    subprocess.run(
        ["nvflare", "provision", "-p", str(project), "-w", str(root)], check=True, env=env, capture_output=True
    )
    return AdminKit.read(root / PROJECT_NAME / "prod_00" / ADMIN)


@pytest.fixture
def no_export(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fails the test if anything is exported."""

    def refuse(*args, **kwargs):
        raise AssertionError("exported before the submission was checked")

    monkeypatch.setattr(job, "export_job", refuse)


def _submit(kit: AdminKit, *options: str) -> list[str]:
    return ["submit", "--startup-kit", str(kit.folder), *options]


def test_the_kit_says_whose_it_is_and_where_its_server_is(kit):
    assert (kit.username, kit.certificate_name, kit.host) == (ADMIN, ADMIN, SERVER_HOST)
    assert isinstance(kit.port, int) and kit.server == f"{SERVER_HOST}:{kit.port}"
    kit.check_user(ADMIN)


def test_submit_needs_a_username(kit, no_export):
    with pytest.raises(SystemExit, match="submit needs --username"):
        main(_submit(kit, "--demo"))


def test_a_username_that_is_not_the_kits_is_refused_before_export(kit, no_export):
    with pytest.raises(SystemExit) as refused:
        main(_submit(kit, "--demo", "--username", OTHER_ADMIN))
    message = str(refused.value.code)
    assert message.startswith("error: ") and "\n" not in message
    assert OTHER_ADMIN in message and ADMIN in message and str(kit.folder) in message


def test_a_kit_whose_files_disagree_is_refused_naming_both(kit, tmp_path):
    forged = tmp_path / "kit"
    shutil.copytree(kit.folder, forged)
    config = json.loads((forged / "startup" / "fed_admin.json").read_text())
    config["admin"]["username"] = OTHER_ADMIN
    (forged / "startup" / "fed_admin.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=f"fed_admin.json says '{OTHER_ADMIN}' and client.crt '{ADMIN}'"):
        AdminKit.read(forged).check_user(OTHER_ADMIN)


def test_a_folder_that_is_no_kit_is_one_line(tmp_path, no_export):
    with pytest.raises(SystemExit, match=r"^error: .* is not an admin startup kit: no startup/fed_admin.json$"):
        main(["submit", "--demo", "--startup-kit", str(tmp_path), "--username", ADMIN])


def test_submit_needs_real_or_demo_chosen(kit, no_export):
    with pytest.raises(SystemExit, match=r"submit needs --real \(the CineMA job\) or --demo"):
        main(_submit(kit, "--username", ADMIN))
    with pytest.raises(SystemExit) as both:
        parse_args(_submit(kit, "--username", ADMIN, "--real", "--demo"))
    assert both.value.code == 2


def test_demo_submits_the_demo_job_through_the_kit(kit, monkeypatch, capsys):
    submitted = {}

    def accept(job_dir: Path, startup_kit: Path, username: str, timeout: float) -> str:
        submitted.update(name=json.loads((job_dir / "meta.json").read_text())["name"], kit=startup_kit)
        submitted.update(user=username, timeout=timeout)
        return "job-1"

    monkeypatch.setattr(job, "submit_folder", accept)
    assert main(_submit(kit, "--demo", "--username", ADMIN, "--connect-timeout-s", "3")) == 0
    assert submitted == {"name": "med_duallora", "kit": kit.folder, "user": ADMIN, "timeout": 3.0}
    assert capsys.readouterr().out.strip().endswith("submitted job job-1")


def test_an_unreachable_server_is_one_line_and_exit_status_1(kit, tmp_path):
    """Nothing listens at the kit's server: NVFlare's session gives up after the timeout given (2 s here)."""
    command = [sys.executable, str(REPO / "jobs" / "job.py"), *_submit(kit, "--demo", "--username", ADMIN)]
    env = {**os.environ, "HOME": str(tmp_path)}
    started = time.monotonic()
    done = subprocess.run(
        [*command, "--connect-timeout-s", "2"], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120
    )
    assert time.monotonic() - started < 60
    assert done.returncode == 1, done.stderr
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith(f"error: cannot reach the FL server at {kit.server} from startup kit {kit.folder}: ")
    assert last.endswith("for 2.0 seconds")  # NVFlare's NoConnection names the timeout it was given
    assert "Traceback" not in done.stderr + done.stdout
