"""Responses are trained as the model produces them at inference (issue 30, item 1): the chat
template's assistant turn with its own end-of-turn token, the tokenizer's BOS on plain prompts,
the prompt ids the rollout engines continue, and a real family's tokenizer (Mistral's, shipped by
``mistral-common``) against Mistral's own encoder. Tokenizers are built here, character-level,
each following one convention; expected ids are written out token by token."""

from __future__ import annotations

import shutil
import sys
import types
from pathlib import Path

import pytest
import torch

from gft_train.lm import encode, prompt_ids

CHARS = list("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789+-*=?.,:!() \n")

# ChatML (Qwen-style): end of turn <|im_end|>, eos <|endoftext|>, a newline between turns, a default
# system prompt when the conversation has none
CHATML = (
    "{% if messages[0]['role'] != 'system' %}<|im_start|>system\nBe brief.<|im_end|>\n{% endif %}"
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
# Gemma-style: BOS written by the template, end of turn <end_of_turn>, eos <eos>, contents trimmed
GEMMA = (
    "{{ bos_token }}{% for m in messages %}<start_of_turn>{{ 'model' if m['role'] == 'assistant' else m['role'] }}\n"
    "{{ m['content'] | trim }}<end_of_turn>\n{% endfor %}{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
)


def char_tokenizer(specials, *, eos, pad, bos=None, adds_bos=False, template=None):
    """A character-level tokenizer with ``specials`` as special tokens (ids 0, 1, ...)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(specials + CHARS)}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token=pad))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    backend.decoder = decoders.Fuse()
    backend.add_special_tokens(specials)
    if adds_bos:
        backend.post_processor = processors.TemplateProcessing(single=f"{bos} $A", special_tokens=[(bos, vocab[bos])])
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token=bos, eos_token=eos, pad_token=pad)
    tok.chat_template = template
    return tok


def chatml():
    return char_tokenizer(
        ["<|endoftext|>", "<|im_start|>", "<|im_end|>"], eos="<|endoftext|>", pad="<|endoftext|>", template=CHATML
    )


def gemma(template=GEMMA):
    return char_tokenizer(
        ["<pad>", "<bos>", "<eos>", "<start_of_turn>", "<end_of_turn>"],
        eos="<eos>",
        pad="<pad>",
        bos="<bos>",
        adds_bos=True,
        template=template,
    )


def expect(tok, *parts) -> list[int]:
    """Ids written out: a part that is a special token is its id, any other part one id per character."""
    specials = set(tok.all_special_tokens) | {t.content for t in tok.added_tokens_decoder.values()}
    out = []
    for part in parts:
        out += [tok.convert_tokens_to_ids(part)] if part in specials else tok.convert_tokens_to_ids(list(part))
    return out


def trained(tok, prompt, response):
    """The trainer's (prompt ids, response ids) of one row, read off its batch (``lm.encode``)."""
    batch = encode(tok, [(prompt, response, 1.0)], 512)
    ids, labels = batch.input_ids[0].tolist(), batch.labels[0].tolist()
    n_prompt = next(i for i, x in enumerate(labels) if x != -100)
    n = int(batch.attention_mask[0].sum())
    assert labels[n_prompt:n] == ids[n_prompt:n]
    return ids[:n_prompt], ids[n_prompt:n]


def test_chatml_trains_the_end_of_turn_token_not_eos_nor_the_newline_after_it():
    tok = chatml()
    p, r = trained(tok, "What is 1+1?", "It is 2.")
    assert p == expect(
        tok,
        "<|im_start|>",
        "system\nBe brief.",
        "<|im_end|>",
        "\n",
        "<|im_start|>",
        "user\nWhat is 1+1?",
        "<|im_end|>",
        "\n",
        "<|im_start|>",
        "assistant\n",
    )
    # the template renders "It is 2.<|im_end|>\n": the response ends at <|im_end|> (where generation
    # stops); eos (<|endoftext|>) is not trained
    assert r == expect(tok, "It is 2.", "<|im_end|>")
    assert tok.eos_token_id not in r
    assert prompt_ids(tok, "What is 1+1?") == p


def test_gemma_style_template_one_bos_trimmed_reply_and_end_of_turn():
    tok = gemma()
    p, r = trained(tok, "What is 1+1?", " It is 2.\n")
    # BOS once: the template writes it, the tokenizer does not add a second one
    assert p == expect(tok, "<bos>", "<start_of_turn>", "user\nWhat is 1+1?", "<end_of_turn>", "\n") + expect(
        tok, "<start_of_turn>", "model\n"
    )
    assert r == expect(tok, "It is 2.", "<end_of_turn>")  # as the template renders it: trimmed


def test_a_template_that_ends_the_conversation_with_eos_trains_up_to_the_end_of_turn():
    from gft_train.render import stop_ids

    # Phi-3-style: "<|end|>\n" closes each turn and eos the whole conversation; generation stops at
    # <|end|>, so the reply ends there, as the engines' samples do
    template = (
        "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}<|end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|assistant|>\n{% else %}{{ eos_token }}{% endif %}"
    )
    tok = char_tokenizer(
        ["<|endoftext|>", "<|user|>", "<|assistant|>", "<|end|>"],
        eos="<|endoftext|>",
        pad="<|endoftext|>",
        template=template,
    )
    p, r = trained(tok, "1+1=", "2")
    assert p == expect(tok, "<|user|>", "\n1+1=", "<|end|>", "\n", "<|assistant|>", "\n")
    assert r == expect(tok, "2", "<|end|>")
    assert tok.convert_tokens_to_ids("<|end|>") in stop_ids(tok)


def test_plain_prompts_get_the_bos_the_tokenizer_adds_and_responses_end_with_eos():
    tok = gemma(template=None)
    p, r = trained(tok, "1+1=", "2")
    assert p == expect(tok, "<bos>", "1+1=")
    assert r == expect(tok, "2", "<eos>")
    assert prompt_ids(tok, "1+1=") == p


def test_no_token_is_merged_across_the_prompt_response_boundary():
    """A BPE whose merge "ab" spans the boundary of prompt "xa" and response "b": the prompt keeps
    its own ids (those the engines continue) and the response starts a token of its own."""
    from tokenizers import Tokenizer, decoders, models
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE(vocab={"<eos>": 0, "x": 1, "a": 2, "b": 3, "ab": 4}, merges=[("a", "b")]))
    backend.decoder = decoders.Fuse()
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<eos>", pad_token="<eos>")
    assert tok("xab", add_special_tokens=False)["input_ids"] == [1, 4]  # one stream merges across it
    assert trained(tok, "xa", "b") == ([1, 2], [3, 0])
    assert trained(tok, "xa", "bab") == ([1, 2], [3, 4, 0])
    # SentencePiece-style (a "▁" in front of every text): the response alone reads " b", not "b"
    # after "xa", so no ids of it continue the prompt's ids as the text does: refused, not trained
    from tokenizers import pre_tokenizers

    vocab = {"<eos>": 0, "▁": 1, "x": 2, "a": 3, "b": 4, "▁x": 5, "ab": 6}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[("▁", "x"), ("a", "b")]))
    backend.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="first", split=False)
    backend.decoder = decoders.Metaspace(prepend_scheme="first", split=False)
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<eos>", pad_token="<eos>")
    assert tok("xab", add_special_tokens=False)["input_ids"] == [5, 6]
    with pytest.raises(ValueError, match="merges with the response's first"):
        encode(tok, [("xa", "b", 1.0)], 16)


