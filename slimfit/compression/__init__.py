"""Compression of the activations SlimFit must keep whatever is frozen
(attention operands, GELU and norm inputs, dropout masks, trained Linears'
inputs): the configs, the quantizers, the detection of each kind of module by
type, the scoped saved-tensor hooks, fused attention, and convolutions whose
frozen weight keeps no input.

The compressor and the frozen-convolution router are session parts
(:mod:`slimfit.parts`).
"""

from slimfit.compression.compressor import ActivationCompressor
from slimfit.compression.config import CompressionConfig, Treatment
from slimfit.compression.detect import KINDS, detect_kinds
from slimfit.compression.frozen_conv import FrozenConvRouter
from slimfit.compression.quantize import dequantize, quantize

__all__ = ["KINDS", "ActivationCompressor", "CompressionConfig", "FrozenConvRouter", "Treatment",
           "dequantize", "detect_kinds", "quantize"]
