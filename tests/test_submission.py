"""Tests for tools/submission.py on small hand-made train_gpt.py logs."""

from __future__ import annotations

import datetime
import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

TOOL_PATH = Path(__file__).resolve().parents[1] / "tools" / "submission.py"
_spec = importlib.util.spec_from_file_location("submission", TOOL_PATH)
submission = importlib.util.module_from_spec(_spec)
sys.modules["submission"] = submission  # dataclasses look the module up by name
_spec.loader.exec_module(submission)

# The fake source block holds lines that parse as a finished run with SEED=999 and score 9.0.
# If the parser read them, every test below would see the wrong seed, steps or score.
FAKE_SOURCE = """source_begin
def log_step(step, loss):
    log(f"step:{step}/{args.iterations} train_loss:{loss:.4f}")
config:SEED=999
run_id:fake log:logs/fake.txt
step:1/2 train_loss:9.9
stop_reason:iterations step:2/2 train_time:1ms step_avg:0.50ms
train_time:0.00s quant_time:0.00s train_plus_quant:0.00s max_wallclock:600s
artifact:fake.ptz model_bytes:1 code_bytes:1 bytes_total:2 limit:16000000 headroom:15999998
final_int6_sliding_window_exact val_loss:9.0 val_bpb:9.0
source_end"""

THREE_SEEDS = {7: (2.06, 1.22), 42: (2.07, 1.23), 1337: (2.08, 1.25)}


def log_text(seed: int | None, val_loss: float, val_bpb: float, *, steps: int = 5466, model_bytes: int = 4873878,
             finished: bool = True, error: str | None = None, layers: int = 9, fail_bytes: bool = False) -> str:
    """Return a train_gpt.py log. finished=False cuts it after training, as a crash during quantization would."""
    run_id = f"run_seed{seed}"
    step_avg = 101.5
    train_ms = round(steps * step_avg)
    code_bytes = 72802
    total = model_bytes + code_bytes
    lines = [f"config:ARTIFACT_PATH=artifacts/{run_id}.int6.ptz", f"config:NUM_LAYERS={layers}", f"config:RUN_ID={run_id}"]
    if seed is not None:
        lines.append(f"config:SEED={seed}")
    lines += [
        f"run_id:{run_id} log:logs/{run_id}.txt python:3.11.7 torch:2.11.0 device:cuda world_size:8 "
        "grad_accum_steps:1 compile:1 threads:1",
        f"code:/w/train_gpt.py code_bytes:{code_bytes} source_sha256:0f3a",
        "| 0  NVIDIA H100 80GB HBM3   On | 00000000:18:00.0 Off |   0 |",
        FAKE_SOURCE,
        "train_shards:80 val_shards:1 tokenizer:data/tokenizer.model",
        "step:1/20000 train_loss:6.9400 train_time:120ms step_avg:120.00ms",
        "step:4000/20000 val_loss:2.1500 val_bpb:1.2700 train_time:406200ms step_avg:101.55ms",
        f"step:{steps}/20000 train_loss:2.0123 train_time:{train_ms}ms step_avg:{step_avg:.2f}ms",
        f"stop_reason:wallclock_cap step:{steps}/20000 train_time:{train_ms}ms step_avg:{step_avg:.2f}ms",
    ]
    if error:
        lines.append(f"error: {error}")
    if finished:
        lines += [
            f"train_time:{train_ms / 1000:.2f}s quant_time:40.12s train_plus_quant:{train_ms / 1000 + 40.12:.2f}s "
            "max_wallclock:600s",
            f"artifact:artifacts/{run_id}.int6.ptz model_bytes:{model_bytes} code_bytes:{code_bytes} "
            f"bytes_total:{total} limit:16000000 headroom:{16000000 - total}",
            f"final_int6_roundtrip val_loss:{val_loss + 0.03:.4f} val_bpb:{val_bpb + 0.02:.4f} eval_time:3000ms",
            f"final_int6_roundtrip_exact val_loss:{val_loss + 0.03:.8f} val_bpb:{val_bpb + 0.02:.8f}",
            f"final_int6_sliding_window val_loss:{val_loss:.4f} val_bpb:{val_bpb:.4f} eval_time:80000ms",
            f"final_int6_sliding_window_exact val_loss:{val_loss:.8f} val_bpb:{val_bpb:.8f}",
            "compliance:train_plus_quant seconds:595.1 limit:600 status:pass",
            "compliance:eval seconds:81.0 limit:600 status:pass",
            f"compliance:bytes_total bytes:{total} limit:16000000 status:{'fail' if fail_bytes else 'pass'}",
            "compliance:validation_before_scoring reads_for_weights:0 training_reports:1 status:pass",
        ]
    return "\n".join(lines) + "\n"


