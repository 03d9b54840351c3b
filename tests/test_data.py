"""Specification tests for deepseek_jax.data: tasks, tokenizer, packing, batching."""

import json
import re

import numpy as np
import pytest
import tokenizers

from deepseek_jax.data import (
    BatchIterator,
    Document,
    ARITHMETIC_KINDS,
    KINDS,
    Problem,
    R1_TEMPLATE,
    default_tokenizer,
    encode_problem,
    encode_prompt,
    encode_texts,
    extract_answer,
    fim_transform,
    format_completion,
    format_ok,
    format_prompt,
    generate_problems,
    is_correct,
    load_jsonl,
    load_text,
    load_tokenizer,
    make_task_dataset,
    pack_documents,
    solve,
    split_of,
    validate_batch,
)
from deepseek_jax.data import build_tokenizer


@pytest.fixture(scope="module")
def tok():
    return default_tokenizer()


# ----------------------------------------------------------------------------
# tasks.py

_COLUMN = re.compile(r"(\d+)([+\-*])(\d+)([+\-])(\d+)=(-?\d+) -> (\d+)")


@pytest.mark.parametrize("max_digits", [1, 2, 3, 4])
def test_answers_equal_python_eval_of_the_prompt(max_digits):
    for p in generate_problems(300, seed=max_digits, max_digits=max_digits,
                               kinds=ARITHMETIC_KINDS):
        assert p.answer == str(eval(p.prompt)), p


def test_every_worked_column_is_true_arithmetic_and_ends_at_the_answer():
    for p in generate_problems(400, seed=1, max_digits=4, kinds=ARITHMETIC_KINDS):
        lines = p.reasoning.split("\n")
        step_results = []
        for line in lines:
            if line.endswith(":"):  # chain step header "x op y:"
                step_results.append(None)
                continue
            m = _COLUMN.fullmatch(line)
            assert m, line
            lhs = "".join(m.group(1, 2, 3, 4, 5))
            assert eval(lhs) == int(m.group(6)), line
            step_results.append(int(m.group(7)))
        assert step_results[-1] == int(p.answer), p
        # A chain's second header starts from the first step's (stripped) result.
        headers = [line for line in lines if line.endswith(":")]
        if headers:
            first = re.match(r"\d+[+\-]\d+", p.prompt).group(0)
            assert headers == [first + ":", f"{eval(first)}{p.prompt[len(first):]}:"], p


def test_hand_worked_examples():
    assert solve("347+58") == Problem(
        "347+58", "7+8+0=15 -> 5\n4+5+1=10 -> 05\n3+0+1=4 -> 405", "405")
    assert solve("405-398") == Problem(
        "405-398", "5-8-0=-3 -> 7\n0-9-1=-10 -> 07\n4-3-1=0 -> 007", "7")
    assert solve("347*8").reasoning.split("\n")[-1] == "0*8+2=2 -> 2776"
    assert solve("99+1").reasoning.split("\n")[-1] == "0+0+1=1 -> 100"
    assert solve("12+7-5").reasoning == (
        "12+7:\n2+7+0=9 -> 9\n1+0+0=1 -> 19\n19-5:\n9-5-0=4 -> 4\n1-0-0=1 -> 14")


@pytest.mark.parametrize("expr", ["3-5", "1+2*3", "3 + 4", "12*34", "a+b", "1+2+3+4"])
def test_solve_rejects_what_it_cannot_work(expr):
    with pytest.raises(ValueError, match="expression="):
        solve(expr)


def test_generation_is_deterministic_in_the_seed():
    a = generate_problems(200, seed=7, kinds=KINDS)
    assert a == generate_problems(200, seed=7, kinds=KINDS)
    assert a != generate_problems(200, seed=8, kinds=KINDS)
    assert len({p.prompt for p in a}) == 200  # distinct within a call


def test_train_and_test_never_share_a_prompt():
    train = {p.prompt for s in range(3) for p in generate_problems(2000, seed=s, max_digits=2)}
    test = {p.prompt for s in range(3) for p in generate_problems(200, seed=s, split="test",
                                                                 max_digits=2)}
    assert train and test and not train & test
    assert {split_of(x) for x in test} == {"test"}


def test_test_split_is_about_ten_percent_of_the_prompt_space():
    prompts = [f"{a}+{b}" for a in range(100) for b in range(100)]
    share = np.mean([split_of(x) == "test" for x in prompts])
    assert 0.08 < share < 0.12


def test_max_digits_bounds_every_operand():
    for p in generate_problems(300, seed=0, max_digits=2, kinds=ARITHMETIC_KINDS):
        assert all(len(n) <= 2 for n in re.findall(r"\d+", p.prompt)), p


def test_exhausted_split_raises_with_the_fix():
    with pytest.raises(ValueError, match="raise max_digits"):
        generate_problems(50, seed=0, split="test", max_digits=1, kinds=("add",))
    with pytest.raises(ValueError, match="split="):
        generate_problems(5, seed=0, split="valid")
    with pytest.raises(ValueError, match="kinds="):
        generate_problems(5, seed=0, kinds=("div",))


