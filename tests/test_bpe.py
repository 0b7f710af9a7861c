"""The tokenizer: a worked example by hand, round trips, files, and parity with two references."""
import functools
import gzip
import importlib.util
import unicodedata

import numpy as np
import pytest

import bpe
from conftest import open_clip_file, reference

# A mix of scripts and symbols, for round trips and parity.
TEXTS = [
    "a photo of a cat", "Hello, World!  It's 2024, don't panic.", "naïve café, crème brûlée, Ångström",
    "東京は晴れ、明日は雨。", "中文分词测试", "مرحبا بالعالم", "Привет, мир", "👨‍👩‍👧 family 🤖 robot 🇫🇷",
    "3.14159 and 1,000,000 and 42nd", "C++ & C# <3 :-) http://example.com/a?b=c#d", "tab\there\nnew line",
    "UPPER lower MiXeD", "l'été n'est pas fini; we've, they'll, I'd", "", "   ", "x" * 200, "A \u0301 combining",
]


def test_worked_example_by_hand():
    """
    Corpus "low low low lower", min_count=1, room for 5 merges. Words: low x3 = [l, o, w</w>], lower x1 =
    [l, o, w, e, r</w>].
    Pair counts: (l,o) 4, (o,w</w>) 3, (o,w) 1, (w,e) 1, (e,r</w>) 1.
      merge 1: (l, o) -> 'lo'            words: [lo, w</w>] x3, [lo, w, e, r</w>]
      merge 2: (lo, w</w>) -> 'low</w>'  counts left: (lo,w) 1, (w,e) 1, (e,r</w>) 1; a tie, so the
                                          pair that sorts first wins: 'e' < 'lo' < 'w'
      merge 3: (e, r</w>) -> 'er</w>'    then (lo,w) 1 and (w,er</w>) 1
      merge 4: (lo, w) -> 'low'          then (low, er</w>) 1
      merge 5: (low, er</w>) -> 'lower</w>'
    Ids: 512 + rank for merges, then SOT 517 and EOT 518. A byte's id is its place in bytes_to_unicode:
    the printable bytes come first from '!' (33), so 'e' is 101 - 33 = 68, and with </w> 256 + 68.
    """
    tok = bpe.learn(["low low low lower"], vocab_size=514 + 5, min_count=1)
    assert tok.merges == [("l", "o"), ("lo", "w</w>"), ("e", "r</w>"), ("lo", "w"), ("low", "er</w>")]
    assert (tok.sot, tok.eot, tok.vocab_size) == (517, 518, 519)
    assert tok.encode("low lower") == [513, 516]
    # "lowest": [l, o, w, e, s, t</w>] -> (l,o) -> [lo, w, e, s, t</w>] -> (lo,w) -> [low, e, s, t</w>]
    assert tok.encode("lowest") == [515, ord("e") - 33, ord("s") - 33, 256 + ord("t") - 33]
    # "lo" ends in o</w>, and no merge joins (l, o</w>)
    assert tok.encode("lo") == [ord("l") - 33, 256 + ord("o") - 33]
    assert tok.decode(tok.encode("Low, LOWEST lower")) == "low , lowest lower"


def test_min_count_stops_training():
    tok = bpe.learn(["low low low lower"], vocab_size=600)
    assert tok.merges == [("l", "o"), ("lo", "w</w>")]       # the rest occur once


def test_bytes_to_unicode_table():
    table = bpe.bytes_to_unicode()
    assert len(set(table.values())) == 256 and table[ord("a")] == "a" and table[ord(" ")] == "\u0120"
    assert all(c.isprintable() and not c.isspace() for c in table.values())


def test_clean():
    assert bpe.clean("  Caf\u0065\u0301 &amp;amp;  \u201cTea\u201d\n") == 'café & "tea"'
    assert bpe.clean("don\u2019t") == "don't"
    assert bpe.clean("ﬁne Ｈｉ！") == "fine hi!"


