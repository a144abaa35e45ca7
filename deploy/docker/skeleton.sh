#!/bin/sh
# Writes to $1 the workspace's skeleton: every Cargo.toml and Cargo.lock as
# they are, and an empty stub for each target root (src/lib.rs,
# src/main.rs, src/bin/*.rs, benches/*.rs, examples/*.rs). The Dockerfile
# builds the dependencies from it in a layer that stays cached until a
# manifest or the lock file changes (what cargo-chef does, without
# installing it).
set -eu
out=$1
mkdir -p "$out"
cp Cargo.toml Cargo.lock "$out/"
find crates tests -name Cargo.toml -not -path '*/target/*' | while read -r manifest; do
  dir=$(dirname "$manifest")
  mkdir -p "$out/$dir"
  cp "$manifest" "$out/$manifest"
  for root in "$dir"/src/lib.rs "$dir"/src/main.rs "$dir"/src/bin/*.rs "$dir"/benches/*.rs "$dir"/examples/*.rs; do
    [ -f "$root" ] || continue
    mkdir -p "$out/$(dirname "$root")"
    case "$root" in
      */src/lib.rs) : >"$out/$root" ;;
      *) echo 'fn main() {}' >"$out/$root" ;;
    esac
  done
done
