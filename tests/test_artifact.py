"""From trained weights to the scored artifact: EMA and SWA, int6 GPTQ, shared-block Hessians,
serialization, the size limit, the time budget, and a round trip that reproduces the score."""

import contextlib
import os

import pytest
import torch

import train_gpt
from train_gpt import (GPT, INT6_MAX, Hyperparameters, WeightAverages, collect_hessians, compress_best, deserialize,
                       gptq, quantize_state, round_to_nearest, row_scales, serialize)

from conftest import TOKENIZER, field, log_lines, run_script, tiny_env


def test_ema_by_hand():
    p = torch.tensor([1.0, 2.0], dtype=torch.bfloat16)
    averages = WeightAverages([p], decay=0.75)
    assert averages.ema[0].dtype == torch.float32
    p.copy_(torch.tensor([3.0, 6.0]))
    averages.update_ema([p])  # 0.75 * [1, 2] + 0.25 * [3, 6]
    assert averages.ema[0].tolist() == [1.5, 3.0]
    p.copy_(torch.tensor([5.5, 7.0]))
    averages.update_ema([p])  # 0.75 * [1.5, 3] + 0.25 * [5.5, 7]
    assert averages.ema[0].tolist() == [2.5, 4.0]


def test_ema_shadow_is_float32_beyond_bf16_precision():
    p = torch.tensor([256.0], dtype=torch.bfloat16)
    averages = WeightAverages([p], decay=0.997)
    p.copy_(torch.tensor([258.0]))  # bf16 steps by 2 here, so it cannot hold 256.006; the float32 shadow can
    averages.update_ema([p])
    assert averages.ema[0].item() == pytest.approx(256.006, abs=1e-4)


def test_swa_of_one_snapshot_is_that_snapshot():
    p = torch.randn(3, 4)
    averages = WeightAverages([p], decay=0.9)
    averages.add_snapshot([p])
    assert torch.equal(averages.swa()[0], p)


def test_swa_is_the_mean_of_snapshots():
    p = torch.tensor([1.0, 10.0])
    averages = WeightAverages([p], decay=0.9)
    for value in ([1.0, 10.0], [2.0, 20.0], [6.0, 0.0]):
        p.copy_(torch.tensor(value))
        averages.add_snapshot([p])
    assert averages.swa_count == 3
    assert averages.swa()[0].tolist() == [3.0, 10.0]


