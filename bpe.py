"""
Byte-level byte-pair encoding (BPE), the tokenizer of CLIP, trained from scratch or loaded from
CLIP's own vocabulary.

BPE starts from single bytes and learns merges: repeatedly, the most frequent adjacent pair of
symbols in the training words becomes one new symbol. Encoding a word replays the learned merges
in the order they were learned. CLIP's variant has four details that a published vocabulary depends on:

1. Bytes, shown as printable characters. Every UTF-8 byte maps to one printable unicode character
   (bytes_to_unicode), so any text can be encoded and nothing is ever unknown.
2. An end-of-word marker. The last symbol of each word carries "</w>", so "a" inside a word and "a"
   at its end are different symbols. The decoder turns "</w>" back into a space.
3. Pre-tokenizing. A regex cuts text into words first (contractions, runs of letters, single digits,
   runs of other symbols; whitespace is dropped), and merges never cross a word's boundary.
4. Cleaning. ftfy's fixed rules run first (curly quotes straightened, ligatures split, full-width
   letters narrowed, NFC, ...; see fix_text), then text is HTML-unescaped twice, whitespace is
   collapsed and stripped, and everything is lowercased. ftfy's mojibake repair (UTF-8 that was
   decoded as Latin-1, "cafÃ©") is left out: such text tokenizes as it is written.

The vocabulary is laid out as CLIP's is: the 256 byte symbols, the same 256 with "</w>", one symbol
per merge, and then <|startoftext|> and <|endoftext|>, which take the two highest ids. The model finds
the end of a text as the position of the highest id, so that order matters.
"""
import gzip
import heapq
import html
import html.entities
import json
import os
import unicodedata
from collections import Counter, defaultdict

import numpy
import regex

SOT, EOT, EOW = "<|startoftext|>", "<|endoftext|>", "</w>"

