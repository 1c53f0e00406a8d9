"""Fine-tuning methods, SlimFit and its peers, defined once: what each does to
the model, which optimizer it trains with, and which SlimFit session it runs.

Why one place: the benchmarks (``bench_peers``), the GPU check and the Hydra
runs (``configs/method/``) must compare the same things. A :class:`Method` is
three orthogonal choices:

* a **model transform**: activation checkpointing (Hugging Face
  ``activation_checkpointing_enable`` / ``gradient_checkpointing_enable`` with
  ``use_reentrant=False``, timm ``set_grad_checkpointing()``), then PEFT LoRA
  (:class:`LoraSpec`: r=8, alpha=16, dropout 0.1 on every ``nn.Linear`` inside
  the transformer blocks, i.e. Q/K/V, attention output, FFN up and down; the
  new classification head, found by :func:`slimfit.freezing.heads.detect_new_heads`,
  trained in full through PEFT's ``modules_to_save``);
* an **optimizer**: torch AdamW or bitsandbytes AdamW8bit;
* a **SlimFit session** (:class:`slimfit.session.SessionConfig`: freezing,
  compression) or ``None``.

LoRA's hyper-parameters: r=8 (the rank the issue and the LoRA paper's RoBERTa
GLUE runs use), alpha=16 and dropout 0.1 (the usual sequence-classification
setting of PEFT examples; PEFT's own default dropout is 0). The dropout matters for
memory: with it every adapted Linear saves its own dropped-out copy of its
input (and the mask) for ``lora_A``'s gradient, which is why LoRA's saved
activations exceed full fine-tuning's (peft #2196). ``LoraSpec(dropout=0.0)``
measures the other choice.

Composition with SlimFit (tested in ``tests/test_methods.py``): freezing and
compression compose with checkpointing (same gradients, bit for bit).
Compression composes because each compression scope records, with every
tensor it hands to the hooks outside it, the hook pair that packed it
(``slimfit.hooks.ScopedHooks.pack_outer``): checkpoint's recomputation
re-enters the scope under its own hooks, and the original tensors still
unpack with theirs. ``slimfit_checkpointing`` stays freezing only (the
measured row); ``slimfit=r090_compress method=checkpointing`` adds compression.
Weight streaming and activation offload are refused with
checkpointing as well: streaming fetches a block's weights in the block's
forward hooks, which Hugging Face keeps outside the recomputed forward.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, Iterable

import torch
from torch import nn

from slimfit import CompressionConfig
from slimfit import SlimFitConfig
from slimfit import SlimFitError
from slimfit.freezing.heads import detect_new_heads
from slimfit.selection import Pattern, iter_modules, select_modules, validate_pattern
from slimfit import SessionConfig
from slimfit.offload.stream_config import default_stream_units

__all__ = ["METHODS", "OPTIMIZERS", "LoraSpec", "Method", "MethodError", "build_optimizer",
           "checkpointed_blocks", "get_method", "head_modules", "lora_targets", "run_label",
           "set_checkpointing"]

#: optimizer names :func:`build_optimizer` knows
OPTIMIZERS = ("adamw", "adamw8bit", "sgd")


class MethodError(SlimFitError):
    """A method that cannot be built or applied (bad option, unsupported model)."""


def build_optimizer(name: str, params: Iterable[Any], lr: float,
                    weight_decay: float = 0.01) -> torch.optim.Optimizer:
    """``adamw`` (torch, fp32 moments: 8 bytes per trained element), ``adamw8bit``
    (bitsandbytes, block-quantized moments: ~2 bytes per element), or ``sgd``
    (momentum 0.9, no weight decay unless a param group sets it).

    Args:
        name: one of :data:`OPTIMIZERS`.
        params: tensors or param groups (a group's ``weight_decay`` wins).
        lr: learning rate.
        weight_decay: default decoupled weight decay of the Adam variants.

    Raises:
        MethodError: an unknown name.
    """
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    if name == "adamw8bit":
        import bitsandbytes as bnb
        return bnb.optim.AdamW8bit(params, lr=lr, weight_decay=weight_decay)
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=0.9)
    raise MethodError(f"unknown optimizer {name!r}; choose one of {OPTIMIZERS}.")


# ----------------------------------------------------------------------------
# Model transforms
# ----------------------------------------------------------------------------


def head_modules(model: nn.Module) -> list[str]:
    """Qualified names of the modules holding the model's new head (the
    classifier a fine-tuning run must train in full), in model order.

    Example:
        >>> head_modules(nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2)))
        ['2']
    """
    names = detect_new_heads(model).names
    return list(dict.fromkeys(n.rsplit(".", 1)[0] for n in names if "." in n))


def lora_targets(model: nn.Module) -> list[str]:
    """Every ``nn.Linear`` inside the model's transformer blocks (the longest
    list of same-type blocks: ``encoder.layer.N``, ``blocks.N``): Q/K/V (or
    fused qkv), the attention output and the FFN's two projections.

    Raises:
        MethodError: the model has no list of blocks or no Linear in them.
    """
    blocks = default_stream_units(model)
    found = [n for n, m in iter_modules(model) if isinstance(m, nn.Linear)
             and any(n.startswith(b + ".") for b in blocks)]
    if not found:
        raise MethodError(f"{type(model).__name__} has no nn.Linear inside a list of "
                          f"transformer blocks (blocks found: {blocks[:3]}); give LoraSpec.targets "
                          "(a regex or a list of module names).")
    return found


@dataclasses.dataclass(frozen=True, kw_only=True)
class LoraSpec:
    """PEFT LoRA adapters on a frozen base model.

    Attributes:
        r: adapter rank.
        alpha: scaling numerator (update = alpha / r * B A).
        dropout: dropout on each adapter's input (PEFT ``lora_dropout``).
        targets: modules to adapt (regex full match or exact/suffix names);
            ``None``: :func:`lora_targets`, every Linear in the blocks.
        train_head: train the new head in full (``modules_to_save``).
    """

    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.1
    targets: Pattern | None = None
    train_head: bool = True

    def __post_init__(self):
        if isinstance(self.r, bool) or not isinstance(self.r, int) or self.r < 1:
            raise MethodError(f"LoraSpec.r must be an int >= 1, got {self.r!r}.")
        if isinstance(self.alpha, bool) or not isinstance(self.alpha, (int, float)) \
                or self.alpha <= 0:
            raise MethodError(f"LoraSpec.alpha must be a positive number, got {self.alpha!r}.")
        d = self.dropout
        if isinstance(d, bool) or not isinstance(d, (int, float)) or not 0.0 <= d < 1.0:
            raise MethodError(f"LoraSpec.dropout must be a number in [0, 1), got {d!r}.")
        if self.targets is not None and not isinstance(self.targets, str):
            object.__setattr__(self, "targets", list(self.targets))  # Hydra ListConfig
        validate_pattern(self.targets, "LoraSpec.targets")
        if not isinstance(self.train_head, bool):
            raise MethodError(f"LoraSpec.train_head must be a bool, got {self.train_head!r}.")

    def apply(self, model: nn.Module) -> nn.Module:
        """``model`` wrapped in a ``peft.PeftModel``: base weights frozen,
        adapters (and the new head) trainable.

        Raises:
            MethodError: no target module, or no new head when ``train_head``.
        """
        from peft import LoraConfig, get_peft_model
        if self.targets is None:
            targets: Pattern = lora_targets(model)
        else:
            targets = self.targets
            select_modules(model, targets, field="LoraSpec.targets")  # raises on no match
        heads = head_modules(model) if self.train_head else []
        if self.train_head and not heads:
            raise MethodError(f"{type(model).__name__}: no new head found to train "
                              "(slimfit.freezing.heads.detect_new_heads); set LoraSpec.train_head=False.")
        cfg = LoraConfig(r=self.r, lora_alpha=self.alpha, lora_dropout=self.dropout,
                         target_modules=targets, modules_to_save=heads or None, bias="none")
        return get_peft_model(model, cfg)

    def label(self) -> str:
        return f"LoRA r={self.r}" + ("" if self.dropout else " (no dropout)")


def set_checkpointing(model: nn.Module, enable: bool = True) -> list[str]:
    """Turn activation checkpointing of the transformer blocks on or off, the way
    each library offers it: Hugging Face models with ``use_reentrant=False``
    (``activation_checkpointing_enable`` where transformers has it, else
    ``gradient_checkpointing_enable``), timm models with
    ``set_grad_checkpointing()`` (non-reentrant by default since timm 1.0).

    Returns:
        the names of the modules switched (outermost ones).

    Raises:
        MethodError: no module of ``model`` supports checkpointing.
    """
    done: list[str] = []
    for name, mod in iter_modules(model):
        if any(not d or name.startswith(d + ".") for d in done):
            continue  # inside a model already switched
        if callable(getattr(mod, "set_grad_checkpointing", None)):  # timm
            mod.set_grad_checkpointing(enable)
        elif getattr(mod, "supports_gradient_checkpointing", False):  # Hugging Face
            new = hasattr(mod, "activation_checkpointing_enable")  # transformers >= 5.2x
            if enable and new:
                mod.activation_checkpointing_enable(
                    activation_checkpointing_kwargs={"use_reentrant": False})
            elif enable:
                mod.gradient_checkpointing_enable(
                    gradient_checkpointing_kwargs={"use_reentrant": False})
            else:
                (mod.activation_checkpointing_disable if new
                 else mod.gradient_checkpointing_disable)()
        else:
            continue
        done.append(name)
    if not done:
        raise MethodError(f"{type(model).__name__} has no module that supports activation "
                          "checkpointing (a Hugging Face PreTrainedModel with "
                          "supports_gradient_checkpointing, or a timm model with "
                          "set_grad_checkpointing).")
    return done


def checkpointed_blocks(model: nn.Module) -> list[str]:
    """The blocks checkpointing recomputes one at a time (the model's list of
    transformer blocks), used to add one block's recomputation to the ledger."""
    return default_stream_units(model)


