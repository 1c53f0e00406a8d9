"""The language-model head's loss without (tokens x vocab) tensors kept for
backward: the chunked linear + cross-entropy (:func:`chunked_cross_entropy`,
for a loss computed outside the model) and the session part that uses it
automatically for transformers' causal LMs (:class:`ChunkedLMLoss`,
``SessionConfig.chunked_loss``).
"""

from slimfit.loss.chunked import chunked_cross_entropy, linear_cross_entropy
from slimfit.loss.head import ChunkedLMLoss, causal_lm_heads

__all__ = ["ChunkedLMLoss", "causal_lm_heads", "chunked_cross_entropy", "linear_cross_entropy"]
