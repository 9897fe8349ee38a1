"""The built-in text corpus: several registers of English, split by domain.

Every text comes from what a fresh machine has, or from this package:

Calibration domains (`CALIBRATION_DOMAINS`):

- `docstrings`: technical prose, standard-library docstrings;
- `comments`: code comments, standard-library sources;
- `reference`: technical prose, Python's own docs (`pydoc_data.topics`);
- `narrative`, `dialogue`, `lists`, `numbers` (numbers, dates, units):
  written for this package.

Held-out domains (`HELD_OUT_DOMAINS`):

- `package_metadata`: the READMEs of installed packages (their metadata's
  long descriptions);
- `everyday`: letters, notices, news, recipes, reviews and instructions,
  written for this package.

`CALIBRATION_DOMAINS` and `HELD_OUT_DOMAINS` are the split, in one place:
no text of a held-out domain is ever used for calibration, refinement or
distillation, so that "held out" means another domain, not only other
sentences of the same one. The written texts are `corpus_data/*.txt`
beside this module (one text per line, written for this project; no text
copied from elsewhere).

Licence texts are reserved for independent evaluation: no file whose name
or folder says licence, copying or copyright is read (`is_licence_path`),
and no sentence or README section about licensing is kept
(`is_licence_text`).

Deterministic and offline: sources are read in a fixed order, duplicates
dropped, and each domain shuffled with a fixed seed. The standard-library
and package domains depend on the Python version and installed versions;
record `fingerprint(texts)` with results.
"""

import functools
import hashlib
import importlib
import importlib.metadata
import importlib.util
import inspect
import io
import os
import random
import re
import tokenize

CALIBRATION_DOMAINS = (
    "docstrings",
    "comments",
    "reference",
    "narrative",
    "dialogue",
    "lists",
    "numbers",
)
HELD_OUT_DOMAINS = ("package_metadata", "everyday")
DOMAINS = CALIBRATION_DOMAINS + HELD_OUT_DOMAINS

# Written for this package: `corpus_data/<domain>.txt`.
WRITTEN_DOMAINS = ("narrative", "dialogue", "lists", "numbers", "everyday")

# Installed with keras-collab[all] (scripts/setup.sh), read in this order;
# a package that is not installed is skipped. keras-collab itself and the
# bundled checkpoint are left out: their READMEs describe this project.
METADATA_PACKAGES = (
    "keras",
    "keras-hub",
    "numpy",
    "scipy",
    "jax",
    "torch",
    "tensorflow",
    "tqdm",
    "tensorly",
    "matplotlib",
    "pytest",
    "ruff",
    "rich",
    "h5py",
    "ml_dtypes",
    "optree",
    "absl-py",
    "packaging",
    "pluggy",
    "iniconfig",
    "Pygments",
    "markdown-it-py",
    "regex",
    "requests",
    "urllib3",
    "idna",
    "charset-normalizer",
    "fonttools",
    "pillow",
    "contourpy",
    "cycler",
    "pyparsing",
    "python-dateutil",
    "sympy",
    "networkx",
    "filelock",
    "fsspec",
    "Jinja2",
    "MarkupSafe",
    "mpmath",
    "typing_extensions",
    "wrapt",
    "termcolor",
    "opt_einsum",
    "kagglehub",
    "namex",
)

# Standard-library modules with long, well-written English docstrings.
# `inspect` is left out: PyTorch replaces some of its functions at import.
CORPUS_MODULES = (
    "argparse",
    "asyncio",
    "calendar",
    "collections",
    "concurrent.futures",
    "configparser",
    "contextlib",
    "csv",
    "dataclasses",
    "datetime",
    "decimal",
    "difflib",
    "email",
    "enum",
    "fractions",
    "functools",
    "gettext",
    "heapq",
    "http.client",
    "http.server",
    "imaplib",
    "ipaddress",
    "json",
    "logging",
    "mailbox",
    "multiprocessing",
    "pathlib",
    "pickle",
    "pydoc",
    "queue",
    "random",
    "sched",
    "shutil",
    "smtplib",
    "socket",
    "socketserver",
    "sqlite3",
    "statistics",
    "string",
    "subprocess",
    "tarfile",
    "tempfile",
    "textwrap",
    "threading",
    "timeit",
    "tokenize",
    "typing",
    "unittest",
    "urllib.parse",
    "urllib.request",
    "uuid",
    "warnings",
    "weakref",
    "xml.dom.minidom",
    "zipfile",
)
_DOCSTRING_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z])")


