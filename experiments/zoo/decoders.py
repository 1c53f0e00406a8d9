"""Decoder and encoder-decoder language models, built from config (random
init: no decoder's weights install offline), at any size: the families the
decoder work covers (Llama, Qwen2, Mistral, Gemma, Phi-3, GPT-2, T5, BART),
their batches and losses, and the real LLM shapes the benchmarks measure.

Memory does not depend on the weights' values; the layers, widths, heads,
key-value heads and vocabularies of :data:`SHAPES` are the published
configurations of those models.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

__all__ = ["DECODERS", "SHAPES", "LLMShape", "decoder", "lm_batch", "llm"]


def _hf(model: str, config: str, **kw) -> nn.Module:
    import transformers
    return getattr(transformers, model)(getattr(transformers, config)(**kw))


def _causal(model: str, config: str, *, layers, hidden, heads, kv_heads, intermediate, vocab,
            attn, dropout, **extra) -> nn.Module:
    return _hf(model, config, num_hidden_layers=layers, hidden_size=hidden,
               num_attention_heads=heads, num_key_value_heads=kv_heads,
               intermediate_size=intermediate, vocab_size=vocab, attn_implementation=attn,
               attention_dropout=dropout, **extra)


#: family -> builder(layers, hidden, heads, kv_heads, intermediate, vocab, attn, dropout)
DECODERS = {
    "llama": lambda **k: _causal("LlamaForCausalLM", "LlamaConfig", **k),
    "qwen2": lambda **k: _causal("Qwen2ForCausalLM", "Qwen2Config", tie_word_embeddings=True, **k),
    "mistral": lambda **k: _causal("MistralForCausalLM", "MistralConfig", **k),
    "gemma": lambda **k: _causal("GemmaForCausalLM", "GemmaConfig", head_dim=k["hidden"] // k["heads"],
                                 **k),
    "phi3": lambda **k: _causal("Phi3ForCausalLM", "Phi3Config", pad_token_id=0, bos_token_id=1,
                                eos_token_id=2, **k),
    "gpt2": lambda *, layers, hidden, heads, vocab, attn, dropout, **_: _hf(
        "GPT2LMHeadModel", "GPT2Config", n_layer=layers, n_embd=hidden, n_head=heads,
        vocab_size=vocab, attn_implementation=attn, attn_pdrop=dropout, resid_pdrop=dropout,
        embd_pdrop=dropout, bos_token_id=0, eos_token_id=0),
    "t5": lambda *, layers, hidden, heads, intermediate, vocab, attn, dropout, **_: _hf(
        "T5ForConditionalGeneration", "T5Config", num_layers=layers, d_model=hidden,
        num_heads=heads, d_kv=hidden // heads, d_ff=intermediate, vocab_size=vocab,
        feed_forward_proj="gated-gelu", dropout_rate=dropout, decoder_start_token_id=0,
        attn_implementation=attn if attn != "sdpa" else None),
    "bart": lambda *, layers, hidden, heads, intermediate, vocab, attn, dropout, **_: _hf(
        "BartForConditionalGeneration", "BartConfig", encoder_layers=layers,
        decoder_layers=layers, d_model=hidden, encoder_attention_heads=heads,
        decoder_attention_heads=heads, encoder_ffn_dim=intermediate,
        decoder_ffn_dim=intermediate, vocab_size=vocab, max_position_embeddings=1024,
        attn_implementation=attn, dropout=dropout, attention_dropout=dropout),
}


def decoder(family: str, layers: int = 2, hidden: int = 64, heads: int = 4, kv_heads: int = 2,
            intermediate: int | None = None, vocab: int = 300, attn: str = "sdpa",
            dropout: float = 0.0) -> nn.Module:
    """A ``family`` model of :data:`DECODERS` at this size (random init, train mode).

    Example:
        >>> type(decoder("llama")).__name__
        'LlamaForCausalLM'
    """
    if family not in DECODERS:
        raise ValueError(f"unknown decoder family {family!r}; choose one of {sorted(DECODERS)}.")
    return DECODERS[family](layers=layers, hidden=hidden, heads=heads, kv_heads=kv_heads,
                            intermediate=intermediate or 2 * hidden, vocab=vocab, attn=attn,
                            dropout=dropout).train()


def lm_batch(model: nn.Module, n: int = 2, seq: int = 24, generator: torch.Generator | None = None
             ) -> dict[str, torch.Tensor]:
    """Token ids with ``labels`` (the causal-LM loss the model computes itself);
    encoder-decoder models get ``decoder_input_ids`` too."""
    g = generator if generator is not None else torch.Generator().manual_seed(0)
    vocab = model.config.vocab_size
    ids = torch.randint(3, vocab, (n, seq), generator=g)
    batch = {"input_ids": ids, "labels": ids.clone()}
    if getattr(model.config, "is_encoder_decoder", False):
        batch["decoder_input_ids"] = torch.randint(3, vocab, (n, seq), generator=g)
    return batch


@dataclasses.dataclass(frozen=True)
class LLMShape:
    """A published LLM configuration, built at any depth (``layers``)."""

    family: str
    layers: int
    hidden: int
    heads: int
    kv_heads: int
    intermediate: int
    vocab: int
    tied: bool


#: the shapes the benchmarks measure (each model's published config.json)
SHAPES = {
    "llama-3.2-1b": LLMShape("llama", 16, 2048, 32, 8, 8192, 128256, True),
    "llama-3-8b": LLMShape("llama", 32, 4096, 32, 8, 14336, 128256, False),
    "qwen2.5-1.5b": LLMShape("qwen2", 28, 1536, 12, 2, 8960, 151936, True),
    "gpt2": LLMShape("gpt2", 12, 768, 12, 12, 3072, 50257, True),
    # the BERT-base-width decoders (12 layers, batch 4 x 256 tokens)
    "llama-bert-width": LLMShape("llama", 12, 768, 12, 4, 2048, 32000, False),
}


def llm(shape: str, layers: int | None = None, attn: str = "sdpa", dtype: torch.dtype | None = None,
        dropout: float = 0.0) -> nn.Module:
    """The model of :data:`SHAPES` ``shape`` (with ``layers`` blocks instead of
    its own, to measure a few layers at real width), random init."""
    s = SHAPES[shape]
    if s.family == "gpt2":
        model = decoder("gpt2", layers=layers or s.layers, hidden=s.hidden, heads=s.heads,
                        vocab=s.vocab, attn=attn, dropout=dropout)
    else:
        model = DECODERS[s.family](layers=layers or s.layers, hidden=s.hidden, heads=s.heads,
                                   kv_heads=s.kv_heads, intermediate=s.intermediate,
                                   vocab=s.vocab, attn=attn, dropout=dropout,
                                   **({"tie_word_embeddings": s.tied} if s.family == "llama" else {}))
    return (model.to(dtype) if dtype is not None else model).train()
