"""Split a network into stem, replaceable layers and head with torch.fx (HANT section 2.1).

Layers are the largest single-input single-output pieces between the stem and the head. The
first of two rules that applies gives them:

* block containers: the children of the model's block containers (``nn.Sequential``,
  ``nn.ModuleList`` and timm's ``*Stage`` modules), expanded recursively while a container
  holds composite blocks; the model is traced with every layer kept as a leaf and each layer
  must take exactly the previous layer's output and feed only the next one;
* the traced graph (`compressor._cut`), where stages are not plain sequences (trees,
  cross-stage units, multi-branch modules, blocks that also take shapes, masks or class
  tokens): the model is traced at full depth and cut wherever exactly one tensor crosses;
  a layer is then a whole tree node, a whole cross-stage unit, or a block of a sequence.

``split(model, layers=[...])`` names the layers instead. Tracing is timm's (`_fx.Tracer`:
torchvision's tracer with timm's leaf modules and autowrapped functions); the model is traced
in eval and in train mode, and a stem, head or piece whose train-mode trace differs keeps both
traces (`_fx.TrainEvalModule`, with a warning), so head dropout still trains.
"""

from __future__ import annotations

import copy
import fnmatch
import logging
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.fx as fx
from torch import nn

import ops_pool

from . import _cut, _fx
from ._errors import SplitError

__all__ = ["Layer", "Split", "split", "TEACHER", "format_shape"]

_logger = logging.getLogger(__name__)

TEACHER = ops_pool.TEACHER  # one marker for both packages: "keep the teacher's layer"
_CONTAINER_TYPES: tuple[type[nn.Module], ...] = (nn.Sequential, nn.ModuleList)


def format_shape(shape) -> str:
    """A per-sample shape as text, e.g. ``(24, 80, 80)`` -> ``24x80x80``."""
    return "x".join(str(v) for v in shape)


@dataclass
class Layer:
    """One replaceable teacher layer t_i. Shapes are per sample (no batch dimension)."""

    index: int
    name: str
    in_shape: tuple[int, ...]
    out_shape: tuple[int, ...]
    module: nn.Module

    def to_dict(self) -> dict:
        return {
            "index": self.index,
            "name": self.name,
            "in_shape": list(self.in_shape),
            "out_shape": list(self.out_shape),
            "type": type(self.module).__name__,
        }


def _is_composite(module: nn.Module) -> bool:
    """A module built from parameterised sub-modules (a block), not a single conv or norm."""
    return any(any(True for _ in child.parameters()) for child in module.children())


def _is_container(module: nn.Module) -> bool:
    if isinstance(module, _CONTAINER_TYPES):
        return any(_is_composite(c) for c in module.children())
    return "stage" in type(module).__name__.lower()


def _call_order(model: nn.Module, example: torch.Tensor) -> tuple[dict[str, int], dict]:
    """Order in which modules are first called, and per-module (in, out) shapes, in one forward."""
    order: dict[str, int] = {}
    shapes: dict[str, tuple] = {}
    calls: dict[str, int] = {}
    handles = []

    def hook(name):
        def fn(mod, args, kwargs, out):
            calls[name] = calls.get(name, 0) + 1
            order.setdefault(name, len(order))
            if len(args) == 1 and not kwargs and torch.is_tensor(args[0]) and torch.is_tensor(out):
                shapes[name] = (tuple(args[0].shape[1:]), tuple(out.shape[1:]))
            else:
                shapes[name] = None

        return fn

    for name, mod in model.named_modules():
        if name:
            handles.append(mod.register_forward_hook(hook(name), with_kwargs=True))
    try:
        with torch.no_grad():
            output = model(example)
    finally:
        for h in handles:
            h.remove()
    # forward hooks fire on exit: a parent fires after its children; order by entry instead
    entry: dict[str, int] = {}
    for name in order:
        parts = name.split(".")
        for i in range(1, len(parts) + 1):
            entry.setdefault(".".join(parts[:i]), len(entry))
    out_shape = tuple(output.shape[1:]) if torch.is_tensor(output) else None
    # ancestors of called modules are included (a container may be indexed, not called)
    return entry, {"shapes": shapes, "calls": calls, "output": out_shape}


