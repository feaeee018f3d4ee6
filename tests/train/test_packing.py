"""Packed (padding-free) micro-batches (issue 22): one row of the micro-batch's sequences, position
ids restarting per sequence, targets shifted per sequence, advantages per token. The same loss and
every gradient as the padded batch, on every attention implementation on this CPU and every tiny
architecture that keeps packed sequences apart; the others refused up front in one line."""

import pytest
import torch
from tiny_models import Skip, causal_lm_types, tiny_model
from transformers import LlamaConfig, LlamaForCausalLM

from gft_kernels.options import IGNORE_INDEX
from gft_train.config import LOSS_AGGREGATIONS, Optimization
from gft_train.lm import Batch
from gft_train.packing import PackedBatch, best_fit_decreasing, check_packing, pack, packs_in_one_row
from gft_train.trainer import GFTPolicy, aggregation, run_loss


def _batch(vocab, lengths=(5, 9, 7), prompt=(2, 3, 1), adv=(1.0, -0.5, 2.0), seed=1):
    """A right-padded batch as ``lm.encode`` makes it: prompt tokens and padding labelled IGNORE."""
    g = torch.Generator().manual_seed(seed)
    width = max(lengths)
    ids = torch.zeros(len(lengths), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    labels = torch.full_like(ids, IGNORE_INDEX)
    for r, (n, p) in enumerate(zip(lengths, prompt)):
        ids[r, :n] = torch.randint(1, vocab, (n,), generator=g)
        mask[r, :n] = 1
        labels[r, p:n] = ids[r, p:n]
    return Batch(ids, mask, labels, torch.tensor(adv, dtype=torch.float32))


def test_pack_lays_the_sequences_out_in_one_row_and_predicts_within_each():
    b = _batch(50)
    p = pack(b)
    assert p.input_ids.shape == (1, 21) and p.attention_mask is None
    assert p.position_ids[0].tolist() == list(range(5)) + list(range(9)) + list(range(7))
    assert p.seq_ids[0].tolist() == [0] * 5 + [1] * 9 + [2] * 7
    assert p.adv[0].tolist() == [1.0] * 5 + [-0.5] * 9 + [2.0] * 7
    starts = [0, 5, 14]
    for r, (s, n) in enumerate(zip(starts, (5, 9, 7))):
        row = p.labels[0, s : s + n].tolist()
        assert row[:-1] == b.labels[r, 1:n].tolist()  # position t predicts token t + 1 of its own sequence
        assert row[-1] == IGNORE_INDEX  # the last one would predict the next sequence's first
    assert (p.n_valid, p.n_seqs) == (b.n_valid, b.n_seqs) == (3 + 6 + 6, 3)
    m = p.masked()
    assert (m.n_valid, m.n_seqs, m.adv.abs().sum().item()) == (0, 0, 0.0)


def _loss_and_grads(model, batch, name, entropy_coef=0.0, backward=True):
    """The trainer's module on one micro-batch, with the trainer's reduction and normalizer."""
    policy = GFTPolicy(model, run_loss(Optimization(tau=0.7, loss_aggregation=name, entropy_coef=entropy_coef)))
    model.zero_grad(set_to_none=True)
    _, normalizer = aggregation(name, batch.n_valid, batch.n_seqs, 16)
    with torch.set_grad_enabled(backward):
        loss, sums = policy(batch, normalizer)
    if backward:
        loss.backward()
    return loss.detach(), sums, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _assert_same(model, batch, name, entropy_coef=0.0, backward=True, rows=False):
    model.eval()  # no dropout or router jitter (seed_oss, phimoe): two forwards comparable token by token
    loss, sums, grads = _loss_and_grads(model, batch, name, entropy_coef, backward)
    packed = pack(batch, rows=rows)
    assert isinstance(packed, PackedBatch)
    p_loss, p_sums, p_grads = _loss_and_grads(model, packed, name, entropy_coef, backward)
    assert loss.abs().item() > 0 and (grads or not backward)
    # float64 models compute rotary tables in float32: agreement to float32's precision
    f32 = next(model.parameters()).dtype == torch.float32
    rtol, atol = (1e-4, 1e-6) if f32 else (1e-6, 1e-8)
    torch.testing.assert_close(p_loss, loss, rtol=rtol, atol=atol)
    torch.testing.assert_close(p_sums, sums, rtol=rtol, atol=atol)
    assert p_grads.keys() == grads.keys()
    for k in grads:
        scale = grads[k].abs().max().item()  # entries near 0 carry the float32 rounding of the larger ones
        torch.testing.assert_close(
            p_grads[k], grads[k], rtol=10 * rtol, atol=max(atol, 10 * rtol * scale), msg=lambda m, k=k: f"{k}: {m}"
        )


def _llama(attn):
    cfg = LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        max_position_embeddings=64,
        attn_implementation=attn,
    )
    torch.manual_seed(0)
    # FlexAttention on a CPU runs float32 (and half) only
    return LlamaForCausalLM(cfg).to(torch.float32 if attn == "flex_attention" else torch.float64)


