#!/usr/bin/env python3
"""Convert plain-text or JSONL files into token shards in the Parameter Golf challenge format.

Each document becomes BOS (id 1) followed by its SentencePiece token ids. The first
--val-docs documents form the validation split and the rest form the training split.
Each split is written as numbered shards, fineweb_val_000000.bin, fineweb_val_000001.bin, ...
and fineweb_train_000000.bin, ... with at most --tokens-per-shard tokens each. A shard is a
header of 256 little-endian int32 words (magic 20240520, version 1, token count, then zeros)
followed by the tokens as little-endian uint16. Documents may continue from one shard into
the next.

Documents:
  .txt    The text is split on blank lines ("\\n\\n"), each paragraph is stripped, and empty
          paragraphs are dropped. Consecutive paragraphs are grouped into one document until
          the group's stripped paragraphs total at least 3,000 characters (separators not
          counted). A shorter group left at the end of a file is a document too, and no
          document spans two files. A document's text is its paragraphs joined with "\\n\\n".
          Files are read as UTF-8 with universal newlines, so "\\r\\n" counts as "\\n".
  .jsonl  One JSON object per line, with the text in the field named by --text-field. Each
          object is one document. The text is stripped, and records whose text is then
          empty are skipped, as are blank lines.

Tokenizer: --tokenizer uses an existing SentencePiece model. Without it, a BPE model with
--vocab-size pieces (pad 0, BOS 1, EOS 2, unknown 3, as in the challenge's tokenizer) is
trained on the training documents only and saved as tokenizer.model and tokenizer.vocab in
the output folder. Either way the vocabulary must fit uint16 (at most 65,536 pieces) and BOS
must be id 1, because train_gpt.py treats id 1 as the document boundary.

stats.json beside the shards contains, for "val" and "train", the number of documents
("docs"), of tokens including one BOS per document ("tokens"), and of UTF-8 bytes of the
documents' text ("bytes"). "bytes" counts neither the BOS tokens nor anything between
documents, so it is the byte count that bits per byte are measured against.

All files are first written to a hidden staging folder inside the output folder and moved
into place only when every step has succeeded, so an error leaves no partial shards behind.

Example:
    python3 tools/make_shards.py corpus.jsonl --val-docs 1000 \\
        --tokenizer data/tokenizers/fineweb_1024_bpe.model --output data/datasets/corpus_sp1024
"""

from __future__ import annotations

import argparse
import contextlib
import json
import shutil
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import sentencepiece as spm

SHARD_MAGIC = 20240520
SHARD_VERSION = 1
SHARD_HEADER_INTS = 256
BOS_ID = 1
MAX_VOCAB_SIZE = 1 << 16  # token ids are stored as uint16
MAX_TOKENS_PER_SHARD = (1 << 31) - 1  # the token count is an int32 header word
DEFAULT_TOKENS_PER_SHARD = 100_000_000  # the size of the challenge's own FineWeb shards
DOC_MIN_CHARS = 3000
VAL_FRACTION = 0.1
READ_CHUNK_CHARS = 1 << 20
ENCODE_BATCH_CHARS = 1 << 22
SPLITS = ("val", "train")
TOKENIZER_PREFIX = "tokenizer"
INPUT_SUFFIXES = (".txt", ".jsonl")


class ShardError(Exception):
    """A problem with the inputs, the tokenizer or the output folder, reported as one line."""


@dataclass
class SplitStats:
    """Counts of one split as written to stats.json: documents, tokens including BOS, UTF-8 bytes of text."""

    docs: int = 0
    tokens: int = 0
    bytes: int = 0


# -----------------------------------------------------------------------------
# Reading documents
# -----------------------------------------------------------------------------


def iter_paragraphs(path: Path) -> Iterator[str]:
    """Yield the stripped, non-empty paragraphs of a text file, reading it in chunks.

    The result equals `[p.strip() for p in text.split("\\n\\n") if p.strip()]` on the whole text.
    Chunks are joined only once a separator has arrived, so a file without blank lines costs
    linear time.
    """
    pending: list[str] = []  # text after the last separator seen so far
    with open(path, encoding="utf-8") as file:
        while chunk := file.read(READ_CHUNK_CHARS):
            last_char = pending[-1][-1:] if pending else ""
            if "\n\n" not in last_char + chunk:
                pending.append(chunk)
                continue
            parts = ("".join(pending) + chunk).split("\n\n")
            pending = [parts.pop()]
            for part in parts:
                paragraph = part.strip()
                if paragraph:
                    yield paragraph
    paragraph = "".join(pending).strip()
    if paragraph:
        yield paragraph


