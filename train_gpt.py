"""Universal Transformer for the OpenAI Parameter Golf challenge (10 minutes, 16,000,000 bytes).

A few transformer blocks with shared weights run again and again (3 unique blocks x 4 passes give
12 effective layers), distinguished by per-pass iteration embeddings and scales. After training, the
weights are averaged (EMA/SWA), quantized to int6 with GPTQ, packed with a standard-library codec,
loaded back into a fresh model and scored by sliding-window bits per byte on the validation split.

Launch line of the reference run (8 GPUs; one process per GPU):
    USE_UNIVERSAL=1 UNIVERSAL_UNIQUE_BLOCKS=3 UNIVERSAL_ITERATIONS=4 NGRAM_EVAL=0 KNN_LAMBDA=0 \\
    SEED=42 OMP_NUM_THREADS=1 torchrun --standalone --nproc_per_node=8 train_gpt.py

Limits: code bytes of this file + compressed model bytes <= 16,000,000; training plus quantization
<= 600 s on 8xH100; evaluation <= 600 s, using each validation token only after it is scored.
Every setting is an environment variable listed in SETTINGS; `DRY_RUN=1` prints them and the model size.
"""

from __future__ import annotations

import bz2
import contextlib
import copy
import glob
import hashlib
import io
import json
import lzma
import math
import os
import subprocess
import sys
import time
import zlib
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

# -----------------------------------------------------------------------------
# HYPERPARAMETERS
# -----------------------------------------------------------------------------
# One table: environment name, default, meaning. The attribute is the name in lower case and
# the type is the default's type. Booleans are "0" or "1"; anything else is rejected.

SETTINGS: tuple[tuple[str, object, str], ...] = (
    # Data and run identity
    ("DATA_PATH", "./data/datasets/fineweb10B_sp1024", "folder with fineweb_train_*.bin and fineweb_val_*.bin shards"),
    ("TOKENIZER_PATH", "./data/tokenizers/fineweb_1024_bpe.model", "SentencePiece model that made the shards"),
    ("RUN_ID", "", "name of the log and artifact; empty means <UTC time>_seed<SEED>"),
    ("SEED", 1337, "seed of every random number generator"),
    ("ARTIFACT_PATH", "", "artifact file to write (or read with EVAL_ONLY=1); empty means artifacts/<RUN_ID>.int6.ptz"),
    ("DRY_RUN", False, "build the model, print settings, parameter counts and a size estimate, exit without data"),
    ("EVAL_ONLY", False, "load ARTIFACT_PATH into a fresh model and score it; no training"),
    ("COMPILE", "auto", "torch.compile: auto (on for CUDA, off for CPU), 1 or 0"),
    # Model shape
    ("VOCAB_SIZE", 1024, "vocabulary size; must equal the tokenizer's"),
    ("NUM_LAYERS", 11, "effective layers when USE_UNIVERSAL=0"),
    ("MODEL_DIM", 512, "residual stream width"),
    ("NUM_HEADS", 8, "query heads"),
    ("NUM_KV_HEADS", 4, "key/value heads (grouped-query attention)"),
    ("MLP_MULT", 3, "MLP hidden width as a multiple of MODEL_DIM"),
    ("TIE_EMBEDDINGS", True, "share the token embedding with the output head"),
    ("ROPE_BASE", 10000.0, "rotary embedding base"),
    ("ROPE_DIMS", 16, "head dimensions that get rotary embedding (0 = none, at most the head size)"),
    ("LOGIT_SOFTCAP", 30.0, "logits are softcap * tanh(logits / softcap)"),
    ("QK_GAIN_INIT", 1.5, "initial per-head query gain"),
    ("USE_UNIVERSAL", True, "share block weights across effective layers"),
    ("UNIVERSAL_UNIQUE_BLOCKS", 3, "unique blocks in universal mode"),
    ("UNIVERSAL_ITERATIONS", 4, "passes over the unique blocks in universal mode"),
    ("ITER_EMBED", True, "per-effective-layer embedding added before each block (universal mode only)"),
    ("ITER_SCALE", True, "per-effective-layer scale on each block's updates (universal mode only)"),
    ("BIGRAM_BUCKETS", 2048, "hash buckets of the (previous, current) token embedding; 0 removes it"),
    ("BIGRAM_DIM", 128, "width of the bigram hash embedding before its projection"),
    ("VE_DIM", 128, "width of the value embedding before its projection; 0 removes it"),
    ("VE_LAYERS", "-2,-1", "effective layers whose attention values get the value embedding (negative = from the end)"),
    ("SMEAR_GATE", True, "mix each token embedding with the previous one (never across BOS)"),
    ("UNET_SKIPS", True, "U-Net skip connections from the first half of the layers to the second"),
    ("VALUE_RESIDUAL", True, "mix the first layer's attention values into later layers' values"),
    ("SCALED_HIGHWAY", True, "per-layer scalars on the carried residual stream and on the layer's update"),
    ("QK_NORM", True, "RMS-normalise queries and keys"),
    ("LN_SCALE", True, "scale normalised block inputs by 1/sqrt(layer + 1)"),
    ("XSA_LAST_N", 4, "last effective layers using exclusive self-attention (0 = none)"),
    # Training length and batch
    ("ITERATIONS", 20000, "training steps at most"),
    ("WARMUP_STEPS", 20, "compile warm-up steps, undone before training starts"),
    ("WARMDOWN_ITERS", 3500, "length of the final linear learning-rate decay, in steps"),
    ("TRAIN_BATCH_TOKENS", 786432, "tokens per optimizer step, over all processes"),
    ("TRAIN_SEQ_LEN", 2048, "training sequence length"),
    ("MAX_WALLCLOCK_SECONDS", 600.0, "cap on training plus quantization, in seconds (0 = none)"),
    ("QUANT_TIME_MARGIN", 1.25, "training stops this many times the measured quantization time before the cap"),
    ("TRAIN_LOG_EVERY", 200, "steps between train_loss lines"),
    ("VAL_LOSS_EVERY", 0, "steps between validation reports during training (0 = none)"),
    # Optimizers
    ("EMBED_LR", 0.6, "Adam learning rate of the token embedding when untied"),
    ("HEAD_LR", 0.008, "Adam learning rate of the untied output head"),
    ("TIED_EMBED_LR", 0.035, "Adam learning rate of the tied embedding"),
    ("TIED_EMBED_INIT_STD", 0.005, "initial standard deviation of the tied embedding"),
    ("MATRIX_LR", 0.025, "Muon learning rate of the matrices"),
    ("SCALAR_LR", 0.025, "Adam learning rate of gains, scales, gates and iteration embeddings"),
    ("MUON_MOMENTUM", 0.99, "Muon momentum after its warm-up"),
    ("MUON_BACKEND_STEPS", 5, "Newton-Schulz iterations per Muon update"),
    ("MUON_MOMENTUM_WARMUP_START", 0.92, "Muon momentum at step 0"),
    ("MUON_MOMENTUM_WARMUP_STEPS", 1500, "steps of the linear Muon momentum warm-up"),
    ("MUON_WD", 0.04, "decoupled weight decay of the Muon matrices"),
    ("ADAM_WD", 0.04, "decoupled weight decay of the Adam embedding tables"),
    ("BETA1", 0.9, "Adam beta1"),
    ("BETA2", 0.95, "Adam beta2"),
    ("ADAM_EPS", 1e-8, "Adam epsilon"),
    ("GRAD_CLIP_NORM", 0.3, "global gradient norm clip (0 = off)"),
    # Weight averaging
    ("EMA_DECAY", 0.997, "decay of the exponential moving average, updated every step"),
    ("SWA_EVERY", 50, "steps between SWA snapshots once the warm-down has begun"),
    ("FINAL_WEIGHTS", "ema", "weights that get quantized: ema, swa or raw"),
    # Quantization and artifact
    ("GPTQ", True, "int6 GPTQ; 0 rounds to nearest with the same per-row scales"),
    ("GPTQ_CALIB_SEQS", 64, "training sequences of TRAIN_SEQ_LEN used for the GPTQ Hessians"),
    ("GPTQ_BLOCK", 128, "GPTQ column block size"),
    ("GPTQ_DAMP", 0.01, "GPTQ damping, as a fraction of the mean Hessian diagonal"),
    ("ARTIFACT_LIMIT_BYTES", 16000000, "limit on code bytes plus artifact bytes"),
    # Evaluation
    ("EVAL_SEQ_LEN", 2048, "evaluation window length"),
    ("EVAL_STRIDE", 64, "sliding-window step; each window scores only its last EVAL_STRIDE targets"),
    ("VAL_BATCH_SIZE", 524288, "validation tokens per forward pass over all processes, before division by 8"),
    ("PREQUANT_EVAL", True, "also report val_bpb of the raw, EMA and SWA weights before quantization"),
    ("NGRAM_EVAL", False, "mix an n-gram cache of already-scored validation tokens into the sliding-window score"),
    ("NGRAM_ORDER", 4, "longest n-gram of the cache (context of ORDER-1 tokens); backs off down to bigrams"),
    ("NGRAM_WEIGHT", 0.1, "weight of the n-gram cache in the mixture"),
    ("NGRAM_BUCKETS", 65536, "hash rows of each n-gram table of order 3 and more"),
    ("KNN_LAMBDA", 0.0, "weight of the kNN-LM distribution over stored hidden states (0 = off)"),
    ("KNN_K", 32, "neighbours of the kNN-LM"),
    ("KNN_TEMP", 10.0, "temperature of the kNN-LM on squared L2 distances"),
    ("KNN_STORE", 65536, "the kNN-LM searches the hidden states of this many preceding targets"),
)
SETTING_NAMES = tuple(name for name, _, _ in SETTINGS)
# Settings that define the network; the artifact stores them so EVAL_ONLY rebuilds the same model.
MODEL_SETTINGS = SETTING_NAMES[SETTING_NAMES.index("VOCAB_SIZE") : SETTING_NAMES.index("XSA_LAST_N") + 1]
# Environment names of torchrun, CUDA and friends are never reported as typos of ours.
FOREIGN_PREFIXES = ("TORCH", "CUDA", "NCCL", "OMP_", "MKL", "PYTHON", "LOCAL_", "GROUP_", "ROLE_", "MASTER_", "TORCHELASTIC")
BOS_ID = 1
INT6_MAX = 31
SHARD_MAGIC, SHARD_VERSION, SHARD_HEADER_INTS = 20240520, 1, 256


class ConfigError(ValueError):
    """A setting, file or input that cannot work; the message names it and what would."""


def parse_setting(name: str, raw: str, default: object) -> object:
    try:
        if isinstance(default, bool):
            if raw not in ("0", "1"):
                raise ValueError
            return raw == "1"
        return type(default)(raw)
    except ValueError:
        kind = "0 or 1" if isinstance(default, bool) else type(default).__name__
        raise ConfigError(f"{name}={raw!r} is not a valid {kind}; the default is {env_form(default)}") from None


def edit_distance(a: str, b: str) -> int:
    """Damerau-Levenshtein distance (adjacent transpositions count as one edit)."""
    d = [[i + j if i * j == 0 else 0 for j in range(len(b) + 1)] for i in range(len(a) + 1)]
    for i in range(1, len(a) + 1):
        for j in range(1, len(b) + 1):
            d[i][j] = min(d[i - 1][j] + 1, d[i][j - 1] + 1, d[i - 1][j - 1] + (a[i - 1] != b[j - 1]))
            if i > 1 and j > 1 and a[i - 1] == b[j - 2] and a[i - 2] == b[j - 1]:
                d[i][j] = min(d[i][j], d[i - 2][j - 2] + 1)
    return d[len(a)][len(b)]


