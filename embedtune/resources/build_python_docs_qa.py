"""Build the ``python_docs_qa`` question/answer dataset from stdlib docstrings.

The dataset pairs a natural-language question (derived from the summary line
of a docstring in the CPython standard library) with an answer made of the
object's dotted name, its signature and the rest of its docstring.

Source files are parsed with :mod:`ast` and never imported.  APIs written in C
(builtins, ``str``/``dict`` methods, ``math``, ``os``, ...) have no Python
source, so a fixed, sorted allowlist of modules (``C_MODULES``), whose imports
have no side effects, is also walked with :mod:`inspect`; records from the
source walk win on any collision.  The output is byte-for-byte reproducible
for a given Python version and platform.

Usage::

    python -m embedtune.resources.build_python_docs_qa \\
        --out embedtune/resources/python_docs_qa.jsonl.gz
"""

from __future__ import annotations

import argparse
import ast
import copy
import gzip
import importlib
import inspect
import io
import json
import os
import random
import re
import sys
import sysconfig
import tokenize
import types
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

# Directories that are not part of the documented public stdlib surface, are
# GUI/demo code, or are vendored/test material whose docstrings are noise.
SKIP_DIRS = frozenset(
    {
        "site-packages",
        "dist-packages",
        "test",
        "tests",
        "idlelib",
        "tkinter",
        "turtledemo",
        "lib2to3",
        "ensurepip",
        "venv",
        "__pycache__",
        # Deprecated and removed in Python 3.12: teaching it would be stale.
        "distutils",
    }
)
# Easter eggs: importing them has side effects and their docstrings are jokes.
SKIP_FILES = frozenset({"this.py", "antigravity.py"})
# Module-level self-test helpers ("Test program.") document nothing useful.
SELF_TEST_FUNCS = frozenset({"test", "_test"})

MAX_RECORDS = 5000
SEED = 0
MIN_SUMMARY_WORDS = 4
MAX_SUMMARY_WORDS = 30
MIN_REST_CHARS = 40
MAX_REST_CHARS = 900
# A docstring is "mostly non-ASCII" above this fraction of non-ASCII chars.
MAX_NON_ASCII_FRACTION = 0.3
# A docstring is "dominated" by doctests above this fraction of its lines.
MAX_DOCTEST_LINE_FRACTION = 0.5

# Imperative verbs we know how to turn into "How do I <verb> ...?".  Third
# person forms ("Computes") are derived below so both styles are accepted.
# The list is deliberately closed: a summary that starts with anything else
# (a noun phrase, "This ...", a signature line) is skipped rather than being
# forced into an awkward question.
_VERBS = """
accept acquire activate add adjust advance allocate append apply archive
assert assign attach await build calculate call cancel canonicalize change
check choose clean clear close collect combine commit compare compile
compress compute configure connect construct consume convert copy
count create decode decompress deduce define delete deliver denormalize
deserialize detach detect determine disable discard disconnect display
dispatch download drain dump emit empty enable encode end ensure enter
enumerate escape establish evaluate execute exit expand export extend extract
feed fetch fill filter finalize find finish fix flatten flush fold force
format generate get grab guess handle hash import increment indent initialise
initialize insert inspect install interpret invalidate invoke issue iterate
join kill list load locate lock log look lookup make map mark match merge
modify move negotiate normalize notify obtain open output pack pad parse
pass patch perform pick poll pop populate prepare prepend print process
produce prompt push put query quote raise read receive record reduce refresh
register release reload remove rename render reopen repeat replace report
request reset resize resolve restore retrieve return reverse rewind round run
save scale scan schedule search seek select send serialize set setup shift
show shuffle shut shutdown sign signal simulate skip sleep sort spawn specify
split start stop store strip submit subtract swap switch take tell terminate
test tokenize transform translate traverse truncate try turn unescape unlink
unlock unpack unquote unregister unwrap update upgrade upload validate verify
visit wait walk wrap write yield zip
arrange bind block decide describe indicate
abort collapse concatenate decrement divide draw fork partition pause provide
pull recalculate resume rotate separate transfer wake
""".split()

