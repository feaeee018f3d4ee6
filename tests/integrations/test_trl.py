"""GFT for TRL users: ``gft_train.trl_trainer.GFTTrainer`` with real TRL (1.16.0) on a tiny model.

The model is a 1-layer Qwen2 built from a config and saved to disk (no hub). Everything runs on
the CPU with one thread; the whole file takes well under a minute.
"""

import copy

import pytest
import torch

pytest.importorskip("trl")
from datasets import Dataset  # noqa: E402
from trl import GRPOConfig, GRPOTrainer  # noqa: E402

from gft_train.demo.model import build_model  # noqa: E402
from gft_train.trl_trainer import GFTConfig, GFTTrainer  # noqa: E402


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return str(build_model(tmp_path_factory.mktemp("tiny") / "model", hidden_size=64, layers=1))


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def rows(n=12):
    out = []
    for i in range(n):
        a, b = i % 5, i // 5 + 1
        out.append(
            {
                "prompt": f"{a}+{b}=",
                "answer": str(a + b),
                "expert": str(a + b),
                "teachers": [f"{a}+{b}={a + b}", str(a + b + 1)],
            }
        )
    return out


def correct(prompts, completions, answer, **kwargs):
    return [float(c.strip().split("=")[-1] == a) for c, a in zip(completions, answer)]


def length(completions, **kwargs):
    """A reward that varies within a group of an untrained model's samples."""
    return [float(len(c)) for c in completions]


def config(tmp_path, cls=GFTConfig, **kw):
    base = dict(
        output_dir=str(tmp_path / "out"),
        report_to=[],
        use_cpu=True,
        bf16=False,
        max_steps=2,
        per_device_train_batch_size=8,
        num_generations=4,
        max_completion_length=5,
        logging_steps=1,
        learning_rate=1e-2,
        save_strategy="no",
        seed=0,
        disable_dropout=True,
    )
    base.update(kw)
    return cls(**base)


