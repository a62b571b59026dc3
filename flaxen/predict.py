"""predict.py's work: a trained run's predictions for a file of inputs, one JSON object per input.

    rows = predict(load_run("runs/sst2/..."), "reviews.txt", PredictConfig(batch_size=64))
    predict_file(PredictConfig(run_dir=..., input=..., output=...))     # what predict.py calls

The task decides everything that differs (flaxen/tasks/*.py, the "prediction" methods of
flaxen.tasks.Task): which files it reads (`predict_records`, with the readers below), how an input
becomes model rows exactly as training encodes it (`predict_rows`: the run's config.yaml gives
data.max_length, text columns, doc_stride, ...), what leaves the device (`prediction_outputs`) and
the JSON it writes (`format_predictions`). This module only batches: rows are sorted by length and
cut into batches of `batch_size` rows padded to the task's bucket lengths (as training pads them),
so the jitted forward compiles once per bucket, never per batch; results are put back in input
order. One device, no mesh: a forward pass of a fine-tuned model needs no sharding.

Inputs a run cannot take in full raise one DataError naming the file and line: an input longer
than the run's length limit (unless `truncate=true`, which cuts it as training did), an empty file,
a blank line, a missing column or key.
"""
from __future__ import annotations

import csv
import dataclasses
import io
import json
import os
import sys
from dataclasses import dataclass
from typing import Any, Optional, Sequence

from flaxen.data import raw
from flaxen.errors import ConfigError, DataError

FORMATS = ("auto", "lines", "tsv", "csv", "jsonl", "conll", "squad")
# file name endings -> the format `format=auto` reads them as
EXTENSIONS = {".tsv": "tsv", ".csv": "csv", ".jsonl": "jsonl", ".json": "squad", ".conll": "conll"}


@dataclass
class PredictConfig:
    """predict.py's settings (configs/predict.yaml); the run's config.yaml decides everything else.

    format: how `input` is read; auto decides by the file name (.tsv, .csv, .jsonl, .json: SQuAD,
    .conll) and, for tagging, by blank lines between tokens (CoNLL); else one input per line.
    top_k: mlm, predictions per [MASK] (default 5); clm with do_sample, the top-k filter.
    max_new_tokens, do_sample, temperature, top_p, seed: clm generation (greedy by default).
    """
    run_dir: Optional[str] = None
    input: Optional[str] = None
    output: Optional[str] = None
    step: Optional[int] = None
    batch_size: int = 32
    truncate: bool = False
    format: str = "auto"
    top_k: Optional[int] = None
    max_new_tokens: int = 32
    do_sample: bool = False
    temperature: float = 1.0
    top_p: Optional[float] = None
    seed: int = 0
    progress_bar: bool = True


def register() -> None:
    """Registers PredictConfig in Hydra's ConfigStore (configs/predict.yaml's schema)."""
    from hydra.core.config_store import ConfigStore

    ConfigStore.instance().store(name="flaxen_predict_schema", node=PredictConfig)


def check_options(options: PredictConfig) -> None:
    if options.batch_size < 1:
        raise ConfigError(f"batch_size={options.batch_size}: expected a positive integer")
    if options.format not in FORMATS:
        raise ConfigError(f"format={options.format!r}: expected one of {', '.join(FORMATS)}")
    if options.top_k is not None and options.top_k < 1:
        raise ConfigError(f"top_k={options.top_k}: expected a positive integer")
    if options.max_new_tokens < 1:
        raise ConfigError(f"max_new_tokens={options.max_new_tokens}: expected a positive integer")


# ---------------------------------------------------------------------- readers (shared by the tasks)

def input_format(path: str, options: PredictConfig, task_name: str, allowed: Sequence[str]) -> str:
    """The format `path` is read in: options.format, or by its name ending (`lines` for others)
    under format=auto; ConfigError when the task reads no such format."""
    chosen = options.format
    if chosen == "auto":
        chosen = EXTENSIONS.get(os.path.splitext(path)[1].lower(), "lines")
        if chosen not in allowed:
            chosen = "lines" if "lines" in allowed else allowed[0]
    if chosen not in allowed:
        raise ConfigError(f"format={chosen!r}: task {task_name} reads {', '.join(allowed)} input")
    return chosen