# Adverbs that may precede the verb ("Recursively delete a directory tree").
_ADVERBS = frozenset(
    """asynchronously atomically efficiently explicitly forcibly gracefully
    immediately incrementally optionally recursively safely""".split()
)

# Verbs whose question reads better with a different verb.
_VERB_REWRITE = {"return": "get", "yield": "get", "setup": "set up", "lookup": "look up"}


def _third_person(verb: str) -> set[str]:
    """Return plausible 3rd-person singular spellings of an English verb."""
    forms = {verb + "s"}
    if re.search(r"(s|sh|ch|x|z|o)$", verb):
        forms.add(verb + "es")
    if re.search(r"[^aeiou]y$", verb):
        forms.add(verb[:-1] + "ies")
    return forms


# Map every accepted leading word (lowercase) to the base verb it stands for.
VERB_FORMS: dict[str, str] = {}
for _v in _VERBS:
    VERB_FORMS[_v] = _v
    for _f in _third_person(_v):
        # setdefault: a derived spelling never overrides a word already mapped
        # (base forms are assigned directly above, so "address" stays itself).
        VERB_FORMS.setdefault(_f, _v)

_WS = re.compile(r"\s+")
_PARA_SPLIT = re.compile(r"\n[ \t]*\n")
# Sentence boundary: terminal punctuation, whitespace, then an upper-case
# letter, digit or quote -- but not right after a common abbreviation
# ("the machine type, e.g. 'i386'").
_SENT_SPLIT = re.compile(
    r"(?<!\be\.g\.)(?<!\bi\.e\.)(?<!\beg\.)(?<!\bie\.)(?<!\bcf\.)(?<!\bvs\.)"
    r"(?<=[.!?])\s+(?=[A-Z0-9\"'(`])"
)
_DOCTEST_LINE = re.compile(r"^\s*(>>>|\.\.\.)(\s|$)")


def collapse(text: str) -> str:
    """Collapse all runs of whitespace into single spaces and strip."""
    return _WS.sub(" ", text).strip()


def is_public(name: str) -> bool:
    """Return True for names that are not private/dunder."""
    return not name.startswith("_")


def iter_source_files(stdlib: Path) -> Iterator[tuple[str, Path]]:
    """Yield ``(module_name, path)`` for public stdlib ``.py`` files, sorted."""
    paths: list[tuple[str, Path]] = []
    for dirpath, dirnames, filenames in os.walk(stdlib):
        rel_dir = Path(dirpath).relative_to(stdlib)
        # Prune in place so os.walk never descends into skipped trees.
        dirnames[:] = [d for d in dirnames if d not in SKIP_DIRS and is_public(d) and d.isidentifier()]
        for fn in filenames:
            if not fn.endswith(".py") or fn in SKIP_FILES:
                continue
            stem = fn[:-3]
            if stem == "__init__":
                parts = rel_dir.parts
            elif is_public(stem) and stem.isidentifier():
                parts = rel_dir.parts + (stem,)
            else:
                continue
            # Top-level directories like "config-3.11-..." are not packages.
            if not parts or not all(p.isidentifier() and is_public(p) for p in parts):
                continue
            paths.append((".".join(parts), Path(dirpath) / fn))
    # Sort by path (not os.walk order) so the result is filesystem independent.
    paths.sort(key=lambda mp: mp[1].relative_to(stdlib).as_posix())
    yield from paths


def parse_file(path: Path) -> ast.Module | None:
    """Parse a source file honouring its PEP 263 encoding; None on failure."""
    try:
        with tokenize.open(path) as fh:
            source = fh.read()
        return ast.parse(source, filename=str(path))
    except (SyntaxError, UnicodeDecodeError, ValueError):
        return None


def iter_top_level(body: list[ast.stmt]) -> Iterator[ast.stmt]:
    """Yield statements at module level, looking inside if/try blocks.

    Many stdlib modules define platform-specific variants inside ``if`` or
    ``try`` blocks; those are still the module's public API.
    """
    for node in body:
        if isinstance(node, ast.If):
            yield from iter_top_level(node.body)
            yield from iter_top_level(node.orelse)
        elif isinstance(node, ast.Try):
            for block in (node.body, node.orelse, node.finalbody):
                yield from iter_top_level(block)
            for handler in node.handlers:
                yield from iter_top_level(handler.body)
        else:
            yield node


