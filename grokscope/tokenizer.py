"""Tokenizers: SentencePiece models (Grok-1) and xAI's tiktoken JSON (Grok-2's `tokenizer.tok.json`).

Both formats give the same interface: ids, the model's own pieces, display strings, and for
Grok-2 its chat template.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path

import sentencepiece as spm

__all__ = ["Tokenizer", "TokenizerError", "display_piece", "lone_surrogate", "V1_PATTERN", "parse_tok_json"]

_VISIBLE = {" ": "·", "\u2581": "·", "\n": "↵", "\t": "→", "\r": "␍"}

#: The "V1" word split of xAI's tiktoken JSON: the pattern SGLang's `TiktokenTokenizer` gives
#: tiktoken for `word_split: "V1"` (contractions, letter runs with one leading non-letter,
#: single digits, punctuation runs, newlines, other whitespace).
V1_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
              r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")

PAD, SEPARATOR, EOS = "<|pad|>", "<|separator|>", "<|eos|>"

# The special-token texts that SGLang's Grok-2 tokenizer encodes as special ids; any other
# special token's text is encoded as ordinary bytes.
_ENCODED_SPECIALS = frozenset(
    [PAD, SEPARATOR, EOS] + [f"<|control{i}|>" for i in range(1, 705)]
    + [f"<|reserved_{i}|>" for i in range(3, 128)])

# The bytes that can occur in UTF-8 text: every one must be a token of its own, or some text
# could not be encoded.
_UTF8_BYTES = [b for b in range(256) if b not in (0xC0, 0xC1) and b < 0xF5]


_BYTE_PIECE = re.compile(r"<0x([0-9A-Fa-f]{2})>")


def _visible_char(ch: str) -> str:
    """One character as a label shows it: whitespace as a glyph, other control characters as `\\xNN`."""
    if ch in _VISIBLE:
        return _VISIBLE[ch]
    if ord(ch) < 0x20 or ord(ch) == 0x7F:
        return f"\\x{ord(ch):02x}"
    return ch


def display_piece(piece: str) -> str:
    """A piece as a label shows it: whitespace made visible (space ·, newline ↵, tab →,
    carriage return ␍), other control characters as `\\xNN`.

    A SentencePiece byte-fallback piece `<0xNN>` shows its byte: the character for printable
    ASCII (`<0x51>` → `Q`), the glyph for whitespace (`<0x09>` → `→`), `\\xNN` otherwise
    (`<0xE2>` → `\\xe2`, as tiktoken JSON pieces show such bytes).
    """
    byte = _BYTE_PIECE.fullmatch(piece)
    if byte is not None:
        value = int(byte.group(1), 16)
        return _visible_char(chr(value)) if value < 0x80 else f"\\x{value:02x}"
    return "".join(_visible_char(ch) for ch in piece)


class TokenizerError(ValueError):
    """A tokenizer file that cannot be read or is neither a SentencePiece model nor xAI's
    tiktoken JSON; the message starts with the file's path."""

    def __init__(self, path: Path, problem: str):
        super().__init__(f"{path}: {problem}")
        self.path = path


