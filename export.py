"""Export a trained run as a Hugging Face model directory.

    python export.py run_dir=PATH out=DIR [step=N] [overwrite=true]

A thin Hydra entry point over flaxen.export (see configs/export.yaml): DIR gets config.json,
model.safetensors (LoRA merged in), the run's tokenizer files and a README.md; transformers'
`from_pretrained(DIR)` / `pipeline(..., model=DIR)` load it. Adapter, prefix and prompt runs cannot be
merged: DIR then holds the base model and DIR/adapter/ the method's weights (said in the output).
Exit status 0, or 1 with `error: ...` for a mistake in the run or the options.
"""
import hydra
from omegaconf import DictConfig

from flaxen import cli
from flaxen import export as export_lib


def run(cfg: DictConfig) -> dict:
    """Exports per `cfg` (a composed ExportConfig); returns flaxen.export.export's summary."""
    return export_lib.export(cfg.run_dir, cfg.out, step=cfg.step, overwrite=cfg.overwrite)


@hydra.main(config_path="configs", config_name="export", version_base="1.3")
def main(cfg: DictConfig) -> None:
    cli.exit_on_error(run, cfg)


if __name__ == "__main__":
    cli.quiet_absl()
    export_lib.register()
    main()
