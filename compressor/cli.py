"""Command line: ``compress`` (the whole pipeline) and ``hant`` (one phase at a time).

Both are thin layers over `compressor.prepare` and the phase steps of `compressor.pipeline`;
a user error prints one line and exits with 2.
Set ``HANT_DEBUG=1`` to see the full traceback.
"""

from __future__ import annotations

import errno
import functools
import json
import logging
import os
import re
import sys
from pathlib import Path

import click

import latency_luts
import ops_pool

from ._errors import CompressorError
from .report import format_report, headline, read_report, summary

__all__ = ["compress_main", "hant", "default_output"]

_USER_ERRORS = (CompressorError, latency_luts.LutError, ops_pool.OpsPoolError)


def _handle_errors(fn):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except _USER_ERRORS as e:
            if os.environ.get("HANT_DEBUG"):
                raise
            click.echo(f"error: {e}", err=True)
            sys.exit(2)
        except OSError as e:
            if e.errno not in _DISK_ERRNOS or os.environ.get("HANT_DEBUG"):
                raise
            click.echo(f"error: {_disk_error(e)}", err=True)
            sys.exit(2)
        except KeyboardInterrupt:
            click.echo("interrupted: finished work is saved; run the same command to resume",
                       err=True)
            sys.exit(130)

    return wrapper


_DISK_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM}


def _disk_error(e: OSError) -> str:
    """One line for a file system that refuses a write (full, read-only, not permitted)."""
    where = f" {e.filename}" if e.filename else ""
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        todo = "free some space, or pass --work-dir / --output on another disk"
    else:
        todo = "make it writable, or pass --work-dir / --output elsewhere"
    return (f"cannot write{where}: {e.strerror or os.strerror(e.errno)} ({todo}; finished "
            "work is saved, run the same command again to resume)")