# CLIP's pre-tokenizer. IGNORECASE makes the contractions match in capitals too, before lowercasing.
PATTERN = regex.compile(
    r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""",
    regex.IGNORECASE)


def bytes_to_unicode():
    """
    A printable character for each of the 256 byte values, the table of GPT-2 and CLIP. Bytes that
    are printable already (! to ~, and the Latin-1 ranges from 0xA1) stand for themselves; the other
    68 (control codes, space, ...) take the characters from U+0100 on, in order. So byte 0x20 (space)
    is 'Ġ' (U+0120) and 'a' is 'a'.
    """
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    return {**{b: chr(b) for b in printable}, **{b: chr(256 + n) for n, b in enumerate(others)}}


BYTE_TO_CHAR = bytes_to_unicode()                       # in CLIP's vocabulary order: printable bytes first
CHAR_TO_BYTE = {c: b for b, c in BYTE_TO_CHAR.items()}
# -----------------------------------------------------------------------------
# Cleaning. OpenAI's tokenizer runs ftfy.fix_text (ftfy 6, default settings) on every text. Its fixes
# are of two kinds. Mojibake repair guesses, from statistics of how text is usually garbled, that
# "cafÃ©" was UTF-8 read as Latin-1; we leave that out (it needs ftfy's tables of encodings and its
# "badness" heuristics). Everything else is a fixed rule, and fix_text below applies each one in
# ftfy's order, so on any text that needs no mojibake repair the ids equal OpenAI's:
#   1. HTML entities, "&amp;" -> "&" (only before the first line that holds a "<": that text may be HTML)
#   2. C1 control characters U+0080-U+009F read as the Windows-1252 bytes they usually were ("\x93" -> '“')
#   3. Latin ligatures and digraphs split ("ﬁ" -> "fi", "ĳ" -> "ij"); "æ" and "œ" are letters and stay
#   4. full-width and half-width forms made normal width ("Ｈ" -> "H", "ｶ" -> "カ"), the ideographic space too
#   5. curly quotes straightened (U+2018-U+201B and U+02BC -> "'", U+201C-U+201F -> '"')
#   6. line breaks ("\r\n", "\r", U+2028, U+2029, U+0085) made "\n"
#   7. UTF-16 surrogates: a pair joined into its character, a lone one replaced by U+FFFD
#   8. terminal color codes ("\x1b[31m") removed
#   9. control characters removed, except the whitespace ones (tab, newline, form feed, carriage return)
#  10. NFC normalization
# ftfy repeats the ten until nothing changes, on each line of the text separately.


def windows_1252(byte):
    """The character a Windows-1252 decoder gives a byte, or Latin-1's where that codec has none (0x81...)."""
    try:
        return bytes([byte]).decode("cp1252")
    except UnicodeDecodeError:
        return chr(byte)


LIGATURES = {"Ĳ": "IJ", "ĳ": "ij", "ŉ": "ʼn", "Ǳ": "DZ", "ǲ": "Dz", "ǳ": "dz", "Ǆ": "DŽ", "ǅ": "Dž", "ǆ": "dž",
             "Ǉ": "LJ", "ǈ": "Lj", "ǉ": "lj", "Ǌ": "NJ", "ǋ": "Nj", "ǌ": "nj",
             "ﬀ": "ff", "ﬁ": "fi", "ﬂ": "fl", "ﬃ": "ffi", "ﬄ": "ffl", "ﬅ": "ſt", "ﬆ": "st"}


def character_maps():
    """Rules 2-5 as four {char: replacement} maps, in the order they run."""
    c1 = {chr(b): windows_1252(b) for b in range(0x80, 0xA0)}
    width = {"\u3000": " ", **{chr(c): unicodedata.normalize("NFKC", chr(c)) for c in range(0xFF01, 0xFFF0)
                               if unicodedata.normalize("NFKC", chr(c)) != chr(c)}}
    quotes = {"\u02bc": "'", **{chr(c): "'" for c in range(0x2018, 0x201C)}, **{chr(c): '"' for c in range(0x201C, 0x2020)}}
    return c1, LIGATURES, width, quotes


def composed_table(maps):
    """One str.translate table that does what the maps do one after another: each output is passed on."""
    table = {}
    for char in set().union(*maps):
        out = char
        for m in maps:
            out = "".join(m.get(c, c) for c in out)
        table[ord(char)] = out
    return table


CHARACTER_FIXES = composed_table(character_maps())
CONTROL_CHARS = dict.fromkeys([*range(0x00, 0x09), 0x0B, *range(0x0E, 0x20), 0x7F, *range(0x206A, 0x2070),
                               0xFEFF, *range(0xFFF9, 0xFFFD)])
LINE_BREAKS = regex.compile("\r\n|[\r\u2028\u2029\u0085]")
SURROGATE_PAIR, SURROGATE = regex.compile("[\ud800-\udbff][\udc00-\udfff]"), regex.compile("[\ud800-\udfff]")
TERMINAL_ESCAPE = regex.compile(r"\x1b\[[\d;]*[a-zA-Z]")
ENTITY = regex.compile(r"&#?[0-9A-Za-z]{1,24};")


def named_entities():
    """HTML5's named entities that end in ";", and the all-capitals spelling of lowercase ones ("&EACUTE;")."""
    out = {}
    for name, char in html.entities.html5.items():
        if name.endswith(";"):
            out["&" + name] = char
            if name == name.lower() and html.unescape("&" + name.upper()) == "&" + name.upper():
                out["&" + name.upper()] = char.upper()
    return out


NAMED_ENTITIES = named_entities()


def unescape_entity(match):
    """One "&...;": a named entity, or a numeric one that decodes whole; anything else stays as written."""
    text = match.group(0)
    if text in NAMED_ENTITIES:
        return NAMED_ENTITIES[text]
    if text.startswith("&#"):
        out = html.unescape(text)
        return text if ";" in out else out
    return text


def join_surrogates(match):
    high, low = map(ord, match.group(0))
    return chr(0x10000 + (high - 0xD800) * 0x400 + (low - 0xDC00))


def fix_text(text):
    r"""
    ftfy.fix_text's fixed rules (the list above) without its mojibake repair.
    >>> fix_text("\u201cﬁne\u201d &amp; Ｈi\x1b[0m\r\n")
    '"fine" & Hi\n'
    """
    if text.isascii() and text.isprintable() and "&" not in text:     # most captions: no rule applies
        return text
    out, entities = [], True
    for line in regex.findall(r"[^\n]{1,1000000}\n?|\n", text):          # ftfy's segments: line by line
        entities = entities and "<" not in line
        while True:
            before = line
            if entities:
                line = ENTITY.sub(unescape_entity, line)
            line = line.translate(CHARACTER_FIXES)
            line = LINE_BREAKS.sub("\n", line)
            if SURROGATE.search(line):
                line = SURROGATE.sub("\ufffd", SURROGATE_PAIR.sub(join_surrogates, line))
            line = TERMINAL_ESCAPE.sub("", line).translate(CONTROL_CHARS)
            line = unicodedata.normalize("NFC", line)
            if line == before:
                break
        out.append(line)
    return "".join(out)


def clean(text):
    """
    The text as CLIP tokenizes it: fix_text, HTML entities decoded twice more, whitespace collapsed,
    lowercased.
    >>> clean("  Caf\\u0065\\u0301 &amp;amp;  \\u201cTea\\u201d\\n")
    'café & "tea"'
    """
    text = fix_text(text)
    if "&" in text:
        text = html.unescape(html.unescape(text))
    return " ".join(text.split()).lower()


# bytes_to_unicode as a str.translate table on text decoded as Latin-1, where character i is byte i.
BYTE_SYMBOLS = {b: c for b, c in BYTE_TO_CHAR.items() if chr(b) != c}


def pretokenize(text):
    """Clean a text and cut it into words, each a string of byte symbols: "hi, you" -> ['hi', ',', 'you']."""
    return [word.encode("utf-8").decode("latin-1").translate(BYTE_SYMBOLS) for word in PATTERN.findall(clean(text))]


def word_symbols(word):
    """A word's starting symbols, one per byte, with the end-of-word marker on the last: 'hi' -> ['h', 'i</w>']."""
    return [*word[:-1], word[-1] + EOW]


def merge(symbols, pair, new):
    """
    Replace every occurrence of `pair` in `symbols`, left to right, by `new`.
    >>> merge(['a', 'a', 'a', 'b</w>'], ('a', 'a'), 'aa')
    ['aa', 'a', 'b</w>']
    """
    out, i = [], 0
    while i < len(symbols):
        if i + 1 < len(symbols) and symbols[i] == pair[0] and symbols[i + 1] == pair[1]:
            out.append(new)
            i += 2
        else:
            out.append(symbols[i])
            i += 1
    return out


# -----------------------------------------------------------------------------
# Training


def learn(texts, vocab_size, min_count=2, verbose=False):
    """
    Learn merges from an iterable of texts until the vocabulary holds vocab_size tokens (512 byte
    symbols + merges + 2 specials), or no pair occurs min_count times. Returns a Tokenizer.

    Two things keep it fast. Each distinct word is stored once with its count, so a corpus of many
    megabytes becomes a few thousand short lists. And pair counts are updated, not recounted: merging
    (a, b) only changes the words that contain it, so we subtract those words' old pairs, add their
    new ones, and push the changed counts onto a heap. A heap entry whose count is no longer current
    is stale and skipped when popped. Ties go to the pair that sorts first, so training is deterministic.
    """
    n_merges = vocab_size - 2 * 256 - 2
    if n_merges < 0:
        raise ValueError(f"vocab_size must be at least 514 (bytes, bytes with </w>, 2 specials), got {vocab_size}")
    counts = Counter(w for text in texts for w in pretokenize(text) if w not in (SOT, EOT))
    words = [word_symbols(w) for w in counts]
    freqs = list(counts.values())

    pair_counts = defaultdict(int)                      # (a, b) -> occurrences in the corpus
    where = defaultdict(set)                            # (a, b) -> indices of the words holding it
    for i, (w, f) in enumerate(zip(words, freqs)):
        for pair in zip(w, w[1:]):
            pair_counts[pair] += f
            where[pair].add(i)
    heap = [(-c, pair) for pair, c in pair_counts.items()]
    heapq.heapify(heap)

    merges = []
    while len(merges) < n_merges and heap:
        neg, pair = heapq.heappop(heap)
        if pair_counts.get(pair, 0) != -neg:            # stale: the count changed after this push
            continue
        if -neg < min_count:
            break
        merges.append(pair)
        new = pair[0] + pair[1]
        changed = set()
        for i in where.pop(pair):
            w, f = words[i], freqs[i]
            merged = merge(w, pair, new)
            if len(merged) == len(w):                   # an earlier merge already consumed the pair
                continue
            for p in zip(w, w[1:]):
                pair_counts[p] -= f
                changed.add(p)
            for p in zip(merged, merged[1:]):
                pair_counts[p] += f
                where[p].add(i)
                changed.add(p)
            words[i] = merged
        for p in changed:
            if pair_counts[p] > 0:
                heapq.heappush(heap, (-pair_counts[p], p))
            else:
                del pair_counts[p]
        if verbose and len(merges) % 1000 == 0:
            print(f"bpe: {len(merges)} merges, last {pair} seen {-neg} times")
    return Tokenizer(merges)


# -----------------------------------------------------------------------------
# Encoding and decoding


class Tokenizer:
    """A byte-level BPE tokenizer in CLIP's layout, made from its list of merges."""

    def __init__(self, merges, vocab=None):
        """
        merges: a list of (a, b) symbol pairs, in the order they were learned.
        vocab: an optional {token: id} dict, as in a Hugging Face vocab.json. Without it, the ids are
        CLIP's layout (see the module docstring), which is what CLIP's vocab.json holds too.
        """
        self.merges = [tuple(p) for p in merges]
        self.ranks = {p: i for i, p in enumerate(self.merges)}
        base = list(BYTE_TO_CHAR.values())
        tokens = base + [c + EOW for c in base] + [a + b for a, b in self.merges] + [SOT, EOT]
        if vocab is None:
            vocab = {t: i for i, t in enumerate(tokens)}
        else:
            missing = [t for t in tokens if t not in vocab]
            if missing:
                raise ValueError(f"the vocabulary lacks {len(missing)} tokens that the merges make, "
                                 f"such as {missing[0]!r}")
        self.encoder = dict(vocab)
        self.decoder = {i: t for t, i in vocab.items()}
        self.sot, self.eot = vocab[SOT], vocab[EOT]
        self.cache = {SOT: [self.sot], EOT: [self.eot]}

    @property
    def vocab_size(self):
        return max(self.decoder) + 1

    def bpe(self, word):
        """
        Apply the merges to one word, lowest rank first, as they were learned.
        With merges [('l', 'o'), ('lo', 'w</w>')]: 'low' -> ['l', 'o', 'w</w>'] -> ['lo', 'w</w>'] -> ['low</w>']
        """
        symbols = word_symbols(word)
        while len(symbols) > 1:
            pair = min(zip(symbols, symbols[1:]), key=lambda p: self.ranks.get(p, len(self.ranks)))
            if pair not in self.ranks:
                break
            symbols = merge(symbols, pair, pair[0] + pair[1])
        return symbols

    def encode(self, text):
        """Text to token ids, without <|startoftext|> and <|endoftext|> around them."""
        ids = []
        for word in pretokenize(text):
            cached = self.cache.get(word)
            if cached is None:
                cached = self.cache[word] = [self.encoder[s] for s in self.bpe(word)]
            ids.extend(cached)
        return ids

    def decode(self, ids):
        """
        Token ids to text. "</w>" becomes a space, so words come back separated by single spaces: the
        cleaning (lowercase, collapsed whitespace) and the regex's dropping of whitespace are not undone.
        """
        out = bytearray()
        for i in ids:
            token = self.decoder[int(i)]
            if token in (SOT, EOT):
                out += token.encode()
                continue
            word = token.removesuffix(EOW)
            out += bytes(CHAR_TO_BYTE[c] for c in word)
            if len(word) < len(token):
                out += b" "
        return out.decode("utf-8", errors="replace").rstrip(" ")

    def tokenize(self, texts, context_length=77, truncate=False):
        """
        A batch of texts as model input: an int64 array (N, context_length), each row
        [SOT, text ids..., EOT, 0, 0, ...]. A text that does not fit raises ValueError, unless truncate
        is on: then it is cut and EOT takes the last slot.
        """
        if isinstance(texts, str):
            texts = [texts]
        out = numpy.zeros((len(texts), context_length), dtype=numpy.int64)
        for row, text in enumerate(texts):
            ids = [self.sot, *self.encode(text), self.eot]
            if len(ids) > context_length:
                if not truncate:
                    shown = text if len(text) <= 60 else text[:57] + "..."
                    raise ValueError(f"text {shown!r} is {len(ids)} tokens with SOT and EOT, over the "
                                     f"context length {context_length}")
                ids = ids[:context_length - 1] + [self.eot]
            out[row, :len(ids)] = ids
        return out

    # -------------------------------------------------------------------------
    # Files

    def save(self, prefix):
        """
        Write prefix.bpe, the merges one per line (what load() reads), and prefix.vocab, a dump for
        people: each token's id, its text, and the two tokens it was merged from.
        """
        write_atomic(f"{prefix}.bpe", "\n".join([MINICLIP_HEADER] + [f"{a} {b}" for a, b in self.merges]) + "\n")
        merged_from = {self.encoder[a + b]: (a, b) for a, b in self.merges}
        lines = []
        for i, token in sorted(self.decoder.items()):
            line = f"{i}\t[{self.readable(token)}]"
            if i in merged_from:
                a, b = merged_from[i]
                line += f"\t<- [{self.readable(a)}] + [{self.readable(b)}]"
            lines.append(line)
        write_atomic(f"{prefix}.vocab", "\n".join(lines) + "\n")

    @staticmethod
    def readable(token):
        """A token as text: bytes that are not whole UTF-8 characters show as '\ufffd', controls escaped."""
        if token in (SOT, EOT):
            return token
        word = token.removesuffix(EOW)
        text = bytes(CHAR_TO_BYTE[c] for c in word).decode("utf-8", errors="replace")
        return "".join(c if c.isprintable() else f"\\u{ord(c):04x}" for c in text) + token[len(word):]

    def save_hf(self, folder):
        """Write vocab.json and merges.txt, the files of a Hugging Face CLIP tokenizer."""
        os.makedirs(folder, exist_ok=True)
        write_atomic(os.path.join(folder, "vocab.json"), json.dumps(self.encoder, ensure_ascii=False))
        write_atomic(os.path.join(folder, "merges.txt"),
                     "\n".join(["#version: 0.2"] + [f"{a} {b}" for a, b in self.merges]) + "\n")

    def to_list(self):
        """The merges as "a b" strings, for storing the tokenizer inside a model checkpoint."""
        return [f"{a} {b}" for a, b in self.merges]


MINICLIP_HEADER = "#version: miniclip-bpe 1"
CLIP_MERGES = 49408 - 256 * 2 - 2       # OpenAI's vocabulary uses this many of the merges its file holds


def write_atomic(path, text):
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, path)