def write_log(folder: Path, name: str, text: str) -> str:
    path = folder / name
    path.write_text(text, encoding="utf-8")
    return str(path)


def three_seed_logs(folder: Path) -> list[str]:
    paths = []
    for seed, (loss, bpb) in THREE_SEEDS.items():
        paths.append(write_log(folder, f"seed{seed}.txt", log_text(seed, loss, bpb, steps=5400 + seed % 100,
                                                                     model_bytes=4_800_000 + seed)))
    return paths


def run_tool(folder: Path, *args: str) -> tuple[int, dict | None]:
    """Run main() with --out in folder; return the exit code and the written JSON (None if none was written)."""
    out = folder / "submission.json"
    code = submission.main([*args, "--out", str(out)])
    data = json.loads(out.read_text()) if out.exists() else None
    return code, data


# ---------------------------------------------------------------------------------------------
# Log parsing


def test_read_log_skips_source_block(tmp_path):
    path = write_log(tmp_path, "a.txt", log_text(42, 2.06823456, 1.22491234))
    record = submission.read_run_log(path)
    assert record.seed == "42"
    # The exact line, not the 4-decimal one (2.0682, 1.2249) and not the source block's 9.0.
    assert record.val_loss == 2.06823456
    assert record.val_bpb == 1.22491234
    # stop_reason's step, not step:1 of the source block or step:4000 of the val report.
    assert record.steps == 5466
    assert record.step_avg_ms == 101.5
    # 5466 * 101.5 = 554799 ms, logged as train_time:554.80s.
    assert record.train_time_s == 554.8
    assert record.bytes_model == 4873878
    assert record.bytes_code == 72802
    assert record.bytes_total == 4873878 + 72802
    assert record.source_sha256 == "0f3a"
    assert record.failed_checks == []


def test_read_log_takes_last_appended_run(tmp_path):
    # A reused RUN_ID appends a second run to the same file.
    text = log_text(1, 2.5, 1.5) + log_text(2, 2.06823456, 1.22491234, steps=100)
    record = submission.read_run_log(write_log(tmp_path, "a.txt", text))
    assert record.seed == "2"
    assert record.val_loss == 2.06823456
    assert record.steps == 100


def test_read_log_collects_failed_compliance(tmp_path):
    record = submission.read_run_log(write_log(tmp_path, "a.txt", log_text(1, 2.0, 1.2, fail_bytes=True)))
    assert len(record.failed_checks) == 1
    assert record.failed_checks[0].startswith("compliance:bytes_total ")


# ---------------------------------------------------------------------------------------------
# Three seeds, no reference


