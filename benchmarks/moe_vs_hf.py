"""MoE block fwd+bwd throughput: ours vs Hugging Face Qwen2MoE / DeepseekV3 blocks vs a dense SwiGLU
FFN with the same active parameters (the practical upper limit for a MoE layer), measured side by
side in ONE run; plus the training MFU of the ``cpu-tiny`` model against the measured fp32 GEMM peak.

    .venv/bin/python benchmarks/moe_vs_hf.py                  # CPU fp32, both configs + MFU
    .venv/bin/python benchmarks/moe_vs_hf.py --device cuda    # bf16 on a GPU

Repetitions are interleaved (A, B, C, A, B, C, ...) and we report medians, since the machine is shared
and noisy. Ratios are tokens/s of a candidate divided by tokens/s of the dense equal-active FFN.
``--clock cpu`` times the CPU seconds of the calling thread instead of wall seconds: with ``--threads 1``
(every GEMM on that thread) that is the compute time, blind to the time other jobs on a shared machine
take from it and to background threads of this process (importing transformers starts some: with
process CPU time the first config measured ~13% slow for the dense FFN, ~6% for ours).
``ours_kernels_off`` is our block with the C kernels switched off (the fused node's PyTorch ops). The
run tunes glibc malloc as the training stages do (``tinyseek/malloc.py``), for every candidate alike.
HF blocks are built from a config offline; their expert weights are uninitialised by design, so we
initialise every candidate the same way (normal, std 0.02 -> a near-uniform router for all).
"""
from __future__ import annotations

import argparse
import os
import statistics
import time
from dataclasses import dataclass

import tinyseek  # noqa: E402,F401  (first: OMP_WAIT_POLICY=PASSIVE and THP_MEM_ALLOC_ENABLE=1 before torch loads)
import torch  # noqa: E402
import torch.nn as nn

from tinyseek import malloc
from tinyseek.kernels import gemm  # noqa: E402
from tinyseek.kernels import loader as ckernels  # noqa: E402
from tinyseek.config import ModelConfig, model_cpu_tiny  # noqa: E402
from tinyseek.model.layers import SwiGLU  # noqa: E402
from tinyseek.model.moe import DISPATCH, MoE  # noqa: E402
from tinyseek.model.transformer import Transformer  # noqa: E402

import moe_compiled  # noqa: E402,F401  (benchmarks/: registers the comparison-only "compiled" dispatch)


@dataclass
class BenchConfig:
    name: str
    d_model: int        # residual width
    n_experts: int      # routed experts
    top_k: int          # experts per token
    expert_ff: int      # hidden width of one routed expert
    n_shared: int       # shared experts (shared width = n_shared * expert_ff)
    batch: int = 8
    seq: int = 256

    @property
    def active_ff(self) -> int:
        return (self.top_k + self.n_shared) * self.expert_ff


CONFIGS = {
    # the reference point: 16 experts top-2, expert width 256, shared width 512
    "e16k2": BenchConfig("16 experts top-2 (F=256, shared 512)", 256, 16, 2, 256, 2),
    # fine-grained: 64 experts top-6, expert width 128, shared 256 -> same active width (1024)
    "e64k6": BenchConfig("64 experts top-6 (F=128, shared 256)", 256, 64, 6, 128, 2),
    # same with expert width 256 (= d_model), shared 512: active width 2048
    "e64k6w": BenchConfig("64 experts top-6 (F=256, shared 512)", 256, 64, 6, 256, 2),
    # the ends of the range (8-64 experts, top-2..8)
    "e8k2": BenchConfig("8 experts top-2 (F=256, shared 512)", 256, 8, 2, 256, 2),
    "e64k8": BenchConfig("64 experts top-8 (F=128, shared 256)", 256, 64, 8, 128, 2),
}


# ---------------------------------------------------------------------------------------------
# candidates
# ---------------------------------------------------------------------------------------------
def ours(bc: BenchConfig, impl: str = "auto") -> nn.Module:
    cfg = ModelConfig(d_model=bc.d_model, n_routed_experts=bc.n_experts, top_k=bc.top_k, moe_d_ff=bc.expert_ff,
                      n_shared_experts=bc.n_shared, score_func="softmax", aux_loss="switch",
                      bias_update_speed=0.001, moe_impl="auto", n_layers=2, n_dense_layers=1).validate()
    m = MoE(cfg)
    m.impl = impl  # may also be a variant the config does not offer (grouped_autograd, compiled)
    return _OutOnly(m)


