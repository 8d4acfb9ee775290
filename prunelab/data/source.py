"""What every registered dataset provides, and the shared "find, fetch, verify" steps.

A *source* knows where its files live (a folder under the data root), how to
download and verify them, and how to turn them into a :class:`Dataset`. The
registry ``DATASETS`` maps names to sources; ``load_dataset`` only dispatches.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import MappingProxyType
from typing import Any, cast

from prunelab.data._download import DownloadError, download_file
from prunelab.data._hashing import verify_checksum
from prunelab.data._paths import DATA_ENV, cache_dir, data_root, find_file, search_dirs, writable_dir
from prunelab.data.dataset import Dataset
from prunelab.data.errors import DatasetNotFoundError

Root = str | os.PathLike | None


class DatasetSource:
    """Base class: metadata plus ``load``/``fetch``. Subclasses set the class attributes."""

    name: str = ""
    description: str = ""
    folder: str | None = None  # sub-folder of the data root, None when embedded
    input_shape: tuple[int, ...] = (1, 28, 28)
    class_names: tuple[str, ...] = tuple(str(i) for i in range(10))
    sizes: Mapping[str, int] = MappingProxyType({})
    options: tuple[str, ...] = ()  # keyword options load() accepts besides root/download

    @property
    def n_classes(self) -> int:
        return len(self.class_names)

    def files(self) -> list[str]:
        """Paths, relative to the data root, of the files this dataset reads."""
        return []

    def urls(self) -> list[str]:
        """Where :meth:`fetch` downloads from (first mirror of each file)."""
        return []

    def load(self, root: Root = None, download: bool = False, **options: Any) -> Dataset:
        raise NotImplementedError

    def fetch(self, root: Root = None) -> list[Path]:
        """Download (if missing) and verify the files; return their paths."""
        return []

    def missing_files(self, root: Root = None, **options: Any) -> list[str]:
        """Files (relative to the data root) that :meth:`load` needs and cannot find, without
        reading or downloading anything; ``[]`` when the dataset is ready to load."""
        return [f for f in self.files() if find_file(f, root) is None]

    def info(self, root: Root = None) -> dict[str, Any]:
        return {
            "name": self.name,
            "description": self.description,
            "files": self.files(),
            "location": str(data_root(root) / self.folder) if self.folder else None,
            "download": self.urls(),
            "input_shape": tuple(self.input_shape),
            "n_classes": self.n_classes,
            "class_names": list(self.class_names),
            "sizes": dict(self.sizes),
            "options": list(self.options),
        }


def not_found_message(
    name: str,
    folder: str,
    missing: Sequence[str],
    root: Root,
    reasons: Sequence[str] = (),
    *,
    downloadable: bool = True,
) -> str:
    """The one message for missing files: which, where they go, and how to get them."""
    where = data_root(root) / folder
    lines = [f"dataset '{name}': {len(missing)} file(s) missing from {where}:"]
    lines += [f"  {m}" for m in missing]
    others = [str(d / folder) for d in search_dirs(root)[1:]]
    if others:
        lines.append(f"(also looked in {', '.join(others)})")
    if reasons:
        lines.append("The download failed:")
        lines += [f"  {r}" for r in reasons]
    lines.append(
        f"Put the files in {where}. The data root is the root= argument, else the "
        f"{DATA_ENV} environment variable, else the cache dir ({cache_dir()})."
    )
    if downloadable:
        lines.append(
            f"Or download them: load_dataset({name!r}, download=True) in Python, "
            f"or `prunelab data fetch {name}` on the command line."
        )
    return "\n".join(lines)


def ensure_files(
    name: str,
    folder: str,
    checksums: Mapping[str, str],
    mirrors: Sequence[str],
    root: Root,
    download: bool,
    progress: bool | None = None,
    *,
    algorithm: str = "md5",
) -> dict[str, Path]:
    """Find each file of ``checksums`` under ``folder``, downloading missing ones if allowed.

    Every file's checksum (``checksums`` holds hex digests of ``algorithm``) is verified on every
    call: a corrupt file is caught before it is parsed. Missing files raise one
    :class:`DatasetNotFoundError` listing all of them (without a download hint when
    ``mirrors`` is empty: such a dataset cannot be downloaded).
    """
    found = {f: find_file(f"{folder}/{f}", root) for f in checksums}
    missing = [f for f, p in found.items() if p is None]
    reasons: list[str] = []
    if missing and download:
        target = writable_dir(folder, root)
        for f in list(missing):
            try:
                found[f] = download_file(
                    [m + f for m in mirrors], target / f, checksums[f], progress=progress, algorithm=algorithm
                )
                missing.remove(f)
            except DownloadError as exc:
                reasons.extend(exc.reasons or [str(exc)])
    if missing:
        raise DatasetNotFoundError(not_found_message(name, folder, missing, root, reasons, downloadable=bool(mirrors)))
    paths = cast("dict[str, Path]", found)  # none is None: a missing file raised above
    for f, path in paths.items():
        verify_checksum(path, checksums[f], algorithm)
    return paths
