"""tfds builders for local files, prepared once as array_record and read with `as_data_source`.

Why: a prepared tfds dataset is versioned, random-access and needs no TensorFlow. Five builders
cover local files (CoNLL-style tagging, delimited classification, plain-text corpora, SQuAD JSON,
parallel sentence pairs);
catalog names (`glue/sst2`, `conll2003`, `squad/v1.1`, ...) go through tfds's own builders.
Records, as loaders see them:

  tagging:        {"tokens": [str] * words, "tags": [int] * words}   (tag names in the dataset's
                  metadata.json: a per-word ClassLabel sequence would cost tfds ~7x the write time)
  classification: {"text": str, "text_pair": str, "label": int (float32 if regression)}
  text:           {"text": str}   (a chunk of whole lines; chunks concatenate to the split's text)
  qa:             {"id": str, "title": str, "context": str, "question": str, "answer_texts": [str],
                  "answer_starts": [int]}   (one per SQuAD v1.1 question; answers in file order)
  parallel:       {"source": str, "target": str}   (one per sentence pair: aligned line files
                  `<split>.<source_language>` / `<split>.<target_language>`, or TSV/CSV/JSONL columns)

Any local dataset can hold out whole groups of records (`data.holdout_*`, e.g. SQuAD articles by
title) as a new split: `hold_out` runs on the parsed records before the build, and its settings are
part of the key below, so each choice is its own prepared dataset.

Layout: `<prepared>/<builder>/<name>_<key>/<FORMAT_VERSION>/` where `<prepared>` is `data.prepared_dir`, else
`<data_dir>/tfds` (a per-user cache when data_dir is read-only) and `<key>` hashes the raw files'
sha256 (both files of a parallel split) and the parsing options, so a changed file is rebuilt into
a new directory and the earlier one stays intact. Raw files are parsed and checked in full before
anything is written; tfds writes into an `incomplete.*` directory and renames it only when
complete; a file lock keeps concurrent runs from building the same dataset twice.

Integrity: when a dataset is prepared, `flaxen_checksums.json` (written last, beside
dataset_info.json) records the size and sha256 of each array_record file:
    {"format": 1, "algorithm": "sha256", "files": {"<file name>": {"bytes": N, "sha256": "<hex>"}}}
Opening compares the sizes always and the checksums too when the files hold at most
`HASH_ALWAYS_BYTES` (SST-2's 10 MB hash in ~10 ms); larger data is hashed only when a read fails.
A mismatching file is named; a writable dataset is moved aside (`<name>_<key>.corrupt-<time>`,
kept for inspection) and prepared again, a read-only one raises DataError with the commands that
rebuild it. Data prepared before checksums existed is read through once, then gets its file.

Reading: records are fetched as raw bytes from `as_data_source` and decoded here (a direct proto
read, ~5 us a record, where tfds's generic numpy decoder takes ~100 us); a test checks both agree.
tfds 4.9.10 resolves a builder's `code_path` through `importlib_resources`, which it only declares
for Python < 3.9; our builders set `code_path = None` (they have no URL checksums to find).
"""
from __future__ import annotations

import contextlib
import dataclasses
import errno
import fcntl
import hashlib
import io
import json
import os
import re
import socket
import time
import urllib.parse
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import numpy as np
from absl import logging as absl_logging
import tensorflow_datasets as tfds
from tensorflow_datasets.core import decode as tfds_decode
from tensorflow_datasets.proto import tf_example_pb2

from flaxen.data import raw, synthetic
from flaxen.data import tags as tag_schemes
from flaxen.data.config import QA_FIELDS, DataConfig
from flaxen.errors import ConfigError, DataError

FORMAT_VERSION = "1.1.0"
TEXT_CHUNK_CHARS = 4096
CHECKSUM_FILE = "flaxen_checksums.json"
HASH_ALWAYS_BYTES = 256 << 20

tfds.display_progress_bar(False)


class _LocalBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """Writes already-parsed records; subclasses only name the builder."""
    VERSION = tfds.core.Version(FORMAT_VERSION)
    code_path = None

    def __init__(self, *, features: tfds.features.FeaturesDict, split_records: dict[str, list[dict]],
                 description: str, metadata: Optional[dict] = None, **kwargs):
        self._features = features
        self._split_records = split_records
        self._description = description
        self._metadata = metadata
        super().__init__(**kwargs)

    def _info(self) -> tfds.core.DatasetInfo:
        metadata = tfds.core.MetadataDict(**self._metadata) if self._metadata else None
        return tfds.core.DatasetInfo(builder=self, description=self._description, features=self._features,
                                     disable_shuffling=True, metadata=metadata)

    def _split_generators(self, dl_manager):
        return {split: self._generate_examples(split) for split in self._split_records}

    def _generate_examples(self, split):
        for index, record in enumerate(self._split_records[split]):
            yield index, record


class FlaxenConll(_LocalBuilder, skip_registration=True):
    """Token-tagging sentences from CoNLL-style column files."""


class FlaxenDelimited(_LocalBuilder, skip_registration=True):
    """Classification rows (text, optional text pair, label) from TSV, CSV or JSONL files."""


class FlaxenText(_LocalBuilder, skip_registration=True):
    """A plain-text corpus as chunks of whole lines."""


class FlaxenSquad(_LocalBuilder, skip_registration=True):
    """Extractive question answering: SQuAD v1.1 questions with their context and gold answers."""


class FlaxenParallel(_LocalBuilder, skip_registration=True):
    """Sentence pairs (source, target) for sequence-to-sequence tasks such as translation."""


