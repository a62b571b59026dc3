"""From records to model rows: special tokens, truncation, word -> sub-token labels, masking, LM
windows, and padding rows into batches of a few bucket lengths.

Why here and not in the loaders: each function is pure (a record, or ids and a numpy Generator, in;
numpy arrays out), so tests check them against independent references one at a time.

Rows (unpadded, int32 arrays of one length T'):
  seq_cls    input_ids, token_type_ids, labels (scalar; float32 for regression)
  token_cls  input_ids, token_type_ids, labels [T'] (-100 but on each word's first sub-token), word_count
  mlm        input_ids (masked), token_type_ids, labels [T'] (-100 but at masked positions)
  clm        input_ids, labels [T'] (the next token)
  seq2seq    input_ids [S'] (source ids + EOS), labels [T'] (target ids + EOS); span corruption's
             (inputs, targets) of flaxen.data.span_corruption make the same rows
`collate` pads rows to the smallest bucket length >= the longest row and to `batch_size` rows,
adds attention_mask and `valid`, and returns the batch contract of flaxen's training loop; each
task (flaxen/tasks/) names the fields its rows carry.
"""
from __future__ import annotations

from typing import Optional, Sequence

import numpy as np

from flaxen.data.tokenizers import Template, Tokenizer
from flaxen.errors import ConfigError

IGNORE_INDEX = -100


def truncate_pair(length_a: int, length_b: int, budget: int) -> tuple[int, int]:
    """Lengths kept of a pair under `budget` tokens, as Hugging Face's `longest_first` strategy: only
    the longer is cut when that suffices, else both to half the budget (the extra one to the second)."""
    if length_a + length_b <= budget:
        return length_a, length_b
    swap = length_a > length_b
    short, long = (length_b, length_a) if swap else (length_a, length_b)
    long = short if short > budget else max(short, budget - short)
    if short + long > budget:
        short = budget // 2
        long = short + budget % 2
    return (long, short) if swap else (short, long)


def _with_template(template: Template, a: Sequence[int], b: Optional[Sequence[int]] = None):
    ids, types, special = [], [], []

    def add_special(parts):
        for token, type_id in parts:
            ids.append(token)
            types.append(type_id)
            special.append(True)

    add_special(template.prefix)
    ids.extend(a)
    types.extend([template.type_a] * len(a))
    special.extend([False] * len(a))
    if b is not None:
        add_special(template.middle)
        ids.extend(b)
        types.extend([template.type_b] * len(b))
        special.extend([False] * len(b))
    add_special(template.suffix)
    return ids, types, special


def single_inputs(tokenizer: Tokenizer, ids: Sequence[int]) -> dict:
    """{input_ids, token_type_ids}: the tokenizer's special tokens around one sequence of ids."""
    all_ids, types, _ = _with_template(tokenizer.single_template, ids)
    return {"input_ids": np.asarray(all_ids, np.int32), "token_type_ids": np.asarray(types, np.int32)}


def classification_inputs(tokenizer: Tokenizer, text: str, text_pair: str, max_length: int) -> tuple[dict, int]:
    """({input_ids, token_type_ids}: [CLS] text [SEP] (text_pair [SEP]) cut to `max_length` tokens
    (longest_first), the untruncated length in tokens with the special tokens)."""
    a = tokenizer.encode(text)
    if text_pair:
        b = tokenizer.encode(text_pair)
        template = tokenizer.pair_template
        keep_a, keep_b = truncate_pair(len(a), len(b), max(max_length - template.num_special, 0))
        ids, types, _ = _with_template(template, a[:keep_a], b[:keep_b])
        full = len(a) + len(b) + template.num_special
    else:
        template = tokenizer.single_template
        ids, types, _ = _with_template(template, a[:max(max_length - template.num_special, 0)])
        full = len(a) + template.num_special
    return {"input_ids": np.asarray(ids, np.int32), "token_type_ids": np.asarray(types, np.int32)}, full


def classification_row(tokenizer: Tokenizer, record: dict, max_length: int, regression: bool) -> dict:
    """[CLS] text [SEP] (text_pair [SEP]) cut to `max_length` tokens (longest_first)."""
    row, _ = classification_inputs(tokenizer, record["text"], record.get("text_pair") or "", max_length)
    row["labels"] = np.float32(record["label"]) if regression else np.int32(record["label"])
    return row


def _word_pieces(tokenizer: Tokenizer, word: str) -> list[int]:
    pieces = tokenizer.word_pieces(word)
    if not pieces:
        if tokenizer.unk_token_id is None:
            raise ValueError(f"word {word!r} has no sub-tokens and the tokenizer has no unknown token")
        pieces = [tokenizer.unk_token_id]
    return pieces


