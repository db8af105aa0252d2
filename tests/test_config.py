"""Settings: strict parsing, typo detection, shape validation, and that every setting is read."""

import re

import pytest

import train_gpt
from train_gpt import ConfigError, Hyperparameters

from conftest import SCRIPT


def validated(world_size: int = 1, **env: str) -> Hyperparameters:
    args = Hyperparameters(env)
    args.validate(world_size)
    return args


def test_defaults_are_competition_configuration():
    args = validated()
    assert args.train_batch_tokens == 786432
    assert args.train_seq_len == 2048
    assert args.max_wallclock_seconds == 600.0
    assert args.use_universal is True
    assert args.effective_layers == 12
    assert args.unique_blocks == 3


@pytest.mark.parametrize("raw, expected", [("0", False), ("1", True)])
def test_boolean_accepts_zero_and_one(raw, expected):
    assert Hyperparameters({"TIE_EMBEDDINGS": raw}).tie_embeddings is expected


@pytest.mark.parametrize("raw", ["true", "yes", "2", ""])
def test_boolean_rejects_other_text(raw):
    with pytest.raises(ConfigError, match="TIE_EMBEDDINGS"):
        Hyperparameters({"TIE_EMBEDDINGS": raw})


def test_boolean_error_shows_environment_form():
    with pytest.raises(ConfigError, match="QK_NORM='yes' is not a valid 0 or 1; the default is 1"):
        Hyperparameters({"QK_NORM": "yes"})


def test_number_rejects_text():
    with pytest.raises(ConfigError, match=r"MODEL_DIM='wide' is not a valid int"):
        Hyperparameters({"MODEL_DIM": "wide"})


@pytest.mark.parametrize("typo, meant", [
    ("UNIVERSAL_ITERATION", "UNIVERSAL_ITERATIONS"),
    ("MODLE_DIM", "MODEL_DIM"),
    ("NUM_HEAD", "NUM_HEADS"),
    ("MATRIX_LRR", "MATRIX_LR"),
])
def test_typo_names_the_setting(typo, meant):
    with pytest.raises(ConfigError, match=f"{typo} is not a setting; probable typo of {meant}"):
        Hyperparameters({typo: "4"})


def test_unrelated_and_launcher_variables_are_ignored():
    args = Hyperparameters({"HOME": "/root", "OMP_NUM_THREADS": "1", "LOCAL_RANK": "0", "MASTER_PORT": "1",
                            "TORCHELASTIC_RUN_ID": "x", "CI": "true", "lowercase_thing": "1"})
    assert args.model_dim == 512


@pytest.mark.parametrize("env, message", [
    ({"MODEL_DIM": "500"}, "MODEL_DIM=500 is not divisible by NUM_HEADS=8"),
    ({"NUM_KV_HEADS": "3"}, "NUM_HEADS=8 is not divisible by NUM_KV_HEADS=3"),
    ({"NUM_LAYERS": "0", "USE_UNIVERSAL": "0"}, "NUM_LAYERS=0 must be positive"),
    ({"TRAIN_BATCH_TOKENS": "1000"}, "TRAIN_BATCH_TOKENS=1000 does not split into whole TRAIN_SEQ_LEN=2048 sequences"),
    ({"VOCAB_SIZE": "70000"}, "VOCAB_SIZE=70000 does not fit the uint16"),
    ({"ROPE_DIMS": "80"}, "ROPE_DIMS=80 must be even and between 0 and the head size 64"),
    ({"VE_LAYERS": "0,0"}, "names a layer twice"),
    ({"VE_LAYERS": "12"}, r"VE_LAYERS='12' must name layers in \[-12, 11\]"),
    ({"FINAL_WEIGHTS": "best"}, "FINAL_WEIGHTS='best' must be ema, swa or raw"),
    ({"EVAL_STRIDE": "4096"}, "EVAL_STRIDE=4096 must not exceed EVAL_SEQ_LEN=2048"),
    ({"COMPILE": "yes"}, "COMPILE='yes' must be auto, 0 or 1"),
    ({"XSA_LAST_N": "13"}, "XSA_LAST_N=13 must be between 0 and the 12 effective layers"),
])
def test_invalid_shapes_are_rejected(env, message):
    with pytest.raises(ConfigError, match=message):
        validated(**env)


@pytest.mark.parametrize("iterations", ["0", "-1"])
def test_unique_blocks_above_effective_layers(iterations):
    # Effective layers are UNIQUE x ITERATIONS, so unique blocks outnumber them only when a pass count is below 1.
    with pytest.raises(ConfigError, match="UNIVERSAL_UNIQUE_BLOCKS=3 is larger than the .* effective layers"
                                           ".*set UNIVERSAL_ITERATIONS to 1 or more"):
        validated(UNIVERSAL_ITERATIONS=iterations)


def test_world_size_must_divide_eight():
    with pytest.raises(ConfigError, match="WORLD_SIZE=3 must divide 8"):
        validated(world_size=3)


def test_batch_split_depends_on_world_size():
    # 8 sequences of 256 split over 8 micro-batches on one process, or 4 processes x 2 micro-batches.
    validated(world_size=4, TRAIN_BATCH_TOKENS="2048", TRAIN_SEQ_LEN="256", EVAL_SEQ_LEN="256")
    with pytest.raises(ConfigError, match="TRAIN_BATCH_TOKENS=1024"):
        validated(world_size=1, TRAIN_BATCH_TOKENS="1024", TRAIN_SEQ_LEN="256", EVAL_SEQ_LEN="256")


def test_every_setting_is_read():
    source = SCRIPT.read_text()
    unread = [name for name in train_gpt.SETTING_NAMES if not re.search(rf"\b(args|self)\.{name.lower()}\b", source)]
    assert unread == []


def test_model_settings_cover_the_model_section():
    assert train_gpt.MODEL_SETTINGS[0] == "VOCAB_SIZE"
    assert train_gpt.MODEL_SETTINGS[-1] == "XSA_LAST_N"
    assert "USE_UNIVERSAL" in train_gpt.MODEL_SETTINGS
    assert "ITERATIONS" not in train_gpt.MODEL_SETTINGS


def test_resolved_configuration_is_sorted_and_complete():
    lines = Hyperparameters({"SEED": "5"}).resolved()
    assert len(lines) == len(train_gpt.SETTING_NAMES)
    assert lines == sorted(lines)
    assert "config:SEED=5" in lines
    assert "config:TIE_EMBEDDINGS=1" in lines  # booleans in the 0/1 form the environment takes
