"""The ``where`` filter of a query: SQL text (or a polars expression) over the index's item columns, checked
before anything evaluates it.

polars SQL is a whole query language: its table functions (``read_csv``, ``read_parquet``, ``scan_*``) and
subqueries read any file the server can read, and its error messages quote table contents. So SQL text is
parsed with sqlglot (PostgreSQL dialect: single-quoted strings with ``''`` escapes and backslashes taken
literally, as polars reads them) and the syntax tree must use only:

- the item columns of the index (names, unqualified);
- literals: numbers, single-quoted strings, ``TRUE`` / ``FALSE``, ``NULL``;
- comparisons ``=``, ``<>``, ``!=``, ``<``, ``<=``, ``>``, ``>=``; ``AND``, ``OR``, ``NOT``; parentheses;
- ``IN`` over a list of literals, ``[NOT] LIKE`` / ``[NOT] ILIKE``, ``IS [NOT] NULL``, ``[NOT] BETWEEN``;
- arithmetic ``+``, ``-``, ``*``, ``/``, ``%`` and string concatenation ``||``;
- the scalar functions of :data:`FUNCTIONS` (each one checked to evaluate in ``pl.sql_expr``).

Anything else is a :class:`errors.QueryError` that names the construct: subqueries, ``UNION`` and other
statement keywords, table functions, unknown functions, comments, ``;``, text over :data:`MAX_LENGTH`
characters or nested deeper than :data:`MAX_DEPTH`. polars never sees the caller's text: it gets the SQL that
sqlglot writes back from the checked tree, so what runs is what was checked. A ``pl.Expr`` passed from Python
is code, not input, and is taken as it is, but its columns are still checked.

Error messages name columns, dtypes and constructs, never values from the items table, and never pass on a
polars message (those quote the data: "conversion from str to i64 failed for value 'Toy Story'").
"""

from __future__ import annotations

import re

import numpy as np
import polars as pl
import sqlglot
from sqlglot import exp
from sqlglot.errors import ParseError, SqlglotError
from sqlglot.tokens import TokenType

from errors import QueryError

DIALECT = "postgres"
MAX_LENGTH = 2000  # characters of SQL text (the HTTP API's limit too)
MAX_DEPTH = 32  # nesting of the syntax tree; a chain of ANDs (or of ORs) counts as one level

# Scalar functions a condition may call, by their SQL name(s), with the sqlglot node each parses into. Every
# one is written back by sqlglot in a form pl.sql_expr evaluates (tests/index/test_where.py runs each).
FUNCTIONS: dict[str, type[exp.Expression]] = {
    "LOWER": exp.Lower,
    "UPPER": exp.Upper,
    "LENGTH": exp.Length,  # also CHAR_LENGTH
    "TRIM": exp.Trim,  # also LTRIM, RTRIM and TRIM(BOTH | LEADING | TRAILING 'x' FROM ...)
    "STARTS_WITH": exp.StartsWith,
    "ENDS_WITH": exp.EndsWith,
    "SUBSTR": exp.Substring,  # also SUBSTRING
    "STRPOS": exp.StrPosition,
    "REPLACE": exp.Replace,
    "CONCAT": exp.Concat,
    "ABS": exp.Abs,
    "ROUND": exp.Round,
    "FLOOR": exp.Floor,
    "CEIL": exp.Ceil,  # also CEILING
    "COALESCE": exp.Coalesce,
    "NULLIF": exp.Nullif,
    "GREATEST": exp.Greatest,
    "LEAST": exp.Least,
}
_FUNCTION_NODES = tuple(FUNCTIONS.values())

# Operators and literals (exp.Column, exp.Identifier, exp.In, exp.Is and exp.Between have their own checks).
_PLAIN_NODES = (
    exp.Paren, exp.And, exp.Or, exp.Not,
    exp.EQ, exp.NEQ, exp.LT, exp.LTE, exp.GT, exp.GTE, exp.Like, exp.ILike,
    exp.Neg, exp.Add, exp.Sub, exp.Mul, exp.Div, exp.Mod, exp.DPipe,
    exp.Literal, exp.Boolean, exp.Null,
)
_CHAINS = (exp.And, exp.Or)  # a chain of one of these counts as one level of nesting