# ----------------------------------------------------------------------------
# Methods
# ----------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, kw_only=True)
class Method:
    """One way to fine-tune: model transform, optimizer and SlimFit session.

    Attributes:
        name: short name (``configs/method/<name>.yaml``, results' ``method``).
        lora: LoRA adapters (``None``: every weight trainable).
        checkpointing: recompute each transformer block in backward.
        optimizer: ``adamw`` or ``adamw8bit``.
        session: SlimFit's session (``None``: no SlimFit). In Hydra runs this
            stays ``None``: the ``slimfit`` config group configures the SlimFit
            callback, and a method file that uses SlimFit selects its option
            (``tests/test_methods.py`` checks both agree).

    Raises:
        MethodError: bad values, or a combination that does not compose
            (checkpointing with weight streaming or activation
            offload).
    """

    name: str
    lora: LoraSpec | None = None
    checkpointing: bool = False
    optimizer: str = "adamw"
    session: SessionConfig | None = None

    def __post_init__(self):
        if not isinstance(self.name, str) or not self.name:
            raise MethodError(f"Method.name must be a non-empty string, got {self.name!r}.")
        if isinstance(self.lora, Mapping):  # Hydra / YAML: the LoraSpec fields
            object.__setattr__(self, "lora", LoraSpec(**dict(self.lora)))
        if self.lora is not None and not isinstance(self.lora, LoraSpec):
            raise MethodError(f"Method.lora must be a LoraSpec, a mapping of its fields or None, "
                              f"got {self.lora!r}.")
        if not isinstance(self.checkpointing, bool):
            raise MethodError(f"Method.checkpointing must be a bool, got {self.checkpointing!r}.")
        if self.optimizer not in ("adamw", "adamw8bit"):
            raise MethodError(f"Method.optimizer must be 'adamw' or 'adamw8bit', got "
                              f"{self.optimizer!r}.")
        s = self.session
        if s is not None and not isinstance(s, SessionConfig):
            raise MethodError(f"Method.session must be a SessionConfig or None, got {s!r}.")
        if self.checkpointing and s is not None and (s.stream is not None or s.offload_activations):
            raise MethodError(
                f"method {self.name!r}: activation checkpointing does not compose with weight "
                "streaming or activation offload (streaming fetches a block's weights in the "
                "block's forward hooks, which the checkpointed recomputation does not run; "
                "activation offload is untested under recomputation). Drop checkpointing, or "
                "use SlimFit with optimizer-state offload only.")

    def apply(self, model: nn.Module) -> nn.Module:
        """The model to train: checkpointing switched on, then LoRA wrapped around
        it (PEFT keeps the base model's checkpointing). Call on a fresh model."""
        if self.checkpointing:
            set_checkpointing(model, True)
        return self.lora.apply(model) if self.lora is not None else model

    def make_optimizer(self, params: Iterable[Any], lr: float,
                       weight_decay: float = 0.01) -> torch.optim.Optimizer:
        """This method's optimizer over ``params`` (pass the trainable ones)."""
        return build_optimizer(self.optimizer, params, lr, weight_decay)

    def label(self) -> str:
        """Human-readable, e.g. ``LoRA r=8 + compression + checkpointing``."""
        s = self.session
        rate = s.freezing.freeze_rate if s is not None and s.freezing is not None else None
        return run_label(self, rate, s is not None and s.compression is not None)


