"""Phase 1 (HANT Eq. 2): every candidate op s_ij mimics its teacher layer t_i on t_i's input.

The N x M problems are independent, and each one's result is independent of how it is
scheduled: op (i, j) starts from its own seed (a hash of `distill.seed`, the layer index and the
op name), sees the same batches in the same order, and has its own optimizer, so its weights do
not depend on which ops share its teacher pass or which process trains it.

Schedules (all give the same weights, within float rounding):

* cached: when the teacher's inputs and outputs of every layer for the whole distill set fit
  (`cache_activations`, `cache_max_mib`, `memory_fraction`; with augmented views, one copy per
  epoch, since every epoch sees new views), the teacher runs over the set once per epoch of
  views and the ops train from the cache one after the other, each saved as soon as it is done;
* streaming: otherwise one teacher pass per batch feeds a group of `group_size` ops per layer
  (all layers at once; ``auto``: as many as fit in memory, see `auto_group_size`), saved when
  the group ends. The paper's schedule is a group of one op per layer;
* sharded: under torchrun the (layer, op) jobs are dealt round robin to the ranks; each rank
  writes its ops' files into the shared work dir and, after a barrier, returns the whole pool.

On CPU, `workers` threads (one per intra-op thread by default) train ops side by side and run
slices of each teacher batch, each on one thread.

Images stream from disk (`ImagePart.batches`); with ``augment`` every batch is an augmented
view whose random draws depend only on (seed, epoch, image), so every op, schedule and rank sees
the same views, and the teacher's targets come from the very view the op sees.

An op that keeps an inherited start (``distill.inherit``) trains at ``distill.lr`` and, when
``distill.inherited_lr`` is set, also at that rate from the same start on the same batches; the
run whose last epoch ends at the lower loss is kept and its rate recorded (``OpResult.lr``).
With ``distill.inherited_race`` below 1 the two runs race: at that fraction of the steps, the one
with the higher mean loss over the second half of the steps so far stops (same batches, so the
comparison is paired), which saves most of the second run's cost.

Each op's weights and result are one safetensors and one json file under
``root/{layer:03d}/{op}.*``; a run resumes by skipping the ops that have both. Rank 0 records
how the last run was scheduled (ranks, ops each trained, device, seconds) in
``root/last_run.json``. An op whose loss
becomes NaN or infinite is marked failed with the reason, and the others go on.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import hashlib
import logging
import math
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

import ops_pool

from . import _parallel
from ._errors import ArtifactError, DistillError
from .data import ImageSource
from .recipe import DistillCfg
from .runtime import Runtime
from .split import TEACHER, Split
from .store import Store, artifact_lock, discard

__all__ = [
    "OpResult",
    "distill",
    "teacher_activations",
    "load_weights",
    "op_seed",
    "auto_group_size",
]

_logger = logging.getLogger(__name__)
_MIB = 1 << 20
_RNG_LOCK = threading.Lock()  # ops are built from the global generator, one at a time
# joins the distillation artifacts' key: raised when the code changes what the same settings
# train (2: ops start from the teacher's weights, ops_pool.inherit; 3: distill.inherited_lr
# trains an inherited start at both rates and keeps the better run)
ENGINE_VERSION = 3


@dataclass
class OpResult:
    layer: int
    op: str
    loss: float
    status: str = "ok"  # ok | failed
    reason: str = ""
    init_loss: float = float("nan")  # the loss of the first step, before any update
    inherited: str = ""  # what the op took from the teacher layer (ops_pool.inherit), or ""
    lr: float | None = None  # the rate of the run kept (distill.lr or distill.inherited_lr)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _files(root: Path, layer: int, op: str) -> tuple[Path, Path]:
    d = root / f"{layer:03d}"
    return d / f"{op}.safetensors", d / f"{op}.json"


@torch.no_grad()
def teacher_activations(split: Split, x: torch.Tensor) -> list[torch.Tensor]:
    """[x_0, x_1, ..., x_N]: the input of every layer and the last layer's output."""
    acts = [split.stem(x)]
    for layer in split.layers:
        acts.append(layer.module(acts[-1]))
    return acts


