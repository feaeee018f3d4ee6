"""Peak memory of the torch backend on the CPU, measured (ru_maxrss in a fresh process)."""
from benchmarks.cpu_memory import measure


def test_torch_backend_peak_is_far_below_one_logits_buffer():
    row = measure("torch", n=4096, v=32000, h=256)
    assert row["extra_over_logits"] < 0.25, row


def test_the_probe_sees_materialized_logits():
    """The same probe on the materialized reference must see several N x V buffers, or it
    measures nothing."""
    row = measure("reference", n=4096, v=32000, h=256)
    assert row["extra_over_logits"] > 1.5, row
