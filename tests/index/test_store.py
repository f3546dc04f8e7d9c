"""FAISS store: exact and approximate search against IndexFlat ground truth, versions, manifests, ids."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import faiss
import numpy as np
import polars as pl
import pytest

from data.ids import faiss_ids
from index.store import (
    IndexStateError,
    Manifest,
    build_faiss,
    embeddings_table,
    empty_index,
    list_versions,
    live_name,
    live_version,
    prune_versions,
    read_vectors,
    read_version,
    refill_index,
    set_live,
    update_index,
    write_version,
)


def _clustered(n: int, d: int, clusters: int, seed: int, noise: float = 1.0) -> np.ndarray:
    """Unit vectors around ``clusters`` random centres (like item embeddings), float32 ``(n, d)``.

    With ``noise=1.0`` the clusters overlap, so approximate search is not trivially exact (IVF64 with one
    probe finds under 90% of the true top-10 here).
    """
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((clusters, d)).astype(np.float32)
    x = centres[rng.integers(0, clusters, n)] + noise * rng.standard_normal((n, d)).astype(np.float32)
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


@pytest.fixture(scope="module")
def data() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Database 5000x32, 200 queries from the same distribution, and sparse non-contiguous int64 ids."""
    base = _clustered(5200, 32, 50, seed=0)
    ids = np.arange(5000, dtype=np.int64) * 7 + 1000
    return base[:5000], base[5000:], ids


def _ground_truth(xb: np.ndarray, xq: np.ndarray, ids: np.ndarray, k: int) -> np.ndarray:
    flat = faiss.IndexFlatIP(xb.shape[1])
    flat.add(xb)
    _, rows = flat.search(xq, k)
    return ids[rows]


def _recall(found: np.ndarray, truth: np.ndarray) -> float:
    return float(np.mean([len(set(f) & set(t)) / len(t) for f, t in zip(found, truth)]))


def test_flat_equals_exact_numpy_top_k(data) -> None:
    xb, xq, ids = data
    index = build_faiss(xb, ids, "Flat")
    assert isinstance(index, faiss.IndexIDMap2) and index.ntotal == 5000 and index.d == 32
    scores, found = index.search(xq, 10)
    exact = xq @ xb.T  # (Q, N)
    order = np.argsort(-exact, axis=1, kind="stable")[:, :10]
    np.testing.assert_array_equal(found, ids[order])
    np.testing.assert_allclose(scores, np.take_along_axis(exact, order, 1), atol=1e-5)
    # IndexIDMap2 keeps stable ids: reconstruct by id returns the stored vector.
    np.testing.assert_allclose(index.reconstruct(int(ids[123])), xb[123])


@pytest.mark.parametrize("factory,nprobe,ef", [("HNSW32", 16, 64), ("IVF64,Flat", 8, 64)])
def test_approximate_recall_against_flat(data, factory: str, nprobe: int, ef: int) -> None:
    xb, xq, ids = data
    index = build_faiss(xb, ids, factory, nprobe=nprobe, ef_search=ef)
    base = faiss.downcast_index(index.index)
    if factory.startswith("IVF"):
        assert base.nprobe == nprobe and base.nlist == 64
    else:
        assert base.hnsw.efSearch == ef
    _, found = index.search(xq, 10)
    recall = _recall(found, _ground_truth(xb, xq, ids, 10))
    assert recall >= 0.9, f"{factory}: recall@10 {recall:.3f}"
    assert set(found.ravel()) <= set(ids)


def test_ivf_nprobe_matters(data) -> None:
    """nprobe really reaches the index: one probe finds less than all 64 (which is exhaustive)."""
    xb, xq, ids = data
    truth = _ground_truth(xb, xq, ids, 10)
    one = build_faiss(xb, ids, "IVF64,Flat", nprobe=1)
    every = build_faiss(xb, ids, "IVF64,Flat", nprobe=64)
    r1, r64 = _recall(one.search(xq, 10)[1], truth), _recall(every.search(xq, 10)[1], truth)
    assert r64 == pytest.approx(1.0)
    assert r1 < r64


