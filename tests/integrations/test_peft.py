"""PEFT / LoRA with the fused GFT loss: through the TRL trainer and through the patched model.

Adapters train, the frozen base (the lm_head included) gets no gradient, and the results equal
the same LoRA model trained with the reference loss (``backend="reference"``: materialized logits).
"""

import pytest
import torch

peft = pytest.importorskip("peft")
from datasets import Dataset  # noqa: E402
from peft import LoraConfig, get_peft_model  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402

import gft_kernels  # noqa: E402
from gft_train.demo.model import build_model  # noqa: E402


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return str(build_model(tmp_path_factory.mktemp("tiny_peft") / "model", hidden_size=64, layers=1))


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def lora():
    return LoraConfig(
        r=4,
        lora_alpha=8,
        target_modules=["q_proj", "v_proj", "down_proj"],
        lora_dropout=0.0,
        init_lora_weights="gaussian",
    )


def adapters(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}


def test_lora_through_the_patched_model_equals_the_reference_loss(model_dir):
    g = torch.Generator().manual_seed(0)
    input_ids = torch.randint(2, 19, (4, 12), generator=g)
    labels = input_ids.clone()
    labels[:, :5] = -100
    adv = torch.tensor([1.0, -0.5, 0.25, 2.0])
    runs = {}
    for backend in ("auto", "reference"):
        torch.manual_seed(0)
        base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
        frozen = {n: p.detach().clone() for n, p in base.named_parameters()}
        gft_kernels.patch(base, tau=0.7, backend=backend)  # patch, then wrap (as TRL does)
        model = get_peft_model(base, lora())
        start = adapters(model)
        opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
        for _ in range(3):
            opt.zero_grad()
            out = model(input_ids=input_ids, labels=labels, advantages=adv, return_gft_stats=True)
            out.loss.backward()
            head = model.get_base_model().lm_head.weight
            assert not head.requires_grad and head.grad is None  # the frozen lm_head: no dW
            opt.step()
        assert all(
            torch.equal(frozen[n.replace("base_model.model.", "").replace(".base_layer", "")], p)
            for n, p in model.named_parameters()
            if "lora_" not in n
        )
        runs[backend] = (start, adapters(model), out.loss.detach())
    start, trained, _ = runs["auto"]
    assert all(not torch.equal(start[n], trained[n]) for n in trained if "lora_B" in n)  # adapters train
    for n in trained:
        torch.testing.assert_close(trained[n], runs["reference"][1][n], rtol=1e-5, atol=1e-6, msg=n)
    torch.testing.assert_close(runs["auto"][2], runs["reference"][2], rtol=1e-5, atol=1e-6)


def test_lora_through_the_trl_trainer_equals_the_reference_loss(tmp_path, model_dir):
    pytest.importorskip("trl")
    from gft_train.trl_trainer import GFTConfig, GFTTrainer

    rows = [
        {"prompt": f"{a}+{b}=", "answer": str(a + b), "expert": str(a + b), "teachers": [str(a + b + 1)]}
        for a in range(4)
        for b in range(3)
    ]

    def reward(completions, answer, **kwargs):
        return [float(c.strip() == a) + 0.1 * len(c) for c, a in zip(completions, answer)]

    runs = {}
    for backend in ("auto", "reference"):
        args = GFTConfig(
            output_dir=str(tmp_path / backend),
            report_to=[],
            use_cpu=True,
            bf16=False,
            max_steps=2,
            per_device_train_batch_size=8,
            num_generations=4,
            n_expert=1,
            n_teacher=1,
            tau=0.7,
            max_completion_length=5,
            learning_rate=0.5,
            optim="sgd",
            save_strategy="no",
            seed=0,
            gft_backend=backend,
            logging_steps=1,
        )
        trainer = GFTTrainer(
            model=model_dir, reward_funcs=reward, args=args, train_dataset=Dataset.from_list(rows), peft_config=lora()
        )
        base = trainer.model.get_base_model()
        frozen = {n: p.detach().clone() for n, p in base.named_parameters() if "lora_" not in n}
        start = adapters(trainer.model)
        trainer.train()
        assert base.lm_head.weight.grad is None and not base.lm_head.weight.requires_grad
        assert all(torch.equal(frozen[n], p) for n, p in base.named_parameters() if "lora_" not in n)
        runs[backend] = (start, adapters(trainer.model), [h["loss"] for h in trainer.state.log_history if "loss" in h])
    start, trained, losses = runs["auto"]
    assert any(not torch.equal(start[n], trained[n]) for n in trained)
    for n in trained:
        torch.testing.assert_close(trained[n], runs["reference"][1][n], rtol=1e-5, atol=1e-6, msg=n)
    assert losses == pytest.approx(runs["reference"][2], rel=1e-5, abs=1e-7)


def test_readme_peft_snippet_runs(model_dir):
    from doc_pages import python_blocks

    found = python_blocks("peft")
    blocks = [block for block, _ in found]
    assert len(blocks) == 1
    input_ids = torch.randint(2, 19, (2, 10))
    labels = input_ids.clone()
    labels[:, :4] = -100
    namespace = {
        "model": AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32),
        "input_ids": input_ids,
        "labels": labels,
        "adv": torch.tensor([1.0, -1.0]),
    }
    exec(compile(blocks[0], str(found[0][1]), "exec"), namespace)
    model = namespace["model"]
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert grads and all("lora_" in n for n in grads)
