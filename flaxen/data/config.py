"""The data config: one dataclass that a preset in configs/data/ fills and Hydra type-checks.

Why: everything about a dataset (where its files are, how to parse them, how to tokenize and how
to cut batches) is decided once, at start-up, from this schema; `check_config` then catches what
types cannot (choices, ranges, consistency) and raises ConfigError naming the `data.<key>`.

Only str/int/float/bool/list/dict/Optional fields and nested dataclasses, so the class doubles
as a Hydra structured-config schema.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

from flaxen.errors import ConfigError

SOURCES = ("conll", "delimited", "text", "squad", "parallel", "tfds", "synthetic", "mixture")
# sources read from local files named by data.splits
FILE_SOURCES = ("conll", "delimited", "text", "squad", "parallel")
# record fields of the qa schema (source=squad; a catalog dataset maps them with data.tfds_features)
QA_FIELDS = ("id", "title", "context", "question", "answer_texts", "answer_starts")
FORMATS = ("tsv", "csv", "jsonl")
TAG_SCHEMES = ("IOB1", "IOB2")
TOKENIZER_KINDS = ("pretrained", "char", "word", "wordpiece", "bpe", "sentencepiece_bpe")
SYNTHETIC_KINDS = ("corpus", "classification")
RESAMPLING = ("balanced",)


@dataclass
class TokenizerConfig:
    """How text becomes ids.

    kind: `pretrained` (a Hugging Face tokenizer directory at `path`), `char` (one id per character
    of the corpus), `word` (one id per whitespace-separated word of the corpus), `wordpiece` or
    `bpe` (trained by flaxen on the train split with the `tokenizers` library, `vocab_size` ids), or
    `sentencepiece_bpe` (T5-style, trained by flaxen on the train split's text, source and target
    alike for parallel data: BPE over SentencePiece's Metaspace pieces, so decoding gives the text
    back exactly; <pad>=0 </s>=1 <unk>=2, EOS appended to every sequence, and `sentinels` tokens
    <extra_id_0> ... <extra_id_{sentinels-1}> at the top of the `vocab_size` ids, <extra_id_0> the
    highest). min_frequency: trained kinds; sentinels: sentencepiece_bpe only.
    """
    kind: str = "pretrained"
    path: Optional[str] = None
    vocab_size: int = 8000
    min_frequency: int = 2
    lowercase: bool = True
    sentinels: int = 100


@dataclass
class SyntheticConfig:
    """flaxen's generated quickstart language (see flaxen/data/synthetic.py).

    kind: `corpus` (unlabelled sentences, for mlm/clm) or `classification` (labelled sentences).
    """
    kind: str = "corpus"
    seed: int = 0
    num_train: int = 20000
    num_validation: int = 1000


@dataclass
class DataConfig:
    """A dataset, its parsing, its tokenizer and its batching (see configs/data/*.yaml)."""
    name: str = "quickstart"
    source: str = "synthetic"
    # split name -> file, relative to data_dir (or absolute)
    splits: Dict[str, str] = field(default_factory=dict)
    # source=tfds: catalog name (e.g. glue/sst2), our split -> catalog split (default: the catalog's
    # splits), and our record field -> catalog feature: {text: sentence, label: label} (classification),
    # {tokens: tokens, tags: ner} (tagging), {text: text} (corpus) or, for qa, each of QA_FIELDS
    # (nested catalog features by path: {answer_texts: answers/text, ...}; see configs/data/squad.yaml)
    tfds_name: Optional[str] = None
    tfds_splits: Dict[str, str] = field(default_factory=dict)
    tfds_features: Dict[str, str] = field(default_factory=dict)
    # source=delimited
    format: str = "tsv"
    header: bool = True
    text_columns: List[str] = field(default_factory=lambda: ["sentence"])
    label_column: Optional[str] = "label"
    regression: bool = False
    # source=parallel (translation pairs, records {source, target}): either aligned line files, line i
    # of one the translation of line i of the other: `<splits.X>.<source_language>` and
    # `<splits.X>.<target_language>` (e.g. splits.train=multi30k/train, en, de), or `splits.X` itself
    # the source file and `target_splits.X` the target file; or, with source_column and target_column
    # set, one TSV/CSV/JSONL file per split (data.format, data.header) holding both columns
    source_language: Optional[str] = None
    target_language: Optional[str] = None
    target_splits: Dict[str, str] = field(default_factory=dict)
    source_column: Optional[str] = None
    target_column: Optional[str] = None
    # source=conll (column indices may be negative, counted from the end)
    token_column: int = 0
    tag_column: int = -1
    separator: Optional[str] = None
    tag_scheme: Optional[str] = "IOB2"
    convert_tag_scheme: Optional[str] = None
    # seq_cls / token_cls: declared label set (None: the sorted labels found in the train split)
    label_names: Optional[List[str]] = None
    # seq_cls / token_cls few-shot training (flaxen.data.sampling): the train split becomes a subset with K
    # examples per class (null: the whole split). seq_cls: K rows of each label; token_cls: sentences chosen
    # greedily until every entity type has at least K mentions. seq_cls also takes a mapping {label: count}:
    # that many rows of each named label, every row of the others (an imbalanced split). Drawn from
    # train_subset_seed, not `seed`, so training seeds can vary over one subset
    train_examples_per_class: Any = None
    train_subset_seed: int = 0
    # seq_cls / token_cls training: `balanced` oversamples so that every epoch draws each class equally
    # often (token_cls: a sentence's class is its rarest entity type, or none); null: off
    resample: Optional[str] = None
    # source=text: fraction of the characters carved off the end as `validation` when no file is given;
    # source=mixture: fraction of each component's train lines held out as `validation`
    validation_fraction: float = 0.1
    # source=mixture: data presets (configs/data/<name>.yaml) whose train splits, one sentence or line
    # per line, make one text corpus (for mlm/clm pretraining; their validation/test text is never read)
    mixture: List[str] = field(default_factory=list)
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)
    tokenizer: TokenizerConfig = field(default_factory=lambda: TokenizerConfig(kind="word"))
    # seq_cls / token_cls: rows longer than max_length tokens are truncated; batches are padded to
    # the smallest bucket length that fits their longest row
    max_length: int = 128
    bucket_lengths: List[int] = field(default_factory=lambda: [32, 64, 128])
    # seq_cls / token_cls training: batches cut from windows of this many batches sorted by length
    # (0 or 1: plain shuffled batches); most batches then fit a small bucket
    length_grouping: int = 0
    # mlm / clm: tokens per row
    window_length: int = 64
    mlm_probability: float = 0.15
    # sequence-to-sequence: target rows longer than max_target_length tokens (with EOS) are truncated
    # (source rows: max_length)
    max_target_length: int = 128
    # span corruption (T5): fraction of tokens noised and mean length of a noise span
    # (flaxen.data.span_corruption)
    noise_density: float = 0.15
    mean_noise_span_length: float = 3.0
    # qa (source=squad): a context longer than max_length is cut into overlapping windows that share
    # doc_stride tokens (Hugging Face's `stride`; run_qa.py's --doc_stride)
    doc_stride: int = 128
    # held-out split by group (local sources): the records of `holdout_groups` whole groups (records
    # sharing one value of the record field `holdout_key`, e.g. a SQuAD article's `title`) move from
    # split `holdout_from` to a new split `holdout_to`. The groups are a seeded permutation of the
    # sorted distinct values (`holdout_seed`), so the split is a pure function of the file and these
    # settings; 0 groups: off
    holdout_key: Optional[str] = None
    holdout_groups: int = 0
    holdout_from: str = "train"
    holdout_to: str = "validation"
    holdout_seed: int = 0
    # where prepared tfds data lives; None: <data_dir>/tfds (or a per-user cache when data_dir is read-only)
    prepared_dir: Optional[str] = None
    # grain prefetch threads per loader (0: read in the calling thread)
    loader_threads: int = 1


def _choice(key: str, value, choices) -> None:
    if value not in choices:
        raise ConfigError(f"data.{key}={value!r}: expected one of {', '.join(map(str, choices))}")


def check_config(cfg: DataConfig, task=None) -> None:
    """Raises ConfigError for a config that cannot describe `task`'s data (`task`: a flaxen Task,
    whose `data_kinds` name the prepared schemas it reads; None checks the data config alone)."""
    _choice("source", cfg.source, SOURCES)
    _choice("tokenizer.kind", cfg.tokenizer.kind, TOKENIZER_KINDS)
    if cfg.source == "tfds":
        if not cfg.tfds_name:
            raise ConfigError("data.source=tfds needs data.tfds_name (a catalog name such as glue/sst2)")
        keys = set(cfg.tfds_features)
        known = ({"text"}, {"text", "label"}, {"text", "text_pair", "label"}, {"tokens", "tags"}, set(QA_FIELDS))
        if keys not in known:
            raise ConfigError(f"data.tfds_features={dict(cfg.tfds_features)}: expected keys {{text}}, {{text, label}}, "
                              "{text, text_pair, label}, {tokens, tags} or {" + ", ".join(QA_FIELDS) + "}, each "
                              "mapped to a catalog feature name (nested ones as answers/text)")
    if cfg.source in FILE_SOURCES and not cfg.splits:
        raise ConfigError(f"data.splits is empty: data.source={cfg.source} needs split -> file entries, "
                          "e.g. {train: sst2/train.tsv, validation: sst2/dev.tsv}")
    if cfg.source in FILE_SOURCES and "train" not in cfg.splits:
        raise ConfigError(f"data.splits has no 'train' entry (has {sorted(cfg.splits)})")
    if cfg.source == "parallel":
        _check_parallel(cfg)
    if cfg.source == "delimited":
        _choice("format", cfg.format, FORMATS)
        if not 1 <= len(cfg.text_columns) <= 2:
            raise ConfigError(f"data.text_columns={list(cfg.text_columns)}: expected one column or a pair")
    if cfg.source == "mixture":
        if not cfg.mixture:
            raise ConfigError("data.source=mixture needs data.mixture: a list of data presets, e.g. [sst2, conll2003]")
        if task is not None and "text" not in task.data_kinds:
            raise ConfigError(f"data.source=mixture is an unlabelled text corpus: task={task.name} needs labelled "
                              f"data ({' or '.join(task.data_kinds)}); use a language-modelling task (mlm, clm)")
        if not 0.0 < cfg.validation_fraction < 1.0:
            raise ConfigError(f"data.validation_fraction={cfg.validation_fraction}: a mixture holds out a fraction "
                              "in (0, 1) of each component as validation")
    if cfg.source == "synthetic":
        _choice("synthetic.kind", cfg.synthetic.kind, SYNTHETIC_KINDS)
        for key in ("num_train", "num_validation"):
            if getattr(cfg.synthetic, key) <= 0:
                raise ConfigError(f"data.synthetic.{key}={getattr(cfg.synthetic, key)}: expected a positive count")
    if cfg.tag_scheme is not None:
        _choice("tag_scheme", cfg.tag_scheme, TAG_SCHEMES)
    if cfg.convert_tag_scheme is not None:
        _choice("convert_tag_scheme", cfg.convert_tag_scheme, TAG_SCHEMES)
        if cfg.tag_scheme is None:
            raise ConfigError("data.convert_tag_scheme is set but data.tag_scheme is null (plain tags cannot be converted)")
    if cfg.separator not in (None, " ", "\t"):
        raise ConfigError(f"data.separator={cfg.separator!r}: expected ' ', '\\t' or null (any whitespace)")
    if not 0.0 <= cfg.validation_fraction < 1.0:
        raise ConfigError(f"data.validation_fraction={cfg.validation_fraction}: expected a value in [0, 1)")
    if not 0.0 < cfg.mlm_probability < 1.0:
        raise ConfigError(f"data.mlm_probability={cfg.mlm_probability}: expected a value in (0, 1)")
    buckets = list(cfg.bucket_lengths)
    if not buckets or any(b <= 0 for b in buckets) or buckets != sorted(set(buckets)):
        raise ConfigError(f"data.bucket_lengths={buckets}: expected increasing positive lengths")
    if cfg.max_length < 4 or cfg.max_length > buckets[-1]:
        raise ConfigError(f"data.max_length={cfg.max_length}: expected at least 4 and at most the largest "
                          f"bucket length {buckets[-1]} (data.bucket_lengths)")
    if cfg.window_length < 4:
        raise ConfigError(f"data.window_length={cfg.window_length}: expected at least 4 tokens")
    if cfg.label_names is not None and len(set(cfg.label_names)) != len(cfg.label_names):
        raise ConfigError(f"data.label_names={list(cfg.label_names)} has duplicates")
    if cfg.tokenizer.kind in ("wordpiece", "bpe") and cfg.tokenizer.vocab_size < 64:
        raise ConfigError(f"data.tokenizer.vocab_size={cfg.tokenizer.vocab_size}: expected at least 64")
    if cfg.tokenizer.sentinels < 0:
        raise ConfigError(f"data.tokenizer.sentinels={cfg.tokenizer.sentinels}: expected 0 or more")
    if cfg.tokenizer.kind == "sentencepiece_bpe" and cfg.tokenizer.vocab_size < 64 + cfg.tokenizer.sentinels:
        raise ConfigError(f"data.tokenizer.vocab_size={cfg.tokenizer.vocab_size}: expected at least 64 ids beside "
                          f"the {cfg.tokenizer.sentinels} sentinels (data.tokenizer.sentinels), i.e. at least "
                          f"{64 + cfg.tokenizer.sentinels}")
    if cfg.max_target_length < 2:
        raise ConfigError(f"data.max_target_length={cfg.max_target_length}: expected at least 2 (a token and EOS)")
    if not 0.0 < cfg.noise_density < 1.0:
        raise ConfigError(f"data.noise_density={cfg.noise_density}: expected a fraction in (0, 1)")
    if not cfg.mean_noise_span_length >= 1.0:
        raise ConfigError(f"data.mean_noise_span_length={cfg.mean_noise_span_length}: expected at least 1 token")
    if cfg.length_grouping < 0:
        raise ConfigError(f"data.length_grouping={cfg.length_grouping}: expected 0 (off) or a number of batches")
    _check_class_sampling(cfg, task)
    if cfg.loader_threads < 0:
        raise ConfigError(f"data.loader_threads={cfg.loader_threads}: expected 0 or more")
    # (doc_stride < max_length is the qa task's check: flaxen.tasks.qa, Task.check_data_config)
    if cfg.doc_stride < 0:
        raise ConfigError(f"data.doc_stride={cfg.doc_stride}: expected 0 or more tokens shared by consecutive "
                          "windows")
    _check_holdout(cfg)


def _check_parallel(cfg: DataConfig) -> None:
    """How data.source=parallel finds its two texts (see DataConfig)."""
    columns = (cfg.source_column, cfg.target_column)
    if any(c is not None for c in columns):
        if None in columns:
            missing = "source_column" if cfg.source_column is None else "target_column"
            raise ConfigError(f"data.{missing} is not set: a delimited parallel file needs both data.source_column "
                              "and data.target_column")
        if cfg.source_column == cfg.target_column:
            raise ConfigError(f"data.source_column and data.target_column are both {cfg.source_column!r}: expected "
                              "two columns")
        _choice("format", cfg.format, FORMATS)
        if cfg.target_splits:
            raise ConfigError("data.target_splits is set beside data.source_column/target_column: a delimited "
                              "parallel split is one file holding both columns; unset one of them")
        return
    if cfg.target_splits:
        if set(cfg.target_splits) != set(cfg.splits):
            raise ConfigError(f"data.target_splits names splits {sorted(cfg.target_splits)} but data.splits names "
                              f"{sorted(cfg.splits)}: every split needs its source file (data.splits) and its target "
                              "file (data.target_splits)")
        return
    for key in ("source_language", "target_language"):
        if not getattr(cfg, key):
            raise ConfigError(f"data.{key} is not set: data.source=parallel reads <data.splits.X>.<source_language> "
                              "and <data.splits.X>.<target_language> (e.g. en and de), or data.target_splits, or "
                              "one delimited file per split with data.source_column and data.target_column")
    if cfg.source_language == cfg.target_language:
        raise ConfigError(f"data.source_language and data.target_language are both {cfg.source_language!r}: "
                          "expected two file suffixes")


def _check_class_sampling(cfg: DataConfig, task) -> None:
    """data.train_examples_per_class, data.train_subset_seed and data.resample (flaxen.data.sampling):
    their values, and a task whose examples have classes (`task.class_labels`)."""
    from flaxen.data import sampling

    k = sampling.examples_per_class_setting(cfg.train_examples_per_class)
    if cfg.resample is not None:
        _choice("resample", cfg.resample, RESAMPLING)
    if task is None or getattr(task, "class_labels", False):
        return
    for key, value in (("train_examples_per_class", k), ("resample", cfg.resample)):
        if value is not None:
            raise ConfigError(f"data.{key}={value}: applies to tasks whose examples have classes "
                              f"({', '.join(task.class_label_tasks())}); task {task.name} has none "
                              f"(set data.{key}=null)")


def _check_holdout(cfg: DataConfig) -> None:
    """The held-out split settings (data.holdout_*); what needs the records (the key is a field,
    enough groups) is checked when they are parsed (flaxen.data.builders.hold_out)."""
    if cfg.holdout_groups < 0:
        raise ConfigError(f"data.holdout_groups={cfg.holdout_groups}: expected 0 (off) or a number of groups")
    if cfg.holdout_groups == 0:
        return
    if not cfg.holdout_key:
        raise ConfigError(f"data.holdout_groups={cfg.holdout_groups} needs data.holdout_key: the record field "
                          "whose values form the groups (e.g. title for SQuAD articles)")
    if cfg.source in ("tfds", "mixture"):
        raise ConfigError(f"data.holdout_groups={cfg.holdout_groups}: a held-out split is cut from local files; "
                          f"data.source={cfg.source} cannot take one (set data.holdout_groups=0)")
    if cfg.holdout_from == cfg.holdout_to:
        raise ConfigError(f"data.holdout_from and data.holdout_to are both {cfg.holdout_from!r}: expected two splits")
    if cfg.source != "synthetic":
        if cfg.holdout_from not in cfg.splits:
            raise ConfigError(f"data.holdout_from={cfg.holdout_from!r} is not a split of data.splits "
                              f"({', '.join(sorted(cfg.splits))})")
        if cfg.holdout_to in cfg.splits:
            raise ConfigError(f"data.holdout_to={cfg.holdout_to!r} is already a file split "
                              f"(data.splits.{cfg.holdout_to}={cfg.splits[cfg.holdout_to]}); name a new split")


def default_data_dir() -> str:
    """`FLAXEN_DATA_DIR` if set, else ~/flaxen_data."""
    return os.environ.get("FLAXEN_DATA_DIR") or os.path.join(os.path.expanduser("~"), "flaxen_data")
