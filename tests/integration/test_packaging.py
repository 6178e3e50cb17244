"""The built wheel carries every data file the package reads, and the package works from it alone.

An editable install reads data files from the checkout, so it hides any file the package data
leaves out; these tests build the real sdist and wheel (the wheel from the sdist, as pip would
from a source release) and look only at what they contain.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("supervisor", "workers")
_SKIP = shutil.ignore_patterns(".venv", ".git", "state", "build", "dist", "__pycache__",
                               "*.egg-info", ".*_cache", ".hypothesis")  # fmt: skip

# Runs in a fresh interpreter with only the unpacked wheel ahead of site-packages. It records
# every file opened while the package loads its data (queries and migrations of both dialects,
# the built-in config) and prints them as JSON.
PROBE = """
import json, sys
site, opened = sys.argv[1], []
sys.path.insert(0, site)
sys.addaudithook(lambda event, args: opened.append(str(args[0]))
                 if event == "open" and isinstance(args[0], str) else None)
import supervisor
from supervisor.config import load_config
from supervisor.store.queries import load_migrations, load_queries
for dialect in ("sqlite", "postgres"):
    assert load_queries(dialect)["get_command"], dialect
    assert load_migrations(dialect), dialect
config = load_config(None, env={})
assert config.workers, "the built-in config names the demo workers"
print(json.dumps({"package": supervisor.__file__, "opened": opened}))
"""


@pytest.fixture(scope="module")
def dist(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The sdist and the wheel, built from a copy of the checkout (the build writes egg-info)."""
    base = tmp_path_factory.mktemp("dist")
    src = base / "src"
    shutil.copytree(ROOT, src, ignore=_SKIP)
    out = base / "out"
    done = subprocess.run([sys.executable, "-m", "build", "--outdir", str(out), str(src)],
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return out


def _wheel(dist: Path) -> Path:
    (wheel,) = dist.glob("*.whl")
    return wheel


def _data_files() -> list[str]:
    """Every file of the packages that is not Python source: what the code reads at run time."""
    return sorted(
        path.relative_to(ROOT).as_posix()
        for package in PACKAGES
        for path in (ROOT / package).rglob("*")
        if path.is_file() and path.suffix not in (".py", ".pyc") and "__pycache__" not in path.parts
    )


def test_wheel_and_sdist_carry_every_data_file(dist: Path) -> None:
    data = _data_files()
    assert "supervisor/store/sql/queries.sql" in data and "supervisor/default.toml" in data
    with zipfile.ZipFile(_wheel(dist)) as wheel:
        in_wheel = set(wheel.namelist())
    assert [f for f in data if f not in in_wheel] == [], "missing from the wheel"
    (sdist,) = dist.glob("*.tar.gz")
    import tarfile

    with tarfile.open(sdist) as tar:
        in_sdist = {name.split("/", 1)[1] for name in tar.getnames() if "/" in name}
    assert [f for f in data if f not in in_sdist] == [], "missing from the sdist"


def test_package_loads_its_data_from_the_wheel_alone(dist: Path, tmp_path: Path) -> None:
    site = tmp_path / "site"
    with zipfile.ZipFile(_wheel(dist)) as wheel:
        wheel.extractall(site)
        in_wheel = {(site / name).resolve() for name in wheel.namelist()}
    elsewhere = tmp_path / "cwd"
    elsewhere.mkdir()
    done = subprocess.run([sys.executable, "-I", "-B", "-c", PROBE, str(site)], cwd=elsewhere,
                          capture_output=True, text=True, timeout=60)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    probe = json.loads(done.stdout.strip().splitlines()[-1])
    assert Path(probe["package"]).resolve().is_relative_to(site.resolve()), probe["package"]
    opened = {Path(p).resolve() for p in probe["opened"]}
    from_package = {p for p in opened if p.is_relative_to(site.resolve())}
    data = {p for p in from_package if p.suffix != ".py" and "__pycache__" not in p.parts}
    assert {p.name for p in data} >= {"queries.sql", "default.toml", "0001_initial.sql"}
    assert data <= in_wheel
    venv = Path(sys.prefix).resolve()
    checkout = [p for p in opened if p.is_relative_to(ROOT) and not p.is_relative_to(venv)]
    assert checkout == [], "the package read files from the checkout"
