"""Incremental detokenization with the real Qwen3 tokenizer: streamed text equals a full decode
(multi-byte characters split across byte-level tokens included), and stop strings cut the text
without ever streaming part of a stop string."""

from __future__ import annotations

import random

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from nanovllmx.engine.detokenizer import IncrementalDetokenizer

TEXTS = [
    "Hello, world! The quick brown fox jumps over the lazy dog.",
    "Hello 🦙 world 🤖🎉 and a family 👩‍👩‍👧 emoji 𓀀🜁",
    "日本語のテキスト、龘靐齉。中文字符测试：你好，世界！한국어 텍스트",
    "naïve café — “quotes” «guillemets» ∑∫√ 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 ẞ",
    "code:\n\tdef f(x):\n\t\treturn x ** 2  # 平方\n",
]


def run(tok, ids, stop=None, chunk=1, flush=True):
    """Feed ids `chunk` at a time (an int, or a list of chunk sizes); returns (deltas, detok)."""
    d = IncrementalDetokenizer(tok, stop)
    deltas = []
    sizes = chunk if isinstance(chunk, list) else None
    i = k = 0
    while i < len(ids) and not d.stopped:
        n = sizes[k % len(sizes)] if sizes else chunk
        deltas.append(d.add(ids[i : i + n]))
        i, k = i + n, k + 1
    if flush:
        deltas.append(d.flush())
    return deltas, d


def test_texts_really_split_characters_across_tokens(tokenizer):
    """Guard for the tests below: some tokens of these texts are partial UTF-8 sequences."""
    n_partial = sum("\ufffd" in tokenizer.decode([i]) for t in TEXTS for i in tokenizer.encode(t))
    assert n_partial >= 10


@pytest.mark.parametrize("chunk", [1, 2, 3, [1, 4, 2, 7]])
@pytest.mark.parametrize("text", TEXTS)
def test_incremental_equals_full_decode(tokenizer, text, chunk):
    ids = tokenizer.encode(text)
    deltas, d = run(tokenizer, ids, chunk=chunk)
    assert "".join(deltas) == tokenizer.decode(ids) == text == d.text
    assert not any("\ufffd" in x for x in deltas), "a partial character was streamed"


def test_partial_character_is_held_back(tokenizer):
    ids = tokenizer.encode("a𓀀")  # 'a' + three byte-level tokens for one 4-byte character
    assert len(ids) == 4 and all("\ufffd" in tokenizer.decode(ids[1:k]) for k in (2, 3))
    d = IncrementalDetokenizer(tokenizer)
    out = [d.add([i]) for i in ids]
    assert out[0] == "a"
    assert out[1:-1] == [""] * (len(ids) - 2)
    assert out[-1] == "𓀀" and d.flush() == ""


def test_special_tokens_skipped(tokenizer):
    ids = tokenizer.encode("<|im_start|>assistant\nHi 🦙<|im_end|>")
    deltas, d = run(tokenizer, ids)
    assert "".join(deltas) == "assistant\nHi 🦙" == tokenizer.decode(ids, skip_special_tokens=True)


def test_random_ids_including_raw_bytes(tokenizer):
    """Arbitrary model output (invalid UTF-8 included) streams to exactly the full decode."""
    rng = random.Random(0)
    for _ in range(60):
        ids = [rng.randrange(256) if rng.random() < 0.6 else rng.randrange(151669) for _ in range(24)]
        deltas, _ = run(tokenizer, ids, chunk=rng.choice([1, 2, 5]))
        assert "".join(deltas) == tokenizer.decode(ids, skip_special_tokens=True), ids


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    text=st.text(st.characters(codec="utf-8"), min_size=1, max_size=40),
    chunks=st.lists(st.integers(1, 4), min_size=1, max_size=4),
)
def test_incremental_property(tokenizer, text, chunks):
    ids = tokenizer.encode(text)
    deltas, _ = run(tokenizer, ids, chunk=chunks)
    assert "".join(deltas) == tokenizer.decode(ids, skip_special_tokens=True)


# ------------------------------------------------------------------ stop strings
@pytest.mark.parametrize(
    "text,stop,want",
    [
        ("Hello world, stop here please", ["stop"], "Hello world, "),
        ("Hello world, stop here please", ["lo wor"], "Hel"),  # spans tokens
        ("Hello world, stop here please", ["please", "world"], "Hello "),  # earliest occurrence wins
        ("Hello world, stop here please", ["Hello"], ""),
        ("Hello world, stop here please", ["e"], "H"),
        ("日本語のテキスト、龘靐齉。", ["テキ"], "日本語の"),
        ("emoji 🦙🤖 end", ["🤖"], "emoji 🦙"),
        ("abc\n\nUser: hi", ["\n\nUser:"], "abc"),
    ],
)
@pytest.mark.parametrize("chunk", [1, 3])
def test_stop_strings_cut_and_never_stream_partially(tokenizer, text, stop, want, chunk):
    ids = tokenizer.encode(text)
    deltas, d = run(tokenizer, ids, stop=stop, chunk=chunk)
    assert d.stopped
    assert d.text == want
    # what was streamed is exactly the text before the stop string: nothing streamed had to be taken back
    assert "".join(deltas) == want


