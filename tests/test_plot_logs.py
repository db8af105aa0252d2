"""Tests for tools/plot_logs.py on small hand-written logs."""

import importlib.util
import sys
from pathlib import Path

import pytest

TOOL_PATH = Path(__file__).resolve().parent.parent / "tools" / "plot_logs.py"
_spec = importlib.util.spec_from_file_location("plot_logs", TOOL_PATH)
plot_logs = importlib.util.module_from_spec(_spec)
# dataclasses looks the module up in sys.modules, so it must be registered before it runs.
sys.modules["plot_logs"] = plot_logs
_spec.loader.exec_module(plot_logs)

# A fake source block whose lines look like step and final lines. The parser must skip
# all of them, so none of their values (99.0, 77.0, 0.5) may show up in the results.
FAKE_SOURCE = """\
source_begin
step:1/300 train_loss:99.0000 train_time:1ms step_avg:1.00ms
step:2/300 val_loss:77.0000 val_bpb:77.0000 train_time:2ms step_avg:1.00ms
final_int6_sliding_window_exact val_loss:0.50000000 val_bpb:0.50000000
config:RUN_ID=from_source
            log(f"step:{step}/{args.iterations} val_loss:{val_loss:.4f} val_bpb:{val_bpb:.4f} "
source_end
"""

LOG_A = """\
config:EVAL_STRIDE=64
config:RUN_ID=ablation_a
config:SEED=42
run_id:ablation_a log:logs/ablation_a.txt python:3.11.7 torch:2.11.0
""" + FAKE_SOURCE + """\
step:0/300 val_loss:6.9300 val_bpb:4.1000 train_time:0ms step_avg:0.00ms
step:1/300 train_loss:6.9400 train_time:1200ms step_avg:1200.00ms
step:25/300 train_loss:5.1234 train_time:30012ms step_avg:1200.48ms
step:50/300 train_loss:4.9500 train_time:60010ms step_avg:1200.20ms
step:50/300 val_loss:4.9000 val_bpb:2.9500 train_time:60012ms step_avg:1200.24ms
stop_reason:iterations step:50/300 train_time:60012ms step_avg:1200.24ms
final_int6_roundtrip val_loss:4.9100 val_bpb:2.9600 eval_time:900ms
final_int6_roundtrip_exact val_loss:4.91000000 val_bpb:2.96000000
final_int6_sliding_window val_loss:4.8000 val_bpb:2.8800 eval_time:5000ms
final_int6_sliding_window_exact val_loss:4.80000000 val_bpb:2.87999999
"""

# No RUN_ID config line and no final line: the label falls back to the file name.
LOG_B = """\
config:SEED=7
step:10/100 train_loss:5.5000 train_time:10000ms step_avg:1000.00ms
step:20/100 train_loss:5.0000 train_time:20000ms step_avg:1000.00ms
step:20/100 val_loss:5.1000 val_bpb:3.0000 train_time:20500ms step_avg:1025.00ms
"""


