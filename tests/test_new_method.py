"""A new method is one file: a copy of snapkv.py under a new registered name, and nothing else,
is a method that run.py runs, that the report and `make bench` accept, and that the
parametrised method tests pick up. It is tried on a copy of the repository in a temporary folder
(the package laid out as installed, first on the import path), so the real tree is never
written to."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

tomllib = pytest.importorskip("tomllib")

ROOT = Path(__file__).resolve().parents[1]
COPY = ("conf", "tests", "run.py", "pyproject.toml")


def copy_of_the_tree(dst: Path) -> Path:
    """The repository's files a run needs, under ``dst``, with its packages laid out as
    pyproject.toml's package-dir installs them (``atskv.methods`` inside ``atskv``, ...) under
    ``dst/pkg``; returns that folder (for PYTHONPATH)."""
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for name in COPY:
        src = ROOT / name
        (shutil.copytree(src, dst / name, ignore=ignore) if src.is_dir()
         else shutil.copy2(src, dst / name))
    dirs = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-dir"]
    pkg = dst / "pkg"
    for name, folder in sorted(dirs.items()):  # parents before their children
        shutil.copytree(ROOT / folder, pkg.joinpath(*name.split(".")), ignore=ignore,
                        dirs_exist_ok=True)
    return pkg


def test_copying_snapkv_under_a_new_name_is_all_it_takes(tmp_path):
    tree = tmp_path / "tree"
    pkg = copy_of_the_tree(tree)
    name = "snapkv_copy"
    src = pkg / "atskv" / "methods" / "snapkv.py"
    text = src.read_text()
    assert text.count('@METHODS.register("snapkv")') == 1
    src.with_name(f"{name}.py").write_text(
        text.replace('@METHODS.register("snapkv")', f'@METHODS.register("{name}")'))
    env = {**os.environ, "WANDB_MODE": "disabled", "HYDRA_FULL_ERROR": "0",
           "PYTHONPATH": str(pkg), "ATSKV_CONF_DIR": str(tree / "conf")}

    def py(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, *args], cwd=tree, env=env, capture_output=True,
                              text=True, timeout=600)

    where = py("-c", "import atskv.methods; print(atskv.methods.__file__)")
    assert where.returncode == 0 and where.stdout.strip().startswith(str(pkg)), where

    run = py("run.py", f"method={name}", "model=tiny_random", "context_len='512'",
             "benchmark.n_samples=1", "warmup=false", "hardware.threads=1",
             "hardware.compile=false", "wandb.mode=disabled", f"hydra.run.dir={tmp_path / 'run'}")
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads((tmp_path / "run" / "result.json").read_text())
    assert result["method"] == name and result["status"] == "ok"
    assert result["prompt_tokens_kept"]["mean"] == round(0.25 * 512)

    rep = py("-m", "atskv.analysis.report", "--results", str(tmp_path / "run"), "--out",
             str(tmp_path / "report"))
    assert rep.returncode == 0, rep.stderr[-3000:]
    assert name in (tmp_path / "report" / "report.md").read_text()

    bench = py("-m", "atskv.bench", "--quick", "--sections", "main", "--methods", name,
               "--new-tokens", "3", "--out", str(tmp_path / "bench"), "hardware.threads=1",
               "hardware.compile=false")
    assert bench.returncode == 0, bench.stderr[-3000:]
    rows = json.loads((tmp_path / "bench" / "bench.json").read_text())["rows"]
    assert {r["method"] for r in rows} == {"full", name}

    tests = py("-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_methods.py", "-k", name)
    assert tests.returncode == 0, tests.stdout[-3000:]
    passed = int(tests.stdout.strip().splitlines()[-1].split(" passed")[0].split()[-1])
    # budget 1 = full, budget of the prompt x2, every stored byte x2, frozen, window kept
    assert passed >= 7, tests.stdout[-500:]
    assert not (ROOT / "src" / "methods" / f"{name}.py").exists()