def load_weights(store: Store, root: Path, layer: int, op: str) -> dict[str, torch.Tensor]:
    """The distilled state dict of (layer, op)."""
    return store.load_tensors(_files(root, layer, op)[0])


def _done(store: Store, root: Path, layer: int, op: str) -> OpResult | None:
    weights, meta = _files(root, layer, op)
    if meta.is_file() and weights.is_file():
        try:
            d = store.read_json(meta)
            store.load_tensors(weights)  # checked against its checksum
            return OpResult(**d)
        except ArtifactError as e:  # damaged on disk: trained again
            discard(meta, e)
            weights.unlink(missing_ok=True)
    return None


def op_seed(layer: int, op: str, seed: int = 0) -> int:
    """A stable 63-bit seed for (layer, op): the same in every process and Python run (unlike
    ``hash()``, which is salted per process).

    Example:
        >>> op_seed(3, "identity") == op_seed(3, "identity")
        True
    """
    h = hashlib.sha256(f"hant-distill/{seed}/{layer}/{op}".encode()).digest()
    return int.from_bytes(h[:8], "little") & (2**63 - 1)


def distill(
    split: Split,
    candidates: dict[int, list[str]],
    images: ImageSource,
    cfg: DistillCfg,
    store: Store,
    root: Path,
    progress: bool = True,
    runtime: Runtime | None = None,
) -> dict[tuple[int, str], OpResult]:
    """Train every (layer, op) in `candidates` (except ``teacher``); resumes from `root`.

    Under torchrun each rank trains the jobs whose index in (layer, op) order is rank modulo the
    world size, and every rank returns the results of all jobs (`root` must be on a file system
    all ranks share). `runtime` is where it trains (default: ``resolve_runtime`` of the
    default recipe: CUDA when present, fp16 autocast there).

    Example:
        >>> res = distill(s, {0: ["identity"]}, images, load_recipe().distill, Store("work"),
        ...               Path("work/distill"))  # doctest: +SKIP
        >>> res[(0, "identity")].loss  # doctest: +SKIP
    """
    jobs = [(i, op) for i in sorted(candidates) for op in candidates[i] if op != TEACHER]
    if runtime is None:
        from .recipe import RuntimeCfg
        from .runtime import resolve_runtime

        runtime = resolve_runtime(RuntimeCfg())
    device = runtime.device
    with _parallel.process_group(device) as (rank, world):
        if world > 1:
            _check_ranks_agree(root, jobs, len(images))
        results: dict[tuple[int, str], OpResult] = {}
        # one process trains a work dir's pool at a time (the ranks of one launch share it out
        # instead); a second run waits, then finds the ops written
        with artifact_lock(root) if world == 1 else contextlib.nullcontext():
            pending = []
            for key in jobs[rank::world]:
                done = _done(store, root, *key)
                if done is None:
                    pending.append(key)
                else:
                    results[key] = done
            info = {"rank": rank, "trained": 0}
            if pending:
                info = _train_pending(split, pending, images, cfg, store, root, runtime,
                                      results, progress=progress and rank == 0,
                                      shard=(rank, world))
        if world > 1:
            _parallel.barrier(device)
            results = _read_all(store, root, jobs)
            ranks = _parallel.all_gather(info)
        else:
            ranks = [info]
        if rank == 0 and any(r["trained"] for r in ranks):
            store.write_json(root / "last_run.json", {"world_size": world, "ranks": ranks})
    return results


def _check_ranks_agree(root: Path, jobs, n_images: int) -> None:
    mine = (str(root), len(jobs), n_images)
    seen = _parallel.all_gather(mine)
    if any(s != mine for s in seen):
        raise DistillError(
            f"torchrun ranks disagree on the distillation (work dir, number of ops, images): "
            f"{seen}; give every rank the same teacher weights (--checkpoint), data, recipe and "
            "--work-dir"
        )


def _read_all(store: Store, root: Path, jobs) -> dict[tuple[int, str], OpResult]:
    results = {}
    for key in jobs:
        done = _done(store, root, *key)
        if done is None:
            raise DistillError(
                f"op {key[1]} of layer {key[0]} is not in {root} after every rank finished; "
                "on several nodes the work dir (--work-dir) must be on a file system all of "
                "them share"
            )
        results[key] = done
    return results