def _setup_logging(quiet: bool) -> None:
    logging.basicConfig(level=logging.WARNING if quiet else logging.INFO,
                        format="hant: %(message)s", stream=sys.stderr)
    for noisy in ("timm", "httpx", "huggingface_hub"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def _run_options(fn):
    """Options shared by every command that runs phases."""
    opts = [
        click.argument("model"),
        click.option("--data", required=True, type=click.Path(path_type=Path),
                     help="Folder of images (ImageFolder with wnid folders, or flat)."),
        click.option("--target", default=None,
                     help="Target profile (`hant lut targets`) or a LUT file [default: cpu]."),
        click.option("--lut", type=click.Path(path_type=Path), default=None,
                     help="A LUT file built with `hant lut build` (with --target: must match "
                          "its precision and batch)."),
        click.option("--speedup", default="0.5", show_default=True,
                     help="Student latency / teacher latency, in (0, 1); 0.5 = twice as fast. "
                          "A list (0.25,0.5,0.75) also writes a front; the model written is the "
                          "first one's."),
        click.option("--search", "search_method", type=click.Choice(["ip", "nsga2"]),
                     default=None, help="Integer program (Eq. 4) or NSGA-II [default: recipe]."),
        click.option("--distill-loss", type=click.Choice(["mse", "nsr"]), default=None,
                     help="MSE (Eq. 2) or DONNA's per-channel noise-to-signal ratio "
                          "[default: recipe]."),
        click.option("--checkpoint", type=click.Path(path_type=Path), default=None,
                     help="Teacher weights (safetensors or torch file, loaded weights-only)."),
        click.option("--recipe", default=None,
                     help="Recipe name or YAML path [default: MODEL-TARGET if shipped, else "
                          "default]."),
        click.option("--work-dir", type=click.Path(path_type=Path), default=None,
                     help="Artifact cache [default: $HANT_HOME or ~/.cache/hant]."),
        click.option("--val-data", type=click.Path(path_type=Path), default=None,
                     help="Separate evaluation images (else a held-out part of --data)."),
        click.option("--k", type=int, default=None, help="Number of diverse solutions (Eq. 4)."),
        click.option("--device", default=None,
                     help="Where every phase runs: auto (CUDA when present), cpu, cuda, cuda:N "
                          "[default: recipe runtime.device]."),
        click.option("--random-init", is_flag=True,
                     help="Allow a teacher with random weights (smoke tests only)."),
        click.option("--layers", default=None, metavar="PATTERN[,PATTERN]",
                     help="Module paths to use as the layers instead of the automatic cut "
                          "(as `hant split --layers`); the written model records them."),
        click.option("--quiet", is_flag=True, help="No progress bars or phase messages."),
    ]
    for o in reversed(opts):
        fn = o(fn)
    return fn


def _patterns(layers: str | None) -> list[str] | None:
    return None if layers is None else [p.strip() for p in layers.split(",") if p.strip()]


def _make_run(model, data, target, lut, speedup, search_method, distill_loss, checkpoint, recipe,
              work_dir, val_data, k, device, random_init, quiet, layers=None):
    from .inputs import prepare
    from .recipe import default_recipe_name, load_recipe

    if not _rank_zero():
        quiet = True  # under torchrun, rank 0 shows progress and messages for all
    _setup_logging(quiet)
    recipe = load_recipe(recipe or default_recipe_name(model, target))
    recipe = recipe.override("search", method=search_method)  # None values are ignored
    recipe = recipe.override("distill", loss=distill_loss)
    if device is not None:
        recipe = recipe.override("runtime", device=device)
        from .recipe import validate

        validate(recipe, "--device")
    speedups = [v.strip() for v in str(speedup).split(",")]
    return prepare(model, data, target, speedups if len(speedups) > 1 else speedups[0],
                   lut=lut, checkpoint=checkpoint, recipe=recipe, work_dir=work_dir,
                   val_data=val_data, random_init=random_init, progress=not quiet, k=k,
                   layers=_patterns(layers))


def _rank_zero() -> bool:
    """False on the other ranks of a torchrun launch (``RANK`` set and not 0)."""
    return os.environ.get("RANK", "0") == "0"


_QUICKSTART = """Compress MODEL (a timm name) to SPEEDUP x its latency on TARGET.

\b
Quickstart (offline, on this CPU):
  pip install -e ".[dev]"
  compress tf_efficientnet_lite0 --target cpu --speedup 0.5 \\
    --data ../shared/data/imagenet-sample
  hant report runs/tf_efficientnet_lite0-cpu-0.5
\b
then load it with stock timm:
  import timm, compressor   # registers the architecture
  model = timm.create_model("local-dir:runs/tf_efficientnet_lite0-cpu-0.5",
                            pretrained=True)
\b
Publish with --push-to-hub ORG/NAME (token from HF_TOKEN or `hf auth login`);
then anyone loads it with timm.create_model("hf-hub:ORG/NAME", pretrained=True).
"""


def default_output(model: str, target: str, speedup: str) -> Path:
    """``runs/MODEL-TARGET-SPEEDUP`` (a list of speedups joined by ``_``)."""
    parts = [str(model), str(target), str(speedup).replace(",", "_").replace(" ", "")]
    return Path("runs") / re.sub(r"[^A-Za-z0-9._-]+", "_", "-".join(parts))


def _check_push(push_to_hub: str | None, private: bool, revision: str | None) -> None:
    """Before any work: a valid repo id, and --private / --revision only with it."""
    from .publish import check_repo_id

    if push_to_hub:
        check_repo_id(push_to_hub)
    elif private or revision:
        raise CompressorError("--private and --revision go with --push-to-hub ORG/NAME")


@click.command(name="compress", help=_QUICKSTART,
               context_settings={"help_option_names": ["-h", "--help"]})
@_run_options
@click.option("--output", "-o", default=None, type=click.Path(path_type=Path),
              help="Folder to write the compressed model to [default: "
                   "runs/MODEL-TARGET-SPEEDUP].")
@click.option("--push-to-hub", default=None, metavar="ORG/NAME",
              help="Upload the written folder to the Hugging Face Hub (token from HF_TOKEN).")
@click.option("--private", is_flag=True, help="With --push-to-hub: create the repo private.")
@click.option("--revision", default=None, metavar="BRANCH",
              help="With --push-to-hub: commit to this branch (created when missing).")
@click.option("--no-onnx", is_flag=True, help="Do not write onnx/model.onnx.")
@click.option("--json", "as_json", is_flag=True,
              help="Print the report's summary as JSON on the last line of stdout.")
@_handle_errors
def compress_main(output, push_to_hub, private, revision, no_onnx, as_json, **opts):
    from .pipeline import run_all
    from .publish import push_to_hub as push

    _check_push(push_to_hub, private, revision)
    run = _make_run(**opts)
    output = output or default_output(opts["model"], run.lut.target.name, opts["speedup"])
    result = run_all(run)
    out = result.save_pretrained(output, onnx=not no_onnx, repo_id=push_to_hub)
    click.echo(headline(result.report))
    click.echo(f"wrote {out}")
    url = None
    if push_to_hub:
        url = push(out, push_to_hub, private=private, revision=revision)
        click.echo(f"uploaded to {url}")
    if as_json:
        click.echo(json.dumps(summary(result.report, out) | {"hub_commit": url}))


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def hant():
    """HANT phases one at a time, and inspection of splits, pools, LUTs and reports."""


@hant.command("split")
@click.argument("model")
@click.option("--layers", default=None, metavar="PATTERN[,PATTERN]",
              help="Module paths to use as the layers instead of the automatic cut (fnmatch "
                   "over model.named_modules(); of nested matches the outermost is kept).")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@_handle_errors
def split_cmd(model, layers, as_json):
    """Show how MODEL is cut into stem, layers and head.

    \b
    Example:
      hant split dla34
      hant split convnext_tiny --layers 'stages.*'
    """
    from .split import split
    from .teacher import load_teacher

    net, name, _ = load_teacher(model, random_init=True)
    s = split(net, model_name=name, layers=_patterns(layers))
    if as_json:
        click.echo(json.dumps(s.to_dict(), indent=1))
        return
    click.echo(f"{name}: {len(s.layers)} layers, input {s.input_size}")
    for layer in s.layers:
        click.echo(f"  {layer.index:3d}  {layer.name:28s} {str(layer.in_shape):18s} -> "
                   f"{layer.out_shape}  ({type(layer.module).__name__})")


@hant.group("pool")
def pool():
    """The candidate operator pool."""


@pool.command("list")
@click.argument("model")
@click.option("--json", "as_json", is_flag=True)
@_handle_errors
def pool_list(model, as_json):
    """Valid candidate ops for every layer of MODEL."""
    from .split import TEACHER, split
    from .teacher import load_teacher

    net, name, _ = load_teacher(model, random_init=True)
    s = split(net, model_name=name)
    rows = {layer.name: [TEACHER] + ops_pool.valid_ops(layer.in_shape, layer.out_shape)
            for layer in s.layers}
    if as_json:
        click.echo(json.dumps(rows, indent=1))
        return
    for layer_name, ops in rows.items():
        click.echo(f"{layer_name}: {len(ops)} ops: {', '.join(ops)}")


@hant.group("lut")
def lut():
    """Latency look-up tables."""


@lut.command("targets")
def lut_targets():
    """List the target profiles."""
    for name in latency_luts.list_targets():
        t = latency_luts.get_target(name)
        here = ("here" if latency_luts.hardware_present(t)
                else "estimate" if t.can_estimate else "absent")
        click.echo(f"{name:8s} {here:8s} {t.description}")
    for path in latency_luts.list_tables():
        click.echo(f"shipped LUT: {path}")


@lut.command("build")
@click.argument("model")
@click.option("--target", default="cpu", show_default=True)
@click.option("--output", "-o", required=True, type=click.Path(path_type=Path))
@click.option("--recipe", default="default", show_default=True)
@click.option("--checkpoint", type=click.Path(path_type=Path), default=None)
@click.option("--estimate", is_flag=True,
              help="Without the target's hardware here, write roofline estimates.")
@click.option("--quiet", is_flag=True)
@_handle_errors
def lut_build(model, target, output, recipe, checkpoint, estimate, quiet):
    """Measure every candidate op of MODEL on this machine and write a LUT file.

    Example: hant lut build tf_efficientnet_lite0 --target h100 -o lut.json
    """
    from .inputs import arch_key, candidate_ops
    from .latency import layer_latencies, lut_for_build
    from .recipe import load_recipe
    from .split import split
    from .teacher import load_teacher

    _setup_logging(quiet)
    net, name, _ = load_teacher(model, checkpoint=checkpoint, random_init=True)
    s = split(net, model_name=name)
    cands = candidate_ops(s, load_recipe(recipe).pool)
    key = arch_key(name, net, s)
    table = lut_for_build(output, target)
    layer_latencies(s, key, cands, table, output, progress=not quiet, allow_estimate=estimate)
    kind = "estimated" if table.estimated else "measured"
    click.echo(f"wrote {output} ({len(table.entries)} entries, {kind})")


@lut.command("calibrate")
@click.argument("model")
@click.option("--target", default="cpu", show_default=True)
@click.option("--output", "-o", required=True, type=click.Path(path_type=Path),
              help="The LUT file to calibrate (built first if it lacks entries).")
@click.option("--archs", default=6, show_default=True, type=click.IntRange(3, 100),
              help="Networks to measure end to end (the teacher, the fastest, random ones).")
@click.option("--recipe", default="default", show_default=True)
@click.option("--checkpoint", type=click.Path(path_type=Path), default=None)
@click.option("--seed", default=0, show_default=True)
@click.option("--quiet", is_flag=True)
@_handle_errors
def lut_calibrate(model, target, output, archs, recipe, checkpoint, seed, quiet):
    """Fit a LUT's calibration: whole networks measured end to end against their LUT sums.

    Ops timed one at a time need not add up to the network they form (caches, the runtime's
    work per call); the fitted scale and offset, stored in the LUT, take out what is common to
    all ops. Needs the target's hardware here.

    Example: hant lut calibrate tf_efficientnet_lite0 --target cpu -o lut.json
    """
    from .inputs import arch_key, candidate_ops
    from .latency import calibrate, lut_for_build
    from .recipe import load_recipe
    from .split import split
    from .teacher import load_teacher

    _setup_logging(quiet)
    net, name, _ = load_teacher(model, checkpoint=checkpoint, random_init=True)
    s = split(net, model_name=name)
    cands = candidate_ops(s, load_recipe(recipe).pool)
    table = lut_for_build(output, target)
    c = calibrate(s, arch_key(name, net, s), cands, table, output, archs, seed,
                  progress=not quiet)
    click.echo(f"calibrated {output} on {c['archs']} networks: scale {c['scale']:.4f}, offset "
               f"{c['offset_ms']:.4f} ms; median error of the LUT sum "
               f"{c['raw_median_abs_err_pct']:.1f} % -> {c['fit_median_abs_err_pct']:.1f} %")


def _phase_command(name: str, doc: str):
    @hant.command(name, help=doc)
    @_run_options
    @_handle_errors
    def cmd(**opts):
        from . import pipeline
        from .latency import missing_entries

        run = _make_run(**opts)
        if name == "distill":
            # under torchrun the ranks cannot share one LUT measurement: with a LUT that still
            # lacks entries every candidate trains (the search filters the slower ones later)
            if int(os.environ.get("WORLD_SIZE", "1")) > 1 and missing_entries(
                    run.split, run.arch_key, run.candidates, run.lut):
                logging.getLogger(__name__).info(
                    "distill under torchrun with an incomplete LUT: training every candidate "
                    "(build the LUT first, `hant lut build`, to skip the ops slower than the "
                    "teacher's layer)")
                lat = None
            else:
                lat = pipeline.lut_step(run, check=False)
            pool = pipeline.distill_step(run, lat)
            if _rank_zero():
                click.echo(f"distilled {len(pool.results)} ops ({len(pool.failed)} failed) in "
                           f"{pool.root}")
                for r in pool.failed:
                    click.echo(f"  failed: layer {r['layer']} {r['op']}: {r['reason']}")
            return
        lat = pipeline.lut_step(run)
        pool = pipeline.distill_step(run, lat)
        fit = pipeline.fitness_step(run, pool)
        sel = pipeline.search_step(run, lat, pool, fit)
        if name == "search":
            for r in sel.rounds:
                for j, (sol, loss) in enumerate(zip(r["solutions"], r["candidate_losses"])):
                    mark = "*" if j == r["best"] else " "
                    click.echo(f"{mark} {j:3d} objective {sol['objective']:.4f} latency "
                               f"{sol['latency_ms']:.3f} ms  eval loss {loss:.4f}")
            click.echo("best: " + " ".join(sel.best.choices))
            return
        start = pipeline.redistill_step(run, pool, sel.best.choices)
        student = pipeline.finetune_step(run, pool, sel.best.choices, start)
        sel, student = pipeline.runoff_step(run, lat, pool, fit, sel, student)
        scores = pipeline.evaluate_step(run, student.model)
        click.echo(headline(pipeline.build_report(run, lat, pool, sel, scores)))

    return cmd


_phase_command("distill", "Phase 1: distill every candidate op (resumable). Under torchrun "
               "(torchrun --nproc_per_node=P -m compressor distill ...) the ops are shared out "
               "among the processes.")
_phase_command("search", "Phase 2: K diverse solutions of Eq. 4 and candidate evaluation.")
_phase_command("finetune", "Search, then finetune the best architecture and evaluate it.")


@hant.command("report")
@click.argument("folder", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True,
              help="The summary as one JSON line (report.json holds everything).")
@_handle_errors
def report_cmd(folder, as_json):
    """Summarise the report.json of a compressed model folder.

    Example: hant report runs/tf_efficientnet_lite0-cpu-0.5
    """
    report = read_report(folder)
    if as_json:
        click.echo(json.dumps(summary(report, folder)))
        return
    click.echo(format_report(report))


@hant.command("push")
@click.argument("folder", type=click.Path(path_type=Path))
@click.argument("repo_id", metavar="ORG/NAME")
@click.option("--private", is_flag=True, help="Create the repo private.")
@click.option("--revision", default=None, metavar="BRANCH",
              help="Commit to this branch (created when missing).")
@_handle_errors
def push_cmd(folder, repo_id, private, revision):
    """Upload a folder written by compress to the Hugging Face Hub (token from HF_TOKEN).

    Example: hant push runs/tf_efficientnet_lite0-cpu-0.5 me/lite0-cpu-0.5
    """
    from .publish import push_to_hub

    click.echo(f"uploaded to {push_to_hub(folder, repo_id, private=private, revision=revision)}")