def read_input(path: str, expected: str) -> list[tuple[int, str]]:
    """(line number, line) of every line of a UTF-8 file, trailing blank lines dropped; DataError
    naming the file when it is missing or holds nothing but white space (`expected` says what it
    should hold)."""
    text = raw.read_text(path, "input file")
    lines = list(raw._lines(text))
    while lines and not lines[-1][1].strip():
        lines.pop()
    if not lines:
        raise DataError(f"{path}: empty file; expected {expected}")
    return lines


def read_lines(path: str, expected: str = "one input per line") -> list[dict]:
    """[{"where": "PATH:LINE", "text"}] of a file of one input per line; a blank line is refused."""
    out = []
    for number, line in read_input(path, expected):
        if not line.strip():
            raise DataError(f"{path}:{number}: empty line; expected {expected}")
        out.append({"where": f"{path}:{number}", "text": line})
    return out


def read_table(path: str, format: str, header: bool, columns: Sequence[str], optional: Sequence[str] = ()) -> list[dict]:
    """[{"where", column: text, ...}] of a TSV, CSV or JSONL file holding `columns` (the run's
    data.text_columns: header names or JSONL keys; 0-based indices without a header). DataError
    naming the file, the line and the expected columns for a missing one. JSONL keys in `optional`
    are kept (as strings) where present."""
    columns = [str(c) for c in columns]
    expected = f"the run's text column{'s' if len(columns) > 1 else ''} {', '.join(map(repr, columns))}"
    lines = read_input(path, f"a {format.upper()} file with {expected}")
    out = []
    if format == "jsonl":
        for number, line in lines:
            if not line.strip():
                raise DataError(f"{path}:{number}: empty line; expected one JSON object with {expected}")
            try:
                row = json.loads(line)
            except json.JSONDecodeError as error:
                raise DataError(f"{path}:{number}: not valid JSON ({error.msg} at column {error.colno})") from None
            if not isinstance(row, dict):
                raise DataError(f"{path}:{number}: expected a JSON object with {expected}, found "
                                f"{type(row).__name__}")
            record = {"where": f"{path}:{number}"}
            for column in columns:
                if column not in row:
                    raise DataError(f"{path}:{number}: no key {column!r}; expected {expected} (keys found: "
                                    f"{', '.join(map(repr, sorted(row)))})")
                if not isinstance(row[column], str):
                    raise DataError(f"{path}:{number}: key {column!r} holds {type(row[column]).__name__}, "
                                    "expected a string")
                record[column] = row[column]
            for key in optional:
                if key in row:
                    record[key] = row[key] if isinstance(row[key], str) else json.dumps(row[key])
            out.append(record)
        return out
    if format == "tsv":
        records = [(number, line.split("\t")) for number, line in lines]
    else:
        text = "\n".join(line for _, line in lines) + "\n"
        reader = csv.reader(io.StringIO(text, newline=""))
        records, start = [], 1
        try:
            for fields in reader:
                records.append((lines[start - 1][0], fields))
                start = reader.line_num + 1
        except csv.Error as error:
            number = lines[min(max(reader.line_num, 1), len(lines)) - 1][0]
            raise DataError(f"{path}:{number}: malformed CSV ({error})") from None
    indices = {}
    if header:
        number, names = records[0]
        records = records[1:]
        for column in columns:
            if column in names:
                indices[column] = names.index(column)
            elif column.isdigit():
                indices[column] = int(column)
            else:
                raise DataError(f"{path}:{number}: no column {column!r} in the header ({', '.join(map(repr, names))}); "
                                f"expected {expected}")
        if not records:
            raise DataError(f"{path}: only a header line; expected rows below it")
    else:
        for column in columns:
            if not column.lstrip("-").isdigit():
                raise DataError(f"{path}: the run names text column {column!r} but reads its files without a header "
                                "(data.header=false); give the column by index")
            indices[column] = int(column)
    for number, fields in records:
        record = {"where": f"{path}:{number}"}
        for column, index in indices.items():
            if not -len(fields) <= index < len(fields):
                raise DataError(f"{path}:{number}: {len(fields)} {format.upper()} field(s), no column {column!r} "
                                f"(field {index + 1}); expected {expected}")
            record[column] = fields[index]
        out.append(record)
    return out


