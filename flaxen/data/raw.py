"""Parsing raw local files (CoNLL columns, TSV/CSV/JSONL rows, plain text, SQuAD JSON) into records.

Why: every mistake in a raw file must stop the run with the file and line that caused it (never a
silent skip), before anything is written to the prepared-data directory. The parsers here hold the
whole split in memory (the largest, SST-2's train.tsv, is 4 MB) and return plain records:

  tagging:        {"tokens": [str, ...], "tags": [str, ...]}     one per sentence
  classification: {"text": str, "text_pair": str, "label": str}  one per row (text_pair "" if none)
  text:           one str, the whole file
  qa:             {"id": str, "title": str, "context": str, "question": str, "answer_texts": [str, ...],
                   "answer_starts": [int, ...]}  one per question of a SQuAD v1.1 JSON file
  parallel:       {"source": str, "target": str}  one per sentence pair (aligned line files, or a
                   TSV/CSV/JSONL row); texts are kept exactly as written (no stripping)

Labels stay strings here; the builder turns them into ids once the label set is known.
"""
from __future__ import annotations

import csv
import hashlib
import io
import json
import os
from typing import Collection, Optional

from flaxen.data import tags as tag_schemes
from flaxen.errors import DataError


def sha256_file(path: str) -> str:
    """The hex sha256 of a file's bytes, read in 1 MiB blocks (raw data, prepared data, checkpoints)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


DOCSTART = "-DOCSTART-"


def read_text(path: str, what: str) -> str:
    """The file decoded as UTF-8 (a leading BOM dropped); DataError naming the line of a bad byte."""
    if not os.path.isfile(path):
        raise DataError(f"{what}: file not found: {path}")
    with open(path, "rb") as f:
        data = f.read()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as error:
        line = data.count(b"\n", 0, error.start) + 1
        column = error.start - (data.rfind(b"\n", 0, error.start) + 1) + 1
        raise DataError(f"{path}:{line}: bytes that are not UTF-8 at column {column} "
                        f"({data[error.start:error.end]!r}); re-encode the file as UTF-8") from None
    return text[1:] if text.startswith("\ufeff") else text


def _lines(text: str):
    """(line number, line without its end-of-line) for every line of `text`."""
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    for number, line in enumerate(lines, 1):
        yield number, line[:-1] if line.endswith("\r") else line


def _not_allowed(path: str, line: int, kind: str, value: str, allowed: Collection[str], origin: str) -> DataError:
    shown = sorted(allowed)
    listing = ", ".join(shown[:20]) + (" ..." if len(shown) > 20 else "")
    return DataError(f"{path}:{line}: {kind} {value!r} is not in {origin} ({listing})")


def parse_conll(path: str, *, token_column: int, tag_column: int, separator: Optional[str],
                tag_scheme: Optional[str], allowed: Optional[Collection[str]] = None,
                allowed_origin: str = "data.label_names") -> list[dict]:
    """Sentences of a CoNLL-style file: one token per line, columns split by `separator` (None: any
    whitespace), whitespace-only lines end a sentence, `-DOCSTART-` lines are skipped. Every token
    line must have as many columns as the file's first one."""
    text = read_text(path, "CoNLL file")
    sentences, tokens, tags = [], [], []
    expected, first_line = None, 0
    for number, line in _lines(text):
        if not line.strip():
            if tokens:
                sentences.append({"tokens": tokens, "tags": tags})
                tokens, tags = [], []
            continue
        fields = line.split() if separator is None else line.rstrip().split(separator)
        if expected is None:
            expected, first_line = len(fields), number
            for key, index in (("token_column", token_column), ("tag_column", tag_column)):
                if not -expected <= index < expected:
                    raise DataError(f"{path}:{number}: data.{key}={index} but the line has {expected} columns")
        if len(fields) != expected:
            how = "whitespace" if separator is None else ("tab" if separator == "\t" else "space")
            raise DataError(f"{path}:{number}: expected {expected} {how}-separated columns (as on line "
                            f"{first_line}), found {len(fields)}: {line!r}")
        token, tag = fields[token_column], fields[tag_column]
        if token == DOCSTART:
            if tokens:
                sentences.append({"tokens": tokens, "tags": tags})
                tokens, tags = [], []
            continue
        if allowed is not None:
            if tag not in allowed:
                raise _not_allowed(path, number, "tag", tag, allowed, allowed_origin)
        elif tag_scheme is not None and not tag_schemes.is_iob_tag(tag):
            raise DataError(f"{path}:{number}: tag {tag!r} is not an {tag_scheme} tag (O, B-TYPE or I-TYPE); "
                            "set data.tag_scheme=null for plain tags")
        tokens.append(token)
        tags.append(tag)
    if tokens:
        sentences.append({"tokens": tokens, "tags": tags})
    if not sentences:
        raise DataError(f"{path}: no sentences found (an empty split)")
    return sentences


