"""The trainer's options at their edges: checkpoint rotation past step 10 (steps compared as
numbers, not names), a resume refused for a field outside the resumable set, and a sequence
exactly ``max_length`` long, which is not cut."""

from pathlib import Path

import pytest

from gft_train import config as config_mod
from gft_train.checkpoints import claim_output_dir, latest_checkpoint, save_checkpoint
from gft_train.lm import encode


class _OneProcess:
    """The part of accelerate's Accelerator that ``save_checkpoint`` uses, for one process."""

    is_main_process = True

    def wait_for_everyone(self):
        pass

    def save_state(self, path):
        Path(path).mkdir(parents=True)
        (Path(path) / "model.safetensors").write_text(path)


def test_rotation_past_step_ten_keeps_the_newest_by_number(tmp_path):
    cfg = config_mod.Config(output_dir=str(tmp_path), save_total_limit=3)
    for step in range(1, 13):
        save_checkpoint(_OneProcess(), tmp_path, cfg, step, [], 0)
        kept = sorted(int(p.name.split("-")[1]) for p in (tmp_path / "checkpoints").iterdir())
        assert kept == list(range(max(1, step - 2), step + 1)), step
        assert latest_checkpoint(tmp_path) == tmp_path / "checkpoints" / f"step-{step}"  # step-10 after step-9


def _run_with_checkpoint(out: Path, cfg: config_mod.Config) -> Path:
    checkpoint = out / "checkpoints" / "step-2"
    checkpoint.mkdir(parents=True)
    (checkpoint / "trainer_state.json").write_text('{"step": 2, "pool_start": 0}')
    config_mod.save(cfg, checkpoint / "gft_config.yaml")
    return checkpoint


def test_a_resume_with_another_seed_is_refused(tmp_path):
    """``seed`` orders the data and seeds the sampling: not in the resumable set, so a resume that
    changes it is refused, naming it; a resumable field (``max_steps``) may change."""
    assert "seed" not in config_mod.RESUMABLE
    out = tmp_path / "run"
    checkpoint = _run_with_checkpoint(out, config_mod.Config(output_dir=str(out), seed=1))
    with pytest.raises(ValueError, match=r"--resume: .*seed: 1 -> 2"):
        claim_output_dir(config_mod.Config(output_dir=str(out), seed=2, resume=True))
    more_steps = config_mod.Config(output_dir=str(out), seed=1, resume=True, max_steps=105)
    assert claim_output_dir(more_steps) == checkpoint


def test_a_sequence_exactly_max_length_long_is_not_cut():
    from gft_train.demo.model import build_tokenizer

    tok = build_tokenizer()
    items = [("12+7=", "19", 1.0), ("3+4=", "7", -0.5)]
    whole = encode(tok, items, 1000)
    length = int(whole.attention_mask[0].sum())  # prompt and response (its EOS included) of the first
    assert length > int(whole.attention_mask[1].sum()) and whole.n_cut == 0
    exact = encode(tok, items, length)
    assert exact.n_cut == 0
    assert exact.input_ids.tolist() == whole.input_ids[:, :length].tolist()
    assert exact.labels.tolist() == whole.labels[:, :length].tolist()
    shorter = encode(tok, items, length - 1)
    assert shorter.n_cut == 1 and shorter.input_ids.tolist() == whole.input_ids[:, : length - 1].tolist()