def iter_text_documents(path: Path) -> Iterator[str]:
    """Yield the documents of a text file: paragraph groups of at least DOC_MIN_CHARS characters."""
    group: list[str] = []
    group_chars = 0
    for paragraph in iter_paragraphs(path):
        group.append(paragraph)
        group_chars += len(paragraph)
        if group_chars >= DOC_MIN_CHARS:
            yield "\n\n".join(group)
            group = []
            group_chars = 0
    if group:
        yield "\n\n".join(group)


def iter_jsonl_documents(path: Path, text_field: str) -> Iterator[str]:
    """Yield the stripped text field of each JSONL record, skipping blank lines and empty texts."""
    with open(path, encoding="utf-8") as file:
        for line_number, line in enumerate(file, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise ShardError(f"{path}:{line_number}: invalid JSON ({error.msg} at column {error.colno})") from None
            if not isinstance(record, dict) or text_field not in record:
                raise ShardError(f"{path}:{line_number}: record has no {text_field!r} field; "
                                 f"set --text-field to the field that contains the text")
            text = record[text_field]
            if not isinstance(text, str):
                raise ShardError(f"{path}:{line_number}: field {text_field!r} is {type(text).__name__}, expected a string")
            text = text.strip()
            if text:
                yield text


def iter_documents(paths: list[Path], text_field: str) -> Iterator[str]:
    """Yield the documents of all input files in order, each file read by its suffix."""
    for path in paths:
        try:
            if path.suffix == ".jsonl":
                yield from iter_jsonl_documents(path, text_field)
            else:
                yield from iter_text_documents(path)
        except UnicodeDecodeError as error:
            raise ShardError(f"{path} is not valid UTF-8 ({error.reason}); convert it to UTF-8 first") from None
        except OSError as error:
            raise ShardError(f"failed to read {path}: {error.strerror or error}") from None


# -----------------------------------------------------------------------------
# Tokenizer
# -----------------------------------------------------------------------------


def first_line(error: Exception) -> str:
    """Return the first non-empty line of an error message (SentencePiece adds tracebacks)."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return lines[0] if lines else type(error).__name__


def check_tokenizer(tokenizer: spm.SentencePieceProcessor, path: Path) -> None:
    """Raise ShardError unless the tokenizer's ids fit uint16 and its BOS id is BOS_ID."""
    vocab_size = tokenizer.vocab_size()
    if vocab_size > MAX_VOCAB_SIZE:
        raise ShardError(f"tokenizer {path} has {vocab_size:,} pieces, but shards store ids as uint16, "
                         f"which holds at most {MAX_VOCAB_SIZE:,}; use a smaller vocabulary")
    if tokenizer.bos_id() != BOS_ID:
        raise ShardError(f"tokenizer {path} has BOS id {tokenizer.bos_id()}, but the shard format marks "
                         f"document starts with id {BOS_ID}; use a model trained with bos_id={BOS_ID}")


def load_tokenizer(path: Path) -> spm.SentencePieceProcessor:
    """Load and check a SentencePiece model, raising ShardError when it is missing or invalid."""
    if not path.is_file():
        raise ShardError(f"tokenizer file not found: {path}")
    try:
        tokenizer = spm.SentencePieceProcessor(model_file=str(path))
    except (RuntimeError, OSError) as error:
        raise ShardError(f"tokenizer {path} is not a valid SentencePiece model ({first_line(error)})") from None
    check_tokenizer(tokenizer, path)
    return tokenizer


def train_tokenizer(paths: list[Path], text_field: str, val_docs: int, vocab_size: int,
                    sentence_limit: int, folder: Path) -> Path:
    """Train a BPE SentencePiece model on the training documents and return its .model path.

    Each non-empty line of a training document is one training sentence, because SentencePiece
    skips sentences longer than max_sentence_length and documents can be long.
    """

    def training_lines() -> Iterator[str]:
        for index, document in enumerate(iter_documents(paths, text_field)):
            if index < val_docs:
                continue
            for line in document.splitlines():
                if line.strip():
                    yield line

    prefix = folder / TOKENIZER_PREFIX
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=training_lines(),
            model_prefix=str(prefix),
            model_type="bpe",
            vocab_size=vocab_size,
            pad_id=0,
            bos_id=BOS_ID,
            eos_id=2,
            unk_id=3,
            byte_fallback=False,
            input_sentence_size=sentence_limit,
            shuffle_input_sentence=True,
            max_sentence_length=1 << 16,
            minloglevel=2,
        )
    except RuntimeError as error:
        raise ShardError(f"SentencePiece training failed: {first_line(error)}") from None
    return prefix.with_suffix(".model")


