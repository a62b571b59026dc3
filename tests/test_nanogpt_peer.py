"""scripts/nanogpt_torch.py, the PyTorch peer of the shakespeare_char_cpu preset: it runs end to end
on a small text, counts parameters like flaxen's bias-free GPT-2 of the same size, and its
full-split loss is the token-weighted mean over every position of the split."""
import importlib.util
import json
import math
import os

import numpy as np
import pytest

torch = pytest.importorskip("torch")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def peer():
    spec = importlib.util.spec_from_file_location("flaxen_nanogpt_torch", os.path.join(ROOT, "scripts", "nanogpt_torch.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_runs_end_to_end_and_scores_the_whole_split(peer, tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(os.path.join(ROOT, "scripts"))
    os.makedirs(tmp_path / "tinyshakespeare")
    rng = np.random.default_rng(0)
    text = "".join(rng.choice(list("abcdefgh \n"), 3001))
    (tmp_path / "tinyshakespeare" / "input.txt").write_text(text)
    out = tmp_path / "out.json"
    size = ["--layers", "1", "--heads", "2", "--width", "16", "--block", "8", "--batch", "2"]
    assert peer.main(["--data-dir", str(tmp_path), "--iters", "3", "--eval-interval", "3", "--eval-iters", "1",
                      "--warmup", "1", "--out", str(out), *size]) == 0
    run = json.loads(out.read_text())["runs"][0]
    train, val, vocab = peer.load_text(str(tmp_path))
    assert vocab == 10 and len(train) == 2700 and run["val_tokens_full_split"] == len(val) - 1
    # tied embeddings: wte + wpe + per layer (2 LayerNorm scales, qkv, proj, fc, proj) + final LayerNorm
    width = 16
    assert run["parameters"] == vocab * width + 8 * width + (2 * width + 12 * width * width) + width
    assert math.isfinite(run["val_loss_full_split"]) and run["history"][-1]["iter"] == 3


def test_full_split_loss_is_token_weighted_over_every_position(peer):
    torch.manual_seed(0)
    model = peer.build(7, layers=1, heads=1, width=8, block=4)
    ids = np.random.default_rng(1).integers(0, 7, 23)
    # windows [0:4], [4:8], ... with targets shifted by one; the last window holds the remainder
    total, count = 0.0, 0
    for start in range(0, len(ids) - 1, 4):
        x = torch.from_numpy(ids[start:start + 4])
        y = torch.from_numpy(ids[start + 1:start + 5])
        x = x[:len(y)]
        total += model(x[None], y[None], reduction="sum").item()
        count += len(y)
    assert count == len(ids) - 1
    assert peer.full_split_loss(model, ids, block=4, batch=2) == pytest.approx(total / count, rel=1e-6)
