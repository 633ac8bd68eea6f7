"""The per-token statistics record: what a forward writes for each token and each vocabulary split (or chunk), and
what the host's merge combines across splits, chunks and ranks. Plain integers, importable without Triton.

Rows of a ``[N_STATS(_EXTRAS), pieces, tokens]`` fp32 record, for every token and piece of the vocabulary:

- ``MAX``: ``m = max_v z_v`` over the piece (``-inf`` when every logit of the piece is ``-inf``);
- ``SUMEXP``: ``Σ_v exp(z_v − m)`` (``exp`` relative to 0 instead of ``m`` when ``m = -inf``, so an all-masked
  piece contributes 0, never ``exp(-inf − -inf)``);
- ``TARGET``: the target's logit if it lies in the piece, else 0;
- ``SUM``: ``Σ_v z_v`` (it also carries any NaN of the inputs, which a max may drop);
- with the extras, ``XSUMEXP``: ``Σ_v exp(z_v − m)·z_v`` over the terms with ``exp(z_v − m) > 0`` (the limit
  ``p·z → 0`` of a masked logit), ``SQSUMEXP``: ``Σ_v exp(2(z_v − m))``, ``ARGMAX``: the first index of the
  piece's maximum, as a vocabulary id.
"""

MAX, SUMEXP, TARGET, SUM, XSUMEXP, SQSUMEXP, ARGMAX = range(7)
N_STATS, N_STATS_EXTRAS = 4, 7
