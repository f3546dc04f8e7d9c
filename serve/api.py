"""The HTTP API (FastAPI under uvicorn) over a run's live index, and the page at ``/`` that calls it.

Endpoints (JSON in and out; every error is a JSON body ``{"error": message, "status": code}``)::

    GET  /                          the page (self-contained HTML + JS, nothing from the network)
    GET  /health                    {"status": "ok", "version", "reload_error"}
    GET  /version                   live index version, run, item-tower fingerprint, manifest fields
    POST /recommend                 {"user_id" | "history", "k", "rerank", "exclude", "allow", "deny", "where",
                                     "explain"}
    GET  /similar?item_id=&k=&where=&allow=&deny=       items like an item
    POST /similar                   {"item_id", "k", "allow", "deny", "where"}
    GET  /users?offset=&limit=      known users and their history lengths
    GET  /users/{user_id}/history   a user's history (oldest first), with titles and image links
    DELETE /users/{user_id}         erase the user (serve --allow-forget only; 403 otherwise): serve.erasure
    GET  /items/{item_id}           an item's title and image link
    GET  /items/{item_id}/image     its poster, from the catalog folder (404 when it has none)

Status codes:

- 400: a query towerrec cannot answer (an unknown item in a history, a bad ``where``), or malformed JSON;
- 403: ``DELETE /users/{user_id}`` on a server started without ``--allow-forget``;
- 404: an unknown user or item, a route that does not exist, or an item without an image;
- 409: the served index cannot answer (a towerrec state error: index, checkpoint, model, device);
- 413: a body over ``max_body`` bytes (64 KiB);
- 415: a body that is not JSON;
- 422: a request that does not match the schema (``k`` outside 1..1000, a wrong type, an unknown field,
  neither or both of ``user_id`` and ``history``);
- 500: only a bug. It is logged once, at ERROR with its traceback and a short reference; the answer holds
  that reference and nothing else about the server (no exception text, type or path).
"""

from __future__ import annotations

import logging
import secrets
import socket
import time
from collections.abc import Callable
from contextlib import asynccontextmanager
from dataclasses import asdict
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import quote

from fastapi import FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse
from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, StringConstraints, model_validator
from starlette.exceptions import HTTPException

from data.ids import id_forms
from errors import CatalogError, ConfigError, MediaError, QueryError, TowerrecError
from index.recommender import MAX_K
from serve.batching import MAX_BATCH, MAX_ITEMS, MAX_WAIT_MS, Batcher
from serve.erasure import add_erasure
from serve.live import LiveRecommender, Served
from serve.media import CatalogMedia

logger = logging.getLogger(__name__)

MAX_BODY = 64 * 1024  # bytes; a longer request body is refused with 413
MAX_IDS = 10_000  # the longest history / allow / deny / exclude list
MAX_ID_CHARS = 256
MAX_WHERE_CHARS = 2000
MAX_USERS_PAGE = 10_000
PAGE = Path(__file__).with_name("page.html")

ItemId = StrictInt | Annotated[str, StringConstraints(strict=True, min_length=1, max_length=MAX_ID_CHARS)]
IdList = Annotated[list[ItemId], Field(max_length=MAX_IDS)]
K = Annotated[StrictInt, Field(ge=1, le=MAX_K)]
Where = Annotated[str, StringConstraints(max_length=MAX_WHERE_CHARS)]


class ServeError(TowerrecError, OSError):
    """The server cannot start (e.g. the address is in use)."""


class RecommendRequest(BaseModel):
    """Body of ``POST /recommend``: a known user (``user_id``) or a new one (``history``, oldest first)."""

    model_config = ConfigDict(extra="forbid")
    user_id: ItemId | None = None
    history: IdList | None = None
    k: K = 10
    rerank: StrictBool | None = None  # None: the run's config (rerank.enabled)
    exclude: IdList | None = None  # more item ids never to return
    allow: IdList | None = None  # return only these item ids
    deny: IdList | None = None  # never return these item ids
    where: Where | None = None  # polars SQL over item columns, e.g. "year > 1990"
    explain: StrictBool = False  # a short reason per item, grounded in the history (an LM pass: slower)

    @model_validator(mode="after")
    def _one_user(self) -> RecommendRequest:
        if (self.user_id is None) == (self.history is None):
            raise ValueError("give exactly one of user_id (a known user) or history (item ids, oldest first)")
        return self