# Tokens that only a statement has: refused before parsing, by name.
_STATEMENT_TOKENS = {
    TokenType.SELECT: "SELECT (a subquery)", TokenType.UNION: "UNION", TokenType.INTERSECT: "INTERSECT",
    TokenType.EXCEPT: "EXCEPT", TokenType.WITH: "WITH", TokenType.FROM: "FROM", TokenType.INTO: "INTO",
    TokenType.VALUES: "VALUES", TokenType.INSERT: "INSERT", TokenType.UPDATE: "UPDATE",
    TokenType.DELETE: "DELETE", TokenType.DROP: "DROP", TokenType.CREATE: "CREATE", TokenType.ALTER: "ALTER",
    TokenType.COPY: "COPY", TokenType.PRAGMA: "PRAGMA", TokenType.TABLE: "TABLE",
}

# Names for refused nodes that sqlglot's class names would not make clear.
_CONSTRUCTS = {
    exp.Select: "a subquery (SELECT)", exp.Subquery: "a subquery", exp.Union: "UNION", exp.Exists: "EXISTS",
    exp.Table: "a table", exp.Star: "*", exp.Cast: "CAST", exp.Case: "CASE", exp.Placeholder: "a placeholder",
    exp.Parameter: "a parameter", exp.Collate: "COLLATE", exp.Escape: "LIKE ... ESCAPE", exp.Tuple: "a tuple",
    exp.HexString: "a hex string", exp.RawString: "a dollar-quoted string", exp.UnicodeString: "a U& string",
    exp.Interval: "INTERVAL", exp.Array: "an array", exp.Any: "ANY", exp.All: "ALL", exp.Dot: "dot access (a.b)",
}
_FILE_READERS = ("read_", "scan_")


def allowed_functions() -> str:
    """The allowed function names, for messages: ``"ABS, CEIL, ..."``."""
    return ", ".join(sorted(FUNCTIONS))


def check_sql(text: str, columns: list[str]) -> str:
    """The SQL that polars may evaluate for the condition ``text`` over ``columns``: sqlglot's rendering of the
    checked syntax tree. Anything outside the allowed grammar (module docstring) is a :class:`QueryError`
    that names it."""
    if not isinstance(text, str):
        raise QueryError(f"where must be SQL text, got {type(text).__name__}")
    if not text.strip():
        raise QueryError("where is empty: give a condition such as \"year > 1990\"")
    if len(text) > MAX_LENGTH:
        raise QueryError(f"where is {len(text)} characters long; the limit is {MAX_LENGTH}")
    _check_tokens(text)
    try:
        tree = sqlglot.parse_one(text, read=DIALECT, into=exp.Condition)
    except ParseError as err:
        raise QueryError(f"where is not a valid condition: {_parse_problem(err)}") from None
    except SqlglotError as err:
        raise QueryError(f"where is not a valid condition: {type(err).__name__}") from None
    except RecursionError:
        raise QueryError(f"where is nested too deeply (the limit is {MAX_DEPTH} levels)") from None
    _check_tree(tree, list(columns))
    return tree.sql(dialect=DIALECT, identify=True)