# ---------------------------------------------------------------------------------- schedule


class _Teacher:
    """The teacher's stem and layers on the training device, in eval mode, without gradients.
    With worker threads (CPU), a batch is cut into one slice per worker, each run on one
    thread: the same numbers (eval mode treats every image alone) in less time."""

    def __init__(self, split: Split, device: torch.device, amp: torch.dtype | None,
                 workers: _Workers | None = None):
        stem, layers = split.stem, [layer.module for layer in split.layers]
        if device.type != "cpu":
            stem, layers = copy.deepcopy(stem).to(device), [copy.deepcopy(m).to(device)
                                                            for m in layers]
        self.stem, self.layers = stem.eval(), [m.eval() for m in layers]
        self.device, self.amp, self.workers = device, amp, workers

    def __call__(self, x: torch.Tensor) -> list[torch.Tensor]:
        if self.workers is None or self.workers.n == 1 or len(x) < 2:
            return self._forward(x)
        parts = self.workers.map(self._forward, x.chunk(self.workers.n))
        return [torch.cat(a) for a in zip(*parts)]

    @torch.no_grad()
    def _forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        with torch.autocast(self.device.type, dtype=self.amp or torch.float16,
                            enabled=self.amp is not None):
            acts = [self.stem(x.to(self.device))]
            for m in self.layers:
                acts.append(m(acts[-1]))
        return acts


def _act_numel(split: Split) -> list[int]:
    """Per-sample size of x_0 .. x_N (the cached tensors)."""
    shapes = [split.layers[0].in_shape] + [layer.out_shape for layer in split.layers]
    return [math.prod(s) for s in shapes]


class _Cache:
    """The teacher's x_0 .. x_N for the whole distill set, computed batch by batch in the
    training order: a batch is then a slice (a view, no copy) of the cache and holds exactly
    what a streaming teacher pass over that batch computes. Without augmentation one epoch is
    computed and later epochs gather their rows; with it every epoch (new views) is computed."""

    def __init__(self, teacher: _Teacher, images: ImageSource, batches, augment: bool,
                 seed: int):
        epochs = sorted({e for e, _, _ in batches}) if augment else [0]
        self.spans: dict[tuple[int, int], tuple[int, int]] = {}
        self.row = torch.full((len(images),), -1, dtype=torch.long)
        self.acts: list[torch.Tensor] = []
        s = 0
        for epoch in epochs:
            order = [idx for e, _, idx in batches if e == epoch]
            for batch in images.batches(order=order, train=augment, seed=seed, epoch=epoch):
                chunk = teacher(batch.x)
                if not self.acts:
                    n = len(images) * len(epochs)
                    self.acts = [torch.empty((n, *a.shape[1:]), dtype=a.dtype, device=a.device)
                                 for a in chunk]
                for store, a in zip(self.acts, chunk):
                    store[s : s + len(a)] = a
                self.spans[(epoch, batch.number)] = (s, len(batch))
                if epoch == 0:
                    self.row[batch.index] = torch.arange(s, s + len(batch))
                s += len(batch)
        self.acts = [a[:s] for a in self.acts]
        self.epochs = set(epochs)

    def batch(self, j: int, epoch: int, b: int, idx: torch.Tensor) -> torch.Tensor:
        """x_j of batch `b` of `epoch` (images `idx`; unreadable ones left out, so it may be
        empty)."""
        if (epoch, b) in self.spans:
            start, n = self.spans[(epoch, b)]
            return self.acts[j][start : start + n]
        if epoch in self.epochs:  # every file of that batch was unreadable
            return self.acts[j][:0]
        rows = self.row[idx]
        return self.acts[j][rows[rows >= 0]]

    @property
    def nbytes(self) -> int:
        return sum(a.numel() * a.element_size() for a in self.acts)


