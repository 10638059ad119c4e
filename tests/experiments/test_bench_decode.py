"""`python -m experiments.bench decode` on the tiny preset, in process: our decoder and transformers' generate on
the same weights give the same greedy tokens; cache sizes are the caches' own; MTP rows count their drafts."""

import json
import math

import pytest

from experiments.bench import main
from tests.fast_compile import cheap_compiles  # noqa: F401  (an autouse fixture: XLA's cheapest compiles)

NEW = 8


def test_decode_benchmark(tmp_path):
    out = tmp_path / "decode.json"
    lines = []
    result = main(["decode", "--config", "tiny", "--batch", "1,2", "--new-tokens", str(NEW), "--prompt-len", "16",
                   "--draft-tokens", "2", "--repeats", "1", "--out", str(out)], print_fn=lines.append)
    assert json.loads(out.read_text())["rows"] == json.loads(json.dumps(result["rows"]))
    rows = {(r["impl"], r["batch"]): r for r in result["rows"]}
    assert set(rows) == {("ours", 1), ("transformers (cpu)", 1), ("ours", 2), ("transformers (cpu)", 2),
                         ("ours + MTP x2", 1), ("ours + MTP x2 (all accepted)", 1)}
    for batch in (1, 2):
        ours, hf = rows[("ours", batch)], rows[("transformers (cpu)", batch)]
        assert ours["same_tokens"] == 1.0            # the same model on both sides
        assert ours["cache_bytes_per_token"] == (32 + 8) * 3 * 4   # latent + rope key, 3 layers, float32
        assert hf["cache_bytes_per_token"] > 0 and ours["cache_ratio"] > 0
        assert ours["decode_tok_s"] > 0 and hf["decode_tok_s"] > 0
        assert ours["speedup"] == pytest.approx(ours["decode_tok_s"] / hf["decode_tok_s"])
    spec, upper = rows[("ours + MTP x2", 1)], rows[("ours + MTP x2 (all accepted)", 1)]
    assert spec["same_tokens"] == 1.0 and 0.0 <= spec["acceptance"] <= 1.0
    assert upper["acceptance"] == 1.0 and upper["tokens_per_step"] == (NEW - 1) / math.ceil((NEW - 1) / 3)
    assert "MTP acceptance" in "\n".join(lines)
