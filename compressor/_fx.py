"""torch.fx for `split`: timm's tracer set-up, and where a traced graph can be cut.

Tracing follows timm (``timm.layers._fx``): torchvision's `NodePathTracer` with timm's leaf
modules and autowrapped functions (plus torchvision's ops, as ``create_feature_extractor``
does). The tracer adds bookkeeping (which module's forward created each node) and, for a
split made at one input size, two things plain torch.fx refuses: a branch on the input's
shape (``if x.ndim == 4``) is taken as it is at that size, and ``torch.ones(B, N)`` with a
traced ``B`` is recorded, as `torch.fx.wrap` records a function. A branch on data still
fails, naming the module it is in.

`Flow` runs a traced graph on two batch sizes and sorts its nodes into

* ``act``: a tensor whose first dimension is the batch (an activation);
* ``free``: computed without the input (parameters, buffers, a rotary table): recomputed in
  any piece that needs it;
* ``const``: computed from the input's shape but the same for every batch (``H``, ``W``,
  ``C``): written into a piece as a literal, since the split is made for one input size;
* ``batch`` / ``device`` / ``dtype``: the batch size, device and dtype of the input,
  recomputed from a piece's own input;
* ``other``: anything else computed from the input (a list of tensors, a mask without a batch
  dimension).

A *cut* is a boundary in node order where exactly one value (an ``act``) crosses: the graph
before it and the graph after it are joined by one tensor. A *piece* is the nodes between
two cuts, rebuilt as a graph with that tensor as its input. `twin_nodes` matches the
eval-mode trace with the train-mode one; a piece they run differently becomes a
`TrainEvalModule`.
"""

from __future__ import annotations

import difflib
import inspect
import math
import operator
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx
from torch import nn
from torchvision.models.feature_extraction import NodePathTracer

__all__ = ["Tracer", "trace", "Flow", "TrainEvalModule", "twin_nodes", "same_code", "train_piece",
           "drop_concrete_inputs"]

_LITERALS = (int, float, bool, str, type(None))


def _timm_tracer_kwargs() -> dict:
    try:
        from timm.layers import get_notrace_functions, get_notrace_modules
    except ImportError:  # pragma: no cover - timm is a dependency
        mods, fns = [], []
    else:
        mods = list(get_notrace_modules())
        fns = [f for f in get_notrace_functions() if callable(f)]
    import torchvision

    ops = [o for _, o in inspect.getmembers(torchvision.ops)
           if inspect.isclass(o) and issubclass(o, nn.Module)]
    return {"leaf_modules": mods + ops, "autowrap_functions": fns,
            "autowrap_modules": (math, torchvision.ops)}