def _use_cache(cfg: DistillCfg, need: int, budget: int) -> bool:
    if cfg.cache_activations is True:
        if need > budget:
            _logger.warning("distill: caching %d MiB of activations (cache_activations: true), "
                            "more than the %d MiB budget", need // _MIB, budget // _MIB)
        return True
    if cfg.cache_activations is False:
        return False
    return need <= min(budget, cfg.cache_max_mib * _MIB)


def _batches(n: int, bs: int, epochs: int, seed: int) -> list[tuple[int, int, torch.Tensor]]:
    """(epoch, batch number, image indices): the one batch order every op sees."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for epoch in range(epochs):
        order = torch.randperm(n, generator=gen)
        out += [(epoch, s // bs, order[s : s + bs]) for s in range(0, n, bs)]
    return out


class _Workers:
    """Threads that train ops (and run teacher slices) side by side, each with one intra-op
    thread. ``workers: auto`` is one per intra-op thread on CPU (small convolutions use one core
    far better than they share several) and one on CUDA."""

    def __init__(self, cfg: DistillCfg, device: torch.device):
        n = cfg.workers
        if n == "auto":
            n = max(1, torch.get_num_threads()) if device.type == "cpu" else 1
        self.n = int(n)
        self._threads = torch.get_num_threads()
        self._pool = (ThreadPoolExecutor(self.n, thread_name_prefix="distill",
                                         initializer=torch.set_num_threads, initargs=(1,))
                      if self.n > 1 else None)

    def map(self, fn, items) -> list:
        if self._pool is None:
            return [fn(x) for x in items]
        return list(self._pool.map(fn, items))

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)  # running ops end, queued don't
            torch.set_num_threads(self._threads)  # the workers' setting is partly process-wide


@dataclass
class _Context:
    """What every group trains with (passed to `_train_group`)."""

    cfg: DistillCfg
    images: ImageSource
    teacher: _Teacher
    cache: _Cache | None
    batches: list[tuple[int, int, torch.Tensor]]
    scale: list[float] | None
    device: torch.device
    amp: torch.dtype | None
    bar: object
    workers: _Workers
    done_steps: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)

    def advance(self) -> None:
        """One op-step done; the bar counts ops (fractions while an op trains)."""
        with self.lock:
            self.done_steps += 1
            self.bar.update(self.done_steps / len(self.batches) - self.bar.n)


def _train_pending(split, pending, images: ImageSource, cfg: DistillCfg, store: Store,
                   root: Path, runtime: Runtime, results: dict, progress: bool, shard) -> dict:
    """Train this rank's `pending` ops into `results`; return what was done (for last_run.json)."""
    device = runtime.device
    workers = _Workers(cfg, device)
    try:
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            return _train_with(split, pending, images, cfg, store, root, runtime, results,
                               progress, shard, workers)
    finally:
        workers.close()


def _train_with(split, pending, images: ImageSource, cfg: DistillCfg, store: Store,
                root: Path, runtime: Runtime, results: dict, progress: bool, shard,
                workers: _Workers) -> dict:
    from tqdm import tqdm

    t0 = time.perf_counter()
    device, amp = runtime.device, runtime.amp
    teacher = _Teacher(split, device, amp, workers)
    n = len(images)
    bs = max(1, min(cfg.batch_size, n))
    batches = _batches(n, bs, cfg.epochs, cfg.seed)
    budget = int(_parallel.available_bytes(device) * cfg.memory_fraction)
    per_sample = sum(_act_numel(split)) * (2 if amp else 4)
    copies = cfg.epochs if cfg.augment else 1  # views of every epoch, or one set reused
    cache = None
    if _use_cache(cfg, per_sample * n * copies, budget):
        t1 = time.perf_counter()
        cache = _Cache(teacher, images, batches, cfg.augment, cfg.seed)
        _logger.info("distill: cached the teacher's activations of %d views (%d MiB) in %.1f s",
                     len(cache.acts[0]), cache.nbytes // _MIB, time.perf_counter() - t1)
        # the first batch that has images, as the streaming schedule takes (a batch whose
        # files were all unreadable never arrives there)
        start, count = next(iter(cache.spans.values()))
        scale = _scales([a[start : start + count] for a in cache.acts])
        g = cfg.group_size if cfg.group_size != "auto" else max(map(len, _by_layer(pending)))
    else:
        scale = None  # from the first streamed batch (no extra teacher pass), see _train_group
        g = cfg.group_size
        if g == "auto":
            # fp32 activations: the trial runs the ops outside autocast (fp16 under AMP)
            one = next(iter(images.batches(1)))  # the first readable image
            g = auto_group_size(split, pending, [a.float() for a in teacher(one.x)],
                                cfg, device,
                                budget - per_sample * bs, bs)
    rank, world = shard
    _logger.info("distill: %d ops on %s (%s, %s, %d worker(s)%s)", len(pending), device,
                 "cached activations" if cache else f"streaming, {g} op(s) per layer per pass",
                 f"{runtime.amp_name} autocast" if amp else "fp32", workers.n,
                 f", rank {rank} of {world}" if world > 1 else "")
    desc = "distill" if world == 1 else f"distill (rank 0 of {world}: its share)"
    bar = tqdm(total=len(pending), desc=desc, unit="op", disable=not progress,
               bar_format="{l_bar}{bar}| {n:.1f}/{total_fmt} ops [{elapsed}<{remaining}]")
    ctx = _Context(cfg, images, teacher, cache, batches, scale, device, amp, bar, workers)

    def save(res: OpResult, state: dict[str, torch.Tensor]) -> None:
        weights, meta = _files(root, res.layer, res.op)
        store.save_tensors(weights, state)
        store.write_json(meta, res.to_dict())
        results[(res.layer, res.op)] = res

    layers = _by_layer(pending)
    try:
        for r in range(math.ceil(max(map(len, layers)) / g)):
            group = [key for ops in layers for key in ops[r * g : (r + 1) * g]]
            _train_group(split, group, ctx, save)
    finally:
        bar.close()
    return {"rank": rank, "trained": len(pending), "device": str(device),
            "amp": runtime.amp_name, "augment": cfg.augment,
            "schedule": "cached" if cache else "streaming", "group_size": g,
            "workers": workers.n, "seconds": round(time.perf_counter() - t0, 3)}


def _by_layer(pending) -> list[list[tuple[int, str]]]:
    layers: dict[int, list] = {}
    for key in pending:
        layers.setdefault(key[0], []).append(key)
    return list(layers.values())


def _scales(acts: list[torch.Tensor]) -> list[float]:
    """Mean square of each teacher layer's output on the first batch of the stream: a per-layer
    constant that makes the MSE comparable across layers (one learning rate suits all). Every
    schedule takes it from the same batch, so the losses do not depend on the schedule."""
    return [max(float(a.float().pow(2).mean()), 1e-6) for a in acts[1:]]


def auto_group_size(split: Split, pending, acts1: list[torch.Tensor], cfg: DistillCfg,
                    device: torch.device, budget: int, bs: int) -> int:
    """Ops per layer that one streaming teacher pass can train within `budget` bytes.

    `acts1` is the teacher's x_0 .. x_N for one image. Each pending op is built once and run
    forward on it with gradients on: the tensors
    autograd saves for backward (counted by `saved_tensors_hooks`), its output and the output's
    gradient, times the batch size, plus its parameters, their gradients and optimizer state
    (SGD with momentum: 1 copy, Adam: 2). A group of g ops per layer is allowed when g times the
    sum over layers of the largest op of each layer fits. The budget is `memory_fraction` of
    the free memory, less the teacher's activations of one batch; the rest is the safety margin
    (allocator slack, the op's temporaries in backward, other processes).
    """
    states = {"sgd": 1 if cfg.momentum else 0, "adam": 2}.get(cfg.optimizer, 2)
    runs = 1 if _inherited_rate(cfg) is None else 2  # an inherited start may train twice
    worst: dict[int, int] = {}
    for i, op in pending:
        m = split.build_op(i, op).to(device).train()
        worst[i] = max(worst.get(i, 0), _op_bytes(m, acts1[i], states, bs, runs))
    per_round = sum(worst.values())
    most = max(map(len, _by_layer(pending)))
    g = max(1, min(most, budget // max(per_round, 1)))
    if per_round > budget:
        _logger.warning("distill: one op per layer needs ~%d MiB, more than the %d MiB budget; "
                        "training one op per layer per pass anyway (lower distill.batch_size "
                        "if it runs out of memory)", per_round // _MIB, budget // _MIB)
    _logger.info("distill: group size %d (auto: ~%d MiB per op per layer, budget %d MiB)",
                 g, per_round // _MIB, budget // _MIB)
    return int(g)


def _op_bytes(m: nn.Module, x1: torch.Tensor, states: int, bs: int, runs: int = 1) -> int:
    """Training memory of op `m` at batch `bs`, from one forward on one sample `x1`; `runs`
    copies of its weights train one after the other (parameters, gradients and optimizer
    state each, the activations of one at a time)."""
    params = {p.data_ptr() for p in m.parameters()}
    n_params = sum(p.numel() * p.element_size() for p in m.parameters() if p.requires_grad)
    saved: dict[tuple[int, int], int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        if t.data_ptr() not in params:
            saved[(t.data_ptr(), t.numel())] = t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = m(x1)
    act = (sum(saved.values()) + 2 * out.numel() * out.element_size()) * bs
    return n_params * (2 + states) * runs + act


# ---------------------------------------------------------------------------------- training


def _loss(kind: str, out: torch.Tensor, target: torch.Tensor, scale: float) -> torch.Tensor:
    """``mse``: Eq. 2's MSE, divided by the layer's constant mean square (one lr for all layers).
    ``nsr``: DONNA's per-channel noise-to-signal ratio, mean over channels (channels are dim 1
    of conv maps (B, C, H, W) and the last dim of tokens (B, T, D))."""
    if kind == "mse":
        return F.mse_loss(out, target) / scale
    if kind == "nsr":
        dims = (0, 2, 3) if target.dim() == 4 else tuple(range(target.dim() - 1))
        noise = (out - target).pow(2).sum(dims)
        signal = target.pow(2).sum(dims).clamp_min(1e-8)
        return (noise / signal).mean()
    raise ValueError(f"distill.loss must be mse or nsr, got {kind!r}")


def _optimizer(cfg: DistillCfg, params, lr: float) -> torch.optim.Optimizer:
    """SGD without weight decay (the paper's choice), or Adam for small calibration sets where
    only a few hundred steps are possible."""
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=cfg.momentum, weight_decay=0.0)
    if cfg.optimizer == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=0.0)
    raise ValueError(f"distill.optimizer must be sgd or adam, got {cfg.optimizer!r}")


def _inherited_rate(cfg: DistillCfg) -> float | None:
    """The second rate an inherited start trains at, or None (unset, or the same as lr)."""
    return cfg.inherited_lr if cfg.inherited_lr not in (None, cfg.lr) else None


class _Run:
    """One op's weights in training at one rate: optimizer, grad scaler and last-epoch loss."""

    def __init__(self, module: nn.Module, cfg: DistillCfg, lr: float, amp: torch.dtype | None):
        self.module, self.lr, self.failed = module, lr, ""
        params = [p for p in module.parameters() if p.requires_grad]
        self.opt = _optimizer(cfg, params, lr) if params else None
        self.scaler = (torch.amp.GradScaler("cuda") if amp == torch.float16 and self.opt
                       else None)
        self.sum, self.count = 0.0, 0
        self.race_sum, self.race_count = 0.0, 0  # over the race's window of steps
        self.stopped = False  # lost the race

    def loss(self) -> float:
        return self.sum / self.count if self.count else float("nan")


class _OpTrainer:
    """One op with its own seed, loss bookkeeping and one `_Run` per rate: ``distill.lr``, and
    for an op that keeps an inherited start also ``distill.inherited_lr``, the run with the
    lower last-epoch loss kept (a rate that trains an op from scratch can undo a start that is
    already close, and a low one cannot move a start that is far)."""

    def __init__(self, split: Split, layer: int, op: str, ctx: _Context):
        self.layer, self.op, self.cfg = layer, op, ctx.cfg
        self.seed = op_seed(layer, op, ctx.cfg.seed)
        with _RNG_LOCK, torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)
            module = split.build_op(layer, op)
        # starts from the teacher layer's weights (ops_pool.inherit), kernels aligned to the
        # teacher's taps or centred; the first batch picks the closest of these and the own init
        self.starts: list[tuple[str, nn.Module]] = []
        if ctx.cfg.inherit and op != TEACHER:
            t = split.layers[layer]
            for align in (True, False):
                m = copy.deepcopy(module)
                what = ops_pool.inherit(m, t.module, t.in_shape, align=align)
                if what and not any(_same_weights(m, other) for _, other in self.starts):
                    self.starts.append((what, m.to(ctx.device).train()))
        self.inherited = ""
        # one worker: anything random inside the op (dropout) draws from a stream of its own
        # (with several, the threads share the global generator)
        self.reseed = ctx.workers.n == 1
        self.amp = ctx.amp
        self.runs = [_Run(module.to(ctx.device).train(), self.cfg, self.cfg.lr, self.amp)]
        self.failed = ""
        self.steps = 0
        self.init_loss = float("nan")
        # the step at which two runs race (compared on the steps after half of it), or None
        race = ctx.cfg.inherited_race
        self.race_at = math.ceil(race * len(ctx.batches)) if race < 1 else None

    @torch.no_grad()
    def _choose_start(self, x: torch.Tensor, target: torch.Tensor, scale: float) -> None:
        """Keep whichever start (own init, inherited ones) has the lowest loss on this batch,
        measured as training sees it (train mode); the norm statistics are left as they were.
        An inherited start also gets a run at ``distill.inherited_lr``."""
        options = [("", self.runs[0].module), *self.starts]
        losses = []
        for _, m in options:
            buffers = {k: b.clone() for k, b in m.named_buffers()}
            with torch.autocast(x.device.type, dtype=self.amp or torch.float16,
                                enabled=self.amp is not None):
                out = m(x)
            loss = float(_loss(self.cfg.loss, out.float(), target.float(), scale))
            losses.append(loss if math.isfinite(loss) else math.inf)
            for k, b in m.named_buffers():
                b.copy_(buffers[k])
        best = min(range(len(options)), key=losses.__getitem__)
        self.starts = []
        if not best:
            return
        self.inherited, module = options[best]
        self.runs = [_Run(module, self.cfg, self.cfg.lr, self.amp)]
        lr = _inherited_rate(self.cfg)
        if lr is not None:
            self.runs.append(_Run(copy.deepcopy(module), self.cfg, lr, self.amp))

    def step(self, x: torch.Tensor, target: torch.Tensor, scale: float, epoch: int, batch: int,
             last: bool) -> None:
        if self.failed or not len(x):
            return
        if self.steps == 0 and self.starts:
            self._choose_start(x, target, scale)
        self.steps += 1
        for run in self.runs:
            if not (run.failed or run.stopped):
                self._step(run, x, target, scale, epoch, batch, last)
        if all(run.failed or run.stopped for run in self.runs):  # none trains on
            self.failed = next(run.failed for run in self.runs if run.failed)
            _logger.warning("op %s on layer %d diverged: %s", self.op, self.layer, self.failed)
        elif self.steps == self.race_at and len(self.runs) > 1:
            self._race()

    def _in_race_window(self) -> bool:
        return self.race_at is not None and self.race_at / 2 < self.steps <= self.race_at

    def _race(self) -> None:
        """Stop the run whose mean loss over the race's window is higher (a failed run has lost
        already; ties keep the first, ``distill.lr``)."""
        alive = [r for r in self.runs if not r.failed]
        if len(alive) < 2:
            return
        means = [r.race_sum / max(r.race_count, 1) for r in alive]
        best = min(range(len(alive)), key=means.__getitem__)
        for j, run in enumerate(alive):
            if j != best:
                run.stopped = True
        _logger.debug("op %s on layer %d: the run at lr %g kept at step %d (window losses %s)",
                      self.op, self.layer, alive[best].lr, self.steps, means)

    def _step(self, run: _Run, x: torch.Tensor, target: torch.Tensor, scale: float, epoch: int,
              batch: int, last: bool) -> None:
        if self.reseed:  # every run draws the same dropout masks
            torch.manual_seed((self.seed + self.steps - 1) % 2**63)
        with torch.autocast(x.device.type, dtype=self.amp or torch.float16,
                            enabled=self.amp is not None):
            out = run.module(x)
        loss = _loss(self.cfg.loss, out.float(), target.float(), scale)
        if not torch.isfinite(loss):
            run.failed = f"non-finite loss at epoch {epoch}, batch {batch}"
            if len(self.runs) > 1:
                _logger.info("op %s on layer %d: its run at lr %g diverged (%s)", self.op,
                             self.layer, run.lr, run.failed)
            return
        if self.steps == 1 and run is self.runs[0]:
            self.init_loss = loss.item()
        if len(self.runs) > 1 and self._in_race_window():
            run.race_sum += loss.item()
            run.race_count += 1
        if run.opt is not None:
            run.opt.zero_grad(set_to_none=True)
            if run.scaler is not None:
                run.scaler.scale(loss).backward()
                run.scaler.step(run.opt)
                run.scaler.update()
            else:
                loss.backward()
                run.opt.step()
        if last:
            run.sum += loss.item() * len(out)
            run.count += len(out)

    def result(self) -> tuple[OpResult, dict[str, torch.Tensor]]:
        if self.failed:
            run = self.runs[0]
            return (OpResult(self.layer, self.op, float("nan"), "failed", self.failed,
                             self.init_loss, self.inherited), run.module.state_dict())
        run = min((r for r in self.runs if not (r.failed or r.stopped)),
                  key=lambda r: r.loss() if math.isfinite(r.loss()) else math.inf)
        res = OpResult(self.layer, self.op, run.loss(), init_loss=self.init_loss,
                       inherited=self.inherited, lr=run.lr)
        return res, run.module.state_dict()


def _train_group(split: Split, group, ctx: _Context,
                 save: Callable[[OpResult, dict[str, torch.Tensor]], None]) -> None:
    """Train the (layer, op) pairs of `group` and `save` each one. From the cache: op after op
    (one per worker), each saved when done. Streaming: one teacher pass per batch feeds the whole
    group (its ops shared among the workers), which is saved at the end."""
    last_epoch = ctx.cfg.epochs - 1
    if ctx.cache is not None:
        cache = ctx.cache

        def train(key: tuple[int, str]) -> None:
            i = key[0]
            t = _OpTrainer(split, i, key[1], ctx)
            version = cache.acts[i]._version
            for epoch, b, idx in ctx.batches:
                t.step(cache.batch(i, epoch, b, idx), cache.batch(i + 1, epoch, b, idx),
                       ctx.scale[i], epoch, b, epoch == last_epoch)
                if cache.acts[i]._version != version:  # the batch is a view of the cache
                    raise DistillError(
                        f"op '{key[1]}' on layer {i} changed its input in place, which would "
                        "corrupt the cached teacher activations; make its first operation out "
                        "of place (e.g. ReLU(inplace=False)) or set distill.cache_activations: "
                        "false")
                ctx.advance()
            save(*t.result())

        ctx.workers.map(train, group)
        return
    trainers = [_OpTrainer(split, i, op, ctx) for i, op in group]
    for epoch in range(ctx.cfg.epochs):
        order = [idx for e, _, idx in ctx.batches if e == epoch]
        views = ctx.images.batches(order=order, train=ctx.cfg.augment, seed=ctx.cfg.seed,
                                   epoch=epoch)
        for batch in views:
            acts = ctx.teacher(batch.x)
            if ctx.scale is None:
                ctx.scale = _scales(acts)
            ctx.workers.map(partial(_step, acts, ctx, epoch, batch.number), trainers)
    for t in trainers:
        save(*t.result())


def _same_weights(a: nn.Module, b: nn.Module) -> bool:
    sb = b.state_dict()
    return all(torch.equal(v, sb[k]) for k, v in a.state_dict().items())


def _step(acts: list[torch.Tensor], ctx: _Context, epoch: int, b: int, t: _OpTrainer) -> None:
    """One streaming step of `t` on the teacher activations `acts` of batch `b`."""
    i = t.layer
    t.step(acts[i], acts[i + 1], ctx.scale[i], epoch, b, epoch == ctx.cfg.epochs - 1)
    ctx.advance()
