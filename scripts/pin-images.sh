#!/usr/bin/env bash
# Re-pins the base images of the Dockerfiles to the digests their tags point at now.
#
#   scripts/pin-images.sh                      # images/*/Dockerfile, rewritten in place
#   scripts/pin-images.sh path/to/Dockerfile   # others
#
# Every `name:tag@sha256:<digest>` in a file gets the digest the registry gives for name:tag
# today (the multi-platform index, as `docker pull name:tag` resolves it). Needs registry
# access and `crane` or `docker buildx`. Review the diff, rebuild the images, run the tests.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
if [ $# -eq 0 ]; then
  set -- "$root"/images/*/Dockerfile
fi

digest() {
  if command -v crane >/dev/null; then
    crane digest "$1"
  else
    docker buildx imagetools inspect "$1" --format '{{.Manifest.Digest}}'
  fi
}

for file in "$@"; do
  refs=$(grep -oE '[a-z0-9][a-z0-9./_-]*:[A-Za-z0-9._-]+@sha256:[0-9a-f]{64}' "$file" | sort -u)
  for ref in $refs; do
    tag=${ref%@*}
    new=$(digest "$tag")
    if ! [[ $new =~ ^sha256:[0-9a-f]{64}$ ]]; then
      echo "pin-images: no digest for $tag (got '$new')" >&2
      exit 1
    fi
    sed -i "s|$ref|$tag@$new|g" "$file"
    echo "$file: $tag@$new"
  done
done