def test_build_faiss_rejects_bad_input(data) -> None:
    xb, _, ids = data
    bad = xb[:10].copy()
    bad[3, 5] = np.nan
    with pytest.raises(IndexStateError, match="NaN or inf"):
        build_faiss(bad, ids[:10])
    with pytest.raises(AssertionError):
        build_faiss(xb[:10], ids[:9])


def test_bad_factory_strings_are_clear_errors() -> None:
    xb = _clustered(150, 32, 4, seed=2)
    ids = np.arange(150, dtype=np.int64)
    with pytest.raises(IndexStateError, match=r"^bad FAISS factory string 'Bogus123' for dimension 32: .*Bogus123$"):
        build_faiss(xb, ids, "Bogus123")
    with pytest.raises(IndexStateError, match=re.escape(
            "FAISS factory 'IVF1024,Flat' needs at least 1024 items to train, the catalog has 150; "
            "use a smaller one (e.g. 'Flat' or 'IVF3,Flat')")):
        build_faiss(xb, ids, "IVF1024,Flat")
    with pytest.raises(IndexStateError, match="'PQ8' needs at least 256 items"):  # 2**8 centroids per sub-quantizer
        build_faiss(xb, ids, "PQ8")
    # The same checks without any vectors (build_index runs them before embedding the catalog).
    with pytest.raises(IndexStateError, match="bad FAISS factory string 'Bogus123' for dimension 32"):
        empty_index("Bogus123", 32, 150)
    with pytest.raises(IndexStateError, match="needs at least 1024 items to train, the catalog has 1023"):
        empty_index("IVF1024,Flat", 32, 1023)
    assert empty_index("IVF1024,Flat", 32, 1024).ntotal == 0
    assert empty_index("Flat", 32, 0).is_trained
    # A factory that fits trains on the vectors themselves.
    assert build_faiss(xb, ids, "IVF3,Flat").ntotal == 150


# --- versions on disk ----------------------------------------------------------------------------------------


def _version_inputs(n: int = 40, d: int = 8, fingerprint: str = "f" * 64):
    xb = _clustered(n, d, 4, seed=1)
    item_ids = pl.Series("item_id", [f"item-{i}" for i in range(n)])
    fids = faiss_ids(item_ids)
    index = build_faiss(xb, fids)
    items = pl.DataFrame({"faiss_id": fids, "item_id": item_ids, "title": [f"Title {i}" for i in range(n)]})
    manifest = Manifest(fingerprint=fingerprint, dim=d, metric="ip", count=n, factory="Flat",
                        created="2026-01-01T00:00:00Z", catalog_sha256="abc")
    return xb, index, items, manifest


def test_write_and_read_version_round_trip(tmp_path: Path) -> None:
    xb, index, items, manifest = _version_inputs()
    folder = write_version(tmp_path / "index", index, items, manifest)
    assert folder.parent == tmp_path / "index"
    assert sorted(p.name for p in folder.iterdir()) == ["index.faiss", "items.parquet", "manifest.json"]
    assert live_version(tmp_path / "index") == folder
    assert not [p for p in (tmp_path / "index").iterdir() if p.name.startswith(".")]  # no temporary leftovers

    loaded, loaded_items, loaded_manifest = read_version(folder, "f" * 64, 8)
    assert loaded_manifest == manifest
    assert loaded_items.equals(items)
    assert loaded.ntotal == 40
    np.testing.assert_array_equal(loaded.search(xb[:5], 3)[1], index.search(xb[:5], 3)[1])

    # A second version becomes live; the first stays readable; LIVE can be moved back.
    _, index2, items2, manifest2 = _version_inputs(fingerprint="e" * 64)
    folder2 = write_version(tmp_path / "index", index2, items2, manifest2)
    assert folder2 != folder and live_version(tmp_path / "index") == folder2
    set_live(tmp_path / "index", folder.name)
    assert live_version(tmp_path / "index") == folder
    staged = write_version(tmp_path / "index", index2, items2, manifest2, make_live=False)
    assert live_version(tmp_path / "index") == folder and staged.is_dir()


