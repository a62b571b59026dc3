"""Tokenizers: Hugging Face fast tokenizers from a directory, char/word vocabularies built from the
corpus, and WordPiece/BPE/SentencePiece-style vocabularies trained on it, all behind one class.

Why one class: every kind is a `tokenizers.Tokenizer` (char and word kinds are WordLevel models),
so each saves as a Hugging Face tokenizer directory (`tokenizer.json` + special-token files) that
`transformers.AutoTokenizer` and `load_tokenizer` both read back, and the loaders need one code
path. Special tokens (CLS/SEP/...) are added by flaxen from the tokenizer's own template, read
off its post-processor once (the tokens without a word id in a probe encoding), so truncation and
word alignment are done on plain id lists for every kind alike.

`Tokenizer.encode` never adds special tokens; `single_template` / `pair_template` say what to add.

Deterministic training: the same text always gives the same vocabulary, file for file. The
`tokenizers` trainer (BPE, which WordPiece training runs) breaks ties between equally frequent
pairs by token id, and WordPiece's continuation tokens ("##e", "##s", ...) got their ids in the
iteration order of a Rust HashMap of the corpus words, which is seeded at random in every process:
repeated SST-2 trainings gave different vocabularies, with one thread (RAYON_NUM_THREADS=1) too,
and sorted input cannot help (the words are counted into that HashMap). flaxen first collects the
continuation characters of the corpus (normalised and pre-tokenized in Python, ~0.1 s for SST-2's
67k sentences, the only cost) and hands "##c" for each, in code-point order, to the trainer as
extra special tokens, which take ids ahead of the alphabet; every id, hence every tie-break, is
then fixed. The trained tokenizer is rebuilt with only the real special tokens as added tokens
(the "##c" stay ordinary vocabulary entries). Byte-level BPE adds no tokens of its own (its
256-byte alphabet is sorted) and was already deterministic. Trained tokenizers are cached in
directories whose names end with `TRAINER_REVISION`, so vocabularies trained the old way are not reused.

T5-style vocabularies (`sentencepiece_bpe`, for sequence-to-sequence and span-corruption tasks):
SentencePiece's conventions with a `tokenizers` BPE model. Text is cut at spaces into pieces that
carry a leading "▁" (the Metaspace pre-tokenizer; a "▁" is put before the first word), so decoding
puts back every space and character: the round trip is exact for any text whose characters occur
in the training text and that does not start with whitespace (SentencePiece drops that too); an
unseen character becomes <unk>. Ids: <pad>=0, </s>=1 (EOS, appended to every sequence by the
post-processor), <unk>=2, the trained pieces, then `sentinels` added tokens <extra_id_{N-1}> ...
<extra_id_0>, so <extra_id_0> is the highest id (T5's convention; `Tokenizer.sentinel_ids`).
Why BPE and not SentencePiece's Unigram model: the `tokenizers` Unigram trainer sums its piece
scores in Rust HashMap order, which is seeded at random in every process, so the same files gave
different ids in two processes (with one thread too); its BPE trainer fixes every id (alphabet by
code point, merges by count then pair id), so the same files give the same vocabulary, file for file.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
import re
from typing import Iterable, Optional, Sequence

import tokenizers as hf_tokenizers
from tokenizers import Regex, decoders, models, normalizers, pre_tokenizers, processors, trainers

from flaxen.errors import ConfigError, DataError

ROLES = ("pad", "unk", "cls", "sep", "mask", "bos", "eos")
WORD_SPECIALS = {"pad": "[PAD]", "unk": "[UNK]", "cls": "[CLS]", "sep": "[SEP]", "mask": "[MASK]"}
BPE_SPECIALS = {"pad": "<pad>", "unk": "<unk>", "cls": "<s>", "sep": "</s>", "mask": "<mask>", "bos": "<s>",
                "eos": "</s>"}
T5_SPECIALS = {"pad": "<pad>", "eos": "</s>", "unk": "<unk>"}
SENTINEL = "<extra_id_{}>"
_SENTINEL_PATTERN = re.compile(r"<extra_id_(\d+)>")
TRAINER_REVISION = "det1"  # part of cached tokenizer directory names; change when training output changes


class Template:
    """Special tokens around one sequence (`prefix A suffix`) or a pair (`prefix A middle B suffix`),
    with their token-type ids; `type_a` / `type_b` are the type ids of the sequences' own tokens."""

    def __init__(self, prefix=(), middle=(), suffix=(), type_a=0, type_b=1):
        self.prefix, self.middle, self.suffix = list(prefix), list(middle), list(suffix)
        self.type_a, self.type_b = type_a, type_b

    @property
    def num_special(self) -> int:
        return len(self.prefix) + len(self.middle) + len(self.suffix)


