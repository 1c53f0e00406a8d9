"""The one model zoo of the tests, the benchmarks and the Hydra runs: model
families at any size (``families``: encoders and ViTs; ``decoders``: causal and
encoder-decoder LMs, and the real LLM shapes), the benchmark cases with their
fixed batches (``cases``), and the one pretrained model that loads offline
(``pretrained``)."""

from slimfit.experiments.zoo.cases import ATTN, CASES, PRECISIONS, Case, build_case, case_batch
from slimfit.experiments.zoo.decoders import DECODERS, SHAPES, LLMShape, decoder, llm, lm_batch
from slimfit.experiments.zoo.families import (LAYERS, PlainNet, TimmClassifier, hf_bert,
                                              hf_distilbert, hf_from_config, hf_pretrained,
                                              hf_roberta, hf_vit, image_batch, loss_fn, text_batch,
                                              timm_classifier, timm_vit)
from slimfit.experiments.zoo.pretrained import minilm_path

__all__ = ["ATTN", "CASES", "DECODERS", "LAYERS", "LLMShape", "PRECISIONS", "SHAPES", "Case",
           "PlainNet", "TimmClassifier", "decoder", "llm", "lm_batch",
           "build_case", "case_batch", "hf_bert", "hf_distilbert", "hf_from_config", "hf_pretrained",
           "hf_roberta", "hf_vit", "image_batch", "loss_fn", "minilm_path", "text_batch",
           "timm_classifier", "timm_vit"]