@pytest.fixture(scope="module")
def trained():
    corpus = TEXTS * 3 + ["the quick brown fox jumps over the lazy dog " * 5, "über straße 東京 tokyo " * 4]
    return bpe.learn(corpus, vocab_size=800, min_count=1)


@pytest.mark.parametrize("text", TEXTS)
def test_round_trip(trained, text):
    """decode(encode(t)) gives back t up to CLIP's cleaning: lowercase, NFC, and words joined by one space."""
    words = bpe.PATTERN.findall(bpe.clean(text))
    assert trained.decode(trained.encode(text)) == " ".join(words)


def test_encode_cleans_the_text_first(trained):
    """What fix_text and clean undo (entities, curly quotes, a ligature, full-width letters, case,
    spacing) does not change the tokens."""
    assert trained.encode("\u201cThe \ufb01ne  CAT\u201d &amp;amp; \uff34ea\n") == trained.encode('"the fine cat" & tea')


def test_docstring_examples():
    """The examples in bpe.py's docstrings (>>> lines: fix_text, clean, ...) are true."""
    import doctest
    result = doctest.testmod(bpe)
    assert result.attempted >= 3 and result.failed == 0


def test_round_trip_html():
    tok = bpe.learn(["fish &amp; chips"], 520)
    assert tok.decode(tok.encode("fish &amp;amp; chips &lt;3")) == "fish & chips < 3"


def test_tokenize_layout_and_truncation(trained):
    ids = trained.tokenize(["a cat", "hello world"], context_length=8)
    assert ids.shape == (2, 8) and ids.dtype == np.int64
    row = [trained.sot, *trained.encode("a cat"), trained.eot]
    assert list(ids[0]) == row + [0] * (8 - len(row))
    assert ids.argmax(axis=1).tolist() == [len(row) - 1, len(trained.encode("hello world")) + 1]
    with pytest.raises(ValueError, match=r"'x+' is \d+ tokens .* context length 4"):
        trained.tokenize(["x" * 50], context_length=4)
    cut = trained.tokenize(["x" * 50], context_length=4, truncate=True)[0]
    assert cut[0] == trained.sot and cut[-1] == trained.eot and cut.argmax() == 3


def test_save_and_load(tmp_path, trained):
    trained.save(tmp_path / "tok")
    again = bpe.load(tmp_path / "tok.bpe")
    assert again.merges == trained.merges and again.encoder == trained.encoder
    dump = (tmp_path / "tok.vocab").read_text(encoding="utf-8").splitlines()
    assert dump[ord("a") - 33] == f"{ord('a') - 33}\t[a]"
    assert any("<-" in line for line in dump) and dump[-1].endswith("[<|endoftext|>]")
    trained.save_hf(tmp_path / "hf")
    assert bpe.load(tmp_path / "hf").encode(TEXTS[1]) == trained.encode(TEXTS[1])
    assert bpe.load(tmp_path / "hf" / "vocab.json").encoder == trained.encoder
    assert bpe.from_list(trained.to_list()).merges == trained.merges


@pytest.mark.parametrize("content, message", [
    ("", "not a tokenizer file"),
    ("#version: miniclip-bpe 1\nab\n", "line 2: expected two symbols"),
    ("#version: miniclip-bpe 1\nt h\nth ex\n", "line 3: merge 'th ex' joins a symbol"),
])
def test_malformed_files(tmp_path, content, message):
    (tmp_path / "t.bpe").write_text(content)
    with pytest.raises(ValueError, match=message):
        bpe.load(tmp_path / "t.bpe")


