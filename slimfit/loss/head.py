"""``ChunkedLMLoss``: the loss of transformers' causal-LM heads computed in
chunks (:func:`slimfit.loss.chunked.linear_cross_entropy`), automatically,
when the model computes its loss from ``labels`` (a session part).

How it hooks in, with nothing forked: transformers' causal LMs (Llama, Qwen2,
Mistral, Gemma, Phi-3, GPT-2 ... in transformers 5) compute
``logits = self.lm_head(hidden)`` and then ``self.loss_function(logits=...,
labels=..., vocab_size=...)``, a settable attribute. While a forward called
with ``labels`` runs (with grad), the head returns a zero-byte stand-in of the
logits' shape instead of computing them, keeping its input, and the model's
``loss_function`` is ours: it computes the chunked loss from that input with
transformers' own conventions (labels shifted with ``ignore_index`` padding,
``shift_labels``, ``num_items_in_batch``). The output's ``logits`` is
``None`` then (they were never computed). A forward without labels, or under
``no_grad`` (evaluation, generation), runs the model as it is.

Fallbacks, said once each: a model that soft-caps its logits in its own code
(Gemma-2/3 ``final_logit_softcapping``) or asks for ``logits_to_keep``, and a
training forward without ``labels`` (a loss computed outside the model: call
:func:`slimfit.loss.chunked.chunked_cross_entropy` there) run unchunked.
Refused: a quantized (4-bit) or sharded head, whose weight is not a plain
tensor the chunked matmul can read.
"""

from __future__ import annotations

import functools
import inspect
import warnings
from typing import Any

import torch
from torch import nn

from slimfit.errors import SlimFitError, UnsupportedSetupError
from slimfit.loss.chunked import DEFAULT_CHUNK, linear_cross_entropy
from slimfit.parts import Context, Part

__all__ = ["ChunkedLMLoss", "causal_lm_heads"]

_UNSET = object()


@functools.lru_cache(maxsize=None)
def _computes_loss_from_head(cls: type) -> bool:
    """``cls.forward`` computes ``self.lm_head(...)`` and then
    ``self.loss_function(...)`` (read from its source, once per class)."""
    try:
        src = inspect.getsource(cls.forward)
    except (OSError, TypeError):
        return False
    return "self.lm_head(" in src and "self.loss_function(" in src


