# giroident-broker image: built on the Rust image, run on distroless (no shell, no package
# manager) as the distroless `nonroot` user (65532). Build: docker build -t giroident-broker .

FROM rust:1.95-slim-bookworm AS build
WORKDIR /src

# Dependencies in their own layer, rebuilt only when Cargo.toml or Cargo.lock change: build the
# whole dependency graph against placeholder sources first. The benchmark is not built, but the
# manifest names it, so a placeholder stands in for it too.
COPY Cargo.toml Cargo.lock ./
RUN mkdir src benches \
 && echo 'fn main() {}' > benches/broker.rs \
 && echo 'fn main() {}' > src/main.rs \
 && touch src/lib.rs \
 && cargo build --release --locked \
 && rm -rf src

COPY config ./config
COPY migrations ./migrations
COPY src ./src
# COPY keeps the sources' timestamps, which may be older than the placeholder build: touch them so
# that cargo rebuilds the crate itself.
RUN touch src/main.rs src/lib.rs \
 && cargo build --release --locked \
 && cp target/release/giroident-broker /giroident-broker \
 && mkdir /ledger

FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /src/config/ /etc/giroident-broker/
COPY --from=build /giroident-broker /usr/local/bin/giroident-broker
# The identity ledger's default place (identities.database_url = sqlite:///var/lib/giroident-
# broker/identities.db): owned by the nonroot user, since distroless has no shell to create it at
# run time. A volume, so that one replica keeps its ledger across restarts; several replicas need
# PostgreSQL instead (README, "SQLite or PostgreSQL").
COPY --from=build --chown=65532:65532 /ledger /var/lib/giroident-broker
# Listen on every interface of the container; JSON log lines for the log collector.
ENV GIROIDENT_BROKER_SERVER__LISTEN=0.0.0.0:8080 \
    GIROIDENT_BROKER_ADMIN__LISTEN=0.0.0.0:9090 \
    GIROIDENT_BROKER_LOG__FORMAT=json
USER 65532:65532
VOLUME /var/lib/giroident-broker
EXPOSE 8080 9090
# SIGTERM starts the drain (server.drain_secs, default 5 s); docker stop waits 10 s by default.
STOPSIGNAL SIGTERM
HEALTHCHECK --interval=10s --timeout=5s --start-period=5s --retries=3 \
    CMD ["/usr/local/bin/giroident-broker", "healthcheck"]
ENTRYPOINT ["/usr/local/bin/giroident-broker"]
CMD ["serve"]