def test_write_version_refuses_count_mismatch(tmp_path: Path) -> None:
    _, index, items, manifest = _version_inputs()
    with pytest.raises(IndexStateError, match="items table 39"):
        write_version(tmp_path / "index", index, items.head(39), manifest)
    assert not (tmp_path / "index" / "LIVE").exists()


def test_read_version_refuses_mismatch(tmp_path: Path) -> None:
    _, index, items, manifest = _version_inputs()
    folder = write_version(tmp_path / "index", index, items, manifest)
    with pytest.raises(IndexStateError, match="fingerprint ffffffffffff.*have 000000000000"):
        read_version(folder, "0" * 64, 8)
    with pytest.raises(IndexStateError, match="index dimension 8 does not match the towers' dimension 16"):
        read_version(folder, "f" * 64, 16)
    # A manifest that lies about the contents is caught too.
    data = json.loads((folder / "manifest.json").read_text())
    (folder / "manifest.json").write_text(json.dumps(dict(data, count=41)))
    with pytest.raises(IndexStateError, match="manifest says 41"):
        read_version(folder)
    (folder / "manifest.json").write_text("{not json")
    with pytest.raises(IndexStateError, match="unreadable index manifest"):
        read_version(folder)


def test_live_pointer_errors(tmp_path: Path) -> None:
    root = tmp_path / "index"
    root.mkdir()
    with pytest.raises(IndexStateError, match="no index built yet"):
        live_version(root)
    (root / "LIVE").write_text("v-gone\n")
    with pytest.raises(IndexStateError, match="points at v-gone, which is missing or incomplete"):
        live_version(root)
    with pytest.raises(IndexStateError, match="not a complete index version"):
        set_live(root, "v-gone")


def test_corrupt_index_file(tmp_path: Path) -> None:
    _, index, items, manifest = _version_inputs()
    folder = write_version(tmp_path / "index", index, items, manifest)
    (folder / "index.faiss").write_bytes(b"garbage")
    with pytest.raises(IndexStateError, match="cannot read index files"):
        read_version(folder)


def test_faiss_ids_for_strings_are_stable_and_distinct() -> None:
    names = [f"B00{i:05d}" for i in range(2000)] + ["007", "7", "", "é"]
    ids = faiss_ids(pl.Series("item_id", names))
    assert ids.dtype == np.int64 and len(ids) == len(names)
    assert len(np.unique(ids)) == len(names)
    assert (ids >= 0).all()
    # Stable: same id, same FAISS id, whatever the order or the other ids around it.
    again = faiss_ids(pl.Series("item_id", list(reversed(names))))
    np.testing.assert_array_equal(again[::-1], ids)
    assert faiss_ids(pl.Series("item_id", ["7"]))[0] == ids[names.index("7")]
    assert ids[names.index("007")] != ids[names.index("7")]


def test_faiss_ids_for_integers_are_the_ids() -> None:
    ids = faiss_ids(pl.Series("item_id", [5, 1, 1682, 2**40]))
    np.testing.assert_array_equal(ids, np.array([5, 1, 1682, 2**40], dtype=np.int64))


# --- in-place updates, retired rows, manifests, pruning ------------------------------------------------------


