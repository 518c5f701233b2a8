"""b_ij: per-(layer, op) latency on the target, from a LUT file that grows as ops are measured.

Where the target's hardware is not on this machine, missing entries are roofline estimates
(``latency_luts.RooflineEstimator``), marked ``"estimated": true`` in the LUT; `LUT.estimated`
says whether any was used, so the report can say so.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

import latency_luts
import ops_pool
from latency_luts import LUT, Target

from ._errors import ArtifactError
from .search import min_latency
from .split import TEACHER, Split, format_shape
from .store import Store, check_seal

__all__ = ["resolve_target", "layer_latencies", "calibrate", "measure_model", "op_key",
           "can_measure",
           "lut_for_build", "Latencies", "latency_table", "Measurer", "measure_pair",
           "missing_entries", "stale"]

_logger = logging.getLogger(__name__)


def _is_file(target) -> bool:
    return isinstance(target, (str, Path)) and (str(target).endswith(".json")
                                                or Path(target).is_file())


def resolve_target(
    target: str | Path | Target | None,
    store: Store,
    lut: str | Path | None = None,
) -> tuple[LUT, Path | None]:
    """The LUT to use and where it grows (None: a read-only LUT file).

    Args:
        target: a profile name (its LUT lives in the work dir and grows as ops are measured or
            estimated), a LUT file path (read-only), a `Target`, or None (with `lut`).
        store: the work dir.
        lut: a LUT file (read-only); if `target` names a profile too, the file must match its
            precision, batch and device.

    Raises:
        LutError: unreadable/corrupt LUT, or a LUT measured for another precision or batch.
        UnknownTargetError: `target` is neither a profile nor a file (lists the profiles).

    Example:
        >>> table, path = resolve_target("cpu", Store("/tmp/hant"))  # doctest: +SKIP
    """
    if lut is not None:
        table = LUT.load(lut)
        if target is not None and not _is_file(target):
            table.check_compatible(latency_luts.get_target(target), source=f"LUT file {lut}")
        return table, None
    if target is None:
        target = "cpu"
    if _is_file(target):
        return LUT.load(target), None
    t = latency_luts.get_target(target)
    estimate = not latency_luts.hardware_present(t)
    path = store.path("luts", f"{t.name}{'-estimate' if estimate else ''}.json")
    table = None
    if path.exists():
        try:
            check_seal(path)
            table = LUT.load(path)
        except (latency_luts.LutError, ArtifactError, ValueError) as e:  # damaged: measured again
            _logger.warning("%s; starting a new LUT", str(e).split("; delete it")[0])
    if table is not None and (why := stale(table, t)):
        _logger.warning("%s; starting a new LUT", why)
        table = None
    return table or LUT(t), path


def stale(table: LUT, target: Target) -> str | None:
    """Why `table` (the work dir's, or a shipped one) cannot serve `target` on this machine
    (its entries must not be reused or merged), or None: another target profile, another
    machine, or timed the way of an older version."""
    here = latency_luts.device_name(target)
    if table.target != target:
        return f"target profile '{target.name}' changed"
    if table.entries and table.fingerprint.get("measured_on", here) != here:
        return (f"the LUT for '{target.name}' was made on "
                f"{table.fingerprint.get('measured_on')}, this machine has {here}")
    if _timed_otherwise(table):
        return (f"the LUT for '{target.name}' was timed the way of an older "
                f"version ({_timing(table)})")
    return None


def _timing(table: LUT) -> str:
    return table.fingerprint.get("timing") or "outputs copied on every call"


def _timed_otherwise(table: LUT) -> bool:
    """True if `table` holds measurements timed another way than its backend times now
    (`latency_luts.timing_method`): they do not mix with new ones."""
    return bool(table.entries) and not table.estimated and (
        table.fingerprint.get("timing", "") != latency_luts.timing_method(table.target))


def lut_for_build(path: str | Path, target: str | Target) -> LUT:
    """The LUT `hant lut build` grows: the file at `path` if it holds `target`'s table (its
    missing entries get measured), else a new one.

    Raises:
        LutError: `path` holds a LUT for another target (or is corrupt).
    """
    t = latency_luts.get_target(target)
    if not Path(path).exists():
        return LUT(t)
    table = LUT.load(path)
    if table.target != t:
        raise latency_luts.LutError(
            f"{path} holds the LUT of target '{table.target.name}' "
            f"({table.target.precision}, batch {table.target.batch}); write target "
            f"'{t.name}' to another file"
        )
    if _timed_otherwise(table):
        _logger.warning("%s was timed the way of an older version (%s); measuring it again",
                        path, _timing(table))
        return LUT(t)
    return table


def can_measure(lut: LUT, lut_path: Path | None) -> bool:
    """True if this machine can measure whole networks the way `lut` was made (same hardware,
    not an estimate): the closed loop of the search and the report's measured figures."""
    if lut.estimated or not latency_luts.hardware_present(lut.target):
        return False
    if lut_path is not None:
        return True
    here = latency_luts.environment_fingerprint(lut.target, {})
    return lut.fingerprint.get("device") == here["device"]