def test_a_system_prompt_in_the_messages_replaces_the_templates_default():
    tok = chatml()
    messages = [{"role": "system", "content": "Add."}, {"role": "user", "content": "1+1="}]
    p, r = trained(tok, messages, "2")
    assert p == expect(
        tok,
        "<|im_start|>",
        "system\nAdd.",
        "<|im_end|>",
        "\n",
        "<|im_start|>",
        "user\n1+1=",
        "<|im_end|>",
        "\n",
        "<|im_start|>",
        "assistant\n",
    )
    assert r == expect(tok, "2", "<|im_end|>")


def test_a_template_that_renders_the_reply_not_after_its_generation_prompt_is_refused():
    # as Qwen3's with thinking off: the generation prompt holds an empty think block that the
    # rendered assistant turn does not, so no rollout continues the rendered conversation
    template = CHATML.replace("<|im_start|>assistant\n{% endif %}", "<|im_start|>assistant\n(think)\n\n{% endif %}")
    tok = chatml()
    tok.chat_template = template
    with pytest.raises(ValueError, match="rewrites earlier turns or the generation prompt"):
        encode(tok, [("1+1=", "2", 1.0)], 64)


# ---- a real family's tokenizer: Mistral's SentencePiece files, shipped by mistral-common -------------


def mistral_tokenizer(tmp_path, name):
    import mistral_common
    from transformers import LlamaTokenizer

    folder = tmp_path / name.replace(".", "_")
    folder.mkdir()
    shutil.copy(Path(mistral_common.__file__).parent / "data" / name, folder / "tokenizer.model")
    tok = LlamaTokenizer.from_pretrained(str(folder), add_bos_token=True)
    tok.pad_token = tok.eos_token  # as the trainer's load_model sets it
    return tok


