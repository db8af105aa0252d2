#!/usr/bin/env python3
"""Build the challenge's submission.json from train_gpt.py run logs, one log per seed.

Example, three seeds compared with the per-seed losses of the previous record:

    python3 tools/submission.py logs/run_seed1337.txt logs/run_seed42.txt logs/run_seed7.txt \\
        --name "Universal transformer, int6 GPTQ" --author "Jane Doe" --github-id janedoe \\
        --hardware "8xH100 SXM" --reference-val-losses 2.0851,2.0874,2.0839

The score of a seed is its final_int6_sliding_window_exact line (val_loss in nats per token,
val_bpb in bits per byte). The top-level val_loss and val_bpb are means over the seeds,
and the byte counts are maxima over the seeds. Given a reference, the script reports the
improvement in nats and a one-sided t-test of "the mean val_loss is lower than the reference".
p-values come from scipy.stats when scipy imports, otherwise from a built-in Student-t CDF.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import re
import statistics
import sys
from dataclasses import dataclass, field
from pathlib import Path

try:
    from scipy import stats as scipy_stats
except ImportError:
    scipy_stats = None

DEFAULT_TRACK = "10min_16mb"
CHALLENGE_BYTES = 16_000_000
SCORE_LINE = "final_int6_sliding_window_exact"
# Settings that differ between the seeds of one submission by design.
PER_RUN_SETTINGS = {"SEED", "RUN_ID", "ARTIFACT_PATH"}
IDENTITY_FIELDS = ("name", "author", "github_id", "hardware")
# Under --update these are dropped from the old file before the new ones are added, so a call
# without a reference leaves no statistics that belong to another set of seeds.
REFERENCE_FIELDS = ("reference_val_loss", "reference_val_losses", "t_test", "improvement_nats",
                    "t_statistic", "degrees_of_freedom", "p_value")
FIELD_PATTERN = re.compile(r"(\w+):(\S+)")


class SubmissionError(Exception):
    """Invalid input: a log, a flag value or an existing submission.json. The message is one line."""


@dataclass
class RunRecord:
    """Scores, timings and sizes that one finished training run logged."""

    path: str
    seed: str
    val_loss: float
    val_bpb: float
    steps: int
    step_avg_ms: float
    train_time_s: float
    bytes_total: int
    bytes_model: int
    bytes_code: int
    config: dict[str, str] = field(default_factory=dict)
    source_sha256: str | None = None
    failed_checks: list[str] = field(default_factory=list)


@dataclass
class TTestResult:
    """Result of a one-sided t-test of "mean val_loss < reference", where p_value is P(T <= t_statistic)."""

    t_statistic: float
    degrees_of_freedom: float
    p_value: float


# ---------------------------------------------------------------------------------------------
# Log parsing


def parse_fields(line: str) -> dict[str, str]:
    """Map each space-separated key:value token of a log line to its value."""
    return {key: value for key, value in FIELD_PATTERN.findall(line)}


def parse_number(text: str, unit: str = "") -> float:
    """Parse "101.55ms" (with unit="ms") or "1.2249" into a float."""
    if unit and text.endswith(unit):
        text = text[: -len(unit)]
    return float(text)


def split_runs(lines: list[str]) -> list[list[str]]:
    """Split a log into its runs, leaving out the source code block of each.

    train_gpt.py appends to logs/<RUN_ID>.txt, so a reused RUN_ID puts several runs in one file.
    A run starts with its config: lines, so a config: line after a run_id: line starts the next run.
    """
    runs: list[list[str]] = [[]]
    in_source = False
    seen_run_id = False
    for line in lines:
        if in_source:
            in_source = line != "source_end"
            continue
        if line == "source_begin":
            in_source = True
            continue
        if line.startswith("config:") and seen_run_id:
            runs.append([])
            seen_run_id = False
        if line.startswith("run_id:"):
            seen_run_id = True
        runs[-1].append(line)
    return [run for run in runs if run]


def read_run_log(path: str) -> RunRecord:
    """Read the last run in a train_gpt.py log.

    Raises SubmissionError, naming the file, if the file is missing, the run did not finish or a field is missing.
    """
    try:
        text = Path(path).read_text(encoding="utf-8", errors="replace")
    except FileNotFoundError:
        raise SubmissionError(f"log file not found: {path}") from None
    except IsADirectoryError:
        raise SubmissionError(f"{path} is a directory, expected a train_gpt.py log file") from None
    except OSError as e:
        raise SubmissionError(f"failed to read log file {path}: {e.strerror}") from None

    runs = split_runs(text.splitlines())
    lines = runs[-1] if runs else []
    runs_note = f" (the file contains {len(runs)} runs and only the last one is read)" if len(runs) > 1 else ""

    config: dict[str, str] = {}
    fields_by_kind: dict[str, dict[str, str]] = {}
    errors: list[str] = []
    failed_checks: list[str] = []
    for line in lines:
        if line.startswith("config:"):
            name, _, value = line[len("config:"):].partition("=")
            config[name] = value
            continue
        if line.startswith("error:"):
            errors.append(line)
            continue
        kind = line.split(" ", 1)[0]
        if kind == SCORE_LINE or kind.startswith(("stop_reason:", "artifact:", "code:")):
            fields_by_kind[kind.split(":", 1)[0]] = parse_fields(line)
        elif kind.startswith("train_time:") and "quant_time:" in line:
            fields_by_kind["train_summary"] = parse_fields(line)
        elif kind.startswith("compliance:") and "status:fail" in line:
            failed_checks.append(line)

    if SCORE_LINE not in fields_by_kind:
        reason = f"; its last error line: {errors[-1]}" if errors else ""
        raise SubmissionError(f"{path}: the run did not finish (no {SCORE_LINE} line){reason}{runs_note}")
    if "SEED" not in config:
        raise SubmissionError(f"{path}: no config:SEED= line, so the run's seed is unknown{runs_note}")
    if not config["SEED"].strip():
        raise SubmissionError(f"{path}: the config:SEED= line has an empty value{runs_note}")
    if "stop_reason" not in fields_by_kind:
        raise SubmissionError(f"{path}: no stop_reason line; an EVAL_ONLY=1 run has no training to submit{runs_note}")
    if "artifact" not in fields_by_kind:
        raise SubmissionError(f"{path}: no artifact: line with model_bytes, code_bytes and bytes_total{runs_note}")

    score_values = fields_by_kind[SCORE_LINE].get("val_loss", ""), fields_by_kind[SCORE_LINE].get("val_bpb", "")
    if any(value.lower() in ("nan", "inf", "-inf") for value in score_values):
        raise SubmissionError(f"{path}: the final score is not finite (val_loss:{score_values[0]} val_bpb:{score_values[1]})")

    try:
        score, stop, sizes = fields_by_kind[SCORE_LINE], fields_by_kind["stop_reason"], fields_by_kind["artifact"]
        if "train_summary" in fields_by_kind:
            train_time_s = parse_number(fields_by_kind["train_summary"]["train_time"], "s")
        else:
            train_time_s = parse_number(stop["train_time"], "ms") / 1000.0
        return RunRecord(
            path=path,
            seed=config["SEED"],
            val_loss=float(score["val_loss"]),
            val_bpb=float(score["val_bpb"]),
            steps=int(stop["step"].split("/")[0]),
            step_avg_ms=parse_number(stop["step_avg"], "ms"),
            train_time_s=train_time_s,
            bytes_total=int(sizes["bytes_total"]),
            bytes_model=int(sizes["model_bytes"]),
            bytes_code=int(sizes["code_bytes"]),
            config=config,
            source_sha256=fields_by_kind.get("code", {}).get("source_sha256"),
            failed_checks=failed_checks,
        )
    except (KeyError, ValueError) as e:
        raise SubmissionError(f"{path}: a final line has a missing or invalid field ({type(e).__name__}: {e})") from None


def read_run_logs(paths: list[str]) -> list[RunRecord]:
    """Read every log, reject a repeated seed and return the records sorted by seed."""
    records: list[RunRecord] = []
    by_seed: dict[str, RunRecord] = {}
    for path in paths:
        record = read_run_log(path)
        if record.seed in by_seed:
            raise SubmissionError(f"{by_seed[record.seed].path} and {path} both have SEED={record.seed}; "
                                  f"pass one log per seed")
        by_seed[record.seed] = record
        records.append(record)
    return sorted(records, key=seed_sort_key)


def seed_sort_key(record: RunRecord) -> tuple[int, int | str]:
    """Sort integer seeds by value, any other seed text after them."""
    try:
        return (0, int(record.seed))
    except ValueError:
        return (1, record.seed)


def describe_mismatches(records: list[RunRecord]) -> list[str]:
    """List warnings about logs that look like different recipes or that failed a challenge limit."""
    warnings = []
    hashes = {r.source_sha256 for r in records if r.source_sha256}
    if len(hashes) > 1:
        warnings.append("the logs come from different train_gpt.py sources (source_sha256 differs)")
    names = set().union(*(r.config.keys() for r in records)) - PER_RUN_SETTINGS
    differing = sorted(n for n in names if len({r.config.get(n) for r in records}) > 1)
    if differing:
        warnings.append("settings differ between the logs: " + ", ".join(differing))
    for r in records:
        for line in r.failed_checks:
            warnings.append(f"{r.path}: {line}")
        if r.bytes_total > CHALLENGE_BYTES:
            warnings.append(f"{r.path}: bytes_total {r.bytes_total} is over the {CHALLENGE_BYTES}-byte limit")
    return warnings


# ---------------------------------------------------------------------------------------------
# Statistics


def mean_and_std(values: list[float]) -> tuple[float, float]:
    """Return the mean and the sample standard deviation (n-1), which is 0.0 for a single value."""
    if len(values) < 2:
        return values[0], 0.0
    return statistics.fmean(values), statistics.stdev(values)


def _continued_fraction_beta(a: float, b: float, x: float) -> float:
    """Evaluate the continued fraction of I_x(a, b) by the modified Lentz method.

    It converges fast for x < (a + 1) / (a + b + 2); the caller uses the symmetry
    I_x(a, b) = 1 - I_(1-x)(b, a) for larger x.
    """
    tiny, tolerance = 1e-300, 1e-15
    numerator_c = 1.0
    denominator_d = 1.0 - (a + b) * x / (a + 1.0)
    denominator_d = 1.0 / (denominator_d if abs(denominator_d) > tiny else tiny)
    result = denominator_d
    for m in range(1, 1000):
        # Each m adds an even term d_2m and an odd term d_2m+1 of the continued fraction.
        for term in (m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
                     -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))):
            denominator_d = 1.0 + term * denominator_d
            denominator_d = 1.0 / (denominator_d if abs(denominator_d) > tiny else tiny)
            numerator_c = 1.0 + term / numerator_c
            numerator_c = numerator_c if abs(numerator_c) > tiny else tiny
            step = denominator_d * numerator_c
            result *= step
        if abs(step - 1.0) < tolerance:
            return result
    raise ArithmeticError(f"incomplete beta continued fraction did not converge for a={a}, b={b}, x={x}")


def regularized_incomplete_beta(a: float, b: float, x: float) -> float:
    """Return I_x(a, b) for a, b > 0 and 0 <= x <= 1."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    log_prefix = (math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b)
                  + a * math.log(x) + b * math.log1p(-x))
    if x < (a + 1.0) / (a + b + 2.0):
        return math.exp(log_prefix) * _continued_fraction_beta(a, b, x) / a
    return 1.0 - math.exp(log_prefix) * _continued_fraction_beta(b, a, 1.0 - x) / b


