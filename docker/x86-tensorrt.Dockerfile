# x86 GPU hosts with TensorRT (NGC image: TensorRT and its Python bindings preinstalled).
# Builds and checks engines for the GPU it runs on, from a build folder made by `toolchain build`.
#   docker build -f docker/x86-tensorrt.Dockerfile -t toolchain-trt .
#   docker run --rm --gpus all -v "$PWD/build/resnet18-nvidia_xavier:/work" toolchain-trt engine build /work
FROM nvcr.io/nvidia/tensorrt:24.08-py3
WORKDIR /opt/toolchain
COPY . .
# system site packages: the image's tensorrt bindings stay visible inside the venv
RUN apt-get update && apt-get install -y --no-install-recommends python3.11 python3.11-venv && rm -rf /var/lib/apt/lists/* \
 && PYTHON=python3.11 VENV_FLAGS=--system-site-packages docker/install.sh /opt/venv engine
ENV PATH=/opt/venv/bin:$PATH
ENTRYPOINT ["toolchain"]