def _decorator_names(node: ast.FunctionDef | ast.AsyncFunctionDef) -> set[str]:
    """Return the bare names of a function's decorators (``a.b`` -> ``b``)."""
    names = set()
    for dec in node.decorator_list:
        target = dec.func if isinstance(dec, ast.Call) else dec
        if isinstance(target, ast.Name):
            names.add(target.id)
        elif isinstance(target, ast.Attribute):
            names.add(target.attr)
    return names


def format_signature(func: ast.FunctionDef | ast.AsyncFunctionDef, is_method: bool) -> str:
    """Render ``(args)`` for a function, dropping the bound self/cls argument."""
    args = copy.deepcopy(func.args)
    if is_method and "staticmethod" not in _decorator_names(func):
        # The first positional parameter of a method is the instance/class,
        # whatever it is called; it is noise in a call signature.
        if args.posonlyargs:
            args.posonlyargs.pop(0)
        elif args.args:
            args.args.pop(0)
            # Defaults align with the *last* parameters, so if every
            # parameter had a default we must drop the first one too.
            if len(args.defaults) > len(args.posonlyargs) + len(args.args):
                args.defaults.pop(0)
    return "(" + ast.unparse(args) + ")"


def iter_documented(module: str, tree: ast.Module) -> Iterator[tuple[str, str, str, str]]:
    """Yield ``(qualname, kind, signature, docstring)`` for public objects.

    ``kind`` is ``"function"``, ``"class"`` or ``"method"``.
    """
    for node in iter_top_level(tree.body):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            # Module-level test()/main-style self-tests are not API.
            if is_public(node.name) and node.name not in SELF_TEST_FUNCS:
                doc = ast.get_docstring(node)
                if doc:
                    yield node.name, "function", format_signature(node, False), doc
        elif isinstance(node, ast.ClassDef) and is_public(node.name):
            methods = [n for n in node.body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]
            doc = ast.get_docstring(node)
            if doc:
                # A class is "called" with its __init__ arguments; if it does
                # not define one we cannot know them, so show no signature.
                init = next((m for m in methods if m.name == "__init__"), None)
                sig = format_signature(init, True) if init else ""
                yield node.name, "class", sig, doc
            for meth in methods:
                if not is_public(meth.name):
                    continue
                mdoc = ast.get_docstring(meth)
                if not mdoc:
                    continue
                decos = _decorator_names(meth)
                # Properties are accessed, not called: no parentheses.
                is_prop = bool(decos & {"property", "cached_property", "setter", "getter"})
                sig = "" if is_prop else format_signature(meth, True)
                yield f"{node.name}.{meth.name}", "method", sig, mdoc


def first_sentence(paragraph: str) -> tuple[str, str]:
    """Split a collapsed paragraph into its first sentence and the remainder."""
    parts = _SENT_SPLIT.split(paragraph, maxsplit=1)
    return parts[0], (parts[1] if len(parts) > 1 else "")


def _lower_first(text: str) -> str:
    """Lower-case the first letter unless the first word is an acronym."""
    word = text.split(" ", 1)[0]
    if len(word) > 1 and (word[1].isupper() or word[1].isdigit()):
        return text  # "URL", "HTTP", "IPv4" must keep their case.
    return text[:1].lower() + text[1:]


_RST_ROLE = re.compile(r":[a-z]+(?::[a-z]+)?:`([^`]+)`")
_RST_LITERAL = re.compile(r"``([^`]+)``")
_OLD_QUOTE = re.compile(r"`([^`']+)'")  # Emacs-style `quoting' in old modules.
_BACKTICK = re.compile(r"`([^`]+)`")
_EMPHASIS = re.compile(r"(?<!\w)\*([^*\s][^*]*)\*(?!\w)")


