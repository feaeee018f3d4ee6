"""Prompts and responses rendered as at inference: the one place that turns text into training ids.

SFT and GFT batches (``lm.encode``), the rollout engines' prompts (``rollout``), evaluation,
``build-groups``, the preflight length check and the TRL integration's demonstrations all call
``render`` or ``render_prompts``, so the ids the trainer scores are the ids inference sees:

- **With a chat template**, a prompt (chat messages, or a text as one user message) is the
  template's rendering with the generation prompt, and a text response is what the template
  renders for the assistant turn after it: the full conversation rendered with the assistant
  message, minus that prompt rendering (which must be a prefix of it, else the template rewrites
  earlier turns and the pair is refused). The response keeps the template's own end-of-turn token
  (``<|im_end|>``, ``<end_of_turn>``, ``<|eot_id|>``, ``</s>``), which can differ from eos.
- **Without a template**, a text prompt gets the special tokens the tokenizer adds in front of a
  text (BOS for Llama-, Mistral-, Gemma-style tokenizers), and a text response ends with eos.
- **The boundary** is tokenized as generation produces it: the prompt's ids are the prompt
  tokenized alone (what the engines continue), and the response's ids follow them with no token
  merged across the boundary.
- **Sampled responses** (token id lists from an engine) are trained exactly as sampled.

``stop_ids`` are the ids the engines stop at: eos and the template's end-of-turn token.
"""

from __future__ import annotations

from collections.abc import Sequence

Prompt = str | list[dict]
Response = str | Sequence[int]

# a conversation rendered to find the template's end-of-turn token (digits: every tokenizer has them)
_PROBE_PROMPT, _PROBE_REPLY = "1", "2"