@pytest.mark.parametrize("factory", ["Flat", "IVF16,Flat", "HNSW16"])
def test_update_or_refill_equals_a_rebuild(data, factory: str) -> None:
    """Remove 50 ids, re-add 20 of them with new vectors and 30 new ids: the same answers as exact search
    over the final vectors. Flat updates in place; IVF (whose lists keep stale internal ids under
    IndexIDMap2) and HNSW (no removal) refuse, untouched, and are refilled with their training kept."""
    xb, xq, ids = data
    old, new_vectors = xb[:1000], _clustered(50, 32, 50, seed=9)
    index = build_faiss(old, ids[:1000], factory, nprobe=16, ef_search=256)
    remove = ids[100:150]
    add_ids = np.concatenate([ids[100:120], ids[1000:1030]])
    final_ids = np.concatenate([ids[:100], ids[150:1000], add_ids])
    final = np.concatenate([old[:100], old[150:1000], new_vectors])
    if factory == "Flat":
        assert update_index(index, remove, new_vectors, add_ids)
    else:
        assert not update_index(index, remove, new_vectors, add_ids) and index.ntotal == 1000
        centroids = faiss.extract_index_ivf(index.index).quantizer.reconstruct_n(0, 16) if "IVF" in factory else None
        refill_index(index, final, final_ids)
        if centroids is not None:  # the training is kept, not redone
            np.testing.assert_array_equal(faiss.extract_index_ivf(index.index).quantizer.reconstruct_n(0, 16),
                                          centroids)
    assert index.ntotal == len(final_ids) == 1000
    scores, found = index.search(xq, 10)
    exact = xq @ final.T
    order = np.argsort(-exact, axis=1, kind="stable")[:, :10]
    truth = final_ids[order]
    if factory == "HNSW16":  # approximate: ids must be right where found
        assert _recall(found, truth) >= 0.95 and set(found.ravel()) <= set(final_ids)
    else:
        np.testing.assert_array_equal(found, truth)
        np.testing.assert_allclose(scores, np.take_along_axis(exact, order, 1), atol=1e-5)
    if "IVF" not in factory:  # (IVF reconstructs only with a direct map)
        np.testing.assert_allclose(index.reconstruct(int(ids[1000])), new_vectors[20], atol=1e-6)


def test_update_index_adds_to_any_type_and_checks_removals(data) -> None:
    xb, xq, ids = data
    for factory in ("IVF16,Flat", "HNSW16"):
        index = build_faiss(xb[:500], ids[:500], factory, nprobe=16, ef_search=256)
        assert update_index(index, np.empty(0, dtype=np.int64), xb[500:520], ids[500:520])  # adding works
        assert index.ntotal == 520
        _, found = index.search(xb[500:520], 1)
        assert (found[:, 0] == ids[500:520]).mean() >= 0.95
    flat = build_faiss(xb[:200], ids[:200])
    with pytest.raises(IndexStateError, match="removed 1 of 2 ids"):
        update_index(flat, np.array([ids[0], 123456789]), xb[:0], ids[:0])


def _with_retired(n: int = 40, retired: int = 3, d: int = 8):
    """A version whose last ``retired`` rows are kept for histories only (not in the FAISS index)."""
    xb = _clustered(n, d, 4, seed=1)
    item_ids = pl.Series("item_id", list(range(n)))
    fids = faiss_ids(item_ids)
    items = pl.DataFrame({"faiss_id": fids, "item_id": item_ids, "title": [f"T{i}" for i in range(n)],
                          "text": [None] * n, "content_hash": [f"h{i}" for i in range(n)],
                          "searchable": [i < n - retired for i in range(n)]})
    index = build_faiss(xb[: n - retired], fids[: n - retired])
    manifest = Manifest(fingerprint="f" * 64, dim=d, metric="ip", count=n - retired, factory="Flat",
                        created="2026-01-01T00:00:00Z", retired=retired)
    return xb, index, items, manifest


def test_retired_rows_round_trip_with_export(tmp_path: Path) -> None:
    xb, index, items, manifest = _with_retired()
    folder = write_version(tmp_path / "index", index, items, manifest, vectors=xb,
                           embeddings=embeddings_table(items, xb, manifest.fingerprint))
    loaded, loaded_items, loaded_manifest = read_version(folder, "f" * 64, 8)
    assert loaded.ntotal == 37 and loaded_items.height == loaded_manifest.rows == 40
    np.testing.assert_array_equal(read_vectors(folder, loaded_manifest), xb)  # retired rows keep their vectors
    export = pl.read_parquet(folder / "embeddings" / "part-00000.parquet")
    assert export.columns == ["item_id", "faiss_id", "vector", "fingerprint", "content_hash", "searchable"]
    np.testing.assert_array_equal(export["vector"].to_numpy(), xb)
    assert export["searchable"].sum() == 37
    with pytest.raises(IndexStateError, match=r"manifest 37 \(\+3 retired\)"):
        write_version(tmp_path / "index", index, items.head(39), manifest)


