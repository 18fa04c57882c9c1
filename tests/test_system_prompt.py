"""System prompt and message stripping as DeepSeek's processor and template
(``janus/models/processing_vlm.py`` ``VLChatProcessor.system_prompt``,
``janus/utils/conversation.py`` ``SeparatorStyle.DeepSeek``): the official system prompt heads
understanding and chat conversations by default (training, evaluation, the exported chat template
janus-sample renders), text-to-image prompts have none, ``data.system_prompt=null`` disables it,
messages are stripped."""

from __future__ import annotations

import random

import numpy as np
import pytest

from janus_train import sample as S
from janus_train.config import compose, to_run_config
from janus_train.data.builders import (
    BuildContext,
    build_caption_qa,
    build_conversation,
    build_generation,
)
from janus_train.model.chat_template import PromptFormat
from janus_train.model.tokenizer import resolve_special_tokens, train_tiny_tokenizer

# written out here, independently of the code's constant
OFFICIAL = (
    "You are a helpful language and vision assistant. You are able to understand the visual "
    "content that the user provides, and assist the user with a variety of tasks using natural "
    "language."
)
N = 4
X = -100


@pytest.fixture(scope="module")
def proc(tmp_path_factory):
    return train_tiny_tokenizer(tmp_path_factory.mktemp("tok"), image_size=32, num_image_tokens=N)


def ctx_of(proc, **kw) -> BuildContext:
    tok = proc.tokenizer
    return BuildContext(
        tokenizer=tok,
        st=resolve_special_tokens(tok),
        image_size=32,
        num_image_tokens=N,
        codebook_size=64,
        cfg_dropout=0.0,
        first_sentence_prob=0.0,
        seq_len=512,
        und_format="chat",
        gen_format="chat",
        **kw,
    )


def enc(proc, s):
    return proc.tokenizer.encode(s, add_special_tokens=False)


def img():
    return np.zeros((32, 32, 3), np.uint8)


def test_default_system_prompt_heads_understanding_masked(proc):
    ctx = ctx_of(proc)  # BuildContext's default
    st = ctx.st
    s = build_caption_qa("a red circle", img(), ctx)
    sys_ = enc(proc, OFFICIAL + "\n\n")
    assert s.input_ids[: 1 + len(sys_)] == [st.bos] + sys_
    assert s.labels[: 1 + len(sys_)] == [X] * (1 + len(sys_))
    c = build_conversation([("user", "hi"), ("assistant", "hello")], [], ctx, "text")
    assert c.input_ids == [st.bos] + enc(
        proc, OFFICIAL + "\n\n<|User|>: hi\n\n<|Assistant|>:"
    ) + enc(proc, " hello") + [st.eos]


def _img(n=32):
    from PIL import Image

    return Image.new("RGB", (n, n))


def test_generation_prompt_has_no_system_prompt(proc):
    ctx = ctx_of(proc)
    st = ctx.st
    g = build_generation("a red circle", ctx, random.Random(0), codes=[0] * N)
    want = [st.bos] + enc(proc, "<|User|>: a red circle\n\n<|Assistant|>:") + [st.boi]
    assert g.input_ids[: g.input_ids.index(st.boi) + 1] == want
    # the sampler's default format (with the system prompt) renders the same generation prompt
    got = S.generation_inputs(proc, ["a red circle"], PromptFormat())["input_ids"][0].tolist()
    assert got == want


def test_sampler_default_format_has_the_official_prompt(proc):
    ctx = ctx_of(proc)
    st = ctx.st
    c = build_conversation(
        [("user", "<image>\nwhat color?"), ("assistant", "red")], [img()], ctx, "und"
    )
    ids = S.understanding_inputs(proc, [_img()], ["what color?"], PromptFormat())
    ids = ids["input_ids"][0].tolist()
    sys_ = enc(proc, OFFICIAL + "\n\n")
    assert ids[: 1 + len(sys_)] == [st.bos] + sys_
    assert c.input_ids[: len(ids)] == ids


def test_messages_and_system_prompt_are_stripped(proc):
    ctx = ctx_of(proc, system_prompt="  be brief \n")
    clean = build_conversation(
        [("user", "<image>\nwhat color?"), ("assistant", "red")],
        [img()],
        ctx_of(proc, system_prompt="be brief"),
        "und",
    )
    messy = build_conversation(
        [("user", " \n<image>\nwhat color?  \n"), ("assistant", "  red\n")], [img()], ctx, "und"
    )
    assert messy.input_ids == clean.input_ids and messy.labels == clean.labels
    g1 = build_generation("a red circle", ctx, random.Random(0), codes=[0] * N)
    g2 = build_generation("  a red circle \n", ctx, random.Random(0), codes=[0] * N)
    assert g1.input_ids == g2.input_ids
    # the exported template strips the same way
    fmt = PromptFormat("chat", "janus_pro", " be brief ")
    ids = S.understanding_inputs(proc, [_img()], ["what color?  \n"], fmt)["input_ids"][0]
    assert clean.input_ids[: len(ids)] == ids.tolist()


def test_own_system_turn_wins_and_config_disables(proc):
    ctx = ctx_of(proc)
    st = ctx.st
    own = build_conversation(
        [("system", "be brief"), ("user", "hi"), ("assistant", "yo")], [], ctx, "text"
    )
    sys_ = enc(proc, "be brief\n\n")
    assert own.input_ids[: 1 + len(sys_)] == [st.bos] + sys_
    for off in ("data.system_prompt=null", "data.system_prompt=''"):
        run = to_run_config(compose(["experiment=janus_pro_1b", off]))
        c = build_conversation(
            [("user", "hi"), ("assistant", "yo")],
            [],
            ctx_of(proc, system_prompt=run.data.system_prompt),
            "text",
        )
        want = [st.bos] + enc(proc, "<|User|>: hi\n\n<|Assistant|>:") + enc(proc, " yo")
        assert c.input_ids == want + [st.eos]


def test_real_experiments_default_to_the_official_prompt_everywhere():
    from janus_train.config import resolve_stage

    for exp in ("janus_1.3b", "janus_pro_1b", "janus_pro_7b"):
        run = to_run_config(compose([f"experiment={exp}", "stage=stage3"]))
        assert run.data.system_prompt == OFFICIAL  # training builders (loader.build_context)
        # evaluation (run_eval's framing) and the export template
        assert resolve_stage(run).prompt.system_prompt == OFFICIAL
    assert PromptFormat().system_prompt == OFFICIAL  # janus-sample --chat-template ...
