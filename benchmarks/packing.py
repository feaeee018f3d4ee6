"""Training throughput, padded vs packed micro-batches, on the demo's groups (or spread lengths).

    python -m benchmarks.packing [--repeats 2] [--steps 20] [--micro-batch-size 64] [--spread 10-150]
                                 [--hidden 64 --layers 2] [--attn-implementation sdpa] [--groups runs/demo/.../groups.jsonl]

The sequences are the demo's (``gft_train.demo``): its fine-tuning prompts (``make_data``, seed 0)
with the groups its GFT runs train on, 1 expert + 3 teacher + 4 self responses per prompt, 8
prompts per step, max_length 32: the expert's demonstration as the demo's solver writes it
(``reversed``), the teacher's responses in the two orders it was trained on (``left_to_right``,
``reversed``), the self-samples as the base writes (``no_carry``), each ended with EOS, through the
demo's character tokenizer. (Built from the task's own writers, not sampled: no model training;
``--groups`` reads a groups.jsonl a demo run saved instead.) The model is the demo's base shape
(a Qwen2 of hidden 64, 2 layers) built from its config, float32.

``--spread LO-HI`` trains groups whose sequences are LO to HI tokens long instead (the demo's
prompts, responses of random digits; max_length HI unless given).

One measured step is the trainer's own: ``lm.encode`` (and ``packing.pack``, in the layout the
trainer packs for the attention) of each micro-batch, ``GFTPolicy`` forward and backward, AdamW
step. Tokens/s counts the sequences' tokens (prompt and response; padding not counted), the same
numerator for both layouts. Each repeat runs 3 warm-up steps then the timed ones, each step padded
and packed back to back on the same weights (which goes first alternating), so a load that comes
and goes on a shared machine hits both alike; reported: each repeat's tokens/s and median step
time, and over every timed step the padded time over the packed time (median, quartiles, range).
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import statistics
import time

import torch


def demo_groups(n_prompts: int, seed: int = 0) -> list[tuple[str, str, float]]:
    """(prompt, response, advantage) of the demo's GFT groups over its first ``n_prompts`` prompts."""
    from gft_train.demo import sums

    rows = sums.make_data(seed)["train"][:n_prompts]
    rng = random.Random(seed)
    seqs = []
    for r in rows:
        numbers = [int(x) for x in r["prompt"].rstrip("=").split("+")]
        responses = (
            [r["expert"]]
            + [sums.write(numbers, ("left_to_right", "reversed")[i % 2]) for i in range(3)]
            + [sums.write(numbers, "no_carry") for _ in range(4)]
        )
        seqs += [(r["prompt"], text, rng.gauss(0.0, 1.0)) for text in responses]
    return seqs


def spread_groups(n_prompts: int, lo: int, hi: int, seed: int = 0) -> list[tuple[str, str, float]]:
    """Groups whose lengths spread: the demo's prompts, 8 responses each of random digits, each
    sequence (prompt, response and EOS) ``lo`` to ``hi`` tokens long, uniformly."""
    from gft_train.demo import sums

    rows = sums.make_data(seed)["train"][:n_prompts]
    rng = random.Random(seed)
    seqs = []
    for r in rows:
        for _ in range(8):
            n = max(rng.randint(lo, hi) - len(r["prompt"]) - 1, 1)  # (the tokenizer is per character)
            seqs.append((r["prompt"], "".join(rng.choice("0123456789") for _ in range(n)), rng.gauss(0.0, 1.0)))
    return seqs


def recorded_groups(path: str) -> list[tuple[str, str, float]]:
    seqs = []
    for line in open(path):
        g = json.loads(line)
        seqs += [
            (g["prompt"], r["token_ids"] if r.get("token_ids") else r["text"], r["advantage"]) for r in g["responses"]
        ]
    return seqs


