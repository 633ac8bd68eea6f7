"""Packed (padding-free) sequences: ``cu_seqlens`` offsets, their checks, and per-sequence reductions.

A packed batch is one stream of ``L`` tokens holding ``S`` sequences back to back; ``cu_seqlens [S+1]`` are the
offsets of flash-attn's varlen API: sequence ``s`` is tokens ``cu_seqlens[s] .. cu_seqlens[s+1]-1``, with
``cu_seqlens[0] = 0`` and ``cu_seqlens[S] = L``. Offsets must be non-decreasing; equal neighbours are an empty
sequence, which is what a padded row without any token is. DPO packs its ``2B`` sequences chosen 1..B, then
rejected 1..B, the row order of the padded layout.

The per-sequence sums of the loss are segment sums: every token gets its sequence id from a ``searchsorted``
over the offsets and is added into its sequence with ``index_add`` — no loop over sequences, no host sync.
(On CUDA, ``index_add`` of floats uses atomics: the order of the additions, and so the last bits of a sum,
may vary between runs, as with any scatter-add.)
"""

from __future__ import annotations

import os

import torch

__all__ = ["check_cu_seqlens", "flatten_packed", "packed_dpo_inputs", "segment_ids", "Sequences",
           "cu_seqlens_from_lengths"]

_OFFSET_DTYPES = (torch.int32, torch.int64)


