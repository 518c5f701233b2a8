"""Which faults does a compression run survive, and which bad inputs does it refuse cleanly?

    python benchmarks/fault_matrix.py --json

Runs a small compression (timm's ``test_efficientnet``, random weights, 24 synthetic images,
two ops per layer, the ``v100`` target, whose latencies are roofline estimates and so the same
in every run) with ``compress`` in subprocesses, in a temporary folder, and for each fault
prints one JSON line ``{"case", "survived", "detail"}``, then a summary line:

* ``kill-PHASE``: ``kill -9`` at a random moment inside the phase (lut, distill, fitness,
  search, finetune, publish), then the same command again; it must resume and write the same
  ``report.json`` choices and ``model.safetensors`` tensors as an uninterrupted run, bit for bit;
* ``concurrent-same`` / ``concurrent-different``: two runs started together on one work dir
  (speedups 0.9 and 0.9, then 0.9 and 0.8): both correct, every artifact computed once;
* ``damaged-op``, ``damaged-fitness``, ``damaged-lut``: a bit flipped in (or the end cut off)
  an artifact of the work dir: one warning line, recomputed, the same result;
* ``readonly-workdir``, ``full-disk``: one ``error:`` line, exit 2, nothing in ``--output``;
* ``image-zoo``: zero-byte, truncated and CMYK JPEGs, 16-bit, palette and grayscale PNGs, a
  12000 x 12000 image, a symlink loop, a text file named ``.jpg``: the run goes on;
* ``checkpoint-pickle``, ``checkpoint-other-arch``: refused in one line, naming the problem;
* ``push-500``, ``push-dropped``: the Hub endpoint fails mid-upload: one line, exit 2, the
  folder intact, the token in no output.

The functions are shared with ``tests/test_faults.py`` (the CI-sized subset).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import re
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script: see tests/
from tests.conftest import make_images  # noqa: E402  (one synthetic image maker)

__all__ = ["Setup", "make_setup", "compress_cmd", "run", "outputs", "compare", "kill_in_phase",
           "concurrent", "damage", "image_zoo", "PHASES", "main"]

PHASES = ["lut", "distill", "fitness", "search", "finetune", "publish"]
_MAIN = "from compressor.cli import compress_main; compress_main()"
RECIPE = """base: default
pool:
  include: [efn_3x3_e1_se1.00, cb_bottle_3x3_ex0.125]
distill:
  batch_size: 8
search:
  k: 2
  verify_rounds: 1
  calibration_archs: 0
finetune:
  epochs: 2
  batch_size: 8
data:
  candidate_eval_images: 4
  batch_size: 8
runtime:
  loader_workers: 0
