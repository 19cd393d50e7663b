"""``tinyseek pretrain``: next-token pretraining of the MoE transformer on token shards.

One flat loop in the nanochat ``base_train`` style: set-up, then ``while step < steps`` with
"every N steps" blocks (eval, log, checkpoint) around one marked training step. The same code runs
single-process and under ``torchrun`` (DDP or FSDP2, optional gradient compression; see
``tinyseek/train/distributed.py``); ``--parallel`` lays the ranks out on a device mesh
(``tinyseek/train/mesh.py``): the loader reads as the data-parallel coordinate, so ranks that hold
slices of one model replica read the same batch, and the layout is checked before any collective.

What one step does: ``grad_accum`` micro-batches forward/backward (all but the last under
``no_sync``); the per-micro-step expert token counts are summed (and all-reduced across ranks)
and drive the aux-loss-free bias update *before* ``optimizer.step()``; the gradient norm is
clipped; a non-finite loss or gradient norm skips the step (gradients zeroed, no optimizer step,
no bias update, logged, counted in ``skipped_steps``). Under ``--dtype fp16`` the loss is scaled
before backward and the gradients unscaled before clipping; a skipped step lowers the scale, and
the scale is logged as ``loss_scale`` and saved in the checkpoint (``tinyseek/train/precision.py``;
``--fp8 true`` swaps the qualifying linear layers for torchao's float8 ones there too).

Gradient accumulation is exact by design for the cross-entropy: shards are packed, so every
micro-batch holds the same number of target tokens (``batch_size * seq_len``, no ignored
positions) and the mean of the micro-batch means equals the mean over the whole step; the expert
counts are summed, so the bias update equals the one-batch update. The balance (aux) loss is a
*batch statistic* (``f_i * P_i`` over the tokens of one forward): with accumulation the step's aux
term is defined as the mean of the per-micro-batch losses (one k*b batch would compute it over all
k*b tokens, a slightly different statistic). tests/test_pretrain.py checks all three statements.

Data: ``data`` names a shard folder (``tinyseek/data/shards.py``). Left empty, the run builds a
byte-level corpus (UTF-8 bytes, eos 256; the ids of ``tinyseek.tokenizer.byte_tokenizer``) from the
samples shipped in ``tinyseek/data/samples/`` plus generated worked maths problems (see
:func:`fallback_texts`), shuffled with a fixed seed; the last 5% of every document becomes the
held-out split. The model's ``vocab_size`` follows the data's (logged when it changes) and the
data's tokenizer is copied to ``runs/<name>/tokenizer`` for the later stages.

Checkpoints (``tinyseek/train/checkpoint.py``) hold model, optimizer, RNG states, data-loader
position and loop state, so ``--resume`` continues exactly: on CPU a resumed run reproduces the
uninterrupted loss sequence bit for bit (tests/test_pretrain.py kills a real run with SIGKILL).
``--resume`` with no checkpoint in the run dir is an error unless ``--allow-fresh true`` asks for a
fresh start; a fresh start moves an earlier ``metrics.jsonl`` aside (``metrics.<UTC time>.jsonl``),
never deletes it. Every checkpoint's ``meta.json`` records the newest logged train ``loss`` and
held-out ``val_loss`` (with ``loss_step`` / ``val_loss_step``): the final one holds the run's result.
A run in which every step was skipped as non-finite fails (UserError) instead of saving a checkpoint
(under fp16 the first steps may be skipped while the loss scale settles; a run needs one taken step).
Under torchrun each rank's PowerSGD state (error feedback, warm-start factors) is gathered into
``comm.pt`` and restored per parameter, so a resumed PowerSGD run is exact too. The training state
(weights and AdamW moments) goes through torch.distributed.checkpoint (``train_state/``,
``tinyseek/train/dist_ckpt.py``): every rank writes its own shards, nothing is gathered on one
rank, and a resume under any other layout (``--parallel``, world size; one process too) reads it
resharded; rank 0 then reads the one-process weights back into ``model.safetensors`` for the later
stages and tools. A resume under another layout keeps the stream position and the global batch
(the per-rank micro-batch is rescaled). It continues exactly where both layouts compute one
process's step (one process, tp, pp, dp x ep, ...; tests/test_parallel_pretrain.py), not where
plain data parallelism's per-replica balance loss or a restarted PowerSGD state differ.
Checkpoints written before ``train_state/`` existed (an ``optim.pt``) resume in one process or
under DDP / pipeline layouts that keep the one-process parameter order.

Communication: DDP's and FSDP2's gradient bytes are counted every step (``comm_bytes_per_step``);
step 2 and every ``comm_probe_every``-th step after it run under a
:class:`tinyseek.train.comm_meter.CommMeter` that records every collective and P2P op per parallel
dimension (``dp``, ``dp_shard``, ``tp``, ``ep``, ``edp``, ``pp``, ``other``: the busiest rank's
bytes and serialized time, logged as a ``comm_probe`` event and in ``final.json``); that step's time
stays out of ``tokens_per_s``.

MFU counts ``6 * (active non-embedding params) + 6 * layers * heads * (qk_dim + v_dim) * seq_len``
FLOPs per token (the nanochat/PaLM estimate; the attention term ignores causal masking) against
a peak measured once with a large GEMM in the training dtype (or ``peak_flops`` if given).
"""
from __future__ import annotations

import contextlib
import math
import random
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from tinyseek.common import (MetricsLogger, atomic_write_json, autocast_ctx, autocast_dtype, move_aside, print0,
                             seed_everything)
from tinyseek.config import ConfigError, ModelConfig, check_finite, model_cpu_tiny, model_gpu_small, model_micro, to_dict
from tinyseek.data.loader import ShardLoader
from tinyseek.data.shards import TooFewTokens, read_index, write_shards
from tinyseek.data.sources import default_sources
from tinyseek.errors import UserError
from tinyseek.kernels import gemm
from tinyseek.model.transformer import Transformer
from tinyseek.plots import plot_loss
from tinyseek.tokenizer import byte_tokenizer, load_tokenizer
from tinyseek.train import checkpoint as ckpt
from tinyseek.train import comm_meter as CM
from tinyseek.train import dist_ckpt as DC
from tinyseek.train import distributed as D
from tinyseek.train import ep as EP
from tinyseek.train import mesh as M
from tinyseek.train import pp as PP
from tinyseek.train import tp as TP
from tinyseek.train import precision
from tinyseek.train.optim import SCHEDULES, build_optimizer, lr_at, set_lr

BYTE_EOS = 256  # byte-level fallback: ids 0..255 are UTF-8 bytes, 256 ends a document (= byte_tokenizer's eos)
REPO_DIR = Path(__file__).resolve().parents[2]
MAX_BYTE_CORPUS = 16 << 20  # cap the fallback corpus at 16 MB of text