class Tokenizer:
    """A `tokenizers.Tokenizer` plus the ids of its special tokens and its special-token templates.

    vocab_size: number of ids; pad_token_id: int (0 when the vocabulary has no pad token: padded
    positions are always masked out); mask/cls/sep/unk/bos/eos_token_id: int or None;
    sentinel_ids: the ids of <extra_id_0>, <extra_id_1>, ... in that order (T5's span-corruption
    sentinels; [] when the vocabulary has none).
    """

    def __init__(self, backend: hf_tokenizers.Tokenizer, special_tokens: dict[str, str], kind: str = "pretrained",
                 model_max_length: Optional[int] = None):
        self.backend = backend
        self.kind = kind
        self.model_max_length = model_max_length
        backend.no_truncation()
        backend.no_padding()
        self.special_tokens = {}
        for role, token in special_tokens.items():
            if token is not None and backend.token_to_id(token) is not None:
                self.special_tokens[role] = token
        ids = {role: backend.token_to_id(token) for role, token in self.special_tokens.items()}
        self.vocab_size = backend.get_vocab_size()
        self.pad_token_id = ids.get("pad", ids.get("eos", 0))
        self.unk_token_id = ids.get("unk")
        self.cls_token_id = ids.get("cls")
        self.sep_token_id = ids.get("sep")
        self.mask_token_id = ids.get("mask")
        self.bos_token_id = ids.get("bos")
        self.eos_token_id = ids.get("eos")
        added = {token.content for token in backend.get_added_tokens_decoder().values() if token.special}
        self.special_ids = frozenset(ids.values()) | frozenset(backend.token_to_id(t) for t in added)
        self.sentinel_ids = _sentinel_ids(backend)
        self._char_table = None
        if kind == "char":
            self._char_table = {token: i for token, i in backend.get_vocab().items() if i not in self.special_ids}
        self._pieces: dict[str, list[int]] = {}
        self.single_template, self.pair_template = self._templates()

    def _probe_words(self) -> tuple[str, str]:
        vocab = sorted((i, t) for t, i in self.backend.get_vocab().items() if i not in self.special_ids)
        plain = [t for _, t in vocab if t.isalpha() and t.isascii()] or [t for _, t in vocab]
        return plain[0], plain[min(1, len(plain) - 1)]

    def _templates(self) -> tuple[Template, Template]:
        a, b = self._probe_words()
        single = self.backend.encode([a], is_pretokenized=True, add_special_tokens=True)
        pair = self.backend.encode([a], [b], is_pretokenized=True, add_special_tokens=True)
        return self._split_template(single, 1), self._split_template(pair, 2)

    @staticmethod
    def _split_template(encoding, sequences: int) -> Template:
        parts = [[] for _ in range(sequences + 1)]
        types = [0, 1]
        seen = -1
        for token, type_id, sequence in zip(encoding.ids, encoding.type_ids, encoding.sequence_ids):
            if sequence is None:
                parts[seen + 1].append((token, type_id))
            else:
                seen = sequence
                types[sequence] = type_id
        if sequences == 1:
            return Template(prefix=parts[0], suffix=parts[1], type_a=types[0])
        return Template(prefix=parts[0], middle=parts[1], suffix=parts[2], type_a=types[0], type_b=types[1])

    # ------------------------------------------------------------ encoding

    def encode(self, text: str) -> list[int]:
        """Ids of `text`, no special tokens."""
        if self._char_table is not None:
            table = self._char_table
            try:
                return [table[c] for c in text]
            except KeyError:
                if self.unk_token_id is None:
                    missing = next(c for c in text if c not in table)
                    raise DataError(f"character {missing!r} is not in the character vocabulary "
                                    f"({len(table)} characters of the training corpus)") from None
                return [table.get(c, self.unk_token_id) for c in text]
        return self.backend.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        if self._char_table is not None:
            return [self.encode(t) for t in texts]
        return [e.ids for e in self.backend.encode_batch(list(texts), add_special_tokens=False)]

    def word_pieces(self, word: str) -> list[int]:
        """Ids of one pre-split word (as inside a sentence tokenized word by word); cached."""
        pieces = self._pieces.get(word)
        if pieces is None:
            if self._char_table is not None:
                pieces = self.encode(word)
            else:
                pieces = self.backend.encode([word], is_pretokenized=True, add_special_tokens=False).ids
            self._pieces[word] = pieces
        return pieces

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
        return self.backend.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def id_to_token(self, index: int) -> Optional[str]:
        return self.backend.id_to_token(int(index))

    # ------------------------------------------------------------ saving

    def save(self, directory: str) -> None:
        """Writes a Hugging Face tokenizer directory (tokenizer.json, special_tokens_map.json,
        tokenizer_config.json) that `load_tokenizer` and `transformers.AutoTokenizer` read."""
        os.makedirs(directory, exist_ok=True)
        self.backend.save(os.path.join(directory, "tokenizer.json"))
        mapping = {f"{role}_token": token for role, token in self.special_tokens.items()}
        if self.sentinel_ids:
            mapping["additional_special_tokens"] = [self.id_to_token(i) for i in self.sentinel_ids]
        with open(os.path.join(directory, "special_tokens_map.json"), "w") as f:
            json.dump(mapping, f, indent=2)
        config = {"tokenizer_class": "PreTrainedTokenizerFast", "flaxen_kind": self.kind, **mapping}
        if self.model_max_length:
            config["model_max_length"] = self.model_max_length
        with open(os.path.join(directory, "tokenizer_config.json"), "w") as f:
            json.dump(config, f, indent=2)


