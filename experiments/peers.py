"""The peers SlimFit is compared with, as model transforms: PEFT LoRA
adapters (:class:`LoraSpec`) and activation checkpointing
(:func:`set_checkpointing`), each applied the way its library offers it.

LoRA's hyper-parameters: r=8 (the rank the issue and the LoRA paper's RoBERTa
GLUE runs use), alpha=16 and dropout 0.1 (the usual sequence-classification
setting of PEFT examples; PEFT's own default dropout is 0). The dropout matters
for memory: with it every adapted Linear saves its own dropped-out copy of its
input (and the mask) for ``lora_A``'s gradient, which is why LoRA's saved
activations exceed full fine-tuning's (peft #2196). ``LoraSpec(dropout=0.0)``
measures the other choice. The new classification head, found by
:func:`slimfit.freezing.heads.detect_new_heads`, is trained in full through
PEFT's ``modules_to_save``.
"""

from __future__ import annotations

import dataclasses

from torch import nn

from slimfit.errors import SlimFitError
from slimfit.freezing.heads import detect_new_heads
from slimfit.offload.stream_config import default_stream_units
from slimfit.selection import Pattern, iter_modules, select_modules, validate_pattern

__all__ = ["LoraSpec", "RunError", "checkpointed_blocks", "head_modules", "lora_targets",
           "set_checkpointing"]


class RunError(SlimFitError):
    """A run that cannot be built or applied (bad option, unsupported model)."""


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
        RunError: the model has no list of blocks or no Linear in them.
    """
    blocks = default_stream_units(model)
    found = [n for n, m in iter_modules(model) if isinstance(m, nn.Linear)
             and any(n.startswith(b + ".") for b in blocks)]
    if not found:
        raise RunError(f"{type(model).__name__} has no nn.Linear inside a list of "
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
            raise RunError(f"LoraSpec.r must be an int >= 1, got {self.r!r}.")
        if isinstance(self.alpha, bool) or not isinstance(self.alpha, (int, float)) \
                or self.alpha <= 0:
            raise RunError(f"LoraSpec.alpha must be a positive number, got {self.alpha!r}.")
        d = self.dropout
        if isinstance(d, bool) or not isinstance(d, (int, float)) or not 0.0 <= d < 1.0:
            raise RunError(f"LoraSpec.dropout must be a number in [0, 1), got {d!r}.")
        if self.targets is not None and not isinstance(self.targets, str):
            object.__setattr__(self, "targets", list(self.targets))  # Hydra ListConfig
        validate_pattern(self.targets, "LoraSpec.targets")
        if not isinstance(self.train_head, bool):
            raise RunError(f"LoraSpec.train_head must be a bool, got {self.train_head!r}.")

    def apply(self, model: nn.Module) -> nn.Module:
        """``model`` wrapped in a ``peft.PeftModel``: base weights frozen,
        adapters (and the new head) trainable.

        Raises:
            RunError: no target module, or no new head when ``train_head``.
        """
        from peft import LoraConfig, get_peft_model
        if self.targets is None:
            targets: Pattern = lora_targets(model)
        else:
            targets = self.targets
            select_modules(model, targets, field="LoraSpec.targets")  # raises on no match
        heads = head_modules(model) if self.train_head else []
        if self.train_head and not heads:
            raise RunError(f"{type(model).__name__}: no new head found to train "
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
        RunError: no module of ``model`` supports checkpointing.
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
        raise RunError(f"{type(model).__name__} has no module that supports activation "
                          "checkpointing (a Hugging Face PreTrainedModel with "
                          "supports_gradient_checkpointing, or a timm model with "
                          "set_grad_checkpointing).")
    return done


def checkpointed_blocks(model: nn.Module) -> list[str]:
    """The blocks checkpointing recomputes one at a time (the model's list of
    transformer blocks), used to add one block's recomputation to the ledger."""
    return default_stream_units(model)
