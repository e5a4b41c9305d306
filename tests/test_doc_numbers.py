"""Every headline number in README.md and docs/*.md that carries a check marker equals its results file.

A marker is an HTML comment (invisible when the markdown is rendered) placed after the number it guards:

    lean peaks at 7.22 GiB, 0.443x the official step's RSS
    <!-- check cpu-2core-2026-12-01-xeon-gemm-conv/sd15_step.json:
         {'arms.lean.peak_rss_gib':.2f} GiB, {'arms.lean.peak_rss_vs_baseline':.3f}x -->

`check SOURCES: TEMPLATE`. SOURCES are files under benchmarks/results/, joined by ` + ` (several JSON files
become one list, addressed with a leading `*`). The TEMPLATE is rendered from the JSON and must occur,
whitespace and `**` aside, in the text the marker guards; ` ... ` separates fragments that must occur there in
that order. A `{...}` placeholder is a small expression: a quoted path into the JSON, numbers, + - * / **, and
min / max / len / sum / abs, then an optional format spec. Paths are dot-separated: a key (or a list index),
`*` for every item, or a filter `key=value&key^=prefix` that keeps the list items whose fields match. A text
source (a results README.md or log) takes plain fragments instead: each must occur verbatim in that file too.

The text a marker guards: on a line of its own, the paragraph, list item, table or code block just above it
(blank lines and other marker lines skipped); inside a paragraph, the paragraph's (or list item's) text before
it, after any earlier marker. So a stale figure fails, and a correct one elsewhere in the file cannot hide it.
"""
from __future__ import annotations

import ast
import json
import operator
import re
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
# Docs whose headline numbers must stay guarded: removing every marker from one of them fails too.
MUST_HAVE_MARKERS = ["README.md", "docs/performance.md", "docs/kernels.md", "docs/native_ops.md",
                     "docs/tiny_world.md", "docs/unet_stage.md", "docs/rewards.md", "docs/distributed.md"]

MARKER = re.compile(r"<!--\s*check\s+(?P<body>.*?)-->", re.S)
PLACEHOLDER = re.compile(r"\{(?P<expr>[^{}]+?)\}")
GAP = " ... "


@dataclass(frozen=True)
class Marker:
    doc: Path
    line: int  # 1-based, where the marker starts
    sources: tuple[str, ...]
    template: str
    guarded: str  # normalised text the marker guards

    @property
    def id(self) -> str:
        return f"{self.doc.relative_to(REPO)}:{self.line}"


TOKEN = re.compile(r"\x00\d+\x00")  # a marker, folded onto one line while the guarded text is found
LIST_ITEM = re.compile(r"\s*([-*+]|\d+\.)\s")  # a list item starts a block of its own


def _normalise(text: str) -> str:
    text = TOKEN.sub(" ", MARKER.sub(" ", text)).replace("**", "")
    return " ".join(text.split())


def _is_marker_line(line: str) -> bool:
    return bool(line.strip()) and not TOKEN.sub("", line).strip()


def _guarded_text(folded: str, index: int) -> str:
    """The text marker `index` guards (see the module docstring), in a text whose markers are tokens."""
    start = folded.index(f"\x00{index}\x00")
    line_begin = folded.rfind("\n", 0, start) + 1
    line_end = folded.find("\n", start)
    if _is_marker_line(folded[line_begin:] if line_end < 0 else folded[line_begin:line_end]):
        above = folded[:line_begin].split("\n")  # on a line of its own: the block just above
        while above and (not above[-1].strip() or _is_marker_line(above[-1])):
            above.pop()
        block: list[str] = []
        while above and above[-1].strip() and not LIST_ITEM.match(block[0] if block else ""):
            block.insert(0, above.pop())
        return _normalise("\n".join(block))
    *earlier, current = folded[:start].split("\n")  # inside a paragraph: its text before the marker,
    block = [current]                                 # after any earlier marker
    for line in reversed(earlier):
        if not line.strip() or LIST_ITEM.match(block[0]):
            break
        block.insert(0, line)
    before = "\n".join(block)
    ends = [m.end() for m in TOKEN.finditer(before)]
    return _normalise(before[ends[-1]:] if ends else before)


