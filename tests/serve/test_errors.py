"""Errors over HTTP: a bug is logged once (with its traceback) and answered with a bare JSON 500; ids that are
not canonical integers never crash the id lookups."""

from __future__ import annotations

import asyncio
import logging
import re

import pytest

from data.ids import id_forms
from serve.api import CatchBugs


def test_a_bug_is_logged_once(server, monkeypatch, caplog: pytest.LogCaptureFixture) -> None:
    """Under uvicorn, one ERROR record with the traceback, and the reference it holds is the one answered."""
    rec = server.live.current.rec

    def bug(*args, **kwargs):
        raise ZeroDivisionError("oops")

    monkeypatch.setattr(rec, "recommend", bug)
    monkeypatch.setattr(rec, "recommend_each", bug)  # the batched path
    caplog.set_level(logging.INFO)
    res = server.client.post("/recommend", json={"history": [rec.item_ids[0]], "rerank": False})
    assert res.status_code == 500
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1, [(r.name, r.getMessage()) for r in errors]
    ref = re.search(r"\(ref ([0-9a-f]{8})\)", res.json()["error"])
    assert ref and errors[0].name == "serve.api" and f"ref {ref[1]}" in errors[0].getMessage()
    assert errors[0].exc_info is not None and errors[0].exc_info[0] is ZeroDivisionError
    assert "oops" not in res.text and "ZeroDivisionError" not in res.text


def _run_asgi(app) -> list[dict]:
    """Call an ASGI app with one GET request; returns the messages it sent."""
    sent: list[dict] = []

    async def receive():
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message):
        sent.append(message)

    scope = {"type": "http", "method": "GET", "path": "/x", "headers": [], "query_string": b""}
    asyncio.run(app(scope, receive, send))
    return sent


@pytest.mark.parametrize("started", [False, True])
def test_catch_bugs_logs_once_and_never_raises(started: bool, caplog: pytest.LogCaptureFixture) -> None:
    """Before the answer starts, the bug becomes a JSON 500; after, it is only logged (no second answer)."""
    async def app(scope, receive, send):
        if started:
            await send({"type": "http.response.start", "status": 200, "headers": []})
        raise KeyError("internal detail")

    caplog.set_level(logging.INFO)
    sent = _run_asgi(CatchBugs(app))
    starts = [m for m in sent if m["type"] == "http.response.start"]
    assert [m["status"] for m in starts] == [200 if started else 500]
    body = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    assert (b"internal error (ref " in body) != started and b"internal detail" not in body
    records = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(records) == 1 and records[0].exc_info[0] is KeyError and "GET '/x'" in records[0].getMessage()


@pytest.mark.parametrize(("given", "forms"), [
    ("42", ["42", 42]), ("-7", ["-7", -7]), (" 5 ", [" 5 ", 5]), (42, [42, "42"]),
    ("042", ["042"]), ("4.0", ["4.0"]), ("--5", ["--5"]), ("-", ["-"]), ("", [""]),
    ("\u00b2", ["\u00b2"]),  # superscript two: str.isdigit() says yes, int() refuses it
    ("\u0661\u0662", ["\u0661\u0662"]),  # Arabic-Indic 12: not the catalog's "12"
    ("9" * 5000, ["9" * 5000]),  # past int()'s digit limit: a ValueError if parsed
])
def test_id_forms_never_raise(given, forms) -> None:
    assert id_forms(given) == forms


@pytest.mark.parametrize("path", [
    "/items/%C2%B2", "/items/--5", f"/items/{'9' * 5000}", "/items/%C2%B2/image", f"/items/{'1' * 5000}/image",
    "/users/%C2%B2/history", f"/users/{'9' * 5000}/history", "/similar?item_id=%C2%B2", "/similar?item_id=--5",
])
def test_odd_ids_in_paths_are_404(server, path: str) -> None:
    res = server.client.get(path)
    assert res.status_code == 404, res.text
    assert res.json()["status"] == 404 and "\n" not in res.json()["error"]


@pytest.mark.parametrize(("raw", "message"), [
    (b'{"history": [1], "k": ' + b"9" * 5000 + b"}", "malformed JSON body: a number with too many digits"),
    (b'{"history": ' + b"[" * 5000 + b"]" * 5000 + b"}", "malformed JSON body: arrays or objects nested too deeply"),
])
def test_undecodable_json_is_a_clear_400(server, raw: bytes, message: str) -> None:
    res = server.client.post("/recommend", content=raw, headers={"content-type": "application/json"})
    assert res.status_code == 400 and res.json() == {"error": message, "status": 400}


@pytest.mark.parametrize("field", ["\n", "a b\r\nc", "x" * 500])
def test_an_unknown_field_name_is_quoted_on_one_line(server, field: str) -> None:
    res = server.client.post("/recommend", json={"history": [1], field: 1})
    assert res.status_code == 422
    error = res.json()["error"]
    assert "\n" not in error and "\r" not in error and len(error) < 200, error
    assert "Extra inputs are not permitted" in error