def _column_index(path: str, key: str, column: str, header: Optional[list[str]]) -> int:
    if header is not None and column in header:
        return header.index(column)
    if column.lstrip("-").isdigit():
        return int(column)
    if header is None:
        raise DataError(f"{path}: data.{key} names column {column!r} but data.header=false; use a column index")
    raise DataError(f"{path}:1: data.{key} names column {column!r}, not in the header {header}")


def _delimited_rows(path: str, format: str, header: bool) -> tuple[list, Optional[list[str]]]:
    """([(line number, row), ...], header fields or None) of a TSV, CSV or JSONL file: rows are
    field lists (TSV/CSV, all as wide as the header or the first row) or dicts (JSONL)."""
    text = read_text(path, f"{format.upper()} file")
    rows = []
    if format == "jsonl":
        for number, line in _lines(text):
            if not line.strip():
                raise DataError(f"{path}:{number}: empty line (one JSON object per line expected)")
            try:
                row = json.loads(line)
            except json.JSONDecodeError as error:
                raise DataError(f"{path}:{number}: not valid JSON ({error.msg} at column {error.colno})") from None
            if not isinstance(row, dict):
                raise DataError(f"{path}:{number}: expected a JSON object, found {type(row).__name__}")
            rows.append((number, row))
        keys = None
    else:
        if format == "tsv":
            records = [(number, line.split("\t")) for number, line in _lines(text)]
        else:
            reader = csv.reader(io.StringIO(text, newline=""))
            records, start = [], 1
            try:
                for fields in reader:
                    records.append((start, fields))
                    start = reader.line_num + 1
            except csv.Error as error:
                raise DataError(f"{path}:{reader.line_num}: malformed CSV ({error})") from None
        keys = None
        if header:
            if not records:
                raise DataError(f"{path}: empty file (a header line was expected; data.header=true)")
            keys = records[0][1]
            records = records[1:]
        width = len(keys) if keys is not None else (len(records[0][1]) if records else 0)
        for number, fields in records:
            if len(fields) != width:
                shown = "a header" if keys is not None else "line 1"
                raise DataError(f"{path}:{number}: expected {width} {format.upper()} fields (as in {shown}), "
                                f"found {len(fields)}")
        rows = records
    if not rows:
        raise DataError(f"{path}: no rows found (an empty split)")
    return rows, keys