def student_t_cdf_fallback(t: float, df: float) -> float:
    """Return P(T <= t) for Student's t with df > 0 degrees of freedom (real df allowed), without scipy.

    Uses P(|T| >= |t|) = I_x(df/2, 1/2) with x = df / (df + t^2).
    """
    if math.isinf(t):
        return 0.0 if t < 0 else 1.0
    tail = 0.5 * regularized_incomplete_beta(df / 2.0, 0.5, df / (df + t * t))
    return tail if t < 0 else 1.0 - tail


def student_t_cdf(t: float, df: float) -> float:
    """Return P(T <= t) for Student's t, from scipy.stats when it imports."""
    if scipy_stats is not None:
        return float(scipy_stats.t.cdf(t, df))
    return student_t_cdf_fallback(t, df)


def one_sample_t_test(sample: list[float], reference: float) -> TTestResult | None:
    """Test whether the sample's mean is below a fixed value. Returns None if n < 2 or the sample has no spread."""
    n = len(sample)
    if n < 2:
        return None
    mean, std = mean_and_std(sample)
    if std == 0.0:
        return None
    t = (mean - reference) / (std / math.sqrt(n))
    df = n - 1.0
    return TTestResult(t, df, student_t_cdf(t, df))


def welch_t_test(sample: list[float], reference_sample: list[float]) -> TTestResult | None:
    """Test whether the sample's mean is below the reference sample's mean, without assuming equal variances.

    Degrees of freedom follow Welch-Satterthwaite: (a + b)^2 / (a^2 / (n1 - 1) + b^2 / (n2 - 1))
    with a = s1^2 / n1 and b = s2^2 / n2. Returns None if either sample has fewer than 2 values
    or both have zero spread.
    """
    n1, n2 = len(sample), len(reference_sample)
    if n1 < 2 or n2 < 2:
        return None
    mean1, std1 = mean_and_std(sample)
    mean2, std2 = mean_and_std(reference_sample)
    a, b = std1 ** 2 / n1, std2 ** 2 / n2
    if a + b == 0.0:
        return None
    t = (mean1 - mean2) / math.sqrt(a + b)
    df = (a + b) ** 2 / (a ** 2 / (n1 - 1) + b ** 2 / (n2 - 1))
    return TTestResult(t, df, student_t_cdf(t, df))


