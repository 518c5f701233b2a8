"""Does the pipeline's memory stay flat as the data set grows, and does the loader keep up?

    python benchmarks/data_scale.py --images 2000 --json
    python benchmarks/data_scale.py --images 20000 --json

Writes (once, seeded, under ``--root``) a synthetic ImageFolder of N small JPEGs in wnid
folders, then in this process runs what a real data set flows through, on the CPU, for a tiny
timm model (``test_efficientnet``, random weights): the run's split into distill / search /
held-out parts, phase-1 distillation of a few ops per layer (one epoch of augmented views,
streaming: ``cache_activations: false``, since the cache trades memory for speed by design and
is capped by ``distill.cache_max_mib``), fitness on the search part and one finetune epoch on
the distill part. It prints

    {"images": N, "peak_rss_mib": ..., "seconds": ..., "images_per_second": ...,
     "loader_baseline_images_per_second": ..., "in_memory_images_per_second": ...,
     "throughput_vs_in_memory": ...}

* ``peak_rss_mib``: this process's peak resident memory up to the end of the finetune
  (decoding workers are separate processes: ``children_peak_rss_mib`` is the largest child's);
* ``images_per_second``: the finetune epoch's training images per second through our
  streaming loader;
* ``in_memory_images_per_second``: the same finetune (same model, batch, steps) on images
  already decoded into memory: what the model's forward and backward allow;
* ``loader_baseline_images_per_second``: timm's own loader (``create_dataset`` +
  ``create_loader``, same train transform, same workers) reading the same folder, no model.

Goals (issue "Real data sets on any device"): at N = 20000 the peak RSS is at most 1.2x the
N = 2000 run's, and ``throughput_vs_in_memory`` >= 0.8.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import timm
import torch
from PIL import Image

from compressor.data import ImagePart, Images, loader_workers, scan_images, split_indices
from compressor.distill import distill, load_weights
from compressor.finetune import finetune
from compressor.fitness import fitness
from compressor.inputs import candidate_ops
from compressor.recipe import DistillCfg, FinetuneCfg, PoolCfg
from compressor.runtime import Runtime
from compressor.split import TEACHER
from compressor.split import split as split_model
from compressor.store import Store

__all__ = ["main", "make_folder"]

WNIDS = ["n01440764", "n01443537", "n01484850", "n01491361", "n01494475", "n01496331",
         "n01498041", "n01514668", "n01514859", "n01518878"]
OPS = ["efn_3x3_e1_se1.00", "cb_bottle_3x3_ex0.125"]


def make_folder(root: Path, n: int, size: int = 72, seed: int = 0) -> Path:
    """N seeded JPEGs (smooth random colour fields, so they compress like photos) in wnid
    folders; reused when already complete."""
    done = root / f".complete-{n}-{size}-{seed}"
    if done.is_file():
        return root
    rng = np.random.default_rng(seed)
    for i in range(n):
        d = root / WNIDS[i % len(WNIDS)]
        d.mkdir(parents=True, exist_ok=True)
        small = rng.integers(0, 255, (6, 6, 3), dtype=np.uint8)
        Image.fromarray(small).resize((size, size), Image.BILINEAR).save(d / f"{i:06d}.jpg",
                                                                         quality=90)
    done.write_text("")
    return root


def _rss_mib(who: int) -> float:
    return resource.getrusage(who).ru_maxrss / 1024  # kilobytes on Linux


def _timm_loader_rate(root: Path, size: int, batch: int, workers: int, limit: int) -> float:
    from timm.data import create_dataset, create_loader

    ds = create_dataset("", root=str(root))
    loader = create_loader(ds, input_size=(3, size, size), batch_size=batch, is_training=True,
                           use_prefetcher=False, num_workers=workers, scale=(0.25, 1.0),
                           color_jitter=None)
    n, t0 = 0, time.perf_counter()
    for x, _ in loader:
        n += len(x)
        if n >= limit:
            break
    return n / (time.perf_counter() - t0)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=2000)
    p.add_argument("--model", default="test_efficientnet", help="timm model (random weights)")
    p.add_argument("--size", type=int, default=64, help="model input size (px)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--workers", default="auto",
                   help="decoding processes (runtime.loader_workers) [default: auto]")
    p.add_argument("--root", type=Path, default=Path(tempfile.gettempdir()) / "hant-data-scale")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    from timm.data import create_transform

    root = make_folder(args.root / str(args.images), args.images, size=args.size + 8)
    t_start = time.perf_counter()
    torch.manual_seed(0)
    teacher = timm.create_model(args.model).eval()
    s = split_model(teacher, input_size=(3, args.size, args.size))
    workers = args.workers if args.workers == "auto" else int(args.workers)
    runtime = Runtime(torch.device("cpu"), loader_workers=loader_workers(workers,
                                                                         torch.device("cpu")))
    images = scan_images(root)
    idx = split_indices(len(images), 0.6, 0.15, seed=0)
    eval_tf = create_transform(args.size)
    train_tf = create_transform(args.size, is_training=True, scale=(0.25, 1.0),
                                color_jitter=None)

    def part(name: str) -> ImagePart:
        return ImagePart(images, idx[name], eval_tf, train_tf, runtime.loader_workers)

    parts = {k: part(k) for k in idx}
    cands = candidate_ops(s, PoolCfg(include=OPS))
    cfg = DistillCfg(batch_size=args.batch_size, cache_activations=False, group_size=1,
                     optimizer="adam", lr=1e-3)
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        res = distill(s, cands, parts["distill"], cfg, Store(tmp), Path(tmp) / "d",
                      progress=False, runtime=runtime)
        t_distill = time.perf_counter() - t0
        ops = {i: {op: s.build_op(i, op) for op in names} for i, names in cands.items()}
        for i, op in res:
            ops[i][op].load_state_dict(load_weights(Store(tmp), Path(tmp) / "d", i, op))
        t0 = time.perf_counter()
        fitness(s, ops, parts["search"], args.batch_size, progress=False, runtime=runtime)
        t_fitness = time.perf_counter() - t0
    choices = [TEACHER] * len(s.layers)
    ft = FinetuneCfg(epochs=1, batch_size=args.batch_size, opt="adamw", lr=1e-4,
                     ema_decay=0.0)
    t0 = time.perf_counter()
    finetune(s.assemble(choices), teacher, parts["distill"], ft, progress=False,
             runtime=runtime)
    t_finetune = time.perf_counter() - t0
    streamed = len(parts["distill"]) / t_finetune
    seconds = time.perf_counter() - t_start
    peak = _rss_mib(resource.RUSAGE_SELF)
    children_peak = _rss_mib(resource.RUSAGE_CHILDREN)

    # the same finetune on images already in memory (at most 2000: what the model allows)
    mem_n = min(len(parts["distill"]), 2000)
    sub = parts["distill"].subset(range(mem_n))
    xs = torch.cat([b.x for b in sub.batches(256, train=True)])
    mem = Images(xs, torch.full((len(xs),), -1))
    t0 = time.perf_counter()
    finetune(s.assemble(choices), teacher, mem, dataclasses.replace(ft, augment=False),
             progress=False, runtime=runtime)
    in_memory = mem_n / (time.perf_counter() - t0)
    baseline = _timm_loader_rate(root, args.size, args.batch_size, runtime.loader_workers,
                                 len(parts["distill"]))
    out = {
        "images": args.images,
        "model": args.model,
        "input_size": args.size,
        "peak_rss_mib": round(peak, 1),
        "children_peak_rss_mib": round(children_peak, 1),
        "seconds": round(seconds, 2),
        "phase_seconds": {"distill": round(t_distill, 2), "fitness": round(t_fitness, 2),
                          "finetune": round(t_finetune, 2)},
        "images_per_second": round(streamed, 1),
        "in_memory_images_per_second": round(in_memory, 1),
        "throughput_vs_in_memory": round(streamed / in_memory, 3),
        "loader_baseline_images_per_second": round(baseline, 1),
        "loader_workers": runtime.loader_workers,
        "torch_threads": torch.get_num_threads(),
    }
    if args.json:
        print(json.dumps(out))
    else:
        for k, v in out.items():
            print(f"{k:36s} {v}")
    return out


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
