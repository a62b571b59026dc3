"""Explain one prediction of a trained run: which tokens it rests on, and where the model attends.

    python scripts/explain.py run_dir=PATH text="a gripping, funny film" [target=LABEL] [steps=50]
        [out=DIR] [method=gausslegendre] [baseline=zeros|pad] [step=N] [layers=0,5]
        [text_pair=...] (sentence pairs)  [position=N] (token_cls: the token)
        [context=...] [span=START:END] (qa: text is the question; the answer span to explain)

The text is encoded as the run's training encoded its rows (the run's tokenizer; the task's
explain_row), the model's prediction is explained by integrated gradients over the input
embeddings (flaxen.attribution: `steps` path points of the quadrature rule `method` from the
baseline), of the target the task names (seq_cls: a class logit, default the predicted class;
token_cls: a tag logit at one token; qa: the start and the end logit of the answer span).

Writes into OUT (default RUN_DIR/explain/):
    explain.html            one standalone page (no external assets): the tokens shaded by their
                            attribution (red: towards the target, blue: against it; normalised to
                            the largest |attribution|), the prediction and its probabilities, and
                            the completeness check (sum of attributions against f(x) - f(baseline))
    attention_layer<L>.png  per layer (or the `layers` listed), the attention probabilities of every
                            head (query tokens down, key tokens across)
Other key=value arguments override the run's config (e.g. data_dir=...), as for eval.py. Exit
status 1 with `error: ...` for a user error.
"""
from __future__ import annotations

import html
import math
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402

from flaxen import cli  # noqa: E402
from flaxen.errors import ConfigError, FlaxenError  # noqa: E402

# this command's own keys (the others override the run's config)
KEYS = ("run_dir", "text", "text_pair", "context", "target", "position", "span", "steps", "method", "baseline",
        "step", "out", "layers")


def parse(argv: list[str]) -> tuple[dict, list[str]]:
    """(this command's options, the run-config overrides) from key=value arguments."""
    options, overrides = cli.key_values(argv, KEYS, 'run_dir=PATH text="..."')
    for key in ("run_dir", "text"):
        if not options.get(key):
            raise ConfigError(f"{key}= is missing: python scripts/explain.py run_dir=PATH text=\"...\" "
                              "[target=LABEL] [steps=N] [out=DIR]")
    for key in ("steps", "step"):
        cli.integer_option(options, key)
    if "layers" in options:
        try:
            options["layers"] = [int(part) for part in options["layers"].split(",") if part.strip()]
        except ValueError:
            raise ConfigError(f"layers={options['layers']!r}: expected layer indices separated by commas, "
                              "e.g. layers=0,5") from None
    return options, overrides


# ---------------------------------------------------------------------- the explanation


def explain(run, text: str, *, text_pair=None, context=None, target=None, position=None, span=None,
            steps: int = 50, method: str = "gausslegendre", baseline: str = "zeros", out: str | None = None,
            layers: list[int] | None = None) -> list[str]:
    """Writes OUT/explain.html and OUT/attention_layer<L>.png (every layer, or `layers`) for `text`
    under `run` (a flaxen.inference.TrainedRun); returns the paths written."""
    import jax.numpy as jnp

    from flaxen import attribution, inference

    count = run.model.config.num_layers
    layers = list(range(count)) if layers is None else layers
    if not all(0 <= layer < count for layer in layers):
        raise ConfigError(f"layers={','.join(map(str, layers))}: the model has layers 0-{count - 1}")
    tokenizer = inference.tokenizer_of(run)
    task = run.task
    row = task.explain_row(tokenizer, run.cfg.data, text, text_pair, context)
    ids = np.asarray(row["input_ids"], np.int32)
    types = np.asarray(row["token_type_ids"], np.int32) if "token_type_ids" in row else None
    mask = np.ones_like(ids)
    output = run.model(jnp.asarray(ids[None]), attention_mask=jnp.asarray(mask[None]),
                       token_type_ids=None if types is None else jnp.asarray(types[None]), output_attentions=True)
    targets = task.attribution_targets(output, row, target=target, position=position, span=span,
                                       label_names=run.label_names)
    prediction, probabilities = task.describe_prediction(output, row, targets, run.label_names)
    attributions = attribution.integrated_gradients(
        run.model, ids, targets, attention_mask=mask, token_type_ids=types, baseline=baseline, steps=steps,
        method=method, pad_token_id=tokenizer.pad_token_id)
    tokens = [tokenizer.id_to_token(int(i)) or f"<{int(i)}>" for i in ids]

    out = out or os.path.join(run.run_dir, "explain")
    os.makedirs(out, exist_ok=True)
    written = attention_figures({layer: np.asarray(output.attentions[layer][0]) for layer in layers}, tokens,
                                int(mask.sum()), out)
    page = os.path.join(out, "explain.html")
    with open(page, "w", encoding="utf-8") as f:
        f.write(render_page(run, text, text_pair, context, tokens, prediction, probabilities, attributions,
                            [os.path.basename(p) for p in written]))
    return [page, *written]


