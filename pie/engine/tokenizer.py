"""The model's tokenizer: from GGUF metadata or a tokenizer.json, plus its chat template's text.

The template is only carried here; pie.runtime.chat_template, the one
renderer, renders it (`render_for(tokenizer, messages)`).

Encoding is delegated to the `tokenizers` library. For GGUF SentencePiece
vocabularies (`tokenizer.ggml.model = llama`: Llama 2, Gemma) we build a BPE
with byte fallback whose merges come from the pieces' scores, which is how
llama.cpp's SPM tokenizer merges (the best-scoring adjacent pair first). For
GGUF byte-level BPE vocabularies we build the pipeline ourselves, with the pre-tokenizer that
llama.cpp uses for the model's `tokenizer.ggml.pre` (transformers' GGUF path
drops e.g. SmolLM2's digit split and then disagrees with llama.cpp on text
with digits). Decoding goes through our own id -> bytes table, so partial
UTF-8 sequences and special tokens decode the same way for every format.
"""

from __future__ import annotations

import json
import os

from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers
from tokenizers import Tokenizer as HFTokenizer
from zope.interface import implementer

from pie.interfaces import ITokenizer, PieError

# Pre-tokenizer split patterns of llama.cpp's named pre-tokenizers.
LLAMA3_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
QWEN2_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
END_MARKERS = ("<|im_end|>", "<|eot_id|>", "<|eom_id|>", "<|end_of_text|>", "<|endoftext|>", "</s>")

GGUF_NORMAL, GGUF_UNKNOWN, GGUF_CONTROL, GGUF_USER_DEFINED, GGUF_UNUSED, GGUF_BYTE = (
    1,
    2,
    3,
    4,
    5,
    6,
)
SPM_SPACE = "\u2581"


def _byte_level_alphabet() -> dict[str, int]:
    """GPT-2's printable stand-in character for each byte, inverted (char -> byte)."""
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    chars = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return {chr(c): b for b, c in zip(printable, chars, strict=True)}


BYTE_LEVEL = _byte_level_alphabet()


def _byte_level_bytes(token: str) -> bytes:
    try:
        return bytes(BYTE_LEVEL[ch] for ch in token)
    except KeyError:  # not a byte-level string (e.g. an added token written in plain text)
        return token.encode("utf-8")


def _sentencepiece_bytes(token: str) -> bytes:
    if len(token) == 6 and token.startswith("<0x") and token.endswith(">"):
        return bytes([int(token[3:5], 16)])
    return token.replace("\u2581", " ").encode("utf-8")