def test_uniform_kind_mix_gives_each_kind_its_share_and_exhausts_small_spaces():
    """kind_mix="uniform": a third of the problems per kind; "mul" at
    max_digits=2 (the train split of the 900 prompts a*d, a < 100, d 1-9,
    enumerated here) is used up, then repeated; "distinct" is generate_problems."""
    from deepseek_jax.data.tasks import kind_of, mixed_problems
    mul_space = {f"{a}*{d}" for a in range(100) for d in range(1, 10)
                 if split_of(f"{a}*{d}") == "train"}
    got = mixed_problems(3001, seed=0, max_digits=2, kind_mix="uniform")
    assert got == mixed_problems(3001, seed=0, max_digits=2, kind_mix="uniform")
    by_kind = {k: [p for p in got if kind_of(p) == k] for k in ("add", "sub", "mul")}
    assert [len(v) for v in by_kind.values()] == [1001, 1000, 1000]
    assert {p.prompt for p in by_kind["mul"]} == mul_space        # every one, then repeats
    assert len({p.prompt for p in by_kind["add"]}) == 1001        # room to stay distinct
    assert all(split_of(p.prompt) == "train" and p == solve(p.prompt) for p in got)
    assert len({kind_of(p) for p in got[:30]}) == 3               # shuffled, not in blocks
    assert mixed_problems(300, seed=4, max_digits=2) == generate_problems(300, seed=4,
                                                                           max_digits=2)
    with pytest.raises(ValueError, match="kind_mix='even' must be one of"):
        mixed_problems(10, seed=0, kind_mix="even")


def test_prompt_templates_are_exact():
    p = solve("3+4")
    assert format_prompt(p) == "User: 3+4\nAssistant:"
    r1 = format_prompt(p, "r1")
    assert r1 == R1_TEMPLATE.replace("{prompt}", "3+4")
    assert r1.startswith("A conversation between User and Assistant.")
    assert r1.endswith("User: 3+4. Assistant:")
    assert format_completion(p) == " <think>3+4+0=7 -> 7</think> <answer>7</answer>"
    with pytest.raises(ValueError, match="template="):
        format_prompt(p, "long")


def test_rule_based_rewards_on_hand_written_completions():
    p = solve("20+22")
    good = " <think>0+2+0=2 -> 2\n2+2+0=4 -> 42</think> <answer>42</answer>"
    assert format_ok(good) and is_correct(good, p) and extract_answer(good) == "42"
    assert format_ok(format_completion(p)) and is_correct(format_completion(p), p)
    wrong = "<think>x</think><answer> 41 </answer>"
    assert format_ok(wrong) and not is_correct(wrong, p) and extract_answer(wrong) == "41"
    assert not format_ok("<answer>42</answer>") and is_correct("<answer>42</answer>", p)
    assert not format_ok("<think>a</think> <answer>42</answer> <answer>42</answer>")
    assert not format_ok("<think>a</think> <answer> </answer>")
    assert not format_ok("<think>a <think>b</think> <answer>42</answer>")
    assert not format_ok("so <think>a</think> <answer>42</answer>")
    assert extract_answer("<answer>1</answer><answer>2</answer>") == "1"
    assert extract_answer("<answer><answer>3</answer>") == "3"
    assert extract_answer("<think>no answer</think>") is None
    assert not is_correct("<answer>042</answer>", p)


# ----------------------------------------------------------------------------
# tokenizer.py


def test_vocabulary_is_specials_then_one_id_per_character(tok):
    specials = ["<pad>", "<bos>", "<eos>", "<unk>", "<think>", "</think>", "<answer>",
                "</answer>", "<fim_begin>", "<fim_hole>", "<fim_end>"]
    assert [tok.id_of(s) for s in specials] == list(range(11))
    assert (tok.pad_id, tok.bos_id, tok.eos_id) == (0, 1, 2)
    chars = ["\n"] + [chr(c) for c in range(32, 127)]
    assert tok.vocab_size == 11 + len(chars) == 107
    ids = [tok.encode(c) for c in chars]
    assert all(len(i) == 1 for i in ids)
    assert sorted(i[0] for i in ids) == list(range(11, 107))
    for s in specials:
        assert tok.encode(f"a{s}b") == [tok.id_of("a"), tok.id_of(s), tok.id_of("b")]


@pytest.mark.parametrize("template", ["short", "r1"])
def test_task_text_round_trips_exactly(tok, template):
    for p in generate_problems(200, seed=3, kinds=KINDS):
        text = format_prompt(p, template) + format_completion(p)
        ids = tok.encode(text, add_bos=True, add_eos=True)
        assert ids[0] == tok.bos_id and ids[-1] == tok.eos_id
        assert tok.id_of("<unk>") not in ids
        assert tok.decode(ids) == "<bos>" + text + "<eos>"
        assert tok.decode(ids, skip_special=True) == text


def test_skip_special_keeps_reasoning_tags_and_unknown_chars_become_unk(tok):
    ids = [tok.pad_id, tok.bos_id] + tok.encode("<think>1</think>") + [tok.eos_id]
    assert tok.decode(ids, skip_special=True) == "<think>1</think>"
    assert tok.encode("é\t") == [tok.id_of("<unk>")] * 2