class SimilarRequest(BaseModel):
    """Body of ``POST /similar``."""

    model_config = ConfigDict(extra="forbid")
    item_id: ItemId
    k: K = 10
    allow: IdList | None = None
    deny: IdList | None = None
    where: Where | None = None


# --- errors -------------------------------------------------------------------------------------------------


def _error(status: int, message: str, **extra: Any) -> JSONResponse:
    return JSONResponse({"error": message, "status": status, **extra}, status_code=status)


def towerrec_status(err: TowerrecError) -> int:
    """The HTTP status of a towerrec error: the caller's query (400), a missing file (404), or the index (409)."""
    if isinstance(err, (QueryError, ConfigError, CatalogError)):
        return 400
    if isinstance(err, MediaError):
        return 404
    return 409  # IndexStateError, CheckpointError, ModelLoadError, DeviceError: the served state cannot answer


def towerrec_message(err: TowerrecError) -> str:
    """The error's message on one line (JSON bodies and log lines never hold a newline)."""
    return " ".join(str(err).split()) or type(err).__name__


_UNION_TAGS = ("int", "str", "constrained-str")  # pydantic's names for the branches of ``ItemId``


def _validation_message(errors: list[dict]) -> str:
    """One line from pydantic's errors: ``k: Input should be less than or equal to 1000``."""
    parts: list[str] = []
    for e in errors:
        # A field name comes from the caller: quoted (and cut short) unless it is a plain name, so the message
        # stays one line.
        loc = [str(x) if isinstance(x, int) or (str(x).isidentifier() and len(str(x)) <= 40) else repr(str(x)[:40])
               for x in e.get("loc", ()) if x not in ("body", "query", "path")]
        msg = str(e.get("msg", "invalid")).removeprefix("Value error, ")
        if e.get("type") == "json_invalid":
            loc, msg = [], f"{msg} at character {e['loc'][-1]}" if len(e.get("loc", ())) > 1 else msg
        elif loc and loc[-1] in _UNION_TAGS:  # an id that is neither an int nor a string: one line, not two
            loc, msg = loc[:-1], f"ids are integers or non-empty strings (up to {MAX_ID_CHARS} characters)"
        part = f"{'.'.join(loc)}: {msg}" if loc else msg
        if part not in parts:
            parts.append(part)
    more = f" (and {len(parts) - 3} more)" if len(parts) > 3 else ""
    return "; ".join(parts[:3]) + more


def undecodable_body_message(cause: BaseException) -> str:
    """What is wrong with a body that parses as JSON text but cannot be decoded into Python values."""
    if isinstance(cause, RecursionError):
        return "malformed JSON body: arrays or objects nested too deeply"
    if isinstance(cause, ValueError) and "digits" in str(cause):
        return "malformed JSON body: a number with too many digits"
    return "malformed request body: it cannot be decoded"


class CatchBugs:
    """ASGI middleware, outermost: an exception no handler turned into an answer is a bug, answered with a JSON 500.

    It is logged here once, with its traceback and a short reference that the answer quotes, and not raised
    on: Starlette's own last-resort handler re-raises what it catches so that the server logs it again, and
    answers in plain text. A response that had already started cannot be replaced; the bug is still logged
    once and the connection is left for the server to close.
    """

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = False

        async def tracked(message):
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, receive, tracked)
        except Exception:
            ref = secrets.token_hex(4)
            # %r: a path may hold a newline (%0A), which must not start a forged line in the log.
            logger.exception("%s %r failed (ref %s)", scope.get("method", "?"), scope.get("path", "?"), ref)
            if not started:
                await _error(500, f"internal error (ref {ref}); see the server log")(scope, receive, send)


