import os

import fsspec
import pyarrow as pa
import pytest
from fsspec.implementations.memory import MemoryFileSystem

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


def test_s3_stream_write_that_fails_midway_publishes_nothing(s3_bucket):
    """A streamed write (a multipart upload: 12 MB sent in parts before the failure) that fails leaves
    the old object whole, or no object at all; the retried write runs the writer again from the start."""
    url, options = s3_bucket
    s = Storage(url + "/stream", options, retries=2, backoff_s=0.01)
    s.write_bytes(s.path("old.bin"), b"old")
    calls = []

    def failing(f) -> None:
        calls.append(1)
        for _ in range(12):
            f.write(os.urandom(1 << 20))
        raise OSError("injected: disk of the exporter failed")

    for name in ("old.bin", "new.bin"):
        with pytest.raises(StorageError, match=name):
            s.write_stream(s.path(name), failing)
    assert len(calls) == 4  # two tries per write
    assert s.read_bytes(s.path("old.bin")) == b"old"
    assert not s.exists(s.path("new.bin"))
    s.write_stream(s.path("new.bin"), lambda f: [f.write(b"x" * (6 << 20)) for _ in range(2)])
    assert len(s.read_bytes(s.path("new.bin"))) == 12 << 20


class FlakyFileSystem(MemoryFileSystem):
    """An object store that fails the next ``failures`` reads or writes with a connection error."""

    protocol = "flaky"
    failures = 0
    calls = 0

    @classmethod
    def _maybe_fail(cls) -> None:
        cls.calls += 1
        if cls.failures > 0:
            cls.failures -= 1
            raise ConnectionResetError("injected: connection reset by peer")

    def pipe_file(self, path, value, **kwargs):
        self._maybe_fail()
        return super().pipe_file(path, value, **kwargs)

    def cat_file(self, path, start=None, end=None, **kwargs):
        self._maybe_fail()
        return super().cat_file(path, start=start, end=end, **kwargs)


fsspec.register_implementation("flaky", FlakyFileSystem, clobber=True)


def test_transient_storage_errors_are_retried_with_back_off():
    s = Storage("flaky://bucket/retry", retries=4, backoff_s=0.01)
    FlakyFileSystem.failures, FlakyFileSystem.calls = 3, 0
    s.write_json(s.path("labels/x.json"), {"a": 1})  # three failures, then success
    assert FlakyFileSystem.calls == 4
    FlakyFileSystem.failures = 2
    assert s.read_json(s.path("labels/x.json")) == {"a": 1}


def test_storage_that_keeps_failing_names_the_object_and_writes_nothing():
    s = Storage("flaky://bucket/broken", retries=3, backoff_s=0.01)
    s.write_bytes(s.path("manifest.parquet"), b"old")
    FlakyFileSystem.failures = 10
    with pytest.raises(StorageError, match=r"cannot write '.*manifest\.parquet'.*3 attempts.*ConnectionResetError"):
        s.write_bytes(s.path("manifest.parquet"), b"new")
    FlakyFileSystem.failures = 0
    assert s.read_bytes(s.path("manifest.parquet")) == b"old"  # the old object, whole
    with pytest.raises(FileNotFoundError):  # a missing object is not retried
        s.read_bytes(s.path("nothing-here"))