def test_three_seeds_json(tmp_path):
    code, data = run_tool(tmp_path, *three_seed_logs(tmp_path), "--name", "UT int6", "--author", "A. Author",
                          "--github-id", "aauthor", "--hardware", "8xH100 SXM", "--date", "2025-01-31")
    assert code == 0
    assert data["name"] == "UT int6"
    assert data["author"] == "A. Author"
    assert data["github_id"] == "aauthor"
    assert data["hardware"] == "8xH100 SXM"
    assert data["date"] == "2025-01-31"
    assert data["track"] == "10min_16mb"
    assert "blurb" not in data
    assert data["num_seeds"] == 3
    # val_loss 2.06, 2.07, 2.08: mean 2.07; deviations -0.01, 0, 0.01, so s^2 = 0.0002 / 2 and s = 0.01.
    assert data["val_loss"] == pytest.approx(2.07, abs=1e-12)
    assert data["mean_val_loss"] == pytest.approx(2.07, abs=1e-12)
    assert data["std_val_loss"] == pytest.approx(0.01, abs=1e-12)
    # val_bpb 1.22, 1.23, 1.25: mean 3.70 / 3 = 1.23333333 (8 decimals); in hundredths the deviations are
    # -4/3, -1/3, 5/3, squares sum to 42/9, s^2 = 7/3, s = sqrt(7/3) / 100 = 0.01527525.
    assert data["val_bpb"] == 1.23333333
    assert data["mean_val_bpb"] == 1.23333333
    assert data["std_val_bpb"] == 0.01527525
    # model_bytes is 4_800_000 + seed, so the max comes from seed 1337.
    assert data["bytes_model"] == 4_801_337
    assert data["bytes_code"] == 72802
    assert data["bytes_total"] == 4_801_337 + 72802
    for key in ("improvement_nats", "t_statistic", "degrees_of_freedom", "p_value"):
        assert key not in data


def test_three_seeds_results_by_seed(tmp_path):
    _, data = run_tool(tmp_path, *three_seed_logs(tmp_path))
    results = data["seed_results"]
    # Numeric order, where text order would be "1337", "42", "7".
    assert list(results) == ["7", "42", "1337"]
    # steps is 5400 + seed % 100 = 5442 and train_time 5442 * 101.5 = 552363 ms.
    assert results["42"] == {"val_bpb": 1.23, "val_loss": 2.07, "steps": 5442, "step_avg_ms": 101.5,
                             "train_time_s": 552.36, "bytes_total": 4_800_042 + 72802}
    assert results["1337"]["steps"] == 5437
    assert results["7"]["val_loss"] == 2.06


def test_field_order(tmp_path):
    _, data = run_tool(tmp_path, *three_seed_logs(tmp_path), "--blurb", "b",
                       "--reference-val-losses", "2.09,2.10,2.11")
    assert list(data) == ["name", "author", "github_id", "date", "track", "blurb", "val_bpb", "val_loss",
                          "bytes_total", "bytes_code", "bytes_model", "hardware", "seed_results", "mean_val_bpb",
                          "std_val_bpb", "mean_val_loss", "std_val_loss", "num_seeds", "reference_val_loss",
                          "reference_val_losses", "t_test", "improvement_nats", "t_statistic",
                          "degrees_of_freedom", "p_value"]


def test_date_defaults_to_today(tmp_path):
    _, data = run_tool(tmp_path, *three_seed_logs(tmp_path))
    assert data["date"] == datetime.date.today().isoformat()


def test_missing_identity_warns(tmp_path, capsys):
    _, data = run_tool(tmp_path, *three_seed_logs(tmp_path), "--name", "n")
    assert data["author"] is None
    assert data["hardware"] is None
    err = capsys.readouterr().err
    assert "null author, github_id, hardware" in err
    assert "--author, --github-id, --hardware" in err


def test_single_seed_std_zero(tmp_path, capsys):
    log = write_log(tmp_path, "a.txt", log_text(5, 2.06823456, 1.22491234))
    code, data = run_tool(tmp_path, log, "--reference-val-loss", "2.1")
    assert code == 0
    assert data["num_seeds"] == 1
    assert data["val_loss"] == 2.06823456
    assert data["std_val_loss"] == 0.0
    assert data["std_val_bpb"] == 0.0
    # 2.1 - 2.06823456 = 0.03176544; one value has no spread, so there is no t-test.
    assert data["improvement_nats"] == 0.03176544
    assert data["t_statistic"] is None
    assert data["degrees_of_freedom"] is None
    assert data["p_value"] is None
    assert "no t-test" in capsys.readouterr().out


# ---------------------------------------------------------------------------------------------
# Reference comparisons


