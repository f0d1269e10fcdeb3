"""Writes the order in which lld lays out aq-bridge's functions (scripts/lib/aq-bridge.order).

usage: symbol_order.py MAP OUT CALLGRIND_FILE...

MAP is the link map (-Map) of the binary the callgrind runs profiled. Every function of the binary
that ran in those runs is listed, most instructions first; functions in their own input section
(.text.NAME: our code and the packages', compiled with -function-sections) come first, so that
what runs is packed into as few pages as possible. Functions inside shared sections (C and C++
objects, and the toolchain's libraries built without function sections) follow: listing one
moves its whole section, which is harmless but packs nothing.
"""
import collections
import re
import sys


def executed(paths, binary_suffix):
    cost = collections.Counter()
    for path in paths:
        objects, names = {}, {}
        current_object = call_object = None
        current = None
        after_calls = False
        for line in open(path, errors="replace"):
            line = line.rstrip("\n")
            m = re.match(r"^(c?ob|c?fn|calls)=(.*)$", line)
            if m:
                key, value = m.groups()
                ref = re.match(r"^\((\d+)\)(?: (.*))?$", value)
                if key in ("ob", "cob"):
                    if ref and ref.group(2) is not None:
                        objects[ref.group(1)] = ref.group(2)
                    name = objects.get(ref.group(1)) if ref else value
                    if key == "ob":
                        current_object = name
                    else:
                        call_object = name
                elif key in ("fn", "cfn"):
                    if ref and ref.group(2) is not None:
                        names[ref.group(1)] = ref.group(2)
                    name = names.get(ref.group(1)) if ref else value
                    if key == "fn":
                        current = (current_object, name)
                        call_object = current_object
                    else:
                        cost[(call_object, name)] += 0  # called, so it ran
                        call_object = current_object
                else:
                    after_calls = True
                continue
            if line and (line[0].isdigit() or line[0] in "+-*"):
                if after_calls:  # the inclusive cost of a call, not this function's own
                    after_calls = False
                    continue
                parts = line.split()
                if len(parts) >= 2 and current:
                    try:
                        cost[current] += int(parts[1])
                    except ValueError:
                        pass
    ranked = [(c, name) for (obj, name), c in cost.items() if obj and obj.endswith(binary_suffix) and name]
    ranked.sort(key=lambda x: -x[0])
    return [name for _, name in ranked]


def own_sections(map_path):
    own, shared = set(), set()
    in_text, section = False, None
    for line in open(map_path):
        m = re.match(r"^\s*[0-9a-f]+\s+[0-9a-f]+\s+[0-9a-f]+\s+\d+ (.*)$", line.rstrip("\n"))
        if not m:
            continue
        rest = m.group(1)
        indent = len(rest) - len(rest.lstrip(" "))
        if indent == 0:
            in_text = rest.strip() == ".text"
        elif in_text and indent == 8:
            s = re.search(r"\(\.text\.(.+)\)$", rest.strip())
            section = s.group(1) if s else None
        elif in_text and indent == 16:
            symbol = rest.strip()
            (own if section == symbol else shared).add(symbol)
    return own - shared


def main():
    map_path, out, runs = sys.argv[1], sys.argv[2], sys.argv[3:]
    names = executed(runs, "/aq-bridge")
    own = own_sections(map_path)
    first = [n for n in names if n in own]
    chosen = set(first)
    rest = [n for n in names if n not in chosen]
    with open(out, "w") as f:
        f.writelines(n + "\n" for n in first + rest)
    print(f"{len(first)} functions in their own sections, {len(rest)} in shared ones", file=sys.stderr)


if __name__ == "__main__":
    main()
