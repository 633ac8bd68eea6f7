"""The per-token statistics record: what a forward writes for each token and each vocabulary split (or chunk), and
what the host's merge combines across splits, chunks and ranks. Plain integers, importable without Triton.

Rows of a ``[N_STATS(_EXTRAS), ..., tokens]`` fp32 record:

- ``MAX``: the running max ``m`` of the split's logits;
- ``SUMEXP``: ``Σ exp(z − m)``;
- ``TARGET``: the target's logit where the target falls in the split, else 0;
- ``SUM``: ``Σ z`` (for the mean logit);
- with extras only, ``XSUMEXP``: ``Σ exp(z − m)·z`` (entropy), ``SQSUMEXP``: ``Σ exp(z − m)²`` (``log Σ p²``),
  ``ARGMAX``: the first index of the split's max, as a float.
"""

MAX, SUMEXP, TARGET, SUM, XSUMEXP, SQSUMEXP, ARGMAX = range(7)
N_STATS, N_STATS_EXTRAS = 4, 7
