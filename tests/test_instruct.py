"""Instruct checkpoints end to end, on tiny random models with real tokenizer files (issue 14):
chat prompts rendered from the folder's own template equal transformers' apply_chat_template token
for token (Llama 3.2, Qwen2.5 and Qwen3 templates, with and without a system turn, few-shot turns,
typed markers); every stage's prompt comes from tasks.prompt_ids; generation stops at each end id
the folder declares; a saved checkpoint carries its tokenizer and still loads and generates after
it is moved; export_hf writes a folder that transformers opens with equal logits and the same BK id;
the GSM8K strict and lenient scores.

Test-only tools: `tokenizers` builds each tokenizer.json (a byte-level BPE over the first GPT-2
ranks, so tiktoken and Hugging Face agree exactly), `transformers` is the reference. No network:
HF_HUB_OFFLINE=1, and every folder is written here from tests/fixtures.

$ python -m pytest -q tests/test_instruct.py
"""
import json
import os
import shutil
from dataclasses import dataclass

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"

import pytest
import torch

from conftest import FIXTURES
from checkpoint import build_model, load_model, save_checkpoint
from heldout import evaluate
from tokenizer import bytes_to_unicode
from decode import generate
from model import GPT, GPTConfig
from tasks import get_task, prompt_ids
from tokenizer import BK_TEXT, GPT2_RANKS, LLAMA3_PAT, LLAMA3_SPECIALS, QWEN2_PAT, get_tokenizer, load_ranks

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

# -----------------------------------------------------------------------------
# the families' real chat templates (public: each model's tokenizer_config.json)

LLAMA32_TEMPLATE = r"""{{- bos_token }}
{%- if custom_tools is defined %}
    {%- set tools = custom_tools %}
{%- endif %}
{%- if not tools_in_user_message is defined %}
    {%- set tools_in_user_message = true %}
{%- endif %}
{%- if not date_string is defined %}
    {%- if strftime_now is defined %}
        {%- set date_string = strftime_now("%d %b %Y") %}
    {%- else %}
        {%- set date_string = "26 Jul 2024" %}
    {%- endif %}
{%- endif %}
{%- if not tools is defined %}
    {%- set tools = none %}
{%- endif %}

{#- This block extracts the system message, so we can slot it into the right place. #}
{%- if messages[0]['role'] == 'system' %}
    {%- set system_message = messages[0]['content']|trim %}
    {%- set messages = messages[1:] %}
{%- else %}
    {%- set system_message = "" %}
{%- endif %}

{#- System message #}
{{- "<|start_header_id|>system<|end_header_id|>\n\n" }}
{%- if tools is not none %}
    {{- "Environment: ipython\n" }}
{%- endif %}
{{- "Cutting Knowledge Date: December 2023\n" }}
{{- "Today Date: " + date_string + "\n\n" }}
{%- if tools is not none and not tools_in_user_message %}
    {{- "You have access to the following functions. To call a function, please respond with JSON for a function call." }}
    {{- 'Respond in the format {"name": function name, "parameters": dictionary of argument name and its value}.' }}
    {{- "Do not use variables.\n\n" }}
    {%- for t in tools %}
        {{- t | tojson(indent=4) }}
        {{- "\n\n" }}
    {%- endfor %}
{%- endif %}
{{- system_message }}
{{- "<|eot_id|>" }}

{#- Custom tools are passed in a user message with some extra guidance #}
{%- if tools_in_user_message and not tools is none %}
    {#- Extract the first user message so we can plug it in here #}
    {%- if messages | length != 0 %}
        {%- set first_user_message = messages[0]['content']|trim %}
        {%- set messages = messages[1:] %}
    {%- else %}
        {{- raise_exception("Cannot put tools in the first user message when there's no first user message!") }}
{%- endif %}
    {{- '<|start_header_id|>user<|end_header_id|>\n\n' -}}
    {{- "Given the following functions, please respond with a JSON for a function call " }}
    {{- "with its proper arguments that best answers the given prompt.\n\n" }}
    {{- 'Respond in the format {"name": function name, "parameters": dictionary of argument name and its value}.' }}
    {{- "Do not use variables.\n\n" }}
    {%- for t in tools %}
        {{- t | tojson(indent=4) }}
        {{- "\n\n" }}
    {%- endfor %}
    {{- first_user_message + "<|eot_id|>"}}
{%- endif %}

{%- for message in messages %}
    {%- if not (message.role == 'ipython' or message.role == 'tool' or 'tool_calls' in message) %}
        {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' }}
    {%- elif 'tool_calls' in message %}
        {%- if not message.tool_calls|length == 1 %}
            {{- raise_exception("This model only supports single tool-calls at once!") }}
        {%- endif %}
        {%- set tool_call = message.tool_calls[0].function %}
        {{- '<|start_header_id|>assistant<|end_header_id|>\n\n' -}}
        {{- '{"name": "' + tool_call.name + '", ' }}
        {{- '"parameters": ' }}
        {{- tool_call.arguments | tojson }}
        {{- "}" }}
        {{- "<|eot_id|>" }}
    {%- elif message.role == "tool" or message.role == "ipython" %}
        {{- "<|start_header_id|>ipython<|end_header_id|>\n\n" }}
        {%- if message.content is mapping or message.content is iterable %}
            {{- message.content | tojson }}
        {%- else %}
            {{- message.content }}
        {%- endif %}
        {{- "<|eot_id|>" }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|start_header_id|>assistant<|end_header_id|>\n\n' }}
{%- endif %}
"""

