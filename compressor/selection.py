"""The search phase: K diverse architectures (the integer program of Eq. 4, or NSGA-II), each
evaluated with its distilled weights on a few search images, the best one picked; when the
target's hardware is here the pick is measured end to end and the budget tightened until the
measured speedup meets the request (verify rounds). With several speedups, one best
architecture per speedup (the front)."""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field

import torch
from torch import nn

from ._errors import SearchError
from .baseline import drop_blocks
from .data import ImageSource
from .evaluate import Logits, mean_loss, predict
from .evolution import nsga2
from .fitness import Fitness, prefilter
from .latency import Latencies, Measurer
from .pool import Pool
from .recipe import FitnessCfg, RedistillCfg, SearchCfg
from .redistill import redistill
from .runtime import Runtime
from .search import Solution, kendall_tau, min_latency, solve
from .split import TEACHER

__all__ = ["Selection", "select_architecture", "in_context_fitness"]

_logger = logging.getLogger(__name__)


@dataclass
class Selection:
    """The chosen architecture, every round's K solutions with their evaluated losses, the
    prefilter's counts, the front (several speedups) and what the search had to note."""

    best: Solution
    rounds: list[dict]
    prefilter: dict
    method: str
    front: dict | None = None
    measured_in_loop: int | None = None
    notes: list[str] = field(default_factory=list)
    chosen_round: int = -1  # the round whose architecture is `best`
    runoff: dict | None = None  # set when the block-dropping runoff replaced the pick

    def _timed(self) -> dict:
        """Where `best`'s measurement is: the runoff's, else its verify round's."""
        return self.runoff if self.runoff is not None else self.rounds[self.chosen_round]

    @property
    def measured_ms(self) -> float | None:
        return self._timed().get("measured_ms")

    @property
    def teacher_measured_ms(self) -> float | None:
        """The teacher's end-to-end latency, timed in alternation with `measured_ms`."""
        return self._timed().get("teacher_measured_ms")

    @property
    def measured_speedup(self) -> float | None:
        """The median ratio student / teacher over the alternating rounds."""
        return self._timed().get("measured_speedup")

    def to_dict(self) -> dict:
        out = {"prefilter": self.prefilter, "rounds": len(self.rounds), "method": self.method}
        if self.measured_in_loop is not None:
            out["architectures_measured_in_loop"] = self.measured_in_loop
        return out


