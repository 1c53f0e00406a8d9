"""The one module-selection API: which parameter tensors SlimFit may freeze.

As in the paper, a "layer" is one parameter tensor: every weight with
``dim() > 1`` (linear weights, embedding tables, patch-embedding convolution,
class token, position embeddings) plus the weights of normalisation layers.
Biases and other 1-D tensors are always trained (they are small and their
gradients cost almost nothing). The same rules find ~100 candidates in Hugging
Face BERT/RoBERTa/DistilBERT/ViT and timm ViTs with no per-architecture code.

Patterns mean one thing everywhere: a string is a regular expression that must
match the full qualified parameter name; a list (or tuple) of strings matches a
name exactly or as a dotted suffix (``"classifier.weight"`` matches
``model.classifier.weight``). Parameters are tracked by identity and reported
by name, never matched by value. The same patterns choose modules
(:func:`select_modules`, for compression and weight streaming), and
:func:`refuse_compiled` finds a ``torch.compile``-d module anywhere in a model.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Callable, Iterator, Sequence, Union

from torch import nn

from slimfit.errors import SelectionError, SlimFitError

__all__ = ["Pattern", "Unit", "Selection", "iter_modules", "iter_parameters", "matches",
           "is_default_candidate", "select_modules", "select_units", "validate_pattern",
           "compiled_modules", "is_compiled", "refuse_compiled"]

#: A regex (full match) or a list of exact / dotted-suffix names.
Pattern = Union[str, Sequence[str]]

_NORM_TYPES = (nn.LayerNorm, nn.GroupNorm, nn.BatchNorm1d, nn.BatchNorm2d)


def iter_modules(model: nn.Module, filter_fn: Callable[[nn.Module, str], bool] | None = None
                 ) -> Iterator[tuple[str, nn.Module]]:
    """Yield ``(qualified_name, module)``, optionally only where ``filter_fn(module, name)``."""
    for name, mod in model.named_modules():
        if filter_fn is None or filter_fn(mod, name):
            yield name, mod


def _compiled(mod: nn.Module) -> bool:
    # torch.compile(mod) wraps it in an OptimizedModule holding ``_orig_mod``;
    # mod.compile() keeps the module and sets ``_compiled_call_impl``
    return type(mod).__name__ == "OptimizedModule" or "_orig_mod" in mod._modules \
        or getattr(mod, "_compiled_call_impl", None) is not None


def compiled_modules(model: nn.Module) -> list[str]:
    """Qualified names of the outermost modules of ``model`` that went through
    ``torch.compile`` (``""`` for ``model`` itself), in model order: after
    ``m.encoder = torch.compile(m.encoder)`` or ``m.encoder.compile()``, both
    give ``["encoder"]``.
    """
    found: list[str] = []
    for name, mod in iter_modules(model):
        inside = any(not f or name.startswith(f + ".") for f in found)  # "" is the model
        if not inside and _compiled(mod):
            found.append(name)
    return found


def is_compiled(model: nn.Module) -> bool:
    """True if ``model`` or any module inside it went through ``torch.compile``
    (saved-tensor hooks, which compression and weight streaming rely on, run
    all at once at the end of a compiled forward: pytorch #148222)."""
    return bool(compiled_modules(model))


def refuse_compiled(model: nn.Module, why: str) -> None:
    """Raise if ``model`` or a module inside it is compiled, naming which.

    Args:
        model: the model a feature is about to hook.
        why: the rest of the message: why the feature cannot work compiled,
            and what to do instead.

    Raises:
        SlimFitError: ``"the model (...) is torch.compile'd: <why>"`` or
            ``"torch.compile'd submodule(s) 'bert.encoder': <why>"``.
    """
    names = compiled_modules(model)
    if names == [""]:
        raise SlimFitError(f"the model ({type(model).__name__}) is torch.compile'd: {why}")
    if names:
        shown = ", ".join(repr(n) for n in names[:4]) + (" ..." if len(names) > 4 else "")
        raise SlimFitError(f"torch.compile'd submodule(s) {shown}: {why}")


def iter_parameters(model: nn.Module) -> Iterator[tuple[str, nn.Parameter, nn.Module]]:
    """Yield ``(qualified_name, parameter, owning_module)`` once per parameter."""
    seen: set[int] = set()
    for mname, mod in iter_modules(model):
        for pname, p in mod.named_parameters(recurse=False):
            if id(p) not in seen:
                seen.add(id(p))
                yield (f"{mname}.{pname}" if mname else pname), p, mod


def matches(name: str, pattern: Pattern) -> bool:
    """True if ``name`` matches ``pattern`` (regex full match, or exact/dotted suffix)."""
    if isinstance(pattern, str):
        return re.fullmatch(pattern, name) is not None
    return any(name == s or name.endswith("." + s) for s in pattern)


def validate_pattern(pattern: Pattern | None, field: str) -> None:
    """Raise if ``pattern`` is neither None, a valid regex, nor a list of names.

    Args:
        pattern: the value a user gave.
        field: the option's name, used in the message (``"include"``,
            ``"StreamConfig.units"``).

    Raises:
        SelectionError: an invalid regex, or a value of another type.
    """
    if pattern is None:
        return
    if isinstance(pattern, str):
        try:
            re.compile(pattern)
        except re.error as e:
            raise SelectionError(f"{field}={pattern!r} is not a valid regular expression ({e}).") from e
        return
    if not isinstance(pattern, (list, tuple)) or not all(isinstance(s, str) for s in pattern):
        raise SelectionError(f"{field} must be a regex string or a list of names, got {pattern!r}.")


def _is_norm(mod: nn.Module) -> bool:
    cls = type(mod).__name__
    return isinstance(mod, _NORM_TYPES) or cls.endswith(("LayerNorm", "RMSNorm"))


def is_default_candidate(name: str, p: nn.Parameter, owner: nn.Module) -> bool:
    """The paper's rule: weights with ``dim() > 1`` and normalisation weights."""
    return p.dim() > 1 or (_is_norm(owner) and name.rsplit(".", 1)[-1] == "weight")


@dataclasses.dataclass(frozen=True)
class Unit:
    """One freezable unit: a single tensor, or a group frozen and trained together."""

    name: str
    param_names: tuple[str, ...]
    params: tuple[nn.Parameter, ...] = dataclasses.field(repr=False, compare=False)

    @property
    def numel(self) -> int:
        return sum(p.numel() for p in self.params)

    @property
    def nbytes(self) -> int:
        """The unit's bytes (a DTensor counts whole: the same on every rank)."""
        return sum(p.numel() * p.element_size() for p in self.params)


@dataclasses.dataclass(frozen=True)
class Selection:
    """What a selection touches in a model, for a user to check before training.

    Attributes:
        units: the freezable units, in model order.
        always_trained: trainable parameters SlimFit never freezes.
        excluded: default candidates removed by ``exclude`` or ``always_train``.
        user_frozen: parameters already frozen by the user (left alone).
    """

    units: tuple[Unit, ...]
    always_trained: tuple[str, ...]
    excluded: tuple[str, ...]
    user_frozen: tuple[str, ...]

    @property
    def candidate_names(self) -> list[str]:
        return [u.name for u in self.units]

    def resolved(self, model: nn.Module) -> "Selection":
        """The same selection with each unit's tensors found again by name in
        ``model`` (itself when every tensor is still the model's own).

        A wrapper that replaces Parameter objects after the selection was made
        (FSDP2's ``fully_shard`` turns each into a DTensor parameter) would
        leave the units pointing at dead tensors. One ``named_parameters`` walk.

        Raises:
            SelectionError: a unit's tensor is no longer in ``model`` under its
                name (the model was wrapped under a new prefix).
        """
        named = dict(model.named_parameters())
        if all(named.get(n) is p for u in self.units for n, p in zip(u.param_names, u.params)):
            return self
        lost = [n for u in self.units for n in u.param_names if n not in named]
        if lost:
            raise SelectionError(
                f"{len(lost)} SlimFit tensors are no longer in the model under their names "
                f"(e.g. {lost[:3]}); the model was wrapped or changed after the session was "
                "built. Build SlimFitSession (or start the run) on the module whose "
                "parameter names these are, after sharding.")
        units = tuple(dataclasses.replace(u, params=tuple(named[n] for n in u.param_names))
                      for u in self.units)
        return dataclasses.replace(self, units=units)

    def __str__(self) -> str:
        n = sum(len(u.param_names) for u in self.units)
        return (f"{len(self.units)} freezable units ({n} tensors); {len(self.always_trained)} "
                f"always trained; {len(self.excluded)} excluded; {len(self.user_frozen)} "
                "frozen by the user")


def _no_match_error(field: str, pattern: Pattern, names: Sequence[str],
                    what: str = "parameter") -> SelectionError:
    sample = ", ".join(names[:6])
    return SelectionError(
        f"{field}={pattern!r} matched no {what}. Patterns are full-match regexes (a string) "
        f"or exact/dotted-suffix names (a list). Some {what} names in this model: {sample}.")


def select_modules(model: nn.Module, pattern: Pattern, *, field: str
                   ) -> list[tuple[str, nn.Module]]:
    """The submodules of ``model`` whose qualified name matches ``pattern``.

    Args:
        model: any ``nn.Module`` (the model itself, named ``""``, never matches).
        pattern: a regex (full match) or a list of exact / dotted-suffix names.
        field: the option the pattern came from, named in errors.

    Returns:
        ``[(qualified_name, module)]`` in model order.

    Raises:
        SelectionError: the pattern is invalid or matches no module; the message
            names ``field``, the pattern and some module names of the model.

    Example:
        >>> m = nn.Sequential(nn.Linear(2, 4), nn.GELU(), nn.Linear(4, 2))
        >>> [n for n, _ in select_modules(m, ["0", "2"], field="units")]
        ['0', '2']
    """
    validate_pattern(pattern, field)
    chosen = list(iter_modules(model, lambda _m, n: bool(n) and matches(n, pattern)))
    if not chosen:
        raise _no_match_error(field, pattern, [n for n, _ in iter_modules(model) if n], "module")
    return chosen


def select_units(model: nn.Module, *, include: Pattern | None = None,
                 exclude: Pattern | None = None, always_train: Pattern | None = None,
                 groups: Sequence[str] | None = None) -> Selection:
    """Choose the freezable units of ``model``.

    Args:
        model: any ``nn.Module``.
        include: restrict candidates to parameters matching this (default: the
            paper's rule, :func:`is_default_candidate`). Matched parameters must
            still be trainable.
        exclude: remove matching parameters from the candidates (they are
            trained every step).
        always_train: same effect as ``exclude``; named for intent (e.g. the
            classifier head ``["classifier.weight"]``).
        groups: regexes whose first capture group (or whole match) names a unit;
            candidates that give the same name are frozen together. Example for
            BERT Q/K/V: ``[r"(.*attention\\.self)\\.(query|key|value)\\.weight"]``.

    Returns:
        A :class:`Selection`.

    Raises:
        SelectionError: a pattern is invalid or matches no parameter, or no
            candidate remains.
    """
    for field, pat in (("include", include), ("exclude", exclude), ("always_train", always_train)):
        validate_pattern(pat, field)
    group_res = []
    for g in groups or ():
        validate_pattern(g, "groups")
        if not isinstance(g, str):
            raise SelectionError(f"each groups entry must be a regex string, got {g!r}.")
        group_res.append(re.compile(g))

    params = list(iter_parameters(model))
    names = [n for n, _, _ in params]
    if not params:
        raise SelectionError(f"{type(model).__name__} has no parameters: nothing to freeze.")
    for field, pat in (("include", include), ("exclude", exclude), ("always_train", always_train)):
        if pat is not None and not any(matches(n, pat) for n in names):
            raise _no_match_error(field, pat, names)

    units: dict[str, list[tuple[str, nn.Parameter]]] = {}
    always, excluded, user_frozen = [], [], []
    used_groups: set[int] = set()
    for name, p, owner in params:
        candidate = matches(name, include) if include is not None else \
            is_default_candidate(name, p, owner)
        if not p.requires_grad:
            user_frozen.append(name)
            continue
        if not candidate:
            always.append(name)
            continue
        if (exclude is not None and matches(name, exclude)) or \
                (always_train is not None and matches(name, always_train)):
            excluded.append(name)
            always.append(name)
            continue
        key = name
        for gi, rx in enumerate(group_res):
            m = rx.fullmatch(name)
            if m:
                key = m.group(1) if rx.groups else m.group(0)
                used_groups.add(gi)
                break
        units.setdefault(key, []).append((name, p))
    for gi, g in enumerate(groups or ()):
        if gi not in used_groups:
            raise _no_match_error("groups", g, names)
    if not units:
        raise SelectionError(
            f"{type(model).__name__} has no candidate layers to freeze ({len(names)} parameters; "
            f"{len(user_frozen)} already frozen, {len(excluded)} excluded). SlimFit freezes weight "
            "tensors with dim() > 1 and normalisation weights; pass include=... to choose others.")
    return Selection(
        units=tuple(Unit(k, tuple(n for n, _ in v), tuple(p for _, p in v)) for k, v in units.items()),
        always_trained=tuple(always), excluded=tuple(excluded), user_frozen=tuple(user_frozen))


def preview(model: nn.Module, **options) -> dict[str, list[str]]:
    """Deprecated alias (until slimfit 0.3) of :func:`slimfit.preview`, which
    lists the units the freezer rotates and the new heads it trains apart."""
    import warnings

    from slimfit.freezing.freezer import preview as _preview  # freezing builds on selection
    warnings.warn("slimfit.selection.preview moved to slimfit.preview; the alias goes in "
                  "slimfit 0.3.", DeprecationWarning, stacklevel=2)
    return _preview(model, **options)