# ---------------------------------------------------------------------------------------------
# submission.json


def score_fields(records: list[RunRecord]) -> dict:
    """Build the fields that come from the logs: per-seed results, means, deviations and byte counts."""
    losses = [r.val_loss for r in records]
    bpbs = [r.val_bpb for r in records]
    mean_loss, std_loss = mean_and_std(losses)
    mean_bpb, std_bpb = mean_and_std(bpbs)
    seed_results = {
        r.seed: {
            "val_bpb": r.val_bpb,
            "val_loss": r.val_loss,
            "steps": r.steps,
            "step_avg_ms": r.step_avg_ms,
            "train_time_s": r.train_time_s,
            "bytes_total": r.bytes_total,
        }
        for r in records
    }
    # The logged scores have 8 decimals, so rounding the aggregates to 8 only drops float noise.
    return {
        "val_bpb": round(mean_bpb, 8),
        "val_loss": round(mean_loss, 8),
        "bytes_total": max(r.bytes_total for r in records),
        "bytes_code": max(r.bytes_code for r in records),
        "bytes_model": max(r.bytes_model for r in records),
        "seed_results": seed_results,
        "mean_val_bpb": round(mean_bpb, 8),
        "std_val_bpb": round(std_bpb, 8),
        "mean_val_loss": round(mean_loss, 8),
        "std_val_loss": round(std_loss, 8),
        "num_seeds": len(records),
    }


