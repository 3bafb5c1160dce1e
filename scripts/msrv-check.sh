#!/usr/bin/env bash
# Checks that Cargo.toml's `rust-version` is what the committed lockfile really needs: the
# highest `rust-version` among the crate's normal and build dependencies (not dev ones), from
# `cargo metadata`, with the default features; and that all features together need exactly
# ALL_FEATURES (tonic 0.14 for `grpc`), the figure README and the feature docs give.
set -euo pipefail
cd "$(dirname "$0")/.."
ALL_FEATURES=1.88
needed() {
  cargo metadata --format-version 1 --locked "$@" | python3 -c '
import json, sys
m = json.load(sys.stdin)
root = m["resolve"]["root"]
pkgs = {p["id"]: p for p in m["packages"]}
nodes = {n["id"]: n for n in m["resolve"]["nodes"]}
def version(s):
    return tuple(int(x) for x in s.split("."))
seen, todo, best = set(), [root], ("0", None)
while todo:
    node = nodes[todo.pop()]
    for dep in node["deps"]:
        kinds = {k["kind"] for k in dep["dep_kinds"]}
        if node["id"] == root and kinds <= {"dev"}:
            continue
        if dep["pkg"] not in seen:
            seen.add(dep["pkg"])
            todo.append(dep["pkg"])
            rv = pkgs[dep["pkg"]].get("rust_version")
            if rv and version(rv) > version(best[0]):
                best = (rv, pkgs[dep["pkg"]]["name"] + " " + pkgs[dep["pkg"]]["version"])
v = best[0].split(".")
print(".".join(v[:2]), best[1])
'
}
declared=$(sed -n 's/^rust-version *= *"\([0-9.]*\)"/\1/p' Cargo.toml)
read -r default_needs default_by < <(needed)
read -r all_needs all_by < <(needed --all-features)
echo "rust-version = $declared; default features need $default_needs ($default_by); all features need $all_needs ($all_by)"
status=0
if [ "$declared" != "$default_needs" ]; then
  echo "MISMATCH: Cargo.toml says rust-version = $declared, the lockfile needs $default_needs ($default_by)" >&2
  status=1
fi
if [ "$all_needs" != "$ALL_FEATURES" ]; then
  echo "MISMATCH: all features need $all_needs ($all_by), README and the feature docs say $ALL_FEATURES" >&2
  status=1
fi
exit $status
