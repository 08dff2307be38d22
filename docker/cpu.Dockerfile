# CPU build image for the x86_fbgemm target (and the host-side checks of every target).
#   docker build -f docker/cpu.Dockerfile -t toolchain-cpu .
#   docker run --rm -v "$PWD/models:/models" toolchain-cpu build /models/model.pt2 --target x86_fbgemm --out /models/build
FROM python:3.11-slim
WORKDIR /opt/toolchain
COPY . .
RUN docker/install.sh /opt/venv full
ENV PATH=/opt/venv/bin:$PATH
ENTRYPOINT ["toolchain"]
