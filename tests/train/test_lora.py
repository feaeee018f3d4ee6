"""LoRA from the command line through PEFT (issue 31, item 3): the fused loss through the adapted
model equals the model's own logits path, checkpoints hold the adapter and resume exactly, the
final folder holds the adapter and ``--merge-lora`` a plain model, and two processes train the
adapter as one does."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from model_check import check
from safetensors.torch import load_file
from tiny_models import tiny_model

from gft_train import config as config_mod
from gft_train.demo.model import build_model
from gft_train.demo.task import make_splits, write_jsonl

ROOT = Path(__file__).resolve().parents[2]

# architecture -> (tied head, the modules the default targets adapt: attention and MLP projections)
ARCHITECTURES = {
    "llama": (False, {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}),
    "gpt2": (True, {"c_attn", "c_proj", "c_fc"}),  # transformers' Conv1D layers
    "gemma2": (True, {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}),  # softcap
}


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_fused_loss_through_the_adapter_equals_the_models_own_logits(arch):
    """Loss and every trainable (adapter) gradient of the fused path equal GFT computed from the
    adapted model's own ``logits`` (tests/model_check.py, float64); only the adapter trains."""
    from gft_train.adapters import apply_lora

    tie, targets = ARCHITECTURES[arch]
    model = apply_lora(tiny_model(arch, tie=tie), config_mod.Config(lora_r=4, lora_alpha=8.0), "base")
    adapted = {name.split(".")[-1] for name, m in model.named_modules() if hasattr(m, "lora_A")}
    assert adapted == targets
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # B starts at 0 (the adapter a no-op): give it values, so A's gradient is not 0
        for name, p in model.named_parameters():
            if ".lora_B." in name:
                p.copy_(0.3 * torch.randn(p.shape, generator=g, dtype=p.dtype))
    assert check(model, "torch") == "exact"


def test_lora_options_are_checked():
    def resolved(**kw):
        return config_mod.Config(model="m", train_file="t", **kw).resolved()

    with pytest.raises(ValueError, match="--lora_alpha 16.0, --merge_lora True need --lora_r > 0"):
        resolved(lora_alpha=16.0, merge_lora=True)
    with pytest.raises(ValueError, match="lora_r must be >= 0, got -1"):
        resolved(lora_r=-1)
    with pytest.raises(ValueError, match="lora_dropout must be in \\[0, 1\\), got 1.0"):
        resolved(lora_r=4, lora_dropout=1.0)


def test_lora_without_peft_installed_is_said_before_the_model_loads(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "peft" else real(name, *a))
    with pytest.raises(ValueError, match=r"lora_r 4 needs the peft package \(pip install 'gft\[peft\]'\)"):
        config_mod.Config(model="m", train_file="t", lora_r=4).resolved()


def test_an_adapter_on_the_output_head_or_a_missing_module_is_refused(tmp_path):
    from gft_train.adapters import apply_lora
    from gft_train.models import load_model

    folder = build_model(tmp_path / "m", hidden_size=64, layers=1)
    with pytest.raises(ValueError, match="lora_target_modules 'q_proj,lm_head' adapts the output head"):
        apply_lora(load_model(str(folder))[0], config_mod.Config(lora_r=2, lora_target_modules="q_proj,lm_head"), "b")
    with pytest.raises(ValueError, match="lora_target_modules 'no_such_proj'"):
        apply_lora(load_model(str(folder))[0], config_mod.Config(lora_r=2, lora_target_modules="no_such_proj"), "b")


@pytest.fixture(scope="module")
def s(tmp_path_factory):
    d = tmp_path_factory.mktemp("lora")
    rows = make_splits(seed=4, n_train=16, n_eval=2)
    return dict(
        dir=d, model=build_model(d / "model", hidden_size=64, layers=1), train=write_jsonl(rows["train"], d / "t.jsonl")
    )


def _cfg(s, out, **kw):
    fields = dict(
        method="sft", model=str(s["model"]), train_file=str(s["train"]), output_dir=str(out), max_steps=4,
        prompts_per_step=4, micro_batch_size=2, max_length=16, lr=2e-2, lr_scheduler="constant", save_every=2,
        lora_r=4, lora_alpha=8.0, lora_dropout=0.1, report_to="none",
    )  # fmt: skip
    return config_mod.Config(**{**fields, **kw})


