"""The vocabulary-parallel op with real processes (gloo on the CPU): 2 and 3 ranks, each holding
uneven rows of the lm_head, give the single-process op's loss, stats, dhidden and every shard of
dlm_head and dbias; both engines (Triton through the interpreter, so the sizes are tiny)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

ROOT = Path(__file__).resolve().parents[2]

# Row boundaries of the shards: uneven, one shard of a single block, one of a partial block.
BOUNDS = {2: [0, 23, 70], 3: [0, 9, 50, 70]}
V, H, B, T = 70, 24, 3, 11


def _case(seed, dtype, bias=True):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(B, T, H, generator=g, dtype=torch.float64)
    weight = torch.randn(V, H, generator=g, dtype=torch.float64) * 0.6
    b = torch.randn(V, generator=g, dtype=torch.float64) if bias else None
    targets = torch.randint(0, V, (B, T), generator=g)
    # a target in every shard of every layout, at the shards' edges too
    edges = sorted({x for bounds in BOUNDS.values() for x in bounds[1:-1]})
    flat = targets.view(-1)
    for i, e in enumerate(edges):
        flat[2 * i], flat[2 * i + 1] = e - 1, e
    flat[-1], flat[-2] = 0, V - 1
    targets[torch.rand(B, T, generator=g) < 0.2] = -100
    adv = torch.randn(B, T, generator=g, dtype=torch.float64)
    adv[torch.rand(B, T, generator=g) < 0.25] = 0.0
    old_logp = -torch.rand(B, T, generator=g, dtype=torch.float64) * 4
    ref_logp = -torch.rand(B, T, generator=g, dtype=torch.float64) * 4

    def cast(x):
        return None if x is None else x.to(dtype)

    return dict(
        hidden=cast(hidden),
        weight=cast(weight),
        bias=cast(b),
        targets=targets,
        adv=cast(adv),
        old_logp=cast(old_logp),
        ref_logp=cast(ref_logp),
    )


# (name, engine, dtype, gft_loss options; "grpo" adds old_logp and ref_logp)
CASES = [
    (
        "softcap-temperature-entropy",
        "torch",
        torch.float64,
        dict(tau=0.7, softcap=4.0, temperature=0.8, entropy_coef=0.05),
    ),
    (
        "grpo-seq-mean",
        "torch",
        torch.float64,
        dict(tau=0.5, reduction="seq-mean-token-mean", grpo=True, beta=0.1, kl="k3", clip_high=0.28, entropy_coef=0.02),
    ),
    ("sum-no-bias", "torch", torch.float32, dict(tau=1.5, reduction="sum", bias=False)),
    (
        "softcap-temperature-entropy",
        "triton",
        torch.float32,
        dict(tau=0.7, softcap=4.0, temperature=0.8, entropy_coef=0.05),
    ),
    ("grpo-atomic", "triton", torch.float32, dict(tau=0.5, grpo=True, beta=0.1, kl="k2", dual_clip=3.0, atomic=True)),
    (
        "entropy-cublas",
        "triton",
        torch.float32,
        dict(tau=0.7, softcap=4.0, temperature=0.8, entropy_coef=0.05, grpo=True, beta=0.1, kl="k3", cublas=True),
    ),
]


def _run(case, opts, backend, rows=None, group=None, vocab_start=None):
    opts = dict(opts)
    grpo, atomic, use_bias = opts.pop("grpo", False), opts.pop("atomic", False), opts.pop("bias", True)
    cublas = opts.pop("cublas", False)
    tau = opts.pop("tau")
    sl = slice(None) if rows is None else slice(*rows)
    hidden = case["hidden"].clone().requires_grad_()
    weight = case["weight"][sl].clone().requires_grad_()
    bias = case["bias"][sl].clone().requires_grad_() if use_bias else None
    if grpo:
        opts.update(old_logp=case["old_logp"], ref_logp=case["ref_logp"])
    if atomic:
        from gft_kernels.triton_ops import LaunchOptions

        opts["launch_options"] = LaunchOptions(backward_design="atomic")
    if cublas:  # the cuBLAS plans, in chunks of 16 columns: a shard's partial chunks too
        from gft_kernels.triton_ops import LaunchOptions

        opts["launch_options"] = LaunchOptions(forward_design="cublas", backward_design="cublas", split_cols=16)
    loss, stats = _gft_loss()(
        hidden,
        weight,
        case["targets"],
        case["adv"],
        tau,
        bias=bias,
        backend=backend,
        return_stats=True,
        vocab_parallel_group=group,
        vocab_start=vocab_start,
        **opts,
    )
    loss.backward()
    return dict(
        loss=loss.detach(),
        logp=stats.logp,
        entropy=stats.entropy,
        mean_prob=stats.mean_prob,
        accuracy=stats.accuracy,
        dh=hidden.grad,
        dw=weight.grad,
        db=None if bias is None else bias.grad,
    )


def _gft_loss():
    import gft_kernels

    return gft_kernels.gft_loss


def _rel(a, b):
    scale = b.abs().max().clamp_min(1e-30)
    return float((a.double() - b.double()).abs().max() / scale)


def _worker(rank, world, init_file, out_dir):
    os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    group = dist.group.WORLD
    rows = BOUNDS[world][rank], BOUNDS[world][rank + 1]
    results = {}
    for i, (name, backend, dtype, opts) in enumerate(CASES):
        case = _case(i, dtype, bias=opts.get("bias", True))
        want = _run(case, opts, backend)
        got = _run(case, opts, backend, rows=rows, group=group)
        errs = {}
        for key, value in got.items():
            if value is None:
                continue
            ref = want[key][rows[0] : rows[1]] if key in ("dw", "db") else want[key]
            errs[key] = _rel(value, ref) if value.is_floating_point() else float((value != ref).any())
        results[f"{backend}:{name}"] = errs
    # vocab_start given: shards laid out in reverse rank order (rank 0 holds the last rows)
    sizes = [BOUNDS[world][r + 1] - BOUNDS[world][r] for r in range(world)]
    start = sum(sizes[rank + 1 :])
    case = _case(0, torch.float64)
    opts = CASES[0][3]
    want = _run(case, opts, "torch")
    got = _run(case, opts, "torch", rows=(start, start + sizes[rank]), group=group, vocab_start=start)
    results["torch:vocab_start-reversed"] = dict(
        loss=_rel(got["loss"], want["loss"]),
        dh=_rel(got["dh"], want["dh"]),
        dw=_rel(got["dw"], want["dw"][start : start + sizes[rank]]),
    )
    # shards that overlap are refused on every rank (no rank is left waiting in a collective)
    try:
        _run(case, opts, "torch", rows=(0, sizes[rank]), group=group, vocab_start=0)
        results["refuses-overlap"] = 0.0
    except ValueError as err:
        results["refuses-overlap"] = float("tile [0, V)" in str(err))
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(results))
    dist.destroy_process_group()


def _tensor_parallel_worker(rank, world, init_file, out_dir):
    """A transformers model whose lm_head weight is a DTensor sharded on the vocabulary (tensor
    parallelism: every rank holds the same tokens): ``causal_lm_gft_loss`` takes the shards through
    the vocabulary-parallel op, and the loss, every other parameter's gradient and this rank's
    shard of the head's gradient equal the unsharded model's."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Shard, distribute_tensor
    from transformers import AutoModelForCausalLM, Qwen2Config

    from gft_kernels.models import causal_lm_gft_loss

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    mesh = init_device_mesh("cpu", (world,))
    torch.manual_seed(0)
    config = Qwen2Config(
        vocab_size=37,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        tie_word_embeddings=False,
    )
    model = AutoModelForCausalLM.from_config(config).double()
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 37, (3, 9), generator=g)
    labels = ids.clone()
    labels[:, :3] = -100
    adv = torch.randn(3, generator=g, dtype=torch.float64)

    def run():
        model.zero_grad(set_to_none=True)
        loss = causal_lm_gft_loss(model, ids, torch.ones_like(ids), labels, adv, 0.7, backend="torch")
        loss.backward()
        return loss.detach(), {n: p.grad for n, p in model.named_parameters()}

    want_loss, want = run()
    head = model.get_output_embeddings()
    head.weight = torch.nn.Parameter(distribute_tensor(head.weight.detach(), mesh, [Shard(0)]))

    def no_gather(self, **kwargs):
        raise AssertionError("the sharded head was gathered")

    DTensor.full_tensor = no_gather
    got_loss, got = run()
    local = got.pop("lm_head.weight").to_local()
    rows = want.pop("lm_head.weight").chunk(world)[rank]
    errs = dict(
        loss=_rel(got_loss, want_loss),
        head=_rel(local, rows),
        local_rows=float(local.shape[0] < 37),
        **{n: _rel(got[n], want[n]) for n in want},
    )
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(errs))
    dist.destroy_process_group()


