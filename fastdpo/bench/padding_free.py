"""``fastdpo profile --padding-free``: one DPO training step on a ragged batch, padded against packed.

The batch is what a preference dataset gives: prompts and completions whose lengths follow a long-tailed
(log-normal) distribution, capped at ``--seq-len``. Padded, it is right-padded to its longest sequence, as TRL's
collator does, and the backbones run on ``[2B, T]`` with an attention mask. Packed, the padding is removed and
the backbones run once on ``[1, L]`` with restarting ``position_ids``
(:func:`fastdpo.integrations.transformers.pack_batch`), the loss on ``cu_seqlens``. Both layouts run the same
step — reference forward, policy forward, fastdpo's loss (forward and backward), policy backward, AdamW — on the
same models and report the tokens through the backbone, the step time (median of repeats, with the backbone's
share) and the peak memory; the two losses must agree.
"""

from __future__ import annotations

import datetime as _dt
import gc
import json
import os
import statistics
import time
from dataclasses import asdict, dataclass, field

import torch

from .._options import IGNORE_INDEX
from .memory import PeakMeter

__all__ = ["NotPackableError", "LAYOUTS", "ragged_lengths", "ragged_batch", "LayoutStep", "PaddingFreeReport",
           "run_padding_free", "format_padding_free", "write_outputs"]

LAYOUTS = ("padded", "packed")


class NotPackableError(ValueError):
    """The model cannot run on packed sequences (the library's refusal, as it would refuse ``padding_free=True``)."""


def ragged_lengths(pairs: int, seq_len: int, seed: int = 0) -> dict:
    """Prompt, chosen and rejected lengths of ``pairs`` pairs, log-normal (long-tailed), each sequence capped at
    ``seq_len`` tokens (the completion is cut, as TRL's ``keep_start`` truncation does; at least one token)."""
    g = torch.Generator().manual_seed(seed)

    def lognormal(median, sigma, n):
        return torch.exp(torch.randn(n, generator=g, dtype=torch.float64) * sigma + torch.log(torch.tensor(median)))

    prompt = lognormal(seq_len / 10, 0.9, pairs).round().clamp(1, max(1, seq_len - 1)).long()
    out = {"prompt": prompt.tolist()}
    for name in ("chosen", "rejected"):
        completion = lognormal(seq_len / 12, 1.0, pairs).round().clamp(min=1).long()
        out[name] = torch.minimum(completion, seq_len - prompt).clamp(min=1).tolist()
    return out


def ragged_batch(lengths: dict, vocab: int, device, seed: int = 0):
    """Right-padded ``input_ids``, ``attention_mask`` and unshifted ``labels`` (``[2B, T]``, ``T`` the longest
    sequence; chosen rows then rejected rows, each prompt + completion, labels only on the completion)."""
    g = torch.Generator().manual_seed(seed + 1)
    rows = [(p, p + c) for p, c in zip(lengths["prompt"], lengths["chosen"])]
    rows += [(p, p + r) for p, r in zip(lengths["prompt"], lengths["rejected"])]
    T = max(n for _, n in rows)
    ids = torch.randint(0, vocab, (len(rows), T), generator=g)
    position = torch.arange(T)
    total = torch.tensor([n for _, n in rows]).unsqueeze(1)
    prompt = torch.tensor([p for p, _ in rows]).unsqueeze(1)
    attention = (position < total).long()
    labels = ids.masked_fill((position < prompt) | (position >= total), IGNORE_INDEX)
    return ids.to(device), attention.to(device), labels.to(device)


@dataclass
class LayoutStep:
    """One layout's measured step (bytes as in ``fastdpo profile``: above the phase's start)."""

    layout: str
    backbone_tokens: int
    labelled_tokens: int
    ms: float
    ms_runs: list
    backbone_ms: float
    activations: int
    loss_step: int
    step_peak: int
    loss: float
    logps_chosen: float


@dataclass
class PaddingFreeReport:
    model: str
    layers: int
    params: int
    device: str
    machine: str
    attention: str
    memory_method: str
    dtype: str
    seq_len: int
    pairs: int
    lengths: dict
    padded_shape: tuple
    repeats: int
    steps: dict = field(default_factory=dict)  # layout -> LayoutStep
    date: str = ""


