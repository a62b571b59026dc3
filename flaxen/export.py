"""export.py's work: a trained run as a Hugging Face model directory that transformers loads.

    export("runs/sst2/...", "exported/sst2")        # the run's best checkpoint; step=N for another

DIR gets config.json + model.safetensors (models.save_pretrained: the head's transformers class,
id2label / label2id from the run's label names, bos/eos/pad ids from its tokenizer), the run's
tokenizer (tokenizer.json, tokenizer_config.json, special_tokens_map.json) and a README.md saying
what was exported and how to load it. The tokenizer config gains what transformers needs to encode
as training did: `model_max_length` (the run's row length, data.max_length or data.window_length)
and `model_input_names` (token_type_ids for the BERT family, whose pairs use type 1; GPT-2 would
add a type embedding, so its tokenizer returns none).

PEFT: LoRA, AdaLoRA, IA³, BitFit (what models.peft.merge folds in) are merged into the weights, so
DIR is a plain model with the run's outputs. Adapters, prefixes and prompts (what merge refuses)
add computation that no plain transformers model holds: DIR then holds the base model with the
run's trained head (outputs differ from the run's), and DIR/adapter/ the method's weights in
flaxen's adapter format (models.peft.save_adapter), which
`models.peft.load_adapter(models.load_pretrained(DIR, head=...), DIR/adapter)` puts back on; the
README and the command's output say so.

Everything is written into a temporary sibling directory that is renamed to DIR at the end, so a
failure leaves nothing half-written; an existing non-empty DIR is refused unless overwrite=true.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Optional

from flaxen.errors import ConfigError

ADAPTER_DIR = "adapter"
README_FILE = "README.md"


@dataclass
class ExportConfig:
    """export.py's settings (configs/export.yaml)."""
    run_dir: Optional[str] = None
    out: Optional[str] = None
    step: Optional[int] = None
    overwrite: bool = False


def register() -> None:
    """Registers ExportConfig in Hydra's ConfigStore (configs/export.yaml's schema)."""
    from hydra.core.config_store import ConfigStore

    ConfigStore.instance().store(name="flaxen_export_schema", node=ExportConfig)


def _check_out(out: str, overwrite: bool) -> None:
    if os.path.exists(out):
        if not os.path.isdir(out):
            raise ConfigError(f"out={out} exists and is not a directory")
        if os.listdir(out) and not overwrite:
            raise ConfigError(f"out={out} exists and is not empty; pass overwrite=true to replace it")


def _tokenizer_config(directory: str, model_max_length: int, input_names: list[str]) -> None:
    path = os.path.join(directory, "tokenizer_config.json")
    with open(path) as f:
        values = json.load(f)
    values.update(model_max_length=model_max_length, model_input_names=input_names)
    with open(path, "w") as f:
        json.dump(values, f, indent=2)
        f.write("\n")


def _readable(directory: str) -> None:
    """Modes as a plain copy would get them under the user's umask (temporary directories and
    some writers create owner-only files)."""
    mask = os.umask(0)
    os.umask(mask)
    for parent, _, files in os.walk(directory):
        os.chmod(parent, 0o777 & ~mask)
        for name in files:
            os.chmod(os.path.join(parent, name), 0o666 & ~mask)


def _readme(run, task, architecture: str, method: str, merged: bool, model_max_length: int, out: str) -> str:
    labels = ", ".join(run.label_names) if run.label_names else None
    lines = [f"# {run.cfg.experiment_name}: {task.name} (exported by flaxen)", "",
             f"From the flaxen run `{run.run_dir}`, checkpoint step {run.step} (`{run.checkpoint}`), by "
             "`python export.py`.", "",
             f"- model: `{architecture}` (config.json, model.safetensors)",
             f"- tokenizer: tokenizer.json, tokenizer_config.json (model_max_length {model_max_length}: the length the "
             "run's rows were cut to), special_tokens_map.json"]
    if labels:
        lines.append(f"- labels (id2label): {labels}")
    if method == "none":
        lines.append("- fine-tuned fully (no PEFT method)")
    elif merged:
        lines.append(f"- PEFT: peft.name={method}, merged into the weights: a plain model with the run's outputs")
    else:
        lines += [f"- PEFT: peft.name={method} is NOT in model.safetensors. This method adds layers that no plain "
                  "transformers model holds, so config.json + model.safetensors are the base model with the run's "
                  "trained head, and their outputs differ from the run's. The method's weights are in "
                  f"`{ADAPTER_DIR}/` (flaxen's adapter format); flaxen puts them back on:", "",
                  "```python", "import models", "from models import peft", "",
                  f'model = peft.load_adapter(models.load_pretrained("{out}", head="{task.head}"), '
                  f'"{os.path.join(out, ADAPTER_DIR)}")', "```"]
    if task.hf_pipeline is not None:
        lines += ["", "## Use with transformers", "", "```python", "from transformers import pipeline", "",
                  f'pipe = pipeline("{task.hf_pipeline}", model="{out}", tokenizer="{out}")', "```"]
    return "\n".join(lines) + "\n"