def test_shipped_asset_is_what_the_build_script_writes():
    assert build_tokenizer.ASSET_PATH.read_text(encoding="utf-8") == build_tokenizer.to_json()


def test_load_tokenizer_names_the_path_of_a_missing_or_malformed_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.json"):
        load_tokenizer(tmp_path / "nope.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="bad.json.*not a valid"):
        load_tokenizer(bad)


def test_load_tokenizer_accepts_another_hf_tokenizer(tmp_path):
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, "hello": 3, "world": 4}
    hf = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="<unk>"))
    hf.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    path = tmp_path / "tokenizer.json"
    hf.save(str(path))
    other = load_tokenizer(path)
    assert (other.bos_id, other.eos_id, other.pad_id) == (1, 2, 2)  # no pad: pads with eos
    assert other.encode("hello world", add_bos=True, add_eos=True) == [1, 3, 4, 2]
    with pytest.raises(ValueError, match="pad_token"):
        load_tokenizer(path, pad_token="<pad>")


# ----------------------------------------------------------------------------
# pipeline.py: documents and packing


def test_encode_problem_is_bos_prompt_completion_eos(tok):
    p = solve("12+7")
    doc = encode_problem(tok, p)
    prompt, completion = format_prompt(p), format_completion(p)
    # Character-level: one id per character, and one per tag.
    n_prompt = 1 + len(prompt)
    n_completion = len(re.sub(r"</?(think|answer)>", "T", completion)) + 1
    assert len(doc.ids) == n_prompt + n_completion
    assert tok.decode(doc.ids) == "<bos>" + prompt + completion + "<eos>"
    assert list(doc.ids[:n_prompt]) == encode_prompt(tok, p)
    assert doc.completion_mask.tolist() == [0.0] * n_prompt + [1.0] * n_completion
    assert doc.ids.dtype == np.int32 and doc.completion_mask.dtype == np.float32


def test_packing_matches_the_hand_computed_example():
    docs = [[1, 10, 11, 2], [1, 12, 2]]  # [b x y e], [b z e]
    b = pack_documents(docs, seq_len=6, pad_id=0)
    np.testing.assert_array_equal(b["tokens"], [[1, 10, 11, 2, 1, 12]])
    np.testing.assert_array_equal(b["targets"], [[10, 11, 2, 1, 12, 2]])
    np.testing.assert_array_equal(b["segment_ids"], [[1, 1, 1, 1, 2, 2]])
    np.testing.assert_array_equal(b["positions"], [[0, 1, 2, 3, 0, 1]])
    np.testing.assert_array_equal(b["loss_mask"], [[1, 1, 1, 0, 1, 1]])
    # With room to spare: the row is padded, padding has segment 0 and no loss.
    b = pack_documents([[1, 12, 2]], seq_len=5, pad_id=0)
    np.testing.assert_array_equal(b["tokens"], [[1, 12, 2, 0, 0]])
    np.testing.assert_array_equal(b["targets"], [[12, 2, 0, 0, 0]])
    np.testing.assert_array_equal(b["segment_ids"], [[1, 1, 1, 0, 0]])
    np.testing.assert_array_equal(b["positions"], [[0, 1, 2, 0, 0]])
    np.testing.assert_array_equal(b["loss_mask"], [[1, 1, 0, 0, 0]])


def test_completion_only_masks_prompt_targets_in_a_hand_computed_row():
    doc = Document(np.int32([1, 20, 21, 30, 31, 2]), np.float32([0, 0, 0, 1, 1, 1]))
    b = pack_documents([doc], seq_len=6, completion_only=True)
    # Targets are 20 21 30 31 2 <pad>: only 30, 31, <eos> are completion.
    np.testing.assert_array_equal(b["loss_mask"], [[0, 0, 1, 1, 1, 0]])
    b = pack_documents([doc], seq_len=6, completion_only=False)
    np.testing.assert_array_equal(b["loss_mask"], [[1, 1, 1, 1, 1, 0]])