class Tracer(NodePathTracer):
    """torchvision's node-path tracer set up the way timm traces, with extra leaf paths.

    ``owner[node]`` is the dot path of the module whose forward created the node (for a leaf
    module call, the module itself; ``""``: the model's own forward)."""

    def __init__(self, leaves: Iterable[str] = (), examples: tuple[torch.Tensor, ...] = (),
                 buffers: bool = False):
        super().__init__(**_timm_tracer_kwargs())
        self.proxy_buffer_attributes = buffers  # buffers as get_attr nodes, not constants
        self.leaf_paths = set(leaves)
        self.examples = examples  # inputs of two batch sizes, to decide shape-only branches
        self.specialized: list[tuple[str, bool]] = []
        self.owner: dict[fx.Node, str] = {}
        self.failed_in: str | None = None  # the innermost module whose forward failed to trace

    def call_module(self, m: nn.Module, forward, args, kwargs):
        try:
            return super().call_module(m, forward, args, kwargs)
        except Exception:
            if self.failed_in is None:
                try:
                    self.failed_in = self.path_of_module(m)
                except NameError:
                    self.failed_in = type(m).__name__
            raise

    def is_leaf_module(self, m: nn.Module, module_qualname: str) -> bool:
        if module_qualname in self.leaf_paths:
            return True
        if type(m) is nn.Identity:  # traced through: it leaves no node
            return False
        return super().is_leaf_module(m, module_qualname)

    def trace(self, root, concrete_args=None) -> fx.Graph:
        """`fx.Tracer.trace`, with torch's factory functions taking traced sizes
        (``torch.ones(B, N)`` where ``B = x.shape[0]``), as `torch.fx.wrap` would."""
        saved = {name: getattr(torch, name) for name in _FACTORIES}
        for name, fn in saved.items():
            setattr(torch, name, self._factory(fn))
        try:
            return super().trace(root, concrete_args)
        finally:
            for name, fn in saved.items():
                setattr(torch, name, fn)

    def _factory(self, fn):
        def wrapper(*args, **kwargs):
            leaves = list(args) + list(kwargs.values())
            leaves += [e for a in leaves if isinstance(a, (tuple, list)) for e in a]
            if any(isinstance(a, fx.Proxy) for a in leaves):
                return self.create_proxy("call_function", fn, args, kwargs)
            return fn(*args, **kwargs)

        return wrapper

    def to_bool(self, obj: fx.Proxy) -> bool:
        """A branch on the input's shape only (``if x.ndim == 4``) is taken as it is for the
        split's input size; a branch on data (or on the batch size) still fails."""
        node = obj.node
        if not self.examples or not _shape_only(node):
            return super().to_bool(obj)
        try:
            values = {bool(_evaluate(self.root, node, x)) for x in self.examples}
        except Exception:  # noqa: BLE001 - it stays the branch torch.fx cannot trace
            return super().to_bool(obj)
        if len(values) != 1:
            raise fx.proxy.TraceError(f"control flow on the batch size at '{node.name}'")
        value = values.pop()
        self.specialized.append((f"{self.current_module_qualname}:{node.name}", value))
        return value

    def create_proxy(self, kind, target, args, kwargs, name=None, type_expr=None, *rest):
        proxy = super().create_proxy(kind, target, args, kwargs, name, type_expr, *rest)
        self.owner[proxy.node] = target if kind == "call_module" else self.current_module_qualname
        return proxy


_FACTORIES = ("ones", "zeros", "empty", "full", "rand", "randn")
_SHAPE_ATTRS = {"shape", "ndim", "dtype", "device", "is_cuda"}
_SHAPE_METHODS = {"size", "dim", "ndimension", "numel"}


def _shape_only(node: fx.Node) -> bool:
    """`node` depends on the input through its shape (dims, size) only, not on data."""
    seen, todo = set(), [node]
    while todo:
        n = todo.pop()
        if n in seen:
            continue
        seen.add(n)
        if n.op == "call_method" and n.target in _SHAPE_METHODS:
            continue
        if n.op == "call_function" and n.target is getattr and n.args[1] in _SHAPE_ATTRS:
            continue
        if n.op in ("placeholder", "get_attr", "call_module"):
            return False
        todo.extend(n.all_input_nodes)
    return True


def _evaluate(root: nn.Module, node: fx.Node, x: torch.Tensor) -> Any:
    """The value of a node of a graph being traced, for input `x`."""
    needed, todo = set(), [node]
    while todo:
        n = todo.pop()
        if n not in needed:
            needed.add(n)
            todo.extend(n.all_input_nodes)
    g = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    for n in node.graph.nodes:
        if n in needed:
            env[n] = g.node_copy(n, lambda a: env[a])
    g.output(env[node])
    # tracing patches nn.Module's __call__ / __getattr__ to record calls: run unpatched
    from torch.fx import _symbolic_trace as st

    patched = nn.Module.__call__, nn.Module.__getattr__
    nn.Module.__call__, nn.Module.__getattr__ = st._orig_module_call, st._orig_module_getattr
    modes = [(m, m.training) for m in root.modules()]
    try:
        args = (x,) if any(n.op == "placeholder" for n in g.nodes) else ()
        with torch.no_grad():
            return fx.GraphModule(root, g).eval()(*args)  # eval: running statistics stay
    finally:
        nn.Module.__call__, nn.Module.__getattr__ = patched
        for m, mode in modes:
            m.training = mode