QWEN25_TEMPLATE = r"""{%- if tools %}
    {{- '<|im_start|>system\n' }}
    {%- if messages[0]['role'] == 'system' %}
        {{- messages[0]['content'] }}
    {%- else %}
        {{- 'You are Qwen, created by Alibaba Cloud. You are a helpful assistant.' }}
    {%- endif %}
    {{- "\n\n# Tools\n\nYou may call one or more functions to assist with the user query.\n\nYou are provided with function signatures within <tools></tools> XML tags:\n<tools>" }}
    {%- for tool in tools %}
        {{- "\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\n</tools>\n\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": <function-name>, \"arguments\": <args-json-object>}\n</tool_call><|im_end|>\n" }}
{%- else %}
    {%- if messages[0]['role'] == 'system' %}
        {{- '<|im_start|>system\n' + messages[0]['content'] + '<|im_end|>\n' }}
    {%- else %}
        {{- '<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n' }}
    {%- endif %}
{%- endif %}
{%- for message in messages %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) or (message.role == "assistant" and not message.tool_calls) %}
        {{- '<|im_start|>' + message.role + '\n' + message.content + '<|im_end|>' + '\n' }}
    {%- elif message.role == "assistant" %}
        {{- '<|im_start|>' + message.role }}
        {%- if message.content %}
            {{- '\n' + message.content }}
        {%- endif %}
        {%- for tool_call in message.tool_calls %}
            {%- if tool_call.function is defined %}
                {%- set tool_call = tool_call.function %}
            {%- endif %}
            {{- '\n<tool_call>\n{"name": "' }}
            {{- tool_call.name }}
            {{- '", "arguments": ' }}
            {{- tool_call.arguments | tojson }}
            {{- '}\n</tool_call>' }}
        {%- endfor %}
        {{- '<|im_end|>\n' }}
    {%- elif message.role == "tool" %}
        {%- if (loop.index0 == 0) or (messages[loop.index0 - 1].role != "tool") %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\n<tool_response>\n' }}
        {{- message.content }}
        {{- '\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}
            {{- '<|im_end|>\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\n' }}
{%- endif %}
"""

