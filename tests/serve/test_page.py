"""The page at ``/``, end to end: `cli.py serve` in a subprocess, driven by headless Chromium through Playwright.

Clicks a user and checks that the history and the top-k shown are exactly the API's (rerank on, then off),
types a history for a new user, and saves a screenshot to ``tests/artifacts/serve_page.png`` (or
``$TOWERREC_TEST_ARTIFACTS``).
"""

from __future__ import annotations

import os
import queue
import re
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

REPO = Path(__file__).resolve().parents[2]
CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
ARTIFACTS = Path(os.environ.get("TOWERREC_TEST_ARTIFACTS", REPO / "tests" / "artifacts"))

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not CHROMIUM.is_file(), reason=f"{CHROMIUM} not found: apt-get install -y chromium "
                                                      "(.ci/run installs it)"),
]


@pytest.fixture(scope="module")
def cli_server(tiny_run: Path) -> Iterator[str]:
    """``cli.py serve`` on a free port (port 0; the address is read from its first line of output)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        [sys.executable, str(REPO / "cli.py"), "serve", "--run", str(tiny_run), "--port", "0", "--device", "cpu",
         "--poll", "0"], cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line) for line in proc.stdout], daemon=True).start()
    seen = []
    try:
        while True:
            try:
                line = lines.get(timeout=180)
            except queue.Empty:
                pytest.fail("cli.py serve printed nothing for 180 s:\n" + "".join(seen))
            seen.append(line)
            found = re.search(r" on (http://\S+) ", line)
            if found:
                break
            if proc.poll() is not None:
                pytest.fail("cli.py serve exited:\n" + "".join(seen))
        yield found.group(1)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _shown(page, selector: str) -> list[str]:
    return page.eval_on_selector_all(selector, "els => els.map(e => e.dataset.itemId)")


def _answered(page, action) -> None:
    """Do ``action`` and wait until the page has shown the answer it asked for (or its error)."""
    before = int(page.evaluate("document.body.dataset.answers || '0'"))
    action()
    page.wait_for_function(f"Number(document.body.dataset.answers || '0') > {before}")


def test_page_shows_the_apis_items(cli_server: str) -> None:
    from playwright.sync_api import expect, sync_playwright

    api = httpx.Client(base_url=cli_server, timeout=120)
    users = api.get("/users", params={"limit": 1000}).json()["users"]
    user = max(users, key=lambda u: u["history_length"])["user_id"]
    history = api.get(f"/users/{user}/history").json()["items"]

    def top(**query) -> list[str]:
        body = api.post("/recommend", json={"k": 10, **query}).json()
        return [str(r["item_id"]) for r in body["items"]]

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.set_default_timeout(120_000)
            errors: list[str] = []
            page.on("pageerror", lambda err: errors.append(str(err)))
            page.goto(cli_server + "/")
            page.wait_for_selector("body[data-ready='1']")
            assert page.locator("button.user").count() == len(users)
            expect(page.locator("#rerank")).to_be_checked()  # the tiny config reranks by default

            _answered(page, lambda: page.click(f"button.user[data-user-id='{user}']"))
            expect(page.locator("#meta")).to_contain_text("rerank on")
            assert _shown(page, "#history .card") == [str(i["item_id"]) for i in history[-50:]]
            assert _shown(page, "#results .card") == top(user_id=user, rerank=True)
            # Posters: every item with an image link shows a loaded image, the others a placeholder.
            with_image = sum(1 for i in history[-50:] if i["image"])
            assert page.locator("#history img.poster").count() == with_image
            assert page.locator("#history .placeholder").count() == len(history[-50:]) - with_image > 0
            page.wait_for_function("[...document.querySelectorAll('#results img')].every(i => i.complete)")
            assert page.eval_on_selector_all("#results img", "els => els.every(i => i.naturalWidth > 0)")
            assert page.locator("#results .card").first.inner_text().count("LLM") == 1
            ARTIFACTS.mkdir(parents=True, exist_ok=True)
            shot = ARTIFACTS / "serve_page.png"
            page.screenshot(path=str(shot))
            print(f"screenshot: {shot}")
            assert shot.stat().st_size > 10_000

            _answered(page, lambda: page.uncheck("#rerank"))
            expect(page.locator("#meta")).to_contain_text("rerank off")
            assert _shown(page, "#results .card") == top(user_id=user, rerank=False)

            # A new user: a typed history, shown with its titles, and its top-k.
            typed = [i["item_id"] for i in history[:3]]
            page.fill("#new-history", ", ".join(map(str, typed)))
            _answered(page, lambda: page.click("#new-go"))
            expect(page.locator("#history-note")).to_contain_text("new user")
            assert _shown(page, "#history .card") == [str(i) for i in typed]
            assert _shown(page, "#results .card") == top(history=typed, rerank=False)

            # An error from the API is shown, not swallowed.
            page.fill("#new-history", "999999")
            _answered(page, lambda: page.click("#new-go"))
            expect(page.locator("#error")).to_contain_text("unknown item_id")
            assert errors == []
        finally:
            browser.close()