def tagging_inputs(tokenizer: Tokenizer, words: Sequence[str], max_length: int) -> tuple[dict, np.ndarray, int]:
    """Words -> ({input_ids, token_type_ids, word_count}: [CLS] sub-tokens [SEP] cut to `max_length`,
    the position of each kept word's first sub-token, the untruncated length in tokens with the
    special tokens). A word the tokenizer maps to nothing becomes the unknown token, so every word
    keeps a position; words past `max_length` are cut (counted in `word_count`)."""
    template = tokenizer.single_template
    budget = max(max_length - template.num_special, 0)
    ids, firsts, full = [], [], template.num_special
    for word in words:
        pieces = _word_pieces(tokenizer, word)
        full += len(pieces)
        if len(ids) >= budget:
            continue
        firsts.append(len(ids))
        ids.extend(pieces[:budget - len(ids)])
    all_ids, types, _ = _with_template(template, ids)
    row = {"input_ids": np.asarray(all_ids, np.int32), "token_type_ids": np.asarray(types, np.int32),
           "word_count": np.int32(len(words))}
    return row, np.asarray(firsts, np.int64) + len(template.prefix), full


def tagging_row(tokenizer: Tokenizer, record: dict, max_length: int) -> dict:
    """Words -> sub-tokens (`tagging_inputs`); each word's tag id on its first sub-token, -100 on the
    others and on special tokens."""
    row, firsts, _ = tagging_inputs(tokenizer, record["tokens"], max_length)
    labels = np.full(len(row["input_ids"]), IGNORE_INDEX, np.int32)
    labels[firsts] = np.asarray(record["tags"], np.int32)[:len(firsts)]
    row["labels"] = labels
    return row


def pack(sequences: Sequence[Sequence[int]], budget: int) -> list[list[int]]:
    """Consecutive sequences joined greedily into rows of at most `budget` ids; a sequence longer
    than `budget` is split into `budget`-sized pieces, each its own row."""
    rows, current = [], []
    for ids in sequences:
        if not len(ids):
            continue
        if len(ids) > budget:
            if current:
                rows.append(current)
                current = []
            rows.extend(list(ids[start:start + budget]) for start in range(0, len(ids), budget))
        elif len(current) + len(ids) > budget:
            rows.append(current)
            current = list(ids)
        else:
            current.extend(ids)
    if current:
        rows.append(current)
    return rows


def mlm_row(tokenizer: Tokenizer, content: Sequence[int], rng: np.random.Generator, probability: float,
            random_ids: np.ndarray, max_predictions: Optional[int] = None) -> dict:
    """[CLS] content [SEP] with BERT's masking: each content token is chosen with `probability`; a
    chosen token becomes [MASK] (80 %), a random non-special token (10 %) or stays (10 %); labels
    hold the original id at chosen positions and -100 elsewhere. `max_predictions`: at most this
    many chosen tokens per row; a row that drew more keeps a subset of that size drawn from `rng`
    after all other draws (so rows within the cap are as without it), the others restored and
    unlabelled. None: no cap."""
    ids, types, special = _with_template(tokenizer.single_template, content)
    ids = np.asarray(ids, np.int32)
    maskable = ~np.asarray(special, bool)
    chosen = (rng.random(len(ids)) < probability) & maskable
    labels = np.where(chosen, ids, IGNORE_INDEX).astype(np.int32)
    action = rng.random(len(ids))
    masked = ids.copy()
    masked[chosen & (action < 0.8)] = tokenizer.mask_token_id
    replace = chosen & (action >= 0.8) & (action < 0.9)
    masked[replace] = random_ids[rng.integers(0, len(random_ids), len(ids))][replace]
    if max_predictions is not None:
        cap_predictions(ids, masked, labels, max_predictions, rng)
    return {"input_ids": masked, "token_type_ids": np.asarray(types, np.int32), "labels": labels}


def cap_predictions(ids: np.ndarray, masked: np.ndarray, labels: np.ndarray, max_predictions: int,
                    rng: np.random.Generator) -> None:
    """In place: when more than `max_predictions` positions of `labels` are scored (not -100), keeps
    a random subset of `max_predictions` of them (drawn from `rng`) and, at the others, restores
    `masked` to the original `ids` and `labels` to -100. Draws nothing from `rng` otherwise."""
    scored = np.flatnonzero(labels != IGNORE_INDEX)
    if len(scored) <= max_predictions:
        return
    dropped = np.setdiff1d(scored, rng.choice(scored, max_predictions, replace=False))
    masked[dropped] = ids[dropped]
    labels[dropped] = IGNORE_INDEX


def clm_row(stream: np.ndarray, start: int, length: int) -> dict:
    """input_ids = stream[start:start+length], labels = the token after each (-100 past the end)."""
    inputs = stream[start:start + length]
    targets = stream[start + 1:start + length + 1]
    labels = np.full(len(inputs), IGNORE_INDEX, np.int32)
    labels[:len(targets)] = targets
    return {"input_ids": inputs.astype(np.int32), "labels": labels}


def with_eos(tokenizer: Tokenizer, ids: Sequence[int], max_length: int) -> np.ndarray:
    """int32 [min(len(ids) + 1, max_length)]: `ids` cut to max_length - 1, then the EOS id."""
    if tokenizer.eos_token_id is None:
        raise ConfigError("the tokenizer has no end-of-sequence token to close a sequence with (data.tokenizer: "
                          "use kind sentencepiece_bpe, or a pretrained tokenizer with an eos token)")
    return np.asarray(list(ids[:max(max_length - 1, 0)]) + [tokenizer.eos_token_id], np.int32)