class BodySizeLimit:
    """ASGI middleware: a request body over ``max_bytes`` is refused with 413 before any handler reads it.

    A declared ``Content-Length`` is checked up front; a chunked body is counted as it arrives and buffered
    (at most ``max_bytes``), then handed on.
    """

    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or ())
        declared = headers.get(b"content-length")
        if declared is not None:
            if not declared.isdigit():
                return await self._refuse(scope, receive, send, 400, "Content-Length is not a number")
            if int(declared) > self.max_bytes:
                return await self._too_large(scope, receive, send)
            return await self.app(scope, receive, send)
        if headers.get(b"transfer-encoding") is None:
            return await self.app(scope, receive, send)  # no body
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            size += len(message.get("body", b""))
            if size > self.max_bytes:
                return await self._too_large(scope, receive, send)
            chunks.append(message.get("body", b""))
            if not message.get("more_body", False):
                break
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": b"".join(chunks), "more_body": False}
            return await receive()

        return await self.app(scope, replay, send)

    async def _too_large(self, scope, receive, send):
        await self._refuse(scope, receive, send, 413, f"request body over {self.max_bytes} bytes")

    async def _refuse(self, scope, receive, send, status: int, message: str):
        await _error(status, message)(scope, receive, send)


# --- answers ------------------------------------------------------------------------------------------------


class AnnounceRecommend:
    """ASGI middleware: a ``POST /recommend`` is announced to the batcher as soon as it arrives, before its body is
    read, so that a batch being gathered waits for it (:meth:`serve.batching.Batcher.coming`)."""

    def __init__(self, app, batcher: Batcher):
        self.app, self.batcher = app, batcher

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope.get("method") != "POST" or scope.get("path") != "/recommend":
            return await self.app(scope, receive, send)
        with self.batcher.coming() as ticket:
            scope.setdefault("state", {})["batch_ticket"] = ticket
            await self.app(scope, receive, send)


class Api:
    """The handlers' shared state: the live recommender, the catalog media and the batcher (None: each request
    is answered on its own, under its version's lock)."""

    def __init__(self, live: LiveRecommender, media: CatalogMedia, batcher: Batcher | None = None):
        self.live, self.media, self.batcher = live, media, batcher

    def image_url(self, item_id) -> str | None:
        return f"/items/{quote(str(item_id), safe='')}/image" if self.media.has_image(item_id) else None

    def item(self, served: Served, item_id) -> dict:
        """``{item_id, title, image}`` of one item (its title from the index version, else the catalog)."""
        rec = served.rec
        for form in id_forms(item_id):
            if form in rec.index_items:
                return {"item_id": form, "title": rec.titles[rec.index_items.row(form)],
                        "image": self.image_url(form)}
        key = self.media.key(item_id)
        if key is None:
            raise HTTPException(404, f"unknown item_id {item_id!r}: not in index {served.name} nor the catalog")
        return {"item_id": key, "title": self.media.titles.get(key) or "", "image": self.image_url(key)}

    def result(self, result) -> JSONResponse:
        """A :class:`Results` as JSON: its version, its latency and its items with their image links."""
        items = [{**asdict(r), "image": self.image_url(r.item_id)} for r in result]
        return JSONResponse({"version": result.version, "latency_ms": round(result.latency_ms, 3), "items": items})

    def user_key(self, served: Served, user_id):
        """The stored form of a known user id; 404 for an unknown one."""
        for form in id_forms(user_id):
            if form in served.rec.histories:
                return form
        raise HTTPException(404, f"unknown user_id {user_id!r}; pass history=[item ids] for a new user")

    def recommend(self, req: RecommendRequest, ticket=None) -> JSONResponse:
        served = self.live.current  # this request's version, to the end
        user = self.user_key(served, req.user_id) if req.user_id is not None else None
        call = {"user_id": user, "history": req.history, "k": req.k, "rerank": req.rerank, "exclude": req.exclude,
                "allow": req.allow, "deny": req.deny, "where": req.where, "explain": req.explain}
        if self.batcher is not None:
            items = len(req.history) if req.history is not None else len(served.rec.histories[user])
            return self.result(self.batcher.submit(served, call, items, ticket))
        with served.lock:
            result = served.rec.recommend(**call)
        return self.result(result)

    def similar(self, item_id, k: int, allow, deny, where) -> JSONResponse:
        served = self.live.current
        if not any(form in served.rec.index_items for form in id_forms(item_id)):
            raise HTTPException(404, f"unknown item_id {item_id!r}: not in index {served.name}")
        with served.lock:
            result = served.rec.similar(item_id, k=k, allow=allow, deny=deny, where=where)
        return self.result(result)


