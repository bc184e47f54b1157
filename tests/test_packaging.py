"""The wheel works on its own: built from a copy of the sources, installed (not editable) into a fresh venv, its
`kvmini` answers --help for every subcommand and every subpackage imports, from the wheel's files, outside the repo.

The fresh venv gets the dependencies through a `.pth` line pointing at this interpreter's site-packages (nothing
is downloaded). Python adds such a directory to sys.path without running the `.pth` files inside it, so the
editable install of kvmini living there (`__editable__.kvmini-*.pth` and its finder) stays inert: the test checks
that every module comes from the fresh venv all the same.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
PACKAGE_DIRS = ("engine", "server")
# Copied into the build tree: all that `pip wheel` needs (no tests/, weights/, .git, build/ litter).
BUILD_INPUTS = ("pyproject.toml", "README.md", *PACKAGE_DIRS)
# Files in the package directories that are documentation for the repository, not something the code reads.
NOT_SHIPPED = ("*.md",)
IGNORE = shutil.ignore_patterns("__pycache__", "*.pyc", "*.pyo")

pytestmark = pytest.mark.slow


def source_packages() -> list[str]:
    """Every package under engine/ and server/ (any directory with an __init__.py), as dotted names."""
    names = []
    for top in PACKAGE_DIRS:
        for init in sorted((REPO_ROOT / top).rglob("__init__.py")):
            if "__pycache__" not in init.parts:
                names.append(".".join(init.parent.relative_to(REPO_ROOT).parts))
    return names


def source_files() -> list[str]:
    """Every file under engine/ and server/ the wheel must carry (modules and package data), repo-relative."""
    out = []
    for top in PACKAGE_DIRS:
        for path in sorted((REPO_ROOT / top).rglob("*")):
            rel = path.relative_to(REPO_ROOT)
            if path.is_file() and "__pycache__" not in rel.parts and path.suffix not in (".pyc", ".pyo"):
                if not any(path.match(p) for p in NOT_SHIPPED):
                    out.append(rel.as_posix())
    return out


def subcommands() -> list[str]:
    from engine.cli import _parser

    actions = [a for a in _parser()._actions if isinstance(a, argparse._SubParsersAction)]
    assert len(actions) == 1
    return list(actions[0].choices)


def _setuptools_version() -> tuple[int, ...]:
    try:
        return tuple(int(p) for p in importlib.metadata.version("setuptools").split(".")[:2])
    except (importlib.metadata.PackageNotFoundError, ValueError):
        return (0,)


def run(cmd: list, cwd: Path, env: dict | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    proc = subprocess.run([str(c) for c in cmd], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{cmd} exited {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    return proc


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> dict:
    """Build the wheel from a copy of the sources, install it into a fresh venv; the paths and env to use it."""
    tmp = tmp_path_factory.mktemp("packaging")
    src = tmp / "src"
    src.mkdir()
    for name in BUILD_INPUTS:
        if (REPO_ROOT / name).is_dir():
            shutil.copytree(REPO_ROOT / name, src / name, ignore=IGNORE)
        else:
            shutil.copy(REPO_ROOT / name, src / name)

    wheels = tmp / "wheels"
    # pyproject's build-system asks for setuptools>=77 (the SPDX `license` string); with that here, build
    # against it and stay offline, otherwise let pip fetch a build backend into an isolated environment.
    isolation = [] if _setuptools_version() >= (77,) else ["--use-pep517"]
    no_isolation = ["--no-build-isolation"] if not isolation else []
    run([sys.executable, "-m", "pip", "wheel", "--no-deps", *no_isolation, *isolation, "--quiet", "-w", wheels, src],
        cwd=tmp, timeout=300)
    (wheel,) = wheels.glob("kvmini-*.whl")

    venv = tmp / "venv"
    run([sys.executable, "-m", "venv", "--without-pip", venv], cwd=tmp)
    python = venv / "bin" / "python"
    # This interpreter's pip installs into the fresh venv (`--python`): no ensurepip, no index.
    run([sys.executable, "-m", "pip", "--python", python, "install", "--no-deps", "--no-index", "--quiet", wheel],
        cwd=tmp, timeout=300)
    purelib = Path(run([python, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"], cwd=tmp)
                   .stdout.strip())  # fmt: skip
    deps = dict.fromkeys([sysconfig.get_path("purelib"), sysconfig.get_path("platlib")])
    (purelib / "_kvmini_test_deps.pth").write_text("".join(f"{d}\n" for d in deps))

    env = {k: v for k, v in os.environ.items()
           if k not in ("PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP", "VIRTUAL_ENV", "PYTHONSAFEPATH")}  # fmt: skip
    env |= {"PATH": f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}", "PYTHONNOUSERSITE": "1",
            "VIRTUAL_ENV": str(venv)}  # fmt: skip
    work = tmp / "elsewhere"  # cwd for every command: not the repo, so nothing is imported from the checkout
    work.mkdir()
    return {"wheel": wheel, "venv": venv, "python": python, "purelib": purelib, "env": env, "cwd": work}


def test_wheel_carries_every_module_and_data_file(installed) -> None:
    with zipfile.ZipFile(installed["wheel"]) as z:
        names = set(z.namelist())
    missing = [f for f in source_files() if f not in names]
    assert not missing, f"not in the wheel (fix [tool.setuptools] in pyproject.toml): {missing}"
    tops = {n.split("/")[0] for n in names}
    dist_info = {t for t in tops if t.endswith(".dist-info")}
    assert tops - dist_info == set(PACKAGE_DIRS), tops  # no tests/, bench/, weights/ in site-packages
    (meta,) = dist_info
    entry_points = zipfile.ZipFile(installed["wheel"]).read(f"{meta}/entry_points.txt").decode()
    assert "kvmini = engine.cli:main" in entry_points


def test_every_subpackage_imports_from_the_wheel(installed) -> None:
    packages = source_packages()
    assert {"engine", "server", "engine.inspect", "engine.kv_memory"} <= set(packages)
    code = (
        "import importlib, importlib.metadata, json, sys\n"
        f"names = {packages!r}\n"
        "files = {n: importlib.import_module(n).__file__ for n in names}\n"
        "dist = importlib.metadata.distribution('kvmini')\n"
        "print(json.dumps({'files': files, 'dist': str(dist.locate_file('')), "
        "'direct_url': dist.read_text('direct_url.json'), 'path': sys.path}))\n"
    )
    proc = run([installed["python"], "-c", code], cwd=installed["cwd"], env=installed["env"])
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    purelib = installed["purelib"].resolve()
    for name, file in got["files"].items():
        assert Path(file).resolve().is_relative_to(purelib), (name, file)  # the wheel's copy, not the checkout
    assert Path(got["dist"]).resolve() == purelib
    assert '"editable"' not in (got["direct_url"] or "")
    assert str(REPO_ROOT) not in got["path"] and "" not in got["path"][1:]


HELP_ALL = """
import contextlib, importlib.metadata, io, json, sys
(ep,) = importlib.metadata.entry_points(group="console_scripts", name="kvmini")
main = ep.load()  # the function the wheel's `kvmini` script calls
results = {}
for name in sys.argv[1:]:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        try:
            code = main([name, "--help"])
        except SystemExit as e:
            code = e.code
    results[name] = [code, out.getvalue(), main.__module__, sys.modules[main.__module__].__file__]
