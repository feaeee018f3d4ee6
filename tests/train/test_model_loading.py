"""``--model`` as a local folder or a Hub id, ``--revision``, ``--trust-remote-code`` and
``--torch-dtype`` (issue 31, items 1 and 2). No network: tests/conftest.py sets HF_HUB_OFFLINE=1,
and a Hub id is served from a Hub cache in the test's folder (tests/hub_cache.py)."""

import json
from pathlib import Path

import huggingface_hub
import pytest
import torch
from hub_cache import put_in_hub_cache
from safetensors.torch import load_file

from gft_train import config as config_mod
from gft_train.cli import main as cli_main
from gft_train.demo.model import build_model
from gft_train.demo.task import make_splits, write_jsonl
from gft_train.models import load_model

ID = "tiny-org/tiny-model"


@pytest.fixture(scope="module")
def s(tmp_path_factory):
    d = tmp_path_factory.mktemp("loading")
    rows = make_splits(seed=3, n_train=8, n_eval=2)
    return dict(
        dir=d,
        model=build_model(d / "model", hidden_size=64, layers=1, seed=0),
        other=build_model(d / "other", hidden_size=64, layers=1, seed=1),
        train=write_jsonl(rows["train"], d / "train.jsonl"),
    )


@pytest.fixture
def hub_cache(s, tmp_path, monkeypatch):
    """A Hub cache holding ``ID``: main is the model, revision v1 the other model."""
    cache = tmp_path / "hub"
    put_in_hub_cache(s["model"], ID, cache)
    put_in_hub_cache(s["other"], ID, cache, commit="f" * 40, ref="v1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    return cache


def _same_weights(model, folder: Path) -> bool:
    saved = load_file(str(folder / "model.safetensors"))
    state = model.state_dict()
    return all(torch.equal(state[k], v) for k, v in saved.items())


def _sft(s, out, *extra):
    args = ["train", "--method", "sft", "--train-file", str(s["train"]), "--output-dir", str(out)]
    return args + ["--max-steps", "1", "--prompts-per-step", "2", "--max-length", "16", "--report-to", "none", *extra]


def test_a_local_folder_loads_by_absolute_and_relative_path(s, monkeypatch):
    from gft_train.models import is_hub_id

    monkeypatch.chdir(s["dir"])
    for name in (str(s["model"]), "model", "./model", "../" + s["dir"].name + "/model"):
        assert not is_hub_id(name)
        model, tokenizer = load_model(name)
        assert _same_weights(model, s["model"]) and tokenizer.pad_token is not None, name
    with pytest.raises(FileNotFoundError, match="no/such/model"):  # a path (two slashes), not an id
        load_model("no/such/model")


def test_a_hub_id_loads_from_the_cache_at_its_revision(s, hub_cache):
    model, _ = load_model(ID)
    assert _same_weights(model, s["model"]) and model.name_or_path == ID
    model, _ = load_model(ID, revision="v1")
    assert _same_weights(model, s["other"])


def test_a_hub_id_trains_from_the_command_line(s, hub_cache, tmp_path):
    cli_main(_sft(s, tmp_path / "o", "--model", ID, "--revision", "v1"))
    saved = yaml_config(tmp_path / "o" / "final")
    assert (saved["model"], saved["revision"]) == (ID, "v1")
    trained = load_file(str(tmp_path / "o" / "final" / "model.safetensors"))
    start = load_file(str(s["other"] / "model.safetensors"))
    assert trained.keys() == start.keys() and any(not torch.equal(trained[k], start[k]) for k in start)


def yaml_config(folder: Path) -> dict:
    return config_mod.load_saved(folder / "gft_config.yaml")


@pytest.mark.parametrize("revision", ["", "v2"])
def test_an_id_missing_offline_stops_in_one_line_naming_it_and_the_fix(s, hub_cache, tmp_path, revision):
    name = ID if revision else "no-such-org/no-such-model"
    with pytest.raises(OSError) as err:
        cli_main(_sft(s, tmp_path / "o", "--model", name, "--revision", revision))
    text = str(err.value)
    assert "\n" not in text and repr(name) in text, text
    assert "HF_HUB_OFFLINE" in text and "local folder" in text, text
    assert (f"revision {revision!r}" in text) == bool(revision), text
    assert not (tmp_path / "o" / "final").exists()


def test_revision_and_trust_remote_code_reach_from_pretrained(s, hub_cache, tmp_path, monkeypatch):
    """Both flags reach the policy's model and tokenizer; the teacher (another repository) gets
    trust_remote_code and the dtype, not the policy's revision."""
    import transformers

    calls = []
    for cls in (transformers.AutoModelForCausalLM, transformers.AutoTokenizer):
        real = cls.from_pretrained

        def spy(name, *args, _real=real, _cls=cls.__name__, **kw):
            calls.append((_cls, str(name), kw.get("revision"), kw.get("trust_remote_code"), kw.get("dtype")))
            return _real(name, *args, **{**kw, "trust_remote_code": False})  # (no remote code to run here)

        monkeypatch.setattr(cls, "from_pretrained", spy)
    bare = write_jsonl(
        [{**r, "teachers": []} for r in make_splits(seed=3, n_train=4, n_eval=2)["train"]], tmp_path / "b.jsonl"
    )
    args = _sft(s, tmp_path / "o", "--model", ID, "--revision", "v1", "--trust-remote-code", "--torch-dtype", "float32")
    args[args.index("--train-file") + 1] = str(bare)
    cli_main(
        args
        + ["--method", "gft", "--n-teacher", "1", "--n-self", "0", "--teacher-model", str(s["model"])]
        + ["--max-new-tokens", "2", "--engine", "transformers", "--reward", "gft_train.demo.sums:reward"]
    )
    policy = [c for c in calls if c[1] == ID]
    teacher = [c for c in calls if c[1] == str(s["model"])]
    assert {c[0] for c in policy} == {c[0] for c in teacher} == {"AutoModelForCausalLM", "AutoTokenizer"}
    assert all(c[2] == "v1" and c[3] is True for c in policy), policy
    assert all(c[2] is None and c[3] is True for c in teacher), teacher
    assert {c[4] for c in policy + teacher if c[0] == "AutoModelForCausalLM"} == {torch.float32}


def _dtypes(folder: Path) -> set:
    return {v.dtype for v in load_file(str(folder / "model.safetensors")).values()}


def test_torch_dtype_bfloat16_trains_and_saves_bf16_weights(s, tmp_path, request):
    """bf16 weights train without autocast (and with it, --bf16), the optimizer's states follow
    the weights' dtype as torch's AdamW keeps them, and the saved model keeps the dtype."""
    from accelerate.state import AcceleratorState

    from gft_train.trainer import Trainer

    request.addfinalizer(lambda: AcceleratorState._reset_state(reset_partial_state=True))
    for bf16 in (False, True):
        AcceleratorState._reset_state(reset_partial_state=True)  # one mixed precision per state
        out = tmp_path / f"bf16-{bf16}"
        cfg = config_mod.Config(
            method="sft", model=str(s["model"]), train_file=str(s["train"]), output_dir=str(out), max_steps=2,
            prompts_per_step=2, max_length=16, lr=1e-2, torch_dtype="bfloat16", bf16=bf16, report_to="none",
        )  # fmt: skip
        trainer = Trainer(cfg)
        assert trainer.model.dtype == torch.bfloat16
        final = trainer.train()
        states = [v for st in trainer.optimizer.state.values() for k, v in st.items() if k != "step"]
        assert states and {v.dtype for v in states} == {torch.bfloat16}
        assert _dtypes(final) == {torch.bfloat16}
        assert json.loads((final / "config.json").read_text())["dtype"] == "bfloat16"
        start = load_file(str(s["model"] / "model.safetensors"))
        trained = load_file(str(final / "model.safetensors"))
        assert any(not torch.equal(trained[k], start[k].to(torch.bfloat16)) for k in start)


def test_torch_dtype_auto_is_the_configs_and_the_default_stays_float32(s, tmp_path):
    model, tokenizer = load_model(str(s["model"]))
    model.to(torch.float16).save_pretrained(tmp_path / "fp16")
    tokenizer.save_pretrained(tmp_path / "fp16")
    assert load_model(str(tmp_path / "fp16"), torch_dtype="auto")[0].dtype == torch.float16
    assert load_model(str(tmp_path / "fp16"))[0].dtype == torch.float32  # the default: float32, as before
    assert load_model(str(tmp_path / "fp16"), torch_dtype="bfloat16")[0].dtype == torch.bfloat16
    with pytest.raises(ValueError, match="torch_dtype must be one of auto, bfloat16, float16, float32, got 'fp16'"):
        config_mod.Config(model="m", train_file="t", torch_dtype="fp16").resolved()
