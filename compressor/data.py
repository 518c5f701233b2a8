"""Image folders streamed from disk: wnid labels, timm's transforms, disjoint run splits.

Nothing here holds a data set in memory. `scan_images` lists the files (paths and labels);
`ImagePart` is one part of a run's images (distill, search or eval) and yields batches decoded on
the fly by a torch ``DataLoader`` with worker processes, through timm's eval transform or, for
training phases, timm's train-time augmentation. Augmentation is reproducible: the random draws
for an image depend only on (seed, epoch, image), not on the worker that decodes it, so every
op of a distillation (and every torchrun rank) sees the same augmented views.

`Images` holds tensors that are already decoded (tests, benchmarks) behind the same `batches`
interface.
"""

from __future__ import annotations

import hashlib
import logging
import os
import random
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from ._errors import DataError

__all__ = ["ImageSet", "ImagePart", "Images", "ImageSource", "Batch", "scan_images",
           "split_indices", "wnid_index", "view_seed", "loader_workers"]

_logger = logging.getLogger(__name__)
IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".ppm", ".tif", ".tiff"}
_DECODE_ERRORS = (UnidentifiedImageError, OSError, SyntaxError, ValueError,
                  Image.DecompressionBombError)

_DRAFT_PX = 1024
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

    def fingerprint(self, indices: Sequence[int] | None = None) -> str:
        """Hash of each file's relative path, size and modification time: a changed, added or
        removed file changes it, and it costs one ``stat`` per file (no file is read), so a
        second run over ImageNet starts in seconds."""
        h = hashlib.sha256()
        for i in indices if indices is not None else range(len(self.paths)):
            p = self.paths[i]
            try:
                st = p.stat()
                meta = f"{st.st_size}:{st.st_mtime_ns}"
            except OSError as e:  # vanished or unreadable: part of the key, decoding skips it
                meta = type(e).__name__
            h.update(f"{p.relative_to(self.root).as_posix()}\0{meta}\0".encode())
        return h.hexdigest()[:16]


def _walk(root: Path):
    """`os.walk` into symlinked class folders too, each real folder once (a link to a folder
    above it would otherwise repeat its images until the path is too long)."""
    seen: set[str] = set()
    for d, dirs, files in os.walk(root, followlinks=True):
        real = os.path.realpath(d)
        if real in seen:
            dirs[:] = []
            continue
        seen.add(real)
        yield d, dirs, files


