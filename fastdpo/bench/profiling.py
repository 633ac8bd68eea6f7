"""``fastdpo profile``: the memory of one whole DPO training step of a transformers causal LM, naive head vs fastdpo.

The model is built from a config (no download) with ``--layers`` decoder layers (default 2): a named family
(``llama3``, ``qwen2.5``, ``gemma2``) or a ``config.json``. On GPU a named family keeps its real sizes; on CPU
it is tiny (hidden 256, 4 heads) but keeps the family's real vocabulary, since the head is what is profiled. A
``config.json`` keeps its sizes on both. Before anything is built, the step's peak memory is estimated (phase by
phase, see :func:`estimate_memory`) and a run is refused whose estimate exceeds :data:`USABLE_FRACTION` of the
memory the device has available (the rest is headroom for the estimate's margin and for other processes), as is a
``--budget`` that the weights alone exceed. Building the models and each step print a line as they start.

One step = reference forward (no grad), policy backbone forward, the loss (head forward + backward, naive or
fastdpo), backbone backward, AdamW step. Reported per head: what the weights, gradients-to-be and optimizer state
hold at the start of the step; the peak of the backbone's activations; the peak of the loss phase; the step's
peak; and the largest number of pairs at ``--seq-len`` whose step fits ``--budget`` (found from two measured
steps by a linear fit, then run to confirm). The memory timeline comes from torch's memory snapshot on GPU
(also saved, for https://pytorch.org/memory_viz) and from the sampled RSS on CPU.
"""

from __future__ import annotations

import copy
import dataclasses
import datetime as _dt
import gc
import json
import os
import pickle
import sys
import time
from dataclasses import asdict, dataclass, field

import torch

from .._options import IGNORE_INDEX
from ..integrations._hf_model import text_config
from .memory import (
    USABLE_FRACTION,
    PeakMeter,
    RssSampler,
    TooBigError,
    check_fits,
    compare_peaks,
    current_rss,
    device_memory,
    format_bytes,
    resolve_device,
)

__all__ = ["MODELS", "DEFAULT_LAYERS", "ProfileConfig", "ProfileReport", "BudgetError", "resolve_config",
           "build_model_config", "estimate_memory", "check_memory", "run_profile", "write_outputs", "format_report",
           "cuda_timeline", "ESTIMATE_MARGIN", "USABLE_FRACTION"]

# Real sizes of each family's model (GPU), those behind the shapes of docs/benchmarks.md; the CPU variant keeps
# only the vocabulary.
MODELS = {
    "llama3": dict(model_type="llama", hidden_size=4096, intermediate_size=14336, num_attention_heads=32,
                   num_key_value_heads=8, vocab_size=128256, rope_theta=500000.0, tie_word_embeddings=False,
                   max_position_embeddings=8192),
    "qwen2.5": dict(model_type="qwen2", hidden_size=3584, intermediate_size=18944, num_attention_heads=28,
                    num_key_value_heads=4, vocab_size=152064, rope_theta=1000000.0, tie_word_embeddings=False,
                    max_position_embeddings=32768),
    "gemma2": dict(model_type="gemma2", hidden_size=2304, intermediate_size=9216, num_attention_heads=8,
                   num_key_value_heads=4, head_dim=256, vocab_size=256000, final_logit_softcapping=30.0,
                   attn_logit_softcapping=50.0, tie_word_embeddings=True, max_position_embeddings=8192),
}
_CPU_TINY = dict(hidden_size=256, intermediate_size=512, num_attention_heads=4, num_key_value_heads=2, head_dim=64)
HEADS = ("naive", "fastdpo")
DEFAULT_LAYERS = 2


class BudgetError(ValueError):
    """Neither head fits one pair into the memory budget."""


@dataclass
class ProfileConfig:
    model: str
    model_config: dict
    layers: int
    device: str
    dtype: str
    seq_len: int
    pairs: int
    budget_gib: float
    search: bool = True
    max_pairs: int = 64


def _set_layers(cfg: dict, layers: int):
    """``layers`` decoder layers in ``cfg`` and in its nested ``text_config`` (multimodal configs keep the
    language model there); per-layer lists (``layer_types``) are cut, or repeated, to that length, since
    transformers refuses a list whose length differs from ``num_hidden_layers``."""
    for c in (cfg, cfg.get("text_config")):
        if not isinstance(c, dict) or (c is not cfg and "num_hidden_layers" not in c):
            continue
        c["num_hidden_layers"] = layers
        for key, value in list(c.items()):
            if key.endswith("layer_types") and isinstance(value, list) and value:
                c[key] = [value[i % len(value)] for i in range(layers)]