def test_packed_rows_reconstruct_every_document_exactly_once():
    rng = np.random.default_rng(0)
    seq_len = 32
    docs = []
    for _ in range(300):
        n = int(rng.integers(2, seq_len + 2))
        ids = rng.integers(3, 100, size=n).astype(np.int32)
        docs.append(Document(ids, (rng.random(n) < 0.5).astype(np.float32)))
    for completion_only in (False, True):
        # pad_id=-1 cannot be confused with a real token in the oracle below.
        b = pack_documents(docs, seq_len, pad_id=-1, completion_only=completion_only)
        found = []
        for r in range(len(b["tokens"])):
            row = list(b["tokens"][r]) + [b["targets"][r][-1]]  # the seq_len + 1 ids
            seg = list(b["segment_ids"][r])
            for s in sorted(set(seg) - {0}):
                where = [i for i in range(seq_len) if seg[i] == s]
                start, stop = where[0], where[-1] + 1
                assert where == list(range(start, stop))  # contiguous
                if stop == seq_len and row[seq_len] != -1:
                    stop += 1  # the document's last token sits in the final target slot
                ids = np.int32(row[start:stop])
                k = next(i for i, d in enumerate(docs) if i not in found
                         and len(d.ids) == len(ids) and (d.ids == ids).all())
                found.append(k)
                assert list(b["positions"][r][where]) == list(range(len(where)))
                expected = [0.0 if t + 1 == len(ids) else
                            docs[k].completion_mask[t + 1] if completion_only else 1.0
                            for t in range(len(where))]
                np.testing.assert_array_equal(b["loss_mask"][r][where], expected)
            pad = [i for i in range(seq_len) if seg[i] == 0]
            assert all(row[i] == -1 and b["loss_mask"][r][i] == 0 for i in pad)
            assert all(b["positions"][r][i] == 0 for i in pad)
        assert sorted(found) == list(range(len(docs)))
        total = sum(len(d.ids) for d in docs)
        assert len(b["tokens"]) < 1.3 * total / (seq_len + 1)  # first fit packs tightly


def test_document_longer_than_a_row_raises_naming_it():
    docs = [[1, 2], list(range(10))]
    with pytest.raises(ValueError, match=r"document 1 has 10 tokens.*seq_len\+1=9.*raise seq_len"):
        pack_documents(docs, seq_len=8)
    with pytest.raises(ValueError, match="document 0 has 1 token"):
        pack_documents([[5]], seq_len=8)
    b = pack_documents([list(range(9))], seq_len=8)  # exactly seq_len + 1 fits
    np.testing.assert_array_equal(b["targets"][0], np.arange(1, 9))
    np.testing.assert_array_equal(b["loss_mask"][0], np.ones(8))


def test_fim_moves_the_middle_to_the_end_and_keeps_every_token():
    fim = (8, 9, 10)
    rng = np.random.default_rng(0)
    doc = Document(np.int32([1] + list(range(20, 40)) + [2]), np.ones(22, np.float32))
    assert fim_transform(doc, rng, rate=0.0, fim_ids=fim) is doc
    for _ in range(20):
        out = fim_transform(doc, rng, rate=1.0, fim_ids=fim).ids.tolist()
        assert out[:2] == [1, 8] and out[-1] == 2 and len(out) == 25
        hole, end = out.index(9), out.index(10)
        prefix, suffix, middle = out[2:hole], out[hole + 1:end], out[end + 1:-1]
        assert prefix + middle + suffix == list(range(20, 40))


# ----------------------------------------------------------------------------
# pipeline.py: batches


def _rows(n_rows=10, seq=4):
    base = np.arange(n_rows * seq, dtype=np.int32).reshape(n_rows, seq)
    return {"tokens": base, "targets": base + 1, "segment_ids": np.ones_like(base),
            "positions": np.tile(np.arange(seq, dtype=np.int32), (n_rows, 1)),
            "loss_mask": np.ones(base.shape, np.float32)}


def test_resumed_iterator_continues_with_the_uninterrupted_batches():
    rows = _rows()
    straight = BatchIterator(rows, 3, seed=5)
    run = [next(straight) for _ in range(12)]  # 3 steps/epoch: crosses 4 epochs
    first = BatchIterator(rows, 3, seed=5)
    for _ in range(7):
        next(first)
    saved = json.loads(json.dumps(first.state()))  # as a checkpoint would store it
    resumed = BatchIterator(rows, 3, seed=5)
    resumed.restore(saved)
    for k in range(7, 12):
        got = next(resumed)
        for key in rows:
            np.testing.assert_array_equal(got[key], run[k][key])
            np.testing.assert_array_equal(BatchIterator(rows, 3, seed=5).batch_at(k)[key],
                                          run[k][key])
    with pytest.raises(ValueError, match="seed"):
        BatchIterator(rows, 3, seed=6).restore(saved)


def test_each_epoch_visits_distinct_rows_in_a_new_order():
    rows = _rows(n_rows=12)
    it = BatchIterator(rows, 4, seed=0)
    orders = []
    for epoch in range(3):
        seen = np.concatenate([it.batch_at(3 * epoch + i)["tokens"][:, 0] for i in range(3)])
        assert sorted(seen) == sorted(rows["tokens"][:, 0])
        orders.append(seen.tolist())
    assert orders[0] != orders[1] != orders[2]
    with pytest.raises(ValueError, match="batch_size=13"):
        BatchIterator(rows, 13, seed=0)


