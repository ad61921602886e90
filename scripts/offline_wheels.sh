#!/usr/bin/env bash
# Wheels for running phi_helpers on an offline machine that already has its own (CUDA) torch, e.g. a
# GPU server with no network: download them here, copy the folder there, install them beside its torch.
#
#   scripts/offline_wheels.sh .whl                        # here: the lock's versions, CPython 3.12, Linux x86-64
#   PYTHON_VERSION=3.11 scripts/offline_wheels.sh .whl    # for another Python there
#   WITH_BITSANDBYTES=1 scripts/offline_wheels.sh .whl    # also bitsandbytes (int8/int4 on CUDA; 43 MB)
#
# There, from this repository's root (phi_helpers itself is used from the checkout, not installed):
#
#   python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl
#   export PYTHONPATH=/tmp/site:$PWD
#   python3 benchmarks/bench_gpu.py                  # then bench_gpu_quantization.py
#
# Only the packages a CUDA torch image tends to lack are fetched (its torch, numpy, Pillow, accelerate,
# tokenizers, safetensors and huggingface_hub are used as they are; transformers is replaced by the
# lock's version, which phi_helpers needs). No dependencies are resolved there (--no-deps): the list below
# is what `import phi_helpers` and the benchmarks need on top of such an image, checked with a Python 3.12
# environment holding only torch and those packages (docs/native-implementation.md, "On a GPU").
set -euo pipefail
cd "$(dirname "$0")/.."

folder=${1:?usage: scripts/offline_wheels.sh FOLDER}
python_version=${PYTHON_VERSION:-3.12}
packages=(
  transformers regex                                        # the lock's transformers (the image's may be older)
  xgrammar apache-tvm-ffi pydantic pydantic-core annotated-types typing-inspection   # constrained decoding
  jsonschema jsonschema-specifications referencing rpds-py attrs                    # schema validation
  rapidfuzz pypdfium2 torchao
)
[ -n "${WITH_BITSANDBYTES:-}" ] && packages+=(bitsandbytes)

mkdir -p "$folder"
for name in "${packages[@]}"; do
  version=$(sed -n "s/^$name==//p" requirements.txt)
  spec=$name${version:+==$version}  # bitsandbytes is not in the lock: its newest release
  python3 -m pip download --quiet --no-deps --only-binary=:all: --dest "$folder" \
    --python-version "$python_version" --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 "$spec"
done
du -sh "$folder"
