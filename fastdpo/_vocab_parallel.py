"""Resolution of a vocabulary-parallel head: a :class:`fastdpo.VocabParallel` argument, or a ``DTensor`` weight
sharded on dim 0 over a 1-D mesh (transformers' ``colwise`` tensor-parallel lm-head), into the plain local rows
and the ``(vocab_start, vocab_total, group)`` options the head's custom ops take. The merge across ranks lives
in :mod:`fastdpo._merge`."""

from __future__ import annotations

import dataclasses
import hashlib
from dataclasses import dataclass

import torch

from . import _merge
from ._options import VocabParallel

@dataclass(frozen=True)
class Resolved:
    """``weight``/``bias``: this rank's plain rows; ``start``: their first global id; ``total``: the whole
    vocabulary; ``group``: the process group's name (None: not vocabulary-parallel)."""

    weight: torch.Tensor
    bias: torch.Tensor | None
    start: int = 0
    total: int = -1
    group: str | None = None


def _is_dtensor(t) -> bool:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:
        return False
    return isinstance(t, DTensor)


def _dtensor_rows(weight, name: str) -> VocabParallel:
    """The rows this rank holds of a ``DTensor`` weight sharded on dim 0 over a 1-D mesh."""
    from torch.distributed.tensor import Shard

    mesh, placements = weight.device_mesh, tuple(weight.placements)
    if mesh.ndim != 1 or len(placements) != 1 or not isinstance(placements[0], Shard) or placements[0].dim != 0:
        raise ValueError(f"{name} is a DTensor with placements {placements} over a {mesh.ndim}-D mesh; fastdpo "
                         f"takes a DTensor lm-head sharded on dim 0 (the vocabulary) over a 1-D mesh "
                         f"(transformers' 'colwise' tensor parallelism), or plain tensors (under FSDP, compute the "
                         f"loss inside the model's forward, where the head is gathered)")
    # DTensor shards dim 0 as torch.chunk does: ceil(V / P) rows per rank, the last ranks shorter or empty.
    V, P, r = weight.shape[0], mesh.size(), mesh.get_local_rank()
    per = -(-V // P)
    start, stop = min(r * per, V), min((r + 1) * per, V)
    if stop <= start:
        raise ValueError(f"{name}: a vocabulary of {V} rows over {P} ranks leaves rank {r} no rows; use fewer "
                         f"ranks for the lm-head or pass plain tensors with fastdpo.VocabParallel")
    return VocabParallel(start, stop, group=mesh.get_group(0))


def _digest(labels: torch.Tensor) -> list[int]:
    """A 128-bit BLAKE2b digest of the labels' values (as int64, so the dtype does not matter) as two int64s."""
    data = labels.detach().reshape(-1).to(device="cpu", dtype=torch.int64).numpy().tobytes()
    digest = hashlib.blake2b(data, digest_size=16).digest()
    return [int.from_bytes(digest[i:i + 8], "little", signed=True) for i in (0, 8)]


def _check_ranks(vp: VocabParallel, labels: torch.Tensor, group) -> int:
    """One tiny all-gather of every rank's ``(start, stop, labels' size and digest)``: the ranges must tile
    ``[0, V)`` and the labels be the same on every rank (compared by a collision-resistant digest of their
    values: a difference anywhere, the first position included, changes it). Returns ``V``. Every rank sees the
    same gathered values, so every rank raises the same error."""
    import torch.distributed as dist

    mine = torch.tensor([vp.start, vp.stop, labels.numel(), *_digest(labels)], dtype=torch.int64,
                        device=labels.device)
    gathered = [torch.empty_like(mine) for _ in range(dist.get_world_size(group))]
    dist.all_gather(gathered, mine, group=group)
    table = torch.stack(gathered).tolist()
    ranges = sorted((row[0], row[1]) for row in table)
    total = ranges[-1][1]
    if ranges[0][0] != 0 or any(a[1] != b[0] for a, b in zip(ranges, ranges[1:])):
        raise ValueError(f"vocab_parallel: the ranks' [start, stop) ranges {[(row[0], row[1]) for row in table]} "
                         f"(in rank order) must tile the vocabulary [0, V) from 0, without gap or overlap")
    if len({tuple(row[2:]) for row in table}) != 1:
        raise ValueError("vocab_parallel: every rank of the group must pass the same labels (and hidden "
                         "states); the ranks' labels differ. A data-parallel (e.g. FSDP-sharded) weight is "
                         "not a vocabulary-parallel head: compute the loss inside the model's forward")
    return total


def _checked_type(vocab_parallel):
    if vocab_parallel is not None and not isinstance(vocab_parallel, VocabParallel):
        raise TypeError(f"vocab_parallel must be a fastdpo.VocabParallel or None, got "
                        f"{type(vocab_parallel).__name__}")
    return vocab_parallel


def _require_distributed():
    import torch.distributed as dist

    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("vocab_parallel needs torch.distributed to be initialized (init_process_group)")
    return dist


def with_vocab_size(vocab_parallel, labels) -> VocabParallel:
    """``vocab_parallel`` with its ``vocab_size`` found (and the split checked) by :func:`_check_ranks`, for
    several heads that share it and the labels."""
    vp = _checked_type(vocab_parallel)
    if vp.vocab_size is not None or not isinstance(labels, torch.Tensor):
        return vp
    dist = _require_distributed()
    group = vp.group if vp.group is not None else dist.group.WORLD
    return dataclasses.replace(vp, vocab_size=_check_ranks(vp, labels, group))


def resolve(weight, bias, labels, vocab_parallel, *, weight_name="weight", bias_name="bias",
            labels_name="labels") -> Resolved:
    """This rank's plain rows and the vocabulary-parallel options of one head (a plain head passes through)."""
    _checked_type(vocab_parallel)
    is_dt = _is_dtensor(weight)
    if is_dt and vocab_parallel is not None:
        raise ValueError(f"{weight_name} is a DTensor, which carries its own vocabulary split: do not pass "
                         f"vocab_parallel with it")
    if not is_dt and _is_dtensor(bias):
        raise TypeError(f"{bias_name} is a DTensor but {weight_name} is not: pass both as DTensors or both plain")
    if not is_dt and vocab_parallel is None:
        return Resolved(weight, bias)
    if not is_dt and isinstance(weight, torch.Tensor) and weight.dim() == 2 and weight.shape[0] != vocab_parallel.rows:
        raise ValueError(f"{weight_name} must hold this rank's rows [{vocab_parallel.start}, {vocab_parallel.stop}) "
                         f"of the vocabulary: expected [{vocab_parallel.rows}, H], got {tuple(weight.shape)}")
    if not isinstance(labels, torch.Tensor):
        raise TypeError(f"{labels_name} must be a torch.Tensor, got {type(labels).__name__}")
    dist = _require_distributed()
    if is_dt:
        vp = _dtensor_rows(weight, weight_name)
        # to_local() keeps autograd: the local gradient flows back as this rank's shard.
        weight = weight.to_local()
        if bias is not None:
            if not _is_dtensor(bias):
                raise TypeError(f"{weight_name} is a DTensor but {bias_name} is not: pass both as DTensors")
            bias = bias.to_local()
        if weight.shape[0] != vp.rows:
            raise ValueError(f"{weight_name}: the DTensor's local shard has {weight.shape[0]} rows, expected "
                             f"{vp.rows} (rows [{vp.start}, {vp.stop}) of torch.chunk's split)")
    else:
        vp = vocab_parallel
    group = vp.group if vp.group is not None else dist.group.WORLD
    total = vp.vocab_size if vp.vocab_size is not None else _check_ranks(vp, labels, group)
    return Resolved(weight, bias, vp.start, total, _merge.group_name(group))