# -----------------------------------------------------------------------------
# Writing shards
# -----------------------------------------------------------------------------


def shard_name(split: str, index: int) -> str:
    return f"fineweb_{split}_{index:06d}.bin"


def write_shard(path: Path, tokens: np.ndarray) -> None:
    header = np.zeros(SHARD_HEADER_INTS, dtype="<i4")
    header[0] = SHARD_MAGIC
    header[1] = SHARD_VERSION
    header[2] = tokens.size
    with open(path, "wb") as file:
        file.write(header.tobytes())
        file.write(tokens.astype("<u2", copy=False).tobytes())


class ShardWriter:
    """Writer that cuts one split's token stream into shards of tokens_per_shard tokens, the last one shorter."""

    def __init__(self, folder: Path, split: str, tokens_per_shard: int):
        self.folder = folder
        self.split = split
        self.tokens_per_shard = tokens_per_shard
        self.pending: list[np.ndarray] = []
        self.pending_count = 0
        self.paths: list[Path] = []

    def add(self, tokens: np.ndarray) -> None:
        self.pending.append(tokens)
        self.pending_count += tokens.size
        if self.pending_count < self.tokens_per_shard:
            return
        joined = np.concatenate(self.pending)
        start = 0
        while joined.size - start >= self.tokens_per_shard:
            self._write(joined[start : start + self.tokens_per_shard])
            start += self.tokens_per_shard
        self.pending = [joined[start:]]
        self.pending_count = joined.size - start

    def close(self) -> None:
        """Write the remaining tokens as the last, shorter shard."""
        if self.pending_count:
            self._write(np.concatenate(self.pending))
        self.pending = []
        self.pending_count = 0

    def _write(self, tokens: np.ndarray) -> None:
        path = self.folder / shard_name(self.split, len(self.paths))
        write_shard(path, tokens)
        self.paths.append(path)


def encode_documents(tokenizer: spm.SentencePieceProcessor, documents: list[str]) -> np.ndarray:
    """Return BOS followed by the token ids of each document, all concatenated, as uint16."""
    encoded = tokenizer.encode(documents)
    tokens = np.empty(len(documents) + sum(len(ids) for ids in encoded), dtype="<u2")
    position = 0
    for ids in encoded:
        tokens[position] = BOS_ID
        tokens[position + 1 : position + 1 + len(ids)] = ids
        position += 1 + len(ids)
    return tokens


def write_splits(tokenizer: spm.SentencePieceProcessor, paths: list[Path], text_field: str,
                 val_docs: int, tokens_per_shard: int, folder: Path) -> dict[str, SplitStats]:
    """Tokenize every document, write both splits' shards into folder, and return their stats."""
    stats = {split: SplitStats() for split in SPLITS}
    writers = {split: ShardWriter(folder, split, tokens_per_shard) for split in SPLITS}
    batch: list[str] = []
    batch_chars = 0
    batch_split = "val"

    def flush() -> None:
        nonlocal batch, batch_chars
        if batch:
            tokens = encode_documents(tokenizer, batch)
            writers[batch_split].add(tokens)
            stats[batch_split].tokens += tokens.size
        batch = []
        batch_chars = 0

    for index, document in enumerate(iter_documents(paths, text_field)):
        split = "val" if index < val_docs else "train"
        if split != batch_split:
            flush()
            batch_split = split
        batch.append(document)
        batch_chars += len(document)
        stats[split].docs += 1
        stats[split].bytes += len(document.encode("utf-8"))
        if batch_chars >= ENCODE_BATCH_CHARS:
            flush()
    flush()

    for writer in writers.values():
        writer.close()
    return stats