@dataclass
class _Ranker:
    """Solves for K architectures and ranks them by their loss on the candidate images."""

    pool: Pool
    lat: Latencies
    cfg: SearchCfg
    cand: ImageSource
    t_logits: Logits
    runtime: Runtime
    seed: int
    latency_fn: object = None
    loss_kind: str = "kl"
    fit: Fitness | None = None  # with `cfg.block_drop_candidate`: the baseline is ranked too
    rerank: tuple[ImageSource, RedistillCfg] | None = None  # with `cfg.rerank_top`

    def __call__(self, a, b, budget: float
                 ) -> tuple[list[Solution], list[float], float, int, dict[int, float]]:
        """(solutions, their losses on the candidate images, Kendall tau objective vs loss,
        the index of the pick, {index: loss after a brief re-distillation} of the re-ranked
        ones (empty when `cfg.rerank_top` is 0))."""
        cfg = self.cfg
        if cfg.method == "nsga2":
            sols = nsga2(a, b, budget, pop_size=cfg.pop_size, generations=cfg.generations,
                         seed=self.seed, time_limit=cfg.time_limit,
                         latency_fn=self.latency_fn)[: cfg.k]
            if not sols:
                raise SearchError("NSGA-II found no architecture within the budget; use the "
                                  "integer program (--search ip) or a larger budget")
        else:
            sols = self._solve(a, b, budget)
        sols += self._block_drop(sols, budget)
        losses = [self.loss(sol.choices) for sol in sols]
        tau = kendall_tau([sol.objective for sol in sols], losses)
        for r in range(cfg.refine_rounds if cfg.method == "ip" else 0):
            best = sols[min(range(len(sols)), key=losses.__getitem__)]
            seen = {tuple(sol.choices) for sol in sols}
            fresh = [sol for sol in self._solve(self.in_context(best.choices, a), b, budget)
                     if tuple(sol.choices) not in seen]
            _logger.info("refine round %d: %d new architectures around the best one", r + 1,
                         len(fresh))
            if not fresh:
                break
            sols += fresh
            losses += [self.loss(sol.choices) for sol in fresh]
        reranked = self._rerank(sols, losses)
        best = (min(reranked, key=reranked.__getitem__) if reranked
                else min(range(len(sols)), key=losses.__getitem__))
        return sols, losses, tau, best, reranked

    def _rerank(self, sols: list[Solution], losses: list[float]) -> dict[int, float]:
        """The best `cfg.rerank_top` by loss, each re-distilled briefly on its own inputs
        from its phase-1 weights (`compressor.redistill`) and scored again on the candidate
        images: {index: loss}. The raw ranking cannot see how far re-distillation takes each
        architecture."""
        if self.cfg.rerank_top <= 0 or self.rerank is None:
            return {}
        images, cfg = self.rerank
        top = sorted(range(len(sols)), key=losses.__getitem__)[: self.cfg.rerank_top]
        out = {}
        for n, i in enumerate(top):
            model = self.pool.assemble(list(sols[i].choices))
            redistill(model, self.pool.split, images, cfg, runtime=self.runtime, seed=self.seed,
                      progress=False)
            out[i] = self.loss(model)
            _logger.info("re-rank %d/%d: candidate %d, loss %.4f -> %.4f after re-distillation",
                         n + 1, len(top), i, losses[i], out[i])
        return out

    def _block_drop(self, sols: list[Solution], budget: float) -> list[Solution]:
        """The block-dropping baseline's architecture at `budget` (`compressor.baseline`), to
        be ranked with the solver's, unless it is among them or cannot reach the budget: a
        student then never loses to dropping whole blocks on the candidate images."""
        if not self.cfg.block_drop_candidate or self.fit is None:
            return []
        drop = drop_blocks(self.lat, self.fit, budget + self.lat.fixed_ms)
        if not drop.reached or any(sol.choices == drop.choices for sol in sols):
            return []
        return [drop.solution(self.lat, self.fit)]

    def _solve(self, a, b, budget: float) -> list[Solution]:
        cfg = self.cfg
        return solve(a, b, budget, k=cfg.k, overlap=cfg.overlap, solver=cfg.solver,
                     time_limit=cfg.time_limit, teacher_ms=self.lat.teacher_ms,
                     fixed_ms=self.lat.fixed_ms, total_time_limit=cfg.total_time_limit,
                     gap=cfg.gap)

    def in_context(self, choices, a: list[dict[str, float]]) -> list[dict[str, float]]:
        """Per layer i and op j of `a`: the loss of `choices` with layer i set to j, less the
        lowest of layer i (a per-layer constant, so the solver's optimum is that of the loss
        change against `choices`), on the candidate images."""
        return in_context_fitness(self.pool, list(choices), [list(layer) for layer in a],
                                  self.cand, self.t_logits, self.runtime, self.loss_kind)

    def loss(self, choices: list[str] | nn.Module) -> float:
        """Loss on the candidate images of an architecture (its phase-1 weights), or of a
        model."""
        model = (choices if isinstance(choices, nn.Module)
                 else self.pool.assemble(list(choices))).eval()
        return mean_loss(predict(model, self.cand, self.runtime), self.t_logits, self.loss_kind)


