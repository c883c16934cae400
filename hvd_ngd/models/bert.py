"""BERT-Large (24 layers, hidden 1024, 16 heads, FFN 4096, WordPiece vocabulary 30,522) as layer
specs: embeddings (word, position, token type) and their LayerNorm; per encoder layer Q, K, V and
attention-output Linear layers (1024 -> 1024), a LayerNorm, the FFN (1024 -> 4096 -> 1024) and a
LayerNorm; the pooler (1024 -> 1024) and a classifier (1024 -> ``num_labels``): 198 layers."""

from __future__ import annotations

from typing import List

from hvd_ngd.enums import LayerKind
from hvd_ngd.layer_spec import LayerSpec


def bert_large_layer_specs(
    num_labels: int = 2, vocab_size: int = 30522, max_positions: int = 512, layers: int = 24
) -> List[LayerSpec]:
    """The preconditioned layers of BERT-Large (sequence classification head)."""
    hidden, ffn = 1024, 4096
    specs = [
        LayerSpec("embeddings.word_embeddings", LayerKind.EMBEDDING, vocab_size, hidden),
        LayerSpec("embeddings.position_embeddings", LayerKind.EMBEDDING, max_positions, hidden),
        LayerSpec("embeddings.token_type_embeddings", LayerKind.EMBEDDING, 2, hidden),
        LayerSpec("embeddings.LayerNorm", LayerKind.LAYERNORM, hidden, hidden, True),
    ]
    for i in range(layers):
        p = f"encoder.layer.{i}"
        specs += [LayerSpec(f"{p}.attention.self.{n}", LayerKind.LINEAR, hidden, hidden, True) for n in ("query", "key", "value")]
        specs += [
            LayerSpec(f"{p}.attention.output.dense", LayerKind.LINEAR, hidden, hidden, True),
            LayerSpec(f"{p}.attention.output.LayerNorm", LayerKind.LAYERNORM, hidden, hidden, True),
            LayerSpec(f"{p}.intermediate.dense", LayerKind.LINEAR, hidden, ffn, True),
            LayerSpec(f"{p}.output.dense", LayerKind.LINEAR, ffn, hidden, True),
            LayerSpec(f"{p}.output.LayerNorm", LayerKind.LAYERNORM, hidden, hidden, True),
        ]
    specs += [
        LayerSpec("pooler.dense", LayerKind.LINEAR, hidden, hidden, True),
        LayerSpec("classifier", LayerKind.LINEAR, hidden, num_labels, True),
    ]
    return specs