class Hyperparameters:
    """All settings, read from an environment mapping when constructed (not at import)."""

    def __init__(self, env: dict[str, str] | None = None):
        env = dict(os.environ if env is None else env)
        for key in sorted(env):
            if key in SETTING_NAMES or not key.isupper() or key.startswith(FOREIGN_PREFIXES):
                continue
            close = [name for name in SETTING_NAMES if edit_distance(key, name) <= (2 if len(name) > 12 else 1)]
            if close:
                raise ConfigError(f"{key} is not a setting; probable typo of {close[0]} (rename it, or unset {key})")
        for name, default, _ in SETTINGS:
            setattr(self, name.lower(), parse_setting(name, env[name], default) if name in env else default)
        if not self.run_id:
            self.run_id = time.strftime("%Y%m%d_%H%M%S", time.gmtime()) + f"_seed{self.seed}"
        if not self.artifact_path:
            self.artifact_path = os.path.join("artifacts", f"{self.run_id}.int6.ptz")

    @property
    def effective_layers(self) -> int:
        return self.universal_unique_blocks * self.universal_iterations if self.use_universal else self.num_layers

    @property
    def unique_blocks(self) -> int:
        return self.universal_unique_blocks if self.use_universal else self.num_layers

    def ve_layer_indices(self) -> tuple[int, ...]:
        if self.ve_dim == 0:
            return ()
        layers = self.effective_layers
        try:
            raw = [int(part) for part in self.ve_layers.split(",") if part.strip()]
        except ValueError:
            raise ConfigError(f"VE_LAYERS={self.ve_layers!r} must be comma-separated integers, e.g. -2,-1") from None
        if not raw or any(not -layers <= i < layers for i in raw):
            raise ConfigError(f"VE_LAYERS={self.ve_layers!r} must name layers in [-{layers}, {layers - 1}] ({layers} effective layers)")
        resolved = sorted({i % layers for i in raw})
        if len(resolved) != len(raw):
            raise ConfigError(f"VE_LAYERS={self.ve_layers!r} names a layer twice")
        return tuple(resolved)

    def validate(self, world_size: int) -> None:
        """Raise ConfigError for any shape or value that cannot work, before any work starts."""

        def need(ok: bool, message: str) -> None:
            if not ok:
                raise ConfigError(message)

        if self.use_universal:
            need(self.universal_unique_blocks <= self.effective_layers,
                 f"UNIVERSAL_UNIQUE_BLOCKS={self.universal_unique_blocks} is larger than the {self.effective_layers} effective layers "
                 f"(UNIVERSAL_UNIQUE_BLOCKS x UNIVERSAL_ITERATIONS); set UNIVERSAL_ITERATIONS to 1 or more")
        positive = ("VOCAB_SIZE", "NUM_LAYERS", "MODEL_DIM", "NUM_HEADS", "NUM_KV_HEADS", "MLP_MULT", "UNIVERSAL_UNIQUE_BLOCKS",
                    "UNIVERSAL_ITERATIONS", "TRAIN_BATCH_TOKENS", "TRAIN_SEQ_LEN", "EVAL_SEQ_LEN", "EVAL_STRIDE",
                    "MUON_BACKEND_STEPS", "GPTQ_BLOCK", "VAL_BATCH_SIZE", "LOGIT_SOFTCAP", "NGRAM_BUCKETS", "KNN_K", "KNN_TEMP")
        for name in positive:
            need(getattr(self, name.lower()) > 0, f"{name}={getattr(self, name.lower())} must be positive")
        need(self.vocab_size <= 65536, f"VOCAB_SIZE={self.vocab_size} does not fit the uint16 shard tokens; use at most 65536")
        need(self.model_dim % self.num_heads == 0,
             f"MODEL_DIM={self.model_dim} is not divisible by NUM_HEADS={self.num_heads}; pick NUM_HEADS dividing MODEL_DIM (e.g. 8 for 512)")
        need(self.num_heads % self.num_kv_heads == 0,
             f"NUM_HEADS={self.num_heads} is not divisible by NUM_KV_HEADS={self.num_kv_heads}; pick a divisor of NUM_HEADS")
        head_dim = self.model_dim // self.num_heads
        need(self.rope_dims % 2 == 0 and 0 <= self.rope_dims <= head_dim,
             f"ROPE_DIMS={self.rope_dims} must be even and between 0 and the head size {head_dim}")
        need(0 <= self.xsa_last_n <= self.effective_layers,
             f"XSA_LAST_N={self.xsa_last_n} must be between 0 and the {self.effective_layers} effective layers")
        self.ve_layer_indices()
        need(self.bigram_buckets >= 0 and self.bigram_dim > 0 and self.ve_dim >= 0, "BIGRAM_BUCKETS and VE_DIM must be >= 0, BIGRAM_DIM > 0")
        need(self.compile in ("auto", "0", "1"), f"COMPILE={self.compile!r} must be auto, 0 or 1")
        need(self.final_weights in ("ema", "swa", "raw"), f"FINAL_WEIGHTS={self.final_weights!r} must be ema, swa or raw")
        need(0.0 <= self.ema_decay < 1.0, f"EMA_DECAY={self.ema_decay} must be in [0, 1)")
        need(self.swa_every > 0, f"SWA_EVERY={self.swa_every} must be positive")
        need(self.gptq_calib_seqs >= world_size, f"GPTQ_CALIB_SEQS={self.gptq_calib_seqs} must be at least the {world_size} processes")
        need(0.0 <= self.gptq_damp < 1.0, f"GPTQ_DAMP={self.gptq_damp} must be in [0, 1)")
        need(self.eval_stride <= self.eval_seq_len, f"EVAL_STRIDE={self.eval_stride} must not exceed EVAL_SEQ_LEN={self.eval_seq_len}")
        need(2 <= self.ngram_order <= 6, f"NGRAM_ORDER={self.ngram_order} must be between 2 and 6")
        for name in ("NGRAM_WEIGHT", "KNN_LAMBDA"):
            need(0.0 <= getattr(self, name.lower()) < 1.0, f"{name}={getattr(self, name.lower())} must be in [0, 1)")
        need(self.knn_store >= 1, f"KNN_STORE={self.knn_store} must be positive")
        need(8 % world_size == 0, f"WORLD_SIZE={world_size} must divide 8 so the gradient accumulation steps are whole")
        accum = 8 // world_size
        per_micro = self.train_batch_tokens // (world_size * accum)
        need(self.train_batch_tokens % (world_size * accum * self.train_seq_len) == 0,
             f"TRAIN_BATCH_TOKENS={self.train_batch_tokens} does not split into whole TRAIN_SEQ_LEN={self.train_seq_len} sequences "
             f"over {world_size} processes x {accum} accumulation steps (got {per_micro} tokens each); "
             f"use a multiple of {8 * self.train_seq_len}")
        need(self.max_wallclock_seconds >= 0 and self.quant_time_margin >= 1.0, "MAX_WALLCLOCK_SECONDS must be >= 0 and QUANT_TIME_MARGIN >= 1")

    def resolved(self) -> list[str]:
        """`config:NAME=value` lines of every setting, sorted, in the form the environment takes."""
        return [f"config:{name}={env_form(getattr(self, name.lower()))}" for name in sorted(SETTING_NAMES)]


# -----------------------------------------------------------------------------
# MUON OPTIMIZER
# -----------------------------------------------------------------------------
# Coefficients of the quintic Newton-Schulz iteration (Muon's published constants).
NS_COEFFS = (3.4445, -4.7750, 2.0315)


def newton_schulz(g: Tensor, steps: int) -> Tensor:
    """Orthogonalise a batch of matrices [n, rows, cols] at once with the quintic Newton-Schulz iteration."""
    dtype = torch.bfloat16 if g.is_cuda else torch.float32
    x = g.to(dtype)
    x = x / (x.flatten(1).norm(dim=1)[:, None, None] + 1e-7)
    transposed = x.size(1) > x.size(2)
    if transposed:
        x = x.transpose(1, 2)
    a, b, c = NS_COEFFS
    for _ in range(steps):
        gram = x @ x.transpose(1, 2)
        x = a * x + (b * gram + c * gram @ gram) @ x
    return x.transpose(1, 2) if transposed else x


class Muon(torch.optim.Optimizer):
    """Nesterov momentum orthogonalised by Newton-Schulz, with decoupled weight decay.

    Same-shape matrices are stacked so one batched iteration serves them all; shapes are dealt
    round-robin to processes and the updates are summed with one all-reduce.
    """

    def __init__(self, params, lr: float, momentum: float, backend_steps: int, weight_decay: float):
        super().__init__(list(params), dict(lr=lr, momentum=momentum, backend_steps=backend_steps, weight_decay=weight_decay))
        self.distributed = dist.is_available() and dist.is_initialized()
        self.rank = dist.get_rank() if self.distributed else 0
        self.world = dist.get_world_size() if self.distributed else 1

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            by_shape: dict[tuple[int, ...], list[Tensor]] = {}
            for p in params:
                by_shape.setdefault(tuple(p.shape), []).append(p)
            flat = torch.zeros(sum(p.numel() for p in params), device=params[0].device, dtype=torch.float32) if params else None
            offset = 0
            for index, (shape, same) in enumerate(sorted(by_shape.items())):
                size = len(same) * same[0].numel()
                if index % self.world == self.rank:
                    bufs = []
                    for p in same:
                        state = self.state[p]
                        if "momentum_buffer" not in state:
                            state["momentum_buffer"] = torch.zeros_like(p.grad)
                        state["momentum_buffer"].mul_(group["momentum"]).add_(p.grad)
                        bufs.append(p.grad.add(state["momentum_buffer"], alpha=group["momentum"]))
                    update = newton_schulz(torch.stack(bufs), group["backend_steps"]).float()
                    update *= max(1.0, shape[0] / shape[1]) ** 0.5
                    flat[offset : offset + size] = update.reshape(-1)
                offset += size
            if flat is None:
                continue
            if self.distributed:
                dist.all_reduce(flat)
            offset = 0
            for shape, same in sorted(by_shape.items()):
                for p in same:
                    p.mul_(1.0 - group["lr"] * group["weight_decay"])
                    p.add_(flat[offset : offset + p.numel()].view_as(p), alpha=-group["lr"])
                    offset += p.numel()


# -----------------------------------------------------------------------------
# BITS PER BYTE
# -----------------------------------------------------------------------------