# Config entries that are sizes or counts. transformers takes 0 or a negative for several of them and the step then
# fails deep inside torch, so each one given must be a positive integer.
_SIZE_KEYS = ("vocab_size", "hidden_size", "intermediate_size", "moe_intermediate_size", "num_attention_heads",
              "num_key_value_heads", "head_dim", "num_hidden_layers", "max_position_embeddings", "n_embd", "n_head",
              "n_layer", "n_positions", "d_model", "state_size")


def _check_sizes(cfg: dict, path: str):
    """ValueError naming the entry of ``path`` whose size is not a positive integer (also in ``text_config``)."""
    for c, where in ((cfg, ""), (cfg.get("text_config"), "text_config.")):
        if not isinstance(c, dict):
            continue
        for key in _SIZE_KEYS:
            value = c.get(key)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"--model: \"{where}{key}\" in {path!r} must be a positive integer, got {value!r}")


def build_model_config(model: str, *, layers: int | None = None, cpu: bool = False) -> dict:
    """The config dict of ``model`` (a family name or a path to a config.json), with ``layers`` decoder layers
    (default :data:`DEFAULT_LAYERS`, for a config.json too: the profile is of the head, and a full-depth model
    is rarely what fits).

    Raises ValueError naming ``--model`` for an unknown name, a missing or unreadable file, a config without
    a ``model_type`` that transformers knows, or a size in it that is not a positive integer.
    """
    layers = DEFAULT_LAYERS if layers is None else layers
    if model in MODELS:
        cfg = dict(MODELS[model])
        if cpu:
            cfg.update(_CPU_TINY)
        _set_layers(cfg, layers)
        return cfg
    if not (model.endswith(".json") or os.path.sep in model or os.path.exists(model)):
        raise ValueError(f"unknown model {model!r}: choose from {', '.join(MODELS)} or give a path to a config.json")
    path = os.path.join(model, "config.json") if os.path.isdir(model) else model
    try:
        with open(path) as f:
            cfg = json.load(f)
    except OSError as err:
        raise ValueError(f"--model: cannot read {path!r}: {err.strerror or err}") from err
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"--model: {path!r} is not valid JSON: {err}") from err
    if not isinstance(cfg, dict) or "model_type" not in cfg:
        raise ValueError(f"--model: {path!r} has no \"model_type\" (a transformers config.json has one)")
    from transformers import CONFIG_MAPPING

    if cfg["model_type"] not in CONFIG_MAPPING:
        raise ValueError(f"--model: model_type {cfg['model_type']!r} in {path!r} is unknown to transformers")
    _check_sizes(cfg, path)
    _set_layers(cfg, layers)
    return cfg


def _hf_config(model_config: dict):
    from transformers import AutoConfig

    cfg = dict(model_config)
    model_type = cfg.pop("model_type")
    try:
        return AutoConfig.for_model(model_type, **cfg)
    except Exception as err:  # transformers' validators raise several types; all mean a bad config
        raise ValueError(f"--model: transformers refuses this {model_type} config: "
                         f"{type(err).__name__}: {err}".splitlines()[0][:300]) from err


def _causal_lm(hf_config, dtype, attention=None):
    """The causal LM of ``hf_config`` with ``attention`` (``attn_implementation``), or with the model's default
    where it has no such implementation (Mamba has no attention at all); ValueError for a model that cannot be
    built from this config."""
    from transformers import AutoModelForCausalLM

    tries = [attention, None] if attention else [None]
    for impl in tries:
        kwargs = {"attn_implementation": impl} if impl else {}
        try:
            # A copy each time: a refused attn_implementation stays set on the config it was tried with.
            return AutoModelForCausalLM.from_config(copy.deepcopy(hf_config), dtype=dtype, **kwargs)
        except Exception as err:  # transformers raises several types; all mean this config cannot be built
            error = err
    raise ValueError(f"--model: cannot build a causal LM from this config: "
                     f"{type(error).__name__}: {error}".splitlines()[0][:300]) from error