def test_manifest_refuses_newer_format_and_other_metric(tmp_path: Path) -> None:
    _, index, items, manifest = _version_inputs()
    folder = write_version(tmp_path / "index", index, items, manifest)
    data = json.loads((folder / "manifest.json").read_text())
    (folder / "manifest.json").write_text(json.dumps(dict(data, format=99)))
    with pytest.raises(IndexStateError, match="manifest format 99 is newer than this towerrec reads"):
        read_version(folder)
    # A newer format names its version even when it has keys this towerrec does not know.
    (folder / "manifest.json").write_text(json.dumps(dict(data, format=99, shards=4)))
    with pytest.raises(IndexStateError, match="manifest format 99 is newer than this towerrec reads"):
        read_version(folder)
    (folder / "manifest.json").write_text(json.dumps(dict(data, metric="l2")))
    with pytest.raises(IndexStateError, match="metric 'l2'"):
        read_version(folder)
    (folder / "manifest.json").write_text(json.dumps(dict(data, retired=2)))  # items table lacks those rows
    with pytest.raises(IndexStateError, match=r"items table 40 rows, manifest says 40 \(\+2 retired\)"):
        read_version(folder)
    # A version written before format 2 (no retired rows, no provenance) still reads.
    old = {k: v for k, v in data.items() if k not in ("retired", "base", "embedded", "mode", "catalog_path")}
    (folder / "manifest.json").write_text(json.dumps(dict(old, format=1)))
    assert read_version(folder)[2].rows == 40
    assert data["format"] == 3 and data["catalog_path"] == ""  # format 3 records the catalog's path


def test_prune_keeps_the_newest_and_the_live_version(tmp_path: Path) -> None:
    root = tmp_path / "index"
    _, index, items, manifest = _version_inputs()
    folders = [write_version(root, index, items, manifest) for _ in range(4)]
    assert list_versions(root) == folders  # names sort by creation time, even within one second
    set_live(root, folders[0].name)
    stale = root / ".v20200101-000000-000000-dead-x1y2z3_4"  # a writer killed long ago
    stale.mkdir()
    os.utime(stale, (0, 0))
    deleted = prune_versions(root, keep=2)
    assert sorted(deleted) == sorted([folders[1], stale])
    assert list_versions(root) == [folders[0], folders[2], folders[3]] and live_version(root) == folders[0]
    with pytest.raises(IndexStateError, match="keep must be at least 1"):
        prune_versions(root, keep=0)


@pytest.mark.parametrize("content,says", [
    ("", "is empty: it names no live version"),
    ("  \n", "is empty: it names no live version"),
    ("../../etc\n", "names '../../etc', which is not a version folder of"),
    ("/etc\n", "names '/etc', which is not a version folder of"),
    (".v20260101-000000-000000-abcd-x1y2z3_4\n", "which is not a version folder of"),
    (b"\xff\xfe\x00", "unreadable"),
])
def test_a_bad_live_pointer_is_named_with_how_to_recover(tmp_path: Path, content, says: str) -> None:
    """An empty, unreadable or escaping LIVE is one clear error naming the file and the commands that fix it."""
    root = tmp_path / "run" / "index"
    _, index, items, manifest = _version_inputs()
    write_version(root, index, items, manifest)
    (root / "LIVE").write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(IndexStateError) as err:
        live_version(root)
    message = str(err.value)
    assert says in message and str(root / "LIVE") in message
    assert f"towerrec build-index --run {root.parent}" in message and "towerrec reindex" in message
    assert "points at" not in message


