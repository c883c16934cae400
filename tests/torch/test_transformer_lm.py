"""Smoke test of examples/transformer_lm.py on one process: the corpus is real held-out text,
every attention/MLP/embedding/LayerNorm layer of the tiny model is preconditioned (its hooks
fire), and a few K-FAC and AdamW steps lower the validation loss."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import horovod.torch as hvd
import torch

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def load_example():
    sys.path.insert(0, str(EXAMPLES))
    spec = importlib.util.spec_from_file_location("transformer_lm", EXAMPLES / "transformer_lm.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


LM = load_example()


def test_corpus_is_real_text_with_disjoint_validation() -> None:
    train, val = LM.load_corpus(train_bytes=50_000, val_bytes=20_000)
    assert len(train) == 50_000 and len(val) == 20_000
    text = bytes(train[:5000].tolist()).decode("utf-8", errors="replace")
    assert "def " in text and "import" in text
    assert bytes(val[:2000].tolist()) not in bytes(train.tolist()), "validation text also in the training text"


def test_tiny_lm_trains_with_kfac_and_adamw() -> None:
    hvd.init()
    torch.set_num_threads(1)
    data = LM.load_corpus(train_bytes=60_000, val_bytes=20_000)
    model_args = dict(width=16, heads=2, layers=1, context=16)
    runs = {kind: LM.train_one(kind, data, steps=12, batch_size=8, seed=0, lr=LM.LEARNING_RATES[kind], eval_every=6,
                               model_args=model_args, val_windows=16) for kind in ("kfac", "adamw")}
    for kind, run in runs.items():
        losses = run["history"]["val_loss"]
        assert all(torch.isfinite(torch.tensor(losses))), f"{kind}: {losses}"
        assert losses[-1] < 5.4, f"{kind} did not learn: validation loss {losses} (uniform over bytes is 5.55)"
    # The K-FAC run preconditioned every Linear, Embedding and LayerNorm of the model.
    model = LM.TinyLM(**model_args)
    opt = LM.make_optimizer("kfac", model, 0.1)
    names = {layer.name for layer in opt.kfac.layers}
    expected = {n for n, m in model.named_modules() if isinstance(m, (torch.nn.Linear, torch.nn.Embedding, torch.nn.LayerNorm))}
    assert names == expected, f"registered {sorted(names)}, expected {sorted(expected)}"
    x, y = LM.windows(data[0], torch.tensor([0, 100]), 16)
    LM.lm_loss(model, x, y).backward()
    opt.step()  # raises if a registered layer's hooks did not fire
    assert opt.kfac.steps == 1
