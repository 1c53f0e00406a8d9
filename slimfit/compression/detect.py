"""Finding the modules whose saved activations compression treats, by type:
attention cores, GELUs, LayerNorms, FFN down-projections, other Linears and
dropouts, with no per-architecture code.

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

from torch import nn

from slimfit.selection import iter_modules

__all__ = ["KINDS", "attention_kernel", "detect_kinds", "down_projections",
           "is_attention", "is_gelu"]

#: Activation kinds, in the order they are reported.
KINDS = ("attention", "gelu", "layernorm", "ffn_down_input", "linear_input", "dropout_mask")

_QUERY_NAMES = ("query", "q_proj", "q_lin", "q", "qkv", "Wqkv", "query_proj")


def _is_linear(m: object) -> bool:
    """An ``nn.Linear``, or an adapter wrapping one (PEFT's LoRA layers keep the
    original as ``base_layer``)."""
    return isinstance(m, nn.Linear) or isinstance(getattr(m, "base_layer", None), nn.Linear)


def is_attention(mod: nn.Module) -> bool:
    """An attention core: a ``*Attention`` module owning its query (or fused
    qkv) projection directly (BertSelfAttention, ViTAttention,
    DistilBertSelfAttention, DeBERTa's DisentangledSelfAttention, timm
    Attention; not BertAttention, its parent), LoRA-wrapped or not."""
    return type(mod).__name__.endswith("Attention") and any(
        _is_linear(getattr(mod, n, None)) for n in _QUERY_NAMES)


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


def is_gelu(mod: nn.Module) -> bool:
    """``nn.GELU`` or a class named for it (Hugging Face ``GELUActivation``)."""
    return isinstance(mod, nn.GELU) or "GELU" in type(mod).__name__


def down_projections(model: nn.Module) -> set[int]:
    """Linears that are the down half of an up/down pair (3072 -> 768 when some
    Linear maps 768 -> 3072): the FFN output projections, found by shape."""
    # LoRA's low-rank factors (d -> r, r -> d) are not an FFN pair: PEFT names them lora_*
    linears = [m for n, m in iter_modules(model)
               if isinstance(m, nn.Linear) and ".lora_" not in f".{n}"]
    ups = {(m.in_features, m.out_features) for m in linears if m.out_features > m.in_features}
    return {id(m) for m in linears
            if m.in_features > m.out_features and (m.out_features, m.in_features) in ups}


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
        elif is_gelu(mod):
            found["gelu"].append((name, mod))
        elif isinstance(mod, nn.LayerNorm):
            found["layernorm"].append((name, mod))
        elif isinstance(mod, nn.Linear):
            found["ffn_down_input" if id(mod) in down else "linear_input"].append((name, mod))
        elif isinstance(mod, nn.Dropout):
            found["dropout_mask"].append((name, mod))
    return found
