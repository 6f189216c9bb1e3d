"""WordPiece vocab.txt files: one token per line, the line index is the token id.

Read the way BERT tokenizers read them: lines end at "\n" only (a trailing "\r" of a CRLF file is
removed), so tokens that are themselves Unicode line separators, such as U+2028 on lines 344 and 13503
of the release's RET_CLIP/clip/vocab.txt, stay tokens and every later id stays where it was.
``str.splitlines`` would break on those characters and shift or reject the file.
"""

from __future__ import annotations

from pathlib import Path

SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")


def vocab_lines(path: str | Path) -> list[str]:
    """The tokens of a vocab file in id order (no line-ending characters, final newline optional)."""
    text = Path(path).read_text(encoding="utf-8")
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()  # the newline that ends the last line
    return [line[:-1] if line.endswith("\r") else line for line in lines]


def read_vocab(path: str | Path) -> dict[str, int]:
    """vocab.txt -> {token: line index}; empty and repeated lines are errors (they would shift every id)."""
    vocab: dict[str, int] = {}
    for lineno, token in enumerate(vocab_lines(path), start=1):
        if not token:
            raise ValueError(f"vocab file {path}: line {lineno} is empty")
        if token in vocab:
            raise ValueError(
                f"vocab file {path}: line {lineno} repeats token {token!r} (first on {vocab[token] + 1})"
            )
        vocab[token] = len(vocab)
    return vocab


def write_vocab(path: str | Path, words: list[str]) -> Path:
    """Write a WordPiece vocab.txt: BERT's five special tokens followed by ``words``, one per line."""
    path = Path(path)
    path.write_text("\n".join([*SPECIAL_TOKENS, *words]) + "\n", encoding="utf-8")
    return path
