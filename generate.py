"""Generate text with a trained run: one output line per input line.

    python generate.py run_dir=PATH input=FILE [output=FILE] [num_beams=4] [max_new_tokens=64] ...
    python generate.py run_dir=PATH text="A man is riding a bike."

A thin Hydra entry point over flaxen.generate (see configs/generate.yaml). Runs of seq2seq (an
encoder-decoder translates or summarises each line; a decoder-only model completes it as the
prompt it was fine-tuned on) and clm (continues each line). Decoding keys (num_beams,
max_new_tokens, length_penalty, early_stopping, do_sample, temperature, top_k, top_p, seed) default
to the run's own (task.generation). Exit status 0, or 1 with `error: ...` for a mistake in the
run, the input or the options.
"""
import hydra
from omegaconf import DictConfig, OmegaConf

from flaxen import cli
from flaxen import generate as generate_lib


def run(cfg: DictConfig) -> list[str]:
    """Generates per `cfg` (a composed GenerateConfig); returns the texts (also written)."""
    return generate_lib.generate_file(OmegaConf.to_object(cfg))


@hydra.main(config_path="configs", config_name="generate", version_base="1.3")
def main(cfg: DictConfig) -> None:
    cli.exit_on_error(run, cfg)


if __name__ == "__main__":
    cli.quiet_absl()
    generate_lib.register()
    main()
