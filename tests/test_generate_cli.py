"""generate.py on tiny trained runs: a file of sources in, one generated line per input out (the
same lines whatever the batch size, so padding and bucketing change nothing), text= to stdout, beam
search and sampling options, a decoder-only seq2seq run (prompt -> completion), a clm run (the same
continuations as predict.py), and the errors a user can make (no run_dir, a missing input file, a
run whose task does not generate), each one line naming the key or file, exit status 1 from the
command line."""
import os
import shutil
import subprocess
import sys

import pytest
import yaml

from flaxen import generate as generating
from flaxen.errors import ConfigError, DataError
import seq2seq_runs
from seq2seq_runs import GPT_TINY, entry, train

t5_run = seq2seq_runs.t5_run  # the shared tiny T5 run (a module-scoped fixture)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _options(**kwargs):
    return generating.GenerateConfig(progress_bar=False, **kwargs)


def _sources(base, count=7):
    path = os.path.join(base, "sources.en")
    with open(os.path.join(base, "data", "m30k", "val.en"), encoding="utf-8") as f:
        lines = f.readlines()[:count]
    with open(path, "w", encoding="utf-8") as f:
        f.writelines(lines)
    return path, [line.rstrip("\n") for line in lines]


@pytest.fixture(scope="module")
def loaded(t5_run):
    from flaxen import inference

    return inference.load_run(t5_run["run_dir"])


def test_file_in_file_out_one_line_per_input_whatever_the_batch(t5_run, loaded, tmp_path):
    source, lines = _sources(t5_run["base"])
    out = str(tmp_path / "out" / "de.txt")
    with pytest.raises(DataError, match=r"sources.en:3: 33 tokens, more than the run's data.max_length=32"):
        generating.generate_file(_options(run_dir=t5_run["run_dir"], input=source))
    texts = generating.generate_file(_options(run_dir=t5_run["run_dir"], input=source, output=out, batch_size=3,
                                              truncate=True))
    with open(out, encoding="utf-8") as f:
        written = f.read().split("\n")
    assert written[-1] == "" and written[:-1] == [" ".join(t.splitlines()) for t in texts]
    assert len(texts) == len(lines) == 7
    records = generating.read_inputs(_options(input=source))
    assert generating.generate(loaded, records, _options(batch_size=8, truncate=True)) == texts
    beams = generating.generate(loaded, records, _options(batch_size=8, truncate=True, num_beams=2,
                                                          length_penalty=0.6, early_stopping=True))
    assert len(beams) == 7 and all(isinstance(t, str) for t in beams)


def test_text_goes_to_stdout_and_decoding_defaults_are_the_runs(t5_run, loaded, capsys):
    settings = generating.decoding(loaded, _options(num_beams=2))
    assert settings.num_beams == 2 and settings.max_new_tokens == 6  # the run's task.generation.max_new_tokens
    texts = generating.generate_file(_options(run_dir=t5_run["run_dir"], text="A man rides a bike."))
    assert capsys.readouterr().out == texts[0] + "\n" and len(texts) == 1
    records = generating.read_inputs(_options(text="A dog runs."))
    sampled = [generating.generate(loaded, records, _options(do_sample=True, top_k=5, temperature=0.7, seed=3))
               for _ in range(2)]
    assert sampled[0] == sampled[1] and len(sampled[0]) == 1


def test_decoder_only_run_generates_completions(t5_run):
    """A GPT fine-tuned on prompt -> completion rows: eval.py decodes each validation source after
    its separator (one line per record), generate.py completes a file of sources."""
    from flaxen import config

    run_dir = train(t5_run["base"], "gpt", *GPT_TINY, "data.tokenizer.vocab_size=300")
    overrides = [f"run_dir={run_dir}", "split=validation", "eval_batch_size=8"]
    report = entry("eval").run(config.compose(overrides + ["progress_bar=false"], config_name="eval"), overrides)
    with open(os.path.join(run_dir, "predictions_validation.txt"), encoding="utf-8") as f:
        assert len(f.read().split("\n")) == 20 + 1 and report["metrics"]["num_examples"] == 20
    assert "bleu" in report["metrics"] and report["task"] == "seq2seq"
    source, _ = _sources(t5_run["base"], 5)
    texts = generating.generate_file(_options(run_dir=run_dir, input=source, batch_size=5, max_new_tokens=5,
                                              truncate=True))
    assert len(texts) == 5 and all(isinstance(t, str) for t in texts)


def test_errors_name_the_key_or_file(t5_run, tmp_path):
    with pytest.raises(ConfigError, match="run_dir=PATH is required"):
        generating.generate_file(_options(input="x.txt"))
    with pytest.raises(ConfigError, match=r"input=FILE or text="):
        generating.generate_file(_options(run_dir=t5_run["run_dir"]))
    with pytest.raises(DataError, match="missing.en"):
        generating.generate_file(_options(run_dir=t5_run["run_dir"], input=str(tmp_path / "missing.en")))
    with pytest.raises(ConfigError, match="num_beams=2 .*do_sample|do_sample=true with num_beams=2"):
        generating.generate_file(_options(run_dir=t5_run["run_dir"], text="a", num_beams=2, do_sample=True))
    # a span-corruption run of the same model: its task does not generate
    other = tmp_path / "span_run"
    shutil.copytree(t5_run["run_dir"], other)
    with open(other / "config.yaml") as f:
        saved = yaml.safe_load(f)
    saved["task"]["name"] = "span_corruption"
    with open(other / "config.yaml", "w") as f:
        yaml.safe_dump(saved, f)
    with pytest.raises(ConfigError, match="task.name=span_corruption, does not generate text; tasks that do: .*seq2seq"):
        generating.generate_file(_options(run_dir=str(other), text="a"))

    result = subprocess.run([sys.executable, os.path.join(ROOT, "generate.py"), f"run_dir={t5_run['run_dir']}",
                             f"input={tmp_path / 'missing.en'}"], capture_output=True, text=True, cwd=ROOT,
                            timeout=300)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1].startswith("error: ") and "missing.en" in result.stderr
    assert "Traceback" not in result.stderr


def test_causal_lm_run_continues_prompts_as_predict_py_does(tmp_path):
    """A clm run: generate.py's greedy continuations equal predict.py's completions (flaxen.predict,
    an independent batching path over the same model)."""
    from flaxen import config
    from flaxen import predict as predicting

    run_dir = str(tmp_path / "clm")
    cfg = config.compose(GPT_TINY + ["task=clm", "data=quickstart", "data.synthetic.num_train=300",
                                     "data.synthetic.num_validation=20", "data.window_length=16",
                                     f"data_dir={tmp_path}", f"data.prepared_dir={tmp_path / 'prepared'}",
                                     f"run_dir={run_dir}", "steps=2", "batch_size=8", "eval_batch_size=8",
                                     "eval_every=0", "eval_batches=1", "checkpoint_every=2", "progress_bar=false",
                                     "loggers=[]", "schedule.warmup_steps=1"])
    assert entry("train").run(cfg)["status"] == "completed"
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("the cat\nsome dogs eat every\nthis tired soldier\n")
    texts = generating.generate_file(_options(run_dir=run_dir, input=str(prompts), max_new_tokens=5, batch_size=2))
    predicted = predicting.predict_file(predicting.PredictConfig(run_dir=run_dir, input=str(prompts), max_new_tokens=5,
                                                                 progress_bar=False, output=str(tmp_path / "p.jsonl")))
    assert texts == [p["completion"] for p in predicted] and len(texts) == 3