class _Runner:
    """One DPO training step of a profiling harness (policy, frozen reference, AdamW) in either layout."""

    def __init__(self, harness, batch):
        from ..integrations.transformers import pack_batch

        self.h = harness
        self.ids, self.attention, self.labels = batch
        self.padded_targets = torch.nn.functional.pad(self.labels[:, 1:], (0, 1), value=IGNORE_INDEX)
        self.packed = pack_batch(self.ids, self.labels, self.attention)

    def inputs(self, layout):
        if layout == "padded":
            return dict(input_ids=self.ids, attention_mask=self.attention), self.padded_targets, None
        return self.packed.backbone_kwargs(), self.packed.targets, self.packed.cu_seqlens

    def step(self, layout, meter=False):
        """Returns ((loss, mean chosen log-prob), backbone seconds, per-phase peaks or None)."""
        from ..functional import dpo_loss

        h = self.h
        kwargs, targets, cu_seqlens = self.inputs(layout)
        phases = {}

        def phase(name):
            if not meter:
                return _Clock()
            phases[name] = PeakMeter(h.device, restore=False)
            return phases[name]

        backbone = 0.0
        t = time.perf_counter()
        with phase("reference forward"), torch.no_grad():
            ref_hidden = h._backbone(h.reference)(**kwargs).last_hidden_state
        with phase("policy forward"):
            hidden = h._backbone(h.policy)(**kwargs).last_hidden_state
        backbone += _elapsed(h.device, t)
        leaf = hidden.detach().requires_grad_()
        with phase("loss"):
            out = dpo_loss(leaf, h.policy.get_output_embeddings().weight, targets, ref_hidden=ref_hidden,
                           ref_weight=h.reference.get_output_embeddings().weight, softcap=h.softcap, beta=0.1,
                           cu_seqlens=cu_seqlens)
            out.loss.backward()
        loss = (float(out.loss.detach()), float(out.metrics["logps/chosen"]))
        del out
        t = time.perf_counter()
        with phase("policy backward"):
            hidden.backward(leaf.grad)
        backbone += _elapsed(h.device, t)
        del hidden, leaf, ref_hidden
        with phase("optimizer step"):
            h.optimizer.step()
            h.optimizer.zero_grad(set_to_none=True)
        if not meter:
            return loss, backbone, None
        start = phases["reference forward"].baseline_bytes
        unmeasured = any(m.peak_bytes is None or m.baseline_bytes is None for m in phases.values())
        peaks = {"step": None if unmeasured else max(m.baseline_bytes + m.peak_bytes - start
                                                     for m in phases.values()),
                 "loss": phases["loss"].peak_bytes, "activations": phases["policy forward"].peak_bytes}
        return loss, backbone, peaks


class _Clock:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def _elapsed(device, start):
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


def run_padding_free(config, *, repeats: int = 3, seed: int = 0, progress=True) -> PaddingFreeReport:
    """Measure both layouts on one ragged batch of ``config.pairs`` pairs (a :class:`ProfileConfig`); raises
    :class:`NotPackableError` for a model that cannot run packed, before any step."""
    from ..integrations.transformers import check_packable
    from .profiling import _attention, _build, _progress
    from .run import machine_name

    device = torch.device(config.device)
    attention = _attention() if device.type == "cuda" else "sdpa"
    say = _progress(progress, "fastdpo profile --padding-free")
    h = _build(config, attention, say)
    try:
        check_packable(h.policy)
    except (TypeError, ValueError) as err:
        raise NotPackableError(str(err)) from err
    # AdamW does all its work with a zero learning rate but leaves the weights as they are, so both layouts
    # compute the same loss on the same weights, step after step.
    for group in h.optimizer.param_groups:
        group["lr"] = 0.0
    lengths = ragged_lengths(config.pairs, config.seq_len, seed)
    runner = _Runner(h, ragged_batch(lengths, h.vocab, device, seed))
    report = PaddingFreeReport(model=config.model, layers=config.layers, params=h.params, device=config.device,
                               machine=machine_name(config.device), attention=h.attention,
                               memory_method=PeakMeter(device).method, dtype=config.dtype, seq_len=config.seq_len,
                               pairs=config.pairs, lengths=lengths, padded_shape=tuple(runner.ids.shape),
                               repeats=repeats, date=_dt.datetime.now().isoformat(timespec="seconds"))
    labelled = int((runner.labels[:, 1:] != IGNORE_INDEX).sum())
    for layout in LAYOUTS:
        say(f"{layout}: warm-up step")
        runner.step(layout)  # warm-up: AdamW creates its state, the allocator settles
        runs, backbone_runs = [], []
        gc.collect()
        for i in range(repeats):
            say(f"{layout}: timed step {i + 1} of {repeats}")
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            t = time.perf_counter()
            loss, backbone, _ = runner.step(layout)
            runs.append(_elapsed(device, t) * 1e3)
            backbone_runs.append(backbone * 1e3)
        say(f"{layout}: measured step")
        loss, _, peaks = runner.step(layout, meter=True)
        tokens = runner.ids.numel() if layout == "padded" else runner.packed.input_ids.numel()
        report.steps[layout] = LayoutStep(
            layout=layout, backbone_tokens=tokens, labelled_tokens=labelled, ms=statistics.median(runs),
            ms_runs=runs, backbone_ms=statistics.median(backbone_runs), activations=peaks["activations"] or 0,
            loss_step=peaks["loss"] or 0, step_peak=peaks["step"] or 0, loss=loss[0], logps_chosen=loss[1])
    return report


