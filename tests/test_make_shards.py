"""Tests of tools/make_shards.py against the sample text, tokenizer and reference shards.

CPU only. The sample data is read in place from SHARED_DATA, the shared data folder next to the
repository, and every output goes to pytest's tmp_path.
"""

from __future__ import annotations

import importlib.util
import json
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import sentencepiece as spm

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
SAMPLE_TEXT = SHARED_DATA / "text" / "tinyshakespeare.txt"
SAMPLE_TOKENIZER = SHARED_DATA / "tokenizers" / "fineweb_1024_bpe.model"
REFERENCE = SHARED_DATA / "datasets" / "tinyshakespeare_sp1024"
SCRIPT = REPO / "tools" / "make_shards.py"

sys.path.insert(0, str(REPO))
import train_gpt  # noqa: E402

_spec = importlib.util.spec_from_file_location("make_shards", SCRIPT)
make_shards = importlib.util.module_from_spec(_spec)
sys.modules["make_shards"] = make_shards  # dataclasses look their module up here
_spec.loader.exec_module(make_shards)


def run_tool(*args: object) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *map(str, args)],
                          capture_output=True, text=True, timeout=120)


def shard_files(folder: Path) -> list[str]:
    return sorted(path.name for path in folder.glob("fineweb_*.bin"))


def read_tokens(paths: list) -> np.ndarray:
    return np.concatenate([np.asarray(train_gpt.shard_tokens(str(path))) for path in paths])


def split_documents(tokens: np.ndarray) -> list[list[int]]:
    """Split a token stream at BOS ids into the ids of each document (BOS removed)."""
    starts = np.flatnonzero(tokens == make_shards.BOS_ID).tolist() + [tokens.size]
    return [tokens[start + 1 : end].tolist() for start, end in zip(starts, starts[1:])]


def write_jsonl(path: Path, records: list, field: str = "text") -> Path:
    lines = [json.dumps({field: text, "id": index}) for index, text in enumerate(records)]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def encode_varint(value: int) -> bytes:
    out = bytearray()
    while True:
        low = value & 0x7F
        value >>= 7
        if value:
            out.append(low | 0x80)
        else:
            out.append(low)
            return bytes(out)


def write_large_vocab_model(path: Path, extra_pieces: int) -> None:
    """Write the sample tokenizer with extra_pieces more normal pieces appended.

    A serialized protobuf message followed by more encodings of a repeated field parses as the
    message with those elements appended. So each extra ModelProto.pieces entry is simply added
    to the end of the file, as field 1 holding a piece string (field 1) and a float score (field 2).
    """
    extra = bytearray()
    for index in range(extra_pieces):
        piece = f"zq{index}".encode()
        entry = b"\x0a" + encode_varint(len(piece)) + piece + b"\x15" + struct.pack("<f", -1000.0)
        extra += b"\x0a" + encode_varint(len(entry)) + entry
    path.write_bytes(SAMPLE_TOKENIZER.read_bytes() + bytes(extra))


@pytest.fixture(scope="module")
def sample_output(tmp_path_factory) -> Path:
    """Shards of the sample text made with the sample tokenizer and default settings."""
    output = tmp_path_factory.mktemp("sample") / "shards"
    result = run_tool(SAMPLE_TEXT, "--tokenizer", SAMPLE_TOKENIZER, "--output", output)
    assert result.returncode == 0, result.stderr
    return output


# -----------------------------------------------------------------------------
# Reference data and train_gpt compatibility
# -----------------------------------------------------------------------------


def test_sample_shards_match_reference(sample_output):
    assert sorted(path.name for path in sample_output.iterdir()) == [
        "fineweb_train_000000.bin", "fineweb_val_000000.bin", "stats.json"]
    for split in ("train", "val"):
        name = f"fineweb_{split}_000000.bin"
        assert (sample_output / name).read_bytes() == (REFERENCE / name).read_bytes(), name


def test_sample_stats_match_reference(sample_output):
    stats = json.loads((sample_output / "stats.json").read_text())
    assert stats == json.loads((REFERENCE / "stats.json").read_text())
    assert stats["val"] == {"docs": 34, "tokens": 45264, "bytes": 109447}
    assert (sample_output / "stats.json").read_bytes() == (REFERENCE / "stats.json").read_bytes()


