"""Shared fixtures: paths to the sample data beside the repository, small shards cut from it, and a
helper that runs train_gpt.py in a fresh process the way a user would."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"
SHAKESPEARE = SHARED_DATA / "datasets" / "tinyshakespeare_sp1024"
TOKENIZER = SHARED_DATA / "tokenizers" / "fineweb_1024_bpe.model"
SCRIPT = REPO / "train_gpt.py"

if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

# A model small enough that a CPU run of a few steps takes seconds.
TINY = {
    "MODEL_DIM": "32", "NUM_HEADS": "2", "NUM_KV_HEADS": "1", "BIGRAM_DIM": "16", "VE_DIM": "16",
    "TRAIN_SEQ_LEN": "64", "EVAL_SEQ_LEN": "64", "EVAL_STRIDE": "32", "TRAIN_BATCH_TOKENS": "1024",
    "ITERATIONS": "3", "WARMUP_STEPS": "1", "MAX_WALLCLOCK_SECONDS": "0", "TRAIN_LOG_EVERY": "1",
    "GPTQ_CALIB_SEQS": "8", "VAL_BATCH_SIZE": "8192", "PREQUANT_EVAL": "0", "SEED": "7",
}


def write_shard(path: Path, tokens: np.ndarray) -> None:
    header = np.zeros(256, dtype="<i4")
    header[:3] = (20240520, 1, len(tokens))
    path.write_bytes(header.tobytes() + tokens.astype("<u2").tobytes())


def read_shard(path: Path) -> np.ndarray:
    return np.fromfile(path, dtype="<u2", offset=1024)


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> Path:
    """The first 60,000 training and 6,000 validation tokens of the Shakespeare shards."""
    folder = tmp_path_factory.mktemp("tiny_data")
    write_shard(folder / "fineweb_train_000000.bin", read_shard(SHAKESPEARE / "fineweb_train_000000.bin")[:60_000])
    write_shard(folder / "fineweb_val_000000.bin", read_shard(SHAKESPEARE / "fineweb_val_000000.bin")[:6_000])
    return folder


def run_script(cwd: Path, env: dict[str, str], nproc: int = 1, script: Path = SCRIPT, timeout: int = 300):
    """Run train_gpt.py (under torchrun when nproc > 1) with a clean environment plus `env`."""
    import train_gpt

    launcher = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
    full_env = {k: v for k, v in os.environ.items() if k not in train_gpt.SETTING_NAMES and k not in launcher}
    full_env.update({"OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}, **env)
    if nproc > 1:
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", str(script)]
    else:
        command = [sys.executable, str(script)]
    return subprocess.run(command, cwd=cwd, env=full_env, capture_output=True, text=True, timeout=timeout)


def tiny_env(data: Path, **overrides: str) -> dict[str, str]:
    env = dict(TINY, DATA_PATH=str(data), TOKENIZER_PATH=str(TOKENIZER))
    env.update(overrides)
    return env


def log_lines(result, prefix: str) -> list[str]:
    return [line for line in result.stdout.splitlines() if line.startswith(prefix)]


def field(line: str, key: str) -> str:
    """Value of `key:value` in a log line."""
    for part in line.split():
        if part.startswith(key + ":"):
            return part[len(key) + 1 :]
    raise KeyError(f"{key} not in {line!r}")
