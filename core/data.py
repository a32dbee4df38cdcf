"""Training data for the mini DeepSeek-V3: a byte-level tokenizer and two datasets.

* ``pydoc``: English text from the documentation bundled with Python (``pydoc_data.topics.topics``), the
  topics joined with "\\n" in sorted key order and encoded as UTF-8 bytes (~466 KB); the last 5 % is held
  out for validation. Loss on it is in nats per byte.
* ``synthetic``: a token stream of short examples from four domains with clearly different statistics,
  every token labelled with its domain, so the expert specialisation of a trained MoE can be measured per
  domain (`core.evaluate.domain_expert_matrix`):

  ==============  ==========================  ==============================================
  domain          example                     statistics
  ==============  ==========================  ==============================================
  arithmetic      ``47+8=55;``                digits and ``+ =`` ; the answer is computable
  brackets        ``([{}]<>)[];``             6 bracket bytes; closers forced by the stack
  copy            ``qhzk|qhzk;``              lowercase; the second half repeats the first
  sorted          ``ADGGMTX.``                uppercase in non-decreasing order
  ==============  ==========================  ==============================================

Everything is deterministic: the synthetic stream from its seed (Python's ``random.Random``), batches
from a ``torch.Generator``, evaluation windows from fixed positions.

Batches are ``Batch(input_ids, targets, domains)`` named tuples: ``input_ids``/``targets`` int64
``[B, T]`` with ``targets[:, i] = input_ids[:, i+1]`` in the underlying stream; ``domains`` int64 ``[B, T]``
(domain of each input token) or ``None`` for unlabelled text.
"""
from __future__ import annotations

import functools
import random
from typing import NamedTuple

import torch

VOCAB_SIZE = 256
DATASETS = ("pydoc", "synthetic")
DOMAINS = ("arithmetic", "brackets", "copy", "sorted")


# ---------------------------------------------------------------------------------------------- tokenizer
class ByteTokenizer:
    """UTF-8 bytes as tokens (vocab 256). ``decode`` replaces invalid byte sequences with U+FFFD."""

    vocab_size = VOCAB_SIZE

    @staticmethod
    def encode(text: str) -> list[int]:
        return list(text.encode("utf-8"))

    @staticmethod
    def decode(tokens) -> str:
        if isinstance(tokens, torch.Tensor):
            tokens = tokens.flatten().tolist()
        return bytes(int(t) % 256 for t in tokens).decode("utf-8", errors="replace")


TOKENIZER = ByteTokenizer()


class Batch(NamedTuple):
    input_ids: torch.Tensor          # [B, T] int64
    targets: torch.Tensor            # [B, T] int64, next token of each input position
    domains: torch.Tensor | None     # [B, T] int64 domain id of each input token, or None


# ---------------------------------------------------------------------------------------------- dataset
class TokenDataset:
    """A token stream split into train / validation parts, with optional per-token domain labels.

    tokens: [N] int64; domains: [N] int64 or None; the last ``val_fraction`` of the stream is validation.
    """

    def __init__(self, name: str, tokens: torch.Tensor, domains: torch.Tensor | None = None,
                 domain_names: tuple[str, ...] = (), val_fraction: float = 0.05):
        if not 0 < val_fraction < 1:
            raise ValueError(f"val_fraction: must be in (0, 1), got {val_fraction}")
        self.name = name
        self.domain_names = tuple(domain_names)
        n_val = max(2, int(round(len(tokens) * val_fraction)))
        cut = len(tokens) - n_val
        self.splits = {"train": tokens[:cut], "val": tokens[cut:]}
        self.domain_splits = None if domains is None else {"train": domains[:cut], "val": domains[cut:]}

    @property
    def labelled(self) -> bool:
        return self.domain_splits is not None

    def num_tokens(self, split: str = "train") -> int:
        return len(self._split(split))

    def _split(self, split: str) -> torch.Tensor:
        if split not in self.splits:
            raise ValueError(f"split: expected 'train' or 'val', got {split!r}")
        return self.splits[split]

    def _windows(self, split: str, starts: torch.Tensor, seq_len: int) -> Batch:
        data = self._split(split)
        idx = starts[:, None] + torch.arange(seq_len + 1)
        chunk = data[idx]
        doms = None if self.domain_splits is None else self.domain_splits[split][idx[:, :-1]]
        return Batch(chunk[:, :-1], chunk[:, 1:], doms)

    def check_seq_len(self, split: str, seq_len: int) -> int:
        """Raise ValueError naming `seq_len` if a window (+1 target) does not fit the split; return its length."""
        n = len(self._split(split))
        if seq_len + 1 > n:
            raise ValueError(f"seq_len: {seq_len} is longer than the {split} split ({n} tokens)")
        return n

    def batch(self, batch_size: int, seq_len: int, generator: torch.Generator | None = None,
              split: str = "train") -> Batch:
        """``batch_size`` windows of ``seq_len`` (+1 for the targets) at uniformly random offsets."""
        n = self.check_seq_len(split, seq_len)
        starts = torch.randint(0, n - seq_len, (batch_size,), generator=generator)
        return self._windows(split, starts, seq_len)

    def eval_batches(self, batch_size: int, seq_len: int, num_batches: int | None = None,
                     split: str = "val") -> list[Batch]:
        """Fixed evaluation windows (independent of any seed).

        ``num_batches=None``: every non-overlapping window of the split (the full validation loss);
        otherwise ``num_batches * batch_size`` windows evenly spread over the split.
        """
        n = self.check_seq_len(split, seq_len)
        last = n - seq_len - 1
        if num_batches is None:
            starts = torch.arange(0, last + 1, seq_len)
        else:
            k = num_batches * batch_size
            starts = torch.linspace(0, last, k).round().long() if k > 1 else torch.zeros(1, dtype=torch.long)
        return [self._windows(split, starts[i:i + batch_size], seq_len) for i in range(0, len(starts), batch_size)]