_SAVE_EVERY_S = 20.0  # an interrupted LUT build loses at most this much work


def op_key(split: Split, arch_key: str, index: int, op: str) -> str:
    """LUT op name: pool ops are shared across teachers; teacher layers and stem/head are not."""
    if op == TEACHER:
        return f"teacher@{arch_key}/{split.layers[index].name}"
    divisor = ops_pool.get_channel_divisor()  # the same name builds other widths under another
    return op if divisor == ops_pool.CHANNEL_DIVISOR else f"{op}@div{divisor}"


def measure_model(model: nn.Module, input_size, target: Target,
                  allow_estimate: bool = False) -> latency_luts.Measurement:
    """End-to-end latency of `model` on `target`'s backend (one call: overhead included).

    Raises:
        BackendUnavailableError: the target's hardware or backend is not here (unless
            `allow_estimate`, which returns a roofline estimate).
    """
    backend = latency_luts.get_backend(target, allow_estimate=allow_estimate)
    return backend.measure(_deploy(model), tuple(input_size))


def measure_pair(a: nn.Module, a_size, b: nn.Module, b_size, target: Target,
                 rounds: int = 5) -> latency_luts.PairedMeasurement:
    """Networks `a` and `b` (inputs `a_size`, `b_size`) timed in alternation on `target`:
    ``ratio`` (b / a) holds on a machine whose speed drifts (`latency_luts.measure_paired`).

    Raises:
        BackendUnavailableError: the target's hardware or backend is not here.
    """
    backend = latency_luts.get_backend(target)
    return latency_luts.measure_paired(backend.timer(_deploy(a), tuple(a_size)),
                                       backend.timer(_deploy(b), tuple(b_size)), rounds)


def _deploy(module: nn.Module) -> nn.Module:
    """The inference form of a module: multi-branch ops (repvgg) fused into single convs, in eval
    mode (a copy; the module itself is left as it was). Latency is measured on this form."""
    return ops_pool.reparameterize(module).eval()


def _mismatch(split: Split, lut: LUT, item: tuple) -> str:
    """What the first missing entry is, in words, and what the LUT has instead."""
    name, in_shape, out_shape, _, where = item
    t = lut.target
    what = (f"op '{name}' ({where}, input {format_shape(in_shape)} -> output "
            f"{format_shape(out_shape)}, batch {t.batch}, {t.precision})")
    same_op = lut.ops_named(name)
    if same_op:
        have = sorted({format_shape(e["in_shape"]) + " -> " + format_shape(e["out_shape"])
                       for e in same_op})
        hint = f"it has that op only at {', '.join(have[:3])}"
    elif "@" in name:
        kind = name.split("@", 1)[0]
        others = sorted({e["op"].split("/", 1)[0] for e in lut.entries.values()
                         if e["op"].startswith(kind + "@")})
        hint = (f"it has {kind}s of other architectures ({', '.join(others[:2])}): it was built "
                "for another teacher or input size" if others
                else f"it has no {kind} entries: it was built for another teacher or pool")
    else:
        hint = "it was built for another pool (recipe)"
    return (f"the LUT has no entry for {what}, its first mismatch with {split.model_name}; "
            f"{hint}. Build one for this model with `hant lut build MODEL --target NAME -o FILE`")