def _check_tokens(text: str) -> None:
    """Refuse comments, ``;``, statement keywords, file-reading table functions and parentheses nested deeper
    than :data:`MAX_DEPTH`, from sqlglot's tokens (text inside a string literal is one token: never a match).
    The message names every such construct found (up to three)."""
    try:
        tokens = sqlglot.Dialect.get_or_raise(DIALECT).tokenize(text)
    except SqlglotError:
        raise QueryError("where is not a valid condition: it has an unterminated string, quoted name or "
                         "comment") from None
    refused: list[str] = []
    depth = 0
    for i, token in enumerate(tokens):
        kind = token.token_type
        found = None
        if token.comments:
            found = "comments (-- or /* */)"
        elif kind == TokenType.SEMICOLON:
            found = "';' (it is one condition, not statements)"
        elif kind in _STATEMENT_TOKENS:
            found = _STATEMENT_TOKENS[kind]
        elif kind == TokenType.VAR and token.text.lower().startswith(_FILE_READERS) and i + 1 < len(tokens) \
                and tokens[i + 1].token_type == TokenType.L_PAREN:
            found = f"the table function {token.text}() (where cannot read files)"
        elif kind == TokenType.L_PAREN:
            depth += 1
            if depth > MAX_DEPTH:
                raise QueryError(f"where is nested too deeply (the limit is {MAX_DEPTH} levels)")
        elif kind == TokenType.R_PAREN:
            depth -= 1
        if found and found not in refused:
            refused.append(found)
    if refused:
        raise QueryError(f"where may not use {', '.join(refused[:3])}: it is one condition over the item "
                         "columns, not a query")


def _parse_problem(err: ParseError) -> str:
    """sqlglot's first complaint and where it is, without its copy of the text."""
    first = err.errors[0] if getattr(err, "errors", None) else {}
    what = re.sub(r"<class '[\w.]*?(\w+)'>", r"\1", first.get("description") or "cannot parse it")
    near = (first.get("highlight") or "").strip()
    col = first.get("col")
    where = f" at {near[:40]!r}" if near else ""
    return f"{what}{where}" + (f" (column {col})" if col else "")


def _check_tree(tree: exp.Expression, columns: list[str]) -> None:
    """Walk the whole tree (iteratively: a long AND chain is deep); refuse every construct outside the allowed
    grammar, naming up to three, then any unknown column."""
    refused: list[str] = []
    unknown: list[str] = []
    stack = [(tree, None, 1)]
    while stack:
        node, parent, depth = stack.pop()
        if depth > MAX_DEPTH:
            raise QueryError(f"where is nested too deeply (the limit is {MAX_DEPTH} levels)")
        problem = _node_problem(node, parent, columns, unknown)
        if problem:
            if problem not in refused:
                refused.append(problem)
            continue  # the construct is named: what it holds is not looked at
        for child in node.iter_expressions():
            same_chain = isinstance(node, _CHAINS) and type(child) is type(node)
            stack.append((child, node, depth if same_chain else depth + 1))
    if refused:
        functions = f"; the functions allowed are {allowed_functions()}" if any(
            r.startswith("the function") for r in refused) else ""
        raise QueryError(f"where may not use {', '.join(refused[:3])}: it is one condition over the item columns "
                         f"(comparisons, AND/OR/NOT, IN lists, LIKE, IS NULL, BETWEEN, arithmetic){functions}")
    if unknown:
        hint = " (strings take single quotes)" if any(" " in u for u in unknown) else ""
        raise QueryError(f"where: unknown column {unknown[0]!r}{hint}; the item columns are {', '.join(columns)}")


def _node_problem(node: exp.Expression, parent: exp.Expression | None, columns: list[str],
                  unknown: list[str]) -> str | None:
    """Why ``node`` is refused (a short name of the construct), or None where it is allowed. Unknown column
    names are appended to ``unknown``."""
    if isinstance(node, exp.Column):
        if any(node.args.get(part) for part in ("table", "db", "catalog")):
            return "a qualified name (table.column)"
        if not isinstance(node.this, exp.Identifier):
            return _construct(node.this)
        if node.name not in columns and node.name not in unknown:
            unknown.append(node.name)
        return None
    if isinstance(node, exp.Identifier):
        return None if isinstance(parent, exp.Column) else "a bare name"
    if isinstance(node, exp.In):
        if node.args.get("query") is not None or node.args.get("unnest") is not None:
            return "a subquery (IN (SELECT ...))"
        if node.args.get("field") is not None or not node.expressions:
            return "IN without a list of values"
        if not all(_is_literal(v) for v in node.expressions):
            return "IN over anything but literal values"
        return None
    if isinstance(node, exp.Is):
        # polars reads NULL IS NOT FALSE as false (SQL: true): IS TRUE / IS FALSE are refused, not mis-evaluated.
        if isinstance(node.expression, exp.Boolean):
            return "IS TRUE / IS FALSE (compare with = instead)"
        return None if isinstance(node.expression, exp.Null) else "IS other than IS [NOT] NULL"
    if isinstance(node, exp.Between):
        return "BETWEEN SYMMETRIC" if node.args.get("symmetric") else None
    if isinstance(node, _PLAIN_NODES) or isinstance(node, _FUNCTION_NODES):
        return None
    return _construct(node)


