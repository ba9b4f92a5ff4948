"""Tokenizer: SentencePiece models and xAI's tiktoken JSON (Grok-2), and the BPE trainer."""

import hashlib
import json
import sysconfig
from pathlib import Path

import pytest
import regex
import sentencepiece

from grokscope.session import default_model_dir
from grokscope.tokenizer import V1_PATTERN, Tokenizer, TokenizerError, display_piece
from grokscope.tokenizer_train import train_tok_json, write_tok_json


@pytest.fixture(scope="module")
def grok2_tok_file(grok2_fixture_dir) -> Path:
    return grok2_fixture_dir / "tokenizer.tok.json"


@pytest.fixture(scope="module")
def grok2_cases(grok2_fixture_dir) -> dict:
    return json.loads((grok2_fixture_dir / "tokenizer_cases.json").read_text())


@pytest.fixture(scope="module")
def grok2_tok(grok2_tok_file) -> Tokenizer:
    return Tokenizer(grok2_tok_file)


# The fixture's tokenizer (ids SGLang gives).

def test_fixture_cases_match_sglang(grok2_tok, grok2_cases):
    assert grok2_cases["vocab_size"] == grok2_tok.vocab_size == 384
    assert grok2_tok.eos_id == grok2_cases["eos_token_id"] == 2
    assert (grok2_tok.pad_id, grok2_tok.bos_id) == (0, None)
    assert len(grok2_cases["cases"]) == 8
    for case in grok2_cases["cases"]:
        assert grok2_tok.encode(case["text"]) == case["ids"], case["text"]
        assert grok2_tok.decode(case["ids"]) == case["decoded"]


def test_fixture_chat_template(grok2_tok, grok2_cases):
    assert grok2_tok.chat_prompt("  hi\n") == "Human: hi<|separator|>\n\nAssistant:"
    assert grok2_tok.encode_chat("hi") == grok2_cases["chat_user_hi_generation_prompt"]
    assert grok2_tok.encode_chat("hi")[5] == 1  # <|separator|> is its special id


def test_fixture_special_texts(grok2_tok):
    assert grok2_tok.encode("<|pad|><|separator|><|eos|>") == [0, 1, 2]
    assert grok2_tok.decode([0, 1, 2]) == "<|pad|><|separator|><|eos|>"
    assert grok2_tok.encode("a<|eos") == [100, 63, 127, *grok2_tok.encode("eos")]


def test_fixture_pieces_and_display(grok2_tok_file, grok2_tok):
    n = grok2_tok.vocab_size
    pieces = grok2_tok.pieces(range(n))
    assert len(pieces) == n and all(isinstance(p, str) for p in pieces)
    assert pieces[:3] == ["<|pad|>", "<|separator|>", "<|eos|>"]
    assert pieces[3 + ord("a")] == "a" and pieces[3 + 0xE2] == "\\xe2" and pieces[3 + 0x0A] == "\n"
    assert pieces[284] == " the"
    assert grok2_tok.ids_from_pieces(pieces) == list(range(n))
    assert grok2_tok.display([284, 13, 12, 16]) == ["·the", "↵", "→", "␍"]
    assert grok2_tok.display(range(n)) == [display_piece(p) for p in pieces]
    assert grok2_tok.pieces([3 + 0xE2, 3 + 0x82, 3 + 0xAC]) == ["\\xe2", "\\x82", "\\xac"]
    assert grok2_tok.decode([3 + 0xE2, 3 + 0x82, 3 + 0xAC]) == "€"
    with pytest.raises(IndexError):
        grok2_tok.pieces([n])
    with pytest.raises(IndexError):
        grok2_tok.pieces([-1])
    with pytest.raises(IndexError):
        grok2_tok.decode([n])
    with pytest.raises(ValueError, match="no token has the piece"):
        grok2_tok.ids_from_pieces(["not a piece"])
    data = grok2_tok_file.read_bytes()
    assert grok2_tok.format == "tiktoken-json"
    assert grok2_tok.identity() == {"path": str(grok2_tok_file.resolve()), "sha256": hashlib.sha256(data).hexdigest(),
                                    "vocab_size": n, "format": "tiktoken-json"}


