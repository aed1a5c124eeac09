"""The stdlib-only floor for files: it and the catalogue stay free of torch, atomic writes, sha256."""

from __future__ import annotations

import hashlib
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import PROJECT_ROOT

from cmedl.filebase import PARTIAL_SUFFIX, atomic_write, default_file_mode, file_sha256

# Run in a fresh interpreter where importing torch (or another heavy library) fails: an import of
# cmedl.modelfile, or of anything else that needs torch, from the floor or the catalogue would fail at once.
WITHOUT_TORCH = """
import sys
for name in ("torch", "safetensors", "numpy", "SimpleITK"):
    sys.modules[name] = None
import cmedl.filebase as floor
engine = sorted(m for m in sys.modules if m.startswith("cmedl"))
assert engine == ["cmedl", "cmedl.errors", "cmedl.filebase"], engine
import cmedl.catalogue as catalogue, cmedl.downloads
card = floor.peek_model_card(catalogue.builtin_model_path())
assert card["name"] and card["architecture"], card
assert [(e.name, e.card) for e in catalogue.list_models()] == [(catalogue.BUILTIN_DEMO, card)]
assert "cmedl.modelfile" not in sys.modules
"""


def test_the_floor_and_the_catalogue_read_the_builtin_card_without_torch(tmp_path: Path) -> None:
    # An empty CMEDL home and no site catalogue: only the built-in model is listed, whatever this machine has.
    home = {key: value for key, value in os.environ.items() if key != "CMEDL_CATALOGUE"} | {"CMEDL_HOME": str(tmp_path)}
    # From the checkout's root, python -c imports this checkout's cmedl.
    command = [sys.executable, "-c", WITHOUT_TORCH]
    result = subprocess.run(command, cwd=PROJECT_ROOT, env=home, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr


def test_an_atomic_write_appears_complete_with_the_usual_mode(tmp_path: Path) -> None:
    target = tmp_path / "model.safetensors"
    target.write_bytes(b"old")
    with atomic_write(target) as temp:
        assert temp.parent == tmp_path and temp.name.startswith(".model.safetensors.")
        assert temp.name.endswith(PARTIAL_SUFFIX)
        temp.write_bytes(b"new")
        assert target.read_bytes() == b"old"
    assert target.read_bytes() == b"new"
    assert stat.S_IMODE(target.stat().st_mode) == default_file_mode()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.safetensors"]


def test_a_failed_atomic_write_leaves_the_old_file_and_no_leftover(tmp_path: Path) -> None:
    target = tmp_path / "model.safetensors"
    target.write_bytes(b"old")
    with pytest.raises(RuntimeError, match="half way"):
        with atomic_write(target) as temp:
            temp.write_bytes(b"torn")
            raise RuntimeError("half way")
    assert target.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.safetensors"]


def test_file_sha256_is_the_digest_of_the_bytes(tmp_path: Path) -> None:
    path = tmp_path / "blob"
    data = os.urandom(3 << 20)  # several read blocks
    path.write_bytes(data)
    assert file_sha256(path) == hashlib.sha256(data).hexdigest()