def build_byte_tables(tokenizer_path: str, vocab_size: int) -> tuple[Tensor, Tensor, Tensor]:
    """Per-token UTF-8 byte counts (leading '▁' excluded), leading-space flags and boundary flags.

    Control, unknown and unused pieces are boundaries that count zero bytes; byte pieces count one.
    """
    import sentencepiece as spm

    if not os.path.isfile(tokenizer_path):
        raise ConfigError(f"TOKENIZER_PATH={tokenizer_path} is not a file; point it at the SentencePiece .model that made the shards")
    try:
        sp = spm.SentencePieceProcessor(model_file=tokenizer_path)
    except (RuntimeError, OSError) as e:
        raise ConfigError(f"TOKENIZER_PATH={tokenizer_path} is not a SentencePiece model that loads ({e})") from None
    if sp.vocab_size() != vocab_size:
        raise ConfigError(f"tokenizer {tokenizer_path} has {sp.vocab_size()} pieces but VOCAB_SIZE={vocab_size}; "
                          f"set VOCAB_SIZE={sp.vocab_size()} or use the matching TOKENIZER_PATH")
    base = torch.zeros(vocab_size, dtype=torch.int32)
    space = torch.zeros(vocab_size, dtype=torch.bool)
    boundary = torch.ones(vocab_size, dtype=torch.bool)
    for i in range(vocab_size):
        if sp.is_control(i) or sp.is_unknown(i) or sp.is_unused(i):
            continue
        boundary[i] = False
        if sp.is_byte(i):
            base[i] = 1
            continue
        piece = sp.id_to_piece(i)
        if piece.startswith("\u2581"):
            space[i] = True
            piece = piece[1:]
        base[i] = len(piece.encode("utf-8"))
    return base, space, boundary


def count_bytes(prev: Tensor, target: Tensor, tables: tuple[Tensor, Tensor, Tensor]) -> Tensor:
    """UTF-8 bytes of each target piece; its leading space counts unless the previous token is a boundary."""
    base, space, boundary = (t.to(target.device) for t in tables)
    return base[target].long() + (space[target] & ~boundary[prev]).long()


# -----------------------------------------------------------------------------
# DATA
# -----------------------------------------------------------------------------


def shard_tokens(path: str) -> np.ndarray:
    """Memory-map a shard's tokens after checking its header and length; raise ConfigError naming the file."""
    size = os.path.getsize(path)
    header = np.fromfile(path, dtype="<i4", count=SHARD_HEADER_INTS)
    if header.size < 3 or int(header[0]) != SHARD_MAGIC or int(header[1]) != SHARD_VERSION:
        found = header[:2].tolist()
        raise ConfigError(f"shard {path} has header {found}, expected magic {SHARD_MAGIC} and version {SHARD_VERSION}; "
                          f"rebuild it with tools/make_shards.py")
    count = int(header[2])
    expected = 4 * SHARD_HEADER_INTS + 2 * count
    if size != expected:
        raise ConfigError(f"shard {path} is {size} bytes but its header promises {count} tokens ({expected} bytes); "
                          f"the file is truncated or damaged")
    return np.memmap(path, dtype="<u2", mode="r", offset=4 * SHARD_HEADER_INTS, shape=(count,))


def find_shards(data_path: str, split: str) -> list[str]:
    files = sorted(glob.glob(os.path.join(data_path, f"fineweb_{split}_*.bin")))
    if not files:
        raise ConfigError(f"no fineweb_{split}_*.bin shards in DATA_PATH={data_path}; point DATA_PATH at a folder of "
                          f"challenge shards (or make some with tools/make_shards.py)")
    for path in files:
        shard_tokens(path)
    return files


class TokenStream:
    """Reads shards in order and wraps around; the same sequence on every process."""

    def __init__(self, files: list[str]):
        self.files, self.index, self.pos = files, 0, 0
        self.tokens = shard_tokens(files[0])

    def take(self, n: int) -> np.ndarray:
        parts = []
        while n > 0:
            if self.pos >= len(self.tokens):
                self.index = (self.index + 1) % len(self.files)
                self.tokens, self.pos = shard_tokens(self.files[self.index]), 0
            part = self.tokens[self.pos : self.pos + n]
            parts.append(part)
            self.pos += len(part)
            n -= len(part)
        return np.concatenate(parts)


class TrainLoader:
    """Each call takes one contiguous span per process from the shared stream (+1 token for the shifted targets)."""

    def __init__(self, files: list[str], rank: int, world: int, device: torch.device):
        self.stream, self.rank, self.world, self.device = TokenStream(files), rank, world, device

    def next_batch(self, tokens: int, seq_len: int) -> tuple[Tensor, Tensor]:
        span = tokens + 1
        chunk = self.stream.take(span * self.world)[self.rank * span : (self.rank + 1) * span]
        local = torch.from_numpy(chunk.astype(np.int64))
        if self.device.type == "cuda":
            local = local.pin_memory().to(self.device, non_blocking=True)
        return local[:-1].view(-1, seq_len), local[1:].view(-1, seq_len)


class ValidationData:
    """Validation tokens, loaded on first use. `locked` makes any read raise, so code that builds the artifact cannot touch them."""

    def __init__(self, files: list[str]):
        self.files, self._tokens, self.locked, self.reads = files, None, False, 0

    def tokens(self) -> Tensor:
        if self.locked:
            raise RuntimeError("validation tokens were requested while the artifact is being built")
        self.reads += 1
        if self._tokens is None:
            self._tokens = torch.from_numpy(np.concatenate([shard_tokens(f) for f in self.files]).astype(np.int64))
        return self._tokens


# -----------------------------------------------------------------------------
# TRANSFORMER MODULES
# -----------------------------------------------------------------------------


def rms_norm(x: Tensor) -> Tensor:
    return F.rms_norm(x, (x.size(-1),))


class CastedLinear(nn.Linear):
    """Linear layer without bias whose float32 weight is cast to the input dtype (bf16 under autocast)."""

    def __init__(self, fan_in: int, fan_out: int, zero_init: bool = False):
        super().__init__(fan_in, fan_out, bias=False)
        if zero_init:
            nn.init.zeros_(self.weight)

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.weight.to(x.dtype))