class _KernelsOff(nn.Module):
    """Ours with the C kernels switched off while its forward runs (the fused node decides there,
    for its backward too): the PyTorch ops of the same node, for comparison."""

    def __init__(self, m: nn.Module):
        super().__init__()
        self.m = m

    def forward(self, x):
        before = ckernels.enable_all(False)
        try:
            return self.m(x)
        finally:
            ckernels.restore(before)


class _OutOnly(nn.Module):
    """Our MoE returns (y, stats); keep the output and the aux loss in the graph like a trainer does."""

    def __init__(self, m: nn.Module):
        super().__init__()
        self.m = m

    def forward(self, x):
        y, stats = self.m(x)
        return y + 0.0 * stats["aux_loss"]


def hf_qwen2moe(bc: BenchConfig, experts_impl: str | None) -> nn.Module:
    from transformers import Qwen2MoeConfig
    from transformers.models.qwen2_moe.modeling_qwen2_moe import Qwen2MoeSparseMoeBlock
    c = Qwen2MoeConfig(hidden_size=bc.d_model, num_experts=bc.n_experts, num_experts_per_tok=bc.top_k,
                       moe_intermediate_size=bc.expert_ff, shared_expert_intermediate_size=bc.n_shared * bc.expert_ff,
                       norm_topk_prob=True, intermediate_size=bc.active_ff)
    c._experts_implementation = experts_impl
    return Qwen2MoeSparseMoeBlock(c)


def hf_deepseekv3(bc: BenchConfig, experts_impl: str | None) -> nn.Module:
    from transformers import DeepseekV3Config
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3MoE
    c = DeepseekV3Config(hidden_size=bc.d_model, n_routed_experts=bc.n_experts, num_experts_per_tok=bc.top_k,
                         moe_intermediate_size=bc.expert_ff, n_shared_experts=bc.n_shared, n_group=1, topk_group=1,
                         norm_topk_prob=True, routed_scaling_factor=1.0, intermediate_size=bc.active_ff)
    c._experts_implementation = experts_impl
    return DeepseekV3MoE(c)


def dense(bc: BenchConfig) -> nn.Module:
    return SwiGLU(bc.d_model, bc.active_ff)


@torch.no_grad()
def init_(m: nn.Module) -> nn.Module:
    for p in m.parameters():
        p.normal_(0.0, 0.02)
    return m


# ---------------------------------------------------------------------------------------------
# timing
# ---------------------------------------------------------------------------------------------
CLOCK = time.perf_counter  # or time.thread_time (--clock cpu)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def fwd_bwd_seconds(m: nn.Module, x: torch.Tensor, gy: torch.Tensor, iters: int) -> float:
    """Mean seconds of one forward+backward over ``iters`` calls."""
    _sync(x.device)
    t0 = CLOCK()
    for _ in range(iters):
        for p in m.parameters():
            p.grad = None
        xi = x.detach().requires_grad_(True)
        m(xi).backward(gy)
    _sync(x.device)
    return (CLOCK() - t0) / iters


def interleaved(cands: dict[str, nn.Module], make_input, reps: int, iters: int, warmup: int = 2) -> dict[str, float]:
    """Median seconds per call for each candidate, repetitions interleaved across candidates."""
    x, gy = make_input()
    for m in cands.values():
        fwd_bwd_seconds(m, x, gy, warmup)
    times: dict[str, list[float]] = {k: [] for k in cands}
    for _ in range(reps):
        for k, m in cands.items():
            # an untimed call first: the timed one then starts from this candidate's own memory
            # state, not the one the previous candidate left (seen: the dense FFN timed right after
            # the HF blocks ran up to 15% slower, which inflated every ratio against it)
            fwd_bwd_seconds(m, x, gy, 1)
            times[k].append(fwd_bwd_seconds(m, x, gy, iters))
    return {k: statistics.median(v) for k, v in times.items()}


