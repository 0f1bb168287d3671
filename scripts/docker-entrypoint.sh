#!/bin/sh
# The serving image's entrypoint: bring the database schema up to date, then serve.
# Arguments go to `whaleid serve` (the image's CMD gives --host and --port).
set -eu
whaleid db upgrade
exec whaleid serve --no-migrate "$@"