def reference_fields(losses: list[float], reference: float | None,
                     reference_losses: list[float] | None) -> tuple[dict, str | None]:
    """Compare the seeds' val_loss with the reference. Returns the JSON fields, and a note when no t-test ran."""
    if reference is None and reference_losses is None:
        return {}, None
    mean_loss = statistics.fmean(losses)
    if reference_losses is not None:
        reference_mean = statistics.fmean(reference_losses)
        result = welch_t_test(losses, reference_losses)
        fields = {"reference_val_loss": round(reference_mean, 8), "reference_val_losses": reference_losses,
                  "t_test": "welch"}
    else:
        reference_mean = reference
        result = one_sample_t_test(losses, reference)
        fields = {"reference_val_loss": reference, "t_test": "one-sample"}

    fields["improvement_nats"] = round(reference_mean - mean_loss, 8)
    note = None
    if result is None:
        note = ("no t-test: it needs at least 2 seeds and a nonzero spread of val_loss, "
                "so t_statistic, degrees_of_freedom and p_value are null")
    fields["t_statistic"] = None if result is None else result.t_statistic
    fields["degrees_of_freedom"] = None if result is None else result.degrees_of_freedom
    fields["p_value"] = None if result is None else result.p_value
    return fields, note


def read_existing_submission(path: str) -> dict:
    """Load the submission.json that --update merges into."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise SubmissionError(f"--update: {path} not found; run without --update to create it") from None
    except json.JSONDecodeError as e:
        raise SubmissionError(f"--update: {path} is not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise SubmissionError(f"--update: {path} does not contain a JSON object")
    return data


def build_submission(records: list[RunRecord], args: argparse.Namespace,
                     existing: dict | None) -> tuple[dict, str | None]:
    """Assemble submission.json from the records and flags, keeping the fields of `existing` that no flag sets."""
    flag_values = {"name": args.name, "author": args.author, "github_id": args.github_id,
                   "date": args.date, "track": args.track, "blurb": args.blurb, "hardware": args.hardware}
    if existing is None:
        defaults = {"date": datetime.date.today().isoformat(), "track": DEFAULT_TRACK}
        submission = {key: flag_values[key] if flag_values[key] is not None else defaults.get(key)
                      for key in ("name", "author", "github_id", "date", "track")}
        if args.blurb is not None:
            submission["blurb"] = args.blurb
    else:
        submission = {key: value for key, value in existing.items() if key not in REFERENCE_FIELDS}
        for key, value in flag_values.items():
            if value is not None:
                submission[key] = value
        for key, default in (("date", datetime.date.today().isoformat()), ("track", DEFAULT_TRACK)):
            submission.setdefault(key, default)

    scores = score_fields(records)
    for key in ("val_bpb", "val_loss", "bytes_total", "bytes_code", "bytes_model"):
        submission[key] = scores.pop(key)
    submission["hardware"] = args.hardware if args.hardware is not None else submission.get("hardware")
    submission.update(scores)
    fields, note = reference_fields([r.val_loss for r in records], args.reference_val_loss,
                                    args.reference_val_losses)
    submission.update(fields)
    return submission, note


def write_json(path: str, data: dict) -> None:
    """Write the JSON through a temporary file, so a failed write leaves the old file whole."""
    temporary = f"{path}.tmp"
    with open(temporary, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=2)
        f.write("\n")
    os.replace(temporary, path)


# ---------------------------------------------------------------------------------------------
# Command line


def parse_loss(text: str) -> float:
    """Parse one val_loss in nats for --reference-val-loss, rejecting nan and inf."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid number {text!r}; expected a val_loss in nats, e.g. 2.0851") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"invalid value {text!r}; the reference val_loss must be finite")
    return value