def drop_concrete_inputs(graph: fx.Graph) -> None:
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


def trace(model: nn.Module, leaves: Iterable[str] = (),
          size: tuple[int, ...] | None = None, buffers: bool = False) -> Tracer:
    """Trace `model` (optional forward arguments at their defaults); the graph is
    ``tracer.graph``. With `size` (C, H, W), branches on the input's shape are taken as
    they are at that size; `buffers`: buffers read in traced code stay buffers. Raises what
    torch.fx raises."""
    gen = torch.Generator().manual_seed(0)
    examples = tuple(torch.randn(b, *size, generator=gen) for b in (2, 3)) if size else ()
    tracer = Tracer(leaves, examples, buffers)
    params = list(inspect.signature(model.forward).parameters.values())[1:]
    concrete = {p.name: p.default for p in params
                if p.default is not inspect.Parameter.empty and p.kind != p.VAR_KEYWORD}
    try:
        tracer.graph = tracer.trace(model, concrete_args=concrete or None)
    except Exception as e:
        e.__hant_failed_in__ = tracer.failed_in
        raise
    drop_concrete_inputs(tracer.graph)
    return tracer


def _summary(v: Any) -> Any:
    """What a value is, small enough to keep for every node: tensors by shape; a tuple or
    list of plain values as itself."""
    if torch.is_tensor(v):
        return ("tensor", tuple(v.shape))
    if isinstance(v, torch.Size):
        return tuple(int(d) for d in v)
    if isinstance(v, (torch.device, torch.dtype)) or isinstance(v, _LITERALS):
        return v
    if isinstance(v, (tuple, list)) and len(v) <= 64:
        if all(isinstance(e, _LITERALS) for e in v):
            return type(v)(v)
        return ("seq", tuple(_summary(e) for e in v))
    return ("object", type(v).__name__)


def _is_literal(v: Any) -> bool:
    if isinstance(v, _LITERALS):
        return True
    if isinstance(v, list):
        return all(isinstance(e, _LITERALS) for e in v)
    return (isinstance(v, tuple) and v[:1] not in (("tensor",), ("seq",), ("object",))
            and all(isinstance(e, _LITERALS) for e in v))


class _Untwinned(Exception):
    """A piece whose train-mode trace differs in structure."""


class _Recorder(fx.Interpreter):
    def __init__(self, gm: fx.GraphModule):
        super().__init__(gm)
        self.values: dict[fx.Node, Any] = {}

    def run_node(self, n: fx.Node) -> Any:
        out = super().run_node(n)
        self.values[n] = _summary(out)
        return out


_RECOMPUTED = ("free", "const", "batch", "device", "dtype")