def _is_literal(node: exp.Expression) -> bool:
    """A literal value of an IN list: a number, string, boolean, NULL or a negative number."""
    if isinstance(node, exp.Neg):
        node = node.this
        return isinstance(node, exp.Literal) and not node.is_string
    return isinstance(node, (exp.Literal, exp.Boolean, exp.Null))


def _construct(node: exp.Expression) -> str:
    """A short name of a refused node for the message."""
    if isinstance(node, exp.Anonymous):
        name = str(node.name)
        if name.lower().startswith(_FILE_READERS):
            return f"the table function {name}() (where cannot read files)"
        return f"the function {name}()"
    for kind, name in _CONSTRUCTS.items():
        if isinstance(node, kind):
            return name
    if isinstance(node, exp.Func):
        return f"the function {node.sql_name()}()"
    return f"the construct {type(node).__name__}"


def where_expr(where: str | pl.Expr, columns: list[str]) -> pl.Expr:
    """The polars expression of a checked condition: SQL text through :func:`check_sql`, a ``pl.Expr`` as it is;
    either way every column it reads must be one of ``columns``."""
    if isinstance(where, str):
        sql = check_sql(where, columns)
        try:
            expr = pl.sql_expr(sql)
        except (pl.exceptions.PolarsError, ValueError, TypeError, pl.exceptions.PanicException) as err:
            raise QueryError("where uses a form polars SQL cannot evaluate "
                             f"({type(err).__name__}); rewrite it with the allowed constructs") from None
    elif isinstance(where, pl.Expr):
        expr = where
    else:
        raise QueryError(f"where must be a polars expression or SQL text, got {type(where).__name__}")
    for name in expr.meta.root_names():
        if name not in columns:
            raise QueryError(f"where: unknown column {name!r}; the item columns are {', '.join(columns)}")
    return expr


def where_mask(frame: pl.DataFrame, where: str | pl.Expr) -> np.ndarray:
    """``(frame.height,)`` bool: the rows of ``frame`` where the condition holds (null counts as false).

    A :class:`QueryError` for a refused condition, one that cannot be evaluated on these columns' types, or
    one that does not give a boolean per row; its message names the columns and their dtypes, never values.
    """
    columns = list(frame.columns)
    expr = where_expr(where, columns)
    try:
        out = frame.select(expr.alias("where")).to_series()
    except (pl.exceptions.PolarsError, ValueError, TypeError, ArithmeticError,
            pl.exceptions.PanicException) as err:
        used = [c for c in dict.fromkeys(expr.meta.root_names()) if c in columns]
        types = ", ".join(f"{c} ({frame.schema[c]})" for c in used) or "none"
        raise QueryError(f"where cannot be evaluated ({type(err).__name__}) on the item columns it uses: {types}; "
                         "compare each column with values of its type (strings in single quotes, numbers "
                         "bare) and apply functions to columns of the type they take") from None
    if out.dtype != pl.Boolean:
        raise QueryError(f"where must give true or false for each item, got values of type {out.dtype}")
    if len(out) == 1 and frame.height != 1:  # a condition on literals alone: the same answer for every row
        return np.full(frame.height, bool(out.fill_null(False)[0]))
    if len(out) != frame.height:
        raise QueryError(f"where must give one true or false per item, got {len(out)} for {frame.height} items")
    return out.fill_null(False).to_numpy().astype(bool)
