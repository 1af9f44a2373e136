import os

import pyarrow as pa
import pytest

from lsun_hitl.storage import Storage, StorageError


def test_atomic_write_replaces_whole_file_and_leaves_no_temporaries(tmp_path):
    s = Storage(str(tmp_path))
    path = s.path("a/b/file.bin")
    s.write_bytes(path, b"old")
    s.write_bytes(path, b"new content")
    assert open(path, "rb").read() == b"new content"
    assert os.listdir(tmp_path / "a" / "b") == ["file.bin"]


def test_write_if_absent_is_idempotent(tmp_path):
    s = Storage(str(tmp_path))
    path = s.path("x.bin")
    assert s.write_if_absent(path, b"first") is True
    assert s.write_if_absent(path, b"second") is False
    assert s.read_bytes(path) == b"first"


def test_table_roundtrip_and_urls(tmp_path):
    s = Storage(str(tmp_path))
    t = pa.table({"a": [1, 2, 3]})
    s.write_table(s.path("t.parquet"), t)
    assert s.read_table(s.path("t.parquet")).equals(t)
    assert s.url_of("t.parquet").startswith("file://")


def test_unwritable_root_is_named_in_the_error(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    s = Storage(str(blocker / "root"))
    with pytest.raises(StorageError, match="cannot be written") as err:
        s.check_writable()
    assert str(blocker) in str(err.value)


def test_s3_storage_roundtrip(s3_bucket):
    url, options = s3_bucket
    s = Storage(url + "/prefix", options)
    s.check_writable()
    s.write_table(s.path("m/t.parquet"), pa.table({"x": ["a", "b"]}))
    assert s.read_table(s.path("m/t.parquet")).column("x").to_pylist() == ["a", "b"]
    assert s.url_of("m/t.parquet") == url + "/prefix/m/t.parquet"