QWEN3_TEMPLATE = r"""{%- if tools %}
    {{- '<|im_start|>system\n' }}
    {%- if messages[0].role == 'system' %}
        {{- messages[0].content + '\n\n' }}
    {%- endif %}
    {{- "# Tools\n\nYou may call one or more functions to assist with the user query.\n\nYou are provided with function signatures within <tools></tools> XML tags:\n<tools>" }}
    {%- for tool in tools %}
        {{- "\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\n</tools>\n\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": <function-name>, \"arguments\": <args-json-object>}\n</tool_call><|im_end|>\n" }}
{%- else %}
    {%- if messages[0].role == 'system' %}
        {{- '<|im_start|>system\n' + messages[0].content + '<|im_end|>\n' }}
    {%- endif %}
{%- endif %}
{%- set ns = namespace(multi_step_tool=true, last_query_index=messages|length - 1) %}
{%- for message in messages[::-1] %}
    {%- set index = (messages|length - 1) - loop.index0 %}
    {%- if ns.multi_step_tool and message.role == "user" and message.content is string and not(message.content.startswith('<tool_response>') and message.content.endswith('</tool_response>')) %}
        {%- set ns.multi_step_tool = false %}
        {%- set ns.last_query_index = index %}
    {%- endif %}
{%- endfor %}
{%- for message in messages %}
    {%- if message.content is string %}
        {%- set content = message.content %}
    {%- else %}
        {%- set content = '' %}
    {%- endif %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) %}
        {{- '<|im_start|>' + message.role + '\n' + content + '<|im_end|>' + '\n' }}
    {%- elif message.role == "assistant" %}
        {%- set reasoning_content = '' %}
        {%- if message.reasoning_content is string %}
            {%- set reasoning_content = message.reasoning_content %}
        {%- else %}
            {%- if '</think>' in content %}
                {%- set reasoning_content = content.split('</think>')[0].rstrip('\n').split('<think>')[-1].lstrip('\n') %}
                {%- set content = content.split('</think>')[-1].lstrip('\n') %}
            {%- endif %}
        {%- endif %}
        {%- if loop.index0 > ns.last_query_index %}
            {%- if loop.last or (not loop.last and reasoning_content) %}
                {{- '<|im_start|>' + message.role + '\n<think>\n' + reasoning_content.strip('\n') + '\n</think>\n\n' + content.lstrip('\n') }}
            {%- else %}
                {{- '<|im_start|>' + message.role + '\n' + content }}
            {%- endif %}
        {%- else %}
            {{- '<|im_start|>' + message.role + '\n' + content }}
        {%- endif %}
        {%- if message.tool_calls %}
            {%- for tool_call in message.tool_calls %}
                {%- if (loop.first and content) or (not loop.first) %}
                    {{- '\n' }}
                {%- endif %}
                {%- if tool_call.function %}
                    {%- set tool_call = tool_call.function %}
                {%- endif %}
                {{- '<tool_call>\n{"name": "' }}
                {{- tool_call.name }}
                {{- '", "arguments": ' }}
                {%- if tool_call.arguments is string %}
                    {{- tool_call.arguments }}
                {%- else %}
                    {{- tool_call.arguments | tojson }}
                {%- endif %}
                {{- '}\n</tool_call>' }}
            {%- endfor %}
        {%- endif %}
        {{- '<|im_end|>\n' }}
    {%- elif message.role == "tool" %}
        {%- if loop.first or (messages[loop.index0 - 1].role != "tool") %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\n<tool_response>\n' }}
        {{- content }}
        {{- '\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}
            {{- '<|im_end|>\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\n' }}
    {%- if enable_thinking is defined and enable_thinking is false %}
        {{- '<think>\n\n</think>\n\n' }}
    {%- endif %}
{%- endif %}"""

# -----------------------------------------------------------------------------
# tiny folders: fixture weights (vocab 1000) + a tokenizer in each family's layout
#
# (added token, special?) in id order after the BPE ranks, as the real files have them (shortened)
QWEN2_ADDED = [("<|endoftext|>", True), ("<|im_start|>", True), ("<|im_end|>", True),
               ("<tool_call>", False), ("</tool_call>", False)]
QWEN3_ADDED = QWEN2_ADDED + [("<tool_response>", False), ("</tool_response>", False), ("<think>", False),
                             ("</think>", False)]
FAMILIES = {
    # n BPE ranks, added tokens, split regex, NFC, template, tokenizer_config extras, eos ids (generation_config)
    "llama": dict(n=744, added=[(t, True) for t in LLAMA3_SPECIALS], pat=LLAMA3_PAT, nfc=False,
                  template=LLAMA32_TEMPLATE, eos="<|eot_id|>", config=dict(bos_token="<|begin_of_text|>"),
                  stops=["<|end_of_text|>", "<|eom_id|>", "<|eot_id|>"]),
    "qwen2": dict(n=990, added=QWEN2_ADDED, pat=QWEN2_PAT, nfc=True, template=QWEN25_TEMPLATE, eos="<|im_end|>",
                  config=dict(bos_token=None, pad_token="<|endoftext|>", tokenizer_class="Qwen2Tokenizer"),
                  stops=["<|im_end|>", "<|endoftext|>"]),
    "qwen3": dict(n=986, added=QWEN3_ADDED, pat=QWEN2_PAT, nfc=True, template=QWEN3_TEMPLATE, eos="<|im_end|>",
                  config=dict(bos_token=None, pad_token="<|endoftext|>", tokenizer_class="Qwen2Tokenizer"),
                  stops=["<|im_end|>", "<|endoftext|>"]),
}


def gpt2_bpe(n):
    """The first n GPT-2 ranks as a Hugging Face vocabulary and merges. Every split of a token into two
    tokens is a merge, ordered by the token's rank: then Hugging Face's pair-order BPE gives tiktoken's
    rank-order encoding (tests/test_hf_families.py checks the construction on the full ranks)."""
    b2u = bytes_to_unicode()
    text = lambda b: "".join(b2u[x] for x in b)
    ranks = {t: r for t, r in load_ranks(GPT2_RANKS).items() if r < n}
    merges = sorted((r, ranks[t[:i]], ranks[t[i:]], text(t[:i]), text(t[i:])) for t, r in ranks.items()
                    for i in range(1, len(t)) if t[:i] in ranks and t[i:] in ranks)
    return {text(t): r for t, r in ranks.items()}, [(a, b) for *_, a, b in merges]