def test_train_gpt_reads_shards(sample_output):
    stats = json.loads((sample_output / "stats.json").read_text())
    for split in ("train", "val"):
        paths = train_gpt.find_shards(str(sample_output), split)
        assert [Path(path).name for path in paths] == [f"fineweb_{split}_000000.bin"]

        tokens = np.asarray(train_gpt.shard_tokens(paths[0]))
        raw = (REFERENCE / f"fineweb_{split}_000000.bin").read_bytes()
        assert tokens.size == stats[split]["tokens"]
        assert np.array_equal(tokens, np.frombuffer(raw, dtype="<u2", offset=4 * 256))
        assert tokens[0] == train_gpt.BOS_ID
        assert int((tokens == train_gpt.BOS_ID).sum()) == stats[split]["docs"]
        assert int(tokens.max()) < 1024


def test_stats_bytes_are_document_utf8(sample_output):
    """"bytes" is the UTF-8 size of the documents' text, without BOS or the blank lines between documents."""
    stats = json.loads((sample_output / "stats.json").read_text())
    documents = list(make_shards.iter_documents([SAMPLE_TEXT], "text"))

    assert len(documents) == 341
    assert stats["val"]["bytes"] == sum(len(text.encode("utf-8")) for text in documents[:34])
    assert stats["train"]["bytes"] == sum(len(text.encode("utf-8")) for text in documents[34:])
    assert stats["val"]["bytes"] + stats["train"]["bytes"] < SAMPLE_TEXT.stat().st_size


# -----------------------------------------------------------------------------
# Documents
# -----------------------------------------------------------------------------


@pytest.mark.parametrize("chunk_chars", [1, 2, 3, 5, 64])
def test_paragraphs_across_read_chunks(tmp_path, monkeypatch, chunk_chars):
    text = "\n\nfirst\n\n\nsecond  \n\n\n\n third\nline \n\n\n\n\n\n\n  \n\nlast\n"
    path = tmp_path / "input.txt"
    path.write_text(text, encoding="utf-8")
    monkeypatch.setattr(make_shards, "READ_CHUNK_CHARS", chunk_chars)

    paragraphs = list(make_shards.iter_paragraphs(path))

    assert paragraphs == ["first", "second", "third\nline", "last"]
    assert paragraphs == [part.strip() for part in text.split("\n\n") if part.strip()]


def test_documents_group_to_3000_chars(tmp_path):
    # 1000 + 1999 + 1 reach 3,000 only when the "\n\n" separators are not counted.
    first = tmp_path / "first.txt"
    first.write_text("\n\n".join(["a" * 1000, "b" * 1999, "c", "d" * 2999, "e" * 2, "f" * 5]) + "\n")
    second = tmp_path / "second.txt"
    second.write_text("g" * 10 + "\n\n\n\n" + "h" * 3000 + "\n\n" + "i" * 7)

    documents = list(make_shards.iter_documents([first, second], "text"))

    assert documents == [
        "a" * 1000 + "\n\n" + "b" * 1999 + "\n\nc",
        "d" * 2999 + "\n\n" + "e" * 2,
        "f" * 5,  # the short group at the end of a file is a document and does not continue into the next file
        "g" * 10 + "\n\n" + "h" * 3000,
        "i" * 7,
    ]


@pytest.mark.parametrize(("records", "expected_val_docs"), [(5, 1), (19, 1), (20, 2), (25, 2), (41, 4)])
def test_default_validation_count(tmp_path, records, expected_val_docs):
    source = write_jsonl(tmp_path / "input.jsonl", [f"document number {i}" for i in range(records)])
    output = tmp_path / "out"

    result = run_tool(source, "--tokenizer", SAMPLE_TOKENIZER, "--output", output)

    assert result.returncode == 0, result.stderr
    stats = json.loads((output / "stats.json").read_text())
    assert stats["val"]["docs"] == expected_val_docs
    assert stats["train"]["docs"] == records - expected_val_docs


