"""Reindex: only changed items embedded, retired items, resumable chunks, several processes, the CLI."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import polars as pl
import pytest
from safetensors import safe_open
from safetensors.torch import save_file

import cli
import index.reindex as reindex_module
from data.catalog import load_catalog, write_catalog
from data.rundir import RunDir
from errors import CatalogError, ConfigError, IndexStateError
from index.build import build_index
from index.evaluate import evaluate
from index.plan import content_hashes
from index.recommender import Recommender
from index.reindex import reindex
from index.store import Manifest, list_versions, live_version, prune_versions, read_vectors, set_live

REPO = Path(__file__).resolve().parents[2]
NEW_IDS = (900001, 900002)
# What a reindex reports as the reason for the catalog it indexed (ReindexResult.catalog_source, CLI output).
GIVEN, LIVE, TRAINING = "given", "the live version's catalog", "the training catalog"


def changed_catalog(source: Path, out: Path) -> dict:
    """The tiny catalog with 1 item removed (the most rated), 2 edited (title; title + poster), 2 added.

    The added items come with 6 ratings each (after every other rating of those users), so a 5-core split
    keeps them. Returns the ids: ``{"removed": x, "edited": [a, b], "added": [...]}``.
    """
    cat = load_catalog(source)
    items, events = cat.items, cat.interactions
    popular = events.group_by("item_id").len().sort(["len", "item_id"], descending=[True, False])["item_id"]
    removed = int(popular[0])
    edited = [int(popular[1]), int(popular[2])]
    other_poster = items.filter(pl.col("image_path").is_not_null() & ~pl.col("item_id").is_in([removed, *edited]))
    poster = other_poster["image_path"][0]
    items = items.filter(pl.col("item_id") != removed).with_columns(
        pl.when(pl.col("item_id").is_in(edited)).then(pl.col("title") + " (Remastered)").otherwise(pl.col("title"))
        .alias("title"),
        pl.when(pl.col("item_id") == edited[1]).then(pl.lit(poster)).otherwise(pl.col("image_path")).alias("image_path"),
    )
    added = pl.DataFrame({"item_id": list(NEW_IDS), "title": ["Brand New Film (2026)", "Another Premiere (2026)"],
                          "text": ["A heist in a lighthouse.", "Two robots open a bakery."],
                          "image_path": [None, None], "audio_path": [None, None], "year": [2026, 2026]},
                         schema=items.schema)
    items = pl.concat([items, added])
    users = events["user_id"].unique().sort()[:6].to_list()
    last = int(events["timestamp"].max())
    new_events = pl.DataFrame([(u, i, last + 10 * k + j, 4.0) for k, u in enumerate(users)
                               for j, i in enumerate(NEW_IDS)], schema=events.schema, orient="row")
    events = pl.concat([events.filter(pl.col("item_id") != removed), new_events])
    media = {rel: source / rel for col in ("image_path", "audio_path") for rel in items[col].drop_nulls().unique()}
    write_catalog(out, items, events, media)
    return {"removed": removed, "edited": edited, "added": list(NEW_IDS)}


def copy_run(run: Path, dst: Path) -> Path:
    shutil.copytree(run, dst)
    return dst


def version_vectors(folder: Path) -> dict:
    """``{item_id: vector}`` of every row of a version, and its items table."""
    items = pl.read_parquet(folder / RunDir.INDEX_ITEMS)
    vectors = read_vectors(folder, Manifest.read(folder / RunDir.MANIFEST))
    return dict(zip(items["item_id"].to_list(), np.asarray(vectors))), items


@pytest.fixture(scope="module")
def new_catalog(tiny_catalog: Path, tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("reindex") / "catalog-v2"
    return out, changed_catalog(tiny_catalog, out)


@pytest.fixture(scope="module")
def incremental(tiny_run: Path, new_catalog, tmp_path_factory):
    """A copy of the tiny run reindexed on the changed catalog: ``(run, result, previous live folder)``."""
    run = copy_run(tiny_run, tmp_path_factory.mktemp("incremental") / "run")
    before = live_version(run / "index")
    result = reindex(run, new_catalog[0], chunk_size=2, device="cpu", progress=False)
    return run, result, before


@pytest.fixture(scope="module")
def rebuilt(tiny_run: Path, new_catalog, tmp_path_factory) -> tuple[Path, Path]:
    """Another copy with the changed catalog embedded from scratch (`build-index --catalog`)."""
    run = copy_run(tiny_run, tmp_path_factory.mktemp("rebuilt") / "run")
    return run, build_index(run, new_catalog[0], device="cpu", progress=False)


def test_incremental_embeds_only_what_changed(incremental, new_catalog) -> None:
    run, r, before = incremental
    ids = new_catalog[1]
    assert r.mode == "incremental" and r.index_update == "in-place"
    # 2 edited + 2 added; the removed item is retired with its vector copied; 147 unchanged rows copied.
    assert (r.embedded, r.added, r.edited, r.removed, r.retired, r.dropped) == (4, 2, 2, 1, 1, 0)
    assert (r.rows, r.searchable, r.copied) == (152, 151, 148)
    assert r.chunks == 2 and r.resumed_chunks == 0
    assert r.version == live_version(run / "index") != before
    manifest = Manifest.read(r.version / RunDir.MANIFEST)
    assert (manifest.count, manifest.retired, manifest.base, manifest.embedded, manifest.mode) == \
        (151, 1, before.name, 4, "incremental")
    # Unchanged items keep their vectors bit for bit; edited ones changed.
    old, _ = version_vectors(before)
    new, items = version_vectors(r.version)
    changed = {ids["removed"], *ids["edited"], *ids["added"]}
    for item_id, v in new.items():
        if item_id not in changed:
            np.testing.assert_array_equal(v, old[item_id])
    for item_id in ids["edited"]:
        assert not np.allclose(new[item_id], old[item_id], atol=1e-4)
    np.testing.assert_array_equal(new[ids["removed"]], old[ids["removed"]])
    # The retired item is a row of the version (vectors, items table, export) but not in the FAISS index.
    retired = items.filter(~pl.col("searchable"))
    assert retired["item_id"].to_list() == [ids["removed"]]
    assert not (run / "index" / ".reindex").exists() and not list((run / "index").glob(".reindex-*"))


def test_incremental_equals_full_rebuild(incremental, rebuilt) -> None:
    """Same rows, same vectors (to float rounding of other batch shapes), same top-k for every user."""
    run, r, _ = incremental
    inc, inc_items = version_vectors(r.version)
    full, full_items = version_vectors(rebuilt[1])
    assert Manifest.read(rebuilt[1] / RunDir.MANIFEST).mode == "full"
    assert inc_items.equals(full_items)  # same rows in the same order: catalog items, then the retired one
    for item_id, v in full.items():
        np.testing.assert_allclose(inc[item_id], v, atol=2e-6)
    a, b = Recommender.load(run, device="cpu"), Recommender.load(rebuilt[0], device="cpu")
    users = sorted(a.histories)
    got = a.recommend_batch(user_ids=users, k=10, rerank=False)
    want = b.recommend_batch(user_ids=users, k=10, rerank=False)
    assert [[x.item_id for x in g] for g in got] == [[x.item_id for x in w] for w in want]


def test_removed_item_breaks_no_user_and_is_never_recommended(incremental, rebuilt, new_catalog) -> None:
    ids = new_catalog[1]
    for run in (incremental[0], rebuilt[0]):  # after reindex, and after `build-index --catalog` (the bug)
        rec = Recommender.load(run, device="cpu")
        saw = [u for u, h in rec.histories.items() if ids["removed"] in h]
        assert saw
        everything = rec.index.ntotal  # the whole ranking, nothing excluded: the retired item is not in it
        hits = rec.search_vectors(rec.embed_histories([rec.history_of(u) for u in saw]), k=everything)
        for recs in rec.results(hits):
            assert ids["removed"] not in {x.item_id for x in recs} and len(recs) == everything == 151
        for recs in rec.recommend_batch(user_ids=saw, k=10, rerank=False):
            assert len(recs) == 10 and ids["removed"] not in {x.item_id for x in recs}
        new_user = rec.recommend(history=[ids["removed"], ids["edited"][0]], k=5, rerank=False)
        assert len(new_user) == 5 and ids["removed"] not in {x.item_id for x in new_user}
        only_new = rec.recommend(user_id=saw[0], k=5, rerank=False, allow=ids["added"] + [ids["removed"]])
        assert sorted(x.item_id for x in only_new) == sorted(ids["added"])  # cold items are served
        out = evaluate(run, users=8, rerank=False, progress=False, recommender=rec)
        assert out["users"] == 8 and 0.0 <= out["retrieval"]["recall@10"] <= 1.0


def test_second_reindex_is_a_no_op(incremental, new_catalog) -> None:
    run, r, _ = incremental
    again = reindex(run, new_catalog[0], device="cpu", progress=False)
    assert again.mode == "unchanged" and again.version == r.version and again.embedded == 0
    assert live_version(run / "index") == r.version


def test_export_embeddings_parquet(incremental, new_catalog) -> None:
    _, r, _ = incremental
    parts = sorted((r.version / RunDir.INDEX_EMBEDDINGS).glob("part-*.parquet"))
    table = pl.concat([pl.read_parquet(p) for p in parts])
    assert table.columns == ["item_id", "faiss_id", "vector", "fingerprint", "content_hash", "searchable"]
    assert table.schema["vector"] == pl.Array(pl.Float32, 32) and table.schema["faiss_id"] == pl.Int64
    manifest = Manifest.read(r.version / RunDir.MANIFEST)
    assert table.height == manifest.rows and (table["fingerprint"] == manifest.fingerprint).all()
    vectors, _ = version_vectors(r.version)
    for item_id, v in zip(table["item_id"].to_list(), table["vector"].to_numpy()):
        np.testing.assert_array_equal(v, vectors[item_id])
    cat = load_catalog(new_catalog[0])
    id_rows = np.full(cat.items.height, -1)  # any id rows: only the comparison below depends on them
    hashes = dict(zip(table["item_id"].to_list(), table["content_hash"].to_list()))
    ours = dict(zip(cat.items["item_id"].to_list(), content_hashes(cat, _tiny_config(), id_rows)))
    assert ours[NEW_IDS[0]] == hashes[NEW_IDS[0]]  # new items have no id row either


def _tiny_config():
    from configs import load_config

    return load_config("tiny")


def _perturb_item_tower(run: Path) -> None:
    path = run / RunDir.WEIGHTS
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
        state = {k: f.get_tensor(k) for k in f.keys()}
    name = sorted(k for k in state if k.startswith("item.fusion."))[0]
    state[name] = state[name] + 0.5
    save_file(state, str(path), metadata=meta)


def test_changed_item_tower_embeds_everything(tiny_run: Path, tmp_path: Path) -> None:
    run = copy_run(tiny_run, tmp_path / "run")
    before = live_version(run / "index")
    _perturb_item_tower(run)
    r = reindex(run, device="cpu", progress=False)
    assert r.mode == "full" and r.embedded == r.rows == 150 and r.copied == 0 and r.index_update == "rebuilt"
    assert Manifest.read(r.version / RunDir.MANIFEST).fingerprint != Manifest.read(before / RunDir.MANIFEST).fingerprint
    Recommender.load(run, device="cpu")  # the new towers and the new version match


def test_killed_reindex_resumes_from_its_last_chunk(tiny_run: Path, tmp_path: Path, monkeypatch) -> None:
    run = copy_run(tiny_run, tmp_path / "run")
    live = live_version(run / "index")
    versions = list_versions(run / "index")
    written = []
    real_write = reindex_module._write_chunk

    def crash_after_three(path, rows, vectors, fingerprint):
        if len(written) == 3:
            raise KeyboardInterrupt  # as a Ctrl-C (or a kill) between two chunks
        real_write(path, rows, vectors, fingerprint)
        written.append(path.name)

    monkeypatch.setattr(reindex_module, "_write_chunk", crash_after_three)
    with pytest.raises(KeyboardInterrupt):
        reindex(run, full=True, chunk_size=16, device="cpu", progress=False)
    # Nothing published; the three finished chunks are on disk (plus the leftover of a write cut short).
    assert live_version(run / "index") == live and list_versions(run / "index") == versions
    (work,) = list((run / "index").glob(".reindex-*"))
    assert sorted(p.name for p in work.glob("chunk-*.parquet")) == written
    (work / ".chunk-000003.parquet.deadbeef.tmp").write_bytes(b"half a parquet file")

    monkeypatch.setattr(reindex_module, "_write_chunk", real_write)
    r = reindex(run, full=True, chunk_size=16, device="cpu", progress=False)
    assert (r.chunks, r.resumed_chunks, r.embedded) == (10, 3, 150)
    assert r.version != live and live_version(run / "index") == r.version and not work.exists()
    uninterrupted = reindex(copy_run(tiny_run, tmp_path / "run2"), full=True, chunk_size=16, device="cpu",
                            progress=False)
    a, _ = version_vectors(r.version)
    b, _ = version_vectors(uninterrupted.version)
    for item_id, v in b.items():
        np.testing.assert_array_equal(a[item_id], v)  # same chunks, same batches: the same bits


def test_stale_plan_is_discarded(tiny_run: Path, tmp_path: Path, monkeypatch) -> None:
    run = copy_run(tiny_run, tmp_path / "run")

    def crash(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr(reindex_module, "_Embedder", lambda *a: crash)
    with pytest.raises(KeyboardInterrupt):
        reindex(run, full=True, chunk_size=16, device="cpu", progress=False)
    (old,) = list((run / "index").glob(".reindex-*"))
    monkeypatch.undo()
    r = reindex(run, full=True, chunk_size=64, device="cpu", progress=False)  # another chunking: another plan
    assert r.resumed_chunks == 0 and r.chunks == 3 and not old.exists()


def test_versions_are_pruned_but_never_the_live_one(tiny_run: Path, tmp_path: Path) -> None:
    run = copy_run(tiny_run, tmp_path / "run")
    first = live_version(run / "index")
    folders = [build_index(run, device="cpu", progress=False, keep_versions=2) for _ in range(2)]
    assert list_versions(run / "index") == folders and not first.exists()
    set_live(run / "index", folders[0].name)  # rolled back by hand: pruning keeps it although it is older
    assert prune_versions(run / "index", keep=1) == [] and list_versions(run / "index") == folders
    newest = build_index(run, device="cpu", progress=False, keep_versions=1)
    assert list_versions(run / "index") == [newest] and live_version(run / "index") == newest
    with pytest.raises(ConfigError, match="keep_versions must be a positive integer"):
        reindex(run, keep_versions=0)


def test_a_second_reindex_of_the_same_run_is_refused(tiny_run: Path, tmp_path: Path) -> None:
    run = copy_run(tiny_run, tmp_path / "run")
    with reindex_module._index_lock(run / "index"):
        with pytest.raises(IndexStateError, match="another reindex or build-index of this run is running"):
            reindex(run, device="cpu", progress=False)


def test_cli_reindex(incremental, new_catalog, capfd) -> None:
    run = incremental[0]
    assert cli.main(["reindex", "--run", str(run), "--catalog", str(new_catalog[0]), "--json", "--quiet",
                     "--device", "cpu"]) == 0
    out = json.loads(capfd.readouterr().out)
    assert out["mode"] == "unchanged" and out["version"] == str(incremental[1].version)
    assert cli.main(["reindex", "--run", str(run), "--chunk-size", "0", "--device", "cpu"]) == 2
    err = capfd.readouterr().err.strip().splitlines()
    assert err == ["towerrec reindex: error: --chunk-size must be at least 1, got 0"]


@pytest.mark.slow
def test_two_gloo_processes_write_their_own_chunks(rebuilt, tiny_run: Path, new_catalog, tmp_path: Path) -> None:
    """torchrun with 2 CPU processes: each embeds half the chunks; process 0 publishes the same vectors."""
    run = copy_run(tiny_run, tmp_path / "run")
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(REPO / "cli.py"),
           "reindex", "-v", "--run-dir", str(run), "--catalog", str(new_catalog[0]), "--full", "--chunk-size", "16",
           "--json", "--quiet", "--device", "cpu"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    assert len(lines) == 1  # one report, from process 0
    out = json.loads(lines[0])
    assert (out["mode"], out["chunks"], out["embedded"], out["retired"]) == ("full", 10, 152, 1)
    for rank in (0, 1):
        assert f"process {rank} of 2 embeds 5 of 10 chunk(s)" in proc.stderr
    a, _ = version_vectors(Path(out["version"]))
    b, _ = version_vectors(rebuilt[1])
    for item_id, v in b.items():
        np.testing.assert_allclose(a[item_id], v, atol=2e-6)
    assert not list((run / "index").glob(".reindex-*"))


# -- which catalog a plain reindex serves ----------------------------------------------------------------------
def _live_items(run: Path) -> pl.DataFrame:
    return pl.read_parquet(live_version(run / "index") / RunDir.INDEX_ITEMS)


def _assert_serves_changed_catalog(run: Path, ids: dict) -> None:
    """The live version holds the changed catalog: its removed item retired, its new items searchable, its
    edited titles."""
    items = _live_items(run)
    searchable = dict(zip(items["item_id"].to_list(), items["searchable"].to_list()))
    titles = dict(zip(items["item_id"].to_list(), items["title"].to_list()))
    assert searchable[ids["removed"]] is False
    assert all(searchable[x] for x in ids["added"])
    assert all(titles[x].endswith(" (Remastered)") for x in ids["edited"])


def test_plain_reindex_keeps_serving_the_catalog_of_the_live_version(tiny_run: Path, new_catalog, tmp_path: Path,
                                                                     capfd) -> None:
    """reindex --catalog B, then a plain reindex (and a plain build-index): B stays served, and each says so."""
    run = copy_run(tiny_run, tmp_path / "run")
    first = reindex(run, device="cpu", progress=False)
    assert first.catalog_source == LIVE and first.mode == "unchanged"
    assert first.catalog == Path(json.loads((run / RunDir.CATALOG_REF).read_text())["path"])
    given = reindex(run, new_catalog[0], device="cpu", progress=False)
    assert given.catalog_source == GIVEN and given.catalog == new_catalog[0].resolve()
    assert Manifest.read(given.version / RunDir.MANIFEST).catalog_path == str(new_catalog[0].resolve())
    _assert_serves_changed_catalog(run, new_catalog[1])

    plain = reindex(run, device="cpu", progress=False)
    assert plain.mode == "unchanged" and plain.version == given.version
    assert (plain.catalog, plain.catalog_source) == (new_catalog[0].resolve(), LIVE)
    _assert_serves_changed_catalog(run, new_catalog[1])

    assert cli.main(["build-index", "--run", str(run), "--quiet", "--device", "cpu"]) == 0
    out = capfd.readouterr().out.strip()
    assert out.endswith(f"(catalog {new_catalog[0].resolve()}: {LIVE})")
    _assert_serves_changed_catalog(run, new_catalog[1])
    assert cli.main(["reindex", "--run", str(run), "--json", "--quiet", "--device", "cpu"]) == 0
    report = json.loads(capfd.readouterr().out)
    assert (report["catalog"], report["catalog_source"]) == (str(new_catalog[0].resolve()), LIVE)


def test_a_recorded_catalog_that_is_gone_is_named_never_replaced(tiny_run: Path, new_catalog, tmp_path: Path,
                                                                 capfd) -> None:
    run = copy_run(tiny_run, tmp_path / "run")
    moved = shutil.copytree(new_catalog[0], tmp_path / "catalog-b")
    live = reindex(run, moved, device="cpu", progress=False).version
    shutil.rmtree(moved)
    for call in (lambda: reindex(run, device="cpu", progress=False), lambda: build_index(run, device="cpu",
                                                                                           progress=False)):
        with pytest.raises(CatalogError, match=rf"{moved.resolve()}: the catalog index version {live.name} was built "
                                               r"from is not there .*--catalog"):
            call()
    assert cli.main(["reindex", "--run", str(run), "--quiet", "--device", "cpu"]) == 2
    err = capfd.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(moved.resolve()) in err[0] and "--catalog" in err[0]
    assert live_version(run / "index") == live and list_versions(run / "index")[-1] == live
    _assert_serves_changed_catalog(run, new_catalog[1])
    again = reindex(run, new_catalog[0], device="cpu", progress=False)  # naming it again recovers
    assert again.catalog_source == GIVEN and again.mode == "incremental"


def test_a_version_without_a_recorded_path_falls_back_only_to_the_same_catalog(tiny_run: Path, new_catalog,
                                                                              tmp_path: Path) -> None:
    """A manifest of format 2 has the catalog's hash but not its path: the training catalog is used only when
    the hash is the training catalog's; otherwise --catalog is asked for."""
    run = copy_run(tiny_run, tmp_path / "run")

    def drop_path(folder: Path) -> None:
        data = json.loads((folder / RunDir.MANIFEST).read_text())
        del data["catalog_path"]
        (folder / RunDir.MANIFEST).write_text(json.dumps(dict(data, format=2)))

    drop_path(live_version(run / "index"))
    r = reindex(run, device="cpu", progress=False)
    assert r.catalog_source == TRAINING and r.mode == "incremental" and r.embedded == 0
    drop_path(reindex(run, new_catalog[0], device="cpu", progress=False).version)
    with pytest.raises(IndexStateError, match="built from a catalog other than the training catalog .* --catalog"):
        reindex(run, device="cpu", progress=False)