"""


@dataclass
class Setup:
    """A temporary folder with the images, the recipe and the teacher of the small run."""

    root: Path
    data: Path
    recipe: Path
    teacher: Path


def make_setup(root: Path, n_images: int = 24, finetune_epochs: int = 2) -> Setup:
    """The small run's inputs. Its teacher is random weights saved once to a file: with
    ``--random-init`` every process would draw other weights (timm seeds nothing), and no two
    runs could be compared."""
    import timm
    import torch
    from safetensors.torch import save_file

    root = Path(root)
    data = make_images(root / "imgs", n_images)
    recipe = root / "recipe.yaml"
    recipe.write_text(RECIPE.replace("epochs: 2", f"epochs: {finetune_epochs}"))
    torch.manual_seed(0)
    teacher = root / "teacher.safetensors"
    save_file(timm.create_model("test_efficientnet").state_dict(), str(teacher))
    return Setup(root, data, recipe, teacher)


def compress_cmd(setup: Setup, work: Path, out: Path, speedup: str = "0.9",
                 data: Path | None = None, checkpoint: Path | None = None) -> list[str]:
    """The ``compress`` command line of the small run (not ``--quiet``: its phase lines show
    where a kill lands)."""
    return [sys.executable, "-c", _MAIN, "test_efficientnet", "--data", str(data or setup.data),
            "--checkpoint", str(checkpoint or setup.teacher), "--recipe", str(setup.recipe),
            "--speedup", speedup, "--target", "v100", "--work-dir", str(work), "--no-onnx",
            "-o", str(out)]


class _Run:
    """One started command, its stdout and stderr together in `log`."""

    def __init__(self, cmd: list[str], log: Path, env: dict | None = None):
        self.log = log
        with open(log, "w") as f:
            self.proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT,
                                         env={**os.environ, **(env or {})})

    def done(self) -> bool:
        return self.proc.poll() is not None

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)

    def wait(self, timeout: float = 600) -> subprocess.CompletedProcess:
        code = self.proc.wait(timeout)
        return subprocess.CompletedProcess(self.proc.args, code, "",
                                           self.log.read_text(errors="replace"))


_LOGS = iter(range(10**9))


def _start(cmd: list[str], env: dict | None = None) -> _Run:
    log = Path(tempfile.gettempdir()) / f"fault-matrix-{os.getpid()}-{next(_LOGS)}.log"
    return _Run(cmd, log, env)


def run(cmd: list[str], env: dict | None = None, timeout: float = 600
        ) -> subprocess.CompletedProcess:
    """Run `cmd` to its end; its output (stdout and stderr together) in ``.stderr``."""
    r = _start(cmd, env)
    try:
        return r.wait(timeout)
    finally:
        r.log.unlink(missing_ok=True)


def error_lines(text: str) -> list[str]:
    """The lines a user reads as errors or tracebacks (progress bars and phase lines aside)."""
    return [ln for ln in re.split(r"[\r\n]", text)
            if ln.startswith(("error:", "Traceback")) or "Error" in ln.split(":")[0]]


def warnings_of(text: str) -> list[str]:
    return [ln for ln in re.split(r"[\r\n]", text) if "recomputing it" in ln
            or "starting a new LUT" in ln]


def outputs(out: Path) -> tuple[list[str], dict]:
    """The written model's choices (report.json) and tensors (model.safetensors)."""
    report = json.loads((out / "report.json").read_text())
    return report["student"]["choices"], load_file(str(out / "model.safetensors"))


def compare(a: Path, b: Path) -> tuple[bool, str]:
    """Whether two written folders hold the same choices and bit-identical tensors."""
    (ca, ta), (cb, tb) = outputs(a), outputs(b)
    if ca != cb:
        return False, f"choices differ: {ca} vs {cb}"
    if ta.keys() != tb.keys():
        return False, "tensor names differ"
    diff = [k for k in ta if not (ta[k].dtype == tb[k].dtype and ta[k].shape == tb[k].shape
                                  and ta[k].view(-1).view(dtype=__import__("torch").uint8)
                                  .equal(tb[k].view(-1).view(dtype=__import__("torch").uint8)))]
    if diff:
        return False, f"{len(diff)} of {len(ta)} tensors differ (first {diff[0]})"
    return True, f"same choices, {len(ta)} tensors bit-identical"


def kill_in_phase(cmd: list[str], phase: str, delay_s: float, out: Path,
                  timeout: float = 600) -> str | None:
    """Start `cmd`; ``kill -9`` it `delay_s` after `phase` begins (``publish``: after the
    output's partial folder appears). Returns the phase it was in when killed, None if it
    finished first."""
    r = _start(cmd)
    want = "evaluate" if phase == "publish" else phase

    def seen() -> list[str]:
        return re.findall(r"phase (\w+) \.\.\.", r.log.read_text(errors="replace"))

    try:
        t0 = time.monotonic()
        while want not in seen() and not r.done() and time.monotonic() - t0 < timeout:
            time.sleep(0.005)
        if phase == "publish":
            while not r.done() and not any(out.parent.glob(f".{out.name}.partial-*")):
                time.sleep(0.005)
        time.sleep(delay_s)
        if r.done():
            return None
        r.kill()
        r.wait()
        if phase == "publish" and any(out.parent.glob(f".{out.name}.partial-*")):
            return "publish"
        return (seen() or ["startup"])[-1]
    finally:
        r.log.unlink(missing_ok=True)