def _items(split: Split, arch_key: str, candidates: dict[int, list[str]]) -> list[tuple]:
    stem_out = split.layers[0].in_shape
    head_in = split.layers[-1].out_shape
    items = [(f"stem@{arch_key}", split.input_size, stem_out, lambda meta: split.stem, "the stem"),
             (f"head@{arch_key}", head_in, split.output_shape, lambda meta: split.head,
              "the head")]
    for i, ops in candidates.items():
        layer = split.layers[i]
        for op in ops:
            items.append((op_key(split, arch_key, i, op), layer.in_shape, layer.out_shape,
                          (lambda meta, i=i, op=op: _candidate(split, i, op, meta)),
                          f"layer {i} '{layer.name}'"))
    return items


def _candidate(split: Split, index: int, op: str, meta: bool) -> nn.Module:
    """Candidate `op` of layer `index` in its deployed form; with `meta` (for a backend that
    needs only shapes, the roofline) a pool op is built on the meta device without its forward
    check: no weights are initialised and nothing is computed."""
    if not meta or op == TEACHER:
        return _deploy(split.build_op(index, op))
    module = split.build_op(index, op, meta=True)
    with torch.device("meta"):
        return ops_pool.reparameterize(module, inplace=True).eval()


def missing_entries(split: Split, arch_key: str, candidates: dict[int, list[str]],
                    lut: LUT) -> int:
    """How many of the candidates' entries `lut` lacks (0: `layer_latencies` measures
    nothing)."""
    return sum(1 for it in _items(split, arch_key, candidates) if (it[0], it[1], it[2]) not in lut)


def layer_latencies(
    split: Split,
    arch_key: str,
    candidates: dict[int, list[str]],
    lut: LUT,
    lut_path: Path | None,
    progress: bool = True,
    allow_estimate: bool = True,
) -> tuple[list[dict[str, float]], float, float]:
    """Fill `lut` with every missing entry; return (b[i][op], stem ms, head ms).

    Entries are net of the backend's per-call overhead (``lut.overhead_ms``); the stem figure
    returned includes it once, so ``stem + head + sum(b)`` is a whole network's latency.
    Missing entries are measured on the target's backend, or estimated (roofline, with a
    warning) where its hardware is not here and `allow_estimate`; ``lut.estimated`` then
    says so.

    Raises:
        LutError: a read-only LUT (`lut_path` None) lacks an entry; the message names the first
            mismatch (layer, op, shapes).
        BackendUnavailableError: the backend cannot measure here (hardware absent and no
            estimate allowed, package missing, no GPU).
    """
    from tqdm import tqdm

    items = _items(split, arch_key, candidates)
    missing, seen = [], set()
    for it in items:  # layers with the same shapes share entries: each is measured once
        key = (it[0], tuple(it[1]), tuple(it[2]))
        if key not in seen and (it[0], it[1], it[2]) not in lut:
            missing.append(it)
            seen.add(key)
    if missing:
        if lut_path is None:
            raise latency_luts.LutError(_mismatch(split, lut, missing[0]))
        backend = latency_luts.get_backend(lut.target, allow_estimate=allow_estimate)
        if not lut.entries or not lut.fingerprint:
            lut.fingerprint = latency_luts.environment_fingerprint(
                lut.target, backend.fingerprint())
        if lut.overhead_ms is None:
            lut.overhead_ms = backend.overhead_ms()
        bar = tqdm(missing, desc=f"latency LUT ({lut.target.name})", unit="op",
                   disable=not progress)
        saved = time.monotonic()
        for name, in_shape, out_shape, make, _ in bar:
            m = backend.measure(make(backend.shapes_only), tuple(in_shape))
            lut.set(name, in_shape, out_shape, max(m.ms - lut.overhead_ms, 0.0), m.spread_ms,
                    m.runs, estimated=m.estimated, raw_ms=m.ms, stable=m.stable)
            if time.monotonic() - saved > _SAVE_EVERY_S:  # by time: a save rewrites the file
                lut.save(lut_path)
                saved = time.monotonic()
        lut.save(lut_path)
    if lut.estimated:
        _logger.warning("latencies for target '%s' are roofline estimates, not measurements",
                        lut.target.name)
    b, stem_ms, head_ms = _raw(split, arch_key, candidates, lut, items)
    c = lut.calibration
    if not c:
        return b, stem_ms, head_ms
    s, a = c["scale"], c["offset_ms"]
    return ([{op: s * ms for op, ms in layer.items()} for layer in b], a + s * stem_ms,
            s * head_ms)