# ---------------------------------------------------------------------- the page


def shade(score: float, scale: float) -> str:
    """A CSS background for `score` on [-scale, scale]: white at 0, red (positive) or blue (negative)."""
    t = 0.0 if scale <= 0 else min(abs(score) / scale, 1.0)
    fade = round(255 * (1.0 - 0.75 * t))
    return f"rgb(255,{fade},{fade})" if score >= 0 else f"rgb({fade},{fade},255)"


def shown_path(path: str) -> str:
    """`path` relative to the working directory when it lies below it (pages then hold no home paths)."""
    relative = os.path.relpath(path)
    return path if relative.startswith(os.pardir) else relative


def render_page(run, text, text_pair, context, tokens, prediction, probabilities, attributions, figures) -> str:
    e = html.escape
    parts = [
        "<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
        f"<title>flaxen explain: {e(text[:60])}</title>",
        ("<style>body{font-family:system-ui,sans-serif;max-width:60em;margin:2em auto;padding:0 1em;color:#222}"
         ".tokens{line-height:2.4em;font-family:ui-monospace,monospace;font-size:1.05em}"
         ".tok{padding:.2em .3em;margin:0 .1em;border-radius:.25em;border:1px solid #ddd}"
         "table{border-collapse:collapse}td,th{padding:.2em .8em;border-bottom:1px solid #eee;text-align:left}"
         "td.num{text-align:right;font-family:ui-monospace,monospace}.small{color:#666;font-size:.9em}</style>"),
        "</head><body>", "<h1>Why this prediction?</h1>",
        f'<p class="small">run {e(shown_path(run.run_dir))}, checkpoint step {run.step}; task {e(run.task.name)}</p>',
        f"<p><b>Input:</b> {e(text)}</p>",
    ]
    if text_pair:
        parts.append(f"<p><b>Second text:</b> {e(text_pair)}</p>")
    if context:
        parts.append(f"<p><b>Context:</b> {e(context)}</p>")
    parts.append(f"<p><b>Prediction:</b> {e(prediction)}</p>")
    if probabilities:
        parts.append("<table><tr><th>label</th><th>probability</th></tr>")
        parts += [f'<tr><td>{e(name)}</td><td class="num">{p:.4f}</td></tr>' for name, p in probabilities.items()]
        parts.append("</table>")
    for result in attributions:
        scale = float(np.max(np.abs(result.scores))) if len(result.scores) else 0.0
        parts.append(f"<h2>Attributions to the {e(result.target)}</h2>")
        parts.append(f'<p class="small">{e(result.method)}; red pushes the {e(result.target)} up, blue down; '
                     f"colour normalised to the largest |attribution| ({scale:.3g}). Hover a token for its value.</p>")
        spans = [f'<span class="tok" style="background:{shade(s, scale)}" title="{e(tok)}: {s:+.4g}">{e(tok)}</span>'
                 for tok, s in zip(tokens, result.scores)]
        parts.append('<div class="tokens">' + " ".join(spans) + "</div>")
        relative = abs(result.gap) / abs(result.delta) if result.delta else float("nan")
        parts.append("<table>"
                     f'<tr><td>sum of attributions</td><td class="num">{result.total:+.6g}</td></tr>'
                     f'<tr><td>f(input) &minus; f(baseline) = {result.value:.6g} &minus; {result.baseline_value:.6g}'
                     f'</td><td class="num">{result.delta:+.6g}</td></tr>'
                     f'<tr><td>completeness gap (sum &minus; difference)</td><td class="num">{result.gap:+.3g}'
                     f" ({relative:.2%} of the difference)</td></tr></table>")
        parts.append("<details><summary>per-token values</summary><table><tr><th>#</th><th>token</th>"
                     "<th>attribution</th></tr>")
        parts += [f'<tr><td>{i}</td><td>{e(tok)}</td><td class="num">{s:+.4g}</td></tr>'
                  for i, (tok, s) in enumerate(zip(tokens, result.scores))]
        parts.append("</table></details>")
    if figures:
        parts.append("<h2>Attention maps</h2><p>One figure per layer, one panel per head (query tokens down, "
                     "key tokens across): " + ", ".join(f'<a href="{e(name)}">{e(name)}</a>' for name in figures)
                     + "</p>")
    parts.append("</body></html>\n")
    return "\n".join(parts)


