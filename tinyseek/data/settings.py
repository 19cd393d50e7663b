"""``tinyseek data`` settings: the stage's :class:`Config` (every field a ``--flag``) and its presets."""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from tinyseek import tokenizer as tk
from tinyseek.config import ConfigError
from tinyseek.data import clean as C
from tinyseek.data.mixture import parse_weights

EXECUTORS = ("local", "ray", "slurm", "serial")


def cpu_count() -> int:
    """Cores this process may run on (its affinity mask, not the machine's count): ``--workers 0``."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


@dataclass
class Config:
    name: str = "data"                  # run name; outputs go to runs/<name>/data unless run_dir is set
    run_dir: str = ""                   # run folder ("" -> runs/<name>); the data goes to <run_dir>/data
    inputs: str = ""                    # "" = the default corpus; else comma-separated "[domain=]path" (JSONL/Parquet/text, files or folders)
    text_field: str = "text"            # JSONL/Parquet field with the document text
    use_samples: bool = False           # default corpus from tinyseek/data/samples only (tests, no packages)
    doc_chars: int = 4000               # plain text is cut into documents of about this many characters
    max_docs_per_source: int = 400      # default corpus: stop reading a source after this many docs (0 = all)
    max_chars_per_source: int = 1_500_000  # ... or after this many characters (0 = all); --inputs are read whole
    math_docs: int = 400                # generated worked problems in the default corpus (0 = none)
    heuristics: C.HeuristicConfig = field(default_factory=C.HeuristicConfig)  # prose thresholds
    relaxed: C.HeuristicConfig = field(default_factory=C.relaxed_heuristics)  # thresholds for relaxed_domains
    relaxed_domains: str = "code,math"  # domains checked against `relaxed`
    hash: str = "xxhash"                # exact-dedup hash: xxhash or md5
    near_dup: bool = True               # MinHash LSH near-duplicate removal
    near_dup_threshold: float = 0.8     # Jaccard (MinHash estimate) at or above which a doc is a near-duplicate
    near_dup_min_chars: int = 200       # shorter docs skip near-dup (5-shingle Jaccard of "3 + 4" vs "3 + 5"
                                        # problems is high though they differ); exact dedup still applies
    num_perm: int = 128                 # MinHash permutations
    shingle: int = 5                    # character shingle length for MinHash
    decontaminate: bool = True          # drop docs sharing a word n-gram with the tasks' held-out problems
    decontam_n: int = 13                # n-gram length for decontamination
    decontam_problems: int = 100        # held-out problems per task to decontaminate against
    decontaminate_generated: bool = False  # also check the generated maths (disjoint from eval by construction;
                                        # 13-grams of templated text give false positives there)
    min_char_entropy: float = 3.0       # drop docs whose character entropy (bits/char) is below this
    ppl_keep_fraction: float = 0.95     # keep this fraction of each domain, lowest perplexity first (1 = off)
    ppl_order: int = 3                  # order of the character n-gram reference model
    ppl_fit_chars: int = 4_000_000      # characters per domain used to fit the reference model
    weights: str = ""                   # static domain weights "english=0.4,code=0.2,..." ("" = natural shares)
    tfidf_power: float = 1.0            # beta in w_d ~ p_d * s_d**beta (0 = static weights only)
    max_epochs: float = 4.0             # no domain is repeated more than this many times
    target_tokens: int = 0              # training tokens to write (0 = all kept training tokens)
    val_fraction: float = 0.02          # share of kept characters held out (docs chosen by content hash)
    val_min_chars: int = 30_000         # ... but at least this many characters (capped at 20% of the data)
    vocab_size: int = 2048              # BPE vocabulary incl. special tokens
    tokenizer: str = ""                 # use this tokenizer (dir/file/"bytes") instead of training one
    tokenizer_chars: int = 20_000_000   # characters of kept text used to train the BPE
    shard_tokens: int = 1 << 24         # tokens per shard file
    seed: int = 0                       # mixture order and generated maths
    executor: str = "local"             # local (processes here), ray, slurm, or serial (one process: the reference)
    workers: int = 0                    # tasks running at once (0 = every core this process may use)
    tasks: int = 0                      # tasks per parallel stage (0 = workers); results do not depend on it
    ray_address: str = ""               # ray: a running cluster's address ("" = start Ray on this machine)
    slurm_partition: str = ""           # slurm: the partition to submit to (required with --executor slurm)
    slurm_time: str = "4:00:00"         # slurm: time limit of each task
    quiet: bool = False                 # no printed tables

    def validate(self) -> "Config":
        def need(ok: bool, msg: str) -> None:
            if not ok:
                raise ConfigError(msg)
        need(bool(self.name) and "/" not in self.name, f"name must be a non-empty folder name, got {self.name!r}")
        for k in ("doc_chars", "num_perm", "shingle", "decontam_n", "ppl_order", "vocab_size", "shard_tokens"):
            need(getattr(self, k) >= 1, f"{k} must be >= 1, got {getattr(self, k)}")
        for k in ("max_docs_per_source", "max_chars_per_source", "math_docs", "decontam_problems",
                  "target_tokens", "ppl_fit_chars", "tokenizer_chars", "val_min_chars", "near_dup_min_chars"):
            need(getattr(self, k) >= 0, f"{k} must be >= 0, got {getattr(self, k)}")
        need(self.executor in EXECUTORS, f"executor must be one of {', '.join(EXECUTORS)}, got {self.executor!r}")
        need(self.workers >= 0 and self.tasks >= 0, f"workers and tasks must be >= 0, got {self.workers}, {self.tasks}")
        need(self.executor != "slurm" or bool(self.slurm_partition), "executor slurm needs --slurm-partition")
        need(self.hash in ("xxhash", "md5"), f"hash must be xxhash or md5, got {self.hash!r}")
        need(0 < self.near_dup_threshold <= 1, f"near_dup_threshold must be in (0, 1], got {self.near_dup_threshold}")
        need(0 < self.ppl_keep_fraction <= 1, f"ppl_keep_fraction must be in (0, 1], got {self.ppl_keep_fraction}")
        need(0 <= self.val_fraction < 1, f"val_fraction must be in [0, 1), got {self.val_fraction}")
        need(self.max_epochs > 0, f"max_epochs must be > 0, got {self.max_epochs}")
        need(self.tfidf_power >= 0, f"tfidf_power must be >= 0, got {self.tfidf_power}")
        need(self.min_char_entropy >= 0, f"min_char_entropy must be >= 0, got {self.min_char_entropy}")
        if not self.tokenizer:
            need(self.vocab_size >= tk.MIN_VOCAB, f"vocab_size must be >= {tk.MIN_VOCAB}, got {self.vocab_size}")
        parse_weights(self.weights)
        for part in (p.strip() for p in self.inputs.split(",")):
            path = part.split("=", 1)[1] if "=" in part else part
            need(not part or Path(path.strip()).exists(), f"input {path.strip()} does not exist")
        return self

    @property
    def out_dir(self) -> Path:
        return (Path(self.run_dir) if self.run_dir else Path("runs") / self.name) / "data"


def preset(name: str) -> Config:
    """``sample`` (shipped samples, seconds: tests), ``cpu-tiny`` (capped default corpus, well under a
    minute on 2 cores), ``full`` (whole default corpus, vocab 16384: GPU-scale pretraining)."""
    presets = {
        "sample": lambda: Config(name="data-sample", use_samples=True, math_docs=120, vocab_size=512,
                                 max_docs_per_source=0, max_chars_per_source=0, decontam_problems=40),
        "cpu-tiny": lambda: Config(name="cpu-tiny", tokenizer_chars=3_000_000, decontam_problems=50),
        "full": lambda: Config(name="data-full", max_docs_per_source=0, max_chars_per_source=0, math_docs=20000,
                               vocab_size=16384, decontam_problems=500),
    }
    if name not in presets:
        raise ConfigError(f"unknown preset {name!r}; choose one of {', '.join(presets)}")
    return presets[name]()
