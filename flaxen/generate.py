"""Generation from a trained run: the decoding settings, and generate.py's work.

    options = GenerateConfig(run_dir="runs/t5_multi30k", input="sentences.en", num_beams=4)
    lines = generate_file(options)          # one output per input line, in input order

Decoding settings (`GenerationConfig`) are one block shared by a run's evaluation (the run's
`task.generation`: what BLEU / ROUGE are computed on) and generate.py (its command-line keys;
unset ones take the run's own). The task decides what a run can generate and how (flaxen/tasks/:
seq2seq for encoder-decoder and decoder-only models, clm for language models; `Task.generation_rows`,
`Task.generate_batch`); this module reads the inputs, sorts them by length, cuts batches padded to
a few lengths (one compiled decoding loop each) and writes the outputs back in input order.

Errors a user can cause (no run_dir, a missing input file, a run whose task does not generate,
an option out of range) raise ConfigError / DataError naming the key or file and line.
"""
from __future__ import annotations

import dataclasses
import os
import sys
from dataclasses import dataclass
from typing import Any, Optional, Sequence

from flaxen.errors import ConfigError


@dataclass
class GenerationConfig:
    """How text is generated (Hugging Face's generate() keys and meanings).

    max_new_tokens: tokens generated at most per input (eos included).
    num_beams: 1 is greedy (or sampling with do_sample); more is beam search.
    length_penalty: beam scores are log-probability sums divided by length ** length_penalty.
    early_stopping: beam search stops once num_beams finished hypotheses exist.
    do_sample, temperature, top_k, top_p, seed: sampling (num_beams 1), from key `seed`.
    during_training: train.py's evaluations decode and score text too (BLEU, ROUGE; best_metric may
    then be bleu); false: they report loss, perplexity and accuracy only. eval.py always decodes.
    """
    max_new_tokens: int = 64
    num_beams: int = 1
    length_penalty: float = 1.0
    early_stopping: bool = False
    do_sample: bool = False
    temperature: float = 1.0
    top_k: Optional[int] = None
    top_p: Optional[float] = None
    seed: int = 0
    during_training: bool = True


DECODING_KEYS = tuple(f.name for f in dataclasses.fields(GenerationConfig) if f.name != "during_training")


def check_generation(settings: Any, prefix: str = "task.generation.") -> None:
    """ConfigError naming `<prefix><key>` for a decoding setting out of range."""
    def get(key):
        return getattr(settings, key)

    for key in ("max_new_tokens", "num_beams"):
        if not isinstance(get(key), int) or get(key) < 1:
            raise ConfigError(f"{prefix}{key}={get(key)!r}: expected a positive integer")
    if get("top_k") is not None and get("top_k") < 1:
        raise ConfigError(f"{prefix}top_k={get('top_k')!r}: expected a positive integer or null")
    if get("top_p") is not None and not 0 < get("top_p") <= 1:
        raise ConfigError(f"{prefix}top_p={get('top_p')!r}: expected a value in (0, 1] or null")
    if not get("temperature") > 0:
        raise ConfigError(f"{prefix}temperature={get('temperature')!r}: expected a positive value")
    if get("do_sample") and get("num_beams") > 1:
        raise ConfigError(f"{prefix}do_sample=true with {prefix}num_beams={get('num_beams')}: sampling draws one "
                          "sequence per input; set num_beams=1 to sample, or do_sample=false for beam search")


@dataclass
class GenerateConfig:
    """generate.py's settings (configs/generate.yaml). Decoding keys left null take the run's own
    (its task.generation; a causal-LM run's defaults are GenerationConfig's)."""
    run_dir: Optional[str] = None
    input: Optional[str] = None
    text: Optional[str] = None
    output: Optional[str] = None
    step: Optional[int] = None
    batch_size: int = 32
    truncate: bool = False
    max_new_tokens: Optional[int] = None
    num_beams: Optional[int] = None
    length_penalty: Optional[float] = None
    early_stopping: Optional[bool] = None
    do_sample: Optional[bool] = None
    temperature: Optional[float] = None
    top_k: Optional[int] = None
    top_p: Optional[float] = None
    seed: Optional[int] = None
    progress_bar: bool = True


def register() -> None:
    """Registers GenerateConfig in Hydra's ConfigStore (configs/generate.yaml's schema)."""
    from hydra.core.config_store import ConfigStore

    ConfigStore.instance().store(name="flaxen_generate_schema", node=GenerateConfig)


def decoding(run: Any, options: GenerateConfig) -> GenerationConfig:
    """The decoding settings of `options` over the run's own (task.generation, else the defaults)."""
    own = getattr(run.cfg.task, "generation", None)
    values = {key: getattr(own, key) for key in DECODING_KEYS} if own is not None else {}
    for key in DECODING_KEYS:
        given = getattr(options, key)
        if given is not None:
            values[key] = given
    settings = GenerationConfig(**values)
    check_generation(settings, prefix="")
    return settings


def read_inputs(options: GenerateConfig) -> list[dict]:
    """[{"where", "text"}]: `text`, or the lines of `input` (a blank line is refused)."""
    from flaxen import predict

    if options.text is not None and options.input is not None:
        raise ConfigError("input=FILE and text=... are both set: give one")
    if options.text is not None:
        if not str(options.text).strip():
            raise ConfigError("text='': expected the text to generate from")
        return [{"where": "text=", "text": str(options.text)}]
    if options.input is None:
        raise ConfigError("input=FILE or text=\"...\" is required (the inputs to generate from)")
    return predict.read_lines(os.path.expanduser(options.input), "one input per line")