def test_malformed_hf_and_gz(tmp_path):
    with pytest.raises(ValueError, match="no such file"):
        bpe.load(tmp_path / "missing.bpe")
    (tmp_path / "vocab.json").write_text("{oops")
    (tmp_path / "merges.txt").write_text("#version: 0.2\nt h\n")
    with pytest.raises(ValueError, match="cannot read"):
        bpe.load(tmp_path)
    (tmp_path / "vocab.json").write_text('{"a": 0}')
    with pytest.raises(ValueError, match="lacks"):
        bpe.load(tmp_path)
    (tmp_path / "v.txt.gz").write_bytes(gzip.compress(b"#version: 0.2\nt h\n")[:-6])
    with pytest.raises(ValueError, match="v.txt.gz"):
        bpe.load(tmp_path / "v.txt.gz")
    (tmp_path / "w.txt.gz").write_bytes(gzip.compress(b"#version: 0.2\nt h\n"))
    with pytest.raises(ValueError, match="needs 48894"):
        bpe.load(tmp_path / "w.txt.gz")


# --- Reference tier: transformers' CLIPTokenizer, and OpenAI's tokenizer with CLIP's own vocabulary.

# The Hugging Face tokenizer skips HTML unescaping and curly quotes (OpenAI's cleaning), so the texts
# compared with it have neither.
HF_TEXTS = [t for t in TEXTS if "&" not in t] + [
    "A photo of a RED circle on the left", "two dogs, three cats & one 🐟", "ÅÄÖ åäö ß", "\u00a0nbsp\u3000ideographic space",
    "a<|endoftext|>b", "12345678901234567890", "e-mail: someone@example.org", "tiếng việt có dấu",
]


def test_parity_with_transformers_on_our_vocabulary(tmp_path, trained):
    transformers = reference("transformers")
    trained.save_hf(tmp_path)
    hf = transformers.CLIPTokenizer.from_pretrained(str(tmp_path))
    for text in HF_TEXTS:
        assert hf(text)["input_ids"] == [trained.sot, *trained.encode(text), trained.eot], text


@pytest.fixture(scope="module")
def clip_vocab():
    return open_clip_file("bpe_simple_vocab_16e6.txt.gz")


def test_clip_vocabulary(clip_vocab):
    tok = bpe.load(clip_vocab)
    assert tok.vocab_size == 49408 and (tok.sot, tok.eot) == (49406, 49407)
    assert tok.encode("a photo of a cat") == [320, 1125, 539, 320, 2368]
    assert tok.tokenize("a diagram", 77)[0, :4].tolist() == [49406, 320, 22697, 49407]