def test_validate_batch_accepts_a_packed_batch_and_names_each_violation(tok):
    b = pack_documents([[1, 50, 2], [1, 60, 61, 2]], seq_len=8)
    validate_batch(b, vocab_size=tok.vocab_size, max_seq_len=8)
    bad = dict(b, tokens=b["tokens"].copy())
    bad["tokens"][0, 3] = 200
    with pytest.raises(ValueError, match=r"tokens'\]\[0, 3\] = 200 .*vocab_size=107"):
        validate_batch(bad, vocab_size=107, max_seq_len=8)
    bad["tokens"][0, 3] = -1
    with pytest.raises(ValueError, match=r"\[0, 3\] = -1"):
        validate_batch(bad, vocab_size=107, max_seq_len=8)
    with pytest.raises(ValueError, match="seq length 8 exceeds the model's max_seq_len=4"):
        validate_batch(b, vocab_size=107, max_seq_len=4)
    with pytest.raises(ValueError, match="dtype int64; expected int32"):
        validate_batch(dict(b, positions=b["positions"].astype(np.int64)), 107, 8)
    with pytest.raises(ValueError, match="missing keys \\['loss_mask'\\]"):
        validate_batch({k: v for k, v in b.items() if k != "loss_mask"}, 107, 8)
    with pytest.raises(ValueError, match="segment_ids'\\] has shape \\(1, 7\\)"):
        validate_batch(dict(b, segment_ids=b["segment_ids"][:, :7]), 107, 8)
    with pytest.raises(ValueError, match="loss_mask"):
        validate_batch(dict(b, loss_mask=b["loss_mask"] * np.nan), 107, 8)


# ----------------------------------------------------------------------------
# pipeline.py: files and the default task


def test_load_jsonl_reads_the_field_and_names_bad_lines(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"text": "a b"}\n\n{"text": "c", "id": 2}\n')
    assert load_jsonl(path) == ["a b", "c"]
    path.write_text('{"text": "a"}\n{"text": \n')
    with pytest.raises(ValueError, match=r"d.jsonl:2: invalid JSON"):
        load_jsonl(path)
    path.write_text('{"text": "a"}\n{"body": "b"}\n')
    with pytest.raises(ValueError, match=r"d.jsonl:2: .*'text'.*\['body'\].*text_field="):
        load_jsonl(path)
    with pytest.raises(FileNotFoundError, match="missing.jsonl"):
        load_jsonl(tmp_path / "missing.jsonl")


def test_load_text_splits_blocks_or_lines_and_names_bad_bytes(tmp_path, tok):
    path = tmp_path / "d.txt"
    path.write_text("one\ntwo\n\n\nthree\n")
    assert load_text(path) == ["one\ntwo", "three"]
    assert load_text(path, per_line=True) == ["one", "two", "three"]
    docs = encode_texts(tok, load_text(path))
    assert tok.decode(docs[0].ids) == "<bos>one\ntwo<eos>"
    path.write_bytes(b"ok\n\xff\n")
    with pytest.raises(ValueError, match=r"d.txt:2: not UTF-8"):
        load_text(path)


def test_task_dataset_packs_train_problems_and_holds_out_test_problems(tok):
    ds = make_task_dataset(tok, n_train=300, n_test=40, seq_len=128, seed=0,
                           completion_only=True)
    rows = ds.train_rows
    validate_batch(rows, tok.vocab_size, 128)
    assert rows["tokens"].shape[1] == 128
    assert int((rows["positions"] == 0).sum() - (rows["segment_ids"] == 0).sum()) == 300
    assert len(ds.test_problems) == 40
    assert {split_of(p.prompt) for p in ds.test_problems} == {"test"}
    # Every supervised target decodes to completion text: the answer tags appear,
    # the prompt's "User:" never does.
    supervised = tok.decode(rows["targets"][rows["loss_mask"] > 0])
    assert supervised.count("<answer>") == 300 and "User:" not in supervised


_NEEDLE = re.compile(r"The pass key is (\d{5})\. Remember it\. (\d{5}) is the pass key\.")


def test_passkey_prompts_hide_one_key_at_every_depth_within_the_length():
    test = generate_problems(60, seed=0, split="test", kinds=("passkey",), context_chars=400)
    train = generate_problems(60, seed=0, split="train", kinds=("passkey",), context_chars=400)
    depths = []
    for p in test + train:
        found = _NEEDLE.findall(p.prompt)
        assert found == [(p.answer, p.answer)], p.prompt      # one needle, the answer twice
        assert p.prompt.endswith(" What is the pass key?") and p.reasoning == ""
        assert len(p.prompt) <= 400 and p.answer.isdigit() and len(p.answer) == 5
        assert format_ok(format_completion(p)) and is_correct(format_completion(p), p)
        # the rest is whole filler sentences
        rest = _NEEDLE.sub("", p.prompt)[: -len(" What is the pass key?")]
        assert {t.strip() + "." for t in rest.split(".") if t.strip()} <= {
            "The grass is green.", "The sky is blue.", "The sun is yellow.", "Here we go.",
            "There and back again."}
        depths.append(p.prompt.index("The pass key") / len(p.prompt))
    # test prompts fill the length up to one filler sentence; training ones vary
    assert all(len(p.prompt) > 400 - 23 for p in test)
    assert min(len(p.prompt) for p in train) < 200
    assert min(depths) < 0.1 and max(depths) > 0.75
    with pytest.raises(ValueError, match="context_chars=50 must be >= 100"):
        generate_problems(2, seed=0, kinds=("add", "passkey"), context_chars=50)


