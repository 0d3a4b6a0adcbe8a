"""Real English text for the real-LM study: the Python 3.11 documentation's prose.

Source: Debian's ``python3.11-doc`` package (the HTML documentation, which carries the
reStructuredText sources under ``html/_sources``), fetched with ``apt-get download`` and
unpacked with ``dpkg-deb``; nothing is installed. Written by the CPython documentation
authors, not by this project. Only prose is kept (:func:`rst_paragraphs`): code blocks,
directives, indented bodies and section underlines are dropped, inline markup is reduced
to its text.

The split is by file and fixed: a file goes to evaluation when the first byte of the SHA-1
of its path (relative to ``_sources``) is below 64 (about a quarter of the files), to
calibration otherwise, so the two parts share no paragraph. Outputs, in ``--output``:

- ``calib.jsonl``: one ``{"text": ...}`` per chunk of whole paragraphs (about
  ``--chunk-chars`` characters), the format ``sab-calibrate --data`` reads;
- ``eval.txt``: the evaluation paragraphs, one per line;
- ``corpus.json``: package version, sections, files of each part, sizes and SHA-256 of the
  two outputs.

Usage::

    python benchmarks/real_lm_corpus.py --output build/real-lm/corpus
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
import subprocess
import tempfile
from pathlib import Path

PACKAGE = "python3.11-doc"
SECTIONS = ("tutorial", "howto", "faq", "reference", "using")
DEFAULT_OUTPUT = Path("build/real-lm/corpus")

_UNDERLINE = re.compile(r"^([=\-*~^\"#+`'.:_])\1{2,}\s*$")
_ROLE = re.compile(r":[\w:.-]+:`!?([^`<]*?)\s*(?:<[^`>]*>)?`")
_LINK = re.compile(r"`([^`<]+?)\s*<[^`>]*>`__?")
_LITERAL = re.compile(r"``([^`]+)``")
_EMPH = re.compile(r"(\*\*|\*)([^*]+)\1")
_REF = re.compile(r"`([^`]+)`_{0,2}")
_SPACE = re.compile(r"\s+")


def clean_inline(text: str) -> str:
    """Reduce reStructuredText inline markup to its text.

    ``:func:`len``` -> ``len``, ``:ref:`the loop <tut-for>``` -> ``the loop``,
    ````x```` -> ``x``, ``*a*`` / ``**a**`` -> ``a``, ```name <url>`_`` -> ``name``;
    a trailing ``::`` becomes ``:``; runs of white space become one space.
    """
    text = _ROLE.sub(lambda m: m.group(1), text)
    text = _LINK.sub(lambda m: m.group(1), text)
    text = _LITERAL.sub(lambda m: m.group(1), text)
    text = _EMPH.sub(lambda m: m.group(2), text)
    text = _REF.sub(lambda m: m.group(1), text)
    text = _SPACE.sub(" ", text).strip()
    if text.endswith("::"):
        text = text[:-1]
    return text


def rst_paragraphs(source: str, min_words: int = 8) -> list[str]:
    """The prose paragraphs of one reStructuredText document.

    A paragraph is a run of non-blank lines that start in column 0; indented lines (code
    blocks, directive bodies, block quotes), lines starting ``..`` (directives, comments,
    targets), section underlines and overlines end a paragraph and are dropped, as are
    table lines (starting ``+`` or ``|``). Paragraphs of fewer than ``min_words`` words
    (titles, labels) are dropped.

    Args:
        source: the document text.
        min_words: shortest paragraph kept, in words.

    Returns:
        The cleaned paragraphs (:func:`clean_inline`), in document order.
    """
    out: list[str] = []
    current: list[str] = []

    def flush() -> None:
        if current:
            text = clean_inline(" ".join(current))
            if len(text.split()) >= min_words:
                out.append(text)
            current.clear()

    skipping_directive = False
    for line in source.splitlines():
        if not line.strip():
            flush()
            continue
        indented = line[0] in " \t"
        if indented:
            flush()
            continue
        skipping_directive = line.startswith("..")
        if skipping_directive or _UNDERLINE.match(line) or line.startswith(("+", "|", ">>>")):
            flush()
            continue
        current.append(line)
    flush()
    return out


def is_eval_file(relpath: str) -> bool:
    """The fixed split: ``relpath`` (posix, relative to ``_sources``) goes to evaluation
    when the first byte of its SHA-1 is below 64."""
    return hashlib.sha1(relpath.encode()).digest()[0] < 64


def chunk_paragraphs(paragraphs: list[str], chunk_chars: int) -> list[str]:
    """Join consecutive paragraphs into chunks of about ``chunk_chars`` characters.

    A chunk ends with the first paragraph at which its paragraphs' lengths plus one per
    paragraph reach ``chunk_chars`` (so a joined chunk has at least ``chunk_chars - 1``
    characters); a paragraph is never split."""
    chunks, current, size = [], [], 0
    for p in paragraphs:
        current.append(p)
        size += len(p) + 1  # one newline per paragraph (the joined chunk has one fewer)
        if size >= chunk_chars:
            chunks.append("\n".join(current))
            current, size = [], 0
    if current:
        chunks.append("\n".join(current))
    return chunks


def _fetch_sources(workdir: Path) -> tuple[Path, str]:
    subprocess.run(["apt-get", "download", "-q", PACKAGE], cwd=workdir, check=True, capture_output=True)
    debs = list(workdir.glob(f"{PACKAGE}_*.deb"))
    if len(debs) != 1:
        raise FileNotFoundError(f"apt-get download {PACKAGE} gave {debs}, expected one .deb")
    version = subprocess.run(
        ["dpkg-deb", "-f", str(debs[0]), "Version"], check=True, capture_output=True, text=True
    ).stdout.strip()
    subprocess.run(["dpkg-deb", "-x", str(debs[0]), str(workdir / "root")], check=True)
    sources = next((workdir / "root").glob("usr/share/doc/python3*/html/_sources"))
    return sources, version


def build(output: Path, chunk_chars: int = 2000) -> dict:
    """Fetch the package, extract and split the prose, write the three outputs.

    Args:
        output: folder to write (created; the three files are replaced).
        chunk_chars: target calibration chunk length, in characters.

    Returns:
        The ``corpus.json`` record.

    Raises:
        subprocess.CalledProcessError: ``apt-get download`` or ``dpkg-deb`` failed.
    """
    output.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        sources, version = _fetch_sources(Path(tmp))
        parts: dict[str, dict] = {"calib": {"files": [], "paragraphs": []}, "eval": {"files": [], "paragraphs": []}}
        for section in SECTIONS:
            for path in sorted((sources / section).rglob("*.rst.txt")):
                rel = path.relative_to(sources).as_posix()
                part = parts["eval" if is_eval_file(rel) else "calib"]
                paragraphs = rst_paragraphs(path.read_text(encoding="utf-8"))
                if paragraphs:
                    part["files"].append(rel)
                    part["paragraphs"].extend(paragraphs)
    calib = chunk_paragraphs(parts["calib"]["paragraphs"], chunk_chars)
    calib_text = "".join(json.dumps({"text": c}, ensure_ascii=False) + "\n" for c in calib)
    eval_text = "".join(p + "\n" for p in parts["eval"]["paragraphs"])
    for name, text in (("calib.jsonl", calib_text), ("eval.txt", eval_text)):
        (output / name).write_text(text, encoding="utf-8")
    record = {
        "source": f"Debian {PACKAGE} {version}, html/_sources",
        "sections": list(SECTIONS),
        "split": "by file: sha1(relative path)[0] < 64 -> eval",
        "calib": {
            "files": parts["calib"]["files"],
            "paragraphs": len(parts["calib"]["paragraphs"]),
            "chunks": len(calib),
            "chars": len(calib_text),
            "sha256": hashlib.sha256(calib_text.encode()).hexdigest(),
        },
        "eval": {
            "files": parts["eval"]["files"],
            "paragraphs": len(parts["eval"]["paragraphs"]),
            "chars": len(eval_text),
            "sha256": hashlib.sha256(eval_text.encode()).hexdigest(),
        },
    }
    (output / "corpus.json").write_text(json.dumps(record, indent=1) + "\n")
    return record


def main(argv: list[str] | None = None) -> int:
    """CLI: ``python benchmarks/real_lm_corpus.py [--output DIR] [--chunk-chars N]``."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--output", type=Path, default=DEFAULT_OUTPUT)
    ap.add_argument("--chunk-chars", type=int, default=2000)
    args = ap.parse_args(argv)
    rec = build(args.output, args.chunk_chars)
    print(
        f"{args.output}: calib {rec['calib']['chunks']} chunks / {rec['calib']['chars']} chars "
        f"({len(rec['calib']['files'])} files), eval {rec['eval']['chars']} chars ({len(rec['eval']['files'])} files)"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