def strip_markup(text: str) -> str:
    """Remove reST/Emacs quoting so questions read as plain English."""
    for pattern in (_RST_ROLE, _RST_LITERAL, _OLD_QUOTE, _BACKTICK, _EMPHASIS):
        text = pattern.sub(r"\1", text)
    return text


# Leading words of a noun-phrase summary ("A Future-like object that ...").
# Articles are kept; a bare leading noun ("Base class for ...") gets "a"/"an".
_ARTICLES = frozenset({"a", "an", "the"})
_BARE_NOUNS = frozenset(
    """abstract asynchronous base basic class common context decorator descriptor
    error exception extended factory formatter generic handler helper interface
    iterator mapping metaclass mixin object primitive proxy selector simple
    subclass type wrapper""".split()
)
# Bare leading nouns that read best with "the" ("Number of ways to ...").
_THE_NOUNS = frozenset({"number"})
# Words that open the clause that qualifies the head noun; a finite verb
# before any of them means the summary is a sentence, not a noun phrase
# ("The default implementation does nothing").
_QUALIFIERS = frozenset(
    """that which who whose whom where when if for to of used with in on from
    by as like representing providing implementing containing describing
    returned raised called created""".split()
)
_FINITE = frozenset(
    """is are was were be been being does do did will would can could should
    must may might shall has have had not""".split()
)


def noun_phrase(summary: str) -> str | None:
    """Return ``summary`` as the object of "What is ...?", or None.

    Only summaries that open with an article or a known head noun qualify,
    and only if no finite verb precedes the qualifying clause.
    """
    if ";" in summary or " -- " in summary or re.search(r"(?i)\bthis\b", summary):
        return None  # Two clauses, or "this class/module": not self-contained.
    words = summary.split(" ")
    if len(words) > 1 and words[1].lower() in {"instances", "objects", "classes"}:
        return None  # "Handler instances dispatch ...": a sentence.
    first = words[0].lower()
    if first in _ARTICLES:
        if len(words) < 3 or words[1].lower() in {"same", "following", "default", "current", "above"}:
            return None
        phrase = _lower_first(summary)
    elif first in _BARE_NOUNS or first in _THE_NOUNS:
        article = "the" if first in _THE_NOUNS else "an" if first[0] in "aeiou" else "a"
        phrase = f"{article} {_lower_first(summary)}"
    else:
        return None
    for word in words[1:]:
        lw = word.lower().strip(",;()")
        if lw in _QUALIFIERS:
            break
        third_person = lw in VERB_FORMS and VERB_FORMS[lw] != lw
        if lw in _FINITE or third_person:
            return None
    return phrase