@dataclass
class Config:
    name: str = "pretrain"           # run name; outputs go to runs/<name> unless run_dir is set
    run_dir: str = ""                # output folder; "" -> runs/<name>
    data: str = ""                   # token shard folder (index.json); "" -> byte-level shards built from shipped text
    val_data: str = ""               # held-out shard folder; "" -> <data>/val or a sibling val/ if present, else the tail of data
    model: ModelConfig = field(default_factory=model_micro)  # architecture (vocab_size follows the data)
    steps: int = 60                  # optimizer steps in total (a resumed run continues to this)
    batch_size: int = 8              # sequences per micro-batch per rank (adaptive mode: the upper bound)
    seq_len: int = 64                # tokens per sequence (<= model.max_seq_len)
    grad_accum: int = 1              # micro-batches per optimizer step (ignored in adaptive mode)
    target_tokens_per_step: int = 0  # adaptive mode when > 0: pick micro-batch by memory, then grad_accum to reach this
    memory_fraction: float = 0.7     # adaptive mode: share of free device memory activations may use
    lr: float = 3e-3                 # peak learning rate
    min_lr: float = 3e-4             # final learning rate of the decay
    warmup_steps: int = 5            # linear warmup steps
    schedule: str = "cosine"         # "cosine", "poly" (elastic, see poly_power) or "constant"
    poly_power: float = 1.0          # exponent of the "poly" schedule
    weight_decay: float = 0.1        # AdamW decay on matrices (not norms, biases, embeddings)
    beta1: float = 0.9               # AdamW beta1
    beta2: float = 0.95              # AdamW beta2
    grad_clip: float = 1.0           # max global grad norm; 0 = no clipping (norm still logged)
    dtype: str = "auto"              # "auto" (bf16 autocast on CUDA, fp32 on CPU), "fp32", "bf16", "fp16" (dynamic loss scaling)
    fp8: bool = False                # FP8 linear layers (torchao float8 training; CUDA 8.9+, emulated on CPU)
    device: str = "auto"             # "auto", "cpu", "cuda"
    grad_checkpointing: bool = False  # recompute each block in backward (less memory, ~1/3 more compute)
    ckpt_every: int = 0              # checkpoint every N steps (0 = only at the end)
    keep_last: int = 3               # keep the newest N checkpoints (0 = keep all)
    log_every: int = 5               # metrics.jsonl record every N steps
    eval_every: int = 20             # held-out loss every N steps (0 = only at the end)
    eval_batches: int = 4            # micro-batches per held-out evaluation
    resume: bool = False             # continue from the latest checkpoint in run_dir (none there: an error, see allow_fresh)
    allow_fresh: bool = False        # with resume: start from step 0 when run_dir holds no checkpoint yet (a killed run's restart)
    overwrite: bool = False          # fresh start in a run_dir that has checkpoints: delete them (else an error)
    seed: int = 1337                 # seeds model init and every RNG
    dist_mode: str = "ddp"           # under torchrun without --parallel: "ddp" or "fsdp" (FSDP2) over every rank
    parallel: str = ""               # under torchrun: layout "dp=2,dp_shard=1,tp=1,pp=1,ep=1" (train/mesh.py); "" = dist_mode over every rank
    global_balance: bool = True      # data-parallel MoE: balance loss, capacity, bias update from the global batch's loads (false: each replica's)
    comm_probe_every: int = 100      # under torchrun: meter every collective of step 2 and every N-th after it (bytes and serialized time per parallel dimension, train/comm_meter.py); 0 = never
    compression: str = "none"        # DDP grad compression: none, fp16, bf16, powersgd, powersgd_fp16
    powersgd_rank: int = 2           # PowerSGD rank
    peak_flops: float = 0.0          # per-device peak FLOP/s for MFU; 0 = measure a GEMM once at start
    tensorboard: bool = False        # also write TensorBoard scalars to runs/<name>/tb
    progress: bool = True            # tqdm progress bar on rank 0
    debug_nan_step: int = 0          # testing hook: poison the loss of this step (1-based) with NaN; 0 = off

    def validate(self) -> "Config":
        def need(cond: bool, msg: str) -> None:
            if not cond:
                raise ConfigError(msg)

        check_finite(self)  # lr inf, min_lr nan ...: every step would be skipped as non-finite
        self.model.validate()
        for k in ("steps", "batch_size", "seq_len", "grad_accum", "eval_batches"):
            need(getattr(self, k) >= 1, f"{k} must be >= 1, got {getattr(self, k)}")
        for k in ("target_tokens_per_step", "ckpt_every", "keep_last", "log_every", "eval_every",
                  "warmup_steps", "debug_nan_step", "comm_probe_every"):
            need(getattr(self, k) >= 0, f"{k} must be >= 0, got {getattr(self, k)}")
        need(self.seq_len <= self.model.max_seq_len,
             f"seq_len ({self.seq_len}) exceeds model.max_seq_len ({self.model.max_seq_len})")
        need(self.lr > 0 and 0 <= self.min_lr <= self.lr, f"need lr > 0 and 0 <= min_lr <= lr, got lr={self.lr} min_lr={self.min_lr}")
        need(self.schedule in SCHEDULES, f"schedule must be one of {', '.join(SCHEDULES)}, got {self.schedule!r}")
        need(self.poly_power > 0, f"poly_power must be > 0, got {self.poly_power}")
        need(self.weight_decay >= 0, f"weight_decay must be >= 0, got {self.weight_decay}")
        need(0 <= self.beta1 < 1 and 0 <= self.beta2 < 1, f"beta1/beta2 must be in [0, 1), got {self.beta1}, {self.beta2}")
        need(self.grad_clip >= 0, f"grad_clip must be >= 0, got {self.grad_clip}")
        need(0 < self.memory_fraction <= 1, f"memory_fraction must be in (0, 1], got {self.memory_fraction}")
        need(self.dtype in precision.DTYPES, f"dtype must be auto, fp32, bf16 or fp16, got {self.dtype!r}")
        need(self.device in ("auto", "cpu", "cuda") or self.device.startswith("cuda:"),
             f"device must be auto, cpu or cuda, got {self.device!r}")
        need(self.dist_mode in ("ddp", "fsdp"), f"dist_mode must be 'ddp' or 'fsdp', got {self.dist_mode!r}")
        need(self.compression in ("none", "fp16", "bf16", "powersgd", "powersgd_fp16"),
             f"compression must be none, fp16, bf16, powersgd or powersgd_fp16, got {self.compression!r}")
        need(not (self.dist_mode == "fsdp" and self.compression.startswith("powersgd")),
             "compression powersgd is a DDP hook; with dist_mode fsdp use none, fp16 or bf16")
        need(self.powersgd_rank >= 1, f"powersgd_rank must be >= 1, got {self.powersgd_rank}")
        spec = M.parse_parallel(self.parallel)
        need(spec.dp_shard == 1 or not self.compression.startswith("powersgd"),
             "compression powersgd is a DDP hook; with --parallel dp_shard > 1 use none, fp16 or bf16")
        check_layout(self, D.env_world_size())  # when torchrun told us the world: fail before any collective
        need(self.peak_flops >= 0, f"peak_flops must be >= 0, got {self.peak_flops}")
        need(bool(self.name) and "/" not in self.name, f"name must be a non-empty folder name, got {self.name!r}")
        return self

    @property
    def out_dir(self) -> Path:
        return Path(self.run_dir) if self.run_dir else Path("runs") / self.name


def preset(name: str) -> Config:
    """``micro`` (tests, seconds), ``cpu-tiny`` (2-3 min on 2 cores), ``gpu-small`` (~100M MoE, one H100)."""
    if name == "micro":
        return Config(name="micro", model=model_micro(), steps=60, batch_size=8, seq_len=64, lr=3e-3,
                      min_lr=3e-4, warmup_steps=5, log_every=5, eval_every=20)
    if name == "cpu-tiny":
        # ~0.16 s/step on 2 idle cores (0.26 CPU-s/step single-threaded): 500 steps in ~1.5-2.5 min
        return Config(name="cpu-tiny", model=model_cpu_tiny(), steps=500, batch_size=8, seq_len=256,
                      lr=3e-3, min_lr=3e-4, warmup_steps=25, log_every=10, eval_every=100, ckpt_every=250)
    if name == "gpu-small":
        return Config(name="gpu-small", model=model_gpu_small(), steps=3000, batch_size=32, seq_len=1024,
                      target_tokens_per_step=131072, lr=1.5e-3, min_lr=1.5e-4, warmup_steps=100,
                      log_every=10, eval_every=250, eval_batches=8, ckpt_every=500, keep_last=2)
    raise ConfigError(f"unknown preset {name!r}; choose one of micro, cpu-tiny, gpu-small")