def _mib(b):
    return f"{b / (1 << 20):.1f}"


def format_padding_free(report: PaddingFreeReport) -> str:
    """The side-by-side table, with the batch's length distribution."""
    L = report.lengths
    seqs = [p + c for p, c in zip(L["prompt"], L["chosen"])] + [p + r for p, r in zip(L["prompt"], L["rejected"])]
    ordered = sorted(seqs)
    rows, T = report.padded_shape
    real = sum(seqs)
    lines = [
        f"model {report.model}: {report.layers} layers, {report.params / 1e6:.1f}M parameters, {report.dtype}, "
        f"attention: {report.attention}",
        f"device: {report.machine}",
        f"memory: {report.memory_method}",
        f"ragged batch: {report.pairs} pairs, lengths log-normal (long-tailed), capped at {report.seq_len} tokens",
        f"  sequence lengths (chosen then rejected): {seqs}",
        f"  prompt lengths: {L['prompt']}",
        f"  min {ordered[0]}, median {statistics.median(ordered):g}, mean {real / len(seqs):.1f}, max {ordered[-1]}; "
        f"padded to [{rows}, {T}] = {rows * T} tokens, of which {rows * T - real} "
        f"({100 * (rows * T - real) / (rows * T):.0f}%) are padding",
        "",
        f"{'':<32}{'padded':>12}{'packed':>12}{'packed/padded':>15}",
    ]
    pad, pack = report.steps["padded"], report.steps["packed"]

    def row(name, a, b, fmt, ratio=True):
        r = f"{b / a:>15.2f}" if ratio and a else f"{'':>15}"
        lines.append(f"{name:<32}{fmt(a):>12}{fmt(b):>12}{r}")

    row("backbone tokens", pad.backbone_tokens, pack.backbone_tokens, str)
    row("labelled (head) tokens", pad.labelled_tokens, pack.labelled_tokens, str)
    row(f"step time, ms (median of {report.repeats})", pad.ms, pack.ms, lambda v: f"{v:.0f}")
    row("  of which backbones, ms", pad.backbone_ms, pack.backbone_ms, lambda v: f"{v:.0f}")
    row("activations peak, MiB", pad.activations, pack.activations, _mib)
    row("loss step peak, MiB", pad.loss_step, pack.loss_step, _mib)
    row("step peak above start, MiB", pad.step_peak, pack.step_peak, _mib)
    lines.append(f"{'loss':<32}{pad.loss:>12.6f}{pack.loss:>12.6f}")
    lines.append(f"{'logps/chosen':<32}{pad.logps_chosen:>12.4f}{pack.logps_chosen:>12.4f}")
    lines.append("")
    lines.append("The step: reference forward, policy forward, fastdpo's loss (forward + backward), policy backward, "
                 "AdamW; the packed backbones run on one row with restarting position_ids, the loss on cu_seqlens.")
    return "\n".join(lines)


def write_outputs(report: PaddingFreeReport, out_dir: str) -> dict:
    """``padding_free.json``: the configuration, the lengths and both layouts' steps."""
    path = os.path.join(out_dir, "padding_free.json")
    with open(path, "w") as f:
        json.dump(asdict(report), f, indent=2)
    return {"json": path}