def apply_rotary(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate the first cos.size(-1)*2 dimensions of each head; x is [B, T, H, Dh], cos/sin [T, R/2]."""
    rot = 2 * cos.size(-1)
    x1, x2, rest = x[..., : rot // 2], x[..., rot // 2 : rot], x[..., rot:]
    c, s = cos[None, :, None, :].to(x.dtype), sin[None, :, None, :].to(x.dtype)
    return torch.cat((x1 * c + x2 * s, x2 * c - x1 * s, rest), dim=-1)


class Attention(nn.Module):
    def __init__(self, args: Hyperparameters):
        super().__init__()
        self.heads, self.kv_heads = args.num_heads, args.num_kv_heads
        self.head_dim = args.model_dim // args.num_heads
        kv_dim = self.kv_heads * self.head_dim
        self.c_q = CastedLinear(args.model_dim, args.model_dim)
        self.c_k = CastedLinear(args.model_dim, kv_dim)
        self.c_v = CastedLinear(args.model_dim, kv_dim)
        self.proj = CastedLinear(args.model_dim, args.model_dim, zero_init=True)
        self.q_gain = nn.Parameter(torch.full((self.heads,), args.qk_gain_init))
        self.qk_norm = args.qk_norm

    def forward(self, x: Tensor, rope, value_extra: Tensor | None, v_first: Tensor | None,
                vrl_gate: Tensor | None, exclusive: bool) -> tuple[Tensor, Tensor]:
        bsz, seq, dim = x.shape
        q = self.c_q(x).view(bsz, seq, self.heads, self.head_dim)
        k = self.c_k(x).view(bsz, seq, self.kv_heads, self.head_dim)
        v = self.c_v(x).view(bsz, seq, self.kv_heads, self.head_dim)
        if value_extra is not None:
            v = v + value_extra.view_as(v)
        if v_first is not None:
            v = torch.lerp(v, v_first, vrl_gate.to(v.dtype))
        if self.qk_norm:
            q, k = rms_norm(q), rms_norm(k)
        if rope is not None:
            q, k = apply_rotary(q, *rope), apply_rotary(k, *rope)
        q = q * self.q_gain.to(q.dtype)[None, None, :, None]
        # [B, H, T, Dh] layout for scaled_dot_product_attention; kv heads are shared by groups of query heads.
        y = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True,
                                           enable_gqa=self.kv_heads != self.heads)
        if exclusive:
            # Exclusive self-attention: drop each head's component along the token's own (unit) value vector.
            own = F.normalize(v.transpose(1, 2), dim=-1).repeat_interleave(self.heads // self.kv_heads, dim=1)
            y = y - (y * own).sum(-1, keepdim=True) * own
        return self.proj(y.transpose(1, 2).reshape(bsz, seq, dim)), v


class MLP(nn.Module):
    def __init__(self, args: Hyperparameters):
        super().__init__()
        self.fc = CastedLinear(args.model_dim, args.mlp_mult * args.model_dim)
        self.proj = CastedLinear(args.mlp_mult * args.model_dim, args.model_dim, zero_init=True)

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(F.leaky_relu(self.fc(x), 0.5).square())


class Block(nn.Module):
    def __init__(self, args: Hyperparameters):
        super().__init__()
        self.attn, self.mlp = Attention(args), MLP(args)
        self.attn_scale = nn.Parameter(torch.ones(args.model_dim))
        self.mlp_scale = nn.Parameter(torch.ones(args.model_dim))
        self.resid_mix = nn.Parameter(torch.stack((torch.ones(args.model_dim), torch.zeros(args.model_dim))))

    def forward(self, x: Tensor, x0: Tensor, layer: dict) -> tuple[Tensor, Tensor]:
        """Run one effective layer. `layer` contains that layer's own inputs (scales, gates, value extras)."""
        mix = self.resid_mix.to(x.dtype)
        x = mix[0] * x + mix[1] * x0
        norm_scale = layer["norm_scale"]
        attn_out, v = self.attn(rms_norm(x) * norm_scale, layer["rope"], layer["value_extra"], layer["v_first"],
                                layer["vrl_gate"], layer["exclusive"])
        update = self.attn_scale.to(x.dtype) * attn_out
        if layer["iter_scale"] is not None:
            update = update * layer["iter_scale"].to(x.dtype)
        mlp_out = self.mlp(rms_norm(x + update) * norm_scale)
        mlp_update = self.mlp_scale.to(x.dtype) * mlp_out
        if layer["iter_scale"] is not None:
            mlp_update = mlp_update * layer["iter_scale"].to(x.dtype)
        update = update + mlp_update
        if layer["highway"] is not None:
            alpha, beta = layer["highway"].to(x.dtype)
            return alpha * x + beta * update, v
        return x + update, v


class BigramHash(nn.Module):
    """Embedding of a hash of (previous token, token); a position holding BOS, or the first one, hashes without a previous token."""

    def __init__(self, vocab: int, buckets: int, dim: int, model_dim: int):
        super().__init__()
        self.vocab, self.buckets = vocab, buckets
        self.embed = nn.Embedding(buckets, dim)
        nn.init.zeros_(self.embed.weight)
        self.proj = CastedLinear(dim, model_dim)
        self.gain = nn.Parameter(torch.ones(()))

    def bucket(self, ids: Tensor) -> Tensor:
        prev = F.pad(ids[:, :-1], (1, 0), value=self.vocab)
        prev = torch.where(ids == BOS_ID, self.vocab, prev)
        pair = prev * (self.vocab + 1) + ids
        return (pair * 2654435761) % self.buckets  # Knuth's multiplicative hash; no int64 overflow for vocab <= 65536

    def forward(self, ids: Tensor) -> Tensor:
        return self.gain * self.proj(self.embed(self.bucket(ids)))


class ValueEmbedding(nn.Module):
    """Token embedding projected to the key/value width and added to the attention values of chosen layers."""

    def __init__(self, vocab: int, dim: int, kv_dim: int, num_layers: int):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        nn.init.normal_(self.embed.weight, std=0.01)
        self.proj = CastedLinear(dim, kv_dim)
        self.gain = nn.Parameter(torch.ones(()))
        self.layer_scales = nn.Parameter(torch.ones(num_layers))

    def forward(self, ids: Tensor) -> Tensor:
        return self.gain * self.proj(self.embed(ids))


class SmearGate(nn.Module):
    """Blend each position's embedding with the previous position's, through a learned per-channel gate; BOS gets nothing."""

    def __init__(self, dim: int):
        super().__init__()
        self.gate = nn.Parameter(torch.full((dim,), -3.0))  # sigmoid(-3) ~ 0.05: starts close to the plain embedding

    def forward(self, x: Tensor, ids: Tensor) -> Tensor:
        prev = F.pad(x[:, :-1], (0, 0, 1, 0))
        starts = (ids == BOS_ID).unsqueeze(-1)
        starts[:, 0] = True
        prev = torch.where(starts, x, prev)  # a document start blends with itself, i.e. stays as it is
        return torch.lerp(x, prev, torch.sigmoid(self.gate).to(x.dtype))


class GPT(nn.Module):
    def __init__(self, args: Hyperparameters):
        super().__init__()
        self.layers = layers = args.effective_layers
        dim, head_dim = args.model_dim, args.model_dim // args.num_heads
        self.softcap = args.logit_softcap
        self.tok_emb = nn.Embedding(args.vocab_size, dim)
        nn.init.normal_(self.tok_emb.weight, std=args.tied_embed_init_std)
        self.lm_head = None if args.tie_embeddings else CastedLinear(dim, args.vocab_size, zero_init=True)
        self.bigram = BigramHash(args.vocab_size, args.bigram_buckets, args.bigram_dim, dim) if args.bigram_buckets else None
        self.ve_layers = args.ve_layer_indices()
        kv_dim = args.num_kv_heads * head_dim
        self.value_embed = ValueEmbedding(args.vocab_size, args.ve_dim, kv_dim, len(self.ve_layers)) if self.ve_layers else None
        self.smear = SmearGate(dim) if args.smear_gate else None
        self.encoder_layers = layers // 2 if args.unet_skips else 0
        self.skip_weights = nn.Parameter(torch.ones(layers // 2, dim)) if args.unet_skips and layers > 1 else None
        # Effective layer i runs self.blocks[i % len(self.blocks)]: the same module object on every pass.
        self.blocks = nn.ModuleList(Block(args) for _ in range(args.unique_blocks))
        universal = args.use_universal
        self.iter_embed = nn.Parameter(torch.zeros(layers, dim)) if universal and args.iter_embed else None
        self.iter_scale = nn.Parameter(torch.ones(layers, dim)) if universal and args.iter_scale else None
        self.vrl_gates = nn.Parameter(torch.full((layers - 1,), 0.5)) if args.value_residual and layers > 1 else None
        self.highway = nn.Parameter(torch.ones(layers, 2)) if args.scaled_highway else None
        self.xsa_from = layers - args.xsa_last_n
        self.ln_scale = args.ln_scale
        if args.rope_dims:
            inv_freq = 1.0 / args.rope_base ** (torch.arange(0, args.rope_dims, 2, dtype=torch.float32) / args.rope_dims)
            angles = torch.outer(torch.arange(max(args.train_seq_len, args.eval_seq_len), dtype=torch.float32), inv_freq)
            self.register_buffer("rope_cos", angles.cos(), persistent=False)
            self.register_buffer("rope_sin", angles.sin(), persistent=False)
        else:
            self.rope_cos = self.rope_sin = None

    def block_for_layer(self, i: int) -> Block:
        return self.blocks[i % len(self.blocks)]

    def hidden(self, ids: Tensor) -> Tensor:
        """Final normalised hidden states [B, T, D] for input ids [B, T]."""
        seq = ids.size(1)
        x = self.tok_emb(ids)
        if self.smear is not None:
            x = self.smear(x, ids)
        if self.bigram is not None:
            x = x + self.bigram(ids)
        x = x0 = rms_norm(x)
        rope = None if self.rope_cos is None else (self.rope_cos[:seq], self.rope_sin[:seq])
        value_embed = self.value_embed(ids) if self.value_embed is not None else None
        skips: list[Tensor] = []
        v_first = None
        for i in range(self.layers):
            if self.skip_weights is not None and i >= self.encoder_layers and skips:
                x = x + self.skip_weights[i - self.encoder_layers].to(x.dtype) * skips.pop()
            if self.iter_embed is not None:
                x = x + self.iter_embed[i].to(x.dtype)
            value_extra = None
            if value_embed is not None and i in self.ve_layers:
                value_extra = self.value_embed.layer_scales[self.ve_layers.index(i)].to(x.dtype) * value_embed
            layer = dict(
                rope=rope, value_extra=value_extra, exclusive=i >= self.xsa_from,
                norm_scale=1.0 / math.sqrt(i + 1) if self.ln_scale else 1.0,
                v_first=v_first if self.vrl_gates is not None and i > 0 else None,
                vrl_gate=self.vrl_gates[i - 1] if self.vrl_gates is not None and i > 0 else None,
                iter_scale=self.iter_scale[i] if self.iter_scale is not None else None,
                highway=self.highway[i] if self.highway is not None else None,
            )
            x, v = self.block_for_layer(i)(x, x0, layer)
            if i == 0:
                v_first = v
            if i < self.encoder_layers:
                skips.append(x)
        return rms_norm(x)

    def logits(self, h: Tensor) -> Tensor:
        weight = self.tok_emb.weight if self.lm_head is None else self.lm_head.weight
        logits = F.linear(h, weight.to(h.dtype)).float()
        return self.softcap * torch.tanh(logits / self.softcap)

    def forward(self, ids: Tensor, targets: Tensor, reduction: str = "mean") -> Tensor:
        logits = self.logits(self.hidden(ids))
        loss = F.cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1), reduction=reduction)
        return loss if reduction == "mean" else loss.view_as(targets)


def parameter_groups(model: GPT) -> dict[str, int]:
    """Parameter count of each named group of the model (the sum is the model's total)."""
    names = {"tok_emb": "token_embedding", "lm_head": "lm_head", "bigram": "bigram_hash", "value_embed": "value_embedding",
             "smear": "smear_gate", "skip_weights": "unet_skips", "blocks": "blocks", "iter_embed": "iter_embed",
             "iter_scale": "iter_scale", "vrl_gates": "value_residual", "highway": "scaled_highway"}
    counts: dict[str, int] = {}
    for name, p in model.named_parameters():
        group = names[name.split(".")[0]]
        counts[group] = counts.get(group, 0) + p.numel()
    return counts


def is_matrix(name: str, p: Tensor) -> bool:
    """Matrices that Muon trains and GPTQ quantizes: the weights of every CastedLinear but the untied head."""
    return p.ndim == 2 and name.endswith(".weight") and not name.startswith(("tok_emb", "lm_head", "bigram.embed", "value_embed.embed"))


def is_embedding_table(name: str) -> bool:
    return name.startswith(("tok_emb", "lm_head", "bigram.embed", "value_embed.embed"))


# -----------------------------------------------------------------------------
# WEIGHT AVERAGING
# -----------------------------------------------------------------------------


class WeightAverages:
    """EMA of the parameters, updated every step, and SWA snapshots; both kept in float32."""

    def __init__(self, params: list[Tensor], decay: float):
        self.decay = decay
        self.ema = [p.detach().float().clone() for p in params]
        self.swa_sum = [torch.zeros_like(e) for e in self.ema]
        self.swa_count = 0

    @torch.no_grad()
    def update_ema(self, params: list[Tensor]) -> None:
        # ema <- decay * ema + (1 - decay) * p
        torch._foreach_lerp_(self.ema, [p.detach().float() for p in params], 1.0 - self.decay)

    @torch.no_grad()
    def add_snapshot(self, params: list[Tensor]) -> None:
        torch._foreach_add_(self.swa_sum, [p.detach().float() for p in params])
        self.swa_count += 1

    def swa(self) -> list[Tensor]:
        return [s / self.swa_count for s in self.swa_sum]


# -----------------------------------------------------------------------------
# QUANTIZATION AND ARTIFACT
# -----------------------------------------------------------------------------
# Matrices: int6 codes in [-31, 31] with one float16 scale per output row, filled by GPTQ (or by
# rounding to nearest with the same scales). Embedding tables: int8 per row. Everything else: float16.
CLIP_RATIOS = (1.0, 0.98, 0.95, 0.92, 0.88, 0.84, 0.8, 0.75)
CODECS = {b"x": ("lzma", lambda b: lzma.compress(b, preset=9 | lzma.PRESET_EXTREME), lzma.decompress),
          b"b": ("bz2", lambda b: bz2.compress(b, 9), bz2.decompress),
          b"z": ("zlib", lambda b: zlib.compress(b, 9), zlib.decompress)}
ARTIFACT_FORMAT = "pgolf-universal-int6-v1"


def row_scales(w: Tensor, qmax: int) -> Tensor:
    """Per-row scale, float16-representable: the clip of max|w| with the smallest rounding error in that row."""
    amax = w.abs().amax(dim=1).clamp_min(1e-8)
    best, best_err = None, None
    for ratio in CLIP_RATIOS:
        scale = (amax * ratio / qmax).half().float().clamp_min(1e-7)
        err = ((w / scale[:, None]).round().clamp(-qmax, qmax) * scale[:, None] - w).square().sum(dim=1)
        if best is None:
            best, best_err = scale, err
        else:
            better = err < best_err
            best, best_err = torch.where(better, scale, best), torch.where(better, err, best_err)
    return best


def round_to_nearest(w: Tensor, scale: Tensor, qmax: int) -> Tensor:
    return (w / scale[:, None]).round().clamp(-qmax, qmax).to(torch.int8)


def gptq(w: Tensor, hessian: Tensor, scale: Tensor, block: int, damp: float) -> Tensor:
    """Quantize w [rows, cols] column by column, spreading each column's error over the columns not yet
    quantized through the inverse Hessian of the layer inputs (Frantar et al., 2022), in order of
    decreasing Hessian diagonal. Returns int8 codes in [-INT6_MAX, INT6_MAX]."""
    w, h = w.float().clone(), hessian.float().clone()
    dead = h.diagonal() == 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    order = torch.argsort(h.diagonal(), descending=True)
    w, h = w[:, order], h[order][:, order]
    eye = torch.eye(h.size(0), device=h.device)
    for attempt in range(5):
        try:
            chol = torch.linalg.cholesky(h + eye * (damp * 10**attempt) * h.diagonal().mean())
            hinv = torch.linalg.cholesky(torch.cholesky_inverse(chol), upper=True)
            break
        except torch.linalg.LinAlgError:
            continue
    else:
        raise RuntimeError("GPTQ: the Hessian stayed singular after 5 damping increases")
    codes = torch.zeros_like(w)
    for start in range(0, w.size(1), block):
        end = min(start + block, w.size(1))
        wb, hb = w[:, start:end].clone(), hinv[start:end, start:end]
        errors = torch.zeros_like(wb)
        for j in range(end - start):
            q = (wb[:, j] / scale).round().clamp(-INT6_MAX, INT6_MAX)
            codes[:, start + j] = q
            errors[:, j] = (wb[:, j] - q * scale) / hb[j, j]
            wb[:, j:] -= errors[:, j : j + 1] * hb[j : j + 1, j:]
        w[:, end:] -= errors @ hinv[start:end, end:]
    return codes[:, torch.argsort(order)].to(torch.int8)


@torch.no_grad()
def collect_hessians(model: GPT, batches, autocast) -> dict[str, Tensor]:
    """Sum x^T x over the inputs of every quantized matrix. A shared block's matrix is called once per
    effective layer that uses it, so its Hessian is the sum over all those layers."""
    hessians: dict[str, Tensor] = {}
    hooks = []
    for name, module in model.named_modules():
        if isinstance(module, CastedLinear) and is_matrix(name + ".weight", module.weight):
            def hook(mod, inputs, output, key=name + ".weight"):
                x = inputs[0].detach().reshape(-1, inputs[0].size(-1)).float()
                if key not in hessians:
                    hessians[key] = torch.zeros(x.size(1), x.size(1), device=x.device)
                hessians[key].addmm_(x.T, x)
            hooks.append(module.register_forward_hook(hook))
    try:
        for ids in batches:
            with autocast():
                model.hidden(ids)
    finally:
        for handle in hooks:
            handle.remove()
    if dist.is_available() and dist.is_initialized():
        for key in sorted(hessians):
            dist.all_reduce(hessians[key])
    return hessians


def quantize_state(model: GPT, hessians: dict[str, Tensor] | None, args: Hyperparameters) -> dict[str, tuple]:
    """Map each state tensor to (kind, codes, scales) for int6/int8 or ("fp16", values, None)."""
    entries: dict[str, tuple] = {}
    for name, p in model.state_dict().items():
        w = p.detach().float()
        if is_matrix(name, p):
            scale = row_scales(w, INT6_MAX)
            if hessians is not None:
                codes = gptq(w, hessians[name], scale, args.gptq_block, args.gptq_damp)
            else:
                codes = round_to_nearest(w, scale, INT6_MAX)
            entries[name] = ("int6", codes.cpu(), scale.half().cpu())
        elif is_embedding_table(name):
            scale = row_scales(w, 127)
            entries[name] = ("int8", round_to_nearest(w, scale, 127).cpu(), scale.half().cpu())
        else:
            entries[name] = ("fp16", w.half().cpu(), None)
    return entries


def serialize(entries: dict[str, tuple], args: Hyperparameters) -> bytes:
    """Header JSON (model settings, tensor table), then all codes, all scales, all float16 values. Grouping
    by kind puts similar bytes next to each other, which the compressors exploit."""
    header = {"format": ARTIFACT_FORMAT, "model": {n: getattr(args, n.lower()) for n in MODEL_SETTINGS},
              "tensors": [[name, kind, list(values.shape)] for name, (kind, values, _) in entries.items()]}
    blob = json.dumps(header, separators=(",", ":")).encode()
    codes = [v.numpy().tobytes() for kind, v, _ in entries.values() if kind != "fp16"]
    scales = [s.numpy().tobytes() for kind, _, s in entries.values() if kind != "fp16"]
    floats = [v.numpy().tobytes() for kind, v, _ in entries.values() if kind == "fp16"]
    return len(blob).to_bytes(4, "little") + blob + b"".join(codes + scales + floats)


def deserialize(payload: bytes) -> tuple[dict, dict[str, Tensor]]:
    """Return (model settings, float32 state dict) from a serialized payload."""
    size = int.from_bytes(payload[:4], "little")
    header = json.loads(payload[4 : 4 + size])
    if header.get("format") != ARTIFACT_FORMAT:
        raise ConfigError(f"artifact format {header.get('format')!r} is not {ARTIFACT_FORMAT!r}")
    pos = 4 + size

    def take(count: int, dtype) -> np.ndarray:
        nonlocal pos
        width = np.dtype(dtype).itemsize * count
        out = np.frombuffer(payload[pos : pos + width], dtype=dtype)
        pos += width
        return out

    table = header["tensors"]
    codes = {name: take(math.prod(shape), np.int8) for name, kind, shape in table if kind != "fp16"}
    scales = {name: take(shape[0], np.float16) for name, kind, shape in table if kind != "fp16"}
    state = {}
    for name, kind, shape in table:
        if kind == "fp16":
            state[name] = torch.from_numpy(take(math.prod(shape), np.float16).copy()).float().view(shape)
        else:
            q = torch.from_numpy(codes[name].copy()).float().view(shape)
            state[name] = q * torch.from_numpy(scales[name].copy()).float()[:, None]
    if pos != len(payload):
        raise ConfigError(f"artifact payload has {len(payload) - pos} trailing bytes; the file is damaged")
    return header["model"], state


def compress_best(payload: bytes) -> tuple[bytes, dict[str, int]]:
    """Compress with every codec; return the smallest as codec id byte + data, and every codec's size."""
    sizes, best = {}, None
    for key, (name, compress, _) in CODECS.items():
        data = key + compress(payload)
        sizes[name] = len(data)
        if best is None or len(data) < len(best):
            best = data
    return best, sizes


def load_artifact(path: str) -> tuple[dict, dict[str, Tensor]]:
    data = Path(path).read_bytes()
    if data[:1] not in CODECS:
        raise ConfigError(f"ARTIFACT_PATH={path} does not start with a known codec byte; is it an artifact of this script?")
    return deserialize(CODECS[data[:1]][2](data[1:]))


def model_from_artifact(path: str, args: Hyperparameters, device: torch.device) -> tuple[GPT, Hyperparameters]:
    """Build a fresh model with the artifact's own model settings and load its dequantized weights."""
    model_settings, state = load_artifact(path)
    model_args = copy.copy(args)
    for name, value in model_settings.items():  # JSON keeps each setting's type: bool, int, float or str
        setattr(model_args, name.lower(), value)
    model = GPT(model_args).to(device)
    model.load_state_dict(state, strict=True)
    return model, model_args


# -----------------------------------------------------------------------------
# EVALUATION
# -----------------------------------------------------------------------------
# Target t (1 <= t < N) is token t of the validation stream, predicted from tokens [0, t). A window
# [a, b) of input tokens predicts targets a+1 .. b. Windows end every EVAL_STRIDE targets, the last one
# at N-1. Each scores only the targets after the previous window's end, so every target is scored
# exactly once. After the first window, each target has at least EVAL_SEQ_LEN - EVAL_STRIDE tokens of context.
EVAL_PROGRESS_SECONDS = 15.0  # at most one progress line this often


class Evaluation:
    """Inputs shared by every evaluation: tokens, byte tables, process rank and count, batch size, log."""

    def __init__(self, args: Hyperparameters, tokens: Tensor, byte_tables, rank: int, world: int,
                 device: torch.device, autocast, log=print):
        self.args, self.rank, self.world, self.device, self.autocast, self.log = args, rank, world, device, autocast, log
        self.tokens = tokens.to(device)
        self.byte_tables = tuple(t.to(device) for t in byte_tables)
        self.batch_windows = max(1, args.val_batch_size // (8 * args.eval_seq_len))

    def reduce(self, loss_sum: Tensor, count: Tensor, byte_count: Tensor) -> tuple[float, float]:
        """Sum over processes; return (mean loss in nats, bits per byte)."""
        totals = torch.stack((loss_sum, count.double(), byte_count.double()))
        if self.world > 1:
            dist.all_reduce(totals)
        loss = (totals[0] / totals[1]).item()
        return loss, loss / math.log(2.0) * (totals[1] / totals[2]).item()


def model_functions(model: GPT, use_compile: bool):
    """Return (per-token loss of [B, T] targets, hidden states): both compiled when asked."""

    def token_losses(ids: Tensor, targets: Tensor) -> Tensor:
        return model(ids, targets, reduction="none")

    if use_compile:
        return torch.compile(token_losses, dynamic=False), torch.compile(model.hidden, dynamic=False)
    return token_losses, model.hidden


@torch.no_grad()
def evaluate_standard(functions, ev: Evaluation) -> tuple[float, float]:
    """Non-overlapping EVAL_SEQ_LEN windows, then one full-length window ending at the last token that
    scores only the targets the others left (the tail). Scores whole windows with the training loss."""
    token_losses = functions[0]
    total = ev.tokens.numel() - 1
    seq = min(ev.args.eval_seq_len, total)
    starts = np.arange(0, total - seq + 1, seq, dtype=np.int64)
    first_scored = np.zeros_like(starts)
    if starts[-1] + seq < total:
        starts = np.append(starts, total - seq)
        first_scored = np.append(first_scored, starts[-2] + 2 * seq - total)
    loss_sum = torch.zeros((), device=ev.device, dtype=torch.float64)
    count = torch.zeros((), device=ev.device, dtype=torch.long)
    byte_count = torch.zeros_like(count)
    first, last = len(starts) * ev.rank // ev.world, len(starts) * (ev.rank + 1) // ev.world
    for batch_start in range(first, last, ev.batch_windows):
        index = np.arange(batch_start, min(batch_start + ev.batch_windows, last))
        ids, scored, _ = padded_batch(ev, starts, first_scored, index, seq)
        x, y = ids[:, :-1], ids[:, 1:]
        with ev.autocast():
            losses = token_losses(x, y)
        loss_sum += losses.double()[scored].sum()
        count += scored.sum()
        byte_count += count_bytes(x[scored], y[scored], ev.byte_tables).sum()
    return ev.reduce(loss_sum, count, byte_count)


def padded_batch(ev: Evaluation, starts: np.ndarray, first_scored: np.ndarray, index: np.ndarray, seq: int):
    """Token windows [batch_windows, seq + 1] (inputs and their targets), the mask of scored targets and
    the targets' positions in the stream. Short batches are padded with copies of their last window that
    score nothing, so a compiled model always gets one shape."""
    pad = ev.batch_windows - len(index)
    batch_starts = torch.from_numpy(np.concatenate((starts[index], np.repeat(starts[index[-1:]], pad)))).to(ev.device)
    batch_first = torch.from_numpy(np.concatenate((first_scored[index], np.full(pad, seq)))).to(ev.device)
    positions = batch_starts[:, None] + torch.arange(seq + 1, device=ev.device)
    scored = positions[:, :seq] - batch_starts[:, None] >= batch_first[:, None]
    return ev.tokens[positions], scored, positions[:, 1:]


def window_plan(total_targets: int, seq_len: int, stride: int) -> tuple[np.ndarray, np.ndarray]:
    """Window input starts and first scored offsets; window k reads tokens [start, start + min(seq_len, total))."""
    seq = min(seq_len, total_targets)
    ends = np.arange(seq, total_targets + stride, stride, dtype=np.int64)
    ends = np.minimum(ends, total_targets)
    ends = ends[np.concatenate(([True], ends[1:] > ends[:-1]))]
    starts = ends - seq
    previous_end = np.concatenate(([0], ends[:-1]))
    return starts, previous_end - starts


CACHE_CHUNK = 512  # targets scored together by a cache before they join it; bounds its n x n and n x store matrices


class NgramCache:
    """Counts of the tokens that followed each context among the targets scored before, for orders
    2 .. NGRAM_ORDER. Contexts of one token index the table directly, longer ones are hashed into
    NGRAM_BUCKETS rows. The distribution backs off to the longest context seen before."""

    def __init__(self, args: Hyperparameters, vocab: int, device: torch.device):
        self.vocab, self.buckets = vocab, args.ngram_buckets
        self.orders = list(range(args.ngram_order, 1, -1))
        self.tables = {n: torch.zeros(self.vocab if n == 2 else self.buckets, self.vocab, device=device) for n in self.orders}

    def rows(self, tokens: Tensor, targets: Tensor, order: int) -> tuple[Tensor, Tensor]:
        """Table row of the context before each target, and whether that context lies inside the stream."""
        valid = targets - (order - 1) >= 0
        key = torch.zeros_like(targets)
        for back in range(order - 1, 0, -1):
            key = key * self.vocab + tokens[(targets - back).clamp_min(0)]
        return (key if order == 2 else (key * 2654435761) % self.buckets), valid

    def add(self, tokens: Tensor, targets: Tensor) -> None:
        y = tokens[targets]
        for n in self.orders:
            rows, valid = self.rows(tokens, targets, n)
            self.tables[n].index_put_((rows[valid], y[valid]), torch.ones_like(rows[valid], dtype=torch.float32), accumulate=True)

    def distribution(self, tokens: Tensor, targets: Tensor) -> tuple[Tensor, Tensor]:
        """Dense [n, V] cache distribution for ascending targets, counting the earlier targets of the same call too."""
        y_onehot = F.one_hot(tokens[targets], self.vocab).float()
        earlier = targets[None, :] < targets[:, None]
        rows_out = torch.zeros(targets.numel(), self.vocab, device=targets.device)
        found = torch.zeros(targets.numel(), dtype=torch.bool, device=targets.device)
        for n in self.orders:
            rows, valid = self.rows(tokens, targets, n)
            same = (rows[None, :] == rows[:, None]) & earlier & valid[None, :] & valid[:, None]
            counts = self.tables[n][rows] * valid[:, None] + same.float() @ y_onehot
            totals = counts.sum(dim=1)
            use = (totals > 0) & ~found
            rows_out = torch.where(use[:, None], counts / totals.clamp_min(1)[:, None], rows_out)
            found |= use
        return rows_out, found

    def score(self, tokens: Tensor, targets: Tensor) -> tuple[Tensor, Tensor]:
        """Distributions for ascending targets, taking each chunk into the tables once it is scored."""
        parts = []
        for i in range(0, targets.numel(), CACHE_CHUNK):
            chunk = targets[i : i + CACHE_CHUNK]
            parts.append(self.distribution(tokens, chunk))
            self.add(tokens, chunk)
        return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])


