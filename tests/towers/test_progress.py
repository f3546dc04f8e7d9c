"""Progress bars go to stderr, only when stderr is a terminal, and never when disabled (--quiet, --json)."""

from __future__ import annotations

import io
import re
import sys
from pathlib import Path

import pytest

from towers import progress


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def _run(total: int = 3, **kwargs) -> None:
    for _ in progress.tqdm(range(total), desc="work", mininterval=0, **kwargs):
        pass


def test_bars_are_drawn_on_a_terminal_stderr_only(monkeypatch: pytest.MonkeyPatch) -> None:
    terminal, stdout = _Terminal(), io.StringIO()
    monkeypatch.setattr(sys, "stdout", stdout)
    monkeypatch.setattr(sys, "stderr", terminal)
    assert progress.show_progress()
    _run()
    assert "work" in terminal.getvalue() and "3/3" in terminal.getvalue()
    assert stdout.getvalue() == ""

    terminal.seek(0)
    terminal.truncate()
    _run(disable=True)  # --quiet or --json
    assert terminal.getvalue() == ""

    piped = io.StringIO()  # a pipe or a log file
    monkeypatch.setattr(sys, "stderr", piped)
    assert not progress.show_progress()
    _run()
    assert piped.getvalue() == ""


def test_no_module_draws_bars_its_own_way() -> None:
    """Every progress bar in the package goes through towers.progress (one rule for all of them)."""
    repo = Path(__file__).resolve().parents[2]
    own = [p for d in ("cli.py", "configs", "data", "index", "serve", "towers", "train") for p in
           ([repo / d] if d.endswith(".py") else sorted((repo / d).rglob("*.py")))]
    direct = [str(p.relative_to(repo)) for p in own if p.name != "progress.py" and
              re.search(r"^\s*(from tqdm|import tqdm)\b", p.read_text(), re.MULTILINE)]
    assert direct == []


def _train_on_a_terminal(monkeypatch: pytest.MonkeyPatch, catalog: Path, run: Path, *flags: str) -> tuple[str, str]:
    """Run `train` in this process with stderr a terminal: ``(stdout, what the terminal showed)``."""
    import cli

    terminal, stdout = _Terminal(), io.StringIO()
    with monkeypatch.context() as m:
        m.setattr(sys, "stdout", stdout)
        m.setattr(sys, "stderr", terminal)
        code = cli.main(["train", "--config", "tiny", "--set", "train.epochs=1", "--catalog", str(catalog),
                         "--run", str(run), *flags])
    assert code == 0, terminal.getvalue()[-2000:]
    return stdout.getvalue(), terminal.getvalue()


def test_cli_train_bars_go_to_the_terminal_and_never_under_json(tiny_catalog: Path, tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    out, shown = _train_on_a_terminal(monkeypatch, tiny_catalog, tmp_path / "a")
    assert out.startswith("trained ") and out.count("\n") == 1  # the summary alone on stdout
    assert "epoch 0" in shown  # the training loop's bar, on the terminal
    out, shown = _train_on_a_terminal(monkeypatch, tiny_catalog, tmp_path / "b", "--json")
    assert out.count("\n") == 1 and out.startswith('{"run": ')
    assert "epoch 0" not in shown and "it/s" not in shown, shown[-2000:]
