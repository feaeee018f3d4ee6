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
    "qwen2.5-1.5b": (1536, 151936),
    "llama-3.1-8b": (4096, 128256),
    "gemma-2-2b": (2304, 256000),  # the Cut Cross-Entropy paper's shape
}
TOKENS = (4096, 8192, 16384, 32768)

# The shape where every provider, the compiled one included, and the precision check run.
GPU_FOCUS = Shape("gemma-2-2b", 8192, 2304, 256000)
# Small enough for a 2-core CPU in seconds.
CPU_SHAPES = [Shape("cpu-small", 1024, 256, 16000), Shape("cpu-4k", 4096, 256, 32000)]
CPU_FOCUS = Shape("cpu-tiny", 256, 64, 4000)