def parse_delimited(path: str, *, format: str, header: bool, text_columns: list[str],
                    label_column: Optional[str], regression: bool,
                    allowed: Optional[Collection[str]] = None, allowed_origin: str = "data.label_names") -> list[dict]:
    """Rows of a TSV (tab-separated, no quoting, as GLUE ships), CSV (RFC 4180 quoting) or JSONL file.
    Columns are header names (TSV/CSV with a header, JSONL keys) or 0-based indices."""
    rows, keys = _delimited_rows(path, format, header)
    if format == "jsonl":
        def get(number, row, key, column):
            if column not in row:
                raise DataError(f"{path}:{number}: no key {column!r} (data.{key}); keys are {sorted(row)}")
            value = row[column]
            return value if isinstance(value, str) else json.dumps(value)
    else:
        indices = {column: _column_index(path, key, column, keys)
                   for key, column in [("text_columns", c) for c in text_columns] + [("label_column", label_column)]
                   if column is not None}
        width = len(rows[0][1])
        for column, index in indices.items():
            if not -width <= index < width:
                raise DataError(f"{path}: column {column!r} is out of range: rows have {width} fields")

        def get(number, row, key, column):
            return row[indices[column]]
    out = []
    for number, row in rows:
        record = {"text": get(number, row, "text_columns", text_columns[0]),
                  "text_pair": get(number, row, "text_columns", text_columns[1]) if len(text_columns) > 1 else ""}
        if label_column is not None:
            label = get(number, row, "label_column", label_column).strip()
            if regression:
                try:
                    float(label)
                except ValueError:
                    raise DataError(f"{path}:{number}: label {label!r} is not a number (data.regression=true)") from None
            elif not label:
                raise DataError(f"{path}:{number}: empty label in column {label_column!r}")
            elif allowed is not None and label not in allowed:
                raise _not_allowed(path, number, "label", label, allowed, allowed_origin)
            record["label"] = label
        out.append(record)
    return out


def _squad_field(path: str, where: str, node: dict, key: str, kind: type, what: str):
    """node[key], which must be a `kind`; DataError naming the file, the place and the key otherwise."""
    if not isinstance(node, dict):
        raise DataError(f"{path}: {where}: expected a JSON object, found {type(node).__name__}")
    if key not in node:
        raise DataError(f"{path}: {where}: no key {key!r} ({what}); keys are {sorted(node)}")
    value = node[key]
    if kind is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    else:
        ok = isinstance(value, kind)
    if not ok:
        raise DataError(f"{path}: {where}: {key!r} should be a {kind.__name__} ({what}), found "
                        f"{type(value).__name__} {value!r:.60}")
    return value


def parse_squad(path: str) -> list[dict]:
    """Questions of a SQuAD v1.1 JSON file, in file order (article, paragraph, question).

    The format: {"version": ..., "data": [{"title", "paragraphs": [{"context", "qas": [{"id",
    "question", "answers": [{"text", "answer_start"}, ...]}]}]}]}. Every answer must sit at its
    `answer_start` (context[start:start + len(text)] == text) and ids must be unique (predictions
    are keyed by id). SQuAD v2.0 unanswerable questions (`is_impossible: true`) are refused: this
    reader, the QA task and its metric are v1.1 only.
    """
    text = read_text(path, "SQuAD JSON file")
    try:
        document = json.loads(text)
    except json.JSONDecodeError as error:
        raise DataError(f"{path}:{error.lineno}:{error.colno}: not valid JSON ({error.msg}; SQuAD files are one "
                        "JSON object)") from None
    articles = _squad_field(path, "top level", document, "data", list, "the list of articles")
    records, seen = [], {}
    for a, article in enumerate(articles):
        where = f"article {a}"
        title = _squad_field(path, where, article, "title", str, "the article title")
        where = f"article {a} ({title!r})"
        paragraphs = _squad_field(path, where, article, "paragraphs", list, "the article's paragraphs")
        for p, paragraph in enumerate(paragraphs):
            where = f"article {a} ({title!r}) paragraph {p}"
            context = _squad_field(path, where, paragraph, "context", str, "the paragraph text")
            questions = _squad_field(path, where, paragraph, "qas", list, "the paragraph's questions")
            for q, qa in enumerate(questions):
                where = f"article {a} ({title!r}) paragraph {p} question {q}"
                qid = _squad_field(path, where, qa, "id", str, "the question id")
                where = f"article {a} ({title!r}) question id {qid!r}"
                if qa.get("is_impossible") is True:
                    raise DataError(f"{path}: {where} is a SQuAD v2.0 unanswerable question (is_impossible: true); "
                                    "only SQuAD v1.1 is supported (every question has an answer in its context)")
                if qid in seen:
                    raise DataError(f"{path}: question id {qid!r} appears twice ({seen[qid]} and {where}); "
                                    "ids must be unique")
                seen[qid] = where
                question = _squad_field(path, where, qa, "question", str, "the question text")
                answers = _squad_field(path, where, qa, "answers", list, "the gold answers")
                if not answers:
                    raise DataError(f"{path}: {where} has no answers; SQuAD v1.1 questions need at least one")
                texts, starts = [], []
                for n, answer in enumerate(answers):
                    place = f"{where} answer {n}"
                    answer_text = _squad_field(path, place, answer, "text", str, "the answer text")
                    start = _squad_field(path, place, answer, "answer_start", int,
                                         "its character offset in the context")
                    found = context[start:start + len(answer_text)] if 0 <= start <= len(context) else ""
                    if found != answer_text:
                        raise DataError(f"{path}: {place}: answer_start={start} does not point at the answer: "
                                        f"expected {answer_text!r} at characters {start}..{start + len(answer_text)} "
                                        f"of the context, found {found!r}")
                    texts.append(answer_text)
                    starts.append(start)
                records.append({"id": qid, "title": title, "context": context, "question": question,
                                "answer_texts": texts, "answer_starts": starts})
    if not records:
        raise DataError(f"{path}: no questions found (an empty split)")
    return records


