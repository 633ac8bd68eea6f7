"""fastdpo: the DPO loss from hidden states, without materializing the ``[tokens, vocab]`` logits.

Importing fastdpo never touches CUDA: the Triton kernels are imported on first use.
"""

from .functional import dpo_loss, fused_logprobs, sequence_logprobs, token_stats
from .losses import LOSS_TYPES, DPOOutput, LossConfig
from .module import FusedLinearDPOLoss
from .vocab_parallel import VocabParallel

__version__ = "0.1.0"

# Submodules the user guide names, imported on first access (``fastdpo.reference.reference_dpo_loss`` works after
# ``import fastdpo`` alone) so that importing fastdpo stays light and never touches CUDA.
_SUBMODULES = ("reference", "integrations", "kernels")


def __getattr__(name):
    if name in _SUBMODULES:
        import importlib

        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

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