def resolve_config(model=None, *, layers=None, budget_gib=None, seq_len=None, pairs=None, device=None,
                   search=True) -> ProfileConfig:
    """Defaults for ``fastdpo profile``; ValueError naming the argument for anything invalid."""
    device = resolve_device(device)
    on_gpu = device == "cuda"
    model = model or "llama3"
    cfg = build_model_config(model, layers=layers, cpu=not on_gpu)
    if budget_gib is None:
        if on_gpu:
            budget_gib = torch.cuda.get_device_properties(0).total_memory / (1 << 30)
        else:
            # 2 GiB, or less on a machine that has less to spare (an explicit --budget is checked instead).
            avail = device_memory("cpu").available
            budget_gib = 2.0 if avail is None else min(2.0, 0.8 * avail / (1 << 30))
    if not budget_gib > 0:
        raise ValueError(f"budget must be a positive number of GiB, got {budget_gib!r}")
    return ProfileConfig(model=model, model_config=cfg, layers=int(cfg.get("num_hidden_layers", 0)), device=device,
                         dtype="bf16" if on_gpu else "fp32", seq_len=seq_len or (512 if on_gpu else 256),
                         pairs=pairs or 1, budget_gib=float(budget_gib), search=search,
                         max_pairs=256 if on_gpu else 4)


# Decoder layers instantiated (on the meta device) to count a model's parameters; a deeper model is extrapolated
# from the last half of them, so that an absurd --layers is refused at once instead of after minutes of building.
_COUNTED_LAYERS = 64
# What the process adds besides the tensors the estimate counts (modeling code, buffers such as rotary tables,
# allocator slack); see ESTIMATE_MARGIN.
_OVERHEAD_BYTES = 96 << 20
# How far the estimate is known to hold. Measured on CPU (fp32; peak RSS of the whole run: both models built,
# warm-up and measured steps of both heads) on five configurations of 55M to 232M parameters, 256 to 1024 tokens,
# with and without a softcap, the peak was 92% to 99% of the estimate. A run is started only where the estimate
# fits USABLE_FRACTION of the memory available, which leaves room for this margin and for other processes.
ESTIMATE_MARGIN = 0.10
_SIZES = {}


def _model_sizes(config: ProfileConfig) -> dict:
    """Parameter count, largest parameter and head sizes of ``config``'s model, counted on the meta device."""
    key = (json.dumps(config.model_config, sort_keys=True, default=str), config.dtype)
    if key in _SIZES:
        return _SIZES[key]
    dtype = torch.bfloat16 if config.dtype == "bf16" else torch.float32
    hf_config = _hf_config(config.model_config)
    text = text_config(hf_config)
    layers = int(getattr(text, "num_hidden_layers", 0) or 0)

    def count(n):
        cfg = copy.deepcopy(config.model_config)
        if n != layers:
            _set_layers(cfg, n)
        with torch.device("meta"):
            model = _causal_lm(_hf_config(cfg), dtype)
        sizes = [p.numel() for p in model.parameters()]  # tied weights once
        return sum(sizes), max(sizes, default=0)

    if layers <= _COUNTED_LAYERS:
        params, largest = count(layers)
    else:
        half = _COUNTED_LAYERS // 2
        (low, _), (params, largest) = count(half), count(_COUNTED_LAYERS)
        params += (layers - _COUNTED_LAYERS) * (params - low) // half
    h = int(getattr(text, "hidden_size", 0) or 0)
    inter = int(getattr(text, "intermediate_size", 0) or 4 * h)
    if getattr(text, "num_experts_per_tok", None) and getattr(text, "moe_intermediate_size", None):
        inter = max(inter, int(text.num_experts_per_tok) * int(text.moe_intermediate_size))
    sizes = {"params": params, "largest": largest, "hidden": h, "inter": inter, "layers": layers,
             "vocab": int(getattr(text, "vocab_size", 0) or 0),
             "softcap": bool(getattr(text, "final_logit_softcapping", None)),
             "item": torch.empty((), dtype=dtype).element_size()}
    _SIZES[key] = sizes
    return sizes