def test_jsonl_input(tmp_path):
    texts = ["  Première ligne, café au lait.\n", "Second document.", "", "   \n ", "Third one\nwith two lines.",
             "Fourth and last."]
    source = write_jsonl(tmp_path / "input.jsonl", texts, field="body")
    with open(source, "a", encoding="utf-8") as file:
        file.write("\n   \n")  # blank lines are skipped
    output = tmp_path / "out"

    result = run_tool(source, "--tokenizer", SAMPLE_TOKENIZER, "--text-field", "body", "--val-docs", "1",
                      "--output", output)

    assert result.returncode == 0, result.stderr
    tokenizer = spm.SentencePieceProcessor(model_file=str(SAMPLE_TOKENIZER))
    documents = [text.strip() for text in texts if text.strip()]
    val = read_tokens(train_gpt.find_shards(str(output), "val"))
    train = read_tokens(train_gpt.find_shards(str(output), "train"))
    assert split_documents(val) == [tokenizer.encode(documents[0])]
    assert split_documents(train) == tokenizer.encode(documents[1:])

    stats = json.loads((output / "stats.json").read_text())
    assert stats["val"] == {"docs": 1, "tokens": val.size, "bytes": len("Première ligne, café au lait.".encode())}
    assert stats["val"]["bytes"] == 31  # 29 characters, two of them 2-byte UTF-8
    assert stats["train"] == {"docs": 3, "tokens": train.size,
                              "bytes": sum(len(text.encode()) for text in documents[1:])}


def test_mixed_inputs_keep_order(tmp_path):
    source_text = tmp_path / "a.txt"
    source_text.write_text("Plain text paragraph.\n\nAnother one.\n")
    source_jsonl = write_jsonl(tmp_path / "b.jsonl", ["From JSON."])
    output = tmp_path / "out"

    result = run_tool(source_text, source_jsonl, "--tokenizer", SAMPLE_TOKENIZER, "--output", output)

    assert result.returncode == 0, result.stderr
    tokenizer = spm.SentencePieceProcessor(model_file=str(SAMPLE_TOKENIZER))
    val = read_tokens(train_gpt.find_shards(str(output), "val"))
    train = read_tokens(train_gpt.find_shards(str(output), "train"))
    assert split_documents(val) == [tokenizer.encode("Plain text paragraph.\n\nAnother one.")]
    assert split_documents(train) == [tokenizer.encode("From JSON.")]


# -----------------------------------------------------------------------------
# Shards and tokenizer
# -----------------------------------------------------------------------------


def test_split_spans_several_shards(tmp_path):
    output = tmp_path / "out"

    result = run_tool(SAMPLE_TEXT, "--tokenizer", SAMPLE_TOKENIZER, "--tokens-per-shard", "100000",
                      "--output", output)

    assert result.returncode == 0, result.stderr
    train_paths = train_gpt.find_shards(str(output), "train")
    assert [Path(path).name for path in train_paths] == [f"fineweb_train_{i:06d}.bin" for i in range(5)]
    sizes = [train_gpt.shard_tokens(path).size for path in train_paths]
    assert sizes == [100000, 100000, 100000, 100000, 23211]

    reference_train = read_tokens([REFERENCE / "fineweb_train_000000.bin"])
    assert np.array_equal(read_tokens(train_paths), reference_train)
    val_paths = train_gpt.find_shards(str(output), "val")
    assert [Path(path).name for path in val_paths] == ["fineweb_val_000000.bin"]
    assert (output / "fineweb_val_000000.bin").read_bytes() == (REFERENCE / "fineweb_val_000000.bin").read_bytes()


def test_trained_tokenizer_uses_training_docs(tmp_path):
    # The validation records are full of "ζ", which the training records never contain, so a
    # tokenizer trained on both would have a "ζ" piece.
    validation = ["\n".join(["ζζζ ζζ ζζζζ"] * 300)] * 2
    sample = SAMPLE_TEXT.read_text(encoding="utf-8")[:40000]
    training = [part.strip() for part in sample.split("\n\n") if part.strip()]
    source = write_jsonl(tmp_path / "input.jsonl", validation + training)
    output = tmp_path / "out"

    result = run_tool(source, "--vocab-size", "256", "--val-docs", "2", "--output", output)

    assert result.returncode == 0, result.stderr
    assert sorted(path.name for path in output.iterdir()) == [
        "fineweb_train_000000.bin", "fineweb_val_000000.bin", "stats.json", "tokenizer.model", "tokenizer.vocab"]
    tokenizer = spm.SentencePieceProcessor(model_file=str(output / "tokenizer.model"))
    assert tokenizer.vocab_size() == 256
    assert (tokenizer.pad_id(), tokenizer.bos_id(), tokenizer.eos_id(), tokenizer.unk_id()) == (0, 1, 2, 3)
    assert tokenizer.piece_to_id("ζ") == tokenizer.unk_id()

    train = read_tokens(train_gpt.find_shards(str(output), "train"))
    train_docs = split_documents(train)
    assert int(train.max()) < 256
    assert len(train_docs) == len(training)
    assert train_docs == tokenizer.encode(training)
    assert tokenizer.decode(train_docs[0]) == " ".join(training[0].split())


