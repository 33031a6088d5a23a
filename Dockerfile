# dflockd in an empty image: one static binary, nothing else.
#
# Build the binary first, then the image (the binary is copied from the build
# context, so nothing is compiled inside Docker):
#
#   make static                       # or scripts/static.sh -> target/static/dflockd
#   docker build -t dflockd .
#   docker run --rm -p 6388:6388 dflockd
#   docker run --rm -p 6388:6388 -e DFLOCKD_MAX_LOCKS=0 dflockd --host 0.0.0.0 --debug
#
# This image cannot be built on the development machine (it has no Docker
# engine). tests/static/empty_root.sh stands in for it: it runs the same
# binary, alone in an empty root, as the same user, with the same arguments
# and no environment, then takes and releases a lock and stops it with
# SIGTERM. Change the two together.
#
# Notes:
# - `docker stop` sends SIGTERM: the server drains (new commands get
#   `error_draining`, holders finish) for up to --shutdown-timeout (30 s),
#   but Docker only waits 10 s by default, so use `docker stop -t 35` or
#   `stop_grace_period: 35s` (Compose) to let a full drain finish.
# - TLS and the auth token are files: mount them read-only, e.g.
#   `-v /etc/dflockd:/etc/dflockd:ro -e DFLOCKD_TLS_CERT=/etc/dflockd/cert.pem
#   -e DFLOCKD_TLS_KEY=/etc/dflockd/key.pem -e DFLOCKD_AUTH_TOKEN_FILE=...`.
#   They must be readable by uid/gid 65532.
# - There is no shell and no health-check tool in the image; check health
#   from outside (the `ping` command over TCP).
FROM scratch

COPY target/static/dflockd /dflockd

EXPOSE 6388

# Any non-root id works: the server needs no files and no privileges to
# listen on 6388. 65532 is the conventional "nonroot" id of distroless images.
USER 65532:65532

ENTRYPOINT ["/dflockd"]
CMD ["--host", "0.0.0.0"]