def _defined_in(member, module):
    """Whether `member` is the module's own, not a replacement patched in.

    Some libraries (PyTorch) replace standard-library functions at import;
    their docstrings must not leak in, or the corpus would depend on what
    else is imported.
    """
    if getattr(member, "__module__", None) != module.__name__:
        return False
    code = getattr(member, "__code__", None)
    return code is None or code.co_filename == getattr(module, "__file__", None)


def _module_docstrings(module):
    yield inspect.getdoc(module) or ""
    for _, member in inspect.getmembers(module):
        if not _defined_in(member, module):
            continue
        if inspect.isclass(member) or inspect.isfunction(member):
            yield inspect.getdoc(member) or ""
            if inspect.isclass(member):
                for _, method in inspect.getmembers(member, inspect.isfunction):
                    yield inspect.getdoc(method) or ""


def _docstring_sentences(text):
    # Paragraphs first: docstrings wrap lines inside a sentence.
    for paragraph in re.split(r"\n\s*\n", text):
        flat = " ".join(paragraph.split())
        for sentence in _DOCSTRING_SENTENCE_END.split(flat):
            words = sentence.split()
            if (
                8 <= len(words) <= 40
                and sentence[0].isupper()
                and sentence.endswith(".")
                and sentence.isascii()
                and not any(c in sentence for c in "{}[]<>=|\\")
            ):
                yield sentence


def builtin_corpus(count=None, seed=0):
    """English sentences from the standard library's docstrings.

    Deterministic for a given Python version: modules are read in a fixed
    order, duplicates dropped, and the result shuffled with `seed`.

    Args:
        count: How many sentences to return (all when `None`).
        seed: Seed of the shuffle.

    Returns:
        A list of strings.

    Example:

    >>> sentences = builtin_corpus(4)
    >>> len(sentences)
    4
    """
    seen, corpus = set(), []
    for name in CORPUS_MODULES:
        try:
            module = importlib.import_module(name)
        except ImportError:  # a trimmed Python build may lack a module
            continue
        for doc in _module_docstrings(module):
            for sentence in _docstring_sentences(doc):
                if sentence not in seen:
                    seen.add(sentence)
                    corpus.append(sentence)
    random.Random(seed).shuffle(corpus)
    return corpus if count is None else corpus[:count]


# The standard-library modules whose comments are read: those whose
# docstrings `keras_collab.hub.text` reads.
COMMENT_MODULES = CORPUS_MODULES

_LICENCE_WORDS = re.compile(
    r"licen[cs]|copyright|copyleft|warrant|merchantab|liabilit|"
    r"redistribut|permission is hereby|all rights reserved|spdx|"
    r"\bgnu\b|\bgpl|\blgpl|\bbsd\b|\bmit\b|apache|mozilla public|"
    r"open source initiative|patent|trademark",
    re.IGNORECASE,
)
_LICENCE_FILE = re.compile(
    r"^(licen[cs]e|copying|copyright|notice|authors|patents)([._-].*)?$",
    re.IGNORECASE,
)
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z\"'])")


def is_licence_text(text):
    """Whether `text` is about licensing (kept out of the corpus).

    >>> is_licence_text("Permission is hereby granted, free of charge.")
    True
    >>> is_licence_text("Returns the number of items in the queue.")
    False
    """
    return bool(_LICENCE_WORDS.search(text))


def is_licence_path(path):
    """Whether `path` names a licence file or folder, never read.

    >>> is_licence_path("/usr/share/common-licenses/GPL-3")
    True
    >>> is_licence_path("pkg-1.0.dist-info/licenses/LICENSE.txt")
    True
    >>> is_licence_path("/usr/share/doc/bash/copyright")
    True
    >>> is_licence_path("lib/python3.11/json/decoder.py")
    False
    """
    parts = re.split(r"[\\/]+", os.fspath(path))
    for part in parts:
        lowered = part.lower()
        if lowered in ("common-licenses", "licenses", "licences"):
            return True
        if _LICENCE_FILE.match(part):
            return True
    return False


