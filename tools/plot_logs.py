"""Plot the train and validation curves of several train_gpt.py runs in one PNG.

Usage:
    python tools/plot_logs.py logs/a.txt logs/b.txt [--out curves.png] [--title T] [--smooth N]

The figure has four panels: loss against step, loss against training time, val_bpb against
step and val_bpb against training time. Each run gets one colour. Its legend label is the
RUN_ID from the log (the file name when the log has none), followed by the final
sliding-window val_bpb when the log contains it.

Parsing needs only the standard library. Drawing needs matplotlib, which is an optional
dependency of this repository (pip install matplotlib).
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from dataclasses import dataclass, field

# train_gpt.py logs its own source between these two lines. The source contains f-strings
# that look like log lines, so the parser skips the block.
SOURCE_BEGIN = "source_begin"
SOURCE_END = "source_end"

# Matches "final_int6_sliding_window" and "final_int6_sliding_window_exact". The exact line
# has 8 decimals instead of 4, so it wins when both are present.
FINAL_SLIDING_PATTERN = re.compile(r"final_\w*?sliding_window(_exact)?")

# Fraction of each curve's steps at the start whose points may run off the top of the y axes.
ZOOM_SKIP_FRACTION = 0.1


class LogFormatError(ValueError):
    """A log that cannot be plotted: no step lines, or a line with a missing field or an invalid number."""


@dataclass
class RunCurves:
    """Curves parsed from one train_gpt.py log. Times are training time in seconds."""

    path: str
    run_id: str
    train_steps: list[int] = field(default_factory=list)
    train_losses: list[float] = field(default_factory=list)
    train_seconds: list[float] = field(default_factory=list)
    val_steps: list[int] = field(default_factory=list)
    val_losses: list[float] = field(default_factory=list)
    val_bpbs: list[float] = field(default_factory=list)
    val_seconds: list[float] = field(default_factory=list)
    final_sliding_bpb: float | None = None
    # More than 1 when several runs were appended to the same file (a reused RUN_ID).
    # Only the last run's values are kept.
    runs_in_file: int = 1


def split_fields(line: str) -> dict[str, str]:
    """Split a line of space-separated key:value tokens into a dict.

    A token without a colon maps to an empty string, so "final_int6_sliding_window_exact"
    becomes a key. Values keep their units, for example "30012ms".
    """
    fields = {}
    for token in line.split():
        key, _, value = token.partition(":")
        fields[key] = value
    return fields


def parse_number(text: str, kind: type, path: str, line_number: int) -> float | int:
    """Convert a logged value such as "25/300" (step), "30012ms" or "4.9000" to int or float."""
    text = text.split("/", 1)[0]
    if text.endswith("ms"):
        text = text[: -len("ms")]
    try:
        return kind(text)
    except ValueError:
        raise LogFormatError(f"{path}:{line_number}: invalid number {text!r}") from None


def require_field(fields: dict[str, str], key: str, path: str, line_number: int) -> str:
    if key not in fields:
        raise LogFormatError(f"{path}:{line_number}: step line has no {key} field")
    return fields[key]


def parse_log(path: str) -> RunCurves:
    """Read one train_gpt.py log and return its curves as plain lists.

    Train points come from step lines with train_loss, validation points from step lines
    with val_loss. Lines between source_begin and source_end are skipped. Raises
    LogFormatError when the log has no step lines or a line has a missing field or an
    invalid number, and OSError when the file cannot be read.
    """
    curves = RunCurves(path=path, run_id="")
    in_source = False
    has_data = False

    with open(path, encoding="utf-8", errors="replace") as f:
        for line_number, raw_line in enumerate(f, start=1):
            line = raw_line.rstrip("\n")
            if in_source:
                in_source = line != SOURCE_END
                continue
            if line == SOURCE_BEGIN:
                in_source = True
                continue

            if line.startswith("config:"):
                # Config lines open every run. Seeing one after data means another run was
                # appended to this file, so start over and keep only the newest run.
                if has_data:
                    curves = RunCurves(path=path, run_id="", runs_in_file=curves.runs_in_file + 1)
                    has_data = False
                name, _, value = line[len("config:"):].partition("=")
                if name == "RUN_ID":
                    curves.run_id = value.strip()
                continue

            fields = split_fields(line)
            if line.startswith("step:"):
                step = parse_number(fields["step"], int, path, line_number)
                time_ms = require_field(fields, "train_time", path, line_number)
                seconds = parse_number(time_ms, float, path, line_number) / 1000.0
                if "train_loss" in fields:
                    curves.train_steps.append(step)
                    curves.train_losses.append(parse_number(fields["train_loss"], float, path, line_number))
                    curves.train_seconds.append(seconds)
                    has_data = True
                if "val_loss" in fields:
                    bpb = require_field(fields, "val_bpb", path, line_number)
                    curves.val_steps.append(step)
                    curves.val_losses.append(parse_number(fields["val_loss"], float, path, line_number))
                    curves.val_bpbs.append(parse_number(bpb, float, path, line_number))
                    curves.val_seconds.append(seconds)
                    has_data = True
                continue

            first_token = line.split(" ", 1)[0]
            match = FINAL_SLIDING_PATTERN.fullmatch(first_token)
            if match and "val_bpb" in fields:
                is_exact = match.group(1) is not None
                if is_exact or curves.final_sliding_bpb is None:
                    curves.final_sliding_bpb = parse_number(fields["val_bpb"], float, path, line_number)
                has_data = True

    if not curves.train_steps and not curves.val_steps:
        raise LogFormatError(f"{path}: no step lines found (expected lines like 'step:25/300 train_loss:...')")
    if not curves.run_id:
        curves.run_id = os.path.splitext(os.path.basename(path))[0]
    return curves


def moving_average(values: list[float], window: int) -> list[float]:
    """Return the trailing mean over up to `window` points, with the same length as `values`.

    The first window - 1 points average over the points available so far.
    """
    if window < 1:
        raise ValueError(f"window must be at least 1, got {window}")
    averaged = []
    total = 0.0
    for i, value in enumerate(values):
        total += value
        if i >= window:
            total -= values[i - window]
        averaged.append(total / min(i + 1, window))
    return averaged


def zoomed_y_limits(points: list[tuple[list[int], list[float]]], skip_fraction: float) -> tuple[float, float] | None:
    """Return y limits that fit every point except those in the first skip_fraction of steps.

    `points` contains (steps, values) pairs, one per curve, and the fraction applies to the
    last step of each curve. The early points of a run are far above the rest and would
    flatten the part where ablations differ, so they may run off the top. Returns None
    when there are no values.
    """
    all_values = [value for _, values in points for value in values]
    if not all_values:
        return None
    tail_values = []
    for steps, values in points:
        if steps:
            first_kept = skip_fraction * max(steps)
            tail_values += [value for step, value in zip(steps, values) if step >= first_kept]
    low = min(all_values)
    high = max(tail_values or all_values)
    margin = 0.05 * (high - low) or 0.05 * abs(high) or 0.05
    return low - margin, high + margin


def legend_labels(runs: list[RunCurves]) -> list[str]:
    """Label each run by RUN_ID, adding the log path when two runs share a RUN_ID."""
    counts: dict[str, int] = {}
    for run in runs:
        counts[run.run_id] = counts.get(run.run_id, 0) + 1

    labels = []
    for run in runs:
        label = run.run_id
        if counts[run.run_id] > 1:
            label += f" [{run.path}]"
        if run.final_sliding_bpb is not None:
            label += f" (sliding-window val_bpb {run.final_sliding_bpb:.4f})"
        labels.append(label)
    return labels


def import_pyplot():
    """Import matplotlib.pyplot with the Agg backend, which needs no display.

    Raises ImportError when matplotlib is not installed.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def draw_figure(plt, runs: list[RunCurves], out_path: str, title: str | None, smooth: int) -> None:
    """Draw the four panels for all runs with pyplot `plt` and save them as a PNG at out_path."""
    figure, axes = plt.subplots(2, 2, figsize=(14, 9), squeeze=False)
    loss_step, loss_time = axes[0]
    bpb_step, bpb_time = axes[1]
    palette = plt.get_cmap("tab10" if len(runs) <= 10 else "tab20")
    # NOTE: colours repeat after 20 runs.
    colors = [palette(i % palette.N) for i in range(len(runs))]

    loss_points = []
    bpb_points = []
    for run, color in zip(runs, colors):
        train_losses = moving_average(run.train_losses, smooth)
        loss_points += [(run.train_steps, train_losses), (run.val_steps, run.val_losses)]
        bpb_points.append((run.val_steps, run.val_bpbs))
        for axis, train_x, val_x in ((loss_step, run.train_steps, run.val_steps),
                                     (loss_time, run.train_seconds, run.val_seconds)):
            axis.plot(train_x, train_losses, color=color, linewidth=0.8, alpha=0.7)
            axis.plot(val_x, run.val_losses, color=color, marker="o", markersize=4, linewidth=1.2)
        bpb_step.plot(run.val_steps, run.val_bpbs, color=color, marker="o", markersize=4, linewidth=1.2)
        bpb_time.plot(run.val_seconds, run.val_bpbs, color=color, marker="o", markersize=4, linewidth=1.2)

    train_note = "train (thin line)" if smooth == 1 else f"train (thin line, mean of {smooth} points)"
    loss_title = f"loss: {train_note}, validation (markers)"
    loss_step.set_title(loss_title)
    loss_time.set_title(loss_title)
    bpb_step.set_title("validation val_bpb")
    bpb_time.set_title("validation val_bpb")
    for axis in (loss_step, bpb_step):
        axis.set_xlabel("step")
    for axis in (loss_time, bpb_time):
        axis.set_xlabel("train_time (s, excludes validation)")
    for axis in (loss_step, loss_time):
        axis.set_ylabel("loss (nats per token)")
    for axis in (bpb_step, bpb_time):
        axis.set_ylabel("val_bpb (bits per byte)")
    for axis in axes.flat:
        axis.grid(True, alpha=0.3)

    for row, points in ((axes[0], loss_points), (axes[1], bpb_points)):
        limits = zoomed_y_limits(points, ZOOM_SKIP_FRACTION)
        if limits is not None:
            for axis in row:
                axis.set_ylim(*limits)
    figure.text(0.01, 0.995, f"y axes fit the points after the first {ZOOM_SKIP_FRACTION:.0%} of steps, "
                "so earlier points can run off the top", fontsize=8, color="gray", va="top")

    handles = [plt.Line2D([], [], color=color, marker="o", linewidth=1.2) for color in colors]
    figure.legend(handles, legend_labels(runs), loc="lower center", ncol=min(len(runs), 3), frameon=False)
    if title:
        figure.suptitle(title)
    legend_rows = (len(runs) + 2) // 3
    figure.tight_layout(rect=(0, 0.03 + 0.03 * legend_rows, 1, 0.98))

    out_dir = os.path.dirname(out_path)
    if out_dir:
        os.makedirs(out_dir, exist_ok=True)
    figure.savefig(out_path, dpi=110)
    plt.close(figure)


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Plot train and validation curves of train_gpt.py logs in one PNG.")
    parser.add_argument("logs", nargs="+", metavar="LOG", help="log files written by train_gpt.py (logs/<RUN_ID>.txt)")
    parser.add_argument("--out", default="curves.png", metavar="PNG", help="PNG file to write (default: curves.png)")
    parser.add_argument("--title", default=None, help="title above the figure")
    parser.add_argument("--smooth", type=positive_int, default=1, metavar="N",
                        help="moving average over N train-loss points (default: 1, no smoothing)")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the command line and return the exit code: 0 on success, 1 on an error."""
    args = build_parser().parse_args(argv)

    runs = []
    for path in args.logs:
        try:
            run = parse_log(path)
        except (OSError, LogFormatError) as e:
            print(f"error: {e}", file=sys.stderr)
            return 1
        if run.runs_in_file > 1:
            print(f"warning: {path} contains {run.runs_in_file} runs (a reused RUN_ID), so only the last one is plotted",
                  file=sys.stderr)
        runs.append(run)

    try:
        plt = import_pyplot()
    except ImportError as e:
        print(f"error: cannot import matplotlib ({e}). Install it with `pip install matplotlib` to draw the plot.",
              file=sys.stderr)
        return 1
    draw_figure(plt, runs, args.out, args.title, args.smooth)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
