#!/usr/bin/env python3
"""Write a self-extracting compressed copy of train_gpt.py for a challenge submission.

The challenge counts the bytes of the training script toward the 16,000,000-byte limit, so the
submitted script can be a short loader that contains the source compressed. The readable file stays
the source of truth: edit it, then pack it again.

    python3 tools/pack_code.py                    # train_gpt.py -> train_gpt_packed.py
    python3 tools/pack_code.py train_gpt.py -o records/my_run/train_gpt.py

SOURCE defaults to train_gpt.py, and -o defaults to SOURCE's name with "_packed" added, in the
same folder (train_gpt_packed.py for the default SOURCE).

Every combination of codec (lzma at preset 9 with the extreme flag, bz2 and zlib at level 9) and
literal encoding is built, and the smallest file is written unless --codec or --encoding narrows
the choice. The encodings are:
  latin1   a str literal of the raw compressed bytes in a file declared Latin-1, so one byte of
           payload costs one byte of file, plus an escape for backslash, the quote, NUL, CR and LF
  base85   base64.b85encode text: ASCII only, 5 characters per 4 bytes
  escaped  a bytes literal of printable ASCII with escapes for the rest: ASCII only, but larger

The loader runs the source in the packed module's own namespace, so the copy behaves as the
readable file does when run as a script, imported, or launched by torchrun: __name__ and __file__
are the packed file's, and os.path.getsize(__file__) counts the packed bytes. It also sets
__source__ to the readable text, which train_gpt.py writes into its log and hashes (source_sha256)
in place of its own file. Tracebacks name the packed file with line numbers of the readable one.

The packed file has three lines: a comment, the line that decompresses the source, and the line
that runs it. NOTE: Python 3.11 prints a traceback's source text by reading the named file, so an
uncaught exception raised on line 2 of the source shows the compressed payload as that line's text.
Line 2 of train_gpt.py is inside its docstring, so its tracebacks are not affected.

The output is written to a temporary file beside it and renamed into place only after its loader
has been checked to return the source, so a failure leaves no partial file.
"""

from __future__ import annotations

import argparse
import base64
import bz2
import lzma
import os
import re
import sys
import tempfile
import zlib
from pathlib import Path

CODECS = ("lzma", "bz2", "zlib")
ENCODINGS = ("latin1", "base85", "escaped")
OCTAL_DIGITS = b"01234567"


class PackError(Exception):
    """Error for a source that cannot be packed or an output that cannot be written. The message names the file."""