def parse_merges(lines, source, first_line=1):
    """("a b" lines) -> [(a, b), ...]. Each merge must join two symbols that exist by then."""
    known = set(BYTE_TO_CHAR.values()) | {c + EOW for c in BYTE_TO_CHAR.values()}
    merges = []
    for n, line in enumerate(lines, start=first_line):
        parts = line.split(" ")
        if len(parts) != 2 or not all(parts):
            raise ValueError(f"{source}, line {n}: expected two symbols separated by a space, got {line[:80]!r}")
        a, b = parts
        if a not in known or b not in known:
            raise ValueError(f"{source}, line {n}: merge {line!r} joins a symbol that no earlier line made")
        known.add(a + b)
        merges.append((a, b))
    return merges


def from_list(merges):
    """The inverse of Tokenizer.to_list."""
    return Tokenizer(parse_merges(merges, "checkpoint tokenizer"))


def load(path):
    """
    Read a tokenizer from any of:
      - OpenAI's bpe_simple_vocab_16e6.txt.gz (CLIP's 49,408-token vocabulary);
      - a Hugging Face tokenizer folder, or its vocab.json or merges.txt (the other beside it);
      - our own prefix.bpe, written by Tokenizer.save.
    Raises ValueError with the file and the problem when a file is missing, malformed or truncated.
    """
    path = os.fspath(path)
    if os.path.isdir(path):
        vocab_file, merges_file = os.path.join(path, "vocab.json"), os.path.join(path, "merges.txt")
    elif path.endswith(("vocab.json", "merges.txt")):
        folder = os.path.dirname(path)
        vocab_file, merges_file = os.path.join(folder, "vocab.json"), os.path.join(folder, "merges.txt")
    else:
        vocab_file = merges_file = None
    try:
        if merges_file:
            with open(merges_file, encoding="utf-8") as f:
                lines = f.read().splitlines()
            if lines and lines[0].startswith("#version"):
                lines = lines[1:]
            with open(vocab_file, encoding="utf-8") as f:
                vocab = json.load(f)
            if not isinstance(vocab, dict) or not all(isinstance(i, int) for i in vocab.values()):
                raise ValueError(f"{vocab_file}: expected a JSON object of token -> id")
            return Tokenizer(parse_merges([l for l in lines if l], merges_file, 2), vocab)
        if path.endswith(".gz"):
            with gzip.open(path, "rt", encoding="utf-8") as f:
                lines = f.read().split("\n")
            # Line 0 is a version comment; the vocabulary is built from the first CLIP_MERGES merges.
            merges = lines[1:CLIP_MERGES + 1]
            if len(merges) < CLIP_MERGES:
                raise ValueError(f"{path}: holds {len(merges)} merges, CLIP's vocabulary needs {CLIP_MERGES}")
            return Tokenizer(parse_merges(merges, path, 2))
        with open(path, encoding="utf-8") as f:
            lines = f.read().splitlines()
        if not lines or lines[0] != MINICLIP_HEADER:
            raise ValueError(f"{path}: not a tokenizer file (expected the line {MINICLIP_HEADER!r} first)")
        return Tokenizer(parse_merges(lines[1:], path, 2))
    except FileNotFoundError as e:
        raise ValueError(f"{e.filename}: no such file") from None
    except (OSError, EOFError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: cannot read the tokenizer ({e})") from None
