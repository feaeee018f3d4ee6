"""The snippets marked ``# tested: tests/project/test_readme.py`` run, in order, in one namespace,
wherever they live: the README (the front page) or a guide under docs/ (``doc_pages``)."""

import json
import re

import pytest
from doc_pages import ROOT, page_holding, python_blocks


def test_readme_snippets_run():
    tested = python_blocks("tests/project/test_readme.py")
    assert len(tested) == 2, "the functional op and the patched model"
    namespace = {}
    for block, page in tested:
        exec(compile(block, str(page), "exec"), namespace)
    model = namespace["model"]
    assert namespace["out"].logits is None and namespace["out"].gft_stats is not None
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
    own = model.__dict__["_gft_original_forward"](
        input_ids=namespace["input_ids"], labels=namespace["labels"], attention_mask=namespace["attention_mask"]
    ).loss
    assert abs(float(namespace["sft"]) - float(own)) < 1e-5


def _numbers(text: str) -> list[float]:
    return [float(x) for x in re.findall(r"(?<![\w.])\d+\.\d+", text)]


# The models behind the figures of one row of the demo's table, in order: pass@1 (SFT and GFT with
# their seeds' min and max), greedy, pass@k.
ROW_MODELS = ["base", "SFT", "SFT", "SFT", "GFT", "GFT", "GFT", "base", "SFT", "GFT", "base", "SFT", "GFT"]


@pytest.mark.slow
@pytest.mark.slow
def test_readme_shows_what_the_demo_prints(tmp_path):
    """The README's demo table is what ``gft-train demo`` prints: the same lines, and every figure
    within the spread the README states as measured across CPUs (the same machine prints it
    exactly; floating-point paths differ between instruction sets). SFT's probe figures get their
    own, wider bound: SFT's forgetting of the probe is the figure that moves most."""
    from gft_train.demo.run import run_demo

    text = page_holding("<!-- demo-output -->").read_text()
    shown = re.search(r"<!-- demo-output -->\n```\n(.*?)```", text, flags=re.S).group(1)
    bound = re.search(r"<!-- demo-tolerance (\d\.\d+) sft-probe (\d\.\d+) -->", text)
    tolerance, sft_probe = float(bound.group(1)), float(bound.group(2))
    run_demo(tmp_path / "demo")
    printed = (tmp_path / "demo" / "results.txt").read_text()
    strip = [re.sub(r"(?<![\w.])\d+\.\d+", "#", line) for line in (shown, printed)]
    assert strip[0] == strip[1], "the README's table has other lines than the demo prints"
    for want, got in zip(shown.splitlines()[2:], printed.splitlines()[2:]):
        models = ROW_MODELS if not want.startswith("KL") else ["KL"]
        for model, a, b in zip(models, _numbers(want), _numbers(got)):
            bound_here = sft_probe if (model == "SFT" and want.startswith("probe")) else tolerance
            assert abs(a - b) <= bound_here, f"{model} moved by {abs(a - b):.3f} > {bound_here}: {got}"
    # the headline, on what this machine printed: room to gain, SFT gains the most in-distribution,
    # GFT gains too and keeps what SFT loses
    res = json.loads((tmp_path / "demo" / "results.json").read_text())["results"]
    base, sft, gft = (res[m] for m in ("base", "SFT", "GFT"))
    assert base["test"]["pass@1"] <= 0.6 and sft["test"]["pass@1"] >= base["test"]["pass@1"] + 0.15
    assert base["test"]["pass@1"] < gft["test"]["pass@1"] < sft["test"]["pass@1"]
    for split in ("ood", "probe"):
        assert gft[split]["pass@1"] > sft[split]["pass@1"] + 0.1, split
    assert gft["kl_base_model"] < sft["kl_base_model"]


