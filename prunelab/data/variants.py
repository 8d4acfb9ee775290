"""MNIST variants of Larochelle et al. (ICML 2007): mnist-rot, mnist-back-rand, mnist-back-image.

H. Larochelle, D. Erhan, A. Courville, J. Bergstra, Y. Bengio, "An Empirical
Evaluation of Deep Architectures on Problems with Many Factors of Variation".

Two ways to get them:

* the original ``.amat`` files (or their ``.zip``) in ``<root>/<name>/`` are loaded
  as they are: train = the 12000-row file, test = the 50000-row file;
* otherwise the variant is generated from MNIST by :mod:`prunelab.data.recipes`
  (deterministic in ``seed``) and cached as uint8 ``.npy`` + a sha256 manifest in
  ``<writable root>/<name>/generated-v<recipe>-seed<seed>[-bg<digest>]/``.

``swap=True`` trains on the 50000-row split and tests on the 12000-row one.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from types import MappingProxyType
from typing import Any

import numpy as np
import torch

from prunelab._validation import check_choice, check_number, check_type
from prunelab.data._paths import data_root, find_file, search_dirs, writable_dir
from prunelab.data._store import load_arrays, save_arrays
from prunelab.data.amat import read_amat, read_amat_from_zip, zip_members
from prunelab.data.backgrounds import FOLDER as BACKGROUNDS
from prunelab.data.backgrounds import background_files, fingerprint, load_backgrounds
from prunelab.data.dataset import Dataset
from prunelab.data.errors import DatasetNotFoundError
from prunelab.data.mnist import MD5 as MNIST_MD5
from prunelab.data.mnist import MNIST
from prunelab.data.recipes import RECIPE_VERSION, make_variant_splits
from prunelab.data.source import DatasetSource, Root, not_found_message

# Official split sizes (module-level so tests can generate from a tiny pool).
N_SMALL = 12000
N_LARGE = 50000

# name -> (zip, 12000-row train file, 50000-row test file), as distributed (data README).
ORIGINAL_FILES = {
    "mnist-rot": (
        "mnist_rotation_new.zip",
        "mnist_all_rotation_normalized_float_train_valid.amat",
        "mnist_all_rotation_normalized_float_test.amat",
    ),
    "mnist-back-rand": (
        "mnist_background_random.zip",
        "mnist_background_random_train.amat",
        "mnist_background_random_test.amat",
    ),
    "mnist-back-image": (
        "mnist_background_images.zip",
        "mnist_background_images_train.amat",
        "mnist_background_images_test.amat",
    ),
}

SOURCES = ("auto", "original", "generated")

_DESCRIPTIONS = {
    "mnist-rot": "MNIST digits rotated by a uniform random angle (Larochelle et al. 2007).",
    "mnist-back-rand": "MNIST digits over uniform random-noise backgrounds (Larochelle et al. 2007).",
    "mnist-back-image": "MNIST digits over patches of natural images (Larochelle et al. 2007).",
}

Splits = dict[str, tuple[np.ndarray, np.ndarray]]  # "small"/"large" -> (images, labels)


def _original_splits(name: str, root: Root) -> Splits | None:
    """Parse the original files from the first search dir that has both (loose or zipped)."""
    zip_name, small, large = ORIGINAL_FILES[name]
    for base in search_dirs(root):
        folder = base / name
        if (folder / small).is_file() and (folder / large).is_file():
            return {"small": read_amat(folder / small), "large": read_amat(folder / large)}
        archives = [folder / zip_name] + sorted(p for p in folder.glob("*.zip") if p.name != zip_name)
        for archive in archives:
            if archive.is_file() and {small, large} <= zip_members(archive):
                return {"small": read_amat_from_zip(archive, small), "large": read_amat_from_zip(archive, large)}
    return None


def _backgrounds_dir(backgrounds: str | os.PathLike | None, root: Root) -> Path:
    if backgrounds is not None:
        return Path(backgrounds).expanduser()
    for base in search_dirs(root):
        if background_files(base / BACKGROUNDS):
            return base / BACKGROUNDS
    return data_root(root) / BACKGROUNDS


class VariantSource(DatasetSource):
    """One MNIST variant: original files when present, else generated from MNIST."""

    input_shape = (1, 28, 28)
    sizes = MappingProxyType({"train": N_SMALL, "test": N_LARGE})

    def __init__(self, name: str):
        self.name = name
        self.folder = name
        self.description = _DESCRIPTIONS[name]
        self.options = ("seed", "swap", "source") + (("backgrounds",) if name == "mnist-back-image" else ())

    def files(self) -> list[str]:
        return [f"{self.folder}/{f}" for f in ORIGINAL_FILES[self.name][1:]]

    def info(self, root: Root = None) -> dict[str, Any]:
        out = super().info(root)
        out["files_note"] = (
            f"optional: the original .amat files (or {ORIGINAL_FILES[self.name][0]}); "
            f"without them the variant is generated from MNIST"
        )
        generated_from = [f"mnist/{f}" for f in MNIST_MD5["mnist"]]
        if self.name == "mnist-back-image":
            generated_from.append(f"{BACKGROUNDS}/*.png")
        out["generated_from"] = generated_from
        return out

    # -- generation ------------------------------------------------------------
    def missing_files(
        self, root: Root = None, *, source: str = "auto", backgrounds: str | os.PathLike | None = None, **options: Any
    ) -> list[str]:
        """Nothing when the originals are present (unzipped or zipped); otherwise what
        generation needs: the MNIST files and, for mnist-back-image, background images."""
        originals = super().missing_files(root)
        zipped = find_file(f"{self.folder}/{ORIGINAL_FILES[self.name][0]}", root) is not None
        if source != "generated" and (not originals or zipped):
            return []
        if source == "original":
            return originals
        missing = MNIST.missing_files(root)
        if self.name == "mnist-back-image" and not background_files(_backgrounds_dir(backgrounds, root)):
            missing.append(f"{BACKGROUNDS}/*.png (natural images to cut backgrounds from)")
        return missing

    def _background_files(self, backgrounds: str | os.PathLike | None, root: Root) -> list[Path]:
        folder = _backgrounds_dir(backgrounds, root)
        files = background_files(folder)
        if not files:
            raise DatasetNotFoundError(
                f"dataset '{self.name}' is generated from MNIST and natural background images, "
                f"but no images (*.png, *.jpg, ...) were found in {folder}. Put at least two "
                f"images there (the prunelab data folder has backgrounds/kodim01..24.png), or "
                f"pass backgrounds=<folder> to load_dataset."
            )
        return files

    def _generate(self, root: Root, download: bool, seed: int, backgrounds: str | os.PathLike | None) -> Splits:
        sources = {f"mnist/{f}": md5 for f, md5 in MNIST_MD5["mnist"].items()}
        key = f"generated-v{RECIPE_VERSION}-seed{seed}"
        bg_files: list[Path] = []
        if self.name == "mnist-back-image":
            bg_files = self._background_files(backgrounds, root)
            bg_md5 = fingerprint(bg_files)
            sources.update({f"{BACKGROUNDS}/{n}": m for n, m in bg_md5.items()})
            digest = hashlib.sha256(repr(sorted(bg_md5.items())).encode()).hexdigest()
            key += f"-bg{digest[:12]}"
        rel = f"{self.name}/{key}"
        meta = {
            "dataset": self.name,
            "recipe_version": RECIPE_VERSION,
            "seed": seed,
            "sources": sources,
            "splits": {"train": N_SMALL, "test": N_LARGE},
            "format": "uint8 images (N, 28, 28) = round(255 * x); int64 labels",
        }
        for base in search_dirs(root):
            loaded = load_arrays(base / rel)
            if loaded is not None:
                manifest, arrays = loaded
                for field in ("dataset", "recipe_version", "seed", "sources", "splits"):
                    if manifest.get(field) != meta[field]:
                        raise ValueError(
                            f"generated dataset cache {base / rel} does not match "
                            f"this request ({field} differs). Delete the folder "
                            f"{base / rel} and load again to regenerate it."
                        )
                return {
                    "small": (arrays["train_images"], arrays["train_labels"]),
                    "large": (arrays["test_images"], arrays["test_labels"]),
                }
        try:
            raw = MNIST.arrays(root, download)
        except DatasetNotFoundError as exc:
            raise DatasetNotFoundError(
                f"dataset '{self.name}': its original .amat files are not in "
                f"{data_root(root) / self.name}, and generating it needs MNIST, which is "
                f"missing.\n{exc}"
            ) from exc
        pool_x = np.concatenate([raw["x_train"], raw["x_test"]])
        pool_y = np.concatenate([raw["y_train"], raw["y_test"]]).astype(np.int64)
        splits = make_variant_splits(
            self.name,
            pool_x,
            pool_y,
            seed,
            backgrounds=load_backgrounds(bg_files) if bg_files else None,
            n_small=N_SMALL,
            n_large=N_LARGE,
        )
        save_arrays(
            writable_dir(rel, root),
            {
                "train_images": splits["small"][0],
                "train_labels": splits["small"][1],
                "test_images": splits["large"][0],
                "test_labels": splits["large"][1],
            },
            meta,
        )
        return splits

    # -- public ----------------------------------------------------------------
    # a source's load takes only the options it lists (load_dataset checks them)
    def load(  # type: ignore[override]
        self,
        root: Root = None,
        download: bool = False,
        *,
        seed: int | None = None,
        swap: bool = False,
        source: str = "auto",
        backgrounds: str | os.PathLike | None = None,
    ) -> Dataset:
        where = "load_dataset"
        check_type("download", download, bool, where=where)
        check_type("swap", swap, bool, where=where)
        check_choice("source", source, SOURCES, where=where)
        if seed is not None:
            seed = check_number("seed", seed, where=where, low=0, integer=True)
        if backgrounds is not None:
            check_type(
                "backgrounds",
                backgrounds,
                (str, os.PathLike),
                where=where,
                expected="a folder path (str or os.PathLike) or None",
            )
        splits = None if source == "generated" else _original_splits(self.name, root)
        if splits is not None:
            if seed is not None or backgrounds is not None:
                raise ValueError(
                    f"dataset '{self.name}': seed= and backgrounds= only apply to "
                    f"generated variants, but the original files were found in "
                    f"{data_root(root) / self.name} (or the cache dir); pass "
                    f"source='generated' to generate anyway"
                )
        elif source == "original":
            raise DatasetNotFoundError(
                not_found_message(self.name, self.name, list(ORIGINAL_FILES[self.name][1:]), root, downloadable=False)
                + f"\n(Zipped as {ORIGINAL_FILES[self.name][0]} is fine too; "
                f"or use source='auto' to generate the variant from MNIST.)"
            )
        else:
            splits = self._generate(root, download, 0 if seed is None else seed, backgrounds)
        train, test = (splits["large"], splits["small"]) if swap else (splits["small"], splits["large"])
        return Dataset(
            name=self.name,
            x_train=_to_tensor(train[0]),
            y_train=torch.from_numpy(train[1].astype(np.int64)),
            x_test=_to_tensor(test[0]),
            y_test=torch.from_numpy(test[1].astype(np.int64)),
            n_classes=self.n_classes,
            class_names=list(self.class_names),
        )

    def fetch(self, root: Root = None) -> list[Path]:
        """Download and verify MNIST (the generation source); check backgrounds are present."""
        paths = MNIST.fetch(root)
        if self.name == "mnist-back-image":
            paths += self._background_files(None, root)
        return paths


def _to_tensor(images: np.ndarray) -> torch.Tensor:
    """``(N, 28, 28)`` uint8 (generated) or float in [0, 1] (original) → float32 ``(N, 1, 28, 28)``."""
    t = torch.from_numpy(np.ascontiguousarray(images))
    t = t.float().div_(255.0) if t.dtype == torch.uint8 else t.float()
    return t.unsqueeze(1).contiguous()


MNIST_ROT = VariantSource("mnist-rot")
MNIST_BACK_RAND = VariantSource("mnist-back-rand")
MNIST_BACK_IMAGE = VariantSource("mnist-back-image")
