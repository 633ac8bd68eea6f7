"""Integrations with trainers; each submodule imports its framework only when it is imported itself.

- :mod:`fastdpo.integrations.transformers`: run a ``transformers`` causal LM's backbone and its lm-head (with the
  model's own softcap / logit scale / bias) through fastdpo; the DPO loss of a causal LM in one call.
- :mod:`fastdpo.integrations.trl`: ``FastDPOTrainer`` (TRL's DPOTrainer with the loss on fastdpo) and
  ``patch_trl()`` / ``unpatch_trl()`` (TRL's per-token fused head on fastdpo's kernels). Needs ``fastdpo[trl]``.
"""
