"""Fuzzing the HTTP API with hypothesis: no body, query string or path is ever answered with a 500.

Every endpoint gets random JSON (wrong types, huge and negative numbers, nested junk, unknown fields, strings
where lists go, unicode, long strings, long lists, nulls), malformed bytes under several content types, and
random query strings and path segments. ``where`` gets SQL that tries to read files (``read_csv`` subqueries
and the like): that is always a 4xx whose body holds no line of ``/etc/passwd``. Every answer must keep the
API's contract: below 500, and every 4xx is ``{"error": one line, "status": code}`` as JSON.

The runs are derandomized (the same examples on every run) and sized to take a few seconds each.
"""

from __future__ import annotations

import json
from pathlib import Path
from urllib.parse import quote

import pytest
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from index.recommender import MAX_K
from serve.api import MAX_BODY, MAX_IDS, create_app
from serve.live import LiveRecommender
from serve.media import CatalogMedia

FUZZ = settings(max_examples=60, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much])

PASSWD = Path("/etc/passwd")
# Lines long enough not to turn up by chance in an answer (a line such as "x" would).
PASSWD_LINES = [ln for ln in PASSWD.read_text(errors="replace").splitlines() if len(ln) >= 12] \
    if PASSWD.is_file() else []

# --- the served run, and what an answer must look like ---------------------------------------------------------


@pytest.fixture(scope="module")
def fuzz_client(tiny_run: Path):
    """An in-process client over the tiny run (no watcher). Server errors come back as responses, not raises."""
    live = LiveRecommender(tiny_run, device="cpu", poll_s=0)
    app = create_app(live, CatalogMedia.for_run(tiny_run), watch=False)
    with TestClient(app, raise_server_exceptions=False) as client:
        client.typed = typed_bodies(tuple(live.current.users), tuple(live.current.rec.item_ids))
        yield client


def check(res) -> None:
    """Below 500; a 4xx is the API's one-line JSON error; nothing of /etc/passwd in any answer."""
    what = f"{res.request.method} {str(res.request.url)[:200]}"
    assert res.status_code < 500, (what, res.status_code, res.text[:500])
    if res.status_code >= 400:
        assert res.headers["content-type"] == "application/json", (what, res.headers["content-type"])
        body = res.json()
        assert isinstance(body, dict) and body.get("status") == res.status_code, (what, body)
        assert isinstance(body.get("error"), str) and body["error"].strip(), (what, body)
        assert "\n" not in body["error"], (what, body)
    text = res.content.decode("utf-8", errors="replace")
    leaked = [ln for ln in PASSWD_LINES if ln in text]
    assert not leaked, (what, leaked[:1])


# --- strategies ---------------------------------------------------------------------------------------------------

ITEMS = [1, 50, 100, 181, 258]  # ids the tiny catalog always holds (tests/synthetic.py ANCHOR_IDS)
ODD_STRINGS = ["", " ", "1", "-1", "042", "4.0", "--5", "\u00b2", "\u0661\u0662", "1e3", "0x10", "null", "[1, 2]",
               "\x00", "\U0001f4a5", "\u202e", "../../etc/passwd", "%2e%2e%2f", "x" * 257, "9" * 5000,
               "\ud800"]  # the last: a lone surrogate, which UTF-8 cannot encode
HUGE_INTS = [0, -1, 2**31, 2**63 - 1, 2**63, -(2**63) - 1, 2**64, 10**30, -(10**30)]

scalars = (st.none() | st.booleans() | st.integers() | st.sampled_from(HUGE_INTS)
           | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=40) | st.sampled_from(ODD_STRINGS))
junk = st.recursive(scalars, lambda inner: st.lists(inner, max_size=4)
                    | st.dictionaries(st.text(max_size=8), inner, max_size=4), max_leaves=12)
ids = (st.sampled_from(ITEMS) | st.sampled_from(ITEMS).map(str) | st.sampled_from(HUGE_INTS)
       | st.sampled_from(ODD_STRINGS) | st.text(max_size=12))
id_lists = (st.lists(ids, max_size=6) | st.just(list(range(MAX_IDS + 1))) | st.just([[1, 2]]) | st.just("1,2")
            | st.just([None]) | st.just([1.5]))