def test_welch_equal_variances(tmp_path, capsys):
    code, data = run_tool(tmp_path, *three_seed_logs(tmp_path), "--reference-val-losses", "2.09,2.10,2.11")
    assert code == 0
    assert data["t_test"] == "welch"
    assert data["reference_val_losses"] == [2.09, 2.10, 2.11]
    assert data["reference_val_loss"] == pytest.approx(2.10, abs=1e-12)
    # 2.10 - 2.07
    assert data["improvement_nats"] == pytest.approx(0.03, abs=1e-12)
    # Both s^2 = 1e-4, n = 3: a = b = 1e-4/3, SE = sqrt(2e-4/3), t = -0.03 / SE = -3 * sqrt(1.5) = -3.67423461.
    assert data["t_statistic"] == pytest.approx(-3 * math.sqrt(1.5), abs=1e-9)
    # Equal a and b: df = (2a)^2 / (a^2/2 + a^2/2) = 4.
    assert data["degrees_of_freedom"] == pytest.approx(4.0, abs=1e-9)
    # For df = 4, F(t) = 1/2 + (3/8) * t/sqrt(u) * (1 - t^2 / (12 u)) with u = 1 + t^2/4.
    # t^2 = 13.5 and u = 4.375, so F = 0.5 - (3/8) * 1.7566119 * 0.7428571 = 0.01065582.
    t = -3 * math.sqrt(1.5)
    u = 1 + t * t / 4
    assert data["p_value"] == pytest.approx(0.5 + 3 / 8 * t / math.sqrt(u) * (1 - t * t / (12 * u)), abs=1e-12)
    assert data["p_value"] == pytest.approx(0.01065582, abs=1e-8)
    out = capsys.readouterr().out
    assert "improvement_nats 0.03000000" in out
    assert "t_statistic -3.674235 degrees_of_freedom 4.0000 p_value 0.0106558" in out
    assert "Welch's t-test" in out


def test_welch_unequal_variances(tmp_path):
    _, data = run_tool(tmp_path, *three_seed_logs(tmp_path), "--reference-val-losses", "2.08,2.10,2.12")
    # Reference s^2 = 4e-4: a = 1e-4/3, b = 4e-4/3, SE = sqrt(5e-4/3) = 0.01290994, t = -0.03 / SE = -2.32379001.
    assert data["t_statistic"] == pytest.approx(-0.03 / math.sqrt(5e-4 / 3), abs=1e-9)
    assert data["t_statistic"] == pytest.approx(-2.32379001, abs=1e-8)
    # df = (5e-4/3)^2 / ((1e-4/3)^2 / 2 + (4e-4/3)^2 / 2) = 25 / ((1 + 16) / 2) = 50/17 = 2.94117647.
    assert data["degrees_of_freedom"] == pytest.approx(50 / 17, abs=1e-9)
    assert data["improvement_nats"] == pytest.approx(0.03, abs=1e-12)
    # P(T <= -2.32379) with 50/17 degrees of freedom, from the built-in CDF so this check needs no scipy.
    assert data["p_value"] == pytest.approx(submission.student_t_cdf_fallback(-2.32379000772445, 50 / 17), abs=1e-9)
    assert 0.05 < data["p_value"] < 0.055


def test_welch_matches_scipy(tmp_path):
    stats = pytest.importorskip("scipy.stats")
    ours, reference = [2.0612, 2.0655, 2.0701, 2.0633], [2.0702, 2.0851, 2.0793]
    result = submission.welch_t_test(ours, reference)
    expected = stats.ttest_ind(ours, reference, equal_var=False, alternative="less")
    assert result.t_statistic == pytest.approx(float(expected.statistic), abs=1e-9)
    assert result.degrees_of_freedom == pytest.approx(float(expected.df), abs=1e-9)
    assert result.p_value == pytest.approx(float(expected.pvalue), abs=1e-9)