print(json.dumps(results))
"""


def test_kvmini_help_for_every_subcommand(installed) -> None:
    """`kvmini --help` and `kvmini serve --help` through the wheel's script, then `SUB --help` for every
    subcommand (plugins included) through the script's entry point in one process (each start imports torch)."""
    kvmini = installed["venv"] / "bin" / "kvmini"
    assert kvmini.is_file()
    names = subcommands()
    assert {"convert", "info", "generate", "serve"} <= set(names)
    commands = [[kvmini, "--help"], [kvmini, "serve", "--help"], [installed["python"], "-c", HELP_ALL, *names]]
    procs = [
        subprocess.Popen([str(c) for c in cmd], cwd=installed["cwd"], env=installed["env"], text=True,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        for cmd in commands
    ]  # fmt: skip  (started together: each mostly waits on importing torch)
    results = []
    for cmd, proc in zip(commands, procs):
        try:
            out, err = proc.communicate(timeout=180)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, err = proc.communicate()
        assert proc.returncode == 0 and "Traceback" not in err, f"{cmd[1:2]} exited {proc.returncode}\n{out}\n{err}"
        results.append(out)
    top, serve_help, each = results
    assert top.startswith("usage: kvmini") and all(name in top for name in names), top
    assert serve_help.startswith("usage: kvmini serve") and "--port" in serve_help and "--model" in serve_help
    each = json.loads(each.strip().splitlines()[-1])
    assert list(each) == names
    for name, (code, out, module, file) in each.items():
        assert code == 0 and out.startswith(f"usage: kvmini {name}"), (name, code, out)
        assert module == "engine.cli" and Path(file).resolve().is_relative_to(installed["purelib"].resolve())
    assert each["serve"][1] == serve_help  # the entry point is what the script runs


def test_installed_wheel_imports_the_default_model_into_kvmini_home(installed, tmp_path) -> None:
    """`pip install .`, then `kvmini convert --default && kvmini generate "Hi"`, with no checkout: the model goes
    to $KVMINI_HOME/models/, where `generate` (like `serve` and `LLM()`) finds it when no model is named; before
    the import, the error names the command that does it."""
    home = tmp_path / "home"
    env = installed["env"] | {"KVMINI_HOME": str(home)}
    kvmini = installed["venv"] / "bin" / "kvmini"
    missing = subprocess.run([str(kvmini), "generate", "Hi"], cwd=installed["cwd"], env=env, capture_output=True,
                             text=True, timeout=180)
    assert missing.returncode == 2 and "`kvmini convert --default`" in missing.stderr, missing.stderr
    run([kvmini, "convert", "--default"], cwd=installed["cwd"], env=env, timeout=600)
    assert (home / "models" / "smollm2-135m-instruct" / "config.json").is_file()
    out = run([kvmini, "generate", "Hi", "--max-tokens", "4"], cwd=installed["cwd"], env=env, timeout=300)
    assert out.stdout.strip(), out