@dataclass
class Flow:
    """A traced graph's nodes in execution order, each with its kind, and the cuts."""

    root: nn.Module
    graph: fx.Graph
    owner: dict[fx.Node, str]
    qualname: dict[fx.Node, str]
    nodes: list[fx.Node] = field(default_factory=list)  # the input-dependent ones, in order
    kind: dict[fx.Node, str] = field(default_factory=dict)
    value: dict[fx.Node, Any] = field(default_factory=dict)
    live: list[list[fx.Node]] = field(default_factory=list)  # per boundary b: values crossing
    pos: dict[fx.Node, int] = field(default_factory=dict)  # index in `nodes`
    result: Any = None  # the output node's argument
    example: Any = None  # an input of batch 2 and the model's output for it
    reference: Any = None
    twin: dict[fx.Node, fx.Node] | None = None  # the same nodes in the train-mode trace
    train_graph: fx.Graph | None = None
    dirty: set[fx.Node] = field(default_factory=set)  # where that trace differs in structure

    @classmethod
    def build(cls, root: nn.Module, tracer: Tracer, size: tuple[int, ...]) -> Flow:
        graph = tracer.graph
        flow = cls(root, graph, tracer.owner, dict(tracer.node_to_qualname))
        placeholders = [n for n in graph.nodes if n.op == "placeholder"]
        if len(placeholders) != 1:
            raise ValueError(f"the model takes {len(placeholders)} inputs; split needs one")
        gm = fx.GraphModule(root, graph)
        runs = []
        gen = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for b in (2, 3):
                rec = _Recorder(gm)
                x = torch.randn(b, *size, generator=gen)
                out = rec.run(x)
                runs.append(rec.values)
                if b == 2:
                    flow.example, flow.reference = x, out
        v2, v3 = runs
        dyn: set[fx.Node] = set()  # input-dependent values that are not recomputable
        output = None
        for n in graph.nodes:
            if n.op == "output":
                output = n
                continue
            if n.op == "placeholder":
                k = "act"
            elif not any(a in dyn for a in n.all_input_nodes):
                k = "free"  # parameters, literals and recomputable values only
            else:
                k = _value_kind(v2.get(n), v3.get(n))
            flow.kind[n] = k
            if k == "free":
                continue
            if k not in _RECOMPUTED:
                dyn.add(n)
            flow.value[n] = v2.get(n)
            flow.nodes.append(n)
        flow.result = output.args[0]
        flow._liveness(output)
        return flow

    def _liveness(self, output: fx.Node) -> None:
        pos = {n: i for i, n in enumerate(self.nodes)}
        end = len(self.nodes)
        last: dict[fx.Node, int] = {}
        for n in self.nodes:
            if self.kind[n] in _RECOMPUTED:
                continue
            uses = [end if u is output else pos[u] for u in n.users]
            last[n] = max(uses, default=pos[n])
        starts: dict[int, list[fx.Node]] = {}
        for n, lu in last.items():
            if lu > pos[n]:
                starts.setdefault(pos[n] + 1, []).append(n)
        current: list[fx.Node] = []
        self.live = []
        for b in range(end + 1):
            current = [n for n in current if last[n] >= b] + starts.get(b, [])
            self.live.append(current)
        self.pos = pos

    def is_cut(self, b: int) -> bool:
        """Exactly one activation crosses boundary `b` (between nodes b-1 and b)."""
        live = self.live[b]
        return len(live) == 1 and self.kind[live[0]] == "act"

    def name(self, n: fx.Node) -> str:
        return self.qualname.get(n, n.name)

    def piece(self, a: int, b: int, train: bool = False) -> fx.Graph | None:
        """The nodes between boundaries `a` and `b` (both cuts) as a graph of one tensor
        (``a == 0``: from the model's input; ``b == len(nodes)``: to the model's output).
        `train`: the same piece from the train-mode trace (``self.twin``), None where that
        trace differs in structure."""
        twin = self.twin if train else None
        if train and twin is None:
            return None
        g = fx.Graph()
        env: dict[fx.Node, Any] = {}
        back = {t: e for e, t in twin.items()} if twin else None
        if a == 0:
            env[self.nodes[0]] = ph = g.placeholder("x")
            start = 1
        else:
            (inp,) = self.live[a]
            env[inp] = ph = g.placeholder("x")
            start = a

        def copy(n: fx.Node) -> fx.Node:
            if twin is None:
                return g.node_copy(n, get)
            if n in self.dirty or n not in twin:
                raise _Untwinned
            return g.node_copy(twin[n], lambda t: get(back[t]))

        def get(n: fx.Node) -> Any:
            if n in env:
                return env[n]
            k = self.kind[n]
            if k == "free":
                env[n] = copy(n)
            elif k == "const":
                env[n] = self.value[n]
            else:
                env[n] = _input_attr(g, ph, k)
                if env[n] is None:
                    raise ValueError(f"node '{self.name(n)}' is used across a cut")
            return env[n]

        def fill() -> Any:
            for n in self.nodes[start:b]:
                env[n] = copy(n)
            return self.result if b == len(self.nodes) else self.live[b][0]

        return _finish(g, fill, get)