# k: small valid values (a valid k over 5 with rerank would make the run slow, not more thorough) or invalid.
ks = (st.integers(1, 5) | st.sampled_from([0, -1, MAX_K + 1, 2**63, -(10**30), 2.5, "10", None, True, [], {}])
      | junk.filter(lambda v: not (isinstance(v, int) and 5 < v <= MAX_K)))

# SQL that tries to read a file, one way or another: always refused (4xx), never a row of the file.
READS_FILES = [
    "item_id IN (SELECT * FROM read_csv('/etc/passwd'))",
    "title = (SELECT column_1 FROM read_csv('/etc/passwd') LIMIT 1)",
    "title IN (SELECT * FROM read_csv('/etc/passwd', has_header => false, separator => ':'))",
    "EXISTS (SELECT 1 FROM read_csv('/etc/passwd'))",
    "read_csv('/etc/passwd') IS NOT NULL",
    "title LIKE (SELECT column_1 FROM read_parquet('/etc/passwd'))",
    "title = (SELECT * FROM read_ndjson('/etc/passwd'))",
    "title = 'a' UNION SELECT * FROM read_csv('/etc/passwd')",
    "1 = 1; SELECT * FROM read_csv('/etc/passwd')",
    "CAST((SELECT * FROM read_csv('/etc/passwd')) AS INT) > 0",
    "title = (SELECT title FROM read_csv('/etc/passwd') AS t WHERE t.title = title)",
    "item_id IN (SELECT item_id FROM items)",
    "pg_read_file('/etc/passwd') IS NOT NULL",
    "title = (SELECT * FROM scan_csv('/etc/passwd'))",
]
ODD_WHERE = ["", " ", "year >", "year > 1990 AND", "(((((((((((year > 1)))))))))))", "(" * 500 + "1" + ")" * 500,
             "title > 0", "year / 0 > 1", "year > 1e400", "year > 99999999999999999999999", "-- year > 1",
             "/* c */ year > 1", "'; DROP TABLE items; --", "title = '\x00'", "title = '\ud800'", "decade > 1",
             "year", "NULL", "title LIKE '%(199%'", "year BETWEEN 1990 AND 1995", "a" * 2001, "year = year = year"]
COLUMNS = ["item_id", "title", "year", "text", "image_path", "nope", '"title"', "*"]
OPERATORS = ["=", "<>", "<", ">=", "LIKE", "IN", "IS", "BETWEEN", "||", "+", "~", "::"]
LITERALS = ["1", "-1", "'x'", "NULL", "TRUE", "(1, 2)", "1 AND 2", "1e309", "'%'", "('a')"]
wheres = (st.sampled_from(READS_FILES) | st.sampled_from(ODD_WHERE) | st.text(max_size=60)
          | st.builds(" ".join, st.lists(st.sampled_from(COLUMNS + OPERATORS + LITERALS), min_size=1, max_size=7)))


def optional_body(fields: dict) -> st.SearchStrategy:
    """A JSON object with any subset of ``fields`` (each a valid-ish strategy or junk) and maybe unknown keys."""
    known = st.fixed_dictionaries({}, optional={k: v | junk for k, v in fields.items()})
    extra = st.dictionaries(st.text(max_size=10), junk, max_size=2)
    return st.builds(lambda a, b: {**b, **a}, known, extra)


def typed_bodies(users: tuple, items: tuple) -> tuple[st.SearchStrategy, st.SearchStrategy]:
    """``(recommend, similar)`` bodies the schema accepts (ids of the right types, k in range, no unknown keys),
    so the query reaches the recommender, its filters and ``where``: mostly the run's own users and items."""
    typed_ids = (st.sampled_from(items) | st.sampled_from(items).map(str) | st.integers(-3, 2000)
                 | st.sampled_from(HUGE_INTS) | st.sampled_from([s for s in ODD_STRINGS if 0 < len(s) <= 256])
                 | st.text(min_size=1, max_size=12))
    typed_lists = st.lists(st.sampled_from(items), min_size=1, max_size=5) | st.lists(typed_ids, max_size=5)
    filters = {"k": st.integers(1, 5), "allow": typed_lists, "deny": typed_lists,
               "where": wheres.filter(lambda w: len(w) <= 2000)}
    more = {**filters, "rerank": st.booleans(), "exclude": typed_lists}
    recommend = (st.fixed_dictionaries({"history": typed_lists}, optional=more)
                 | st.fixed_dictionaries({"user_id": st.sampled_from(users) | typed_ids}, optional=more))
    return recommend, st.fixed_dictionaries({"item_id": typed_ids}, optional=filters)


