"""SentencePiece tokenizer wrapper: ids, the model's own pieces, and display strings."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import sentencepiece as spm

__all__ = ["Tokenizer", "TokenizerError", "display_piece", "lone_surrogate"]

_VISIBLE = {" ": "·", "\u2581": "·", "\n": "↵", "\t": "→", "\r": "␍"}


def display_piece(piece: str) -> str:
    """A piece with its whitespace made visible (space ·, newline ↵, tab →)."""
    return "".join(_VISIBLE.get(ch, ch) for ch in piece)


class TokenizerError(ValueError):
    """A tokenizer file that cannot be read or is not a SentencePiece model; the message
    starts with the file's path."""

    def __init__(self, path: Path, problem: str):
        super().__init__(f"{path}: {problem}")
        self.path = path


class Tokenizer:
    """A SentencePiece model, e.g. Grok-1's `tokenizer.model` (131,072 pieces).

    Raises:
      FileNotFoundError: no such file.
      TokenizerError: a directory, an unreadable file, or not a SentencePiece model.
    """

    def __init__(self, model_file: str | os.PathLike):
        self.path = Path(model_file)
        if self.path.is_dir():
            raise TokenizerError(self.path, "is a directory, not a SentencePiece model file")
        if not self.path.is_file():
            raise FileNotFoundError(f"tokenizer model not found: {self.path}")
        try:
            data = self.path.read_bytes()
        except OSError as e:
            raise TokenizerError(self.path, f"cannot read it ({e.strerror or e})") from None
        if not data:
            raise TokenizerError(self.path, "not a SentencePiece model (the file is empty)")
        self.sha256 = hashlib.sha256(data).hexdigest()
        try:
            self._sp = spm.SentencePieceProcessor(model_proto=data)
        except RuntimeError:  # SentencePiece's own errors carry only its source location
            raise TokenizerError(self.path, "not a SentencePiece model (it does not parse as a SentencePiece "
                                            "ModelProto)") from None
        if self._sp.vocab_size() < 1:
            raise TokenizerError(self.path, "not a SentencePiece model (it holds no pieces)")

    @property
    def vocab_size(self) -> int:
        return self._sp.vocab_size()

    @property
    def pad_id(self) -> int:
        return self._sp.pad_id()

    @property
    def bos_id(self) -> int:
        return self._sp.bos_id()

    @property
    def eos_id(self) -> int:
        return self._sp.eos_id()

    def encode(self, text: str) -> list[int]:
        return self._sp.encode(text)

    def decode(self, ids) -> str:
        return self._sp.decode([int(i) for i in ids])

    def pieces(self, ids) -> list[str]:
        """The model's own piece for every id (SentencePiece's ▁ marks a leading space)."""
        return [self._sp.id_to_piece(int(i)) for i in ids]

    def ids_from_pieces(self, pieces) -> list[int]:
        return [self._sp.piece_to_id(p) for p in pieces]

    def display(self, ids) -> list[str]:
        """Pieces with whitespace made visible, for labels in plots."""
        return [display_piece(p) for p in self.pieces(ids)]

    def identity(self) -> dict:
        return {"path": str(self.path.resolve()), "sha256": self.sha256, "vocab_size": self.vocab_size}


def lone_surrogate(text: str) -> str | None:
    """A description of the first lone surrogate in `text` (not encodable as UTF-8), or None."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        return f"a lone surrogate \\u{ord(text[e.start]):04x} at character {e.start}"
    return None