def create_app(live: LiveRecommender, media: CatalogMedia, max_body: int = MAX_BODY, watch: bool = True,
               on_ready: Callable[[], None] | None = None, batcher: Batcher | None = None,
               allow_forget: bool = False) -> FastAPI:
    """The FastAPI app over ``live``; ``watch`` starts its LIVE watcher with the app and stops it after.

    ``on_ready`` is called once the app has started (the CLI prints its address then). ``batcher``: answer
    ``POST /recommend`` in dynamic batches (:mod:`serve.batching`); None answers each request on its own.
    ``allow_forget``: ``DELETE /users/{user_id}`` erases the user (:mod:`serve.erasure`).
    """
    api = Api(live, media, batcher)
    page = PAGE.read_text(encoding="utf-8")

    @asynccontextmanager
    async def lifespan(_app: FastAPI):
        if watch:
            live.start()
        if batcher is not None:
            batcher.start()
        if on_ready is not None:
            on_ready()
        try:
            yield
        finally:
            live.stop()
            if batcher is not None:
                batcher.stop()

    # No /docs: Swagger UI loads from a CDN, and nothing here may need the network. /openapi.json stays.
    app = FastAPI(title="towerrec", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.add_middleware(BodySizeLimit, max_bytes=max_body)
    if batcher is not None:
        app.add_middleware(AnnounceRecommend, batcher=batcher)
    app.add_middleware(CatchBugs)  # added last: the outermost, so it also sees BodySizeLimit's failures

    @app.exception_handler(TowerrecError)
    async def _towerrec(_request: Request, err: TowerrecError):
        return _error(towerrec_status(err), towerrec_message(err))

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, err: RequestValidationError):
        errors = err.errors()
        detail = [{"loc": list(e.get("loc", ())), "msg": str(e.get("msg", "")), "type": e.get("type", "")}
                  for e in errors]
        kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if request.method == "POST" and kind not in ("", "application/json") and not kind.endswith("+json"):
            return _error(415, f"send the body as JSON (Content-Type: application/json), not {kind}")
        if any(e["type"] == "json_invalid" for e in detail):
            return _error(400, "malformed JSON body: " + _validation_message(errors), detail=detail)
        return _error(422, _validation_message(errors), detail=detail)

    @app.exception_handler(HTTPException)
    async def _http(_request: Request, err: HTTPException):
        if err.status_code == 400 and err.__cause__ is not None:  # FastAPI could not decode the body
            return _error(400, undecodable_body_message(err.__cause__))
        return _error(err.status_code, str(err.detail))

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    def index_page():
        return HTMLResponse(page)

    @app.get("/health")
    def health():
        served = live.current
        return {"status": "ok", "version": served.name, "reload_error": live.reload_error}

    @app.get("/version")
    def version():
        served = live.current
        m = served.manifest
        return {"version": served.name, "run": str(live.run.path), "fingerprint": m.fingerprint, "dim": m.dim,
                "metric": m.metric, "count": m.count, "factory": m.factory, "created": m.created,
                "catalog_sha256": m.catalog_sha256,
                "loaded_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(served.loaded_at)),
                "rerank_default": bool(served.rec.config.rerank.enabled)}

    @app.post("/recommend")
    def recommend(req: RecommendRequest, request: Request):
        return api.recommend(req, getattr(request.state, "batch_ticket", None))

    @app.get("/similar")
    def similar_get(item_id: Annotated[str, Query(min_length=1, max_length=MAX_ID_CHARS)],
                    k: Annotated[int, Query(ge=1, le=MAX_K)] = 10,
                    where: Annotated[str | None, Query(max_length=MAX_WHERE_CHARS)] = None,
                    allow: Annotated[list[str] | None, Query(max_length=MAX_IDS)] = None,
                    deny: Annotated[list[str] | None, Query(max_length=MAX_IDS)] = None):
        return api.similar(item_id, k, allow, deny, where)

    @app.post("/similar")
    def similar_post(req: SimilarRequest):
        return api.similar(req.item_id, req.k, req.allow, req.deny, req.where)

    @app.get("/users")
    def users(offset: Annotated[int, Query(ge=0)] = 0,
              limit: Annotated[int, Query(ge=1, le=MAX_USERS_PAGE)] = 100):
        served = live.current
        hist = served.rec.histories
        page_ids = served.users[offset:offset + limit]
        return {"total": len(served.users), "offset": offset,
                "users": [{"user_id": u, "history_length": len(hist[u])} for u in page_ids]}

    @app.get("/users/{user_id:path}/history")
    def user_history(user_id: str):
        served = live.current
        user = api.user_key(served, user_id)
        return {"user_id": user, "version": served.name,
                "items": [api.item(served, i) for i in served.rec.histories[user]]}

    add_erasure(app, live, api.user_key, allow_forget)

    @app.get("/items/{item_id:path}/image")
    def item_image(item_id: str):
        path = media.image_file(item_id)
        if path is None:
            raise HTTPException(404, f"item {item_id!r} has no image")
        return FileResponse(path, headers={"Cache-Control": "max-age=3600"})

    @app.get("/items/{item_id:path}")
    def item(item_id: str):
        return api.item(live.current, item_id)

    return app


