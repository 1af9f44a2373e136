"""The layers of docs/ARCHITECTURE.md: the library (lsun_hitl/) imports neither Prefect nor the layers above
it (tasks, flows, deployments, cli). Ruff's TID251 holds the line statically; this imports every library
module in a fresh interpreter where those packages cannot be imported at all."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CHECK = """
import importlib, pkgutil, sys

OUTSIDE = ("prefect", "tasks", "flows", "deployments", "cli")


class Outside:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in OUTSIDE:
            raise ImportError(f"{name} is outside the library")
        return None


sys.meta_path.insert(0, Outside())
import lsun_hitl

names = sorted(m.name for m in pkgutil.walk_packages(lsun_hitl.__path__, "lsun_hitl."))
for name in names:
    importlib.import_module(name)
loaded = sorted(m for m in sys.modules if m.split(".")[0] in OUTSIDE)
print(len(names), loaded)
"""


def test_every_library_module_imports_with_prefect_and_the_upper_layers_unimportable():
    done = subprocess.run([sys.executable, "-c", CHECK], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    count, loaded = done.stdout.split(" ", 1)
    assert int(count) >= 40 and loaded.strip() == "[]", done.stdout