def _cpu_attention():
    """The attention implementations that run on this CPU (flash-attention needs CUDA)."""
    names = ["eager", "sdpa"]
    try:
        from torch.nn.attention.flex_attention import flex_attention  # noqa: F401

        names.append("flex_attention")
    except ImportError:
        pass
    return names


@pytest.mark.parametrize("attn", _cpu_attention())
@pytest.mark.parametrize("name", LOSS_AGGREGATIONS)
def test_packed_gives_the_padded_loss_and_gradients_on_each_attention(attn, name):
    model = _llama(attn)
    check_packing(model)
    # FlexAttention has no backward on a CPU (torch says so): its loss alone here
    _assert_same(
        model,
        _batch(64),
        name,
        entropy_coef=0.1 if name == "token-mean" else 0.0,
        backward=attn != "flex_attention" or torch.cuda.is_available(),
    )


def test_best_fit_decreasing_puts_each_sequence_in_the_row_it_fills_most_tightly():
    # longest first: 10 | 8 | 5, then 4 fits only the third row, and 1 fits the second (2 free)
    # and the third (1 free): best fit takes the third (first fit would take the second)
    assert best_fit_decreasing([8, 10, 5, 4, 1], 10) == [[1], [0], [2, 3, 4]]
    assert best_fit_decreasing([3, 3, 3], 3) == [[0], [1], [2]]  # ties keep their order
    assert best_fit_decreasing([2, 2, 1, 1], 6) == [[0, 1, 2, 3]]
    with pytest.raises(ValueError, match=r"lengths must be in \[1, capacity=4\], got \[5, 0\]"):
        best_fit_decreasing([5, 0, 2], 4)


# the rows' lengths: best fit packs them into 3 rows of at most 10 (the longest, a row of its own)
ROWS_LENGTHS, ROWS_PROMPT, ROWS_ADV = (8, 10, 5, 4, 2), (2, 3, 1, 1, 1), (1.0, -0.5, 2.0, 0.25, -1.5)


def test_pack_rows_lays_the_sequences_out_in_best_fit_rows_no_longer_than_the_longest():
    b = _batch(50, ROWS_LENGTHS, ROWS_PROMPT, ROWS_ADV)
    p = pack(b, rows=True)
    # rows: [10] | [8, 2] | [5, 4] and one token of padding
    assert p.input_ids.shape == (3, 10) and p.attention_mask is None
    assert p.seq_ids.tolist() == [[1] * 10, [0] * 8 + [4] * 2, [2] * 5 + [3] * 4 + [3]]
    # (the padding goes on from its row's last sequence)
    assert p.position_ids.tolist() == [list(range(10)), list(range(8)) + [0, 1], list(range(5)) + list(range(5))]
    assert p.in_sequence.tolist() == [[True] * 10, [True] * 10, [True] * 9 + [False]]
    assert p.adv.tolist() == [[-0.5] * 10, [1.0] * 8 + [-1.5] * 2, [2.0] * 5 + [0.25] * 4 + [0.0]]
    starts = {1: (0, 0), 0: (1, 0), 4: (1, 8), 2: (2, 0), 3: (2, 5)}
    for r, (row, s) in starts.items():
        n = ROWS_LENGTHS[r]
        assert p.input_ids[row, s : s + n].tolist() == b.input_ids[r, :n].tolist()
        labels = p.labels[row, s : s + n].tolist()
        assert labels[:-1] == b.labels[r, 1:n].tolist() and labels[-1] == IGNORE_INDEX
    assert p.labels[2, 9].item() == IGNORE_INDEX  # the padding predicts nothing
    assert (p.n_valid, p.n_seqs, p.n_tokens) == (b.n_valid, b.n_seqs, sum(ROWS_LENGTHS))
    m = p.masked()
    assert (m.n_valid, m.n_seqs, m.n_tokens, m.adv.abs().sum().item()) == (0, 0, sum(ROWS_LENGTHS), 0.0)