class KnnCache:
    """kNN-LM datastore: final hidden states of scored targets and the tokens that followed. Target t
    searches the targets in [t - KNN_STORE, t) and weights its KNN_K nearest by softmax(-d^2 / KNN_TEMP)."""

    def __init__(self, args: Hyperparameters, vocab: int, dim: int, device: torch.device):
        self.k, self.temp, self.store, self.vocab = args.knn_k, args.knn_temp, args.knn_store, vocab
        self.keys = torch.zeros(0, dim, device=device)
        self.values = torch.zeros(0, dtype=torch.long, device=device)
        self.positions = torch.zeros(0, dtype=torch.long, device=device)

    def add(self, hidden: Tensor, targets: Tensor, values: Tensor) -> None:
        keep = self.positions > targets.max() - self.store
        self.keys = torch.cat((self.keys[keep], hidden.float()))
        self.values = torch.cat((self.values[keep], values))
        self.positions = torch.cat((self.positions[keep], targets))

    def distribution(self, hidden: Tensor, targets: Tensor, values: Tensor) -> tuple[Tensor, Tensor]:
        """Dense [n, V] kNN distribution for ascending targets, searching the earlier targets of the same call too."""
        keys, vals = torch.cat((self.keys, hidden.float())), torch.cat((self.values, values))
        positions = torch.cat((self.positions, targets))
        q = hidden.float()
        d2 = (q.square().sum(1, keepdim=True) - 2 * q @ keys.T + keys.square().sum(1)[None]).clamp_min(0)
        usable = (positions[None, :] < targets[:, None]) & (positions[None, :] >= targets[:, None] - self.store)
        d2 = d2.masked_fill(~usable, float("inf"))
        near, index = d2.topk(min(self.k, keys.size(0)), dim=1, largest=False)
        found = torch.isfinite(near[:, 0])
        weights = torch.softmax((-near / self.temp).masked_fill(~torch.isfinite(near), float("-inf")), dim=1)
        weights = torch.where(found[:, None], weights, torch.zeros_like(weights))
        return torch.zeros(q.size(0), self.vocab, device=q.device).scatter_add_(1, vals[index], weights), found

    def score(self, hidden: Tensor, targets: Tensor, values: Tensor) -> tuple[Tensor, Tensor]:
        parts = []
        for i in range(0, targets.numel(), CACHE_CHUNK):
            chunk = slice(i, i + CACHE_CHUNK)
            parts.append(self.distribution(hidden[chunk], targets[chunk], values[chunk]))
            self.add(hidden[chunk], targets[chunk], values[chunk])
        return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])