# ---------------------------------------------------------------------------------------------
# data: the byte-level fallback corpus and the held-out split
# ---------------------------------------------------------------------------------------------
def fallback_texts(math_docs: int = 500) -> list[tuple[str, str]]:
    """(name, text) documents for the byte-level fallback corpus, deterministic and shuffled with a
    fixed seed (so every stretch of the stream mixes domains).

    The shipped samples through the data pipeline's readers (``tinyseek.data.sources`` with
    ``use_samples``: Shakespeare, KJV, People's Daily, stdlib code) plus ``math_docs`` generated
    worked maths problems (train split); without samples, this repository's README and Python files.
    """
    docs: list[tuple[str, str]] = []
    for src in default_sources(math_docs=math_docs, use_samples=True):
        docs += [(d.loc, d.text) for d in src.read() if d.text]
    if not docs:
        files = [REPO_DIR / "README.md"] + sorted((REPO_DIR / "tinyseek").rglob("*.py"))
        docs = [(str(p.relative_to(REPO_DIR)), p.read_text(errors="replace")) for p in files if p.is_file()]
    random.Random(0).shuffle(docs)
    out, total = [], 0
    for name, text in docs:
        if total >= MAX_BYTE_CORPUS:
            break
        out.append((name, text))
        total += len(text)
    return out


def split_doc(b: bytes, val_frac: float = 0.05) -> tuple[bytes, bytes]:
    """Train head and held-out tail of one document.

    >>> split_doc(bytes(range(100)))[1] == bytes(range(95, 100))
    True
    """
    cut = len(b) - int(len(b) * val_frac)
    return b[:cut], b[cut:]


def byte_vocab() -> int:
    """Vocabulary of the byte fallback: that of ``tinyseek.tokenizer.byte_tokenizer`` (bytes, eos 256,
    then the chat special tokens, so later stages can fine-tune with them)."""
    return byte_tokenizer().vocab_size


def build_byte_shards(out_dir: str | Path) -> tuple[Path, Path]:
    """Write ``out_dir/train`` and ``out_dir/val`` byte-level shards (eos 256, vocab :func:`byte_vocab`)."""
    out_dir = Path(out_dir)
    train, val = [], []
    for _, text in fallback_texts():
        a, b = split_doc(text.encode("utf-8"))
        train.append(list(a))
        if b:
            val.append(list(b))
    extra = {"tokenizer": "bytes", "source": "byte-level fallback corpus (tinyseek.train.pretrain.fallback_texts)"}
    write_shards(train, out_dir / "train", byte_vocab(), BYTE_EOS, extra=extra)
    write_shards(val, out_dir / "val", byte_vocab(), BYTE_EOS, extra=extra)
    return out_dir / "train", out_dir / "val"


def resolve_data(cfg: Config, run_dir: Path, is_main: bool, barrier) -> tuple[Path, Path | None]:
    """(train shards, held-out shards or None for "use the tail of train")."""
    if not cfg.data:
        root = run_dir / "data"
        if is_main and not ((root / "train" / "index.json").is_file() and (root / "val" / "index.json").is_file()):
            build_byte_shards(root)
        barrier()
        return root / "train", root / "val"
    train = Path(cfg.data)
    read_index(train)  # clear error if missing
    if cfg.val_data:
        read_index(cfg.val_data)
        return train, Path(cfg.val_data)
    for cand in (train / "val", train.parent / "val"):
        if cand != train and (cand / "index.json").is_file():
            return train, cand
    return train, None


def copy_tokenizer(train: Path, index: dict, run_dir: Path) -> str | None:
    """Put the data's tokenizer in ``run_dir/tokenizer`` (where later stages look); returns its path.

    Looked up as ``index["tokenizer"]`` ("bytes" or a path), then ``<data>/tokenizer``,
    ``<data>/../tokenizer``. None when the data names no tokenizer."""
    spec = index.get("tokenizer")
    cands = ([spec] if spec else []) + [str(train / "tokenizer"), str(train.parent / "tokenizer")]
    for c in cands:
        if c == "bytes" or Path(c).exists():
            out = run_dir / "tokenizer"
            load_tokenizer(c).save(out)
            return str(out)
    return None


class HeldOut:
    """Fixed held-out batches: the first ``n`` micro-batches of a val split, or the tail of train."""

    def __init__(self, train: Path, val: Path | None, B: int, T: int, rank: int, world: int, device, n: int):
        self.n, self.start = n, 0
        try:
            if val is None:
                raise TooFewTokens("no val split")
            self.loader = ShardLoader(val, B, T, rank, world, device, shuffle=False)
        except TooFewTokens:  # missing or smaller than one batch: evaluate on the end of the training stream
            # (a damaged val split -- checksum, vocabulary -- is an error, not a reason to fall back)
            self.loader = ShardLoader(train, B, T, rank, world, device, shuffle=False)
            self.start = max(0, self.loader.n_blocks - n * world * B)  # position in blocks of T tokens
        self.source = str(self.loader.path) + ("" if self.start == 0 else
                                               f" (last {(self.loader.n_blocks - self.start) * T} tokens)")

    @torch.no_grad()
    def loss(self, model, amp, pipe: PP.Pipe | None = None) -> float:
        """Mean held-out cross-entropy; with ``pipe`` (pipeline parallelism) through its schedule's
        forward-only pass, the same on every rank."""
        self.loader.load_state_dict({"pos": self.start, "epoch": 0})
        was = model.training
        model.eval()
        tot = 0.0
        for _ in range(self.n):
            x, y = self.loader.next_batch()
            with amp():
                tot += (PP.evaluate(pipe, x, y) if pipe is not None else model(x, y).ce_loss).float().item()
        model.train(was)
        return tot / self.n


# ---------------------------------------------------------------------------------------------
# measurements: peak FLOP/s, FLOPs per token, activation memory, expert load
# ---------------------------------------------------------------------------------------------
_PEAK: dict[tuple, float] = {}


def measure_peak_flops(device: torch.device, dtype: torch.dtype | None) -> float:
    """Best-of-N square GEMM throughput (FLOP/s) in the training dtype; cached; touches no global RNG.
    CPU fp32: the faster of MKL and oneDNN (:func:`tinyseek.kernels.gemm.peak_flops`)."""
    key = (str(device), dtype)
    if key not in _PEAK and device.type == "cpu" and (dtype or torch.float32) is torch.float32:
        _PEAK[key] = gemm.peak_flops()
    if key not in _PEAK:
        dt = dtype or torch.float32
        n, reps = (4096, 10) if device.type == "cuda" else (1024, 5)
        g = torch.Generator(device=device).manual_seed(0)
        a = torch.randn(n, n, device=device, dtype=dt, generator=g)
        b = torch.randn(n, n, device=device, dtype=dt, generator=g)
        best = float("inf")
        for i in range(reps + 1):
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            t0 = time.perf_counter()
            a @ b
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            if i:  # the first call warms up
                best = min(best, time.perf_counter() - t0)
        _PEAK[key] = 2 * n ** 3 / best
    return _PEAK[key]