# (FlexAttention on this CPU: inductor's C++ compile of its kernel failed here once a third shape
# recompiled it, probe, padded, rows; it has no backward on a CPU either)
@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("name", LOSS_AGGREGATIONS)
def test_packed_rows_give_the_padded_loss_and_gradients_on_each_attention(attn, name):
    """Several rows, sequences reordered by best fit, a row's padding, and a row that one sequence
    fills exactly: the padded batch's loss, statistics and every gradient, in float64."""
    model = _llama(attn)
    check_packing(model)
    entropy_coef = 0.1 if name == "token-mean" else 0.0
    _assert_same(model, _batch(64, ROWS_LENGTHS, ROWS_PROMPT, ROWS_ADV), name, entropy_coef, rows=True)


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_rows_of_one_sequence_each_are_the_padded_rows_positions_and_all(attn):
    """Lengths that do not pair (the demo's): one sequence a row, its padding going on from it,
    so the positions are a padded row's, given once ([1, L]) as a padded batch's are; exact."""
    b = _batch(64, (10, 7, 8), (2, 3, 1), (1.0, -0.5, 2.0))
    p = pack(b, rows=True)
    assert p.seq_ids.tolist() == [[0] * 10, [2] * 10, [1] * 10] and p.position_ids.tolist() == [list(range(10))]
    assert p.in_sequence.sum(dim=1).tolist() == [10, 8, 7]
    _assert_same(_llama(attn), b, "seq-mean-token-mean", rows=True)


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_attention_that_reads_packed_sequences_only_in_one_row_is_refused_for_rows(attn, monkeypatch):
    """As transformers' flash-attention path does (packed position ids read only in a batch of one
    row): the trainer's rows would mix their sequences, so the probe packs rows and refuses it."""
    import transformers.masking_utils as masking

    one_row_only = masking.find_packed_sequence_indices
    monkeypatch.setattr(masking, "find_packed_sequence_indices", lambda p: one_row_only(p) if len(p) == 1 else None)
    model = _llama(attn)
    assert not packs_in_one_row(model)
    with pytest.raises(ValueError, match=f"attn_implementation='{attn}': a packed row's sequences see each other"):
        check_packing(model)


def test_flash_attention_packs_one_row(monkeypatch):
    model = _llama("sdpa")
    monkeypatch.setattr(model.config, "_attn_implementation_internal", "flash_attention_2", raising=False)
    assert packs_in_one_row(model)


def test_the_step_packs_each_micro_batch_into_rows_of_at_most_max_length():
    """The trainer's micro-batches: best-fit rows (the demo's character tokenizer: a token a
    character), a response cut to exactly max_length filling a row alone; one row with one_row."""
    from accelerate import Accelerator

    from gft_train.demo.model import build_tokenizer
    from gft_train.groups import Group, Response
    from gft_train.step import step_batches

    tok = build_tokenizer()
    # prompt + response + EOS: 1 + 20 (cut to max_length 12), 1 + 5 + 1, 1 + 3 + 1, 1 + 2 + 1, ...
    texts = ["1" * 20, "2" * 5, "3" * 3, "4" * 2, "5" * 8, "6" * 4]
    groups = [Group("7", "", [Response(t, "expert", advantage=float(i)) for i, t in enumerate(texts)])]
    acc = Accelerator(cpu=True)
    step = step_batches(acc, tok, groups, micro_batch_size=4, max_length=12, packed=True)
    first, second = step.batches
    # [12] | [7, 5] | [4 + padding]; then [10] | [6 + padding]
    assert first.seq_ids.tolist() == [[0] * 12, [1] * 7 + [2] * 5, [3] * 4 + [3] * 8]
    assert first.in_sequence.sum(dim=1).tolist() == [12, 12, 4]
    assert second.seq_ids.tolist() == [[0] * 10, [1] * 6 + [1] * 4]
    assert (step.cut, step.tokens) == (1, sum(b.n_valid for b in step.batches))
    one_row = step_batches(acc, tok, groups, micro_batch_size=4, max_length=12, packed=True, one_row=True)
    assert [tuple(b.input_ids.shape) for b in one_row.batches] == [(1, 28), (1, 16)]