def make_question(summary: str, names: set[str], kind: str) -> str | None:
    """Turn a docstring summary sentence into a question, or None to skip.

    ``names`` holds identifiers (function/class/module names) that must not
    leak into the question, so the model has to learn semantics, not names.
    ``kind`` is ``"function"``, ``"method"`` or ``"class"``.
    """
    summary = strip_markup(summary).strip().rstrip(".;, ").strip()
    if not summary or ":" in summary:
        return None  # "Return X: iff Y", "Internal: ..." read badly as questions.
    # Reject code-like summaries ("Return -1 if x < y"): unnatural queries.
    if any(ch in summary for ch in "`|{}<>=\\") or ">>>" in summary:
        return None
    if summary.count("(") != summary.count(")") or summary.count('"') % 2:
        return None
    words = summary.split(" ")
    first = words[0].lower()
    adverb = ""
    if first in _ADVERBS and len(words) > 2:
        adverb, words = first + " ", words[1:]
        first = words[0].lower()
    rest = " ".join(words[1:])
    if not rest:
        return None
    base = VERB_FORMS.get(first)
    predicate = re.match(r"(?i)^(?:true|false)\s+(?:if|iff|when|whether)\s+(.+)$", rest)
    if not adverb and first in ("true", "whether") and kind != "class":
        # Boolean properties: "Whether X" / "True if X".
        m = re.match(r"(?i)^(?:if|iff|when|whether)\s+(.+)$", rest)
        body = m.group(1) if first == "true" and m else rest
        if first == "true" and not m:
            return None
        question = f"How do I check whether {body}?"
    elif not adverb and first == "raised" and kind == "class":
        # Exception classes: "Raised when X" -> which exception is that?
        m = re.match(r"(?i)^(when|if|by|on|for|after|while)\s+(.+)$", rest)
        if not m:
            return None
        question = f"What exception is raised {m.group(1).lower()} {m.group(2)}?"
    elif not adverb and first == "called" and kind == "method":
        # Framework hooks: "Called when a connection is made."
        m = re.match(r"(?i)^(when|after|before|if|for|on)\s+(.+)$", rest)
        if not m:
            return None
        question = f"Which method is called {m.group(1).lower()} {m.group(2)}?"
    elif base is None:
        noun = noun_phrase(" ".join(words)) if not adverb else None
        if noun is None:
            return None
        question = f"What is {noun}?"
    elif base == "return" and predicate:
        if rest[:1].lower() == "f":
            return None  # "Return False if X" would invert the meaning.
        question = f"How do I check whether {predicate.group(1)}?"
    elif base == "return" and re.match(r"(?i)^(whether|if)\s", rest):
        question = f"How do I check {_lower_first(rest)}?"
    elif base == "return" and re.match(r"(?i)^(none|self|it|nothing|true|false|-?\d+ if)\b", rest):
        return None  # "Return None ..." / "Return self" say nothing askable.
    else:
        verb = _VERB_REWRITE.get(base, base)
        question = f"How do I {adverb}{verb} {_lower_first(rest)}?"
    if question.startswith("How do I check "):
        # "Return True if X, False otherwise": the question is just "X?".
        question = re.sub(r",? (?:and |or )?(?:False|false)(?: otherwise| if .*)?\?$", "?", question)
    lowered = question.lower()
    if re.search(r"\b(self|cls)\b", lowered):
        return None  # Implementation-speak, not a user's question.
    for name in names:
        # Case-sensitive: "the future is done" is prose, "Future" is the class.
        if re.search(r"(?<![\w.])" + re.escape(name) + r"(?![\w])", question):
            return None
    return question


def leaks_name(question: str, module: str, qualname: str) -> bool:
    """Return True if the question references the object's names as code.

    Plain words such as "open" or "json" are allowed in prose, but "timeit()"
    or "map(fn, iter)" is a direct pointer to the identifier.
    """
    for name in set(module.split(".")) | set(qualname.split(".")):
        if re.search(r"(?<![\w.])" + re.escape(name) + r"\(", question):
            return True
    return False


def truncate_rest(paragraphs: list[str], limit: int = MAX_REST_CHARS) -> str:
    """Join paragraphs, cutting at a paragraph, then sentence, boundary."""
    out: list[str] = []
    used = 0
    for para in paragraphs:
        sep = 2 if out else 0
        if used + sep + len(para) <= limit:
            out.append(para)
            used += sep + len(para)
            continue
        # The paragraph does not fit whole: keep as many sentences as fit.
        budget = limit - used - sep
        kept = ""
        for sent in _SENT_SPLIT.split(para):
            cand = f"{kept} {sent}" if kept else sent
            if len(cand) > budget:
                break
            kept = cand
        if kept:
            out.append(kept)
        elif not out:
            # A single overlong sentence: cut at a word boundary and mark it.
            cut = para[: limit - 4].rsplit(" ", 1)[0]
            out.append(cut + " ...")
        break
    return "\n\n".join(out)