def _units(model: nn.Module, order: dict[str, int]) -> list[tuple[str, bool]]:
    """Flatten the module tree into (path, from_container) units in call order."""

    def children(prefix: str, module: nn.Module):
        kids = []
        for name, child in module.named_children():
            path = f"{prefix}.{name}" if prefix else name
            if path in order and not isinstance(child, nn.Identity):
                kids.append((path, child))
        return sorted(kids, key=lambda kv: order[kv[0]])

    def expand(path: str, module: nn.Module, in_container: bool):
        if _is_container(module):
            out = []
            for p, c in children(path, module):
                out.extend(expand(p, c, True))
            return out
        return [(path, in_container)]

    units = []
    for p, c in children("", model):
        units.extend(expand(p, c, False))
    return units


def _subgraph(nodes: list[fx.Node], inp: fx.Node | None, out) -> fx.Graph:
    """A graph of `nodes`; `inp` (if given) becomes the placeholder, `out` the output."""
    g = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    if inp is not None:
        env[inp] = g.placeholder("x")
    for n in nodes:
        if n.op == "placeholder":
            if not n.users:
                continue
            if any(m.op == "placeholder" for m in env):
                raise SplitError(f"the stem uses a second model input '{n.name}'")
            env[n] = g.placeholder(n.name)
            continue
        env[n] = g.node_copy(n, lambda a: env[a])
    g.output(fx.node.map_arg(out, lambda a: env[a]))
    g.lint()
    return g


def _module(root: nn.Module, eval_graph: fx.Graph, train_graph: fx.Graph | None,
            class_name: str = "GraphModule") -> fx.GraphModule:
    """A traced piece; one that the train-mode trace runs differently keeps both traces."""
    if train_graph is None or _fx.same_code(eval_graph, train_graph):
        return fx.GraphModule(root, eval_graph, class_name)
    return _fx.TrainEvalModule(root, train_graph, eval_graph, class_name)


def _warn_modes(name: str, dual: list[str], eval_only: Sequence[str] = ()) -> None:
    """One warning when the train-mode trace differs from the eval-mode one."""
    if eval_only:
        _logger.warning("%s: the train-mode trace differs from the eval-mode one in the %s "
                        "and takes other branches there; those keep eval-mode behaviour when "
                        "training", name, ", ".join(list(dual) + list(eval_only)))
    elif dual:
        _logger.warning("%s: the train-mode trace differs from the eval-mode one in the %s; "
                        "each keeps both traces, so it trains as the teacher does",
                        name, ", ".join(dual))


def _train_trace(model: nn.Module, name: str, leaves, size, buffers: bool):
    """The trace of `model` in train mode (None, with a warning, when it fails)."""
    modes = [(m, m.training) for m in model.modules()]
    model.train()
    try:
        return _trace(model, name, leaves, size, buffers)
    except SplitError as e:
        _logger.warning("%s: cannot trace the model in train mode (%s); the stem and head keep "
                        "eval-mode behaviour when training", name, e)
        return None
    finally:
        for m, mode in modes:
            m.training = mode