# -- flags and values that must be refused, naming what was typed ----------------------------------------------
@pytest.mark.parametrize("command", ["build-index", "reindex"])
@pytest.mark.parametrize("flags,says", [
    (["--factory", ""], "--factory is empty"),
    (["--factory", "  "], "--factory is empty"),
    (["--keep", "0"], "--keep must be at least 1 (index versions kept, the live one included), got 0"),
    (["--batch-size", "0"], "--batch-size must be at least 1, got 0"),
    (["--workers", "-1"], "--workers must be 0 or more, got -1"),
])
def test_cli_refuses_bad_index_flags_naming_them(tiny_run: Path, capfd, command: str, flags: list, says: str) -> None:
    before = sorted(p.name for p in (tiny_run / "index").iterdir())
    assert cli.main([command, "--run", str(tiny_run), "--quiet", "--device", "cpu", *flags]) == 2
    err = capfd.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"towerrec {command}: error: {says}")
    assert sorted(p.name for p in (tiny_run / "index").iterdir()) == before


@pytest.mark.parametrize("factory", ["", "   "])
def test_library_refuses_an_empty_factory(tiny_run: Path, factory: str) -> None:
    """An empty factory is refused, not replaced by the default (build-index's config default, reindex's live one)."""
    for call in (build_index, reindex):
        with pytest.raises(IndexStateError, match="factory must be a FAISS index_factory string"):
            call(tiny_run, factory=factory, device="cpu", progress=False)
    with pytest.raises(ConfigError, match="batch_size must be a positive integer, got 0"):
        reindex(tiny_run, batch_size=0)