# -----------------------------------------------------------------------------
# Checks, staging and publishing
# -----------------------------------------------------------------------------


def check_inputs(paths: list[Path]) -> None:
    for path in paths:
        if path.suffix not in INPUT_SUFFIXES:
            raise ShardError(f"input {path} has an unsupported type; expected a .txt or .jsonl file")
        if not path.exists():
            raise ShardError(f"input file not found: {path}")
        if not path.is_file():
            raise ShardError(f"input {path} is not a regular file")


def output_files_in_the_way(output: Path, trains_tokenizer: bool) -> list[Path]:
    """Return the files in output that a new run would replace or leave stale."""
    found = sorted(output.glob("fineweb_train_*.bin")) + sorted(output.glob("fineweb_val_*.bin"))
    names = ["stats.json"]
    if trains_tokenizer:
        names += [f"{TOKENIZER_PREFIX}.model", f"{TOKENIZER_PREFIX}.vocab"]
    found += [output / name for name in names if (output / name).exists()]
    return found


def choose_val_docs(requested: int | None, doc_count: int) -> int:
    """Return the validation document count: the request, or max(1, int(0.1 * doc_count))."""
    if doc_count == 0:
        raise ShardError("the input files contain no documents (they are empty or only whitespace)")
    if doc_count == 1:
        raise ShardError("the input files contain only 1 document, but at least 2 are needed "
                         "(one for validation, one for training); add more text")
    val_docs = requested if requested is not None else max(1, int(VAL_FRACTION * doc_count))
    if not 1 <= val_docs < doc_count:
        raise ShardError(f"--val-docs {val_docs} leaves no training documents; the input has "
                         f"{doc_count} documents, so use a value from 1 to {doc_count - 1}")
    return val_docs


def publish(staging: Path, output: Path) -> None:
    """Move every staged file into output, then delete shards of an earlier run that were not replaced.

    NOTE: these moves are not atomic as a group, so a failure here (a full disk, say) can leave
    a mix of old and new files. A killed process can also leave its hidden .make_shards-* staging
    folder behind, which train_gpt.py ignores because it only reads fineweb_*.bin at the top level.
    """
    staged = sorted(staging.iterdir())
    new_names = {path.name for path in staged}
    for path in staged:
        path.replace(output / path.name)
    for old in output_files_in_the_way(output, trains_tokenizer=False):
        if old.name not in new_names:
            old.unlink()