def write_tokenizer(path, family):
    """tokenizer.json built with `tokenizers`, tokenizer_config.json with the family's chat template
    and special tokens, generation_config.json with its end ids."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    f = FAMILIES[family]
    vocab, merges = gpt2_bpe(f["n"])
    tk = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False))
    if f["nfc"]:
        tk.normalizer = normalizers.NFC()
    tk.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(f["pat"]), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)])
    tk.decoder = decoders.ByteLevel()
    for t, special in f["added"]:   # one at a time: each takes the next id
        (tk.add_special_tokens if special else tk.add_tokens)([AddedToken(t, special=special, normalized=False)])
    ids = {t: tk.token_to_id(t) for t, _ in f["added"]}
    assert list(ids.values()) == list(range(f["n"], f["n"] + len(f["added"])))
    if family == "llama":   # Llama 3's post-processor adds BOS to plain encodes (never to chat templates)
        bos = "<|begin_of_text|>"
        tk.post_processor = processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A {bos} $B",
                                                          special_tokens=[(bos, ids[bos])])
    tk.save(os.path.join(path, "tokenizer.json"))
    decoder = {str(i): dict(content=t, lstrip=False, normalized=False, rstrip=False, single_word=False, special=s)
               for (t, s), i in zip(f["added"], ids.values())}
    tc = dict(added_tokens_decoder=decoder, chat_template=f["template"], eos_token=f["eos"], clean_up_tokenization_spaces=False,
              model_max_length=131072, **f["config"])
    tc.setdefault("tokenizer_class", "PreTrainedTokenizerFast")
    with open(os.path.join(path, "tokenizer_config.json"), "w") as fh:
        json.dump(tc, fh, indent=2)
    stops = [ids[t] for t in f["stops"]]
    with open(os.path.join(path, "generation_config.json"), "w") as fh:
        json.dump(dict(eos_token_id=stops, do_sample=True, temperature=0.6), fh)
    return ids, stops


def write_folder(path, family):
    """A Hugging Face checkpoint folder: the fixture's weights and config (eos ids set as the family's
    config.json has them) plus a real-format tokenizer."""
    os.makedirs(path, exist_ok=True)
    src = os.path.join(FIXTURES, f"hf_{family}_tiny")
    shutil.copy(os.path.join(src, "model.safetensors"), path)
    ids, stops = write_tokenizer(path, family)
    with open(os.path.join(src, "config.json")) as fh:
        cfg = json.load(fh)
    cfg["eos_token_id"] = stops if family == "llama" else stops[0]
    cfg["bos_token_id"] = ids.get("<|begin_of_text|>", ids.get("<|endoftext|>"))
    with open(os.path.join(path, "config.json"), "w") as fh:
        json.dump(cfg, fh, indent=2)
    return str(path)


@pytest.fixture(scope="module", params=list(FAMILIES))
def folder(request, tmp_path_factory):
    return request.param, write_folder(str(tmp_path_factory.mktemp(request.param)), request.param)


def hf_tokenizer(path):
    return transformers.AutoTokenizer.from_pretrained(path)


def hf_chat(hft, messages, **kw):
    return list(hft.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False, **kw))


GSM8K = get_task("gsm8k")
QUESTION = GSM8K.problems("test", n=1, seed=3)[0]
TEXTS = ["Natalia sold clips to 48 of her friends in April.\n#### 72",
         "  Leading spaces, tabs\tand trailing   \n\n",
         "Unicode: héllo wörld, café, 日本語, e\u0301, emoji 🤖"]

# -----------------------------------------------------------------------------
# chat prompts: token for token with transformers


def test_tokenizer_reads_the_folder(folder):
    """Plain encoding equals transformers' (no special tokens), the eot is the family's end of turn,
    the stop ids are every end id declared, and BK sits where read_hf_tokenizer puts it."""
    family, path = folder
    tok, hft = get_tokenizer(path), hf_tokenizer(path)
    for t in TEXTS:
        assert tok.encode(t) == hft.encode(t, add_special_tokens=False)
    f = FAMILIES[family]
    assert tok.special[tok.eot_id] == f["eos"] and tok.chat and tok.chat_template == f["template"]
    assert sorted(tok.stop_ids) == sorted(hft.convert_tokens_to_ids(f["stops"])) and tok.stop_ids[0] == tok.eot_id
    assert tok.bk_id == (999 if family == "llama" else f["n"] + len(f["added"]))


@pytest.mark.parametrize("system", [None, "You are a careful math tutor. "])
def test_chat_ids_equal_apply_chat_template(folder, system):
    """One user turn (the GSM8K zero-shot CoT message), with or without a system turn, and a few-shot
    conversation (user/assistant example turns, then the question), for each family's own template."""
    family, path = folder
    tok, hft = get_tokenizer(path), hf_tokenizer(path)
    user = GSM8K.user_message(QUESTION)
    msgs = ([dict(role="system", content=system)] if system is not None else []) + [dict(role="user", content=user)]
    ours = tok.chat_ids(user, system=system)
    assert ours == hf_chat(hft, msgs)
    assert tok.chat_ids(msgs) == ours
    if family == "llama":
        assert ours[0] == tok.bos_id and ours.count(tok.bos_id) == 1
    shots = get_task("gsm8k", shots=2)
    conv = ([dict(role="system", content=system)] if system is not None else []) + shots.messages(QUESTION)
    assert [m["role"] for m in conv[-5:]] == ["user", "assistant", "user", "assistant", "user"]
    assert tok.chat_ids(conv) == hf_chat(hft, conv)


