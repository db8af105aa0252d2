"""Tests for tools/pack_code.py. The packed copy of train_gpt.py is smaller, contains the exact source, and
imports, dry-runs and trains as the readable file does. Bad input stops with one error line and no output."""

from __future__ import annotations

import ast
import hashlib
import importlib.util
import json
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO, SCRIPT, field, log_lines, run_script, tiny_env

TOOL_PATH = REPO / "tools" / "pack_code.py"
_spec = importlib.util.spec_from_file_location("pack_code", TOOL_PATH)
pack_code = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(pack_code)


def run_pack(*args, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(TOOL_PATH), *map(str, args)], cwd=cwd, capture_output=True,
                          text=True, timeout=120)


def import_file(name: str, path: Path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def scripts(tmp_path_factory) -> dict:
    """A snapshot of train_gpt.py and its packed copy, so that edits to the repository during the tests
    cannot make the two differ. Also contains the packer's printed report."""
    folder = tmp_path_factory.mktemp("pack")
    readable = folder / "train_gpt.py"
    shutil.copyfile(SCRIPT, readable)
    packed = folder / "train_gpt_packed.py"
    result = run_pack(readable, "-o", packed)
    assert result.returncode == 0, result.stderr
    return {"readable": readable, "packed": packed, "report": result.stdout}


@pytest.fixture(scope="module")
def modules(scripts):
    readable = import_file("train_gpt_readable_copy", scripts["readable"])
    packed = import_file("train_gpt_packed_copy", scripts["packed"])
    yield readable, packed
    del sys.modules["train_gpt_readable_copy"], sys.modules["train_gpt_packed_copy"]


def test_packed_copy_is_smaller(scripts):
    readable_bytes = os.path.getsize(scripts["readable"])
    packed_bytes = os.path.getsize(scripts["packed"])
    assert packed_bytes < readable_bytes
    assert packed_bytes < 0.5 * readable_bytes  # measured: 86,544 bytes packed to 24,002 (bz2, Latin-1)
    assert len(scripts["packed"].read_bytes().splitlines()) == 3


def test_packed_copy_contains_exact_source(scripts, modules):
    _, packed = modules
    assert packed.__source__.encode("utf-8") == scripts["readable"].read_bytes()
    assert pack_code.unpack(scripts["packed"].read_bytes()) == scripts["readable"].read_text(encoding="utf-8")


def test_report_names_sizes_and_codec(scripts):
    lines = scripts["report"].splitlines()
    readable_bytes = os.path.getsize(scripts["readable"])
    packed_bytes = os.path.getsize(scripts["packed"])
    assert lines[0] == f"readable {scripts['readable']}: {readable_bytes} bytes"
    assert lines[1].startswith(f"packed {scripts['packed']}: {packed_bytes} bytes (")

    codec = field(lines[1], "codec")
    encoding = field(lines[1], "encoding")
    assert codec in pack_code.CODECS
    assert encoding in pack_code.ENCODINGS
    assert f"__import__('{codec}').decompress(".encode() in scripts["packed"].read_bytes()

    assert lines[2].startswith("candidates (file bytes): ")
    candidates = {name: int(size) for name, size in (item.split(":") for item in lines[2].split(": ", 1)[1].split())}
    assert len(candidates) == len(pack_code.CODECS) * len(pack_code.ENCODINGS)
    assert min(candidates.values()) == packed_bytes
    assert candidates[f"{codec}+{encoding}"] == packed_bytes


def test_import_exposes_same_names(scripts, modules):
    readable, packed = modules
    assert set(vars(packed)) == set(vars(readable)) | {"__source__"}
    assert packed.__name__ == "train_gpt_packed_copy"
    assert packed.__file__ == str(scripts["packed"])
    assert packed.__doc__ == readable.__doc__
    assert packed.GPT.__module__ == "train_gpt_packed_copy"
    assert packed.SETTING_NAMES == readable.SETTING_NAMES
    assert callable(packed.Hyperparameters)
    assert callable(packed.main)


def test_dry_run_matches_except_code_bytes(tmp_path, scripts):
    outputs = {}
    for kind in ("readable", "packed"):
        result = run_script(tmp_path, {"DRY_RUN": "1", "RUN_ID": "dry"}, script=scripts[kind])
        assert result.returncode == 0, result.stderr
        outputs[kind] = result.stdout.splitlines()

    readable, packed = outputs["readable"], outputs["packed"]
    assert len(readable) == len(packed)
    estimate_index = next(i for i, line in enumerate(readable) if line.startswith("artifact_estimate "))
    assert packed[:estimate_index] == readable[:estimate_index]
    assert packed[estimate_index + 1 :] == readable[estimate_index + 1 :]

    for kind, lines in outputs.items():
        line = lines[estimate_index]
        assert line.startswith("artifact_estimate ")
        code_bytes = int(field(line, "code_bytes"))
        assert code_bytes == os.path.getsize(scripts[kind])
        model_bytes = int(field(line, "model_bytes_before_compression"))
        assert int(field(line, "bytes_total_upper_estimate")) == model_bytes + code_bytes
    for key in ("model_bytes_before_compression", "limit"):
        assert field(packed[estimate_index], key) == field(readable[estimate_index], key)


def train_losses(result) -> list[tuple[str, str]]:
    """(step, train_loss) pairs; the lines also contain timings, which differ between runs."""
    return [(line.split()[0], field(line, "train_loss")) for line in log_lines(result, "step:") if "train_loss:" in line]


def exact_scores(result) -> list[str]:
    return [line for line in result.stdout.splitlines() if line.split(" ")[0].endswith("_exact")]


def test_training_run_matches(tmp_path, tiny_data, scripts):
    results = {}
    for kind in ("readable", "packed"):
        folder = tmp_path / kind
        folder.mkdir()
        results[kind] = run_script(folder, tiny_env(tiny_data, ITERATIONS="2", RUN_ID=kind), script=scripts[kind])
        assert results[kind].returncode == 0, results[kind].stderr
    readable, packed = results["readable"], results["packed"]

    assert len(train_losses(readable)) == 2
    assert train_losses(packed) == train_losses(readable)
    assert len(exact_scores(readable)) >= 1
    assert exact_scores(packed) == exact_scores(readable)

    for kind, result in results.items():
        size = os.path.getsize(scripts[kind])
        [artifact] = log_lines(result, "artifact:")
        assert int(field(artifact, "code_bytes")) == size
        [code] = log_lines(result, "code:")
        assert field(code, "code") == str(scripts[kind])
        assert int(field(code, "code_bytes")) == size

    source = scripts["readable"].read_text(encoding="utf-8")
    source_sha256 = hashlib.sha256(source.encode("utf-8")).hexdigest()
    [readable_code] = log_lines(readable, "code:")
    [packed_code] = log_lines(packed, "code:")
    assert field(readable_code, "source_sha256") == source_sha256
    assert field(packed_code, "source_sha256") == source_sha256
    packed_log = (tmp_path / "packed" / "logs" / "packed.txt").read_text(encoding="utf-8")
    assert f"source_begin\n{source}\nsource_end\n" in packed_log


def test_packed_copy_under_torchrun(tmp_path, tiny_data, scripts):
    result = run_script(tmp_path, tiny_env(tiny_data, ITERATIONS="2", RUN_ID="torchrun"), nproc=2,
                        script=scripts["packed"])
    assert result.returncode == 0, result.stderr
    assert "terminate called" not in result.stderr
    assert log_lines(result, "compliance:validation_before_scoring"), result.stdout
    [run_line] = log_lines(result, "run_id:")
    assert "world_size:2 " in run_line
    assert [step for step, _ in train_losses(result)] == ["step:1/2", "step:2/2"]
    [code] = log_lines(result, "code:")
    assert int(field(code, "code_bytes")) == os.path.getsize(scripts["packed"])
    source = scripts["readable"].read_bytes()
    assert field(code, "source_sha256") == hashlib.sha256(source).hexdigest()
    [artifact] = log_lines(result, "artifact:")
    assert int(field(artifact, "code_bytes")) == os.path.getsize(scripts["packed"])


def probe_source() -> str:
    """A small script that prints the globals the loader must set, with non-ASCII text and enough varied
    characters that its compressed form contains most byte values, including those that need escapes."""
    rng = random.Random(0)
    alphabet = [chr(c) for c in range(32, 127)] + list("äöüßéè€✓λ→")
    filler = "".join(rng.choice(alphabet) for _ in range(3000))
    return (
        '"""Probe for tools/pack_code.py."""\n'
        "import hashlib, json, sys\n"
        f"FILLER = {filler!r}\n"
        "source = globals().get('__source__')\n"
        "print(json.dumps({'name': __name__, 'file': __file__, 'doc': __doc__, 'filler': len(FILLER),\n"
        "                  'source_sha256': hashlib.sha256(source.encode()).hexdigest() if source else None}))\n"
    )


@pytest.mark.parametrize("codec", pack_code.CODECS)
@pytest.mark.parametrize("encoding", pack_code.ENCODINGS)
def test_every_codec_and_encoding_runs(tmp_path, codec, encoding):
    source = tmp_path / "probe.py"
    source.write_text(probe_source(), encoding="utf-8")
    result = run_pack(source, "--codec", codec, "--encoding", encoding)
    assert result.returncode == 0, result.stderr
    packed = tmp_path / "probe_packed.py"  # the default output name
    assert f"codec:{codec} encoding:{encoding}" in result.stdout
    if encoding != "latin1":
        packed.read_bytes().decode("ascii")  # raises if the file is not ASCII

    expected = {"doc": "Probe for tools/pack_code.py.", "filler": 3000,
                "source_sha256": hashlib.sha256(source.read_bytes()).hexdigest()}
    as_script = subprocess.run([sys.executable, str(packed)], cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert as_script.returncode == 0, as_script.stderr
    assert json.loads(as_script.stdout) == dict(expected, name="__main__", file=str(packed))

    as_import = subprocess.run([sys.executable, "-c", "import probe_packed"], cwd=tmp_path, capture_output=True,
                               text=True, timeout=60)
    assert as_import.returncode == 0, as_import.stderr
    assert json.loads(as_import.stdout) == dict(expected, name="probe_packed", file=str(packed))


def test_latin1_literal_covers_every_byte(tmp_path):
    # Every byte value, a quote of each kind, and NUL before an octal digit, which \0 would swallow.
    blob = bytes(range(256)) + b"\x001\x007\x008'\"\\\r\n\x00"
    path = tmp_path / "literal.py"
    path.write_bytes(b"# coding: latin-1\nvalue = " + pack_code.latin1_literal(blob).encode("latin-1"))
    namespace = {}
    exec(compile(path.read_bytes(), str(path), "exec"), namespace)
    assert namespace["value"].encode("latin-1") == blob


def test_escaped_literal_covers_every_byte():
    blob = bytes(range(256)) + b"\x001\x0078\x3f7'\"\\\r\n\t\x00"
    literal = pack_code.escaped_literal(blob)
    assert all(0x20 <= ord(char) < 0x7F for char in literal)
    assert ast.literal_eval(literal) == blob


def test_crlf_source_packs_as_python_reads_it(tmp_path):
    source = tmp_path / "crlf.py"
    source.write_bytes(b'print("one")\r\nprint("two")\r\n')
    out = tmp_path / "out.py"
    result = run_pack(source, "-o", out)
    assert result.returncode == 0, result.stderr
    assert pack_code.unpack(out.read_bytes()) == source.read_text(encoding="utf-8")
    ran = subprocess.run([sys.executable, str(out)], capture_output=True, text=True, timeout=60)
    assert ran.stdout == "one\ntwo\n"


def test_unusual_source_name_packs(tmp_path):
    source = tmp_path / "naïve coding=utf-8.py"
    source.write_text("print(__name__)\n", encoding="utf-8")
    for encoding in pack_code.ENCODINGS:
        out = tmp_path / f"out_{encoding}.py"
        result = run_pack(source, "-o", out, "--encoding", encoding)
        assert result.returncode == 0, result.stderr
        assert out.read_bytes().startswith(b"# script compressed by tools/pack_code.py")
        ran = subprocess.run([sys.executable, str(out)], capture_output=True, text=True, timeout=60)
        assert ran.stdout == "__main__\n", ran.stderr


def assert_one_error_line(result, *fragments: str) -> None:
    assert result.returncode == 1
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ")
    for fragment in fragments:
        assert fragment in lines[0]
    assert result.stdout == ""


def test_missing_source_is_one_line_error(tmp_path):
    out = tmp_path / "out.py"
    result = run_pack(tmp_path / "absent.py", "-o", out)
    assert_one_error_line(result, "source file", "absent.py", "not found")
    assert not out.exists()


def test_default_source_missing_in_folder(tmp_path):
    result = run_pack(cwd=tmp_path)
    assert_one_error_line(result, "source file train_gpt.py not found")
    assert list(tmp_path.iterdir()) == []


def test_source_with_syntax_error_keeps_old_output(tmp_path):
    source = tmp_path / "broken.py"
    source.write_text("x = 1\ndef f(:\n    pass\n", encoding="utf-8")
    out = tmp_path / "out.py"
    out.write_text("earlier output\n")
    result = run_pack(source, "-o", out)
    assert_one_error_line(result, "broken.py", "does not compile", "line 2")
    assert out.read_text() == "earlier output\n"
    assert sorted(path.name for path in tmp_path.iterdir()) == ["broken.py", "out.py"]  # no temporary file left


def test_source_with_nul_byte_rejected(tmp_path):
    source = tmp_path / "nul.py"
    source.write_bytes(b"x = 1\0\n")
    out = tmp_path / "out.py"
    result = run_pack(source, "-o", out)
    assert_one_error_line(result, "nul.py", "does not compile")
    assert not out.exists()


def test_output_same_as_source_rejected(tmp_path):
    source = tmp_path / "script.py"
    source.write_text("print('hi')\n", encoding="utf-8")
    result = run_pack(source, "-o", source)
    assert_one_error_line(result, "is the source file")
    assert source.read_text(encoding="utf-8") == "print('hi')\n"


def test_missing_output_folder_rejected(tmp_path):
    source = tmp_path / "script.py"
    source.write_text("print('hi')\n", encoding="utf-8")
    result = run_pack(source, "-o", tmp_path / "absent" / "out.py")
    assert_one_error_line(result, "output folder", "does not exist")
    assert not (tmp_path / "absent").exists()