# explain is always false or invalid: explain=true is an LM pass (~0.5 s), covered by the API tests.
loose_recommend = optional_body({
    "user_id": ids, "history": id_lists, "k": ks, "rerank": st.booleans(), "exclude": id_lists,
    "allow": id_lists, "deny": id_lists, "where": wheres,
}).map(lambda b: b if b.get("explain") is not True else {**b, "explain": "yes"}) | junk
loose_similar = optional_body({"item_id": ids, "k": ks, "allow": id_lists, "deny": id_lists, "where": wheres}) | junk


def post_json(client, path: str, body):
    """POST ``body`` as JSON (NaN and Infinity written as Python's json does; a lone surrogate stays escaped)."""
    return client.post(path, content=json.dumps(body).encode(), headers={"content-type": "application/json"})


# --- JSON bodies ---------------------------------------------------------------------------------------------------


@settings(FUZZ, max_examples=100)
@given(data=st.data())
def test_recommend_bodies(fuzz_client, data) -> None:
    body = data.draw(fuzz_client.typed[0] | loose_recommend, label="body")
    check(post_json(fuzz_client, "/recommend", body))


@settings(FUZZ, max_examples=100)
@given(data=st.data())
def test_similar_bodies(fuzz_client, data) -> None:
    body = data.draw(fuzz_client.typed[1] | loose_similar, label="body")
    check(post_json(fuzz_client, "/similar", body))


@settings(FUZZ, max_examples=40)
@given(where=wheres, path=st.sampled_from(["/recommend", "/similar"]), item=st.sampled_from(ITEMS))
def test_where_never_reads_files(fuzz_client, where: str, path: str, item: int) -> None:
    """A ``where`` is at worst a 4xx; one that tries to read a file is always refused."""
    body = {"history": [item], "k": 3, "rerank": False} if path == "/recommend" else {"item_id": item, "k": 3}
    res = post_json(fuzz_client, path, {**body, "where": where})
    check(res)
    if where in READS_FILES:
        assert 400 <= res.status_code < 500, (where, res.status_code, res.text[:300])
    get = fuzz_client.get("/similar", params={"item_id": str(item), "k": "3", "where": where})
    check(get)
    if where in READS_FILES:
        assert 400 <= get.status_code < 500, (where, get.status_code, get.text[:300])


@pytest.mark.parametrize("where", READS_FILES)
def test_each_file_reading_where_is_refused(fuzz_client, where: str) -> None:
    """Every file-reading ``where``, on every endpoint that takes one (not left to hypothesis' sampling)."""
    for res in (post_json(fuzz_client, "/recommend", {"history": [ITEMS[1]], "k": 3, "rerank": False, "where": where}),
                post_json(fuzz_client, "/similar", {"item_id": ITEMS[1], "k": 3, "where": where}),
                fuzz_client.get("/similar", params={"item_id": str(ITEMS[1]), "where": where})):
        check(res)
        assert 400 <= res.status_code < 500, (where, res.status_code, res.text[:300])


@pytest.mark.parametrize("odd", ODD_STRINGS + HUGE_INTS, ids=repr)
def test_odd_ids_everywhere(fuzz_client, odd) -> None:
    """Each odd id in every place an id goes (random draws may miss a single string such as "\u00b2")."""
    item = ITEMS[1]
    text = quote(str(odd), safe="", errors="surrogatepass")
    for res in (*(post_json(fuzz_client, "/recommend", body) for body in (
                    {"user_id": odd}, {"history": [odd]}, {"history": [item, odd], "k": 2, "rerank": False},
                    *({"history": [item], "k": 2, "rerank": False, key: [odd]} for key in ("allow", "deny", "exclude")))),
                post_json(fuzz_client, "/similar", {"item_id": odd, "k": 2}),
                post_json(fuzz_client, "/similar", {"item_id": item, "k": 2, "allow": [odd]}),
                fuzz_client.get(f"/similar?item_id={text}&k=2"),  # quoted here: a lone surrogate is not UTF-8
                fuzz_client.get(f"/similar?item_id={item}&deny={text}"),
                fuzz_client.get(f"/items/{text}"), fuzz_client.get(f"/items/{text}/image"),
                fuzz_client.get(f"/users/{text}/history")):
        check(res)


