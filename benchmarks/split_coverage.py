"""How much of timm does `compressor.split` cover? One model per timm family, split and rebuilt.

    python benchmarks/split_coverage.py --json
    python benchmarks/split_coverage.py --families resnet,dla,hrnet      # a subset
    python benchmarks/split_coverage.py --models dla46x_c,hrnet_w18_small

A family is a module under ``timm.models`` (``timm.list_modules()``, less models registered
from outside timm); its representative is
its smallest registered model by parameter count (counted on the meta device, so nothing is
allocated), built with random weights (``pretrained=False``, seeded) at its default input size
(``pretrained_cfg['input_size']``). Each representative is split with `compressor.split` and
``assemble(["teacher"] * N)`` is compared with the teacher on one seeded batch of two images,
fp32, eval mode. A family is

* ``ok``: N >= 2 layers, consecutive layer shapes chain, and max |logits - teacher| <= 1e-4;
* ``refused (reason)``: split raised `SplitError` (its one-line message is the reason);
* ``wrong (diff)``: split returned, but the rebuilt model differs (or N < 2, or shapes break);
* ``error (reason)``: anything else raised (a bug: split must refuse with `SplitError`);
* ``skipped (reason)``: the model is too large for the memory budget (``--max-gib``, 24 by
  default; a model costs about four copies of its fp32 parameters here).

An ``ok`` row notes ``[train-mode trace differs]`` when split warned that the model's
train-mode trace differs from its eval-mode one (see `compressor.split`).

It prints one line per family, then the summary as JSON on the last line of stdout:

    {"families": ..., "ok": ..., "refused": ..., "wrong": ..., "errors": ..., "skipped": ...,
     "coverage": ok / families, "train_mode_warnings": ..., "seconds": ...}

with ``--json`` the summary also holds ``"rows"``: every family's model, status, reason or
difference, layer count and seconds. Goal (issue 14): coverage >= 0.95 and zero ``wrong``.
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import sys
import time
import warnings

import timm
import torch

from compressor import SplitError, split

__all__ = ["main", "timm_families", "representatives", "check_model"]

_TOL = 1e-4


def _param_count(name: str) -> int | None:
    try:
        with torch.device("meta"):
            model = timm.create_model(name, pretrained=False)
    except Exception:  # a model that cannot be built on meta is counted when it is checked
        return None
    return sum(p.numel() for p in model.parameters())


def timm_families() -> list[str]:
    """timm's model modules; registrations from elsewhere (``hant_transformed``, which
    ``import compressor`` registers) are not timm families."""
    return [m for m in timm.list_modules()
            if all(timm.models.model_entrypoint(n).__module__.startswith("timm.")
                   for n in timm.list_models(module=m))]


def representatives(families: list[str] | None = None) -> dict[str, tuple[str, int | None]]:
    """``{family: (smallest model, parameter count)}`` for timm's families (or `families`)."""
    out = {}
    known = timm_families()
    for family in families or known:
        names = timm.list_models(module=family)
        if family not in known:
            raise SystemExit(f"no timm family '{family}'; see timm.list_modules()")
        counts = {n: c for n in names if (c := _param_count(n)) is not None}
        best = min(counts, key=counts.get) if counts else sorted(names)[0]
        out[family] = (best, counts.get(best))
    return out


class _Records(logging.Handler):
    """The split's warnings (train-mode traces that differ), kept for the row."""

    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def check_model(name: str, params: int | None = None, max_gib: float = 24.0) -> dict:
    """Split `name` and compare ``assemble(["teacher"] * N)`` with it; one result row."""
    row: dict = {"model": name, "params_m": round(params / 1e6, 2) if params else None}
    if params is not None and 4 * 4 * params / 2**30 > max_gib:
        return row | {"status": "skipped",
                      "reason": f"{params / 1e6:.0f}M parameters need more than {max_gib} GiB"}
    t0 = time.perf_counter()
    try:
        torch.manual_seed(0)
        model = timm.create_model(name, pretrained=False).eval()
        caught = _Records()
        log = logging.getLogger("compressor.split")
        log.addHandler(caught)
        try:
            s = split(model)
        finally:
            log.removeHandler(caught)
        row["warnings"] = caught.messages
        torch.manual_seed(1)
        x = torch.randn(2, *s.input_size)
        with torch.no_grad():
            ref = model(x)
            out = s.assemble(["teacher"] * len(s.layers)).eval()(x)
        diff = (ref - out).abs().max().item() if ref.shape == out.shape else float("inf")
        chained = all(a.out_shape == b.in_shape for a, b in zip(s.layers, s.layers[1:]))
        row["layers"] = len(s.layers)
        row["diff"] = diff
        if len(s.layers) < 2 or not chained or not diff <= _TOL:
            why = (f"{len(s.layers)} layer" if len(s.layers) < 2 else
                   "layer shapes do not chain" if not chained else f"max diff {diff:.3g}")
            row |= {"status": "wrong", "reason": why}
        else:
            row["status"] = "ok"
    except SplitError as e:
        row |= {"status": "refused", "reason": str(e).splitlines()[0]}
    except Exception as e:  # noqa: BLE001 - a crash is reported, not raised
        row |= {"status": "error", "reason": f"{type(e).__name__}: {str(e).splitlines()[0]}"}
    finally:
        gc.collect()
    row["seconds"] = round(time.perf_counter() - t0, 2)
    return row


def _line(family: str, row: dict) -> str:
    status = row["status"]
    if status == "ok":
        what = f"ok ({row['layers']} layers, diff {row['diff']:.1e})"
        if row.get("warnings"):
            what += " [train-mode trace differs]"
    elif status == "wrong":
        what = f"wrong ({row['reason']})"
    else:
        what = f"{status} ({row['reason']})"
    return f"{family:28s} {row['model']:36s} {what}"


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--families", default=None, help="comma-separated timm modules (default all)")
    p.add_argument("--models", default=None,
                   help="comma-separated model names (skips choosing representatives)")
    p.add_argument("--max-gib", type=float, default=24.0)
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    p.add_argument("--json", action="store_true", help="per-family rows in the JSON summary")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.ERROR)
    logging.getLogger("compressor.split").propagate = False  # kept per row, not printed
    warnings.filterwarnings("ignore", module="timm")
    if args.threads:
        torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    if args.models:
        reps = {}
        for n in args.models.split(","):
            fam = next((m for m in timm_families() if n in timm.list_models(module=m)), "?")
            reps[fam if fam not in reps else f"{fam}:{n}"] = (n, _param_count(n))
    else:
        reps = representatives(args.families.split(",") if args.families else None)
    rows = {}
    for family, (name, params) in reps.items():
        rows[family] = check_model(name, params, args.max_gib) | {"family": family}
        print(_line(family, rows[family]), flush=True)
    counts = {k: sum(r["status"] == k for r in rows.values())
              for k in ("ok", "refused", "wrong", "error", "skipped")}
    summary = {"families": len(rows), "ok": counts["ok"], "refused": counts["refused"],
               "wrong": counts["wrong"], "errors": counts["error"], "skipped": counts["skipped"],
               "coverage": round(counts["ok"] / max(len(rows), 1), 4),
               "train_mode_warnings": sum(bool(r.get("warnings")) for r in rows.values()),
               "seconds": round(time.perf_counter() - t0, 1)}
    if args.json:
        summary["rows"] = list(rows.values())
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    main(sys.argv[1:])