# -----------------------------------------------------------------------------
# Errors and output folder safety
# -----------------------------------------------------------------------------


def make_error_case(name: str, tmp_path: Path) -> list:
    """Write the inputs of the named failing run to tmp_path and return its command-line arguments."""
    output = tmp_path / "out"
    if name == "missing input":
        return [tmp_path / "absent.txt", "--tokenizer", SAMPLE_TOKENIZER, "--output", output]

    if name == "unsupported input type":
        (tmp_path / "input.csv").write_text("a,b\n")
        return [tmp_path / "input.csv", "--tokenizer", SAMPLE_TOKENIZER, "--output", output]

    if name == "empty text":
        (tmp_path / "empty.txt").write_text("")
        return [tmp_path / "empty.txt", "--tokenizer", SAMPLE_TOKENIZER, "--output", output]

    if name == "whitespace text":
        (tmp_path / "blank.txt").write_text("\n\n   \n\n\t\n")
        return [tmp_path / "blank.txt", "--tokenizer", SAMPLE_TOKENIZER, "--output", output]

    if name == "empty jsonl":
        source = write_jsonl(tmp_path / "empty.jsonl", ["", "  "])
        return [source, "--vocab-size", "256", "--output", output]

    if name == "one document":
        (tmp_path / "one.txt").write_text("Only one short paragraph.\n")
        return [tmp_path / "one.txt", "--tokenizer", SAMPLE_TOKENIZER, "--output", output]

    if name == "invalid json":
        (tmp_path / "bad.jsonl").write_text('{"text": "fine"}\n{"text": broken}\n')
        return [tmp_path / "bad.jsonl", "--tokenizer", SAMPLE_TOKENIZER, "--output", output]

    if name == "missing text field":
        source = write_jsonl(tmp_path / "input.jsonl", ["a", "b"], field="content")
        return [source, "--tokenizer", SAMPLE_TOKENIZER, "--output", output]

    if name == "invalid utf-8":
        (tmp_path / "latin1.txt").write_bytes("caf\u00e9 au lait".encode("latin-1"))
        return [tmp_path / "latin1.txt", "--tokenizer", SAMPLE_TOKENIZER, "--output", output]

    if name == "too many validation docs":
        return [SAMPLE_TEXT, "--tokenizer", SAMPLE_TOKENIZER, "--val-docs", "341", "--output", output]

    if name == "vocab size too large":
        return [SAMPLE_TEXT, "--vocab-size", "70000", "--output", output]

    if name == "tokenizer vocab too large":
        write_large_vocab_model(tmp_path / "large.model", extra_pieces=65000)
        return [SAMPLE_TEXT, "--tokenizer", tmp_path / "large.model", "--output", output]

    if name == "tokenizer not loadable":
        (tmp_path / "broken.model").write_bytes(b"this is not a SentencePiece model\n" * 4)
        return [SAMPLE_TEXT, "--tokenizer", tmp_path / "broken.model", "--output", output]

    if name == "tokenizer missing":
        return [SAMPLE_TEXT, "--tokenizer", tmp_path / "absent.model", "--output", output]

    if name == "tokenizer bos not 1":
        spm.SentencePieceTrainer.train(sentence_iterator=iter(["some words here", "and other words"] * 20),
                                       model_prefix=str(tmp_path / "nobos"), model_type="bpe", vocab_size=30,
                                       bos_id=-1, minloglevel=2)
        return [SAMPLE_TEXT, "--tokenizer", tmp_path / "nobos.model", "--output", output]

    if name == "vocab size above text":
        source = write_jsonl(tmp_path / "small.jsonl", ["A few words.", "And a few more words."])
        return [source, "--vocab-size", "5000", "--output", output]

    raise AssertionError(name)


