"""The README's snippets marked ``# tested: tests/test_readme.py`` run, in order, in one namespace."""
import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parent.parent / "README.md"


def test_readme_snippets_run():
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    tested = [b for b in blocks if b.startswith("# tested: tests/test_readme.py")]
    assert len(tested) == 2, "the functional op and the patched model"
    namespace = {}
    for block in tested:
        exec(compile(block, str(README), "exec"), namespace)
    model = namespace["model"]
    assert namespace["out"].logits is None and namespace["out"].gft_stats is not None
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
    own = model.__dict__["_gft_original_forward"](input_ids=namespace["input_ids"], labels=namespace["labels"],
                                                  attention_mask=namespace["attention_mask"]).loss
    assert abs(float(namespace["sft"]) - float(own)) < 1e-5


def _numbers(text: str) -> list[float]:
    return [float(x) for x in re.findall(r"(?<![\w.])\d+\.\d+", text)]


@pytest.mark.slow
def test_readme_shows_what_the_demo_prints(tmp_path):
    """The README's demo table is what ``gft-train demo`` prints: the same lines, and every figure
    within the spread the README states as measured across CPUs (the same machine prints it
    exactly; floating-point paths differ between instruction sets)."""
    from gft_train.demo.run import run_demo

    text = README.read_text()
    shown = re.search(r"<!-- demo-output -->\n```\n(.*?)```", text, flags=re.S).group(1)
    tolerance = float(re.search(r"<!-- demo-tolerance (\d\.\d+) -->", text).group(1))
    run_demo(tmp_path / "demo")
    printed = (tmp_path / "demo" / "results.txt").read_text()
    strip = [re.sub(r"(?<![\w.])\d+\.\d+", "#", line) for line in (shown, printed)]
    assert strip[0] == strip[1], "the README's table has other lines than the demo prints"
    gaps = [abs(a - b) for a, b in zip(_numbers(shown), _numbers(printed))]
    assert max(gaps) <= tolerance, f"a figure moved by {max(gaps):.3f} > {tolerance}:\n{printed}"
