"""``pip install .`` (not editable) carries everything the package needs at run time.

The package data (``configs/*.yaml``, ``towers/model_configs/*.json``), the ``data`` package, the top-level
modules (``cli``, ``errors``) and the ``towerrec`` script must all be in the installed copy, and they must
work from a folder far from the repository. The venv holds an editable install of the repo, so every import
is checked to resolve to the installed copy. Nothing is downloaded: no dependencies, no index, no build
isolation (setuptools and wheel come from the ``dev`` extra).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
# Build outputs, caches and things no wheel should carry; the sources are copied so the build never
# writes into the repository (build/, *.egg-info) while others work in it.
SKIP = (".git", ".venv", "build", "dist", "*.egg-info", "__pycache__", ".pytest_cache", ".ruff_cache", ".cache",
        "runs", "tests")

CHECK = r"""
import json, sys
import cli, configs, data, errors, towers
import data.catalog, data.protocol, towers.factory, train.loop
from configs import CONFIG_DIR, load_config
from towers.image import create_clip

tiny = load_config("tiny")
clip = create_clip(tiny.item.image.arch, image_size=tiny.item.image.image_size)  # from towers/model_configs
print(json.dumps({
    "files": {m.__name__: m.__file__ for m in (cli, configs, data, errors, towers, data.catalog, train.loop)},
    "config_dir": str(CONFIG_DIR),
    "tiny": {"name": tiny.name, "dim": tiny.dim, "user": tiny.user.model, "arch": tiny.item.image.arch},
    "clip_width": int(clip.visual.output_dim),
}))
"""


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A non-editable install of a copy of the repository, into ``<tmp>/site``."""
    if shutil.which("pip", path=str(Path(sys.executable).parent)) is None:
        pytest.skip("pip is not in this interpreter's environment")
    try:
        import setuptools  # noqa: F401
        import wheel  # noqa: F401
    except ImportError as err:
        pytest.fail(f"{err.name} is missing: pip install -e '.[dev]' (no build isolation here, so no download)")
    root = tmp_path_factory.mktemp("packaging")
    src = root / "src"
    shutil.copytree(REPO, src, ignore=shutil.ignore_patterns(*SKIP))
    site = root / "site"
    env = {**os.environ, "PIP_NO_INPUT": "1", "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "--no-build-isolation", "--no-index", "--quiet",
         "--target", str(site), str(src)],
        cwd=root, env=env, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return site


def _env(site: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(PYTHONPATH=str(site), HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    return env


def test_install_carries_package_data_and_modules(installed: Path) -> None:
    for pattern in ("configs/*.yaml", "towers/model_configs/*.json", "data/*.py", "towers/*.py", "index/*.py", "rerank/*.py",
                    "train/*.py", "configs/*.py"):
        shipped = sorted(p.relative_to(REPO) for p in REPO.glob(pattern))
        assert shipped, pattern
        got = sorted(p.relative_to(installed) for p in installed.glob(pattern))
        assert got == shipped, pattern
    for name in ("cli.py", "errors.py", "data/__init__.py", "configs/tiny.yaml", "configs/offline.yaml",
                 "towers/model_configs/towerrec-vit-micro.json", "bin/towerrec"):
        assert (installed / name).is_file(), name
    assert not (installed / "tests").exists()  # the tests are not part of the package


def test_installed_copy_imports_and_loads_configs_from_elsewhere(installed: Path, tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, "-c", CHECK], cwd=tmp_path, env=_env(installed), capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    site = installed.resolve()
    for name, file in out["files"].items():
        assert Path(file).resolve().is_relative_to(site), (name, file)  # the installed copy, not the repo
        assert not Path(file).resolve().is_relative_to(REPO), (name, file)
    assert Path(out["config_dir"]).resolve() == site / "configs"
    assert out["tiny"] == {"name": "tiny", "dim": 32, "user": "random:tiny-decoder", "arch": "towerrec-vit-micro"}
    micro = json.loads((site / "towers/model_configs/towerrec-vit-micro.json").read_text())
    assert out["clip_width"] == micro["embed_dim"]


def test_towerrec_script_help_from_another_folder(installed: Path, tmp_path: Path) -> None:
    script = installed / "bin" / "towerrec"
    proc = subprocess.run([str(script), "--help"], cwd=tmp_path, env=_env(installed), capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.startswith("usage: towerrec")
    for command in ("prepare", "train", "build-index", "query", "evaluate"):
        assert command in proc.stdout, command
    bad = subprocess.run([str(script), "train", "--config", "no-such-setup", "--catalog", "x", "--run", "y"],
                         cwd=tmp_path, env=_env(installed), capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "no-such-setup" in bad.stderr and "Traceback" not in bad.stderr
    assert "tiny" in bad.stderr  # the valid setups are listed from the installed configs folder