def test_one_sample_reference(tmp_path, capsys):
    code, data = run_tool(tmp_path, *three_seed_logs(tmp_path), "--reference-val-loss", "2.10")
    assert code == 0
    assert data["t_test"] == "one-sample"
    assert data["reference_val_loss"] == 2.10
    assert "reference_val_losses" not in data
    assert data["improvement_nats"] == pytest.approx(0.03, abs=1e-12)
    # t = (2.07 - 2.10) / (0.01 / sqrt(3)) = -3 * sqrt(3) = -5.19615242, df = n - 1 = 2.
    assert data["t_statistic"] == pytest.approx(-3 * math.sqrt(3), abs=1e-9)
    assert data["degrees_of_freedom"] == 2.0
    # For df = 2, F(t) = 1/2 + t / (2 sqrt(2 + t^2)); t^2 = 27, so p = 1/2 - 3 sqrt(3) / (2 sqrt(29)) = 0.01754936.
    assert data["p_value"] == pytest.approx(0.5 - 3 * math.sqrt(3) / (2 * math.sqrt(29)), abs=1e-12)
    assert data["p_value"] == pytest.approx(0.01754936, abs=1e-8)
    assert "one-sample t-test against a fixed value" in capsys.readouterr().out


def test_one_sample_matches_scipy():
    stats = pytest.importorskip("scipy.stats")
    ours = [2.0612, 2.0655, 2.0701, 2.0633, 2.0688]
    result = submission.one_sample_t_test(ours, 2.0751)
    expected = stats.ttest_1samp(ours, 2.0751, alternative="less")
    assert result.t_statistic == pytest.approx(float(expected.statistic), abs=1e-9)
    assert result.degrees_of_freedom == 4.0
    assert result.p_value == pytest.approx(float(expected.pvalue), abs=1e-9)


def test_worse_than_reference(tmp_path):
    _, data = run_tool(tmp_path, *three_seed_logs(tmp_path), "--reference-val-loss", "2.04")
    # 2.04 - 2.07 = -0.03 and t = +3 * sqrt(3), so the one-sided p-value is 1 - 0.01754936.
    assert data["improvement_nats"] == pytest.approx(-0.03, abs=1e-12)
    assert data["t_statistic"] == pytest.approx(3 * math.sqrt(3), abs=1e-9)
    assert data["p_value"] == pytest.approx(0.5 + 3 * math.sqrt(3) / (2 * math.sqrt(29)), abs=1e-12)


def test_p_value_without_scipy(tmp_path, monkeypatch):
    monkeypatch.setattr(submission, "scipy_stats", None)
    _, data = run_tool(tmp_path, *three_seed_logs(tmp_path), "--reference-val-loss", "2.10")
    assert data["p_value"] == pytest.approx(0.5 - 3 * math.sqrt(3) / (2 * math.sqrt(29)), abs=1e-12)


def test_zero_spread_has_no_t_test():
    assert submission.one_sample_t_test([2.0, 2.0, 2.0], 2.1) is None
    assert submission.welch_t_test([2.0, 2.0], [2.1, 2.1]) is None
    # One sample with zero spread is fine: df = b^2 / (b^2 / (n2 - 1)) = n2 - 1 = 2.
    assert submission.welch_t_test([2.0, 2.0], [2.08, 2.10, 2.12]).degrees_of_freedom == pytest.approx(2.0)


# ---------------------------------------------------------------------------------------------
# Student-t CDF fallback


@pytest.mark.parametrize("t, df", [(-12.5, 1), (-5.19615242, 2), (-3.67423461, 4), (-2.32379, 50 / 17),
                                   (-0.4, 0.7), (0.0, 3), (0.8, 7.5), (2.1, 29), (4.0, 120), (-1.3, 5000)])
def test_t_cdf_fallback_matches_scipy(t, df):
    stats = pytest.importorskip("scipy.stats")
    assert submission.student_t_cdf_fallback(t, df) == pytest.approx(float(stats.t.cdf(t, df)), abs=1e-8)


@pytest.mark.parametrize("a, b, x", [(0.5, 0.5, 0.3), (1.0, 0.5, 0.9), (2.5, 0.5, 0.02), (60.0, 0.5, 0.97),
                                     (3.0, 4.0, 0.5)])
def test_incomplete_beta_matches_scipy(a, b, x):
    special = pytest.importorskip("scipy.special")
    assert submission.regularized_incomplete_beta(a, b, x) == pytest.approx(float(special.betainc(a, b, x)), abs=1e-10)