def causal_lm_heads(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The transformers language models inside ``model`` (itself included) whose
    loss is computed by a ``loss_function`` from an ``lm_head`` (Llama, Qwen2,
    Mistral, Gemma, Phi-3 ``*ForCausalLM``, GPT-2's ``GPT2LMHeadModel``):
    ``[(name, module)]``."""
    return [(name, mod) for name, mod in model.named_modules()
            if isinstance(getattr(mod, "lm_head", None), nn.Module) and hasattr(mod, "config")
            and hasattr(type(mod), "loss_function") and _computes_loss_from_head(type(mod))]


def _check_head(name: str, head: nn.Module) -> None:
    w = getattr(head, "weight", None)
    kind = type(head).__name__
    if "4bit" in kind or "8bit" in kind or type(w).__name__.startswith("Params"):
        raise UnsupportedSetupError(
            f"chunked_loss: the LM head of {name or 'the model'} is {kind} (quantized weight): the "
            "chunked matmul needs a plain weight. Keep the head in 16/32 bits "
            "(llm_int8_skip_modules=['lm_head'] in a BitsAndBytesConfig) or set chunked_loss=False.")
    if not isinstance(head, nn.Linear) or type(w) is not nn.Parameter:
        raise UnsupportedSetupError(
            f"chunked_loss: the LM head of {name or 'the model'} is a {kind} with a "
            f"{type(w).__name__} weight (sharded or vocab-parallel?): chunking needs an nn.Linear "
            "with a plain weight. Set chunked_loss=False for this model.")


class ChunkedLMLoss(Part):
    """Chunked LM-head loss for every transformers causal LM in the model.

    Args:
        model: the model (or a module holding the causal LM).
        chunk_size: tokens per chunk.

    Raises:
        SlimFitError: no causal LM with an ``lm_head`` and a ``loss_function``
            in the model (nothing to chunk: the option would be silently off).
        UnsupportedSetupError: (at ``attach``) a quantized or sharded head.
    """

    name = "chunked_loss"

    def __init__(self, model: nn.Module, chunk_size: int = DEFAULT_CHUNK):
        self.targets = causal_lm_heads(model)
        if not self.targets:
            raise SlimFitError(
                f"chunked_loss=True but {type(model).__name__} holds no transformers language model "
                "whose forward computes its loss with self.loss_function from self.lm_head (a "
                "causal LM such as *ForCausalLM or GPT2LMHeadModel; seq2seq heads compute theirs "
                "inline). "
                "For a loss you compute yourself, call slimfit.chunked_cross_entropy(hidden, "
                "lm_head, labels) and set chunked_loss=False.")
        self.chunk_size = chunk_size
        self.chunked_calls = 0
        self.fallbacks: dict[str, str] = {}
        self._saved: list[tuple[nn.Module, Any, Any]] = []
        self._handles: list[Any] = []
        self._warned: set[str] = set()

    @classmethod
    def from_config(cls, model: nn.Module, config: Any) -> "ChunkedLMLoss | None":
        if not config.chunked_loss:
            return None
        size = config.chunked_loss if isinstance(config.chunked_loss, int) \
            and not isinstance(config.chunked_loss, bool) else DEFAULT_CHUNK
        return cls(model, size)

    # -- the step protocol ------------------------------------------------------------
    def attach(self, ctx: Context) -> None:
        for name, lm in self.targets:
            _check_head(name, lm.lm_head)
            self._install(name, lm)

    def detach(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        for lm, forward, loss in self._saved:
            lm.lm_head.__dict__.pop("forward", None)
            if forward is not _UNSET:
                lm.lm_head.forward = forward
            lm.__dict__.pop("_loss_function", None)
            if loss is not _UNSET:
                lm._loss_function = loss
        self._saved.clear()

    def describe(self) -> str:
        names = ", ".join(n or type(m).__name__ for n, m in self.targets)
        return (f"LM loss in chunks of {self.chunk_size} tokens for {names} (no (tokens x vocab) "
                "logits kept for backward)")

    # -- one model ------------------------------------------------------------------------
    def _install(self, name: str, lm: nn.Module) -> None:
        head, original_loss = lm.lm_head, lm.loss_function
        self._saved.append((lm, head.__dict__.get("forward", _UNSET),
                            lm.__dict__.get("_loss_function", _UNSET)))
        cap = getattr(lm.config, "final_logit_softcapping", None)
        state = {"on": False, "hidden": None, "stand_in": None}
        plain_forward = head.forward

        def pre(_mod, args, kwargs):
            train = torch.is_grad_enabled() and kwargs.get("labels") is not None
            keep = kwargs.get("logits_to_keep", 0)
            if train and cap:
                self._fall_back(name, "its code soft-caps the logits (final_logit_softcapping)")
            elif train and not (isinstance(keep, int) and keep == 0):
                self._fall_back(name, f"logits_to_keep={keep}")
            elif torch.is_grad_enabled() and kwargs.get("labels") is None:
                self._fall_back(name, "it was called without labels in training (a loss computed "
                                      "outside the model: use slimfit.chunked_cross_entropy there)")
            state["on"] = train and not cap and isinstance(keep, int) and keep == 0

        def head_forward(hidden):
            if not state["on"]:
                return plain_forward(hidden)
            state["hidden"] = hidden
            # zero bytes: the logits' shape for the code between the head and the loss
            state["stand_in"] = hidden.new_empty(()).expand(*hidden.shape[:-1],
                                                            head.out_features)
            return state["stand_in"]

        def loss_function(logits, labels, vocab_size=None, num_items_in_batch=None,
                          ignore_index=-100, shift_labels=None, **kwargs):
            if logits is not state["stand_in"] or state["hidden"] is None:
                return original_loss(logits=logits, labels=labels, vocab_size=vocab_size,
                                     num_items_in_batch=num_items_in_batch,
                                     ignore_index=ignore_index, shift_labels=shift_labels, **kwargs)
            if shift_labels is None:  # transformers' ForCausalLMLoss: predict token t + 1 at t
                shift_labels = nn.functional.pad(labels, (0, 1), value=ignore_index)[..., 1:]
            self.chunked_calls += 1
            return linear_cross_entropy(state["hidden"], head.weight, head.bias, shift_labels,
                                        ignore_index=ignore_index, chunk_size=self.chunk_size,
                                        num_items_in_batch=num_items_in_batch)

        def post(_mod, _args, _kwargs, output):
            if state["on"] and getattr(output, "logits", None) is state["stand_in"]:
                output.logits = None  # never computed: a stand-in of no bytes
            state.update(on=False, hidden=None, stand_in=None)
            return output

        head.forward = head_forward
        lm.loss_function = loss_function
        self._handles.append(lm.register_forward_pre_hook(pre, with_kwargs=True))
        self._handles.append(lm.register_forward_hook(post, with_kwargs=True, always_call=True))

    def _fall_back(self, name: str, why: str) -> None:
        self.fallbacks.setdefault(name, why)
        if why not in self._warned:
            self._warned.add(why)
            warnings.warn(f"SlimFit chunked_loss: {name or 'the model'} computes its logits in full "
                          f"because {why}. Warned once.", UserWarning, stacklevel=4)