def test_live_pointer_that_is_a_folder_is_named(tmp_path: Path) -> None:
    root = tmp_path / "index"
    (root / "LIVE").mkdir(parents=True)
    with pytest.raises(IndexStateError, match=r"LIVE: not a file .*remove it, then publish a new version"):
        live_version(root)


def test_set_live_refuses_a_name_outside_the_index_folder(tmp_path: Path) -> None:
    _, index, items, manifest = _version_inputs()
    elsewhere = write_version(tmp_path / "other", index, items, manifest, make_live=False)
    root = tmp_path / "index"
    write_version(root, index, items, manifest)
    before = (root / "LIVE").read_text()
    with pytest.raises(IndexStateError, match="not a complete index version"):
        set_live(root, f"../other/{elsewhere.name}")
    assert (root / "LIVE").read_text() == before


def test_prune_deletes_only_what_towerrec_wrote(tmp_path: Path) -> None:
    """Folders and links that a person put in index/ survive pruning, even when they look almost like ours."""
    root = tmp_path / "index"
    _, index, items, manifest = _version_inputs()
    folders = [write_version(root, index, items, manifest) for _ in range(3)]
    outside = tmp_path / "precious"
    outside.mkdir()
    (outside / "manifest.json").write_text("{}")
    foreign = {
        "vacation": "folder",  # starts with "v" and holds a manifest
        ".vscode": "folder",  # starts with ".v", old
        "v20260101-000000-000000-abcd-copy": "folder",  # a version name with a suffix
        "v20200101-000000-000000-abcd": "link",  # a version name, but a symlink to a folder elsewhere
        ".v20200101-000000-000000-abcd-x1y2z3_4": "link",  # a staging name, but a symlink
    }
    for name, kind in foreign.items():
        if kind == "folder":
            (root / name).mkdir()
            (root / name / "manifest.json").write_text("{}")
            (root / name / "notes.txt").write_text("mine")
        else:
            (root / name).symlink_to(outside, target_is_directory=True)
        os.utime(root / name, (0, 0), follow_symlinks=False)
    deleted = prune_versions(root, keep=1)
    assert sorted(deleted) == folders[:2]
    assert list_versions(root) == [folders[2]]
    for name, kind in foreign.items():
        assert (root / name).is_symlink() if kind == "link" else (root / name / "notes.txt").read_text() == "mine"
    assert (outside / "manifest.json").read_text() == "{}"


def test_live_name_reads_the_pointer_for_serving(tmp_path: Path) -> None:
    """``live_name``: None without LIVE (serve waits for a first version), the name otherwise, checked the same."""
    root = tmp_path / "index"
    root.mkdir()
    assert live_name(root) is None
    (root / "LIVE").write_text("v20260101-000000-000000-abcd\n")
    assert live_name(root) == "v20260101-000000-000000-abcd"  # whether it exists is live_version's check
    (root / "LIVE").write_text("../run2/index/v1\n")
    with pytest.raises(IndexStateError, match="which is not a version folder of"):
        live_name(root)


def test_a_prune_killed_mid_delete_leaves_no_half_version(tmp_path: Path, monkeypatch) -> None:
    """Killed while deleting an old version: every listed version still loads (the rest is a staging folder)."""
    import index.store as store

    root = tmp_path / "index"
    _, index, items, manifest = _version_inputs()
    folders = [write_version(root, index, items, manifest) for _ in range(3)]

    def killed_rmtree(path, ignore_errors=False):
        (Path(path) / "index.faiss").unlink()  # the first file gone, then the process dies
        raise KeyboardInterrupt

    monkeypatch.setattr(store.shutil, "rmtree", killed_rmtree)
    with pytest.raises(KeyboardInterrupt):
        prune_versions(root, keep=1)
    monkeypatch.undo()
    assert list_versions(root) == folders[1:] and live_version(root) == folders[2]
    for folder in list_versions(root):
        read_version(folder)
    (left,) = [p for p in root.iterdir() if p.name.startswith(".v")]
    os.utime(left, (0, 0))
    assert left in prune_versions(root, keep=3) and not left.exists()  # a later prune removes the staging folder