def test_every_marked_block_is_read_by_the_test_it_names():
    """A block marked ``# tested: KEY ... tests/<file>.py ...`` on any page (README.md, docs/*.md)
    is read by that file through ``python_blocks("KEY")``: moving a block to another page, or
    marking one, cannot leave it untested."""
    from doc_pages import ROOT, pages

    marked = []
    for page in pages():
        for block in re.findall(r"```python\n(.*?)```", page.read_text(), flags=re.S):
            first = block.split("\n", 1)[0]
            if first.startswith("# tested:"):
                marked.append((page.name, first))
    assert len(marked) >= 6, marked
    for page, first in marked:
        key = first.removeprefix("# tested:").split()[0]
        [test_file] = re.findall(r"tests/[\w/]+\.py", first) or [key]
        reader = ROOT / test_file
        assert reader.is_file(), f"{page}: {first!r} names no test file"
        assert f'python_blocks("{key}")' in reader.read_text(), f"{page}: {test_file} does not read {key!r}"


def _readme_commands(marker: str) -> list[list[str]]:
    """The commands of the README's bash block that starts with ``marker``, one argv each (lines
    continued by a backslash joined)."""
    import shlex

    blocks = [
        b
        for b in re.findall(r"```bash\n(.*?)```", (ROOT / "README.md").read_text(), flags=re.S)
        if b.startswith(marker)
    ]
    assert len(blocks) == 1, marker
    text = blocks[0].replace("\\\n", " ")
    return [shlex.split(line) for line in text.splitlines() if line.strip() and not line.startswith("#")]


@pytest.mark.slow
def test_train_your_own_model_commands_run(tmp_path, monkeypatch, capsys):
    """The README's three commands, as they are, in a folder holding data/train.jsonl and
    data/eval.jsonl (the demo's rows), with the demo's tiny model in a Hugging Face cache under
    the Hub id the commands name (HF_HUB_OFFLINE=1, tests/conftest.py: the id goes through the Hub
    code path, offline). Added to each: a few steps and short samples, to keep CI short."""
    import huggingface_hub
    import torch
    from accelerate.state import AcceleratorState
    from hub_cache import put_in_hub_cache  # (tests/, on the path as tests/conftest.py's folder)
    from safetensors.torch import load_file

    from gft_train.cli import cli
    from gft_train.demo.model import build_model
    from gft_train.demo.task import make_splits, write_jsonl

    commands = _readme_commands("# tested: tests/project/test_readme.py::test_train_your_own_model_commands_run")
    assert [c[:3] for c in commands] == [["gft-train", "train", "--method"]] * 2 + [["gft-train", "eval", "--model"]]
    hub_id = commands[0][commands[0].index("--model") + 1]
    put_in_hub_cache(build_model(tmp_path / "tiny", hidden_size=64, layers=1), hub_id, tmp_path / "hub")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.chdir(tmp_path)
    splits = make_splits(seed=5, n_train=8, n_eval=4)
    write_jsonl(splits["train"], tmp_path / "data" / "train.jsonl")
    write_jsonl(splits["eval_id"], tmp_path / "data" / "eval.jsonl")
    short = ["--max-new-tokens", "8", "--engine", "transformers", "--report-to", "none"]
    for argv in commands:
        AcceleratorState._reset_state(reset_partial_state=True)  # (one mixed precision per process state)
        extra = short + (["--max-steps", "2", "--prompts-per-step", "2"] if argv[1] == "train" else ["--eval-n", "2"])
        try:
            cli(argv[1:] + extra)
        except SystemExit as e:
            raise AssertionError(f"{' '.join(argv)}: {capsys.readouterr().err[-2000:]}") from e
    AcceleratorState._reset_state(reset_partial_state=True)
    summary = json.loads(capsys.readouterr().out.split("final model:")[-1].split("\n", 1)[1])
    assert {"pass@1", "kl_to_base"} <= set(summary)
    for run in ("sft", "gft"):
        final = tmp_path / "runs" / run / "final"
        assert (final / "adapter_model.safetensors").is_file() and not (final / "model.safetensors").exists()
        merged = load_file(str(final / "merged" / "model.safetensors"))
        assert {v.dtype for v in merged.values()} == {torch.bfloat16}
    base = load_file(str(tmp_path / "tiny" / "model.safetensors"))
    gft = load_file(str(tmp_path / "runs" / "gft" / "final" / "merged" / "model.safetensors"))
    assert any(not torch.equal(gft[k], base[k].to(torch.bfloat16)) for k in base)  # trained
