# armorstream: one image for sensor, stream, controller and CLI.
# The BPF objects are built at container start against the node's own BTF
# (/sys/kernel/btf/vmlinux is mounted by the sensor), never baked in.
FROM python:3.11-slim-bookworm
RUN apt-get update \
 && apt-get install -y --no-install-recommends clang llvm libbpf-dev bpftool make libbpf1 \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /opt/armorstream
COPY pyproject.toml README.md ./
COPY enforcer enforcer
COPY sensor sensor
COPY stream stream
COPY controller controller
COPY armorstream armorstream
COPY bpf bpf
# Editable: the sensor finds bpf/ (sources and built objects) next to its package.
RUN pip install --no-cache-dir -e .
ENTRYPOINT ["armorstream"]
CMD ["--help"]
