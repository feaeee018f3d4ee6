"""The shapes the benchmark runs: (hidden size, vocabulary) of real models, at several token counts."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Shape:
    model: str
    n: int  # tokens
    h: int  # hidden size
    v: int  # vocabulary

    @property
    def name(self) -> str:
        return f"{self.model}-N{self.n}"


MODELS = {
    "gemma-2-2b": (2304, 256000),  # the Cut Cross-Entropy paper's shape
    "llama-3.1-8b": (4096, 128256),  # Llama-3-8B's too
    "qwen2.5-7b": (3584, 152064),
    "qwen2.5-1.5b": (1536, 151936),
}
TOKENS = (4096, 8192, 16384, 32768)

# The shapes the GPU targets are stated at (README, "Measured"): every provider, at 0% and 90%
# zero-advantage sequences, with precision rows; other shapes by --models/--tokens.
GPU_TARGETS = [Shape(m, 8192, *MODELS[m]) for m in ("gemma-2-2b", "llama-3.1-8b", "qwen2.5-7b")]
PRECISION_TOKENS = 2048  # the float64 truth's cost; the error does not depend on N much
# Small enough for a 2-core CPU in seconds.
CPU_SHAPES = [Shape("cpu-small", 1024, 256, 16000), Shape("cpu-4k", 4096, 256, 32000)]
CPU_FOCUS = Shape("cpu-tiny", 256, 64, 4000)