def correlated_problem(seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    w = torch.randn(48, 96, generator=generator)
    mixing = torch.randn(96, 96, generator=generator) / 4 + torch.eye(96)
    x = torch.randn(2048, 96, generator=generator) @ mixing
    return w, x


def test_gptq_beats_rounding_with_the_same_scales():
    w, x = correlated_problem()
    scale = row_scales(w, INT6_MAX)
    rounded = round_to_nearest(w, scale, INT6_MAX).float() * scale[:, None]
    solved = gptq(w, x.T @ x, scale, block=32, damp=0.01).float() * scale[:, None]
    rounding_error = (x @ (w - rounded).T).square().sum()
    gptq_error = (x @ (w - solved).T).square().sum()
    assert gptq_error < 0.8 * rounding_error


def test_gptq_codes_stay_in_int6_range():
    w, x = correlated_problem(1)
    codes = gptq(w * 5, x.T @ x, row_scales(w, INT6_MAX), block=16, damp=0.01)
    assert codes.dtype == torch.int8
    assert codes.abs().max().item() <= INT6_MAX


def test_gptq_with_diagonal_hessian_is_rounding():
    # With uncorrelated inputs there is nothing to compensate, so GPTQ must equal rounding to nearest.
    w, _ = correlated_problem(2)
    scale = row_scales(w, INT6_MAX)
    hessian = torch.diag(torch.rand(96) + 0.5)
    assert torch.equal(gptq(w, hessian, scale, block=32, damp=0.0), round_to_nearest(w, scale, INT6_MAX))


def test_row_scales_are_float16_exact():
    w, _ = correlated_problem(3)
    scale = row_scales(w, INT6_MAX)
    assert torch.equal(scale, scale.half().float())


TINY_MODEL = {"MODEL_DIM": "32", "NUM_HEADS": "2", "NUM_KV_HEADS": "1", "BIGRAM_DIM": "8", "VE_DIM": "8",
              "TRAIN_SEQ_LEN": "16", "EVAL_SEQ_LEN": "16", "EVAL_STRIDE": "8"}


def test_shared_block_hessian_sums_its_layers():
    # The universal model and a plain 12-layer copy whose layer i holds block i % 3 compute the same
    # function (iteration embeddings and scales are off), so each shared Hessian must be the sum of
    # the copies' Hessians at layers j, j + 3, j + 6, j + 9.
    shared_args = Hyperparameters(dict(TINY_MODEL, ITER_EMBED="0", ITER_SCALE="0"))
    plain_args = Hyperparameters(dict(TINY_MODEL, USE_UNIVERSAL="0", NUM_LAYERS="12"))
    torch.manual_seed(0)
    shared = GPT(shared_args)
    with torch.no_grad():
        for p in shared.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    plain = GPT(plain_args)
    state = {}
    for name, value in shared.state_dict().items():
        if name.startswith("blocks."):
            index, rest = name.split(".", 2)[1:]
            for layer in range(12):
                if layer % 3 == int(index):
                    state[f"blocks.{layer}.{rest}"] = value
        else:
            state[name] = value
    plain.load_state_dict(state, strict=True)
    batches = [torch.randint(0, 1024, (2, 16)) for _ in range(2)]
    assert torch.allclose(shared.hidden(batches[0]), plain.hidden(batches[0]), atol=1e-5)
    shared_h = collect_hessians(shared, batches, contextlib.nullcontext)
    plain_h = collect_hessians(plain, batches, contextlib.nullcontext)
    assert len(shared_h) == 3 * 6 + 2  # six matrices per block, plus the bigram and value projections
    for name, hessian in shared_h.items():
        if not name.startswith("blocks."):
            assert torch.allclose(hessian, plain_h[name], rtol=1e-4, atol=1e-3)
            continue
        block, rest = name.split(".", 2)[1:]
        total = sum(plain_h[f"blocks.{layer}.{rest}"] for layer in range(int(block), 12, 3))
        assert torch.allclose(hessian, total, rtol=1e-4, atol=1e-3), name


def test_serialize_round_trip_is_exact():
    args = Hyperparameters(TINY_MODEL)
    torch.manual_seed(1)
    model = GPT(args)
    entries = quantize_state(model, None, args)
    kinds = {name: kind for name, (kind, _, _) in entries.items()}
    assert kinds["blocks.0.attn.c_q.weight"] == "int6"
    assert kinds["tok_emb.weight"] == "int8"
    assert kinds["blocks.0.attn_scale"] == "fp16"
    settings, state = deserialize(serialize(entries, args))
    assert settings["MODEL_DIM"] == 32
    assert settings["USE_UNIVERSAL"] is True
    for name, (kind, values, scales) in entries.items():
        expected = values.float() if kind == "fp16" else values.float() * scales.float()[:, None]
        assert torch.equal(state[name], expected), name
    GPT(args).load_state_dict(state, strict=True)


def test_smallest_codec_is_chosen():
    payload = bytes(range(256)) * 200 + b"\x00" * 5000
    blob, sizes = compress_best(payload)
    assert set(sizes) == {"lzma", "bz2", "zlib"}
    assert len(blob) == min(sizes.values())
    assert train_gpt.CODECS[blob[:1]][2](blob[1:]) == payload


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory, tiny_data):
    """One tiny CPU run of the whole pipeline. Its folder contains logs/ and artifacts/."""
    folder = tmp_path_factory.mktemp("trained_run")
    result = run_script(folder, tiny_env(tiny_data, ITERATIONS="6", RUN_ID="tiny", PREQUANT_EVAL="1",
                                         WARMDOWN_ITERS="4", SWA_EVERY="2", NGRAM_EVAL="1", NGRAM_BUCKETS="1024"))
    assert result.returncode == 0, result.stderr
    return folder, result


def test_run_logs_every_stage(trained_run):
    folder, result = trained_run
    assert (folder / "artifacts" / "tiny.int6.ptz").is_file()
    assert log_lines(result, "quant_method:gptq")
    assert log_lines(result, "final_weights:ema")
    assert log_lines(result, "final_weights:ema ema_decay:0.997 swa_snapshots:2")  # steps 4 and 6 of the warm-down
    prequant = {line.split()[0]: line for line in log_lines(result, "prequant_")}
    assert set(prequant) == {"prequant_raw", "prequant_ema", "prequant_swa", "prequant_raw_exact", "prequant_ema_exact",
                             "prequant_swa_exact"}
    assert round(float(field(prequant["prequant_ema_exact"], "val_bpb")), 4) == float(field(prequant["prequant_ema"], "val_bpb"))
    assert prequant["prequant_ema"].endswith(" final")
    sizes = log_lines(result, "artifact:")[0]
    model_bytes = int(field(sizes, "model_bytes"))
    assert model_bytes == os.path.getsize(folder / "artifacts" / "tiny.int6.ptz")
    assert int(field(sizes, "code_bytes")) == os.path.getsize(train_gpt.__file__)
    assert int(field(sizes, "bytes_total")) == model_bytes + int(field(sizes, "code_bytes"))
    codecs = log_lines(result, "codec_bytes ")[0]
    assert int(field(codecs, field(codecs, "chosen"))) == model_bytes
    timing = log_lines(result, "train_time:")[0]
    assert float(field(timing, "train_plus_quant")[:-1]) == pytest.approx(
        float(field(timing, "train_time")[:-1]) + float(field(timing, "quant_time")[:-1]), abs=0.011)
    for label in ("roundtrip", "sliding_window"):
        assert len(log_lines(result, f"final_int6_{label} val_loss:")) == 1
        assert len(log_lines(result, f"final_int6_{label}_exact val_loss:")) == 1
    assert [line.split()[-1] for line in log_lines(result, "compliance:")] == ["status:pass"] * 4