def _read_source(path):
    if is_licence_path(path):
        raise ValueError(f"Refusing to read licence file '{path}'.")
    with open(path, encoding="utf-8") as file:
        return file.read()


def _clean_sentences(
    text, min_words=6, max_words=40, endings=None, reject="{}[]<>=|\\"
):
    """Sentences of `text` that read as English prose: paragraphs flattened,
    split at sentence ends, kept when they start with a capital (or a
    quote), are ASCII, have `min_words` to `max_words` words, end with one
    of `endings` (any when `None`), contain none of `reject` and nothing
    about licensing."""
    for paragraph in re.split(r"\n\s*\n", text):
        flat = " ".join(paragraph.split())
        for sentence in _SENTENCE_END.split(flat):
            words = sentence.split()
            if not min_words <= len(words) <= max_words:
                continue
            if not (sentence[0].isupper() or sentence[0] in "\"'"):
                continue
            if endings is not None and not sentence.endswith(endings):
                continue
            if not sentence.isascii() or "http" in sentence:
                continue
            if any(c in sentence for c in reject) or is_licence_text(sentence):
                continue
            yield sentence


# ---------------------------------------------------------------------------
# Domains
# ---------------------------------------------------------------------------


def _docstrings():
    return [s for s in builtin_corpus() if not is_licence_text(s)]


def _module_files(name):
    """The source files of a standard-library module: its file, or every
    `.py` file of its package folder, in sorted order."""
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.origin or not spec.origin.endswith(".py"):
        return []
    if spec.submodule_search_locations:
        folder = os.path.dirname(spec.origin)
        return [
            os.path.join(folder, entry)
            for entry in sorted(os.listdir(folder))
            if entry.endswith(".py")
        ]
    return [spec.origin]


def _comment_paragraphs(source):
    """Runs of consecutive `#` comments, as text paragraphs."""
    paragraph, previous_line = [], None
    tokens = tokenize.generate_tokens(io.StringIO(source).readline)
    try:
        for token in tokens:
            if token.type != tokenize.COMMENT:
                continue
            line = token.start[0]
            if previous_line is not None and line != previous_line + 1:
                yield " ".join(paragraph)
                paragraph = []
            paragraph.append(token.string.lstrip("#").strip())
            previous_line = line
    except (tokenize.TokenError, SyntaxError):
        pass
    if paragraph:
        yield " ".join(paragraph)


def _comments():
    texts = []
    for name in COMMENT_MODULES:
        try:
            files = _module_files(name)
        except (ImportError, ValueError):
            continue
        for path in files:
            for paragraph in _comment_paragraphs(_read_source(path)):
                # A sentence per comment line would run into the next one:
                # comments often have no final full stop.
                texts.extend(_clean_sentences(paragraph))
    return texts


def _reference():
    from pydoc_data.topics import topics

    texts = []
    for name in sorted(topics):
        # Indented lines are grammar rules and code examples.
        lines = [
            line
            for line in topics[name].splitlines()
            if not line.startswith((" ", "\t"))
        ]
        texts.extend(_clean_sentences("\n".join(lines), min_words=8))
    return texts


_MARKUP_LINE = re.compile(r"^\s*(\.\. |:\w+:|\[!\[|<|\||!\[|```|>>>|\$ )")
_HEADING = re.compile(r"^\s*(#+\s+(?P<md>.*)|(?P<rst>[=\-~^*]{3,})\s*)$")


def _readme_prose(description):
    """The prose of a Markdown or reStructuredText README: markup lines
    (images, badges, directives, HTML, code fences and prompts) dropped,
    links and emphasis reduced to their text, and every section whose
    heading mentions licensing left out."""
    kept, skipping, previous = [], False, ""
    for line in description.splitlines():
        heading = _HEADING.match(line)
        if heading:
            title = heading.group("md") if heading.group("md") else previous
            skipping = is_licence_text(title)
            if heading.group("rst") and kept and kept[-1] == previous:
                kept.pop()  # an underlined reST title, not prose
            previous = ""
            kept.append("")
            continue
        previous = line
        if skipping or _MARKUP_LINE.match(line):
            kept.append("")
            continue
        line = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", line)
        line = re.sub(r"`+([^`]*)`+_?", r"\1", line)
        line = re.sub(r"\*\*|__|(?<!\w)\*(?=\w)|(?<=\w)\*(?!\w)", "", line)
        line = re.sub(r"^\s*([-*+]|\d+\.)\s+", "", line)
        kept.append(line)
    return "\n".join(kept)