class Tokenizer:
    """A tokenizer file: a SentencePiece model (e.g. Grok-1's `tokenizer.model`, 131,072 pieces)
    or xAI's tiktoken JSON (e.g. Grok-2's `tokenizer.tok.json`).

    The format is read from the file: a file named `*.json`, or one whose content is a JSON
    object, is tiktoken JSON; anything else is a SentencePiece model.

    Attributes:
      path: the file.
      sha256: the hex SHA-256 of its bytes.
      format: "sentencepiece" or "tiktoken-json".

    Raises:
      FileNotFoundError: no such file.
      TokenizerError: a directory, an unreadable file, or a file of neither format (or a
        malformed one); the message is one line.
    """

    def __init__(self, model_file: str | os.PathLike):
        self.path = Path(model_file)
        named_json = self.path.suffix.lower() == ".json"
        if self.path.is_dir():
            what = "tiktoken JSON tokenizer" if named_json else "SentencePiece model"
            raise TokenizerError(self.path, f"is a directory, not a {what} file")
        if not self.path.is_file():
            raise FileNotFoundError(f"tokenizer model not found: {self.path}")
        try:
            data = self.path.read_bytes()
        except OSError as e:
            raise TokenizerError(self.path, f"cannot read it ({e.strerror or e})") from None
        if not data:
            what = "tiktoken JSON tokenizer" if named_json else "SentencePiece model"
            raise TokenizerError(self.path, f"not a {what} (the file is empty)")
        self.sha256 = hashlib.sha256(data).hexdigest()
        parsed = _json_object(self.path, data, named_json)
        if parsed is not None:
            self.format = "tiktoken-json"
            self._impl = _TiktokenJson(self.path, parsed)
        else:
            self.format = "sentencepiece"
            self._impl = _SentencePiece(self.path, data)

    @property
    def vocab_size(self) -> int:
        """The number of ids (which may be fewer than the model's embedding rows)."""
        return self._impl.vocab_size

    @property
    def pad_id(self) -> int | None:
        """The padding id (SentencePiece: -1 when the model has none; tiktoken JSON: None)."""
        return self._impl.pad_id

    @property
    def bos_id(self) -> int | None:
        """The beginning-of-sequence id (SentencePiece: -1 when the model has none; tiktoken
        JSON: always None, Grok-2 has no BOS token)."""
        return self._impl.bos_id

    @property
    def eos_id(self) -> int:
        return self._impl.eos_id

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`. For tiktoken JSON, the texts of the special tokens `<|pad|>`,
        `<|separator|>`, `<|eos|>`, `<|controlN|>` and `<|reserved_N|>` become their special
        ids, as in SGLang; no BOS or EOS is added."""
        return self._impl.encode(text)

    def decode(self, ids) -> str:
        """The text of `ids` (special tokens as their text; invalid UTF-8 as U+FFFD)."""
        return self._impl.decode([int(i) for i in ids])

    def pieces(self, ids) -> list[str]:
        """The model's own piece for every id.

        SentencePiece: its pieces (▁ marks a leading space). tiktoken JSON: the token's bytes
        as UTF-8, with bytes that are not valid UTF-8 on their own shown as escapes such as
        `\\xe2`; special tokens as their text.
        """
        table = self._impl.piece_table()
        n = len(table)
        out = []
        for i in ids:
            i = int(i)
            out.append(table[i] if 0 <= i < n else self._impl.missing_piece(i))
        return out

    def ids_from_pieces(self, pieces) -> list[int]:
        """The id of every piece (the inverse of `pieces`).

        SentencePiece: an unknown piece gives the model's unknown id. tiktoken JSON: an unknown
        piece is a ValueError; where two tokens show the same piece, a special token comes
        first, then a token whose bytes are that piece's UTF-8, then the lowest id.
        """
        return self._impl.ids_from_pieces(pieces)

    def display(self, ids) -> list[str]:
        """Pieces with whitespace made visible, for labels in plots."""
        return [display_piece(p) for p in self.pieces(ids)]

    def chat_prompt(self, user_text: str) -> str:
        """Grok-2's chat template for one user turn, ending with the generation prompt:
        `Human: {user_text stripped}<|separator|>\\n\\nAssistant:`.

        Raises:
          TokenizerError: a SentencePiece model, which has no chat template (Grok-1 is a base
            model: encode the text itself).
        """
        if self.format != "tiktoken-json":
            raise TokenizerError(self.path, "a SentencePiece model has no chat template (Grok-1 is a base "
                                            "model; encode the text itself)")
        return f"Human: {user_text.strip()}{SEPARATOR}\n\nAssistant:"

    def encode_chat(self, user_text: str) -> list[int]:
        """The ids of `chat_prompt(user_text)`."""
        return self.encode(self.chat_prompt(user_text))

    def identity(self) -> dict:
        """Path, SHA-256 and vocab_size of the file; tiktoken JSON adds `format`."""
        out = {"path": str(self.path.resolve()), "sha256": self.sha256, "vocab_size": self.vocab_size}
        if self.format != "sentencepiece":
            out["format"] = self.format
        return out


def _json_object(path: Path, data: bytes, named_json: bool) -> dict | None:
    """The parsed JSON object of a tiktoken JSON file, or None for a SentencePiece model."""
    if not named_json and not data.lstrip()[:1] == b"{":
        return None  # a SentencePiece ModelProto never starts with "{"
    try:
        parsed = json.loads(data)
    except (ValueError, RecursionError) as e:
        if not named_json:
            return None
        detail = f"{e.msg} at line {e.lineno} column {e.colno}" if isinstance(e, json.JSONDecodeError) else str(e)
        raise TokenizerError(path, f"not a tiktoken JSON tokenizer (it does not parse as JSON: {detail})") from None
    if not isinstance(parsed, dict):
        if not named_json:
            return None
        raise TokenizerError(path, f"not a tiktoken JSON tokenizer (the JSON is {type(parsed).__name__}, "
                                   f"not an object)")
    if "regular_tokens" not in parsed:
        raise TokenizerError(path, 'a JSON file without the key "regular_tokens": not a tiktoken JSON tokenizer '
                                   "(such as Grok-2's tokenizer.tok.json)")
    return parsed


def parse_tok_json(obj, path: Path | str) -> tuple[dict[bytes, int], dict[str, int], str]:
    """Checks a parsed tiktoken JSON tokenizer: (mergeable ranks {bytes: id}, special tokens
    {text: id}, the word-split pattern).

    Raises:
      TokenizerError: a missing key, a malformed entry, an unknown word split, repeated ids
        or bytes, ids that do not run 0..n-1, a wrong vocab_size, single bytes missing, or no
        `<|eos|>`.
    """
    path = Path(path)

    def fail(problem: str):
        raise TokenizerError(path, problem)

    if not isinstance(obj, dict):
        fail(f"not a tiktoken JSON tokenizer (the JSON is {type(obj).__name__}, not an object)")
    for key in ("regular_tokens", "special_tokens", "word_split"):
        if key not in obj:
            fail(f'not a tiktoken JSON tokenizer (no "{key}" key)')
    if obj["word_split"] != "V1":
        fail(f'word_split {obj["word_split"]!r} is not supported (only "V1")')
    pattern = obj.get("pat_str", V1_PATTERN)
    if not isinstance(pattern, str) or not pattern:
        fail('"pat_str" is not a non-empty string')

    owner: dict[int, str] = {}
    tokens: dict[str, list[tuple[bytes, int]]] = {}
    for key in ("regular_tokens", "special_tokens"):
        entries = obj[key]
        if not isinstance(entries, list):
            fail(f'"{key}" is {type(entries).__name__}, not a list')
        parsed = []
        for i, entry in enumerate(entries):
            where = f"{key}[{i}]"
            if not isinstance(entry, dict) or "bytes" not in entry or "token" not in entry:
                fail(f'{where} is not an object with "bytes" and "token"')
            raw, token = entry["bytes"], entry["token"]
            if (not isinstance(raw, list) or not raw
                    or not all(type(b) is int and 0 <= b <= 255 for b in raw)):
                fail(f'{where}: "bytes" is not a non-empty list of integers 0..255')
            if type(token) is not int or token < 0:
                fail(f'{where}: "token" is not a non-negative integer (got {token!r})')
            if token in owner:
                fail(f"token id {token} appears twice ({owner[token]} and {where})")
            owner[token] = where
            parsed.append((bytes(raw), token))
        tokens[key] = parsed

    ranks: dict[bytes, int] = {}
    for i, (raw, token) in enumerate(tokens["regular_tokens"]):
        if raw in ranks:
            fail(f"regular_tokens[{i}] repeats the bytes {raw!r} of token id {ranks[raw]}")
        ranks[raw] = token
    specials: dict[str, int] = {}
    for i, (raw, token) in enumerate(tokens["special_tokens"]):
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            fail(f"special_tokens[{i}]: its bytes {raw!r} are not UTF-8 text")
        if text in specials:
            fail(f"special_tokens[{i}] repeats the text {text!r} of token id {specials[text]}")
        specials[text] = token

    n = len(owner)
    if n and max(owner) != n - 1:
        missing = next(i for i in range(n) if i not in owner)
        fail(f"token ids do not run 0..{n - 1} without gaps (id {missing} is missing, the largest is {max(owner)})")
    if "vocab_size" in obj and obj["vocab_size"] != n:
        fail(f"vocab_size is {obj['vocab_size']!r} but the file holds {n} tokens")
    lacking = [b for b in _UTF8_BYTES if bytes([b]) not in ranks]
    if lacking:
        shown = ", ".join(f"0x{b:02x}" for b in lacking[:8]) + (", ..." if len(lacking) > 8 else "")
        fail(f"regular_tokens lack {len(lacking)} single byte(s) that UTF-8 text can hold ({shown})")
    if EOS not in specials:
        fail(f"no {EOS} special token")
    return ranks, specials, pattern


class _SentencePiece:
    def __init__(self, path: Path, data: bytes):
        try:
            self._sp = spm.SentencePieceProcessor(model_proto=data)
        except RuntimeError:  # SentencePiece's own errors carry only its source location
            raise TokenizerError(path, "not a SentencePiece model (it does not parse as a SentencePiece "
                                       "ModelProto)") from None
        if self._sp.vocab_size() < 1:
            raise TokenizerError(path, "not a SentencePiece model (it holds no pieces)")
        self.vocab_size = self._sp.vocab_size()
        self.pad_id, self.bos_id, self.eos_id = self._sp.pad_id(), self._sp.bos_id(), self._sp.eos_id()
        self._table: list[str] | None = None

    def encode(self, text: str) -> list[int]:
        return self._sp.encode(text)

    def decode(self, ids: list[int]) -> str:
        return self._sp.decode(ids)

    def piece_table(self) -> list[str]:
        if self._table is None:
            self._table = list(self._sp.id_to_piece(list(range(self.vocab_size))))
        return self._table

    def missing_piece(self, i: int) -> str:
        return self._sp.id_to_piece(i)  # raises SentencePiece's own IndexError

    def ids_from_pieces(self, pieces) -> list[int]:
        return [self._sp.piece_to_id(p) for p in pieces]


class _TiktokenJson:
    def __init__(self, path: Path, obj: dict):
        import tiktoken

        ranks, specials, pattern = parse_tok_json(obj, path)
        try:
            self._enc = tiktoken.Encoding(path.name, pat_str=pattern, mergeable_ranks=ranks, special_tokens=specials)
        except ValueError as e:
            raise TokenizerError(path, f"tiktoken refuses it ({' '.join(str(e).split())})") from None
        self._allowed = frozenset(t for t in specials if t in _ENCODED_SPECIALS)
        self.vocab_size = len(ranks) + len(specials)
        self.pad_id, self.bos_id, self.eos_id = specials.get(PAD), None, specials[EOS]

        table: list[str] = [""] * self.vocab_size
        valid: dict[str, int] = {}
        escaped: dict[str, int] = {}
        for raw, token in sorted(ranks.items(), key=lambda item: item[1]):
            try:
                piece = raw.decode("utf-8")
                valid.setdefault(piece, token)
            except UnicodeDecodeError:
                piece = raw.decode("utf-8", "backslashreplace")
                escaped.setdefault(piece, token)
            table[token] = piece
        for text, token in specials.items():
            table[token] = text
        self._table = table
        self._ids = {**escaped, **valid, **specials}

    def encode(self, text: str) -> list[int]:
        return self._enc.encode(text, allowed_special=self._allowed, disallowed_special=())

    def decode(self, ids: list[int]) -> str:
        for i in ids:
            if not 0 <= i < self.vocab_size:
                raise IndexError(f"token id {i} is out of range (vocab_size {self.vocab_size})")
        return self._enc.decode(ids)

    def piece_table(self) -> list[str]:
        return self._table

    def missing_piece(self, i: int) -> str:
        raise IndexError(f"token id {i} is out of range (vocab_size {self.vocab_size})")

    def ids_from_pieces(self, pieces) -> list[int]:
        out = []
        for p in pieces:
            token = self._ids.get(p)
            if token is None:
                raise ValueError(f"no token has the piece {p!r}")
            out.append(token)
        return out


def lone_surrogate(text: str) -> str | None:
    """A description of the first lone surrogate in `text` (not encodable as UTF-8), or None."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        return f"a lone surrogate \\u{ord(text[e.start]):04x} at character {e.start}"
    return None
