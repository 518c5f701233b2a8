"""Split a network into stem, replaceable layers and head with torch.fx (HANT section 2.1).

Layers are the largest single-input single-output pieces between the stem and the head: the
children of the model's block containers (``nn.Sequential``, ``nn.ModuleList`` and timm's
``*Stage`` modules), expanded recursively while a container holds composite blocks. The model is
then traced with torch.fx (using timm's leaf modules and autowrapped functions, so timm models
trace the way timm traces them) with every layer kept as a leaf, and the graph is checked: each
layer must take exactly the previous layer's output and feed only the next one.
"""

from __future__ import annotations

import copy
import inspect
import logging
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.fx as fx
from torch import nn

import ops_pool

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
        def fn(mod, args, out):
            calls[name] = calls.get(name, 0) + 1
            order.setdefault(name, len(order))
            if len(args) == 1 and torch.is_tensor(args[0]) and torch.is_tensor(out):
                shapes[name] = (tuple(args[0].shape[1:]), tuple(out.shape[1:]))
            else:
                shapes[name] = None

        return fn

    for name, mod in model.named_modules():
        if name:
            handles.append(mod.register_forward_hook(hook(name)))
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


class _Tracer(fx.Tracer):
    def __init__(self, leaves: set[str]):
        try:
            from timm.layers import get_notrace_functions, get_notrace_modules

            fns = tuple(f for f in get_notrace_functions() if callable(f))
            self._timm_leaves = tuple(get_notrace_modules())
        except ImportError:  # pragma: no cover - timm is a dependency
            fns, self._timm_leaves = (), ()
        super().__init__(autowrap_functions=fns)
        self._leaves = leaves

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        if qualname in self._leaves:
            return True
        if type(m) is nn.Identity:
            return False
        if self._timm_leaves and isinstance(m, self._timm_leaves):
            return True
        return super().is_leaf_module(m, qualname)


def _subgraph(root: nn.Module, nodes: list[fx.Node], inp: fx.Node | None, out: fx.Node):
    """A GraphModule of `nodes`; `inp` (if given) becomes the placeholder, `out` the output."""
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
    g.output(env[out])
    g.lint()
    return fx.GraphModule(root, g)


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

    def __repr__(self) -> str:
        return f"Split({self.model_name!r}, layers={len(self.layers)})"

    def to_dict(self) -> dict:
        return {
            "model": self.model_name,
            "input_size": list(self.input_size),
            "layers": [layer.to_dict() for layer in self.layers],
        }

    def build_op(self, index: int, name: str) -> nn.Module:
        """A fresh candidate op `name` for layer `index` (``teacher`` copies the teacher layer)."""
        layer = self.layers[index]
        if name == TEACHER:
            return copy.deepcopy(layer.module)
        try:
            return ops_pool.build(name, layer.in_shape, layer.out_shape)
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
) -> Split:
    """Cut `model` into stem, layers and head.

    Args:
        model: the teacher (a timm model or any ``nn.Module`` built from block containers).
        input_size: (C, H, W); defaults to the model's ``pretrained_cfg['input_size']``.
        model_name: used in messages; defaults to the pretrained cfg's architecture or class name.

    Example:
        >>> import timm, compressor
        >>> s = compressor.split(timm.create_model("test_efficientnet"))
        >>> [layer.name for layer in s.layers][:2]
        ['blocks.0.0', 'blocks.1.0']
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
        stem, head, body = _trace_and_cut(model, name, body)
        modules = dict(model.named_modules())
        layers = [
            Layer(i, p, info["shapes"][p][0], info["shapes"][p][1], modules[p])
            for i, p in enumerate(body)
        ]
        return Split(name, stem, layers, head, size, model, info["output"])
    finally:
        model.train(was_training)


def _longest_body(units: list[tuple[str, bool]]) -> list[str]:
    best: list[str] = []
    run: list[str] = []
    for path, in_container in units:
        if in_container:
            run.append(path)
            if len(run) > len(best):
                best = list(run)
        else:
            run = []
    return best


def _drop_concrete_inputs(graph: fx.Graph) -> None:
    """Remove the placeholders (and the asserts on them) that concrete_args leave behind."""
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    order = {n: i for i, n in enumerate(graph.nodes)}
    for p in placeholders[1:]:
        seen, todo = set(), [p]
        while todo:
            n = todo.pop()
            for u in n.users:
                if u not in seen:
                    seen.add(u)
                    todo.append(u)
        sinks = [n for n in seen if not n.users]
        if all("assert" in getattr(n.target, "__name__", "") for n in sinks):
            for n in sorted(seen, key=order.get, reverse=True):
                graph.erase_node(n)
            graph.erase_node(p)


def _trace_and_cut(model: nn.Module, name: str, body: list[str]):
    tracer = _Tracer(set(body))
    # optional forward arguments (masks, flags) are traced at their defaults
    params = list(inspect.signature(model.forward).parameters.values())[1:]
    concrete = {
        p.name: p.default
        for p in params
        if p.default is not inspect.Parameter.empty and p.kind != p.VAR_KEYWORD
    }
    try:
        graph = tracer.trace(model, concrete_args=concrete or None)
    except Exception as e:
        raise SplitError(f"{name}: torch.fx cannot trace the model: {e}") from e
    _drop_concrete_inputs(graph)
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
            raise SplitError(f"{name}: node '{n.target}' takes {len(ins)} inputs; layers need one.")
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
    stem = _subgraph(model, stem_nodes, None, stem_out)
    head = _subgraph(model, head_consts + head_nodes, last, output.args[0])
    return stem, head, body