def write_log(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return str(path)


def test_parse_log_values(tmp_path):
    curves = plot_logs.parse_log(write_log(tmp_path, "a.txt", LOG_A))

    assert curves.run_id == "ablation_a"
    assert curves.train_steps == [1, 25, 50]
    assert curves.train_losses == [6.94, 5.1234, 4.95]
    assert curves.train_seconds == [1.2, 30.012, 60.01]
    assert curves.val_steps == [0, 50]
    assert curves.val_losses == [6.93, 4.9]
    assert curves.val_bpbs == [4.1, 2.95]
    assert curves.val_seconds == [0.0, 60.012]
    assert curves.runs_in_file == 1


def test_parse_log_prefers_exact_sliding_bpb(tmp_path):
    curves = plot_logs.parse_log(write_log(tmp_path, "a.txt", LOG_A))

    assert curves.final_sliding_bpb == 2.87999999


def test_parse_log_exact_bpb_wins_either_order(tmp_path):
    rounded = "final_int6_sliding_window val_loss:4.8000 val_bpb:2.8800 eval_time:5000ms\n"
    exact = "final_int6_sliding_window_exact val_loss:4.80000000 val_bpb:2.87999999\n"
    text = LOG_A.replace(rounded, "").replace(exact, exact + rounded)
    curves = plot_logs.parse_log(write_log(tmp_path, "a.txt", text))

    assert curves.final_sliding_bpb == 2.87999999


def test_parse_log_rounded_sliding_bpb(tmp_path):
    text = LOG_A.replace("final_int6_sliding_window_exact val_loss:4.80000000 val_bpb:2.87999999\n", "")
    curves = plot_logs.parse_log(write_log(tmp_path, "a.txt", text))

    assert curves.final_sliding_bpb == 2.88


def test_parse_log_skips_source_block(tmp_path):
    curves = plot_logs.parse_log(write_log(tmp_path, "a.txt", LOG_A))

    assert 99.0 not in curves.train_losses
    assert 77.0 not in curves.val_losses
    assert 2 not in curves.val_steps
    assert curves.run_id != "from_source"
    assert curves.final_sliding_bpb != 0.5


def test_parse_log_file_name_fallback(tmp_path):
    curves = plot_logs.parse_log(write_log(tmp_path, "seed7_run.txt", LOG_B))

    assert curves.run_id == "seed7_run"
    assert curves.final_sliding_bpb is None
    assert curves.train_steps == [10, 20]
    assert curves.val_steps == [20]
    assert curves.val_seconds == [20.5]


def test_parse_log_appended_runs_keep_last(tmp_path):
    path = write_log(tmp_path, "reused.txt", LOG_A + LOG_B)
    curves = plot_logs.parse_log(path)

    assert curves.runs_in_file == 2
    assert curves.run_id == "reused"
    assert curves.train_steps == [10, 20]
    assert curves.train_losses == [5.5, 5.0]
    assert curves.final_sliding_bpb is None


def test_parse_log_without_steps_names_file(tmp_path):
    text = "config:RUN_ID=empty\n" + FAKE_SOURCE + "final_int6_sliding_window_exact val_loss:4.8 val_bpb:2.88\n"
    path = write_log(tmp_path, "empty.txt", text)

    with pytest.raises(plot_logs.LogFormatError, match="empty.txt: no step lines"):
        plot_logs.parse_log(path)


def test_parse_log_invalid_number(tmp_path):
    path = write_log(tmp_path, "bad.txt", "step:5/10 train_loss:abc train_time:10ms step_avg:2.00ms\n")

    with pytest.raises(plot_logs.LogFormatError, match=r"bad.txt:1: invalid number 'abc'"):
        plot_logs.parse_log(path)


def test_main_empty_log_error(tmp_path, capsys):
    path = write_log(tmp_path, "empty.txt", "config:RUN_ID=empty\n")

    exit_code = plot_logs.main([path, "--out", str(tmp_path / "out.png")])

    assert exit_code != 0
    error = capsys.readouterr().err
    assert "empty.txt" in error
    assert "no step lines" in error
    assert not (tmp_path / "out.png").exists()


def test_main_missing_log_file(tmp_path, capsys):
    exit_code = plot_logs.main([str(tmp_path / "absent.txt"), "--out", str(tmp_path / "out.png")])

    assert exit_code != 0
    assert "absent.txt" in capsys.readouterr().err


def test_main_without_matplotlib(tmp_path, capsys, monkeypatch):
    path = write_log(tmp_path, "a.txt", LOG_A)
    # A None entry in sys.modules makes `import matplotlib` raise ImportError.
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    monkeypatch.setitem(sys.modules, "matplotlib.pyplot", None)

    exit_code = plot_logs.main([path, "--out", str(tmp_path / "out.png")])

    assert exit_code != 0
    error_lines = capsys.readouterr().err.strip().splitlines()
    assert len(error_lines) == 1
    assert "pip install matplotlib" in error_lines[0]
    assert not (tmp_path / "out.png").exists()


def test_moving_average_window():
    assert plot_logs.moving_average([1.0, 2.0, 3.0, 4.0, 5.0], 1) == [1.0, 2.0, 3.0, 4.0, 5.0]
    assert plot_logs.moving_average([1.0, 2.0, 3.0, 4.0, 5.0], 2) == [1.0, 1.5, 2.5, 3.5, 4.5]
    assert plot_logs.moving_average([3.0, 6.0, 9.0, 12.0], 3) == [3.0, 4.5, 6.0, 9.0]
    assert plot_logs.moving_average([], 4) == []
    with pytest.raises(ValueError):
        plot_logs.moving_average([1.0], 0)


def test_zoomed_y_limits_skip_early_points():
    points = [([0, 10, 50, 100], [7.0, 6.0, 3.0, 2.0])]

    low, high = plot_logs.zoomed_y_limits(points, 0.2)

    # The points at steps 0 and 10 come before 20% of step 100, so the top fits 3.0.
    assert low == pytest.approx(2.0 - 0.05)
    assert high == pytest.approx(3.0 + 0.05)
    assert plot_logs.zoomed_y_limits([([], [])], 0.2) is None


def test_legend_labels(tmp_path):
    run_a = plot_logs.parse_log(write_log(tmp_path, "a.txt", LOG_A))
    run_b = plot_logs.parse_log(write_log(tmp_path, "b.txt", LOG_B))
    run_a_copy = plot_logs.parse_log(write_log(tmp_path, "a_copy.txt", LOG_A))

    assert plot_logs.legend_labels([run_a, run_b]) == [
        "ablation_a (sliding-window val_bpb 2.8800)",
        "b",
    ]
    duplicate_labels = plot_logs.legend_labels([run_a, run_a_copy])
    assert duplicate_labels[0] == f"ablation_a [{run_a.path}] (sliding-window val_bpb 2.8800)"
    assert duplicate_labels[1] == f"ablation_a [{run_a_copy.path}] (sliding-window val_bpb 2.8800)"


def test_smooth_rejects_zero(tmp_path):
    path = write_log(tmp_path, "a.txt", LOG_A)

    with pytest.raises(SystemExit) as raised:
        plot_logs.main([path, "--smooth", "0"])
    assert raised.value.code != 0


def test_main_writes_png_for_two_logs(tmp_path, capsys):
    pytest.importorskip("matplotlib", reason="matplotlib is not installed, so the PNG cannot be drawn")
    log_a = write_log(tmp_path, "a.txt", LOG_A)
    log_b = write_log(tmp_path, "b.txt", LOG_B)
    out_path = tmp_path / "plots" / "curves.png"

    exit_code = plot_logs.main([log_a, log_b, "--out", str(out_path), "--title", "test", "--smooth", "2"])

    assert exit_code == 0
    assert out_path.exists()
    data = out_path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(data) > 10_000
    assert str(out_path) in capsys.readouterr().out
