"""Where `split` cuts a model whose stages are not plain sequences of blocks.

The model is traced once at full depth (`_fx.Flow`); a module is *aligned* when one tensor
enters its nodes and one leaves them (a cut on both sides). A module's nodes are split into
pieces at every cut between its children. From the model down:

* a piece holding one aligned child is that child's units: the child's own children when it
  is a container of blocks (a ``Sequential`` / ``ModuleList`` of blocks, a ``*Stage``) or
  holds one, else the child whole (a tree node, a cross-stage unit, a multi-branch module);
* a piece holding several children (or one that is not aligned), such as a stage that passes
  on a class token, is cut at the aligned blocks found inside it, if any (PiT's blocks),
  else kept whole;
* code with no module of its own (a ``permute``, the ``cat`` of a class token) joins the
  block before it.

Replaceable layers are the longest run of block-level units; failing that, of leaf groups (a
conv or linear with the norms, activations and pools after it, for a ``Sequential`` of plain
layers such as VGG's); failing that, of the model's own blocks, convs and linears (DLA's
levels, Inception's mixed modules). Units of ``pretrained_cfg['first_conv']`` or of a module
named like a stem stay in the stem, the classifier in the head.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from ._fx import Flow

__all__ = ["Tree", "Unit", "units", "body", "covers", "weighted", "why_no_cut"]


@dataclass
class Unit:
    """Nodes ``[a, b)`` of a `Flow` (both boundaries cuts), named after a module."""

    name: str
    a: int
    b: int
    container: bool  # a child of an expanded module (the block level)
    paths: list[str] = field(default_factory=list)  # the modules it runs
    exact: str | None = None  # the module whose nodes these are exactly


def covers(path: str, module: str) -> bool:
    """`module` is `path` or inside it."""
    return module == path or module.startswith(path + ".")


class Tree:
    def __init__(self, model: nn.Module, flow: Flow, calls: dict[str, int]):
        self.flow = flow
        self.modules = dict(model.named_modules())
        self.calls = calls
        self.span: dict[str, list[int]] = {}
        self.count: dict[str, int] = {}
        for i, n in enumerate(flow.nodes):
            owner = flow.owner.get(n, "")
            parts = owner.split(".") if owner else []
            for k in range(1, len(parts) + 1):
                p = ".".join(parts[:k])
                if p in self.span:
                    self.span[p][1] = i
                else:
                    self.span[p] = [i, i]
                self.count[p] = self.count.get(p, 0) + 1

    def aligned(self, path: str) -> bool:
        if path not in self.span:
            return False
        s, e = self.span[path]
        f = self.flow
        return (self.count[path] == e - s + 1 and f.is_cut(s) and f.is_cut(e + 1)
                and f.pos[f.live[e + 1][0]] >= s)

    def kids(self, path: str) -> list[tuple[str, bool]]:
        """Children that run, in order; an uncalled container (a ModuleList) is replaced by its
        own children (flagged True)."""
        mod = self.modules[path]
        out = []
        for cname, _ in mod.named_children():
            c = f"{path}.{cname}" if path else cname
            if c not in self.span:
                continue
            if self.calls.get(c, 0) == 0:
                out.extend((k, True) for k, _ in self.kids(c))
            else:
                out.append((c, False))
        return sorted(out, key=lambda kv: self.span[kv[0]][0])

    def pieces(self, path: str) -> list[tuple[int, int, list[tuple[str, bool]]]]:
        """``path``'s nodes split at every cut no child straddles: (a, b, children in it)."""
        if path:
            s, e = self.span[path]
            lo, hi = s, e + 1
        else:
            lo, hi = 0, len(self.flow.nodes)
        kids = self.kids(path)
        inside = set()
        for k, _ in kids:
            ks, ke = self.span[k]
            inside.update(range(ks + 1, ke + 1))
        bounds = [lo] + [b for b in range(lo + 1, hi) if b not in inside and self.flow.is_cut(b)]
        bounds.append(hi)
        out = []
        for a, b in zip(bounds, bounds[1:]):
            out.append((a, b, [kv for kv in kids if a <= self.span[kv[0]][0] < b]))
        return out