def build_record(module: str, qualname: str, kind: str, signature: str, doc: str) -> dict[str, str] | None:
    """Return a dataset record for one docstring, or None if it is skipped."""
    lines = [ln for ln in doc.splitlines() if ln.strip()]
    if not lines:
        return None
    doctest_lines = sum(1 for ln in lines if _DOCTEST_LINE.match(ln))
    if doctest_lines / len(lines) > MAX_DOCTEST_LINE_FRACTION:
        return None
    non_ascii = sum(1 for ch in doc if ord(ch) > 127)
    if non_ascii / max(1, len(doc)) > MAX_NON_ASCII_FRACTION:
        return None

    paragraphs = [collapse(p) for p in _PARA_SPLIT.split(doc.strip())]
    paragraphs = [p for p in paragraphs if p]
    summary, summary_tail = first_sentence(paragraphs[0])
    # The summary paragraph should be 4..30 words.  Many stdlib docstrings
    # have no blank line after a good first sentence, so fall back to that
    # sentence when the paragraph as a whole is too long.
    if len(paragraphs[0].split()) > MAX_SUMMARY_WORDS:
        n_words = len(summary.split())
    else:
        n_words = len(paragraphs[0].split())
    if not MIN_SUMMARY_WORDS <= n_words <= MAX_SUMMARY_WORDS:
        return None

    leaf = qualname.rsplit(".", 1)[-1]
    names = {module, module.rsplit(".", 1)[-1], qualname, leaf}
    names.update(qualname.split("."))
    # Short all-lowercase names are often plain English ("open", "copy",
    # "time"); forbidding them would drop good questions, so only forbid
    # names that clearly are identifiers.
    names = {n for n in names if "_" in n or "." in n or n != n.lower() or len(n) > 12}
    question = make_question(summary, names, kind)
    if question is None or leaks_name(question, module, qualname):
        return None

    # Sentences of the summary paragraph after the first one still carry
    # information, so they open the answer body instead of being dropped.
    body = ([summary_tail] if summary_tail else []) + paragraphs[1:]
    rest = truncate_rest(body)
    if len(rest) < MIN_REST_CHARS:
        return None
    obj_id = f"{module}.{qualname}"
    return {
        "id": obj_id,
        "question": question,
        "answer": f"{obj_id}{signature}\n\n{rest}",
        "source": module.split(".", 1)[0],
    }


# Modules whose public API is (largely) implemented in C, so the ast walk sees
# little or none of it.  They are imported -- importing them has no side
# effects -- and walked with inspect.  Fixed and sorted for reproducibility.
C_MODULES = (
    "array",
    "binascii",
    "bisect",
    "builtins",
    "bz2",
    "cmath",
    "codecs",
    "collections",
    "contextvars",
    "csv",
    "datetime",
    "decimal",
    "functools",
    "gc",
    "hashlib",
    "heapq",
    "io",
    "itertools",
    "lzma",
    "marshal",
    "math",
    "mmap",
    "operator",
    "os",
    "pickle",
    "random",
    "re",
    "select",
    "signal",
    "socket",
    "struct",
    "sys",
    "time",
    "unicodedata",
    "weakref",
    "zlib",
)
# ``__module__`` values that count as "defined by" a walked module besides
# the module itself and its ``_``-prefixed accelerator.
C_MODULE_ALIASES = {"hashlib": ("_blake2",), "os": ("posix",), "re": ("_sre",)}
# Descriptor types of C-implemented class members.
_C_MEMBER_TYPES = (
    types.BuiltinFunctionType,
    types.MethodDescriptorType,
    types.ClassMethodDescriptorType,
    types.GetSetDescriptorType,
    types.MemberDescriptorType,
)
# Old-style C docstrings start with call lines: "S.find(sub[, start]) -> int".
_SIG_LINE = re.compile(r"^[A-Za-z_][\w.]*(\(.*\))\s*(?:-+>\s*(\S.*))?$")
_DASH_SIG = re.compile(r"^[A-Za-z_][\w.]*(\([^\n]*?\))\s+--\s+(\S.*)$", re.S)
# Argument Clinic parameter blocks: "  path\n    Path to be examined; ...".
_CLINIC_PARAM = re.compile(r"(?m)^([ \t]*)(\*{0,2}[A-Za-z_]\w*)\n\1[ \t]+(?=\S)")
# Text that would make the output machine dependent.
_UNSTABLE = re.compile(r"\bat 0x[0-9a-fA-F]+|0x[0-9a-fA-F]{8,}|<unrepresentable>")


def _is_python_class(cls: type) -> bool:
    """Return True if a class defines any method in Python (the ast walk's job)."""
    for value in vars(cls).values():
        func = value.fget if isinstance(value, property) else getattr(value, "__func__", value)
        if isinstance(func, types.FunctionType):
            return True
    return False