BUILDERS = {"conll": FlaxenConll, "delimited": FlaxenDelimited, "text": FlaxenText, "squad": FlaxenSquad,
            "parallel": FlaxenParallel}
SCHEMAS = {"conll": "tagging", "delimited": "classification", "text": "text", "squad": "qa",
           "parallel": "parallel"}


# ---------------------------------------------------------------- where prepared data lives

def prepared_root(cfg: DataConfig, data_dir: str) -> str:
    """`data.prepared_dir`, else `FLAXEN_PREPARED_DIR`, else `<data_dir>/tfds` when data_dir can be
    written (or does not exist yet), else `~/.cache/flaxen/tfds/<hash of data_dir>` (data on a
    read-only share)."""
    explicit = cfg.prepared_dir or os.environ.get("FLAXEN_PREPARED_DIR")
    if explicit:
        return os.path.abspath(os.path.expanduser(explicit))
    data_dir = os.path.abspath(os.path.expanduser(data_dir))
    candidate = os.path.join(data_dir, "tfds")
    if _writable(candidate if os.path.isdir(candidate) else data_dir):
        try:
            os.makedirs(candidate, exist_ok=True)
            return candidate
        except OSError:
            pass
    elif not os.path.exists(data_dir):
        try:
            os.makedirs(candidate)
            return candidate
        except OSError:
            pass
    tag = hashlib.sha256(data_dir.encode()).hexdigest()[:12]
    return os.path.join(os.path.expanduser("~"), ".cache", "flaxen", "tfds", tag)


def _writable(path: str) -> bool:
    """Writable by us and not marked read-only: a folder without write bits (a shared data root)
    counts as read-only even for root, whom os.access lets write anywhere."""
    try:
        return os.access(path, os.W_OK) and bool(os.stat(path).st_mode & 0o222)
    except OSError:
        return False