def estimate_memory(config: ProfileConfig, pairs: int | None = None) -> dict:
    """What one profiled step of ``pairs`` pairs (default ``config.pairs``) holds, in bytes, before anything is
    built: the model is instantiated on the ``meta`` device to count its parameters.

    The step's peak (``peak``) is the largest of its phases (``phases``), each the sum of what it holds:

    - ``loss``: the policy and reference weights (``weights``, 2 per parameter), AdamW's two moments (``adam``),
      the backbone's saved ``activations`` (about 12·H + 5·I values per token and layer; attention through
      SDPA/flash keeps no ``[T, T]`` scores), the naive head's step (``loss``, the larger head: 5 fp32
      ``[tokens, V]`` tensors at its peak, 6 with a softcap) and the lm-head's gradient (``head_grad``);
    - ``backward``: weights, moments, all ``grads`` and, at most, the activations;
    - ``optimizer``: weights, moments, grads and AdamW's temporaries (``optimizer_temp``: on GPU its foreach
      update holds one more copy of all parameters; on CPU its per-parameter loop two of the largest one);

    each plus a fixed ``overhead``, in the model's dtype. ``state`` is weights, moments and grads. The measured
    peak stayed within :data:`ESTIMATE_MARGIN` of ``peak``. Raises ValueError for a config transformers refuses.
    """
    pairs = config.pairs if pairs is None else pairs
    s = _model_sizes(config)
    item, params, h = s["item"], s["params"], s["hidden"]
    tokens = 2 * pairs * config.seq_len
    weights, adam, grads = 2 * params * item, 2 * params * item, params * item
    optimizer_temp = (params if config.device == "cuda" else 2 * s["largest"]) * item
    activations = tokens * item * (s["layers"] * (12 * h + 5 * s["inter"]) + 3 * h)
    loss = (6 if s["softcap"] else 5) * tokens * s["vocab"] * 4
    head_grad = s["vocab"] * h * item
    phases = {"loss": weights + adam + activations + loss + head_grad + _OVERHEAD_BYTES,
              "backward": weights + adam + grads + activations + _OVERHEAD_BYTES,
              "optimizer": weights + adam + grads + optimizer_temp + _OVERHEAD_BYTES}
    return {"params": params, "weights": weights, "adam": adam, "grads": grads, "state": weights + adam + grads,
            "activations": activations, "loss": loss, "head_grad": head_grad, "optimizer_temp": optimizer_temp,
            "overhead": _OVERHEAD_BYTES, "phases": phases, "peak": max(phases.values())}


def _peak_parts(est: dict, pairs: int, seq_len: int) -> dict:
    """What the estimate's peak phase holds, named for a message."""
    phase = max(est["phases"], key=est["phases"].get)
    parts = {f"weights of the policy and its reference ({est['params'] / 1e6:.1f}M parameters each)": est["weights"],
             "AdamW's moments": est["adam"]}
    if phase == "loss":
        parts[f"activations of {pairs} pair(s) x {seq_len} tokens"] = est["activations"]
        parts["the naive head's loss step and lm-head gradient"] = est["loss"] + est["head_grad"]
    else:
        parts["gradients"] = est["grads"]
        parts["activations" if phase == "backward" else "AdamW's update temporaries"] = \
            est["activations" if phase == "backward" else "optimizer_temp"]
    parts["other"] = est["overhead"]
    return parts


def check_memory(config: ProfileConfig, memory=None) -> ProfileConfig:
    """Refuse, before the model is built, a profile that cannot fit; returns ``config`` with the CPU search's
    largest batch lowered to what the machine holds.

    A run may plan to use :data:`USABLE_FRACTION` of the memory available (the estimate's margin and other
    processes need the rest). Raises :class:`~fastdpo.bench.memory.TooBigError` when the profiled step's
    estimated peak (and, with the search, a 2-pair step's) exceeds that, or when on CPU ``--budget`` does (the
    out-of-memory killer, not an exception, ends a CPU step that does not fit); raises :class:`BudgetError`
    when the weights, gradients and optimizer state alone exceed ``--budget``. ``memory`` replaces the device's
    :class:`~fastdpo.bench.memory.DeviceMemory` (tests).
    """
    pairs = max(config.pairs, 2) if config.search else config.pairs
    est = estimate_memory(config, pairs)
    memory = memory or device_memory(config.device)  # read after the estimate's imports, which the process holds
    check_fits(est["peak"], _peak_parts(est, pairs, config.seq_len), config.device,
               "choose fewer --layers, a shorter --seq-len or fewer --pairs"
               + (" (or --no-search: the search measures 2 pairs)" if config.search and config.pairs < 2 else ""),
               memory=memory, usable=USABLE_FRACTION, margin=ESTIMATE_MARGIN)
    if not config.search:
        return config
    budget = config.budget_gib * (1 << 30)
    if est["state"] > budget:
        raise BudgetError(f"--budget {config.budget_gib:g} GiB: nothing fits; the weights, gradients and AdamW state "
                          f"alone need about {format_bytes(est['state'])}")
    if config.device == "cpu" and memory.available is not None:
        usable = USABLE_FRACTION * memory.available
        if budget > usable:
            raise TooBigError(f"--budget {config.budget_gib:g} GiB is more than {USABLE_FRACTION:.0%} of the "
                              f"{format_bytes(memory.available)} {memory.name} has available (the rest is headroom): "
                              f"the largest-batch search would run steps that do not fit; give a smaller --budget "
                              f"or --no-search")
        fits = pairs
        while fits < config.max_pairs and estimate_memory(config, fits + 1)["peak"] <= usable:
            fits += 1
        config = dataclasses.replace(config, max_pairs=fits)
    return config