def _sentinel_ids(backend: hf_tokenizers.Tokenizer) -> list[int]:
    """Ids of <extra_id_0>, <extra_id_1>, ... (as far as they run without a gap) in `backend`."""
    found = {}
    for token, index in backend.get_vocab(with_added_tokens=True).items():
        match = _SENTINEL_PATTERN.fullmatch(token)
        if match:
            found[int(match.group(1))] = index
    ids = []
    while len(ids) in found:
        ids.append(found[len(ids)])
    return ids


# ---------------------------------------------------------------- loading

def _token_content(value) -> Optional[str]:
    if isinstance(value, dict):
        return value.get("content")
    return value if isinstance(value, str) else None


def load_tokenizer(path: str) -> Tokenizer:
    """A Hugging Face tokenizer directory (tokenizer.json, or vocab files that transformers converts)."""
    path = os.path.expanduser(path)
    if not os.path.isdir(path):
        raise ConfigError(f"tokenizer path {path!r}: no such directory (expected a Hugging Face model or tokenizer directory)")
    config = {}
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        file = os.path.join(path, name)
        if os.path.isfile(file):
            try:
                with open(file) as f:
                    config.update(json.load(f))
            except (json.JSONDecodeError, UnicodeDecodeError) as error:
                raise DataError(f"{file}: not valid JSON ({error})") from None
    file = os.path.join(path, "tokenizer.json")
    if os.path.isfile(file):
        try:
            backend = hf_tokenizers.Tokenizer.from_file(file)
        except Exception as error:
            raise DataError(f"{file}: not a tokenizers file ({error})") from None
    else:
        try:
            from transformers import AutoTokenizer
            converted = AutoTokenizer.from_pretrained(path, local_files_only=True)
            backend = converted.backend_tokenizer
        except Exception as error:
            raise ConfigError(f"tokenizer path {path!r}: no tokenizer.json and transformers could not load a fast "
                              f"tokenizer from it ({error})") from None
    special = {role: _token_content(config.get(f"{role}_token")) for role in ROLES}
    max_length = config.get("model_max_length")
    max_length = int(max_length) if isinstance(max_length, (int, float)) and max_length < 1e9 else None
    return Tokenizer(backend, special, kind=config.get("flaxen_kind", "pretrained"), model_max_length=max_length)


# ---------------------------------------------------------------- built from the corpus

