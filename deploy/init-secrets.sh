#!/bin/sh
# Creates the secrets docker-compose.yml mounts, under deploy/secrets/ (git-ignored, and outside the
# image's build context). Files that exist are left as they are, so it is safe to run again.
#
#   keyring/master.key      the master keyring, `version:base64url(32 bytes)` per line; it seals the
#                           customers' RunPod keys: back it up, losing it loses every linked key
#   postgres_password       the password of PostgreSQL's `gateway` role
#   managed_api_key         the platform's own RunPod key for the managed destination (empty: unused)
#   grafana_admin_password  Grafana's `admin` password
#   extauth_secret          what Envoy proves itself to ext_authz with (README, "Key custody"); replace
#                           it (and restart envoy and extauth) if it may have leaked
#
# Run it as root (sudo sh deploy/init-secrets.sh) so each file can be given to the uid that reads it:
# 10001 (the gateway image), 472 (Grafana); PostgreSQL reads its file as root. Otherwise the files are
# made readable to all inside the private deploy/secrets/ directory, and `gatewayctl master-key rotate`
# cannot write the keyring until you run: sudo chown -R 10001:10001 deploy/secrets/keyring
set -eu

dir="$(cd "$(dirname "$0")" && pwd)/secrets"
umask 077
mkdir -p "$dir/keyring"
chmod 700 "$dir"

# URL-safe base64 of N random bytes, padding kept (the keyring's format); passwords drop the padding.
b64url() { head -c "$1" /dev/urandom | base64 | tr -d '\n' | tr '+/' '-_'; }
password() { b64url "$1" | tr -d '='; }

create() {  # path content (written without a trailing newline)
    if [ -e "$1" ]; then
        echo "kept     $1"
    else
        printf '%s' "$2" > "$1"
        echo "created  $1"
    fi
}

create "$dir/keyring/master.key" "1:$(b64url 32)"
create "$dir/postgres_password" "$(password 24)"
[ -e "$dir/managed_api_key" ] || { : > "$dir/managed_api_key"; echo "created  $dir/managed_api_key (empty)"; }
create "$dir/grafana_admin_password" "$(password 18)"
create "$dir/extauth_secret" "$(password 32)"

if [ "$(id -u)" = 0 ]; then
    # extauth_secret: ext_authz reads it as 10001, Envoy's entrypoint as root.
    chown -R 10001:10001 "$dir/keyring" "$dir/postgres_password" "$dir/managed_api_key" "$dir/extauth_secret"
    chown 472:0 "$dir/grafana_admin_password"
    chmod 700 "$dir/keyring"
    chmod 400 "$dir/postgres_password" "$dir/managed_api_key" "$dir/grafana_admin_password" "$dir/extauth_secret"
    chmod 600 "$dir/keyring/master.key"
else
    chmod 755 "$dir/keyring"
    chmod 644 "$dir/keyring/master.key" "$dir/postgres_password" "$dir/managed_api_key" \
        "$dir/grafana_admin_password" "$dir/extauth_secret"
    echo "not root: files made readable inside $dir (mode 700); for key rotation run"
    echo "  sudo chown -R 10001:10001 $dir/keyring"
fi
