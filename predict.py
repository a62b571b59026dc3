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
import hydra
from omegaconf import DictConfig, OmegaConf

from flaxen import cli
from flaxen import predict as predict_lib


def run(cfg: DictConfig) -> list[dict]:
    """Predicts per `cfg` (a composed PredictConfig); returns the predictions (also written)."""
    return predict_lib.predict_file(OmegaConf.to_object(cfg))


@hydra.main(config_path="configs", config_name="predict", version_base="1.3")
def main(cfg: DictConfig) -> None:
    cli.exit_on_error(run, cfg)


if __name__ == "__main__":
    cli.quiet_absl()
    predict_lib.register()
    main()
