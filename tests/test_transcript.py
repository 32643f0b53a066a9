"""The transcript: commits in any order read as position-ordered tokens, a gap-free prefix, EOS cuts."""

import json
import random
from pathlib import Path

import pytest

from refusion_mlx.loading import DEMO_MODEL_PATH
from refusion_mlx.transcript import Commit, TextTranscript, Transcript

EOS = 9


def commit(positions, tokens):
    return Commit(list(positions), list(tokens), "verify", 1, 1.0)


def test_out_of_order_commits_read_in_position_order_with_a_growing_prefix():
    t = Transcript([EOS], limit=8)
    assert t.add(commit([4, 5], [14, 15])) == [4, 5]
    assert t.prefix() == [] and t.tokens() == [14, 15] and not t.ended
    t.add(commit([0, 1], [10, 11]))
    assert t.prefix() == [10, 11] and t.prefix_length == 2
    t.add(commit([2, 3], [12, 13]))
    assert t.prefix() == [10, 11, 12, 13, 14, 15] and t.tokens() == t.prefix()


def test_padding_past_the_limit_is_never_placed_and_the_limit_ends_it():
    t = Transcript([EOS], limit=3)
    assert t.add(commit([0, 1, 2, 3], [1, 2, 3, 4])) == [0, 1, 2]
    assert t.tokens() == [1, 2, 3] and t.ended


def test_the_first_eos_cuts_tokens_text_and_ends_the_generation():
    t = Transcript([EOS], limit=16)
    t.add(commit([3, 4, 5], [EOS, 7, 7]))  # an EOS already committed, before the prefix reaches it
    assert not t.ended
    t.add(commit([0, 1, 2], [1, 2, 3]))
    assert t.ended
    assert t.tokens() == [1, 2, 3, EOS] and t.tokens(with_eos=False) == [1, 2, 3]
    assert t.prefix() == [1, 2, 3] and t.prefix(with_eos=True) == [1, 2, 3, EOS]
    result = t.result(model_calls=4, tokens_fed=20, wall_time=1.0, cached_tokens=5)
    assert result.tokens == [1, 2, 3, EOS] and result.iterations == 2 and result.cached_tokens == 5
    assert result.tokens_per_call == 1.0


# TextTranscript reads its text incrementally (a short window decoded per token, stop strings looked
# for where the text changed); below, random generations committed in order and out of order are
# checked against the plain reading (the whole gap-free start decoded at every step) for several
# kinds of tokenizer whose decoding depends on context.

FRAGMENTS = ["The", " quick", " brown", " fox", " jumps", ".", " ,", " do", " n't", "'s", " it", " .", "\n",
             " café", " naïve", " über", " 😀", "😀", " 日本語", "テキスト", " ü", " 42", "!", " ?", "  ", "\ufffd"]
CORPUS = ["The quick brown fox jumps over the lazy dog.", "Hello, world! Don't stop: it's 42 degrees.",
          "Reverse the order of the words: apple river stone cloud", "cafe naive resume uber, do n't ."] * 50


class SentencePieceTokenizer:
    """SentencePiece itself (its own decoder: the leading space dropped, <0xNN> byte pieces joined)
    behind the two calls a transcript makes."""

    def __init__(self, processor):
        self.processor = processor

    def encode(self, text, add_special_tokens=False):
        return self.processor.encode(text)

    def decode(self, ids, skip_special_tokens=True):
        return self.processor.decode(list(ids))

    def convert_ids_to_tokens(self, token):
        return self.processor.id_to_piece(token)

    def __len__(self):
        return self.processor.get_piece_size()


def sentencepiece_model(folder: Path) -> Path:
    """A small SentencePiece BPE with byte fallback (characters outside it become <0xNN> pieces)."""
    import sentencepiece as spm

    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "tokenizer.model", "wb") as model:
        spm.SentencePieceTrainer.train(sentence_iterator=iter(CORPUS), model_writer=model, vocab_size=400,
                                       byte_fallback=True, model_type="bpe", minloglevel=2)
    (folder / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "LlamaTokenizer"}))
    return folder