def _fold(text: str) -> str:
    counter = iter(range(10**6))
    return MARKER.sub(lambda m: f"\x00{next(counter)}\x00", text)


def _markers(doc: Path) -> list[Marker]:
    text = doc.read_text()
    folded = _fold(text)
    out = []
    for i, m in enumerate(MARKER.finditer(text)):
        body = " ".join(m.group("body").split())
        sources, sep, template = body.partition(": ")
        assert sep, f"{doc.name}: marker without 'SOURCES: TEMPLATE': {body!r}"
        out.append(Marker(doc, text.count("\n", 0, m.start()) + 1,
                          tuple(s.strip() for s in sources.split(" + ")), template, _guarded_text(folded, i)))
    return out


ALL_MARKERS = [m for doc in DOCS for m in _markers(doc)]


# ---- resolving paths into JSON and evaluating placeholders -------------------------------------------------

def _matches(item: object, cond: str) -> bool:
    key, op, value = re.match(r"([^=^]+)(\^=|=)(.*)", cond).groups()
    if not isinstance(item, dict) or key not in item:
        return False
    field = str(item[key])
    return field.startswith(value) if op == "^=" else field == value


def _step(node: object, segment: str) -> tuple[list, bool]:
    """The values one path segment reaches from `node`, and whether it fans out into several."""
    if segment == "*":
        return (list(node.values()) if isinstance(node, dict) else list(node)), True
    if "=" in segment:
        assert isinstance(node, list), f"filter {segment!r} needs a list, got {type(node).__name__}"
        return [x for x in node if all(_matches(x, c) for c in segment.split("&"))], True
    if isinstance(node, list):
        return [node[int(segment)]], False
    if segment not in node:
        raise KeyError(f"no key {segment!r}; there are {sorted(node)[:12]}")
    return [node[segment]], False


def resolve(root: object, path: str) -> object:
    nodes, fanned = [root], False
    for segment in path.split("."):
        reached = []
        for node in nodes:
            values, fans = _step(node, segment)
            reached += values
            fanned |= fans
        nodes = reached
    if fanned:
        return nodes
    (value,) = nodes
    return value


_BINOPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
           ast.Pow: operator.pow}
_FUNCS = {"min": min, "max": max, "len": len, "sum": sum, "abs": abs}


def _scalar(value: object) -> object:
    """A filter that picks one item stands for that item."""
    if isinstance(value, list):
        assert len(value) == 1, f"a path picks {len(value)} values where one is needed; use min/max/len/sum"
        (value,) = value
    return value


def evaluate(expr: str, root: object) -> object:
    def ev(node: ast.AST) -> object:
        if isinstance(node, ast.Expression):
            return ev(node.body)
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            return resolve(root, node.value)
        if isinstance(node, ast.Constant) and isinstance(node.value, (int, float)):
            return node.value
        if isinstance(node, ast.BinOp) and type(node.op) in _BINOPS:
            return _BINOPS[type(node.op)](_scalar(ev(node.left)), _scalar(ev(node.right)))
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
            return -_scalar(ev(node.operand))
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in _FUNCS:
            args = [ev(a) for a in node.args]
            return _FUNCS[node.func.id](*(args if len(args) == 1 else map(_scalar, args)))
        raise ValueError(f"not allowed in a check marker: {ast.dump(node)}")

    return ev(ast.parse(expr.strip(), mode="eval"))


def render(template: str, root: object) -> str:
    def one(m: re.Match) -> str:
        expr, _, spec = m.group("expr").rpartition(":") if _has_spec(m.group("expr")) else (m.group("expr"), "", "")
        return format(_scalar(evaluate(expr, root)), spec)

    return PLACEHOLDER.sub(one, template)


def _has_spec(expr: str) -> bool:
    """A placeholder's last `:` outside quotes starts its format spec (paths never hold one)."""
    return ":" in re.sub(r"'[^']*'", "", expr)