class Split:
    """A teacher cut into ``stem``, ``layers`` and ``head``; `assemble` builds students.

    Example:
        >>> import timm, compressor
        >>> s = compressor.split(timm.create_model("test_resnet"))
        >>> model = s.assemble(["teacher"] * len(s.layers))
    """

    def __init__(
        self,
        model_name: str,
        stem: fx.GraphModule,
        layers: list[Layer],
        head: fx.GraphModule,
        input_size: tuple[int, int, int],
        teacher: nn.Module,
        output_shape: tuple[int, ...] | None = None,
    ):
        self.model_name = model_name
        self.output_shape = output_shape
        self.stem = stem
        self.layers = layers
        self.head = head
        self.input_size = tuple(input_size)
        self.teacher = teacher
        self.patterns: list[str] | None = None  # the `layers` patterns that named the layers

    def __repr__(self) -> str:
        return f"Split({self.model_name!r}, layers={len(self.layers)})"

    def to_dict(self) -> dict:
        return {
            "model": self.model_name,
            "input_size": list(self.input_size),
            "layers": [layer.to_dict() for layer in self.layers],
        }

    def build_op(self, index: int, name: str, check: bool = True,
                 meta: bool = False) -> nn.Module:
        """A fresh candidate op `name` for layer `index` (``teacher`` copies the teacher layer);
        `check` False skips the pool's forward check of its output shape; `meta` builds a pool
        op on the meta device, uninitialised (``ops_pool.build``)."""
        layer = self.layers[index]
        if name == TEACHER:
            return copy.deepcopy(layer.module)
        try:
            return ops_pool.build(name, layer.in_shape, layer.out_shape, check=check, meta=meta)
        except ops_pool.OpsPoolError as exc:
            raise SplitError(
                f"{self.model_name} layer {index} '{layer.name}' (input "
                f"{format_shape(layer.in_shape)} -> output {format_shape(layer.out_shape)}): {exc}"
            ) from exc

    def assemble(
        self,
        choices: Sequence[str],
        weights: dict[int, dict[str, torch.Tensor]] | None = None,
    ) -> TransformedNet:
        """Build a student from one op name per layer.

        Args:
            choices: op names, one per layer (``"teacher"`` keeps the teacher's layer).
            weights: optional state dicts per layer index (e.g. distilled weights).
        """
        if len(choices) != len(self.layers):
            raise SplitError(
                f"{self.model_name}: {len(choices)} choices given for {len(self.layers)} layers; "
                "give one op name per layer (see `hant split`)."
            )
        ops = []
        for i, name in enumerate(choices):
            op = self.build_op(i, name)
            if weights and i in weights:
                op.load_state_dict(weights[i])
            ops.append(op)
        cfg = getattr(self.teacher, "pretrained_cfg", None) or {}
        head = copy.deepcopy(self.head)
        classifier = cfg.get("classifier") or ""
        if classifier and not _has_module(head, classifier):
            classifier = ""
        net = TransformedNet(copy.deepcopy(self.stem), ops, head, list(choices),
                             classifier=classifier)
        net.channel_divisor = ops_pool.get_channel_divisor()  # the widths the ops were built with
        net.layer_patterns = self.patterns  # how to split the teacher again when loading
        for attr in ("num_classes", "num_features", "pretrained_cfg"):
            if hasattr(self.teacher, attr):
                setattr(net, attr, copy.deepcopy(getattr(self.teacher, attr)))
        net.feature_info = _feature_info(self.teacher, self.layers, net.stem, net.head)
        return net.train(self.teacher.training)


def _has_module(root: nn.Module, path: str) -> bool:
    try:
        root.get_submodule(path)
    except AttributeError:
        return False
    return True