def test_a_model_that_mixes_packed_sequences_is_refused_in_one_line():
    """GPT-2's learned positions read position_ids, so it passes; a recurrent model (Mamba) carries
    its state from one packed sequence into the next and is refused, before any training."""
    from transformers import MambaConfig, MambaForCausalLM

    torch.manual_seed(0)
    model = MambaForCausalLM(MambaConfig(vocab_size=64, hidden_size=32, num_hidden_layers=1, state_size=8))
    with pytest.raises(ValueError) as info:
        check_packing(model)
    msg = str(info.value)
    assert "\n" not in msg and "MambaForCausalLM" in msg and "see each other" in msg and "without --packed" in msg
    with pytest.raises(ValueError):  # the verdict is kept
        check_packing(model)


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_attention_that_ignores_the_packed_boundaries_is_refused(attn, monkeypatch):
    """As transformers before 4.53 (or an attention without packed-sequence support): the mask is
    causal over the whole row, so each sequence attends to the ones before it. Refused, not trained."""
    import transformers.masking_utils as masking

    monkeypatch.setattr(masking, "find_packed_sequence_indices", lambda position_ids: None)
    with pytest.raises(
        ValueError, match=f"LlamaForCausalLM .* attn_implementation='{attn}': a packed row's sequences see each other"
    ) as info:
        check_packing(_llama(attn))
    # the one fix left is to train unpacked: the refused attention is not suggested back
    assert str(info.value).endswith("train without --packed"), str(info.value)


def test_the_verdict_is_kept_per_attention_implementation(monkeypatch):
    import transformers.masking_utils as masking

    model = _llama("eager")
    check_packing(model)
    monkeypatch.setattr(masking, "find_packed_sequence_indices", lambda position_ids: None)
    check_packing(model)  # kept: not probed again
    model.set_attn_implementation("sdpa")
    with pytest.raises(ValueError, match="attn_implementation='sdpa'"):
        check_packing(model)


@pytest.mark.slow
@pytest.mark.parametrize("model_type", causal_lm_types())
def test_every_tiny_architecture_packs_exactly_or_is_refused(model_type):
    """Accepted by the probe: the padded batch's loss and every gradient, on eager attention and
    (where the model has it) sdpa. Refused: one line naming the architecture and what it does."""
    from gft_kernels.models import UnsupportedModelError, check_model

    try:
        model = tiny_model(model_type)
    except Skip as e:
        pytest.skip(str(e))
    try:
        check_model(model)
    except UnsupportedModelError as e:  # not a GFT model at all (test_models_exact covers it)
        pytest.skip(str(e))
    except Exception as e:
        pytest.skip(f"its own forward does not run on the tiny config: {type(e).__name__}")
    try:
        check_packing(model)
    except ValueError as e:
        msg = str(e)
        assert "\n" not in msg and type(model).__name__ in msg and "--packed" in msg
        return
    vocab = model.config.get_text_config(decoder=True).vocab_size
    for name in ("token-mean", "seq-mean-token-mean"):
        _assert_same(model, _batch(vocab), name)
    try:
        model.set_attn_implementation("sdpa")
    except Exception:
        return  # no sdpa for this architecture
    try:
        check_packing(model)  # probed again: the verdict is per attention implementation
    except ValueError:
        return
    _assert_same(model, _batch(vocab, seed=2), "token-mean")