def mix_log_prob(logp: Tensor, y: Tensor, caches: list[tuple[float, Tensor, Tensor]]) -> Tensor:
    """log p(y) of the mixture p <- (1 - w) p + w p_cache, applied for each (w, p_cache, found) in turn
    where that cache has data. Computed as log p_model(y) + log(ratio) so that w = 0 gives exactly the model."""
    lp = logp.gather(1, y[:, None]).squeeze(1).double()
    ratio = torch.ones_like(lp)
    for weight, dist_rows, found in caches:
        w = weight * found.double()
        ratio = (1 - w) * ratio + w * dist_rows.gather(1, y[:, None]).squeeze(1).double() / lp.exp()
    return lp + ratio.log()


@torch.no_grad()
def evaluate_sliding(functions, model: GPT, ev: Evaluation, stride: int, token_loss_out: Tensor | None = None):
    """Sliding-window loss and BPB; this process scores a contiguous run of windows. With NGRAM_EVAL or
    KNN_LAMBDA the caches first take in the targets before that run, so the result does not depend on how
    many processes share the work. `token_loss_out`, if given, receives each target's loss (single process)."""
    args, tokens, hidden_fn = ev.args, ev.tokens, functions[1]
    total = tokens.numel() - 1
    starts, first_scored = window_plan(total, args.eval_seq_len, stride)
    seq = min(args.eval_seq_len, total)
    first, last = len(starts) * ev.rank // ev.world, len(starts) * (ev.rank + 1) // ev.world
    first_target = int(starts[first] + first_scored[first]) + 1 if first < last else 1
    vocab, dim = model.tok_emb.weight.shape  # the scored model's, which EVAL_ONLY reads from the artifact
    ngram = NgramCache(args, vocab, ev.device) if args.ngram_eval else None
    knn = KnnCache(args, vocab, dim, ev.device) if args.knn_lambda > 0 else None
    if ngram is not None:
        for chunk in range(1, first_target, 1 << 20):
            ngram.add(tokens, torch.arange(chunk, min(chunk + (1 << 20), first_target), device=ev.device))
    warm_from = first
    if knn is not None:  # earlier windows whose targets the kNN datastore must hold before scoring starts
        while warm_from > 0 and starts[warm_from] + first_scored[warm_from] >= first_target - args.knn_store:
            warm_from -= 1
    loss_sum = torch.zeros((), device=ev.device, dtype=torch.float64)
    count = torch.zeros((), device=ev.device, dtype=torch.long)
    byte_count = torch.zeros_like(count)
    started = last_note = time.perf_counter()
    batches = [(b, min(b + ev.batch_windows, first), False) for b in range(warm_from, first, ev.batch_windows)]
    batches += [(b, min(b + ev.batch_windows, last), True) for b in range(first, last, ev.batch_windows)]
    for batch_first_window, batch_end, scoring in batches:
        index = np.arange(batch_first_window, batch_end)
        ids, scored, positions = padded_batch(ev, starts, first_scored, index, seq)
        with ev.autocast():
            hidden = hidden_fn(ids[:, :-1])
        targets = positions[scored]
        h = hidden[scored].float()
        y = tokens[targets]
        if not scoring:
            knn.add(h, targets, y)
            continue
        caches = []
        if ngram is not None:
            caches.append((args.ngram_weight, *ngram.score(tokens, targets)))
        if knn is not None:
            caches.append((args.knn_lambda, *knn.score(h, targets, y)))
        losses = -mix_log_prob(torch.log_softmax(model.logits(h), dim=-1), y, caches)
        loss_sum += losses.sum()
        count += targets.numel()
        byte_count += count_bytes(tokens[targets - 1], y, ev.byte_tables).sum()
        if token_loss_out is not None:
            token_loss_out[targets - 1] = losses.to(token_loss_out.dtype)
        now = time.perf_counter()
        if ev.rank == 0 and now - last_note >= EVAL_PROGRESS_SECONDS:
            last_note = now
            ev.log(f"eval_progress:sliding windows:{batch_end - first}/{last - first} elapsed:{now - started:.1f}s")
    return ev.reduce(loss_sum, count, byte_count)


# -----------------------------------------------------------------------------
# TRAINING
# -----------------------------------------------------------------------------
CHALLENGE_SECONDS = 600.0  # each of training (with quantization) and evaluation, on 8xH100
CHALLENGE_BYTES = 16_000_000
CALIB_BATCH_SEQS = 8  # calibration sequences per forward pass
NO_STEP = 2**31 - 1


class RunFailure(RuntimeError):
    """The run started but cannot end correctly: a non-finite loss, or an artifact over the limit."""


class Runtime:
    """This process's place in the job (rank, world size), its device and its numeric mode."""

    def __init__(self, args: Hyperparameters):
        self.distributed = "RANK" in os.environ and "WORLD_SIZE" in os.environ
        self.rank, self.world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        self.accum = 8 // self.world
        cuda = torch.cuda.is_available()
        self.device = torch.device("cuda", self.local_rank) if cuda else torch.device("cpu")
        if cuda:
            torch.cuda.set_device(self.device)
            torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
        if self.distributed:
            dist.init_process_group("nccl" if cuda else "gloo", device_id=self.device if cuda else None)
        self.compile = args.compile == "1" or (args.compile == "auto" and cuda)
        self.master = self.rank == 0

    def autocast(self):
        return torch.autocast("cuda", dtype=torch.bfloat16) if self.device.type == "cuda" else contextlib.nullcontext()

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()


class RunLog:
    """Console and logs/<RUN_ID>.txt, written by rank 0 only; a line is on disk as soon as it is logged."""

    def __init__(self, path: str | None):
        self.path = path
        if path:
            os.makedirs(os.path.dirname(path), exist_ok=True)

    def __call__(self, message: str, console: bool = True) -> None:
        if self.path is None:
            return
        if console:
            print(message, flush=True)
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(message + "\n")


def env_form(value: object) -> str:
    return str(int(value)) if isinstance(value, bool) else str(value)


def describe_model(args: Hyperparameters, model: GPT) -> list[str]:
    counts = parameter_groups(model)
    lines = [f"model_params:{sum(counts.values())}", f"unique_block_params:{counts['blocks']}",
             f"effective_layers:{args.effective_layers} unique_blocks:{args.unique_blocks}"]
    return lines + [f"params_{group}:{count}" for group, count in sorted(counts.items())]