def wordpiece_tokenizer():
    """A BERT-style WordPiece whose decoding joins "##" pieces and cleans up spaces before punctuation
    (" ." -> ".", " n't" -> "n't"): text before a token can change when it comes."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tokenizer.decoder = decoders.WordPiece(cleanup=False)  # the clean-up is transformers' own, below
    tokenizer.train_from_iterator(CORPUS + FRAGMENTS * 20, trainers.WordPieceTrainer(
        vocab_size=300, special_tokens=["[UNK]", "[SEP]"], show_progress=False))
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="[UNK]", sep_token="[SEP]",
                                   clean_up_tokenization_spaces=True)


@pytest.fixture(scope="module", params=["demo byte-level BPE", "SentencePiece", "HF SentencePiece", "WordPiece"])
def tokenizer(request, tmp_path_factory):
    if request.param == "demo byte-level BPE":  # as the server loads it: mlx-lm's wrapper
        from mlx_lm.utils import load_tokenizer

        return load_tokenizer(DEMO_MODEL_PATH)
    if request.param == "SentencePiece":
        import sentencepiece as spm

        folder = sentencepiece_model(tmp_path_factory.mktemp("sp"))
        return SentencePieceTokenizer(spm.SentencePieceProcessor(model_file=str(folder / "tokenizer.model")))
    if request.param == "HF SentencePiece":  # transformers' Llama tokenizer: ByteFallback, Fuse, Strip decoders
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(str(sentencepiece_model(tmp_path_factory.mktemp("hfsp"))))
    return wordpiece_tokenizer()


class PlainReading:
    """What a TextTranscript's text is defined to be, read the plain way: at every step the whole
    gap-free start decoded, cut at its first EOS, then before each stop string in turn."""

    def __init__(self, tokenizer, eos, limit, stops):
        self.tokenizer, self.eos, self.limit, self.stops = tokenizer, eos, limit, stops
        self.placed, self.text, self.cut, self.finish_reason, self.tokens = {}, "", False, None, []

    def decode(self, ids):
        return self.tokenizer.decode([t for t in ids if t not in self.eos], skip_special_tokens=True)

    def add(self, positions, tokens):
        if self.finish_reason is not None:
            return
        self.placed.update((p, t) for p, t in zip(positions, tokens) if self.limit is None or p < self.limit)
        prefix = []
        while len(prefix) in self.placed and not (prefix and prefix[-1] in self.eos):
            prefix.append(self.placed[len(prefix)])
        self.tokens = prefix  # up to and including the first EOS
        text = self.decode(prefix)
        for stop in self.stops:
            if stop in text:
                text, self.cut = text[:text.index(stop)], True
        self.text = text
        if self.cut or (prefix and prefix[-1] in self.eos):
            self.finish_reason = "stop"
        elif self.limit is not None and len(self.placed) >= self.limit and len(prefix) >= self.limit:
            self.finish_reason = "length"

    def text_ids(self):
        return [t for t in self.tokens if t not in self.eos]

    def covering(self, length):  # the fewest tokens whose text reaches ``length``, or all of them
        ids = self.text_ids()
        return next((k for k in range(len(ids)) if len(self.decode(ids[:k]).rstrip("\ufffd")) >= length), len(ids))

    def returned_tokens(self):
        return self.covering(len(self.text)) if self.cut else len(self.tokens)

    def stable_text(self):
        if self.finish_reason is not None:
            return self.text
        text = self.text.rstrip("\ufffd")
        hold = max([k for s in self.stops for k in range(1, len(s)) if text.endswith(s[:k])], default=0)
        return text[:len(text) - hold]


def random_generation(rng, tokenizer):
    """(token ids, eos ids, limit, stops): text with multi-byte characters split over tokens, some
    random ids among them (lone bytes, special tokens), an EOS sometimes, stops taken from the text."""
    text = "".join(rng.choice(FRAGMENTS) for _ in range(rng.randint(1, 14)))
    ids = list(tokenizer.encode(text, add_special_tokens=False))
    for _ in range(rng.randint(0, 3)):
        ids.insert(rng.randint(0, len(ids)), rng.randrange(len(tokenizer)))
    eos = {rng.randrange(len(tokenizer))}
    if rng.random() < 0.3:
        ids.insert(rng.randint(0, len(ids)), next(iter(eos)))
    limit = rng.choice([None, len(ids), max(1, len(ids) - rng.randint(0, 5))])
    whole = tokenizer.decode(ids, skip_special_tokens=True)
    stops = []
    for _ in range(rng.randint(0, 3)):
        if whole and rng.random() < 0.7:
            start = rng.randrange(len(whole))
            stops.append(whole[start:start + rng.randint(1, 6)])
        else:
            stops.append(rng.choice(FRAGMENTS).strip() or "?")
    return ids, eos, limit, stops


def random_commits(rng, length):
    """Positions 0..length+2 (past the end: padding) in chunks: in order (left to right) or in a
    random order (plan-and-infill: gaps filled later)."""
    positions = list(range(length + 3))
    if rng.random() < 0.5:
        rng.shuffle(positions)
    chunks = []
    while positions:
        size = rng.randint(1, 4)
        chunks.append(positions[:size])
        positions = positions[size:]
    return chunks


def test_text_read_token_by_token_is_the_whole_decode_at_every_step(tokenizer):
    rng = random.Random(1234)
    for trial in range(150):
        ids, eos, limit, stops = random_generation(rng, tokenizer)
        padded = ids + [rng.randrange(len(tokenizer)) for _ in range(3)]
        transcript, plain = TextTranscript(eos, limit, tokenizer, stops), PlainReading(tokenizer, eos, limit, stops)
        for step, chunk in enumerate(random_commits(rng, len(ids))):
            transcript.add(commit(chunk, [padded[p] for p in chunk]))
            plain.add(chunk, [padded[p] for p in chunk])
            where = f"trial {trial} step {step}: ids {ids}, eos {eos}, limit {limit}, stops {stops}"
            assert transcript.text == plain.text, where
            assert transcript.finish_reason == plain.finish_reason, where
            assert transcript.stable_text() == plain.stable_text(), where
            assert transcript.returned_tokens() == plain.returned_tokens(), where
            assert transcript.covering(len(transcript.stable_text())) == plain.covering(len(plain.stable_text())), where
        transcript.end()
        text_ids = plain.text_ids()
        assert [transcript.offset(p) for p in range(len(text_ids) + 1)] == \
            [min(len(plain.decode(text_ids[:p])), len(plain.text)) for p in range(len(text_ids) + 1)], where


class CountingDecodes:
    """A tokenizer that counts the ids it is asked to decode."""

    def __init__(self, tokenizer):
        self.tokenizer, self.decoded = tokenizer, 0

    def decode(self, ids, **kwargs):
        self.decoded += len(ids)
        return self.tokenizer.decode(ids, **kwargs)

    def __getattr__(self, name):
        return getattr(self.tokenizer, name)


ENGLISH = "The quick brown fox jumps over the lazy dog. " * 30
CJK = "\u65e5\u672c\u8a9e\u306e\u6587\u7ae0\u3002\U0001f600" * 60  # 3- and 4-byte characters


@pytest.mark.parametrize("tokenizer, text", [
    ("demo byte-level BPE", ENGLISH), ("demo byte-level BPE", CJK),  # split characters: byte-level pieces
    ("SentencePiece", ENGLISH), ("HF SentencePiece", ENGLISH), ("WordPiece", ENGLISH),
], indirect=["tokenizer"], ids=["BPE-English", "BPE-CJK", "SentencePiece-English", "HF-SentencePiece-English",
                                "WordPiece-English"])
@pytest.mark.parametrize("per_commit", [1, 32])
def test_reading_decodes_a_bounded_window_per_token(tokenizer, text, per_commit):
    """Text is read in a few ids' window per token, one token or 32 per commit, in English and in
    characters split over byte-level BPE's ids: decoding whole prefixes would ask for ~n^2/2 ids;
    the bound here is linear. (A run of byte-fallback pieces, or of ids that decode to nothing, is
    read in a window as long as the run: ``TextReader``'s docstring.)"""
    ids = tokenizer.encode(text, add_special_tokens=False)[:400]
    counting = CountingDecodes(tokenizer)
    transcript = TextTranscript([], None, counting)
    for start in range(0, len(ids), per_commit):
        transcript.add(commit(range(start, min(start + per_commit, len(ids))), ids[start : start + per_commit]))
    assert transcript.text == tokenizer.decode(ids, skip_special_tokens=True)
    assert counting.decoded <= 64 * len(ids), f"{counting.decoded} ids decoded for {len(ids)}"
