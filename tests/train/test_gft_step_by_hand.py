"""One GFT optimizer step of the trainer against the paper's formula, written out by hand.

The trainer builds groups (expert + teacher texts, self-samples of the current policy), scores
them, standardizes rewards per group and takes a step with the fused loss, in micro-batches
normalized by the step's token count. Here the same step is recomputed with none of that code:
each sequence on its own (no padding, no micro-batches), the advantages with ``torch.std`` (the
sample std, as the authors' code) plus 1e-6, ``C(p) = p`` (detached) below tau and 1 at or above,
and the token mean over every response token of the step. The loss and every gradient must agree.
"""

import copy

import pytest
import torch

from gft_train.config import Config
from gft_train.demo.model import build_model
from gft_train.demo.task import write_jsonl
from gft_train.groups import group_metrics
from gft_train.trainer import Trainer


def _rows():
    # right, wrong and mixed teachers, so the groups have reward variance (and one has none)
    return [
        dict(prompt="3+4=", answer="7", expert="7", teachers=["7", "8", "1+6=7"]),
        dict(prompt="12+9=", answer="21", expert="21", teachers=["21", "21", "20"]),
        dict(prompt="5+5=", answer="10", expert="10", teachers=["10", "10", "10"]),
    ]


@pytest.mark.parametrize("tau", [0.7, 0.0, float("inf")])
def test_one_gft_step_is_the_papers_formula_by_hand(tmp_path, tau):
    model_dir = build_model(tmp_path / "model", hidden_size=64, layers=1)
    train = write_jsonl(_rows(), tmp_path / "train.jsonl")
    cfg = Config(
        method="gft",
        model=str(model_dir),
        train_file=str(train),
        output_dir=str(tmp_path / "out"),
        prompts_per_step=3,
        micro_batch_size=5,
        max_new_tokens=6,
        max_length=64,
        tau=tau,
        engine="transformers",
        reward="gft_train.demo.sums:reward",
        max_grad_norm=1e9,
        lr=1e-3,
        temperature=1.0,
        seed=3,
    )
    trainer = Trainer(cfg)
    groups = trainer._groups_for_step(0)
    assert [len(g.responses) for g in groups] == [8, 8, 8]  # 1 expert + 3 teacher + 4 self

    # Eq. 4 by hand: the sample std (torch.std), eps 1e-6; no variance -> 0
    for g in groups:
        r = torch.tensor([x.reward for x in g.responses], dtype=torch.float64)
        want = torch.zeros_like(r) if r.std() == 0 else (r - r.mean()) / (r.std() + 1e-6)
        got = torch.tensor([x.advantage for x in g.responses], dtype=torch.float64)
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-9)
    assert any(x.advantage != 0 for g in groups for x in g.responses)
    stats = group_metrics(groups)  # what the run logs of the groups: the expert's advantage among them
    for source in ("expert", "teacher", "self"):
        advs = [x.advantage for g in groups for x in g.responses if x.source == source]
        assert stats[f"adv/{source}_mean"] == pytest.approx(sum(advs) / len(advs))
    assert stats["groups/zero_variance_frac"] == pytest.approx(
        sum(len({x.reward for x in g.responses}) == 1 for g in groups) / 3
    )

    ref = copy.deepcopy(trainer.model).double()
    tok = trainer.tokenizer
    pieces = []  # (logp of each response token, advantage)
    for g in groups:
        p_ids = tok(g.prompt, add_special_tokens=False)["input_ids"]
        for x in g.responses:
            r_ids = (
                list(x.token_ids)
                if x.token_ids is not None
                else tok(x.text, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
            )
            ids = torch.tensor([p_ids + r_ids])
            logits = ref(input_ids=ids).logits[0, len(p_ids) - 1 : -1]
            logp = logits.log_softmax(-1).gather(-1, torch.tensor(r_ids)[:, None])[:, 0]
            pieces.append((logp, x.advantage))
    n_tokens = sum(len(lp) for lp, _ in pieces)
    total = 0.0
    for logp, adv in pieces:
        p = logp.detach().exp()
        coef = torch.where(p < tau, p, torch.ones_like(p))  # DCR, Eq. 5: 1 at p == tau
        total = total + (-adv * coef * logp).sum()
    loss = total / n_tokens
    loss.backward()

    grads = {}

    def capture():
        grads.update({n: p.grad.detach().clone() for n, p in trainer.model.named_parameters()})

    trainer.optimizer.step = capture
    metrics = trainer.train_step(groups)
    assert metrics["tokens"] == n_tokens
    assert metrics["loss"] == pytest.approx(loss.item(), rel=1e-5, abs=1e-7)
    for name, p in ref.named_parameters():
        torch.testing.assert_close(grads[name].double(), p.grad, rtol=1e-4, atol=1e-7, msg=name)