def sorted_labels(values: Collection[str]) -> list[str]:
    """Labels in numeric order when all are integers (so '10' follows '9'), else in string order."""
    values = set(values)
    if all(v.lstrip("-").isdigit() for v in values):
        return sorted(values, key=int)
    return sorted(values)


def _sentence_lines(path: str, what: str) -> list[str]:
    """The lines of a one-sentence-per-line file; DataError naming the file and line of a blank one."""
    text = read_text(path, what)
    lines = []
    for number, line in _lines(text):
        if not line.strip():
            raise DataError(f"{path}:{number}: empty line ({what}: one sentence per line, every line paired with "
                            "the same line of the other language's file)")
        lines.append(line)
    return lines


def parse_parallel_lines(source_path: str, target_path: str) -> list[dict]:
    """Sentence pairs of two aligned files: line i of `source_path` and line i of `target_path`.
    Both must have the same number of lines and no blank line."""
    sources = _sentence_lines(source_path, "parallel source file")
    targets = _sentence_lines(target_path, "parallel target file")
    if len(sources) != len(targets):
        raise DataError(f"parallel files differ in length: {source_path} has {len(sources):,} lines but "
                        f"{target_path} has {len(targets):,}; line i of one must be the translation of line i of "
                        "the other")
    if not sources:
        raise DataError(f"{source_path}: no lines found (an empty split)")
    return [{"source": s, "target": t} for s, t in zip(sources, targets)]


def parse_parallel_delimited(path: str, *, format: str, header: bool, source_column: str,
                             target_column: str) -> list[dict]:
    """Sentence pairs from the rows of a TSV, CSV or JSONL file: columns (header names, JSONL keys or
    0-based indices) `source_column` and `target_column`, neither empty in any row."""
    rows, keys = _delimited_rows(path, format, header)
    columns = {"source": ("source_column", source_column), "target": ("target_column", target_column)}
    if format != "jsonl":
        width = len(rows[0][1])
        indices = {}
        for side, (key, column) in columns.items():
            index = indices[side] = _column_index(path, key, column, keys)
            if not -width <= index < width:
                raise DataError(f"{path}: data.{key}={column!r} is out of range: rows have {width} fields")
    out = []
    for number, row in rows:
        record = {}
        for side, (key, column) in columns.items():
            if format == "jsonl":
                if column not in row:
                    raise DataError(f"{path}:{number}: no key {column!r} (data.{key}); keys are {sorted(row)}")
                value = row[column]
                if not isinstance(value, str):
                    raise DataError(f"{path}:{number}: key {column!r} (data.{key}) holds a {type(value).__name__}, "
                                    "expected a string")
            else:
                value = row[indices[side]]
            if not value.strip():
                raise DataError(f"{path}:{number}: empty {side} text in column {column!r} (data.{key})")
            record[side] = value
        out.append(record)
    return out