def flops_per_token(model, seq_len: int) -> float:
    """Training FLOPs per token: 6 x active non-embedding params + attention score/value matmuls."""
    c = model.cfg
    n = model.num_params(active=True) - model.embed.weight.numel()
    if c.tie_embeddings:
        n += model.embed.weight.numel()  # the tied head still does its matmul
    qk, v = ((c.qk_nope_head_dim + c.qk_rope_head_dim, c.v_head_dim) if c.attn == "mla"
             else (c.gqa_head_dim, c.gqa_head_dim))
    ctx = min(seq_len, c.sliding_window) if c.sliding_window else seq_len
    return 6.0 * n + 6.0 * c.n_layers * c.n_heads * (qk + v) * ctx


def activation_bytes(model, seq_len: int, device, amp) -> float:
    """Bytes autograd keeps for one sequence of ``seq_len`` (measured with saved-tensor hooks).

    Parameters saved for backward are not counted. With gradient checkpointing only the block
    inputs are kept, plus one block's activations during its recompute.
    """
    params = {p.data_ptr() for p in model.parameters()}

    def probe(ckpt: bool) -> float:
        seen: dict[int, int] = {}

        def pack(t):
            if t.device.type != "meta" and t.data_ptr() not in params:
                st = t.untyped_storage()
                seen[st.data_ptr()] = st.nbytes()
            return t

        old = model.grad_checkpointing
        model.grad_checkpointing = ckpt
        x = torch.zeros(1, seq_len, dtype=torch.long, device=device)
        try:
            with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), amp():
                out = model(x, x)
            out.loss.backward()
        finally:
            model.grad_checkpointing = old
            model.zero_grad(set_to_none=True)
        return float(sum(seen.values()))

    full = probe(False)
    if not model.grad_checkpointing:
        return full
    return probe(True) + full / model.cfg.n_layers