# --- malformed bytes -----------------------------------------------------------------------------------------------

RAW_BODIES = [
    b"", b"{", b"}", b"[", b"null", b"0", b'"x"', b"{}" * 100, b"[" * 5000 + b"]" * 5000, b'{"history": [' * 3000,
    b'{"history": [1], "k": ' + b"9" * 5000 + b"}", b'{"history": [1], "k": NaN}', b'{"history": [1], "k": -Infinity}',
    b'{"history": [1], "k": 1e999}', b'{"user_id": "\\ud800"}', b'{"\\ud800": 1, "history": [1]}',
    b'{"history": ["\\udfff"], "k": 2}', b'{"history": [1], "history": [2], "k": 2}', b"\xef\xbb\xbf{}",
    b"\xff\xfe{\x00}\x00", b'{"history": [1], "where": "\\u0000"}', b'{"user_id": 1,', b"\x00" * 64,
    b'{"history": [1]}' + b" " * (MAX_BODY + 1),
]
CONTENT_TYPES = ["application/json", "application/json; charset=latin-1", "application/vnd.api+json", "text/plain",
                 "application/x-www-form-urlencoded", "multipart/form-data", "", "*/*", "application/json\x7f"]


@FUZZ
@given(raw=st.sampled_from(RAW_BODIES) | st.binary(max_size=300)
       | st.builds(lambda b, n: b[:n], st.sampled_from(RAW_BODIES[10:]), st.integers(0, 60)),
       path=st.sampled_from(["/recommend", "/similar", "/health", "/users"]),
       kind=st.sampled_from(CONTENT_TYPES))
def test_malformed_bytes(fuzz_client, raw: bytes, path: str, kind: str) -> None:
    headers = {"content-type": kind} if kind else {}
    check(fuzz_client.post(path, content=raw, headers=headers))


# --- query strings, path segments and methods ----------------------------------------------------------------------

segments = ids.map(str) | st.text(max_size=30) | st.sampled_from(["..", "%2e%2e", "a/b", "", "~root", "1/image"])
query_values = (st.text(max_size=30) | st.sampled_from(ODD_STRINGS) | st.sampled_from(READS_FILES)
                | st.integers().map(str) | st.sampled_from(["-1", "0", "1", "10000", "10001", "1e3", "true", ""]))
query_keys = st.sampled_from(["item_id", "k", "where", "allow", "deny", "offset", "limit", "user_id", "x", ""])


@FUZZ
@given(route=st.sampled_from(["/similar", "/users", "/users/{}/history", "/items/{}", "/items/{}/image", "/health",
                              "/version", "/", "/{}"]),
       segment=segments, query=st.lists(st.tuples(query_keys, query_values), max_size=5))
def test_get_queries(fuzz_client, route: str, segment: str, query: list) -> None:
    path = route.format(quote(segment, safe="", errors="surrogatepass"))
    res = fuzz_client.get(path, params=query)
    check(res)


@settings(FUZZ, max_examples=30)
@given(method=st.sampled_from(["PUT", "DELETE", "PATCH", "OPTIONS", "GET", "POST", "HEAD"]),
       path=st.sampled_from(["/", "/recommend", "/similar", "/users", "/users/1/history", "/items/1", "/health",
                             "/version", "/openapi.json", "/docs", "/nope"]))
def test_methods(fuzz_client, method: str, path: str) -> None:
    res = fuzz_client.request(method, path)
    if method == "HEAD":  # no body to read: only the status
        assert res.status_code < 500, (method, path, res.status_code)
    else:
        check(res)
