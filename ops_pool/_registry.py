"""Registry of candidate operators: name -> builder(in_shape, out_shape) -> nn.Module."""

import difflib
import fnmatch
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
from torch import nn

from ._errors import OpShapeError, OpsPoolError, UnknownOpError
from ._meta import on_meta

__all__ = ["register", "unregister", "build", "list_ops", "valid_ops", "is_registered"]

Shape = tuple[int, ...]
Builder = Callable[[Shape, Shape], nn.Module]
Accepts = Callable[[Shape, Shape], bool]

TEACHER = "teacher"  # the name that keeps a layer's own (teacher) module; no op may take it
RESERVED_NAMES = frozenset({TEACHER})


@dataclass(frozen=True)
class _Entry:
    builder: Builder
    accepts: Accepts | None


_REGISTRY: dict[str, _Entry] = {}


def _check_free(name: str) -> None:
    if not isinstance(name, str) or not name:
        raise OpsPoolError(f"Op names must be non-empty strings, got {name!r}")
    if name in RESERVED_NAMES:
        raise OpsPoolError(f"The name {name!r} is reserved; register the op under another name")
    if name in _REGISTRY:
        raise OpsPoolError(
            f"An op is already registered under {name!r}; choose another name "
            "or call ops_pool.unregister() first"
        )


def register(
    name: str,
    *,
    accepts: Accepts | None = None,
    check: Iterable[tuple[Shape, Shape]] | None = None,
) -> Callable[[Builder], Builder]:
    """Decorator registering ``builder(in_shape, out_shape) -> nn.Module`` under ``name``.

    Args:
        name: the op's name; must be new (see :func:`unregister`) and not ``"teacher"``.
        accepts: ``accepts(in_shape, out_shape) -> bool`` says cheaply whether the op fits a
            layer; when None the op is assumed to fit any layer and is shape-checked when built.
        check: ``(in_shape, out_shape)`` pairs the op is built on (and run forward) right away,
            at registration; if any is refused, fails, or produces another shape, nothing is
            registered and :class:`OpShapeError` names the op, the shapes asked and the shape
            produced.

    Example:
        >>> import ops_pool
        >>> from torch import nn
        >>> @ops_pool.register("doc_pw", check=[((16, 8, 8), (24, 8, 8))])
        ... def doc_pw(in_shape, out_shape):
        ...     return nn.Conv2d(in_shape[0], out_shape[0], 1)
        >>> ops_pool.build("doc_pw", (8, 4, 4), (8, 4, 4)).out_channels
        8
        >>> ops_pool.unregister("doc_pw")
    """
    _check_free(name)
    try:
        checks = [(_as_shape(i), _as_shape(o)) for i, o in (check or ())]
    except (TypeError, ValueError) as exc:
        raise OpsPoolError(
            f"register({name!r}, check=...) takes (in_shape, out_shape) pairs of int tuples, "
            f"e.g. [((16, 8, 8), (16, 8, 8))]; got {check!r}"
        ) from exc

    def decorator(builder: Builder) -> Builder:
        _check_free(name)
        _REGISTRY[name] = _Entry(builder, accepts)
        try:
            for in_shape, out_shape in checks:
                _registration_check(name, in_shape, out_shape)
        except BaseException:
            del _REGISTRY[name]
            raise
        return builder

    return decorator


def _registration_check(name: str, in_shape: Shape, out_shape: Shape) -> None:
    try:
        build(name, in_shape, out_shape)
    except OpsPoolError as exc:
        raise OpShapeError(f"Registration of op {name!r} refused: {exc}") from exc
    except Exception as exc:
        raise OpShapeError(
            f"Registration of op {name!r} refused: its builder raised {type(exc).__name__} "
            f"for in_shape {in_shape} -> out_shape {out_shape}: {exc}"
        ) from exc


def _entry(name: str) -> _Entry:
    try:
        return _REGISTRY[name]
    except (KeyError, TypeError):
        close = difflib.get_close_matches(str(name), list(_REGISTRY), n=5)
        hint = f" Did you mean: {', '.join(close)}?" if close else ""
        raise UnknownOpError(
            f"No op is registered under {name!r}.{hint} See ops_pool.list_ops() for all names."
        ) from None


def unregister(name: str) -> None:
    """Remove the op registered under ``name`` (mainly for tests and user ops)."""
    _entry(name)
    del _REGISTRY[name]


def is_registered(name: str) -> bool:
    """True when an op is registered under ``name``."""
    return name in _REGISTRY


def list_ops(filter: str = "*") -> list[str]:
    """Registered op names matching the fnmatch pattern ``filter``, in registration order."""
    return [n for n in _REGISTRY if fnmatch.fnmatchcase(n, filter)]


def _as_shape(s) -> Shape:
    return tuple(int(d) for d in s)


def _accepts(entry: _Entry, in_shape: Shape, out_shape: Shape) -> bool:
    return entry.accepts is None or bool(entry.accepts(in_shape, out_shape))


def valid_ops(in_shape, out_shape) -> list[str]:
    """Names of the ops whose ``accepts`` is True for these shapes (nothing is built)."""
    in_shape, out_shape = _as_shape(in_shape), _as_shape(out_shape)
    return [n for n, e in _REGISTRY.items() if _accepts(e, in_shape, out_shape)]


def build(name: str, in_shape, out_shape, check: bool = True, meta: bool = False) -> nn.Module:
    """Build op ``name`` for a layer with per-sample ``in_shape`` -> ``out_shape``.

    The module is checked with a forward pass on zeros of shape ``(2, *in_shape)`` (unless
    ``check`` is False: a caller that runs it next checks the shape itself) and returned in
    train mode. With ``meta`` it is built on the meta device, uninitialised and unchecked (for
    shape and cost analysis: ``ops_pool._meta``).
    """
    entry = _entry(name)
    in_shape, out_shape = _as_shape(in_shape), _as_shape(out_shape)
    where = f"op {name!r} built for in_shape {in_shape} -> out_shape {out_shape}"
    if not _accepts(entry, in_shape, out_shape):
        raise OpShapeError(
            f"op {name!r} does not accept in_shape {in_shape} -> out_shape {out_shape}; "
            "use ops_pool.valid_ops(in_shape, out_shape) to list the ops that do"
        )
    if meta:
        with on_meta():
            module = entry.builder(in_shape, out_shape)
        check = False
    else:
        module = entry.builder(in_shape, out_shape)
    if not isinstance(module, nn.Module):
        raise OpsPoolError(f"{where} returned {type(module).__name__}, not an nn.Module")
    if not check:
        return module
    was_training = module.training
    module.eval()
    try:
        with torch.no_grad():
            y = module(torch.zeros(2, *in_shape))
    except Exception as exc:
        raise OpShapeError(f"{where} failed on an input of shape {(2, *in_shape)}: {exc}") from exc
    finally:
        module.train(was_training)
    got = tuple(y.shape) if isinstance(y, torch.Tensor) else type(y).__name__
    if got != (2, *out_shape):
        raise OpShapeError(
            f"{where} produced {got} but the layer needs {(2, *out_shape)}; "
            "fix the builder or its accepts() predicate"
        )
    return module
