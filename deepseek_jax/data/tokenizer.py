"""A thin wrapper over a HuggingFace `tokenizers.Tokenizer` (tokenizer.json).

The project ships a character-level tokenizer (`default_tokenizer()`, built by
`build_tokenizer.py`) so the default job needs no download; users may point
`load_tokenizer(path)` at any HF `tokenizer.json` instead (DeepSeek-V3's own
included). The wrapper adds what the data pipeline needs: explicit BOS/EOS, and
the pad/bos/eos ids looked up by name, trying the spellings of common tokenizers.
"""

from __future__ import annotations

import os
import pathlib
from typing import Iterable, Sequence

import tokenizers

from deepseek_jax.data.build_tokenizer import ASSET_PATH

# Names tried, in order, for each role when a tokenizer.json is loaded.
_ROLE_NAMES = {
    "pad": ("<pad>", "<｜▁pad▁｜>", "[PAD]", "<|pad|>", "<|padding|>"),
    "bos": ("<bos>", "<｜begin▁of▁sentence｜>", "<s>", "[CLS]", "<|begin_of_text|>",
            "<|endoftext|>"),
    "eos": ("<eos>", "<｜end▁of▁sentence｜>", "</s>", "[SEP]", "<|end_of_text|>",
            "<|endoftext|>"),
    # Fill-in-the-middle (PSM: begin prefix hole suffix end middle): ours,
    # DeepSeek's, StarCoder's prefix/suffix/middle spellings.
    "fim_begin": ("<fim_begin>", "<｜fim▁begin｜>", "<|fim_begin|>", "<fim_prefix>"),
    "fim_hole": ("<fim_hole>", "<｜fim▁hole｜>", "<|fim_hole|>", "<fim_suffix>"),
    "fim_end": ("<fim_end>", "<｜fim▁end｜>", "<|fim_end|>", "<fim_middle>"),
}


class Tokenizer:
    """encode/decode plus the ids of <pad>, <bos>, <eos>.

    Args:
      hf: the wrapped `tokenizers.Tokenizer`.
      pad_token, bos_token, eos_token: token strings for each role; None looks
        the role up among common spellings. A tokenizer without any pad token
        pads with its eos id (padding is masked out by segment_ids anyway).
    """

    def __init__(self, hf: tokenizers.Tokenizer, *, pad_token: str | None = None,
                 bos_token: str | None = None, eos_token: str | None = None):
        self.hf = hf
        self.bos_id = self._role_id("bos", bos_token)
        self.eos_id = self._role_id("eos", eos_token)
        try:
            self.pad_id = self._role_id("pad", pad_token)
        except ValueError:
            if pad_token is not None:
                raise
            self.pad_id = self.eos_id

    def _role_id(self, role: str, token: str | None) -> int:
        names = _ROLE_NAMES[role] if token is None else (token,)
        for name in names:
            i = self.hf.token_to_id(name)
            if i is not None:
                return i
        raise ValueError(f"{role}_token: none of {names} is in the vocabulary; pass "
                         f"{role}_token=<the tokenizer's {role} token string>")

    def fim_ids(self) -> tuple[int, int, int]:
        """Ids of the FIM tokens (begin, hole, end) for pipeline.fim_transform;
        ValueError naming the spellings tried when the vocabulary lacks one."""
        try:
            return tuple(self._role_id(role, None)
                         for role in ("fim_begin", "fim_hole", "fim_end"))
        except ValueError as e:
            raise ValueError(f"the tokenizer has no fill-in-the-middle tokens ({e}); use a "
                             "tokenizer that defines them, or fim_rate=0") from None

    @property
    def vocab_size(self) -> int:
        """Number of ids, added tokens included (model embeddings need >= this)."""
        return self.hf.get_vocab_size(with_added_tokens=True)

    def id_of(self, token: str) -> int:
        """The id of one token string; ValueError if it is not a single token."""
        i = self.hf.token_to_id(token)
        if i is None:
            raise ValueError(f"token={token!r} is not in the vocabulary "
                             f"(vocab_size={self.vocab_size})")
        return i

    def encode(self, text: str, add_bos: bool = False, add_eos: bool = False) -> list[int]:
        ids = self.hf.encode(text, add_special_tokens=False).ids
        return ([self.bos_id] if add_bos else []) + ids + ([self.eos_id] if add_eos else [])

    def encode_batch(self, texts: Sequence[str], add_bos: bool = False,
                     add_eos: bool = False) -> list[list[int]]:
        """encode() over many texts at once (runs in parallel inside `tokenizers`)."""
        head, tail = [self.bos_id] if add_bos else [], [self.eos_id] if add_eos else []
        return [head + e.ids + tail
                for e in self.hf.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids: Iterable[int], skip_special: bool = False) -> str:
        """Text of ids; skip_special drops tokens marked special (<pad>, <bos>, ...)."""
        return self.hf.decode([int(i) for i in ids], skip_special_tokens=skip_special)


def load_tokenizer(path: str | os.PathLike, **role_tokens: str | None) -> Tokenizer:
    """Loads a HuggingFace tokenizer.json; role_tokens as in `Tokenizer`."""
    path = pathlib.Path(path)
    if path.is_dir():
        raise ValueError(f"tokenizer file {str(path)!r} is a directory; pass the path of the "
                         "HuggingFace tokenizer.json in it")
    if not path.is_file():
        raise FileNotFoundError(f"tokenizer file {str(path)!r} does not exist; pass the "
                                "path of a HuggingFace tokenizer.json")
    try:
        hf = tokenizers.Tokenizer.from_file(str(path))
    except Exception as e:  # tokenizers raises a bare Exception on bad JSON
        raise ValueError(f"tokenizer file {str(path)!r} is not a valid HuggingFace "
                         f"tokenizer.json: {e}") from e
    try:
        return Tokenizer(hf, **role_tokens)
    except ValueError as e:  # a role token it lacks
        raise ValueError(f"tokenizer file {str(path)!r}: {e}") from None


def default_tokenizer() -> Tokenizer:
    """The shipped character-level tokenizer (see build_tokenizer.py)."""
    return load_tokenizer(ASSET_PATH)
