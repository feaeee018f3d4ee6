"""The model probe runs the model on a length it accepts (issue 22, defect 10): xLSTM in
``mode="train"`` refuses any length not divisible by its chunk size, so a 6-token probe crashed a
supported model."""

import pytest
import torch

import gft_kernels
from gft_kernels.models import check_model


def test_probe_and_patch_accept_xlstm_in_train_mode():
    transformers = pytest.importorskip("transformers")
    config = transformers.xLSTMConfig(
        vocab_size=96,
        hidden_size=32,
        embedding_dim=32,
        num_blocks=2,
        num_heads=2,
        mode="train",
        chunk_size=4,
        use_cache=False,
    )
    torch.manual_seed(0)
    model = transformers.xLSTMForCausalLM(config)
    check_model(model)  # was: Sequence length 6 is not divisible by chunk size 4
    ids = torch.randint(0, 96, (2, 8), generator=torch.Generator().manual_seed(0))
    loss = gft_kernels.causal_lm_gft_loss(model, ids, torch.ones_like(ids), ids, 1.0, tau=0.0)
    own = model(input_ids=ids, labels=ids).loss  # tau 0, advantage 1: the model's own cross-entropy
    assert torch.allclose(loss, own, atol=1e-5), (loss, own)
    gft_kernels.patch(model)  # its loss probe, too
    assert torch.allclose(model(input_ids=ids, labels=ids).loss, own, atol=1e-5)