def _metadata_description(name):
    """A package's long description, from its installed metadata."""
    try:
        metadata = importlib.metadata.distribution(name).metadata
    except importlib.metadata.PackageNotFoundError:
        return ""
    # The body is the description; older packages put it in a header. The
    # `License` header (often the whole licence text) is never read.
    return metadata.get_payload() or metadata.get("Description") or ""


def package_metadata_texts(packages=METADATA_PACKAGES):
    """Sentences of the READMEs of installed `packages`, in order."""
    texts = []
    for name in packages:
        prose = _readme_prose(_metadata_description(name))
        texts.extend(_clean_sentences(prose, endings=(".", "!", "?")))
    return texts


def _written(domain):
    path = os.path.join(os.path.dirname(__file__), "corpus_data", domain)
    with open(path + ".txt", encoding="utf-8") as file:
        lines = [line.strip() for line in file]
    return [line for line in lines if line and not line.startswith("#")]


_READERS = {
    "docstrings": _docstrings,
    "comments": _comments,
    "reference": _reference,
    "package_metadata": package_metadata_texts,
}


@functools.lru_cache(maxsize=None)
def _domain(name, seed):
    if name not in DOMAINS:
        raise ValueError(
            f"Unknown corpus domain '{name}'; choose among {DOMAINS}."
        )
    texts = _written(name) if name in WRITTEN_DOMAINS else _READERS[name]()
    unique = list(dict.fromkeys(texts))
    random.Random(seed).shuffle(unique)
    return tuple(unique)


def domain_texts(name, count=None, seed=0):
    """The texts of one domain (see the module docstring), shuffled.

    Args:
        name: One of `DOMAINS`.
        count: How many (all when `None`).
        seed: Seed of the shuffle.

    Returns:
        A list of strings, without duplicates.

    Example:

    >>> texts = domain_texts("dialogue", 3)
    >>> len(texts)
    3
    """
    texts = list(_domain(name, seed))
    return texts if count is None else texts[:count]


def interleaved(domains, count=None, seed=0):
    """Texts of `domains` taken in turn, one of each, until `count`: the
    first texts cover every domain, whatever `count` is. A domain that runs
    out leaves the others to go on.

    >>> texts = interleaved(("narrative", "numbers"), 4)
    >>> texts[:2] == [domain_texts("narrative", 1)[0],
    ...               domain_texts("numbers", 1)[0]]
    True
    """
    streams = [domain_texts(name, seed=seed) for name in domains]
    result, index = [], 0
    while count is None or len(result) < count:
        row = [stream[index] for stream in streams if index < len(stream)]
        if not row:
            break
        result.extend(row)
        index += 1
    return result if count is None else result[:count]


def calibration_texts(count=None, seed=0):
    """Calibration texts: the `CALIBRATION_DOMAINS` interleaved."""
    return interleaved(CALIBRATION_DOMAINS, count, seed)


def held_out_texts(per_domain, domains=HELD_OUT_DOMAINS, seed=0):
    """`{domain: texts}` for evaluation, `per_domain` of each.

    Texts that also occur in a calibration domain are dropped, so that the
    split is disjoint by content, not only by name.
    """
    unknown = set(domains) - set(HELD_OUT_DOMAINS)
    if unknown:
        raise ValueError(
            f"{sorted(unknown)} are not held-out domains; "
            f"held-out domains: {HELD_OUT_DOMAINS}."
        )
    calibration = set(calibration_texts(seed=seed))
    return {
        name: [
            t for t in domain_texts(name, seed=seed) if t not in calibration
        ][:per_domain]
        for name in domains
    }


def fingerprint(texts):
    """A short hash of `texts`, to record which texts a result used."""
    return hashlib.md5("\n".join(texts).encode()).hexdigest()[:12]