def parse_loss_list(text: str) -> list[float]:
    """Parse "2.0851,2.0874,2.0839" for --reference-val-losses."""
    values = [parse_loss(part) for part in text.split(",") if part.strip()]
    if len(values) < 2:
        raise argparse.ArgumentTypeError(f"{text!r} has {len(values)} value(s); Welch's t-test needs at least 2 "
                                         f"(for a single number use --reference-val-loss)")
    return values


def parse_date(text: str) -> str:
    try:
        return datetime.date.fromisoformat(text).isoformat()
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid date {text!r}; expected YYYY-MM-DD") from None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=("Build submission.json from train_gpt.py logs, one log per seed. Each seed's score is its "
                     f"{SCORE_LINE} line. val_loss and val_bpb are means over the seeds, std_* are sample standard "
                     "deviations (n-1) and are 0.0 for a single seed. bytes_total, bytes_code and bytes_model "
                     "are maxima over the seeds."),
    )

    parser.add_argument("logs", nargs="+", metavar="LOG", help="train_gpt.py log file (logs/<RUN_ID>.txt), one per seed")
    parser.add_argument("--out", default="submission.json", help="JSON file to write (default: submission.json in the current folder)")
    parser.add_argument("--update", action="store_true",
                        help="merge into the existing --out file instead of overwriting it: fields that no flag sets "
                             "(name, author, date, blurb, extra fields) are kept, and the scores are replaced by those of "
                             "the LOGs given now, so pass every seed's log. Without --update an existing file is "
                             "overwritten")

    parser.add_argument("--name", help="submission name")
    parser.add_argument("--author", help="author's name")
    parser.add_argument("--github-id", help="author's GitHub user name")
    parser.add_argument("--hardware", help='hardware of the runs, e.g. "8xH100 SXM"')
    parser.add_argument("--track", help=f"challenge track (default {DEFAULT_TRACK} for a new file)")
    parser.add_argument("--blurb", help="short description of the approach (optional)")
    parser.add_argument("--date", type=parse_date, help="submission date, YYYY-MM-DD (default today for a new file)")

    reference = parser.add_argument_group(
        "reference score",
        "Both options report improvement_nats (reference minus mean val_loss) and a one-sided t-test of "
                    "'mean val_loss < reference'. The t-test needs at least 2 seeds.").add_mutually_exclusive_group()
    reference.add_argument("--reference-val-loss", type=parse_loss, metavar="NATS",
                           help="reference val_loss in nats, e.g. the previous record's mean; runs a one-sample "
                                "t-test of the seeds' val_loss against this fixed value")
    reference.add_argument("--reference-val-losses", type=parse_loss_list, metavar="A,B,C",
                           help="per-seed val_loss values of the reference run, comma-separated; runs Welch's "
                                "unequal-variance t-test with Welch-Satterthwaite degrees of freedom")
    return parser