def _c_signature(obj: object, drop_first: bool) -> str | None:
    """Render ``obj``'s signature from ``__text_signature__``; None if absent."""
    text_sig = getattr(obj, "__text_signature__", None)
    if not text_sig:
        return None
    try:
        sig = inspect.signature(obj)
    except (TypeError, ValueError):
        return None
    params = list(sig.parameters.values())
    if (
        drop_first
        and text_sig.startswith("($")
        and params
        and params[0].name == text_sig[2:].split(",")[0].split(")")[0]
    ):
        sig = sig.replace(parameters=params[1:])
    rendered = str(sig)
    return None if _UNSTABLE.search(rendered) else rendered


def _split_sig_lines(doc: str) -> tuple[list[str], str]:
    """Split leading call lines off an old-style C docstring.

    Returns ``([signature, ...], rest)`` where each signature is the text from
    the opening parenthesis on, e.g. ``"(sub[, start[, end]]) -> int"``.
    """
    lines = doc.split("\n")
    sigs: list[str] = []
    while lines and (m := _SIG_LINE.match(lines[0].strip())):
        sigs.append(m.group(1) + (f" -> {m.group(2)}" if m.group(2) else ""))
        lines.pop(0)
    return sigs, "\n".join(lines).strip()


def _c_doc(obj: object) -> str | None:
    """Return an object's own (not inherited) docstring, cleaned, or None."""
    doc = vars(obj).get("__doc__") if isinstance(obj, type) else getattr(obj, "__doc__", None)
    if not isinstance(doc, str) or not doc.strip():
        return None
    doc = inspect.cleandoc(doc)
    if _UNSTABLE.search(doc) or sys.prefix in doc or sys.exec_prefix in doc:
        return None
    return _CLINIC_PARAM.sub(r"\1\2: ", doc)


def _c_entry(obj: object, name: str, kind: str, drop_first: bool) -> tuple[str, str, str] | None:
    """Return ``(kind, signature, docstring)`` for one C object, or None."""
    doc = _c_doc(obj)
    if doc is None:
        return None
    sigs, doc = _split_sig_lines(doc)
    # "D.index(value, [start, [stop]]) -- return first index of value."
    m = _DASH_SIG.match(doc)
    if m and not sigs:
        sigs, doc = [m.group(1)], m.group(2)[:1].upper() + m.group(2)[1:]
    if not doc:
        return None  # The docstring was only a call line.
    sig = _c_signature(obj, drop_first)
    if isinstance(obj, (types.GetSetDescriptorType, types.MemberDescriptorType)):
        sig = ""  # Attributes are accessed, not called.
    elif sig is None:
        # Fall back to the docstring's own call lines; further overloads
        # follow on their own lines, as help() shows them.
        sig = "\n".join(sigs[:1] + [f"{name}{s}" for s in sigs[1:]]) if sigs else ""
    return kind, sig, doc


def iter_c_documented(module: str) -> Iterator[tuple[str, str, str, str]]:
    """Yield ``(qualname, kind, signature, docstring)`` for C-implemented API.

    Only objects implemented in C are yielded: builtin functions, classes
    with no Python-defined methods, and C members (methods, attributes) of
    any public class, including members inherited from private C bases such
    as ``_socket.socket``.  Members inherited from builtin types are left to
    the ``builtins`` walk.  Names are visited in sorted order.
    """
    mod = importlib.import_module(module)
    owners = {module, "_" + module, *C_MODULE_ALIASES.get(module, ())}
    for name in sorted(dir(mod)):
        if not is_public(name):
            continue
        obj = getattr(mod, name)
        if isinstance(obj, types.BuiltinFunctionType):
            self_obj = getattr(obj, "__self__", None)
            bound = self_obj is not None and not isinstance(self_obj, types.ModuleType)
            if not bound and getattr(obj, "__module__", None) not in owners:
                continue  # Re-exported from elsewhere (or a hidden instance).
            entry = _c_entry(obj, name, "function", False)
            if entry:
                yield (name, *entry)
        elif isinstance(obj, type):
            if obj.__module__ not in owners or obj.__name__ != name:
                continue  # Re-exported (os.error is OSError) or an alias.
            if not _is_python_class(obj):
                entry = _c_entry(obj, name, "class", False)
                if entry:
                    yield (name, *entry)
            for attr in sorted(dir(obj)):
                if not is_public(attr):
                    continue
                owner = next(k for k in obj.__mro__ if attr in vars(k))
                if owner is object or (owner is not obj and owner.__module__ == "builtins"):
                    continue  # Documented once, under the builtin type.
                raw = vars(owner)[attr]
                if isinstance(raw, (staticmethod, classmethod)):
                    raw = raw.__func__
                if not isinstance(raw, _C_MEMBER_TYPES):
                    continue  # Python code, constants, nested classes.
                drop_first = isinstance(raw, (types.MethodDescriptorType, types.ClassMethodDescriptorType))
                entry = _c_entry(raw, attr, "method", drop_first)
                if entry:
                    yield (f"{name}.{attr}", *entry)