def read_source(path: Path) -> str:
    """Read SOURCE as train_gpt.py reads itself (UTF-8, universal newlines) and check that it compiles."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise PackError(f"source file {path} not found") from None
    except IsADirectoryError:
        raise PackError(f"source {path} is a directory, expected a Python file") from None
    except OSError as e:
        raise PackError(f"failed to read source {path}: {e.strerror}") from None

    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise PackError(f"source {path} is not valid UTF-8 (byte offset {e.start})") from None
    # Path.read_text turns CRLF and CR into LF, and that text is what train_gpt.py hashes.
    text = text.replace("\r\n", "\n").replace("\r", "\n")

    try:
        compile(text, str(path), "exec", dont_inherit=True)
    except SyntaxError as e:
        where = f"line {e.lineno}: " if e.lineno else ""
        raise PackError(f"source {path} does not compile: {where}{e.msg}") from None
    except ValueError as e:  # some Python versions raise ValueError, not SyntaxError, for NUL bytes in the source
        raise PackError(f"source {path} does not compile: {e}") from None
    return text


def compress_lzma(data: bytes) -> bytes:
    """Return the smallest of the .xz and .lzma forms at preset 9e. lzma.decompress detects either form."""
    preset = 9 | lzma.PRESET_EXTREME
    forms = [lzma.compress(data, format=lzma.FORMAT_XZ, preset=preset)]
    # The .lzma form has a shorter header, and text often compresses better with other literal
    # context (lc) and position (pb) bits than the preset's lc=3, pb=2.
    for lc in range(5):
        for pb in (0, 2):
            lzma1 = {"id": lzma.FILTER_LZMA1, "preset": preset, "lc": lc, "lp": 0, "pb": pb}
            forms.append(lzma.compress(data, format=lzma.FORMAT_ALONE, filters=[lzma1]))
    return min(forms, key=len)


def compress(data: bytes, codec: str) -> bytes:
    if codec == "lzma":
        return compress_lzma(data)
    if codec == "bz2":
        return bz2.compress(data, compresslevel=9)
    if codec == "zlib":
        return zlib.compress(data, 9)
    raise ValueError(f"unknown codec {codec!r}; expected one of {', '.join(CODECS)}")


def quote_for(blob: bytes) -> str:
    """Return the quote character that occurs less often in `blob`, since each occurrence needs an escape."""
    return "'" if blob.count(b"'") <= blob.count(b'"') else '"'


def null_escape(blob: bytes, index: int) -> str:
    """Return \\x00 for the NUL at `index` when an octal digit follows, which would extend \\0, and \\0 otherwise."""
    follows_digit = index + 1 < len(blob) and blob[index + 1] in OCTAL_DIGITS
    return "\\x00" if follows_digit else "\\0"


def latin1_literal(blob: bytes) -> str:
    """Return a str literal whose characters are the bytes of `blob`, for a file decoded as Latin-1."""
    quote = quote_for(blob)
    parts = []
    for index, byte in enumerate(blob):
        char = chr(byte)
        if char in ("\\", quote):
            parts.append("\\" + char)
        elif char == "\n":
            parts.append("\\n")
        elif char == "\r":
            parts.append("\\r")
        elif byte == 0:  # a source file may not contain NUL
            parts.append(null_escape(blob, index))
        else:
            parts.append(char)
    return quote + "".join(parts) + quote


def escaped_literal(blob: bytes) -> str:
    """Return a bytes literal of printable ASCII, using the shortest escape for every other byte."""
    quote = quote_for(blob)
    short_escapes = {9: "\\t", 10: "\\n", 13: "\\r"}
    parts = []
    for index, byte in enumerate(blob):
        char = chr(byte)
        if char in ("\\", quote):
            parts.append("\\" + char)
        elif 0x20 <= byte < 0x7F:
            parts.append(char)
        elif byte in short_escapes:
            parts.append(short_escapes[byte])
        else:
            # An octal escape takes at most 3 digits, so it may drop leading zeros unless an octal digit follows.
            follows_digit = index + 1 < len(blob) and blob[index + 1] in OCTAL_DIGITS
            parts.append("\\" + (f"{byte:03o}" if follows_digit else f"{byte:o}"))
    return "b" + quote + "".join(parts) + quote


def build_packed(source_name: str, codec: str, blob: bytes, encoding: str) -> bytes:
    """Return the packed file: a comment, a line that sets __source__, and a line that runs it."""
    if encoding == "latin1":
        payload = latin1_literal(blob) + ".encode('latin1')"
    elif encoding == "base85":
        payload = f"__import__('base64').b85decode('{base64.b85encode(blob).decode('ascii')}')"
    elif encoding == "escaped":
        payload = escaped_literal(blob)
    else:
        raise ValueError(f"unknown encoding {encoding!r}; expected one of {', '.join(ENCODINGS)}")

    # Python reads the encoding declaration from "coding: <name>" anywhere in a comment on line 1.
    declaration = ", coding: latin-1" if encoding == "latin1" else ""
    # Only a plain ASCII name goes into the comment, because it must encode in the file and a ":" or
    # "=" could turn it into an encoding declaration.
    label = source_name if re.fullmatch(r"[A-Za-z0-9_.-]+", source_name) else "script"
    # __import__ keeps the codec and base64 modules out of the namespace that the source runs in.
    # The exec line comes last and alone, so a traceback's outermost frame shows it, not the payload.
    lines = [
        f"# {label} compressed by tools/pack_code.py ({codec}{declaration}); edit the readable file and pack it again.\n",
        f"__source__=__import__('{codec}').decompress({payload}).decode()\n",
        "exec(compile(__source__,__file__,'exec'))\n",
    ]
    return "".join(lines).encode("latin-1" if encoding == "latin1" else "ascii")


def unpack(packed: bytes, path: str = "<packed>") -> str:
    """Return the source text that a packed file's loader sets as __source__, without running that source.

    The loader looks `compile` and `exec` up in its module globals before the builtins, so
    defining them here as no-ops stops it after it has decompressed the source.
    """
    namespace = {
        "__name__": "pack_code_check",
        "__file__": path,
        "compile": lambda *args, **kwargs: None,
        "exec": lambda *args, **kwargs: None,
    }
    exec(compile(packed, path, "exec", dont_inherit=True), namespace)
    return namespace["__source__"]


def pack(text: str, source_name: str, codecs=CODECS, encodings=ENCODINGS) -> tuple[bytes, str, str, dict[str, int]]:
    """Build every codec x encoding candidate. Return the smallest file, its codec, its encoding and all sizes."""
    data = text.encode("utf-8")
    candidates = {}
    for codec in codecs:
        blob = compress(data, codec)
        for encoding in encodings:
            candidates[(codec, encoding)] = build_packed(source_name, codec, blob, encoding)
    (codec, encoding), packed = min(candidates.items(), key=lambda item: len(item[1]))
    sizes = {f"{c}+{e}": len(file) for (c, e), file in sorted(candidates.items(), key=lambda item: len(item[1]))}
    return packed, codec, encoding, sizes


def write_atomically(path: Path, data: bytes, mode: int) -> None:
    """Write `data` to a temporary file in the output folder, then rename it over `path`."""
    descriptor, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(descriptor, "wb") as file:
            file.write(data)
        os.chmod(temporary, mode)
        os.replace(temporary, path)
    except BaseException:
        os.unlink(temporary)
        raise


def check_output_path(source: Path, out: Path) -> None:
    if out.resolve() == source.resolve():
        raise PackError(f"output {out} is the source file; choose another -o so the readable source is kept")
    if out.is_dir():
        raise PackError(f"output {out} is a directory; give a file name with -o")
    if not out.parent.is_dir():
        raise PackError(f"output folder {out.parent} does not exist; create it first")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Write a self-extracting compressed copy of a Python training script. The copy runs,\n"
                    "imports and launches under torchrun as the readable file does, and sets __source__\n"
                    "to the readable text. It prints both sizes in bytes and the codec chosen.",
        epilog="examples:\n"
               "  python3 tools/pack_code.py                  # train_gpt.py -> train_gpt_packed.py\n"
               "  python3 tools/pack_code.py train_gpt.py -o records/my_run/train_gpt.py",
    )
    parser.add_argument("source", nargs="?", default="train_gpt.py", type=Path,
                        help="readable script to pack (default: train_gpt.py in the current folder)")
    parser.add_argument("-o", "--out", type=Path,
                        help="packed file to write; an existing file is replaced (default: SOURCE's name with "
                             "'_packed' added, in the same folder, e.g. train_gpt_packed.py)")
    parser.add_argument("--codec", choices=("auto",) + CODECS, default="auto",
                        help="compression codec (default: auto, whichever gives the smallest file)")
    parser.add_argument("--encoding", choices=("auto",) + ENCODINGS, default="auto",
                        help="how the compressed bytes are written in the file: latin1 (a raw str literal in a "
                             "Latin-1 file, smallest), base85 or escaped (ASCII-only files) (default: auto, "
                             "whichever gives the smallest file)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    source: Path = args.source
    out: Path = args.out if args.out is not None else source.with_name(f"{source.stem}_packed{source.suffix or '.py'}")
    codecs = CODECS if args.codec == "auto" else (args.codec,)
    encodings = ENCODINGS if args.encoding == "auto" else (args.encoding,)

    try:
        text = read_source(source)
        check_output_path(source, out)
        packed, codec, encoding, sizes = pack(text, source.name, codecs, encodings)
        if unpack(packed, str(out)) != text:
            raise PackError(f"the packed copy of {source} does not decompress to its source; nothing was written")
        mode = source.stat().st_mode & 0o777
        try:
            write_atomically(out, packed, mode)
        except OSError as e:
            raise PackError(f"failed to write {out}: {e.strerror}") from None
    except PackError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1

    readable_bytes = source.stat().st_size
    print(f"readable {source}: {readable_bytes} bytes")
    print(f"packed {out}: {len(packed)} bytes ({100 * len(packed) / readable_bytes:.1f}% of readable), "
          f"codec:{codec} encoding:{encoding}")
    print("candidates (file bytes): " + " ".join(f"{name}:{size}" for name, size in sizes.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