def _raw(split: Split, arch_key: str, candidates: dict[int, list[str]], lut: LUT,
         items: list[tuple]) -> tuple[list[dict[str, float]], float, float]:
    """(b[i][op], stem ms with the per-call overhead, head ms) as the LUT holds them."""
    stem_ms = lut.get(*items[0][:3]) + (lut.overhead_ms or 0.0)
    head_ms = lut.get(*items[1][:3])
    b: list[dict[str, float]] = [{} for _ in split.layers]
    for i, ops in candidates.items():
        layer = split.layers[i]
        for op in ops:
            b[i][op] = lut.get(op_key(split, arch_key, i, op), layer.in_shape, layer.out_shape)
    return b, stem_ms, head_ms


def calibrate(split: Split, arch_key: str, candidates: dict[int, list[str]], lut: LUT,
              lut_path: Path | None, archs: int = 6, seed: int = 0,
              progress: bool = True) -> dict:
    """Fit `lut`'s calibration (`LUT.network_ms`) on `archs` whole networks measured end to end
    on the target: the teacher, the fastest network the candidates allow, and random ones (a
    random candidate per layer, the same draw for the same `seed`); saved with the LUT when
    `lut_path` is given (missing entries are measured first).

    Raises:
        LutError: the LUT is estimated (nothing to measure against), or read-only and lacks an
            entry.
        BackendUnavailableError: the target's hardware is not here.
    """
    import random

    from tqdm import tqdm

    if lut.estimated or not latency_luts.hardware_present(lut.target):
        raise latency_luts.LutError(
            f"target '{lut.target.name}' is not measured on this machine: a calibration needs "
            "its hardware here (estimates are not calibrated)")
    if missing_entries(split, arch_key, candidates, lut):
        layer_latencies(split, arch_key, candidates, lut, lut_path, progress)
    b, stem_ms, head_ms = _raw(split, arch_key, candidates, lut,
                               _items(split, arch_key, candidates))
    rng = random.Random(seed)
    n = len(split.layers)
    choices = [[TEACHER] * n, [min(candidates[i], key=b[i].get) for i in range(n)]]
    while len(choices) < max(archs, 3):
        choices.append([rng.choice(candidates[i]) for i in range(n)])
    predicted, measured = [], []
    for arch in tqdm(choices, desc=f"calibrating LUT ({lut.target.name})", unit="network",
                     disable=not progress):
        predicted.append(stem_ms + head_ms + sum(b[i][op] for i, op in enumerate(arch)))
        measured.append(measure_model(split.assemble(arch).eval(), split.input_size,
                                      lut.target).ms)
    lut.calibration = latency_luts.fit_calibration(predicted, measured) | {"seed": seed}
    if lut_path is not None:
        lut.save(lut_path)
    return lut.calibration