class TransformedNet(nn.Module):
    """stem -> chosen ops -> head; the student architecture S of the paper.

    It has timm's model surface, so timm's data, training, validation and benchmark code work
    on it unchanged: `forward_features` (the last layer's output, as the head takes it),
    `forward_head(x, pre_logits=...)`, `get_classifier`, `reset_classifier`,
    ``pretrained_cfg`` / ``default_cfg`` and ``feature_info`` (the teacher's, with each module
    path moved to where that module is in the student)."""

    def __init__(self, stem: nn.Module, ops: Sequence[nn.Module], head: nn.Module, choices,
                 classifier: str = ""):
        super().__init__()
        self.stem = stem
        self.layers = nn.ModuleList(ops)
        self.head = head
        self.choices = list(choices)
        self.classifier_name = classifier  # path of the classifier inside `head` ("": none)
        self.pretrained_cfg: dict = {}
        self.feature_info: list[dict] = []

    @property
    def default_cfg(self) -> dict:
        """timm's older name for `pretrained_cfg` (one dict under both names)."""
        return self.pretrained_cfg

    @default_cfg.setter
    def default_cfg(self, cfg: dict) -> None:
        self.pretrained_cfg = cfg

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        for op in self.layers:
            x = op(x)
        return x

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """The head on `forward_features`' output; ``pre_logits``: stop before the classifier
        (pooled features, ``num_features`` wide)."""
        if not pre_logits:
            return self.head(x)
        handle = self.get_classifier().register_forward_hook(lambda m, args, out: args[0])
        try:
            return self.head(x)
        finally:
            handle.remove()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.forward_features(x))

    def get_classifier(self) -> nn.Module:
        if not self.classifier_name:
            raise SplitError("this student has no known classifier (its teacher's "
                             "pretrained_cfg names none)")
        return self.head.get_submodule(self.classifier_name)

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        """A new linear classifier for `num_classes` (0: none, the head gives pre-logits)."""
        if global_pool is not None:
            raise SplitError("reset_classifier: changing global_pool is not supported on a "
                             "transformed network; keep the teacher's pooling")
        old = self.get_classifier()
        width = getattr(old, "in_features", None) or getattr(self, "num_features", None)
        if not width:
            raise SplitError(f"reset_classifier: the classifier {self.classifier_name} is a "
                             f"{type(old).__name__}, not a linear layer with in_features")
        new = nn.Linear(width, num_classes) if num_classes > 0 else nn.Identity()
        param = next(old.parameters(), None)
        if param is not None:
            new = new.to(param.device)
        self.head.set_submodule(self.classifier_name, new)
        self.num_classes = num_classes
        self.pretrained_cfg = {**self.pretrained_cfg, "num_classes": num_classes}


def _feature_info(teacher: nn.Module, layers: list[Layer], stem: nn.Module,
                  head: nn.Module) -> list[dict]:
    """The teacher's ``feature_info`` with each module path mapped into the student: a stage
    (or block) ends at the last layer inside it (``layers.{i}``); a module of the stem or head
    keeps its name under ``stem.`` / ``head.``. Entries that map nowhere are dropped."""
    out = []
    info = getattr(teacher, "feature_info", None) or []
    stem_names = {n for n, _ in stem.named_modules()}
    head_names = {n for n, _ in head.named_modules()}
    for entry in info:
        if not isinstance(entry, dict) or "module" not in entry:
            continue
        mod = entry["module"]
        inside = [layer.index for layer in layers
                  if layer.name == mod or layer.name.startswith(mod + ".")]
        if inside:
            path = f"layers.{max(inside)}"
        elif mod in stem_names:
            path = f"stem.{mod}"
        elif mod in head_names:
            path = f"head.{mod}"
        else:
            continue
        out.append({**entry, "module": path})
    return out


def _input_size(model: nn.Module, input_size) -> tuple[int, int, int]:
    if input_size is not None:
        return tuple(input_size)
    cfg = getattr(model, "pretrained_cfg", None) or {}
    return tuple(cfg.get("input_size", (3, 224, 224)))