def _load(sources: tuple[str, ...]) -> object:
    files = [RESULTS / s for s in sources]
    for f in files:
        assert f.is_file(), f"results file {f.relative_to(REPO)} does not exist"
    loaded = [json.loads(f.read_text()) for f in files]
    return loaded[0] if len(loaded) == 1 else loaded


def _occurs_in_order(fragments: list[str], text: str) -> bool:
    at = 0
    for fragment in fragments:
        at = text.find(fragment, at)
        if at < 0:
            return False
        at += len(fragment)
    return True


# ---- the tests ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("marker", ALL_MARKERS, ids=[m.id for m in ALL_MARKERS])
def test_a_documented_number_equals_its_results_file(marker: Marker) -> None:
    if all(s.endswith(".json") for s in marker.sources):
        expected = _normalise(render(marker.template, _load(marker.sources)))
    else:  # a results README or log: each fragment, verbatim, in the source too
        assert len(marker.sources) == 1 and not PLACEHOLDER.search(marker.template), (
            f"{marker.id}: a text source is one file and its template plain text")
        source = RESULTS / marker.sources[0]
        assert source.is_file(), f"{marker.id}: results file {source.relative_to(REPO)} does not exist"
        expected = _normalise(marker.template)
        text = _normalise(source.read_text())
        missing = [f for f in expected.split(GAP) if f not in text]
        assert not missing, f"{marker.id}: {missing} not in {marker.sources[0]}"
    assert _occurs_in_order(expected.split(GAP), marker.guarded), (
        f"{marker.id}: the results say {expected!r}, the text it guards reads:\n  {marker.guarded!r}")


@pytest.mark.parametrize("name", MUST_HAVE_MARKERS)
def test_headline_docs_keep_their_markers(name: str) -> None:
    assert any(m.doc == REPO / name for m in ALL_MARKERS), f"{name} has no check marker left"


@pytest.mark.parametrize("doc", DOCS, ids=[str(d.relative_to(REPO)) for d in DOCS])
def test_every_cited_results_path_exists(doc: Path) -> None:
    cited = {p.rstrip("/.") for p in re.findall(r"benchmarks/results/([\w.\-/]+)", doc.read_text())}
    cited -= {"latest.json"}  # written by `make bench`, never committed
    missing = sorted(p for p in cited if not (RESULTS / p).exists())
    assert not missing, f"{doc.name} cites results that do not exist: {missing}"


def test_the_checker_itself() -> None:
    """The machinery itself: a template rendered from data, found or not found in the guarded text."""
    root = {"arms": [{"arm": "lean", "rss": 7.2224}, {"arm": "fast", "rss": 9.17}], "n": {"1": 1048576}}
    assert render("{'arms.arm=lean.rss':.2f}", root) == "7.22"
    assert render("{max('arms.*.rss'):.2f} GiB, {'n.1' / 2**20:.1f} MiB", root) == "9.17 GiB, 1.0 MiB"
    assert render("{min('arms.arm^=le.rss'):.3f}", root) == "7.222"
    assert _occurs_in_order(["7.22", "0.443x"], "peaks at 7.22 GiB, 0.443x")
    assert not _occurs_in_order(["7.22", "0.443x"], "peaks at 7.39 GiB, 0.443x")
    text = "first paragraph 7.22\n\nsecond 7.39 <!-- check x.json: {'a'} --> third 0.4 <!-- check y.json:\n {'b'} -->"
    assert [_guarded_text(_fold(text), i) for i in (0, 1)] == ["second 7.39", "third 0.4"]
    table = "| a | 7.22 |\n|---|---|\n\n<!-- check x.json:\n {'a'} -->\n<!-- check y.json: {'b'} -->\n"
    assert [_guarded_text(_fold(table), i) for i in (0, 1)] == ["| a | 7.22 | |---|---|"] * 2
    items = "- one 7.39\n  more\n- two 7.22\n  more 0.443x\n  <!-- check x.json: {'a'} -->\n- three"
    assert _guarded_text(_fold(items), 0) == "- two 7.22 more 0.443x"