def generate(run: Any, records: Sequence[dict], options: GenerateConfig) -> list[str]:
    """One generated text per record (in record order) of a TrainedRun (flaxen.inference.load_run)."""
    from tqdm.auto import tqdm

    from flaxen import inference

    settings = decoding(run, options)
    if options.batch_size < 1:
        raise ConfigError(f"batch_size={options.batch_size}: expected a positive integer")
    run = dataclasses.replace(run, tokenizer=inference.tokenizer_of(run))
    task = run.task
    rows = task.generation_rows(records, run, settings, options.truncate)
    order = sorted(range(len(rows)), key=lambda i: len(rows[i]))
    texts: list[Optional[str]] = [None] * len(rows)
    with tqdm(total=len(rows), desc="generate", unit="input", file=sys.stderr, disable=not options.progress_bar,
              dynamic_ncols=True) as bar:
        for number, start in enumerate(range(0, len(order), options.batch_size)):
            chosen = order[start:start + options.batch_size]
            outputs = task.generate_batch(run.model, run.tokenizer, run.cfg, [rows[i] for i in chosen],
                                          options.batch_size, settings, call=number)
            for i, text in zip(chosen, outputs):
                texts[i] = text
            bar.update(len(chosen))
    return texts


def write_text(lines: Sequence[str], output: Optional[str]) -> None:
    """One text per line to `output` (a temporary file, then renamed) or stdout; a line break
    inside a text becomes a space, so line i answers input line i."""
    from flaxen.cli import write_output

    write_output("".join(" ".join(str(line).splitlines()) + "\n" for line in lines), output)


def generate_file(options: GenerateConfig) -> list[str]:
    """generate.py: load the run (its best checkpoint, or `step`), generate from `input` or `text`,
    write one line per input to `output` (stdout when unset); returns the texts."""
    from flaxen import inference

    if not options.run_dir:
        raise ConfigError("run_dir=PATH is required (a flaxen run directory, its checkpoints/ or a step folder)")
    records = read_inputs(options)
    run = inference.load_run(options.run_dir, step=options.step, verb="Generate with")
    if not run.task.can_generate(run.spec):
        from flaxen.tasks.base import generating_names

        raise ConfigError(f"run_dir={options.run_dir}: its task, task.name={run.cfg.task.name}, does not generate "
                          f"text; tasks that do: {', '.join(generating_names())} (predict.py serves the others)")
    texts = generate(run, records, options)
    write_text(texts, options.output)
    if options.output:
        print(f"wrote {len(texts)} generations to {options.output}", file=sys.stderr)
    return texts


# ---------------------------------------------------------------------- batched decoding (the tasks call it)

def bucket_length(longest: int, buckets: Sequence[int]) -> int:
    """The smallest of `buckets` that holds `longest` ids (`longest` itself beyond them)."""
    return next((int(b) for b in sorted(buckets) if b >= longest), int(longest))


def generate_ids(model: Any, prompts: Sequence[Sequence[int]], settings: GenerationConfig, *, batch_size: int,
                 buckets: Sequence[int], eos_id: Optional[int], pad_id: int, encoder_decoder: bool,
                 max_positions: Optional[int] = None, call: int = 0) -> list[list[int]]:
    """The new tokens of each prompt, up to (without) its eos, by models.generate with `settings`.

    Encoder-decoder: the prompts are the encoder's inputs, padded on the right. Decoder-only: the
    prompts are continued, padded on the left; max_new_tokens is cut to what the model's positions
    (`max_positions`) leave after the padded prompt. The batch is filled up to `batch_size` rows
    and its length to a bucket, so the compiled decoding loop is reused; sampling draws from
    fold_in(key(settings.seed), call)."""
    import jax
    import numpy as np

    import models

    if not prompts:
        return []
    if len(prompts) > batch_size:
        raise ValueError(f"{len(prompts)} prompts do not fit a batch of {batch_size}")
    length = bucket_length(max(len(p) for p in prompts), buckets)
    input_ids = np.full((batch_size, length), pad_id, np.int32)
    attention_mask = np.zeros((batch_size, length), np.int32)
    for row in range(batch_size):
        ids = list(prompts[row]) if row < len(prompts) else [pad_id]
        if encoder_decoder:
            input_ids[row, :len(ids)] = ids
            attention_mask[row, :len(ids)] = 1
        else:
            input_ids[row, length - len(ids):] = ids
            attention_mask[row, length - len(ids):] = 1
    new_tokens = int(settings.max_new_tokens)
    if not encoder_decoder and max_positions is not None:
        new_tokens = min(new_tokens, int(max_positions) - length)
        if new_tokens < 1:
            raise ConfigError(f"a prompt of {length} tokens leaves no room to generate within the model's "
                              f"max_position_embeddings={max_positions}")
    output = models.generate(
        model, input_ids, attention_mask, max_new_tokens=new_tokens, num_beams=int(settings.num_beams),
        length_penalty=float(settings.length_penalty), early_stopping=settings.early_stopping,
        do_sample=bool(settings.do_sample), temperature=float(settings.temperature),
        top_k=None if settings.top_k is None else int(settings.top_k),
        top_p=None if settings.top_p is None else float(settings.top_p),
        eos_token_id=eos_id, pad_token_id=pad_id,
        rng=jax.random.fold_in(jax.random.key(int(settings.seed)), int(call)))
    output = np.asarray(output)
    generated = output[:, output.shape[1] - new_tokens:]
    out = []
    for row in range(len(prompts)):
        ids = [int(i) for i in generated[row]]
        if eos_id is not None and eos_id in ids:
            ids = ids[:ids.index(eos_id)]
        out.append(ids)
    return out