def split(
    model: nn.Module,
    input_size: Sequence[int] | None = None,
    model_name: str | None = None,
    layers: Sequence[str] | None = None,
) -> Split:
    """Cut `model` into stem, layers and head.

    Layers are the blocks of the model's block containers when those run as a plain sequence;
    otherwise the largest single-input single-output pieces the traced graph allows (see
    `compressor._cut`). ``layers`` names them instead.

    Args:
        model: the teacher (a timm model or any traceable ``nn.Module``).
        input_size: (C, H, W); defaults to the model's ``pretrained_cfg['input_size']``.
        model_name: used in messages; defaults to the pretrained cfg's architecture or class name.
        layers: fnmatch patterns over ``model.named_modules()`` paths (``"stages.*.blocks.*"``)
            naming the layers; of nested matches the outermost is kept. Code between two named
            modules goes with the later one.

    Example:
        >>> import timm, compressor
        >>> s = compressor.split(timm.create_model("test_efficientnet"))
        >>> [layer.name for layer in s.layers][:2]
        ['blocks.0.0', 'blocks.1.0']
        >>> s = compressor.split(timm.create_model("test_resnet"), layers=["layer*"])
        >>> [layer.name for layer in s.layers]
        ['layer1', 'layer2', 'layer3', 'layer4']
    """
    cfg = getattr(model, "pretrained_cfg", None) or {}
    name = model_name or cfg.get("architecture") or type(model).__name__
    size = _input_size(model, input_size)
    was_training = model.training
    model.eval()
    try:
        example = torch.zeros(2, *size)
        try:
            order, info = _call_order(model, example)
        except Exception as e:
            raise SplitError(
                f"{name}: a forward pass on input {tuple(example.shape)} failed ({e}); "
                "pass input_size= matching the model."
            ) from e
        if layers is not None:
            named = _split_named(model, name, size, [str(p) for p in layers], order, info)
            named.patterns = [str(p) for p in layers]
            return named
        try:
            return _split_blocks(model, name, size, order, info)
        except SplitError as e:
            _logger.debug("%s: the block-container rule does not apply (%s)", name, e)
        return _split_graph(model, name, size, info)
    finally:
        model.train(was_training)


def _split_blocks(model: nn.Module, name: str, size, order, info) -> Split:
    """The children of the block containers, when they run as a plain chain."""
    units = _units(model, order)
    body = _longest_body(units)
    if len(body) < 2:
        raise SplitError(
            f"{name}: found no sequence of replaceable blocks (at most {len(body)} block in a "
            "container); the model needs its blocks in nn.Sequential/ModuleList/*Stage modules."
        )
    for path in body:
        if info["calls"].get(path, 0) != 1:
            raise SplitError(
                f"{name}: module '{path}' is called {info['calls'].get(path)} times per "
                "forward; a replaceable layer must be called exactly once."
            )
        if info["shapes"].get(path) is None:
            raise SplitError(
                f"{name}: module '{path}' does not map one tensor to one tensor; "
                "it cannot be a replaceable layer."
            )
    stem, head, body = _trace_and_cut(model, name, body, size)
    modules = dict(model.named_modules())
    layers = [
        Layer(i, p, info["shapes"][p][0], info["shapes"][p][1], modules[p])
        for i, p in enumerate(body)
    ]
    return Split(name, stem, layers, head, size, model, info["output"])


def _trace(model: nn.Module, name: str, leaves=(), size=None,
           buffers: bool = False) -> _fx.Tracer:
    """timm's trace of `model`, or a one-line SplitError naming where tracing failed."""
    try:
        return _fx.trace(model, leaves, size, buffers)
    except Exception as e:
        tracer_fail = getattr(e, "__hant_failed_in__", None)
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        where = f"module '{tracer_fail}'" if tracer_fail else "the model's forward"
        hint = (f"keep '{tracer_fail}' (or a module around it) whole by naming it in "
                "layers=[...] (--layers PATTERN)" if tracer_fail else
                "the model's own forward must be traceable to be split")
        raise SplitError(f"{name}: torch.fx cannot trace {where}: {msg}; {hint}") from e


def _flow(model: nn.Module, name: str, size, leaves=()) -> _fx.Flow:
    """The eval-mode trace's `Flow`, with ``flow.twin``: its nodes in the train-mode trace."""
    tracer = _trace(model, name, leaves, size, buffers=True)
    try:
        flow = _fx.Flow.build(model, tracer, size)
    except ValueError as e:
        raise SplitError(f"{name}: {e}") from e
    train = _train_trace(model, name, leaves, size, True)
    if train is not None:
        flow.twin, flow.dirty = _fx.twin_nodes(tracer, train)
        flow.train_graph = train.graph
    return flow


