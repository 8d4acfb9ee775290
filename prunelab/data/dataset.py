"""The in-memory dataset every loader returns.

Whole splits are held as tensors — inputs ``float32`` of shape ``(N, C, H, W)``
(values in [0, 1] as loaded), labels ``int64`` of shape ``(N,)`` — because the
datasets prunelab studies are small enough, and tensors are what training and
pruning code slices. A ``Dataset`` is frozen: the helpers return new ones.
"""

from __future__ import annotations

from dataclasses import Field, dataclass, replace
from numbers import Integral
from typing import TYPE_CHECKING, Any, ClassVar, cast

import torch

from prunelab._validation import check_finite, check_number, check_type

_STATS_CHUNK = 4096  # examples per float64 chunk when computing train statistics


def _check_pair(split: str, x: torch.Tensor, y: torch.Tensor) -> None:
    check_type(f"x_{split}", x, torch.Tensor, where="Dataset")
    check_type(f"y_{split}", y, torch.Tensor, where="Dataset")
    if x.dtype != torch.float32 or x.dim() != 4:
        raise ValueError(
            f"the 'x_{split}' parameter of Dataset must be a float32 tensor of "
            f"shape (N, C, H, W). Got dtype {x.dtype}, shape {tuple(x.shape)} instead."
        )
    if y.dtype != torch.int64 or y.dim() != 1 or len(y) != len(x):
        raise ValueError(
            f"the 'y_{split}' parameter of Dataset must be an int64 tensor of "
            f"shape ({len(x)},). Got dtype {y.dtype}, shape {tuple(y.shape)} instead."
        )
    check_finite(
        f"the 'x_{split}' parameter of Dataset", x, hint="; inputs must be finite (drop or impute those examples)"
    )


