#!/bin/sh
# The image's entrypoint. Reads the secrets that the services take as values from the files compose
# mounts (`secrets:`), so they are never in the image, the env file or `docker inspect`:
#   PGPASSWORD_FILE              -> PGPASSWORD (libpq uses it; DATABASE_URL carries no password)
#   GATEWAY_MANAGED_API_KEY_FILE -> GATEWAY_MANAGED_API_KEY
#   GATEWAY_EXTAUTH_SECRET_FILE  -> GATEWAY_EXTAUTH_SECRET (what Envoy proves itself with)
# GATEWAY_MASTER_KEY_FILE is left as it is: the services read the keyring file themselves (and read
# it again after a rotation).
set -eu
for name in PGPASSWORD GATEWAY_MANAGED_API_KEY GATEWAY_EXTAUTH_SECRET; do
    eval "file=\${${name}_FILE:-}"
    if [ -n "$file" ]; then
        value="$(cat "$file")"
        export "$name=$value"
        unset "${name}_FILE"
    fi
done
exec "$@"