def norm(text: str) -> str:
    """Normalise text for de-duplication."""
    return collapse(text).lower()


def build(stdlib: Path, max_records: int = MAX_RECORDS) -> list[dict[str, str]]:
    """Build the full, de-duplicated, shuffled list of records."""
    candidates: list[dict[str, str]] = []
    for module, path in iter_source_files(stdlib):
        tree = parse_file(path)
        if tree is None:
            continue
        for qualname, kind, sig, doc in iter_documented(module, tree):
            rec = build_record(module, qualname, kind, sig, doc)
            if rec is not None:
                candidates.append(rec)

    ast_ids = {r["id"] for r in candidates}
    c_candidates: list[dict[str, str]] = []
    for module in C_MODULES:
        for qualname, kind, sig, doc in iter_c_documented(module):
            rec = build_record(module, qualname, kind, sig, doc)
            # Records from the source walk win when an id collides.
            if rec is not None and rec["id"] not in ast_ids:
                c_candidates.append(rec)

    # Stable sort by id so de-duplication keeps a well-defined "first" record
    # (e.g. genericpath before ntpath before posixpath for shared docstrings).
    # Source-walk records all come first, so they also win duplicate
    # questions and answers against C docstrings.
    candidates.sort(key=lambda r: r["id"])
    c_candidates.sort(key=lambda r: r["id"])
    candidates += c_candidates
    seen_ids: set[str] = set()
    seen_q: set[str] = set()
    seen_a: set[str] = set()
    records: list[dict[str, str]] = []
    for rec in candidates:
        # Body-only answer key: platform variants share a body but differ in id.
        q_key = norm(rec["question"])
        a_key = norm(rec["answer"].split("\n\n", 1)[1])
        if rec["id"] in seen_ids or q_key in seen_q or a_key in seen_a:
            continue
        seen_ids.add(rec["id"])
        seen_q.add(q_key)
        seen_a.add(a_key)
        records.append(rec)

    random.Random(SEED).shuffle(records)
    return records[:max_records]


def write_jsonl_gz(records: list[dict[str, str]], out: Path) -> None:
    """Write records as gzip JSONL with a fixed header for reproducibility."""
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "wb") as raw:
        # gzip.open() cannot set mtime and embeds the file name in the header;
        # GzipFile with filename="" and mtime=0 makes the bytes depend only
        # on the content.
        with gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0) as gz:
            with io.TextIOWrapper(gz, encoding="utf-8", newline="\n") as fh:
                for rec in records:
                    fh.write(json.dumps(rec, ensure_ascii=False) + "\n")


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="output .jsonl.gz path")
    parser.add_argument(
        "--stdlib",
        type=Path,
        default=Path(sysconfig.get_paths()["stdlib"]),
        help="stdlib source directory (default: the running Python's)",
    )
    parser.add_argument("--max-records", type=int, default=MAX_RECORDS)
    args = parser.parse_args(argv)

    records = build(args.stdlib, args.max_records)
    write_jsonl_gz(records, args.out)
    by_source = Counter(r["source"] for r in records)
    print(
        f"wrote {len(records)} records from {len(by_source)} sources to {args.out} (Python {sys.version.split()[0]})",
        file=sys.stderr,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
