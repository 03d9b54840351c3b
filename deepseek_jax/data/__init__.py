"""Data: the shipped tokenizer, the generated arithmetic corpus, packing and batching."""

from deepseek_jax.data.pipeline import (
    BATCH_DTYPES,
    BatchIterator,
    Document,
    TaskDataset,
    encode_problem,
    encode_prompt,
    encode_texts,
    fim_transform,
    load_jsonl,
    load_text,
    make_task_dataset,
    passkey_room,
    pack_documents,
    text_document,
    validate_batch,
)
from deepseek_jax.data.preferences import (
    PreferenceRecord,
    encode_pairs,
    load_preference_files,
    split_pairs,
)
from deepseek_jax.data.prompts import PromptFormat, PromptRecord, load_prompt_files
from deepseek_jax.data.tasks import (
    ARITHMETIC_KINDS,
    DEFAULT_KINDS,
    KINDS,
    R1_TEMPLATE,
    SHORT_TEMPLATE,
    VERIFIABLE_KINDS,
    Problem,
    countdown_correct,
    countdown_problem,
    extract_answer,
    format_completion,
    format_ok,
    format_prompt,
    generate_problems,
    is_correct,
    is_countdown,
    kind_of,
    passkey_problem,
    solve,
    split_of,
)
from deepseek_jax.data.tokenizer import Tokenizer, default_tokenizer, load_tokenizer