def build_shards(args: argparse.Namespace) -> dict[str, SplitStats]:
    """Check the arguments, read and tokenize the inputs, and publish shards and stats.json."""
    inputs = [Path(name) for name in args.inputs]
    output = Path(args.output)
    trains_tokenizer = args.tokenizer is None
    vocab_size = args.vocab_size if args.vocab_size is not None else 1024

    check_inputs(inputs)
    if output.exists() and not output.is_dir():
        raise ShardError(f"output {output} exists and is not a folder")
    if trains_tokenizer and vocab_size > MAX_VOCAB_SIZE:
        raise ShardError(f"--vocab-size {vocab_size:,} is too large: shards store ids as uint16, "
                         f"which holds at most {MAX_VOCAB_SIZE:,}")
    if output.is_dir() and not args.overwrite:
        in_the_way = output_files_in_the_way(output, trains_tokenizer)
        if in_the_way:
            raise ShardError(f"output folder {output} already contains {in_the_way[0].name} "
                             f"(and {len(in_the_way) - 1} more); pass --overwrite to replace them or choose another folder")
    tokenizer = None if trains_tokenizer else load_tokenizer(Path(args.tokenizer))

    doc_count = sum(1 for _ in iter_documents(inputs, args.text_field))
    val_docs = choose_val_docs(args.val_docs, doc_count)
    print(f"{doc_count} documents: {val_docs} validation, {doc_count - val_docs} training", flush=True)

    created_output = not output.exists()
    output.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".make_shards-", dir=output))
    succeeded = False
    try:
        if tokenizer is None:
            model_path = train_tokenizer(inputs, args.text_field, val_docs, vocab_size, args.tokenizer_sentences, staging)
            tokenizer = load_tokenizer(model_path)
            print(f"trained a {tokenizer.vocab_size()}-piece BPE tokenizer, saved as {output / model_path.name}", flush=True)

        stats = write_splits(tokenizer, inputs, args.text_field, val_docs, args.tokens_per_shard, staging)
        stats_text = json.dumps({split: asdict(stats[split]) for split in SPLITS}, indent=2) + "\n"
        (staging / "stats.json").write_text(stats_text, encoding="utf-8")
        publish(staging, output)
        succeeded = True
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        if created_output and not succeeded:
            with contextlib.suppress(OSError):
                output.rmdir()  # only succeeds when nothing else was put there

    for split in SPLITS:
        shards = len(list(output.glob(f"fineweb_{split}_*.bin")))
        print(f"{split}: {stats[split].docs} documents, {stats[split].tokens:,} tokens, "
              f"{stats[split].bytes:,} bytes in {shards} shard(s)", flush=True)
    print(f"wrote shards and stats.json to {output}", flush=True)
    return stats


# -----------------------------------------------------------------------------
# Command line
# -----------------------------------------------------------------------------


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} must be at least 1")
    return value


def shard_size(text: str) -> int:
    value = positive_int(text)
    if value > MAX_TOKENS_PER_SHARD:
        raise argparse.ArgumentTypeError(f"{value} exceeds {MAX_TOKENS_PER_SHARD}, the largest int32 token count")
    return value


def non_negative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"{value} must not be negative")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Convert .txt or .jsonl files into Parameter Golf token shards "
                    "(fineweb_val_*.bin, fineweb_train_*.bin) plus stats.json.",
        epilog="Without --tokenizer, a BPE tokenizer is trained on the training documents "
               "and saved as tokenizer.model in the output folder.",
    )

    parser.add_argument("inputs", nargs="+", metavar="INPUT",
                        help="input files, read in the order given: .txt (documents are groups of paragraphs "
                             "of at least 3,000 characters) or .jsonl (one document per record)")
    parser.add_argument("-o", "--output", required=True, metavar="FOLDER",
                        help="folder for the shards, stats.json and any trained tokenizer; created if missing")

    tokenizer_group = parser.add_mutually_exclusive_group()
    tokenizer_group.add_argument("--tokenizer", metavar="MODEL",
                                 help="SentencePiece .model file to encode with (BOS must be id 1, "
                                      "at most 65,536 pieces); default: train a new one")
    tokenizer_group.add_argument("--vocab-size", type=positive_int, metavar="N",
                                 help="pieces of the BPE tokenizer trained when --tokenizer is not given, "
                                      "at most 65,536 (default: 1024)")

    parser.add_argument("--tokenizer-sentences", type=non_negative_int, default=0, metavar="N",
                        help="train the tokenizer on a random sample of N lines of the training documents; "
                             "0 uses every line (default: 0)")
    parser.add_argument("--val-docs", type=positive_int, metavar="N",
                        help="number of leading documents that form the validation split "
                             "(default: max(1, int(0.1 * number of documents)))")
    parser.add_argument("--text-field", default="text", metavar="NAME",
                        help="JSONL field that contains each document's text (default: text)")
    parser.add_argument("--tokens-per-shard", type=shard_size, default=DEFAULT_TOKENS_PER_SHARD, metavar="N",
                        help=f"maximum tokens in one shard; a larger split continues in the next shard "
                             f"(default: {DEFAULT_TOKENS_PER_SHARD:,}, the size of the challenge's shards)")

    parser.add_argument("--overwrite", action="store_true",
                        help="replace shards and stats.json already in the output folder and delete its "
                             "other fineweb_*.bin shards; an existing tokenizer.model is replaced only "
                             "when a new one is trained")

    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        build_shards(args)
    except ShardError as error:
        print(f"make_shards: error: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