def test_passkey_documents_fill_but_never_overflow_a_row(tok):
    ds = make_task_dataset(tok, n_train=20, n_test=5, seq_len=256, seed=0,
                           kinds=("passkey",), completion_only=True)
    validate_batch(ds.train_rows, tok.vocab_size, 256)
    longest = max(len(encode_problem(tok, p).ids) for p in ds.test_problems)
    assert 256 + 1 - 22 < longest <= 256 + 1             # within one filler sentence
    with pytest.raises(ValueError, match=r"passkey_chars=300 does not fit a row of "
                                         r"seq_len=256.*at most 2\d\d"):
        make_task_dataset(tok, n_train=4, n_test=2, seq_len=256, seed=0,
                          kinds=("add", "passkey"), context_chars=300)


def test_kind_of_recovers_the_kind_each_problem_was_drawn_as():
    from deepseek_jax.data import kind_of
    for kind in KINDS:
        problems = generate_problems(30, seed=1, kinds=(kind,), max_digits=2, context_chars=150)
        assert {kind_of(p) for p in problems} == {kind}


def test_countdown_answers_use_each_number_once_and_reach_the_target():
    """Oracle: Python's eval of the stored answer and of every worked step."""
    from deepseek_jax.data import countdown_correct
    for max_digits in (1, 2):
        for p in generate_problems(200, seed=4, kinds=("countdown",), max_digits=max_digits):
            target, numbers = re.fullmatch(r"make (\d+) with (.+)", p.prompt).groups()
            nums = [int(n) for n in numbers.split()]
            assert nums == sorted(nums) and len(nums) == 3
            assert all(1 <= n < 10 ** max_digits for n in nums)
            assert eval(p.answer) == int(target) < 10 ** (max_digits + 1)
            assert sorted(int(n) for n in re.findall(r"\d+", p.answer)) == nums
            value = None
            for line in p.reasoning.split("\n"):
                left, right = line.split("=")
                assert eval(left) == int(right) >= 0
                assert value is None or left.startswith(str(value))
                value = int(right)
            assert value == int(target)
            assert countdown_correct(p.prompt, p.answer)


@pytest.mark.parametrize("answer,ok", [
    ("8*13+75", True), ("75+13*8", True), ("(8*13)+75", True), (" 75 + 8*13 ", True),
    ("13*8+75", True),
    ("8*13+74", False),                  # wrong value
    ("8*13+75+0", False),                # a number that was not given
    ("8*13", False),                     # 75 unused
    ("8*8+115", False),                  # 8 twice
    ("-8*13+283", False),                # unary minus: not allowed
    ("104+75", False),                   # an intermediate is not a given number
    ("(75+13)/8*...", False), ("8**2", False), ("__import__('os')", False),
    ("8.0*13+75", False), ("", False), (None, False), ("(" * 40 + "8" + ")" * 40, False),
])
def test_countdown_verifier_on_a_table(answer, ok):
    from deepseek_jax.data import countdown_correct
    assert countdown_correct("make 179 with 8 13 75", answer) is ok


def test_countdown_reward_and_exact_match_accept_any_right_expression():
    from deepseek_jax.data import Problem, is_correct
    from deepseek_jax.rl import rewards
    p = Problem(prompt="make 179 with 8 13 75", reasoning="", answer="8*13+75")
    other = " <think>13*8=104</think> <answer>75+13*8</answer>"
    assert is_correct(other, p)
    assert rewards.accuracy(other, {"answer": p.answer, "prompt": p.prompt}) == 1.0
    assert rewards.accuracy(other.replace("75+", "74+"),
                            {"answer": p.answer, "prompt": p.prompt}) == 0.0
    with pytest.raises(ValueError, match="not a countdown prompt"):
        from deepseek_jax.data import countdown_correct
        countdown_correct("179", "1")


# ----------------------------------------------------------------------------
# pipeline.py: parquet, SFT records and load_documents

from deepseek_jax.data.pipeline import (  # noqa: E402
    encode_sft,
    load_documents,
    load_parquet,
    load_records,
)


def test_importing_the_data_package_does_not_load_pyarrow():
    import subprocess
    import sys
    code = "import sys, deepseek_jax.data; assert 'pyarrow' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_load_parquet_round_trips_string_columns(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq
    texts = ["a b", "", "two\nlines", "é ✓ unicode", "x" * 1000]
    path = tmp_path / "d.parquet"
    pq.write_table(pa.table({"text": texts, "n": list(range(5)),
                             "body": pa.array(texts[::-1], pa.large_string()),
                             "cat": pa.array(texts).dictionary_encode()}), path)
    assert load_parquet(path) == texts
    assert load_parquet(str(path), text_field="body") == texts[::-1]
    assert load_parquet(path, "cat") == texts
    assert load_records(path) == texts