def payload_estimate(model: GPT) -> int:
    """Bytes of the serialized model before compression: 6 bits per matrix weight, 8 per embedding weight,
    16 per row scale and per small tensor value."""
    bits = 0
    for name, p in model.state_dict().items():
        if is_matrix(name, p) or is_embedding_table(name):
            bits += p.numel() * (6 if is_matrix(name, p) else 8) + 16 * p.size(0)
        else:
            bits += 16 * p.numel()
    return bits // 8


def build_optimizers(model: GPT, args: Hyperparameters, cuda: bool) -> list[torch.optim.Optimizer]:
    """Muon for the matrices; AdamW for embedding tables (with ADAM_WD), the untied head, and the
    gains, scales, gates and iteration embeddings (no weight decay)."""
    matrices, tables, head, scalars = [], [], [], []
    for name, p in model.named_parameters():
        if is_matrix(name, p):
            matrices.append(p)
        elif name.startswith("lm_head"):
            head.append(p)
        elif is_embedding_table(name):
            tables.append(p)
        else:
            scalars.append(p)
    token_lr = args.tied_embed_lr if args.tie_embeddings else args.embed_lr
    groups = [dict(params=tables, lr=token_lr, weight_decay=args.adam_wd), dict(params=scalars, lr=args.scalar_lr, weight_decay=0.0)]
    if head:
        groups.append(dict(params=head, lr=args.head_lr, weight_decay=args.adam_wd))
    adam = torch.optim.AdamW(groups, betas=(args.beta1, args.beta2), eps=args.adam_eps, fused=cuda)
    muon = Muon(matrices, lr=args.matrix_lr, momentum=args.muon_momentum, backend_steps=args.muon_backend_steps,
                weight_decay=args.muon_wd)
    for opt in (adam, muon):
        for group in opt.param_groups:
            group["base_lr"] = group["lr"]
    return [adam, muon]


def train_step(step_model, loader: TrainLoader, optimizers, args: Hyperparameters, rt: Runtime, lr_scale: float, step: int) -> Tensor:
    """One optimizer step over the global batch, accumulated over rt.accum micro-batches; returns the mean loss (on device)."""
    for opt in optimizers:
        opt.zero_grad(set_to_none=True)
    total = torch.zeros((), device=rt.device)
    local_tokens = args.train_batch_tokens // (rt.world * rt.accum)
    for micro in range(rt.accum):
        x, y = loader.next_batch(local_tokens, args.train_seq_len)
        # Gradients are all-reduced only on the last micro-batch; DDP overlaps that with the backward pass.
        skip_sync = rt.distributed and micro < rt.accum - 1
        with step_model.no_sync() if skip_sync else contextlib.nullcontext():
            with rt.autocast():
                loss = step_model(x, y)
            (loss / rt.accum).backward()
        total += loss.detach()
    warmup = min(step / args.muon_momentum_warmup_steps, 1.0) if args.muon_momentum_warmup_steps > 0 else 1.0
    for opt in optimizers:
        for group in opt.param_groups:
            group["lr"] = group["base_lr"] * lr_scale
            if isinstance(opt, Muon):
                group["momentum"] = (1 - warmup) * args.muon_momentum_warmup_start + warmup * args.muon_momentum
    if args.grad_clip_norm > 0:
        torch.nn.utils.clip_grad_norm_([p for opt in optimizers for g in opt.param_groups for p in g["params"]], args.grad_clip_norm)
    for opt in optimizers:
        opt.step()
    return total / rt.accum


def calibration_batches(args: Hyperparameters, rt: Runtime, train_files: list[str], limit: int | None = None):
    """GPTQ_CALIB_SEQS training sequences from the start of the training data, split over processes."""
    seq, total = args.train_seq_len, args.gptq_calib_seqs
    tokens = TokenStream(train_files).take(total * seq)
    first, last = total * rt.rank // rt.world, total * (rt.rank + 1) // rt.world
    for count, start in enumerate(range(first, last, CALIB_BATCH_SEQS)):
        if limit is not None and count >= limit:
            return
        end = min(start + CALIB_BATCH_SEQS, last)
        yield torch.from_numpy(tokens[start * seq : end * seq].astype(np.int64)).view(-1, seq).to(rt.device)


def build_artifact(model: GPT, args: Hyperparameters, rt: Runtime, batches) -> tuple[bytes | None, dict]:
    """Calibrate (every process), then quantize and compress (rank 0). Returns the artifact bytes and timings."""
    timings: dict = {}
    started = time.perf_counter()
    hessians = collect_hessians(model, batches, rt.autocast) if args.gptq else None
    rt.sync()
    timings["calibration_s"] = time.perf_counter() - started
    if not rt.master:
        return None, timings
    started = time.perf_counter()
    entries = quantize_state(model, hessians, args)
    timings["quantize_s"] = time.perf_counter() - started
    started = time.perf_counter()
    blob, timings["codec_bytes"] = compress_best(serialize(entries, args))
    timings["pack_s"] = time.perf_counter() - started
    return blob, timings


def estimate_quant_seconds(model: GPT, args: Hyperparameters, rt: Runtime, train_files: list[str]) -> float:
    """Time the whole quantization path on the current weights with one calibration batch, scaled to all batches."""
    started = time.perf_counter()
    _, timings = build_artifact(model, args, rt, calibration_batches(args, rt, train_files, limit=1))
    elapsed = time.perf_counter() - started
    batches = math.ceil(math.ceil(args.gptq_calib_seqs / rt.world) / CALIB_BATCH_SEQS)
    estimate = torch.tensor([elapsed + timings["calibration_s"] * (batches - 1)], dtype=torch.float64, device=rt.device)
    if rt.distributed:
        dist.all_reduce(estimate, op=dist.ReduceOp.MAX)
    return float(estimate.item())


def check_finite(loss: Tensor, bad_step: Tensor, rt: Runtime) -> float:
    """Mean loss over processes; raise RunFailure naming the first step whose loss was not finite."""
    values = torch.stack((loss.detach().double(), bad_step.double()))
    if rt.distributed:
        first_bad = bad_step.clone()
        dist.all_reduce(first_bad, op=dist.ReduceOp.MIN)
        dist.all_reduce(values)
        values = torch.stack((values[0] / rt.world, first_bad.double()))
    mean_loss, first = values.tolist()
    if int(first) != NO_STEP:
        raise RunFailure(f"train_loss is not finite at step {int(first)}; lower MATRIX_LR / TIED_EMBED_LR or set GRAD_CLIP_NORM")
    return mean_loss


def train(args: Hyperparameters, rt: Runtime, log: RunLog, train_files: list[str], ev: Evaluation | None) -> dict:
    """Warm up, train until ITERATIONS or the time budget, and return the raw, EMA and SWA weights with the run's figures."""
    torch.manual_seed(args.seed)
    np.random.seed(args.seed)
    model = GPT(args).to(rt.device)
    for line in describe_model(args, model):
        log(line)
    compiled = torch.compile(model, dynamic=False, fullgraph=True) if rt.compile else model
    step_model = compiled
    if rt.distributed:
        step_model = torch.nn.parallel.DistributedDataParallel(
            compiled, device_ids=[rt.local_rank] if rt.device.type == "cuda" else None, broadcast_buffers=False)
    optimizers = build_optimizers(model, args, rt.device.type == "cuda")
    params = list(model.parameters())

    # Warm-up steps compile the training step. Then the weights, optimizer states and data stream are put
    # back, so training starts from the true initialization, and the quantization path is timed.
    initial_state = copy.deepcopy(model.state_dict())
    initial_optimizers = [copy.deepcopy(opt.state_dict()) for opt in optimizers]
    loader = TrainLoader(train_files, rt.rank, rt.world, rt.device)
    for warm in range(args.warmup_steps):
        train_step(step_model, loader, optimizers, args, rt, 1.0, 0)
        if warm + 1 == args.warmup_steps or (warm + 1) % 10 == 0:
            log(f"warmup_step:{warm + 1}/{args.warmup_steps}")
    model.load_state_dict(initial_state)
    for opt, state in zip(optimizers, initial_optimizers):
        opt.load_state_dict(state)
    quant_estimate = estimate_quant_seconds(model, args, rt, train_files)
    loader = TrainLoader(train_files, rt.rank, rt.world, rt.device)

    budget_ms = None
    if args.max_wallclock_seconds > 0:
        budget_ms = 1000.0 * (args.max_wallclock_seconds - args.quant_time_margin * quant_estimate)
        if budget_ms <= 0:
            raise ConfigError(f"MAX_WALLCLOCK_SECONDS={args.max_wallclock_seconds} leaves no training time after the "
                              f"estimated {quant_estimate:.1f}s of quantization; raise it or set it to 0")
    log(f"quant_estimate:{quant_estimate:.2f}s train_budget:{'none' if budget_ms is None else f'{budget_ms:.0f}ms'}")

    def lr_scale(step: int, elapsed_ms: float) -> float:
        """Linear warm-down to zero over the last WARMDOWN_ITERS steps, or over the time they are expected to
        take. A run shorter than that decays over its whole length."""
        if args.warmdown_iters <= 0:
            return 1.0
        if budget_ms is None:
            return min(1.0, max(args.iterations - step, 0) / min(args.warmdown_iters, args.iterations))
        warmdown_ms = min(args.warmdown_iters * elapsed_ms / max(step, 1), budget_ms)
        remaining_ms = max(budget_ms - elapsed_ms, 0.0)
        return remaining_ms / max(warmdown_ms, 1e-9) if remaining_ms <= warmdown_ms else 1.0

    averages = WeightAverages(params, args.ema_decay)
    eval_functions = model_functions(model, rt.compile) if ev is not None else None
    bad_step = torch.full((), NO_STEP, device=rt.device, dtype=torch.long)
    train_ms, step, stop_reason, val_reports = 0.0, 0, None, 0
    rt.sync()
    t0 = time.perf_counter()
    while True:
        last = step == args.iterations or stop_reason is not None
        if ev is not None and args.val_loss_every > 0 and (step % args.val_loss_every == 0 or last):
            rt.sync()
            train_ms += 1000.0 * (time.perf_counter() - t0)
            val_loss, val_bpb = evaluate_standard(eval_functions, ev)
            val_reports += 1
            log(f"step:{step}/{args.iterations} val_loss:{val_loss:.4f} val_bpb:{val_bpb:.4f} "
                f"train_time:{train_ms:.0f}ms step_avg:{train_ms / max(step, 1):.2f}ms")
            rt.sync()
            t0 = time.perf_counter()
        if last:
            break
        scale = lr_scale(step, train_ms + 1000.0 * (time.perf_counter() - t0))
        loss = train_step(step_model, loader, optimizers, args, rt, scale, step)
        step += 1
        averages.update_ema(params)
        if scale < 1.0 and step % args.swa_every == 0:
            averages.add_snapshot(params)
        bad_step = torch.where(torch.isfinite(loss) | (bad_step != NO_STEP), bad_step, step)
        elapsed_ms = train_ms + 1000.0 * (time.perf_counter() - t0)
        # Every process must take the same decision, so the slowest clock decides for all.
        out_of_time = budget_ms is not None and elapsed_ms * (step + 1) / step >= budget_ms
        if rt.distributed and budget_ms is not None:
            flag = torch.tensor(float(out_of_time), device=rt.device)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            out_of_time = bool(flag.item())
        if out_of_time:
            stop_reason = "wallclock_cap"
        if (args.train_log_every > 0 and (step <= 10 or step % args.train_log_every == 0)) or out_of_time or step == args.iterations:
            mean_loss = check_finite(loss, bad_step, rt)
            log(f"step:{step}/{args.iterations} train_loss:{mean_loss:.4f} train_time:{elapsed_ms:.0f}ms "
                f"step_avg:{elapsed_ms / step:.2f}ms")
    rt.sync()
    train_ms += 1000.0 * (time.perf_counter() - t0)
    check_finite(loss if step else torch.zeros((), device=rt.device), bad_step, rt)
    log(f"stop_reason:{stop_reason or 'iterations'} step:{step}/{args.iterations} train_time:{train_ms:.0f}ms "
        f"step_avg:{train_ms / max(step, 1):.2f}ms")
    if rt.device.type == "cuda":
        log(f"peak_memory_allocated:{torch.cuda.max_memory_allocated() // 2**20}MiB "
            f"reserved:{torch.cuda.max_memory_reserved() // 2**20}MiB")
    if averages.swa_count == 0:
        averages.add_snapshot(params)
        log("swa_note: the warm-down reached no snapshot step, so SWA is the final weights alone")
    weights = {"raw": [p.detach().clone() for p in params], "ema": averages.ema, "swa": averages.swa()}
    return dict(model=model, weights=weights, steps=step, train_ms=train_ms, swa_count=averages.swa_count,
                eval_functions=eval_functions, val_reports=val_reports)