def test_typed_markers_stay_text(folder):
    """Special-token text typed in a message is ordinary text, as transformers' sanitize_control_tokens
    gives it; the template's own markers are still special tokens."""
    family, path = folder
    tok, hft = get_tokenizer(path), hf_tokenizer(path)
    typed = "What is 2+2? <|im_end|><|eot_id|> and <|start_header_id|>system" + BK_TEXT
    ours = tok.chat_ids(typed)
    assert ours == hf_chat(hft, [dict(role="user", content=typed)], sanitize_control_tokens=True)
    assert tok.bk_id not in ours
    n_end = ours.count(tok.eot_id)
    assert n_end == tok.chat_ids("What is 2+2?").count(tok.eot_id)   # only the template's


def test_prompt_ids_follow_the_chat_flag(folder):
    """tasks.prompt_ids: the chat rendering of task.messages(p) when the tokenizer's chat is on, the plain
    task prompt when it is off (get_tokenizer(chat=False), --chat=False)."""
    family, path = folder
    tok, plain = get_tokenizer(path), get_tokenizer(path, chat=False)
    assert prompt_ids(tok, GSM8K, QUESTION) == hf_chat(hf_tokenizer(path), GSM8K.messages(QUESTION))
    assert not plain.chat and prompt_ids(plain, GSM8K, QUESTION) == plain.encode(GSM8K.prompt(QUESTION))
    assert not get_tokenizer("byte").chat and get_tokenizer("byte").stop_ids == [256]

# -----------------------------------------------------------------------------
# stop ids, self-contained checkpoints, export


class force_token:
    """Within the block, `token` is the argmax of every step: a bias on lm_head (nn.Linear semantics,
    which every decoding path keeps, hooks or not)."""

    def __init__(self, model, token):
        self.lm_head, self.token = model.lm_head, token

    def __enter__(self):
        bias = torch.zeros(self.lm_head.out_features)
        bias[self.token] = 1e4
        self.lm_head.bias = torch.nn.Parameter(bias)

    def __exit__(self, *exc):
        self.lm_head.bias = None


def test_generation_stops_at_each_declared_stop_id(folder):
    family, path = folder
    model, tok = load_model(path)
    prompt = tok.chat_ids("2+2?")
    assert len(tok.stop_ids) == len(FAMILIES[family]["stops"])
    for s in tok.stop_ids:
        with force_token(model, s):
            out = generate(model, [prompt], max_new_tokens=6, temperature=0, stop_ids=tok.stop_ids)[0]
            assert out["response"] == [s]
            if s != tok.eot_id:   # the default (end-of-text only) would not have stopped
                assert len(generate(model, [prompt], max_new_tokens=6, temperature=0)[0]["response"]) == 6
            m, recs = evaluate(model, tok, GSM8K, [QUESTION], max_new_tokens=6)
            assert recs[0]["response"] == [s] and recs[0]["finished"] and m["finished"] == 1.0


@dataclass
class Run:
    out_dir: str
    init_from: str
    tokenizer: str
    bk_init: str = "description"
    seed: int = 0
    dropout: float = 0.0
    chat: bool = True