def check_cu_seqlens(cu_seqlens, length, device, *, pairs=False, name="cu_seqlens") -> torch.Tensor:
    """Check packed offsets against a stream of ``length`` tokens on ``device``; return them as int64.

    Shape, dtype and device are metadata and always checked. The values (``cu_seqlens[0] == 0``,
    ``cu_seqlens[-1] == length``, non-decreasing) are read on the host: always for CPU tensors; for GPU tensors
    that is one synchronisation, skipped with ``FASTDPO_CHECK_LABELS=0`` like the label range check (bad offsets
    then give wrong sums, never an out-of-bounds access: sequence ids are clamped into ``[0, S)``).

    Args:
        pairs: the sequences are DPO pairs (chosen 1..B, then rejected 1..B): their number must be even.
    """
    if not isinstance(cu_seqlens, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of int32/int64 offsets [S+1], got {type(cu_seqlens).__name__}")
    if cu_seqlens.dtype not in _OFFSET_DTYPES:
        raise TypeError(f"{name} must hold int32 or int64 offsets (flash-attn's varlen convention), got "
                        f"{cu_seqlens.dtype}")
    if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2:
        raise ValueError(f"{name} must be a 1-D tensor [S+1] of offsets with at least one sequence (S >= 1), got "
                         f"shape {tuple(cu_seqlens.shape)}")
    count = cu_seqlens.numel() - 1
    if pairs and count % 2:
        raise ValueError(f"{name} must delimit an even number of sequences (B chosen then B rejected, so [2B+1] "
                         f"offsets), got {cu_seqlens.numel()} offsets = {count} sequences")
    if cu_seqlens.device != torch.device(device):
        raise ValueError(f"{name} must be on the device of the hidden states ({device}), got {cu_seqlens.device}")
    offsets = cu_seqlens.long()
    # Under torch.compile a value check would be a data-dependent guard: skipped there, as the label check is.
    if not torch.compiler.is_compiling() and (device.type == "cpu"
                                              or os.environ.get("FASTDPO_CHECK_LABELS", "1") != "0"):
        _check_offset_values(offsets, length, name)
    return offsets


def _check_offset_values(offsets, length, name):
    steps = offsets[1:] - offsets[:-1]
    # One host read of all three conditions; the message is built only on failure.
    if bool((offsets[0] != 0) | (offsets[-1] != length) | (steps < 0).any()):
        first, last = int(offsets[0]), int(offsets[-1])
        if first != 0:
            raise ValueError(f"{name} must start at 0 (offsets of the packed stream), got {name}[0] = {first}")
        if last != length and int(offsets[1:].sum()) == length:
            raise ValueError(f"{name} looks like sequence lengths (they sum to L = {length}); it must hold the offsets "
                             f"[0, l0, l0+l1, ...] = torch.nn.functional.pad(lengths.cumsum(0), (1, 0))")
        if last != length:
            raise ValueError(f"{name} must end at the packed length L = {length} (the tokens of hidden/labels), got "
                             f"{name}[-1] = {last}")
        at = int((steps < 0).nonzero()[0, 0])
        raise ValueError(f"{name} must be non-decreasing (offsets, not lengths), but {name}[{at + 1}] = "
                         f"{int(offsets[at + 1])} < {name}[{at}] = {int(offsets[at])}")


def flatten_packed(name, t, *, trailing: int):
    """``[L, ...]`` or ``[1, L, ...]`` (``trailing`` dims after ``L``) as ``[L, ...]``."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() == trailing + 2 and t.shape[0] == 1:
        return t[0]
    if t.dim() != trailing + 1:
        layout = "[L, H] or [1, L, H]" if trailing else "[L] or [1, L]"
        raise ValueError(f"{name} must be packed as {layout} when cu_seqlens is given, got shape {tuple(t.shape)}")
    return t


def segment_ids(offsets: torch.Tensor, length: int) -> torch.Tensor:
    """``[L]`` int64: the sequence each token of the packed stream belongs to (empty sequences own none)."""
    positions = torch.arange(length, device=offsets.device, dtype=offsets.dtype)
    ids = torch.searchsorted(offsets[1:].contiguous(), positions, right=True)
    # Only malformed offsets (not checked on GPU with FASTDPO_CHECK_LABELS=0) can leave the range.
    return ids.clamp_(max=offsets.numel() - 2)


def cu_seqlens_from_lengths(lengths: torch.Tensor) -> torch.Tensor:
    """``[S+1]`` int32 offsets from ``[S]`` sequence lengths (flash-attn's dtype)."""
    return torch.nn.functional.pad(lengths.cumsum(0), (1, 0)).to(torch.int32)


class Sequences:
    """Per-sequence reductions of per-token tensors, padded ``[S, T]`` rows or a packed ``[L]`` stream.

    The DPO loss reads sequences only through these methods, so one formula serves both layouts and the
    padded path computes exactly what it did before.
    """

    def __init__(self, mask: torch.Tensor, cu_seqlens: torch.Tensor | None = None):
        self.packed = cu_seqlens is not None
        if self.packed:
            self.offsets = cu_seqlens.long()
            self.count = self.offsets.numel() - 1
            self.ids = segment_ids(self.offsets, mask.shape[0])
        else:
            self.count = mask.shape[0]
        self.pairs = self.count // 2
        if self.packed:
            self._chosen = self.ids < self.pairs

    def sum(self, x: torch.Tensor) -> torch.Tensor:
        """``[S]``: the sum of each sequence's tokens (bool counts as int64)."""
        if x.dtype == torch.bool:
            x = x.long()
        if not self.packed:
            return x.sum(-1)
        return torch.zeros(self.count, dtype=x.dtype, device=x.device).index_add(0, self.ids, x)

    def cumsum(self, x: torch.Tensor) -> torch.Tensor:
        """Inclusive running sum inside each sequence, in the tokens' layout (bool counts as int64)."""
        if x.dtype == torch.bool:
            x = x.long()
        if not self.packed:
            return x.cumsum(-1)
        running = x.cumsum(0)
        before = torch.nn.functional.pad(running, (1, 0))[self.offsets[:-1]]
        return running - before[self.ids]

    def per_token(self, values: torch.Tensor) -> torch.Tensor:
        """Broadcast ``[S]`` per-sequence values to the tokens' layout."""
        return values.unsqueeze(-1) if not self.packed else values[self.ids]

    def chosen(self, x: torch.Tensor) -> torch.Tensor:
        """The tokens of the chosen sequences: rows ``:B`` padded; packed, the stream with the others zeroed."""
        B = self.pairs
        return x[:B] if not self.packed else torch.where(self._chosen, x, torch.zeros((), dtype=x.dtype,
                                                                                        device=x.device))

    def rejected(self, x: torch.Tensor) -> torch.Tensor:
        """The tokens of the rejected sequences, as :meth:`chosen`."""
        B = self.pairs
        return x[B:] if not self.packed else torch.where(self._chosen, torch.zeros((), dtype=x.dtype,
                                                                                    device=x.device), x)


def packed_dpo_inputs(hidden, labels, ref_hidden, cu_seqlens):
    """Check the packed tensors of :func:`fastdpo.dpo_loss`; return ``hidden [L, H]``, ``labels [L]``,
    ``ref_hidden [L, H_ref]`` (or None) and the int64 offsets ``[2B+1]``."""
    hidden = flatten_packed("hidden", hidden, trailing=1)
    labels = flatten_packed("labels", labels, trailing=0)
    length = hidden.shape[0]
    if tuple(labels.shape) != (length,):
        raise ValueError(f"labels must be packed like hidden: [L] = [{length}] (or [1, L]), got {tuple(labels.shape)}")
    if length == 0:
        raise ValueError("empty batch: the packed stream holds no token (hidden has L = 0)")
    if ref_hidden is not None:
        ref_hidden = flatten_packed("ref_hidden", ref_hidden, trailing=1)
        if ref_hidden.shape[0] != length:
            raise ValueError(f"ref_hidden must be packed like hidden: [L, H_ref] with L = {length} (or [1, L, H_ref]), "
                             f"got {tuple(ref_hidden.shape)}")
    offsets = check_cu_seqlens(cu_seqlens, length, hidden.device, pairs=True)
    return hidden, labels, ref_hidden, offsets