def _word_level(vocabulary: list[str], specials: dict[str, str], pre_tokenizer, decoder) -> hf_tokenizers.Tokenizer:
    tokens = list(dict.fromkeys(list(specials.values()) + vocabulary))
    backend = hf_tokenizers.Tokenizer(models.WordLevel({t: i for i, t in enumerate(tokens)},
                                                       unk_token=specials.get("unk")))
    backend.pre_tokenizer = pre_tokenizer
    backend.decoder = decoder
    if specials:
        backend.add_special_tokens(list(specials.values()))
    if "cls" in specials and "sep" in specials:
        cls, sep = specials["cls"], specials["sep"]
        backend.post_processor = processors.TemplateProcessing(
            single=f"{cls} $A {sep}", pair=f"{cls} $A {sep} $B:1 {sep}:1",
            special_tokens=[(cls, tokens.index(cls)), (sep, tokens.index(sep))])
    return backend


def char_tokenizer(texts: Iterable[str], with_specials: bool) -> Tokenizer:
    """One id per character of `texts`, sorted by code point (as nanoGPT's shakespeare_char); with
    `with_specials`, [PAD] [UNK] [CLS] [SEP] [MASK] come first (needed by mlm and classification)."""
    chars = set()
    for text in texts:
        chars.update(text)
    if not chars:
        raise DataError("the corpus has no characters to build a character vocabulary from")
    specials = dict(WORD_SPECIALS) if with_specials else {}
    backend = _word_level(sorted(chars), specials, pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated"),
                          decoders.Fuse())
    return Tokenizer(backend, specials, kind="char")


def word_tokenizer(texts: Iterable[str]) -> Tokenizer:
    """One id per whitespace-separated word of `texts` (sorted), after [PAD] [UNK] [CLS] [SEP] [MASK]."""
    words = set()
    for text in texts:
        words.update(text.split())
    if not words:
        raise DataError("the corpus has no words to build a word vocabulary from")
    backend = _word_level(sorted(words), dict(WORD_SPECIALS), pre_tokenizers.WhitespaceSplit(),
                          decoders.WordPiece(prefix="##", cleanup=False))
    return Tokenizer(backend, dict(WORD_SPECIALS), kind="word")


def train_tokenizer(kind: str, texts: Iterable[str], vocab_size: int, min_frequency: int = 2,
                    lowercase: bool = True, sentinels: int = 0) -> Tokenizer:
    """A WordPiece (BERT-style: normalizer, [CLS] A [SEP] template), byte-level BPE (GPT-2-style,
    <s> A </s> template) or SentencePiece-style BPE (T5-style, `sentencepiece_bpe`: A </s>, with
    `sentinels` sentinel tokens at the top; see the module docstring) vocabulary of `vocab_size` ids
    trained on `texts` with `tokenizers`."""
    texts = texts if isinstance(texts, (list, tuple)) else list(texts)
    if kind == "sentencepiece_bpe":
        return _train_sentencepiece_bpe(texts, vocab_size, min_frequency, lowercase, sentinels)
    continuation = []
    if kind == "wordpiece":
        specials = dict(WORD_SPECIALS)
        backend = hf_tokenizers.Tokenizer(models.WordPiece(unk_token=specials["unk"]))
        backend.normalizer = normalizers.BertNormalizer(lowercase=lowercase, strip_accents=None)
        backend.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        backend.decoder = decoders.WordPiece(prefix="##")
        continuation = [f"##{c}" for c in _continuation_chars(backend, texts)]
        trainer = trainers.WordPieceTrainer(vocab_size=vocab_size, min_frequency=min_frequency,
                                            special_tokens=list(specials.values()) + continuation,
                                            show_progress=False)
    elif kind == "bpe":
        specials = dict(BPE_SPECIALS)
        backend = hf_tokenizers.Tokenizer(models.BPE())
        backend.normalizer = normalizers.Lowercase() if lowercase else None
        backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        backend.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency,
                                      special_tokens=list(dict.fromkeys(specials.values())),
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    else:
        raise ConfigError(f"data.tokenizer.kind={kind!r}: only wordpiece, bpe and sentencepiece_bpe are trained")
    backend.train_from_iterator(texts, trainer=trainer)
    if continuation:
        backend = _without_added(backend, list(specials.values()))
    cls, sep = specials["cls"], specials["sep"]
    backend.post_processor = processors.TemplateProcessing(
        single=f"{cls} $A {sep}", pair=f"{cls} $A {sep} $B:1 {sep}:1",
        special_tokens=[(cls, backend.token_to_id(cls)), (sep, backend.token_to_id(sep))])
    return Tokenizer(backend, specials, kind=kind)


