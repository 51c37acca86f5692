"""Render the chart's templates with the subset of Go templates they use, for tests without helm.

Supported, because the chart uses nothing else: ``{{ .Values.a.b }}``, ``$.Values``, ``.Release.Name``,
``.Release.Namespace``, ``.Chart.AppVersion``, string literals, ``$var`` from ``range $var := ...``,
``eq A B``, ``list A B``, ``include "name" ARG``, ``toYaml X``, and the pipe functions ``quote``,
``nindent N``, ``uniq``; ``if``/``else``/``end``, ``range``, ``define`` (in _helpers.tpl), comments
and ``{{-``/``-}}`` whitespace trimming. Anything else raises NeedsHelm, so a template that grows
beyond this subset fails its test loudly instead of being checked wrongly.
"""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

import yaml

TAG = re.compile(r"\{\{(-?)\s*(.*?)\s*(-?)\}\}", re.S)


class NeedsHelm(Exception):
    """The template uses Go template syntax outside the subset above: render it with helm instead."""


def _tokens(text: str) -> list:
    """Text pieces and (action) tags, with the {{- / -}} trimming applied."""
    out: list = []
    pos, trim_next = 0, False
    for m in TAG.finditer(text):
        piece = text[pos : m.start()]
        if trim_next:
            piece = piece.lstrip()
        if m.group(1):
            piece = piece.rstrip()
        out.append(piece)
        out.append(("tag", m.group(2)))
        pos, trim_next = m.end(), bool(m.group(3))
    tail = text[pos:]
    out.append(tail.lstrip() if trim_next else tail)
    return out


def _parse(tokens: list, i: int = 0, stop: tuple = ()) -> tuple[list, int, str | None]:
    """A tree of text, ("expr", e), ("if", cond, then, else), ("range", var, e, body), ("define", n, body)."""
    nodes: list = []
    while i < len(tokens):
        tok = tokens[i]
        i += 1
        if isinstance(tok, str):
            nodes.append(tok)
            continue
        action = tok[1]
        if action.startswith("/*"):
            continue
        word = action.split(None, 1)[0]
        if word in stop:
            return nodes, i, word
        if word == "if":
            then, i, ended = _parse(tokens, i, ("else", "end"))
            other: list = []
            if ended == "else":
                other, i, _ = _parse(tokens, i, ("end",))
            nodes.append(("if", action[3:], then, other))
        elif word == "range":
            m = re.fullmatch(r"range\s+(\$\w+)\s*:=\s*(.+)", action)
            if not m:
                raise NeedsHelm(action)
            body, i, _ = _parse(tokens, i, ("end",))
            nodes.append(("range", m.group(1), m.group(2), body))
        elif word == "define":
            body, i, _ = _parse(tokens, i, ("end",))
            nodes.append(("define", shlex.split(action)[1], body))
        elif word in ("else", "end", "with", "template", "block"):
            raise NeedsHelm(action)
        else:
            nodes.append(("expr", action))
    return nodes, i, None


class Renderer:
    def __init__(self, chart: Path, values: dict, release: str = "segflow", namespace: str = "segflow"):
        self.values = values
        self.top = {
            "Values": values,
            "Release": {"Name": release, "Namespace": namespace},
            "Chart": {"AppVersion": yaml.safe_load((chart / "Chart.yaml").read_text())["appVersion"]},
        }
        self.defines: dict[str, list] = {}
        for helper in (chart / "templates").glob("_*.tpl"):
            for node in _parse(_tokens(helper.read_text()))[0]:
                if isinstance(node, tuple) and node[0] == "define":
                    self.defines[node[1]] = node[2]

    def _term(self, words: list[str], scope: dict):
        head, args = words[0], words[1:]
        if head == "eq":
            return self._term([args[0]], scope) == self._term([args[1]], scope)
        if head == "list":
            return [self._term([a], scope) for a in args]
        if head == "toYaml":
            return yaml.safe_dump(self._term(args, scope), default_flow_style=False, sort_keys=False).rstrip()
        if head == "include":
            return self._render(self.defines[json.loads(args[0])], scope).strip()
        if args:
            raise NeedsHelm(" ".join(words))
        if head.startswith('"'):
            return json.loads(head)
        if head == ".":
            return self.top
        if head.startswith("$") and not head.startswith("$."):
            if head == "$":
                return self.top
            return scope[head]
        node = self.top
        for part in head.lstrip("$").strip(".").split("."):
            node = node[part]
        return node

    def _eval(self, expr: str, scope: dict):
        stages = [shlex.split(s, posix=False) for s in expr.split("|")]
        value = self._term(stages[0], scope)
        for fn, *args in stages[1:]:
            if fn == "quote":
                value = json.dumps(str(value))
            elif fn == "nindent":
                value = "\n" + "\n".join(" " * int(args[0]) + line for line in str(value).splitlines())
            elif fn == "uniq":
                value = list(dict.fromkeys(value))
            else:
                raise NeedsHelm(f"| {fn}")
        return value

    def _render(self, nodes: list, scope: dict) -> str:
        out = []
        for node in nodes:
            if isinstance(node, str):
                out.append(node)
            elif node[0] == "expr":
                out.append(str(self._eval(node[1], scope)))
            elif node[0] == "if":
                out.append(self._render(node[2] if self._eval(node[1], scope) else node[3], scope))
            elif node[0] == "range":
                for item in self._eval(node[2], scope):
                    out.append(self._render(node[3], {**scope, node[1]: item}))
        return "".join(out)

    def render(self, template: Path) -> list[dict]:
        """The template's Kubernetes objects, as YAML parses them."""
        text = self._render(_parse(_tokens(template.read_text()))[0], {})
        return [doc for doc in yaml.safe_load_all(text) if doc]