@implementer(ITokenizer)
class Tokenizer:
    """ITokenizer over a `tokenizers.Tokenizer`; see the module docstring."""

    def __init__(
        self,
        backend: HFTokenizer,
        *,
        byte_level: bool,
        special_ids: set[int],
        chat_template: str = "",
        bos_token: str = "",
        eos_token: str = "",
        eos_token_ids: list[int] | None = None,
        bos_token_id: int | None = None,
    ):
        self.backend = backend
        self.chat_template = chat_template or ""
        self.bos_token = bos_token
        self.eos_token = eos_token
        vocab = backend.get_vocab(with_added_tokens=True)
        self.vocab_size = max(vocab.values()) + 1 if vocab else 0
        to_bytes = _byte_level_bytes if byte_level else _sentencepiece_bytes
        self._bytes: list[bytes | None] = [None] * self.vocab_size
        for token, i in vocab.items():
            self._bytes[i] = token.encode("utf-8") if i in special_ids else to_bytes(token)
        self.special_ids = special_ids
        ends = list(eos_token_ids or [])
        for marker in END_MARKERS:
            i = vocab.get(marker)
            if i is not None and i in special_ids and i not in ends:
                ends.append(i)
        self.eos_token_ids = ends
        self.bos_token_id = bos_token_id  # what a prompt should start with, if anything

    # ------------------------------------------------------------------ ITokenizer

    def tokenize(self, text: str) -> list[int]:
        if not isinstance(text, str):
            raise PieError(f"tokenize needs a string, got {type(text).__name__}")
        return self.backend.encode(text, add_special_tokens=False).ids

    def detokenize(self, ids: list[int]) -> str:
        return self.token_bytes(ids).decode("utf-8", errors="replace")

    def token_bytes(self, ids: list[int]) -> bytes:
        parts = []
        for i in ids:
            piece = self._bytes[i] if isinstance(i, int) and 0 <= i < self.vocab_size else None
            if piece is None:
                raise PieError(f"unknown token id {i!r} (vocabulary has {self.vocab_size} ids)")
            parts.append(piece)
        return b"".join(parts)

    def vocabs(self) -> tuple[list[int], list[bytes]]:
        ids = [i for i, b in enumerate(self._bytes) if b is not None and i not in self.special_ids]
        return ids, [self._bytes[i] for i in ids]

    def token_table(self) -> tuple[list[bytes | None], frozenset[int]]:
        return list(self._bytes), frozenset(self.special_ids)

    # ------------------------------------------------------------------ construction

    @classmethod
    def from_gguf_metadata(cls, meta: dict) -> Tokenizer:
        """From GGUF `tokenizer.*` metadata (values already decoded to Python)."""
        kind = meta.get("tokenizer.ggml.model")
        if kind == "llama":
            return cls._from_gguf_sentencepiece(meta)
        if kind != "gpt2":
            raise PieError(
                f"GGUF tokenizer model {kind!r} is not supported (byte-level BPE 'gpt2' and "
                "SentencePiece 'llama' are); serve the model from a Hugging Face folder with "
                "tokenizer.json instead"
            )
        tokens: list[str] = list(meta["tokenizer.ggml.tokens"])
        types = list(meta.get("tokenizer.ggml.token_type", [1] * len(tokens)))
        merges = [tuple(m.split(" ", 1)) for m in meta.get("tokenizer.ggml.merges", [])]
        pre = meta.get("tokenizer.ggml.pre", "default")
        vocab = {t: i for i, t in enumerate(tokens)}
        backend = HFTokenizer(
            models.BPE(vocab, merges, ignore_merges=pre in ("llama-bpe", "llama3"))
        )
        byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
        if pre == "smollm":
            splits = [
                pre_tokenizers.Digits(individual_digits=True),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
            ]
        elif pre in ("llama-bpe", "llama3", "qwen2"):
            pattern = QWEN2_PATTERN if pre == "qwen2" else LLAMA3_PATTERN
            splits = [pre_tokenizers.Split(Regex(pattern), behavior="isolated"), byte_level]
        else:
            splits = [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)]
        backend.pre_tokenizer = pre_tokenizers.Sequence(splits)
        backend.decoder = decoders.ByteLevel()
        return cls._from_gguf_backend(backend, meta, tokens, types, byte_level=True)

    @classmethod
    def _from_gguf_sentencepiece(cls, meta: dict) -> Tokenizer:
        """SentencePiece vocabulary with scores: BPE with byte fallback, merges ranked by score."""
        tokens: list[str] = list(meta["tokenizer.ggml.tokens"])
        scores = list(meta.get("tokenizer.ggml.scores") or [0.0] * len(tokens))
        types = list(meta.get("tokenizer.ggml.token_type", [GGUF_NORMAL] * len(tokens)))
        vocab = {t: i for i, t in enumerate(tokens)}
        unk_id = meta.get("tokenizer.ggml.unknown_token_id")
        unk = tokens[unk_id] if isinstance(unk_id, int) and 0 <= unk_id < len(tokens) else None
        backend = HFTokenizer(
            models.BPE(
                vocab,
                sentencepiece_merges(tokens, scores, types),
                unk_token=unk,
                fuse_unk=True,
                byte_fallback=True,
            )
        )
        steps = []
        if meta.get("tokenizer.ggml.add_space_prefix", True):
            steps.append(normalizers.Prepend(SPM_SPACE))
        steps.append(normalizers.Replace(" ", SPM_SPACE))
        backend.normalizer = normalizers.Sequence(steps)
        backend.decoder = decoders.Sequence(
            [decoders.Replace(SPM_SPACE, " "), decoders.ByteFallback(), decoders.Fuse()]
        )
        return cls._from_gguf_backend(backend, meta, tokens, types, byte_level=False)

    @classmethod
    def _from_gguf_backend(
        cls, backend: HFTokenizer, meta: dict, tokens: list[str], types: list[int], byte_level: bool
    ) -> Tokenizer:
        """Control and user-defined tokens are matched in text; BOS/EOS from the metadata."""
        special = [i for i, t in enumerate(types) if t in (GGUF_CONTROL, GGUF_USER_DEFINED)]
        backend.add_special_tokens(
            [AddedToken(tokens[i], special=True, normalized=False) for i in special]
        )

        def token(key: str) -> str:
            i = meta.get(key)
            return tokens[i] if isinstance(i, int) and 0 <= i < len(tokens) else ""

        ends = [
            meta[k]
            for k in ("tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id")
            if isinstance(meta.get(k), int)
        ]
        bos = meta.get("tokenizer.ggml.bos_token_id")
        add_bos = meta.get("tokenizer.ggml.add_bos_token", not byte_level)
        return cls(
            backend,
            byte_level=byte_level,
            # SentencePiece user-defined pieces are text ("\n\n", "<h1>"): decoded as such
            special_ids=set(special)
            if byte_level
            else {i for i in special if types[i] == GGUF_CONTROL},
            chat_template=meta.get("tokenizer.chat_template", ""),
            bos_token=token("tokenizer.ggml.bos_token_id"),
            eos_token=token("tokenizer.ggml.eos_token_id"),
            eos_token_ids=ends,
            # llama.cpp's rule: the flag when written, else SentencePiece vocabularies add BOS
            bos_token_id=bos if add_bos and isinstance(bos, int) else None,
        )

    @classmethod
    def from_folder(cls, folder: str) -> Tokenizer:
        """From a Hugging Face model folder: tokenizer.json (+ tokenizer_config.json)."""
        path = os.path.join(folder, "tokenizer.json")
        if not os.path.exists(path):
            raise PieError(f"{folder} has no tokenizer.json")
        backend = HFTokenizer.from_file(path)
        with open(path, encoding="utf-8") as f:
            spec = json.load(f)
        config = _read_json(os.path.join(folder, "tokenizer_config.json"))
        special_ids = {t["id"] for t in spec.get("added_tokens", []) if t.get("special")}
        byte_level = "ByteLevel" in json.dumps(spec.get("decoder") or spec.get("pre_tokenizer"))

        def token_text(value) -> str:
            return value.get("content", "") if isinstance(value, dict) else (value or "")

        eos = token_text(config.get("eos_token"))
        ends = []
        for source in (
            _read_json(os.path.join(folder, "generation_config.json")),
            _read_json(os.path.join(folder, "config.json")),
        ):
            value = source.get("eos_token_id")
            for i in value if isinstance(value, list) else [value]:
                if isinstance(i, int) and i not in ends:
                    ends.append(i)
        eos_id = backend.token_to_id(eos) if eos else None
        if eos_id is not None and eos_id not in ends:
            ends.append(eos_id)
        template = config.get("chat_template") or ""
        if isinstance(template, list):  # named templates: take the default one
            template = next((t["template"] for t in template if t.get("name") == "default"), "")
        jinja = os.path.join(folder, "chat_template.jinja")
        if not template and os.path.exists(jinja):
            with open(jinja, encoding="utf-8") as f:
                template = f.read()
        return cls(
            backend,
            byte_level=byte_level,
            special_ids=special_ids,
            chat_template=template,
            bos_token=token_text(config.get("bos_token")),
            eos_token=eos,
            eos_token_ids=ends,
            bos_token_id=_added_prefix(backend),
        )