def test_stop_string_absent_releases_everything_on_flush(tokenizer):
    text = "Hello world, this never contains the marker"
    ids = tokenizer.encode(text)
    deltas, d = run(tokenizer, ids, stop=["###END"], flush=False)
    streamed = "".join(deltas)
    assert not d.stopped
    # only the last len(stop) - 1 characters are held back while the request runs
    assert streamed == text[: len(streamed)] and len(streamed) >= len(text) - 5
    assert streamed + d.flush() == text


def test_stop_held_prefix_released_when_it_turns_out_not_to_be_a_stop(tokenizer):
    d = IncrementalDetokenizer(tokenizer, ["STOP!"])
    got = d.add(tokenizer.encode("text ST"))
    assert "ST" not in got  # could still become "STOP!"
    got += d.add(tokenizer.encode("OP? more words"))
    got += d.flush()
    assert got == "text STOP? more words" and not d.stopped


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=st.text(st.characters(codec="utf-8", exclude_categories=["Cs"]), min_size=2, max_size=40), data=st.data())
def test_stop_property(tokenizer, text, data):
    ids = tokenizer.encode(text)
    full = tokenizer.decode(ids, skip_special_tokens=True)
    assume(len(full) >= 2)
    i = data.draw(st.integers(0, len(full) - 1))
    j = data.draw(st.integers(i + 1, min(len(full), i + 6)))
    stop = full[i:j]
    chunks = data.draw(st.lists(st.integers(1, 3), min_size=1, max_size=3))
    deltas, d = run(tokenizer, ids, stop=[stop], chunk=chunks)
    want = full[: full.find(stop)]
    assert d.stopped and d.text == want
    assert "".join(deltas) == want


# ------------------------------------------------------------------ fast path (tokenizers' DecodeStream)
class DecodeOnly:
    """A tokenizer with no Rust backend (like a slow tokenizer): forces the decode-based method."""

    def __init__(self, tok):
        self.tok = tok

    def decode(self, ids, skip_special_tokens=False):
        return self.tok.decode(ids, skip_special_tokens=skip_special_tokens)


class FailingStream:
    """Stands in for a DecodeStream that raises (e.g. its InvalidPrefix check) from its `after`-th step on."""

    def __init__(self, stream, after=0):
        self.stream, self.after = stream, after

    def step(self, tok, ids):
        if self.after == 0:
            raise Exception("Invalid prefix encountered")
        self.after -= 1
        return self.stream.step(tok, ids)


def feed(detok, ids, chunks=(1,), flush=True):
    out, i, k = [], 0, 0
    while i < len(ids) and not detok.stopped:
        n = chunks[k % len(chunks)]
        out.append(detok.add(ids[i : i + n]))
        i, k = i + n, k + 1
    if flush:
        out.append(detok.flush())
    return out


def test_fast_tokenizer_uses_decode_stream(tokenizer, tiny_model_dir):
    from transformers import AutoTokenizer

    assert IncrementalDetokenizer(tokenizer)._stream is not None
    assert IncrementalDetokenizer(tokenizer.backend_tokenizer)._stream is not None  # a bare tokenizers.Tokenizer
    assert IncrementalDetokenizer(DecodeOnly(tokenizer))._stream is None
    # transformers' decode post-processes the text here, DecodeStream would not: the decode method decides
    cleanup = AutoTokenizer.from_pretrained(tiny_model_dir, clean_up_tokenization_spaces=True)
    assert IncrementalDetokenizer(cleanup)._stream is None
    ids = tokenizer.encode(TEXTS[1])
    assert "".join(feed(IncrementalDetokenizer(tokenizer.backend_tokenizer), ids)) == TEXTS[1]


def test_fast_path_streams_exactly_like_the_decode_method(tokenizer):
    """Same deltas, text and stop as the decode-based method (and the full decode without stop strings) for
    arbitrary ids: raw bytes, multi-byte characters, special and added tokens (<think>, <tool_call>), ids of
    the padded embedding that are no token at all, with and without skipping special tokens."""
    rng = random.Random(1)
    pools = [
        range(256),
        range(151643, 151669),
        tokenizer.encode("日本語🦙𓀀 é 𝔘 👩‍👩‍👧 � <think>"),
        range(151669),
        range(151669, 151936),
    ]
    for _ in range(300):
        weights = [rng.random() for _ in pools]
        ids = [rng.choice(rng.choices(pools, weights)[0]) for _ in range(rng.randrange(1, 32))]
        skip = rng.random() < 0.7
        stop = rng.choice([None, None, ["\ufffd"], ["a", "\n"], ["🦙"], ["<think>"]])
        chunks = rng.choice([(1,), (2,), (1, 3), (4, 1, 2)])
        fast = IncrementalDetokenizer(tokenizer, stop, skip_special_tokens=skip)
        slow = IncrementalDetokenizer(DecodeOnly(tokenizer), stop, skip_special_tokens=skip)
        got, want = feed(fast, ids, chunks), feed(slow, ids, chunks)
        assert (got, fast.text, fast.stopped) == (want, slow.text, slow.stopped), (ids, skip, stop, chunks)
        if stop is None:
            assert "".join(got) == tokenizer.decode(ids, skip_special_tokens=skip), ids


