"""k8s/image/Dockerfile: builds from what the repository has, installs the project, runs non-root and offline."""

from __future__ import annotations

import re
import shlex
from pathlib import PurePosixPath

import pytest
from k8s_manifests import DOCKERFILE, REPO, STAGES, container, dockerfile_env, dockerfile_final_stage

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    tomllib = pytest.importorskip("tomli")

TEXT = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
INSTRUCTIONS = [(line.split(None, 1)[0].upper(), line.split(None, 1)[1] if " " in line.strip() else "")
                for line in (raw.strip() for raw in TEXT.splitlines()) if line and not line.startswith("#")]
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())


def copied_sources() -> list[str]:
    """Build-context paths of every COPY that does not read from another stage."""
    out = []
    for instr, rest in INSTRUCTIONS:
        if instr == "COPY" and "--from=" not in rest:
            out += shlex.split(rest)[:-1]
    return out


def test_copied_paths_exist_and_cover_every_installed_package():
    sources = copied_sources()
    assert sources and all((REPO / s).exists() for s in sources), sources
    covered = [PurePosixPath(s) for s in sources]
    setuptools = PYPROJECT["tool"]["setuptools"]
    needed = [PurePosixPath(p) for p in setuptools["package-dir"].values()] + [PurePosixPath(PYPROJECT["project"]["readme"])]
    for path in needed:
        assert any(path == c or c in path.parents for c in covered), f"{path} is not copied into the image"


def test_dockerignore_keeps_what_is_copied():
    ignore = (DOCKERFILE.parent / "Dockerfile.dockerignore").read_text().splitlines()
    kept = {line[1:].rstrip("/") for line in ignore if line.startswith("!")}
    for src in copied_sources():
        assert src.rstrip("/") in kept, f"{src} is excluded from the build context"


def test_installs_cuda_torch_then_the_project_with_its_extras_not_editable():
    runs = [rest for instr, rest in INSTRUCTIONS if instr == "RUN"]
    torch_step = next(i for i, r in enumerate(runs) if "torch==" in r)
    assert "--index-url" in runs[torch_step]
    project_step = next(i for i, r in enumerate(runs) if '"/src[${EXTRAS}]"' in r)
    assert torch_step < project_step and " -e " not in runs[project_step]
    assert any(instr == "ARG" and rest.startswith("EXTRAS=") for instr, rest in INSTRUCTIONS)


def test_runs_as_a_numeric_non_root_user_under_tini():
    final = dockerfile_final_stage()
    user = [rest for instr, rest in final if instr == "USER"][-1]
    uid, _, gid = user.partition(":")
    assert uid.isdigit() and int(uid) != 0 and gid.isdigit() and int(gid) != 0  # runAsNonRoot can verify a number
    entry = [rest for instr, rest in final if instr == "ENTRYPOINT"][-1]
    assert entry.startswith("[") and "tini" in entry, "exec form, tini as PID 1: signals reach the service"


def test_needs_no_network_at_start():
    env = dockerfile_env()
    assert env["HF_HUB_OFFLINE"] == "1" and env["TRANSFORMERS_OFFLINE"] == "1"
    final_runs = " ".join(rest for instr, rest in dockerfile_final_stage() if instr == "RUN")
    assert "get_ffmpeg_exe()" in final_runs, "the build proves ffmpeg is inside the image"
    assert "PYTHONUNBUFFERED" in env, "logs reach stdout as they are written"


def test_every_program_the_manifests_start_is_in_the_image():
    scripts = set(PYPROJECT["project"]["scripts"])
    for stage in STAGES:
        program = container(stage)["args"][0]
        assert program in scripts, f"{stage} starts {program!r}"