def _added_prefix(backend: HFTokenizer) -> int | None:
    """The token tokenizer.json's post-processor puts before every text, if any.

    That is what transformers' `tokenizer(text)` prepends (Gemma's and Llama's
    <bos>); Qwen's and SmolLM2's post-processors add nothing.
    """
    plain = backend.encode("a", add_special_tokens=False).ids
    full = backend.encode("a", add_special_tokens=True).ids
    return full[0] if len(full) > len(plain) and full[1 : 1 + len(plain)] == plain else None


def sentencepiece_merges(
    tokens: list[str], scores: list[float], types: list[int]
) -> list[tuple[str, str]]:
    """BPE merges equivalent to SentencePiece's score-driven merging.

    Every normal piece that splits into two normal pieces yields a merge,
    ranked by the merged piece's score (higher first); ties in score go by
    the shorter left part, then by the parts' ids (as transformers'
    generate_merges does, which llama.cpp agrees with on real vocabularies).
    """
    normal = {t: i for i, t in enumerate(tokens) if types[i] == GGUF_NORMAL}
    found = []
    for piece, i in normal.items():
        for cut in range(1, len(piece)):
            left, right = piece[:cut], piece[cut:]
            if left in normal and right in normal:
                found.append((-scores[i], len(left), normal[left], normal[right], left, right))
    found.sort()
    return [(left, right) for *_, left, right in found]


def _read_json(path: str) -> dict:
    if not os.path.exists(path):
        return {}
    with open(path, encoding="utf-8") as f:
        return json.load(f)