def select_architecture(
    pool: Pool,
    lat: Latencies,
    fit: Fitness,
    cand: ImageSource,
    teacher: nn.Module,
    cfg: SearchCfg,
    fitness_cfg: FitnessCfg,
    speedups: list[float],
    measurer: Measurer,
    *,
    candidates: int,
    runtime: Runtime | None = None,
    seed: int = 0,
    rerank: tuple[ImageSource, RedistillCfg] | None = None,
) -> Selection:
    """The search phase for ``speedups[0]`` (and the front over all of `speedups`).

    `rerank`: the images and settings of the brief re-distillation that re-ranks the best
    ``cfg.rerank_top`` architectures (needed when that is above 0)."""
    runtime = runtime or Runtime.cpu()
    speedup = speedups[0]
    budget = lat.budget(speedup)
    pre = prefilter(fit, lat.b, pool.loss, fitness_cfg, budget, candidates, len(pool.failed),
                    untrained_slower=pool.skipped_slower)
    for note in pre.notes:
        _logger.warning(note)
    notes = list(pre.notes)
    a = pre.a
    b = [{op: lat.b[i][op] for op in layer} for i, layer in enumerate(a)]
    t_logits = predict(teacher, cand, runtime)
    in_loop = _latency_in_loop(cfg, measurer, pool, lat, notes)
    if cfg.rerank_top > 0 and rerank is None:
        raise SearchError("search.rerank_top needs the re-distillation's images (rerank=...)")
    rank = _Ranker(pool, lat, cfg, cand, t_logits, runtime, seed, in_loop, fitness_cfg.loss,
                   fit, rerank)
    # Verify rounds: the best architecture measured end to end; a miss tightens the budget
    # towards the measured ratio, and slack (faster than asked by more than the tolerance)
    # loosens it, so the student uses the latency it was given. The architecture kept is the
    # last one that met the request (else the last one measured).
    rounds, picked, met = [], [], None
    for _ in range(max(1, cfg.verify_rounds)):
        sols, losses, tau, j, reranked = rank(a, b, budget)
        last = sols[j]
        picked.append(last)
        # timed in alternation with the teacher: the ratio holds where the machine drifts
        pm = measurer.paired(pool.assemble(last.choices))
        rounds.append({
            "budget_ms": budget, "solutions": [x.to_dict() for x in sols],
            "candidate_losses": losses, "best": j,
            "reranked_losses": {str(i): v for i, v in reranked.items()},
            "predicted_ms": lat.fixed_ms + last.latency_ms,
            "kendall_tau": None if math.isnan(tau) else tau,
            "measured_ms": pm.b_ms if pm else None,
            "teacher_measured_ms": pm.a_ms if pm else None,
            "measured_speedup": pm.ratio if pm else None,
        })
        if pm is None:
            break
        got = pm.ratio
        if got <= speedup + cfg.tolerance:
            met = len(rounds) - 1
            if got >= speedup - cfg.tolerance:
                break
            budget *= speedup / got  # slack: loosen towards the measured ratio
            if budget >= lat.budget(1.0):
                break  # the teacher's own layers fit: nothing slower to choose
            _logger.info("measured speedup %.3f is below %.3f; loosening the budget", got,
                         speedup)
            continue
        if met is not None:
            break  # loosened too far: keep the architecture that met the request
        budget *= speedup / got  # tighten towards the measured ratio
        if budget < min_latency(b):
            notes.append("measured speedup missed the request and the budget cannot be "
                         "tightened further")
            break
        _logger.info("measured speedup %.3f misses %.3f; tightening the budget", got, speedup)
    chosen = met if met is not None else len(rounds) - 1
    best = picked[chosen]
    measured_in_loop = in_loop.calls if in_loop is not None and cfg.method == "nsga2" else None
    front = (_front(rank, a, b, lat, speedups, rounds[chosen], t_logits)
             if len(speedups) > 1 else None)
    return Selection(best, rounds, pre.info, cfg.method, front, measured_in_loop,
                     notes, chosen)


