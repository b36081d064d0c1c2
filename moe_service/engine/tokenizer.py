"""Text in and out: a checkpoint's own tokenizer.json, or a byte-level tokenizer for the presets."""

from __future__ import annotations

import codecs
import functools
from pathlib import Path
from typing import Protocol


class Tokenizer(Protocol):
    bos_token_id: int | None
    eos_token_id: int | None

    def encode(self, text: str, add_bos: bool = True) -> list[int]: ...
    def decode(self, ids: list[int]) -> str: ...
    def detokenizer(self) -> "Detokenizer": ...
    def token_bytes(self, token_id: int) -> bytes:
        """The bytes one token stands for (a token may hold part of a UTF-8 character)."""
        ...


class Detokenizer(Protocol):
    def push(self, token_id: int) -> str:
        """The new text this token completes (may be empty mid-character)."""
        ...


class ByteTokenizer:
    """ids 0/1/2 are pad/bos/eos; ids 3..258 are the bytes 0..255; larger ids (a random preset model
    produces them) decode to a visible `<id>` marker."""

    OFFSET = 3

    def __init__(self, vocab_size: int, bos_token_id: int | None = 1, eos_token_id: int | None = 2) -> None:
        self.vocab_size, self.bos_token_id, self.eos_token_id = vocab_size, bos_token_id, eos_token_id

    def encode(self, text: str, add_bos: bool = True) -> list[int]:
        ids = [b + self.OFFSET for b in text.encode("utf-8")]
        if ids and max(ids) >= self.vocab_size:
            raise ValueError(f"this model's vocabulary ({self.vocab_size}) is too small for byte-level text "
                             f"(needs {256 + self.OFFSET}) and it has no tokenizer.json; send token ids instead")
        return ([self.bos_token_id] if add_bos and self.bos_token_id is not None else []) + ids

    def _bytes(self, i: int) -> bytes:
        if self.OFFSET <= i < 256 + self.OFFSET:
            return bytes([i - self.OFFSET])
        if i in (0, self.bos_token_id, self.eos_token_id):
            return b""
        return f"<{i}>".encode()

    def decode(self, ids: list[int]) -> str:
        return b"".join(self._bytes(i) for i in ids).decode("utf-8", errors="replace")

    def detokenizer(self) -> "Detokenizer":
        return _ByteDetokenizer(self)

    def token_bytes(self, token_id: int) -> bytes:
        return self._bytes(token_id)


class _ByteDetokenizer:
    def __init__(self, tok: ByteTokenizer) -> None:
        self.tok = tok
        self.utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, token_id: int) -> str:
        return self.utf8.decode(self.tok._bytes(token_id))


class HFTokenizer:
    """A checkpoint's `tokenizer.json` through the `tokenizers` library (no network)."""

    def __init__(self, path: str | Path, bos_token_id: int | None, eos_token_id: int | None) -> None:
        from tokenizers import Tokenizer as _Tok

        self.tok = _Tok.from_file(str(path))
        self.bos_token_id, self.eos_token_id = bos_token_id, eos_token_id
        self.byte_level = _is_byte_level(self.tok)

    def encode(self, text: str, add_bos: bool = True) -> list[int]:
        ids = self.tok.encode(text, add_special_tokens=False).ids
        return ([self.bos_token_id] if add_bos and self.bos_token_id is not None else []) + ids

    def decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids, skip_special_tokens=True)

    def detokenizer(self) -> "Detokenizer":
        return _StreamDetokenizer(self.tok)

    def token_bytes(self, token_id: int) -> bytes:
        piece = self.tok.id_to_token(token_id)
        if piece is None:
            return b""
        if self.byte_level:  # GPT-2's byte-to-character table, inverted
            table = _unicode_to_byte()
            if all(c in table for c in piece):
                return bytes(table[c] for c in piece)
        return self.tok.decode([token_id], skip_special_tokens=True).encode()


def _is_byte_level(tok) -> bool:
    import json

    decoder = json.loads(tok.to_str()).get("decoder") or {}
    kinds = [decoder.get("type")] + [d.get("type") for d in decoder.get("decoders", [])]
    return "ByteLevel" in kinds


@functools.cache
def _unicode_to_byte() -> dict[str, int]:
    """The inverse of GPT-2's bytes_to_unicode, which byte-level BPE vocabularies are written in."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs)}


class _StreamDetokenizer:
    """`tokenizers`' own incremental decoder: each token costs the same however long the text is."""

    def __init__(self, tok) -> None:
        from tokenizers.decoders import DecodeStream

        self.tok, self.stream = tok, DecodeStream(skip_special_tokens=True)

    def push(self, token_id: int) -> str:
        return self.stream.step(self.tok, token_id) or ""


def load_tokenizer(source: object, args) -> Tokenizer:
    """The checkpoint directory's tokenizer.json when there is one, else the byte tokenizer."""
    from moe_service.checkpoint.sources import checkpoint_dir

    path = checkpoint_dir(source)
    if path is not None and (path / "tokenizer.json").is_file():
        return HFTokenizer(path / "tokenizer.json", args.bos_token_id, args.eos_token_id)
    return ByteTokenizer(args.vocab_size, args.bos_token_id, args.eos_token_id)