def export(run_dir: str, out: str, step: Optional[int] = None, overwrite: bool = False, log=print) -> dict:
    """Writes the run's model (best checkpoint, or `step`) to the Hugging Face directory `out`;
    returns {"out", "step", "architecture", "peft", "merged", "adapter"} (adapter: the directory
    of unmerged PEFT weights, or None)."""
    import models
    from models import peft
    from models import hf
    from models.peft.checkpoint import write_directory

    from flaxen import inference

    if not run_dir:
        raise ConfigError("run_dir=PATH is required (a flaxen run directory, its checkpoints/ or a step folder)")
    if not out:
        raise ConfigError("out=DIR is required (the Hugging Face model directory to write)")
    given = out
    out = os.path.abspath(os.path.expanduser(out))
    _check_out(out, overwrite)
    run = inference.load_run(run_dir, step=step, verb="Export")
    task = run.task
    tokenizer = inference.tokenizer_of(run)
    method = peft.config_of(run.model)
    try:
        model, merged = peft.merge(run.model), True
    except ConfigError:  # the method adds computation no plain weight holds (adapters, prefixes, prompts)
        model, merged = run.model, False
    metadata = dict(getattr(model, "hf_metadata", ()))
    # the tokenizer's bos/eos ids, null when it has none (transformers' GPT-2 config would otherwise
    # default to GPT-2's 50256)
    metadata.setdefault("bos_token_id", tokenizer.bos_token_id)
    metadata.setdefault("eos_token_id", tokenizer.eos_token_id)
    if tokenizer.pad_token_id is not None:
        metadata.setdefault("pad_token_id", tokenizer.pad_token_id)
    model.hf_metadata = tuple(sorted(metadata.items()))
    config = model.config
    model_max_length = min(task.row_length(run.cfg.data), config.max_position_embeddings)
    input_names = list(hf.family_of(config).input_names)
    architecture = hf.architecture(config, model.head_name)

    def write(staging: str) -> None:
        models.save_pretrained(model, staging, id2label=run.label_names)
        tokenizer.save(staging)
        _tokenizer_config(staging, model_max_length, input_names)
        if not merged:
            peft.save_adapter(run.model, os.path.join(staging, ADAPTER_DIR))
        with open(os.path.join(staging, README_FILE), "w") as f:
            f.write(_readme(run, task, architecture, method.name, merged, model_max_length, out))
        _readable(staging)

    _check_out(out, overwrite)
    try:
        write_directory(out, write)
    except OSError as error:
        from flaxen.errors import StorageError

        raise StorageError.from_exception(error, out) from error
    adapter = None if merged else os.path.join(out, ADAPTER_DIR)
    how = f", peft.name={method.name} merged" if merged and method.name != "none" else ""
    log(f"wrote {given}: {architecture} from {run_dir} step {run.step}{how} + tokenizer "
        f"(model_max_length {model_max_length})")
    if adapter is not None:
        log(f"note: peft.name={method.name} cannot be merged into a plain Hugging Face model: model.safetensors "
            f"holds the base model and the trained head only; the {method.name} weights are in {adapter} "
            f"(flaxen's adapter format, models.peft.load_adapter); see {os.path.join(out, README_FILE)}")
    return {"out": out, "step": run.step, "architecture": architecture, "peft": method.name, "merged": merged,
            "adapter": adapter}