# ---------------------------------------------------------------------------------------------- pydoc
@functools.lru_cache(maxsize=1)
def pydoc_text() -> str:
    """All ``pydoc_data.topics.topics`` entries joined with "\\n" in sorted key order."""
    from pydoc_data.topics import topics
    return "\n".join(topics[k] for k in sorted(topics))


@functools.lru_cache(maxsize=2)
def pydoc_dataset(val_fraction: float = 0.05) -> TokenDataset:
    """The pydoc text as UTF-8 bytes; the last ``val_fraction`` held out (treat the result as read-only)."""
    data = torch.tensor(list(pydoc_text().encode("utf-8")), dtype=torch.long)
    return TokenDataset("pydoc", data, val_fraction=val_fraction)


# ---------------------------------------------------------------------------------------------- synthetic
def _arithmetic(r: random.Random) -> str:
    a, b = r.randint(0, 99), r.randint(0, 99)
    if r.random() < 0.5:
        return f"{a}+{b}={a + b};"
    a, b = max(a, b), min(a, b)
    return f"{a}-{b}={a - b};"


_PAIRS = {"(": ")", "[": "]", "{": "}", "<": ">"}


def _brackets(r: random.Random) -> str:
    out, stack = [], []
    for _ in range(r.randint(4, 12)):
        if stack and (r.random() < 0.45 or len(stack) >= 5):
            out.append(_PAIRS[stack.pop()])
        else:
            o = r.choice("([{<")
            stack.append(o)
            out.append(o)
    out.extend(_PAIRS[o] for o in reversed(stack))
    return "".join(out) + ";"


def _copy(r: random.Random) -> str:
    s = "".join(r.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(r.randint(3, 8)))
    return f"{s}|{s};"


def _sorted(r: random.Random) -> str:
    s = sorted(r.choice("ABCDEFGHIJKLMNOPQRSTUVWXYZ") for _ in range(r.randint(4, 10)))
    return "".join(s) + "."


_GENERATORS = (_arithmetic, _brackets, _copy, _sorted)


def synthetic_stream(n_tokens: int = 1 << 18, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """A stream of ``n_tokens`` bytes made of runs (1-4 examples) of one domain at a time.

    Returns (tokens [n] int64, domains [n] int64 index into ``DOMAINS``). Deterministic from ``seed``.
    """
    r = random.Random(seed)
    toks: list[int] = []
    doms: list[int] = []
    while len(toks) < n_tokens:
        d = r.randrange(len(_GENERATORS))
        for _ in range(r.randint(1, 4)):
            b = _GENERATORS[d](r).encode("ascii")
            toks.extend(b)
            doms.extend([d] * len(b))
    return torch.tensor(toks[:n_tokens], dtype=torch.long), torch.tensor(doms[:n_tokens], dtype=torch.long)


@functools.lru_cache(maxsize=4)
def synthetic_dataset(seed: int = 0, n_tokens: int = 1 << 18, val_fraction: float = 0.05) -> TokenDataset:
    """The multi-domain stream as a dataset with per-token domain labels (treat the result as read-only)."""
    toks, doms = synthetic_stream(n_tokens, seed)
    return TokenDataset("synthetic", toks, doms, DOMAINS, val_fraction)


def get_dataset(name: str, seed: int = 0) -> TokenDataset:
    """``"pydoc"`` (seed unused: the text is fixed) or ``"synthetic"`` (stream generated from ``seed``)."""
    if name == "pydoc":
        return pydoc_dataset()
    if name == "synthetic":
        return synthetic_dataset(seed)
    raise ValueError(f"dataset: expected one of {DATASETS}, got {name!r}")