def _take(x: torch.Tensor, y: torch.Tensor, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return x[idx].contiguous(), y[idx].contiguous()


def sample_indices(n_total: int, n: int, seed: int) -> torch.Tensor:
    """``n`` distinct indices of ``range(n_total)``, seeded, in increasing order."""
    g = torch.Generator().manual_seed(seed)
    return torch.randperm(n_total, generator=g)[:n].sort().values


class Splits:
    """The ``(x, y)`` views of a dataset with ``x_train``/``y_train``, ``x_test``/``y_test`` and
    optional ``x_val``/``y_val`` fields (image and text datasets alike)."""

    if TYPE_CHECKING:  # the fields of the frozen dataclasses that use this mixin
        __dataclass_fields__: ClassVar[dict[str, Field[Any]]]
        name: str
        x_train: torch.Tensor
        y_train: torch.Tensor
        x_test: torch.Tensor
        y_test: torch.Tensor
        x_val: torch.Tensor | None
        y_val: torch.Tensor | None

    @property
    def train(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.x_train, self.y_train

    @property
    def test(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.x_test, self.y_test

    @property
    def val(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        # x_val and y_val are given together (checked in __post_init__)
        return None if self.x_val is None or self.y_val is None else (self.x_val, self.y_val)

    def subset(self, n_train: int | None = None, n_test: int | None = None, seed: int = 0, n_val: int | None = None):
        """A smaller copy for quick runs: seeded random ``n_train``/``n_test``/``n_val`` examples
        (sequences, for a text dataset). ``None`` keeps a split whole. Not stratified; the
        original order is kept."""
        where = f"{type(self).__name__}.subset"
        seed = check_number("seed", seed, where=where, low=0, integer=True)
        changes = {}
        for split, n in (("train", n_train), ("test", n_test), ("val", n_val)):
            if n is None:
                continue
            x, y = getattr(self, f"x_{split}"), getattr(self, f"y_{split}")
            if x is None:
                raise ValueError(
                    f"the 'n_val' parameter of {where} needs a validation split; dataset {self.name!r} has none"
                )
            n = check_number(f"n_{split}", n, where=where, low=1, high=len(x), integer=True)
            changes[f"x_{split}"], changes[f"y_{split}"] = _take(x, y, sample_indices(len(x), n, seed))
        return replace(self, **changes)


@dataclass(frozen=True, eq=False)
class Dataset(Splits):
    """A classification dataset held in memory: train/test (and optional validation) tensors."""

    name: str
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    n_classes: int
    class_names: list[str]
    x_val: torch.Tensor | None = None
    y_val: torch.Tensor | None = None

    def __post_init__(self) -> None:
        check_type("name", self.name, str, where="Dataset")
        check_number("n_classes", self.n_classes, where="Dataset", low=1, integer=True)
        _check_pair("train", self.x_train, self.y_train)
        _check_pair("test", self.x_test, self.y_test)
        if (self.x_val is None) != (self.y_val is None):
            raise ValueError("x_val and y_val of Dataset must be given together or both be None")
        if self.x_val is not None and self.y_val is not None:
            _check_pair("val", self.x_val, self.y_val)
        shapes = {tuple(x.shape[1:]) for x in (self.x_train, self.x_test, self.x_val) if x is not None}
        if len(shapes) != 1:
            raise ValueError(f"all splits of Dataset must have the same input shape; got {sorted(shapes)}")
        if len(self.class_names) != self.n_classes:
            raise ValueError(f"Dataset has n_classes={self.n_classes} but {len(self.class_names)} class names")

    # -- views -----------------------------------------------------------------
    @property
    def input_shape(self) -> tuple[int, int, int]:
        """``(C, H, W)`` of one input."""
        return cast("tuple[int, int, int]", tuple(self.x_train.shape[1:]))  # x_train is (N, C, H, W)

    def __repr__(self) -> str:
        val = "" if self.x_val is None else f", val={len(self.x_val)}"
        return (
            f"Dataset({self.name!r}, input_shape={self.input_shape}, "
            f"n_classes={self.n_classes}, train={len(self.x_train)}, "
            f"test={len(self.x_test)}{val})"
        )

    # -- derived datasets ------------------------------------------------------
    def with_validation(self, size: int | float, seed: int = 0) -> Dataset:
        """A new Dataset with ``size`` train examples moved to a validation split.

        ``size`` is a count (int) or a fraction of the train split (float in (0, 1)).
        Which examples move is a seeded random permutation; both parts keep their
        original order.
        """
        where = "Dataset.with_validation"
        if self.x_val is not None:
            raise ValueError(
                f"{where}: dataset {self.name!r} already has a validation split ({len(self.x_val)} examples)"
            )
        n_train = len(self.x_train)
        seed = check_number("seed", seed, where=where, low=0, integer=True)
        if isinstance(size, Integral) and not isinstance(size, bool):
            n_val = check_number("size", size, where=where, low=1, high=n_train - 1, integer=True)
        else:
            frac = check_number("size", size, where=where, low=0.0, high=1.0, closed="neither")
            n_val = round(frac * n_train)
            if not 1 <= n_val <= n_train - 1:
                raise ValueError(
                    f"the 'size' parameter of {where} is the fraction {frac:g} of "
                    f"{n_train} train examples, which leaves an empty split"
                )
        g = torch.Generator().manual_seed(seed)
        perm = torch.randperm(n_train, generator=g)
        val_idx, train_idx = perm[:n_val].sort().values, perm[n_val:].sort().values
        x_tr, y_tr = _take(self.x_train, self.y_train, train_idx)
        x_va, y_va = _take(self.x_train, self.y_train, val_idx)
        return replace(self, x_train=x_tr, y_train=y_tr, x_val=x_va, y_val=y_va)

    def train_stats(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-channel ``(mean, std)`` of the train inputs, each of shape ``(C,)``.

        Two passes over chunks of examples, accumulated in float64 (a float64 copy of a
        whole split would need twice its memory). A constant channel gets std 1 so
        standardising it is safe.
        """
        x = self.x_train
        count = x.shape[0] * x.shape[2] * x.shape[3]
        chunks = torch.split(x, _STATS_CHUNK)
        # sums of (C,) tensors (sum starts from the int 0)
        total = cast(torch.Tensor, sum(c.double().sum(dim=(0, 2, 3)) for c in chunks))
        mean = total / count
        centred = cast(
            torch.Tensor, sum(((c.double() - mean.view(1, -1, 1, 1)) ** 2).sum(dim=(0, 2, 3)) for c in chunks)
        )
        std = (centred / count).sqrt()
        std = torch.where(std > 0, std, torch.ones_like(std))
        return mean.float(), std.float()

    def standardized(self) -> Dataset:
        """A new Dataset with every split standardised by the train split's per-channel mean/std."""
        mean, std = self.train_stats()
        mean, std = mean.view(1, -1, 1, 1), std.view(1, -1, 1, 1)

        def norm(x: torch.Tensor) -> torch.Tensor:
            return ((x - mean) / std).contiguous()

        x_val = None if self.x_val is None else norm(self.x_val)
        return replace(self, x_train=norm(self.x_train), x_test=norm(self.x_test), x_val=x_val)