def load_weights(params: list[Tensor], values: list[Tensor]) -> None:
    with torch.no_grad():
        for p, v in zip(params, values):
            p.copy_(v)


def score_artifact(args: Hyperparameters, rt: Runtime, log: RunLog, ev: Evaluation) -> float:
    """Load the artifact file into a fresh model, log its standard and sliding-window scores; return seconds spent."""
    started = time.perf_counter()
    model, model_args = model_from_artifact(args.artifact_path, args, rt.device)
    log("artifact_model " + " ".join(f"{name}={env_form(getattr(model_args, name.lower()))}" for name in MODEL_SETTINGS))
    if model_args.vocab_size != ev.byte_tables[0].numel():
        raise ConfigError(f"the artifact's VOCAB_SIZE={model_args.vocab_size} differs from the tokenizer's "
                          f"{ev.byte_tables[0].numel()} pieces; use the TOKENIZER_PATH it was trained with")
    model.eval()
    functions = model_functions(model, rt.compile)
    for label, run in (("roundtrip", lambda: evaluate_standard(functions, ev)),
                       ("sliding_window", lambda: evaluate_sliding(functions, model, ev, args.eval_stride))):
        rt.sync()
        t0 = time.perf_counter()
        val_loss, val_bpb = run()
        rt.sync()
        ms = 1000.0 * (time.perf_counter() - t0)
        log(f"final_int6_{label} val_loss:{val_loss:.4f} val_bpb:{val_bpb:.4f} eval_time:{ms:.0f}ms")
        log(f"final_int6_{label}_exact val_loss:{val_loss:.8f} val_bpb:{val_bpb:.8f}")
    return time.perf_counter() - started


def log_sizes(args: Hyperparameters, log: RunLog, code_bytes: int) -> int:
    model_bytes = os.path.getsize(args.artifact_path)
    total = model_bytes + code_bytes
    log(f"artifact:{args.artifact_path} model_bytes:{model_bytes} code_bytes:{code_bytes} bytes_total:{total} "
        f"limit:{args.artifact_limit_bytes} headroom:{args.artifact_limit_bytes - total}")
    return total


def run(args: Hyperparameters, rt: Runtime, log: RunLog, code_bytes: int) -> None:
    train_files, val_files = find_shards(args.data_path, "train"), find_shards(args.data_path, "val")
    tables = build_byte_tables(args.tokenizer_path, args.vocab_size)
    val = ValidationData(val_files)
    log(f"train_shards:{len(train_files)} val_shards:{len(val_files)} tokenizer:{args.tokenizer_path}")

    def evaluation() -> Evaluation:
        return Evaluation(args, val.tokens(), tables, rt.rank, rt.world, rt.device, rt.autocast, log)

    if args.eval_only:
        if not os.path.isfile(args.artifact_path):
            raise ConfigError(f"EVAL_ONLY=1 needs an artifact, but ARTIFACT_PATH={args.artifact_path} is not a file")
        total = log_sizes(args, log, code_bytes)
        eval_s = score_artifact(args, rt, log, evaluation())
        log_compliance(log, None, eval_s, total, val_reports=0)
        return

    result = train(args, rt, log, train_files, evaluation() if args.val_loss_every > 0 else None)
    model, weights = result["model"], result["weights"]
    params = list(model.parameters())
    load_weights(params, weights[args.final_weights])
    log(f"final_weights:{args.final_weights} ema_decay:{args.ema_decay} swa_snapshots:{result['swa_count']}")

    # Between training and the written artifact, validation tokens are locked: any read raises.
    val.locked = True
    started = time.perf_counter()
    blob, timings = build_artifact(model, args, rt, calibration_batches(args, rt, train_files))
    if rt.master:
        os.makedirs(os.path.dirname(os.path.abspath(args.artifact_path)), exist_ok=True)
        Path(args.artifact_path).write_bytes(blob)
    rt.barrier()
    quant_s = time.perf_counter() - started
    val.locked = False
    log(f"quant_method:{'gptq' if args.gptq else 'round_to_nearest'} calibration_seqs:{args.gptq_calib_seqs} "
        f"calibration_time:{timings['calibration_s']:.2f}s" + (f" quantize_time:{timings['quantize_s']:.2f}s "
        f"pack_time:{timings['pack_s']:.2f}s" if rt.master else ""))
    if rt.master:
        log("codec_bytes " + " ".join(f"{name}:{size}" for name, size in timings["codec_bytes"].items())
            + f" chosen:{min(timings['codec_bytes'], key=timings['codec_bytes'].get)}")
    train_s = result["train_ms"] / 1000.0
    log(f"train_time:{train_s:.2f}s quant_time:{quant_s:.2f}s train_plus_quant:{train_s + quant_s:.2f}s "
        f"max_wallclock:{args.max_wallclock_seconds:.0f}s")
    total = log_sizes(args, log, code_bytes)
    if total > args.artifact_limit_bytes:
        raise RunFailure(f"bytes_total {total} is over ARTIFACT_LIMIT_BYTES={args.artifact_limit_bytes} by "
                         f"{total - args.artifact_limit_bytes}; the artifact stays at {args.artifact_path}")

    ev = evaluation()
    if args.prequant_eval:
        functions = result["eval_functions"] or model_functions(model, rt.compile)
        for name in ("raw", "ema", "swa"):
            load_weights(params, weights[name])
            t0 = time.perf_counter()
            val_loss, val_bpb = evaluate_standard(functions, ev)
            log(f"prequant_{name} val_loss:{val_loss:.4f} val_bpb:{val_bpb:.4f} "
                f"eval_time:{1000 * (time.perf_counter() - t0):.0f}ms{' final' if name == args.final_weights else ''}")
            log(f"prequant_{name}_exact val_loss:{val_loss:.8f} val_bpb:{val_bpb:.8f}")
    eval_s = score_artifact(args, rt, log, ev)
    log_compliance(log, train_s + quant_s, eval_s, total, result["val_reports"])


def log_compliance(log: RunLog, train_quant_s: float | None, eval_s: float, total_bytes: int, val_reports: int) -> None:
    """Closing summary against the challenge's limits, each marked pass or fail."""
    def mark(ok: bool) -> str:
        return "pass" if ok else "fail"

    if train_quant_s is not None:
        log(f"compliance:train_plus_quant seconds:{train_quant_s:.1f} limit:{CHALLENGE_SECONDS:.0f} "
            f"status:{mark(train_quant_s <= CHALLENGE_SECONDS)}")
    log(f"compliance:eval seconds:{eval_s:.1f} limit:{CHALLENGE_SECONDS:.0f} status:{mark(eval_s <= CHALLENGE_SECONDS)}")
    log(f"compliance:bytes_total bytes:{total_bytes} limit:{CHALLENGE_BYTES} status:{mark(total_bytes <= CHALLENGE_BYTES)}")
    # Only the evaluation functions read validation tokens, and a read while the artifact is built raises.
    # In-training reports (VAL_LOSS_EVERY) are scoring passes that change no weight.
    log(f"compliance:validation_before_scoring reads_for_weights:0 training_reports:{val_reports} status:pass")


def main() -> int:
    rank = int(os.environ.get("RANK", "0"))
    try:
        args = Hyperparameters()
        args.validate(int(os.environ.get("WORLD_SIZE", "1")))
    except ConfigError as e:
        if rank == 0:
            print(f"error: {e}", file=sys.stderr)
        return 2
    code_path = os.path.abspath(globals().get("__file__", sys.argv[0]))
    code_bytes = os.path.getsize(code_path)
    if args.dry_run:
        model = GPT(args)
        for line in args.resolved() + describe_model(args, model):
            print(line)
        estimate = payload_estimate(model)
        print(f"artifact_estimate model_bytes_before_compression:{estimate} code_bytes:{code_bytes} "
              f"bytes_total_upper_estimate:{estimate + code_bytes} limit:{args.artifact_limit_bytes}")
        return 0

    log_path = os.path.join("logs", f"{args.run_id}.txt")
    if os.path.exists(log_path):
        if rank == 0:
            print(f"error: {log_path} already exists; choose another RUN_ID (or leave it empty for a timestamped one)",
                  file=sys.stderr)
        return 2
    rt = Runtime(args)
    log = RunLog(log_path if rt.master else None)
    for line in args.resolved():
        log(line)
    source = globals().get("__source__") or Path(code_path).read_text(encoding="utf-8")
    log(f"run_id:{args.run_id} log:logs/{args.run_id}.txt python:{sys.version.split()[0]} torch:{torch.__version__} "
        f"device:{rt.device.type} world_size:{rt.world} grad_accum_steps:{rt.accum} compile:{int(rt.compile)} "
        f"threads:{torch.get_num_threads()}")
    log(f"code:{code_path} code_bytes:{code_bytes} source_sha256:{hashlib.sha256(source.encode()).hexdigest()}")
    if rt.device.type == "cuda":
        smi = subprocess.run(["nvidia-smi"], capture_output=True, text=True, check=False).stdout
        log(smi, console=False)
    log("source_begin", console=False)
    log(source, console=False)
    log("source_end", console=False)
    try:
        run(args, rt, log, code_bytes)
        # Every process finishes its collectives before any tears the group down. Otherwise gloo worker
        # threads can still be running at exit and abort the process.
        rt.barrier()
        return 0
    except (ConfigError, RunFailure) as e:
        if rt.master:
            print(f"error: {e}", file=sys.stderr, flush=True)
            log(f"error: {e}", console=False)
        return 2 if isinstance(e, ConfigError) else 1
    finally:
        if rt.distributed:
            dist.destroy_process_group()


if __name__ == "__main__":
    exit_code = main()
    if "RANK" in os.environ:
        # Under torchrun, leave without interpreter teardown: gloo's worker threads can abort a process
        # there ("terminate called without an active exception") after a successful run. Every log line
        # is already on disk, because each write opens and closes the file.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(exit_code)
    sys.exit(exit_code)