def test_t_cdf_fallback_closed_forms():
    # df = 1 is the Cauchy distribution: F(t) = 1/2 + atan(t) / pi.
    for t in (-30.0, -1.0, 0.25, 4.0):
        assert submission.student_t_cdf_fallback(t, 1) == pytest.approx(0.5 + math.atan(t) / math.pi, abs=1e-12)
    # df = 2: F(t) = 1/2 + t / (2 sqrt(2 + t^2)).
    for t in (-5.0, -0.5, 1.5):
        assert submission.student_t_cdf_fallback(t, 2) == pytest.approx(0.5 + t / (2 * math.sqrt(2 + t * t)), abs=1e-12)
    assert submission.student_t_cdf_fallback(0.0, 9.3) == 0.5
    assert submission.student_t_cdf_fallback(-math.inf, 3) == 0.0


# ---------------------------------------------------------------------------------------------
# --out and --update


def test_overwrite_without_update(tmp_path):
    out = tmp_path / "submission.json"
    out.write_text(json.dumps({"name": "old", "notes": "kept only by --update"}))
    _, data = run_tool(tmp_path, *three_seed_logs(tmp_path))
    assert data["name"] is None
    assert "notes" not in data


def test_update_keeps_unset_fields(tmp_path):
    out = tmp_path / "submission.json"
    out.write_text(json.dumps({"name": "old name", "author": "A", "date": "2024-12-01", "blurb": "hand-written",
                               "notes": "extra", "val_loss": 3.0, "num_seeds": 5, "p_value": 0.5,
                               "t_statistic": 1.0, "improvement_nats": -1.0, "t_test": "welch"}))
    code, data = run_tool(tmp_path, *three_seed_logs(tmp_path), "--update", "--name", "new name",
                          "--hardware", "8xH100 SXM")
    assert code == 0
    assert data["name"] == "new name"
    assert data["hardware"] == "8xH100 SXM"
    assert data["author"] == "A"
    assert data["date"] == "2024-12-01"
    assert data["blurb"] == "hand-written"
    assert data["notes"] == "extra"
    assert data["track"] == "10min_16mb"
    assert data["val_loss"] == pytest.approx(2.07, abs=1e-12)
    assert data["num_seeds"] == 3
    # The old statistics belong to other seeds and there is no reference now.
    for key in ("p_value", "t_statistic", "improvement_nats", "t_test"):
        assert key not in data


def test_update_replaces_statistics(tmp_path):
    out = tmp_path / "submission.json"
    out.write_text(json.dumps({"name": "n", "p_value": 0.5, "reference_val_losses": [1.0, 2.0]}))
    _, data = run_tool(tmp_path, *three_seed_logs(tmp_path), "--update", "--reference-val-loss", "2.10")
    assert data["name"] == "n"
    assert data["p_value"] == pytest.approx(0.01754936, abs=1e-8)
    assert "reference_val_losses" not in data


# ---------------------------------------------------------------------------------------------
# Errors


def error_line(capsys) -> str:
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    assert err.startswith("error: ")
    return err


def test_error_unfinished_run(tmp_path, capsys):
    path = write_log(tmp_path, "crashed.txt", log_text(3, 2.0, 1.2, finished=False))
    code, data = run_tool(tmp_path, path)
    assert code == 1
    assert data is None
    err = error_line(capsys)
    assert "crashed.txt" in err
    assert "did not finish" in err
    assert "final_int6_sliding_window_exact" in err


def test_error_unfinished_run_names_error_line(tmp_path, capsys):
    path = write_log(tmp_path, "crashed.txt", log_text(3, 2.0, 1.2, finished=False, error="bytes_total 17000000 is over"))
    assert run_tool(tmp_path, path)[0] == 1
    assert "its last error line: error: bytes_total 17000000 is over" in error_line(capsys)