def seq2seq_row(tokenizer: Tokenizer, record: dict, max_length: int, max_target_length: int) -> dict:
    """{input_ids: source ids + EOS (at most max_length), labels: target ids + EOS (at most
    max_target_length)} of a {source, target} record; the EOS stays when the text is cut."""
    return {"input_ids": with_eos(tokenizer, tokenizer.encode(record["source"]), max_length),
            "labels": with_eos(tokenizer, tokenizer.encode(record["target"]), max_target_length)}


def shift_right(labels: np.ndarray, start_id: int) -> np.ndarray:
    """Decoder inputs for teacher forcing: `start_id` then labels[..., :-1], IGNORE_INDEX read as
    `start_id` (T5 starts decoding from the pad id)."""
    shifted = np.full_like(labels, start_id)
    shifted[..., 1:] = labels[..., :-1]
    return np.where(shifted == IGNORE_INDEX, start_id, shifted).astype(labels.dtype)


def collate_seq2seq(rows: Sequence, batch_size: int, buckets: Sequence[int], target_buckets: Sequence[int],
                    pad_id: int) -> dict:
    """Rows with input_ids [S'] and labels [T'] -> a batch: input_ids / attention_mask [batch, S]
    and labels [batch, T] (IGNORE_INDEX past each target), decoder_input_ids (labels shifted right,
    starting from `pad_id`, T5's decoder start) / decoder_attention_mask [batch, T], valid [batch].
    S and T are the smallest bucket lengths of `buckets` and `target_buckets` that fit the longest
    source and target: give one length each for static shapes (span corruption)."""
    real = [row for row in rows if row is not PADDING]

    def fit(key, choices):
        longest = max((len(row[key]) for row in real), default=1)
        length = next((b for b in choices if b >= longest), None)
        if length is None:
            raise ValueError(f"a row's {key} of {longest} tokens exceeds the largest bucket length {choices[-1]}")
        return length

    source_length, target_length = fit("input_ids", buckets), fit("labels", target_buckets)
    batch = {"input_ids": np.full((batch_size, source_length), pad_id, np.int32),
             "attention_mask": np.zeros((batch_size, source_length), np.int32),
             "labels": np.full((batch_size, target_length), IGNORE_INDEX, np.int32),
             "decoder_attention_mask": np.zeros((batch_size, target_length), np.int32),
             "valid": np.zeros(batch_size, np.int32)}
    for index, row in enumerate(rows):
        if row is PADDING:
            continue
        n, m = len(row["input_ids"]), len(row["labels"])
        batch["input_ids"][index, :n] = row["input_ids"]
        batch["attention_mask"][index, :n] = 1
        batch["labels"][index, :m] = row["labels"]
        batch["decoder_attention_mask"][index, :m] = 1
        batch["valid"][index] = 1
    batch["decoder_input_ids"] = shift_right(batch["labels"], pad_id)
    return batch


class Padding:
    """Marks a padding row (an eval split's last batch is filled up with these)."""


PADDING = Padding()


def collate(rows: Sequence, batch_size: int, buckets: Sequence[int], pad_id: int, *,
            token_fields: dict | None = None, row_fields: dict | None = None) -> dict:
    """Rows -> the batch contract: [batch_size, T] arrays, T the smallest bucket >= the longest row.

    Always `input_ids` (padded with `pad_id`), `attention_mask` and `valid` (1 for real rows, 0 for
    padding rows). `token_fields` {name: (dtype, fill)} are per-position fields padded to
    [batch_size, T]; `row_fields` {name: (dtype, fill)} are one value per row [batch_size]. Padding
    rows (PADDING) hold only fill values. Each task says which fields its rows carry."""
    token_fields, row_fields = dict(token_fields or {}), dict(row_fields or {})
    real = [row for row in rows if row is not PADDING]
    longest = max((len(row["input_ids"]) for row in real), default=1)
    length = next((b for b in buckets if b >= longest), None)
    if length is None:
        raise ValueError(f"a row of {longest} tokens exceeds the largest bucket length {buckets[-1]}")
    batch = {"input_ids": np.full((batch_size, length), pad_id, np.int32),
             "attention_mask": np.zeros((batch_size, length), np.int32)}
    for name, (dtype, fill) in token_fields.items():
        batch[name] = np.full((batch_size, length), fill, dtype)
    for name, (dtype, fill) in row_fields.items():
        batch[name] = np.full(batch_size, fill, dtype)
    batch["valid"] = np.zeros(batch_size, np.int32)
    for index, row in enumerate(rows):
        if row is PADDING:
            continue
        n = len(row["input_ids"])
        batch["input_ids"][index, :n] = row["input_ids"]
        batch["attention_mask"][index, :n] = 1
        for name in token_fields:
            batch[name][index, :n] = row[name]
        for name in row_fields:
            batch[name][index] = row[name]
        batch["valid"][index] = 1
    return batch
