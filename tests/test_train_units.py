"""gft_train pieces: data validation, config, advantages (Eq. 4), pass@k, rewards, the LM helper."""
import json
import math

import pytest
import torch

from gft_train import config as config_mod
from gft_train.data import DataError, load_rows
from gft_train.evaluate import pass_at_k
from gft_train.groups import Group, Response, group_advantages, load_groups, save_groups
from gft_train.rewards import MathReward, load_reward


def _write(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


GOOD = {"prompt": "1+1=", "answer": "2", "expert": "2", "teachers": ["2", "3"]}


@pytest.mark.parametrize("bad,field,words", [
    ({"answer": "2", "expert": "2"}, "prompt", "missing"),
    ({"prompt": "1+1=", "answer": 2, "expert": "2"}, "answer", "expected a string"),
    ({"prompt": "1+1=", "answer": "2", "expert": ""}, "expert", "empty"),
    ({"prompt": "1+1=", "answer": "2", "expert": "2", "teachers": "2"}, "teachers", "list of strings"),
    ("{not json", "*", "not JSON"),
])
def test_bad_rows_name_file_row_and_field(tmp_path, bad, field, words):
    path = _write(tmp_path / "d.jsonl", [GOOD, GOOD, bad])
    with pytest.raises(DataError) as info:
        load_rows(path)
    msg = str(info.value)
    assert str(path) in msg and "row 2" in msg and repr(field) in msg and words in msg, msg
    assert info.value.row == 2 and info.value.field == field


def test_parquet_rows_are_read_and_checked(tmp_path):
    import datasets

    datasets.Dataset.from_list([GOOD, {**GOOD, "teachers": None}]).to_parquet(str(tmp_path / "d.parquet"))
    rows = load_rows(tmp_path / "d.parquet")
    assert [r.teachers for r in rows] == [["2", "3"], []]
    datasets.Dataset.from_list([GOOD, {**GOOD, "expert": None}]).to_parquet(str(tmp_path / "bad.parquet"))
    with pytest.raises(DataError, match="row 1: field 'expert'"):
        load_rows(tmp_path / "bad.parquet")


def test_missing_and_empty_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        load_rows(tmp_path / "nope.jsonl")
    (tmp_path / "e.jsonl").write_text("")
    with pytest.raises(DataError, match="no rows"):
        load_rows(tmp_path / "e.jsonl")


def test_group_advantages_follow_eq4_with_the_sample_std():
    rewards = [1.0, 0.0, 0.0, 1.0, 1.0, 0.0, 0.0, 0.0]
    r = torch.tensor(rewards, dtype=torch.float64)
    expected = (r - r.mean()) / (r.std() + 1e-6)   # torch.std: the sample std, as the authors' code
    assert torch.allclose(torch.tensor(group_advantages(rewards), dtype=torch.float64), expected)
    assert group_advantages([0.3] * 5) == [0.0] * 5
    assert group_advantages([1.0]) == [0.0]


def test_pass_at_k_matches_brute_force():
    from itertools import combinations

    n, c = 6, 2
    outcomes = [1] * c + [0] * (n - c)
    for k in range(1, n + 1):
        subsets = list(combinations(outcomes, k))
        brute = sum(1 for s in subsets if any(s)) / len(subsets)
        assert math.isclose(pass_at_k(n, c, k), brute)


def test_config_presets_flags_and_yaml(tmp_path):
    import argparse

    p = argparse.ArgumentParser()
    config_mod.add_arguments(p)
    (tmp_path / "c.yaml").write_text("method: gft\nlr: 0.001\nmax_steps: 7\n")
    cfg = config_mod.from_args(p.parse_args(["--config", str(tmp_path / "c.yaml"), "--max-steps", "9", "--no-dcr"])).resolved()
    assert (cfg.lr, cfg.max_steps, cfg.tau, cfg.n_expert, cfg.n_teacher, cfg.n_self) == (0.001, 9, 0.0, 1, 3, 4)
    assert config_mod.Config(gal=False).resolved().uses_group_advantage is False
    sft = config_mod.Config(method="sft").resolved()
    assert (sft.tau, sft.n_self, sft.uses_group_advantage) == (0.0, 0, False)
    assert math.isinf(config_mod.Config(method="dft").resolved().tau)
    grpo = config_mod.Config(method="grpo").resolved()
    assert (grpo.n_expert, grpo.n_self, grpo.tau, grpo.uses_group_advantage) == (0, 8, 0.0, True)
    with pytest.raises(ValueError, match="method must be one of"):
        config_mod.Config(method="ppo").resolved()
    (tmp_path / "bad.yaml").write_text("learning_rate: 1\n")
    with pytest.raises(ValueError, match="unknown config fields"):
        config_mod.from_args(p.parse_args(["--config", str(tmp_path / "bad.yaml")]))


def test_math_reward_and_user_reward(tmp_path, monkeypatch):
    reward = MathReward()
    try:
        assert reward(["q"] * 3, ["81", "\\boxed{0.5}", "12"], ["81", "\\frac{1}{2}", "13"]) == [1.0, 1.0, 0.0]
    finally:
        reward.close()
    (tmp_path / "my_rewards.py").write_text(
        "def length(prompts, completions, answers):\n    return [float(len(c)) for c in completions]\n"
        "def short(prompts, completions, answers):\n    return [1.0]\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert load_reward("my_rewards:length")(["a", "b"], ["xy", "z"], ["", ""]) == [2.0, 1.0]
    with pytest.raises(ValueError, match="returned 1 rewards for 2"):
        load_reward("my_rewards:short")(["a", "b"], ["xy", "z"], ["", ""])
    with pytest.raises(ValueError, match="no function 'nothing'"):
        load_reward("my_rewards:nothing")


def test_groups_round_trip(tmp_path):
    groups = [Group("1+1=", "2", [Response("2", "expert", 1.0, 0.5), Response("3", "self", 0.0, -0.5)], "f:0")]
    save_groups(groups, tmp_path / "g.jsonl")
    assert load_groups(tmp_path / "g.jsonl") == groups


def test_causal_lm_helper_equals_gft_on_the_model_logits(tmp_path):
    """The public helper (backbone + fused loss) against GFT computed from the model's own logits."""
    import gft_kernels
    from gft_train.demo.model import build_model
    from gft_train.lm import causal_lm_gft_loss, encode
    from gft_train.trainer import load_model

    model, tok = load_model(str(build_model(tmp_path / "m")))
    batch = encode(tok, [("12+7=", "19", 1.5), ("3+4=", "8", -0.7), ("20+20=", "40", 0.0)], 16)
    loss = causal_lm_gft_loss(model, batch.input_ids, batch.attention_mask, batch.labels, batch.adv, 0.7)
    grads = torch.autograd.grad(loss, [p for p in model.parameters()])
    logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits[:, :-1]
    targets = batch.labels[:, 1:]
    logp = logits.float().log_softmax(-1).gather(-1, targets.clamp_min(0)[..., None])[..., 0]
    p = logp.detach().exp()
    valid = targets != -100
    ref = -(torch.where(valid, batch.adv[:, None] * torch.where(p < 0.7, p, 1.0) * logp, 0.0)).sum() / valid.sum()
    ref_grads = torch.autograd.grad(ref, [p for p in model.parameters()])
    torch.testing.assert_close(loss, ref)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-6)
    assert batch.labels[0, :5].eq(-100).all()   # prompt tokens are masked
    assert isinstance(gft_kernels.GFTLoss(), torch.nn.Module)


@pytest.mark.parametrize("name", config_mod.LOSS_AGGREGATIONS)
def test_trainer_loss_aggregations_on_the_model_logits(tmp_path, name):
    """Each trainer aggregation equals its definition computed from the model's own logits, with
    the global counts the trainer passes (one process here)."""
    from gft_train.demo.model import build_model
    from gft_train.lm import encode
    from gft_train.trainer import GFTPolicy, aggregation, load_model

    model, tok = load_model(str(build_model(tmp_path / "m")))
    batch = encode(tok, [("12+7=", "19", 1.5), ("3+4=", "8", -0.7), ("20+20=", "40", 0.3)], 16)
    reduction, normalizer = aggregation(name, batch.n_valid, batch.n_seqs, 16)
    loss, sums = GFTPolicy(model)(batch.input_ids, batch.attention_mask, batch.labels, batch.adv, 0.7, normalizer,
                                  reduction, 0.01)
    logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits[:, :-1].float()
    targets = batch.labels[:, 1:]
    log_probs = logits.log_softmax(-1)
    logp = log_probs.gather(-1, targets.clamp_min(0)[..., None])[..., 0]
    entropy = -(log_probs.exp() * log_probs).sum(-1)
    p = logp.detach().exp()
    valid = targets != -100
    per_tok = torch.where(valid, -batch.adv[:, None] * torch.where(p < 0.7, p, 1.0) * logp - 0.01 * entropy, 0.0)
    seq_sum, seq_n = per_tok.sum(1), valid.sum(1)
    want = {"token-mean": per_tok.sum() / valid.sum(),
            "seq-mean-token-mean": (seq_sum / seq_n).mean(),
            "seq-mean-token-sum": seq_sum.mean(),
            "seq-mean-token-sum-norm": per_tok.sum() / (3 * 16)}[name]
    torch.testing.assert_close(loss, want)
    assert 0.0 <= float(sums[4] / sums[3]) <= 1.0   # token accuracy


def test_unknown_loss_aggregation_is_refused():
    with pytest.raises(ValueError, match="loss_aggregation must be one of"):
        config_mod.Config(model="m", train_file="t", loss_aggregation="mean").resolved()