def looks_like_conll(path: str) -> bool:
    """Whether a file reads as CoNLL (a -DOCSTART- line, or a blank line between non-blank ones)."""
    lines = [line for _, line in read_input(path, "CoNLL tokens or one sentence per line")]
    return any(line.startswith(raw.DOCSTART) for line in lines) or any(not line.strip() for line in lines)


def read_conll(path: str) -> list[dict]:
    """[{"where": "PATH:LINE" of its first token, "tokens"}] of a CoNLL-style file: one token per
    line (the first white-space separated column; other columns are ignored), a blank line between
    sentences, -DOCSTART- lines skipped."""
    sentences, tokens, first = [], [], None
    for number, line in read_input(path, "one token per line, a blank line between sentences"):
        fields = line.split()
        if not fields or fields[0] == raw.DOCSTART:
            if tokens:
                sentences.append({"where": f"{path}:{first}", "tokens": tokens})
            tokens = []
            continue
        if not tokens:
            first = number
        tokens.append(fields[0])
    if tokens:
        sentences.append({"where": f"{path}:{first}", "tokens": tokens})
    if not sentences:
        raise DataError(f"{path}: no tokens; expected one token per line, a blank line between sentences")
    return sentences


def _squad_string(path: str, where: str, node: Any, key: str) -> str:
    value = node.get(key) if isinstance(node, dict) else None
    if not isinstance(value, str):
        found = "nothing" if value is None else type(value).__name__
        raise DataError(f"{path}: {where}: expected a string under {key!r}, found {found}")
    return value


def read_questions(path: str, format: str) -> list[dict]:
    """[{"where", "id", "question", "context"}] of a SQuAD-format JSON file (answers, if any, are
    ignored) or a JSONL file of {"question", "context"[, "id"]} objects (id: the line number)."""
    if format == "jsonl":
        rows = read_table(path, "jsonl", True, ["question", "context"], optional=("id",))
        return [{"where": row["where"], "id": row.get("id", row["where"].rsplit(":", 1)[1]),
                 "question": row["question"], "context": row["context"]} for row in rows]
    lines = read_input(path, 'SQuAD JSON: {"data": [{"paragraphs": [{"context", "qas": [{"id", "question"}]}]}]}')
    text = "\n".join(line for _, line in lines)
    try:
        document = json.loads(text)
    except json.JSONDecodeError as error:
        raise DataError(f"{path}:{error.lineno}:{error.colno}: not valid JSON ({error.msg})") from None
    articles = document.get("data") if isinstance(document, dict) else None
    if not isinstance(articles, list):
        raise DataError(f"{path}: expected a SQuAD JSON object with a 'data' list of articles")
    out = []
    for a, article in enumerate(articles):
        paragraphs = article.get("paragraphs") if isinstance(article, dict) else None
        if not isinstance(paragraphs, list):
            raise DataError(f"{path}: article {a}: expected a 'paragraphs' list")
        for p, paragraph in enumerate(paragraphs):
            where = f"article {a} paragraph {p}"
            context = _squad_string(path, where, paragraph, "context")
            questions = paragraph.get("qas")
            if not isinstance(questions, list):
                raise DataError(f"{path}: {where}: expected a 'qas' list of questions")
            for q, qa in enumerate(questions):
                place = f"{where} question {q}"
                qid = _squad_string(path, place, qa, "id")
                out.append({"where": f"{path}: question id {qid!r}", "id": qid,
                            "question": _squad_string(path, place, qa, "question"), "context": context})
    if not out:
        raise DataError(f"{path}: no questions found; expected SQuAD JSON with at least one question")
    return out