def bench_moe(bc: BenchConfig, device: torch.device, dtype: torch.dtype, reps: int, iters: int,
              with_hf: bool, extra_impls: list[str]) -> list[dict[str, float]]:
    """Tokens/s per candidate, in two groups, each interleaved on its own with its own dense FFN:
    ours and its variants (the ratios the targets are about), then ours against the HF blocks.
    Apart because the big HF blocks leave the allocator's memory in a state that the candidate timed
    after them inherits (seen: the dense FFN at 16 experts ran 10-15% slow when interleaved with them,
    inflating every ratio against it)."""
    torch.manual_seed(0)
    groups: list[dict[str, nn.Module]] = [{"dense": dense(bc), "ours": ours(bc)}]
    if device.type == "cpu":
        groups[0]["ours_kernels_off"] = _KernelsOff(ours(bc))
    for impl in extra_impls:
        groups[0][f"ours_{impl}"] = ours(bc, impl)
    if with_hf:
        groups.append({"dense": dense(bc), "ours": ours(bc),
                       "hf_qwen2moe": hf_qwen2moe(bc, None),  # standalone block: eager per-expert loop
                       "hf_qwen2moe_grouped": hf_qwen2moe(bc, "grouped_mm"),  # transformers 5 model default
                       "hf_deepseekv3": hf_deepseekv3(bc, None),
                       "hf_deepseekv3_grouped": hf_deepseekv3(bc, "grouped_mm")})
    g = torch.Generator(device="cpu").manual_seed(1)

    def make_input():
        x = torch.randn(bc.batch, bc.seq, bc.d_model, generator=g).to(device, dtype)
        gy = torch.randn(bc.batch, bc.seq, bc.d_model, generator=g).to(device, dtype) * 1e-3
        return x, gy

    tokens = bc.batch * bc.seq
    out = []
    for cands in groups:
        for m in cands.values():
            init_(m).to(device=device, dtype=dtype).train()
        secs = interleaved(cands, make_input, reps, iters)
        out.append({k: tokens / s for k, s in secs.items()})
        del cands
    return out


# ---------------------------------------------------------------------------------------------
# MFU of the cpu-tiny model
# ---------------------------------------------------------------------------------------------
def gemm_gflops(device: torch.device, dtype: torch.dtype, n: int = 2048, reps: int = 5) -> float:
    """Peak GFLOP/s of an n-cube product: on CPU fp32 the faster of MKL and oneDNN (the honest peak)."""
    if device.type == "cpu" and dtype is torch.float32:
        return gemm.peak_flops(n, reps) / 1e9
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    a @ b
    ts = []
    for _ in range(reps):
        _sync(device)
        t0 = time.perf_counter()
        a @ b
        _sync(device)
        ts.append(time.perf_counter() - t0)
    return 2 * n ** 3 / min(ts) / 1e9  # peak: the best repetition


def train_flops_per_token(model: Transformer, seq: int) -> tuple[float, float]:
    """(6 * active non-embedding params, attention score/value flops) per token, fwd+bwd.

    Attention follows the PaLM convention: 6 * L * H * (qk_dim + v_dim) * seq per token (the full
    T x T product, not halved for the causal mask). The input embedding is a lookup, not a matmul;
    the LM head is counted."""
    cfg = model.cfg
    n = model.num_params(active=True)
    if not cfg.tie_embeddings:
        n -= model.embed.weight.numel()
    qk, v = (cfg.qk_nope_head_dim + cfg.qk_rope_head_dim, cfg.v_head_dim) if cfg.attn == "mla" else \
        (cfg.gqa_head_dim, cfg.gqa_head_dim)
    attn = 6 * cfg.n_layers * cfg.n_heads * (qk + v) * seq
    return 6.0 * n, float(attn)


def mfu_cpu_tiny(device: torch.device, dtype: torch.dtype, batch: int, reps: int) -> dict:
    torch.manual_seed(0)
    cfg: ModelConfig = model_cpu_tiny()
    model = Transformer(cfg).to(device=device, dtype=dtype).train()
    T = cfg.max_seq_len
    idx = torch.randint(0, cfg.vocab_size, (batch, T), device=device)

    def step():
        for p in model.parameters():
            p.grad = None
        model(idx, idx).loss.backward()

    # the linear layers' GEMM backend (tinyseek/kernels/gemm.py): each one timed, interleaved, on CPU fp32
    backends = ["mkl", "onednn"] if device.type == "cpu" and gemm.onednn_available() else [gemm.backend()]
    chosen = gemm.backend()
    n_threads = torch.get_num_threads()
    for b in backends:
        gemm._chosen[n_threads] = b
        step()
        step()
    peak_ts, ts = [], {b: [] for b in backends}
    for _ in range(reps):  # interleave the GEMM peak measurement with the model steps
        peak_ts.append(gemm_gflops(device, dtype, reps=2))
        for b in backends:
            gemm._chosen[n_threads] = b
            _sync(device)
            t0 = time.perf_counter()
            step()
            _sync(device)
            ts[b].append(time.perf_counter() - t0)
    gemm._chosen[n_threads] = chosen
    by_backend = {b: batch * T / statistics.median(t) for b, t in ts.items()}
    sec = statistics.median(ts[chosen])
    peak = max(peak_ts)
    dense_f, attn_f = train_flops_per_token(model, T)
    tokens = batch * T
    achieved = (dense_f + attn_f) * tokens / sec / 1e9
    return dict(tokens_per_s=tokens / sec, achieved_gflops=achieved, peak_gflops=peak, mfu=achieved / peak,
                backend=chosen, tokens_per_s_by_backend=by_backend,
                params=model.num_params(), active_params=model.num_params(active=True),
                flops_per_token=dense_f + attn_f, attn_share=attn_f / (dense_f + attn_f), batch=batch, seq=T)


