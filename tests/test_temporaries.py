"""Temporaries of writes that died (a process killed between writing and renaming) are removed where no
writer of them can be live: the labeling service's start for people's answers (once older than any live
write), a run's end for its own folders. Fresh ones, possibly a live write's, stay."""

from __future__ import annotations

import os
import time

from fastapi.testclient import TestClient

from lsun_hitl.integrity import LIVE_WRITE_S, remove_temporary, temporary_files
from lsun_hitl.service import create_app
from lsun_hitl.storage import Storage


def _leave(storage: Storage, rel: str, age_s: float) -> None:
    path = storage.path(rel)
    storage.fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
    with open(path, "wb") as f:
        f.write(b"half")
    then = time.time() - age_s
    os.utime(path, (then, then))


def test_remove_temporary_takes_only_old_ones_under_the_folders(tmp_path) -> None:
    storage = Storage(str(tmp_path))
    _leave(storage, "labels/shirt/votes/.tmp-old", LIVE_WRITE_S + 60)
    _leave(storage, "labels/shirt/votes/.tmp-live", 0)
    _leave(storage, "manifests/shirt/.tmp-other-folder", 3600)
    storage.write_json(storage.path("labels/shirt/votes/kept.json"), {"a": 1})

    removed = remove_temporary(storage, ["labels"], older_than_s=LIVE_WRITE_S)

    assert removed == ["labels/shirt/votes/.tmp-old"]
    assert sorted(temporary_files(storage)) == ["labels/shirt/votes/.tmp-live", "manifests/shirt/.tmp-other-folder"]
    assert storage.read_json(storage.path("labels/shirt/votes/kept.json")) == {"a": 1}
    assert remove_temporary(storage, ["manifests/shirt"], older_than_s=0) == ["manifests/shirt/.tmp-other-folder"]


def test_service_start_removes_dead_answer_temporaries(tmp_path) -> None:
    storage = Storage(str(tmp_path))
    _leave(storage, "labels/shirt/answers/.tmp-killed", LIVE_WRITE_S + 60)
    with TestClient(create_app(storage)) as service:
        assert service.get("/healthz").status_code == 200
        assert temporary_files(storage) == []