def test_moved_checkpoint_loads_and_generates(folder, tmp_path):
    """A run from a Hugging Face folder saves the tokenizer files (chat template and end ids included)
    with its checkpoint and records the tokenizer as the checkpoint itself: moved elsewhere, with the
    original folder gone, it loads with the same tokenizer, logits and generations."""
    family, path = folder
    src = str(tmp_path / "hf")
    shutil.copytree(path, src)
    run = Run(out_dir=str(tmp_path / "ckpt"), init_from=src, tokenizer=src)
    tok = get_tokenizer(src)
    model, _ = build_model(run, tok, "cpu")
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    save_checkpoint(model, opt, 0, run)
    saved = json.load(open(os.path.join(run.out_dir, "config.json")))
    assert saved["config"]["tokenizer"] == "."
    for f in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        assert os.path.isfile(os.path.join(run.out_dir, f))
    assert model.config.tokenizer == src   # the in-memory model still names its source

    moved = str(tmp_path / "elsewhere" / "ckpt")
    shutil.move(run.out_dir, moved)
    shutil.rmtree(src)
    m2, tok2 = load_model(moved)
    assert m2.config.tokenizer == os.path.abspath(moved)
    assert (tok2.eot_id, tok2.bk_id, tok2.n_vocab, tok2.stop_ids) == (tok.eot_id, tok.bk_id, tok.n_vocab, tok.stop_ids)
    assert tok2.chat and tok2.chat_ids(GSM8K.user_message(QUESTION)) == tok.chat_ids(GSM8K.user_message(QUESTION))
    prompt = tok2.chat_ids("2+2?")
    model.eval()
    with torch.no_grad():
        x = torch.tensor([prompt + [tok.bk_id]])
        assert torch.equal(model(x), m2(x))
    a = generate(model, [prompt], max_new_tokens=8, temperature=0, stop_ids=tok.stop_ids)
    b = generate(m2, [prompt], max_new_tokens=8, temperature=0, stop_ids=tok2.stop_ids)
    assert a[0]["response"] == b[0]["response"] and len(b[0]["response"]) > 0
    # a later stage starting from the moved checkpoint finds the tokenizer too, and saves it again
    again = Run(out_dir=str(tmp_path / "stage2"), init_from=moved, tokenizer=moved)
    m3, _ = build_model(again, tok2, "cpu")
    assert m3.config.tokenizer == os.path.abspath(moved)
    save_checkpoint(m3, torch.optim.AdamW(m3.parameters()), 1, again)
    assert load_model(again.out_dir)[1].stop_ids == tok.stop_ids


def test_export_loads_in_transformers(folder, tmp_path):
    """export_hf writes the tokenizer with <|BACKTRACK|> at the model's BK id (Llama 3: in place of its
    last reserved token); transformers opens the folder as the same model: logits within 1e-5, the
    same BK id both ways, the same chat prompt, the same end ids."""
    family, path = folder
    run = Run(out_dir=str(tmp_path / "ckpt"), init_from=path, tokenizer=path)
    model, _ = build_model(run, get_tokenizer(path), "cpu")
    save_checkpoint(model, torch.optim.AdamW(model.parameters()), 0, run)
    ours, tok = load_model(run.out_dir)
    out = str(tmp_path / "export")
    ours.export_hf(out)
    hft = hf_tokenizer(out)
    assert hft.convert_tokens_to_ids(BK_TEXT) == tok.bk_id == ours.config.bk_id
    assert hft.convert_ids_to_tokens(tok.bk_id) == BK_TEXT and hft.decode([tok.bk_id]) == BK_TEXT
    assert hft.encode("a " + BK_TEXT, add_special_tokens=False)[-1] == tok.bk_id
    assert hf_chat(hft, GSM8K.messages(QUESTION)) == prompt_ids(tok, GSM8K, QUESTION)
    gen = json.load(open(os.path.join(out, "generation_config.json")))
    assert sorted(gen["eos_token_id"]) == sorted(tok.stop_ids)
    if family == "llama":   # BK took the last reserved token's place; the other reserved ones stay
        assert "<|reserved_special_token_247|>" not in hft.get_vocab()
        assert hft.convert_tokens_to_ids("<|reserved_special_token_246|>") == tok.bk_id - 1
    theirs = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    ids = torch.tensor([tok.chat_ids("2+2?") + [5, tok.bk_id, 17, tok.bk_id, tok.eot_id]])
    with torch.no_grad():
        a, b = ours(ids), theirs(ids).logits
    assert a.shape == b.shape and (a - b).abs().max().item() < 1e-5
    assert a[0, :, tok.bk_id].abs().sum() > 0   # the BK row is a real, initialised row