def too_long(where: str, length: int, limit: int, key: str) -> DataError:
    return DataError(f"{where}: {length} tokens, more than the run's {key}={limit}; shorten the input or pass "
                     "truncate=true to cut it as training did")


# ---------------------------------------------------------------------- batching

def forward_step(task: Any, model: Any, options: PredictConfig):
    """batch (numpy) -> the task's prediction outputs (numpy): one jitted forward pass, compiled
    once per padded length (the model's inputs only reach the compiled function)."""
    import jax
    from flax import nnx

    graphdef, state = nnx.split(model)

    @jax.jit
    def forward(state, inputs):
        output = nnx.merge(graphdef, state)(inputs["input_ids"], **task.model_inputs(inputs))
        return task.prediction_outputs(output, inputs, options)

    def step(batch: dict) -> dict:
        inputs = {key: batch[key] for key in ("input_ids", "attention_mask", "token_type_ids") if key in batch}
        return jax.device_get(forward(state, inputs))

    return step


def predict(run: Any, path: str, options: Optional[PredictConfig] = None) -> list[dict]:
    """The predictions (JSON-ready dicts, one per input, in input order) of a TrainedRun
    (flaxen.inference.load_run) on the file `path`."""
    from tqdm.auto import tqdm

    from flaxen import inference
    from flaxen.data.encoding import PADDING

    options = options or PredictConfig()
    check_options(options)
    run = dataclasses.replace(run, tokenizer=inference.tokenizer_of(run))
    task, cfg = run.task, run.cfg
    records = task.predict_records(path, cfg, options)
    rows = task.predict_rows(records, run, options)
    step = task.prediction_step(run, options)
    longest = max(len(row["input_ids"]) for row in rows)
    buckets = task.prediction_buckets(run, options, longest)
    order = sorted(range(len(rows)), key=lambda i: len(rows[i]["input_ids"]))
    outputs: list[Optional[dict]] = [None] * len(rows)
    size = options.batch_size
    with tqdm(total=len(rows), desc="predict", unit="row", file=sys.stderr, disable=not options.progress_bar,
              dynamic_ncols=True) as bar:
        for start in range(0, len(order), size):
            chosen = order[start:start + size]
            batch_rows = [rows[i] for i in chosen] + [PADDING] * (size - len(chosen))
            batch = task.prediction_collate(batch_rows, size, buckets, run.tokenizer.pad_token_id)
            result = step(batch)
            for j, i in enumerate(chosen):
                outputs[i] = {key: value[j] for key, value in result.items()}
            bar.update(len(chosen))
    return task.format_predictions(records, rows, outputs, run, options)


def write_jsonl(predictions: Sequence[dict], output: Optional[str]) -> None:
    """One JSON object per line to `output` (written to a temporary file, then renamed), or stdout."""
    from flaxen.cli import write_output

    write_output("".join(json.dumps(p, ensure_ascii=False) + "\n" for p in predictions), output)


def predict_file(options: PredictConfig) -> list[dict]:
    """predict.py: load the run (its best checkpoint, or `step`), predict `input`, write JSONL to
    `output` (stdout when unset); returns the predictions."""
    from flaxen import inference

    if not options.run_dir:
        raise ConfigError("run_dir=PATH is required (a flaxen run directory, its checkpoints/ or a step folder)")
    if not options.input:
        raise ConfigError("input=FILE is required (the inputs to predict)")
    check_options(options)
    run = inference.load_run(options.run_dir, step=options.step, verb="Predict with")
    predictions = predict(run, os.path.expanduser(options.input), options)
    write_jsonl(predictions, options.output)
    if options.output:
        print(f"wrote {len(predictions)} predictions to {options.output}", file=sys.stderr)
    return predictions