# Mistral's v7 instruct format: [SYSTEM_PROMPT] and [INST] control tokens, a space before the reply,
# eos ends the assistant turn
MISTRAL_V7 = (
    "{{ bos_token }}{% for m in messages %}"
    "{% if m['role'] == 'system' %}[SYSTEM_PROMPT] {{ m['content'] }}[/SYSTEM_PROMPT]"
    "{% elif m['role'] == 'user' %}[INST] {{ m['content'] }}[/INST]"
    "{% else %} {{ m['content'] }}{{ eos_token }}{% endif %}{% endfor %}"
)


@pytest.mark.slow  # about 4 s of it: transformers converts the SentencePiece file to a fast tokenizer
def test_mistral_tokenizer_gives_the_ids_mistrals_own_encoder_gives(tmp_path):
    import mistral_common
    from mistral_common.protocol.instruct.messages import AssistantMessage, SystemMessage, UserMessage
    from mistral_common.protocol.instruct.request import ChatCompletionRequest, InstructRequest
    from mistral_common.tokens.tokenizers.mistral import MistralTokenizer

    data = Path(mistral_common.__file__).parent / "data"
    # v7, a system prompt, through the chat template: Mistral's encoder's prompt (what its serving
    # continues) and its encoding of the whole exchange (what it trains)
    name = "mistral_instruct_tokenizer_241114.model.v7"
    tok = mistral_tokenizer(tmp_path, name)
    tok.chat_template = MISTRAL_V7
    reference = MistralTokenizer.from_file(str(data / name))
    system, user, reply = "Answer with a number.", "What is 12+7?", "It is 19."
    want_prompt = reference.encode_chat_completion(
        ChatCompletionRequest(messages=[SystemMessage(content=system), UserMessage(content=user)])
    ).tokens
    want_all = reference.instruct_tokenizer.encode_instruct(
        InstructRequest(
            messages=[SystemMessage(content=system), UserMessage(content=user), AssistantMessage(content=reply)]
        )
    ).tokens
    messages = [{"role": "system", "content": system}, {"role": "user", "content": user}]
    p, r = trained(tok, messages, reply)
    assert (p, r) == (want_prompt, want_all[len(want_prompt) :])
    assert r[-1] == tok.eos_token_id == 2
    # the same tokenizer without a template: a plain prompt starts with BOS (<s> = 1), as Mistral's
    # encoder encodes a text, and the reply continues the text as one stream, then eos
    tok.chat_template = None
    text = reference.instruct_tokenizer.tokenizer
    p, r = trained(tok, "Question: 12+7=", " 19")
    assert p == text.encode("Question: 12+7=", bos=True, eos=False)
    assert p + r == text.encode("Question: 12+7= 19", bos=True, eos=True)


# ---- the rollout engines continue the trained prompt ids and stop where a reply ends -------------


class _RecordingModel(torch.nn.Module):
    """Stands in for a causal LM in ``TransformersEngine``: records what ``generate`` is given and
    appends a fixed row."""

    def __init__(self, row):
        super().__init__()
        self.row, self.calls = row, []
        self.dummy = torch.nn.Parameter(torch.zeros(1))

    @property
    def device(self):
        return torch.device("cpu")

    def generate(self, input_ids, attention_mask, **kw):
        self.calls.append((input_ids, attention_mask, kw))
        new = torch.tensor([self.row] * input_ids.shape[0])
        return torch.cat([input_ids, new], dim=1)