def _attention() -> str:
    try:
        import flash_attn  # noqa: F401
    except ImportError:
        return "sdpa"
    return "flash_attention_2"


@dataclass
class StepMemory:
    """One measured step (bytes; on CPU the RSS above the RSS before the models were built)."""

    head: str
    pairs: int
    seq_len: int
    weights_optimizer: int
    activations: int
    loss_step: int
    step_peak: int
    total_peak: int
    ms: float
    loss: float


@dataclass
class ProfileReport:
    config: ProfileConfig
    attention: str
    machine: str
    memory_method: str
    params: int
    steps: list = field(default_factory=list)
    largest: dict = field(default_factory=dict)  # head -> {"pairs", "tokens", "total_peak", "note"}
    timelines: dict = field(default_factory=dict)  # head -> {"t": [...], "bytes": [...], "marks": [...]}
    snapshots: dict = field(default_factory=dict)  # head -> raw torch memory snapshot (GPU)
    date: str = ""

    def step(self, head, pairs=None):
        pairs = self.config.pairs if pairs is None else pairs
        return next((s for s in self.steps if s.head == head and s.pairs == pairs), None)


class _Harness:
    """The policy, its frozen reference copy and AdamW, and one DPO step with either head."""

    def __init__(self, config: ProfileConfig, attention: str):
        self.config = config
        self.device = torch.device(config.device)
        dtype = torch.bfloat16 if config.dtype == "bf16" else torch.float32
        hf_config = _hf_config(config.model_config)
        torch.manual_seed(0)
        self.policy = _causal_lm(hf_config, dtype, attention).to(self.device)
        self.attention = getattr(self.policy.config, "_attn_implementation", None) or attention
        self.policy.train()
        self.reference = copy.deepcopy(self.policy).eval().requires_grad_(False)
        self.optimizer = torch.optim.AdamW(self.policy.parameters(), lr=1e-6)
        text = text_config(hf_config)
        self.vocab = text.vocab_size
        self.softcap = getattr(text, "final_logit_softcapping", None)
        self.params = sum(p.numel() for p in self.policy.parameters())

    def _backbone(self, model):
        return getattr(model, model.base_model_prefix)

    def batch(self, pairs):
        g = torch.Generator().manual_seed(pairs)
        T = self.config.seq_len
        ids = torch.randint(0, self.vocab, (2 * pairs, T + 1), generator=g)
        labels = ids[:, 1:].clone()
        labels[:, : T // 4] = IGNORE_INDEX  # the prompt
        return ids[:, :T].to(self.device), labels.to(self.device)

    def step(self, head, pairs, mark=lambda label: None):
        """One DPO training step; returns per-phase peaks (bytes above the phase's start) and the loss."""
        from ..functional import dpo_loss
        from ..reference import reference_dpo_loss

        ids, labels = self.batch(pairs)
        lm_head = self.policy.get_output_embeddings()
        ref_head = self.reference.get_output_embeddings()
        # One meter per phase, in sequence (nesting would reset the CPU high-water mark under the outer one);
        # the step's peak is the highest phase peak measured from the step's start.
        phases = {}

        def phase(name):
            mark(name)
            phases[name] = PeakMeter(self.device, restore=False)
            return phases[name]

        with phase("reference forward"), torch.no_grad():
            ref_hidden = self._backbone(self.reference)(input_ids=ids).last_hidden_state
        with phase("policy forward"):
            hidden = self._backbone(self.policy)(input_ids=ids).last_hidden_state
        leaf = hidden.detach().requires_grad_()
        with phase("loss"):
            fn = dpo_loss if head == "fastdpo" else reference_dpo_loss
            out = fn(leaf, lm_head.weight, labels, ref_hidden=ref_hidden, ref_weight=ref_head.weight,
                     softcap=self.softcap, beta=0.1)
            out.loss.backward()
        loss_value = float(out.loss.detach())
        del out
        with phase("policy backward"):
            hidden.backward(leaf.grad)
        del hidden, leaf, ref_hidden
        with phase("optimizer step"):
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        mark("end")
        start = phases["reference forward"].baseline_bytes
        unmeasured = any(m.peak_bytes is None or m.baseline_bytes is None for m in phases.values())
        peaks = {
            "step": None if unmeasured else max(m.baseline_bytes + m.peak_bytes - start for m in phases.values()),
            "loss": phases["loss"].peak_bytes,
            # What the backbone's forward holds at its high point (saved activations and transients).
            "activations": phases["policy forward"].peak_bytes,
        }
        return peaks, loss_value


def _build(config: ProfileConfig, attention: str, say) -> _Harness:
    """The harness, saying what is built and how long it took."""
    start = time.perf_counter()
    say(f"building the policy and its frozen reference ({config.layers} layers, {config.dtype}) on {config.device}")
    h = _Harness(config, attention)
    say(f"built {h.params / 1e6:.1f}M parameters per model in {time.perf_counter() - start:.1f} s")
    return h


def _held(device, baseline):
    if device.type == "cuda":
        return torch.cuda.memory_allocated(device) - baseline
    rss = current_rss()
    return None if rss is None else rss - baseline


def cuda_timeline(snapshot: dict, baseline: int = 0, device: int = 0) -> dict:
    """Allocated bytes over time from a ``torch.cuda.memory._snapshot()`` trace.

    ``alloc`` adds its size, ``free_completed`` removes it; ``baseline`` is what was allocated when recording
    began. Returns ``{"t": seconds from the first event, "bytes": [...]}``.
    """
    traces = snapshot.get("device_traces") or [[]]
    trace = traces[device] if device < len(traces) else []
    t, b = [], []
    cur = baseline
    t0 = None
    for i, ev in enumerate(trace):
        action = ev.get("action")
        if action == "alloc":
            cur += ev.get("size", 0)
        elif action == "free_completed":
            cur -= ev.get("size", 0)
        else:
            continue
        stamp = ev.get("time_us", i)
        t0 = stamp if t0 is None else t0
        t.append((stamp - t0) / 1e6)
        b.append(cur)
    return {"t": t, "bytes": b, "t0_us": t0}


def _progress(enabled: bool, prefix: str = "fastdpo profile"):
    """A ``say(text)`` that prints one line on stderr per long phase (building, each step), or does nothing."""
    def say(text):
        if enabled:
            print(f"{prefix}: {text}", file=sys.stderr, flush=True)
    return say


def _run_head(h: _Harness, head, pairs, baseline, *, timeline=False, say=lambda text: None):
    """A measured step (after a warm-up that creates AdamW's state); optionally with its memory timeline."""
    device = h.device
    what = f"{head} head, {pairs} pair(s) x {h.config.seq_len} tokens"
    # Warm-up: AdamW allocates its state on the first step; the steady steps after it are the ones measured.
    if not h.optimizer.state:
        say(f"{what}: warm-up step (AdamW creates its state)")
        h.step(head, pairs)
    say(f"{what}: measured step")
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    held = _held(device, baseline)
    tl, snap = None, None
    marks = []
    t_start = time.perf_counter()
    if timeline and device.type == "cuda":
        torch.cuda.memory._record_memory_history(max_entries=200000)
        peaks, loss = h.step(head, pairs, mark=lambda label: marks.append((time.time() * 1e6, label)))
        snap = torch.cuda.memory._snapshot()
        torch.cuda.memory._record_memory_history(enabled=None)
        tl = cuda_timeline(snap, baseline=held + baseline)
        t0 = tl.pop("t0_us") or 0
        tl["marks"] = [((us - t0) / 1e6, label) for us, label in marks]
    elif timeline:
        sampler = RssSampler(interval_s=2e-3)
        with sampler:
            peaks, loss = h.step(head, pairs, mark=sampler.mark)
        tl = {"t": [s for s, _ in sampler.samples], "bytes": [b - baseline for _, b in sampler.samples],
              "marks": sampler.marks}
    else:
        peaks, loss = h.step(head, pairs)
    ms = (time.perf_counter() - t_start) * 1e3
    step = StepMemory(head=head, pairs=pairs, seq_len=h.config.seq_len, weights_optimizer=held,
                      activations=peaks["activations"] or 0, loss_step=peaks["loss"] or 0, step_peak=peaks["step"] or 0,
                      total_peak=held + (peaks["step"] or 0), ms=ms, loss=loss)
    return step, tl, snap


def _fits(h, head, pairs, baseline, budget, steps, say):
    try:
        step, _, _ = _run_head(h, head, pairs, baseline, say=say)
    except torch.cuda.OutOfMemoryError:
        gc.collect()
        torch.cuda.empty_cache()
        return False, None
    steps.append(step)
    return step.total_peak <= budget, step


def _search(h, head, baseline, config, measured, steps, say):
    """The largest pairs at ``seq_len`` whose step fits the budget: linear fit of two steps, then confirmed."""
    budget = config.budget_gib * (1 << 30)
    pts = {}
    for p in (1, 2):
        s = measured.get(p)
        if s is None:
            ok, s = _fits(h, head, p, baseline, budget, steps, say)
            if s is None:
                return {"pairs": 0, "note": "out of memory at 1 pair"} if p == 1 else {"pairs": 1, "note": "OOM at 2"}
        pts[p] = s
        if p == 1 and s.total_peak > budget:
            return {"pairs": 0, "total_peak": s.total_peak, "note": "1 pair does not fit"}
    slope = max(pts[2].total_peak - pts[1].total_peak, 1)
    guess = int(1 + (budget - pts[1].total_peak) // slope)
    guess = max(1, min(guess, config.max_pairs))
    best = pts[2] if pts[2].total_peak <= budget else pts[1]
    tries = 0
    while guess > best.pairs and tries < 4:
        ok, s = _fits(h, head, guess, baseline, budget, steps, say)
        tries += 1
        if ok:
            best = s
            break
        guess -= max(1, (guess - best.pairs) // 4)
    capped = best.pairs >= config.max_pairs
    return {"pairs": best.pairs, "tokens": 2 * best.pairs * config.seq_len, "total_peak": best.total_peak,
            "note": f"capped at {config.max_pairs} pairs (the search's limit)" if capped else "measured"}


def run_profile(config: ProfileConfig, *, progress=True) -> ProfileReport:
    """Profile both heads; raises BudgetError when neither fits one pair into the budget. With ``progress``, a
    line on stderr says what runs (building the models, each step)."""
    from .run import machine_name

    say = _progress(progress)
    device = torch.device(config.device)
    attention = _attention() if device.type == "cuda" else "sdpa"
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        baseline = torch.cuda.memory_allocated(device)
    else:
        # Pin glibc's allocator (as PeakMeter does) so that the RSS follows the live tensors throughout.
        from .memory import _MEASURE_MMAP, _mallopt

        _mallopt(_MEASURE_MMAP)
        baseline = current_rss() or 0
    h = _build(config, attention, say)
    report = ProfileReport(config=config, attention=h.attention, machine=machine_name(config.device),
                           memory_method=PeakMeter(device).method, params=h.params,
                           date=_dt.datetime.now().isoformat(timespec="seconds"))
    for head in HEADS:
        step, tl, snap = _run_head(h, head, config.pairs, baseline, timeline=True, say=say)
        report.steps.append(step)
        report.timelines[head] = tl
        if snap is not None:
            report.snapshots[head] = snap
        if config.search:
            say(f"{head} head: searching the largest batch within {config.budget_gib:g} GiB")
            report.largest[head] = _search(h, head, baseline, config, {config.pairs: step}, report.steps, say)
    if config.search and all(report.largest[k]["pairs"] == 0 for k in HEADS):
        held = report.step("fastdpo").weights_optimizer / (1 << 30)
        need = min(report.largest[k].get("total_peak", 0) for k in HEADS) / (1 << 30)
        raise BudgetError(f"--budget {config.budget_gib:g} GiB: nothing fits; one pair of {config.seq_len} tokens "
                          f"needs {need:.2f} GiB with fastdpo's head (weights, gradients and optimizer state alone "
                          f"hold {held:.2f} GiB)")
    return report


def _gib(b):
    return f"{b / (1 << 30):.3f}" if b is not None else "-"


def format_report(report: ProfileReport, paths: dict | None = None) -> str:
    c = report.config
    lines = [f"model {c.model}: {c.layers} layers, {report.params / 1e6:.1f}M parameters, "
             f"vocab {c.model_config.get('vocab_size')}, {c.dtype}, attention: {report.attention}"
             + (" (flash-attn not installed)" if report.attention == "sdpa" and c.device == "cuda" else ""),
             f"step: {c.pairs} pair(s) x {c.seq_len} tokens; AdamW; reference model = frozen copy",
             f"device: {report.machine}",
             f"memory: {report.memory_method}", "",
             "GiB                          " + "".join(f"{h:>12}" for h in HEADS)]
    rows = [("weights + optimizer", "weights_optimizer"), ("activations (peak)", "activations"),
            ("loss step (peak)", "loss_step"), ("step peak above start", "step_peak"), ("total peak", "total_peak")]
    for name, attr in rows:
        lines.append(f"{name:<29}" + "".join(f"{_gib(getattr(report.step(h), attr)):>12}" for h in HEADS))
    lines.append(f"{'step time (ms)':<29}" + "".join(f"{report.step(h).ms:>12.0f}" for h in HEADS))
    if report.largest:
        lines.append("")
        lines.append(f"largest batch within {c.budget_gib:g} GiB at {c.seq_len} tokens per sequence:")
        for head in HEADS:
            r = report.largest[head]
            if r["pairs"] == 0:
                lines.append(f"  {head:>8}: nothing fits ({r['note']})")
            else:
                lines.append(f"  {head:>8}: {r['pairs']} pairs x {c.seq_len} = {r['tokens']} tokens, total peak "
                             f"{_gib(r['total_peak'])} GiB ({r['note']})")
    n, f = report.step("naive"), report.step("fastdpo")
    lines.append("")
    lines.append(f"loss step: fastdpo {_gib(f.loss_step)} GiB vs naive {_gib(n.loss_step)} GiB; total peak: "
                 f"{compare_peaks(f.total_peak, n.total_peak)}")
    if paths:
        lines.append(f"chart: {paths.get('png', 'not written (matplotlib not installed)')}")
        lines.append(f"results: {paths['json']}" + (f"; memory snapshots: {', '.join(paths['snapshots'])}"
                                                     if paths.get("snapshots") else ""))
    return "\n".join(lines)


def write_outputs(report: ProfileReport, out_dir: str) -> dict:
    """``profile.json``, ``timeline.png`` and, on GPU, ``memory_snapshot_<head>.pickle``."""
    paths = {"json": os.path.join(out_dir, "profile.json")}
    d = {"config": asdict(report.config), "attention": report.attention, "machine": report.machine,
         "memory_method": report.memory_method, "params": report.params, "date": report.date,
         "steps": [asdict(s) for s in report.steps], "largest": report.largest}
    with open(paths["json"], "w") as f:
        json.dump(d, f, indent=2)
    snaps = []
    for head, snap in report.snapshots.items():
        p = os.path.join(out_dir, f"memory_snapshot_{head}.pickle")
        with open(p, "wb") as f:
            pickle.dump(snap, f)
        snaps.append(p)
    if snaps:
        paths["snapshots"] = snaps
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return paths
    fig, axes = plt.subplots(1, len(HEADS), figsize=(12, 4), sharey=True)
    for ax, head in zip(axes, HEADS):
        tl = report.timelines.get(head) or {"t": [], "bytes": [], "marks": []}
        ax.plot(tl["t"], [b / (1 << 30) for b in tl["bytes"]], color="tab:green" if head == "fastdpo" else "tab:gray")
        for t, label in tl.get("marks", []):
            ax.axvline(t, color="k", lw=0.5, ls=":")
            ax.text(t, ax.get_ylim()[1] * 0.98, label, rotation=90, fontsize=7, va="top")
        ax.set_title(f"{head} head: total peak {_gib(report.step(head).total_peak)} GiB", fontsize=9)
        ax.set_xlabel("seconds into the step")
    axes[0].set_ylabel("memory held (GiB)" if report.config.device == "cuda" else "RSS above start (GiB)")
    c = report.config
    fig.suptitle(f"One DPO training step, {c.model} ({c.layers} layers), {c.pairs} pair(s) x {c.seq_len}, "
                 f"{report.machine}", fontsize=9)
    fig.tight_layout()
    paths["png"] = os.path.join(out_dir, "timeline.png")
    fig.savefig(paths["png"], dpi=110)
    plt.close(fig)
    return paths