def _adapter(final: Path) -> dict:
    return load_file(str(final / "adapter_model.safetensors"))


@pytest.mark.slow
def test_checkpoints_hold_the_adapter_resume_exactly_and_merge(s, tmp_path, capsys):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from gft_train.models import load_model
    from gft_train.trainer import train

    whole = train(_cfg(s, tmp_path / "whole", merge_lora=True))
    half = train(_cfg(s, tmp_path / "half", max_steps=2))
    ckpt = tmp_path / "half" / "checkpoints" / "step-2"
    saved = load_file(str(ckpt / "model.safetensors"))
    assert saved and all(".lora_A." in k or ".lora_B." in k for k in saved)  # not the frozen base
    capsys.readouterr()
    resumed = train(_cfg(s, tmp_path / "half", resume=True, merge_lora=True))
    assert f"resumed from {ckpt} (step 2)" in capsys.readouterr().out
    a, b = _adapter(whole), _adapter(resumed)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # the final folder: the adapter (recording its base), the tokenizer; merged/ a plain model
    assert not (whole / "model.safetensors").exists() and (whole / "tokenizer_config.json").is_file()
    recorded = json.loads((whole / "adapter_config.json").read_text())["base_model_name_or_path"]
    assert recorded == os.path.abspath(s["model"])
    ids = torch.randint(2, 19, (2, 9), generator=torch.Generator().manual_seed(0))
    base = AutoModelForCausalLM.from_pretrained(s["model"], dtype=torch.float32)
    with torch.no_grad():
        want = PeftModel.from_pretrained(base, str(whole)).eval()(input_ids=ids).logits
        merged = AutoModelForCausalLM.from_pretrained(whole / "merged").eval()
        assert not (whole / "merged" / "adapter_config.json").exists()
        torch.testing.assert_close(merged(input_ids=ids).logits, want, rtol=1e-5, atol=1e-5)
        from_folder = load_model(str(whole))[0].eval()  # an adapter folder loads as its merged model
        torch.testing.assert_close(from_folder(input_ids=ids).logits, want, rtol=1e-5, atol=1e-5)
        assert not torch.allclose(AutoModelForCausalLM.from_pretrained(s["model"])(input_ids=ids).logits, want)
    assert half == resumed


@pytest.mark.slow
def test_two_processes_train_the_adapter_as_one_does(s, tmp_path):
    args = [
        "train", "--method", "sft", "--model", str(s["model"]), "--train-file", str(s["train"]), "--max-steps", "3",
        "--prompts-per-step", "4", "--micro-batch-size", "2", "--max-length", "16", "--lr", "2e-2", "--report-to",
        "none", "--lora-r", "4", "--lora-alpha", "8",
    ]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    one = subprocess.run(
        [sys.executable, "-m", "gft_train.cli", *args, "--output-dir", str(tmp_path / "one")],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert one.returncode == 0, one.stderr[-3000:]
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2"]
    launch += ["--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    launch += ["--main_process_port", str(port), "-m", "gft_train.cli"]
    two = subprocess.run(
        [*launch, *args, "--output-dir", str(tmp_path / "two")],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert two.returncode == 0, two.stderr[-3000:]
    rows = (tmp_path / "two" / "metrics.jsonl").read_text().splitlines()
    assert json.loads(rows[-1])["processes"] == 2
    a, b = _adapter(tmp_path / "one" / "final"), _adapter(tmp_path / "two" / "final")
    assert a.keys() == b.keys()
    assert max((a[k] - b[k]).abs().max().item() for k in a) <= 2e-5
    assert max(a[k].abs().max().item() for k in a if ".lora_B." in k) > 1e-3  # the adapter trained


def test_lora_with_the_vllm_engine_is_refused(monkeypatch):
    from gft_train import rollout
    from gft_train.adapters import check_rollout_engine

    monkeypatch.setattr(rollout, "vllm_available", lambda: True)
    with pytest.raises(NotImplementedError, match="lora_r 4 with the vLLM rollout engine \\(engine 'auto'\\)"):
        check_rollout_engine(config_mod.Config(lora_r=4, method="gft").resolved())
    check_rollout_engine(config_mod.Config(lora_r=4, method="sft").resolved())  # no samples: no engine
    check_rollout_engine(config_mod.Config(lora_r=4, method="gft", engine="transformers").resolved())