# ---------------------------------------------------------------------- the attention maps


def attention_figures(attentions: dict[int, np.ndarray], tokens: list[str], length: int, out: str) -> list[str]:
    """attention_layer<L>.png per layer L from attentions {L: [heads, q, k]} (float); the first `length`
    positions are the real tokens (padding skipped; a prefix-tuning prefix, at the front of the
    keys, is left out)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = tokens[:length]
    font = max(5.0, min(9.0, 220.0 / max(length, 1)))
    cell = min(max(0.16 * length + 1.2, 2.4), 6.0)
    written = []
    for layer, probabilities in attentions.items():
        heads, _, keys = probabilities.shape
        prefix = keys - probabilities.shape[1]
        maps = probabilities[:, :length, prefix:prefix + length]
        columns = math.ceil(math.sqrt(heads))
        rows = math.ceil(heads / columns)
        figure, axes = plt.subplots(rows, columns, figsize=(cell * columns + 0.8, cell * rows + 0.6), squeeze=False,
                                    constrained_layout=True)
        top = float(maps.max()) if maps.size else 1.0
        image = None
        for head in range(rows * columns):
            ax = axes[head // columns][head % columns]
            if head >= heads:
                ax.axis("off")
                continue
            image = ax.imshow(maps[head], cmap="viridis", vmin=0.0, vmax=top, interpolation="nearest")
            ax.set_title(f"head {head}", fontsize=font + 1)
            ax.set_xticks(range(length))
            ax.set_yticks(range(length))
            ax.set_xticklabels(labels, rotation=90, fontsize=font)
            ax.set_yticklabels(labels, fontsize=font)
            ax.tick_params(length=0)
        if image is not None:
            figure.colorbar(image, ax=axes, shrink=0.6, label="attention probability")
        figure.suptitle(f"layer {layer}: attention of each query token (row) to each key token (column)",
                        fontsize=font + 2)
        path = os.path.join(out, f"attention_layer{layer}.png")
        save_png(figure, path)
        plt.close(figure)
        written.append(path)
    return written


def save_png(figure, path: str) -> None:
    """The figure as a 256-colour palette PNG: a third of the size of matplotlib's RGBA one, and
    no visible difference for heat maps of one colour map."""
    import io

    from PIL import Image

    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100)
    buffer.seek(0)
    with Image.open(buffer) as image:
        image.convert("RGB").quantize(colors=256).save(path, optimize=True)


# ---------------------------------------------------------------------- the command


def main(argv: list[str] | None = None) -> int:
    from flaxen import inference

    try:
        options, overrides = parse(sys.argv[1:] if argv is None else argv)
        run = inference.load_run(options["run_dir"], step=options.get("step"), overrides=overrides,
                                 ignore=inference.RUN_KEYS + KEYS, verb="Explain")
        written = explain(run, options["text"], text_pair=options.get("text_pair"), context=options.get("context"),
                          target=options.get("target"), position=options.get("position"), span=options.get("span"),
                          steps=options.get("steps", 50), method=options.get("method", "gausslegendre"),
                          baseline=options.get("baseline", "zeros"), out=options.get("out"),
                          layers=options.get("layers"))
    except FlaxenError as error:
        return cli.report(error)
    for path in written:
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    cli.quiet_absl()
    sys.exit(main())
