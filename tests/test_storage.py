"""LocalBlobStore round trip, gs:// parsing, stale files replaced on upload."""

from __future__ import annotations

import pytest

from storage import LocalBlobStore, MissingObject, parse_gs_uri


def test_parse_gs_uri():
    assert parse_gs_uri("gs://bucket/a/b.json") == ("bucket", "a/b.json")
    assert parse_gs_uri("gs://bucket/") == ("bucket", "")
    for bad in ("s3://x/y", "gs:///key", "gs://b/../etc"):
        with pytest.raises(ValueError):
            parse_gs_uri(bad)


def test_local_round_trip_and_stale_files(tmp_path):
    store = LocalBlobStore(tmp_path / "root")
    src = tmp_path / "out"
    (src / "sub").mkdir(parents=True)
    (src / "a.txt").write_text("A")
    (src / "sub" / "b.txt").write_text("B")
    uris = store.upload_dir(src, "gs://bkt/models/job1/")
    assert uris == ["gs://bkt/models/job1/a.txt", "gs://bkt/models/job1/sub/b.txt"]
    assert store.read_bytes("gs://bkt/models/job1/sub/b.txt") == b"B"
    assert store.list("gs://bkt/models/job1/") == uris
    (src / "a.txt").unlink()
    assert store.upload_dir(src, "gs://bkt/models/job1/") == ["gs://bkt/models/job1/sub/b.txt"]
    assert store.list("gs://bkt/models/") == ["gs://bkt/models/job1/sub/b.txt"]  # the stale a.txt is gone
    got = store.download("gs://bkt/models/job1/sub/b.txt", tmp_path / "dl" / "b.txt")
    assert got.read_text() == "B"
    with pytest.raises(MissingObject, match="gs://bkt/nope not found"):
        store.read_bytes("gs://bkt/nope")