def twin_nodes(tracer: Tracer, other: Tracer) -> tuple[dict[fx.Node, fx.Node], set[fx.Node]]:
    """Match two traces of one model (eval and train mode) node by node: ``(twin, dirty)``,
    where `twin` maps each node of `tracer` to the same node of `other` (they may differ in
    literal arguments, e.g. ``training=``) and `dirty` holds the nodes next to which the
    traces differ in structure (a branch taken in one mode only)."""
    a, b = list(tracer.graph.nodes), list(other.graph.nodes)

    def sig(n: fx.Node, qualname: dict) -> tuple:
        return n.op, _target_name(n.target), qualname.get(n, n.name)

    sa = [sig(n, tracer.node_to_qualname) for n in a]
    sb = [sig(n, other.node_to_qualname) for n in b]
    if sa == sb:
        return dict(zip(a, b)), set()
    twin: dict[fx.Node, fx.Node] = {}
    dirty: set[fx.Node] = set()
    for tag, i1, i2, j1, j2 in difflib.SequenceMatcher(None, sa, sb, autojunk=False).get_opcodes():
        if tag == "equal":
            twin.update(zip(a[i1:i2], b[j1:j2]))
        else:
            dirty.update(a[max(i1 - 1, 0):max(i2, i1 + 1)])
    return twin, dirty


def _target_name(t: Any) -> str:
    return t if isinstance(t, str) else getattr(t, "__qualname__", None) or repr(t)


def same_code(g1: fx.Graph, g2: fx.Graph) -> bool:
    return g1.python_code("self").src == g2.python_code("self").src


class TrainEvalModule(fx.GraphModule):
    """A traced piece that runs its train-mode trace in train mode and its eval-mode trace in
    eval mode (one set of weights), as torchvision's ``DualGraphModule``; it survives
    `copy.deepcopy` (EMA, ``assemble``)."""

    def __init__(self, root: nn.Module | dict, train_graph: fx.Graph, eval_graph: fx.Graph,
                 class_name: str = "GraphModule", training: bool = False):
        super().__init__(root, train_graph if training else eval_graph, class_name)
        for n in list(train_graph.nodes) + list(eval_graph.nodes):
            if n.op in ("get_attr", "call_module") and not _has_attr(self, n.target):
                _copy_attr(root, self, n.target)
        self.train_graph, self.eval_graph = train_graph, eval_graph
        self.training = training

    def train(self, mode: bool = True) -> TrainEvalModule:
        graph = self.train_graph if mode else self.eval_graph
        if self.graph is not graph:
            self.graph = graph  # recompiles forward
        return super().train(mode)

    def _deepcopy_init(self):
        training, name = self.training, type(self).__name__

        def init(res, fake, graph):
            d = fake.__dict__
            TrainEvalModule.__init__(res, fake, d["train_graph"], d["eval_graph"], name,
                                     training)

        return init


def _has_attr(m: nn.Module, path: str) -> bool:
    try:
        for part in path.split("."):
            m = getattr(m, part)
    except AttributeError:
        return False
    return True


def _copy_attr(src: nn.Module | dict, dst: nn.Module, path: str) -> None:
    *prefix, field_name = path.split(".")
    for part in prefix:
        src = src[part] if isinstance(src, dict) else getattr(src, part)
        if not hasattr(dst, part):
            dst.add_module(part, nn.Module())
        dst = getattr(dst, part)
    value = src[field_name] if isinstance(src, dict) else getattr(src, field_name)
    if isinstance(value, nn.Module):
        dst.add_module(field_name, value)
    elif isinstance(value, torch.Tensor) and not isinstance(value, nn.Parameter):
        dst.register_buffer(field_name, value)
    else:
        setattr(dst, field_name, value)


