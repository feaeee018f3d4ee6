"""One process of a sharded training run (tests/train/test_sharded_training.py launches it with
``accelerate launch --config_file ...``): trains with ``gft_train`` and records, per rank, what
the test needs to trust the run: the distribution accelerate set up, whether the lm_head weight
really is a shard outside the forward, and which sequences this rank trained on.

    python tests/sharded_run.py OUTPUT_DIR -- <gft-train train arguments>
"""

import argparse
import json
import sys

import torch
from safetensors.torch import load_file

torch.set_num_threads(1)
try:  # DeepSpeed on the CPU would first compile a shared-memory all-reduce (a speed-up, about
    # 30-100 s of compiling here); gloo carries the collectives without it
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
except ImportError:
    pass

from gft_train import config as config_mod  # noqa: E402
from gft_train import step as step_mod  # noqa: E402
from gft_train import trainer as trainer_mod  # noqa: E402


def main():
    out, args = sys.argv[1], sys.argv[sys.argv.index("--") + 1 :]
    parser = argparse.ArgumentParser()
    config_mod.add_arguments(parser)
    cfg = config_mod.from_args(parser.parse_args([*args, "--output-dir", out]))
    seen = []
    encode = step_mod.encode

    def recording_encode(tokenizer, items, max_length):
        seen.extend(f"{p}|{r}" for p, r, _ in items)
        return encode(tokenizer, items, max_length)

    step_mod.encode = recording_encode
    t = trainer_mod.Trainer(cfg)
    head = t.model.get_output_embeddings()
    weight = head.weight

    # this rank's storage of the head weight: a DTensor's local shard (FSDP2), ZeRO-3's partition,
    # or the parameter itself (FSDP1's view into this rank's flat shard, or a whole replica)
    def stored(p):
        return (p.to_local() if hasattr(p, "to_local") else getattr(p, "ds_tensor", p)).numel()

    report = {
        "distributed_type": str(t.acc.distributed_type),
        "processes": t.acc.num_processes,
        "wrapper": type(t.policy).__name__,
        "sharded": t.sharded,
        # the head is an FSDP unit of its own (FSDP1 wraps it, FSDP2 changes its class)
        "head_unit": type(head).__name__.startswith(("FullyShardedDataParallel", "FSDP")),
        "head_local_numel": stored(weight),
        "head_numel": t.model.config.vocab_size * t.model.config.hidden_size,
        # and of all the weights (FSDP1's flat parameters, where the head's own attribute is a view)
        "local_numel": sum(stored(p) for p in t.policy.parameters()),
        "numel": sum(v.numel() for v in load_file(f"{cfg.model}/model.safetensors").values()),
    }
    t.train()
    report["sequences"] = seen
    with open(f"{out}/rank{t.acc.process_index}.json", "w") as f:
        json.dump(report, f)


if __name__ == "__main__":
    main()