def test_json_content_is_found_under_any_name(grok2_tok_file, tmp_path):
    other = tmp_path / "tokenizer.bin"
    other.write_bytes(grok2_tok_file.read_bytes())
    assert Tokenizer(other).format == "tiktoken-json"


# The SentencePiece path.

def test_sentencepiece_model():
    path = default_model_dir() / "tokenizer.model"
    tok = Tokenizer(path)
    assert tok.format == "sentencepiece"
    assert (tok.pad_id, tok.bos_id, tok.eos_id) == (0, 1, 2)
    assert tok.identity() == {"path": str(path.resolve()), "sha256": hashlib.sha256(path.read_bytes()).hexdigest(),
                              "vocab_size": tok.vocab_size}
    text = "def mean(xs):\n    return sum(xs) / len(xs)\n"
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    pieces = tok.pieces(range(tok.vocab_size))
    sp = sentencepiece.SentencePieceProcessor(model_file=str(path))
    assert pieces == [sp.id_to_piece(i) for i in range(tok.vocab_size)]
    assert tok.ids_from_pieces(tok.pieces(ids)) == ids
    assert tok.display(ids) == [display_piece(p) for p in tok.pieces(ids)]
    with pytest.raises(IndexError):
        tok.pieces([tok.vocab_size])
    with pytest.raises(IndexError):
        tok.pieces([-1])
    with pytest.raises(TokenizerError, match="no chat template"):
        tok.chat_prompt("hi")
    with pytest.raises(TokenizerError, match="no chat template"):
        tok.encode_chat("hi")


def test_sentencepiece_errors_unchanged(tmp_path):
    text_file = tmp_path / "notes.txt"
    text_file.write_text("root:x:0:0:root:/root:/bin/bash\n")
    with pytest.raises(TokenizerError) as e:
        Tokenizer(text_file)
    assert str(e.value) == (f"{text_file}: not a SentencePiece model (it does not parse as a SentencePiece "
                            f"ModelProto)")
    with pytest.raises(TokenizerError) as e:
        Tokenizer(tmp_path)
    assert str(e.value) == f"{tmp_path}: is a directory, not a SentencePiece model file"
    empty = tmp_path / "tokenizer.model"
    empty.write_bytes(b"")
    with pytest.raises(TokenizerError) as e:
        Tokenizer(empty)
    assert str(e.value) == f"{empty}: not a SentencePiece model (the file is empty)"
    with pytest.raises(FileNotFoundError, match="tokenizer model not found"):
        Tokenizer(tmp_path / "absent.model")
    not_json = tmp_path / "brace.model"
    not_json.write_text("{ not json")
    with pytest.raises(TokenizerError, match="not a SentencePiece model"):
        Tokenizer(not_json)


# Malformed tiktoken JSON.

@pytest.fixture(scope="module")
def small_tok_dict() -> dict:
    return train_tok_json(["hello world, hello there"], 270)


def _without(d: dict, key: str) -> dict:
    return {k: v for k, v in d.items() if k != key}


def _edit_regular(d: dict, edit) -> dict:
    out = json.loads(json.dumps(d))
    edit(out["regular_tokens"])
    return out