@contextlib.contextmanager
def _locked(root: str, name: str):
    os.makedirs(root, exist_ok=True)
    with open(os.path.join(root, f".{name}.lock"), "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


@contextlib.contextmanager
def _absl_quiet():
    """tfds warns through absl that a BuilderConfig is 'custom': ours always are (named by checksum)."""
    verbosity = absl_logging.get_verbosity()
    absl_logging.set_verbosity(absl_logging.ERROR)
    try:
        yield
    finally:
        absl_logging.set_verbosity(verbosity)


def _safe_name(name: str) -> str:
    return re.sub(r"[^a-z0-9_]+", "_", name.lower()).strip("_") or "data"


# ---------------------------------------------------------------- integrity of prepared data

def _record_files(version_dir: str) -> list[str]:
    return sorted(name for name in os.listdir(version_dir) if ".array_record" in name)


def write_checksums(version_dir: str) -> None:
    """Records size and sha256 of every array_record file of a prepared dataset (atomically)."""
    files = {name: {"bytes": os.path.getsize(os.path.join(version_dir, name)),
                    "sha256": raw.sha256_file(os.path.join(version_dir, name))} for name in _record_files(version_dir)}
    path = os.path.join(version_dir, CHECKSUM_FILE)
    temporary = f"{path}.{os.getpid()}.tmp"
    try:
        with open(temporary, "w") as f:
            json.dump({"format": 1, "algorithm": "sha256", "files": files}, f, indent=1, sort_keys=True)
        os.replace(temporary, path)
    finally:
        with contextlib.suppress(OSError):
            os.remove(temporary)


def _unreadable(path: str) -> Optional[str]:
    """Why the array_record file `path` cannot be read through, or None."""
    from array_record.python import array_record_module
    try:
        reader = array_record_module.ArrayRecordReader(path, options="readahead_buffer_size:0")
        try:
            for start in range(0, reader.num_records(), 4096):
                reader.read(list(range(start, min(start + 4096, reader.num_records()))))
        finally:
            reader.close()
    except Exception as error:  # riegeli reports a damaged chunk as RuntimeError / ValueError / OSError
        return f"unreadable: {str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__}"
    return None


def check_prepared(version_dir: str, *, full: bool = False) -> Optional[tuple[str, str]]:
    """(file, what is wrong) for the first damaged file of a prepared dataset, else None.

    Compares sizes always and sha256 checksums when `full` or the files are small (see the module
    docstring). Without a checksum file (data prepared before checksums existed), a writable
    dataset's files are read through once and the checksum file is written."""
    recorded_path = os.path.join(version_dir, CHECKSUM_FILE)
    if not os.path.isfile(recorded_path):
        if not _writable(version_dir):
            return None  # read-only and unrecorded: a failed read still names the damaged file
        for name in _record_files(version_dir):
            problem = _unreadable(os.path.join(version_dir, name))
            if problem:
                return os.path.join(version_dir, name), problem
        with contextlib.suppress(OSError):
            write_checksums(version_dir)
        return None
    try:
        with open(recorded_path) as f:
            recorded = json.load(f)["files"]
        sizes = {name: int(entry["bytes"]) for name, entry in recorded.items()}
    except (OSError, ValueError, KeyError, TypeError) as error:
        return recorded_path, f"unreadable checksum file ({type(error).__name__}: {error})"
    for name, size in sorted(sizes.items()):
        path = os.path.join(version_dir, name)
        if not os.path.isfile(path):
            return path, "missing"
        actual = os.path.getsize(path)
        if actual != size:
            return path, f"{actual:,} bytes where {size:,} were written{' (truncated)' if actual < size else ''}"
    if full or sum(sizes.values()) <= HASH_ALWAYS_BYTES:
        for name in sorted(sizes):
            path = os.path.join(version_dir, name)
            if raw.sha256_file(path) != recorded[name]["sha256"]:
                return path, "its sha256 differs from the one recorded when it was prepared (damaged bytes)"
    return None


def _set_aside(config_dir: str, file: str, problem: str) -> str:
    """Moves a damaged prepared dataset (its `<name>_<key>` directory) aside, keeping it, and
    returns where it went; DataError with the commands to rebuild it when it cannot be moved."""
    aside = stamp = f"{config_dir}.corrupt-{time.strftime('%Y%m%dT%H%M%S')}"
    number = 1
    while os.path.exists(aside):
        number += 1
        aside = f"{stamp}-{number}"
    try:
        if not _writable(os.path.dirname(config_dir)):
            raise PermissionError(errno.EACCES, "read-only", os.path.dirname(config_dir))
        os.rename(config_dir, aside)
    except OSError as error:
        raise DataError(
            f"prepared data file {file} is corrupt ({problem}), and {config_dir} cannot be moved aside to rebuild it "
            f"({error.strerror or error}). Rebuild it: as a user who can write {os.path.dirname(config_dir)}, run\n"
            f"    mv '{config_dir}' '{aside}'\n"
            "and run the same command again; or prepare the data in a folder you can write: add "
            "data.prepared_dir=~/.cache/flaxen/prepared (or export FLAXEN_PREPARED_DIR=~/.cache/flaxen/prepared) to "
            "the same command") from None
    return aside


def _repair(config_dir: str, found: tuple[str, str]) -> None:
    file, problem = found
    aside = _set_aside(config_dir, file, problem)
    print(f"flaxen.data: prepared data file {file} is corrupt ({problem}); moved {config_dir} to {aside} "
          "(kept for inspection) and preparing it again", flush=True)


def _damaged_file_of(version_dir: str, split_file_part: str) -> Optional[tuple[str, str]]:
    """After a failed read: the damaged file by checksum (or, without checksums, by reading each
    file of the split through)."""
    found = check_prepared(version_dir, full=True) if os.path.isfile(os.path.join(version_dir, CHECKSUM_FILE)) else None
    if found is None:
        for name in _record_files(version_dir):
            if split_file_part in name:
                problem = _unreadable(os.path.join(version_dir, name))
                if problem:
                    return os.path.join(version_dir, name), problem
    return found


# ---------------------------------------------------------------- reading prepared data

def _field_reader(feature, key: str) -> Callable[[Any], Any]:
    """A function from a proto `Feature` to the value tfds would decode, for flat text/int/float features."""
    if isinstance(feature, tfds.features.Tensor) and feature.shape == (None,):
        kind = np.dtype(feature.np_dtype).kind
        if kind == "O":
            return lambda f: [b.decode("utf-8") for b in f.bytes_list.value]
        if kind in "iu":
            return lambda f: list(f.int64_list.value)
    if isinstance(feature, tfds.features.Sequence):
        inner = feature.feature
        if isinstance(inner, tfds.features.Text):
            return lambda f: [b.decode("utf-8") for b in f.bytes_list.value]
        if isinstance(inner, tfds.features.ClassLabel) or (
                isinstance(inner, tfds.features.Tensor) and np.dtype(inner.np_dtype).kind in "iu"):
            return lambda f: list(f.int64_list.value)
    elif isinstance(feature, tfds.features.Text):
        return lambda f: f.bytes_list.value[0].decode("utf-8")
    elif isinstance(feature, tfds.features.ClassLabel):
        return lambda f: int(f.int64_list.value[0])
    elif isinstance(feature, tfds.features.Tensor) and feature.shape == ():
        kind = np.dtype(feature.np_dtype).kind
        if kind == "O":
            return lambda f: f.bytes_list.value[0].decode("utf-8")
        if kind in "iu":
            return lambda f: int(f.int64_list.value[0])
        if kind == "f":
            return lambda f: float(f.float_list.value[0])
    raise ConfigError(f"feature {key!r} ({type(feature).__name__}) is not a text, label or number feature "
                      "that flaxen can read")


def _sequence_member_reader(feature, key: str) -> Callable[[Any], Any]:
    """A reader for a scalar text/int feature inside a tfds Sequence of dicts (stored as one list)."""
    scalar = isinstance(feature, (tfds.features.ClassLabel, tfds.features.Tensor)) and feature.shape == ()
    if isinstance(feature, tfds.features.Text) or (scalar and np.dtype(feature.np_dtype).kind == "O"):
        return lambda f: [b.decode("utf-8") for b in f.bytes_list.value]
    if scalar and np.dtype(feature.np_dtype).kind in "iu":
        return lambda f: list(f.int64_list.value)
    raise ConfigError(f"feature {key!r} ({type(feature).__name__}) is not a text or integer feature that flaxen "
                      "can read")


def _find_feature(features, name: str):
    """The tfds feature called `name` ("answers/text": member `text` of the Sequence `answers`, which
    the stored proto keeps under that path) and a reader for its value, or None when there is none."""
    head, _, member = name.partition("/")
    if head not in features:
        return None
    feature = features[head]
    if not member:
        return feature, _field_reader(feature, name)
    if isinstance(feature, tfds.features.Sequence) and isinstance(feature.feature, tfds.features.FeaturesDict) \
            and member in feature.feature.keys() and "/" not in member:
        inner = feature.feature[member]
        return inner, _sequence_member_reader(inner, name)
    return None


def _feature_names(features) -> list[str]:
    names = []
    for key in sorted(features.keys()):
        feature = features[key]
        names.append(key)
        if isinstance(feature, tfds.features.Sequence) and isinstance(feature.feature, tfds.features.FeaturesDict):
            names.extend(f"{key}/{member}" for member in sorted(feature.feature.keys()))
    return names


def read_split(builder, split: str, fields: dict[str, str]) -> list[dict]:
    """All records of `split` of a prepared tfds dataset, {our_name: value} for `fields` (our name ->
    tfds feature name, or `sequence/member` for a member of a Sequence of dicts, read as a list),
    decoded straight from the stored protos."""
    features = builder.info.features
    readers = {}
    for ours, theirs in fields.items():
        found = _find_feature(features, theirs)
        if found is None:
            raise ConfigError(f"tfds dataset {builder.name!r} has no feature {theirs!r} (data.tfds_features.{ours}); "
                              f"it has {_feature_names(features)}")
        readers[ours] = (theirs, found[1])
    source = builder.as_data_source(split, deserialize_method=tfds_decode.DeserializeMethod.RAW_BYTES)
    blobs = source.__getitems__(list(range(len(source)))) if len(source) else []
    records = []
    for blob in blobs:
        feature = tf_example_pb2.Example.FromString(blob).features.feature
        records.append({ours: read(feature[theirs]) for ours, (theirs, read) in readers.items()})
    return records


@dataclass
class PreparedDataset:
    """A prepared tfds dataset and how its records map to flaxen's record schema."""
    builder: Any
    schema: str
    fields: dict[str, str]
    split_names: dict[str, str]
    label_names: Optional[list[str]] = None
    tag_scheme: Optional[str] = None
    regression: bool = False
    tag_conversion: Optional[tuple[str, str]] = None
    _cache: dict = field(default_factory=dict, repr=False)

    @property
    def path(self) -> str:
        return str(self.builder.data_dir)

    @property
    def splits(self) -> list[str]:
        return list(self.split_names)

    def num_records(self, split: str) -> int:
        return self.builder.info.splits[self._split(split)].num_examples

    def _split(self, split: str) -> str:
        if split not in self.split_names:
            raise ConfigError(f"split {split!r} is not in the data: it has {sorted(self.split_names)}")
        return self.split_names[split]

    def records(self, split: str) -> list[dict]:
        """Every record of `split`, in stored order (read once, then kept)."""
        if split not in self._cache:
            try:
                records = read_split(self.builder, self._split(split), self.fields)
            except (ConfigError, DataError):
                raise
            except Exception as error:
                self._read_failed(split, error)
                raise
            if not records:
                raise DataError(f"split {split!r} of {self.path} is empty")
            if self.schema == "classification":
                for record in records:
                    record.setdefault("text_pair", "")
            if self.tag_conversion is not None:
                self._convert_tags(split, records)
            self._cache[split] = records
        return self._cache[split]


    def _read_failed(self, split: str, error: Exception) -> None:
        """Raises DataError naming the damaged file when one of `split`'s files is; the dataset is moved
        aside (when writable) so the next run prepares it again."""
        found = _damaged_file_of(self.path, f"-{self._split(split)}.array_record")
        if found is None:
            return
        file, problem = found
        config_dir = os.path.dirname(self.path)
        aside = _set_aside(config_dir, file, problem)
        raise DataError(f"reading split {split!r} failed ({type(error).__name__}: {error}): prepared data file {file} "
                        f"is corrupt ({problem}). Moved {config_dir} to {aside} (kept for inspection); run the same "
                        "command again to prepare the data again") from error

    def texts(self, split: str) -> list[str]:
        """The split's text: chunks that concatenate to the corpus (text data), else one string per
        sentence (tagging: words joined by spaces) or per text field (classification); qa: each
        distinct context, then every question; parallel: each pair's source, then its target."""
        records = self.records(split)
        if self.schema == "text":
            return [r["text"] for r in records]
        if self.schema == "parallel":
            return [t for r in records for t in (r["source"], r["target"])]
        if self.schema == "tagging":
            return [" ".join(r["tokens"]) for r in records]
        if self.schema == SCHEMAS["squad"]:  # qa records
            return list(dict.fromkeys(r["context"] for r in records)) + [r["question"] for r in records]
        return [t for r in records for t in (r["text"], r["text_pair"]) if t]

    def _convert_tags(self, split: str, records: list[dict]) -> None:
        source, target = self.tag_conversion
        index = {name: i for i, name in enumerate(self.label_names)}
        for number, record in enumerate(records):
            converted = tag_schemes.convert([self.label_names[t] for t in record["tags"]], source, target)
            missing = [t for t in converted if t not in index]
            if missing:
                raise DataError(f"split {split!r} sentence {number}: converting {source} to {target} gives tags "
                                f"{missing} that {self.path} has no label for")
            record["tags"] = [index[t] for t in converted]


def _label_names(builder, key: Optional[str]) -> Optional[list[str]]:
    if key is None:
        return None
    feature = builder.info.features[key]
    if isinstance(feature, tfds.features.Sequence):
        feature = feature.feature
    return list(feature.names) if isinstance(feature, tfds.features.ClassLabel) else None


# ---------------------------------------------------------------- building local datasets

def _split_files(cfg: DataConfig, data_dir: str) -> dict:
    """split -> raw file path; for aligned parallel files split -> (source path, target path)."""
    def found(key: str, relative: str, suffix: str = "", how: str = "") -> str:
        path = os.path.join(os.path.expanduser(data_dir), os.path.expanduser(relative)) + suffix
        if not os.path.isfile(path):
            raise DataError(f"{key}: file not found: {path} ({how}data_dir={data_dir!r}; point data_dir, "
                            f"or FLAXEN_DATA_DIR, at the folder that holds {relative}{suffix})")
        return path

    files = {}
    aligned = cfg.source == "parallel" and cfg.source_column is None
    for split, relative in cfg.splits.items():
        key = f"data.splits.{split}"
        if not aligned:
            files[split] = found(key, relative)
        elif cfg.target_splits:
            files[split] = (found(key, relative), found(f"data.target_splits.{split}", cfg.target_splits[split]))
        else:
            files[split] = tuple(found(key, relative, f".{language}", f"{key}={relative} with data.{side}_language="
                                       f"{language}; ")
                                 for side, language in (("source", cfg.source_language),
                                                        ("target", cfg.target_language)))
    return files


def _options(cfg: DataConfig, source: str) -> dict:
    """The settings that shape the prepared records (part of the dataset's key)."""
    if source == "conll":
        options = {"token_column": cfg.token_column, "tag_column": cfg.tag_column, "separator": cfg.separator,
                   "tag_scheme": cfg.tag_scheme, "convert_tag_scheme": cfg.convert_tag_scheme,
                   "label_names": list(cfg.label_names) if cfg.label_names is not None else None}
    elif source == "delimited":
        options = {"format": cfg.format, "header": cfg.header, "text_columns": list(cfg.text_columns),
                   "label_column": cfg.label_column, "regression": cfg.regression,
                   "label_names": list(cfg.label_names) if cfg.label_names is not None else None}
    elif source == "squad":
        options = {"schema": "qa"}
    elif source == "parallel":
        options = {"schema": "parallel"}
        if cfg.source_column is not None:
            options.update(format=cfg.format, header=cfg.header, source_column=cfg.source_column,
                           target_column=cfg.target_column)
    else:
        options = {"validation_fraction": cfg.validation_fraction if "validation" not in cfg.splits else None,
                   "chunk": TEXT_CHUNK_CHARS}
    if cfg.holdout_groups > 0:
        # only when on, so the keys of datasets prepared without a held-out split stay as they were
        options["holdout"] = {"key": cfg.holdout_key, "groups": cfg.holdout_groups, "from": cfg.holdout_from,
                              "to": cfg.holdout_to, "seed": cfg.holdout_seed}
    return options


def hold_out(split_records: dict[str, list[dict]], *, key: str, groups: int, source_split: str, target_split: str,
             seed: int, origin: str = "the records") -> dict[str, list[dict]]:
    """Moves every record of `groups` whole groups (records with one value of field `key`) from
    `source_split` to a new split `target_split`, both keeping their stored order.

    The groups are the first `groups` of the sorted distinct values permuted by a seeded hash
    (value order by sha256 of "<seed>:<value>"): a pure function of the records and the settings,
    the same on every machine and NumPy version. ConfigError when `key` is not a field of the
    records (naming the fields), when `target_split` exists, or when `groups` leaves no group behind.
    """
    if target_split in split_records:
        raise ConfigError(f"data.holdout_to={target_split!r}: {origin} already have a split {target_split!r}; "
                          "name a new split")
    if source_split not in split_records:
        raise ConfigError(f"data.holdout_from={source_split!r}: {origin} have splits {sorted(split_records)}")
    records = split_records[source_split]
    fields = sorted(records[0]) if records else []
    if key not in fields:
        raise ConfigError(f"data.holdout_key={key!r} is not a field of {origin} (split {source_split!r}); "
                          f"their fields are {', '.join(fields)}")
    values = []
    for number, record in enumerate(records):
        value = record[key]
        if not isinstance(value, (str, int, float, bool)):
            raise ConfigError(f"data.holdout_key={key!r}: record {number} of split {source_split!r} holds a "
                              f"{type(value).__name__}; a group key must be one text or number per record")
        values.append(value)
    distinct = sorted(set(values), key=lambda v: (type(v).__name__, v))
    if groups >= len(distinct):
        raise ConfigError(f"data.holdout_groups={groups}: split {source_split!r} of {origin} has only "
                          f"{len(distinct)} distinct {key!r} values; at least one group must stay in {source_split!r}")
    order = sorted(distinct, key=lambda v: hashlib.sha256(f"{seed}:{v!r}".encode()).hexdigest())
    chosen = set(order[:groups])
    out = {split: list(rows) for split, rows in split_records.items()}
    out[source_split] = [r for r, v in zip(records, values) if v not in chosen]
    out[target_split] = [r for r, v in zip(records, values) if v in chosen]
    return out


def _text_chunks(text: str) -> list[dict]:
    chunks, start = [], 0
    while start < len(text):
        end = text.find("\n", start + TEXT_CHUNK_CHARS)
        end = len(text) if end < 0 else end + 1
        chunks.append({"text": text[start:end]})
        start = end
    return chunks


def _parse_text(cfg: DataConfig, files: dict[str, str]) -> dict[str, list[dict]]:
    texts = {}
    for split, path in files.items():
        texts[split] = raw.read_text(path, f"data.splits.{split}")
        if not texts[split]:
            raise DataError(f"{path}: empty file (an empty split, data.splits.{split})")
    if "validation" not in texts and cfg.validation_fraction > 0:
        train = texts["train"]
        cut = int(len(train) * (1.0 - cfg.validation_fraction))
        if cut == 0 or cut == len(train):
            raise DataError(f"{files['train']}: {len(train)} characters are too few to carve off "
                            f"data.validation_fraction={cfg.validation_fraction} as a validation split")
        texts["train"], texts["validation"] = train[:cut], train[cut:]
    return {split: _text_chunks(text) for split, text in texts.items()}


def _parse_conll(cfg: DataConfig, files: dict[str, str]):
    options = dict(token_column=cfg.token_column, tag_column=cfg.tag_column, separator=cfg.separator,
                   tag_scheme=cfg.tag_scheme)
    declared = list(cfg.label_names) if cfg.label_names is not None else None
    parsed = {"train": raw.parse_conll(files["train"], allowed=declared, **options)}
    found = raw.sorted_labels({t for s in parsed["train"] for t in s["tags"]})
    allowed, origin = (declared, "data.label_names") if declared is not None else (
        found, f"the tags of the train split {files['train']} (declare data.label_names to list every tag)")
    for split, path in files.items():
        if split != "train":
            parsed[split] = raw.parse_conll(path, allowed=allowed, allowed_origin=origin, **options)
    target = cfg.convert_tag_scheme or cfg.tag_scheme
    if cfg.convert_tag_scheme and cfg.convert_tag_scheme != cfg.tag_scheme:
        for sentences in parsed.values():
            for sentence in sentences:
                sentence["tags"] = tag_schemes.convert(sentence["tags"], cfg.tag_scheme, target)
        if declared is None:
            found = raw.sorted_labels({t for s in parsed["train"] for t in s["tags"]})
            unseen = {t for sentences in parsed.values() for s in sentences for t in s["tags"]} - set(found)
            found = found + sorted(unseen)
    names = declared if declared is not None else found
    if declared is not None:
        converted = {t for sentences in parsed.values() for s in sentences for t in s["tags"]}
        if not converted <= set(declared):
            raise DataError(f"converting {cfg.tag_scheme} to {target} produced tags {sorted(converted - set(declared))} "
                            "that are not in data.label_names")
    index = {name: i for i, name in enumerate(names)}
    for sentences in parsed.values():
        for sentence in sentences:
            sentence["tags"] = np.asarray([index[t] for t in sentence["tags"]], np.int64)
            sentence["tokens"] = np.asarray(sentence["tokens"], object)
    features = tfds.features.FeaturesDict({"tokens": tfds.features.Tensor(shape=(None,), dtype=np.object_),
                                           "tags": tfds.features.Tensor(shape=(None,), dtype=np.int64)})
    return parsed, features, {"label_names": names}


def _parse_delimited(cfg: DataConfig, files: dict[str, str]):
    options = dict(format=cfg.format, header=cfg.header, text_columns=list(cfg.text_columns),
                   label_column=cfg.label_column, regression=cfg.regression)
    declared = list(cfg.label_names) if cfg.label_names is not None else None
    parsed = {"train": raw.parse_delimited(files["train"], allowed=declared, **options)}
    labelled = cfg.label_column is not None
    names = None
    if labelled and not cfg.regression:
        names = declared if declared is not None else raw.sorted_labels({r["label"] for r in parsed["train"]})
    origin = "data.label_names" if declared is not None else (
        f"the labels of the train split {files['train']} (declare data.label_names to list every label)")
    for split, path in files.items():
        if split != "train":
            parsed[split] = raw.parse_delimited(path, allowed=names, allowed_origin=origin, **options)
    spec = {"text": tfds.features.Text()}
    if len(cfg.text_columns) > 1:
        spec["text_pair"] = tfds.features.Text()
    else:
        for records in parsed.values():
            for record in records:
                del record["text_pair"]
    if labelled:
        spec["label"] = (tfds.features.Tensor(shape=(), dtype=np.float32) if cfg.regression
                         else tfds.features.ClassLabel(names=names))
        if cfg.regression:
            for records in parsed.values():
                for record in records:
                    record["label"] = float(record["label"])
    return parsed, tfds.features.FeaturesDict(spec), None


def _parse_squad(cfg: DataConfig, files: dict[str, str]):
    parsed = {split: raw.parse_squad(path) for split, path in files.items()}
    seen = {}
    for split, records in parsed.items():
        for record in records:
            if record["id"] in seen and seen[record["id"]] != split:
                raise DataError(f"question id {record['id']!r} is in both {files[seen[record['id']]]} and "
                                f"{files[split]}; ids must be unique across splits")
            seen[record["id"]] = split
            record["answer_texts"] = np.asarray(record["answer_texts"], object)
            record["answer_starts"] = np.asarray(record["answer_starts"], np.int64)
    features = tfds.features.FeaturesDict({
        "id": tfds.features.Text(), "title": tfds.features.Text(), "context": tfds.features.Text(),
        "question": tfds.features.Text(),
        "answer_texts": tfds.features.Tensor(shape=(None,), dtype=np.object_),
        "answer_starts": tfds.features.Tensor(shape=(None,), dtype=np.int64)})
    return parsed, features, None


def _parse_parallel(cfg: DataConfig, files: dict):
    parsed = {}
    for split, paths in files.items():
        if cfg.source_column is not None:
            parsed[split] = raw.parse_parallel_delimited(paths, format=cfg.format, header=cfg.header,
                                                         source_column=cfg.source_column,
                                                         target_column=cfg.target_column)
        else:
            parsed[split] = raw.parse_parallel_lines(*paths)
    features = tfds.features.FeaturesDict({"source": tfds.features.Text(), "target": tfds.features.Text()})
    return parsed, features, None


def _file_key(paths) -> list:
    """[name, sha256] of a split's file; for a parallel split's two files, one such pair each."""
    if isinstance(paths, (tuple, list)):
        return [_file_key(path) for path in paths]
    return [os.path.basename(paths), raw.sha256_file(paths)]


def _described(paths) -> str:
    return " and ".join(paths) if isinstance(paths, (tuple, list)) else str(paths)


def _local_source(cfg: DataConfig, data_dir: str, root: str, presets) -> tuple[str, DataConfig, dict[str, str]]:
    """(builder kind, effective config, split -> file) for local and generated data."""
    if cfg.source == "synthetic":
        kind, effective, files = synthetic.write_files(cfg, os.path.join(root, "quickstart"))
        return kind, effective, files
    if cfg.source == "mixture":
        files = _write_mixture(cfg, data_dir, os.path.join(root, "mixture", _safe_name(cfg.name)), presets)
        return "text", dataclasses.replace(cfg, source="text", splits=files), files
    return cfg.source, cfg, _split_files(cfg, data_dir)


def mixture_component(name: str, presets) -> DataConfig:
    """The data preset `name` as a DataConfig (a component of a mixture); `presets(name)` is the
    caller's preset lookup (flaxen.config.data_preset reads configs/data/<name>.yaml)."""
    if presets is None:
        raise ConfigError("data.source=mixture: no data presets to look its components up in (pass "
                          "presets=flaxen.config.data_preset to load_task_data)")
    component = presets(name)
    if component.source in ("mixture", "tfds"):
        raise ConfigError(f"data.mixture: {name!r} has source={component.source}; a mixture takes local presets only")
    return component


def _write_mixture(cfg: DataConfig, data_dir: str, directory: str, presets) -> dict[str, str]:
    """train.txt and validation.txt of a mixture: the train-split text of every component, one
    sentence (or line) per line; the last `validation_fraction` of each component's lines is held out
    as validation, so no component's validation or test text is ever read. Files are rewritten only
    when their content changes (their checksums key the prepared dataset)."""
    lines = {"train": [], "validation": []}
    components = {name: mixture_component(name, presets) for name in cfg.mixture}
    for name, component_cfg in components.items():
        prepared = prepare(component_cfg, data_dir)
        texts = prepared.texts("train")
        if prepared.schema == "text":
            texts = [line for chunk in texts for line in chunk.split("\n")]
        component = [" ".join(t.split()) for t in texts if t.strip()]
        held_out = int(round(len(component) * cfg.validation_fraction))
        if held_out >= len(component):
            raise DataError(f"data.mixture: {name!r} has {len(component)} lines of train text, too few to hold out "
                            f"data.validation_fraction={cfg.validation_fraction}")
        lines["train"] += component[:len(component) - held_out]
        lines["validation"] += component[len(component) - held_out:]
    os.makedirs(directory, exist_ok=True)
    files = {}
    for split, content in lines.items():
        if not content:
            continue
        text = "\n".join(content) + "\n"
        path = files[split] = os.path.join(directory, f"{split}.txt")
        if os.path.isfile(path):
            with open(path, encoding="utf-8") as f:
                if f.read() == text:
                    continue
        temporary = f"{path}.{os.getpid()}.tmp"
        with open(temporary, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(temporary, path)
    return files


def prepare(cfg: DataConfig, data_dir: str, presets=None) -> PreparedDataset:
    """The prepared tfds dataset for `cfg`: reused when the raw files are unchanged, else built."""
    root = prepared_root(cfg, data_dir)
    if cfg.source == "tfds":
        return _prepare_catalog(cfg, root)
    kind, cfg, files = _local_source(cfg, data_dir, root, presets)
    key_material = {"builder": kind, "format": FORMAT_VERSION, "options": _options(cfg, kind),
                    "files": {split: _file_key(paths) for split, paths in sorted(files.items())}}
    key = hashlib.sha256(json.dumps(key_material, sort_keys=True).encode()).hexdigest()[:16]
    builder_cls = BUILDERS[kind]
    config_name = f"{_safe_name(cfg.name)}_{key}"
    version_dir = os.path.join(root, builder_cls.name, config_name, FORMAT_VERSION)
    with _locked(root, f"{builder_cls.name}-{config_name}"):
        builder = None
        if os.path.isfile(os.path.join(version_dir, "dataset_info.json")):
            builder, found = _open_checked(version_dir)
            if found is not None:
                _repair(os.path.dirname(version_dir), found)
                builder = None
        if builder is None:
            _build(builder_cls, kind, cfg, files, root, config_name, key_material)
            builder = tfds.builder_from_directory(version_dir)
    schema = SCHEMAS[kind]
    fields = {"tagging": {"tokens": "tokens", "tags": "tags"}, "text": {"text": "text"},
              "qa": {k: k for k in QA_FIELDS}, "parallel": {"source": "source", "target": "target"},
              "classification": {k: k for k in builder.info.features.keys()}}[schema]
    if schema == "tagging":
        names = list(builder.info.metadata["label_names"])
    else:
        names = _label_names(builder, "label" if "label" in fields else None)
    return PreparedDataset(builder=builder, schema=schema, fields=fields,
                           split_names={s: s for s in builder.info.splits.keys()}, label_names=names,
                           tag_scheme=(cfg.convert_tag_scheme or cfg.tag_scheme) if schema == "tagging" else None,
                           regression=bool(cfg.regression) and schema == "classification")


def _open_checked(version_dir: str):
    """(tfds builder or None, damaged (file, problem) or None) of a prepared dataset."""
    found = check_prepared(version_dir)
    if found is not None:
        return None, found
    try:
        with _absl_quiet():
            return tfds.builder_from_directory(version_dir), None
    except Exception as error:  # damaged dataset_info.json / features.json
        return None, (version_dir, f"tfds cannot open it: {type(error).__name__}: {str(error).splitlines()[0]}")


def _build(builder_cls, kind: str, cfg: DataConfig, files: dict[str, str], root: str, config_name: str,
           key_material: dict) -> None:
    if kind == "conll":
        split_records, features, metadata = _parse_conll(cfg, files)
    elif kind == "delimited":
        split_records, features, metadata = _parse_delimited(cfg, files)
    elif kind == "squad":
        split_records, features, metadata = _parse_squad(cfg, files)
    elif kind == "parallel":
        split_records, features, metadata = _parse_parallel(cfg, files)
    else:
        split_records, metadata = _parse_text(cfg, files), None
        features = tfds.features.FeaturesDict({"text": tfds.features.Text()})
    if cfg.holdout_groups > 0:
        split_records = hold_out(split_records, key=cfg.holdout_key, groups=cfg.holdout_groups,
                                 source_split=cfg.holdout_from, target_split=cfg.holdout_to, seed=cfg.holdout_seed,
                                 origin=f"the records of {_described(files.get(cfg.holdout_from, cfg.name))}")
    description = f"flaxen {kind} dataset {cfg.name!r}: " + json.dumps(key_material, sort_keys=True)
    with _absl_quiet():
        builder = builder_cls(features=features, split_records=split_records, description=description,
                              metadata=metadata, data_dir=root, config=tfds.core.BuilderConfig(name=config_name),
                              file_format="array_record")
    config_dir = os.path.dirname(os.path.join(root, builder_cls.name, config_name, FORMAT_VERSION))
    counts = ", ".join(f"{split} {len(records):,}" for split, records in split_records.items())
    print(f"flaxen.data: preparing {cfg.name!r} ({counts} records) into {os.path.join(config_dir, FORMAT_VERSION)}",
          flush=True)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            builder.download_and_prepare(download_dir=os.path.join(root, "downloads"))
    except BaseException:
        with contextlib.suppress(OSError):
            os.rmdir(config_dir)
        raise
    write_checksums(os.path.join(config_dir, FORMAT_VERSION))


# ---------------------------------------------------------------- catalog datasets

def _catalog_builder(name: str, root: str):
    import tensorflow_datasets.text.conll2003  # noqa: F401  (registers the text catalog without TensorFlow)
    import tensorflow_datasets.text.glue  # noqa: F401
    try:
        return tfds.builder(name, data_dir=root, file_format="array_record")
    except Exception as error:
        raise ConfigError(f"data.tfds_name={name!r}: not a tfds catalog dataset ({str(error).splitlines()[0]})") from None


def _unreachable(builder) -> list[str]:
    """Hosts of the builder's registered download URLs when none resolves (offline), else []: tfds's
    downloader would retry each for minutes before failing."""
    try:
        hosts = sorted({urllib.parse.urlparse(url).hostname for url in (builder.url_infos or {})} - {None})
    except Exception:
        return []
    for host in hosts:
        try:
            socket.getaddrinfo(host, 443)
            return []
        except OSError:
            continue
    return hosts


def _prepare_catalog(cfg: DataConfig, root: str) -> PreparedDataset:
    builder = _catalog_builder(cfg.tfds_name, root)
    with _locked(root, _safe_name(cfg.tfds_name)):
        if builder.is_prepared():
            version_dir = str(builder.data_dir)
            found = check_prepared(version_dir)
            if found is not None:
                _repair(os.path.dirname(version_dir), found)
                builder = _catalog_builder(cfg.tfds_name, root)
        if not builder.is_prepared():
            try:
                hosts = _unreachable(builder)
                if hosts:
                    raise ConnectionError(f"cannot resolve {', '.join(hosts)}")
                builder.download_and_prepare(file_format="array_record")
            except Exception as error:
                cause = f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
                if isinstance(error, ModuleNotFoundError) and error.name == "importlib_resources":
                    cause += ("; tfds 4.9.10 needs the importlib_resources package to prepare catalog datasets "
                              "(pip install importlib_resources)")
                elif isinstance(error, (ModuleNotFoundError, AttributeError)) and "tensorflow" in str(error).lower():
                    cause += "; this catalog builder reads its download with TensorFlow, which flaxen does not install"
                raise DataError(
                    f"could not download and prepare tfds catalog dataset {cfg.tfds_name!r} into {root} "
                    f"({cause}). Offline, use the "
                    "local files instead: a data preset with data.source=conll|delimited|text|squad (e.g. data=sst2, "
                    "data=conll2003, data=shakespeare_char, data=squad) and data_dir (or FLAXEN_DATA_DIR) pointing at "
                    "the folder that holds them, e.g. <data_dir>/sst2/train.tsv.") from error
            write_checksums(str(builder.data_dir))
    fields = dict(cfg.tfds_features)
    schema = ("qa" if "question" in fields else "tagging" if "tokens" in fields
              else "classification" if "label" in fields else "text")
    split_names = dict(cfg.tfds_splits) or {s: s for s in builder.info.splits.keys()}
    for ours, theirs in split_names.items():
        if theirs not in builder.info.splits:
            raise ConfigError(f"data.tfds_splits.{ours}={theirs!r}: {cfg.tfds_name} has splits {sorted(builder.info.splits)}")
    label_key = fields.get("tags") or fields.get("label")
    for key in fields.values():
        if _find_feature(builder.info.features, key) is None:
            raise ConfigError(f"tfds dataset {cfg.tfds_name!r} has no feature {key!r} (data.tfds_features); it has "
                              f"{_feature_names(builder.info.features)}")
    names = _label_names(builder, label_key)
    regression = schema == "classification" and names is None
    conversion = None
    if schema == "tagging" and cfg.convert_tag_scheme and cfg.convert_tag_scheme != cfg.tag_scheme:
        conversion = (cfg.tag_scheme, cfg.convert_tag_scheme)
    return PreparedDataset(builder=builder, schema=schema, fields=fields, split_names=split_names,
                           label_names=names, regression=regression, tag_conversion=conversion,
                           tag_scheme=(cfg.convert_tag_scheme or cfg.tag_scheme) if schema == "tagging" else None)
