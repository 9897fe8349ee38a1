"""Calibration text and its encoding (`keras_collab.hub.text`)."""

import pytest

from keras_collab.hub import sources
from keras_collab.hub import text
from keras_collab.hub.text import builtin_corpus

keras_hub = pytest.importorskip("keras_hub")


def test_builtin_corpus_is_deterministic_english():
    first, second = builtin_corpus(50), builtin_corpus(50)
    assert first == second
    assert len(set(first)) == 50
    assert all(s[0].isupper() and s.endswith(".") for s in first)


def test_held_out_texts_are_never_calibration_texts(tmp_path):
    calibration, held_out = text.calibration_and_held_out(20, held_out=10)
    assert len(calibration) == 20 and len(held_out) == 10
    assert not set(calibration) & set(held_out)
    corpus = builtin_corpus()
    path = tmp_path / "texts.txt"
    path.write_text("\n".join(corpus[5:8]) + "\n\n")
    calibration, held_out = text.calibration_and_held_out(
        2, str(path), held_out=10
    )
    assert calibration == corpus[5:7]
    assert len(held_out) == 10 and not set(calibration) & set(held_out)


def test_encode_seq2seq_trims_encoder_and_decoder(tiny_bart_preset):
    preprocessor = sources.load_preprocessor(tiny_bart_preset, 64)
    assert sources.is_seq2seq(preprocessor)
    texts = ["the file", "a data value of the module object " * 3, "it"]
    (batch,) = text.encode(preprocessor, texts)
    assert sorted(batch) == [
        "decoder_padding_mask",
        "decoder_token_ids",
        "encoder_padding_mask",
        "encoder_token_ids",
    ]
    for prefix in ("encoder_", "decoder_"):
        mask = batch[prefix + "padding_mask"]
        assert batch[prefix + "token_ids"].shape == mask.shape
        # Trimmed by its own mask to a multiple of 16, no real token lost.
        assert mask.shape[1] % 16 == 0 and mask.shape[1] < 64
        assert mask[:, -16:].any()
    # The decoder reads the same text, behind two start markers.
    assert (
        batch["decoder_padding_mask"].sum(axis=1)
        == batch["encoder_padding_mask"].sum(axis=1) + 1
    ).all()
    text.check_nonempty([batch])


def test_vocabulary_words_of_wordpiece_are_whole_plain_words():
    tokenizer = keras_hub.tokenizers.WordPieceTokenizer(
        vocabulary=["[PAD]", "[UNK]", "[CLS]", "the", "##ing", "a", "cat"]
        + ["x1", "über", "run"]
    )
    assert text.vocabulary_words(tokenizer) == ["cat", "run", "the"]


class _MarkedVocabulary:
    """A byte-pair-like vocabulary: word starts carry a marker."""

    def __init__(self, vocabulary):
        self.vocabulary = vocabulary

    def get_vocabulary(self):
        return self.vocabulary


def test_vocabulary_words_of_marked_vocabularies_are_word_starts():
    bpe = _MarkedVocabulary(["Ġthe", "ing", "Ġcat", "Ġ1", "<s>", "ĠÃ©"])
    assert text.vocabulary_words(bpe) == ["cat", "the"]
    sentencepiece = _MarkedVocabulary(["▁dog", "s", "▁a", "<unk>"])
    assert text.vocabulary_words(sentencepiece) == ["dog"]
    characters = _MarkedVocabulary(["[PAD]", "##s", "1", "a", "b"])
    assert text.vocabulary_words(characters) == []
    assert text.vocabulary_texts(characters, 0) == []
    with pytest.raises(ValueError, match="no plain word"):
        text.vocabulary_texts(characters, 3)


def test_vocabulary_texts_are_seeded_draws_of_vocabulary_words():
    words = ["cat", "dog", "run", "the"]
    tokenizer = _MarkedVocabulary(words)
    texts = text.vocabulary_texts(tokenizer, 50, seed=3)
    assert texts == text.vocabulary_texts(tokenizer, 50, seed=3)
    assert texts != text.vocabulary_texts(tokenizer, 50, seed=4)
    lengths = [len(t.split()) for t in texts]
    assert len(texts) == 50 and min(lengths) >= 8 and max(lengths) <= 23
    used = {w for t in texts for w in t.split()}
    assert used == set(words)  # 50 texts draw every one of 4 words
    assert text.vocabulary_texts(tokenizer, 0) == []
    with pytest.raises(ValueError, match="count"):
        text.vocabulary_texts(tokenizer, -1)