BAD = {
    "not JSON": ("{ oops", "does not parse as JSON: "),
    "a list": ("[1, 2]", "the JSON is list, not an object"),
    "no regular_tokens": ('{"vocab": {}}', 'a JSON file without the key "regular_tokens"'),
    "empty": ("", "not a tiktoken JSON tokenizer (the file is empty)"),
    "no special_tokens": (lambda d: _without(d, "special_tokens"), 'no "special_tokens" key'),
    "no word_split": (lambda d: _without(d, "word_split"), 'no "word_split" key'),
    "word_split V2": (lambda d: {**d, "word_split": "V2"}, "word_split 'V2' is not supported (only \"V1\")"),
    "tokens not a list": (lambda d: {**d, "regular_tokens": {}}, '"regular_tokens" is dict, not a list'),
    "entry not an object": (lambda d: _edit_regular(d, lambda r: r.__setitem__(4, [1])),
                            'regular_tokens[4] is not an object with "bytes" and "token"'),
    "byte out of range": (lambda d: _edit_regular(d, lambda r: r[4].__setitem__("bytes", [256])),
                          'regular_tokens[4]: "bytes" is not a non-empty list of integers 0..255'),
    "bytes a string": (lambda d: _edit_regular(d, lambda r: r[4].__setitem__("bytes", "AA==")),
                       'regular_tokens[4]: "bytes" is not a non-empty list of integers 0..255'),
    "negative id": (lambda d: _edit_regular(d, lambda r: r[4].__setitem__("token", -5)),
                    'regular_tokens[4]: "token" is not a non-negative integer (got -5)'),
    "duplicate id": (lambda d: _edit_regular(d, lambda r: r[4].__setitem__("token", 0)),
                     "token id 0 appears twice (regular_tokens[4] and special_tokens[0])"),
    "gap": (lambda d: _edit_regular(d, lambda r: r[-1].__setitem__("token", 400)),
            "token ids do not run 0..269 without gaps (id 269 is missing, the largest is 400)"),
    "duplicate bytes": (lambda d: _edit_regular(d, lambda r: r[-1].__setitem__("bytes", [104])),
                        "regular_tokens[266] repeats the bytes b'h' of token id 107"),
    "vocab_size": (lambda d: {**d, "vocab_size": 300}, "vocab_size is 300 but the file holds 270 tokens"),
    "missing byte": (lambda d: _edit_regular(d, lambda r: r[0x41].__setitem__("bytes", [0x41, 0x41, 0x41])),
                     "regular_tokens lack 1 single byte(s) that UTF-8 text can hold (0x41)"),
    "special not UTF-8": (lambda d: {**d, "special_tokens": [*d["special_tokens"][:2], {"bytes": [0xFF],
                                                                                          "token": 2}]},
                          "special_tokens[2]: its bytes b'\\xff' are not UTF-8 text"),
    "no eos": (lambda d: {**d, "special_tokens": [*d["special_tokens"][:2], {"bytes": list(b"<|end|>"),
                                                                             "token": 2}]},
               "no <|eos|> special token"),
    "bad pat_str": (lambda d: {**d, "pat_str": "("}, "tiktoken refuses it (Parsing error"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_tok_json_is_refused_in_one_line(case, small_tok_dict, tmp_path):
    content, problem = BAD[case]
    path = tmp_path / "tokenizer.tok.json"
    path.write_text(content if isinstance(content, str) else json.dumps(content(small_tok_dict)))
    with pytest.raises(TokenizerError) as e:
        Tokenizer(path)
    message = str(e.value)
    assert message.startswith(f"{path}: ") and problem in message, message
    assert "\n" not in message and e.value.path == path


def test_directory_named_json(tmp_path):
    directory = tmp_path / "tokenizer.tok.json"
    directory.mkdir()
    with pytest.raises(TokenizerError, match="is a directory, not a tiktoken JSON tokenizer file"):
        Tokenizer(directory)


# Training.

def _stdlib_texts(limit: int) -> list[str]:
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    texts, total = [], 0
    for path in sorted(stdlib.glob("*.py")):
        texts.append(path.read_text(encoding="utf-8", errors="replace"))
        total += len(texts[-1])
        if total >= limit:
            break
    return texts


MIXED = [
    "The quick brown fox jumps over the lazy dog. Naïve café, déjà vu; 3,14 % près.",
    "emoji 🙂🚀 and combining é, RTL שלום, CJK 你好世界, Greek αβγ, math ∑∫√",
    "tabs\tand  double  spaces\r\nand 1234567890 digits\n\n\n",
    "Human: hi<|separator|>\n\nAssistant: hello<|eos|>",
    "def mean(xs):\n    return sum(xs) / len(xs)\n",
]


def test_trained_tokenizer_round_trips(tmp_path):
    texts = _stdlib_texts(400_000)
    d = train_tok_json(texts + MIXED, 1024)
    assert d["vocab_size"] == 1024 and list(d) == ["regular_tokens", "special_tokens", "word_split", "vocab_size"]
    assert d["special_tokens"] == [{"bytes": list(s.encode()), "token": i}
                                   for i, s in enumerate(["<|pad|>", "<|separator|>", "<|eos|>"])]
    assert d["regular_tokens"][:256] == [{"bytes": [b], "token": b + 3} for b in range(256)]
    assert [t["token"] for t in d["regular_tokens"]] == list(range(3, 1024))
    assert all(len(t["bytes"]) > 1 for t in d["regular_tokens"][256:])
    path = write_tok_json(d, tmp_path / "tokenizer.tok.json")
    tok = Tokenizer(path)
    assert tok.vocab_size == 1024 and tok.eos_id == 2
    held_out = ["Ünïcödé ½ — “quoted” ‘text’ 🙂 ok", "x = {'a': [1, 2, 3]}  # comment\r\n",
                "\u200b\u00a0 nbsp", ""]
    for text in MIXED + held_out + texts[:3]:
        ids = tok.encode(text)
        assert tok.decode(ids) == text
    assert tok.encode("<|eos|>") == [2]
    assert len(tok.encode(texts[0])) < len(texts[0].encode()) / 2  # the merges compress the training text
    assert tok.encode_chat("hi") == [*tok.encode("Human: hi"), 1, *tok.encode("\n\nAssistant:")]


def _brute_force_merges(text: str, k: int) -> list[bytes]:
    """The first k BPE merges of `text`, recounting every pair of every word occurrence at each step."""
    words = [[bytes([b]) for b in w.encode()] for w in regex.findall(V1_PATTERN, text)]
    merges = []
    for _ in range(k):
        counts = {}
        for w in words:
            for i in range(len(w) - 1):
                counts[(w[i], w[i + 1])] = counts.get((w[i], w[i + 1]), 0) + 1
        if not counts:
            break
        best = max(counts.values())
        left, right = min(p for p, c in counts.items() if c == best)
        merges.append(left + right)
        for j, w in enumerate(words):
            out, i = [], 0
            while i < len(w):
                if i + 1 < len(w) and w[i] == left and w[i + 1] == right:
                    out.append(left + right)
                    i += 2
                else:
                    out.append(w[i])
                    i += 1
            words[j] = out
    return merges


def test_first_merges_match_brute_force():
    text = ("the cat sat on the mat; the bat ate the rat. Is that a hat? aaaa aaa\n"
            "the theme: then, there, these, 2024 and 4096 tokens\tand\tthe end\n")
    pairs = {}
    for w in regex.findall(V1_PATTERN, text):
        b = w.encode()
        for i in range(len(b) - 1):
            pairs[b[i:i + 2]] = pairs.get(b[i:i + 2], 0) + 1
    most = max(pairs.values())
    first = min(p for p, c in pairs.items() if c == most)
    d = train_tok_json([text], 259 + 20)
    trained = [bytes(t["bytes"]) for t in d["regular_tokens"][256:]]
    assert trained[0] == first
    expected = list(dict.fromkeys(_brute_force_merges(text, 40)))[:len(trained)]
    assert trained == expected


def test_training_stops_when_pairs_run_out():
    d = train_tok_json(["ab ab"], 1000)
    assert [bytes(t["bytes"]) for t in d["regular_tokens"][256:]] == [b"ab", b" ab"]
    assert d["vocab_size"] == 261


def test_training_refuses_tiny_vocab_and_bad_dicts(tmp_path, small_tok_dict):
    with pytest.raises(ValueError, match="vocab_size: expected >= 259"):
        train_tok_json(["x"], 258)
    path = tmp_path / "bad.tok.json"
    with pytest.raises(TokenizerError, match='word_split'):
        write_tok_json({**small_tok_dict, "word_split": "V9"}, path)
    assert not path.exists()


def test_training_a_few_megabytes_is_quick():
    import time

    texts = _stdlib_texts(3_000_000)
    start = time.perf_counter()
    d = train_tok_json(texts, 4096)
    assert d["vocab_size"] == 4096
    assert time.perf_counter() - start < 60
