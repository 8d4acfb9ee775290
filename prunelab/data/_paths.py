"""Where datasets are read from and written to.

Two places matter:

* the *data root* — ``root=`` argument, else the ``PRUNELAB_DATA`` environment
  variable, else the cache dir. It may be read-only (CI points it at a shared,
  read-only folder), so it is only ever written to when it is writable;
* the *cache dir* — ``PRUNELAB_CACHE``, else ``$XDG_CACHE_HOME/prunelab``, else
  ``~/.cache/prunelab``. Downloads, generated variants and anything else
  prunelab writes go here whenever the data root is not writable.

Reading always looks in the data root first, then in the cache dir.
"""

from __future__ import annotations

import os
from pathlib import Path

from prunelab._validation import PATH, validate_params

DATA_ENV = "PRUNELAB_DATA"
CACHE_ENV = "PRUNELAB_CACHE"


def _env_path(name: str) -> Path | None:
    value = os.environ.get(name, "")
    return Path(value).expanduser() if value else None


def cache_dir() -> Path:
    """The writable cache: ``$PRUNELAB_CACHE`` > ``$XDG_CACHE_HOME/prunelab`` > ``~/.cache/prunelab``.

    Empty environment variables count as unset. Nothing is created here.
    """
    explicit = _env_path(CACHE_ENV)
    if explicit is not None:
        return explicit
    xdg = _env_path("XDG_CACHE_HOME")
    base = xdg if xdg is not None else Path.home() / ".cache"
    return base / "prunelab"


@validate_params({"root": [PATH, None]})
def data_root(root: str | os.PathLike | None = None) -> Path:
    """The data root: the ``root`` argument > ``$PRUNELAB_DATA`` (if non-empty) > :func:`cache_dir`."""
    if root is not None:
        return Path(root).expanduser()
    env = _env_path(DATA_ENV)
    return env if env is not None else cache_dir()


def search_dirs(root: str | os.PathLike | None = None) -> list[Path]:
    """Directories searched when reading, in order: data root, then cache dir (deduplicated)."""
    dirs = [data_root(root)]
    cache = cache_dir()
    if cache != dirs[0]:
        dirs.append(cache)
    return dirs


def find_file(relpath: str, root: str | os.PathLike | None = None) -> Path | None:
    """First existing ``<dir>/<relpath>`` over :func:`search_dirs`, or ``None``."""
    for base in search_dirs(root):
        candidate = base / relpath
        if candidate.is_file():
            return candidate
    return None


def is_writable(path: Path) -> bool:
    """Whether files could be created in directory ``path`` (or in the nearest existing parent).

    Permission bits are honoured even for root (who bypasses them): a folder with no
    write bit at all is treated as read-only, because that is how a shared data folder
    is marked. Read-only mounts count as read-only too. Nothing is written to probe.
    """
    probe = Path(path)
    while not probe.exists():
        if probe.parent == probe:
            return False
        probe = probe.parent
    if not probe.is_dir() or not os.access(probe, os.W_OK | os.X_OK):
        return False
    if probe.stat().st_mode & 0o222 == 0:
        return False
    try:
        if os.statvfs(probe).f_flag & os.ST_RDONLY:
            return False
    except (AttributeError, OSError):  # statvfs is POSIX-only
        pass
    return True


def writable_dir(folder: str, root: str | os.PathLike | None = None) -> Path:
    """The directory new files of ``folder`` go to, created if needed.

    ``<data root>/<folder>`` when writable, else ``<cache dir>/<folder>``.
    """
    for base in search_dirs(root):
        target = base / folder
        if is_writable(target):
            try:
                target.mkdir(parents=True, exist_ok=True)
            except OSError:
                continue
            return target
    raise PermissionError(
        f"cannot write dataset files for '{folder}': neither the data root {data_root(root)} "
        f"nor the cache dir {cache_dir()} is writable; set {CACHE_ENV} to a writable folder"
    )
