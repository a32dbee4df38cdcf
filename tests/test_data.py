"""core.data: byte tokenizer, pydoc text split, synthetic multi-domain stream, batches."""
import re

import pytest
import torch

from core.data import (DOMAINS, TOKENIZER, Batch, get_dataset, pydoc_dataset, pydoc_text, synthetic_dataset,
                       synthetic_stream)


def test_tokenizer_round_trip_bytes():
    text = "MLA saves KV cache — ünïcödé ✓\n"
    ids = TOKENIZER.encode(text)
    assert ids == list(text.encode("utf-8"))
    assert all(0 <= i < 256 for i in ids) and TOKENIZER.vocab_size == 256
    assert TOKENIZER.decode(ids) == text
    assert TOKENIZER.decode(torch.tensor(ids)) == text
    # bytes that are not valid UTF-8 show as visible \xNN escapes (never U+FFFD), valid ones around them as text
    assert TOKENIZER.decode([0xFF, 0x41]) == "\\xffA"
    assert TOKENIZER.decode(list("é".encode()) + [0xC3] + list(b"x") + [0xE2, 0x82]) == "é\\xc3x\\xe2\\x82"
    assert "\ufffd" not in TOKENIZER.decode(range(256))


def test_pydoc_is_sorted_topics_with_tail_held_out():
    from pydoc_data.topics import topics
    keys = sorted(topics)
    text = pydoc_text()
    assert text.startswith(topics[keys[0]]) and text.endswith(topics[keys[-1]])
    raw = torch.tensor(list(text.encode("utf-8")))
    ds = pydoc_dataset()
    n_train, n_val = ds.num_tokens("train"), ds.num_tokens("val")
    assert n_train + n_val == raw.numel()
    assert abs(n_val / raw.numel() - 0.05) < 1e-3
    assert torch.equal(ds.splits["val"], raw[-n_val:])
    assert not ds.labelled


def test_batches_are_shifted_windows_and_seeded():
    ds = pydoc_dataset()
    b = ds.batch(4, 32, torch.Generator().manual_seed(3))
    assert isinstance(b, Batch) and b.domains is None
    assert b.input_ids.shape == b.targets.shape == (4, 32) and b.input_ids.dtype == torch.long
    assert torch.equal(b.input_ids[:, 1:], b.targets[:, :-1])
    again = ds.batch(4, 32, torch.Generator().manual_seed(3))
    other = ds.batch(4, 32, torch.Generator().manual_seed(4))
    assert torch.equal(b.input_ids, again.input_ids)
    assert not torch.equal(b.input_ids, other.input_ids)
    # every window is a real slice of the training split
    train = ds.splits["train"]
    row = b.input_ids[0]
    starts = (train[:-32] == row[0]).nonzero().flatten()
    assert any(torch.equal(train[s:s + 33], torch.cat([row, b.targets[0, -1:]])) for s in starts.tolist())


def test_eval_batches_fixed_and_full_cover():
    ds = pydoc_dataset()
    full = ds.eval_batches(16, 128)  # every non-overlapping window
    n = sum(b.input_ids.shape[0] for b in full)
    assert n == (ds.num_tokens("val") - 129) // 128 + 1
    few = ds.eval_batches(8, 64, 2)
    assert len(few) == 2 and all(b.input_ids.shape == (8, 64) for b in few)
    assert torch.equal(few[0].input_ids, ds.eval_batches(8, 64, 2)[0].input_ids)


def test_synthetic_stream_deterministic_and_labelled():
    t1, d1 = synthetic_stream(5000, seed=1)
    t2, d2 = synthetic_stream(5000, seed=1)
    t3, _ = synthetic_stream(5000, seed=2)
    assert torch.equal(t1, t2) and torch.equal(d1, d2) and not torch.equal(t1, t3)
    assert t1.shape == d1.shape == (5000,)
    assert set(d1.tolist()) == set(range(len(DOMAINS)))
    ds = synthetic_dataset(1)
    b = ds.batch(2, 16, torch.Generator().manual_seed(0))
    assert b.domains.shape == (2, 16) and ds.labelled
    assert get_dataset("synthetic", 1) is ds


def _examples(tokens, domains, d):
    """Concatenate the bytes of domain d, split into examples at the domain's terminators."""
    text = bytes(tokens[domains == d].tolist()).decode("ascii")
    return [e for e in re.split(r"(?<=[;.])", text) if e][1:-1]  # drop possibly-cut first/last


def test_synthetic_domains_follow_their_rules():
    toks, doms = synthetic_stream(20000, seed=0)
    arith = _examples(toks, doms, DOMAINS.index("arithmetic"))
    for e in arith:
        m = re.fullmatch(r"(\d+)([+-])(\d+)=(-?\d+);", e)
        assert m, e
        a, op, b, c = int(m[1]), m[2], int(m[3]), int(m[4])
        assert (a + b if op == "+" else a - b) == c
    pairs = {")": "(", "]": "[", "}": "{", ">": "<"}
    for e in _examples(toks, doms, DOMAINS.index("brackets")):
        stack = []
        for ch in e[:-1]:
            if ch in "([{<":
                stack.append(ch)
            else:
                assert stack and stack.pop() == pairs[ch], e
        assert not stack and e.endswith(";")
    for e in _examples(toks, doms, DOMAINS.index("copy")):
        left, right = e[:-1].split("|")
        assert left == right and left.isalpha() and left.islower()
    for e in _examples(toks, doms, DOMAINS.index("sorted")):
        body = e[:-1]
        assert list(body) == sorted(body) and body.isupper()
    # clearly different statistics: the domains' byte alphabets barely overlap
    alphabets = [set(toks[doms == d].tolist()) for d in range(len(DOMAINS))]
    for i in range(len(DOMAINS)):
        for j in range(i + 1, len(DOMAINS)):
            assert len(alphabets[i] & alphabets[j]) <= 1


def test_data_errors_name_the_argument():
    with pytest.raises(ValueError, match="dataset"):
        get_dataset("wikipedia")
    with pytest.raises(ValueError, match="split"):
        pydoc_dataset().batch(2, 8, split="test")
    with pytest.raises(ValueError, match="seq_len"):
        pydoc_dataset().batch(1, 10**7)