# Each case: its name in make_error_case, and the text (or tuple of texts) that its one-line
# error must contain, with {tmp} standing for the test's tmp_path.
ERROR_CASES = [
    ("missing input", "input file not found: {tmp}/absent.txt"),
    ("unsupported input type", "has an unsupported type; expected a .txt or .jsonl file"),
    ("empty text", "contain no documents"),
    ("whitespace text", "contain no documents"),
    ("empty jsonl", "contain no documents"),
    ("one document", "only 1 document, but at least 2 are needed"),
    ("invalid json", "{tmp}/bad.jsonl:2: invalid JSON"),
    ("missing text field", "{tmp}/input.jsonl:1: record has no 'text' field; set --text-field"),
    ("invalid utf-8", "{tmp}/latin1.txt is not valid UTF-8"),
    ("too many validation docs", "--val-docs 341 leaves no training documents; the input has 341 documents"),
    ("vocab size too large", "--vocab-size 70,000 is too large: shards store ids as uint16"),
    ("tokenizer vocab too large", "large.model has 66,024 pieces, but shards store ids as uint16"),
    ("tokenizer not loadable", "broken.model is not a valid SentencePiece model"),
    ("tokenizer missing", "tokenizer file not found: {tmp}/absent.model"),
    ("tokenizer bos not 1", "nobos.model has BOS id -1, but the shard format marks document starts with id 1"),
    ("vocab size above text", ("SentencePiece training failed: ", "Vocabulary size too high (5000)")),
]


@pytest.mark.parametrize(("name", "message"), ERROR_CASES, ids=[case[0] for case in ERROR_CASES])
def test_error_exits_with_one_line(tmp_path, name, message):
    args = make_error_case(name, tmp_path)

    result = run_tool(*args)

    assert result.returncode == 1
    assert result.stdout == "" or "documents:" in result.stdout
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("make_shards: error: ")
    for fragment in message if isinstance(message, tuple) else (message,):
        assert fragment.format(tmp=tmp_path) in lines[0]
    assert not (tmp_path / "out").exists()


def test_failure_leaves_no_shards(tmp_path, monkeypatch, capsys):
    output = tmp_path / "out"
    output.mkdir()
    (output / "notes.txt").write_text("kept")
    staged_at_failure = []
    real_encode = make_shards.encode_documents
    calls = 0

    def failing_encode(tokenizer, documents):
        nonlocal calls
        calls += 1
        if calls == 4:
            staged_at_failure.extend(output.glob(".make_shards-*/fineweb_*.bin"))
            raise make_shards.ShardError("simulated failure")
        return real_encode(tokenizer, documents)

    monkeypatch.setattr(make_shards, "ENCODE_BATCH_CHARS", 20000)
    monkeypatch.setattr(make_shards, "encode_documents", failing_encode)

    status = make_shards.main([str(SAMPLE_TEXT), "--tokenizer", str(SAMPLE_TOKENIZER),
                               "--tokens-per-shard", "5000", "--output", str(output)])

    assert status == 1
    assert capsys.readouterr().err == "make_shards: error: simulated failure\n"
    assert len(staged_at_failure) >= 2  # shards had been written before the failure
    assert sorted(path.name for path in output.iterdir()) == ["notes.txt"]


def test_existing_shards_need_overwrite(tmp_path):
    output = tmp_path / "out"
    first = run_tool(SAMPLE_TEXT, "--tokenizer", SAMPLE_TOKENIZER, "--tokens-per-shard", "100000", "--output", output)
    assert first.returncode == 0, first.stderr
    before = {name: (output / name).read_bytes() for name in shard_files(output)}
    assert len(before) == 6

    refused = run_tool(SAMPLE_TEXT, "--tokenizer", SAMPLE_TOKENIZER, "--output", output)

    assert refused.returncode == 1
    assert "already contains fineweb_train_000000.bin (and 6 more); pass --overwrite" in refused.stderr
    assert {name: (output / name).read_bytes() for name in shard_files(output)} == before

    replaced = run_tool(SAMPLE_TEXT, "--tokenizer", SAMPLE_TOKENIZER, "--overwrite", "--output", output)

    assert replaced.returncode == 0, replaced.stderr
    assert shard_files(output) == ["fineweb_train_000000.bin", "fineweb_val_000000.bin"]
    for name in shard_files(output):
        assert (output / name).read_bytes() == (REFERENCE / name).read_bytes(), name


def test_help_describes_every_option():
    result = run_tool("--help")

    assert result.returncode == 0
    for option in ("--output", "--tokenizer", "--vocab-size", "--tokenizer-sentences", "--val-docs",
                   "--text-field", "--tokens-per-shard", "--overwrite"):
        assert option in result.stdout
    assert "default: 100,000,000" in result.stdout