@pytest.mark.parametrize("files", ["tokenizer.json", "vocab.json+merges.txt"])
def test_gpt2_folder_export(tmp_path, files):
    """A GPT-2 folder, fast (tokenizer.json) or slow (vocab.json + merges.txt, <|endoftext|> inside
    vocab.json): BK goes one past the table (padded), and the export names it in the tokenizer files."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
    src = tmp_path / "gpt2"
    src.mkdir()
    for f in ("config.json", "model.safetensors"):
        shutil.copy(os.path.join(FIXTURES, "hf_gpt2_tiny", f), src)
    vocab, merges = gpt2_bpe(999)
    if files == "tokenizer.json":
        tk = Tokenizer(models.BPE(vocab=vocab, merges=merges))
        tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tk.decoder = decoders.ByteLevel()
        tk.add_special_tokens([AddedToken("<|endoftext|>", special=True, normalized=False)])
        tk.save(str(src / "tokenizer.json"))
    else:
        (src / "vocab.json").write_text(json.dumps({**vocab, "<|endoftext|>": 999}, ensure_ascii=False))
        (src / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
    eot = dict(content="<|endoftext|>", lstrip=False, rstrip=False, normalized=True, single_word=False, special=True)
    (src / "tokenizer_config.json").write_text(json.dumps(dict(
        tokenizer_class="GPT2Tokenizer", bos_token="<|endoftext|>", eos_token="<|endoftext|>",
        added_tokens_decoder={"999": eot})))
    ours, tok = load_model(str(src))
    assert (tok.eot_id, tok.bk_id, ours.config.vocab_size) == (999, 1000, 1024) and not tok.chat
    ours.export_hf(str(tmp_path / "out"))
    hft = hf_tokenizer(str(tmp_path / "out"))
    text = "Hello world, 12345 things"
    assert hft.encode(text + BK_TEXT, add_special_tokens=False) == tok.encode(text) + [tok.bk_id]
    theirs = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "out"), dtype=torch.float32).eval()
    ids = torch.tensor([tok.encode(text) + [tok.bk_id, tok.eot_id]])
    with torch.no_grad():
        assert (ours(ids) - theirs(ids).logits).abs().max().item() < 1e-5


def test_byte_model_export_opens_in_transformers(tmp_path):
    """The byte tokenizer is written out too: transformers encodes like ours, BK and end-of-text keep
    their ids, and the GPT-2-layout logits agree."""
    tok = get_tokenizer("byte")
    cfg = GPTConfig(block_size=64, vocab_size=320, n_layer=2, n_head=2, n_embd=32, tokenizer="byte",
                    n_vocab=tok.n_vocab, eot_id=tok.eot_id, bk_id=tok.bk_id)
    torch.manual_seed(0)
    model = GPT(cfg).eval()
    model.export_hf(str(tmp_path))
    hft = hf_tokenizer(str(tmp_path))
    for t in ["7+5-3\n#### 9", "héllo 🤖"]:
        assert hft.encode(t, add_special_tokens=False) == tok.encode(t)
    assert hft.convert_tokens_to_ids([BK_TEXT, "<|endoftext|>"]) == [tok.bk_id, tok.eot_id]
    theirs = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path), dtype=torch.float32).eval()
    ids = torch.tensor([tok.encode("7+5-3\n") + [tok.bk_id, 50, tok.eot_id]])
    with torch.no_grad():
        assert (model(ids) - theirs(ids).logits).abs().max().item() < 1e-5

# -----------------------------------------------------------------------------
# the GSM8K protocol


def test_gsm8k_strict_and_lenient_scores():
    p = dict(QUESTION, answer="18")
    cases = {  # text: (acc = verify, strict, lenient)
        "She has 9 * 2 = 18 dollars.\n#### 18": (True, True, True),
        "9 * 2 = 18.\nThe answer is $18.": (False, True, True),
        "#### 18\nI hope that helps, 3 times over.": (False, True, False),
        "So she makes 18 dollars.": (False, False, True),
        "#### 17\nActually it is 18": (False, False, True),
        "no number here": (False, False, False),
    }
    for text, (acc, strict, lenient) in cases.items():
        assert (GSM8K.verify(text, p), GSM8K.scores(text, p)) == (acc, dict(strict=strict, lenient=lenient)), text
    shots = get_task("gsm8k", shots=3)
    ex = shots.examples(QUESTION)
    assert len(ex) == 3 and all(not shots.is_test(e) for e in ex)
    assert shots.prompt(QUESTION).endswith(GSM8K.prompt(QUESTION)) and shots.prompt(QUESTION).count("Question:") == 4
    assert GSM8K.messages(QUESTION) == [dict(role="user", content=GSM8K.user_message(QUESTION))]
    assert "####" in GSM8K.user_message(QUESTION) and QUESTION["question"] in GSM8K.user_message(QUESTION)


def test_evaluate_reports_strict_and_lenient(folder):
    family, path = folder
    model, tok = load_model(path)
    m, recs = evaluate(model, tok, GSM8K, GSM8K.problems("test", n=2), max_new_tokens=4)
    assert {"acc", "strict_acc", "lenient_acc"} <= set(m) and all("scores" in r for r in recs)
    assert "strict_acc" not in evaluate(model, tok, get_task("arith"), get_task("arith").problems("test", n=1),
                                        max_new_tokens=2)[0]


# -----------------------------------------------------------------------------
# the recipe (recipes/, README "Instruct models on GSM8K") end to end, a few steps per stage


def test_gsm8k_recipe_runs_end_to_end(folder, tmp_path):
    """Own errors, SFT with them and LCS slips, errors located by rollouts, a second SFT round with a
    verifier head, GRPO with that head as process reward, evaluation: the recipe's own config files,
    with flags that make it tiny and CPU-sized, on a random checkpoint with its family's real
    tokenizer files."""
    import evaluate
    import self_errors
    import train_grpo
    import train_sft
    family, src = folder
    out = lambda name: str(tmp_path / name)
    path = out("model")   # the fixture with room for GSM8K's chat prompts (rotary positions: any length works)
    shutil.copytree(src, path)
    with open(os.path.join(path, "config.json")) as f:
        c = json.load(f)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(dict(c, max_position_embeddings=2048), f)
    small = ["--device=cpu", "--max_new_tokens=8", "--eval_n=2", "--progress=False"]
    stats = self_errors.main([f"--ckpt={path}", "--task=gsm8k", "--n=4", "--samples=2", "--max_backtracks=0", "--filter=False",
                              "--max_new_tokens=8", f"--out={out('self_traces.jsonl')}"])
    assert stats["traces"] > 0, stats
    train_sft.main(["recipes/gsm8k_sft.py", f"--init_from={path}", f"--tokenizer={path}", f"--out_dir={out('sft')}",
                    f"--traces_file={out('self_traces.jsonl')}", "--dtype=float32", "--max_iters=2", "--batch_size=2",
                    "--grad_accum=1", "--n_train=20", "--warmup_iters=1", "--eval_interval=2", "--save_interval=2",
                    *small])
    sft = GPT.from_pretrained(out("sft"))
    assert sft.meta["train_config"]["chat"] and sft.meta["train_config"]["task"] == "gsm8k"
    # stage 3: first errors located by rollouts. A random model never finishes in 8 tokens, so every
    # sample is cut off and nothing is searched; round 2 then trains on stage 1's traces alone
    # (tests/test_prm.py locates real first errors, on scripted continuations and a trained model)
    located = self_errors.main([f"--ckpt={out('sft')}", "--locate=rollouts", "--rollouts=2", "--n=3", "--samples=1",
                                "--max_new_tokens=8", f"--out={out('located_traces.jsonl')}"])
    assert located["samples"] == 3 and "searched" in located and os.path.exists(out("located_labels.jsonl"))
    with open(out("round2_traces.jsonl"), "w") as f:
        for name in ("self_traces.jsonl", "located_traces.jsonl"):
            f.write(open(out(name)).read())
    train_sft.main(["recipes/gsm8k_located.py", f"--init_from={out('sft')}", f"--tokenizer={out('sft')}", f"--out_dir={out('sft2')}",
                    f"--traces_file={out('round2_traces.jsonl')}", "--dtype=float32", "--max_iters=2", "--batch_size=2",
                    "--grad_accum=1", "--n_train=20", "--warmup_iters=1", "--eval_interval=2", "--save_interval=2",
                    *small])
    assert GPT.from_pretrained(out("sft2")).verifier is not None
    train_grpo.main(["recipes/gsm8k_grpo.py", f"--init_from={out('sft2')}", f"--prm={out('sft2')}", f"--out_dir={out('grpo')}",
                     "--max_iters=1", "--prompts_per_step=2", "--group_size=2", "--micro_batch=4", "--n_train=20",
                     "--eval_interval=1", *small])
    evaluate.main([f"--ckpt={out('grpo')}", "--n=2", "--max_new_tokens=8"])
    with open(os.path.join(out("grpo"), "eval.json")) as f:
        res = json.load(f)
    assert {"acc", "strict_acc", "lenient_acc"} <= set(res["greedy"])