def concurrent(cmds: list[list[str]], timeout: float = 600) -> list[subprocess.CompletedProcess]:
    """Start every command at once; wait for all."""
    runs = [_start(c) for c in cmds]
    try:
        return [r.wait(timeout) for r in runs]
    finally:
        for r in runs:
            r.log.unlink(missing_ok=True)


def phase_record(out: Path) -> dict:
    return json.loads((out / "report.json").read_text())["phases"]


def damage(path: Path, how: str, seed: int = 0) -> None:
    """Flip one bit in the middle of `path` (``flip``) or cut off its second half (``cut``)."""
    data = bytearray(path.read_bytes())
    if how == "cut":
        path.write_bytes(bytes(data[: len(data) // 2]))
        return
    i = random.Random(seed).randrange(len(data) // 4, 3 * len(data) // 4)
    if how == "flip-digit":  # a JSON number changed: still parses
        i = next(j for j in range(i, len(data)) if chr(data[j]).isdigit() and j > 0
                 and chr(data[j - 1]).isdigit())
        data[i] = ord("1") if data[i] != ord("1") else ord("2")
    else:
        data[i] ^= 0x10
    path.write_bytes(bytes(data))


def image_zoo(root: Path, good: int = 16, big: int = 12000) -> tuple[Path, int]:
    """A folder of `good` ordinary images and the odd files; returns it and how many of the
    odd files cannot be decoded (they must be skipped and counted, the rest decoded)."""
    root = make_images(Path(root), good)
    d = root / "n01440764"
    rng = np.random.default_rng(1)
    rgb = Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8))
    (d / "zero.jpg").write_bytes(b"")
    rgb.save(d / "full.jpg", quality=90)
    (d / "truncated.jpg").write_bytes((d / "full.jpg").read_bytes()[:300])
    (d / "full.jpg").unlink()
    rgb.convert("CMYK").save(d / "cmyk.jpg")
    Image.fromarray(rng.integers(0, 65535, (40, 40), dtype=np.uint16)).save(d / "deep16.png")
    rgb.convert("P", palette=Image.Palette.ADAPTIVE).save(d / "palette.png")
    rgb.convert("L").save(d / "gray.png")
    Image.new("RGB", (big, big), (90, 120, 200)).save(d / "huge.jpg", quality=50)
    (d / "notes.jpg").write_text("not an image\n")
    os.symlink("loop_b.jpg", d / "loop_a.jpg")
    os.symlink("loop_a.jpg", d / "loop_b.jpg")
    os.symlink("..", d / "dir_loop")  # a folder that contains itself
    return root, 5  # zero, truncated, notes, loop_a, loop_b


@contextlib.contextmanager
def tmpfs(path: Path, size: str = "64m") -> Iterator[bool]:
    """A tmpfs mounted at `path` when this process may mount (yields False where not)."""
    path.mkdir(parents=True, exist_ok=True)
    ok = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                        capture_output=True).returncode == 0
    try:
        yield ok
    finally:
        if ok:
            subprocess.run(["umount", "-l", str(path)], capture_output=True)


def _case(name: str, survived: bool, detail: str) -> dict:
    return {"case": name, "survived": bool(survived), "detail": detail}


def _one_error_exit_2(proc: subprocess.CompletedProcess, *must: str) -> tuple[bool, str]:
    errs = error_lines(proc.stderr + proc.stdout)
    ok = (proc.returncode == 2 and len(errs) == 1 and errs[0].startswith("error:")
          and all(m in errs[0] for m in must))
    return ok, f"exit {proc.returncode}: {errs[0] if errs else proc.stderr.strip()[-300:]}"


def kill_cases(setup: Setup, base: Path, phases: list[str], seed: int) -> list[dict]:
    rng = random.Random(seed)
    seconds = phase_record(base)
    rows = []
    for phase in phases:
        work, out = setup.root / f"w-kill-{phase}", setup.root / f"out-kill-{phase}"
        cmd = compress_cmd(setup, work, out)
        delay = rng.uniform(0, 0.8 * seconds.get(phase, {}).get("seconds", 0.2))
        if phase == "publish":
            delay = rng.uniform(0, 0.3)
        for _ in range(4):  # a phase shorter than the delay: the same run, killed sooner
            killed = kill_in_phase(cmd, phase, delay, out)
            if killed == phase:
                break
            delay /= 4
        again = run(cmd)
        if again.returncode != 0:
            rows.append(_case(f"kill-{phase}", False, f"rerun failed (exit {again.returncode}): "
                              f"{again.stderr.strip()[-300:]}"))
            continue
        same, detail = compare(base, out)
        litter = [p.name for p in out.parent.glob(f".{out.name}.*")]
        rows.append(_case(f"kill-{phase}", same and not litter and killed == phase,
                          f"killed {delay:.2f} s into {phase} (was in: {killed}); rerun: "
                          f"{detail}" + (f"; left {litter}" if litter else "")))
    return rows


def concurrent_cases(setup: Setup, base: Path, base_08: Path | None) -> list[dict]:
    rows = []
    for name, speedups in (("concurrent-same", ("0.9", "0.9")),
                           ("concurrent-different", ("0.9", "0.8"))):
        work = setup.root / f"w-{name}"
        outs = [setup.root / f"out-{name}-{i}" for i in range(2)]
        procs = concurrent([compress_cmd(setup, work, o, s) for o, s in zip(outs, speedups)])
        bad = [p for p in procs if p.returncode != 0]
        if bad:
            rows.append(_case(name, False, f"exit {bad[0].returncode}: "
                              f"{bad[0].stderr.strip()[-300:]}"))
            continue
        same, detail = compare(base, outs[0])
        if speedups[1] == "0.9":
            same2, detail2 = compare(base, outs[1])
        elif base_08 is not None:
            same2, detail2 = compare(base_08, outs[1])
        else:
            same2, detail2 = True, "0.8 not compared"
        recs = [phase_record(o) for o in outs]
        trained = sum(r["distill"].get("ops", 0) for r in recs[:1])
        computed = {ph: sum(not r.get(ph, {}).get("cached", True) for r in recs)
                    for ph in ("fitness", "finetune")}
        once = computed["fitness"] == 1 and computed["finetune"] == (
            1 if speedups[0] == speedups[1] else 2)
        litter = sorted(str(p.relative_to(work)) for p in work.rglob("*.tmp"))
        rows.append(_case(name, same and same2 and once and not litter,
                          f"run 1: {detail}; run 2: {detail2}; fitness computed "
                          f"{computed['fitness']}x, finetune {computed['finetune']}x, "
                          f"{trained} ops" + (f"; temp files left {litter}" if litter else "")))
    return rows


def _artifact(work: Path, kind: str) -> Path:
    if kind == "op":
        return sorted(work.glob("*/distill/*/*/*.safetensors"))[0]
    if kind == "fitness":
        return sorted(work.glob("*/fitness/*.json"))[0]
    return sorted(work.glob("luts/*.json"))[0]


def damaged_cases(setup: Setup, base: Path, work: Path) -> list[dict]:
    """`work` holds the artifacts of the run that wrote `base`."""
    rows = []
    for kind, how in (("op", "flip"), ("op", "cut"), ("fitness", "flip-digit"),
                      ("fitness", "cut"), ("lut", "cut"), ("lut", "flip-digit")):
        path = _artifact(work, kind)
        damage(path, how)
        out = setup.root / f"out-damaged-{kind}-{how}"
        proc = run(compress_cmd(setup, work, out))
        warned = warnings_of(proc.stderr)
        if proc.returncode != 0:
            rows.append(_case(f"damaged-{kind}-{how}", False, f"exit {proc.returncode}: "
                              f"{(error_lines(proc.stderr) or [proc.stderr[-300:]])[0]}"))
            continue
        same, detail = compare(base, out)
        tb = "Traceback" in proc.stderr
        rows.append(_case(f"damaged-{kind}-{how}", same and len(warned) == 1 and not tb,
                          f"{len(warned)} warning(s): {warned[0] if warned else '-'}; {detail}"))
    return rows


def disk_cases(setup: Setup) -> list[dict]:
    rows = []
    mnt = setup.root / "mnt"
    with tmpfs(mnt, "64m") as mounted:
        if not mounted:
            return [_case("readonly-workdir", False, "cannot mount a tmpfs here; not run"),
                    _case("full-disk", False, "cannot mount a tmpfs here; not run")]
        subprocess.run(["mount", "-o", "remount,ro", str(mnt)], check=True)
        out = setup.root / "out-ro"
        proc = run(compress_cmd(setup, mnt / "work", out))
        ok, detail = _one_error_exit_2(proc, "cannot write")
        rows.append(_case("readonly-workdir", ok and not out.exists(), detail))
    with tmpfs(mnt, "300k") as mounted:  # holds a few distilled ops, then is full
        out = setup.root / "out-full"
        proc = run(compress_cmd(setup, mnt / "work", out))
        ok, detail = _one_error_exit_2(proc, "No space left")
        tmp = list(mnt.rglob("*.tmp"))
        rows.append(_case("full-disk", ok and not out.exists() and not tmp,
                          detail + (f"; temp files left {tmp}" if tmp else "")))
    with tmpfs(mnt, "64m"):  # --output on a full disk: nothing half-written there
        work = setup.root / "w-full-out"
        fill = mnt / "fill"
        out = mnt / "out"
        proc0 = run(compress_cmd(setup, work, setup.root / "out-warm"))  # artifacts cached
        subprocess.run(["dd", "if=/dev/zero", f"of={fill}", "bs=1M", "count=64"],
                       capture_output=True)
        fill.unlink()
        subprocess.run(["dd", "if=/dev/zero", f"of={fill}", "bs=1k", "count=65400"],
                       capture_output=True)
        proc = run(compress_cmd(setup, work, out))
        ok, detail = _one_error_exit_2(proc, "No space left")
        left = [p.name for p in mnt.iterdir() if p.name != "fill"]
        rows.append(_case("full-disk-output", proc0.returncode == 0 and ok and not left,
                          detail + (f"; left {left}" if left else "")))
    return rows


def image_case(setup: Setup) -> dict:
    data, bad = image_zoo(setup.root / "zoo")
    out = setup.root / "out-zoo"
    t0 = time.perf_counter()
    proc = run(compress_cmd(setup, setup.root / "w-zoo", out, data=data))
    if proc.returncode != 0:
        return _case("image-zoo", False, f"exit {proc.returncode}: "
                     f"{(error_lines(proc.stderr) or [proc.stderr[-300:]])[0]}")
    rep = json.loads((out / "report.json").read_text())["data"]
    used = sum(v for k, v in rep.items() if k not in ("skipped", "skipped_files"))
    return _case("image-zoo", rep["skipped"] == bad and "Traceback" not in proc.stderr,
                 f"{used} files in the parts, {rep['skipped']} skipped and counted (expected "
                 f"{bad}): {', '.join(Path(f.split(':')[0]).name for f in rep['skipped_files'])}"
                 f"; {time.perf_counter() - t0:.0f} s")


def checkpoint_cases(setup: Setup) -> list[dict]:
    import timm
    import torch

    rows = []
    evil = setup.root / "evil.pth"
    torch.save({"state_dict": {}, "hook": subprocess.CompletedProcess}, evil)
    other = setup.root / "resnet.pth"
    torch.save(timm.create_model("test_resnet").state_dict(), other)
    for name, path, must in (("checkpoint-pickle", evil, "cannot load checkpoint"),
                             ("checkpoint-other-arch", other, "key")):
        out = setup.root / f"out-{name}"
        proc = run(compress_cmd(setup, setup.root / "w-ckpt", out, checkpoint=path))
        ok, detail = _one_error_exit_2(proc, must)
        unsafe = "weights_only=False" in proc.stderr or "trust" in proc.stderr.lower()
        rows.append(_case(name, ok and not unsafe and not out.exists(),
                          detail + ("; advises unsafe loading" if unsafe else "")))
    return rows


def push_cases(setup: Setup, base: Path) -> list[dict]:
    from tests.fake_hub import FakeHub

    rows = []
    for name, mode in (("push-500", 500), ("push-dropped", "drop")):
        hub = FakeHub(setup.root / f"hub-{name}", fail_with=mode, fail_on="commit")
        before = {p.name: p.read_bytes() for p in base.iterdir() if p.is_file()}
        env = {"HF_ENDPOINT": hub.url, "HF_TOKEN": "hf_secret_fault_token",
               "HF_HUB_CACHE": str(setup.root / "hf-cache"), "HF_HUB_DISABLE_TELEMETRY": "1"}
        try:
            proc = run([sys.executable, "-c", "from compressor.cli import hant; hant()", "push",
                        str(base), "org/tiny"], env=env, timeout=300)
        finally:
            hub.close()
        after = {p.name: p.read_bytes() for p in base.iterdir() if p.is_file()}
        intact = {k: v for k, v in after.items() if k != "README.md"} == {
            k: v for k, v in before.items() if k != "README.md"}
        leaked = "hf_secret_fault_token" in proc.stdout + proc.stderr
        ok, detail = _one_error_exit_2(proc, "upload to org/tiny failed")
        rows.append(_case(name, ok and intact and not leaked and hub.failed,
                          detail + ("" if intact else "; the folder changed")
                          + ("; TOKEN PRINTED" if leaked else "")
                          + ("" if hub.failed else "; the endpoint never failed")))
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", action="store_true", help="One JSON line per case (default).")
    ap.add_argument("--seed", type=int, default=0, help="Where in each phase the kills land.")
    ap.add_argument("--only", default=None,
                    help="Comma-separated groups: kill,concurrent,damaged,disk,images,"
                         "checkpoint,push [default: all].")
    ap.add_argument("--keep", type=Path, default=None, help="Work here and keep it.")
    args = ap.parse_args(argv)
    groups = set((args.only or "kill,concurrent,damaged,disk,images,checkpoint,push").split(","))
    t0 = time.perf_counter()
    with contextlib.ExitStack() as stack:
        root = args.keep or Path(stack.enter_context(tempfile.TemporaryDirectory()))
        setup = make_setup(root)
        base, base_08 = root / "out-base", root / "out-base-0.8"
        work = root / "w-base"
        first = run(compress_cmd(setup, work, base))
        if first.returncode != 0:
            print(first.stderr[-2000:], file=sys.stderr)
            return 1
        rows: list[dict] = []

        def emit(new: list[dict]) -> None:
            for r in new:
                print(json.dumps(r), flush=True)
            rows.extend(new)

        if "concurrent" in groups:
            run(compress_cmd(setup, work, base_08, "0.8"))
            emit(concurrent_cases(setup, base, base_08))
        if "kill" in groups:
            emit(kill_cases(setup, base, PHASES, args.seed))
        if "damaged" in groups:
            emit(damaged_cases(setup, base, work))
        if "disk" in groups:
            emit(disk_cases(setup))
        if "images" in groups:
            emit([image_case(setup)])
        if "checkpoint" in groups:
            emit(checkpoint_cases(setup))
        if "push" in groups:
            emit(push_cases(setup, base))
    survived = sum(r["survived"] for r in rows)
    print(json.dumps({"summary": f"{survived}/{len(rows)} survived",
                      "failed": [r["case"] for r in rows if not r["survived"]],
                      "seconds": round(time.perf_counter() - t0, 1)}), flush=True)
    return 0 if survived == len(rows) else 1


if __name__ == "__main__":
    sys.exit(main())
