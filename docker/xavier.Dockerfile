# Jetson Xavier (JetPack 5.1.x: L4T r35, TensorRT 8.5.2, CUDA 11.4). Build ON the Xavier:
# engines are tied to the GPU and TensorRT version that build them.
#   docker build -f docker/xavier.Dockerfile -t toolchain-xavier .
#   docker run --rm --runtime nvidia -v "$PWD/build/resnet18-nvidia_xavier:/work" toolchain-xavier engine build --trtexec /work
# JetPack 5's TensorRT Python bindings are for Python 3.8 and the toolchain needs 3.11, so
# on the Xavier the engine is built by trtexec from engine_plan.json (`--trtexec`).
FROM nvcr.io/nvidia/l4t-jetpack:r35.2.1
WORKDIR /opt/toolchain
COPY . .
RUN apt-get update && apt-get install -y --no-install-recommends software-properties-common \
 && add-apt-repository -y ppa:deadsnakes/ppa && apt-get update \
 && apt-get install -y --no-install-recommends python3.11 python3.11-venv && rm -rf /var/lib/apt/lists/* \
 && PYTHON=python3.11 docker/install.sh /opt/venv engine
ENV PATH=/opt/venv/bin:/usr/src/tensorrt/bin:$PATH
ENTRYPOINT ["toolchain"]