def test_groups_hold_expert_teacher_and_self_samples_and_training_logs(tmp_path, model_dir):
    seen = []

    def recording(prompts, completions, completion_ids, answer, expert, teachers, **kwargs):
        seen.append((list(prompts), list(completions), list(completion_ids), list(expert), list(teachers)))
        return correct(prompts, completions, answer)

    args = config(tmp_path, n_expert=1, n_teacher=2, tau=0.7, max_steps=3)
    trainer = GFTTrainer(model=model_dir, reward_funcs=recording, args=args, train_dataset=Dataset.from_list(rows()))
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    trainer.train()
    assert len(seen) == 3
    tok = trainer.processing_class
    for prompts, completions, ids, expert, teachers in seen:
        for g in range(0, len(prompts), 4):
            assert len(set(prompts[g : g + 4])) == 1  # one prompt per group
            assert completions[g] == expert[g]  # slot 0: the expert
            assert completions[g + 1 : g + 3] == teachers[g][:2]  # slots 1, 2: the teachers
            assert ids[g] == tok(expert[g], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert len(logs) == 3
    for h in logs:
        assert h["gft/reward/expert"] == 1.0 and h["gft/reward/teacher"] == 0.5
        assert 0 <= h["gft/rectified_frac"] <= 1 and 0 < h["gft/mean_prob"] < 1 and h["entropy"] > 0
        assert "gft/reward/self" in h and "reward" in h and torch.isfinite(torch.tensor(h["loss"]))
    assert any(not torch.equal(before[n], p) for n, p in trainer.model.named_parameters())


def assert_grads_close(a, b, rel=1e-5):
    """fp32 gradients of two summation orders: equal to ``rel`` of each tensor's largest entry."""
    assert set(a) == set(b) and len(a) > 0
    for name in a:
        scale = float(b[name].abs().max())
        assert float((a[name] - b[name]).abs().max()) <= rel * scale + 1e-12, name


def _one_batch(trainer, data):
    trainer.model.train()
    torch.manual_seed(1)
    return trainer._generate_and_score_completions(copy.deepcopy(data))


def _grads(trainer, inputs, ga=1):
    trainer.current_gradient_accumulation_steps = ga
    trainer.model.train()
    trainer.model.zero_grad(set_to_none=True)
    loss = trainer.compute_loss(trainer.model, inputs)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in trainer.model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("loss_type", ["dapo", "grpo", "bnpo", "dr_grpo"])
def test_tau0_without_demonstrations_takes_trls_grpo_update(tmp_path, model_dir, loss_type):
    """No expert/teacher slots and tau = 0: the GFT loss is the on-policy policy gradient, so its
    gradient on the same batch equals TRL's own GRPO loss's (at importance ratio 1, beta = 0),
    for every token aggregation, with gradient accumulation."""
    data = [r for r in rows(2) for _ in range(4)]
    gft = GFTTrainer(
        model=model_dir,
        reward_funcs=length,
        train_dataset=Dataset.from_list(rows()),
        args=config(
            tmp_path, n_expert=0, n_teacher=0, tau=0.0, loss_type=loss_type, max_completion_length=6, temperature=0.9
        ),
    )
    grpo = GRPOTrainer(
        model=model_dir,
        reward_funcs=length,
        train_dataset=Dataset.from_list(rows()),
        args=config(tmp_path, cls=GRPOConfig, loss_type=loss_type, max_completion_length=6, temperature=0.9),
    )
    inputs = _one_batch(gft, data)
    assert inputs["advantages"].abs().sum() > 0 and inputs["completion_mask"].float().mean() < 1
    for ga in (1, 2):
        _, g_gft = _grads(gft, inputs, ga)
        _, g_grpo = _grads(grpo, inputs, ga)
        assert_grads_close(g_gft, g_grpo)


def test_whole_runs_match_trls_grpo_at_tau0(tmp_path, model_dir):
    """Three steps of training, sampling included: the same samples, rewards, gradient norms and
    weights as TRL's GRPOTrainer. (SGD: Adam's first steps are sign-like and would amplify the
    rounding of near-zero gradient entries.)"""
    kw = dict(max_steps=3, loss_type="dapo", temperature=1.0, optim="sgd", learning_rate=0.1)
    gft = GFTTrainer(
        model=model_dir,
        reward_funcs=length,
        train_dataset=Dataset.from_list(rows()),
        args=config(tmp_path, n_expert=0, n_teacher=0, tau=0.0, **kw),
    )
    gft.train()
    grpo = GRPOTrainer(
        model=model_dir,
        reward_funcs=length,
        train_dataset=Dataset.from_list(rows()),
        args=config(tmp_path, cls=GRPOConfig, **kw),
    )
    grpo.train()
    a = dict(gft.model.named_parameters())
    for name, p in grpo.model.named_parameters():
        torch.testing.assert_close(a[name], p, rtol=1e-4, atol=1e-6, msg=name)
    logged = [
        [
            (h["reward"], h["completions/mean_length"], round(h["grad_norm"], 4))
            for h in t.state.log_history
            if "reward" in h
        ]
        for t in (gft, grpo)
    ]
    assert len(logged[0]) == 3 and logged[0] == logged[1]


def test_demonstrations_loss_equals_the_reference_backend(tmp_path, model_dir):
    """With expert and teacher slots, tau = 0.7 and temperature 0.8: the fused loss and its
    gradients equal the materialized-logits reference on the same batch."""
    data = [r for r in rows(2) for _ in range(4)]
    out = {}
    for backend in ("auto", "reference"):
        tr = GFTTrainer(
            model=model_dir,
            reward_funcs=correct,
            train_dataset=Dataset.from_list(rows()),
            args=config(
                tmp_path, n_expert=1, n_teacher=1, tau=0.7, gft_backend=backend, temperature=0.8, loss_type="grpo"
            ),
        )
        inputs = out["inputs"] if "inputs" in out else _one_batch(tr, data)
        out["inputs"] = inputs
        out[backend] = _grads(tr, inputs, ga=2)
    torch.testing.assert_close(out["auto"][0], out["reference"][0], rtol=1e-5, atol=1e-7)
    assert_grads_close(out["auto"][1], out["reference"][1])


def test_unsupported_settings_and_bad_rows_are_refused(tmp_path, model_dir):
    with pytest.raises(ValueError, match="exceeds the group size"):
        config(tmp_path, n_expert=2, n_teacher=3)
    with pytest.raises(ValueError, match="beta"):
        GFTTrainer(
            model=model_dir,
            reward_funcs=correct,
            args=config(tmp_path, beta=0.1),
            train_dataset=Dataset.from_list(rows()),
        )
    with pytest.raises(ValueError, match="num_iterations"):
        GFTTrainer(
            model=model_dir,
            reward_funcs=correct,
            args=config(tmp_path, num_iterations=2),
            train_dataset=Dataset.from_list(rows()),
        )
    bad = [{k: v for k, v in r.items() if k != "teachers"} for r in rows()]
    tr = GFTTrainer(
        model=model_dir, reward_funcs=correct, args=config(tmp_path, n_teacher=1), train_dataset=Dataset.from_list(bad)
    )
    with pytest.raises(ValueError, match="teacher responses in 'teachers'"):
        tr.train()


def test_readme_trl_snippet_runs(tmp_path, model_dir, monkeypatch):
    from doc_pages import python_blocks

    found = python_blocks("trl")
    blocks = [block for block, _ in found]
    assert len(blocks) == 1
    code = blocks[0]
    for old, new in (
        ('"Qwen/Qwen2.5-0.5B-Instruct"', repr(model_dir)),
        ("max_steps=500", "max_steps=2"),
        ("max_completion_length=64", "max_completion_length=6"),
        ('output_dir="gft-trl"', f"output_dir={str(tmp_path / 'gft-trl')!r}, report_to=[], use_cpu=True, bf16=False"),
    ):
        assert old in code
        code = code.replace(old, new)
    namespace = {}
    exec(compile(code, str(found[0][1]), "exec"), namespace)
    assert namespace["trainer"].state.global_step == 2
    assert any("gft/reward/expert" in h for h in namespace["trainer"].state.log_history)


def test_another_trl_version_is_refused_naming_the_tested_range():
    """The integration overrides private GRPOTrainer methods: only the tested TRL range imports it."""
    import re
    import subprocess
    import sys
    from pathlib import Path

    import trl

    from gft_train.integrations.trl import TESTED_TRL, check_trl_version

    check_trl_version(trl.__version__)  # the installed, tested one
    for version in ("1.17.0", "1.15.2", "2.0.0"):
        with pytest.raises(ImportError, match=re.escape(f"tested with trl{TESTED_TRL}, found trl {version}")):
            check_trl_version(version)
    code = "import trl; trl.__version__ = '1.17.0'\nimport gft_train.trl_trainer"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0 and "tested with trl>=1.16,<1.17, found trl 1.17.0" in proc.stderr, proc.stderr[-2000:]
    root = Path(__file__).resolve().parents[2]
    extra = re.search(r"^trl = \[(.*)\]", (root / "pyproject.toml").read_text(), flags=re.M)  # (no tomllib on 3.10)
    assert extra and f'"trl{TESTED_TRL}"' in extra.group(1), extra


def test_old_policy_log_probs_come_from_the_fused_log_prob_op(tmp_path, model_dir, monkeypatch):
    """TRL's per-token log-probs of the completions (and entropies) through
    ``gft_kernels.causal_lm_logprobs``: equal to TRL's own fused head's, on a padded batch."""
    import gft_train.integrations.trl as integration

    calls = []
    ours = integration.causal_lm_logprobs
    monkeypatch.setattr(integration, "causal_lm_logprobs", lambda *a, **k: calls.append(1) or ours(*a, **k))
    gft = GFTTrainer(
        model=model_dir,
        reward_funcs=length,
        train_dataset=Dataset.from_list(rows()),
        args=config(tmp_path, n_expert=0, n_teacher=0, temperature=0.9),
    )
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, gft.model.config.vocab_size, (3, 11), generator=g)
    mask = torch.ones_like(ids)
    mask[0, :2] = 0  # left padding of the prompt
    mask[2, -3:] = 0  # a completion that ended early
    with torch.no_grad():
        got_lp, got_ent, _ = gft._get_per_token_logps_and_entropies(gft.model, ids, mask, 6, 2, compute_entropy=True)
        want_lp, want_ent, _ = GRPOTrainer._get_per_token_logps_and_entropies(
            gft, gft.model, ids, mask, 6, 2, compute_entropy=True
        )
    assert calls and got_lp.shape == want_lp.shape == (3, 6)
    keep = mask[:, -6:].bool()
    torch.testing.assert_close(got_lp[keep], want_lp[keep], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got_ent[keep], want_ent[keep], rtol=1e-5, atol=1e-5)