def _train_sentencepiece_bpe(texts: Sequence[str], vocab_size: int, min_frequency: int, lowercase: bool,
                             sentinels: int) -> Tokenizer:
    """T5-style vocabulary: <pad> </s> <unk>, BPE pieces over Metaspace words, then the sentinels
    (<extra_id_0> the highest id); every sequence gets </s> appended."""
    if vocab_size - sentinels < 64:
        raise ConfigError(f"data.tokenizer.vocab_size={vocab_size} leaves {vocab_size - sentinels} ids beside "
                          f"{sentinels} sentinels (data.tokenizer.sentinels); expected at least 64")
    backend = hf_tokenizers.Tokenizer(models.BPE(unk_token=T5_SPECIALS["unk"]))
    backend.normalizer = normalizers.Lowercase() if lowercase else None
    backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="always", split=True)
    backend.decoder = decoders.Metaspace(replacement="\u2581", prepend_scheme="always", split=True)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size - sentinels, min_frequency=min_frequency,
                                  special_tokens=[T5_SPECIALS[role] for role in ("pad", "eos", "unk")],
                                  show_progress=False)
    backend.train_from_iterator(texts, trainer=trainer)
    if backend.get_vocab_size() <= len(T5_SPECIALS):
        raise DataError("the train split has no text to train a sentencepiece_bpe vocabulary on")
    backend.add_special_tokens([SENTINEL.format(i) for i in reversed(range(sentinels))])
    eos = T5_SPECIALS["eos"]
    backend.post_processor = processors.TemplateProcessing(
        single=f"$A {eos}", pair=f"$A {eos} $B {eos}", special_tokens=[(eos, backend.token_to_id(eos))])
    return Tokenizer(backend, dict(T5_SPECIALS), kind="sentencepiece_bpe")


def _continuation_chars(backend: hf_tokenizers.Tokenizer, texts: Sequence[str]) -> list[str]:
    """Characters that follow the first one in some word of `texts`, as the trainer sees words
    (after `backend`'s normalizer and pre-tokenizer), in code-point order."""
    normalize = backend.normalizer.normalize_str if backend.normalizer is not None else (lambda text: text)
    split = backend.pre_tokenizer.pre_tokenize_str
    # No normalizer or pre-tokenizer step reaches across an ASCII space, so the distinct
    # space-separated pieces give the same words as the texts (at a fifth of the cost).
    pieces = set()
    for text in texts:
        pieces.update(text.split(" "))
    words = {word for piece in pieces for word, _ in split(normalize(piece))}
    return sorted({c for word in words for c in word[1:]})


def _without_added(trained: hf_tokenizers.Tokenizer, specials: list[str]) -> hf_tokenizers.Tokenizer:
    """A trained WordPiece tokenizer whose added tokens are only `specials` (the "##c" tokens fed to
    the trainer stay in the vocabulary as ordinary tokens, with their ids)."""
    config = json.loads(trained.to_str())
    config["added_tokens"] = [token for token in config["added_tokens"] if token["content"] in specials]
    return hf_tokenizers.Tokenizer.from_str(json.dumps(config))


def cached_trained_tokenizer(directory: str, kind: str, texts_fn, vocab_size: int, min_frequency: int,
                             lowercase: bool, sentinels: int = 0) -> Tokenizer:
    """`train_tokenizer` once into `<directory>_<TRAINER_REVISION>` (written to a temporary folder,
    then renamed), then reused."""
    directory = f"{directory.rstrip(os.sep)}_{TRAINER_REVISION}"
    if os.path.isfile(os.path.join(directory, "tokenizer.json")):
        return load_tokenizer(directory)
    tokenizer = train_tokenizer(kind, texts_fn(), vocab_size, min_frequency, lowercase, sentinels)
    parent = os.path.dirname(directory)
    os.makedirs(parent, exist_ok=True)
    temporary = tempfile.mkdtemp(prefix=".incomplete-", dir=parent)
    try:
        tokenizer.save(temporary)
        os.rename(temporary, directory)
    except OSError:
        shutil.rmtree(temporary, ignore_errors=True)
        if not os.path.isfile(os.path.join(directory, "tokenizer.json")):
            raise
    return load_tokenizer(directory)