def test_eval_only_reproduces_the_score(trained_run, tiny_data):
    folder, result = trained_run
    again = run_script(folder, {"EVAL_ONLY": "1", "ARTIFACT_PATH": str(folder / "artifacts" / "tiny.int6.ptz"),
                                "RUN_ID": "tiny_eval", "DATA_PATH": str(tiny_data), "TOKENIZER_PATH": str(TOKENIZER),
                                "EVAL_SEQ_LEN": "64", "EVAL_STRIDE": "32", "VAL_BATCH_SIZE": "8192", "NGRAM_EVAL": "1",
                                "NGRAM_BUCKETS": "1024"})
    assert again.returncode == 0, again.stderr
    for label in ("roundtrip", "sliding_window"):
        line = f"final_int6_{label}_exact"
        assert log_lines(again, line) == log_lines(result, line)
        assert log_lines(again, line)
    assert not log_lines(again, "step:")


@pytest.mark.parametrize("caches", [{}, {"NGRAM_EVAL": "1", "NGRAM_BUCKETS": "1024", "KNN_LAMBDA": "0.2", "KNN_STORE": "500"}])
def test_two_processes_score_like_one(trained_run, tiny_data, caches):
    folder, _ = trained_run
    env = tiny_env(tiny_data, EVAL_ONLY="1", ARTIFACT_PATH=str(folder / "artifacts" / "tiny.int6.ptz"), EVAL_STRIDE="16",
                   **caches)
    tag = "caches" if caches else "plain"
    single = run_script(folder, dict(env, RUN_ID=f"one_{tag}"))
    double = run_script(folder, dict(env, RUN_ID=f"two_{tag}"), nproc=2)
    assert single.returncode == 0, single.stderr
    assert double.returncode == 0, double.stderr
    assert "world_size:2" in log_lines(double, "run_id:")[0]
    for label in ("final_int6_sliding_window_exact", "final_int6_roundtrip_exact"):
        one, two = log_lines(single, label)[0], log_lines(double, label)[0]
        for key in ("val_loss", "val_bpb"):
            assert float(field(two, key)) == pytest.approx(float(field(one, key)), abs=1e-6)


def test_eval_only_takes_model_shape_from_artifact(trained_run, tiny_data):
    # The environment sets no model shape (MODEL_DIM defaults to 512), so the artifact's 32 must win,
    # for the model and for the kNN datastore built from its hidden states.
    folder, _ = trained_run
    env = {"EVAL_ONLY": "1", "ARTIFACT_PATH": str(folder / "artifacts" / "tiny.int6.ptz"), "RUN_ID": "shape_from_artifact",
           "DATA_PATH": str(tiny_data), "TOKENIZER_PATH": str(TOKENIZER), "EVAL_SEQ_LEN": "64",
           "EVAL_STRIDE": "32", "VAL_BATCH_SIZE": "8192", "KNN_LAMBDA": "0.2", "KNN_STORE": "300", "NGRAM_EVAL": "1",
           "NGRAM_BUCKETS": "1024"}
    result = run_script(folder, env)
    assert result.returncode == 0, result.stderr
    assert len(log_lines(result, "final_int6_sliding_window_exact")) == 1
    assert " MODEL_DIM=32 " in log_lines(result, "artifact_model ")[0]


def test_eval_only_needs_an_artifact(tmp_path, tiny_data):
    result = run_script(tmp_path, tiny_env(tiny_data, EVAL_ONLY="1", ARTIFACT_PATH=str(tmp_path / "missing.ptz")))
    assert result.returncode == 2
    assert "EVAL_ONLY=1 needs an artifact, but ARTIFACT_PATH=" in result.stderr