@pytest.fixture(scope="module")
def openai_tokenizer(clip_vocab):
    """OpenAI's SimpleTokenizer (open_clip's copy of it), which cleans text with the real ftfy."""
    reference("ftfy")
    reference("torch")
    spec = importlib.util.spec_from_file_location("openai_tokenizer", open_clip_file("tokenizer.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.SimpleTokenizer(clip_vocab)


@functools.cache
def characters_ftfy_fixes():
    """Every code point that one of ftfy's fixed rules (or NFC) changes when it stands alone (a scan of
    all 1.1 million, about 4 s: done once for the tests that use it)."""
    ftfy_fixes = reference("ftfy.fixes")
    rules = [ftfy_fixes.unescape_html, ftfy_fixes.fix_c1_controls, ftfy_fixes.fix_latin_ligatures,
             ftfy_fixes.fix_character_width, ftfy_fixes.uncurl_quotes, ftfy_fixes.fix_line_breaks,
             ftfy_fixes.fix_surrogates, ftfy_fixes.remove_terminal_escapes, ftfy_fixes.remove_control_chars,
             lambda t: unicodedata.normalize("NFC", t)]
    return tuple(chr(c) for c in range(0x110000) if any(rule(chr(c)) != chr(c) for rule in rules))


def test_fix_text_equals_ftfy_on_every_character_it_fixes():
    """
    bpe.fix_text against ftfy.fix_text (default settings) on each of the ~3,500 characters its fixed
    rules change, alone and in contexts: next to letters, doubled, before a combining accent, and on a
    second line after an HTML entity and a "<" (which turns entity decoding off for the lines after).
    A text whose result changes when ftfy's mojibake repair is turned off is not ours to match.
    """
    ftfy = reference("ftfy")
    chars = characters_ftfy_fixes()
    assert len(chars) > 3000
    compared = 0
    for c in chars:
        for text in (c, f"a{c}b", c + c, f"e{c}\u0301", f"x &amp; {c}\n{c} < &amp;\n{c}&amp;"):
            want = ftfy.fix_text(text)
            if want == ftfy.fix_text(text, fix_encoding=False):
                assert bpe.fix_text(text) == want, ascii(text)
                compared += 1
    assert compared == 5 * len(chars)           # none of these needed mojibake repair
    # The rules that act on sequences rather than single characters.
    sequences = ["\x1b[31mred\x1b[0m plain", "\x1b[1;32;40mx", "&#27;[1mbold", "a\r\nb\rc\u2028d\x85e",
                 "\ud83d\ude00 and \ud800 alone", "&amp;amp;lt;", "&EACUTE;T&Eacute;", "&#x41;&#65;&#99999999;",
                 "AT&T; &amp", "\uff21\uff0d\uff3a", "\u0301e", "\u0135\u0133"]
    for text in sequences:
        assert bpe.fix_text(text) == ftfy.fix_text(text), ascii(text)


def test_ids_equal_openai_on_every_character_ftfy_fixes(clip_vocab, openai_tokenizer):
    tok = bpe.load(clip_vocab)
    for c in characters_ftfy_fixes():
        text = f"Ab {c}cd"
        assert tok.encode(text) == openai_tokenizer.encode(text), ascii(text)


def test_ids_equal_openai_on_real_text(clip_vocab, openai_tokenizer):
    """
    Real text with names from many languages: the copyright files of the Debian packages on this
    machine (about 390,000 lines where installed), every line with a non-ASCII character and every
    20th of the others, cut at 50,000 lines. Lines that need mojibake repair are counted and left out.
    """
    import glob
    ftfy = reference("ftfy")
    files = sorted(glob.glob("/usr/share/doc/*/copyright"))
    if not files:
        pytest.skip("no /usr/share/doc/*/copyright files on this machine")
    lines = []
    for path in files:
        with open(path, encoding="utf-8", errors="surrogateescape") as f:
            lines += [line for i, line in enumerate(f) if not line.isascii() or i % 20 == 0]
    lines = lines[:50_000]
    tok = bpe.load(clip_vocab)
    mojibake = 0
    for line in lines:
        if ftfy.fix_text(line) != ftfy.fix_text(line, fix_encoding=False):
            mojibake += 1
            continue
        assert tok.encode(line) == openai_tokenizer.encode(line), ascii(line)
    assert mojibake < len(lines) / 100


def test_parity_with_openai_tokenizer(clip_vocab, openai_tokenizer):
    """
    OpenAI's SimpleTokenizer (open_clip's copy, with ftfy) on CLIP's vocabulary: identical ids. open_clip
    renamed the special tokens to <start_of_text> and <end_of_text>, so in its copy a literal
    "<|endoftext|>" is ordinary text, while OpenAI's original, transformers and we read it as EOT; the
    text that holds one is compared with transformers only.
    """
    ref = openai_tokenizer
    tok = bpe.load(clip_vocab)
    cleaned_by_ftfy = ["fish &amp;amp; chips", "don\u2019t \u201cquote\u201d", "ﬁne ﬂour, ﬀ", "Ｆｕｌｌ ｗｉｄｔｈ！"]
    for text in TEXTS + HF_TEXTS + cleaned_by_ftfy:
        if "<|" not in text:
            assert tok.encode(text) == ref.encode(text), text


def test_parity_with_transformers_on_clip_vocabulary(tmp_path, clip_vocab):
    transformers = reference("transformers")
    tok = bpe.load(clip_vocab)
    tok.save_hf(tmp_path)
    hf = transformers.CLIPTokenizer.from_pretrained(str(tmp_path))
    for text in HF_TEXTS:
        assert hf(text)["input_ids"] == [tok.sot, *tok.encode(text), tok.eot], text
