"""New heads: the parameters a fine-tuning run must train every step.

A task head that the pretrained checkpoint did not provide starts from random
weights: it is the layer that has the most to learn, and the one whose input
features every other layer's update is judged through. Freezing it most of
the time (its relative change quickly looks small next to a LayerNorm's or a
pooler's) starves the run; the SlimFit reference code keeps the classifier
always trained in its ViT scripts, and the freezing heatmaps of this project
showed a new classifier frozen in ~80% of the steps when it is a candidate.
So :class:`slimfit.freezing.freezer.LayerFreezer` moves these parameters out of the
candidates (``SlimFitConfig.train_new_heads``, on by default).

How they are found, generically (no per-model code), first rule that applies:

1. **What the checkpoint did not provide.** Hugging Face ``from_pretrained``
   (transformers 5.x) sets ``param._is_hf_initialized = True`` on every
   parameter it loaded from the checkpoint (tied weights included) and leaves
   the flag off the ones it had to initialise (the ``missing_keys`` of
   ``output_loading_info=True``, and mismatched shapes). A model built from a
   config carries no flag at all. So if any parameter of ``model`` is flagged,
   the unflagged ones are new: this also finds a head a user adds around a
   pretrained backbone (a LightningModule holding the HF model and its own
   ``nn.Linear``) and adapters such as LoRA.
2. **timm**: the module returned by ``get_classifier()`` (timm records no
   loading information; its classifier is the task head, replaced whenever
   ``num_classes`` differs from the pretraining).
3. **Otherwise the output head**, the module that produces the logits: HF
   ``get_output_embeddings()`` where a model has one, else the last
   ``nn.Linear`` in registration order (``classifier`` of a ``*ForSequence
   Classification``, the last layer of a plain ``nn.Module``). A head whose
   weight is tied to the input embeddings is no new head (training it every
   step would train the whole vocabulary table): nothing is returned then.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

from torch import nn

from slimfit.errors import SelectionError
from slimfit.selection import Pattern, Selection, iter_parameters, matches

__all__ = ["HeadReport", "detect_new_heads", "new_head_parameters", "without_new_heads"]


class HeadReport(NamedTuple):
    """Which parameters are new heads and how they were found.

    Attributes:
        names: qualified parameter names (as :func:`slimfit.selection.
            iter_parameters` names them), in model order.
        source: ``"checkpoint"`` (not loaded from the pretrained checkpoint),
            ``"timm"`` (``get_classifier()``), ``"output embeddings"``,
            ``"last linear"``, or ``"none"``.
    """

    names: list[str]
    source: str

    def describe(self) -> str:
        """One line for a user: what is always trained and why."""
        why = {"checkpoint": "not in the pretrained checkpoint",
               "timm": "timm get_classifier()", "output embeddings": "the output embeddings",
               "last linear": "the model's output head (last Linear)"}.get(self.source, "")
        if not self.names:
            return "no new head found"
        return f"{', '.join(self.names)} ({why})"


def _names_of(module: nn.Module, owners: dict[int, int],
              names: dict[int, str]) -> list[str]:
    # a parameter shared with another module (tied to the input embeddings) is no new head
    return [names[id(p)] for p in module.parameters() if owners.get(id(p), 0) <= 1]


def detect_new_heads(model: nn.Module) -> HeadReport:
    """Find the parameters of ``model`` that a fine-tuning run should always
    train (see the module docstring for the rules).

    Args:
        model: any ``nn.Module`` (a HF or timm model, or a wrapper holding one).

    Returns:
        A :class:`HeadReport`.

    Example:
        >>> m = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
        >>> detect_new_heads(m)
        HeadReport(names=['2.weight', '2.bias'], source='last linear')
    """
    params = list(iter_parameters(model))
    names = {id(p): n for n, p, _ in params}
    if any(getattr(p, "_is_hf_initialized", False) for _, p, _ in params):
        return HeadReport([n for n, p, _ in params if not getattr(p, "_is_hf_initialized", False)],
                          "checkpoint")
    owners: dict[int, int] = {}
    for mod in model.modules():
        for p in mod.parameters(recurse=False):
            owners[id(p)] = owners.get(id(p), 0) + 1
    for mod in model.modules():  # outermost first
        if callable(getattr(mod, "get_classifier", None)) and hasattr(mod, "reset_classifier"):
            heads = mod.get_classifier()
            heads = heads if isinstance(heads, (tuple, list)) else (heads,)
            found = [n for h in heads if isinstance(h, nn.Module)
                     for n in _names_of(h, owners, names)]
            return HeadReport(found, "timm")
    for mod in model.modules():
        get = getattr(mod, "get_output_embeddings", None)
        if callable(get) and hasattr(mod, "config"):
            out = get()
            if isinstance(out, nn.Module):
                return HeadReport(_names_of(out, owners, names), "output embeddings")
            break  # a HF model without output embeddings: its head is its last Linear
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    if linears:
        return HeadReport(_names_of(linears[-1], owners, names), "last linear")
    return HeadReport([], "none")


def new_head_parameters(model: nn.Module) -> list[str]:
    """Names of the parameters that are new heads of ``model``
    (:func:`detect_new_heads` ``.names``).

    Example:
        >>> new_head_parameters(nn.Sequential(nn.Embedding(10, 4), nn.Linear(4, 3)))
        ['1.weight', '1.bias']
    """
    return detect_new_heads(model).names


def without_new_heads(model: nn.Module, sel: Selection, include: Pattern | None = None
                      ) -> tuple[Selection, HeadReport]:
    """``sel`` with the units holding a new head moved from the candidates to
    the always-trained parameters, and which heads moved; a head the user's
    ``include`` names stays a candidate.

    Raises:
        SelectionError: every candidate is a new head.
    """
    found = detect_new_heads(model)
    heads = {n for n in found.names if include is None or not matches(n, include)}
    moved = [u for u in sel.units if any(n in heads for n in u.param_names)]
    if not moved:
        return sel, HeadReport([], found.source)
    moved_ids = {id(u) for u in moved}
    kept = tuple(u for u in sel.units if id(u) not in moved_ids)
    names = [n for u in moved for n in u.param_names]
    if not kept:
        raise SelectionError(
            f"every candidate of {type(model).__name__} is a new head ({names[:4]}): nothing is "
            "left to freeze. Pass train_new_heads=False to let SlimFit freeze them, or "
            "include=... to choose other candidates.")
    order = {n: i for i, (n, _, _) in enumerate(iter_parameters(model))}
    merge = lambda old: tuple(sorted(set(old) | set(names), key=order.__getitem__))  # noqa: E731
    return (dataclasses.replace(sel, units=kept, always_trained=merge(sel.always_trained),
                                excluded=merge(sel.excluded)), HeadReport(names, found.source))
