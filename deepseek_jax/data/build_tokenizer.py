"""Builds the shipped character-level tokenizer (assets/tokenizer.json).

    python -m deepseek_jax.data.build_tokenizer        # rewrites the asset

The vocabulary is fixed by construction, so the output is byte-identical on
every run (tests compare it with the committed file):

    ids 0..10   special tokens, each one id:  <pad> <bos> <eos> <unk>
                <think> </think> <answer> </answer>
                <fim_begin> <fim_hole> <fim_end>
    ids 11..    newline, then printable ASCII 32 (space) .. 126 (~)

It is a HuggingFace `tokenizers` BPE model with no merges, i.e. one token per
character, with a Fuse decoder so decode(encode(text)) == text. The tags are
"added tokens" so they encode to a single id wherever they appear; <think>,
<answer> and their closers are *not* marked special, so decode(...,
skip_special=True) drops <pad>/<bos>/<eos>/... but keeps the reasoning format.
"""

from __future__ import annotations

import pathlib

from tokenizers import AddedToken, Tokenizer, decoders, models

ASSET_PATH = pathlib.Path(__file__).parent / "assets" / "tokenizer.json"

SPECIAL_TOKENS = ("<pad>", "<bos>", "<eos>", "<unk>")
TAG_TOKENS = ("<think>", "</think>", "<answer>", "</answer>")
FIM_TOKENS = ("<fim_begin>", "<fim_hole>", "<fim_end>")
CHARACTERS = ("\n",) + tuple(chr(c) for c in range(32, 127))


def build() -> Tokenizer:
    """The character-level tokenizer described in the module docstring."""
    tokens = SPECIAL_TOKENS + TAG_TOKENS + FIM_TOKENS + CHARACTERS
    vocab = {t: i for i, t in enumerate(tokens)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tok.decoder = decoders.Fuse()
    tok.add_special_tokens([AddedToken(t, normalized=False)
                            for t in SPECIAL_TOKENS + FIM_TOKENS])
    tok.add_tokens([AddedToken(t, normalized=False, special=False) for t in TAG_TOKENS])
    return tok


def to_json() -> str:
    return build().to_str(pretty=True) + "\n"


def main() -> None:
    ASSET_PATH.parent.mkdir(parents=True, exist_ok=True)
    ASSET_PATH.write_text(to_json(), encoding="utf-8")
    print(f"wrote {ASSET_PATH} ({build().get_vocab_size()} tokens)")


if __name__ == "__main__":
    main()