def has_template(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def _messages(tokenizer, prompt: Prompt) -> list[dict]:
    if isinstance(prompt, list):
        if not has_template(tokenizer):
            raise ValueError(
                f"chat-message prompts need a tokenizer with a chat template; {tokenizer.name_or_path!r} has none"
            )
        return prompt
    return [{"role": "user", "content": prompt}]


def _uses_template(tokenizer, prompt: Prompt, text_prompts_as_chat: bool) -> bool:
    return isinstance(prompt, list) or (text_prompts_as_chat and has_template(tokenizer))


def prompt_text(tokenizer, prompt: Prompt, *, text_prompts_as_chat: bool = True, template_kwargs=None) -> str:
    """The prompt as the model sees it: the chat template's rendering with the generation prompt
    when it has one (a text prompt is one user message), else the raw text. Special tokens a
    tokenizer adds in front of a plain text (BOS) are added to the ids, not to this text."""
    if not _uses_template(tokenizer, prompt, text_prompts_as_chat):
        return prompt
    return tokenizer.apply_chat_template(
        _messages(tokenizer, prompt), tokenize=False, add_generation_prompt=True, **(template_kwargs or {})
    )


def _plain_ids(tokenizer, texts: list[str]) -> list[list[int]]:
    # a chat template writes its own BOS into the text, so rendered texts take no added specials
    # (as transformers' apply_chat_template(tokenize=True) tokenizes them)
    return tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else []


def leading_special_ids(tokenizer) -> list[int]:
    """The special tokens the tokenizer adds in front of a plain text (``[bos]`` for Llama-,
    Mistral-, Gemma-style tokenizers; ``[]`` for most others). Special tokens it adds after a
    text are left out: a prompt continues into its response, and a trailing eos or separator
    would end the sequence before the response starts."""
    plain = tokenizer(_PROBE_PROMPT, add_special_tokens=False)["input_ids"]
    full = tokenizer(_PROBE_PROMPT, add_special_tokens=True)["input_ids"]
    for head in range(len(full) - len(plain) + 1):
        if full[head : head + len(plain)] == plain:
            return list(full[:head])
    raise ValueError(
        f"tokenizer {tokenizer.name_or_path!r} changes a text's own tokens when it adds special tokens "
        f"({plain} without, {full} with): cannot tell which ids it adds in front of a prompt"
    )


def render_prompts(
    tokenizer, prompts: Sequence[Prompt], *, text_prompts_as_chat: bool = True, template_kwargs=None
) -> list[list[int]]:
    """Each prompt's token ids as the trainer scores them and the rollout engines continue them."""
    return [
        p
        for p, _ in render(
            tokenizer,
            [(p, None) for p in prompts],
            text_prompts_as_chat=text_prompts_as_chat,
            template_kwargs=template_kwargs,
        )
    ]


def _control_ids(tokenizer) -> set[int]:
    decoder = getattr(tokenizer, "added_tokens_decoder", {}) or {}
    return set(tokenizer.all_special_ids) | {i for i, t in decoder.items() if getattr(t, "special", False)}


def _end_turn(tokenizer, ids: list[int], controls: set[int]) -> int | None:
    """The index of the template's end-of-turn token in a rendered assistant turn: the first
    control token of the turn's tail of control tokens and whitespace (ChatML's ``<|im_end|>`` of
    ``<|im_end|>\n``; Phi-3's ``<|end|>`` of ``<|end|>\n<|endoftext|>``, where the template ends
    the whole conversation with eos). None when that tail holds no control token: the template
    marks no end of the turn."""
    start = len(ids)
    while start and (ids[start - 1] in controls or not tokenizer.decode([ids[start - 1]]).strip()):
        start -= 1
    return next((i for i in range(start, len(ids)) if ids[i] in controls), None)


def _eos(tokenizer) -> int:
    if tokenizer.eos_token_id is None:
        raise ValueError(f"tokenizer {tokenizer.name_or_path!r} has no eos token to end a response with")
    return tokenizer.eos_token_id


def _split(tokenizer, p_ids: list[int], full_ids: list[int], tail: str, prompt) -> list[int]:
    """The response's ids after the prompt's: the full text's tokenization past the prompt's
    ids when the prompt's ids are a prefix of it (the tokenization generation reproduces: the
    text as one stream, cut at the boundary); else (a token merged across the boundary) the
    response text tokenized alone, which must decode to the same text after the prompt."""
    if full_ids[: len(p_ids)] == p_ids:
        return list(full_ids[len(p_ids) :])
    alone = tokenizer(tail, add_special_tokens=False)["input_ids"]
    if tokenizer.decode(p_ids + alone) != tokenizer.decode(full_ids):
        raise ValueError(
            f"prompt {prompt!r}: its last token merges with the response's first ({tail[:40]!r}) and the "
            "response tokenized alone reads differently after it; cannot train the ids generation "
            "would produce (end the prompt or start the response with a separator, e.g. a space)"
        )
    return alone


def render(
    tokenizer,
    pairs: Sequence[tuple[Prompt, Response | None]],
    *,
    text_prompts_as_chat: bool = True,
    template_kwargs=None,
) -> list[tuple[list[int], list[int]]]:
    """(prompt, response) pairs -> (prompt_ids, response_ids), as at inference (the module's rules).

    A prompt is a text or chat messages; a response is a text (a demonstration: rendered and
    ended as the model must end it), token ids an engine sampled (kept as they are) or None (the
    prompt alone: response_ids is ``[]``). ``text_prompts_as_chat=False`` renders text prompts
    without the template even when there is one (TRL does so); ``template_kwargs`` go to
    ``apply_chat_template`` (TRL's ``chat_template``, ``chat_template_kwargs``)."""
    kwargs = template_kwargs or {}
    chat = [_uses_template(tokenizer, p, text_prompts_as_chat) for p, _ in pairs]
    rendered = {}  # a group repeats its prompt for each response: rendered once
    for p, _ in pairs:
        if repr(p) not in rendered:
            rendered[repr(p)] = prompt_text(
                tokenizer, p, text_prompts_as_chat=text_prompts_as_chat, template_kwargs=kwargs
            )
    p_texts = [rendered[repr(p)] for p, _ in pairs]
    head = leading_special_ids(tokenizer) if not all(chat) else []
    p_ids = [ids if c else head + ids for ids, c in zip(_plain_ids(tokenizer, p_texts), chat)]

    texts = [i for i, (_, r) in enumerate(pairs) if isinstance(r, str)]
    chat_texts = [i for i in texts if chat[i]]
    conversations = [
        _messages(tokenizer, pairs[i][0]) + [{"role": "assistant", "content": pairs[i][1]}] for i in chat_texts
    ]
    # one call for the batch (a call per conversation costs more than the rendering)
    fulls = dict(
        zip(chat_texts, tokenizer.apply_chat_template(conversations, tokenize=False, **kwargs) if conversations else [])
    )
    tails = {}
    for i in texts:
        prompt, response = pairs[i]
        if chat[i]:
            full = fulls[i]
            if not full.startswith(p_texts[i]):
                raise ValueError(
                    f"prompt {prompt!r}: the chat template renders the conversation with its assistant reply "
                    f"({full[:200]!r}) not as a continuation of the prompt it renders for generation "
                    f"({p_texts[i][:200]!r}): it rewrites earlier turns or the generation prompt, so the trained "
                    "ids could not be the ones a rollout continues"
                )
            tails[i] = full[len(p_texts[i]) :]
        else:
            tails[i] = response
    full_ids = dict(zip(texts, _plain_ids(tokenizer, [p_texts[i] + tails[i] for i in texts])))
    controls = _control_ids(tokenizer) if any(chat[i] for i in texts) else set()

    out = []
    for i, (prompt, response) in enumerate(pairs):
        if response is None:
            r_ids = []
        elif not isinstance(response, str):
            r_ids = [int(t) for t in response]  # sampled: trained exactly as sampled
        else:
            whole = full_ids[i] if chat[i] else head + full_ids[i]
            r_ids = _split(tokenizer, p_ids[i], whole, tails[i], prompt)
            end = _end_turn(tokenizer, r_ids, controls) if chat[i] else None
            if end is not None:
                # Generation stops at the end-of-turn token (``stop_ids``), so what the template
                # writes after it (the newline ChatML and Gemma put between turns, an eos some
                # templates put at the end of a conversation) is never sampled: the response ends
                # at that token, as a sampled one does.
                r_ids = r_ids[: end + 1]
            else:
                # no template, or a template that marks no end of the assistant turn: the model
                # must learn to stop where the sampler stops, at eos
                r_ids = r_ids + [_eos(tokenizer)]
        out.append((list(p_ids[i]), r_ids))
    return out


def end_of_turn_ids(tokenizer, template_kwargs=None) -> list[int]:
    """The template's end-of-turn token when it is not eos (``[]`` without a template, or for one
    that ends the turn with eos or marks no end), found as ``render`` finds it: on a rendered
    one-turn conversation."""
    if not has_template(tokenizer):
        return []
    _, r_ids = render(tokenizer, [(_PROBE_PROMPT, _PROBE_REPLY)], template_kwargs=template_kwargs)[0]
    return [] if r_ids[-1] == tokenizer.eos_token_id else [r_ids[-1]]


def stop_ids(tokenizer, generation_config=None) -> list[int]:
    """The ids a rollout stops at: the tokenizer's eos, the model's generation config's eos ids
    (as transformers' generate and vLLM use them) and the template's end-of-turn token."""
    ids = set()
    for source in (tokenizer.eos_token_id, getattr(generation_config, "eos_token_id", None)):
        if isinstance(source, int):
            ids.add(source)
        elif source is not None:
            ids.update(int(x) for x in source)
    return sorted(ids | set(end_of_turn_ids(tokenizer)))