def _banned(model: nn.Module) -> list[str]:
    """The first conv (stays in the stem) and the classifier (stays in the head)."""
    cfg = getattr(model, "pretrained_cfg", None) or {}
    out = []
    for key in ("first_conv", "classifier"):
        v = cfg.get(key)
        out.extend([v] if isinstance(v, str) else list(v or []))
    return [p for p in out if p]


def _split_graph(model: nn.Module, name: str, size, info) -> Split:
    """The largest single-input single-output pieces the traced graph allows (`_cut`)."""
    flow = _flow(model, name, size)
    modules = dict(model.named_modules())
    banned = _banned(model)
    found = _cut.units(model, flow, info["calls"])
    chosen = _cut.body(found, lambda u: u.container, banned)
    if len(chosen) < 2:
        chosen = _cut.body(_cut.units(model, flow, info["calls"], group=True),
                           lambda u: u.container, banned)
    if len(chosen) < 2:
        chosen = _cut.body(found, lambda u: any(_cut.weighted(modules[p]) for p in u.paths),
                           banned)
    if len(chosen) < 2:
        outputs = [n for n in flow.result if isinstance(n, fx.Node)] if isinstance(
            flow.result, (list, tuple)) else []
        if len(outputs) > 1:
            raise SplitError(
                f"{name}: the model returns {len(outputs)} tensors (features_only?), taken from "
                "several places, and layers cannot sit between its outputs; split a model "
                "with one output (features_only with one out_indices, or the classifier)")
        raise SplitError(
            f"{name}: found no sequence of two or more replaceable layers "
            f"({_cut.why_no_cut(flow, found)}); name single-input single-output modules as "
            "layers with layers=[...] (hant split MODEL --layers PATTERN)")
    return _build(model, name, size, flow, chosen, info)


def _split_named(model: nn.Module, name: str, size, patterns: list[str], order, info) -> Split:
    """The modules the user named, checked to be single-input single-output."""
    paths = [p for p, _ in model.named_modules() if p]
    if not patterns:
        raise SplitError(f"{name}: layers=[] names no module; give fnmatch patterns such as "
                         f"'{_example_pattern(paths)}'")
    for pat in patterns:
        if not any(fnmatch.fnmatchcase(p, pat) for p in paths):
            raise SplitError(f"{name}: the layers pattern '{pat}' matches no module; module "
                             f"paths look like {', '.join(paths[:3])}, ... (model.named_modules())")
    matched = [p for p in paths if any(fnmatch.fnmatchcase(p, pat) for pat in patterns)]
    outer = [p for p in matched if not any(m != p and _cut.covers(m, p) for m in matched)]
    for p in outer:
        calls = info["calls"].get(p, 0)
        if calls != 1:
            raise SplitError(f"{name}: layer '{p}' runs {calls} times per forward; a layer must "
                             "run exactly once (name the modules it is made of, or its parent)")
    outer.sort(key=lambda p: order[p])
    flow = _flow(model, name, size, leaves=outer)
    tree = _cut.Tree(model, flow, info["calls"])
    chosen = []
    for p in outer:
        if not tree.aligned(p):
            raise SplitError(f"{name}: layer '{p}' is not cuttable: {_not_cuttable(flow, tree, p)}")
        s, e = tree.span[p]
        if chosen and s < chosen[-1].b:
            raise SplitError(f"{name}: layers '{chosen[-1].name}' and '{p}' overlap")
        a = chosen[-1].b if chosen else s
        chosen.append(_cut.Unit(p, a, e + 1, True, [p], p if a == s else None))
    return _build(model, name, size, flow, chosen, info)


def _example_pattern(paths: list[str]) -> str:
    for p in paths:
        if p.count(".") == 1 and p.split(".")[1].isdigit():
            return p.split(".")[0] + ".*"
    return paths[0] if paths else "blocks.*"


