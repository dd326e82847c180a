# prefixd: build the binary, fetch and verify the default model, run on a slim image.
#   docker build -t prefixd . && docker run -p 8080:8080 prefixd
# (Not built in CI here: this machine kind has no Docker engine.)
FROM rust:1-bookworm AS build
RUN apt-get update && apt-get install -y --no-install-recommends python3-pip && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY . .
RUN scripts/fetch-model && cargo build --release --locked

FROM debian:bookworm-slim
# A numeric user, so that Kubernetes' runAsNonRoot can verify it (deploy/k8s).
RUN useradd --system --uid 10001 --home /srv/prefixd prefixd
WORKDIR /srv/prefixd
COPY --from=build /src/target/release/prefixd /usr/local/bin/prefixd
COPY --from=build /src/models ./models
COPY --from=build /src/prefixes ./prefixes
RUN chown -R prefixd ./prefixes
USER 10001
ENV PREFIXD_ADDR=0.0.0.0:8080
EXPOSE 8080
STOPSIGNAL SIGTERM
ENTRYPOINT ["prefixd", "serve"]