def test_rounding_fallback_and_size_limit(tmp_path, tiny_data):
    result = run_script(tmp_path, tiny_env(tiny_data, GPTQ="0", ARTIFACT_LIMIT_BYTES="50000", RUN_ID="small_limit"))
    assert result.returncode == 1
    assert log_lines(result, "quant_method:round_to_nearest")
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1
    assert "over ARTIFACT_LIMIT_BYTES=50000" in errors[0]
    artifact = tmp_path / "artifacts" / "small_limit.int6.ptz"
    assert artifact.is_file()
    assert artifact.stat().st_size > 0
    log = (tmp_path / "logs" / "small_limit.txt").read_text()
    assert errors[0] in log
    assert "final_int6_roundtrip" not in log


def test_gptq_increases_loss_less_than_rounding():
    # Quantizing a trained tiny model: measure the loss increase of each method on held-out text.
    from conftest import SHAKESPEARE, read_shard

    args = Hyperparameters(dict(TINY_MODEL, TRAIN_SEQ_LEN="64", EVAL_SEQ_LEN="64", MATRIX_LR="0.05"))
    torch.manual_seed(0)
    model = GPT(args)
    tokens = torch.from_numpy(read_shard(SHAKESPEARE / "fineweb_train_000000.bin")[:40_000].astype("int64"))
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    for step in range(60):
        batch = tokens[step * 512 : step * 512 + 513]
        loss = model(batch[:-1].view(8, 64), batch[1:].view(8, 64))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    calibration = [tokens[30_000 + i * 512 : 30_000 + (i + 1) * 512].view(8, 64) for i in range(4)]
    held_out = tokens[35_000:37_049]
    x, y = held_out[:-1].view(32, 64), held_out[1:].view(32, 64)
    with torch.no_grad():
        base = model(x, y).item()
    hessians = collect_hessians(model, calibration, contextlib.nullcontext)
    losses = {}
    for method, h in (("gptq", hessians), ("rtn", None)):
        _, state = deserialize(serialize(quantize_state(model, h, args), args))
        copy = GPT(args)
        copy.load_state_dict(state)
        with torch.no_grad():
            losses[method] = copy(x, y).item() - base
    assert losses["gptq"] < losses["rtn"]


def test_calibration_cannot_read_validation(tmp_path, tiny_data):
    args = Hyperparameters(dict(TINY_MODEL))
    val = train_gpt.ValidationData(train_gpt.find_shards(str(tiny_data), "val"))
    val.locked = True

    def batches():
        yield val.tokens()[:32].view(2, 16)

    with pytest.raises(RuntimeError, match="validation tokens were requested while the artifact is being built"):
        collect_hessians(GPT(args), batches(), contextlib.nullcontext)
    assert val.reads == 0


def test_validation_untouched_until_artifact_written(tmp_path, tiny_data, monkeypatch):
    """Run the whole pipeline in this process and record every validation read: none may happen after
    training ends and before the artifact file exists."""
    events = []
    original_tokens = train_gpt.ValidationData.tokens
    original_train = train_gpt.train
    artifact = tmp_path / "artifacts" / "guarded.int6.ptz"

    def recording_tokens(self):
        events.append(("val_read", artifact.exists()))
        return original_tokens(self)

    def recording_train(*args, **kwargs):
        result = original_train(*args, **kwargs)
        events.append(("train_end", artifact.exists()))
        return result

    monkeypatch.setattr(train_gpt.ValidationData, "tokens", recording_tokens)
    monkeypatch.setattr(train_gpt, "train", recording_train)
    for name in train_gpt.SETTING_NAMES:
        monkeypatch.delenv(name, raising=False)
    for name, value in tiny_env(tiny_data, RUN_ID="guarded", VAL_LOSS_EVERY="2", ITERATIONS="4").items():
        monkeypatch.setenv(name, value)
    monkeypatch.chdir(tmp_path)
    assert train_gpt.main() == 0
    end = events.index(("train_end", False))
    assert ("val_read", False) in events[:end]  # in-training reports (VAL_LOSS_EVERY) score before the end
    after = events[end + 1 :]
    assert after and all(event == ("val_read", True) for event in after)


def test_time_cap_covers_training_and_quantization(tmp_path, tiny_data):
    cap = 30
    result = run_script(tmp_path, tiny_env(tiny_data, ITERATIONS="100000", MAX_WALLCLOCK_SECONDS=str(cap),
                                           TRAIN_LOG_EVERY="200", GPTQ_CALIB_SEQS="64", RUN_ID="capped"))
    assert result.returncode == 0, result.stderr
    assert log_lines(result, "stop_reason:wallclock_cap")
    timing = log_lines(result, "train_time:")[0]
    assert float(field(timing, "train_plus_quant")[:-1]) <= cap
    assert float(field(timing, "train_time")[:-1]) >= cap / 2  # the budget was used, not skipped
