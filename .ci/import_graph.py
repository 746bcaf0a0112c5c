#!/usr/bin/env python3
"""Module import graph of each workspace crate, from `crate::<module>` paths in the source.

Prints, per crate, each top-level module and the crate modules it uses, then any cycle
between top-level modules (a module and its own submodules count as one). Exits 1 when
there is a cycle. Usage: python3 .ci/import_graph.py [crate-src-dir ...]
"""
import pathlib
import re
import sys

CRATES = ["shared/src", "coordinator/src", "worker/src", "proto/src", "src"]


def top_module(src: pathlib.Path, f: pathlib.Path) -> str:
    rel = f.relative_to(src).with_suffix("")
    parts = rel.parts
    if parts[0] == "bin":
        return "bin"
    name = parts[0]
    return "(root)" if name in ("lib", "main") else name


def graph(src: pathlib.Path):
    edges = {}
    for f in sorted(src.rglob("*.rs")):
        text = f.read_text()
        # Test modules may use anything.
        text = re.split(r"#\[cfg\(test\)\]", text)[0]
        # Comments (doc links included) are not imports.
        text = re.sub(r"//[^\n]*", "", text)
        m = top_module(src, f)
        uses = set()
        for hit in re.finditer(r"crate::(\w+)", text):
            uses.add(hit.group(1))
        for block in re.finditer(r"use crate::\{([^}]*)\}", text):
            for name in re.findall(r"(\w+)", block.group(1)):
                uses.add(name)
        mods = {p.stem if p.is_file() else p.name for p in src.iterdir()}
        uses = {u for u in uses if u in mods and u != m and u not in ("lib", "main")}
        edges.setdefault(m, set()).update(uses)
    return edges


def cycles(edges):
    found = []
    state = {}

    def visit(n, path):
        state[n] = 1
        for d in sorted(edges.get(n, ())):
            if state.get(d) == 1:
                found.append(path[path.index(d):] + [d] if d in path else [n, d])
            elif d not in state:
                visit(d, path + [d])
        state[n] = 2

    for n in sorted(edges):
        if n not in state:
            visit(n, [n])
    return found


def main():
    roots = sys.argv[1:] or CRATES
    bad = False
    for r in roots:
        src = pathlib.Path(r)
        if not src.is_dir():
            continue
        edges = graph(src)
        print(f"{r}:")
        for m in sorted(edges):
            print(f"  {m} -> {', '.join(sorted(edges[m])) or '-'}")
        for c in cycles(edges):
            bad = True
            print(f"  CYCLE: {' -> '.join(c)}")
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()
