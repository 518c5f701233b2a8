"""The distilled pool: the distill phase's artifact (every candidate op's weights and result in
the work dir), the phase function that trains it, and the BatchNorm recalibration that follows.

Ops distil in train mode on augmented views, so their BatchNorm running statistics are those
of augmented inputs; every later phase (fitness, candidate ranking) runs them in eval mode on
the eval view. `calibrate_pool` re-estimates those statistics on the teacher's activations of
eval-view distill images (`torch.optim.swa_utils.update_bn`) and keeps them beside the
weights, so that an op is scored with the statistics of the inputs it is scored on.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .data import ImageSource
from .distill import OpResult, distill, load_weights
from .latency import Latencies
from .recipe import DistillCfg
from .runtime import Runtime
from .split import TEACHER, Split, TransformedNet
from .store import Store

__all__ = ["Pool", "distill_pool", "calibrate_pool"]


@dataclass
class Pool:
    """Distilled ops under `root` (one safetensors and one json per op), their results, and how
    many candidates the latency prefilter kept from training."""

    split: Split
    store: Store
    root: Path
    results: dict[tuple[int, str], OpResult]
    skipped_slower: int = 0
    bn_root: Path | None = None  # recalibrated BatchNorm statistics (`calibrate_pool`)

    @property
    def key(self) -> str:
        """Names the pool's weights in the cache keys of the phases that use them."""
        return self.root.name + (f"+bn-{self.bn_root.name}" if self.bn_root else "")

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
        """The op's distilled state dict, with its recalibrated BatchNorm statistics if any."""
        state = load_weights(self.store, self.root, layer, op)
        if self.bn_root is not None:
            path = _bn_path(self.bn_root, layer, op)
            if path.is_file():
                state.update(self.store.load_tensors(path))
        return state

    def op(self, layer: int, op: str) -> nn.Module:
        module = self.split.build_op(layer, op)
        if op != TEACHER:
            module.load_state_dict(self.weights(layer, op))
        return module.eval()

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


def _bn_path(root: Path, layer: int, op: str) -> Path:
    return root / f"{layer:03d}" / f"{op}.safetensors"


def _bn_buffers(module: nn.Module) -> dict[str, torch.Tensor]:
    norms = {name for name, m in module.named_modules()
             if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats}
    return {k: v.detach().cpu().clone() for k, v in module.state_dict().items()
            if k.rpartition(".")[0] in norms and k.rpartition(".")[2] in (
                "running_mean", "running_var", "num_batches_tracked")}


@torch.no_grad()
def calibrate_pool(pool: Pool, images: ImageSource, root: Path, *,
                   runtime: Runtime | None = None, progress: bool = True) -> Pool:
    """`pool` with every trained op's BatchNorm statistics re-estimated on the teacher's
    activations of `images` (eval view) at its layer's input, stored under `root` (one file
    per op with BatchNorm; resumable: ops already there are kept)."""
    from torch.optim.swa_utils import update_bn
    from tqdm import tqdm

    runtime = runtime or Runtime.cpu()
    todo: dict[int, list[str]] = {}
    for (i, op), r in sorted(pool.results.items()):
        if (r.status == "ok" and not _bn_path(root, i, op).is_file()
                and _bn_buffers(pool.split.build_op(i, op))):
            todo.setdefault(i, []).append(op)
    if todo:
        split = pool.split
        net = runtime.module(split.stem).eval()
        layers = [runtime.module(layer.module).eval() for layer in split.layers]
        acts: dict[int, list[torch.Tensor]] = {i: [] for i in todo}
        last = max(todo)
        for batch in images.batches(32):
            h = net(runtime.input(batch.x))
            for i, layer in enumerate(layers[: last + 1]):
                if i in acts:  # kept in host memory, one layer moved over at a time
                    acts[i].append(h.cpu())
                h = layer(h)
        bar = tqdm(total=sum(map(len, todo.values())), desc="BatchNorm recalibration",
                   disable=not progress)
        for i, ops in todo.items():
            for op in ops:
                module = runtime.module(pool.op(i, op))
                update_bn(acts[i], module, device=runtime.device)
                pool.store.save_tensors(_bn_path(root, i, op), _bn_buffers(module))
                bar.update(1)
            del acts[i]
        bar.close()
    return Pool(pool.split, pool.store, pool.root, pool.results, pool.skipped_slower, root)