@pytest.mark.parametrize("skip", [True, False])
def test_added_tokens_kept_special_tokens_skipped(tokenizer, skip):
    ids = tokenizer.encode("<think>\nhmm 🤔</think>\n\n<tool_call>{}</tool_call>Hi<|im_end|>")
    want = tokenizer.decode(ids, skip_special_tokens=skip)
    assert want.startswith("<think>\nhmm 🤔</think>") and want.endswith("<|im_end|>") != skip
    for chunks in [(1,), (3,)]:
        assert "".join(feed(IncrementalDetokenizer(tokenizer, skip_special_tokens=skip), ids, chunks)) == want


@pytest.mark.parametrize("text,cut", [("a𓀀", 1), ("ok �", 0)])
def test_flush_releases_a_trailing_partial_or_replacement_character(tokenizer, text, cut):
    """DecodeStream never emits text ending in U+FFFD (a partial character, or the "�" token itself): flush
    releases it as the full decode does."""
    ids = tokenizer.encode(text)
    ids = ids[: len(ids) - cut]
    want = tokenizer.decode(ids)
    assert want.endswith("\ufffd")
    d = IncrementalDetokenizer(tokenizer)
    streamed = "".join(d.add([i]) for i in ids)
    assert not streamed.endswith("\ufffd")
    assert streamed + d.flush() == want == d.text


@pytest.mark.parametrize("after", [0, 1, 5, 9])
@pytest.mark.parametrize("chunks", [(1,), (3,)])
def test_decode_stream_error_falls_back_to_the_decode_method(tokenizer, after, chunks):
    for text in TEXTS:
        ids = tokenizer.encode(text)
        d = IncrementalDetokenizer(tokenizer)
        d._stream = FailingStream(d._stream, after)
        out = feed(d, ids, chunks)
        assert out == feed(IncrementalDetokenizer(DecodeOnly(tokenizer)), ids, chunks)  # same deltas, no delay
        assert "".join(out) == text == d.text and d._stream is None


@pytest.mark.parametrize("after", [None, 2, 5])
def test_one_id_per_step_for_older_tokenizers(tokenizer, monkeypatch, after):
    """tokenizers before DecodeStream.step took lists: chunks are stepped one id at a time."""
    import nanovllmx.engine.detokenizer as detok_mod

    monkeypatch.setattr(detok_mod, "_step_takes_lists", lambda: False)
    for text in TEXTS:
        ids = tokenizer.encode(text)
        for chunks in [(2,), (1, 4, 3)]:
            d = IncrementalDetokenizer(tokenizer)
            if after is not None:  # DecodeStream fails, in the middle of a chunk or not
                d._stream = FailingStream(d._stream, after)
            streamed, i, k = "", 0, 0
            while i < len(ids):
                n = chunks[k % len(chunks)]
                streamed += d.add(ids[i : i + n])
                i, k = i + n, k + 1
                so_far = tokenizer.decode(ids[:i])
                if not so_far.endswith("\ufffd"):  # a whole character ends the chunk: all of it is out
                    assert streamed == so_far
            assert (d._stream is None) == (after is not None and after < len(ids))
            assert streamed + d.flush() == text


def test_long_output_with_and_without_stop(tokenizer):
    text = " ".join(TEXTS) * 30  # > 2000 tokens: the text is kept in pieces and compacted
    ids = tokenizer.encode(text + "###END and more")
    d = IncrementalDetokenizer(tokenizer)
    assert "".join(feed(d, ids)) == text + "###END and more" == d.text
    d = IncrementalDetokenizer(tokenizer, ["###END", "never"])
    out = feed(d, ids)
    assert "".join(out) == text == d.text and d.stopped
    assert max(len(x) for x in out) <= 10  # streamed as it came, held back by at most 5 characters


def test_include_stop_string_and_min_tokens(tokenizer):
    ids = tokenizer.encode("one two STOP three STOP four")

    def feed(d: IncrementalDetokenizer) -> str:  # token by token until stopped, as the engine does
        got = ""
        for t in ids:
            got += d.add([t])
            if d.stopped:
                break
        return got

    d = IncrementalDetokenizer(tokenizer, ["STOP"], include_stop=True)
    assert feed(d) == d.text == "one two STOP" and d.stopped
    # stop strings count once min_tokens tokens are out: the first STOP (in the first tokens) is passed
    n_first = len(tokenizer.encode("one two STOP"))
    d = IncrementalDetokenizer(tokenizer, ["STOP"], min_tokens=n_first + 1)
    assert feed(d) == d.text == "one two STOP three " and d.stopped