def _not_cuttable(flow: _fx.Flow, tree, path: str) -> str:
    """Why a named module is not single-input single-output in the traced graph."""
    s, e = tree.span[path]
    names = flow.name
    if tree.count[path] != e - s + 1:
        other = next(names(n) for n in flow.nodes[s:e + 1]
                     if not _cut.covers(path, flow.owner.get(n, "")))
        return f"other code ('{other}') runs while it runs"
    before, after = flow.live[s], flow.live[e + 1]
    over = [n for n in before if n in after]
    if over:
        users = [u for u in over[0].users if flow.pos.get(u, len(flow.nodes)) > e]
        by = f" (by '{names(users[0])}')" if users else ""
        return (f"'{names(over[0])}' from before it is also used after it{by}, so it is not the "
                "only way through")
    for live, what in ((before, "takes"), (after, "gives")):
        if len(live) > 1:
            listed = ", ".join(f"'{names(n)}'" for n in live[:3])
            return f"it {what} {len(live)} values ({listed}); a layer takes and gives one tensor"
        if live and flow.kind[live[0]] != "act":
            return f"it {what} '{names(live[0])}', a {flow.kind[live[0]]} value, not one tensor"
    return "its output is not used after it"


def _build(model: nn.Module, name: str, size, flow: _fx.Flow, chosen, info) -> Split:
    """Stem, layers and head from cut units; checked to rebuild the model exactly."""
    modules = dict(model.named_modules())
    dual: list[str] = []
    eval_only: list[str] = []

    def piece(a: int, b: int, kind: str, what: str) -> fx.GraphModule:
        train = _fx.train_piece(flow, a, b)
        if train is None and flow.twin is not None:
            eval_only.append(what)
        m = _module(model, flow.piece(a, b), train, kind)
        if isinstance(m, _fx.TrainEvalModule):
            dual.append(what)
        return m

    stem = piece(0, chosen[0].a, "Stem", "stem")
    head = piece(chosen[-1].b, len(flow.nodes), "Head", "head")
    mods = []
    for u in chosen:
        p = u.exact
        if p and info["calls"].get(p) == 1 and info["shapes"].get(p) is not None:
            mods.append(modules[p])  # the module itself, as the block rule gives
        else:
            kind = type(modules[u.paths[0]]).__name__ if len(u.paths) == 1 else "Piece"
            mods.append(piece(u.a, u.b, kind, f"layer '{u.name}'"))
    _warn_modes(name, dual, eval_only)
    x, ref = flow.example, flow.reference
    shapes = []
    with torch.no_grad():
        h = stem(x)
        for m in mods:
            y = m(h)
            shapes.append((tuple(h.shape[1:]), tuple(y.shape[1:])))
            h = y
        out = head(h)
    diff = _max_diff(ref, out)
    if not diff <= 1e-5:
        raise SplitError(f"{name}: the cut model does not reproduce the model (relative "
                         f"difference {diff:.3g}); name the layers with layers=[...] "
                         "(--layers PATTERN)")
    layers = [Layer(i, u.name, shapes[i][0], shapes[i][1], m)
              for i, (u, m) in enumerate(zip(chosen, mods))]
    return Split(name, stem, layers, head, size, model,
                 tuple(ref.shape[1:]) if torch.is_tensor(ref) else None)


def _max_diff(ref, out) -> float:
    """Largest difference between two outputs (tensors, or lists / dicts of them), relative
    to the reference's magnitude; inf when their structure differs."""
    if isinstance(ref, dict) and isinstance(out, dict) and ref.keys() == out.keys():
        return max((_max_diff(ref[k], out[k]) for k in ref), default=0.0)
    if isinstance(ref, (list, tuple)) and isinstance(out, (list, tuple)) and len(ref) == len(
            out):
        return max((_max_diff(a, b) for a, b in zip(ref, out)), default=0.0)
    if torch.is_tensor(ref) and torch.is_tensor(out) and ref.shape == out.shape:
        if ref.numel() == 0:
            return 0.0
        return (ref - out).abs().max().item() / (1.0 + ref.abs().max().item())
    return float("inf")


