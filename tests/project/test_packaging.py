"""What `pip install` gives: the kernel library on torch (+ Triton) alone, the trainer and the
tests as extras, one version number, and only ``gft_kernels`` / ``gft_train`` in site-packages
(``benchmarks`` and ``study`` run from a checkout). Also: the repository stands alone."""

import email
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

import gft_kernels
import gft_train

pytestmark = pytest.mark.slow  # (tests/conftest.py: `pytest -m "not slow"` is the quick subset)

ROOT = Path(__file__).resolve().parents[2]
TRAINER_DEPS = [
    "transformers",
    "accelerate",
    "datasets",
    "math_verify",
    "yaml",
    "tqdm",
    "matplotlib",
    "tensorboard",
    "vllm",
]


def _tracked_files() -> list[str]:
    if shutil.which("git") is None:
        pytest.skip("git is not installed")
    proc = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.skip("not a git checkout")
    return [f for f in proc.stdout.split("\0") if f]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """The wheel built from a copy of the tracked files (the build leaves nothing in the checkout)."""
    pytest.importorskip("setuptools", minversion="77")
    src = tmp_path_factory.mktemp("src")
    for name in _tracked_files():
        if (ROOT / name).is_file():  # a tracked file deleted in the working tree is not copied
            (src / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, src / name)
    shutil.copy2(ROOT / "pyproject.toml", src / "pyproject.toml")  # the working tree's, even uncommitted
    out = tmp_path_factory.mktemp("dist")
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", str(src), "-w", str(out)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (whl,) = out.glob("gft-*.whl")
    return whl


def _metadata(whl: Path):
    with zipfile.ZipFile(whl) as z:
        name = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
        return email.message_from_bytes(z.read(name))


def test_wheel_installs_only_the_two_libraries(wheel):
    with zipfile.ZipFile(wheel) as z:
        top = {n.split("/")[0] for n in z.namelist() if not n.split("/")[0].endswith(".dist-info")}
        names = z.namelist()
    assert top == {"gft_kernels", "gft_train"}, top
    assert "gft_kernels/triton_ops/launch.py" in names and "gft_train/demo/run.py" in names


def test_one_version_number(wheel):
    assert _metadata(wheel)["Version"] == gft_kernels.__version__ == gft_train.__version__
    assert wheel.name.startswith(f"gft-{gft_kernels.__version__}-")


def test_the_kernel_library_needs_torch_and_triton_only(wheel):
    meta = _metadata(wheel)
    requires = meta.get_all("Requires-Dist")
    core = sorted(
        r.split(";")[0].split(">")[0].split("=")[0].split("<")[0].strip() for r in requires if "extra ==" not in r
    )
    assert core == ["torch", "triton"], requires
    extras = set(meta.get_all("Provides-Extra"))
    assert {"train", "test"} <= extras, extras
    train = [r for r in requires if 'extra == "train"' in r]
    for dep in ("transformers", "accelerate", "datasets", "math-verify", "pyyaml"):
        assert any(r.startswith(dep) for r in train), (dep, train)
    assert any(r.startswith("gft[train]") for r in requires if 'extra == "test"' in r)


def test_gft_kernels_imports_and_runs_without_the_trainer_dependencies():
    blocked = ", ".join(repr(m) for m in TRAINER_DEPS)
    code = f"""
import sys
for name in [{blocked}]:
    sys.modules[name] = None        # `import name` now raises ImportError
import torch
import gft_kernels
h = torch.randn(5, 8, requires_grad=True); w = torch.randn(11, 8, requires_grad=True)
loss = gft_kernels.gft_loss(h, w, torch.randint(0, 11, (5,)), 1.0, tau=0.7, backend="torch")
loss.backward()
assert torch.isfinite(loss) and h.grad is not None
gft_kernels.causal_lm_gft_loss, gft_kernels.patch   # the model adapter is there; transformers is lazy
print("ok")
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stderr[-3000:]


def test_gft_train_without_its_extra_says_how_to_install_it():
    code = (
        "import sys; sys.modules['yaml'] = None; sys.modules['transformers'] = None\n"
        "from gft_train.cli import main; main(['train', '--help'])"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    assert "pip install 'gft[train]'" in proc.stderr, proc.stderr[-3000:]


def test_no_tracked_file_points_outside_the_repository():
    """A clone has no ``../shared``: the specification lives in docs/spec.md."""
    offenders = []
    for name in _tracked_files():
        path = ROOT / name
        if not path.is_file() or path.suffix in {".png", ".csv"}:
            continue
        try:
            text = path.read_text()
        except UnicodeDecodeError:
            continue
        for needle in ("../shared", "SPEC.md"):
            if needle in text and name != "tests/project/test_packaging.py":
                offenders.append(f"{name}: {needle}")
    assert not offenders, offenders
    assert (ROOT / "docs" / "spec.md").is_file()
