"""Image folders: wnid labels, decoding with timm's transforms, disjoint run splits."""

from __future__ import annotations

import hashlib
import logging
import os
import random
from dataclasses import dataclass, field
from pathlib import Path

import torch
from PIL import Image, UnidentifiedImageError

from ._errors import DataError

__all__ = ["ImageSet", "Images", "scan_images", "load_images", "split_indices", "wnid_index"]

_logger = logging.getLogger(__name__)
IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".ppm", ".tif", ".tiff"}

_WNIDS: dict[str, int] | None = None


def wnid_index() -> dict[str, int]:
    """wnid -> ImageNet-1k class index (position in the sorted list of the 1000 wnids)."""
    global _WNIDS
    if _WNIDS is None:
        from timm.data import ImageNetInfo

        _WNIDS = {w: i for i, w in enumerate(ImageNetInfo().label_names())}
    return _WNIDS


@dataclass
class ImageSet:
    """Image files and their labels (ImageNet index, or None when the folder is not a wnid)."""

    root: Path
    paths: list[Path]
    labels: list[int | None]

    def __len__(self) -> int:
        return len(self.paths)

    def fingerprint(self, indices=None) -> str:
        """Content hash of the files (so a renamed folder still hits the cache)."""
        h = hashlib.sha256()
        for i in indices if indices is not None else range(len(self.paths)):
            h.update(self.paths[i].relative_to(self.root).as_posix().encode())
            h.update(hashlib.sha256(self.paths[i].read_bytes()).digest())
        return h.hexdigest()[:16]


def scan_images(root: str | Path) -> ImageSet:
    """Find images in an ImageFolder (wnid sub-folders) or a flat folder."""
    root = Path(root)
    if not root.exists():
        raise DataError(f"data folder {root} does not exist; pass --data DIR with images")
    if not root.is_dir():
        raise DataError(f"--data {root} is not a folder; pass a folder of images")
    paths = sorted(
        Path(d) / f
        for d, _, files in os.walk(root, followlinks=True)  # symlinked class folders too
        for f in files
        if Path(f).suffix.lower() in IMAGE_EXTENSIONS
    )
    if not paths:
        raise DataError(
            f"data folder {root} holds no images ({', '.join(sorted(IMAGE_EXTENSIONS))})"
        )
    wnids = wnid_index()
    labels = []
    unknown = set()
    for p in paths:
        folder = p.parent.name if p.parent != root else None
        labels.append(wnids.get(folder) if folder else None)
        if folder and folder not in wnids:
            unknown.add(folder)
    if unknown:
        _logger.warning(
            "%d folder(s) are not ImageNet wnids (e.g. %s): their images are unlabelled and "
            "scored against the teacher (KL) instead", len(unknown), sorted(unknown)[0]
        )
    return ImageSet(root, paths, labels)


@dataclass
class Images:
    """Decoded images as one tensor, labels (-1 = unlabelled), and what could not be read."""

    x: torch.Tensor
    y: torch.Tensor
    source: list[int]
    skipped: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.x)

    def subset(self, idx) -> Images:
        idx = list(idx)
        return Images(self.x[idx], self.y[idx], [self.source[i] for i in idx])

    @property
    def labelled(self) -> bool:
        return bool((self.y >= 0).all())


def load_images(images: ImageSet, transform, progress: bool = False) -> Images:
    """Decode every file with `transform`; unreadable files are skipped and counted."""
    from tqdm import tqdm

    xs, ys, src, skipped = [], [], [], []
    it = tqdm(range(len(images)), desc="decode images", disable=not progress, leave=False)
    for i in it:
        p = images.paths[i]
        try:
            with Image.open(p) as im:
                x = transform(im.convert("RGB"))
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
            skipped.append(f"{p}: {type(e).__name__}")
            continue
        xs.append(x)
        ys.append(-1 if images.labels[i] is None else images.labels[i])
        src.append(i)
    if skipped:
        _logger.warning("skipped %d unreadable image file(s), e.g. %s", len(skipped), skipped[0])
    if not xs:
        raise DataError(f"none of the {len(images)} image files in {images.root} could be read")
    return Images(torch.stack(xs), torch.tensor(ys), src, skipped)


def split_indices(
    n: int, distill: float, search: float, seed: int, holdout: bool = True
) -> dict[str, list[int]]:
    """Disjoint distill / search / eval index lists (the rest after distill+search is eval).
    With ``holdout=False`` (evaluation images come from elsewhere) there is no eval part and
    the images are shared between distill and search in proportion."""
    if not holdout:
        order = list(range(n))
        random.Random(seed).shuffle(order)
        n_d = int(round(n * distill / (distill + search)))
        parts = {"distill": order[:n_d], "search": order[n_d:]}
        if not parts["distill"] or not parts["search"]:
            raise DataError(f"only {n} readable images: too few to distill and search on")
        return parts
    if not (0 < distill and 0 < search and distill + search < 1):
        raise DataError(
            f"data fractions distill={distill}, search={search} must be positive and sum below 1"
        )
    order = list(range(n))
    random.Random(seed).shuffle(order)
    n_d = int(round(n * distill))
    n_s = int(round(n * search))
    parts = {"distill": order[:n_d], "search": order[n_d : n_d + n_s], "eval": order[n_d + n_s :]}
    for name, idx in parts.items():
        if not idx:
            raise DataError(
                f"only {n} readable images: the {name} part is empty; give more images "
                "(at least 10) or pass --val-data"
            )
    return parts