def test_load_parquet_names_the_file_and_the_fix(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq
    with pytest.raises(FileNotFoundError, match="missing.parquet"):
        load_parquet(tmp_path / "missing.parquet")
    fake = tmp_path / "fake.parquet"
    fake.write_text('{"text": "a jsonl file, misnamed"}\n')
    with pytest.raises(ValueError, match=r"fake.parquet: not a readable parquet file"):
        load_parquet(fake)
    good = tmp_path / "good.parquet"
    pq.write_table(pa.table({"text": ["abc"] * 100}), good)
    cut = tmp_path / "cut.parquet"
    cut.write_bytes(good.read_bytes()[: good.stat().st_size // 2])  # footer lost
    with pytest.raises(ValueError, match=r"cut.parquet: not a readable parquet file"):
        load_parquet(cut)
    path = tmp_path / "d.parquet"
    pq.write_table(pa.table({"body": ["a"], "n": [1]}), path)
    with pytest.raises(ValueError, match=r"d.parquet: no column 'text'; its columns are "
                                         r"\['body', 'n'\]; pass text_field="):
        load_parquet(path)
    with pytest.raises(ValueError, match=r"d.parquet: column 'n' has type int64, not string"):
        load_parquet(path, text_field="n")
    pq.write_table(pa.table({"text": ["a", "b", None, "d"]}), path)
    with pytest.raises(ValueError, match=r"d.parquet: row 2 \(0-based\) of column 'text' "
                                         r"is null; drop or fill"):
        load_parquet(path)


_SFT_PAIRS = [("User: 12+7\nAssistant:", " <think>2+7</think> <answer>19</answer>"),
              ("Q: the capital of France?\nA:", " Paris."),
              ("Say hi in tags, twice over", " <answer>hi</answer>")]


def _write_records(path, records):
    """A .jsonl/.json (one object per line) or .parquet file of dict records; parquet
    columns are the union of the keys, None where a record lacks one."""
    if path.suffix == ".parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq
        keys = list(dict.fromkeys(k for r in records for k in r))
        pq.write_table(pa.table({k: [r.get(k) for r in records] for k in keys}), path)
    else:
        path.write_text("".join(json.dumps(r) + "\n" for r in records))


@pytest.mark.parametrize("name", ["sft.jsonl", "sft.json", "sft.parquet"])
def test_sft_records_carry_loss_exactly_on_completion_targets(tmp_path, tok, name):
    path = tmp_path / name
    _write_records(path, [{"prompt": p, "completion": c, "id": i}
                          for i, (p, c) in enumerate(_SFT_PAIRS)])
    assert load_records(path) == _SFT_PAIRS
    docs, is_sft = load_documents(tok, [path])
    assert is_sft and len(docs) == 3
    # The oracle, from token ids alone: document = <bos> P C <eos>. Target j of the
    # document is id j+1, so loss sits on j in [len(P), len(P) + len(C)]: the
    # targets C and <eos>. Every document is over half a row, so first fit puts
    # document k alone in row k.
    encoded = [(tok.encode(p), tok.encode(c)) for p, c in _SFT_PAIRS]
    lengths = [2 + len(p) + len(c) for p, c in encoded]
    seq_len = max(lengths) - 1
    assert 2 * min(lengths) > seq_len + 1
    b = pack_documents(docs, seq_len, pad_id=tok.pad_id, completion_only=True)
    assert b["tokens"].shape == (3, seq_len)
    for k, (p, c) in enumerate(encoded):
        doc = [tok.bos_id] + p + c + [tok.eos_id]
        np.testing.assert_array_equal(b["tokens"][k, :len(doc) - 1], doc[:-1])
        expected = np.zeros(seq_len, np.float32)
        expected[len(p):len(p) + len(c) + 1] = 1.0
        np.testing.assert_array_equal(b["loss_mask"][k], expected)
        np.testing.assert_array_equal(b["targets"][k][expected > 0], c + [tok.eos_id])
    # Several documents to a row: the supervised targets are the completions.
    b = pack_documents(docs, 200, pad_id=tok.pad_id, completion_only=True)
    assert b["tokens"].shape[0] == 1
    assert tok.decode(b["targets"][b["loss_mask"] > 0]) == "".join(
        c + "<eos>" for _, c in _SFT_PAIRS)
    # Without completion_only every in-document target counts, prompts included.
    b = pack_documents(docs, seq_len, pad_id=tok.pad_id)
    assert b["loss_mask"].sum() == sum(n - 1 for n in lengths)


def test_encode_sft_matches_encode_problem_for_the_same_text(tok):
    p = solve("12+7")
    [doc] = encode_sft(tok, [(format_prompt(p), format_completion(p))])
    ref = encode_problem(tok, p)
    np.testing.assert_array_equal(doc.ids, ref.ids)
    np.testing.assert_array_equal(doc.completion_mask, ref.completion_mask)
    assert doc.ids.dtype == np.int32 and doc.completion_mask.dtype == np.float32


def test_load_documents_reads_plain_text_of_every_format(tmp_path, tok):
    _write_records(tmp_path / "a.jsonl", [{"text": "one"}, {"text": "two", "prompt": "x"}])
    _write_records(tmp_path / "b.parquet", [{"text": "three"}])
    (tmp_path / "c.txt").write_text("four\nlines\n\nfive\n")
    paths = [tmp_path / n for n in ("a.jsonl", "b.parquet", "c.txt")]
    docs, is_sft = load_documents(tok, paths)
    assert not is_sft
    texts = ["one", "two", "three", "four\nlines", "five"]
    for doc, ref in zip(docs, encode_texts(tok, texts), strict=True):
        np.testing.assert_array_equal(doc.ids, ref.ids)
        np.testing.assert_array_equal(doc.completion_mask, ref.completion_mask)
    # A single path works too; a record with prompt, completion and text is SFT.
    _write_records(tmp_path / "s.jsonl", [{"prompt": "p", "completion": "c", "text": "t"}])
    docs, is_sft = load_documents(tok, tmp_path / "s.jsonl")
    assert is_sft and tok.decode(docs[0].ids) == "<bos>pc<eos>"
    # Other field names.
    _write_records(tmp_path / "q.parquet", [{"q": "1+1=", "a": "2"}])
    assert load_records(tmp_path / "q.parquet", prompt_field="q",
                        completion_field="a") == [("1+1=", "2")]


@pytest.mark.parametrize("ext", [".jsonl", ".parquet"])
def test_a_file_mixing_sft_and_plain_records_is_refused_naming_both(tmp_path, ext):
    path = tmp_path / f"mix{ext}"
    _write_records(path, [{"text": "a"}, {"text": "b"},
                          {"prompt": "p", "completion": "c"}])
    where = (r"line 3\) with plain-text records \('text'; e.g. line 1" if ext == ".jsonl"
             else r"row 2 \(0-based\)\) with plain-text records \('text'; e.g. row 0")
    with pytest.raises(ValueError, match=rf"mix{ext}: mixes SFT records \('prompt' \+ "
                                         rf"'completion'; e.g. {where}.*split it"):
        load_records(path)


def test_bad_records_name_the_line_or_row(tmp_path):
    path = tmp_path / "d.jsonl"
    _write_records(path, [{"prompt": "p", "completion": "c"}, {"prompt": "q"}])
    with pytest.raises(ValueError, match=r"d.jsonl:2: expected a string field 'text' "
                                         r"\(plain text\) or string fields 'prompt' and "
                                         r"'completion' \(SFT\), got fields \['prompt'\]"):
        load_records(path)
    _write_records(path, [{"prompt": "p", "completion": 3}])
    with pytest.raises(ValueError, match=r"d.jsonl:1: field 'completion' is a int"):
        load_records(path)
    path.write_text('{"text": "a"}\n["text"]\n')
    with pytest.raises(ValueError, match=r"d.jsonl:2: expected a JSON object, got list"):
        load_records(path)
    path.write_text('{"text": "a"}\n{"text": \n')
    with pytest.raises(ValueError, match=r"d.jsonl:2: invalid JSON"):
        load_records(path)
    path = tmp_path / "d.parquet"
    _write_records(path, [{"prompt": "p", "completion": "c"}, {"prompt": "q"}])
    with pytest.raises(ValueError, match=r"d.parquet: row 1 \(0-based\): expected .*got "
                                         r"fields \['prompt'\] \(null: \['completion'\]\)"):
        load_records(path)
    _write_records(path, [{"body": "b", "prompt": "p"}])
    with pytest.raises(ValueError, match=r"d.parquet: no column 'text' \(plain text\) nor "
                                         r"columns 'prompt' and 'completion' \(SFT\); its "
                                         r"columns are \['body', 'prompt'\]"):
        load_records(path)
    _write_records(path, [{"prompt": "p", "completion": 1}])
    with pytest.raises(ValueError, match=r"d.parquet: column 'completion' has type int64"):
        load_records(path)


def test_load_documents_refuses_sft_and_plain_files_together(tmp_path, tok):
    _write_records(tmp_path / "plain.jsonl", [{"text": "a"}])
    _write_records(tmp_path / "sft.parquet", [{"prompt": "p", "completion": "c"}])
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(ValueError, match=r"data files mix SFT records \('.*sft.parquet'\) "
                                         r"with plain text \('.*plain.jsonl'\)"):
        load_documents(tok, [tmp_path / "plain.jsonl", tmp_path / "empty.jsonl",
                             tmp_path / "sft.parquet"])
    with pytest.raises(ValueError, match=r"empty.jsonl'\] hold no documents"):
        load_documents(tok, [tmp_path / "empty.jsonl"])
    assert load_records(tmp_path / "empty.jsonl") == []


def test_unknown_extensions_are_refused_naming_the_supported_ones(tmp_path, tok):
    path = tmp_path / "d.csv"
    path.write_text("text\na\n")
    with pytest.raises(ValueError, match=r"d.csv: unknown data file extension '.csv'; "
                                         r"supported: .jsonl or .json .*\.parquet, \.txt"):
        load_records(path)
    with pytest.raises(ValueError, match="unknown data file extension"):
        load_documents(tok, [path])
    plain = tmp_path / "data"
    plain.write_text('{"text": "a"}\n')
    with pytest.raises(ValueError, match=r"extension '\(none\)'.*format="):
        load_records(plain)
    assert load_records(plain, format="jsonl") == ["a"]
    with pytest.raises(ValueError, match=r"format='csv' is not one of"):
        load_records(plain, format="csv")