# ---- the trainer -------------------------------------------------------------------------
@pytest.fixture(scope="module")
def run_set_up(tmp_path_factory):
    from gft_train.demo.model import build_model
    from gft_train.demo.task import make_splits, write_jsonl

    d = tmp_path_factory.mktemp("packed")
    rows = make_splits(seed=2, n_train=12, n_eval=4)
    return dict(
        dir=d,
        model=build_model(d / "model", hidden_size=64, layers=1),
        train=write_jsonl(rows["train"], d / "train.jsonl"),
    )


@pytest.mark.slow
@pytest.mark.parametrize("name", ["token-mean", "seq-mean-token-mean"])
def test_a_packed_run_trains_as_the_padded_one(run_set_up, tmp_path, name):
    """GFT on expert and teacher responses (group advantages, a different one per sequence):
    --packed gives the padded run's losses, token counts and weights."""
    import json

    from safetensors.torch import load_file

    from gft_train.cli import main as cli_main

    s = run_set_up

    def run(out, *extra):
        cli_main(
            [
                "train",
                "--model",
                str(s["model"]),
                "--train-file",
                str(s["train"]),
                "--output-dir",
                str(out),
                "--n-self",
                "0",
                "--max-steps",
                "3",
                "--prompts-per-step",
                "3",
                "--micro-batch-size",
                "5",
                "--lr",
                "1e-2",
                "--max-length",
                "16",
                "--loss-aggregation",
                name,
                "--report-to",
                "none",
                *extra,
            ]
        )
        rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        return rows, load_file(str(out / "final" / "model.safetensors"))

    padded, w_padded = run(tmp_path / "padded")
    packed, w_packed = run(tmp_path / "packed", "--packed")
    assert [r["tokens"] for r in packed] == [r["tokens"] for r in padded]
    for key in ("loss", "grad_norm", "entropy", "mean_token_accuracy"):
        torch.testing.assert_close(
            torch.tensor([r[key] for r in packed]),
            torch.tensor([r[key] for r in padded]),
            rtol=1e-4,
            atol=1e-6,
            msg=lambda m, key=key: f"{key}: {m}",
        )
    assert any(r["groups/zero_variance_frac"] < 1 for r in padded)  # advantages differ within the groups
    for k in w_padded:  # (Adam's step of a gradient near 0 is its sign: float32 rounding shows there)
        torch.testing.assert_close(w_packed[k], w_padded[k], rtol=1e-3, atol=1e-4)


def test_the_attention_implementation_is_the_configured_one_and_packs_on_eager(run_set_up, tmp_path):
    from gft_train.config import Config
    from gft_train.trainer import Trainer

    s = run_set_up
    for attn in ("eager", "sdpa"):
        t = Trainer(
            Config(
                method="sft",
                model=str(s["model"]),
                train_file=str(s["train"]),
                output_dir=str(tmp_path / attn),
                max_steps=1,
                prompts_per_step=4,
                micro_batch_size=4,
                max_length=16,
                packed=True,
                attn_implementation=attn,
                report_to="none",
            )
        )
        assert t.model.config._attn_implementation == attn
        assert t.train_step(t._groups_for_step(0))["tokens"] > 0


def test_a_model_that_mixes_packed_sequences_stops_the_run_in_one_line(run_set_up, tmp_path):
    from transformers import AutoTokenizer, MambaConfig, MambaForCausalLM

    from gft_train.cli import main as cli_main

    s = run_set_up
    tok = AutoTokenizer.from_pretrained(s["model"])
    torch.manual_seed(0)
    MambaForCausalLM(
        MambaConfig(
            vocab_size=len(tok),
            hidden_size=32,
            num_hidden_layers=1,
            state_size=8,
            pad_token_id=tok.pad_token_id,
            eos_token_id=tok.eos_token_id,
        )
    ).save_pretrained(tmp_path / "mamba")
    tok.save_pretrained(tmp_path / "mamba")
    out = tmp_path / "run"
    with pytest.raises(ValueError, match=r"packed batches \(--packed\): MambaForCausalLM .* see each other"):
        cli_main(
            [
                "train",
                "--method",
                "sft",
                "--model",
                str(tmp_path / "mamba"),
                "--train-file",
                str(s["train"]),
                "--output-dir",
                str(out),
                "--max-steps",
                "2",
                "--max-length",
                "16",
                "--packed",
            ]
        )
    assert not out.exists()  # refused before anything was trained or written
