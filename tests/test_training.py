"""Training runs in fresh processes: bad input stops early with one clear line, runs are deterministic,
warm-up leaves no trace, and torchrun over 2 processes matches one process with twice the accumulation."""

import numpy as np
import pytest

from conftest import field, log_lines, run_script, tiny_env


def error_lines(result) -> list[str]:
    return [line for line in result.stderr.splitlines() if line.startswith("error:")]


def assert_stopped_before_training(result, *fragments: str) -> None:
    assert result.returncode != 0
    errors = error_lines(result)
    assert len(errors) == 1, result.stderr
    for fragment in fragments:
        assert fragment in errors[0]
    assert not log_lines(result, "step:")
    assert "Traceback" not in result.stderr


def train_losses(result) -> list[tuple[str, float]]:
    return [(line.split()[0], float(field(line, "train_loss"))) for line in log_lines(result, "step:") if "train_loss" in line]


def test_missing_shards(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    result = run_script(tmp_path, tiny_env(empty))
    assert_stopped_before_training(result, "no fineweb_train_*.bin shards in DATA_PATH=", str(empty))


def test_shard_with_wrong_magic(tmp_path, tiny_data):
    data = tmp_path / "data"
    data.mkdir()
    (data / "fineweb_val_000000.bin").write_bytes((tiny_data / "fineweb_val_000000.bin").read_bytes())
    bad = np.zeros(256, dtype="<i4")
    bad[:3] = (12345, 1, 4)
    (data / "fineweb_train_000000.bin").write_bytes(bad.tobytes() + np.arange(4, dtype="<u2").tobytes())
    result = run_script(tmp_path, tiny_env(data))
    assert_stopped_before_training(result, "fineweb_train_000000.bin", "expected magic 20240520")


def test_truncated_shard(tmp_path, tiny_data):
    data = tmp_path / "data"
    data.mkdir()
    (data / "fineweb_train_000000.bin").write_bytes((tiny_data / "fineweb_train_000000.bin").read_bytes())
    whole = (tiny_data / "fineweb_val_000000.bin").read_bytes()
    (data / "fineweb_val_000000.bin").write_bytes(whole[:-100])
    result = run_script(tmp_path, tiny_env(data))
    assert_stopped_before_training(result, "fineweb_val_000000.bin", "truncated")


@pytest.mark.parametrize("kind", ["missing", "not_a_model"])
def test_unusable_tokenizer(tmp_path, tiny_data, kind):
    path = tmp_path / "tokenizer.model"
    if kind == "not_a_model":
        path.write_bytes(b"not a sentencepiece model")
    result = run_script(tmp_path, tiny_env(tiny_data, TOKENIZER_PATH=str(path)))
    assert_stopped_before_training(result, f"TOKENIZER_PATH={path}")
    assert result.returncode == 2


def test_tokenizer_vocabulary_mismatch(tmp_path, tiny_data):
    result = run_script(tmp_path, tiny_env(tiny_data, VOCAB_SIZE="2048"))
    assert_stopped_before_training(result, "has 1024 pieces but VOCAB_SIZE=2048", "set VOCAB_SIZE=1024")


@pytest.mark.parametrize("env, fragment", [
    ({"MODEL_DIM": "33"}, "MODEL_DIM=33 is not divisible by NUM_HEADS=2"),
    ({"NUM_HEADS": "4", "NUM_KV_HEADS": "3"}, "NUM_HEADS=4 is not divisible by NUM_KV_HEADS=3"),
    ({"UNIVERSAL_ITERATIONS": "0"}, "UNIVERSAL_UNIQUE_BLOCKS=3 is larger than the 0 effective layers"),
    ({"TRAIN_BATCH_TOKENS": "1000"}, "TRAIN_BATCH_TOKENS=1000 does not split into whole TRAIN_SEQ_LEN=64 sequences"),
    ({"UNIVERSAL_ITERATION": "4"}, "probable typo of UNIVERSAL_ITERATIONS"),
])
def test_invalid_setting_stops_before_training(tmp_path, tiny_data, env, fragment):
    result = run_script(tmp_path, tiny_env(tiny_data, **env))
    assert_stopped_before_training(result, fragment)
    assert not (tmp_path / "logs").exists()  # rejected before anything is written


def test_batch_split_checked_per_process(tmp_path, tiny_data):
    # 512 tokens are 8 sequences of 64: one each for 8 micro-batches on one process, but over 2 processes
    # x 4 micro-batches they still split; 256 tokens do not split over 2 x 4.
    result = run_script(tmp_path, tiny_env(tiny_data, TRAIN_BATCH_TOKENS="256"), nproc=2)
    assert result.returncode != 0
    assert "TRAIN_BATCH_TOKENS=256 does not split" in result.stderr
    assert "over 2 processes x 4 accumulation steps" in result.stderr


def test_non_finite_loss_stops_with_step(tmp_path, tiny_data):
    result = run_script(tmp_path, tiny_env(tiny_data, ITERATIONS="6", TIED_EMBED_LR="1e30", SCALAR_LR="1e30",
                                           GRAD_CLIP_NORM="0", RUN_ID="nan_run"))
    assert result.returncode == 1
    errors = error_lines(result)
    assert len(errors) == 1
    assert "train_loss is not finite at step" in errors[0]
    log = (tmp_path / "logs" / "nan_run.txt").read_text()
    assert log.startswith("config:")
    assert "step:1/6 train_loss:" in log  # what was logged before the failure stays
    assert errors[0] in log


def test_log_starts_with_sorted_configuration(tmp_path, tiny_data):
    result = run_script(tmp_path, tiny_env(tiny_data, ITERATIONS="1", RUN_ID="config_check"))
    assert result.returncode == 0, result.stderr
    lines = (tmp_path / "logs" / "config_check.txt").read_text().splitlines()
    import train_gpt

    count = len(train_gpt.SETTING_NAMES)
    assert all(line.startswith("config:") for line in lines[:count])
    assert lines[:count] == sorted(lines[:count])
    assert "config:RUN_ID=config_check" in lines[:count]
    assert not lines[count].startswith("config:")


def test_same_seed_same_losses(tmp_path, tiny_data):
    first = run_script(tmp_path, tiny_env(tiny_data, ITERATIONS="4", RUN_ID="a"))
    second = run_script(tmp_path, tiny_env(tiny_data, ITERATIONS="4", RUN_ID="b"))
    assert first.returncode == 0, first.stderr
    assert len(train_losses(first)) == 4
    assert train_losses(first) == train_losses(second)


def test_warmup_leaves_no_trace(tmp_path, tiny_data):
    cold = run_script(tmp_path, tiny_env(tiny_data, ITERATIONS="3", WARMUP_STEPS="0", RUN_ID="cold"))
    warm = run_script(tmp_path, tiny_env(tiny_data, ITERATIONS="3", WARMUP_STEPS="3", RUN_ID="warm"))
    assert cold.returncode == 0, cold.stderr
    assert warm.returncode == 0, warm.stderr
    assert log_lines(warm, "warmup_step:3/3")
    assert train_losses(cold) == train_losses(warm)


def test_torchrun_matches_single_process(tmp_path, tiny_data):
    env = tiny_env(tiny_data, ITERATIONS="4", PREQUANT_EVAL="0")
    single = run_script(tmp_path, dict(env, RUN_ID="single"))
    double = run_script(tmp_path, dict(env, RUN_ID="double"), nproc=2)
    assert single.returncode == 0, single.stderr
    assert double.returncode == 0, double.stderr
    assert log_lines(single, "run_id:")[0].count("world_size:1 grad_accum_steps:8") == 1
    assert log_lines(double, "run_id:")[0].count("world_size:2 grad_accum_steps:4") == 1
    one, two = train_losses(single), train_losses(double)
    assert [step for step, _ in one] == [step for step, _ in two]
    assert len(one) == 4
    for (_, a), (_, b) in zip(one, two):
        assert abs(a - b) <= 1e-4 * abs(a)


def test_existing_log_is_never_overwritten(tmp_path, tiny_data):
    (tmp_path / "logs").mkdir()
    (tmp_path / "logs" / "taken.txt").write_text("an earlier run\n")
    result = run_script(tmp_path, tiny_env(tiny_data, RUN_ID="taken"))
    assert_stopped_before_training(result, "logs/taken.txt already exists", "choose another RUN_ID")
    assert (tmp_path / "logs" / "taken.txt").read_text() == "an earlier run\n"
