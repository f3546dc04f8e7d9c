"""`cli.py serve`: bad input is one line on stderr and exit code 2, before any slow work where possible."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

import cli
from serve.api import bind


def _serve(capsys, *args: str) -> tuple[int, str]:
    code = cli.main(["serve", *args])
    err = capsys.readouterr().err.strip()
    return code, err


def test_missing_run(capsys, tmp_path: Path) -> None:
    code, err = _serve(capsys, "--run", str(tmp_path / "nope"), "--port", "0")
    assert code == 2 and err.startswith("towerrec serve: error: ") and "run directory not found" in err
    assert "\n" not in err


def test_address_in_use(capsys, tmp_path: Path) -> None:
    taken = bind("127.0.0.1", 0)
    taken.listen()
    try:
        port = taken.getsockname()[1]
        code, err = _serve(capsys, "--run", str(tmp_path / "nope"), "--port", str(port))
    finally:
        taken.close()
    assert code == 2 and f"cannot listen on 127.0.0.1:{port}" in err and "\n" not in err


@pytest.mark.parametrize("port", ["-1", "70000"])
def test_bad_port(capsys, tmp_path: Path, port: str) -> None:
    code, err = _serve(capsys, "--run", str(tmp_path), "--port", port)
    assert code == 2 and "port must be 0..65535" in err


def test_run_without_index(capsys, tiny_run: Path, tmp_path: Path) -> None:
    run = Path(shutil.copytree(tiny_run, tmp_path / "run"))
    shutil.rmtree(run / "index")
    code, err = _serve(capsys, "--run", str(run), "--port", "0", "--device", "cpu")
    assert code == 2 and "no index built yet" in err
