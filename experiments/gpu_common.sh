# Sourced by the GPU run scripts: installs the carried wheels, decodes the data
# once (its cache file has a fixed temporary name), starts CUDA MPS so that the
# runs' small kernels overlap instead of time-slicing the GPU.
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD KERAS_BACKEND=jax PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false
OUT=${OUT:-out}; mkdir -p "$OUT" runs/logs
L=runs/logs
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee $L/gpu.txt
if [ -z "${NO_MPS:-}" ] && nvidia-cuda-mps-control -d 2>$L/mps.txt; then echo "MPS started"; else echo "no MPS: $(cat $L/mps.txt)"; fi
python3 -c "import sys; sys.path.insert(0, '.data'); import datasets; datasets.load_cifar10()"
E=examples/cifar10_network_minimization.py F=examples/cifar10_fast_optimization.py M=examples/mnist_hinton.py
( while sleep 30; do nvidia-smi --query-gpu=utilization.gpu,memory.used --format=csv,noheader; done ) > $L/gpu_util.txt 2>&1 &