def in_context_fitness(pool: Pool, choices: list[str], ops: list[list[str]],
                       images: ImageSource, t_logits: Logits, runtime: Runtime | None = None,
                       kind: str = "kl") -> list[dict[str, float]]:
    """Fitness in an architecture's context: per layer i and op j of ``ops[i]``, the mean loss
    (:func:`~compressor.evaluate.task_loss` against `t_logits`) of the student `choices` with
    layer i alone set to j, less the lowest such loss of layer i. The student's own
    activations feed every op, so an op is scored on the inputs it would get there, and an
    error compounds with the others as it would in that student."""
    from .evaluate import task_loss

    runtime = runtime or Runtime.cpu()
    student = runtime.module(pool.assemble(choices)).eval()
    sums = [dict.fromkeys(layer, 0.0) for layer in ops]
    seen = 0
    modules: dict[tuple[int, str], nn.Module] = {}

    def op(i: int, name: str) -> nn.Module:
        if name == choices[i]:
            return student.layers[i]
        if (i, name) not in modules:
            m = pool.split.layers[i].module if name == TEACHER else pool.op(i, name)
            modules[(i, name)] = runtime.module(m).eval()
        return modules[(i, name)]

    for batch in images.batches(32):
        n = len(batch.y)
        t = t_logits.logits[seen:seen + n].to(runtime.device).float()
        y = batch.y.to(runtime.device)
        with torch.no_grad(), runtime.autocast():
            acts = [student.stem(runtime.input(batch.x))]
            for layer in student.layers:
                acts.append(layer(acts[-1]))
            for i, layer_ops in enumerate(ops):
                for name in layer_ops:
                    h = op(i, name)(acts[i])
                    for later in student.layers[i + 1:]:
                        h = later(h)
                    logits = student.head(h).float()
                    sums[i][name] += float(task_loss(logits, y, t, kind).sum())
        seen += n
    out = []
    for layer in sums:
        low = min(layer.values(), default=0.0)
        out.append({name: (v - low) / max(seen, 1) for name, v in layer.items()})
    return out


def _latency_in_loop(cfg: SearchCfg, measurer: Measurer, pool: Pool, lat: Latencies,
                     notes: list[str]) -> _InLoop | None:
    """DONNA's hardware in the loop for NSGA-II: each architecture's latency measured end to
    end on the target (less the LUT's stem and head, to stay on the layers' scale of the
    budget), when the recipe asks for it and the target's hardware is here; else None (the LUT
    sum)."""
    if not cfg.hardware_in_loop:
        return None
    if not measurer.here:
        notes.append("search.hardware_in_loop: the target's hardware is not here, so NSGA-II "
                     "used the LUT's latencies")
        return None
    return _InLoop(measurer, pool, lat.fixed_ms)


class _InLoop:
    """An architecture's measured latency less the stem and head; counts its measurements."""

    def __init__(self, measurer: Measurer, pool: Pool, fixed_ms: float):
        self.measurer, self.pool, self.fixed_ms, self.calls = measurer, pool, fixed_ms, 0

    def __call__(self, choices: list[str]) -> float:
        self.calls += 1
        return self.measurer.student_ms(self.pool.assemble(choices)) - self.fixed_ms


def _front(rank: _Ranker, a, b, lat: Latencies, speedups: list[float], final: dict,
           t_logits: Logits) -> dict:
    """Best architecture per requested speedup, all from the same pool and LUT."""
    points = []
    for sp in speedups:
        if sp == speedups[0]:
            sol = final["solutions"][final["best"]]
            points.append({"speedup_requested": sp, "latency_ms": lat.fixed_ms + sol[
                "latency_ms"], "loss": final["reranked_losses"].get(
                    str(final["best"]), final["candidate_losses"][final["best"]]),
                "choices": sol["choices"]})
            continue
        try:
            sols, losses, _, j, reranked = rank(a, b, lat.budget(sp))
        except SearchError as e:  # InfeasibleError included: the point says why
            points.append({"speedup_requested": sp, "latency_ms": None, "loss": None,
                           "choices": None, "error": str(e)})
            continue
        points.append({"speedup_requested": sp, "latency_ms": lat.fixed_ms + sols[j].latency_ms,
                       "loss": reranked.get(j, losses[j]), "choices": sols[j].choices})
    teacher = {"latency_ms": lat.teacher_ms, "loss": mean_loss(t_logits, t_logits, rank.loss_kind)}
    return {"points": points, "teacher": teacher}