def test_error_last_appended_run_unfinished(tmp_path, capsys):
    text = log_text(1, 2.0, 1.2) + log_text(2, 2.0, 1.2, finished=False)
    path = write_log(tmp_path, "a.txt", text)
    assert run_tool(tmp_path, path)[0] == 1
    err = error_line(capsys)
    assert "did not finish" in err
    assert "contains 2 runs" in err


def test_error_duplicate_seed(tmp_path, capsys):
    first = write_log(tmp_path, "first.txt", log_text(42, 2.0, 1.2))
    second = write_log(tmp_path, "second.txt", log_text(42, 2.1, 1.3))
    code, data = run_tool(tmp_path, first, second)
    assert code == 1
    assert data is None
    err = error_line(capsys)
    assert "first.txt and " in err
    assert "second.txt both have SEED=42" in err


def test_error_missing_seed(tmp_path, capsys):
    path = write_log(tmp_path, "noseed.txt", log_text(None, 2.0, 1.2))
    assert run_tool(tmp_path, path)[0] == 1
    err = error_line(capsys)
    assert "noseed.txt" in err
    assert "no config:SEED= line" in err


def test_error_missing_file(tmp_path, capsys):
    good = write_log(tmp_path, "good.txt", log_text(1, 2.0, 1.2))
    code, data = run_tool(tmp_path, good, str(tmp_path / "absent.txt"))
    assert code == 1
    assert data is None
    assert "log file not found: " in error_line(capsys)


def test_error_update_without_file(tmp_path, capsys):
    assert run_tool(tmp_path, *three_seed_logs(tmp_path), "--update")[0] == 1
    assert "run without --update to create it" in error_line(capsys)


def test_error_eval_only_log(tmp_path, capsys):
    lines = log_text(1, 2.0, 1.2).splitlines()
    text = "\n".join(line for line in lines if not line.startswith(("stop_reason:", "train_time:")))
    assert run_tool(tmp_path, write_log(tmp_path, "eval.txt", text))[0] == 1
    assert "no stop_reason line" in error_line(capsys)


def test_error_nan_score(tmp_path, capsys):
    path = write_log(tmp_path, "diverged.txt", log_text(3, float("nan"), 1.2))
    assert run_tool(tmp_path, path)[0] == 1
    err = error_line(capsys)
    assert "diverged.txt: the final score is not finite (val_loss:nan" in err


@pytest.mark.parametrize("flags", [["--reference-val-losses", "2.1"], ["--reference-val-losses", "2.1,x"],
                                   ["--reference-val-loss", "nan"], ["--date", "31/01/2025"],
                                   ["--reference-val-loss", "2.1", "--reference-val-losses", "2.1,2.2"]])
def test_invalid_flags_exit_2(tmp_path, flags):
    with pytest.raises(SystemExit) as exc:
        submission.main([*three_seed_logs(tmp_path), *flags, "--out", str(tmp_path / "s.json")])
    assert exc.value.code == 2


def test_cli_exit_code_and_message(tmp_path):
    path = write_log(tmp_path, "crashed.txt", log_text(3, 2.0, 1.2, finished=False))
    result = subprocess.run([sys.executable, str(TOOL_PATH), path, "--out", str(tmp_path / "s.json")],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 1
    assert result.stdout == ""
    assert result.stderr.startswith(f"error: {path}: the run did not finish")
    assert result.stderr.count("\n") == 1
    assert not (tmp_path / "s.json").exists()


# ---------------------------------------------------------------------------------------------
# Warnings


def test_warns_on_mixed_settings_and_failed_check(tmp_path, capsys):
    first = write_log(tmp_path, "a.txt", log_text(1, 2.0, 1.2, layers=9))
    second = write_log(tmp_path, "b.txt", log_text(2, 2.0, 1.2, layers=11, fail_bytes=True))
    assert run_tool(tmp_path, first, second)[0] == 0
    err = capsys.readouterr().err
    assert "warning: settings differ between the logs: NUM_LAYERS\n" in err
    assert "b.txt: compliance:bytes_total " in err
    # RUN_ID, ARTIFACT_PATH and SEED differ by design and are not reported.
    assert "RUN_ID" not in err