# ---------------------------------------------------------------------------------------------
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--configs", default=",".join(CONFIGS), help=f"comma list of {list(CONFIGS)}")
    ap.add_argument("--reps", type=int, default=7, help="interleaved repetitions (median taken)")
    ap.add_argument("--iters", type=int, default=1, help="fwd+bwd calls per repetition")
    ap.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0 = torch default)")
    ap.add_argument("--no-hf", action="store_true", help="skip the transformers blocks")
    ap.add_argument("--no-mfu", action="store_true", help="skip the cpu-tiny MFU measurement")
    ap.add_argument("--mfu-batch", type=int, default=8)
    ap.add_argument("--impls", default="grouped_autograd,padded",
                    help="also time these dispatch variants of ours (comma list; '' for none)")
    ap.add_argument("--clock", default="wall", choices=["wall", "cpu"],
                    help="wall seconds, or CPU seconds of the calling thread (with --threads 1, on a shared machine)")
    args = ap.parse_args()
    impls = [i for i in args.impls.split(",") if i]
    bad = [i for i in impls if i not in DISPATCH]
    if bad:
        raise SystemExit(f"moe_vs_hf: error: unknown --impls {bad}, choose from {sorted(DISPATCH)}")
    global CLOCK
    CLOCK = time.thread_time if args.clock == "cpu" else time.perf_counter
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("moe_vs_hf: error: --device cuda but no GPU is available")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    tuned = malloc.tune()  # as the training stages do; both sides of every ratio run in this process
    if args.clock == "cpu" and torch.get_num_threads() > 1:
        raise SystemExit("moe_vs_hf: error: --clock cpu sums the CPU time of all threads: use it with --threads 1")
    print(f"torch {torch.__version__}, device {device}, dtype {dtype}, threads {torch.get_num_threads()}, "
          f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY')}, THP_MEM_ALLOC_ENABLE={os.environ.get('THP_MEM_ALLOC_ENABLE')}, "
          f"clock {args.clock}, malloc {tuned or 'glibc defaults'}, "
          f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
    if not args.no_hf:
        import transformers
        print(f"transformers {transformers.__version__}")
    for key in args.configs.split(","):
        bc = CONFIGS[key]
        groups = bench_moe(bc, device, dtype, args.reps, args.iters, not args.no_hf, impls)
        print(f"\n[{key}] {bc.name}, d={bc.d_model}, {bc.batch}x{bc.seq} tokens, dense FFN width {bc.active_ff}, "
              f"median of {args.reps}")
        for i, tps in enumerate(groups):
            if i:
                print("  -- against Hugging Face (interleaved apart, with a dense FFN of its own):")
            base = tps["dense"]
            for k, v in tps.items():
                print(f"  {k:24s} {v:10.0f} tok/s   {v / base:5.2f}x dense")
            if "hf_qwen2moe" in tps:
                print(f"  ours / hf_qwen2moe = {tps['ours'] / tps['hf_qwen2moe']:.2f}x, "
                      f"ours / hf_deepseekv3 = {tps['ours'] / tps['hf_deepseekv3']:.2f}x, "
                      f"ours / best HF = {tps['ours'] / max(v for k, v in tps.items() if k.startswith('hf')):.2f}x")
    if not args.no_mfu:
        r = mfu_cpu_tiny(device, dtype, args.mfu_batch, args.reps)
        print(f"\n[mfu] cpu-tiny fwd+bwd, {r['batch']}x{r['seq']} tokens, {r['params'] / 1e6:.2f}M params "
              f"({r['active_params'] / 1e6:.2f}M active), {r['flops_per_token'] / 1e6:.1f} MFLOP/token "
              f"(attention {100 * r['attn_share']:.0f}%)")
        print(f"  {r['tokens_per_s']:.0f} tok/s = {r['achieved_gflops']:.1f} GFLOP/s vs peak "
              f"{r['peak_gflops']:.1f} GFLOP/s (2048^3 GEMM, best backend) -> MFU {100 * r['mfu']:.1f}% "
              f"(linear layers on {r['backend']})")
        tb = r["tokens_per_s_by_backend"]
        if len(tb) > 1:
            print("  linear-layer GEMM backend, same run: " + ", ".join(f"{k} {v:.0f} tok/s" for k, v in tb.items())
                  + f" -> onednn / mkl = {tb['onednn'] / tb['mkl']:.2f}x")


if __name__ == "__main__":
    main()
