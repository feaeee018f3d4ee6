"""The README's snippets marked ``# tested: tests/test_readme.py`` run, in order, in one namespace."""
import re
from pathlib import Path

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
