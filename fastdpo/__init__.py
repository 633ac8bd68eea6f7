"""fastdpo: the DPO loss from hidden states, without materializing the ``[tokens, vocab]`` logits.

Importing fastdpo never touches CUDA: the Triton kernels are imported on first use.
"""

from .functional import dpo_loss, fused_logprobs, sequence_logprobs, token_stats
from ._options import VocabParallel
from .losses import LOSS_TYPES, DPOOutput, LossConfig
from .module import FusedLinearDPOLoss

__version__ = "0.1.0"

__all__ = [
    "dpo_loss",
    "fused_logprobs",
    "sequence_logprobs",
    "token_stats",
    "DPOOutput",
    "LossConfig",
    "LOSS_TYPES",
    "FusedLinearDPOLoss",
    "VocabParallel",
]