@dataclass
class Latencies:
    """The LUT phase's artifact: b[i][op] (ms) for every candidate, the stem and head, and what
    the LUT had to do to give them."""

    b: list[dict[str, float]]
    stem_ms: float
    head_ms: float
    measured_entries: int = 0
    estimated: bool = False
    calibration: dict | None = None  # the LUT's (`LUT.network_ms`), already applied to b

    @property
    def fixed_ms(self) -> float:
        """Stem and head: in every student."""
        return self.stem_ms + self.head_ms

    @property
    def teacher_ms(self) -> float:
        return self.fixed_ms + sum(layer[TEACHER] for layer in self.b)

    @property
    def min_ms(self) -> float:
        """The fastest student the pool allows (every layer on its fastest op)."""
        return self.fixed_ms + min_latency(self.b)

    def budget(self, speedup: float) -> float:
        """The layers' share of `speedup` x the teacher's latency."""
        return speedup * self.teacher_ms - self.fixed_ms

    def check_reachable(self, speedup: float, model_name: str, target: str) -> None:
        """Raises InfeasibleError (one line: what is reachable) when `speedup` is not."""
        from ._errors import InfeasibleError

        if speedup * self.teacher_ms < self.min_ms:
            lowest = self.min_ms / self.teacher_ms
            raise InfeasibleError(
                f"speedup {speedup} is out of reach for {model_name} on target '{target}': "
                "even the fastest op in every layer (identity where the shapes allow) gives "
                f"{lowest:.3f}; ask for a speedup of at least {lowest:.3f}")

    def not_slower(self, candidates: dict[int, list[str]]) -> dict[int, list[str]]:
        """HANT's latency prefilter: the candidates no slower than the teacher's layer."""
        return {i: [op for op in ops if self.b[i][op] <= self.b[i][TEACHER]]
                for i, ops in candidates.items()}

    def to_dict(self) -> dict:
        return {"measured_entries": self.measured_entries, "cached": not self.measured_entries,
                "estimated": self.estimated, "calibration": self.calibration,
                "min_speedup": round(self.min_ms / self.teacher_ms, 4)}


def latency_table(split: Split, arch_key: str, candidates: dict[int, list[str]], lut: LUT,
                  lut_path: Path | None, progress: bool = True,
                  calibration_archs: int = 0) -> Latencies:
    """The LUT phase: every candidate's latency, measured or estimated where missing; with
    `calibration_archs`, a writable LUT measured here that has no calibration gets one
    (`calibrate`) before the figures are read."""
    before = len(lut.entries)
    b, stem, head = layer_latencies(split, arch_key, candidates, lut, lut_path, progress)
    if (calibration_archs and lut.calibration is None and lut_path is not None
            and can_measure(lut, lut_path)):
        calibrate(split, arch_key, candidates, lut, lut_path, calibration_archs,
                  progress=progress)
        b, stem, head = layer_latencies(split, arch_key, candidates, lut, lut_path, progress)
    return Latencies(b, stem, head, len(lut.entries) - before, lut.estimated, lut.calibration)


class Measurer:
    """End-to-end latency on the target, when its hardware is here (else every figure is
    None): the teacher's once, then any student's."""

    def __init__(self, lut: LUT, lut_path: Path | None, teacher: nn.Module, input_size):
        self.lut, self.input_size, self.teacher = lut, tuple(input_size), teacher
        self.here = can_measure(lut, lut_path)
        self._teacher_timer = None

    def student_ms(self, model: nn.Module) -> float | None:
        if not self.here:
            return None
        return measure_model(model, self.input_size, self.lut.target).ms

    def paired(self, model: nn.Module, rounds: int = 5) -> latency_luts.PairedMeasurement | None:
        """`model` and the teacher timed in alternation (`latency_luts.measure_paired`, the
        teacher as ``a``): ``ratio`` is the measured speedup, which holds on a machine whose
        speed drifts between two measurements minutes apart (None where the hardware is not
        here)."""
        if not self.here:
            return None
        backend = latency_luts.get_backend(self.lut.target)
        if self._teacher_timer is None:  # its session is made once, for every student
            self._teacher_timer = backend.timer(_deploy(self.teacher), self.input_size)
        return latency_luts.measure_paired(self._teacher_timer,
                                           backend.timer(_deploy(model), self.input_size), rounds)