def _in_fresh_process(*args) -> str:
    """Run this file's ``__main__`` with ``args`` in a new Python: its workers are forked from a
    process that has started no thread pool yet (forking the test runner, whose earlier tests
    started OpenMP and gloo threads, can deadlock the children). Forked, not spawned: a spawned
    worker spends most of its time importing torch and triton again."""
    env = dict(os.environ, TRITON_INTERPRET="1", OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    proc = subprocess.run(
        [sys.executable, __file__, *args], cwd=ROOT / "tests", env=env, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


@pytest.mark.slow
@pytest.mark.parametrize("world", [2, 3])
def test_vocab_parallel_equals_one_process(world, tmp_path):
    _in_fresh_process("ranks", str(world), str(tmp_path))
    for rank in range(world):
        results = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert results.pop("refuses-overlap") == 1.0
        assert len(results) == len(CASES) + 1
        for name, errs in results.items():
            tol = 1e-12 if name.startswith("torch:") and "sum-no-bias" not in name else 2e-5
            assert errs and max(errs.values()) <= tol, (rank, name, errs)


@pytest.mark.slow
def test_tensor_parallel_lm_head_takes_the_vocabulary_parallel_path(tmp_path):
    _in_fresh_process("tensor-parallel", "2", str(tmp_path))
    for rank in range(2):
        errs = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert errs.pop("local_rows") == 1.0  # the head really was sharded
        assert len(errs) > 5 and max(errs.values()) <= 1e-12, (rank, errs)


def _readme_block() -> tuple[str, str]:
    """The example's code and the page that shows it."""
    sys.path.insert(0, str(ROOT / "tests"))  # run as a script (below), tests/ is not on the path
    from doc_pages import python_blocks

    [(block, page)] = python_blocks("tests/kernels/test_vocab_parallel.py")
    return block, str(page)


@pytest.mark.slow
def test_readme_vocab_parallel_example_runs():
    """The README's multi-process example: its ``main`` on 2 forked processes (its ``mp.spawn``
    would import torch again in each, the most of a minute on a busy CI machine)."""
    assert 'if __name__ == "__main__":\n    mp.spawn(main, args=(2,), nprocs=2)' in _readme_block()[0]
    assert "same as one process" in _in_fresh_process("readme")


if __name__ == "__main__":
    import gft_kernels.triton_ops.launch  # noqa: F401  (imported before the fork, under TRITON_INTERPRET=1)

    if sys.argv[1] in ("ranks", "tensor-parallel"):
        world, out = int(sys.argv[2]), sys.argv[3]
        worker = _worker if sys.argv[1] == "ranks" else _tensor_parallel_worker
        mp.start_processes(worker, args=(world, str(Path(out) / "init"), out), nprocs=world, start_method="fork")
    else:
        namespace = {"__name__": "readme_example"}
        exec(compile(*_readme_block(), "exec"), namespace)
        mp.start_processes(namespace["main"], args=(2,), nprocs=2, start_method="fork")
