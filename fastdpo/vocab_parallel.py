"""Vocabulary-parallel lm-heads: :class:`VocabParallel` (this rank's rows of a head split over the vocabulary), the
resolution of a head into the plain local rows and the ``(vocab_start, vocab_total, group)`` options the head's
custom ops take (from a :class:`VocabParallel` argument, or a ``DTensor`` weight sharded on dim 0 over a 1-D mesh:
transformers' ``colwise`` tensor-parallel lm-head), and the registry of process groups by name.

The head's custom ops take plain arguments, so a process group travels into them by its name
(``ProcessGroup.group_name``): :func:`group_name` records the group under it, :func:`resolve_group` finds it. The
merge of the ranks' statistics lives in :mod:`fastdpo._merge`."""

from __future__ import annotations

import dataclasses
import hashlib
import numbers
from dataclasses import dataclass

import torch
import torch.distributed as dist

__all__ = ["VocabParallel"]


@dataclass(frozen=True)
class VocabParallel:
    """This rank's rows ``[start, stop)`` of a vocabulary-parallel (Megatron-style, transformers ``colwise``)
    lm-head.

    Every rank of ``group`` passes the same ``hidden`` and ``labels`` (global token ids) and its own rows of the
    weight (and bias, reference weight and bias); the ranks' ranges must tile the vocabulary ``[0, V)``, in any
    order and with any (uneven) sizes. Every rank gets the same per-token statistics, loss and metrics, the full
    hidden gradient and the gradient of its own rows.

    Collectives per head call: in the forward one all-reduce (max) of the ``[N]`` per-token maxima and one
    all-reduce (sum) of the rescaled per-token statistics (``3`` values per token, ``5 + world size`` with the
    extra metrics, which carry each rank's first argmax in its own slot); in the backward one all-reduce (sum)
    of the fp32 hidden gradient. With ``vocab_size=None`` one more tiny collective per call gathers every
    rank's ``(start, stop)`` and a digest of its labels, checks that the ranges tile ``[0, V)`` and that the
    labels agree, and finds ``V`` (for the label range check and the mean logit); give ``vocab_size`` to skip
    it (and the labels' comparison, which reads them on the host).

    Attributes:
        start: first vocabulary row held by this rank (``>= 0``).
        stop: one past the last row held (``> start``); ``weight.shape[0]`` must be ``stop - start``.
        group: the ``torch.distributed`` process group over which the vocabulary is split; None for the world.
        vocab_size: the whole vocabulary ``V`` (``>= stop``), or None to find it with a collective.
    """

    start: int
    stop: int
    group: object = None
    vocab_size: int | None = None

    def __post_init__(self):
        # NumPy integers are ints too (stored as Python ints, so that the options compare and hash alike).
        for name in ("start", "stop", "vocab_size"):
            value = getattr(self, name)
            if name == "vocab_size" and value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, numbers.Integral):
                raise TypeError(f"VocabParallel.{name} must be an int{' or None' if name == 'vocab_size' else ''}, "
                                f"got {value!r}")
            object.__setattr__(self, name, int(value))
        if not 0 <= self.start < self.stop:
            raise ValueError(f"VocabParallel needs 0 <= start < stop, got start={self.start}, stop={self.stop}")
        if self.vocab_size is not None:
            if self.vocab_size < self.stop:
                raise ValueError(f"VocabParallel.vocab_size must be >= stop={self.stop}, got {self.vocab_size}")
        if self.group is not None:
            if not isinstance(self.group, dist.ProcessGroup):
                raise TypeError(f"VocabParallel.group must be a torch.distributed.ProcessGroup or None (the "
                                f"world), got {type(self.group).__name__}")

    @property
    def rows(self) -> int:
        """The number of vocabulary rows held by this rank."""
        return self.stop - self.start


# Process groups by name, as the custom ops receive them.
_GROUPS: dict[str, dist.ProcessGroup] = {}


def group_name(group) -> str:
    """Record ``group`` (None: the default, world group) and return the name :func:`resolve_group` takes."""
    if group is None:
        group = dist.group.WORLD
    name = group.group_name
    _GROUPS[name] = group
    return name


def resolve_group(name: str | None):
    """The process group recorded under ``name`` by :func:`group_name` (None for no group)."""
    if name is None:
        return None
    # torch's own registry first: torch.compile traces group_name() without replaying its record, and a name
    # recorded once may since belong to a new group (after destroy_process_group and a new init).
    try:
        return dist.distributed_c10d._resolve_process_group(name)
    except (AttributeError, LookupError, RuntimeError, ValueError):
        pass
    try:
        return _GROUPS[name]
    except KeyError:
        raise RuntimeError(f"fastdpo: no process group named {name!r} was recorded (pass it through "
                           f"fastdpo.VocabParallel)") from None


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


def check_type(vocab_parallel: VocabParallel | None) -> VocabParallel | None:
    """``vocab_parallel`` itself if it is a :class:`VocabParallel` or None; a ``TypeError`` naming it otherwise."""
    if vocab_parallel is not None and not isinstance(vocab_parallel, VocabParallel):
        raise TypeError(f"vocab_parallel must be a fastdpo.VocabParallel or None, got "
                        f"{type(vocab_parallel).__name__}")
    return vocab_parallel


def _require_distributed():
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("vocab_parallel needs torch.distributed to be initialized (init_process_group)")
    return dist


def with_vocab_size(vocab_parallel, labels) -> VocabParallel:
    """``vocab_parallel`` with its ``vocab_size`` found (and the split checked) by :func:`_check_ranks`, for
    several heads that share it and the labels."""
    vp = check_type(vocab_parallel)
    if vp.vocab_size is not None or not isinstance(labels, torch.Tensor):
        return vp
    dist = _require_distributed()
    group = vp.group if vp.group is not None else dist.group.WORLD
    return dataclasses.replace(vp, vocab_size=_check_ranks(vp, labels, group))


def resolve(weight, bias, labels, vocab_parallel, *, weight_name="weight", bias_name="bias",
            labels_name="labels") -> Resolved:
    """This rank's plain rows and the vocabulary-parallel options of one head (a plain head passes through)."""
    check_type(vocab_parallel)
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
    return Resolved(weight, bias, vp.start, total, group_name(group))
