#!/bin/sh
# Builds app.py (and wharf.py, and any package installed beside them) into
# {{name}}.wasm, a wasi:http component, with componentize-py (install it with
# `pip install .` or `pip install componentize-py==0.25.1`). The world in
# wit/ is the wasi:http 0.2 proxy world with key-value, configuration and
# the environment.
set -e
cd "$(dirname "$0")"
componentize-py -d wit -w service componentize app -o {{name}}.wasm
echo "built {{name}}.wasm"