def train_piece(flow: Flow, a: int, b: int) -> fx.Graph | None:
    """`Flow.piece` from the train-mode trace; where that trace takes other branches, the
    stem (everything before its output) and the head (everything after its input) are still
    taken from it whole. None for a middle piece that differs."""
    g = flow.piece(a, b, train=True)
    if g is not None or flow.twin is None or flow.train_graph is None:
        return g
    if a != 0 and b != len(flow.nodes):
        return None
    tnodes = list(flow.train_graph.nodes)
    tpos = {n: i for i, n in enumerate(tnodes)}
    back = {t: e for e, t in flow.twin.items()}
    g = fx.Graph()
    env: dict[fx.Node, Any] = {}
    if a == 0:
        end = flow.twin.get(flow.live[b][0])
        if end is None:
            return None
        todo, out, ph = tnodes[:tpos[end] + 1], end, None
    else:
        start = flow.twin.get(flow.live[a][0])
        if start is None:
            return None
        env[start] = ph = g.placeholder("x")
        todo = [n for n in tnodes[tpos[start] + 1:] if n.op != "output"]
        out = tnodes[-1].args[0]
    inside = set(todo)

    def get(t: fx.Node) -> Any:
        if t in env:
            return env[t]
        kind = flow.kind.get(back[t]) if t in back else None
        if t in inside or kind == "free":
            env[t] = g.node_copy(t, get)
        elif kind == "const":
            env[t] = flow.value[back[t]]
        else:
            env[t] = _input_attr(g, ph, kind)
            if env[t] is None:
                raise _Untwinned
        return env[t]

    def fill() -> Any:
        for n in todo:
            if n not in env:
                env[n] = g.placeholder("x") if n.op == "placeholder" else g.node_copy(n, get)
        return out

    return _finish(g, fill, get)


def _finish(g: fx.Graph, fill: Callable[[], Any],
            get: Callable[[fx.Node], Any]) -> fx.Graph | None:
    """Copy a piece's nodes into `g` with `fill` (which returns the piece's output), add the
    output node, drop what the piece does not need and check the graph; None when the train
    trace cannot be matched to the eval one."""
    try:
        g.output(fx.node.map_arg(fill(), get))
    except _Untwinned:
        return None
    _drop_unused(g)
    g.lint()
    return g


def _input_attr(g: fx.Graph, ph: fx.Node | None, kind: str | None) -> fx.Node | None:
    """A value read off the piece's input `ph` (its batch size, device or dtype), or None
    when `kind` is none of these or the piece has no input."""
    if ph is None:
        return None
    if kind == "batch":
        return g.call_function(operator.getitem, (g.call_function(getattr, (ph, "shape")), 0))
    if kind in ("device", "dtype"):
        return g.call_function(getattr, (ph, kind))
    return None


def _drop_unused(g: fx.Graph) -> None:
    """Dead code elimination (values computed for other pieces), keeping asserts."""
    for n in reversed(list(g.nodes)):
        if n.users or n.op in ("output", "placeholder"):
            continue
        if n.op == "call_function" and "assert" in getattr(n.target, "__name__", ""):
            continue
        g.erase_node(n)


def _value_kind(s2: Any, s3: Any) -> str:
    """The kind of an input-dependent value, from its summaries at batch 2 and batch 3."""
    if isinstance(s2, tuple) and s2[:1] == ("tensor",):
        sh2 = s2[1]
        sh3 = s3[1] if isinstance(s3, tuple) and s3[:1] == ("tensor",) else None
        if sh2 and sh3 and sh2[0] == 2 and sh3[0] == 3 and sh2[1:] == sh3[1:]:
            return "act"
        return "other"
    if isinstance(s2, torch.device):
        return "device"
    if isinstance(s2, torch.dtype):
        return "dtype"
    if s2 == s3 and _is_literal(s2):
        return "const"
    if type(s2) is int and s2 == 2 and s3 == 3:
        return "batch"
    return "other"