def run_label(method: Method, freeze_rate: float | None, compression: bool) -> str:
    """The label of a run of ``method`` with SlimFit at ``freeze_rate`` (``None``:
    no SlimFit freezing; 0: SlimFit at rate 0) and ``compression``."""
    base = method.lora.label() if method.lora is not None else None
    if freeze_rate is not None and (freeze_rate > 0 or base is None):
        base = f"SlimFit r={freeze_rate:g}" if base is None else f"{base} + SlimFit r={freeze_rate:g}"
    parts = [base or "full fine-tuning"]
    parts += [n for n, on in (("compression", compression),
                              ("checkpointing", method.checkpointing)) if on]
    label = " + ".join(parts)
    return label + (", AdamW8bit" if method.optimizer == "adamw8bit" else "")


def _slimfit(compression: bool = True) -> SessionConfig:
    """The project's ``slimfit=r090_compress``: r=0.9, the default compression."""
    return SessionConfig(freezing=SlimFitConfig(freeze_rate=0.9),
                         compression=CompressionConfig() if compression else None)


#: Every method by name; ``configs/method/<name>.yaml`` holds the same ones.
METHODS: dict[str, Method] = {m.name: m for m in (
    Method(name="full"),
    Method(name="full_8bit", optimizer="adamw8bit"),
    Method(name="checkpointing", checkpointing=True),
    Method(name="lora", lora=LoraSpec()),
    Method(name="lora_checkpointing", lora=LoraSpec(), checkpointing=True),
    Method(name="slimfit", session=_slimfit()),
    Method(name="slimfit_checkpointing", session=_slimfit(compression=False), checkpointing=True),
    Method(name="lora_compress", lora=LoraSpec(),
           session=SessionConfig(compression=CompressionConfig())),
)}


def get_method(name: str) -> Method:
    """The method called ``name``.

    Raises:
        MethodError: an unknown name (the message lists the known ones).
    """
    if name not in METHODS:
        raise MethodError(f"unknown method {name!r}; choose one of {', '.join(METHODS)}.")
    return METHODS[name]
