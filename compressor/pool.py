"""The distilled pool: the distill phase's artifact (every candidate op's weights and result in
the work dir), and the phase function that trains it."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .data import ImageSource
from .distill import OpResult, distill, load_op, load_weights
from .latency import Latencies
from .recipe import DistillCfg
from .runtime import Runtime
from .split import TEACHER, Split, TransformedNet
from .store import Store

__all__ = ["Pool", "distill_pool"]


@dataclass
class Pool:
    """Distilled ops under `root` (one safetensors and one json per op), their results, and how
    many candidates the latency prefilter kept from training."""

    split: Split
    store: Store
    root: Path
    results: dict[tuple[int, str], OpResult]
    skipped_slower: int = 0

    @property
    def failed(self) -> list[dict]:
        return [r.to_dict() for r in self.results.values() if r.status != "ok"]

    def ok(self, candidates: dict[int, list[str]]) -> dict[int, list[str]]:
        """Per layer, the teacher and the candidates whose distillation succeeded."""
        return {i: [op for op in ops if op == TEACHER or (
            (i, op) in self.results and self.results[(i, op)].status == "ok")]
            for i, ops in candidates.items()}

    def loss(self, layer: int, op: str) -> float:
        """Distillation loss (the teacher's own layer: 0)."""
        return 0.0 if op == TEACHER else self.results[(layer, op)].loss

    def weights(self, layer: int, op: str) -> dict[str, torch.Tensor]:
        return load_weights(self.store, self.root, layer, op)

    def op(self, layer: int, op: str) -> nn.Module:
        return load_op(self.split, self.store, self.root, layer, op).eval()

    def assemble(self, choices: list[str]) -> TransformedNet:
        """A student with the distilled weights of its chosen ops."""
        weights = {i: self.weights(i, op) for i, op in enumerate(choices) if op != TEACHER}
        return self.split.assemble(list(choices), weights=weights)


def distill_pool(split: Split, candidates: dict[int, list[str]], images: ImageSource,
                 cfg: DistillCfg, store: Store, root: Path, *,
                 latencies: Latencies | None = None, runtime: Runtime | None = None,
                 progress: bool = True) -> Pool:
    """Phase 1: distill the candidates (with `latencies`, only those no slower than the
    teacher's layer: HANT's latency prefilter, applied before any training) into `root`."""
    train = latencies.not_slower(candidates) if latencies is not None else candidates
    results = distill(split, train, images, cfg, store, root, progress, runtime=runtime)
    skipped = sum(len(v) for v in candidates.values()) - sum(len(v) for v in train.values())
    return Pool(split, store, root, results, skipped)