@pytest.mark.parametrize("template", [GEMMA, None], ids=["template", "plain"])
def test_the_transformers_engine_continues_the_trained_prompt_ids_and_stops_at_end_of_turn(template):
    from gft_train.rollout import TransformersEngine

    tok = gemma(template)
    end = tok.convert_tokens_to_ids("<end_of_turn>" if template else "<eos>")
    two, pad = tok.convert_tokens_to_ids("2"), tok.pad_token_id
    model = _RecordingModel([two, end, two, pad])
    prompts = ["1+1=", "12+7="]
    samples = TransformersEngine(model, tok, max_new_tokens=4).sample(prompts, 2, seed=0)
    (input_ids, mask, kw) = model.calls[0]
    continued = [row[m.bool()].tolist() for row, m in zip(input_ids, mask)]
    assert continued == [trained(tok, p, "2")[0] for p in prompts for _ in range(2)]
    assert continued[0][0] == tok.bos_token_id
    assert end in kw["eos_token_id"] and tok.eos_token_id in kw["eos_token_id"]
    for s in (s for ss in samples for s in ss):
        # what the engine sampled equals what a demonstration "2" trains
        assert (s.token_ids, s.truncated, s.text) == (trained(tok, "1+1=", "2")[1], False, "2")


def test_the_vllm_engine_gets_the_trained_prompt_ids_and_the_end_of_turn_stop(monkeypatch):
    from gft_train.rollout import VLLMEngine

    seen = {}

    class SamplingParams:
        def __init__(self, **kw):
            self.kw = kw

    class LLM:
        def __init__(self, **kw):
            pass

        def generate(self, inputs, params, use_tqdm=False):
            seen["inputs"], seen["params"] = inputs, params.kw
            out = types.SimpleNamespace(token_ids=[5, 6], text="x", finish_reason="stop")
            return [types.SimpleNamespace(outputs=[out] * params.kw["n"]) for _ in inputs]

    monkeypatch.setitem(sys.modules, "vllm", types.SimpleNamespace(LLM=LLM, SamplingParams=SamplingParams))
    tok = chatml()
    engine = VLLMEngine("unused", tok, max_new_tokens=8)
    engine.sample(["1+1="], 2, seed=0)
    assert seen["inputs"] == [{"prompt_token_ids": trained(tok, "1+1=", "2")[0]}]
    assert tok.convert_tokens_to_ids("<|im_end|>") in seen["params"]["stop_token_ids"]


def test_trl_demonstrations_follow_trls_own_prompt_ids():
    """TRL renders chat-message prompts with the template (and text prompts without it): a
    demonstration's ids are the template's assistant turn after TRL's own prompt ids."""
    from gft_train.integrations.trl import GFTTrainer

    tok = chatml()
    trainer = types.SimpleNamespace(_tokenizer=tok, chat_template=None, chat_template_kwargs={})
    messages = [{"role": "user", "content": "1+1="}]
    trl_prompt = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True)
    assert trl_prompt["input_ids"] == trained(tok, messages, "2")[0]
    assert GFTTrainer._demo_render(trainer, messages, "2") == expect(tok, "2", "<|im_end|>")
    assert GFTTrainer._demo_render(trainer, "1+1=", "2") == expect(tok, "2", "<|endoftext|>")


# ---- a model trained on rendered replies ends them with the end-of-turn token ---------------------


def test_a_tiny_model_overfit_on_chat_rows_ends_its_reply_with_end_of_turn():
    from transformers import LlamaConfig, LlamaForCausalLM

    from gft_train.lm import causal_lm_gft_loss
    from gft_train.rollout import TransformersEngine

    tok = gemma()
    rows = [("1+1=", "2"), ("2+3=", "5"), ("4+4=", "8")]
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=64,
        pad_token_id=tok.pad_token_id,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
    )
    model = LlamaForCausalLM(config)
    batch = encode(tok, [(p, r, 1.0) for p, r in rows], 64)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(60):  # tau 0: C(p) = 1, the plain log-likelihood of the rendered replies
        loss = causal_lm_gft_loss(model, batch.input_ids, batch.attention_mask, batch.labels, batch.adv, 0.0)
        opt.zero_grad()
        loss.backward()
        opt.step()
    samples = TransformersEngine(model, tok, max_new_tokens=6, temperature=0.0).sample([p for p, _ in rows], 1)
    end = tok.convert_tokens_to_ids("<end_of_turn>")
    for (prompt, reply), (sample,) in zip(rows, samples):
        assert sample.token_ids == expect(tok, reply, "<end_of_turn>"), (prompt, sample.token_ids)
        assert sample.token_ids[-1] == end != tok.eos_token_id and not sample.truncated
