"""The ``where`` checker (index/where.py): file-reading and other constructs outside the grammar are refused
with a message naming them (never a line of the file), every allowed construct gives the mask polars gives,
errors name columns and dtypes rather than values, and a grammar fuzz test mixes allowed and forbidden
constructs. Checked on a plain polars DataFrame, and once through ``Recommender.recommend(where=...)``."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import polars as pl
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from errors import QueryError
from index.where import FUNCTIONS, MAX_DEPTH, MAX_LENGTH, check_sql, where_mask

SECRET = "SECRET-ROW-7f3a:x:0:0:do not show"  # the first line of a file the server can read

FRAME = pl.DataFrame({
    "item_id": [1, 2, 3, 4, 5, 6],
    "title": ["Toy Story (1995)", "GoldenEye (1995)", "It's a Wonderful Life (1946)", None, "heat", "  Fargo  "],
    "year": [1995, 1995, 1946, None, 1995, 1996],
    "score": [4.5, -2.25, 3.0, 0.5, None, 1.26],
    "flag": [True, False, None, True, False, True],
})


@pytest.fixture(scope="module")
def secret_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("secret") / "secret.csv"
    path.write_text(f"{SECRET}\nsecond-line-9c1e,more\n")
    return path


def _file_lines(path: Path) -> list[str]:
    return [ln.strip() for ln in path.read_text().splitlines() if ln.strip()]


def _refused(where: str, frame: pl.DataFrame = FRAME) -> str:
    with pytest.raises(QueryError) as err:
        where_mask(frame, where)
    return str(err.value)


# -- refused: the file-reading attack and every other construct outside the grammar ---------------------------
def test_polars_alone_reads_the_file(secret_file: Path) -> None:
    """What the checker stands between: polars SQL reads the file and quotes its first line in the error."""
    with pytest.raises(Exception) as err:
        FRAME.select(pl.sql_expr(f"item_id IN (SELECT column_1 FROM read_csv('{secret_file}'))"))
    assert SECRET in str(err.value)


@pytest.mark.parametrize(("template", "construct"), [
    ("item_id IN (SELECT column_1 FROM read_csv('{path}'))", "SELECT (a subquery)"),
    ("item_id IN (SELECT * FROM read_parquet('{path}'))", "the table function read_parquet()"),
    ("item_id IN (SELECT * FROM scan_csv('{path}'))", "the table function scan_csv()"),
    ("read_json('{path}') IS NULL", "the table function read_json()"),
    ("READ_CSV('{path}') = 1", "the table function READ_CSV()"),
    ("title = (SELECT column_1 FROM read_csv('{path}') LIMIT 1)", "SELECT (a subquery)"),
    ("EXISTS (SELECT 1)", "SELECT (a subquery)"),
    ("item_id > 1 UNION SELECT column_1 FROM read_csv('{path}')", "UNION"),
    ("item_id > 1 -- and read_csv('{path}')", "comments (-- or /* */)"),
    ("item_id > 1 /* c */", "comments (-- or /* */)"),
    ("item_id > 1; SELECT * FROM read_csv('{path}')", "';'"),
    ("item_id > 1;", "';'"),
    ("frobnicate(item_id) = 1", "the function frobnicate()"),
    ("CAST(year AS VARCHAR) = '1995'", "CAST"),
    ("year::int = 1995", "CAST"),
    ("items.title = 'heat'", "a qualified name (table.column)"),
    ("item_id = $1", "a parameter"),
    ("item_id = ?", "a placeholder"),
    ("item_id IN (year, 2)", "IN over anything but literal values"),
    ("year BETWEEN SYMMETRIC 2000 AND 1900", "BETWEEN SYMMETRIC"),
    ("title LIKE 'a!%' ESCAPE '!'", "LIKE ... ESCAPE"),
    ("CASE WHEN flag THEN TRUE END", "CASE"),
    ("flag IS NOT FALSE", "IS TRUE / IS FALSE (compare with = instead)"),
    ("item_id # 1 = 0", "the construct BitwiseXor"),
])
def test_forbidden_constructs_are_named(secret_file: Path, template: str, construct: str) -> None:
    message = _refused(template.format(path=secret_file))
    assert message.startswith("where ") and construct in message
    assert not any(line in message for line in _file_lines(secret_file))


def test_etc_passwd_is_never_read_or_shown() -> None:
    passwd = Path("/etc/passwd")
    if not passwd.is_file():
        pytest.skip("no /etc/passwd here")
    for where in ("item_id IN (SELECT column_1 FROM read_csv('/etc/passwd'))", "read_csv('/etc/passwd') = 1",
                  "title IN (SELECT * FROM scan_csv('/etc/passwd'))"):
        message = _refused(where)
        assert not any(line in message for line in _file_lines(passwd)[:5])


def test_length_and_depth_limits() -> None:
    long = "item_id > 1 AND " + "title = '" + "x" * MAX_LENGTH + "'"
    assert _refused(long) == f"where is {len(long)} characters long; the limit is {MAX_LENGTH}"
    deep = "(" * (MAX_DEPTH + 1) + "item_id > 1" + ")" * (MAX_DEPTH + 1)
    assert _refused(deep) == f"where is nested too deeply (the limit is {MAX_DEPTH} levels)"
    nots = "NOT " * 300 + "flag"  # deeper than the parser itself could recurse
    assert _refused(nots) == f"where is nested too deeply (the limit is {MAX_DEPTH} levels)"
    arithmetic = "ABS(" * (MAX_DEPTH // 2) + "item_id" + ")" * (MAX_DEPTH // 2) + " > 0"
    assert where_mask(FRAME, arithmetic).all()  # moderate nesting is fine
    # A long chain of AND (or OR) is one level: 100 conditions pass.
    chain = " AND ".join(f"item_id <> {i}" for i in range(100, 200))
    assert len(chain) <= MAX_LENGTH and where_mask(FRAME, chain).all()


def test_parse_errors_are_query_errors() -> None:
    assert _refused("year >").startswith("where is not a valid condition: ")
    assert _refused("title = 'open") == ("where is not a valid condition: it has an unterminated string, quoted "
                                         "name or comment")
    assert _refused("   ") == "where is empty: give a condition such as \"year > 1990\""
    with pytest.raises(QueryError, match="^where must be a polars expression or SQL text, got int$"):
        where_mask(FRAME, 42)


def test_forbidden_words_inside_strings_are_just_text() -> None:
    """The check reads tokens, not characters: a literal may hold any text."""
    texts = ["a -- b", "x; SELECT 1", "read_csv('/etc/passwd')", "/* c */", "it's", "C:\\new\\"]
    frame = FRAME.with_columns(pl.Series("title", texts))
    for row, text in enumerate(texts):  # a backslash is a plain character, as polars reads it
        assert where_mask(frame, f"title = {_quote(text)}").nonzero()[0].tolist() == [row]


# -- messages: column names and dtypes, never values -----------------------------------------------------------
def test_unknown_column_lists_the_item_column_names() -> None:
    assert _refused("decade > 1990") == ("where: unknown column 'decade'; the item columns are item_id, title, year, "
                                         "score, flag")
    assert _refused('title = "Toy Story (1995)"').startswith(
        "where: unknown column 'Toy Story (1995)' (strings take single quotes); the item columns are item_id")
    with pytest.raises(QueryError, match="^where: unknown column 'genre'"):
        where_mask(FRAME, pl.col("genre") == "Drama")


@pytest.mark.parametrize(("where", "columns"), [
    ("title = 5", "title (String)"),
    ("year = 'Toy Story (1995)'", "year (Int64)"),
    ("item_id IN ('GoldenEye (1995)', 'heat')", "item_id (Int64)"),
    ("LOWER(year) = 'heat'", "year (Int64)"),
    ("score + title > 1", "score (Float64), title (String)"),
    (pl.col("title").cast(pl.Int64) > 1, "title (String)"),  # polars: "conversion ... failed ... 'Toy Story'"
])
def test_evaluation_errors_name_columns_and_dtypes_not_values(where, columns: str) -> None:
    message = _refused(where)
    assert message.startswith("where cannot be evaluated (") and f"on the item columns it uses: {columns};" in message
    for value in FRAME["title"].drop_nulls().to_list() + ["Toy Story", "GoldenEye", "1995"]:
        assert value not in message


def test_non_boolean_results_are_refused() -> None:
    assert _refused("item_id + 1") == "where must give true or false for each item, got values of type Int64"
    assert _refused("LOWER(title)") == "where must give true or false for each item, got values of type String"


# -- allowed: every construct gives polars' own mask -----------------------------------------------------------
ALLOWED = [
    ("item_id = 2", pl.col("item_id") == 2),
    ("item_id <> 2", pl.col("item_id") != 2),
    ("item_id != 2", pl.col("item_id") != 2),
    ("year < 1990", pl.col("year") < 1990),
    ("year <= 1995", pl.col("year") <= 1995),
    ("score > 1.26", pl.col("score") > 1.26),
    ("score >= -2.25", pl.col("score") >= -2.25),
    ("year = 1995 AND NOT (item_id = 1 OR flag)", (pl.col("year") == 1995) & ~((pl.col("item_id") == 1) | pl.col("flag"))),
    ("flag", pl.col("flag")),
    ("flag = TRUE", pl.col("flag") == True),  # noqa: E712 - the polars expression, not a Python comparison
    ("FALSE OR item_id = 3", pl.col("item_id") == 3),
    ("TRUE", pl.repeat(True, FRAME.height)),
    ("item_id IN (1, 3, -4, NULL)", pl.col("item_id").is_in([1, 3, -4])),
    ("title IN ('heat', 'It''s a Wonderful Life (1946)')", pl.col("title").is_in(["heat", "It's a Wonderful Life (1946)"])),
    ("item_id NOT IN (1, 2)", ~pl.col("item_id").is_in([1, 2])),
    ("title LIKE '%(1995)'", pl.col("title").str.ends_with("(1995)")),
    ("title NOT LIKE 'Toy%'", ~pl.col("title").str.starts_with("Toy")),
    ("title ILIKE 'HEAT'", pl.col("title").str.to_lowercase() == "heat"),
    ("title NOT ILIKE '%e%'", ~pl.col("title").str.to_lowercase().str.contains("e", literal=True)),
    ("title LIKE '_eat'", pl.col("title").str.contains(r"^.eat$")),
    ("year IS NULL", pl.col("year").is_null()),
    ("title IS NOT NULL", pl.col("title").is_not_null()),
    ("year BETWEEN 1950 AND 1995", pl.col("year").is_between(1950, 1995)),
    ("year NOT BETWEEN 1950 AND 1995", ~pl.col("year").is_between(1950, 1995)),
    ("item_id + 1 > 3", pl.col("item_id") + 1 > 3),
    ("item_id - 1 < 2", pl.col("item_id") - 1 < 2),
    ("item_id * 2 = 6", pl.col("item_id") * 2 == 6),
    ("item_id / 2 > 1", pl.col("item_id") / 2 > 1),
    ("item_id % 2 = 1", pl.col("item_id") % 2 == 1),
    ("-score < 0", -pl.col("score") < 0),
    ("title || '!' = 'heat!'", pl.col("title") + "!" == "heat!"),
    ("LOWER(title) = 'goldeneye (1995)'", pl.col("title").str.to_lowercase() == "goldeneye (1995)"),
    ("UPPER(title) = 'HEAT'", pl.col("title").str.to_uppercase() == "HEAT"),
    ("LENGTH(title) > 10", pl.col("title").str.len_chars() > 10),
    ("CHAR_LENGTH(title) = 4", pl.col("title").str.len_chars() == 4),
    ("TRIM(title) = 'Fargo'", pl.col("title").str.strip_chars() == "Fargo"),
    ("LTRIM(title) = 'Fargo  '", pl.col("title").str.strip_chars_start() == "Fargo  "),
    ("RTRIM(title) = '  Fargo'", pl.col("title").str.strip_chars_end() == "  Fargo"),
    ("STARTS_WITH(title, 'Golden')", pl.col("title").str.starts_with("Golden")),
    ("ENDS_WITH(title, '(1946)')", pl.col("title").str.ends_with("(1946)")),
    ("SUBSTR(title, 1, 3) = 'Toy'", pl.col("title").str.slice(0, 3) == "Toy"),
    ("STRPOS(title, 'e') = 2", pl.col("title").str.find("e", literal=True) + 1 == 2),
    ("REPLACE(title, 'e', 'a') = 'haat'", pl.col("title").str.replace_all("e", "a", literal=True) == "haat"),
    ("CONCAT(title, '?') = 'heat?'", pl.col("title") + "?" == "heat?"),
    ("ABS(score) > 2", pl.col("score").abs() > 2),
    ("ROUND(score, 1) = 1.3", pl.col("score").round(1) == 1.3),
    ("FLOOR(score) = 1", pl.col("score").floor() == 1),
    ("CEIL(score) = 2", pl.col("score").ceil() == 2),
    ("CEILING(score) = -2", pl.col("score").ceil() == -2),
    ("COALESCE(year, 0) = 0", pl.col("year").fill_null(0) == 0),
    ("NULLIF(year, 1995) IS NULL", pl.when(pl.col("year") != 1995).then(pl.col("year")).is_null()),
    ("GREATEST(year, 1990) = 1995", pl.max_horizontal("year", pl.lit(1990)) == 1995),
    ("LEAST(item_id, 3) = 3", pl.min_horizontal("item_id", pl.lit(3)) == 3),
]


@pytest.mark.parametrize(("sql", "expr"), ALLOWED, ids=[sql for sql, _ in ALLOWED])
def test_allowed_construct_matches_polars(sql: str, expr: pl.Expr) -> None:
    want = FRAME.select(expr.fill_null(False).alias("m")).to_series().to_numpy().astype(bool)
    np.testing.assert_array_equal(where_mask(FRAME, sql), want)


def test_every_allowed_function_is_exercised() -> None:
    names = {m.group(1).upper() for sql, _ in ALLOWED for m in re.finditer(r"\b([A-Za-z_]+)\(", sql)}
    assert set(FUNCTIONS) <= names


def test_polars_expressions_are_code_and_only_their_columns_are_checked() -> None:
    mask = where_mask(FRAME, pl.col("title").str.contains("(?i)golden"))
    assert mask.nonzero()[0].tolist() == [1]
    with pytest.raises(QueryError, match="^where: unknown column 'missing'"):
        where_mask(FRAME, pl.col("missing").is_null())


def test_polars_sees_the_checked_rendering_not_the_text() -> None:
    assert check_sql("title = 'it''s' and Year2 != 1", ["title", "Year2"]) == "\"title\" = 'it''s' AND \"Year2\" <> 1"


# -- fuzz: a grammar that mixes allowed and forbidden constructs ------------------------------------------------
_TEXT = st.text(alphabet="ab%_' ;-/*()\\Sx", max_size=8)


def _quote(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


def _forbidden(path: str) -> dict[str, list[str]]:
    return {
        "num": [f"(SELECT column_1 FROM read_csv('{path}'))", "frobnicate(item_id)", "CAST(year AS INTEGER)", "$1",
                "items.year", f"read_parquet('{path}')", "year::int", "(SELECT 1)"],
        "str": [f"read_csv('{path}')", f"scan_csv('{path}')", f"read_json('{path}')", "title COLLATE \"C\"",
                "x'AB'", "$$x$$", "REPEAT(title, 3)"],
        "cond": ["EXISTS (SELECT 1)", f"item_id IN (SELECT column_1 FROM read_csv('{path}'))", "item_id IN (year)",
                 "year BETWEEN SYMMETRIC 1 AND 2"],
        "suffix": [" -- c", " /* c */", "; SELECT 1", f" UNION SELECT * FROM read_csv('{path}')", ";"],
    }


@st.composite
def _num(draw, depth: int, bad: dict):
    if draw(st.integers(0, 19)) == 0:
        return draw(st.sampled_from(bad["num"])), True
    if depth <= 0 or draw(st.booleans()):
        leaf = draw(st.sampled_from(["item_id", "year", "score", "INT", "FLOAT"]))
        if leaf == "INT":
            return str(draw(st.integers(-5, 2000))), False
        if leaf == "FLOAT":
            return repr(draw(st.floats(-10, 10, allow_nan=False).map(lambda x: round(x, 2)))), False
        return leaf, False
    kind = draw(st.sampled_from(["op", "abs", "round", "coalesce", "greatest", "length", "strpos", "neg"]))
    a, bad_a = draw(_num(depth - 1, bad))
    if kind == "op":
        b, bad_b = draw(_num(depth - 1, bad))
        return f"({a} {draw(st.sampled_from(['+', '-', '*']))} {b})", bad_a or bad_b
    if kind in ("coalesce", "greatest"):
        b, bad_b = draw(_num(depth - 1, bad))
        return f"{kind.upper()}({a}, {b})", bad_a or bad_b
    if kind in ("length", "strpos"):
        s, bad_s = draw(_str(depth - 1, bad))
        return (f"LENGTH({s})" if kind == "length" else f"STRPOS({s}, 'a')"), bad_s
    if kind == "neg":
        return f"-({a})", bad_a
    return f"{kind.upper()}({a})", bad_a


@st.composite
def _str(draw, depth: int, bad: dict):
    if draw(st.integers(0, 19)) == 0:
        return draw(st.sampled_from(bad["str"])), True
    if depth <= 0 or draw(st.booleans()):
        return (draw(st.sampled_from(["title", _quote(draw(_TEXT))]))), False
    kind = draw(st.sampled_from(["LOWER", "UPPER", "TRIM", "CONCAT", "||", "REPLACE", "SUBSTR"]))
    a, bad_a = draw(_str(depth - 1, bad))
    if kind in ("CONCAT", "||"):
        b, bad_b = draw(_str(depth - 1, bad))
        return (f"CONCAT({a}, {b})" if kind == "CONCAT" else f"({a} || {b})"), bad_a or bad_b
    if kind == "REPLACE":
        return f"REPLACE({a}, 'a', 'b')", bad_a
    if kind == "SUBSTR":
        return f"SUBSTR({a}, 1, 2)", bad_a
    return f"{kind}({a})", bad_a


@st.composite
def _cond(draw, depth: int, bad: dict):
    if draw(st.integers(0, 19)) == 0:
        return draw(st.sampled_from(bad["cond"])), True
    if depth <= 0 or draw(st.booleans()):
        kind = draw(st.sampled_from(["cmp_num", "cmp_str", "like", "in", "between", "is", "flag", "bool"]))
        op = draw(st.sampled_from(["=", "<>", "!=", "<", "<=", ">", ">="]))
        if kind == "cmp_num":
            (a, ba), (b, bb) = draw(_num(depth, bad)), draw(_num(depth, bad))
            return f"{a} {op} {b}", ba or bb
        if kind == "cmp_str":
            (a, ba), (b, bb) = draw(_str(depth, bad)), draw(_str(depth, bad))
            return f"{a} {op} {b}", ba or bb
        if kind == "like":
            a, ba = draw(_str(depth, bad))
            return f"{a} {draw(st.sampled_from(['LIKE', 'NOT LIKE', 'ILIKE', 'NOT ILIKE']))} {_quote(draw(_TEXT))}", ba
        if kind == "in":
            values = draw(st.lists(st.integers(-3, 8), min_size=1, max_size=4))
            return f"item_id {draw(st.sampled_from(['IN', 'NOT IN']))} ({', '.join(map(str, values))})", False
        if kind == "between":
            a, ba = draw(_num(depth, bad))
            lo, hi = sorted(draw(st.lists(st.integers(-5, 2000), min_size=2, max_size=2)))
            return f"{a} {draw(st.sampled_from(['BETWEEN', 'NOT BETWEEN']))} {lo} AND {hi}", ba
        if kind == "is":
            col = draw(st.sampled_from(["title", "year", "score", "flag"]))
            return f"{col} {draw(st.sampled_from(['IS NULL', 'IS NOT NULL']))}", False
        if kind == "flag":
            return "flag", False
        return draw(st.sampled_from(["TRUE", "FALSE"])), False
    kind = draw(st.sampled_from(["AND", "OR", "NOT", "()"]))
    a, ba = draw(_cond(depth - 1, bad))
    if kind == "NOT":
        return f"NOT ({a})", ba
    if kind == "()":
        return f"({a})", ba
    b, bb = draw(_cond(depth - 1, bad))
    return f"({a}) {kind} ({b})", ba or bb


@st.composite
def _where(draw, path: str):
    bad = _forbidden(path)
    text, forbidden = draw(_cond(draw(st.integers(0, 3)), bad))
    if draw(st.integers(0, 9)) == 0:
        text, forbidden = text + draw(st.sampled_from(bad["suffix"])), True
    return text, forbidden


def _polars_mask(text: str) -> np.ndarray:
    out = FRAME.select(pl.sql_expr(text).alias("m")).to_series()
    if len(out) == 1:
        out = pl.Series("m", [out[0]] * FRAME.height, dtype=pl.Boolean)
    return out.fill_null(False).to_numpy().astype(bool)


_FUZZ_PATH = "/nonexistent-towerrec-fuzz/secret.csv"  # never read: a forbidden construct is refused first


@settings(max_examples=250, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(_where(_FUZZ_PATH))
def test_fuzz_refused_or_a_boolean_mask(case) -> None:
    """Refused with a QueryError, or a boolean mask equal to polars' own; nothing else ever escapes. Text with a
    forbidden construct is always refused; text made of allowed constructs alone is always accepted."""
    text, forbidden = case
    try:
        mask = where_mask(FRAME, text)
    except QueryError as err:
        assert forbidden, (text, str(err))
        assert "\n" not in str(err)
        return
    assert not forbidden, text
    assert mask.dtype == bool and mask.shape == (FRAME.height,)
    np.testing.assert_array_equal(mask, _polars_mask(text))


_SOUP = st.sampled_from(list("aeilmnorstuy_ '\"()*,-+/%;:=<>!|.$?#[]\\\n0123456789") + [
    "item_id", "title", "year", "flag", "SELECT", "FROM", " AND ", " OR ", " NOT ", " IN ", " LIKE ", " IS NULL",
    "read_csv(", "LOWER(", "ROUND(", "TRUE", "NULL", "CAST(", " BETWEEN ", "--", "/*", "*/", "::", "E'", "$$",
    "U&'", "x'", "ARRAY[", "INTERVAL ", "CASE WHEN ", " END", "->>", "~*"])


@settings(max_examples=300, deadline=None, derandomize=True)
@given(st.one_of(st.text(max_size=60), st.lists(_SOUP, max_size=25).map("".join)))
def test_fuzz_arbitrary_text_is_a_query_error_or_a_mask(text: str) -> None:
    """Any text at all, token soup included: a one-line QueryError or a boolean mask, nothing else."""
    try:
        mask = where_mask(FRAME, text)
    except QueryError as err:
        assert "\n" not in str(err)
        return
    assert mask.dtype == bool and mask.shape == (FRAME.height,)


# -- once through the recommender on the tiny run ---------------------------------------------------------------
def test_recommender_where_is_checked(tiny_run: Path, secret_file: Path) -> None:
    from index.recommender import Recommender

    rec = Recommender.load(tiny_run, device="cpu")
    user = sorted(rec.histories)[0]
    attack = f"item_id IN (SELECT column_1 FROM read_csv('{secret_file}'))"
    with pytest.raises(QueryError, match=r"^where may not use SELECT \(a subquery\)") as err:
        rec.recommend(user_id=user, k=3, rerank=False, where=attack)
    assert SECRET not in str(err.value)
    with pytest.raises(QueryError, match="^where: unknown column 'decade'; the item columns are "
                                         + re.escape(", ".join(rec.items.columns)) + "$"):
        rec.similar(rec.item_ids[0], where="decade > 1990")
    where = "title LIKE '%(199%' AND item_id NOT IN (1, 2)"
    out = rec.recommend(user_id=user, k=5, rerank=False, where=where)
    allowed = set(rec.items.filter(pl.Series(where_mask(rec.items, where)))["item_id"].to_list())
    assert len(out) == 5 and {r.item_id for r in out} <= allowed
