#!/bin/sh
# The image's entry point (under tini). No arguments: an ingest node (`serve`). `worker`: an
# inference worker taking jobs from the job queue. Any other pacs-node command runs as given
# (`studies`, `jobs`, `routes explain ...`). Before `serve` and `worker` it checks routes.yaml and
# the model bundles, so a bad configuration stops the container at once, naming the file, the
# key and the reason, instead of failing at the first study.
set -eu
PACS_NODE="${PACS_NODE_BIN:-pacs-node}"
if [ "$#" -eq 0 ]; then
    set -- serve
fi
case "$1" in
    serve | worker)
        "$PACS_NODE" routes check
        ;;
esac
exec "$PACS_NODE" "$@"