def scan_images(root: str | Path) -> ImageSet:
    """Find images in an ImageFolder (wnid sub-folders) or a flat folder."""
    root = Path(root)
    if not root.exists():
        raise DataError(f"data folder {root} does not exist; pass --data DIR with images")
    if not root.is_dir():
        raise DataError(f"--data {root} is not a folder; pass a folder of images")
    paths = sorted(
        Path(d) / f
        for d, _, files in _walk(root)
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
class Batch:
    """Decoded images, labels (-1 = unlabelled) and their positions in the part."""

    x: torch.Tensor
    y: torch.Tensor
    index: torch.Tensor
    number: int = 0  # which batch of the pass (one whose files were all unreadable is absent)

    def __len__(self) -> int:
        return len(self.x)

    def pin_memory(self) -> Batch:
        """Page-locked copies (the DataLoader calls this with ``pin_memory=True``, for CUDA)."""
        return Batch(self.x.pin_memory(), self.y.pin_memory(), self.index, self.number)


def _in_order(n: int, batch_size: int) -> list[range]:
    """Positions 0..n-1 in order, in batches of `batch_size` (the default of `batches`)."""
    return [range(s, min(s + batch_size, n)) for s in range(0, n, batch_size)]


def view_seed(seed: int, epoch: int, position: int) -> int:
    """The seed of one augmented view: the same in every process, worker and run."""
    h = hashlib.sha256(f"hant-view/{seed}/{epoch}/{position}".encode()).digest()
    return int.from_bytes(h[:4], "little")


def loader_workers(setting: int | str, device: torch.device) -> int:
    """Decoding processes: ``auto`` is up to 8 on CUDA; on the CPU, where training uses every
    core, half the cores beyond two, at most 4 (none on 2 cores: measured no faster there,
    `benchmarks/data_scale.py`, since a decoding process stalls a training thread)."""
    if setting != "auto":
        return int(setting)
    cores = os.cpu_count() or 1
    if device.type == "cuda":
        return max(1, min(8, cores - 1))
    return max(0, min(4, (cores - 2) // 2))


class _Files(torch.utils.data.Dataset):
    """Decodes one file per key ``(position, view seed or None)``; a file that cannot be read
    comes back as None with the reason, and the batch leaves it out."""

    def __init__(self, paths: list[Path], labels: list[int], transform: Callable):
        self.paths, self.labels, self.transform = paths, labels, transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, key: tuple[int, int | None]):
        pos, seed = key
        try:
            with warnings.catch_warnings():
                # a huge image is decoded or refused (DecompressionBombError), not warned of;
                # a huge JPEG decodes at a reduced scale, still over twice any crop timm takes
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                with Image.open(self.paths[pos]) as im:
                    im.draft("RGB", (_DRAFT_PX, _DRAFT_PX))
                    im = im.convert("RGB")
            if seed is None:
                x = self.transform(im)
            else:
                x = _seeded(seed, self.transform, im)
        except _DECODE_ERRORS as e:
            return None, pos, f"{self.paths[pos]}: {type(e).__name__}"
        return x, pos, ""


def _seeded(seed: int, fn: Callable, arg):
    """fn(arg) with python's, numpy's and torch's generators seeded, restored afterwards (in the
    main process the caller's streams must not move)."""
    py, npy = random.getstate(), np.random.get_state()
    gen = torch.random.default_generator
    state = gen.get_state()
    random.seed(seed)
    np.random.seed(seed)
    gen.manual_seed(seed)  # the CPU generator only: torch.manual_seed also queues CUDA seeding,
    try:                   # which records a stack trace per call (2 ms, more than the decode)
        return fn(arg)
    finally:
        random.setstate(py)
        np.random.set_state(npy)
        gen.set_state(state)


def _collate(labels: list[int]):
    def collate(items):
        ok = [(x, pos) for x, pos, _ in items if x is not None]
        bad = [why for x, _, why in items if x is None]
        if not ok:
            return None, bad
        pos = torch.tensor([p for _, p in ok])
        y = torch.tensor([labels[p] for _, p in ok])
        return Batch(torch.stack([x for x, _ in ok]), y, pos), bad

    return collate


class ImagePart:
    """Some of an `ImageSet`'s files (a run's distill, search or eval part), streamed.

    Args:
        images: the scanned folder.
        indices: which of its files, in order; a position in the part indexes this list.
        transform: timm's eval transform (fitness, candidate evaluation, evaluation).
        train_transform: timm's train transform (augmented views for distill and finetune).
        workers: decoding processes per pass (0: in this process).
    """

    def __init__(self, images: ImageSet, indices: Sequence[int], transform: Callable,
                 train_transform: Callable | None = None, workers: int = 0,
                 pin_memory: bool = False):
        self.images = images
        self.indices = list(indices)
        self.transform = transform
        self.train_transform = train_transform
        self.workers = workers
        self.pin_memory = pin_memory
        labels = [images.labels[i] for i in self.indices]
        self._labels = [-1 if v is None else int(v) for v in labels]
        self.skipped: set[str] = set()  # "path: reason" of files found unreadable so far

    def __len__(self) -> int:
        return len(self.indices)

    @property
    def labelled(self) -> bool:
        return all(v >= 0 for v in self._labels)

    def subset(self, positions: Sequence[int]) -> ImagePart:
        """Some of this part's images (unreadable files found in it count for this part)."""
        sub = ImagePart(self.images, [self.indices[p] for p in positions], self.transform,
                        self.train_transform, self.workers, self.pin_memory)
        sub.skipped = self.skipped
        return sub

    def decode(self, batch_size: int = 32) -> Images:
        """All of this part decoded (eval transform) into memory: for small parts read many
        times, such as the images that rank the candidate architectures."""
        xs, ys = [], []
        for batch in self.batches(batch_size):
            xs.append(batch.x)
            ys.append(batch.y)
        return Images(torch.cat(xs), torch.cat(ys))

    def fingerprint(self) -> str:
        return self.images.fingerprint(self.indices)

    def batches(self, batch_size: int = 32, order: Sequence[Sequence[int]] | None = None, *,
                train: bool = False, seed: int = 0, epoch: int = 0,
                progress: str | None = None) -> Iterator[Batch]:
        """Decoded batches: `order` lists each batch's positions (default: all, in order, in
        batches of `batch_size`). ``train`` applies the train transform with per-image seeds
        from (seed, epoch, position). Unreadable files are left out of their batch and
        recorded in `skipped`."""
        if order is None:
            order = _in_order(len(self), batch_size)
        transform = self.train_transform if train and self.train_transform else self.transform
        keys = [[(int(p), view_seed(seed, epoch, int(p)) if train else None) for p in b]
                for b in order]
        files = _Files([self.images.paths[i] for i in self.indices], self._labels, transform)
        workers = min(self.workers, len(keys))
        loader = torch.utils.data.DataLoader(
            files, batch_sampler=keys, num_workers=workers, collate_fn=_collate(self._labels),
            pin_memory=self.pin_memory, prefetch_factor=4 if workers else None,
            generator=torch.Generator().manual_seed(seed))  # not the caller's global stream
        from tqdm import tqdm

        yielded = False
        bar = tqdm(loader, desc=progress, total=len(keys), leave=False,
                   disable=progress is None)
        for number, (batch, bad) in enumerate(bar):
            for why in bad:
                if not self.skipped:
                    _logger.warning("skipping unreadable image file %s (the report counts "
                                    "them all)", why)
                self.skipped.add(why)
            if batch is not None:
                yielded = True
                batch.number = number
                yield batch
        if keys and not yielded:
            raise DataError(f"none of the {sum(map(len, keys))} image files asked for in "
                            f"{self.images.root} could be read (e.g. {sorted(self.skipped)[0]})")


@dataclass
class Images:
    """Decoded images as one tensor (tests, benchmarks): the `ImagePart` interface over memory.
    Tensors are used as given; there is no train-time augmentation."""

    x: torch.Tensor
    y: torch.Tensor

    def __len__(self) -> int:
        return len(self.x)

    @property
    def labelled(self) -> bool:
        return bool((self.y >= 0).all())

    def subset(self, positions: Sequence[int]) -> Images:
        idx = list(positions)
        return Images(self.x[idx], self.y[idx])

    def batches(self, batch_size: int = 32, order: Sequence[Sequence[int]] | None = None, *,
                train: bool = False, seed: int = 0, epoch: int = 0,
                progress: str | None = None) -> Iterator[Batch]:
        if order is None:
            order = _in_order(len(self), batch_size)
        for number, b in enumerate(order):
            idx = torch.as_tensor(list(b), dtype=torch.long)
            yield Batch(self.x[idx], self.y[idx], idx, number)


ImageSource = ImagePart | Images  # what the phases read images from


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
            raise DataError(f"only {n} images: too few to distill and search on")
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
                f"only {n} images: the {name} part is empty; give more images "
                "(at least 10) or pass --val-data"
            )
    return parts