def _composite(m: nn.Module) -> bool:
    return any(any(True for _ in c.parameters()) for c in m.children())


def weighted(m: nn.Module) -> bool:
    """A block, or a conv / linear (a weight of two or more dimensions)."""
    return _composite(m) or any(p.dim() >= 2 for p in m.parameters(recurse=False))


def _is_container(m: nn.Module) -> bool:
    """The block rule's containers: a Sequential / ModuleList of blocks, or a ``*Stage``."""
    if isinstance(m, (nn.Sequential, nn.ModuleList)):
        return any(_composite(c) for c in m.children())
    return "stage" in type(m).__name__.lower()


def _expand(tree: Tree, path: str, group: bool) -> list[Unit] | None:
    """Units of an aligned module: its children when it is a container of blocks (or holds
    one that expands), else None (the module is kept whole)."""
    pieces = tree.pieces(path)
    mod = tree.modules[path]
    container = _is_container(mod)
    mods = [tree.modules[kids[0][0]] if len(kids) == 1 else None for _, _, kids in pieces]
    if container or not group or not isinstance(mod, nn.Sequential):
        out: list[Unit] = []
        for a, b, kids in pieces:
            if kids:
                out.extend(_region(tree, a, b, kids, container, group))
            else:
                out.append(Unit("", a, b, container))
        blocks = sum(u.container and any(_composite(tree.modules[p]) for p in u.paths)
                     for u in out)
        if blocks >= 2 or (not container and blocks):
            return _attach_glue(out)
        return None
    # a Sequential of plain layers: a conv or linear with the layers after it
    if any(len(kids) > 1 for _, _, kids in pieces) or sum(
            m is not None and weighted(m) for m in mods) < 2:
        return None
    out = []
    for (a, b, kids), m in zip(pieces, mods):
        if m is not None and weighted(m) or not out:
            out.append(Unit(kids[0][0] if kids else "", a, b, True,
                            [kids[0][0]] if kids else []))
        else:
            out[-1].b = b
            out[-1].paths += [k for k, _ in kids]
    for u in out:
        u.exact = u.name if len(u.paths) == 1 and tree.span[u.name] == [u.a, u.b - 1] else None
    return _attach_glue(out)


def _region(tree: Tree, a: int, b: int, kids: list[tuple[str, bool]], container: bool,
            group: bool) -> list[Unit]:
    """Units of the piece ``[a, b)`` holding `kids`: an aligned child's own units; else the
    blocks of sequences found inside (``pit``: the blocks of a stage that also passes on a
    class token), with the code between them as nameless units; else the piece whole."""
    if len(kids) == 1 and tree.aligned(kids[0][0]):
        return _unit_of(tree, kids[0][0], a, b, container or kids[0][1], group)
    inner: list[Unit] = []
    for k, flag in kids:
        inner.extend(_aligned_within(tree, k, container or flag, group))
    if not any(u.container for u in inner):
        names = [k for k, _ in kids]
        if len(names) == 1:
            return [Unit(names[0], a, b, container or kids[0][1], names)]
        return [Unit(f"{names[0]}..{names[-1]}", a, b, False, names)]
    out: list[Unit] = []
    pos = a
    for u in inner:
        if u.a > pos:
            out.append(Unit("", pos, u.a, False))
        out.append(u)
        pos = u.b
    if pos < b:
        out.append(Unit("", pos, b, False))
    return out


def _aligned_within(tree: Tree, path: str, container: bool, group: bool) -> list[Unit]:
    """The outermost aligned modules at or under `path`, as units."""
    if tree.aligned(path):
        s, e = tree.span[path]
        return _unit_of(tree, path, s, e + 1, container, group)
    inside = _is_container(tree.modules[path])
    out: list[Unit] = []
    for k, flag in tree.kids(path):
        out.extend(_aligned_within(tree, k, inside or flag, group))
    return out