def _model(hidden: int, layers: int, attn: str, vocab: int, pad: int, eos: int, max_length: int):
    from transformers import AutoModelForCausalLM, Qwen2Config

    cfg = Qwen2Config(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=4 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=max(1, hidden // 64),
        num_key_value_heads=max(1, hidden // 64),
        head_dim=64,
        max_position_embeddings=max(64, max_length),
        tie_word_embeddings=False,
        pad_token_id=pad,
        eos_token_id=eos,
        bos_token_id=eos,
        attn_implementation=attn,
    )
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(cfg)


def _step(policy, optimizer, tokenizer, seqs, micro: int, max_length: int, packed: bool, one_row: bool) -> int:
    from gft_train.lm import encode
    from gft_train.packing import pack
    from gft_train.trainer import aggregation

    batches = [encode(tokenizer, seqs[i : i + micro], max_length) for i in range(0, len(seqs), micro)]
    tokens = sum(int(b.attention_mask.sum()) for b in batches)
    if packed:
        batches = [pack(b, rows=not one_row) for b in batches]
    _, normalizer = aggregation(
        "token-mean", sum(b.n_valid for b in batches), sum(b.n_seqs for b in batches), max_length
    )
    for b in batches:
        loss, _ = policy(b, normalizer)
        loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return tokens


def _time_layouts(policy, optimizer, tokenizer, steps, args, one_row: bool) -> tuple[list, list]:
    """Each repeat's row (tokens/s, median step time of each layout) and every timed step's
    padded time over its packed time."""
    runs, pair_ratios = [], []
    for repeat in range(args.repeats):
        # step by step, the two layouts alternate on the same step's sequences (which goes first
        # alternating too): a load that comes and goes on a shared machine hits both alike
        times = {False: [], True: []}
        tokens = 0
        for i, s in enumerate(steps[: args.steps + 3]):
            for packed in (False, True) if i % 2 == 0 else (True, False):
                t0 = time.perf_counter()
                n = _step(policy, optimizer, tokenizer, s, args.micro_batch_size, args.max_length, packed, one_row)
                if i >= 3:  # warm-up excluded
                    times[packed].append(time.perf_counter() - t0)
            if i >= 3:
                tokens += n
                pair_ratios.append(times[False][-1] / times[True][-1])
        row = {"repeat": repeat}
        for packed, name in ((False, "padded"), (True, "packed")):
            row[f"{name}_tokens_per_s"] = tokens / sum(times[packed])
            row[f"{name}_median_step_s"] = statistics.median(times[packed])
        row["packed_over_padded"] = row["packed_tokens_per_s"] / row["padded_tokens_per_s"]
        runs.append(row)
        print(json.dumps(row))
    return runs, pair_ratios


def measure(args) -> dict:
    from gft_train.config import Optimization
    from gft_train.demo.model import build_tokenizer
    from gft_train.lm import encode
    from gft_train.packing import check_packing, packs_in_one_row
    from gft_train.trainer import GFTPolicy, run_loss

    tokenizer = build_tokenizer()
    per_step = args.prompts_per_step * 8
    n_prompts = args.prompts_per_step * (args.steps + 3)
    if args.groups:
        seqs = recorded_groups(args.groups)
    elif args.spread:
        seqs = spread_groups(n_prompts, *args.spread)
    else:
        seqs = demo_groups(n_prompts)
    steps = [seqs[i : i + per_step] for i in range(0, len(seqs) - per_step + 1, per_step)]
    lengths = [int(m.sum()) for s in steps for m in encode(tokenizer, s, args.max_length).attention_mask]
    model = _model(
        args.hidden,
        args.layers,
        args.attn_implementation,
        len(tokenizer),
        tokenizer.pad_token_id,
        tokenizer.eos_token_id,
        args.max_length,
    )
    check_packing(model)
    policy = GFTPolicy(model, run_loss(Optimization(tau=0.7, loss_aggregation="token-mean")))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    runs, pair_ratios = _time_layouts(policy, optimizer, tokenizer, steps, args, packs_in_one_row(model))
    width = [max(lengths[i : i + args.micro_batch_size]) for i in range(0, len(lengths), args.micro_batch_size)]
    padded_slots = sum(
        w * len(lengths[i * args.micro_batch_size : (i + 1) * args.micro_batch_size]) for i, w in enumerate(width)
    )
    return {
        "date": time.strftime("%Y-%m-%d"),
        "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
        "cpu_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "shape": dict(
            hidden=args.hidden,
            layers=args.layers,
            attn=args.attn_implementation,
            micro_batch_size=args.micro_batch_size,
            sequences_per_step=per_step,
            max_length=args.max_length,
            steps=args.steps,
            packed_layout="one row" if packs_in_one_row(model) else "best-fit rows",
            sequences="recorded"
            if args.groups
            else (f"spread {args.spread[0]}-{args.spread[1]}" if args.spread else "demo"),
        ),
        "lengths": dict(
            min=min(lengths),
            median=statistics.median(lengths),
            max=max(lengths),
            mean=round(statistics.mean(lengths), 2),
            padding_frac=round(1 - sum(lengths) / padded_slots, 3),
        ),
        "packed_over_padded": _spread([r["packed_over_padded"] for r in runs]),
        # the same step's padded time over its packed time, every timed step of every repeat
        "step_pairs_padded_over_packed_time": _spread(pair_ratios),
        "runs": runs,
    }


def _spread(values: list[float]) -> dict:
    """Median, quartiles, range and count."""
    q = statistics.quantiles(values, n=4) if len(values) > 1 else values * 3
    return {
        "median": round(statistics.median(values), 3),
        "q1": round(q[0], 3),
        "q3": round(q[2], 3),
        "min": round(min(values), 3),
        "max": round(max(values), 3),
        "n": len(values),
    }


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(prog="python -m benchmarks.packing", description=__doc__.split("\n")[0])
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--steps", type=int, default=20, help="timed steps per layout and repeat (after 3 warm-up)")
    p.add_argument("--prompts-per-step", type=int, default=8)
    p.add_argument("--micro-batch-size", type=int, default=64, help="the demo's: 64 (a step's 64 sequences at once)")
    p.add_argument("--max-length", type=int, default=None, help="32 (the demo's); the top of --spread with it")
    p.add_argument(
        "--spread",
        default="",
        help="LO-HI: groups whose sequences are LO to HI tokens long, uniformly (e.g. 10-150), instead of the demo's",
    )
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument(
        "--attn-implementation", default="sdpa", help="attention implementation (eager, sdpa, flex_attention, ...)"
    )
    p.add_argument("--groups", default="", help="a groups.jsonl a demo run saved (its sequences instead)")
    args = p.parse_args(argv)
    if args.spread:
        try:
            lo, hi = (int(x) for x in args.spread.split("-"))
        except ValueError:
            p.error(f"--spread must be LO-HI (e.g. 10-150), got {args.spread!r}")
        if not 1 <= lo <= hi:
            p.error(f"--spread must have 1 <= LO <= HI, got {args.spread!r}")
        args.spread = (lo, hi)
    if args.max_length is None:
        args.max_length = args.spread[1] if args.spread else 32
    result = measure(args)
    print(json.dumps({k: v for k, v in result.items() if k != "runs"}))
    return result


if __name__ == "__main__":
    main()