def print_report(records: list[RunRecord], submission: dict, out: str, note: str | None) -> None:
    print(f"{'seed':>10} {'val_loss':>12} {'val_bpb':>12} {'steps':>7} {'step_avg_ms':>12} "
          f"{'train_time_s':>13} {'bytes_total':>12}")
    for r in records:
        print(f"{r.seed:>10} {r.val_loss:12.8f} {r.val_bpb:12.8f} {r.steps:7d} {r.step_avg_ms:12.2f} "
              f"{r.train_time_s:13.2f} {r.bytes_total:12d}")
    print(f"{'mean':>10} {submission['mean_val_loss']:12.8f} {submission['mean_val_bpb']:12.8f}")
    print(f"{'std':>10} {submission['std_val_loss']:12.8f} {submission['std_val_bpb']:12.8f}"
          f"   (sample standard deviation, n-1, over {submission['num_seeds']} seed(s))")
    if "improvement_nats" in submission:
        test = "Welch's t-test" if submission["t_test"] == "welch" else "one-sample t-test against a fixed value"
        print(f"reference_val_loss {submission['reference_val_loss']:.8f} ({test})")
        print(f"improvement_nats {submission['improvement_nats']:.8f}")
        if note:
            print(note)
        else:
            print(f"t_statistic {submission['t_statistic']:.6f} degrees_of_freedom {submission['degrees_of_freedom']:.4f} "
                  f"p_value {submission['p_value']:.6g} (one-sided, H1: mean val_loss < reference)")
    print(f"wrote {out}")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        records = read_run_logs(args.logs)
        existing = read_existing_submission(args.out) if args.update else None
        submission, note = build_submission(records, args, existing)
        write_json(args.out, submission)
    except SubmissionError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except OSError as e:
        print(f"error: failed to write {args.out}: {e.strerror}", file=sys.stderr)
        return 1

    for warning in describe_mismatches(records):
        print(f"warning: {warning}", file=sys.stderr)
    missing = [key for key in IDENTITY_FIELDS if submission.get(key) is None]
    if missing:
        flags = ", ".join("--" + key.replace("_", "-") for key in missing)
        print(f"warning: {args.out} has null {', '.join(missing)}; set them with {flags}", file=sys.stderr)
    print_report(records, submission, args.out, note)
    return 0


if __name__ == "__main__":
    sys.exit(main())
