"""Written files get the mode `open()` gives under the umask (mkstemp's 0600 widened): shards, manifests, the
latest pointer, labels. Checked under two umasks, with a reader that is not the package (os.stat)."""
from __future__ import annotations

import contextlib
import os
import stat
import threading
from pathlib import Path

import pytest

from ovdiff_ray.store import Location, commit_manifest, new_manifest, write_shard
from ovdiff_ray.store.fs import current_umask


@contextlib.contextmanager
def umask(mask: int):
    old = os.umask(mask)
    try:
        yield
    finally:
        os.umask(old)


def modes(root: Path) -> dict[str, int]:
    return {p.relative_to(root).as_posix(): stat.S_IMODE(p.stat().st_mode) for p in root.rglob("*") if p.is_file()
            and not p.name.startswith(".")}


@pytest.mark.parametrize("mask, expected", [(0o022, 0o644), (0o007, 0o660)])
def test_bank_files_follow_the_umask(tmp_path, mask, expected):
    from ovdiff_ray.recipe import load_recipe
    from tests.test_store import make_protos

    with umask(mask):
        assert current_umask() == mask  # read from /proc without changing it
        loc = Location(str(tmp_path / "bank"))
        entries = [write_shard(loc, make_protos(n, i), i).to_entry() for i, n in enumerate(["cat", "dog"])]
        commit_manifest(loc, new_manifest("modes", 1, load_recipe("tiny").to_dict(), entries))
        loc.write_bytes("plain/file.json", b"{}")
        loc.put_if_absent("plain/once.json", b"{}")
        assert loc.swap_pointer("plain/pointer", b"1", None)
    got = modes(tmp_path / "bank")
    assert any(k.startswith("shards/") for k in got) and "manifests/v000001.json" in got
    assert "manifests/latest" in got and len(got) == 7
    assert got == {k: expected for k in got}
    assert not [p for p in (tmp_path / "bank").rglob(".*.tmp")]  # no temp file left behind


def test_umask_read_is_thread_safe(tmp_path):
    """current_umask never changes the umask (another thread creating files meanwhile keeps it)."""
    with umask(0o027):
        seen = []
        stop = threading.Event()

        def watch():
            while not stop.is_set():
                seen.append(current_umask())

        t = threading.Thread(target=watch)
        t.start()
        for i in range(200):
            Location(str(tmp_path)).write_bytes(f"f{i}", b"x")
        stop.set()
        t.join()
    assert set(seen) == {0o027}
    assert {stat.S_IMODE(p.stat().st_mode) for p in tmp_path.iterdir()} == {0o640}
