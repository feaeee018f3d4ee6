"""Memory of one training step of a Llama-style model built from a config, fp32 and bf16 weights.

    python -m benchmarks.train_memory              # the README's rows: 1B-class width, 1 to 3 layers
    python -m benchmarks.train_memory --layers 2 --weights bfloat16 --foreach 0   # one row
    python -m benchmarks.train_memory --variant 3                                  # one variant's rows

The model is TinyLlama-1.1B's shape (hidden 2048, MLP 5632, 32 heads, 4 key-value heads,
vocabulary 32000, untied head) built with ``from_config``, at fewer layers than its 22: a whole
1.1B model in fp32 with AdamW needs about 18 GB, more than the shared CPU machine this runs on can
give. The step is the trainer's: ``GFTPolicy``'s fused loss (forward and backward) on 2 sequences
of 256 tokens, ``torch.optim.AdamW`` (``foreach`` as asked: torch's default is the for-each
implementation on CUDA, the per-parameter loop on the CPU), ``zero_grad(set_to_none=True)``.

Every storage created from the model's construction on is followed by the project's memory probe
(``cpu_memory._StorageTracker``): the peak of live bytes over two steps (the second starts with
the optimizer's states), weights, gradients, states and activations included, which is what
``torch.cuda.max_memory_allocated`` reports for the same computation on a GPU, up to its
allocator's rounding. Each row runs in a fresh process. The 22-layer figure is planned, not
measured: each layer adds the same weights, gradients, states and saved activations, so the
increment from 2 to 3 layers extends the 3-layer peak; the increment from 1 to 2 layers is shown
beside it (it differs where the peak sits elsewhere in the step at one layer).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

LLAMA_1B = dict(
    hidden_size=2048,
    intermediate_size=5632,
    num_attention_heads=32,
    num_key_value_heads=4,
    vocab_size=32000,
    max_position_embeddings=2048,
    tie_word_embeddings=False,
)
FULL_LAYERS = 22  # TinyLlama-1.1B
BATCH, TOKENS, PROMPT = 2, 256, 32
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def step_peak(
    layers: int, weights: str, autocast: bool, foreach: bool, lora_r: int = 0, steps: int = 2, shape: dict = LLAMA_1B
) -> dict:
    """One row: the peak live bytes of ``steps`` training steps, in this process (``lora_r``: a
    LoRA adapter of that rank on every linear layer but the head, as ``gft-train --lora-r``;
    ``shape``: the config's sizes)."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    from benchmarks.cpu_memory import _StorageTracker
    from gft_train.config import Config
    from gft_train.lm import Batch
    from gft_train.step import GFTPolicy, run_loss

    torch.manual_seed(0)
    input_ids = torch.randint(0, shape["vocab_size"], (BATCH, TOKENS))
    labels = input_ids.clone()
    labels[:, :PROMPT] = -100
    mask = torch.ones_like(input_ids)
    adv = torch.tensor([1.0, -0.5])
    n_valid = float((labels[:, 1:] != -100).sum())
    config = LlamaConfig(num_hidden_layers=layers, **shape)
    with _StorageTracker(input_ids, labels, mask, adv) as tracker:
        model = AutoModelForCausalLM.from_config(config, dtype=DTYPES[weights])
        n_params = sum(p.numel() for p in model.parameters())
        weights_bytes = tracker.live
        if lora_r:
            from gft_train.adapters import apply_lora

            model = apply_lora(model, Config(lora_r=lora_r), "llama-1b-shape")
        policy = GFTPolicy(model, run_loss(Config(tau=0.7).resolved())).train()
        batch = Batch(input_ids, mask, labels, adv)
        trainable = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(trainable, lr=1e-5, foreach=foreach)
        start = time.perf_counter()
        for _ in range(steps):
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                loss, _ = policy(batch, n_valid)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        seconds = (time.perf_counter() - start) / steps
    states = [v for s in optimizer.state.values() for k, v in s.items() if k != "step"]
    return dict(
        layers=layers,
        weights=weights,
        autocast_bf16=autocast,
        adamw_foreach=foreach,
        lora_r=lora_r,
        params=n_params,
        params_m=round(n_params / 1e6, 1),
        trainable=sum(p.numel() for p in trainable),
        trainable_m=round(sum(p.numel() for p in trainable) / 1e6, 4),
        tokens=BATCH * TOKENS,
        weights_mib=round(weights_bytes / 2**20, 1),
        state_dtype=str(states[0].dtype).replace("torch.", ""),
        peak_mib=round(tracker.peak / 2**20, 1),
        peak_bytes_per_param=round(tracker.peak / n_params, 2),
        seconds_per_step=round(seconds, 1),
        threads=torch.get_num_threads(),
    )


def measure(layers: int, weights: str, autocast: bool, foreach: bool, lora_r: int = 0) -> dict:
    """``step_peak`` in a fresh process (a peak is the process's own)."""
    args = ["--layers", str(layers), "--weights", weights, "--autocast", str(int(autocast))]
    args += ["--foreach", str(int(foreach)), "--lora-r", str(lora_r), "--inner"]
    out = subprocess.run(
        [sys.executable, "-m", "benchmarks.train_memory", *args],
        check=True,
        capture_output=True,
        text=True,
        cwd=Path(__file__).resolve().parents[1],
        env=dict(os.environ),
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


# (weights, autocast, LoRA rank): fp32 weights, fp32 weights under --bf16 autocast, bf16 weights,
# a rank-16 LoRA adapter on bf16 weights
VARIANTS = (("float32", False, 0), ("float32", True, 0), ("bfloat16", False, 0), ("bfloat16", False, 16))


def planned_rows(foreach: bool = True, variants=VARIANTS) -> list[dict]:
    """For each variant: the measured rows at 1, 2 and 3 layers and the planned full-depth row,
    the 3-layer peak extended by the increment from 2 to 3 layers (both increments reported: equal
    when the peak sits at the same point of the step at every depth)."""
    rows = []
    for weights, autocast, lora_r in variants:
        measured = {n: measure(n, weights, autocast, foreach, lora_r) for n in (1, 2, 3)}
        rows += measured.values()
        last, more = measured[3], FULL_LAYERS - 3

        def extended(key, last=last, more=more, measured=measured):
            return last[key] + more * (last[key] - measured[2][key])

        full = dict(last, layers=FULL_LAYERS, planned=True, seconds_per_step=None)
        full.update({k: extended(k) for k in ("params", "trainable")})
        full.update({k: round(extended(k), 1) for k in ("peak_mib", "weights_mib")})
        full["params_m"] = round(full["params"] / 1e6, 1)
        full["trainable_m"] = round(full["trainable"] / 1e6, 4)
        full["peak_bytes_per_param"] = round(full["peak_mib"] * 2**20 / full["params"], 2)
        full["increment_1_2_mib"] = round(measured[2]["peak_mib"] - measured[1]["peak_mib"], 1)
        full["increment_2_3_mib"] = round(last["peak_mib"] - measured[2]["peak_mib"], 1)
        rows.append(full)
    return rows


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=0, help="one row at this depth (default: the README's rows)")
    ap.add_argument("--weights", choices=sorted(DTYPES), default="float32")
    ap.add_argument("--autocast", type=int, default=0, help="1: the step under bf16 autocast (--bf16)")
    ap.add_argument("--foreach", type=int, default=1, help="AdamW's for-each implementation (CUDA's default)")
    ap.add_argument("--lora-r", type=int, default=0, help="a LoRA adapter of this rank (0: every weight trains)")
    ap.add_argument("--variant", type=int, help="the README's rows of one variant only (an index of VARIANTS)")
    ap.add_argument("--inner", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.inner:
        print(json.dumps(step_peak(args.layers, args.weights, bool(args.autocast), bool(args.foreach), args.lora_r)))
        return
    if args.layers:
        print(json.dumps(measure(args.layers, args.weights, bool(args.autocast), bool(args.foreach), args.lora_r)))
        return
    meta = dict(
        date=time.strftime("%Y-%m-%d"),
        torch=torch.__version__,
        cpu=torch.backends.cpu.get_cpu_capability(),
        threads=os.environ.get("OMP_NUM_THREADS", "default"),
    )
    print(json.dumps(meta))
    variants = VARIANTS if args.variant is None else VARIANTS[args.variant : args.variant + 1]
    for row in planned_rows(bool(args.foreach), variants):
        print(json.dumps(row))


if __name__ == "__main__":
    main()
