"""Finding the modules whose saved activations compression treats, by type:
attention cores, gated MLPs, GELUs, norms (LayerNorm and RMSNorm), FFN
down-projections, other Linears (and GPT-2's ``Conv1D``) and dropouts, with no
per-architecture code.

Why a module of its own: the rules are what a new architecture needs to be
checked against (Hugging Face BERT/RoBERTa/DistilBERT/ViT and timm ViTs all
use ordinary ``nn.Linear``/``nn.LayerNorm``/``nn.GELU`` modules and an
attention module that owns its query projection), while ``slimfit.compression.compressor``
holds what is done to the tensors they save. The attention kernel is
detected too: eager and ``F.scaled_dot_product_attention`` (Hugging Face
``sdpa``, timm's ``fused_attn``) are both compressed, other kernels
(``flash_attention_2``, ``flex_attention``) are left alone.
"""

from __future__ import annotations

import torch
from torch import nn

from slimfit.selection import iter_modules

__all__ = ["KINDS", "attention_kernel", "detect_kinds", "down_projections", "is_attention",
           "is_gated_mlp", "is_gelu", "is_linear", "is_norm", "linear_dims"]

#: Activation kinds, in the order they are reported.
KINDS = ("attention", "mlp", "gelu", "layernorm", "ffn_down_input", "linear_input",
         "dropout_mask")

#: a query (or fused qkv) projection: BERT, Llama/Qwen2/Mistral/Gemma/BART, DistilBERT, T5,
#: timm, MPT, DeBERTa, Phi-3 (qkv_proj), GPT-2 (c_attn)
_QUERY_NAMES = ("query", "q_proj", "q_lin", "q", "qkv", "Wqkv", "query_proj", "qkv_proj",
                "c_attn")
#: what a gated MLP owns: Llama-style gate/up, Phi-3's fused gate_up, T5's gated wi_0/wi_1
_GATES = (("gate_proj", "up_proj"), ("gate_up_proj",), ("wi_0", "wi_1"))


def is_linear(m: object) -> bool:
    """A linear map whose weight is its own parameter: ``nn.Linear``, GPT-2's
    ``Conv1D`` (``x @ W + b``, weight transposed), or an adapter wrapping a
    Linear (PEFT's LoRA layers keep the original as ``base_layer``)."""
    return isinstance(m, nn.Linear) or type(m).__name__ == "Conv1D" \
        or isinstance(getattr(m, "base_layer", None), nn.Linear)



def linear_dims(m: nn.Module) -> tuple[int, int] | None:
    """``(in_features, out_features)`` of an ``nn.Linear`` or a ``Conv1D``."""
    if isinstance(m, nn.Linear):
        return m.in_features, m.out_features
    if type(m).__name__ == "Conv1D" and isinstance(getattr(m, "weight", None), torch.Tensor):
        return tuple(m.weight.shape)  # (in, out): Conv1D stores W transposed
    return None


def is_attention(mod: nn.Module) -> bool:
    """An attention core: a ``*Attention`` module owning its query (or fused
    qkv) projection directly (BertSelfAttention, ViTAttention,
    DistilBertSelfAttention, DeBERTa's DisentangledSelfAttention, timm
    Attention, LlamaAttention and its kin, GPT2Attention, Phi3Attention,
    T5Attention, BartAttention; not BertAttention, its parent), LoRA-wrapped or
    not."""
    return type(mod).__name__.endswith("Attention") and any(
        is_linear(getattr(mod, n, None)) for n in _QUERY_NAMES)


def attention_kernel(mod: nn.Module) -> str:
    """``"eager"``, ``"sdpa"`` (timm's ``fused_attn``, Hugging Face ``sdpa``: the
    module calls ``F.scaled_dot_product_attention``) or the name of the other
    Hugging Face kernel it uses (``"flash_attention_2"``, ...)."""
    if hasattr(mod, "fused_attn"):  # timm
        return "sdpa" if mod.fused_attn else "eager"
    impl = getattr(getattr(mod, "config", None), "_attn_implementation", None)
    if impl is None or impl == "eager":
        return "eager"
    return "sdpa" if "sdpa" in str(impl) else str(impl)


def is_gated_mlp(mod: nn.Module) -> bool:
    """A feed-forward block that multiplies two branches, ``act(gate(x)) *
    up(x)`` (Llama, Qwen2, Mistral, Gemma, Phi-3's fused ``gate_up_proj``, T5's
    gated ``wi_0``/``wi_1``), or T5's plain ``wi``/``wo`` block: the operands
    it saves in its own forward (both branches, the activation's input) are
    what its backward needs whatever is frozen."""
    owns = lambda n: is_linear(getattr(mod, n, None))  # noqa: E731
    return any(all(owns(n) for n in names) for names in _GATES) or (owns("wi") and owns("wo"))


def is_norm(mod: nn.Module) -> bool:
    """A normalisation whose input its backward needs: ``nn.LayerNorm`` and
    classes named for a LayerNorm or RMSNorm (Llama/Qwen2/Mistral/Gemma
    ``*RMSNorm``, ``T5LayerNorm``)."""
    return isinstance(mod, nn.LayerNorm) or type(mod).__name__.endswith(("RMSNorm", "LayerNorm"))


def is_gelu(mod: nn.Module) -> bool:
    """``nn.GELU`` or a class named for it (Hugging Face ``GELUActivation``)."""
    return isinstance(mod, nn.GELU) or "GELU" in type(mod).__name__


def down_projections(model: nn.Module) -> set[int]:
    """Linears that are the down half of an up/down pair (3072 -> 768 when some
    Linear maps 768 -> 3072): the FFN output projections, found by shape."""
    # LoRA's low-rank factors (d -> r, r -> d) are not an FFN pair: PEFT names them lora_*
    dims = {id(m): d for n, m in iter_modules(model)
            if (d := linear_dims(m)) is not None and ".lora_" not in f".{n}"}
    ups = {(i, o) for i, o in dims.values() if o > i}
    return {k for k, (i, o) in dims.items() if i > o and (o, i) in ups}


def detect_kinds(model: nn.Module) -> dict[str, list[tuple[str, nn.Module]]]:
    """``{kind: [(qualified_name, module)]}`` for every kind in :data:`KINDS`;
    a module gets at most one kind, the first that applies in that order.

    Example:
        >>> m = nn.Sequential(nn.Linear(8, 32), nn.GELU(), nn.Linear(32, 8))
        >>> {k: [n for n, _ in v] for k, v in detect_kinds(m).items() if v}
        {'gelu': ['1'], 'ffn_down_input': ['2'], 'linear_input': ['0']}
    """
    down = down_projections(model)
    found: dict[str, list[tuple[str, nn.Module]]] = {k: [] for k in KINDS}
    for name, mod in iter_modules(model):
        if is_attention(mod):
            found["attention"].append((name, mod))
        elif is_gated_mlp(mod):
            found["mlp"].append((name, mod))
        elif is_gelu(mod):
            found["gelu"].append((name, mod))
        elif is_norm(mod):
            found["layernorm"].append((name, mod))
        elif linear_dims(mod) is not None:
            found["ffn_down_input" if id(mod) in down else "linear_input"].append((name, mod))
        elif isinstance(mod, nn.Dropout):
            found["dropout_mask"].append((name, mod))
    return found
