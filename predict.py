"""Predict with a trained run: one JSON line per input.

    python predict.py run_dir=PATH input=FILE [output=FILE] [batch_size=N] [step=N] [truncate=true]

A thin Hydra entry point over flaxen.predict (see configs/predict.yaml). Per task, the input and
each output line:
    seq_cls    text lines, or TSV/CSV/JSONL with the run's text columns
               -> {"label", "probabilities": {label: p}}
    token_cls  CoNLL (a token per line, blank line between sentences) or sentence lines
               -> {"tokens", "tags"}
    qa         SQuAD JSON, or JSONL of {"question", "context"[, "id"]} -> {"id", "answer", "score"}
    mlm        text lines with the mask token -> {"text", "predictions": [[token, p], ...] per mask}
    clm        prompt lines -> {"prompt", "completion"} (max_new_tokens, do_sample, temperature, ...)
Exit status 0, or 1 with `error: ...` for a mistake in the run, the input or the options.
"""
import sys

import hydra
from omegaconf import DictConfig, OmegaConf

from flaxen import predict as predict_lib
from flaxen.errors import FlaxenError


def run(cfg: DictConfig) -> list[dict]:
    """Predicts per `cfg` (a composed PredictConfig); returns the predictions (also written)."""
    return predict_lib.predict_file(OmegaConf.to_object(cfg))


@hydra.main(config_path="configs", config_name="predict", version_base="1.3")
def main(cfg: DictConfig) -> None:
    try:
        run(cfg)
    except FlaxenError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    from absl import logging as absl_logging

    absl_logging.set_verbosity(absl_logging.ERROR)
    predict_lib.register()
    main()