def free_memory_bytes(device: torch.device) -> float:
    """Free device memory: CUDA from the driver, CPU from /proc/meminfo MemAvailable (else 4 GiB)."""
    if device.type == "cuda":
        return float(torch.cuda.mem_get_info(device)[0])
    with contextlib.suppress(OSError, ValueError, IndexError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return float(line.split()[1]) * 1024
    return float(4 << 30)


def choose_accum(target_tokens: int, max_micro: int, seq_len: int, world: int, per_seq_bytes: float,
                 budget_bytes: float) -> tuple[int, int]:
    """Adaptive mode: the largest power-of-two micro-batch <= ``max_micro`` whose activations fit the
    budget (and that does not overshoot the target), then enough accumulation to reach the target.

    >>> choose_accum(8192, 16, 256, 1, per_seq_bytes=1e6, budget_bytes=4.5e6)   # 4 fit in memory
    (4, 8)
    >>> choose_accum(1000, 64, 100, 2, per_seq_bytes=1.0, budget_bytes=1e9)     # 5 seqs/rank needed
    (4, 2)
    """
    need_seqs = max(1, math.ceil(target_tokens / (seq_len * world)))
    micro = 1
    while micro * 2 <= min(max_micro, need_seqs) and micro * 2 * per_seq_bytes <= budget_bytes:
        micro *= 2
    accum = math.ceil(target_tokens / (micro * seq_len * world))
    return micro, accum


def expert_stats(counts_LE: torch.Tensor, dropped_L: torch.Tensor | None) -> dict[str, Any]:
    """Per MoE layer: load fractions, max/mean load ratio, dropped assignments.

    >>> s = expert_stats(torch.tensor([[3.0, 1.0], [2.0, 2.0]]), torch.tensor([0, 1]))
    >>> s["load_frac"], s["load_max_mean"], s["dropped"]
    ([[0.75, 0.25], [0.5, 0.5]], [1.5, 1.0], [0, 1])
    """
    c = counts_LE.double()
    frac = c / c.sum(-1, keepdim=True).clamp_min(1)
    ratio = c.max(-1).values / c.mean(-1).clamp_min(1e-12)
    return {"load_frac": [[round(v, 4) for v in row] for row in frac.tolist()],
            "load_max_mean": [round(v, 4) for v in ratio.tolist()],
            "load_max_mean_worst": round(float(ratio.max()), 4),
            "dropped": [int(d) for d in dropped_L.tolist()] if dropped_L is not None else []}


# ---------------------------------------------------------------------------------------------
# the accumulated forward/backward of one optimizer step
# ---------------------------------------------------------------------------------------------
def forward_backward(wrapped, next_batch, accum: int, amp=contextlib.nullcontext, no_sync=contextlib.nullcontext,
                     poison: bool = False, scaler: precision.LossScaler | None = None) -> dict[str, Any]:
    """Run ``accum`` micro-batches forward and backward, accumulating gradients in ``.grad``.

    Each micro-batch loss is divided by ``accum``: every packed micro-batch has the same number of
    target tokens, so the summed gradient equals the gradient of the mean loss over the whole step.
    All micro-batches but the last run under ``no_sync()`` (DDP/FSDP skip their gradient
    communication). Returns the step's mean ``loss`` / ``ce_loss`` / ``aux_loss`` (detached), the
    summed expert token ``counts`` (n_moe_layers, E) and ``dropped`` assignments (or None for a
    dense model). ``poison`` multiplies the first micro-batch loss by NaN (the NaN-skip test hook).
    ``scaler`` (fp16) scales what is backpropagated, so ``.grad`` holds scaled gradients until
    ``scaler.unscale_``; the returned losses are unscaled.
    """
    loss_sum = ce_sum = aux_sum = 0.0
    counts = dropped = None
    for m in range(accum):
        x, y = next_batch()
        with (contextlib.nullcontext() if m == accum - 1 else no_sync()):
            with amp():
                out = wrapped(x, y)
            loss = out.loss / accum
            if poison and m == 0:
                loss = loss * float("nan")
            (loss if scaler is None else scaler.scale(loss)).backward()
        loss_sum = loss_sum + loss.detach().float()
        ce_sum = ce_sum + out.ce_loss.detach().float() / accum
        aux_sum = aux_sum + out.aux_loss.detach().float() / accum
        if out.expert_counts is not None:
            c = out.expert_counts.float()
            counts = c if counts is None else counts + c
            dropped = out.dropped if dropped is None else dropped + out.dropped
    return {"loss": loss_sum, "ce_loss": ce_sum, "aux_loss": aux_sum, "counts": counts, "dropped": dropped}

TRAIN_STATE = "train_state"  # a checkpoint's torch.distributed.checkpoint folder (weights + optimizer, any layout)


def probe_step(step: int, every: int) -> bool:
    """Whether 1-based ``step`` is a communication probe: step 2 (the first after the pipeline's shape
    set-up and the allocators' warm-up), then every ``every``-th; never when ``every`` is 0.

    >>> [s for s in range(1, 12) if probe_step(s, 4)], probe_step(2, 0)
    ([2, 6, 10], False)
    """
    return every > 0 and step >= 2 and (step - 2) % every == 0


def busiest(by_dim: dict[str, dict], device) -> dict[str, dict]:
    """:meth:`CommMeter.by_dim` of this rank -> the maximum over all ranks of each dimension's bytes,
    time and calls (a collective: every rank calls it with its own probe), dimensions in
    :data:`tinyseek.train.comm_meter.DIMS_REPORTED` order, those without traffic anywhere left out."""
    dims = CM.DIMS_REPORTED
    t = torch.tensor([[float(by_dim.get(d, {}).get(k, 0)) for k in ("bytes", "time_s", "calls")] for d in dims],
                     dtype=torch.float64, device=device)
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
    return {d: {"bytes": int(b), "time_s": round(ts, 6), "calls": int(c)}
            for d, (b, ts, c) in zip(dims, t.tolist()) if c > 0}


def resumed_geometry(meta: dict, dp_world: int) -> tuple[int, int]:
    """``(micro_batch per rank, grad_accum)`` that continue a checkpoint's global batch under
    ``dp_world`` data-parallel replicas (the layout may differ from the one that wrote it: the
    checkpoint's replicas are ``meta["parallel"]``'s, else its world size). One-line UserError when
    the global micro-batch does not split over ``dp_world``.

    >>> resumed_geometry({"micro_batch": 4, "grad_accum": 2, "parallel": "dp=2,ep=2"}, 1)
    (8, 2)
    """
    micro, accum = int(meta["micro_batch"]), int(meta["grad_accum"])
    old = M.parse_parallel(meta["parallel"]).dp_world if meta.get("parallel") else int(meta.get("world_size", 1))
    if (micro * old) % dp_world:
        raise UserError(f"--resume: the checkpoint's {micro * old} sequences a micro-step ({micro} x {old} "
                        f"data-parallel ranks) do not split over {dp_world} data-parallel ranks")
    return micro * old // dp_world, accum


def pipeline_forward_backward(model, pipe: PP.Pipe, next_batch, accum: int, amp=contextlib.nullcontext,
                              scaler: precision.LossScaler | None = None) -> dict[str, Any]:
    """:func:`forward_backward`'s contract for one pipeline stage: the step's ``accum`` micro-batches
    go through the schedule (``tinyseek/train/pp.py``: the loss and gradients of one process running
    ``forward_backward`` over them), and ``counts`` / ``dropped`` come back for *every* MoE layer of
    the model (this stage's rows filled, summed over the pipeline group), so the bias update and the
    logged loads are one process's on every rank."""
    xs, ys = zip(*(next_batch() for _ in range(accum)))
    with amp():
        out = PP.step(pipe, torch.cat(xs), torch.cat(ys), scaler.get_scale() if scaler is not None else 1.0)
    counts = dropped = None
    if model.moe_layers:
        rows = {id(m): i for i, m in enumerate(model.moe_layers)}
        counts = torch.zeros(len(rows), model.cfg.n_routed_experts, device=out["loss"].device)
        dropped = torch.zeros(len(rows), dtype=torch.long, device=out["loss"].device)
        for stage, c, d in zip(pipe.stages, out["counts"], out["dropped"]):
            if c is not None:
                idx = torch.tensor([rows[id(m)] for m in stage.moe_layers], device=counts.device)
                counts.index_copy_(0, idx, c.to(counts.dtype))
                dropped.index_copy_(0, idx, d.to(dropped.dtype))
        torch.distributed.all_reduce(counts, group=pipe.group)
        torch.distributed.all_reduce(dropped, group=pipe.group)
    return {"loss": out["loss"], "ce_loss": out["ce_loss"], "aux_loss": out["aux_loss"], "counts": counts,
            "dropped": dropped}


# ---------------------------------------------------------------------------------------------
# distributed (tinyseek/train/distributed.py; a world of one passes through it untouched)
# ---------------------------------------------------------------------------------------------
def _gather_comm_states(wrapped, cfg: Config, world: int) -> list | None:
    """Every rank's gradient-compression state (PowerSGD keeps local error feedback), gathered
    on rank 0 for the checkpoint; None when the run compresses without state."""
    if world < 2 or not cfg.compression.startswith("powersgd"):
        return None
    mine = D.comm_state_dict(wrapped)
    out = [None] * world if torch.distributed.get_rank() == 0 else None
    torch.distributed.gather_object(mine, out, dst=0)
    return out


def _restore_comm_state(wrapped, resume_dir: Path, rank: int, world: int) -> None:
    path = resume_dir / "comm.pt"
    if world < 2 or not path.is_file():
        return
    states = ckpt.load_torch(path, numpy_ok=True)  # numpy_ok: PowerSGD state written before it was stored as lists
    if not isinstance(states, list):
        raise ckpt.damaged(path, "not a list of per-rank states")
    if len(states) != world:
        print0(f"note: {path} holds PowerSGD state for {len(states)} ranks, this run has {world}: it restarts")
        return
    D.load_comm_state_dict(wrapped, states[rank])


# ---------------------------------------------------------------------------------------------
# main
# ---------------------------------------------------------------------------------------------
def main(cfg: Config) -> dict:
    cfg.validate()
    dist = D.init_distributed(cfg.device)
    rank, world = (dist.rank, dist.world_size) if dist else (0, 1)
    is_main = rank == 0
    device = dist.device if dist else (torch.device("cuda" if torch.cuda.is_available() else "cpu")
                                        if cfg.device == "auto" else torch.device(cfg.device))
    barrier = (lambda: D.barrier(dist)) if dist else (lambda: None)
    try:
        spec = check_layout(cfg, world)  # again, now that the process group knows the world
        return _train(cfg, dist, spec, rank, world, is_main, device, barrier)
    finally:
        D.cleanup(dist)


def check_layout(cfg: Config, world: int) -> M.ParallelSpec:
    """The run's parallel layout (``--parallel``, else ``--dist-mode`` over every rank), checked
    against ``world`` processes and the model: a one-line ConfigError, raised before any collective."""
    spec = M.resolve(cfg.parallel, world, cfg.dist_mode).validate(world, cfg.model)
    if spec.pp > 1:
        bad = [(cfg.model.tie_embeddings, "untied embeddings (--model.tie-embeddings false)"),
               (cfg.debug_nan_step > 0, "--debug-nan-step 0"),
               (cfg.compression != "none", "--compression none"),
               (cfg.batch_size % cfg.grad_accum, f"--batch-size divisible by --grad-accum (held-out batches "
                                                 "are cut into grad_accum micro-batches)"),
               (cfg.target_tokens_per_step > 0, "--target-tokens-per-step 0"),
               (cfg.grad_accum < spec.pp, f"--grad-accum >= {spec.pp} (1F1B runs at least one micro-batch a stage; "
                                          f"got {cfg.grad_accum})")]
        for cond, need in bad:
            if cond:
                raise ConfigError(f"--parallel pp={spec.pp} needs {need}")
    if spec.tp > 1 and cfg.fp8:
        raise ConfigError(f"--fp8 with --parallel tp={spec.tp} is not supported (float8 layers are not sharded)")
    if spec.tp > 1 and cfg.compression != "none":
        raise ConfigError(f"--compression {cfg.compression} is a data-parallel hook; with --parallel tp={spec.tp} "
                          "use --compression none")
    return spec


def parallel_setup(cfg: Config, spec: M.ParallelSpec, dist) -> tuple[Any, Any, str, Any]:
    """``(mesh or None, data-parallel mesh or None, wrapper mode, data-parallel group or None)``.

    Without ``--parallel`` (or in a world of one) no mesh is built: today's DDP / FSDP2 over every
    rank. With it, the 4-D mesh of ``spec``; the data-parallel wrapper: ``dp`` alone -> DDP over
    ``mesh["dp"]``; ``dp_shard`` -> FSDP2 over ``mesh["dp_shard"]``; both, or ``dp`` with ``tp``
    (DDP does not take DTensor parameters) -> FSDP2 over ``mesh["dp", "dp_shard"]`` (HSDP:
    replicated over dp, sharded over dp_shard).
    """
    if not cfg.parallel.strip() or not dist.enabled:
        return None, None, cfg.dist_mode, None
    mesh = M.build_mesh(spec, dist.device.type)
    if spec.dp_shard == 1 and spec.tp == 1:
        return mesh, mesh["dp"], "ddp", M.dp_group(mesh, spec)
    hsdp = spec.dp > 1 and (spec.dp_shard > 1 or spec.tp > 1)
    dims = ("dp", "dp_shard") if hsdp else ("dp_shard",)
    return mesh, mesh[dims], "fsdp", M.dp_group(mesh, spec)


def _train(cfg: Config, dist, spec: M.ParallelSpec, rank: int, world: int, is_main: bool, device: torch.device,
           barrier) -> dict:
    amp_dtype = autocast_dtype(cfg.dtype, device)
    amp = lambda: autocast_ctx(device, amp_dtype)  # noqa: E731
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    run_dir = cfg.out_dir
    ckpt_root = run_dir / "ckpt"
    if is_main:
        run_dir.mkdir(parents=True, exist_ok=True)

    # ---- data -> model vocabulary ------------------------------------------------------------
    train_path, val_path = resolve_data(cfg, run_dir, is_main, barrier)
    index = read_index(train_path)
    if cfg.model.vocab_size != index["vocab_size"]:
        print0(f"model.vocab_size {cfg.model.vocab_size} -> {index['vocab_size']} (from {train_path})")
        cfg.model.vocab_size = int(index["vocab_size"])

    # ---- resume point --------------------------------------------------------------------------
    resume_dir = ckpt.latest_checkpoint(ckpt_root) if cfg.resume else None
    if cfg.resume and resume_dir is None and not cfg.allow_fresh:
        raise UserError(f"--resume: no complete checkpoint in {ckpt_root}: drop --resume to start from step 0 "
                        "(or pass --allow-fresh true to start fresh whenever none exists)")
    if resume_dir is not None:
        newer = sorted(d.name for d in ckpt_root.iterdir() if ckpt.STEP_RE.match(d.name) and d.is_dir()
                       and int(ckpt.STEP_RE.match(d.name).group(1)) > int(ckpt.STEP_RE.match(resume_dir.name).group(1)))
        if newer:
            print0(f"note: {', '.join(newer)} in {ckpt_root} lack a readable meta.json or weights file: "
                   f"resuming from {resume_dir.name}")
    if not cfg.resume and ckpt.latest_checkpoint(ckpt_root) is not None:
        if not cfg.overwrite:
            raise UserError(f"{run_dir} already holds checkpoints: pass --resume to continue, --overwrite to start "
                            "over, or choose another --name")
        barrier()
        if is_main:
            shutil.rmtree(ckpt_root)
    if is_main and ckpt_root.is_dir():
        ckpt.remove_partial(ckpt_root)  # temp dirs of a writer killed mid-checkpoint
    meta: dict = ckpt.read_meta(resume_dir) if resume_dir else {}
    if resume_dir and meta.get("model_config") != to_dict(cfg.model):
        raise UserError(f"--resume: the model config differs from the checkpoint in {resume_dir}")
    tokenizer_dir = copy_tokenizer(train_path, index, run_dir) if is_main else None
    if is_main:
        atomic_write_json(run_dir / "config.json", to_dict(cfg))

    # ---- model ------------------------------------------------------------------------------------
    seed_everything(cfg.seed)  # same init on every rank
    model = Transformer(cfg.model)
    if resume_dir:
        ckpt.load_state_strict(model, ckpt.load_weights(resume_dir / "model.safetensors"), resume_dir / "model.safetensors")
    model.to(device)
    if cfg.fp8:  # before wrapping and the optimizer (the parameters stay the same objects)
        print0(f"fp8: {len(precision.convert_fp8(model, device))} linear layers in float8")
    model.grad_checkpointing = cfg.grad_checkpointing
    model.train()
    # the whole model's sizes, before any parallel layout splits it (EP keeps E/ep experts a rank, TP
    # DTensor shards, PP one stage): MFU is the whole model's FLOPs on the world's tokens
    n_params, n_active = model.num_params(), model.num_params(active=True)
    fpt = flops_per_token(model, cfg.seq_len)

    # ---- device mesh: the loader reads as data-parallel rank dp_rank of dp_world -------------------
    mesh, dp_mesh, mode, dp_group = parallel_setup(cfg, spec, dist)
    dp_rank, dp_world = spec.dp_rank(rank), spec.dp_world

    # ---- batch geometry (adaptive: choose micro-batch from measured memory) --------------------
    micro, accum = cfg.batch_size, cfg.grad_accum
    if "micro_batch" in meta:  # a resumed run keeps the global batch it started with (exact resume)
        micro, accum = resumed_geometry(meta, dp_world)
    elif cfg.target_tokens_per_step > 0:
        per_seq = activation_bytes(model, cfg.seq_len, device, amp) * 1.3  # + temporaries
        state_bytes = sum(p.numel() * p.element_size() for p in model.parameters()) * 3  # grads + Adam m, v
        budget = free_memory_bytes(device) * cfg.memory_fraction - state_bytes
        if dist is not None and dist.enabled:  # every rank must agree on the geometry
            t = torch.tensor([budget], dtype=torch.float64, device=device)
            torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MIN)
            budget = float(t.item())
        micro, accum = choose_accum(cfg.target_tokens_per_step, cfg.batch_size, cfg.seq_len, dp_world, per_seq, budget)
        print0(f"adaptive batch: {per_seq / 2**20:.1f} MiB activations/sequence, budget {budget / 2**30:.2f} GiB "
               f"-> micro_batch {micro} x grad_accum {accum} x data-parallel {dp_world} x seq {cfg.seq_len} "
               f"= {micro * accum * dp_world * cfg.seq_len} tokens/step (target {cfg.target_tokens_per_step})")
    tokens_per_step = micro * accum * dp_world * cfg.seq_len

    # ---- parallel wrapper, optimizer ------------------------------------------------------------
    # order: tensor parallelism (DTensor shards over mesh["tp"]), expert parallelism (routed experts
    # split over the EP group), the pipeline cut (this rank's stage), then data parallelism over the
    # data-parallel dims of what this rank trains (the model, or its stage)
    if spec.tp > 1:
        TP.apply_tp(model, mesh["tp"])
    experts, ep_group, edp_group = {}, None, None
    if spec.ep > 1:  # routed experts split over the EP group, load statistics over the data-parallel group
        ep_group, edp_group = M.ep_group(mesh, spec), M.expert_dp_group(mesh, spec)
        EP.apply_ep(model, ep_group, load_group=dp_group)
        experts = EP.expert_parameters(model)  # left out of DDP / FSDP2; averaged over edp_group in the step
    # the MoE load statistics of the whole data-parallel batch on every replica (collectives in each MoE
    # forward): counts, drops, capacity and balance loss are one process's, summed over dp no more
    global_load = spec.ep > 1 or (cfg.global_balance and dist.enabled and dp_world > 1 and bool(model.moe_layers))
    if global_load and spec.ep == 1:
        EP.share_load(model, dp_group)  # dp_group None: every rank (no --parallel)
    pipe, trained = None, model  # pipeline parallelism: this rank's stage, grad_accum micro-batches through 1F1B
    if spec.pp > 1:
        trained = PP.split_model(model, mesh["pp"].get_local_rank(), spec.pp)
        mine = {n for n, _ in trained.named_parameters()}
        experts = {n: p for n, p in experts.items() if n in mine}  # the stage's layers' experts
        pipe = PP.build_schedule(trained, mesh, accum)
    # gradients averaged by hand after backward: (parameters, process group) pairs
    grad_sync = [(list(experts.values()), edp_group)]  # ep < dp: the replicas of the same experts
    if pipe is None or spec.dp_shard > 1:  # DDP, or FSDP2 (HSDP over dp x dp_shard; over TP's DTensors)
        wrapped, comm = D.wrap_model(trained, dist, mode=mode, compression=cfg.compression,
                                     powersgd_rank=cfg.powersgd_rank, dp_mesh=dp_mesh, local_params=tuple(experts))
    else:  # a pipeline stage replicated over dp: its gradients averaged over the dp group in the step
        wrapped, comm = trained, D.CommStats(spec.dp)
        if spec.dp > 1:
            split = {id(p) for p in experts.values()}
            grad_sync.append(([p for p in trained.parameters() if id(p) not in split], dp_group))
    # communication probes: every process group of the layout named by its parallel dimension
    if mesh is not None:
        comm_groups = CM.dim_groups(mesh, spec, {"dp": dp_group, "ep": ep_group, "edp": edp_group})
    elif dist.enabled:
        comm_groups = {CM.group_name(torch.distributed.group.WORLD): "dp_shard" if mode == "fsdp" else "dp"}
    probe_every = cfg.comm_probe_every if dist.enabled else 0
    # DTensor parameters (FSDP2 shards, TP shards): gathered state dicts, foreach AdamW
    sharded = bool(dist and dist.enabled and (mode == "fsdp" or spec.tp > 1))
    opt = build_optimizer(model, cfg.lr, cfg.weight_decay, (cfg.beta1, cfg.beta2), fused=False if sharded else None)
    loader = ShardLoader(train_path, micro, cfg.seq_len, dp_rank, dp_world, device, seed=cfg.seed)
    heldout = HeldOut(train_path, val_path, micro, cfg.seq_len, dp_rank, dp_world, device, cfg.eval_batches)

    step, skipped, tokens_seen = 0, 0, 0
    scaler = precision.loss_scaler(amp_dtype, device)  # fp16: dynamic loss scaling; else a pass-through
    logger = MetricsLogger(run_dir / "metrics.jsonl", tensorboard=cfg.tensorboard, enabled=is_main)
    if resume_dir:
        if (resume_dir / TRAIN_STATE).is_dir():  # whatever layout wrote it, resharded into this one (a collective)
            DC.load(resume_dir / TRAIN_STATE, trained if pipe is not None else wrapped, opt, spec, device.type)
        elif sharded or experts:
            raise UserError(f"--resume: {resume_dir} was written before distributed checkpoints (optim.pt, no "
                            f"{TRAIN_STATE}/): resume it in one process or with --parallel dp=N once, which writes "
                            "checkpoints any layout resumes")
        else:  # an integer-keyed optim.pt over the one-process parameter order (DDP and pipeline stages keep it)
            ckpt.load_optimizer(opt, ckpt.load_optim_state(resume_dir, map_location=device), resume_dir / "optim.pt")
        try:
            loader.load_state_dict(meta["loader"])
            step, skipped, tokens_seen = int(meta["step"]), int(meta["skipped_steps"]), int(meta["tokens_seen"])
        except (KeyError, TypeError, ValueError) as e:
            raise ckpt.damaged(resume_dir / "meta.json", f"no usable loop state: {type(e).__name__} {e}") from None
        rng = ckpt.load_rng_state(resume_dir)
        if rng is None:
            raise UserError(f"checkpoint {resume_dir} has no rng.pt: cannot resume exactly from it")
        _restore_comm_state(wrapped, resume_dir, rank, world)
        precision.load_scaler_state(scaler, meta.get("grad_scaler"), resume_dir / "meta.json")
        logger.truncate_after(step)
        print0(f"resumed from {resume_dir} at step {step}")
    elif is_main and logger.path.exists():
        moved = move_aside(logger.path)  # a fresh run starts a fresh curve; the old one is kept
        print0(f"note: fresh start: the earlier {logger.path.name} was moved to {moved}")
    if resume_dir:
        ckpt.restore_rng_state(rng, resume_dir)
    else:
        seed_everything(cfg.seed + rank)
        logger.log(0, event="start", micro_batch=micro, grad_accum=accum, world_size=world, parallel=str(spec),
                   seq_len=cfg.seq_len,
                   tokens_per_step=tokens_per_step, adaptive=cfg.target_tokens_per_step > 0)

    # on CPU, autocast's fp16/bf16 GEMMs are emulated (slower than fp32, and timing fp16 took ~40 s):
    # MFU there is measured against the fp32 peak
    peak = cfg.peak_flops or measure_peak_flops(device, amp_dtype if device.type == "cuda" else None)
    print0(f"model: {n_params / 1e6:.2f}M params ({n_active / 1e6:.2f}M active), {fpt / 1e6:.1f} MFLOP/token, "
           f"peak {peak / 1e9:.1f} GFLOP/s/device | data {train_path} ({loader.n_tokens:,} tokens), "
           f"held-out {heldout.source} | {tokens_per_step:,} tokens/step = {micro} x {accum} x {dp_world} x {cfg.seq_len}"
           + (f" | --parallel {spec}" if dist.enabled else ""))

    def save(step_now: int) -> Path | None:
        if ok_steps == 0:  # the same on every rank (loss and grad norm are global)
            raise UserError(f"all {step_now - start_step} steps of this run were skipped (non-finite loss or gradient "
                            f"norm, see {logger.path}): nothing was learned and no checkpoint was written; check --lr "
                            "and the --model.* settings")
        # the training state (weights, AdamW moments) through torch.distributed.checkpoint: every rank writes
        # its own shards into a temp folder all ranks name alike (a collective); rank 0 then reads the
        # one-process weights back for model.safetensors and moves the folder into the atomic step folder
        staging = ckpt_root / f".tmp-{ckpt.step_dir(ckpt_root, step_now).name}-dcp"
        if is_main:
            shutil.rmtree(staging, ignore_errors=True)  # an earlier writer's, killed mid-save
            ckpt_root.mkdir(parents=True, exist_ok=True)
        barrier()
        DC.save(staging, trained if pipe is not None else wrapped, opt, spec, device.type)
        comm_states = _gather_comm_states(wrapped, cfg, world)  # collective under PowerSGD
        path = None
        if is_main:
            msd = model.state_dict() if not dist.enabled else DC.load_full_model_state(staging, cfg.model)
            meta_out = {"step": step_now, "model_config": to_dict(cfg.model), "train_config": to_dict(cfg),
                        "loader": loader.state_dict(), "skipped_steps": skipped, "tokens_seen": tokens_seen,
                        "micro_batch": micro, "grad_accum": accum, "world_size": world, "parallel": str(spec),
                        "grad_scaler": precision.scaler_state(scaler),
                        "data": str(train_path), "tokenizer": tokenizer_dir, "time": time.time(),
                        # the newest logged train loss and held-out loss (the final checkpoint's are the run's)
                        "loss": last.get("loss"), "loss_step": last_loss_step,
                        "val_loss": val_loss, "val_loss_step": val_loss_step}
            path = ckpt.save_checkpoint(ckpt_root, step_now, None, None, meta_out, model_state=msd,
                                        extra={"comm.pt": comm_states} if comm_states else None,
                                        dirs={TRAIN_STATE: staging})
            ckpt.prune_checkpoints(ckpt_root, cfg.keep_last)
        barrier()
        return path

    bar = None
    if is_main and cfg.progress:
        bar = tqdm(total=cfg.steps, initial=step, desc=cfg.name, dynamic_ncols=True, mininterval=0.5, file=sys.stderr)
    n_moe = len(model.moe_layers)
    win_counts = torch.zeros(n_moe, cfg.model.n_routed_experts, device=device) if n_moe else None
    win_dropped = torch.zeros(n_moe, dtype=torch.long, device=device) if n_moe else None
    win_tokens, win_time, win_comm, win_comm_raw, win_steps = 0, 0.0, 0, 0, 0
    last: dict[str, Any] = {}
    last_comm: dict[str, dict] = {}
    val_loss, val_loss_step, last_loss_step = None, None, None
    start_step, ok_steps = step, 0
    eval_model = wrapped if sharded else model  # FSDP2 needs the sharded module; DDP's forward is not needed
    t_start = time.time()

    while step < cfg.steps:
        # ======== one training step =====================================================================
        t0 = time.perf_counter()
        lr = lr_at(cfg.schedule, step, cfg.steps, cfg.warmup_steps, cfg.lr, cfg.min_lr, cfg.poly_power)
        set_lr(opt, lr)
        poison = bool(cfg.debug_nan_step) and step + 1 == cfg.debug_nan_step
        sync_off = lambda: D.no_sync(wrapped, mode)  # noqa: E731
        probe = probe_step(step + 1, probe_every)  # the same step on every rank
        with CM.CommMeter(comm_groups) if probe else contextlib.nullcontext() as meter:
            fb = (pipeline_forward_backward(model, pipe, loader.next_batch, accum, amp, scaler) if pipe is not None
                  else forward_backward(wrapped, loader.next_batch, accum, amp, sync_off, poison, scaler))
            losses = torch.stack([fb["loss"], fb["ce_loss"], fb["aux_loss"]])
            if dist.enabled:
                D.all_reduce_mean_(losses, dist)  # every rank sees the same (possibly non-finite) loss
            counts, dropped = fb["counts"], fb["dropped"]
            scaler.unscale_(opt)  # fp16: clip (and check) the true gradients
            for params, group in grad_sync:  # what no wrapper reduces (rank-local experts, pipeline stages)
                D.all_reduce_grads_mean_(params, group, comm)
            max_norm = cfg.grad_clip if cfg.grad_clip > 0 else float("inf")
            grad_norm = (pipe.clip_grad_norm_(max_norm, experts.values(), ep_group) if pipe is not None else
                         D.clip_grad_norm_(model.parameters(), max_norm, experts.values(), ep_group))
        if hasattr(grad_norm, "full_tensor"):
            grad_norm = grad_norm.full_tensor()
        (loss_val, ce_val, aux_val), gnorm_val = losses.tolist(), float(grad_norm)
        ok = math.isfinite(loss_val) and math.isfinite(gnorm_val)
        if ok:
            if n_moe:
                if dist.enabled and not global_load:  # (shared load scopes count over the whole batch already)
                    D.all_reduce_sum_(counts, dist, dp_group)  # each replica's batch once
                    D.all_reduce_sum_(dropped, dist, dp_group)
                model.update_expert_bias(counts)  # aux-loss-free balancing, before the optimizer step
            scaler.step(opt)  # opt.step() (the gradients are unscaled and finite)
            ok_steps += 1
        else:
            skipped += 1
            scale_note = {"loss_scale": scaler.get_scale()} if scaler.is_enabled() else {}
            logger.log(step + 1, event="skipped_nonfinite", bad_loss=repr(loss_val), bad_grad_norm=repr(gnorm_val),
                       skipped_steps=skipped, **scale_note)
            backoff = (f"; loss scale {scaler.get_scale():g} -> {scaler.get_scale() * scaler.get_backoff_factor():g}"
                       if scale_note else "")
            print0(f"step {step + 1}: non-finite loss {loss_val} / grad norm {gnorm_val}: step skipped "
                   f"({skipped} so far{backoff})")
        precision.update_scale(scaler, skipped=not ok)  # fp16: back off after a skip, grow after a finite run
        opt.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        dt = time.perf_counter() - t0
        step += 1
        tokens_seen += tokens_per_step
        # ======== end of the training step ==============================================================

        if probe:  # the busiest rank's bytes and serialized time per dimension; the step's time stays out of
            # the throughput window (its collectives ran one at a time) unless the window has no other step
            last_comm = busiest(meter.by_dim(), device)
            logger.log(step, event="comm_probe", step_time_s=round(dt, 4),
                       **{f"comm/{d}/{k}": v for d, row in last_comm.items() for k, v in row.items()})
        if not probe or (win_steps == 0 and (cfg.log_every == 0 or step % cfg.log_every == 0 or step == cfg.steps)):
            win_tokens += tokens_per_step
            win_time += dt
            win_steps += 1
        if n_moe and ok:
            win_counts += counts
            win_dropped += dropped
        if comm is not None:
            c = comm.take()
            win_comm += c["bytes"]
            win_comm_raw += c["raw_bytes"]
        if bar is not None:
            bar.update(1)
            if ok:
                bar.set_postfix(loss=f"{loss_val:.3f}", lr=f"{lr:.2e}", refresh=False)

        # -------- every log_every steps: metrics --------------------------------------------------------
        if ok and ((cfg.log_every and step % cfg.log_every == 0) or step == cfg.steps):
            tps = win_tokens / max(win_time, 1e-9)
            win_steps = max(win_steps, 1)
            rec: dict[str, Any] = {"loss": loss_val, "ce_loss": ce_val, "aux_loss": aux_val, "lr": lr,
                                   "grad_norm": gnorm_val, "tokens_per_s": round(tps, 1),
                                   "mfu": round(fpt * tps / (peak * world), 5), "tokens_seen": tokens_seen,
                                   "skipped_steps": skipped, "step_time_s": round(win_time / win_steps, 4)}
            if scaler.is_enabled():
                rec["loss_scale"] = scaler.get_scale()
            if n_moe and win_counts.sum() > 0:
                rec.update(expert_stats(win_counts.cpu(), win_dropped.cpu()))
            if dist is not None and dist.enabled:
                rec.update(comm_bytes_per_step=win_comm // win_steps, comm_raw_bytes_per_step=win_comm_raw // win_steps,
                           comm_ratio=round(win_comm / max(win_comm_raw, 1), 4))
            logger.log(step, **rec)
            last.update(rec)
            last_loss_step = step
            if n_moe:
                win_counts.zero_()
                win_dropped.zero_()
            win_tokens, win_time, win_comm, win_comm_raw, win_steps = 0, 0.0, 0, 0, 0

        # -------- every eval_every steps (and at the end): held-out loss --------------------------------
        if (cfg.eval_every and step % cfg.eval_every == 0) or step == cfg.steps:
            val_loss = heldout.loss(eval_model, amp, pipe)
            if dist.enabled:
                val_loss = D.all_reduce_mean_(torch.tensor([val_loss], device=device), dist).item()
            logger.log(step, val_loss=val_loss)
            val_loss_step = step

        # -------- every ckpt_every steps (and at the end): checkpoint ------------------------------------
        if (cfg.ckpt_every and step % cfg.ckpt_every == 0) or step == cfg.steps:
            save(step)

    if bar is not None:
        bar.close()
    # ---- summary and loss curve -----------------------------------------------------------------
    result = {"step": step, "loss": last.get("loss"), "val_loss": val_loss, "skipped_steps": skipped,
              "tokens_seen": tokens_seen, "tokens_per_s": last.get("tokens_per_s"), "mfu": last.get("mfu"),
              "params": n_params, "active_params": n_active, "micro_batch": micro, "grad_accum": accum,
              "world_size": world, "run_dir": str(run_dir), "wall_s": round(time.time() - t_start, 2),
              "parallel": str(spec) if dist.enabled else "", "comm_probe": last_comm}
    if is_main:
        plot_loss(logger.path, run_dir / "loss.png", title=f"{cfg.name}: pretraining loss")
        atomic_write_json(run_dir / "final.json", result)
        print0(f"done: step {step}, loss {result['loss']}, val_loss {val_loss}, skipped {skipped}, "
               f"{result['tokens_per_s']} tok/s, MFU {result['mfu']} -> {run_dir}")
    return result