def bind(host: str, port: int) -> socket.socket:
    """A listening-ready TCP socket on ``host:port`` (port 0: any free port), or a one-line :class:`ServeError`."""
    if not 0 <= port <= 65535:
        raise ServeError(f"port must be 0..65535, got {port}")
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        sock = socket.socket(family, kind, proto)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
    except OSError as err:
        raise ServeError(f"cannot listen on {host}:{port} ({err.strerror or err})") from None
    sock.set_inheritable(True)
    return sock


def serve(run_dir: str | Path, host: str = "127.0.0.1", port: int = 8000, device: str = "auto",
          catalog_dir: str | Path | None = None, poll_s: float = 1.0, access_log: bool = False,
          on_ready: Callable[[str], None] | None = None, batch_size: int = MAX_BATCH,
          batch_wait_ms: float = MAX_WAIT_MS, batch_items: int = MAX_ITEMS, allow_forget: bool = False) -> None:
    """Serve ``run_dir``'s live index over HTTP until interrupted, reloading when a new version goes live.

    Args:
        run_dir: a trained run with a built index.
        host, port: address to listen on (127.0.0.1: this machine only; port 0 picks a free port).
        device: towers' device (auto, cpu, cuda, cuda:N).
        catalog_dir: catalog whose posters the page shows (default: the one the run was trained on).
        poll_s: how often the ``index/LIVE`` pointer is read (0: never reload).
        access_log: log one line per request (INFO, logger ``uvicorn.access``).
        on_ready: called with the base URL once the server is up.
        batch_size, batch_wait_ms, batch_items: dynamic batching of ``POST /recommend`` (:mod:`serve.batching`):
            at most this many requests per batch, gathered for at most this long, holding at most this many
            history items. ``batch_size=1`` answers one request at a time.
        allow_forget: enable ``DELETE /users/{user_id}`` (erasure; off by default).
    """
    import uvicorn

    batcher = Batcher(batch_size, batch_wait_ms, batch_items)  # bad settings fail before anything is loaded
    sock = bind(host, port)  # before the slow load: an address in use fails at once
    try:
        live = LiveRecommender(run_dir, device=device, poll_s=poll_s)
        media = CatalogMedia.for_run(run_dir, catalog_dir)
        bound = sock.getsockname()
        shown = f"[{bound[0]}]" if sock.family == socket.AF_INET6 else bound[0]
        url = f"http://{shown}:{bound[1]}"
        app = create_app(live, media, on_ready=None if on_ready is None else (lambda: on_ready(url)),
                         batcher=batcher, allow_forget=allow_forget)
        # log_config=None: uvicorn's loggers go through the caller's logging set-up (the CLI's).
        config = uvicorn.Config(app, log_config=None, access_log=access_log, workers=1)
        uvicorn.Server(config).run(sockets=[sock])
    finally:
        sock.close()