def _longest_body(units: list[tuple[str, bool]]) -> list[str]:
    return [path for path, _ in _cut.longest_run(units, lambda u: u[1])]


def _trace_and_cut(model: nn.Module, name: str, body: list[str], size=None):
    graphs = _cut_chain(_trace(model, name, body, size).graph, name, body)
    tracer = _train_trace(model, name, body, size, False)
    train = None
    if tracer is not None:
        try:
            train = _cut_chain(tracer.graph, name, body)
        except SplitError as e:
            _logger.warning("%s: the train-mode trace cannot be cut as the eval-mode one (%s); "
                            "the stem and head keep eval-mode behaviour", name, e)
    stem = _module(model, graphs[0], train[0] if train else None)
    head = _module(model, graphs[1], train[1] if train else None)
    _warn_modes(name, [n for n, m in (("stem", stem), ("head", head))
                       if isinstance(m, _fx.TrainEvalModule)])
    return stem, head, body


def _cut_chain(graph: fx.Graph, name: str, body: list[str]) -> tuple[fx.Graph, fx.Graph]:
    """Stem and head graphs around the chain of `body` leaf calls in `graph`."""
    nodes = list(graph.nodes)
    index = {n: i for i, n in enumerate(nodes)}
    unit_nodes = {}
    for n in nodes:
        if n.op == "call_module" and n.target in body:
            unit_nodes[n.target] = n
    missing = [p for p in body if p not in unit_nodes]
    if missing:
        raise SplitError(f"{name}: layer '{missing[0]}' does not appear in the fx graph.")
    chain = [unit_nodes[p] for p in body]
    first, last = chain[0], chain[-1]

    def act_inputs(n: fx.Node) -> list[fx.Node]:
        return [a for a in n.all_input_nodes if a.op != "get_attr"]

    # every layer takes exactly one tensor: the previous layer's output (or the stem's)
    for k, n in enumerate(chain):
        ins = act_inputs(n)
        if len(ins) != 1 or n.kwargs:
            what = (f"{len(ins)} inputs" if len(ins) != 1
                    else f"keyword arguments {sorted(n.kwargs)}")
            raise SplitError(f"{name}: node '{n.target}' takes {what}; layers need one input.")
        if k > 0 and ins[0] is not chain[k - 1]:
            raise SplitError(
                f"{name}: node '{n.target}' takes its input from '{ins[0].name}', not from the "
                f"previous layer '{chain[k - 1].target}'."
            )
        if k < len(chain) - 1 and set(n.users) != {chain[k + 1]}:
            users = ", ".join(u.name for u in n.users)
            raise SplitError(
                f"{name}: the output of node '{n.target}' is used by {users}; a layer's output "
                "may only feed the next layer."
            )
    stem_out = act_inputs(first)[0]
    stem_nodes = [n for n in nodes if index[n] < index[first]]
    head_nodes = [n for n in nodes if index[n] > index[last] and n.op != "output"]
    between = [n for n in nodes if index[first] < index[n] < index[last] and n not in chain]
    if between:
        raise SplitError(
            f"{name}: node '{between[0].name}' runs between the layers; it cannot be split there."
        )
    for n in stem_nodes:
        late = [u for u in n.users if index[u] > index[first]]
        if n is not stem_out and late and n.op != "get_attr":
            raise SplitError(
                f"{name}: node '{n.name}' of the stem is used after the first layer ('{late[0]}')."
            )
    if set(stem_out.users) != {first}:
        raise SplitError(f"{name}: the stem output '{stem_out.name}' is used outside the layers.")
    output = next(n for n in nodes if n.op == "output")
    head_consts = [n for n in stem_nodes if n.op == "get_attr" and any(
        index[u] > index[last] for u in n.users)]
    return (_subgraph(stem_nodes, None, stem_out),
            _subgraph(head_consts + head_nodes, last, output.args[0]))