def _unit_of(tree: Tree, kid: str, a: int, b: int, container: bool, group: bool) -> list[Unit]:
    subs = _expand(tree, kid, group) if tree.aligned(kid) else None
    exact = tree.span[kid] == [a, b - 1] and tree.aligned(kid)
    if not subs:
        return [Unit(kid, a, b, container, [kid], kid if exact else None)]
    if subs[0].a != a:
        subs[0].a, subs[0].exact = a, None
    if subs[-1].b != b:
        subs[-1].b, subs[-1].exact = b, None
    return subs


def _attach_glue(units: list[Unit]) -> list[Unit]:
    """Nameless units (code with no module of its own: a ``permute``, the ``cat`` of a class
    token) join the block before them (or, first in a module, the one after)."""
    out: list[Unit] = []
    for i, u in enumerate(units):
        if u.name:
            out.append(u)
        elif out and out[-1].container and (u.container or _next_block(units, i)):
            out[-1].b, out[-1].exact = u.b, None
        else:
            out.append(u)
    merged: list[Unit] = []
    for u in out:  # glue left before a block (first in its module) joins that block
        if merged and not merged[-1].name and u.container and (
                merged[-1].container or len(merged) == 1):
            u.a, u.exact = merged[-1].a, None
            merged[-1] = u
        else:
            merged.append(u)
    return merged


def _next_block(units: list[Unit], i: int) -> bool:
    nxt = next((u for u in units[i + 1:] if u.name), None)
    return nxt is not None and nxt.container


def units(model: nn.Module, flow: Flow, calls: dict[str, int], group: bool = False) -> list[Unit]:
    """The model's nodes as consecutive units, from the model's children down."""
    tree = Tree(model, flow, calls)
    out: list[Unit] = []
    for a, b, kids in tree.pieces(""):
        out.extend(_region(tree, a, b, kids, False, group) if kids else [Unit("", a, b, False)])
    out = _attach_glue(out)
    for u in out:
        if not u.name:
            u.name = flow.name(flow.nodes[u.a])
    return out


def body(candidates: list[Unit], keep: Callable[[Unit], bool], banned: list[str]) -> list[Unit]:
    """The longest run of consecutive units that satisfy `keep` and hold no `banned` module
    and no part of a module named like a stem (``stem``, ``conv_stem``)."""
    def ok(u: Unit) -> bool:
        stem = any("stem" in part for p in u.paths for part in p.split("."))
        return keep(u) and not stem and not any(covers(p, m) for p in u.paths for m in banned)

    return longest_run(candidates, ok)


def longest_run(items: list, keep: Callable[[Any], bool]) -> list:
    """The longest run of consecutive `items` that satisfy `keep` (the first when tied)."""
    best: list = []
    run: list = []
    for it in items:
        run = run + [it] if keep(it) else []
        if len(run) > len(best):
            best = run
    return best


def why_no_cut(flow: Flow, us: list[Unit]) -> str:
    """Why the largest unit cannot be cut further: a value that crosses its inside."""
    for u in sorted(us, key=lambda u: u.b - u.a, reverse=True):
        for b in range(u.a + 1, u.b):
            live = flow.live[b]
            if flow.is_cut(b) or not live:
                continue
            n = min(live, key=lambda m: flow.pos[m])
            users = [m for m in n.users if m in flow.pos and flow.pos[m] >= b]
            user = max(users, key=lambda m: flow.pos[m]) if users else None
            if len(live) == 1:
                what = f"'{flow.name(n)}' ({flow.kind[n]}: not one tensor) is passed on"
            else:
                what = f"the output of '{flow.name(n)}' is used again by " + (
                    f"'{flow.name(user)}'" if user is not None else "the output")
            return f"no single-tensor cut inside '{u.name}': {what}"
    return "its modules are not blocks in containers"