# -- nothing that is not the reindex's is deleted or replaced -------------------------------------------------
def test_reindex_deletes_only_its_own_work_folders(tiny_run: Path, tmp_path: Path) -> None:
    run = copy_run(tiny_run, tmp_path / "run")
    root = run / "index"
    mine = root / ".reindex-notes"  # not a work folder name
    mine.mkdir()
    (mine / "plan.json").write_text("{}")
    shared = root / ".reindex-0123456789abcdef"  # a work folder name, holding a file a reindex never writes
    shared.mkdir()
    (shared / "plan.json").write_text("{}")
    (shared / "chunk-000000.parquet").write_bytes(b"stale")
    (shared / "README.txt").write_text("do not delete")
    stale = root / ".reindex-fedcba9876543210"  # an abandoned plan: removed
    stale.mkdir()
    (stale / "plan.json").write_text("{}")
    (stale / ".chunk-000001.parquet.0badf00d.tmp").write_bytes(b"half")
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    (outside / "plan.json").write_text("{}")
    (root / ".reindex-00000000000000aa").symlink_to(outside, target_is_directory=True)

    r = reindex(run, full=True, chunk_size=64, device="cpu", progress=False)
    assert r.mode == "full" and live_version(root) == r.version
    assert (mine / "plan.json").read_text() == "{}"
    assert sorted(p.name for p in shared.iterdir()) == ["README.txt"]
    assert not stale.exists()
    assert (root / ".reindex-00000000000000aa").is_symlink() and (outside / "plan.json").read_text() == "{}"


def test_an_index_path_or_live_pointer_that_is_not_ours_is_refused_untouched(tiny_run: Path, tmp_path: Path) -> None:
    run = copy_run(tiny_run, tmp_path / "run")
    shutil.rmtree(run / "index")
    (run / "index").write_text("my notes")
    with pytest.raises(IndexStateError, match=r"index: exists and is not a folder"):
        build_index(run, device="cpu", progress=False)
    assert (run / "index").read_text() == "my notes"

    (run / "index").unlink()
    shutil.copytree(tiny_run / "index", run / "index")
    (run / "index" / "LIVE").unlink()
    (run / "index" / "LIVE").mkdir()
    (run / "index" / "LIVE" / "keep.txt").write_text("mine")
    versions = list_versions(run / "index")
    with pytest.raises(IndexStateError, match=r"LIVE: exists and is not a file"):
        reindex(run, full=True, device="cpu", progress=False)
    assert (run / "index" / "LIVE" / "keep.txt").read_text() == "mine" and list_versions(run / "index") == versions
