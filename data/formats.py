"""The source formats ``prepare`` reads, by name: the one list the CLI shows (without importing polars) and
:mod:`data.importers` registers an importer for each of."""

FORMATS = {
    "generic": "any CSV/Parquet pair of items and interactions",
    "movielens-100k": "MovieLens-100K (u.data, u.item) plus optional TMDB overviews and posters",
    "movielens-latest": "MovieLens latest-small (ratings.csv, movies.csv), text only",
    "sequences": "ID-only sequences: one line per user, the user id then item ids oldest first (P5-style "
                 "user_sequence.txt, e.g. the Amazon Beauty/Sports/Toys sets)",
}
